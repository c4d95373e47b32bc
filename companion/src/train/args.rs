//! `transformers.TrainingArguments`: HF's field names and defaults, as
//! serde fields (`training_args.json`, checkpoints) and as command-line flags
//! (clap, in kebab case), layered the way `HfArgumentParser` layers them:
//! defaults, then a JSON file of fields, then the flags given.

use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{io_err, Result, TrainError};
pub use crate::optim::SchedulerType;

/// When to log, evaluate or save (`IntervalStrategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum IntervalStrategy {
    No,
    Steps,
    /// Accepted for compatibility; runs here log, evaluate and save by steps
    /// only, so an epoch strategy acts like `no`.
    Epoch,
}

/// The optimiser (`optim`): the names transformers gives torch's AdamW,
/// which all compute the same update here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum OptimizerName {
    AdamwTorch,
    AdamwTorchFused,
    AdamwHf,
    Adamw,
}

/// `--deepspeed ds_config.json`: the path, as HF keeps it (a dict in Python
/// or in `--args` JSON works too).
fn ds_config_path(s: &str) -> std::result::Result<Value, String> {
    Ok(Value::String(s.to_string()))
}

/// `transformers.TrainingArguments`: HF's field names and defaults. Fields
/// of transformers' TrainingArguments that this Trainer does not act on are
/// accepted in JSON, kept in `extra` and listed by
/// [`TrainingArguments::unused_fields`]; any other key is refused, as
/// `HfArgumentParser` refuses it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(default)]
#[command(
    next_help_heading = "TrainingArguments (transformers' names; --args FILE.json sets any of them, flags win)"
)]
pub struct TrainingArguments {
    /// Where checkpoints, trainer_state.json and the loss plot go.
    #[arg(long, value_name = "DIR", default_value = "trainer_output")]
    pub output_dir: String,
    /// transformers 4.x; accepted and not needed (checkpoint folders never clash).
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub overwrite_output_dir: bool,
    /// Epochs to train when max_steps is not positive.
    #[arg(long, default_value_t = 3.0)]
    pub num_train_epochs: f64,
    /// Optimizer steps to train; when positive it overrides num_train_epochs.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub max_steps: i64,
    /// Examples per rank per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub per_device_train_batch_size: usize,
    /// Examples per rank per evaluation batch.
    #[arg(long, default_value_t = 8)]
    pub per_device_eval_batch_size: usize,
    /// Micro-batches summed into one optimizer step.
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// AdamW's peak learning rate.
    #[arg(long, default_value_t = 5e-5)]
    pub learning_rate: f64,
    /// AdamW's decoupled weight decay (not on biases and LayerNorm weights).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// The learning-rate schedule after warmup.
    #[arg(long, value_enum, default_value_t = SchedulerType::Linear)]
    pub lr_scheduler_type: SchedulerType,
    /// transformers 4.x: warmup as a ratio of the steps (5.x: warmup_steps below 1).
    #[arg(long, default_value_t = 0.0)]
    pub warmup_ratio: f64,
    /// Warmup steps, or a ratio of the total steps when below 1.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_steps: f64,
    /// When to log the training loss.
    #[arg(long, value_enum, default_value_t = IntervalStrategy::Steps)]
    pub logging_strategy: IntervalStrategy,
    /// Steps between log entries, or a ratio of the total when below 1.
    #[arg(long, default_value_t = 500.0)]
    pub logging_steps: f64,
    /// Log the first step too.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub logging_first_step: bool,
    /// When to write checkpoint-N folders.
    #[arg(long, value_enum, default_value_t = IntervalStrategy::Steps)]
    pub save_strategy: IntervalStrategy,
    /// Steps between checkpoints, or a ratio of the total when below 1.
    #[arg(long, default_value_t = 500.0)]
    pub save_steps: f64,
    /// Keep only the newest N checkpoints (unset: keep all).
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// When to evaluate on the validation set.
    #[arg(long, value_enum, default_value_t = IntervalStrategy::No, alias = "evaluation-strategy")]
    #[serde(alias = "evaluation_strategy")]
    pub eval_strategy: IntervalStrategy,
    /// Steps between evaluations (unset: logging_steps).
    #[arg(long)]
    pub eval_steps: Option<f64>,
    /// Seeds initialisation, shuffling and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// bf16 mixed precision (fp32 master weights).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub bf16: bool,
    /// fp16 mixed precision with dynamic loss scaling.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub fp16: bool,
    /// Recompute each block in the backward pass instead of keeping its activations.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub gradient_checkpointing: bool,
    /// A checkpoint-N folder to resume from, or `latest`.
    #[arg(long, value_name = "DIR|latest")]
    pub resume_from_checkpoint: Option<String>,
    /// A DeepSpeed config (ds_config.json): ZeRO stage, offload, precision.
    #[arg(long, value_name = "DS_CONFIG.json", value_parser = ds_config_path)]
    pub deepspeed: Option<Value>,
    /// The optimiser.
    #[arg(long, value_enum, default_value_t = OptimizerName::AdamwTorch)]
    pub optim: OptimizerName,
    /// Drop the last incomplete batch of each epoch.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub dataloader_drop_last: bool,
    /// Where the logs also go: `tensorboard` (event files under
    /// logging_dir; `all` means the same) or `none` (transformers 5's default).
    #[arg(
        long,
        value_name = "tensorboard|none",
        value_delimiter = ',',
        default_value = "none"
    )]
    #[serde(deserialize_with = "string_or_list")]
    pub report_to: Vec<String>,
    /// TensorBoard's folder (default: output_dir/runs/<date>_<host>, as
    /// transformers names it; TENSORBOARD_LOGGING_DIR also sets it).
    #[arg(long, value_name = "DIR")]
    pub logging_dir: Option<String>,
    /// Megatron-LM's `--tensor-model-parallel-size`: split every layer and
    /// the vocabulary over this many adjacent ranks (not a field of
    /// transformers' TrainingArguments).
    #[arg(long, default_value_t = 1)]
    #[serde(default = "one")]
    pub tensor_model_parallel_size: usize,
    /// Megatron-LM's `--pipeline-model-parallel-size`: cut the blocks into
    /// this many pipeline stages, run in 1F1B order over the
    /// gradient-accumulation micro-batches.
    #[arg(long, default_value_t = 1)]
    #[serde(default = "one")]
    pub pipeline_model_parallel_size: usize,
    /// Fields of transformers' TrainingArguments given in JSON that this
    /// Trainer does not act on.
    #[arg(skip)]
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn one() -> usize {
    1
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
            lr_scheduler_type: SchedulerType::Linear,
            warmup_ratio: 0.0,
            warmup_steps: 0.0,
            logging_strategy: IntervalStrategy::Steps,
            logging_steps: 500.0,
            logging_first_step: false,
            save_strategy: IntervalStrategy::Steps,
            save_steps: 500.0,
            save_total_limit: None,
            eval_strategy: IntervalStrategy::No,
            eval_steps: None,
            seed: 42,
            bf16: false,
            fp16: false,
            gradient_checkpointing: false,
            resume_from_checkpoint: None,
            deepspeed: None,
            optim: OptimizerName::AdamwTorch,
            dataloader_drop_last: false,
            report_to: vec!["none".into()],
            logging_dir: None,
            tensor_model_parallel_size: 1,
            pipeline_model_parallel_size: 1,
            extra: Map::new(),
        }
    }
}

use super::hf_fields::{HF4_FIELDS, HF_FIELDS};

impl TrainingArguments {
    /// Read a JSON file of TrainingArguments fields over the defaults.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let mut v = serde_json::to_value(Self::default()).expect("serialises");
        merge_json_file(&mut v, path)?;
        Self::from_json(v, &path.display().to_string())
    }

    /// Fields from a JSON object (the defaults fill the rest); `what` names
    /// where they came from in errors.
    pub fn from_value(v: Value) -> Result<Self> {
        let mut base = serde_json::to_value(Self::default()).expect("serialises");
        merge_fields(&mut base, v, "TrainingArguments")?;
        Self::from_json(base, "TrainingArguments")
    }

    fn from_json(v: Value, what: &str) -> Result<Self> {
        let a = Self::deserialize_fields(v, what)?;
        a.validate()?;
        Ok(a)
    }

    /// The fields of `v` as TrainingArguments, an error naming the field
    /// and `what` (the file or the command line) when a value has the wrong type.
    fn deserialize_fields(v: Value, what: &str) -> Result<Self> {
        serde_path_to_error::deserialize(v)
            .map_err(|e| TrainError::Args(format!("{what}: field `{}`: {}", e.path(), e.inner())))
    }

    /// `HfArgumentParser`'s layering for a command line: `base` (the
    /// defaults), then the fields of `args_file` (`--args FILE.json`), then
    /// every flag given on the command line (`matches`, of a command that
    /// [`Args::augment_args`] extended with these fields).
    pub fn from_layers(
        base: &Self,
        args_file: Option<&Path>,
        matches: &ArgMatches,
    ) -> Result<Self> {
        let mut v = serde_json::to_value(base).expect("serialises");
        if let Some(f) = args_file {
            merge_json_file(&mut v, f)?;
            Self::deserialize_fields(v.clone(), &f.display().to_string())?;
        }
        let flags = Self::from_arg_matches(matches)?;
        let flags = serde_json::to_value(flags).expect("serialises");
        for (key, value) in flags.as_object().expect("an object") {
            let given = matches.try_get_raw(key).ok().flatten().is_some()
                && matches.value_source(key) == Some(ValueSource::CommandLine);
            if given {
                if value.is_null() {
                    // Only a float that JSON cannot hold (NaN, inf) gets here.
                    let raw = matches
                        .get_raw(key)
                        .into_iter()
                        .flatten()
                        .map(|r| r.to_string_lossy().to_string())
                        .collect::<Vec<_>>()
                        .join(" ");
                    return Err(TrainError::Args(format!(
                        "--{} {raw}: expected a finite number",
                        key.replace('_', "-")
                    )));
                }
                v[key] = value.clone();
            }
        }
        Self::from_json(v, "the command line")
    }

    /// `command` (a subcommand extended with these flags) with the defaults
    /// its help shows and its unset flags take set to `defaults`.
    pub fn with_defaults(mut command: clap::Command, defaults: &Self) -> clap::Command {
        let v = serde_json::to_value(defaults).expect("serialises");
        for (key, value) in v.as_object().expect("an object") {
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Null => continue,
                other => other.to_string(),
            };
            if command.get_arguments().any(|a| a.get_id() == key.as_str()) {
                command = command.mut_arg(key.as_str(), |a| a.default_value(text));
            }
        }
        command
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Args(m));
        if self.per_device_train_batch_size == 0 || self.per_device_eval_batch_size == 0 {
            return bad(
                "per_device_train_batch_size and per_device_eval_batch_size must be at least 1"
                    .into(),
            );
        }
        if self.output_dir.trim().is_empty() {
            return bad("output_dir is empty: give the folder for checkpoints and logs".into());
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps must be at least 1".into());
        }
        if self.max_steps <= 0 && self.num_train_epochs <= 0.0 {
            return bad("set max_steps > 0 or num_train_epochs > 0".into());
        }
        // Each check is written so that NaN fails it.
        let in_range = |name: &str, x: f64, lo: f64, hi: f64, hi_open: bool| -> Result<()> {
            let ok = x >= lo && if hi_open { x < hi } else { x <= hi };
            if ok {
                return Ok(());
            }
            let close = if hi_open { ")" } else { "]" };
            let range = if hi == f64::MAX {
                format!("at least {lo}")
            } else {
                format!("in [{lo}, {hi}{close}")
            };
            Err(TrainError::Args(format!("{name} must be {range}, got {x}")))
        };
        in_range("learning_rate", self.learning_rate, 0.0, f64::MAX, false)?;
        in_range("adam_beta1", self.adam_beta1, 0.0, 1.0, true)?;
        in_range("adam_beta2", self.adam_beta2, 0.0, 1.0, true)?;
        in_range("adam_epsilon", self.adam_epsilon, 0.0, f64::MAX, false)?;
        in_range("weight_decay", self.weight_decay, 0.0, f64::MAX, false)?;
        in_range("max_grad_norm", self.max_grad_norm, 0.0, f64::MAX, false)?;
        in_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0, false)?;
        if !self.num_train_epochs.is_finite() {
            return bad(format!(
                "num_train_epochs must be finite, got {}",
                self.num_train_epochs
            ));
        }
        self.reports_to_tensorboard()?;
        for k in self.extra.keys() {
            if !HF_FIELDS.contains(&k.as_str()) && !HF4_FIELDS.contains(&k.as_str()) {
                return bad(format!(
                    "unknown TrainingArguments field `{k}`: it is not a field of transformers' \
                     TrainingArguments"
                ));
            }
        }
        Ok(())
    }

    /// Whether `report_to` asks for TensorBoard; other integrations are
    /// refused by name rather than silently not reported to.
    pub fn reports_to_tensorboard(&self) -> Result<bool> {
        let mut tb = false;
        for r in &self.report_to {
            match r.as_str() {
                "tensorboard" | "all" => tb = true,
                "none" => {}
                other => {
                    return Err(TrainError::Args(format!(
                        "report_to `{other}`: this Trainer reports to `tensorboard` or `none`"
                    )))
                }
            }
        }
        Ok(tb)
    }

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

    /// Fields of transformers' TrainingArguments given that this Trainer
    /// accepts but does not act on.
    pub fn unused_fields(&self) -> Vec<String> {
        self.extra.keys().cloned().collect()
    }

    pub(crate) fn resolve_steps(&self, x: f64, total: usize) -> usize {
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

/// Read `path`, a JSON object of TrainingArguments fields, into `v`.
fn merge_json_file(v: &mut Value, path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let fields: Value = serde_json::from_str(&text).map_err(|e| TrainError::Io {
        path: path.display().to_string(),
        msg: format!("not JSON: {e}"),
    })?;
    merge_fields(v, fields, &path.display().to_string())
}

/// Set the keys of `fields` (a JSON object) in `v`, refusing keys that are
/// not TrainingArguments fields.
fn merge_fields(v: &mut Value, fields: Value, what: &str) -> Result<()> {
    let Value::Object(fields) = fields else {
        return Err(TrainError::Args(format!(
            "{what}: expected a JSON object of TrainingArguments fields"
        )));
    };
    for (k, val) in fields {
        if !HF_FIELDS.contains(&k.as_str()) && !HF4_FIELDS.contains(&k.as_str()) {
            return Err(TrainError::Args(format!(
                "{what}: unknown TrainingArguments field `{k}` (not a field of transformers' TrainingArguments)"
            )));
        }
        let k = if k == "evaluation_strategy" {
            "eval_strategy".to_string()
        } else {
            k
        };
        v[k] = val;
    }
    Ok(())
}

/// `report_to` as transformers takes it: a string or a list of strings.
fn string_or_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => vec!["none".into()],
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainingArguments,
    }

    fn parse(flags: &[&str], base: &TrainingArguments) -> Result<TrainingArguments> {
        let cmd = TrainingArguments::with_defaults(Cli::command(), base);
        let m = cmd
            .try_get_matches_from(std::iter::once("x").chain(flags.iter().copied()))
            .map_err(|e| TrainError::Args(e.to_string()))?;
        TrainingArguments::from_layers(base, None, &m)
    }

    #[test]
    fn flags_set_fields_by_hf_name_over_the_base() {
        let base = TrainingArguments {
            max_steps: 2000,
            ..Default::default()
        };
        let a = parse(
            &[
                "--learning-rate",
                "3e-3",
                "--lr-scheduler-type",
                "cosine",
                "--logging-first-step",
                "--evaluation-strategy",
                "steps",
            ],
            &base,
        )
        .unwrap();
        assert_eq!((a.max_steps, a.learning_rate), (2000, 3e-3));
        assert_eq!(a.lr_scheduler_type, SchedulerType::Cosine);
        assert!(a.logging_first_step);
        assert_eq!(a.eval_strategy, IntervalStrategy::Steps);
        assert!(parse(&["--no-such-field", "1"], &base).is_err());
        let e = parse(&["--lr-scheduler-type", "exotic"], &base)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lr-scheduler-type") && e.contains("cosine"),
            "{e}"
        );
        let e = parse(&["--max-steps", "ten"], &base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--max-steps"), "{e}");
        assert!(parse(&["--per-device-train-batch-size", "0"], &base).is_err());
    }

    #[test]
    fn json_fields_are_checked_by_name_and_type() {
        let e = TrainingArguments::from_value(serde_json::json!({"max_steps": "ten"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`max_steps`") && e.contains("i64"), "{e}");
        let e = TrainingArguments::from_value(serde_json::json!({"max_stepz": 3}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown TrainingArguments field `max_stepz`"),
            "{e}"
        );
        // A transformers field this Trainer does not act on: kept, listed.
        let a = TrainingArguments::from_value(serde_json::json!({"run_name": "x"})).unwrap();
        assert_eq!(a.unused_fields(), ["run_name"]);
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
}
