//! `DataCollatorForLanguageModeling(tokenizer, mlm=False)`: examples of
//! different lengths become one padded batch with labels.

use super::error::{DataError, Result};
use crate::tokenizer::{AutoTokenizer, PaddingSide};

/// The label of a position the loss does not count (PyTorch's
/// `CrossEntropyLoss(ignore_index=-100)`, HF's padding label).
pub const IGNORE_INDEX: i64 = -100;

/// A collated batch, as the collator's dict: `input_ids`, `attention_mask`, `labels`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
    pub labels: Vec<Vec<i64>>,
}

impl Batch {
    /// Label tokens the loss counts (after the shift the model applies).
    pub fn num_label_tokens(&self) -> usize {
        self.labels
            .iter()
            .map(|r| r.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count())
            .sum()
    }

    /// True when no position is padding (the mask can be left out).
    pub fn is_unpadded(&self) -> bool {
        self.attention_mask.iter().flatten().all(|&m| m == 1)
    }
}

/// `DataCollatorForLanguageModeling(tokenizer, mlm=False)`, written
/// `DataCollatorForLanguageModeling { mlm: false, ..DataCollatorForLanguageModeling::new(&tokenizer) }`
/// or just `::new(&tokenizer)`: pad to the
/// longest example (rounded up to `pad_to_multiple_of`) on the tokenizer's
/// padding side; labels are the input ids with -100 where the input is the
/// pad token (so with pad = eos, real eos tokens are not learned either, as
/// in HF). It does not shift: the model does.
#[derive(Debug, Clone)]
pub struct DataCollatorForLanguageModeling {
    pub pad_token_id: Option<u32>,
    pub mlm: bool,
    pub pad_to_multiple_of: Option<usize>,
    pub padding_side: PaddingSide,
}

impl DataCollatorForLanguageModeling {
    /// The causal-LM collator for `tok` (`mlm: false`; HF's own default is
    /// `mlm=True`, masked-LM as BERT trains, which GPT-2 does not use and
    /// `collate` refuses).
    pub fn new(tok: &AutoTokenizer) -> Self {
        DataCollatorForLanguageModeling {
            pad_token_id: tok.pad_token_id(),
            mlm: false,
            pad_to_multiple_of: None,
            padding_side: tok.padding_side,
        }
    }

    pub fn collate(&self, examples: &[&[u32]]) -> Result<Batch> {
        if self.mlm {
            return Err(DataError::Invalid(
                "mlm=True is masked-language modelling (BERT); GPT-2 is trained with mlm=False"
                    .into(),
            ));
        }
        let longest = examples.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut width = longest;
        if let Some(m) = self.pad_to_multiple_of.filter(|&m| m > 0) {
            width = width.div_ceil(m) * m;
        }
        let needs_pad = examples.iter().any(|e| e.len() != width);
        let pad =
            match self.pad_token_id {
                Some(p) => p,
                None if !needs_pad => 0,
                None => return Err(DataError::Invalid(
                    "the tokenizer has no pad token, so examples of different lengths cannot be \
                     batched; set one (GPT-2 users set pad_token = eos_token)"
                        .into(),
                )),
            };
        let mut b = Batch {
            input_ids: Vec::with_capacity(examples.len()),
            attention_mask: Vec::with_capacity(examples.len()),
            labels: Vec::with_capacity(examples.len()),
        };
        for e in examples {
            let n = width - e.len();
            let (ids, mask): (Vec<u32>, Vec<u32>) = match self.padding_side {
                PaddingSide::Right => (
                    e.iter()
                        .copied()
                        .chain(std::iter::repeat_n(pad, n))
                        .collect(),
                    std::iter::repeat_n(1, e.len())
                        .chain(std::iter::repeat_n(0, n))
                        .collect(),
                ),
                PaddingSide::Left => (
                    std::iter::repeat_n(pad, n)
                        .chain(e.iter().copied())
                        .collect(),
                    std::iter::repeat_n(0, n)
                        .chain(std::iter::repeat_n(1, e.len()))
                        .collect(),
                ),
            };
            let labels = ids
                .iter()
                .map(|&i| {
                    if self.pad_token_id == Some(i) {
                        IGNORE_INDEX
                    } else {
                        i as i64
                    }
                })
                .collect();
            b.input_ids.push(ids);
            b.attention_mask.push(mask);
            b.labels.push(labels);
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collator_pads_right_and_masks_pad_labels() {
        let c = DataCollatorForLanguageModeling {
            pad_token_id: Some(0),
            mlm: false,
            pad_to_multiple_of: Some(4),
            padding_side: PaddingSide::Right,
        };
        let b = c.collate(&[&[5, 6, 7], &[8, 0]]).unwrap();
        assert_eq!(b.input_ids, vec![vec![5, 6, 7, 0], vec![8, 0, 0, 0]]);
        assert_eq!(b.attention_mask, vec![vec![1, 1, 1, 0], vec![1, 1, 0, 0]]);
        // The real token 0 (= pad id) is masked too, as in HF.
        assert_eq!(
            b.labels,
            vec![vec![5, 6, 7, -100], vec![8, -100, -100, -100]]
        );
        assert_eq!(b.num_label_tokens(), 2);
        let none = DataCollatorForLanguageModeling {
            pad_token_id: None,
            ..c.clone()
        };
        assert!(none.collate(&[&[1, 2], &[3]]).is_err());
        let mlm = DataCollatorForLanguageModeling { mlm: true, ..c };
        assert!(mlm
            .collate(&[&[1]])
            .unwrap_err()
            .to_string()
            .contains("mlm"));
    }
}
