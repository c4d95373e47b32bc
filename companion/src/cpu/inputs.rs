//! Input checks shared by the candle forward pass, the loss and the fused
//! kernels, so all of them refuse the same input with the same words; and
//! GPT-2's position ids.

use crate::data::IGNORE_INDEX;

/// Input the model cannot take: the message says what and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

type Result<T> = std::result::Result<T, InputError>;

/// A sequence fits the position table.
pub fn check_length(tokens: usize, n_positions: usize) -> Result<()> {
    if tokens > n_positions {
        return Err(InputError(format!(
            "sequence of {tokens} tokens is longer than n_positions = {n_positions} (the model's position table)"
        )));
    }
    Ok(())
}

/// `max_id`, the largest token id of a batch, must index the vocabulary.
pub fn check_token_ids(max_id: Option<u32>, vocab_size: usize) -> Result<()> {
    match max_id {
        Some(max) if max as usize >= vocab_size => Err(InputError(format!(
            "token id {max} is outside the vocabulary (vocab_size = {vocab_size}); was the text \
             encoded with another tokenizer?"
        ))),
        _ => Ok(()),
    }
}

/// A label is -100 or a token id.
pub fn check_label(l: i64, vocab_size: usize) -> Result<()> {
    if l != IGNORE_INDEX && (l < 0 || l as usize >= vocab_size) {
        return Err(InputError(format!(
            "label {l} is outside the vocabulary (0..{vocab_size}) and is not -100"
        )));
    }
    Ok(())
}

/// `attention_mask` must be `rows` rows of `total` (past + new) positions.
pub fn check_mask(mask: Option<&[Vec<u32>]>, rows: usize, total: usize) -> Result<()> {
    if let Some(m) = mask {
        if m.len() != rows || m.iter().any(|r| r.len() != total) {
            return Err(InputError(format!(
                "attention_mask must be {rows} rows of {total} (past + new tokens)"
            )));
        }
    }
    Ok(())
}

/// Position ids: arange, or the running count of real tokens when a mask is
/// given (padding gets 1, as HF's generate fills it).
pub fn positions(b: usize, t: usize, past: usize, attention_mask: Option<&[Vec<u32>]>) -> Vec<u32> {
    let total = past + t;
    let mut pos = Vec::with_capacity(b * t);
    for row in 0..b {
        match attention_mask {
            Some(m) => {
                let mut seen: u32 = m[row][..past].iter().sum();
                for &keep in &m[row][past..total] {
                    seen += keep;
                    pos.push(if keep == 0 { 1 } else { seen - 1 });
                }
            }
            None => pos.extend(past as u32..total as u32),
        }
    }
    pos
}
