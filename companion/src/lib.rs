//! The Rust companion to section 4.3 ("Pretraining", 事前学習) of the LLM
//! textbook: the chapter's journey from corpus to tokenizer to GPT-2 to
//! training to generation, one module per concept.

pub mod corpus;
pub mod data;
pub mod display;
pub mod dist;
pub mod generate;
pub mod hub;
pub mod io;
pub mod kernels;
pub mod sentencepiece;
pub mod tokenizer;
pub mod train;

pub use tokenizer::AutoTokenizer;
pub mod bench;
pub mod config;
pub mod model;
pub mod ops;
pub mod plot;
pub mod pretrain;
pub mod pyjson;

pub use config::GPT2Config;
pub use model::GPT2LMHeadModel;

// Re-exported so notebook cells can name tensors without their own `:dep`.
pub use candle_core;
pub use candle_nn;
pub use serde_json;
