//! `ds_config.json` in DeepSpeed's own schema, with `"auto"` filled from the
//! TrainingArguments values the way transformers' DeepSpeed integration
//! fills it (`HfTrainerDeepSpeedConfig`), and DeepSpeed's batch-size
//! arithmetic. The engine takes only the values it needs
//! ([`HfTrainingValues`]), not the TrainingArguments.
//!
//! Keys we accept but do not act on (bucket sizes, `pin_memory`, …: they tune
//! GPU overlap that ranks here do not need) are listed in
//! [`DeepSpeedConfig::warnings`], never dropped silently.

use serde_json::{Map, Value};

pub use super::hf_auto::{json_eq, HfTrainingValues};
pub use crate::optim::SchedulerConfig;

#[derive(Debug, thiserror::Error)]
pub enum DsConfigError {
    #[error("{file}: {msg}")]
    Invalid { file: String, msg: String },
}

pub type Result<T> = std::result::Result<T, DsConfigError>;

/// Where `offload_optimizer` / `offload_param` put their tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadDevice {
    None,
    Cpu,
}

/// The `zero_optimization` block.
#[derive(Debug, Clone, PartialEq)]
pub struct ZeroConfig {
    pub stage: u8,
    pub offload_optimizer: OffloadDevice,
    pub offload_param: OffloadDevice,
}

/// The `fp16` block (dynamic loss scaling when `loss_scale` is 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Fp16Config {
    pub enabled: bool,
    pub loss_scale: f64,
    pub initial_scale_power: u32,
    pub loss_scale_window: usize,
    pub hysteresis: usize,
    pub consecutive_hysteresis: bool,
    pub min_loss_scale: f64,
}

/// The `optimizer` block: AdamW (DeepSpeed's `Adam` with `adam_w_mode`).
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

/// A parsed, "auto"-resolved `ds_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeepSpeedConfig {
    pub train_batch_size: usize,
    pub train_micro_batch_size_per_gpu: usize,
    pub gradient_accumulation_steps: usize,
    pub gradient_clipping: f64,
    pub zero: ZeroConfig,
    pub fp16: Fp16Config,
    pub bf16: bool,
    pub optimizer: Option<OptimizerConfig>,
    pub scheduler: Option<SchedulerConfig>,
    /// Print DeepSpeed's progress line every this many steps (absent: never).
    pub steps_per_print: Option<usize>,
    pub wall_clock_breakdown: bool,
    /// Keys accepted but not acted on, each with why; print them once.
    pub warnings: Vec<String>,
    /// The resolved JSON (every "auto" replaced), as DeepSpeed would see it.
    pub resolved: Value,
}

/// Keys that tune GPU communication overlap and buffering: accepted, not
/// needed by ranks that exchange through shared memory, so only warned about.
const ACCEPTED_ZERO_KEYS: &[&str] = &[
    "overlap_comm",
    "contiguous_gradients",
    "reduce_scatter",
    "reduce_bucket_size",
    "allgather_partitions",
    "allgather_bucket_size",
    "round_robin_gradients",
    "sub_group_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save",
    "elastic_checkpoint",
    "load_from_fp32_weights",
];

impl DeepSpeedConfig {
    /// Read `path` and resolve it against `args` for `world_size` ranks.
    /// `hidden_size` fills the bucket-size "auto"s as HF does.
    pub fn from_file(
        path: &std::path::Path,
        args: &HfTrainingValues,
        world_size: usize,
        hidden_size: usize,
    ) -> Result<Self> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| DsConfigError::Invalid {
            file: file.clone(),
            msg: e.to_string(),
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| DsConfigError::Invalid {
            file: file.clone(),
            msg: format!("not JSON: {e}"),
        })?;
        super::ds_schema::refuse_duplicate_keys(&text).map_err(|msg| DsConfigError::Invalid {
            file: file.clone(),
            msg,
        })?;
        Self::from_value(v, &file, args, world_size, hidden_size)
    }

    /// `args.deepspeed` as given: a path to a JSON file, or the dict itself.
    pub fn from_args(
        deepspeed: Option<&Value>,
        args: &HfTrainingValues,
        world_size: usize,
        hidden_size: usize,
    ) -> Result<Option<Self>> {
        match deepspeed {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(p)) => {
                Self::from_file(std::path::Path::new(p), args, world_size, hidden_size).map(Some)
            }
            Some(v @ Value::Object(_)) => {
                Self::from_value(v.clone(), "deepspeed (dict)", args, world_size, hidden_size)
                    .map(Some)
            }
            Some(other) => Err(DsConfigError::Invalid {
                file: "TrainingArguments.deepspeed".into(),
                msg: format!("expected a path to ds_config.json or a JSON object, got {other}"),
            }),
        }
    }

    pub fn from_value(
        mut v: Value,
        file: &str,
        args: &HfTrainingValues,
        world_size: usize,
        hidden_size: usize,
    ) -> Result<Self> {
        let err = |msg: String| DsConfigError::Invalid {
            file: file.to_string(),
            msg,
        };
        if !v.is_object() {
            return Err(err("expected a JSON object at the top level".into()));
        }
        let world = world_size.max(1);
        super::hf_auto::fill_auto(&mut v, args, world, hidden_size).map_err(err)?;
        let micro = args.per_device_train_batch_size;
        let accum = args.gradient_accumulation_steps;
        // DeepSpeed's own checks of its blocks, on the values it would see.
        super::ds_schema::validate(&mut v).map_err(err)?;
        let obj = v.as_object().expect("checked").clone();
        let mut warnings = Vec::new();
        let uint = |o: &Map<String, Value>, k: &str, ctx: &str| -> Result<Option<usize>> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .or_else(|| {
                        x.as_f64()
                            .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                            .map(|f| f as u64)
                    })
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| {
                        err(format!(
                            "{ctx}{k}: expected a non-negative integer, got {x}"
                        ))
                    }),
            }
        };
        let float = |o: &Map<String, Value>, k: &str, ctx: &str| -> Result<Option<f64>> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| err(format!("{ctx}{k}: expected a number, got {x}"))),
            }
        };
        let boolean = |o: &Map<String, Value>, k: &str, ctx: &str| -> Result<Option<bool>> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_bool()
                    .map(Some)
                    .ok_or_else(|| err(format!("{ctx}{k}: expected true or false, got {x}"))),
            }
        };
        let block = |k: &str| -> Result<Map<String, Value>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(Map::new()),
                Some(Value::Object(o)) => Ok(o.clone()),
                Some(x) => Err(err(format!("{k}: expected an object, got {x}"))),
            }
        };

        // Batch sizes: DeepSpeed's arithmetic, inferring the one left out.
        let tbs = uint(&obj, "train_batch_size", "")?;
        let mbs = uint(&obj, "train_micro_batch_size_per_gpu", "")?;
        let gas = uint(&obj, "gradient_accumulation_steps", "")?;
        let (tbs, mbs, gas) = match (tbs, mbs, gas) {
            (Some(t), Some(m), Some(g)) => (t, m, g),
            (Some(t), Some(m), None) => (t, m, t / (m * world).max(1)),
            (Some(t), None, Some(g)) => (t, t / (g * world).max(1), g),
            (Some(t), None, None) => (t, t / world, 1),
            (None, Some(m), g) => {
                let g = g.unwrap_or(1);
                (m * g * world, m, g)
            }
            (None, None, _) => {
                return Err(err(
                    "give train_batch_size or train_micro_batch_size_per_gpu (or \"auto\")".into(),
                ))
            }
        };
        if tbs == 0 || mbs == 0 || gas == 0 || tbs != mbs * gas * world {
            return Err(err(format!(
                "train_batch_size ({tbs}) must equal train_micro_batch_size_per_gpu ({mbs}) × gradient_accumulation_steps ({gas}) × world size ({world}) = {}",
                mbs * gas * world
            )));
        }
        if mbs != micro || gas != accum {
            return Err(err(format!(
                "the config's micro batch {mbs} and accumulation {gas} contradict TrainingArguments ({micro}, {accum}); use \"auto\""
            )));
        }

        // zero_optimization
        let z = block("zero_optimization")?;
        // ds_schema::validate has refused any stage but 0–3.
        let stage = uint(&z, "stage", "zero_optimization.")?.unwrap_or(0) as u8;
        let mut offload = |k: &str| -> Result<OffloadDevice> {
            let o = match z.get(k) {
                None | Some(Value::Null) => return Ok(OffloadDevice::None),
                Some(Value::Object(o)) => o,
                Some(x) => {
                    return Err(err(format!(
                        "zero_optimization.{k}: expected an object, got {x}"
                    )))
                }
            };
            let dev = match o.get("device") {
                None | Some(Value::Null) => OffloadDevice::None,
                Some(Value::String(s)) => match s.as_str() {
                    "none" => OffloadDevice::None,
                    "cpu" => OffloadDevice::Cpu,
                    "nvme" => {
                        return Err(err(format!(
                            "zero_optimization.{k}.device: \"nvme\" (ZeRO-Infinity) is not supported here; use \"cpu\" or \"none\""
                        )))
                    }
                    other => {
                        return Err(err(format!(
                            "zero_optimization.{k}.device: expected \"cpu\" or \"none\", got \"{other}\""
                        )))
                    }
                },
                Some(x) => return Err(err(format!("zero_optimization.{k}.device: expected a string, got {x}"))),
            };
            for key in o.keys().filter(|k| k.as_str() != "device") {
                warnings.push(format!(
                    "zero_optimization.{k}.{key}: accepted, not acted on (host buffers here are plain memory)"
                ));
            }
            Ok(dev)
        };
        let offload_optimizer = offload("offload_optimizer")?;
        let offload_param = offload("offload_param")?;
        if offload_optimizer == OffloadDevice::Cpu && stage == 0 {
            return Err(err(
                "zero_optimization.offload_optimizer needs stage 1, 2 or 3 (stage is 0)".into(),
            ));
        }
        if offload_param == OffloadDevice::Cpu && stage != 3 {
            return Err(err(format!(
                "zero_optimization.offload_param needs stage 3 (stage is {stage})"
            )));
        }
        for k in z.keys() {
            match k.as_str() {
                "stage" | "offload_optimizer" | "offload_param" => {}
                k if ACCEPTED_ZERO_KEYS.contains(&k) => warnings.push(format!(
                    "zero_optimization.{k}: accepted, not acted on (it tunes GPU communication overlap and buffers)"
                )),
                // ds_schema refused keys DeepSpeed does not know.
                k => warnings.push(format!("zero_optimization.{k}: accepted, not acted on")),
            }
        }

        // fp16 / bf16
        let f = block("fp16")?;
        let fp16 = Fp16Config {
            enabled: boolean(&f, "enabled", "fp16.")?.unwrap_or(false),
            loss_scale: float(&f, "loss_scale", "fp16.")?.unwrap_or(0.0),
            initial_scale_power: match uint(&f, "initial_scale_power", "fp16.")?.unwrap_or(16) {
                // 2^N must be a finite fp32 loss scale.
                p @ 0..=127 => p as u32,
                p => {
                    return Err(err(format!(
                        "fp16.initial_scale_power: the loss scale 2^{p} is not a finite number (give 0 to 127)"
                    )))
                }
            },
            loss_scale_window: uint(&f, "loss_scale_window", "fp16.")?.unwrap_or(1000),
            hysteresis: uint(&f, "hysteresis", "fp16.")?.unwrap_or(2),
            consecutive_hysteresis: boolean(&f, "consecutive_hysteresis", "fp16.")?
                .unwrap_or(false),
            min_loss_scale: float(&f, "min_loss_scale", "fp16.")?.unwrap_or(1.0),
        };
        let b = block("bf16")?;
        let bf16 = boolean(&b, "enabled", "bf16.")?.unwrap_or(false);
        if fp16.enabled && bf16 {
            return Err(err(
                "fp16.enabled and bf16.enabled are both true; choose one".into(),
            ));
        }

        // optimizer
        let o = block("optimizer")?;
        let optimizer = if o.is_empty() {
            None
        } else {
            let kind = o.get("type").and_then(Value::as_str).unwrap_or("");
            let p = match o.get("params") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(p)) => p.clone(),
                Some(x) => {
                    return Err(err(format!(
                        "optimizer.params: expected an object, got {x}"
                    )))
                }
            };
            match kind.to_ascii_lowercase().as_str() {
                "adamw" => {}
                "adam" => {
                    if boolean(&p, "adam_w_mode", "optimizer.params.")? == Some(false) {
                        return Err(err("optimizer: Adam with adam_w_mode false (L2 instead of decoupled weight decay) is not supported; use AdamW".into()));
                    }
                }
                _ => {
                    return Err(err(format!(
                        "optimizer.type: expected \"AdamW\" or \"Adam\", got \"{kind}\" (other DeepSpeed optimizers are not supported)"
                    )))
                }
            }
            let betas = match p.get("betas") {
                None => (0.9, 0.999),
                Some(Value::Array(a)) if a.len() == 2 && a.iter().all(Value::is_number) => (
                    a[0].as_f64().expect("number"),
                    a[1].as_f64().expect("number"),
                ),
                Some(x) => {
                    return Err(err(format!(
                        "optimizer.params.betas: expected [beta1, beta2], got {x}"
                    )))
                }
            };
            for k in p.keys() {
                if ![
                    "lr",
                    "betas",
                    "eps",
                    "weight_decay",
                    "adam_w_mode",
                    "torch_adam",
                ]
                .contains(&k.as_str())
                {
                    warnings.push(format!("optimizer.params.{k}: accepted, not acted on"));
                }
            }
            Some(OptimizerConfig {
                lr: float(&p, "lr", "optimizer.params.")?.unwrap_or(1e-3),
                betas,
                eps: float(&p, "eps", "optimizer.params.")?.unwrap_or(1e-8),
                weight_decay: float(&p, "weight_decay", "optimizer.params.")?.unwrap_or(0.0),
            })
        };

        // scheduler ("auto" steps are filled later, when the total is known)
        let s = block("scheduler")?;
        let scheduler = if s.is_empty() {
            None
        } else {
            let p = match s.get("params") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(p)) => p.clone(),
                Some(x) => {
                    return Err(err(format!(
                        "scheduler.params: expected an object, got {x}"
                    )))
                }
            };
            let ctx = "scheduler.params.";
            let steps = |k: &str, default: usize| -> Result<usize> {
                match p.get(k) {
                    Some(Value::String(a)) if a == "auto" => Ok(usize::MAX),
                    _ => Ok(uint(&p, k, ctx)?.unwrap_or(default)),
                }
            };
            let log_warmup = match p.get("warmup_type").and_then(Value::as_str) {
                None | Some("log") => true,
                Some("linear") => false,
                Some(other) => {
                    return Err(err(format!(
                    "scheduler.params.warmup_type: expected \"log\" or \"linear\", got \"{other}\""
                )))
                }
            };
            let kind = s.get("type").and_then(Value::as_str).unwrap_or("");
            Some(match kind {
                "WarmupLR" => SchedulerConfig::WarmupLR {
                    min_lr: float(&p, "warmup_min_lr", ctx)?.unwrap_or(0.0),
                    max_lr: float(&p, "warmup_max_lr", ctx)?.unwrap_or(0.001),
                    warmup_num_steps: steps("warmup_num_steps", 1000)?,
                    log_warmup,
                },
                "WarmupDecayLR" => SchedulerConfig::WarmupDecayLR {
                    min_lr: float(&p, "warmup_min_lr", ctx)?.unwrap_or(0.0),
                    max_lr: float(&p, "warmup_max_lr", ctx)?.unwrap_or(0.001),
                    warmup_num_steps: steps("warmup_num_steps", 1000)?,
                    total_num_steps: match p.get("total_num_steps") {
                        None => return Err(err("scheduler.params.total_num_steps: WarmupDecayLR needs it (or \"auto\")".into())),
                        Some(_) => steps("total_num_steps", 0)?,
                    },
                    log_warmup,
                },
                "WarmupCosineLR" => SchedulerConfig::WarmupCosineLR {
                    total_num_steps: match p.get("total_num_steps") {
                        None => return Err(err("scheduler.params.total_num_steps: WarmupCosineLR needs it (or \"auto\")".into())),
                        Some(_) => steps("total_num_steps", 0)?,
                    },
                    warmup_min_ratio: float(&p, "warmup_min_ratio", ctx)?.unwrap_or(0.0),
                    warmup_num_steps: steps("warmup_num_steps", 1000)?,
                    cos_min_ratio: float(&p, "cos_min_ratio", ctx)?.unwrap_or(1e-4),
                    log_warmup,
                },
                other => {
                    return Err(err(format!(
                        "scheduler.type: expected WarmupLR, WarmupDecayLR or WarmupCosineLR, got \"{other}\""
                    )))
                }
            })
        };

        // DeepSpeed's defaults where a key is absent: no progress line
        // (STEPS_PER_PRINT_DEFAULT = None), clipping at 1.0
        // (GRADIENT_CLIPPING_DEFAULT); tests/fixtures/ds_defaults.json.
        let steps_per_print = uint(&obj, "steps_per_print", "")?.map(|n| n.max(1));
        let wall_clock_breakdown = boolean(&obj, "wall_clock_breakdown", "")?.unwrap_or(false);
        let gradient_clipping = float(&obj, "gradient_clipping", "")?.unwrap_or(1.0);
        for k in obj.keys() {
            match k.as_str() {
                "train_batch_size"
                | "train_micro_batch_size_per_gpu"
                | "gradient_accumulation_steps"
                | "gradient_clipping"
                | "zero_optimization"
                | "fp16"
                | "bf16"
                | "optimizer"
                | "scheduler"
                | "steps_per_print"
                | "wall_clock_breakdown" => {}
                "zero_allow_untested_optimizer"
                | "zero_force_ds_cpu_optimizer"
                | "prescale_gradients"
                | "gradient_predivide_factor"
                | "communication_data_type"
                | "dump_state"
                | "tensorboard"
                | "wandb"
                | "csv_monitor"
                | "flops_profiler"
                | "comms_logger"
                | "activation_checkpointing"
                | "checkpoint"
                | "data_types"
                | "amp" => warnings.push(format!("{k}: accepted, not acted on")),
                other => warnings.push(format!("{other}: unknown key, ignored")),
            }
        }
        Ok(DeepSpeedConfig {
            train_batch_size: tbs,
            train_micro_batch_size_per_gpu: mbs,
            gradient_accumulation_steps: gas,
            gradient_clipping,
            zero: ZeroConfig {
                stage,
                offload_optimizer,
                offload_param,
            },
            fp16,
            bf16,
            optimizer,
            scheduler,
            steps_per_print,
            wall_clock_breakdown,
            warnings,
            resolved: v,
        })
    }

    /// HF's trainer_config_finalize: scheduler steps given as "auto" become
    /// the warmup and total steps the Trainer computed.
    pub fn finalize(&mut self, warmup_steps: usize, total_steps: usize) {
        if let Some(p) = self.resolved.pointer_mut("/scheduler/params") {
            for (k, val) in [
                ("warmup_num_steps", warmup_steps),
                ("total_num_steps", total_steps),
            ] {
                if p.get(k).is_some_and(|x| x == "auto") {
                    p[k] = val.into();
                }
            }
        }
        let fix = |x: &mut usize, val: usize| {
            if *x == usize::MAX {
                *x = val;
            }
        };
        match &mut self.scheduler {
            Some(SchedulerConfig::WarmupLR {
                warmup_num_steps, ..
            }) => fix(warmup_num_steps, warmup_steps),
            Some(SchedulerConfig::WarmupDecayLR {
                warmup_num_steps,
                total_num_steps,
                ..
            })
            | Some(SchedulerConfig::WarmupCosineLR {
                warmup_num_steps,
                total_num_steps,
                ..
            }) => {
                fix(warmup_num_steps, warmup_steps);
                fix(total_num_steps, total_steps);
            }
            None => {}
        }
    }
}

#[cfg(test)]
#[path = "ds_config_tests.rs"]
mod tests;
