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
        let (total, max, sumexp) =
            vocab_parallel_forward(&x, (v, v), &self.targets, self.offset, self.comm.as_ref())?;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some((max, sumexp));
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some((max, sumexp)) = saved else {
            candle_core::bail!("vocab-parallel cross-entropy: backward before forward")
        };
        let (rows, v) = x.dims2()?;
        let mut d: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let stats = (&max[..], &sumexp[..]);
        vocab_parallel_grad(&mut d, (v, v), &self.targets, self.offset, stats, 1.0);
        let d = Tensor::from_vec(d, (rows, v), x.device())?;
        Ok(Some(d.broadcast_mul(g)?))
    }
}

/// The cross-entropy of rows split by vocabulary over `comm`: `x` holds
/// rows `stride` apart whose first `real` columns are this rank's
/// vocabulary from `offset` (the rest padding, never read). Gives the loss
/// summed over rows with a target and, per row, the whole vocabulary's
/// maximum and Σ exp(x − max) (for the backward pass): each row's maxima
/// gathered, its exponentials and target logit summed over the group.
pub(super) fn vocab_parallel_forward(
    x: &[f32],
    (stride, real): (usize, usize),
    targets: &[i64],
    offset: usize,
    comm: &dyn Communicator,
) -> Result<(f64, Vec<f32>, Vec<f32>)> {
    let rows = targets.len();
    let local_max: Vec<f32> = x
        .chunks(stride)
        .map(|r| r[..real].iter().copied().fold(f32::NEG_INFINITY, f32::max))
        .collect();
    let all = comm.all_gather(&local_max).map_err(comm_err)?;
    let max: Vec<f32> = (0..rows)
        .map(|i| {
            all.chunks(rows)
                .map(|m| m[i])
                .fold(f32::NEG_INFINITY, f32::max)
        })
        .collect();
    // Σ exp(x − max) and the target's logit (on the rank that holds it).
    let mut sums = Vec::with_capacity(2 * rows);
    for (i, r) in x.chunks(stride).enumerate() {
        sums.push(r[..real].iter().map(|&z| (z - max[i]).exp()).sum::<f32>());
    }
    for (i, r) in x.chunks(stride).enumerate() {
        let t = targets[i];
        let local = t - offset as i64;
        sums.push(if t >= 0 && (0..real as i64).contains(&local) {
            r[local as usize]
        } else {
            0.0
        });
    }
    comm.all_reduce_sum(&mut sums).map_err(comm_err)?;
    let (sumexp, target_logit) = sums.split_at(rows);
    let mut total = 0f64;
    for i in (0..rows).filter(|&i| targets[i] >= 0) {
        total += (sumexp[i].ln() + max[i] - target_logit[i]) as f64;
    }
    Ok((total, max, sumexp.to_vec()))
}

/// The gradient of [`vocab_parallel_forward`]'s loss times `scale`, in
/// place of the logits `d` (laid out as there): `scale·(softmax − onehot)`
/// over this rank's columns, zero on the padding and on rows without a
/// target. `(max, sumexp)` are the forward pass's.
pub(super) fn vocab_parallel_grad(
    d: &mut [f32],
    (stride, real): (usize, usize),
    targets: &[i64],
    offset: usize,
    (max, sumexp): (&[f32], &[f32]),
    scale: f32,
) {
    for (i, r) in d.chunks_mut(stride).enumerate() {
        let t = targets[i];
        if t < 0 {
            r.fill(0.0);
            continue;
        }
        for z in &mut r[..real] {
            *z = (*z - max[i]).exp() / sumexp[i];
        }
        r[real..].fill(0.0);
        let local = t - offset as i64;
        if (0..real as i64).contains(&local) {
            r[local as usize] -= 1.0;
        }
        if scale != 1.0 {
            r.iter_mut().for_each(|z| *z *= scale);
        }
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
