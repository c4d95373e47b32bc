//! What the Trainer logs: one `log_history` entry per logging interval
//! (loss, grad norm, learning rate, tokens/s) and the final metrics of
//! `train()`, with HF's keys.

use std::time::Instant;

use serde_json::json;

use super::args::TrainingArguments;
use super::state::{LogEntry, TrainerState};

/// A number for `log_history` (JSON).
pub(crate) fn num(x: f64) -> serde_json::Value {
    json!(x)
}

/// What one optimizer step did.
pub(super) struct StepReport {
    /// The summed (scaled) loss of the global batch.
    pub(super) loss: f64,
    pub(super) norm: f64,
    pub(super) lr: f64,
    pub(super) loss_scale: Option<f64>,
    /// Tokens of the global batch.
    pub(super) tokens: usize,
}

/// The steps since the last log line.
pub(super) struct LogWindow {
    pub(super) loss: f64,
    pub(super) steps: usize,
    pub(super) tokens: usize,
    pub(super) since: Instant,
}

impl LogWindow {
    pub(super) fn new() -> Self {
        LogWindow {
            loss: 0.0,
            steps: 0,
            tokens: 0,
            since: Instant::now(),
        }
    }

    pub(super) fn add(&mut self, s: &StepReport) {
        self.loss += s.loss;
        self.steps += 1;
        self.tokens += s.tokens;
    }
}

/// The `log_history` entry for the steps of `window` (then emptied),
/// ending with `step`.
pub(super) fn log_entry(
    state: &TrainerState,
    step: &StepReport,
    window: &mut LogWindow,
) -> LogEntry {
    let secs = window.since.elapsed().as_secs_f64();
    let mut e = LogEntry::new();
    e.insert("loss".into(), num(window.loss / window.steps as f64));
    e.insert("grad_norm".into(), num(step.norm));
    if let Some(sc) = step.loss_scale {
        // fp16: the scale this step used (DeepSpeed logs it).
        e.insert("loss_scale".into(), num(sc));
    }
    e.insert("learning_rate".into(), num(step.lr));
    e.insert("epoch".into(), num(state.epoch));
    e.insert("step".into(), json!(state.global_step));
    e.insert(
        "tokens_per_second".into(),
        num(window.tokens as f64 / secs.max(1e-9)),
    );
    *window = LogWindow::new();
    e
}

/// The final `log_history` entry of `train()`.
pub(super) fn train_metrics(
    args: &TrainingArguments,
    state: &TrainerState,
    secs: f64,
    steps_done: usize,
    train_loss: f64,
) -> LogEntry {
    let samples = steps_done * args.gradient_accumulation_steps * args.per_device_train_batch_size;
    let mut m = LogEntry::new();
    m.insert("train_runtime".into(), num(secs));
    m.insert(
        "train_samples_per_second".into(),
        num(samples as f64 / secs),
    );
    m.insert(
        "train_steps_per_second".into(),
        num(steps_done as f64 / secs),
    );
    m.insert("total_flos".into(), num(state.total_flos));
    m.insert("train_loss".into(), num(train_loss));
    m.insert("epoch".into(), num(state.epoch));
    m.insert("step".into(), json!(state.global_step));
    m
}
