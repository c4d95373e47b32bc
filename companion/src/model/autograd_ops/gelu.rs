//! HF's `gelu_new` (the tanh form) and its backward. The CPU twin is
//! `cpu::layers::{gelu, gelu_backward}`, the CUDA one `gelu.cu`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

#[cfg(feature = "cuda")]
use super::cuda::{elem_name, elementwise, kernel, launch, output, ptx, view, with_elem, Elem};
use super::dispatch::{f32_slice, fused};
use crate::cpu::layers::{gelu, gelu_backward};
#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, cuda_backend::CudaStorage};

/// HF's `gelu_new`: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "companion-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu")?;
        let mut y = vec![0f32; x.len()];
        gelu(x, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: Elem>(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
            let dev = &s.device;
            let x = view::<T>(s, l, "gelu")?;
            let n = l.shape().elem_count();
            let y = output::<T>(dev, n)?;
            let f = kernel(dev, "gelu", ptx::GELU, &elem_name::<T>("gelu_tanh"))?;
            launch!(f, elementwise(n); &x, &y, &n)?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        Ok((with_elem!(s.dtype(), run(s, l))?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluTanhGrad)?))
    }
}

struct GeluTanhGrad;

impl CustomOp2 for GeluTanhGrad {
    fn name(&self) -> &'static str {
        "companion-gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "gelu grad x")?;
        let g = f32_slice(s2, l2, "gelu grad g")?;
        let mut dx = g.to_vec();
        gelu_backward(&mut dx, x);
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
            (s1, l1): (&CudaStorage, &Layout),
            (s2, l2): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let dev = &s1.device;
            let x = view::<T>(s1, l1, "gelu grad x")?;
            let g = view::<T>(s2, l2, "gelu grad g")?;
            let n = l1.shape().elem_count();
            let dx = output::<T>(dev, n)?;
            let f = kernel(dev, "gelu", ptx::GELU, &elem_name::<T>("gelu_tanh_grad"))?;
            launch!(f, elementwise(n); &x, &g, &dx, &n)?;
            Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
        }
        Ok((
            with_elem!(s1.dtype(), run((s1, l1), (s2, l2)))?,
            l1.shape().clone(),
        ))
    }
}

/// `gelu_new` with a gradient.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if fused(&[x]) {
        return x.contiguous()?.apply_op1(GeluTanh);
    }
    x.gelu()
}
