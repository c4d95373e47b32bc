//! `ds_config.json` as DeepSpeed reads it: `"auto"` filled from the
//! TrainingArguments values the way transformers' DeepSpeed integration
//! fills it (`HfTrainerDeepSpeedConfig`, [`super::hf_auto`]), the file read
//! as the types of [`super::ds_schema`] (the one list of keys, with
//! DeepSpeed's coercions), then the rules between fields: DeepSpeed's
//! batch-size arithmetic, offload needs a stage, one precision, the
//! optimizer and schedules we run. The engine takes only the values it
//! needs ([`HfTrainingValues`]), not the TrainingArguments.
//!
//! Keys we accept but do not act on (bucket sizes, `pin_memory`, …: they tune
//! GPU overlap that ranks here do not need) are listed in
//! [`DeepSpeedConfig::warnings`], never dropped silently.

use serde_json::Value;

use super::ds_schema::{
    self, DsConfigFile, Fp16Block, OffloadTarget, OptimizerBlock, SchedulerBlock, Steps,
    WarmupType, ZeroBlock,
};

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

impl DeepSpeedConfig {
    /// Read `path` and resolve it against `args` for `world_size` ranks.
    /// `hidden_size` fills the bucket-size "auto"s as HF does.
    pub fn from_file(
        path: &std::path::Path,
        args: &HfTrainingValues,
        world_size: usize,
        hidden_size: usize,
    ) -> Result<Self> {
        let v = read_file(path)?;
        Self::from_value(
            v,
            &path.display().to_string(),
            args,
            world_size,
            hidden_size,
        )
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
        // DeepSpeed's own reading of the values it would see.
        let f = ds_schema::parse(&v).map_err(err)?;
        let mut warnings = unused_keys(&v, &f);

        let (tbs, mbs, gas) = batch_sizes(&f, world).map_err(err)?;
        let (micro, accum) = (
            args.per_device_train_batch_size,
            args.gradient_accumulation_steps,
        );
        if mbs != micro || gas != accum {
            return Err(err(format!(
                "the config's micro batch {mbs} and accumulation {gas} contradict TrainingArguments ({micro}, {accum}); use \"auto\""
            )));
        }

        let zero = zero_config(f.zero_optimization.as_ref()).map_err(err)?;
        let fp16 = fp16_config(f.fp16.as_ref()).map_err(err)?;
        let bf16 = f.bf16.as_ref().and_then(|b| b.enabled).unwrap_or(false);
        if fp16.enabled && bf16 {
            return Err(err(
                "fp16.enabled and bf16.enabled are both true; choose one".into(),
            ));
        }
        let optimizer = optimizer_config(f.optimizer.as_ref()).map_err(err)?;
        let scheduler = scheduler_config(f.scheduler.as_ref()).map_err(err)?;
        if let Some(p) = f.optimizer.as_ref().and_then(|o| o.params.as_ref()) {
            warnings.extend(
                p.unknown
                    .keys()
                    .map(|k| format!("optimizer.params.{k}: accepted, not acted on")),
            );
        }
        if let Some(p) = f.scheduler.as_ref().and_then(|s| s.params.as_ref()) {
            warnings.extend(
                p.unknown
                    .keys()
                    .map(|k| format!("scheduler.params.{k}: accepted, not acted on")),
            );
        }
        Ok(DeepSpeedConfig {
            train_batch_size: tbs,
            train_micro_batch_size_per_gpu: mbs,
            gradient_accumulation_steps: gas,
            // DeepSpeed's defaults where a key is absent: clipping at 1.0
            // (GRADIENT_CLIPPING_DEFAULT), no progress line
            // (STEPS_PER_PRINT_DEFAULT = None); tests/fixtures/ds_defaults.json.
            gradient_clipping: f.gradient_clipping.unwrap_or(1.0),
            zero,
            fp16,
            bf16,
            optimizer,
            scheduler,
            steps_per_print: f.steps_per_print.map(|n| n.max(1)),
            wall_clock_breakdown: f.wall_clock_breakdown.unwrap_or(false),
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

/// DeepSpeed's batch arithmetic: `train_batch_size` = micro batch ×
/// accumulation × ranks, the one left out inferred from the other two.
fn batch_sizes(
    f: &DsConfigFile,
    world: usize,
) -> std::result::Result<(usize, usize, usize), String> {
    let (tbs, mbs, gas) = match (
        f.train_batch_size,
        f.train_micro_batch_size_per_gpu,
        f.gradient_accumulation_steps,
    ) {
        (Some(t), Some(m), Some(g)) => (t, m, g),
        (Some(t), Some(m), None) => (t, m, t / (m * world).max(1)),
        (Some(t), None, Some(g)) => (t, t / (g * world).max(1), g),
        (Some(t), None, None) => (t, t / world, 1),
        (None, Some(m), g) => {
            let g = g.unwrap_or(1);
            (m.saturating_mul(g).saturating_mul(world), m, g)
        }
        (None, None, _) => {
            return Err(
                "give train_batch_size or train_micro_batch_size_per_gpu (or \"auto\")".into(),
            )
        }
    };
    let product = mbs.saturating_mul(gas).saturating_mul(world);
    if tbs == 0 || mbs == 0 || gas == 0 || tbs != product {
        return Err(format!(
            "train_batch_size ({tbs}) must equal train_micro_batch_size_per_gpu ({mbs}) × gradient_accumulation_steps ({gas}) × world size ({world}) = {product}"
        ));
    }
    Ok((tbs, mbs, gas))
}

/// The stage and where its offload blocks put their tensors.
fn zero_config(z: Option<&ZeroBlock>) -> std::result::Result<ZeroConfig, String> {
    let Some(z) = z else {
        return Ok(ZeroConfig {
            stage: 0,
            offload_optimizer: OffloadDevice::None,
            offload_param: OffloadDevice::None,
        });
    };
    let stage = z.stage.unwrap_or(0);
    let device = |k: &str, d: Option<OffloadTarget>| {
        match d {
        None | Some(OffloadTarget::None) => Ok(OffloadDevice::None),
        Some(OffloadTarget::Cpu) => Ok(OffloadDevice::Cpu),
        Some(OffloadTarget::Nvme) => Err(format!(
            "zero_optimization.{k}.device: \"nvme\" (ZeRO-Infinity) is not supported here; use \"cpu\" or \"none\""
        )),
    }
    };
    let offload_optimizer = device(
        "offload_optimizer",
        z.offload_optimizer.as_ref().and_then(|o| o.device),
    )?;
    let offload_param = device(
        "offload_param",
        z.offload_param.as_ref().and_then(|o| o.device),
    )?;
    if offload_optimizer == OffloadDevice::Cpu && stage == 0 {
        return Err(
            "zero_optimization.offload_optimizer needs stage 1, 2 or 3 (stage is 0)".into(),
        );
    }
    if offload_param == OffloadDevice::Cpu && stage != 3 {
        return Err(format!(
            "zero_optimization.offload_param needs stage 3 (stage is {stage})"
        ));
    }
    Ok(ZeroConfig {
        stage,
        offload_optimizer,
        offload_param,
    })
}

/// The fp16 block with DeepSpeed's defaults (DeepSpeedFP16Config).
fn fp16_config(f: Option<&Fp16Block>) -> std::result::Result<Fp16Config, String> {
    let d = Fp16Block::default();
    let f = f.unwrap_or(&d);
    let count = |k: &str, x: Option<i64>, default: usize| match x {
        None => Ok(default),
        Some(n) => usize::try_from(n)
            .map_err(|_| format!("fp16.{k}: expected a non-negative integer, got {n}")),
    };
    Ok(Fp16Config {
        enabled: f.enabled.unwrap_or(false),
        loss_scale: f.loss_scale.unwrap_or(0.0),
        initial_scale_power: match f.initial_scale_power.unwrap_or(16) {
            // 2^N must be a finite fp32 loss scale.
            p @ 0..=127 => p as u32,
            p => {
                return Err(format!(
                    "fp16.initial_scale_power: the loss scale 2^{p} is not a finite number (give 0 to 127)"
                ))
            }
        },
        loss_scale_window: count("loss_scale_window", f.loss_scale_window, 1000)?,
        hysteresis: count("hysteresis", f.hysteresis, 2)?,
        consecutive_hysteresis: f.consecutive_hysteresis.unwrap_or(false),
        min_loss_scale: f.min_loss_scale.map_or(1.0, |x| x as f64),
    })
}

/// AdamW from the optimizer block, or `None` when there is none.
fn optimizer_config(
    o: Option<&OptimizerBlock>,
) -> std::result::Result<Option<OptimizerConfig>, String> {
    let Some(o) = o.filter(|o| o.kind.is_some() || o.params.is_some() || !o.unknown.is_empty())
    else {
        return Ok(None);
    };
    let kind = o.kind.as_deref().unwrap_or("");
    let d = Default::default();
    let p = o.params.as_ref().unwrap_or(&d);
    match kind.to_ascii_lowercase().as_str() {
        "adamw" => {}
        "adam" if p.adam_w_mode == Some(false) => {
            return Err("optimizer: Adam with adam_w_mode false (L2 instead of decoupled weight decay) is not supported; use AdamW".into())
        }
        "adam" => {}
        _ => {
            return Err(format!(
                "optimizer.type: expected \"AdamW\" or \"Adam\", got \"{kind}\" (other DeepSpeed optimizers are not supported)"
            ))
        }
    }
    Ok(Some(OptimizerConfig {
        lr: p.lr.unwrap_or(1e-3),
        betas: p.betas.unwrap_or((0.9, 0.999)),
        eps: p.eps.unwrap_or(1e-8),
        weight_decay: p.weight_decay.unwrap_or(0.0),
    }))
}

/// DeepSpeed's warmup schedule, with its defaults; "auto" steps stay
/// `usize::MAX` until [`DeepSpeedConfig::finalize`] knows them.
fn scheduler_config(
    s: Option<&SchedulerBlock>,
) -> std::result::Result<Option<SchedulerConfig>, String> {
    let Some(s) = s.filter(|s| s.kind.is_some() || s.params.is_some() || !s.unknown.is_empty())
    else {
        return Ok(None);
    };
    let d = Default::default();
    let p = s.params.as_ref().unwrap_or(&d);
    let steps = |x: Option<Steps>, default: usize| match x {
        Some(Steps::Auto) => usize::MAX,
        Some(Steps::N(n)) => n,
        None => default,
    };
    let log_warmup = p.warmup_type != Some(WarmupType::Linear);
    let kind = s.kind.as_deref().unwrap_or("");
    let total = || {
        p.total_num_steps.map(|t| steps(Some(t), 0)).ok_or_else(|| {
            format!("scheduler.params.total_num_steps: {kind} needs it (or \"auto\")")
        })
    };
    Ok(Some(match kind {
        "WarmupLR" => SchedulerConfig::WarmupLR {
            min_lr: p.warmup_min_lr.unwrap_or(0.0),
            max_lr: p.warmup_max_lr.unwrap_or(0.001),
            warmup_num_steps: steps(p.warmup_num_steps, 1000),
            log_warmup,
        },
        "WarmupDecayLR" => SchedulerConfig::WarmupDecayLR {
            min_lr: p.warmup_min_lr.unwrap_or(0.0),
            max_lr: p.warmup_max_lr.unwrap_or(0.001),
            warmup_num_steps: steps(p.warmup_num_steps, 1000),
            total_num_steps: total()?,
            log_warmup,
        },
        "WarmupCosineLR" => SchedulerConfig::WarmupCosineLR {
            total_num_steps: total()?,
            warmup_min_ratio: p.warmup_min_ratio.unwrap_or(0.0),
            warmup_num_steps: steps(p.warmup_num_steps, 1000),
            cos_min_ratio: p.cos_min_ratio.unwrap_or(1e-4),
            log_warmup,
        },
        other => {
            return Err(format!(
            "scheduler.type: expected WarmupLR, WarmupDecayLR or WarmupCosineLR, got \"{other}\""
        ))
        }
    }))
}

/// A ds_config file as JSON (duplicate keys refused, as DeepSpeed does).
fn read_file(path: &std::path::Path) -> Result<Value> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| DsConfigError::Invalid {
        file: file.clone(),
        msg: e.to_string(),
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| DsConfigError::Invalid {
        file: file.clone(),
        msg: format!("not JSON: {e}"),
    })?;
    crate::hf_json::refuse_duplicate_keys(&text).map_err(|msg| DsConfigError::Invalid {
        file,
        msg: format!("{msg} (DeepSpeed refuses configs with duplicate keys)"),
    })?;
    Ok(v)
}

/// The model-parallel sizes a ds_config sets, read before the rest (the
/// data-parallel size its batch sizes count depends on them): DeepSpeed's
/// `tensor_parallel.autotp_size` (0: off) and `pipeline.stages` ("auto":
/// not set).
pub fn model_parallel_sizes(deepspeed: Option<&Value>) -> Result<(Option<usize>, Option<usize>)> {
    let (v, file) = match deepspeed {
        Some(Value::String(p)) => (read_file(std::path::Path::new(p))?, p.clone()),
        Some(v @ Value::Object(_)) => (v.clone(), "deepspeed (dict)".to_string()),
        _ => return Ok((None, None)),
    };
    let size = |block: &str, key: &str| -> Result<Option<usize>> {
        match v.get(block).and_then(|b| b.get(key)) {
            None => Ok(None),
            Some(Value::String(s)) if s == "auto" => Ok(None),
            Some(x) => match x.as_u64() {
                Some(0) => Ok(None),
                Some(n) => Ok(Some(n as usize)),
                None => Err(DsConfigError::Invalid {
                    file: file.clone(),
                    msg: format!("{block}.{key}: expected a whole number or \"auto\", got {x}"),
                }),
            },
        }
    };
    Ok((
        size("tensor_parallel", "autotp_size")?,
        size("pipeline", "stages")?,
    ))
}

/// Every key given that runs here accept but do not act on, each with why
/// (the keys we act on are read in `from_value`; unknown ones DeepSpeed
/// ignores too).
fn unused_keys(v: &Value, f: &DsConfigFile) -> Vec<String> {
    const ACTED_ON: &[&str] = &[
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "zero_optimization",
        "fp16",
        "bf16",
        "optimizer",
        "scheduler",
        "steps_per_print",
        "wall_clock_breakdown",
        "tensor_parallel",
        "pipeline",
    ];
    let keys = |p: &str| -> Vec<String> {
        v.pointer(p)
            .and_then(Value::as_object)
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let mut w = Vec::new();
    for k in keys("") {
        if f.unknown.contains_key(&k) {
            w.push(format!("{k}: unknown key, ignored"));
        } else if !ACTED_ON.contains(&k.as_str()) {
            w.push(format!("{k}: accepted, not acted on"));
        }
    }
    for k in keys("/zero_optimization") {
        match k.as_str() {
            "stage" => {}
            "offload_optimizer" | "offload_param" => {
                for key in keys(&format!("/zero_optimization/{k}")) {
                    if key != "device" {
                        w.push(format!(
                            "zero_optimization.{k}.{key}: accepted, not acted on (host buffers here are plain memory)"
                        ));
                    }
                }
            }
            _ => w.push(format!(
                "zero_optimization.{k}: accepted, not acted on (it tunes GPU communication, buffers or partitioning that ranks here do not need)"
            )),
        }
    }
    for (block, read) in [("tensor_parallel", "autotp_size"), ("pipeline", "stages")] {
        for k in keys(&format!("/{block}")) {
            if k != read {
                w.push(format!(
                    "{block}.{k}: accepted, not acted on (only {block}.{read} is read here)"
                ));
            }
        }
    }
    w
}

#[cfg(test)]
#[path = "ds_config_tests.rs"]
mod tests;
