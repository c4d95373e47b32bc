//! candle's autograd over the whole model: the forward pass records the
//! graph ([`GPT2LMHeadModel::forward`]), `backward()` walks it. Runs any
//! dtype on any device; the reference the other paths are tested against.

use candle_core::{DType, Tensor, Var};

use super::batch::{gradient_tensors, loss_backward, MicroBatch};
use super::store::ParamStore;
use crate::model::error::Result;
use crate::model::gpt2::GPT2LMHeadModel;

/// Forward, loss and backward of `batch`; every parameter's gradient is
/// handed to the store as a tensor on the model's device (a store on that
/// device adds it there, one on the host reads it out).
pub fn forward_backward(
    model: &GPT2LMHeadModel,
    batch: &MicroBatch,
    store: &mut dyn ParamStore,
) -> Result<f64> {
    let logits = model.forward(batch.input_ids, batch.attention_mask, None)?;
    let (loss, grads) = loss_backward(&logits, batch)?;
    let vars: Vec<Var> = model
        .named_parameters()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let idx: Vec<usize> = (0..vars.len()).collect();
    // Handed over even when the loss is not finite (as zeros), so that a
    // store that exchanges gradients with other ranks leaves none waiting.
    let tensors = match &grads {
        Some(g) => gradient_tensors(g, &vars)?,
        None => vars
            .iter()
            .map(|v| Tensor::zeros(v.elem_count(), DType::F32, v.device()))
            .collect::<candle_core::Result<_>>()?,
    };
    store.add_gradient_tensors(&idx, &tensors)?;
    Ok(loss)
}
