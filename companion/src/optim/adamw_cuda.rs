//! AdamW and the gradient norm's sum of squares over a rank's flat fp32
//! buffers on a CUDA device, each one kernel of `adamw.cu`: the twins of
//! [`super::adamw::update_tensors`] and `zero::device_buffers::sum_sq`,
//! which the ZeRO engine's device state calls on CUDA.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::CudaStorage;
use std::sync::Mutex;

use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Result, Storage, Tensor};

use crate::model::autograd_ops::cuda::{elementwise, kernel, launch, output, ptx, view};

/// The device storage of a CUDA tensor (read-locked while `f` runs).
fn with_storage<R>(t: &Tensor, f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cuda(s) => f(s, l),
        _ => candle_core::bail!("fused AdamW: expected a CUDA tensor"),
    }
}

/// AdamW's kernel as an op on the weights, holding the other operands; it
/// gives the new weights and leaves the new moments (buffers of their own)
/// in `moments`.
struct AdamW<'a> {
    g: &'a Tensor,
    m: &'a Tensor,
    v: &'a Tensor,
    decay: &'a Tensor,
    gscale: f32,
    consts: [f32; 6],
    moments: Mutex<Option<(CudaStorage, CudaStorage)>>,
}

impl candle_core::CustomOp1 for AdamW<'_> {
    fn name(&self) -> &'static str {
        "companion-adamw-fused"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("the fused AdamW kernel runs on CUDA (the CPU steps with adamw_update)")
    }

    fn cuda_fwd(&self, ps: &CudaStorage, pl: &Layout) -> Result<(CudaStorage, candle_core::Shape)> {
        let n = pl.shape().elem_count();
        let dev = ps.device().clone();
        let pv = view::<f32>(ps, pl, "weights")?;
        let [b1, b2, eps, bc2_sqrt, step_size, lr_wd] = self.consts;
        let (p_out, m_out, v_out) = with_storage(self.g, |gs, gl| {
            let gv = view::<f32>(gs, gl, "gradients")?;
            with_storage(self.m, |ms, ml| {
                let mv = view::<f32>(ms, ml, "exp_avg")?;
                with_storage(self.v, |vs, vl| {
                    let vv = view::<f32>(vs, vl, "exp_avg_sq")?;
                    with_storage(self.decay, |ds, dl| {
                        let dv = view::<f32>(ds, dl, "decay")?;
                        let p_out = output::<f32>(&dev, n)?;
                        let (m_out, v_out) = (output::<f32>(&dev, n)?, output::<f32>(&dev, n)?);
                        let f = kernel(&dev, "adamw", ptx::ADAMW, "adamw_f32")?;
                        launch!(f, elementwise(n);
                            &pv, &gv, &mv, &vv, &dv, &p_out, &m_out, &v_out, &n,
                            &self.gscale, &b1, &b2, &eps, &bc2_sqrt, &step_size, &lr_wd)?;
                        Ok((p_out, m_out, v_out))
                    })
                })
            })
        })?;
        let wrap = |s| CudaStorage::wrap_cuda_slice(s, dev.clone());
        *self.moments.lock().expect("moments") = Some((wrap(m_out), wrap(v_out)));
        Ok((wrap(p_out), n.into()))
    }
}

/// AdamW at one step over a rank's flat fp32 buffers in one kernel
/// (`optim/adamw.cu`, the twin of `optim::adamw::update_tensors`): returns
/// `(p', m', v')` from the weights `p`, the gradients `g` times `gscale`
/// (the clipping coefficient), the moments and the decay mask, `consts`
/// being `[β₁, β₂, ε, √(1 − β₂ᵗ), lr / (1 − β₁ᵗ), lr·weight_decay]`. Each
/// is a new buffer of its own; the inputs are left as they were.
pub fn adamw_fused(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    decay: &Tensor,
    gscale: f32,
    consts: [f32; 6],
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = p.elem_count();
    for (t, what) in [
        (p, "weights"),
        (g, "gradients"),
        (m, "exp_avg"),
        (v, "exp_avg_sq"),
        (decay, "decay"),
    ] {
        if t.elem_count() != n || t.dtype() != DType::F32 || !t.device().same_device(p.device()) {
            candle_core::bail!(
                "fused AdamW: {what} must be {n} fp32 values on the weights' device"
            );
        }
    }
    let op = AdamW {
        g,
        m,
        v,
        decay,
        gscale,
        consts,
        moments: Mutex::new(None),
    };
    let p_new = p.apply_op1_no_bwd(&op)?;
    let Some((m_new, v_new)) = op.moments.lock().expect("moments").take() else {
        candle_core::bail!("fused AdamW: the kernel left no moments");
    };
    let wrap = |s| Tensor::from_storage(Storage::Cuda(s), n, BackpropOp::none(), false);
    Ok((p_new, wrap(m_new), wrap(v_new)))
}

/// Σ x² of a flat fp32 tensor in fp64, as a scalar tensor on its device.
struct SumSquares;

/// Blocks of the first pass of [`SumSquares`] (each a partial sum).
const SUM_BLOCKS: usize = 256;

impl candle_core::CustomOp1 for SumSquares {
    fn name(&self) -> &'static str {
        "companion-sum-squares"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("the fused sum of squares runs on CUDA")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, candle_core::Shape)> {
        let n = l.shape().elem_count();
        let dev = s.device().clone();
        let x = view::<f32>(s, l, "sum of squares")?;
        let (partial, out) = (output::<f64>(&dev, SUM_BLOCKS)?, output::<f64>(&dev, 1)?);
        let f = kernel(&dev, "adamw", ptx::ADAMW, "sum_squares_partial")?;
        let cfg = LaunchConfig {
            grid_dim: (SUM_BLOCKS as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(f, cfg; &x, &partial, &n)?;
        let f = kernel(&dev, "adamw", ptx::ADAMW, "sum_partials_f64")?;
        launch!(f, LaunchConfig::for_num_elems(1); &partial, &out, &(SUM_BLOCKS as i32))?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), ().into()))
    }
}

/// ‖x‖² of a flat fp32 CUDA tensor, summed in fp64 in a fixed order (the
/// twin of `zero::device_buffers::sum_sq`); only the scalar leaves the device.
pub fn sum_squares(x: &Tensor) -> Result<f64> {
    if x.dtype() != DType::F32 {
        candle_core::bail!("sum of squares: expected fp32, got {:?}", x.dtype());
    }
    x.flatten_all()?
        .contiguous()?
        .apply_op1_no_bwd(&SumSquares)?
        .to_scalar::<f64>()
}
