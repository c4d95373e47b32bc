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
    let logits = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let lab: Vec<i64> = labels.narrow(1, 1, t - 1)?.flatten_all()?.to_vec1()?;
    let mut count = 0usize;
    for &l in &lab {
        check_label(l, v)?;
        if l != IGNORE_INDEX {
            count += 1;
        }
    }
    let sum = super::autograd_ops::cross_entropy_sum(&logits, lab)?;
    Ok((sum, count))
}
