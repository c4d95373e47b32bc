//! `trainer_state.json` with HF's field names, what `train()` returns,
//! and the metrics of an evaluation.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{Result, TrainError};

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

/// Evaluation result: mean loss per token, perplexity, bits per byte.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EvalMetrics {
    pub eval_loss: f64,
    pub perplexity: f64,
    pub bits_per_byte: f64,
    pub tokens: usize,
}

impl EvalMetrics {
    /// From a loss summed over `count` label tokens of a dataset with
    /// `bytes_per_token` bytes of text per token. Zero tokens is an error,
    /// not a perfect score: a figure from no data would be a lie.
    pub fn from_sum(sum: f64, count: usize, bytes_per_token: f64, examples: usize) -> Result<Self> {
        if count == 0 {
            return Err(TrainError::Args(format!(
                "the evaluation set has no tokens to predict ({examples} examples): the \
                 validation data is empty or shorter than one block, or max_eval_samples is 0; \
                 give more held-out text or evaluate with --no-validation / eval_strategy no"
            )));
        }
        let loss = sum / count as f64;
        Ok(EvalMetrics {
            eval_loss: loss,
            perplexity: loss.exp(),
            bits_per_byte: loss / std::f64::consts::LN_2 / bytes_per_token,
            tokens: count,
        })
    }
}
