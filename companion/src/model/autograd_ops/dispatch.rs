//! Which implementation an op takes (the CPU's fused kernels, the CUDA
//! kernels, or candle's composite ops), and reading a CPU operand.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor};

static FUSED_CUDA: AtomicBool = AtomicBool::new(true);

/// Whether the ops run their CUDA kernels on CUDA tensors (the default), or
/// candle's composite ops (to compare the two, or to rule the kernels out).
pub fn set_fused_cuda_kernels(on: bool) {
    FUSED_CUDA.store(on, Ordering::Relaxed);
}

/// Whether CUDA tensors take the fused kernels: unless
/// [`set_fused_cuda_kernels`] turned them off, or `COMPANION_FUSED_CUDA=0`.
pub fn fused_cuda_kernels() -> bool {
    static ENV_OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off =
        *ENV_OFF.get_or_init(|| std::env::var("COMPANION_FUSED_CUDA").is_ok_and(|v| v == "0"));
    cfg!(feature = "cuda") && !off && FUSED_CUDA.load(Ordering::Relaxed)
}

/// Whether `ts` (all of the same dtype, on one device) run a fused op:
/// fp32 on the CPU, or f32/bf16 on a CUDA device when built with `cuda`.
pub(super) fn fused(ts: &[&Tensor]) -> bool {
    let first = ts[0];
    let same = ts
        .iter()
        .all(|t| t.dtype() == first.dtype() && t.device().same_device(first.device()));
    same && match first.device() {
        Device::Cpu => first.dtype() == DType::F32,
        Device::Cuda(_) => {
            fused_cuda_kernels() && matches!(first.dtype(), DType::F32 | DType::BF16)
        }
        _ => false,
    }
}

pub(super) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{what}: expected f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}
