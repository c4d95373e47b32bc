//! `GPT2LMHeadModel` (4.3.2's `GPT2LMHeadModel(config)`): the candle model
//! ([`gpt2`]) over weights by HF name ([`weights`]), its dropout generator,
//! KV cache and loss, and the custom ops that give its layers a backward.

pub mod autograd_ops;
pub mod dropout;
pub mod gpt2;
pub mod kv_cache;
pub mod loss;
pub mod weights;

pub use crate::config::{Activation, GPT2Config};
pub use crate::data::IGNORE_INDEX;
pub use dropout::{Dropout, DropoutState};
pub use gpt2::{CausalLMOutput, GPT2LMHeadModel};
pub use kv_cache::KvCache;
pub use loss::causal_lm_loss_sum;
pub use weights::{block_parameter_names, parameter_shapes};

use crate::hub;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Hub(#[from] hub::HubError),
    #[error("{file}: tensor `{name}` is missing from the checkpoint")]
    MissingTensor { file: String, name: String },
    #[error("{file}: tensor `{name}` has shape {found:?}, the config expects {expected:?}")]
    WrongShape {
        file: String,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{file}: {msg}")]
    File { file: String, msg: String },
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl From<crate::cpu::InputError> for ModelError {
    fn from(e: crate::cpu::InputError) -> Self {
        ModelError::Input(e.0)
    }
}

#[cfg(test)]
mod tests;
