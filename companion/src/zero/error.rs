//! What can go wrong in the ZeRO engine.

use super::comm;
use super::ds_config::DsConfigError;

/// What can go wrong in the ZeRO engine.
#[derive(Debug, thiserror::Error)]
pub enum ZeroError {
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Comm(#[from] comm::CommError),
    #[error(transparent)]
    DsConfig(#[from] DsConfigError),
    /// A setting or state the engine cannot run with.
    #[error("{0}")]
    Args(String),
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
}

pub type Result<T> = std::result::Result<T, ZeroError>;
