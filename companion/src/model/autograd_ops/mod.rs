//! candle custom ops with a backward for the layers whose candle versions
//! have none (fused `layer_norm`, `softmax_last_dim`) or build a temporary
//! per primitive: layer norm, the masked attention softmax, GELU (tanh form)
//! and cross-entropy. Each op has two fused implementations of its forward
//! and backward, twins of one another:
//! - fp32 CPU tensors call the one CPU implementation of that math in
//!   [`crate::cpu::layers`];
//! - built with `cuda`, f32 and bf16 tensors on a CUDA device run the
//!   kernel in the `.cu` file beside the op (compiled to PTX by the build,
//!   arithmetic in fp32 whatever the dtype). [`set_fused_cuda_kernels`]
//!   or `COMPANION_FUSED_CUDA=0` turns them off, for comparing.
//!
//! Other devices and dtypes fall back to differentiable composite ops.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor};

mod attention_softmax;
mod cross_entropy;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod gelu;
mod layer_norm;
#[cfg(test)]
mod tests;

pub use attention_softmax::masked_softmax;
pub use cross_entropy::cross_entropy_sum;
pub use gelu::gelu_tanh;
pub use layer_norm::layer_norm;

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
fn fused(ts: &[&Tensor]) -> bool {
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

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{what}: expected f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}
