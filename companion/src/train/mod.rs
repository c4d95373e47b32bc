//! 4.3.4's training, as transformers' `Trainer` runs it: the arguments
//! ([`args`], `TrainingArguments` with HF's names and defaults), the state
//! it logs ([`state`], `trainer_state.json`), the loop ([`trainer`]),
//! evaluation ([`eval`]) and `checkpoint-N/` folders ([`checkpoint`]).
//!
//! Where things live: a run's **settings** are resolved once into a
//! [`TrainPlan`] ([`plan`]: TrainingArguments + ds_config + ranks); its
//! **gradients** come from the model's [`crate::model::GradientPath`]; its
//! **state** (weights, moments, partitions) is the ZeRO engine's.

pub mod args;
pub mod baseline;
pub mod callback;
pub mod checkpoint;
mod data_parallel;
mod ds_files;
pub mod engine;
mod error;
pub mod eval;
mod hf_checkpoint;
mod hf_fields;
mod load_checkpoint;
pub mod lock;
mod logging;
mod model_parallel;
mod model_state;
pub mod output_dir;
pub mod plan;
pub mod plot;
mod resume;
pub mod state;
pub mod tensorboard;
pub mod trainer;

pub use args::{IntervalStrategy, OptimizerName, SchedulerType, TrainingArguments};
pub use baseline::{Bigram, BigramScore};
pub use callback::{StopAtStep, TrainerCallback, TrainerControl};
pub use error::{Result, TrainError};
pub use eval::evaluate_model;
pub use lock::OutputDirLock;
pub use output_dir::{latest_checkpoint, list_checkpoints};
pub use plan::{Precision, Schedule, TrainPlan, ZeroStrategy};
pub use state::{EvalMetrics, LogEntry, TrainOutput, TrainerState};
pub use trainer::{FaultInjection, Trainer};
