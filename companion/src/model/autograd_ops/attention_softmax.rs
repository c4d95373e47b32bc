//! The attention softmax with the causal (and padding) mask applied in the
//! op, and its backward. The CPU twin is `cpu::layers::{masked_softmax_row,
//! softmax_backward_row}`, the CUDA one `attention_softmax.cu`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda::{elem_name, kernel, launch, output, per_row, ptx, view, with_elem, Elem};
use super::dispatch::{f32_slice, fused};
use crate::cpu::layers::{masked_softmax_row, softmax_backward_row, MASKED};
#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, cuda_backend::CudaStorage};

/// dx = scale · y · (g − Σ g·y).
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "companion-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, "softmax grad y")?;
        let g = f32_slice(s2, l2, "softmax grad g")?;
        let c = *l1.dims().last().expect("rank ≥ 1");
        let mut dx = g.to_vec();
        dx.par_chunks_mut(c)
            .zip(y.par_chunks(c))
            .for_each(|(dx, y)| softmax_backward_row(dx, y, self.scale));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
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
            scale: f32,
            (s1, l1): (&CudaStorage, &Layout),
            (s2, l2): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let dev = &s1.device;
            let y = view::<T>(s1, l1, "softmax grad y")?;
            let g = view::<T>(s2, l2, "softmax grad g")?;
            let s = *l1.dims().last().expect("rank ≥ 1");
            let n = l1.shape().elem_count();
            let dx = output::<T>(dev, n)?;
            let name = elem_name::<T>("softmax_grad");
            let f = kernel(dev, "attention_softmax", ptx::ATTENTION_SOFTMAX, &name)?;
            launch!(f, per_row(n / s, s, 256); &y, &g, &dx, &(s as i32), &scale)?;
            Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
        }
        let out = with_elem!(s1.dtype(), run(self.scale, (s1, l1), (s2, l2)))?;
        Ok((out, l1.shape().clone()))
    }
}

/// softmax(scale · scores + mask) over keys, for scores `[B, H, T, S]`:
/// query i (at position past + i) sees key j when j ≤ past + i and the key
/// is not padding (`key_mask[b][j] == 1`). One pass instead of a scale, a
/// broadcast add of a `[B, 1, T, S]` bias and a softmax, each with a backward.
struct MaskedSoftmax {
    scale: f32,
    past: usize,
    key_mask: Option<Arc<Vec<Vec<u32>>>>,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "companion-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "masked softmax")?;
        let dims = l.dims();
        let (h, t, sk) = (dims[1], dims[2], dims[3]);
        let mut y = x.to_vec();
        y.par_chunks_mut(sk).enumerate().for_each(|(row, y)| {
            let (i, b) = (row % t, row / (t * h));
            masked_softmax_row(y, self.scale, |j| {
                j <= self.past + i && self.key_mask.as_ref().is_none_or(|m| m[b][j] == 1)
            });
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: Elem>(op: &MaskedSoftmax, s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
            let dev = &s.device;
            let x = view::<T>(s, l, "masked softmax")?;
            let dims = l.dims();
            let (h, t, sk) = (dims[1], dims[2], dims[3]);
            let n = l.shape().elem_count();
            // The key mask goes up with each call ([B, S], small); none: a null pointer.
            let mask = match &op.key_mask {
                Some(m) => Some(dev.clone_htod(&m.concat())?),
                None => None,
            };
            let y = output::<T>(dev, n)?;
            let name = elem_name::<T>("masked_softmax");
            let f = kernel(dev, "attention_softmax", ptx::ATTENTION_SOFTMAX, &name)?;
            let (h32, t32, s32, past) = (h as i32, t as i32, sk as i32, op.past as i32);
            let cfg = per_row(n / sk, sk, 256);
            match &mask {
                Some(m) => launch!(f, cfg; &x, &y, m, &h32, &t32, &s32, &past, &op.scale),
                None => launch!(f, cfg; &x, &y, &0u64, &h32, &t32, &s32, &past, &op.scale),
            }?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        let out = with_elem!(s.dtype(), run(self, s, l))?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let scale = self.scale;
        Ok(Some(y.apply_op2_no_bwd(
            &g.contiguous()?,
            &SoftmaxGrad { scale },
        )?))
    }
}

/// Causal (and padding-masked) softmax of `scale · scores`, scores `[B, H, T, S]`.
pub fn masked_softmax(
    scores: &Tensor,
    scale: f64,
    past: usize,
    key_mask: Option<&[Vec<u32>]>,
) -> Result<Tensor> {
    let (b, _h, t, s) = scores.dims4()?;
    if let Some(m) = key_mask {
        if m.len() != b || m.iter().any(|r| r.len() != s) {
            candle_core::bail!("masked_softmax: key mask must be {b} rows of {s}");
        }
    }
    if fused(&[scores]) {
        return scores.contiguous()?.apply_op1(MaskedSoftmax {
            scale: scale as f32,
            past,
            key_mask: key_mask.map(|m| Arc::new(m.to_vec())),
        });
    }
    let rows = if key_mask.is_some() { b } else { 1 };
    let mut bias = vec![0f32; rows * t * s];
    for r in 0..rows {
        for i in 0..t {
            for j in 0..s {
                let pad = key_mask.is_some_and(|m| m[r][j] == 0);
                if j > past + i || pad {
                    bias[(r * t + i) * s + j] = MASKED;
                }
            }
        }
    }
    let bias =
        Tensor::from_vec(bias, (rows, 1, t, s), scores.device())?.to_dtype(scores.dtype())?;
    candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(&bias)?, D::Minus1)
}
