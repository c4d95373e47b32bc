//! `trainer_state.json` with HF's field names, and the schedule state a
//! checkpoint keeps.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One entry of `log_history`.
pub type LogEntry = Map<String, Value>;

/// `trainer_state.json` with HF's field names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub epoch: f64,
    pub global_step: usize,
    pub max_steps: usize,
    pub logging_steps: usize,
    pub eval_steps: usize,
    pub save_steps: usize,
    pub train_batch_size: usize,
    pub num_train_epochs: usize,
    pub num_input_tokens_seen: usize,
    pub total_flos: f64,
    pub log_history: Vec<LogEntry>,
    pub best_metric: Option<f64>,
    pub best_global_step: Option<usize>,
    pub best_model_checkpoint: Option<String>,
    pub is_local_process_zero: bool,
    pub is_world_process_zero: bool,
    pub is_hyper_param_search: bool,
    pub trial_name: Option<String>,
    pub trial_params: Option<Value>,
    pub stateful_callbacks: Value,
}

impl TrainerState {
    pub fn to_json_string(&self) -> String {
        crate::hf_json::dumps(&serde_json::to_value(self).expect("serialises")) + "\n"
    }
}

/// What `train()` returns (`TrainOutput`).
#[derive(Debug, Clone)]
pub struct TrainOutput {
    pub global_step: usize,
    pub training_loss: f64,
    pub metrics: LogEntry,
}
