//! 3D parallelism: how the ranks of a run are laid out into tensor-,
//! pipeline- and data-parallel groups, as Megatron-LM lays them out
//! (`parallel_state.initialize_model_parallel`, order tp-dp-pp), and those
//! groups made as sub-communicators of the run's communicator.
//!
//! The pieces: the groups (`layout`); GPT-2 split by tensor parallelism
//! (`tensor`, with Megatron's conjugate collectives in `collective_ops` and
//! the vocabulary padded to divide), which part of the model each stage
//! holds (`stages`); dropout drawing the whole model's masks (`dropout`);
//! AdamW over the shards (`optimizer`, ZeRO-1 over the data-parallel
//! group; its state on a GPU rank's device in `optimizer_on_device`);
//! pipeline stages run in 1F1B order (`pipeline`), each on the
//! fused CPU kernels (`fused_stage`, `fused_backward`) or, for other
//! activations, on candle's autograd (`tensor`); the three
//! composed (`three_d`), with each group's traffic counted against the
//! papers' formulas (`traffic`); the whole state gathered from the shards
//! and cut again for another layout (`full_state`). The Trainer runs them
//! when `tensor_model_parallel_size` or `pipeline_model_parallel_size` is
//! above 1 (`train::engine`); the 4.3.3 notebook shows them.

mod collective_ops;
pub mod dropout;
mod full_state;
mod fused_backward;
pub mod fused_stage;
mod layout;
pub mod optimizer;
mod optimizer_on_device;
pub mod pipeline;
pub mod stages;
pub mod tensor;
pub mod three_d;
pub mod traffic;

pub use layout::{Coords, ParallelGroups, ParallelLayout};
pub use optimizer::ShardOptimizer;
pub use tensor::TensorParallelGpt2;
pub use three_d::{ParallelTrainer, StepOutput};

/// Tests: the largest |x| of `t`.
#[cfg(test)]
pub(crate) fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Tests: a weight as the comparisons take it: `c_attn.bias` without its
/// key third, whose true gradient is exactly zero (softmax is shift
/// invariant along a query's row); backward leaves ~1e-9 rounding there,
/// which Adam (eps 1e-8) turns into steps of up to lr, differently for any
/// order of sums (tests/fixtures/train_step.json's `noise_dominated`).
#[cfg(test)]
pub(crate) fn compared_part(name: &str, t: &candle_core::Tensor) -> candle_core::Tensor {
    if !name.ends_with("attn.c_attn.bias") {
        return t.clone();
    }
    let k = t.dim(0).unwrap() / 3;
    let (q, v) = (t.narrow(0, 0, k).unwrap(), t.narrow(0, 2 * k, k).unwrap());
    candle_core::Tensor::cat(&[q, v], 0).unwrap()
}

/// The tests' GPT-2: vocabulary 64, 16 positions, 32 wide, 4 heads,
/// `n_layer` blocks, no dropout.
#[cfg(test)]
pub(crate) fn tiny_config(n_layer: usize) -> crate::config::GPT2Config {
    let mut c = crate::config::GPT2Config::preset("gpt2").expect("a preset");
    (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head) = (64, 16, 32, n_layer, 4);
    (c.attn_pdrop, c.resid_pdrop, c.embd_pdrop) = (0.0, 0.0, 0.0);
    c
}

/// Tests: a transport with device collectives, as NCCL's, on CPU ranks: it
/// sums, gathers and exchanges the tensors it is handed (through the host
/// transport it wraps) and counts them, so the paths GPU ranks take run
/// here.
#[cfg(test)]
pub(crate) struct DeviceCollectives {
    pub inner: std::sync::Arc<dyn crate::zero::comm::Communicator>,
    /// Tensors summed, reduce-scattered or gathered.
    pub tensors: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Exchanges of tensors.
    pub exchanges: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[cfg(test)]
impl crate::zero::comm::Communicator for DeviceCollectives {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn exchange(&self, send: Vec<f32>) -> crate::zero::comm::Result<crate::zero::comm::Gathered> {
        self.inner.exchange(send)
    }
    fn abort(&self, why: &str) {
        self.inner.abort(why)
    }
    fn split(
        &self,
        color: usize,
    ) -> crate::zero::comm::Result<std::sync::Arc<dyn crate::zero::comm::Communicator>> {
        Ok(std::sync::Arc::new(DeviceCollectives {
            inner: self.inner.split(color)?,
            tensors: self.tensors.clone(),
            exchanges: self.exchanges.clone(),
        }))
    }
    fn exchange_on_device(
        &self,
        t: Option<&candle_core::Tensor>,
    ) -> Option<crate::zero::comm::Result<Vec<Option<candle_core::Tensor>>>> {
        self.exchanges
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let send = t.map_or(vec![], |t| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        });
        Some(self.inner.exchange(send).map(|all| {
            all.iter()
                .map(|v| {
                    let dev = candle_core::Device::Cpu;
                    (!v.is_empty())
                        .then(|| candle_core::Tensor::from_slice(v, v.len(), &dev).unwrap())
                })
                .collect()
        }))
    }
    fn all_reduce_sum_on_device(
        &self,
        t: &candle_core::Tensor,
    ) -> Option<crate::zero::comm::Result<candle_core::Tensor>> {
        self.through_host(t, |mut v| self.inner.all_reduce_sum(&mut v).map(|()| v))
    }
    fn reduce_scatter_sum_on_device(
        &self,
        t: &candle_core::Tensor,
    ) -> Option<crate::zero::comm::Result<candle_core::Tensor>> {
        let world = self.inner.world_size();
        self.through_host(t, |v| {
            self.inner
                .reduce_scatter_sum(&v, &vec![v.len() / world; world])
        })
    }
    fn all_gather_on_device(
        &self,
        t: &candle_core::Tensor,
    ) -> Option<crate::zero::comm::Result<candle_core::Tensor>> {
        self.through_host(t, |v| self.inner.all_gather(&v))
    }
}

#[cfg(test)]
impl DeviceCollectives {
    /// `t`'s elements through the host collective `op`, counted, back as a
    /// flat tensor on `t`'s device.
    fn through_host(
        &self,
        t: &candle_core::Tensor,
        op: impl FnOnce(Vec<f32>) -> crate::zero::comm::Result<Vec<f32>>,
    ) -> Option<crate::zero::comm::Result<candle_core::Tensor>> {
        self.tensors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        Some(op(v).map(|out| {
            let n = out.len();
            candle_core::Tensor::from_vec(out, n, t.device()).unwrap()
        }))
    }
}
