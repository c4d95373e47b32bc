//! Cross-entropy summed over the rows that have a target, with its
//! backward: the loss never stores the probabilities, and its backward
//! writes `g · (softmax − onehot)` straight from the logits. The CPU twin is
//! `cpu::layers::{cross_entropy_loss, cross_entropy_backward}`, the CUDA one
//! `cross_entropy.cu` (llm.c's "fused classifier").

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda::{elem_name, kernel, launch, output, per_row, ptx, view, with_elem, Elem};
use super::dispatch::{f32_slice, fused};
use crate::cpu::layers::{cross_entropy_backward, cross_entropy_loss};
#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, cuda_backend::CudaStorage};

/// Threads per row of the vocabulary (as many as a block holds: rows are
/// tens of thousands wide).
#[cfg(feature = "cuda")]
const VOCAB_THREADS: u32 = 512;

/// Σ over rows with a target of (logsumexp(row) − row[target]); targets < 0
/// (HF's -100) are skipped.
struct CrossEntropySum {
    targets: Arc<Vec<i64>>,
}

impl CustomOp1 for CrossEntropySum {
    fn name(&self) -> &'static str {
        "companion-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "cross_entropy")?;
        let v = *l.dims().last().expect("rank 2");
        // Row losses collected, then summed in order: rayon's `sum` would
        // round differently from run to run.
        let rows: Vec<f64> = x
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                if t < 0 {
                    return 0.0;
                }
                cross_entropy_loss(row, t as usize)
            })
            .collect();
        let total: f64 = rows.iter().sum();
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: Elem>(targets: &[i64], s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
            let dev = &s.device;
            let (x, stride, n) = rows_view::<T>(s, l)?;
            let v = *l.dims().last().expect("rank ≥ 1");
            let tg = dev.clone_htod(targets)?;
            let (losses, sum) = (output::<f32>(dev, n)?, output::<f32>(dev, 1)?);
            let name = elem_name::<T>("cross_entropy_rows");
            let f = kernel(dev, "cross_entropy", ptx::CROSS_ENTROPY, &name)?;
            let cfg = per_row(n, v, VOCAB_THREADS);
            launch!(f, cfg; &x, &tg, &losses, &(stride as i32), &(v as i32))?;
            let f = kernel(dev, "cross_entropy", ptx::CROSS_ENTROPY, "sum_losses")?;
            launch!(f, per_row(1, 256, 256); &losses, &sum, &(n as i32))?;
            Ok(CudaStorage::wrap_cuda_slice(sum, dev.clone()))
        }
        let out = with_elem!(s.dtype(), run(&self.targets, s, l))?;
        Ok((out, Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = CrossEntropyGrad {
            targets: self.targets.clone(),
        };
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &op)?))
    }
}

/// g · (softmax(row) − onehot(target)), zero for skipped rows; `g` is the
/// loss's incoming gradient, a scalar (read on the device on CUDA).
struct CrossEntropyGrad {
    targets: Arc<Vec<i64>>,
}

impl CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "companion-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "cross_entropy grad")?;
        let g = f32_slice(s2, l2, "cross_entropy grad g")?[0];
        let v = *l1.dims().last().expect("rank 2");
        let mut d = x.to_vec();
        d.par_chunks_mut(v)
            .zip(self.targets.par_iter())
            .for_each(|(d, &t)| {
                if t < 0 {
                    d.fill(0.0);
                } else {
                    cross_entropy_backward(d, t as usize, g);
                }
            });
        Ok((CpuStorage::F32(d), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: Elem>(
            targets: &[i64],
            (s1, l1): (&CudaStorage, &Layout),
            (s2, l2): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let dev = &s1.device;
            let (x, stride, n) = rows_view::<T>(s1, l1)?;
            let g = view::<f32>(s2, l2, "cross_entropy grad g")?;
            let v = *l1.dims().last().expect("rank ≥ 1");
            let tg = dev.clone_htod(targets)?;
            let d = output::<T>(dev, n * v)?;
            let name = elem_name::<T>("cross_entropy_grad");
            let f = kernel(dev, "cross_entropy", ptx::CROSS_ENTROPY, &name)?;
            let cfg = per_row(n, v, VOCAB_THREADS);
            launch!(f, cfg; &x, &tg, &g, &d, &(stride as i32), &(v as i32))?;
            Ok(CudaStorage::wrap_cuda_slice(d, dev.clone()))
        }
        let out = with_elem!(s1.dtype(), run(&self.targets, (s1, l1), (s2, l2)))?;
        Ok((out, l1.shape().clone()))
    }
}

/// Summed cross-entropy of `logits` `[…, V]` (their rows in order) against
/// `targets`, one per row (−100 skipped). On CUDA the logits are read where
/// they lie when their rows are evenly spaced (a view that cuts the
/// vocabulary padding off, `gpt2::head_logits`); elsewhere they are made
/// contiguous first.
pub fn cross_entropy_sum(logits: &Tensor, targets: Vec<i64>) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let n = logits.elem_count() / v.max(1);
    if targets.len() != n {
        candle_core::bail!("cross_entropy: {} targets for {n} rows", targets.len());
    }
    if let Some(&bad) = targets.iter().find(|&&t| t >= v as i64) {
        candle_core::bail!("cross_entropy: target {bad} outside the vocabulary of {v}");
    }
    if fused(&[logits]) {
        let op = CrossEntropySum {
            targets: Arc::new(targets),
        };
        if logits.device().is_cuda() && row_stride(logits.layout()).is_some() {
            return logits.apply_op1(op);
        }
        return logits.contiguous()?.apply_op1(op);
    }
    let logits = logits.reshape((n, v))?;
    let keep: Vec<f32> = targets
        .iter()
        .map(|&t| if t < 0 { 0.0 } else { 1.0 })
        .collect();
    let idx: Vec<u32> = targets.iter().map(|&t| t.max(0) as u32).collect();
    let dev = logits.device();
    let idx = Tensor::from_vec(idx, (n, 1), dev)?;
    let keep = Tensor::from_vec(keep, (n,), dev)?;
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    (logp.gather(&idx, 1)?.squeeze(1)? * keep)?.sum_all()?.neg()
}

/// The distance between consecutive rows of `[…, V]` logits whose rows are
/// evenly spaced with contiguous elements (a contiguous tensor, or one cut
/// along its last dimension): `V` or more. `None` otherwise.
fn row_stride(l: &Layout) -> Option<usize> {
    let (dims, strides) = (l.dims(), l.stride());
    let r = dims.len();
    if r < 2 || strides[r - 1] != 1 {
        return None;
    }
    let row = strides[r - 2];
    let even = (0..r - 2).all(|i| dims[i] == 1 || strides[i] == dims[i + 1] * strides[i + 1]);
    (even && row >= dims[r - 1]).then_some(row)
}

/// A CUDA operand's rows: the device view from its first row to the end of
/// its last, the row stride and the row count.
#[cfg(feature = "cuda")]
fn rows_view<'a, T: Elem>(
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<(
    candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>,
    usize,
    usize,
)> {
    let v = *l.dims().last().expect("rank ≥ 1");
    let n = l.shape().elem_count() / v.max(1);
    let Some(stride) = row_stride(l) else {
        candle_core::bail!("cross_entropy: logits whose rows are not evenly spaced");
    };
    let start = l.start_offset();
    let end = start + n.saturating_sub(1) * stride + v;
    Ok((s.as_cuda_slice::<T>()?.slice(start..end), stride, n))
}
