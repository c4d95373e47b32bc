//! `GPT2LMHeadModel` (4.3.2's `GPT2LMHeadModel(config)`): the candle model
//! ([`gpt2`]) over weights by HF name ([`weights`]), its dropout generator,
//! KV cache and loss, and the custom ops that give its layers a backward.
//!
//! Where things live: the **parameters'** names, shapes and roles in
//! [`crate::params`]; **gradients** are computed here, by the
//! [`GradientPath`] a run chose ([`gradient`]), into whatever
//! [`ParamStore`] it is given; the weights' **values** are the model's Vars
//! (or, under ZeRO-3, the engine's partitions).

pub mod autograd_ops;
pub mod dropout;
mod error;
pub mod gpt2;
pub mod gradient;
pub mod kv_cache;
pub mod loss;
pub mod weights;

pub use crate::config::{Activation, GPT2Config};
pub use crate::data::IGNORE_INDEX;
pub use crate::params::{Gpt2Params, ParamSpec};
pub use dropout::{Dropout, DropoutState};
pub use error::{ModelError, Result};
pub use gpt2::{CausalLMOutput, GPT2LMHeadModel};
pub use gradient::{GradientPath, LocalStore, MicroBatch, ParamStore};
pub use kv_cache::KvCache;
pub use loss::causal_lm_loss_sum;
pub use weights::all_finite;

#[cfg(test)]
mod tests;
