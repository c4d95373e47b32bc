//! The optimiser and its schedule: AdamW with HF's parameter groups, and
//! the learning-rate schedules of transformers and DeepSpeed.

pub mod adamw;
#[cfg(feature = "cuda")]
pub mod adamw_cuda;
pub mod schedules;

pub use adamw::{AdamWParams, Moments};
pub use schedules::{lr_at, SchedulerConfig, SchedulerType};
