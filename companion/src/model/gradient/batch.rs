//! What every gradient path shares: the micro-batch it is given, and the
//! loss with its backward pass and the gradients read out of candle.

use candle_core::{DType, Tensor, Var};

use crate::model::error::Result;
use crate::model::loss::causal_lm_loss_sum;

/// One micro-batch as a gradient path takes it.
#[derive(Clone, Copy)]
pub struct MicroBatch<'a> {
    /// `[B, T]` token ids (u32).
    pub input_ids: &'a Tensor,
    /// `[B, T]` labels (i64, -100 ignored).
    pub labels: &'a Tensor,
    /// `[B, T]` attention mask, only when the batch is padded.
    pub attention_mask: Option<&'a [Vec<u32>]>,
    /// Label tokens of the whole global batch: the loss is summed over this
    /// micro-batch and divided by it, so accumulated gradients are those of
    /// the global batch's mean.
    pub n_items: f64,
    /// fp16's loss scale (1 otherwise): gradients are of the loss times it.
    pub loss_scale: f64,
}

/// The loss of `logits` against the batch's labels over `n_items` tokens
/// and, when it is finite, the gradients of the loss times the loss scale.
pub(crate) fn loss_backward(
    logits: &Tensor,
    batch: &MicroBatch,
) -> Result<(f64, Option<candle_core::backprop::GradStore>)> {
    let (sum, _) = causal_lm_loss_sum(logits, batch.labels)?;
    let loss = (sum / batch.n_items)?;
    let lv = loss.to_scalar::<f32>()? as f64;
    if !lv.is_finite() {
        return Ok((lv, None));
    }
    Ok((lv, Some((loss * batch.loss_scale)?.backward()?)))
}

/// Gradients `g` holds for `vars`, as flat fp32 tensors on their device
/// (zeros where none reached).
pub(crate) fn gradient_tensors(
    g: &candle_core::backprop::GradStore,
    vars: &[Var],
) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|v| -> Result<Tensor> {
            Ok(match g.get(v.as_tensor()) {
                Some(t) => t.flatten_all()?.to_dtype(DType::F32)?,
                None => Tensor::zeros(v.elem_count(), DType::F32, v.device())?,
            })
        })
        .collect()
}
