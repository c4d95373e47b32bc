//! What can go wrong building, loading or running the model.

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
    /// The store a gradient path reads weights from and hands gradients
    /// to failed (a collective between ranks, for ZeRO).
    #[error(transparent)]
    Store(Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl From<crate::cpu::InputError> for ModelError {
    fn from(e: crate::cpu::InputError) -> Self {
        ModelError::Input(e.0)
    }
}
