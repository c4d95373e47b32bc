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
