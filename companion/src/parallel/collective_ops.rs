//! Megatron-LM's conjugate operators as autograd ops over a tensor-parallel
//! group (Shoeybi et al. 2019, §3): `f` is the identity forward and an
//! all-reduce of the gradient backward (before a column-parallel layer);
//! `g` is an all-reduce forward and the identity backward (after a
//! row-parallel layer); and the vocabulary-parallel cross-entropy, whose
//! softmax over the whole vocabulary takes all-reduces of per-row numbers,
//! never the logits.
//!
//! They run where the tensors live: a transport with device collectives
//! (NCCL) sums GPU tensors on the GPU; the others (threads, MPI) exchange
//! host memory. The fused CPU stage uses the slice versions of the
//! cross-entropy below (`vocab_parallel_forward`, `vocab_parallel_grad`).
//!
//! Every rank runs the same graph, so the collectives of the backward pass
//! come in the same order on every rank.

use std::sync::Arc;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use crate::zero::comm::Communicator;

fn comm_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("tensor-parallel collective: {e}"))
}

/// The sum of `t` (fp32) over the group, in `t`'s shape on its device: the
/// transport's device collective where it has one, else through host
/// memory (the ZeRO engine's `all_reduce`).
pub(super) fn all_reduce(t: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
    crate::zero::device_buffers::all_reduce(comm, &t.flatten_all()?)
        .map_err(comm_err)?
        .reshape(t.shape())
}

/// Every rank's `t` (fp32, the same length on each) end to end in rank
/// order, flat, on `t`'s device, as [`all_reduce`] runs.
pub(super) fn all_gather(t: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
    crate::zero::device_buffers::all_gather(comm, &t.flatten_all()?).map_err(comm_err)
}

/// A copy of the tensor `l` describes, on its own backend.
fn copy<S>(s: &S, l: &Layout) -> Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let mut out = s.device().zeros_impl(l.shape(), s.dtype())?;
    s.copy_strided_src(&mut out, 0, l)?;
    Ok((out, l.shape().clone()))
}

/// Megatron's `f`: identity forward, all-reduce backward.
struct ReduceBackward(Arc<dyn Communicator>);

impl CustomOp1 for ReduceBackward {
    fn name(&self) -> &'static str {
        "tp-f"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        copy(s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        copy(s, l)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        all_reduce(&g.contiguous()?, self.0.as_ref()).map(Some)
    }
}

/// Megatron's `g` once the sum is taken: forward the sum (the second
/// input), the gradient to the partial result (the first) unchanged.
struct ReduceForward;

impl CustomOp2 for ReduceForward {
    fn name(&self) -> &'static str {
        "tp-g"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        sum: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy(sum, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        sum: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        copy(sum, l)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _sum: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.clone()), None))
    }
}

/// `g(x)`: the sum of the group's partial results, whose gradient is the
/// sum's own (Megatron's `g`: all-reduce forward, identity backward).
pub fn reduce_forward(x: &Tensor, comm: &Arc<dyn Communicator>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let sum = all_reduce(&x.detach(), comm.as_ref())?;
    x.apply_op2(&sum, ReduceForward)
}

/// `f(x)`: `x`, whose gradient is summed over the group.
pub fn reduce_backward(x: &Tensor, comm: &Arc<dyn Communicator>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ReduceBackward(comm.clone()))
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

/// The summed cross-entropy of logits `[rows, real]` split by vocabulary
/// over `comm` (this rank's columns start at `offset`); targets < 0 are
/// skipped. [`vocab_parallel_forward`]'s sums in candle's ops, so it runs
/// where the logits live and its gradient comes from autograd: each row's
/// maximum is gathered (a constant shift), its Σ exp and its target's
/// logit summed over the group by `g`.
pub fn vocab_parallel_cross_entropy_sum(
    logits: &Tensor,
    targets: Vec<i64>,
    offset: usize,
    comm: &Arc<dyn Communicator>,
) -> Result<Tensor> {
    let (n, real) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("cross-entropy: {} targets for {n} rows", targets.len());
    }
    let dev = logits.device();
    let local_max = logits.detach().max_keepdim(1)?;
    let max = all_gather(&local_max, comm.as_ref())?
        .reshape((comm.world_size(), n))?
        .max(0)?
        .reshape((n, 1))?;
    let shifted = logits.broadcast_sub(&max)?;
    let sumexp = reduce_forward(&shifted.exp()?.sum_keepdim(1)?, comm)?;
    // The target's column where this rank holds it, else column 0 masked out.
    let (column, here): (Vec<u32>, Vec<f32>) = targets
        .iter()
        .map(|&t| match t.checked_sub(offset as i64) {
            Some(l) if t >= 0 && (0..real as i64).contains(&l) => (l as u32, 1.0),
            _ => (0, 0.0),
        })
        .unzip();
    let picked = shifted
        .gather(&Tensor::from_vec(column, (n, 1), dev)?, 1)?
        .mul(&Tensor::from_vec(here, (n, 1), dev)?)?;
    let picked = reduce_forward(&picked, comm)?;
    let counted: Vec<f32> = targets.iter().map(|&t| f32::from(t >= 0)).collect();
    (sumexp.log()? - picked)?
        .mul(&Tensor::from_vec(counted, (n, 1), dev)?)?
        .sum_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zero::comm::{run_ranks, CommError};
    use candle_core::{Device, Var};

    /// The two vocabulary-parallel cross-entropies (slices, for the fused
    /// stage; candle's ops, for autograd) over 2 ranks give the loss the
    /// whole vocabulary's log-softmax gives, and the same gradient: a
    /// vocabulary of 7 (the second rank's fourth column padding, never
    /// read), targets on either rank, one row not counted.
    #[test]
    fn the_slice_and_candle_cross_entropies_agree_with_the_formula() {
        let (rows, vocab, per) = (5, 7, 4);
        let logit = |i: usize, j: usize| ((i * 7 + j * 3) % 11) as f32 * 0.37 - 1.5;
        let targets = vec![0i64, 6, 3, -100, 4];
        let want: f64 = (0..rows)
            .filter(|&i| targets[i] >= 0)
            .map(|i| {
                let lse = (0..vocab)
                    .map(|j| (logit(i, j) as f64).exp())
                    .sum::<f64>()
                    .ln();
                lse - logit(i, targets[i] as usize) as f64
            })
            .sum();
        let got = run_ranks(2, |r, comm| -> std::result::Result<_, CommError> {
            let err = |e: candle_core::Error| CommError::Transport(e.to_string());
            let (off, real) = (r * per, per.min(vocab - r * per));
            let mine: Vec<f32> = (0..rows)
                .flat_map(|i| {
                    (0..per).map(move |j| if j < real { logit(i, off + j) } else { 99.0 })
                })
                .collect();
            let (total, max, sumexp) =
                vocab_parallel_forward(&mine, (per, real), &targets, off, comm.as_ref())
                    .map_err(err)?;
            let mut d = mine.clone();
            vocab_parallel_grad(&mut d, (per, real), &targets, off, (&max, &sumexp), 1.0);
            let x = Tensor::from_vec(mine, (rows, per), &Device::Cpu)
                .and_then(|t| t.narrow(1, 0, real))
                .and_then(|t| Var::from_tensor(&t))
                .map_err(err)?;
            let loss = vocab_parallel_cross_entropy_sum(x.as_tensor(), targets.clone(), off, &comm)
                .map_err(err)?;
            let g = loss.backward().map_err(err)?;
            let g: Vec<Vec<f32>> = g.get(x.as_tensor()).unwrap().to_vec2().map_err(err)?;
            let loss = loss.to_scalar::<f32>().map_err(err)? as f64;
            Ok((total, loss, d, g, real))
        })
        .unwrap();
        for (r, (total, loss, d, g, real)) in got.into_iter().enumerate() {
            assert!(
                (total - want).abs() <= 1e-5 * want,
                "rank {r}: slices {total} vs {want}"
            );
            assert!(
                (loss - want).abs() <= 1e-5 * want,
                "rank {r}: candle {loss} vs {want}"
            );
            for i in 0..rows {
                for j in 0..per {
                    let slice = d[i * per + j];
                    if j >= real {
                        assert_eq!(slice, 0.0, "padding's gradient");
                        continue;
                    }
                    assert!(
                        (slice - g[i][j]).abs() <= 1e-6,
                        "rank {r} ({i}, {j}): {slice} vs {}",
                        g[i][j]
                    );
                }
            }
            // A row without a target has no gradient.
            assert!(g[3].iter().all(|&x| x == 0.0));
        }
    }
}
