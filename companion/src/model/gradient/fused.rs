//! The fused CPU kernels ([`crate::cpu::train_step`]): forward and backward
//! written out by hand in fp32, gradients added straight into the store's
//! flat buffer (llm.c's `gpt2_forward` / `gpt2_backward`).

use super::batch::MicroBatch;
use super::store::ParamStore;
use crate::cpu::{DropoutMasks, Workspace};
use crate::model::error::Result;
use crate::model::gpt2::GPT2LMHeadModel;

/// Forward, loss and backward of `batch` through the kernels, reusing the
/// activation buffers of `ws`.
pub fn forward_backward(
    ws: &mut Workspace,
    model: &GPT2LMHeadModel,
    batch: &MicroBatch,
    store: &mut dyn ParamStore,
) -> Result<f64> {
    let ids: Vec<Vec<u32>> = batch.input_ids.to_vec2()?;
    let labels: Vec<Vec<i64>> = batch.labels.to_vec2()?;
    let b = crate::cpu::Batch {
        ids: &ids,
        labels: &labels,
        mask: batch.attention_mask,
    };
    let ranges = model.params.ranges();
    let scale = (batch.loss_scale / batch.n_items) as f32;
    let dropout = model.training_dropout().map(|d| d as &dyn DropoutMasks);
    let sum = store.with_flat_gradients(&mut |flat| {
        model.with_fp32_weights(|w| {
            Ok(ws.forward_backward(&model.config, w, &b, dropout, flat, &ranges, scale)?)
        })
    })?;
    Ok(sum / batch.n_items)
}
