//! One micro-batch's loss and gradients, by one of three paths chosen once
//! per run ([`GradientPath`]), each with its forward beside its backward:
//!
//! - [`autograd`]: the whole model's forward on candle, `backward()` over
//!   the graph (any dtype, any device);
//! - [`fused`]: the hand-written CPU kernels ([`crate::cpu`]), fp32;
//! - [`blockwise`]: keep only each block's input, recompute each block in
//!   the backward pass (ZeRO-3, `gradient_checkpointing`).
//!
//! A path does not know where the weights live or where gradients go: it
//! asks a [`ParamStore`] (the ZeRO engine: local or gathered weights,
//! gradients added in place or reduce-scattered; [`LocalStore`]: one
//! process, one flat buffer).

pub mod autograd;
pub mod batch;
pub mod blockwise;
pub mod fused;
pub mod store;
#[cfg(test)]
mod tests;

use candle_core::{DType, Device};

pub use batch::MicroBatch;
pub use store::{LocalStore, ParamStore};

use crate::config::GPT2Config;
use crate::cpu::Workspace;
use crate::model::error::Result;
use crate::model::gpt2::GPT2LMHeadModel;

/// How a run computes gradients: chosen once, before the first step.
pub enum GradientPath {
    Autograd,
    /// The fused CPU kernels, with their activation buffers.
    Fused(Box<Workspace>),
    Blockwise,
}

impl GradientPath {
    /// Recompute block by block when asked (ZeRO-3, gradient checkpointing);
    /// else the fused kernels where they apply (fp32 on the CPU, GPT-2's
    /// GELU); else candle's autograd.
    pub fn choose(cfg: &GPT2Config, device: &Device, dtype: DType, recompute: bool) -> Self {
        if recompute {
            GradientPath::Blockwise
        } else if device.is_cpu() && dtype == DType::F32 && crate::cpu::supports(cfg) {
            GradientPath::Fused(Box::default())
        } else {
            GradientPath::Autograd
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            GradientPath::Autograd => "autograd",
            GradientPath::Fused(_) => "fused",
            GradientPath::Blockwise => "blockwise",
        }
    }

    /// Forward and backward of one micro-batch: gradients go to `store`,
    /// the loss (over `n_items`) comes back.
    pub fn forward_backward(
        &mut self,
        model: &GPT2LMHeadModel,
        batch: &MicroBatch,
        store: &mut dyn ParamStore,
    ) -> Result<f64> {
        match self {
            GradientPath::Autograd => autograd::forward_backward(model, batch, store),
            GradientPath::Fused(ws) => fused::forward_backward(ws, model, batch, store),
            GradientPath::Blockwise => blockwise::forward_backward(model, batch, store),
        }
    }

    /// The store's collectives of [`Self::forward_backward`] with zero
    /// gradients: a rank whose share of the last global batch is empty
    /// still takes part in every exchange the others make.
    pub fn skip(&mut self, model: &GPT2LMHeadModel, store: &mut dyn ParamStore) -> Result<()> {
        match self {
            GradientPath::Autograd | GradientPath::Fused(_) => {
                store.with_flat_gradients(&mut |_| Ok(0.0))?;
                Ok(())
            }
            GradientPath::Blockwise => blockwise::skip(model, store),
        }
    }
}
