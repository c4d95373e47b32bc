//! What a rank holds and what crosses between ranks: the parameters of
//! Megatron's split ([`expected_held`]), a communicator that counts the
//! elements this rank hands to each collective, and the count for a 3D-parallel step
//! built from the Megatron-LM and ZeRO papers' terms (Shoeybi et al. 2019 §3: two
//! all-reduces of the b·s·h activations per layer in the forward pass and
//! two in the backward; a pipeline boundary carries each micro-batch's
//! activations one way and their gradient the other (Narayanan et al.
//! 2021); data parallelism all-reduces the gradients, and ZeRO-1
//! all-gathers the updated parameters (Rajbhandari et al. 2020)).
//!
//! The counts are payloads (the elements a rank hands to a collective): the
//! papers' terms, plus this implementation's small ones (the loss's three
//! numbers per token, f64 sums as 2 elements, padding). How many bytes a
//! transport then puts on the wire depends on its algorithm (a ring
//! all-reduce sends 2(n−1)/n of its payload per rank, a reduce-scatter or an
//! all-gather (n−1)/n).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::GPT2Config;
use crate::zero::comm::{Communicator, Gathered, Result};

/// A communicator whose sends are counted (its sub-groups count into the
/// same counter).
pub struct CountingCommunicator {
    inner: Arc<dyn Communicator>,
    sent: Arc<AtomicU64>,
}

impl CountingCommunicator {
    pub fn wrap(inner: Arc<dyn Communicator>) -> (Arc<dyn Communicator>, Arc<AtomicU64>) {
        let sent = Arc::new(AtomicU64::new(0));
        let c = CountingCommunicator {
            inner,
            sent: sent.clone(),
        };
        (Arc::new(c), sent)
    }

    /// A payload of `n` elements handed to a collective (none on one rank).
    fn count(&self, n: usize) {
        if self.inner.world_size() > 1 {
            self.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

impl Communicator for CountingCommunicator {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn exchange(&self, send: Vec<f32>) -> Result<Gathered> {
        self.sent.fetch_add(send.len() as u64, Ordering::Relaxed);
        self.inner.exchange(send)
    }
    fn abort(&self, why: &str) {
        self.inner.abort(why)
    }
    fn split(&self, color: usize) -> Result<Arc<dyn Communicator>> {
        let sub = self.inner.split(color)?;
        Ok(Arc::new(CountingCommunicator {
            inner: sub,
            sent: self.sent.clone(),
        }))
    }
    // The collectives the transport may run itself (NCCL's), forwarded and
    // counted as their payload, as the exchange would count it.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.count(buf.len());
        self.inner.all_reduce_sum(buf)
    }
    fn reduce_scatter_sum(&self, send: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        self.count(send.len());
        self.inner.reduce_scatter_sum(send, counts)
    }
    fn all_gather(&self, send: &[f32]) -> Result<Vec<f32>> {
        self.count(send.len());
        self.inner.all_gather(send)
    }
    fn exchange_on_device(
        &self,
        t: Option<&candle_core::Tensor>,
    ) -> Option<Result<Vec<Option<candle_core::Tensor>>>> {
        let r = self.inner.exchange_on_device(t)?;
        // As `exchange` counts: what this rank sends.
        let n = t.map_or(0, candle_core::Tensor::elem_count);
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        Some(r)
    }
    fn all_reduce_sum_on_device(
        &self,
        t: &candle_core::Tensor,
    ) -> Option<Result<candle_core::Tensor>> {
        let r = self.inner.all_reduce_sum_on_device(t)?;
        self.count(t.elem_count());
        Some(r)
    }
    fn all_gather_on_device(&self, t: &candle_core::Tensor) -> Option<Result<candle_core::Tensor>> {
        let r = self.inner.all_gather_on_device(t)?;
        self.count(t.elem_count());
        Some(r)
    }
    fn reduce_scatter_sum_on_device(
        &self,
        t: &candle_core::Tensor,
    ) -> Option<Result<candle_core::Tensor>> {
        let r = self.inner.reduce_scatter_sum_on_device(t)?;
        self.count(t.elem_count());
        Some(r)
    }
}

/// Elements one rank sends in one step, by kind of group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Traffic {
    /// The tensor-parallel group's all-reduces (and the vocabulary-parallel
    /// loss's per-token numbers).
    pub tensor: u64,
    /// Activations and their gradients to the neighbouring stages, and the
    /// tied embedding's gradient between the first and last stage.
    pub pipeline: u64,
    /// The gradients' all-reduce and ZeRO-1's all-gather over the replicas.
    pub data: u64,
}

/// Where a rank sits and what it runs, for [`expected`].
pub struct StepShape<'a> {
    pub config: &'a GPT2Config,
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
    pub stage: usize,
    /// Micro-batches this replica runs, each of `rows` rows of `seq` tokens.
    pub micro_batches: usize,
    pub rows: usize,
    pub seq: usize,
    /// Elements of the parameters this rank holds.
    pub held: usize,
}

/// The papers' count for one step of this rank (an f64 reduction of the
/// loss or the gradient norm travels as 2 elements).
pub fn expected(s: &StepShape) -> Traffic {
    let c = s.config;
    let (first, last) = (s.stage == 0, s.stage + 1 == s.pp);
    let bsh = (s.rows * s.seq * c.n_embd) as u64;
    let bs = (s.rows * s.seq) as u64;
    let m = s.micro_batches as u64;
    let layers = (c.n_layer / s.pp) as u64;
    let tensor = if s.tp > 1 {
        // Per layer: g after attention and MLP forward, f's all-reduce of
        // ln_1's and ln_2's gradient backward; the embedding's g on the
        // first stage; ln_f's f and the loss's max, Σexp and target logit
        // per token on the last; then the gradient norm.
        let per_mb =
            4 * layers * bsh + if first { bsh } else { 0 } + if last { bsh + 3 * bs } else { 0 };
        m * per_mb + 2
    } else {
        0
    };
    let pipeline = if s.pp > 1 {
        let boundary = (!last as u64 + !first as u64) * bsh;
        let tied = c.tie_word_embeddings && (first || last);
        // Activations and gradients; the tied embedding's gradient; the
        // gradient norm's and the loss's sums over the stages.
        m * boundary
            + if tied {
                (super::tensor::vocab_per_rank(c.vocab_size, s.tp) * c.n_embd) as u64
            } else {
                0
            }
            + 4
    } else {
        0
    };
    let data = if s.dp > 1 {
        let part = (s.held as u64).div_ceil(s.dp as u64);
        // The gradients reduce-scattered (the flat vector padded to dp
        // parts), this rank's updated part all-gathered, the sums of the
        // batch's token count, the gradient norm and the loss.
        part * s.dp as u64 + part + 6
    } else {
        0
    };
    Traffic {
        tensor,
        pipeline,
        data,
    }
}

/// The parameters one rank of stage `stage` (of `pp`) holds under
/// Megatron's split over `tp` ranks, by the closed form: per block its
/// share of `c_attn` and `c_fc` (columns), of both `c_proj` (rows, their
/// biases whole) and the LayerNorms whole; ⌈V/tp⌉ vocabulary rows of `wte`
/// and the whole `wpe` on the first stage; `ln_f` and the head's rows
/// (a tied head's copy of `wte` when the pipeline has several stages) on
/// the last.
pub fn expected_held(c: &GPT2Config, tp: usize, pp: usize, stage: usize) -> usize {
    let (w, inner) = (c.n_embd, c.inner_dim());
    let block = 2 * w
        + w * 3 * w / tp
        + 3 * w / tp
        + (w / tp) * w
        + w
        + 2 * w
        + w * inner / tp
        + inner / tp
        + (inner / tp) * w
        + w;
    let rows = super::tensor::vocab_per_rank(c.vocab_size, tp) * w;
    let mut n = block * (c.n_layer / pp);
    if stage == 0 {
        n += rows + c.n_positions * w;
    }
    if stage + 1 == pp {
        n += 2 * w;
        if !c.tie_word_embeddings || pp > 1 {
            n += rows;
        }
    }
    n
}
