//! `transformers.TrainingArguments`: HF's field names and defaults.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{io_err, Result, TrainError};

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
}
