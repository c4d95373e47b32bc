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

mod attention_softmax;
mod cross_entropy;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod dispatch;
mod gelu;
mod layer_norm;
#[cfg(test)]
mod tests;

pub use attention_softmax::masked_softmax;
pub use cross_entropy::cross_entropy_sum;
pub use dispatch::{fused_cuda_kernels, set_fused_cuda_kernels};
pub use gelu::gelu_tanh;
pub use layer_norm::layer_norm;
