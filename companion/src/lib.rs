//! The Rust companion to section 4.3 ("Pretraining", 事前学習) of the LLM
//! textbook: the chapter's journey from corpus to tokenizer to GPT-2 to
//! training to generation, one module per concept.

pub mod atomic_write;
pub mod collect_env;
pub mod data;
pub mod generate;
pub mod hub;
pub mod tokenizer;
pub mod train;

pub use tokenizer::AutoTokenizer;
pub mod config;
pub mod cpu;
pub mod hf_json;
pub mod kernel_twins;
pub mod model;
pub mod notebook;
pub mod optim;
pub mod parallel;
pub mod params;
pub mod rng;
pub mod sysmem;
pub mod torch_file;
pub mod zero;

pub use config::GPT2Config;
pub use model::GPT2LMHeadModel;

// Re-exported so notebook cells can name tensors without their own `:dep`.
pub use candle_core;
pub use candle_nn;
pub use serde_json;

/// What the notebooks' cells use, in one `use companion::prelude::*;`: the
/// chapter's classes by their transformers names, the notebook display
/// types and checks, and candle's tensor types.
pub mod prelude {
    pub use crate::config::{ConfigOverrides, GPT2Config};
    pub use crate::data::{self, corpus};
    pub use crate::data::{DataCollatorForLanguageModeling, Dataset, Packing, TokenizeOptions};
    pub use crate::generate::{GenerationConfig, TokenIds};
    pub use crate::model::GPT2LMHeadModel;
    pub use crate::notebook::{self, CheckFailed};
    pub use crate::tokenizer::{self, AutoTokenizer, SpecialRole, TokenizerKind, TrainArgs};
    pub use crate::train::{
        EvalMetrics, IntervalStrategy, OptimizerName, SchedulerType, StopAtStep, Trainer,
        TrainerCallback, TrainingArguments,
    };
    pub use crate::zero::comm::{run_ranks, Communicator};
    pub use crate::{check, check_eq};
    pub use candle_core::{DType, Device, Tensor};
    pub use serde_json::json;
    pub use std::path::Path;
    pub use std::sync::Arc;
}
