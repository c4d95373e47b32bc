//! GPT-2's math on the CPU in fp32, written out by hand as llm.c does in C:
//! the training step ([`train_step`], each transformer block's passes in
//! [`block`], which a tensor-parallel pipeline stage runs too) and decoding
//! with a KV cache ([`decode`]), over slices of the weights and the
//! [`GPT2Config`] (never the candle model, which calls in here).
//!
//! candle's autograd spends most of a CPU training step outside the matrix
//! products: a fresh tensor per primitive, each gradient summed into a new
//! zero tensor, broadcast reductions. Here the forward pass keeps exactly
//! the activations the backward pass needs, in buffers reused from step to
//! step ([`workspace`]), and the backward pass adds each gradient straight
//! into the ZeRO engine's flat gradient buffer. Matrix products go to the
//! `gemm` crate ([`gemm`]); everything between them is one fused loop each
//! ([`layers`], [`attention`]), in plain arithmetic the compiler vectorises
//! ([`simd`]). The semantics are those of `GPT2LMHeadModel::forward` and
//! `causal_lm_loss_sum` (masking, positions, dropout masks, loss), which the
//! model's tests check on loss and every gradient.

/// Define `$name` to run `$body` compiled for AVX-512 or AVX2+FMA when the
/// CPU has them (chosen at run time, so one binary runs everywhere), and
/// for the baseline otherwise. The bodies are plain loops; only the target
/// features differ.
macro_rules! vectorised {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $body:ident) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `v4` is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above, for `v3`.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub mod attention;
pub mod block;
pub mod decode;
pub mod gemm;
pub mod inputs;
pub mod layers;
pub mod simd;
pub mod train_step;
pub mod weights;
pub mod workspace;

pub use decode::{forward_cached, KvBuffers};
pub use inputs::InputError;
pub use train_step::Batch;
pub use weights::{supports, DropoutMasks, Weights};
pub use workspace::Workspace;
