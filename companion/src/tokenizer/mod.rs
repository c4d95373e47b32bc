//! Tokenizers as in 4.3.2: load GPT-2's from the hub, train our own
//! (byte-level BPE or SentencePiece-style unigram), tokenize, save.
//!
//! The heavy lifting is Hugging Face's own `tokenizers` crate, the same Rust
//! code that Python `tokenizers` wraps, so that a tokenizer trained or loaded
//! here gives the same tokens as in Python. This module adds what
//! `transformers`' `PreTrainedTokenizerFast` adds on top: special-token roles
//! (bos/eos/pad/unk), padding, `tokenizer_config.json`, and `save_pretrained`.

mod auto;
mod byte_level;
mod cache_key;
mod fast_ids;
mod guard;
mod sentencepiece;
mod train;

pub use auto::{
    count_tokens, model_name, AutoTokenizer, BatchEncoding, IdsAndOffsets, PaddingSide,
    SpecialRole, TokenizerError, GPT2_ENDOFTEXT, METASPACE,
};
pub use byte_level::{bytes_to_unicode, token_bytes};
pub use sentencepiece::from_sentencepiece_model;
pub use train::{
    byte_level_bpe, sentencepiece_unigram, train, train_stream, TokenizerKind, TrainArgs,
};

impl AutoTokenizer {
    /// The chapter's `tokenizer.pad_token = tokenizer.eos_token`, when the
    /// tokenizer has no pad token of its own (GPT-2's has none).
    pub fn pad_with_eos(&mut self) -> Result<(), TokenizerError> {
        if self.pad_token_id().is_none() {
            if let Some(eos) = self.eos_token().map(str::to_string) {
                self.set_special_token(SpecialRole::Pad, &eos)?;
            }
        }
        Ok(())
    }
}
