//! What can go wrong in training, and the I/O error helper.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
    #[error("{0}")]
    Args(String),
    #[error("{0}")]
    NonFinite(String),
    /// A callback's `on_model` failed.
    #[error("callback: {0}")]
    Callback(String),
    #[error(transparent)]
    Comm(#[from] crate::zero::comm::CommError),
    #[error(transparent)]
    Zero(#[from] crate::zero::ZeroError),
    #[error(transparent)]
    DsConfig(#[from] crate::zero::DsConfigError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// A command line clap refused.
    #[error(transparent)]
    Flags(#[from] clap::Error),
}

pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn io_err(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Io {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}
