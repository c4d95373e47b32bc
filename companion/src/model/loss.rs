//! The causal-LM loss: HF's shifted cross-entropy, ignoring label -100.

use candle_core::Tensor;

use super::error::{ModelError, Result};
use crate::cpu::inputs::check_label;
use crate::data::IGNORE_INDEX;

/// Shifted cross-entropy summed over the tokens whose label is not -100,
/// and their count: logits `[B, T, V]` predict labels `[B, T]` (i64) one
/// position later. The Trainer divides by the count of the whole
/// accumulated batch, as transformers ≥ 4.46 does.
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    if labels.dims() != [b, t] {
        return Err(ModelError::Input(format!(
            "labels have shape {:?}, expected [{b}, {t}]",
            labels.dims()
        )));
    }
    if t < 2 {
        let zero = Tensor::zeros((), logits.dtype(), logits.device())?;
        return Ok((zero, 0));
    }
    // Position i of each row predicts label i + 1; the last position
    // predicts nothing (-100). Every position keeps its row of logits, so
    // the logits are used where they lie (no copy of all but the last
    // position, and on CUDA none of the vocabulary padding's view either).
    let labels: Vec<Vec<i64>> = labels.to_vec2()?;
    let mut count = 0usize;
    let mut targets = Vec::with_capacity(b * t);
    for row in &labels {
        for &l in &row[1..] {
            check_label(l, v)?;
            count += usize::from(l != IGNORE_INDEX);
            targets.push(l);
        }
        targets.push(IGNORE_INDEX);
    }
    let sum = super::autograd_ops::cross_entropy_sum(logits, targets)?;
    Ok((sum, count))
}
