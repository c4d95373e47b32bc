//! 4.3.4's training, as transformers' `Trainer` runs it: the arguments
//! ([`args`], `TrainingArguments` with HF's names and defaults), the state
//! it logs ([`state`], `trainer_state.json`), the loop ([`trainer`]),
//! evaluation ([`eval`]) and `checkpoint-N/` folders ([`checkpoint`]).

pub mod args;
pub mod checkpoint;
pub mod eval;
pub mod state;
pub mod trainer;

use std::path::Path;

pub use args::{TrainingArguments, ADAMW_NAMES, SCHEDULERS};
pub use checkpoint::{latest_checkpoint, list_checkpoints};
pub use eval::{evaluate_model, EvalMetrics};
pub use state::{LogEntry, TrainerState};
pub use trainer::{FaultInjection, TrainOutput, Trainer};

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
    #[error(transparent)]
    Comm(#[from] crate::zero::comm::CommError),
    #[error(transparent)]
    Zero(#[from] crate::zero::ZeroError),
}

pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn io_err(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Io {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}
