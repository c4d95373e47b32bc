//! 4.3.4's training: `TrainingArguments` (HF's names and defaults), AdamW as
//! `adamw_torch` with HF Trainer's parameter groups, the LR schedules,
//! and `Trainer` with gradient accumulation, clipping, logging into
//! `trainer_state.json`, evaluation, atomic `checkpoint-N/` folders,
//! `save_total_limit`, `resume_from_checkpoint` and `save_model`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::data::{Batch, DataCollatorForLanguageModeling, DataLoader, Dataset};
use crate::model::{causal_lm_loss_sum, GPT2LMHeadModel};
use crate::optim::AdamWParams;
use crate::tokenizer::AutoTokenizer;
use crate::zero::comm::{Communicator, SingleRank};
use crate::zero::ds_config::{DeepSpeedConfig, Fp16Config, OffloadDevice};
use crate::zero::precision::LossScaler;
use crate::zero::{ModelStateBytes, ZeroEngine};

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
    /// The values HF's DeepSpeed integration fills a ds_config's `"auto"` from.
    pub fn deepspeed_values(&self) -> crate::zero::HfTrainingValues {
        crate::zero::HfTrainingValues {
            per_device_train_batch_size: self.per_device_train_batch_size,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            learning_rate: self.learning_rate,
            max_grad_norm: self.max_grad_norm,
            adam_beta1: self.adam_beta1,
            adam_beta2: self.adam_beta2,
            adam_epsilon: self.adam_epsilon,
            weight_decay: self.weight_decay,
            fp16: self.fp16,
            bf16: self.bf16,
        }
    }

    pub fn unused_fields(&self) -> Vec<String> {
        let v: Vec<String> = self.extra.keys().cloned().collect();
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
    /// Make the gradients of this (1-based) step overflow, as fp16 can.
    pub overflow_at_step: Option<usize>,
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
    /// `args.deepspeed`, parsed and resolved ("auto" filled).
    pub deepspeed: Option<DeepSpeedConfig>,
    /// The optimizer and its ZeRO partitioning (stage 0 on one rank without
    /// DeepSpeed: plain AdamW).
    pub engine: ZeroEngine,
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

impl EvalMetrics {
    /// From a loss summed over `count` label tokens of a dataset with
    /// `bytes_per_token` bytes of text per token.
    pub fn from_sum(sum: f64, count: usize, bytes_per_token: f64) -> Self {
        let loss = sum / count.max(1) as f64;
        EvalMetrics {
            eval_loss: loss,
            perplexity: loss.exp(),
            bits_per_byte: loss / std::f64::consts::LN_2 / bytes_per_token,
            tokens: count,
        }
    }
}

/// Held-out loss of `model` on `ds` in one process, batches of `batch_size`
/// (what `companion eval` runs; the Trainer's own evaluation also handles
/// ranks and ZeRO-3).
pub fn evaluate_model(
    model: &GPT2LMHeadModel,
    ds: &Dataset,
    collator: &DataCollatorForLanguageModeling,
    batch_size: usize,
) -> Result<EvalMetrics> {
    if batch_size == 0 {
        return Err(TrainError::Args(
            "the evaluation batch size must be at least 1".into(),
        ));
    }
    let model = model.for_inference();
    let dev = model.device().clone();
    let (mut sum, mut count) = (0f64, 0usize);
    for rows in ds.input_ids.chunks(batch_size) {
        let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let b = collator.collate(&refs)?;
        let (s, n) = batch_loss_sum(&b, &dev, |ids, mask| Ok(model.forward(ids, mask, None)?))?;
        sum += s;
        count += n;
    }
    Ok(EvalMetrics::from_sum(sum, count, ds.bytes_per_token()))
}

/// The summed loss and label-token count of one collated batch, with the
/// logits `forward` gives for its input ids and attention mask (none when
/// nothing is padded).
fn batch_loss_sum(
    b: &Batch,
    dev: &Device,
    forward: impl FnOnce(&Tensor, Option<&[Vec<u32>]>) -> Result<Tensor>,
) -> Result<(f64, usize)> {
    let ids = Tensor::new(b.input_ids.clone(), dev)?;
    let labels = Tensor::new(b.labels.clone(), dev)?;
    let mask = (!b.is_unpadded()).then_some(b.attention_mask.as_slice());
    let logits = forward(&ids, mask)?;
    let (s, n) = causal_lm_loss_sum(&logits, &labels)?;
    Ok((s.to_scalar::<f32>()? as f64, n))
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
        Self::new_distributed(
            model,
            args,
            collator,
            train_dataset,
            eval_dataset,
            tokenizer,
            Arc::new(SingleRank),
        )
    }

    /// The Trainer of one rank of `comm`'s group: every rank builds one with
    /// the same arguments and calls `train()`; rank 0 logs and writes the
    /// shared files. `args.deepspeed` picks the ZeRO stage and offload.
    pub fn new_distributed(
        mut model: GPT2LMHeadModel,
        args: TrainingArguments,
        collator: DataCollatorForLanguageModeling,
        train_dataset: Dataset,
        eval_dataset: Option<Dataset>,
        tokenizer: Option<AutoTokenizer>,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        args.validate()?;
        let world = comm.world_size();
        let deepspeed = DeepSpeedConfig::from_args(
            args.deepspeed.as_ref(),
            &args.deepspeed_values(),
            world,
            model.config.n_embd,
        )
        .map_err(|e| TrainError::Args(e.to_string()))?;
        if world > 1 && deepspeed.is_none() {
            return Err(TrainError::Args(format!(
                "{world} ranks need a DeepSpeed config (TrainingArguments.deepspeed / --deepspeed ds_config.json)"
            )));
        }
        // Mixed precision: the ds_config's fp16/bf16 blocks (after "auto"),
        // else TrainingArguments.fp16/bf16.
        let (half, fp16) = match &deepspeed {
            Some(d) => (d.bf16 || d.fp16.enabled, d.fp16.enabled),
            None => (args.bf16 || args.fp16, args.fp16),
        };
        if args.bf16 && args.fp16 {
            return Err(TrainError::Args(
                "bf16 and fp16 are both set; choose one".into(),
            ));
        }
        let dtype = match (half, fp16) {
            (false, _) => DType::F32,
            (true, true) => DType::F16,
            (true, false) => DType::BF16,
        };
        let scaler = fp16.then(|| {
            let c = match &deepspeed {
                Some(d) => d.fp16.clone(),
                // Without DeepSpeed: torch.amp.GradScaler's defaults (2^16,
                // doubling every 2000 clean steps, halving on each overflow).
                None => Fp16Config {
                    enabled: true,
                    loss_scale: 0.0,
                    initial_scale_power: 16,
                    loss_scale_window: 2000,
                    hysteresis: 1,
                    consecutive_hysteresis: false,
                    min_loss_scale: 0.0,
                },
            };
            LossScaler::from_config(&c)
        });
        let adam = match deepspeed.as_ref().and_then(|d| d.optimizer.clone()) {
            Some(o) => AdamWParams {
                beta1: o.betas.0,
                beta2: o.betas.1,
                eps: o.eps,
                weight_decay: o.weight_decay,
            },
            None => AdamWParams {
                beta1: args.adam_beta1,
                beta2: args.adam_beta2,
                eps: args.adam_epsilon,
                weight_decay: args.weight_decay,
            },
        };
        let (stage, off_opt, off_par) = match &deepspeed {
            Some(d) => (
                d.zero.stage,
                d.zero.offload_optimizer == OffloadDevice::Cpu,
                d.zero.offload_param == OffloadDevice::Cpu,
            ),
            None => (0, true, false),
        };
        let mut engine = ZeroEngine::new(&model, stage, off_opt, off_par, adam, comm)?
            .with_precision(&model, dtype, scaler)?;
        engine.gradient_checkpointing = args.gradient_checkpointing;
        if dtype != DType::F32 {
            // The half-precision copy forward and backward run on.
            model = model.to_dtype(dtype)?;
        }
        if stage == 3 {
            // The rank now holds only its partition (inside the engine).
            model = model.partitioned();
        }
        let rank0 = engine.rank() == 0;
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
                is_local_process_zero: rank0,
                is_world_process_zero: rank0,
                is_hyper_param_search: false,
                trial_name: None,
                trial_params: None,
                stateful_callbacks: json!({}),
            },
            deepspeed,
            engine,
            args,
            faults: FaultInjection::default(),
            verbose: true,
            shuffle: true,
        })
    }

    /// Rank 0 of the group (it logs and writes shared files).
    pub fn is_world_process_zero(&self) -> bool {
        self.engine.rank() == 0
    }

    /// Every rank's model-state bytes, measured (a collective: all ranks call it).
    pub fn memory_report(&self) -> Result<Vec<ModelStateBytes>> {
        let m = self.engine.memory(&self.model);
        let row = [
            m.params as f64,
            m.grads as f64,
            m.optimizer_states as f64,
            m.offloaded_to_host as f64,
            m.peak_gathered_params as f64,
        ];
        let mut out = Vec::new();
        for r in 0..self.engine.world_size() {
            let mut v = [0f64; 5];
            for (k, x) in row.iter().enumerate() {
                v[k] = self
                    .engine
                    .comm
                    .all_reduce_f64(if r == m.rank { *x } else { 0.0 })?;
            }
            out.push(ModelStateBytes {
                rank: r,
                stage: m.stage,
                world_size: m.world_size,
                params: v[0] as usize,
                grads: v[1] as usize,
                optimizer_states: v[2] as usize,
                offloaded_to_host: v[3] as usize,
                peak_gathered_params: v[4] as usize,
            });
        }
        Ok(out)
    }

    /// The whole model with its current weights (a collective under ZeRO-3,
    /// which gathers them from every rank).
    pub fn full_model(&self) -> Result<GPT2LMHeadModel> {
        let t = self.engine.full_state_dict(&self.model)?;
        Ok(GPT2LMHeadModel::from_tensors(
            self.model.config.clone(),
            t,
            DType::F32,
            self.model.device(),
            "(ZeRO-3 partitions)",
        )?)
    }

    fn loader(&self) -> Result<DataLoader> {
        let mut l = DataLoader::new(
            self.train_dataset.len(),
            self.args.per_device_train_batch_size,
            self.shuffle,
            self.args.seed,
        )?;
        l.drop_last = self.args.dataloader_drop_last;
        l.rank = self.engine.rank();
        l.world_size = self.engine.world_size();
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
        // Batches are dealt to ranks in turn; every rank makes the same
        // number of passes (ZeRO-3 gathers weights in each).
        let (rank, world) = (self.engine.rank(), self.engine.world_size());
        let n_batches = ds.len().div_ceil(bs);
        let (mut sum, mut count) = (0f64, 0usize);
        for i in (0..n_batches.div_ceil(world)).map(|j| j * world + rank) {
            if i >= n_batches {
                self.engine.skip_forward()?;
                continue;
            }
            let start = i * bs;
            let idx: Vec<usize> = (start..(start + bs).min(ds.len())).collect();
            let b = self.batch_of(ds, &idx)?;
            let dev = self.model.device().clone();
            let (engine, model) = (&mut self.engine, &self.model);
            let (s, n) =
                batch_loss_sum(&b, &dev, |ids, mask| Ok(engine.forward(model, ids, mask)?))?;
            sum += s;
            count += n;
        }
        let comm = self.engine.comm.clone();
        let reduce = |x: f64| -> Result<f64> { Ok(comm.all_reduce_f64(x)?) };
        let sum = reduce(sum)?;
        let count = reduce(count as f64)? as usize;
        self.model.set_training(was);
        Ok(EvalMetrics::from_sum(sum, count, ds.bytes_per_token()))
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
        if self.verbose && self.is_world_process_zero() {
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
            if self.verbose && self.is_world_process_zero() {
                eprintln!(
                    "resumed from {} at step {}",
                    ckpt.display(),
                    self.state.global_step
                );
            }
        }
        let per_epoch = loader.batches_per_epoch() as f64;
        let n_params = self.engine.layout.numel;
        let verbose = self.verbose && self.is_world_process_zero();
        let bar = if verbose && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
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
        let world = self.engine.world_size();
        let rank = self.engine.rank();
        let base_lr = self
            .deepspeed
            .as_ref()
            .and_then(|d| d.optimizer.as_ref())
            .map_or(self.args.learning_rate, |o| o.lr);
        let clip = self
            .deepspeed
            .as_ref()
            .map_or(self.args.max_grad_norm, |d| d.gradient_clipping);
        if let Some(ds) = self.deepspeed.as_mut() {
            ds.finalize(warmup, total);
        }
        let memory = self.memory_report()?;
        if verbose {
            if let Some(ds) = &self.deepspeed {
                for w in &ds.warnings {
                    eprintln!("deepspeed: {w}");
                }
                for m in &memory {
                    eprintln!(
                        "[rank {}] ZeRO-{} model states: params {}, grads {}, optimizer {} ({} offloaded to host)",
                        m.rank,
                        m.stage,
                        human_bytes(m.params),
                        human_bytes(m.grads),
                        human_bytes(m.optimizer_states),
                        human_bytes(m.offloaded_to_host)
                    );
                }
            }
        }
        let comm = self.engine.comm.clone();
        let sum_ranks = |x: f64| -> Result<f64> { Ok(comm.all_reduce_f64(x)?) };
        while self.state.global_step < total {
            let step = self.state.global_step;
            // This rank's micro-batches of this update and the label-token
            // count of the whole global batch: every rank's loss is divided
            // by it, so the summed gradients equal one rank's on all of it.
            let batches: Vec<Option<Batch>> = (0..accum)
                .map(|k| {
                    let idx = loader.batch(step * accum + k);
                    if idx.is_empty() {
                        Ok(None)
                    } else {
                        self.batch_of(&self.train_dataset, &idx).map(Some)
                    }
                })
                .collect::<Result<_>>()?;
            let local_items: usize = batches.iter().flatten().map(Batch::num_label_tokens).sum();
            let n_items = sum_ranks(local_items as f64)?.max(1.0);
            let local_tokens: usize = batches
                .iter()
                .flatten()
                .map(|b| b.input_ids.iter().map(Vec::len).sum::<usize>())
                .sum();
            let step_tokens = sum_ranks(local_tokens as f64)? as usize;
            let mut local_loss = 0f64;
            for (k, b) in batches.iter().enumerate() {
                let Some(b) = b else {
                    self.engine.skip_micro_step(&self.model)?;
                    continue;
                };
                // Dropout is seeded by the micro-batch's place in the global
                // order, so N ranks draw what one rank would.
                let global_micro = ((step * accum + k) * world + rank) as u64;
                self.model
                    .seed_dropout(self.args.seed ^ global_micro.wrapping_mul(0x9E3779B97F4A7C15));
                let (ids, labels) = self.tensors(b)?;
                let mask = (!b.is_unpadded()).then_some(b.attention_mask.as_slice());
                let lv = self
                    .engine
                    .micro_step(&self.model, &ids, &labels, mask, n_items)?;
                if !lv.is_finite() {
                    return Err(TrainError::NonFinite(format!(
                        "the loss became {lv} at step {}; training stopped and the last checkpoint \
                         is kept (lower the learning_rate or check the data)",
                        step + 1
                    )));
                }
                local_loss += lv;
            }
            let step_loss = sum_ranks(local_loss)?;
            self.state.num_input_tokens_seen += step_tokens;
            tokens_since_log += step_tokens;
            // Skipped (fp16 overflow) steps do not advance the schedule,
            // as DeepSpeed does not step its scheduler then.
            let sched_step = step - self.engine.skipped_steps;
            let lr = match self.deepspeed.as_ref().and_then(|d| d.scheduler.as_ref()) {
                Some(s) => s.lr_at(sched_step, base_lr),
                None => lr_at(
                    &self.args.lr_scheduler_type,
                    base_lr,
                    sched_step,
                    warmup,
                    total,
                ),
            };
            if self.faults.overflow_at_step == Some(step + 1) {
                self.engine.poison_gradients();
            }
            let loss_scale = self.engine.loss_scaler.as_ref().map(|s| s.cur_scale);
            // Reduce, clip to the global norm (clip_grad_norm_), AdamW.
            let norm = self.engine.step(&self.model, lr, clip)?;
            if self.engine.last_step_skipped {
                if let (true, Some(m)) = (verbose, &self.engine.last_overflow_message) {
                    bar.suspend(|| eprintln!("{m}"));
                }
            } else if !norm.is_finite() {
                return Err(TrainError::NonFinite(format!(
                    "the gradient norm became {norm} at step {}; training stopped and the last \
                     checkpoint is kept",
                    step + 1
                )));
            }
            self.state.global_step += 1;
            self.state.epoch = (self.state.global_step * accum) as f64 / per_epoch;
            if let Some(ds) = &self.deepspeed {
                if verbose && self.state.global_step.is_multiple_of(ds.steps_per_print) {
                    let a = self.engine.adam;
                    bar.suspend(|| {
                        eprintln!(
                            "[Rank 0] step={}, skipped={}, lr=[{lr}], mom=[({}, {})]",
                            self.state.global_step, self.engine.skipped_steps, a.beta1, a.beta2
                        )
                    });
                }
            }
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
                if let Some(sc) = loss_scale {
                    // fp16: the scale this step used (DeepSpeed logs it).
                    e.insert("loss_scale".into(), num(sc));
                }
                e.insert("learning_rate".into(), num(lr));
                e.insert("epoch".into(), num(self.state.epoch));
                e.insert("step".into(), json!(gs));
                e.insert(
                    "tokens_per_second".into(),
                    num(tokens_since_log as f64 / secs.max(1e-9)),
                );
                if verbose {
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
    /// training_args.json = training_args.bin). Under DeepSpeed the Adam
    /// moments are in each rank's shard instead (see `save_checkpoint`).
    fn checkpoint_files(&self, model: &GPT2LMHeadModel) -> Result<Vec<(String, Vec<u8>)>> {
        let mut files: Vec<(String, Vec<u8>)> = model
            .pretrained_files()?
            .into_iter()
            .map(|(n, b)| (n.to_string(), b))
            .collect();
        let gen = crate::generate::GenerationConfig::from_model_config(&model.config);
        files.push((
            "generation_config.json".into(),
            gen.to_json_string().into_bytes(),
        ));
        if self.deepspeed.is_none() {
            // Optimizer moments by parameter name.
            let mut tensors: Vec<(String, Tensor)> = Vec::new();
            for (name, m, v) in self.engine.moments_by_name()? {
                let shape = model
                    .named_parameters()
                    .into_iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.shape().clone());
                let shape =
                    shape.ok_or_else(|| TrainError::Args(format!("no parameter {name}")))?;
                tensors.push((
                    format!("{name}.exp_avg"),
                    Tensor::from_vec(m, shape.clone(), &Device::Cpu)?,
                ));
                tensors.push((
                    format!("{name}.exp_avg_sq"),
                    Tensor::from_vec(v, shape, &Device::Cpu)?,
                ));
            }
            let opt = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
                .map_err(|e| TrainError::Io {
                    path: "optimizer.safetensors".into(),
                    msg: e.to_string(),
                })?;
            files.push(("optimizer.safetensors".into(), opt));
        } else {
            files.push((
                "latest".into(),
                format!("global_step{}", self.state.global_step).into_bytes(),
            ));
        }
        let a = self.engine.adam;
        let lr = self
            .deepspeed
            .as_ref()
            .and_then(|d| d.optimizer.as_ref())
            .map_or(self.args.learning_rate, |o| o.lr);
        files.push((
            "optimizer.json".into(),
            crate::hf_json::dumps(&json!({"type": "AdamW", "step": self.engine.step, "lr": lr,
                "betas": [a.beta1, a.beta2], "eps": a.eps, "weight_decay": a.weight_decay,
                "zero_stage": self.engine.stage, "world_size": self.engine.world_size(),
                "skipped_steps": self.engine.skipped_steps}))
            .into_bytes(),
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
            crate::hf_json::dumps(&json!({"seed": self.args.seed, "global_step": self.state.global_step,
                "note": "data order and dropout are functions of (seed, step), so this is all the RNG state"}))
            .into_bytes(),
        ));
        files.push((
            "trainer_state.json".into(),
            self.state.to_json_string().into_bytes(),
        ));
        files.push((
            "training_args.json".into(),
            crate::hf_json::dumps(&serde_json::to_value(&self.args).expect("json")).into_bytes(),
        ));
        if let Some(tok) = &self.tokenizer {
            let tf = tok
                .pretrained_files()
                .map_err(|e| TrainError::Args(e.to_string()))?;
            files.extend(tf.into_iter().map(|(n, b)| (n.to_string(), b)));
        }
        Ok(files)
    }

    fn barrier(&self) -> Result<()> {
        Ok(self.engine.comm.barrier()?)
    }

    /// Write `output_dir/checkpoint-N/` (every rank calls it): into a
    /// temporary folder first, renamed into place only when complete, so a
    /// crash never leaves a partial checkpoint; then apply `save_total_limit`.
    /// Under DeepSpeed each rank adds its shard as
    /// `global_stepN/zero_pp_rank_R_mp_rank_00_optim_states.safetensors`
    /// (DeepSpeed's names) and `model.safetensors` holds the consolidated
    /// weights, so the folder also loads as a plain HF model.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let out = PathBuf::from(&self.args.output_dir);
        let name = format!("checkpoint-{}", self.state.global_step);
        let dest = out.join(&name);
        let tmp = out.join(format!(".{name}.partial"));
        let rank0 = self.is_world_process_zero();
        let full = if self.engine.stage == 3 || self.engine.mixed_precision() {
            Some(self.full_model()?)
        } else {
            None
        };
        let shard_dir = tmp.join(format!("global_step{}", self.state.global_step));
        if rank0 {
            std::fs::create_dir_all(&out).map_err(io_err(&out))?;
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
            }
            let d = if self.deepspeed.is_some() {
                &shard_dir
            } else {
                &tmp
            };
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        self.barrier()?;
        let written = (|| -> Result<()> {
            if self.deepspeed.is_some() {
                let f = shard_dir.join(format!(
                    "zero_pp_rank_{}_mp_rank_00_optim_states.safetensors",
                    self.engine.rank()
                ));
                let shard = self.engine.shard()?;
                let meta: HashMap<String, String> = [
                    ("zero_stage".to_string(), self.engine.stage.to_string()),
                    (
                        "world_size".to_string(),
                        self.engine.world_size().to_string(),
                    ),
                    ("rank".to_string(), self.engine.rank().to_string()),
                    ("step".to_string(), self.engine.step.to_string()),
                ]
                .into();
                let bytes =
                    safetensors::serialize(shard.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
                        .map_err(|e| TrainError::Io {
                            path: f.display().to_string(),
                            msg: e.to_string(),
                        })?;
                std::fs::write(&f, bytes).map_err(io_err(&f))?;
            }
            Ok(())
        })();
        if let Err(e) = written {
            self.engine.comm.abort(&e.to_string());
            return Err(e);
        }
        self.barrier()?;
        if rank0 {
            let result = (|| -> Result<()> {
                let model = full.as_ref().unwrap_or(&self.model);
                let files = self.checkpoint_files(model)?;
                for (i, (f, bytes)) in files.iter().enumerate() {
                    if self.faults.fail_checkpoint_at_step == Some(self.state.global_step)
                        && i == files.len() / 2
                    {
                        return Err(TrainError::Io {
                            path: tmp.join(f).display().to_string(),
                            msg: "injected failure while writing the checkpoint".into(),
                        });
                    }
                    std::fs::write(tmp.join(f), bytes).map_err(io_err(&tmp.join(f)))?;
                }
                if dest.exists() {
                    std::fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
                }
                std::fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
                if let Some(limit) = self.args.save_total_limit {
                    let mut ckpts = list_checkpoints(&out);
                    while ckpts.len() > limit.max(1) {
                        let (_, p) = ckpts.remove(0);
                        std::fs::remove_dir_all(&p).map_err(io_err(&p))?;
                    }
                }
                Ok(())
            })();
            if let Err(e) = result {
                let _ = std::fs::remove_dir_all(&tmp);
                self.engine.comm.abort(&e.to_string());
                return Err(e);
            }
        }
        self.barrier()?;
        Ok(dest)
    }

    /// Restore model, optimizer, scheduler position and trainer state (every
    /// rank calls it; a DeepSpeed checkpoint needs the world size and ZeRO
    /// stage that wrote it).
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let device = self.model.device().clone();
        let model = GPT2LMHeadModel::from_pretrained(
            dir.to_str()
                .ok_or_else(|| TrainError::Args("checkpoint path is not UTF-8".into()))?,
            DType::F32,
            &device,
        )?;
        let st = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&st).map_err(io_err(&st))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::Io {
            path: st.display().to_string(),
            msg: e.to_string(),
        })?;
        let oj = dir.join("optimizer.json");
        let o: Value = serde_json::from_str(&std::fs::read_to_string(&oj).map_err(io_err(&oj))?)
            .map_err(|e| TrainError::Io {
                path: oj.display().to_string(),
                msg: e.to_string(),
            })?;
        let (stage, world) = (self.engine.stage as u64, self.engine.world_size() as u64);
        let saved_stage = o["zero_stage"].as_u64().unwrap_or(0);
        let saved_world = o["world_size"].as_u64().unwrap_or(1);
        if self.deepspeed.is_some() && (saved_stage != stage || saved_world != world) {
            return Err(TrainError::Io {
                path: oj.display().to_string(),
                msg: format!(
                    "written by ZeRO stage {saved_stage} on {saved_world} ranks; this run is stage {stage} on {world} ranks (resume with the same stage and world size)"
                ),
            });
        }
        if self.deepspeed.is_some() {
            let latest = dir.join("latest");
            let tag = std::fs::read_to_string(&latest).map_err(io_err(&latest))?;
            let f = dir.join(tag.trim()).join(format!(
                "zero_pp_rank_{}_mp_rank_00_optim_states.safetensors",
                self.engine.rank()
            ));
            let t =
                candle_core::safetensors::load(&f, &Device::Cpu).map_err(|e| TrainError::Io {
                    path: f.display().to_string(),
                    msg: e.to_string(),
                })?;
            self.engine.load_shard(&t, &f.display().to_string())?;
        } else {
            let of = dir.join("optimizer.safetensors");
            let t =
                candle_core::safetensors::load(&of, &Device::Cpu).map_err(|e| TrainError::Io {
                    path: of.display().to_string(),
                    msg: e.to_string(),
                })?;
            let mut named: HashMap<String, (Vec<f32>, Vec<f32>)> = HashMap::new();
            for (k, v) in t {
                let data: Vec<f32> = v.flatten_all()?.to_vec1()?;
                if let Some(n) = k.strip_suffix(".exp_avg_sq") {
                    named.entry(n.to_string()).or_default().1 = data;
                } else if let Some(n) = k.strip_suffix(".exp_avg") {
                    named.entry(n.to_string()).or_default().0 = data;
                }
            }
            self.engine.set_moments_by_name(&named)?;
        }
        self.engine.step = o["step"].as_u64().unwrap_or(0);
        self.engine.skipped_steps = o["skipped_steps"].as_u64().unwrap_or(0) as usize;
        self.engine.load_full_params(&model)?;
        let model = if self.engine.mixed_precision() {
            model.to_dtype(self.engine.compute_dtype)?
        } else {
            model
        };
        if self.engine.stage == 3 {
            self.model = model.partitioned();
        } else {
            self.model = model;
        }
        self.state = state;
        let rank0 = self.is_world_process_zero();
        self.state.is_local_process_zero = rank0;
        self.state.is_world_process_zero = rank0;
        Ok(())
    }

    /// `trainer.save_model(dir)`: a model folder Python `transformers` loads
    /// (config, weights, generation config, tokenizer). Every rank calls it;
    /// rank 0 writes (under ZeRO-3 after gathering the weights).
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        let full = if self.engine.stage == 3 || self.engine.mixed_precision() {
            Some(self.full_model()?)
        } else {
            None
        };
        if !self.is_world_process_zero() {
            return Ok(());
        }
        let model = full.as_ref().unwrap_or(&self.model);
        model.save_pretrained(dir)?;
        let mut gen = crate::generate::GenerationConfig::from_model_config(&model.config);
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

fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
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
