//! 4.3.4's training: `TrainingArguments` (HF's names and defaults), AdamW as
//! `adamw_torch` with HF Trainer's parameter groups, the LR schedules,
//! and `Trainer` with gradient accumulation, clipping, logging into
//! `trainer_state.json`, evaluation, atomic `checkpoint-N/` folders,
//! `save_total_limit`, `resume_from_checkpoint` and `save_model`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::data::{Batch, DataCollatorForLanguageModeling, DataLoader, Dataset};
use crate::model::{causal_lm_loss_sum, GPT2LMHeadModel};
use crate::tokenizer::AutoTokenizer;

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
}

pub type Result<T> = std::result::Result<T, TrainError>;

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Io {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

/// `transformers.TrainingArguments`: HF's field names and defaults. Fields we
/// accept but do not act on are kept in `extra` and listed by
/// [`TrainingArguments::unused_fields`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingArguments {
    pub output_dir: String,
    pub overwrite_output_dir: bool,
    pub num_train_epochs: f64,
    pub max_steps: i64,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub lr_scheduler_type: String,
    /// transformers 4.x; 5.x folds it into `warmup_steps` < 1. Both work.
    pub warmup_ratio: f64,
    /// Steps, or a ratio of the total when in [0, 1).
    pub warmup_steps: f64,
    pub logging_strategy: String,
    /// Steps, or a ratio of the total when < 1.
    pub logging_steps: f64,
    pub logging_first_step: bool,
    pub save_strategy: String,
    pub save_steps: f64,
    pub save_total_limit: Option<usize>,
    #[serde(alias = "evaluation_strategy")]
    pub eval_strategy: String,
    pub eval_steps: Option<f64>,
    pub seed: u64,
    pub bf16: bool,
    pub fp16: bool,
    pub gradient_checkpointing: bool,
    pub resume_from_checkpoint: Option<String>,
    pub deepspeed: Option<Value>,
    pub optim: String,
    pub dataloader_drop_last: bool,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for TrainingArguments {
    fn default() -> Self {
        TrainingArguments {
            output_dir: "trainer_output".into(),
            overwrite_output_dir: false,
            num_train_epochs: 3.0,
            max_steps: -1,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-5,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            lr_scheduler_type: "linear".into(),
            warmup_ratio: 0.0,
            warmup_steps: 0.0,
            logging_strategy: "steps".into(),
            logging_steps: 500.0,
            logging_first_step: false,
            save_strategy: "steps".into(),
            save_steps: 500.0,
            save_total_limit: None,
            eval_strategy: "no".into(),
            eval_steps: None,
            seed: 42,
            bf16: false,
            fp16: false,
            gradient_checkpointing: false,
            resume_from_checkpoint: None,
            deepspeed: None,
            optim: "adamw_torch".into(),
            dataloader_drop_last: false,
            extra: Map::new(),
        }
    }
}

/// The optimiser names HF accepts that are all plain AdamW on a CPU.
pub const ADAMW_NAMES: &[&str] = &["adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw"];
/// The schedules we implement (HF's names).
pub const SCHEDULERS: &[&str] = &["linear", "cosine", "constant", "constant_with_warmup"];

impl TrainingArguments {
    /// Read a JSON file of TrainingArguments fields.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| TrainError::Io {
            path: path.display().to_string(),
            msg: format!("not JSON: {e}"),
        })?;
        Self::from_value(v).map_err(|e| TrainError::Io {
            path: path.display().to_string(),
            msg: e.to_string(),
        })
    }

    pub fn from_value(v: Value) -> Result<Self> {
        let a: Self = serde_json::from_value(v)
            .map_err(|e| TrainError::Args(format!("TrainingArguments: {e}")))?;
        a.validate()?;
        Ok(a)
    }

    /// Set a field from a command-line flag (`--max-steps 10`): kebab case
    /// becomes the HF name, the value is JSON if it parses as JSON, else a string.
    pub fn set(&mut self, flag: &str, value: Option<&str>) -> Result<()> {
        let key = flag.trim_start_matches("--").replace('-', "_");
        let mut v = serde_json::to_value(&*self).expect("serialises");
        let known =
            v.as_object().is_some_and(|o| o.contains_key(&key)) || key == "evaluation_strategy";
        if !known {
            return Err(TrainError::Args(format!(
                "unknown TrainingArguments field `{key}` (from {flag})"
            )));
        }
        let val = match value {
            None => Value::Bool(true),
            Some(s) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_string())),
        };
        let key = if key == "evaluation_strategy" {
            "eval_strategy".into()
        } else {
            key
        };
        v[&key] = val;
        *self = serde_json::from_value(v).map_err(|e| TrainError::Args(format!("{flag}: {e}")))?;
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Args(m));
        if self.per_device_train_batch_size == 0 || self.per_device_eval_batch_size == 0 {
            return bad(
                "per_device_train_batch_size and per_device_eval_batch_size must be at least 1"
                    .into(),
            );
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps must be at least 1".into());
        }
        if !SCHEDULERS.contains(&self.lr_scheduler_type.as_str()) {
            return bad(format!(
                "unknown lr_scheduler_type `{}`: expected one of {}",
                self.lr_scheduler_type,
                SCHEDULERS.join(", ")
            ));
        }
        if !ADAMW_NAMES.contains(&self.optim.as_str()) {
            return bad(format!(
                "unknown or unsupported optim `{}`: expected one of {}",
                self.optim,
                ADAMW_NAMES.join(", ")
            ));
        }
        for (name, s) in [
            ("logging_strategy", &self.logging_strategy),
            ("save_strategy", &self.save_strategy),
            ("eval_strategy", &self.eval_strategy),
        ] {
            if !["no", "steps", "epoch"].contains(&s.as_str()) {
                return bad(format!(
                    "{name} must be `no`, `steps` or `epoch`, got `{s}`"
                ));
            }
        }
        if self.max_steps <= 0 && self.num_train_epochs <= 0.0 {
            return bad("set max_steps > 0 or num_train_epochs > 0".into());
        }
        if self.learning_rate < 0.0 || !self.learning_rate.is_finite() {
            return bad(format!(
                "learning_rate must be ≥ 0, got {}",
                self.learning_rate
            ));
        }
        Ok(())
    }

    /// Fields given that this Trainer accepts but does not act on.
    pub fn unused_fields(&self) -> Vec<String> {
        let mut v: Vec<String> = self.extra.keys().cloned().collect();
        if self.bf16 {
            v.push("bf16 (CPU training is fp32 here)".into());
        }
        if self.fp16 {
            v.push("fp16 (CPU training is fp32 here)".into());
        }
        if self.gradient_checkpointing {
            v.push("gradient_checkpointing".into());
        }
        if self.deepspeed.is_some() {
            v.push("deepspeed (ZeRO is not implemented yet)".into());
        }
        v
    }

    fn resolve_steps(&self, x: f64, total: usize) -> usize {
        if x > 0.0 && x < 1.0 {
            ((x * total as f64).ceil() as usize).max(1)
        } else {
            x.max(0.0) as usize
        }
    }

    /// Warmup steps: `warmup_steps` (a ratio if < 1) else `warmup_ratio`.
    pub fn num_warmup_steps(&self, total: usize) -> usize {
        if self.warmup_steps > 0.0 {
            self.resolve_steps(self.warmup_steps, total)
        } else {
            (self.warmup_ratio * total as f64).ceil() as usize
        }
    }
}

/// HF's schedules (`get_scheduler`): the learning rate after `step` updates.
pub fn lr_at(kind: &str, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    let s = step as f64;
    let w = warmup as f64;
    if step < warmup && kind != "constant" {
        return base * s / w.max(1.0);
    }
    match kind {
        "linear" => base * ((total as f64 - s) / (total as f64 - w).max(1.0)).max(0.0),
        "cosine" => {
            let progress = (s - w) / (total as f64 - w).max(1.0);
            base * (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
        }
        _ => base,
    }
}

/// HF Trainer's rule: no weight decay for biases and LayerNorm weights.
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains(".ln_"))
}

/// AdamW exactly as `torch.optim.AdamW` (`adamw_torch`), its state keyed by
/// parameter name so it can be saved and resumed.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
    pub exp_avg: HashMap<String, Vec<f32>>,
    pub exp_avg_sq: HashMap<String, Vec<f32>>,
}

impl AdamW {
    pub fn new(args: &TrainingArguments) -> Self {
        AdamW {
            lr: args.learning_rate,
            beta1: args.adam_beta1,
            beta2: args.adam_beta2,
            eps: args.adam_epsilon,
            weight_decay: args.weight_decay,
            step: 0,
            exp_avg: HashMap::new(),
            exp_avg_sq: HashMap::new(),
        }
    }

    /// One update of `param` (flattened) with its gradient.
    pub fn update(&mut self, name: &str, param: &mut [f32], grad: &[f32], lr: f64) {
        let n = param.len();
        let m = self
            .exp_avg
            .entry(name.to_string())
            .or_insert_with(|| vec![0.0; n]);
        let v = self
            .exp_avg_sq
            .entry(name.to_string())
            .or_insert_with(|| vec![0.0; n]);
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let step_size = (lr / bc1) as f32;
        let decay = if decays(name) {
            (1.0 - lr * self.weight_decay) as f32
        } else {
            1.0
        };
        let (b1, b2, eps) = (b1 as f32, b2 as f32, self.eps as f32);
        let bc2_sqrt = bc2_sqrt as f32;
        param
            .par_chunks_mut(4096)
            .zip(grad.par_chunks(4096))
            .zip(m.par_chunks_mut(4096))
            .zip(v.par_chunks_mut(4096))
            .for_each(|(((p, g), m), v)| {
                for i in 0..p.len() {
                    p[i] *= decay;
                    m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                    v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                    let denom = v[i].sqrt() / bc2_sqrt + eps;
                    p[i] -= step_size * m[i] / denom;
                }
            });
    }
}

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
        crate::pyjson::dumps(&serde_json::to_value(self).expect("serialises")) + "\n"
    }
}

/// The learning-rate schedule state saved as `scheduler.json` (HF: scheduler.pt).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SchedulerState {
    kind: String,
    base_lr: f64,
    warmup_steps: usize,
    total_steps: usize,
    last_epoch: usize,
}

/// A hook for tests: fail while writing the N-th file of a checkpoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultInjection {
    pub fail_checkpoint_at_step: Option<usize>,
}

/// `Trainer(model, args, data_collator, train_dataset, eval_dataset, tokenizer)`.
pub struct Trainer {
    pub model: GPT2LMHeadModel,
    pub args: TrainingArguments,
    pub collator: DataCollatorForLanguageModeling,
    pub train_dataset: Dataset,
    pub eval_dataset: Option<Dataset>,
    pub tokenizer: Option<AutoTokenizer>,
    pub state: TrainerState,
    pub optimizer: AdamW,
    pub faults: FaultInjection,
    /// Print log lines to stderr (the notebooks turn this off).
    pub verbose: bool,
    /// Shuffle the training examples each epoch (seeded); tests turn it off.
    pub shuffle: bool,
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

fn num(x: f64) -> Value {
    json!(x)
}

impl Trainer {
    pub fn new(
        model: GPT2LMHeadModel,
        args: TrainingArguments,
        collator: DataCollatorForLanguageModeling,
        train_dataset: Dataset,
        eval_dataset: Option<Dataset>,
        tokenizer: Option<AutoTokenizer>,
    ) -> Result<Self> {
        args.validate()?;
        let optimizer = AdamW::new(&args);
        Ok(Trainer {
            model,
            collator,
            train_dataset,
            eval_dataset,
            tokenizer,
            state: TrainerState {
                epoch: 0.0,
                global_step: 0,
                max_steps: 0,
                logging_steps: 0,
                eval_steps: 0,
                save_steps: 0,
                train_batch_size: args.per_device_train_batch_size,
                num_train_epochs: args.num_train_epochs.ceil() as usize,
                num_input_tokens_seen: 0,
                total_flos: 0.0,
                log_history: vec![],
                best_metric: None,
                best_global_step: None,
                best_model_checkpoint: None,
                is_local_process_zero: true,
                is_world_process_zero: true,
                is_hyper_param_search: false,
                trial_name: None,
                trial_params: None,
                stateful_callbacks: json!({}),
            },
            optimizer,
            args,
            faults: FaultInjection::default(),
            verbose: true,
            shuffle: true,
        })
    }

    fn loader(&self) -> Result<DataLoader> {
        let mut l = DataLoader::new(
            self.train_dataset.len(),
            self.args.per_device_train_batch_size,
            self.shuffle,
            self.args.seed,
        )?;
        l.drop_last = self.args.dataloader_drop_last;
        Ok(l)
    }

    /// Total optimiser steps (HF: max_steps, else epochs × updates per epoch).
    pub fn total_steps(&self) -> Result<usize> {
        if self.args.max_steps > 0 {
            return Ok(self.args.max_steps as usize);
        }
        let per_epoch =
            (self.loader()?.batches_per_epoch() / self.args.gradient_accumulation_steps).max(1);
        Ok((self.args.num_train_epochs * per_epoch as f64).ceil() as usize)
    }

    fn batch_of(&self, ds: &Dataset, idx: &[usize]) -> Result<Batch> {
        let ex: Vec<&[u32]> = idx.iter().map(|&i| ds.input_ids[i].as_slice()).collect();
        Ok(self.collator.collate(&ex)?)
    }

    fn tensors(&self, b: &Batch) -> Result<(Tensor, Tensor)> {
        let dev = self.model.device();
        Ok((
            Tensor::new(b.input_ids.clone(), dev)?,
            Tensor::new(b.labels.clone(), dev)?,
        ))
    }

    /// Mean loss per counted token over `ds`, perplexity and bits per byte.
    pub fn evaluate_dataset(&mut self, ds: &Dataset) -> Result<EvalMetrics> {
        let was = self.model.is_training();
        self.model.set_training(false);
        let bs = self.args.per_device_eval_batch_size;
        let (mut sum, mut count) = (0f64, 0usize);
        for start in (0..ds.len()).step_by(bs) {
            let idx: Vec<usize> = (start..(start + bs).min(ds.len())).collect();
            let b = self.batch_of(ds, &idx)?;
            let (ids, labels) = self.tensors(&b)?;
            let mask = (!b.is_unpadded()).then_some(b.attention_mask.as_slice());
            let logits = self.model.forward(&ids, mask, None)?;
            let (s, n) = causal_lm_loss_sum(&logits, &labels)?;
            sum += s.to_scalar::<f32>()? as f64;
            count += n;
        }
        self.model.set_training(was);
        let loss = sum / count.max(1) as f64;
        Ok(EvalMetrics {
            eval_loss: loss,
            perplexity: loss.exp(),
            bits_per_byte: loss / std::f64::consts::LN_2 / ds.bytes_per_token(),
            tokens: count,
        })
    }

    /// `trainer.evaluate()` on the eval dataset; logged into `log_history`.
    pub fn evaluate(&mut self) -> Result<Option<EvalMetrics>> {
        let Some(ds) = self.eval_dataset.clone() else {
            return Ok(None);
        };
        let t = Instant::now();
        let m = self.evaluate_dataset(&ds)?;
        let secs = t.elapsed().as_secs_f64();
        let mut e = LogEntry::new();
        e.insert("eval_loss".into(), num(m.eval_loss));
        e.insert("eval_perplexity".into(), num(m.perplexity));
        e.insert("eval_bits_per_byte".into(), num(m.bits_per_byte));
        e.insert("eval_runtime".into(), num(secs));
        e.insert(
            "eval_samples_per_second".into(),
            num(ds.len() as f64 / secs),
        );
        let steps = ds.len().div_ceil(self.args.per_device_eval_batch_size);
        e.insert("eval_steps_per_second".into(), num(steps as f64 / secs));
        e.insert("epoch".into(), num(self.state.epoch));
        e.insert("step".into(), json!(self.state.global_step));
        if self.verbose {
            eprintln!(
                "step {}: eval_loss {:.4}, perplexity {:.2}, bits/byte {:.3}",
                self.state.global_step, m.eval_loss, m.perplexity, m.bits_per_byte
            );
        }
        self.state.log_history.push(e);
        Ok(Some(m))
    }

    /// `trainer.train(resume_from_checkpoint=…)`: `None` uses
    /// `args.resume_from_checkpoint`; `"latest"` or `"true"` picks the last
    /// `checkpoint-N` in `output_dir`.
    pub fn train(&mut self) -> Result<TrainOutput> {
        let total = self.total_steps()?;
        let loader = self.loader()?;
        let accum = self.args.gradient_accumulation_steps;
        let warmup = self.args.num_warmup_steps(total);
        let logging_steps = match self.args.logging_strategy.as_str() {
            "steps" => self
                .args
                .resolve_steps(self.args.logging_steps, total)
                .max(1),
            _ => 0,
        };
        let eval_steps = match self.args.eval_strategy.as_str() {
            "steps" => self
                .args
                .resolve_steps(
                    self.args.eval_steps.unwrap_or(self.args.logging_steps),
                    total,
                )
                .max(1),
            _ => 0,
        };
        let save_steps = match self.args.save_strategy.as_str() {
            "steps" => self.args.resolve_steps(self.args.save_steps, total).max(1),
            _ => 0,
        };
        self.state.max_steps = total;
        self.state.logging_steps = logging_steps;
        self.state.eval_steps = eval_steps;
        self.state.save_steps = save_steps;
        let out_dir = PathBuf::from(&self.args.output_dir);
        if out_dir.exists() && !out_dir.is_dir() {
            return Err(TrainError::Args(format!(
                "output_dir {} exists and is not a folder",
                out_dir.display()
            )));
        }
        if let Some(r) = self.args.resume_from_checkpoint.clone() {
            let ckpt = if r == "latest" || r == "true" {
                latest_checkpoint(&out_dir).ok_or_else(|| {
                    TrainError::Args(format!(
                        "no checkpoint-N folder in {} to resume from",
                        out_dir.display()
                    ))
                })?
            } else {
                PathBuf::from(r)
            };
            self.load_checkpoint(&ckpt)?;
            if self.verbose {
                eprintln!(
                    "resumed from {} at step {}",
                    ckpt.display(),
                    self.state.global_step
                );
            }
        }
        let per_epoch = loader.batches_per_epoch() as f64;
        let names: Vec<(String, candle_core::Var)> = self.model.named_parameters();
        let n_params: usize = names.iter().map(|(_, v)| v.elem_count()).sum();
        let bar = if self.verbose && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            indicatif::ProgressBar::new(total as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_position(self.state.global_step as u64);
        let start = Instant::now();
        let start_step = self.state.global_step;
        let (mut log_loss, mut log_n) = (0f64, 0usize);
        let mut total_loss = 0f64;
        let mut tokens_since_log = 0usize;
        let mut log_timer = Instant::now();
        self.model.set_training(true);
        while self.state.global_step < total {
            let step = self.state.global_step;
            // The micro-batches of this update and their label-token count:
            // the loss is summed over all of them and divided by that count.
            let batches: Vec<Batch> = (0..accum)
                .map(|k| self.batch_of(&self.train_dataset, &loader.batch(step * accum + k)))
                .collect::<Result<_>>()?;
            let n_items: usize = batches
                .iter()
                .map(Batch::num_label_tokens)
                .sum::<usize>()
                .max(1);
            let mut grads: HashMap<String, Vec<f32>> = HashMap::new();
            let mut step_loss = 0f64;
            let step_tokens: usize = batches
                .iter()
                .map(|b| b.input_ids.iter().map(Vec::len).sum::<usize>())
                .sum();
            for (k, b) in batches.iter().enumerate() {
                self.model.seed_dropout(
                    self.args.seed ^ ((step * accum + k) as u64).wrapping_mul(0x9E3779B97F4A7C15),
                );
                let (ids, labels) = self.tensors(b)?;
                let mask = (!b.is_unpadded()).then_some(b.attention_mask.as_slice());
                let logits = self.model.forward(&ids, mask, None)?;
                let (sum, _) = causal_lm_loss_sum(&logits, &labels)?;
                let loss = (sum / n_items as f64)?;
                let lv = loss.to_scalar::<f32>()? as f64;
                if !lv.is_finite() {
                    return Err(TrainError::NonFinite(format!(
                        "the loss became {lv} at step {}; training stopped and the last checkpoint \
                         is kept (lower the learning_rate or check the data)",
                        step + 1
                    )));
                }
                step_loss += lv;
                let g = loss.backward()?;
                for (name, var) in &names {
                    if let Some(t) = g.get(var.as_tensor()) {
                        let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                        match grads.get_mut(name) {
                            Some(acc) => acc.iter_mut().zip(&v).for_each(|(a, b)| *a += b),
                            None => {
                                grads.insert(name.clone(), v);
                            }
                        }
                    }
                }
            }
            self.state.num_input_tokens_seen += step_tokens;
            tokens_since_log += step_tokens;
            // Clip to max_grad_norm by the global norm (torch.nn.utils.clip_grad_norm_).
            let norm = grads
                .values()
                .map(|g| g.par_iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>())
                .sum::<f64>()
                .sqrt();
            if !norm.is_finite() {
                return Err(TrainError::NonFinite(format!(
                    "the gradient norm became {norm} at step {}; training stopped and the last \
                     checkpoint is kept",
                    step + 1
                )));
            }
            if self.args.max_grad_norm > 0.0 {
                let coef = (self.args.max_grad_norm / (norm + 1e-6)).min(1.0) as f32;
                if coef < 1.0 {
                    grads
                        .values_mut()
                        .for_each(|g| g.par_iter_mut().for_each(|x| *x *= coef));
                }
            }
            let lr = lr_at(
                &self.args.lr_scheduler_type,
                self.args.learning_rate,
                step,
                warmup,
                total,
            );
            self.optimizer.step += 1;
            for (name, var) in &names {
                let Some(g) = grads.get(name) else { continue };
                let mut p: Vec<f32> = var
                    .as_tensor()
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1()?;
                self.optimizer.update(name, &mut p, g, lr);
                let t = Tensor::from_vec(p, var.shape(), var.device())?.to_dtype(var.dtype())?;
                var.set(&t)?;
            }
            self.state.global_step += 1;
            self.state.epoch = (self.state.global_step * accum) as f64 / per_epoch;
            self.state.total_flos += 6.0 * n_params as f64 * step_tokens as f64;
            log_loss += step_loss;
            log_n += 1;
            total_loss += step_loss;
            bar.inc(1);
            let gs = self.state.global_step;
            let log_now = (logging_steps > 0 && gs.is_multiple_of(logging_steps))
                || (gs == 1 && self.args.logging_first_step)
                || gs == total;
            if log_now && log_n > 0 {
                let secs = log_timer.elapsed().as_secs_f64();
                let mut e = LogEntry::new();
                e.insert("loss".into(), num(log_loss / log_n as f64));
                e.insert("grad_norm".into(), num(norm));
                e.insert("learning_rate".into(), num(lr));
                e.insert("epoch".into(), num(self.state.epoch));
                e.insert("step".into(), json!(gs));
                e.insert(
                    "tokens_per_second".into(),
                    num(tokens_since_log as f64 / secs.max(1e-9)),
                );
                if self.verbose {
                    let line = format!(
                        "step {gs}/{total}: loss {:.4}, lr {:.3e}, grad_norm {:.3}, epoch {:.2}, {:.0} tokens/s",
                        log_loss / log_n as f64,
                        lr,
                        norm,
                        self.state.epoch,
                        tokens_since_log as f64 / secs.max(1e-9)
                    );
                    bar.suspend(|| eprintln!("{line}"));
                }
                self.state.log_history.push(e);
                log_loss = 0.0;
                log_n = 0;
                tokens_since_log = 0;
                log_timer = Instant::now();
            }
            if eval_steps > 0 && gs.is_multiple_of(eval_steps) && gs != total {
                bar.suspend(|| self.evaluate())?;
            }
            if save_steps > 0 && gs.is_multiple_of(save_steps) {
                self.save_checkpoint()?;
            }
        }
        bar.finish_and_clear();
        self.model.set_training(false);
        if self.args.eval_strategy != "no" {
            self.evaluate()?;
        }
        let secs = start.elapsed().as_secs_f64();
        let steps_done = (self.state.global_step - start_step).max(1);
        let train_loss = total_loss / steps_done as f64;
        let samples = steps_done * accum * self.args.per_device_train_batch_size;
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
        m.insert("total_flos".into(), num(self.state.total_flos));
        m.insert("train_loss".into(), num(train_loss));
        m.insert("epoch".into(), num(self.state.epoch));
        m.insert("step".into(), json!(self.state.global_step));
        self.state.log_history.push(m.clone());
        if self.args.save_strategy != "no"
            && !self.state.global_step.is_multiple_of(save_steps.max(1))
        {
            self.save_checkpoint()?;
        }
        Ok(TrainOutput {
            global_step: self.state.global_step,
            training_loss: train_loss,
            metrics: m,
        })
    }

    /// Files of a checkpoint folder (HF's, with safetensors/JSON for the
    /// PyTorch pickles: optimizer.safetensors + optimizer.json = optimizer.pt,
    /// scheduler.json = scheduler.pt, rng_state.json = rng_state.pth,
    /// training_args.json = training_args.bin).
    fn checkpoint_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut files: Vec<(String, Vec<u8>)> = self
            .model
            .pretrained_files()?
            .into_iter()
            .map(|(n, b)| (n.to_string(), b))
            .collect();
        let gen = crate::generate::GenerationConfig::from_model_config(&self.model.config);
        files.push((
            "generation_config.json".into(),
            gen.to_json_string().into_bytes(),
        ));
        // Optimizer moments by parameter name.
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (name, var) in self.model.named_parameters() {
            if let (Some(m), Some(v)) = (
                self.optimizer.exp_avg.get(&name),
                self.optimizer.exp_avg_sq.get(&name),
            ) {
                tensors.push((
                    format!("{name}.exp_avg"),
                    Tensor::from_slice(m, var.shape(), &Device::Cpu)?,
                ));
                tensors.push((
                    format!("{name}.exp_avg_sq"),
                    Tensor::from_slice(v, var.shape(), &Device::Cpu)?,
                ));
            }
        }
        let opt = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
            .map_err(|e| TrainError::Io {
                path: "optimizer.safetensors".into(),
                msg: e.to_string(),
            })?;
        files.push(("optimizer.safetensors".into(), opt));
        let o = &self.optimizer;
        files.push((
            "optimizer.json".into(),
            crate::pyjson::dumps(&json!({"type": "AdamW", "step": o.step, "lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay})).into_bytes(),
        ));
        let total = self.state.max_steps;
        let sched = SchedulerState {
            kind: self.args.lr_scheduler_type.clone(),
            base_lr: self.args.learning_rate,
            warmup_steps: self.args.num_warmup_steps(total),
            total_steps: total,
            last_epoch: self.state.global_step,
        };
        files.push((
            "scheduler.json".into(),
            serde_json::to_vec_pretty(&sched).expect("json"),
        ));
        files.push((
            "rng_state.json".into(),
            crate::pyjson::dumps(&json!({"seed": self.args.seed, "global_step": self.state.global_step,
                "note": "data order and dropout are functions of (seed, step), so this is all the RNG state"}))
            .into_bytes(),
        ));
        files.push((
            "trainer_state.json".into(),
            self.state.to_json_string().into_bytes(),
        ));
        files.push((
            "training_args.json".into(),
            crate::pyjson::dumps(&serde_json::to_value(&self.args).expect("json")).into_bytes(),
        ));
        if let Some(tok) = &self.tokenizer {
            let tf = tok
                .pretrained_files()
                .map_err(|e| TrainError::Args(e.to_string()))?;
            files.extend(tf.into_iter().map(|(n, b)| (n.to_string(), b)));
        }
        Ok(files)
    }

    /// Write `output_dir/checkpoint-N/`: into a temporary folder first, renamed
    /// into place only when complete, so a crash never leaves a partial
    /// checkpoint; then apply `save_total_limit`.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let out = PathBuf::from(&self.args.output_dir);
        std::fs::create_dir_all(&out).map_err(io_err(&out))?;
        let name = format!("checkpoint-{}", self.state.global_step);
        let dest = out.join(&name);
        let files = self.checkpoint_files()?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .tempdir_in(&out)
            .map_err(io_err(&out))?;
        for (i, (f, bytes)) in files.iter().enumerate() {
            if self.faults.fail_checkpoint_at_step == Some(self.state.global_step)
                && i == files.len() / 2
            {
                return Err(TrainError::Io {
                    path: tmp.path().join(f).display().to_string(),
                    msg: "injected failure while writing the checkpoint".into(),
                });
            }
            std::fs::write(tmp.path().join(f), bytes).map_err(io_err(&tmp.path().join(f)))?;
        }
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
        }
        let tmp_path = tmp.keep();
        std::fs::rename(&tmp_path, &dest).map_err(io_err(&dest))?;
        if let Some(limit) = self.args.save_total_limit {
            let mut ckpts = list_checkpoints(&out);
            while ckpts.len() > limit.max(1) {
                let (_, p) = ckpts.remove(0);
                std::fs::remove_dir_all(&p).map_err(io_err(&p))?;
            }
        }
        Ok(dest)
    }

    /// Restore model, optimizer, scheduler position and trainer state.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let device = self.model.device().clone();
        let model = GPT2LMHeadModel::from_pretrained(
            dir.to_str()
                .ok_or_else(|| TrainError::Args("checkpoint path is not UTF-8".into()))?,
            self.model.dtype(),
            &device,
        )?;
        self.model = model;
        let st = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&st).map_err(io_err(&st))?;
        self.state = serde_json::from_str(&text).map_err(|e| TrainError::Io {
            path: st.display().to_string(),
            msg: e.to_string(),
        })?;
        let oj = dir.join("optimizer.json");
        let o: Value = serde_json::from_str(&std::fs::read_to_string(&oj).map_err(io_err(&oj))?)
            .map_err(|e| TrainError::Io {
                path: oj.display().to_string(),
                msg: e.to_string(),
            })?;
        self.optimizer.step = o["step"].as_u64().unwrap_or(0);
        let of = dir.join("optimizer.safetensors");
        let t = candle_core::safetensors::load(&of, &Device::Cpu).map_err(|e| TrainError::Io {
            path: of.display().to_string(),
            msg: e.to_string(),
        })?;
        self.optimizer.exp_avg.clear();
        self.optimizer.exp_avg_sq.clear();
        for (k, v) in t {
            let data: Vec<f32> = v.flatten_all()?.to_vec1()?;
            if let Some(n) = k.strip_suffix(".exp_avg_sq") {
                self.optimizer.exp_avg_sq.insert(n.to_string(), data);
            } else if let Some(n) = k.strip_suffix(".exp_avg") {
                self.optimizer.exp_avg.insert(n.to_string(), data);
            }
        }
        Ok(())
    }

    /// `trainer.save_model(dir)`: a model folder Python `transformers` loads
    /// (config, weights, generation config, tokenizer).
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        self.model.save_pretrained(dir)?;
        let mut gen = crate::generate::GenerationConfig::from_model_config(&self.model.config);
        if gen.pad_token_id.is_none() {
            gen.pad_token_id = self.tokenizer.as_ref().and_then(|t| t.pad_token_id());
        }
        gen.save_pretrained(dir).map_err(io_err(dir))?;
        if let Some(tok) = &self.tokenizer {
            tok.save_pretrained(dir)
                .map_err(|e| TrainError::Args(e.to_string()))?;
        }
        Ok(())
    }
}

/// `checkpoint-N` folders of `dir`, oldest first.
pub fn list_checkpoints(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().is_dir().then(|| (n, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// The newest complete checkpoint (`get_last_checkpoint`).
pub fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    list_checkpoints(dir).pop().map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_set_fields_by_hf_name() {
        let mut a = TrainingArguments::default();
        a.set("--max-steps", Some("10")).unwrap();
        a.set("--learning-rate", Some("3e-3")).unwrap();
        a.set("--lr-scheduler-type", Some("cosine")).unwrap();
        a.set("--logging-first-step", None).unwrap();
        a.set("--evaluation-strategy", Some("steps")).unwrap();
        assert_eq!((a.max_steps, a.learning_rate), (10, 3e-3));
        assert_eq!(a.lr_scheduler_type, "cosine");
        assert!(a.logging_first_step);
        assert_eq!(a.eval_strategy, "steps");
        assert!(a.set("--no-such-field", Some("1")).is_err());
        let mut b = a.clone();
        b.lr_scheduler_type = "exotic".into();
        assert!(b
            .validate()
            .unwrap_err()
            .to_string()
            .contains("lr_scheduler_type"));
        b = a.clone();
        b.optim = "sgd".into();
        assert!(b.validate().unwrap_err().to_string().contains("optim"));
        b = a;
        b.per_device_train_batch_size = 0;
        assert!(b.validate().is_err());
    }

    #[test]
    fn warmup_ratio_and_steps() {
        let mut a = TrainingArguments {
            warmup_ratio: 0.1,
            ..Default::default()
        };
        assert_eq!(a.num_warmup_steps(95), 10);
        a.warmup_steps = 0.05;
        assert_eq!(a.num_warmup_steps(100), 5);
        a.warmup_steps = 7.0;
        assert_eq!(a.num_warmup_steps(100), 7);
    }

    #[test]
    fn no_decay_groups() {
        assert!(decays("transformer.h.0.attn.c_attn.weight"));
        assert!(decays("transformer.wte.weight"));
        assert!(!decays("transformer.h.0.attn.c_attn.bias"));
        assert!(!decays("transformer.h.3.ln_1.weight"));
        assert!(!decays("transformer.ln_f.weight"));
    }
}
