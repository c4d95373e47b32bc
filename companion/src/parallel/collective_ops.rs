//! Megatron-LM's conjugate operators as autograd ops over a tensor-parallel
//! group (Shoeybi et al. 2019, §3): `f` is the identity forward and an
//! all-reduce of the gradient backward (before a column-parallel layer);
//! `g` is an all-reduce forward and the identity backward (after a
//! row-parallel layer); and the vocabulary-parallel cross-entropy, whose
//! softmax over the whole vocabulary takes all-reduces of per-row numbers,
//! never the logits. On CPU tensors (fp32): the collectives exchange host
//! memory, as the thread and MPI ranks do.
//!
//! Every rank runs the same graph, so the collectives of the backward pass
//! come in the same order on every rank.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::zero::comm::Communicator;

fn host(s: &CpuStorage, l: &Layout, what: &str) -> Result<Vec<f32>> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expected f32 on the CPU")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(v[a..b].to_vec()),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

fn comm_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("tensor-parallel collective: {e}"))
}

/// The sum over the group (no gradient of its own).
struct AllReduce(Arc<dyn Communicator>);

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "tp-all-reduce"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut x = host(s, l, "all-reduce")?;
        self.0.all_reduce_sum(&mut x).map_err(comm_err)?;
        Ok((CpuStorage::F32(x), l.shape().clone()))
    }
}

/// Megatron's `g`: all-reduce forward, identity backward.
struct ReduceForward(Arc<dyn Communicator>);

impl CustomOp1 for ReduceForward {
    fn name(&self) -> &'static str {
        "tp-g"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        AllReduce(self.0.clone()).cpu_fwd(s, l)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.clone()))
    }
}

/// Megatron's `f`: identity forward, all-reduce backward.
struct ReduceBackward(Arc<dyn Communicator>);

impl CustomOp1 for ReduceBackward {
    fn name(&self) -> &'static str {
        "tp-f"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(host(s, l, "f")?), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            g.contiguous()?
                .apply_op1_no_bwd(&AllReduce(self.0.clone()))?,
        ))
    }
}

/// `g(x)`: the sum of the group's partial results.
pub fn reduce_forward(x: &Tensor, comm: &Arc<dyn Communicator>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ReduceForward(comm.clone()))
}

/// `f(x)`: `x`, whose gradient is summed over the group.
pub fn reduce_backward(x: &Tensor, comm: &Arc<dyn Communicator>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ReduceBackward(comm.clone()))
}

/// Σ over rows with a target of (logsumexp(row) − row[target]) where each
/// rank holds the columns `[offset, offset + V/tp)` of every row.
struct VocabParallelCrossEntropy {
    comm: Arc<dyn Communicator>,
    targets: Arc<Vec<i64>>,
    offset: usize,
    /// Per row: the whole vocabulary's max and Σ exp(x − max), for backward.
    saved: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl CustomOp1 for VocabParallelCrossEntropy {
    fn name(&self) -> &'static str {
        "tp-vocab-parallel-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = host(s, l, "vocab-parallel cross-entropy")?;
        let v = *l.dims().last().expect("rank 2");
        let rows = x.len() / v;
        // The row maxima over the whole vocabulary: every rank's, then the max.
        let local_max: Vec<f32> = x
            .chunks(v)
            .map(|r| r.iter().copied().fold(f32::NEG_INFINITY, f32::max))
            .collect();
        let all = self.comm.all_gather(&local_max).map_err(comm_err)?;
        let max: Vec<f32> = (0..rows)
            .map(|i| {
                all.chunks(rows)
                    .map(|m| m[i])
                    .fold(f32::NEG_INFINITY, f32::max)
            })
            .collect();
        // Σ exp(x − max) and the target's logit (on the rank that holds it).
        let mut sums = Vec::with_capacity(2 * rows);
        for (i, r) in x.chunks(v).enumerate() {
            sums.push(r.iter().map(|&z| (z - max[i]).exp()).sum::<f32>());
        }
        for (i, r) in x.chunks(v).enumerate() {
            let t = self.targets[i];
            let local = t - self.offset as i64;
            sums.push(if t >= 0 && (0..v as i64).contains(&local) {
                r[local as usize]
            } else {
                0.0
            });
        }
        self.comm.all_reduce_sum(&mut sums).map_err(comm_err)?;
        let (sumexp, target_logit) = sums.split_at(rows);
        let mut total = 0f64;
        for i in 0..rows {
            if self.targets[i] >= 0 {
                total += (sumexp[i].ln() + max[i] - target_logit[i]) as f64;
            }
        }
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some((max, sumexp.to_vec()));
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some((max, sumexp)) = saved else {
            candle_core::bail!("vocab-parallel cross-entropy: backward before forward")
        };
        let (rows, v) = x.dims2()?;
        let mut d: Vec<f32> = x.flatten_all()?.to_vec1()?;
        for (i, r) in d.chunks_mut(v).enumerate() {
            let t = self.targets[i];
            if t < 0 {
                r.fill(0.0);
                continue;
            }
            for z in r.iter_mut() {
                *z = (*z - max[i]).exp() / sumexp[i];
            }
            let local = t - self.offset as i64;
            if (0..v as i64).contains(&local) {
                r[local as usize] -= 1.0;
            }
        }
        let d = Tensor::from_vec(d, (rows, v), x.device())?;
        Ok(Some(d.broadcast_mul(g)?))
    }
}

/// The summed cross-entropy of logits split by vocabulary over `comm`
/// (this rank's columns start at `offset`); targets < 0 are skipped.
pub fn vocab_parallel_cross_entropy_sum(
    logits: &Tensor,
    targets: Vec<i64>,
    offset: usize,
    comm: &Arc<dyn Communicator>,
) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("cross-entropy: {} targets for {n} rows", targets.len());
    }
    logits.contiguous()?.apply_op1(VocabParallelCrossEntropy {
        comm: comm.clone(),
        targets: Arc::new(targets),
        offset,
        saved: Mutex::new(None),
    })
}
