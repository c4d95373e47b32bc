//! `GPT2LMHeadModel` (4.3.2's `GPT2LMHeadModel(config)`): the candle model
//! ([`gpt2`]) over weights by HF name ([`weights`]), its dropout generator,
//! KV cache and loss, and the custom ops that give its layers a backward.

pub mod autograd_ops;
pub mod dropout;
mod error;
pub mod gpt2;
pub mod kv_cache;
pub mod loss;
pub mod names;
pub mod weights;

pub use crate::config::{Activation, GPT2Config};
pub use crate::data::IGNORE_INDEX;
pub use dropout::{Dropout, DropoutState};
pub use error::{ModelError, Result};
pub use gpt2::{CausalLMOutput, GPT2LMHeadModel};
pub use kv_cache::KvCache;
pub use loss::causal_lm_loss_sum;
pub use names::{block_parameter_names, parameter_shapes};
pub use weights::all_finite;

#[cfg(test)]
mod tests;
