//! Layer norm over the last dimension: forward, and its backward as two
//! ops (the input's gradient; the weight's and bias's, summed over rows).
//! The CPU twin is `cpu::layers`' row functions, the CUDA one `layer_norm.cu`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda::{elem_name, kernel, launch, output, per_row, ptx, view, with_elem, Elem};
use super::dispatch::{f32_slice, fused};
use crate::cpu::layers::{layer_norm_grad_wb, ln_row, ln_row_grad_x, ln_row_stats};
#[cfg(feature = "cuda")]
use candle_core::{
    backend::BackendStorage,
    cuda_backend::{cudarc::driver::LaunchConfig, CudaStorage},
};

/// y = (x − mean) / sqrt(var + eps) · w + b over the last dimension.
struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "companion-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer_norm x")?;
        let w = f32_slice(s2, l2, "layer_norm weight")?;
        let b = f32_slice(s3, l3, "layer_norm bias")?;
        let c = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .for_each(|(y, x)| ln_row(y, x, w, b, ln_row_stats(x, self.eps)));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        rows_kernel("layer_norm", self.eps, (s1, l1), (s2, l2), (s3, l3))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &LayerNormGradX { eps: self.eps })?;
        let dwdb = x.apply_op2_no_bwd(&g, &LayerNormGradWB { eps: self.eps })?;
        Ok((Some(dx), Some(dwdb.get(0)?), Some(dwdb.get(1)?)))
    }
}

/// dx = rstd · (g·w − mean(g·w) − x̂ · mean(g·w·x̂)).
struct LayerNormGradX {
    eps: f32,
}

impl CustomOp3 for LayerNormGradX {
    fn name(&self) -> &'static str {
        "companion-layer-norm-grad-x"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer_norm grad x")?;
        let w = f32_slice(s2, l2, "layer_norm grad w")?;
        let g = f32_slice(s3, l3, "layer_norm grad g")?;
        let c = w.len();
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(c)
            .zip(x.par_chunks(c).zip(g.par_chunks(c)))
            .for_each(|(dx, (x, g))| ln_row_grad_x(dx, g, x, w, ln_row_stats(x, self.eps)));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        rows_kernel("layer_norm_grad_x", self.eps, (s1, l1), (s2, l2), (s3, l3))
    }
}

/// [dw; db] = [Σ g·x̂; Σ g] over rows, as a `[2, C]` tensor.
struct LayerNormGradWB {
    eps: f32,
}

impl CustomOp2 for LayerNormGradWB {
    fn name(&self) -> &'static str {
        "companion-layer-norm-grad-wb"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer_norm grad x")?;
        let g = f32_slice(s2, l2, "layer_norm grad g")?;
        let c = *l1.dims().last().expect("rank ≥ 1");
        let out = layer_norm_grad_wb(g, x, c, |r| ln_row_stats(&x[r * c..(r + 1) * c], self.eps));
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        /// Rows one block sums (`WB_ROWS` in layer_norm.cu).
        const WB_ROWS: usize = 32;
        fn run<T: Elem>(
            eps: f32,
            c: usize,
            (s1, l1): (&CudaStorage, &Layout),
            (s2, l2): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let dev = &s1.device;
            let x = view::<T>(s1, l1, "layer_norm grad x")?;
            let g = view::<T>(s2, l2, "layer_norm grad g")?;
            let rows = l1.shape().elem_count() / c;
            let blocks = rows.div_ceil(WB_ROWS);
            let (partial, out) = (
                output::<f32>(dev, blocks * 2 * c)?,
                output::<T>(dev, 2 * c)?,
            );
            let name = elem_name::<T>("layer_norm_grad_wb_partial");
            let f = kernel(dev, "layer_norm", ptx::LAYER_NORM, &name)?;
            let (rows32, c32) = (rows as i32, c as i32);
            launch!(f, per_row(blocks, c, 256); &x, &g, &partial, &rows32, &c32, &eps)?;
            let f = kernel(
                dev,
                "layer_norm",
                ptx::LAYER_NORM,
                &elem_name::<T>("sum_partials"),
            )?;
            let cfg = LaunchConfig::for_num_elems(2 * c as u32);
            launch!(f, cfg; &partial, &out, &(blocks as i32), &(2 * c as i32))?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        let c = *l1.dims().last().expect("rank ≥ 1");
        let out = with_elem!(s1.dtype(), run(self.eps, c, (s1, l1), (s2, l2)))?;
        Ok((out, Shape::from((2, c))))
    }
}

/// Kernel `name` (`layer_norm`, or `layer_norm_grad_x`) over the rows of
/// `x` as wide as the weight `w`: `(x, w, third, out, c, eps)`, where the
/// third operand is the bias or the output's gradient and `out` is shaped
/// like `x`.
#[cfg(feature = "cuda")]
fn rows_kernel(
    name: &str,
    eps: f32,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    fn run<T: Elem>(
        name: &str,
        eps: f32,
        (s1, l1): (&CudaStorage, &Layout),
        (s2, l2): (&CudaStorage, &Layout),
        (s3, l3): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = &s1.device;
        let x = view::<T>(s1, l1, name)?;
        let w = view::<T>(s2, l2, name)?;
        let third = view::<T>(s3, l3, name)?;
        let (c, n) = (l2.shape().elem_count(), l1.shape().elem_count());
        let out = output::<T>(dev, n)?;
        let f = kernel(dev, "layer_norm", ptx::LAYER_NORM, &elem_name::<T>(name))?;
        launch!(f, per_row(n / c, c, 256); &x, &w, &third, &out, &(c as i32), &eps)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let out = with_elem!(s1.dtype(), run(name, eps, (s1, l1), (s2, l2), (s3, l3)))?;
    Ok((out, l1.shape().clone()))
}

/// Layer norm over the last dimension of `x` with weight `w` and bias `b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(&[x, w, b]) {
        let x = x.contiguous()?;
        return x.apply_op3(w, b, LayerNorm { eps: eps as f32 });
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.to_dtype(dtype)?.broadcast_mul(w)?.broadcast_add(b)
}
