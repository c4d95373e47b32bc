//! A run's settings resolved once: [`TrainingArguments`] + the ds_config
//! (its `"auto"`s filled from them, as transformers' DeepSpeed integration
//! does) + the ranks, into typed values. The Trainer, its checkpoints and
//! logs, and the program's summary read only the plan; where DeepSpeed and
//! TrainingArguments both name a value, the plan holds the one that runs.

use serde_json::{json, Value};

use super::args::TrainingArguments;
use super::error::{Result, TrainError};
use crate::config::GPT2Config;
use crate::optim::{lr_at, AdamWParams, SchedulerConfig, SchedulerType};
use crate::parallel::ParallelLayout;
use crate::zero::ds_config::{DeepSpeedConfig, Fp16Config};
pub use crate::zero::{Precision, ZeroStrategy};

/// The learning-rate schedule that runs: transformers' (`lr_scheduler_type`)
/// or the ds_config's `scheduler` block.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    Hf {
        kind: SchedulerType,
        warmup_steps: usize,
        total_steps: usize,
    },
    /// The ds_config's `scheduler` block, parsed and as resolved JSON.
    DeepSpeed {
        config: SchedulerConfig,
        block: Value,
    },
}

impl Schedule {
    /// The learning rate of optimizer step `step` (0-based) for peak `base_lr`.
    pub fn lr_at(&self, step: usize, base_lr: f64) -> f64 {
        match self {
            Schedule::Hf {
                kind,
                warmup_steps,
                total_steps,
            } => lr_at(*kind, base_lr, step, *warmup_steps, *total_steps),
            Schedule::DeepSpeed { config, .. } => config.lr_at(step, base_lr),
        }
    }

    /// What a checkpoint's `scheduler.json` records: this schedule, its
    /// peak and the steps taken.
    pub fn state_json(&self, base_lr: f64, last_epoch: usize) -> Value {
        match self {
            Schedule::Hf {
                kind,
                warmup_steps,
                total_steps,
            } => json!({"kind": kind, "base_lr": base_lr, "warmup_steps": warmup_steps,
                "total_steps": total_steps, "last_epoch": last_epoch}),
            Schedule::DeepSpeed { block, .. } => json!({"deepspeed": block, "base_lr": base_lr,
                "last_epoch": last_epoch}),
        }
    }
}

/// Batch arithmetic: micro-batch per replica, accumulation, replicas, and
/// the optimizer steps of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPlan {
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Data-parallel replicas (the ranks, unless tensor or pipeline
    /// parallelism splits the model over several of them).
    pub world_size: usize,
    /// Examples per optimizer step, all ranks together.
    pub train_batch_size: usize,
    /// Micro-batches per epoch, each rank's.
    pub batches_per_epoch: usize,
    pub total_steps: usize,
    pub warmup_steps: usize,
}

/// Everything a run needs to know, resolved once.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainPlan {
    /// The ranks as tensor × pipeline × data-parallel groups (tp = pp = 1:
    /// data parallelism only).
    pub layout: ParallelLayout,
    pub zero: ZeroStrategy,
    pub precision: Precision,
    pub adamw: AdamWParams,
    /// The schedule's peak: the ds_config optimizer's `lr`, else `learning_rate`.
    pub learning_rate: f64,
    /// Clip the global gradient norm to this (0: no clipping): the
    /// ds_config's `gradient_clipping` (DeepSpeed's default 1.0), else
    /// `max_grad_norm`.
    pub max_grad_norm: f64,
    pub schedule: Schedule,
    pub batch: BatchPlan,
    /// Recompute blocks in the backward pass (`gradient_checkpointing`;
    /// ZeRO-3 always does).
    pub recompute: bool,
    /// DeepSpeed prints its progress line every this many steps.
    pub steps_per_print: Option<usize>,
    /// The parsed ds_config (its warnings, the resolved JSON).
    pub deepspeed: Option<DeepSpeedConfig>,
}

impl TrainPlan {
    /// Resolve `args` for `world_size` ranks training `cfg`, each rank's
    /// data loader giving `batches_per_epoch` micro-batches an epoch.
    pub fn resolve(
        args: &TrainingArguments,
        world_size: usize,
        cfg: &GPT2Config,
        batches_per_epoch: usize,
    ) -> Result<Self> {
        args.validate()?;
        if args.bf16 && args.fp16 {
            return Err(TrainError::Args(
                "bf16 and fp16 are both set; choose one".into(),
            ));
        }
        let layout = Self::parallel_layout(args, world_size)?;
        // DeepSpeed's batch sizes count data-parallel replicas.
        let dp = layout.dp;
        let mut deepspeed = DeepSpeedConfig::from_args(
            args.deepspeed.as_ref(),
            &args.deepspeed_values(),
            dp,
            cfg.n_embd,
        )?;
        if dp > 1 && deepspeed.is_none() {
            return Err(TrainError::Args(format!(
                "{dp} data-parallel ranks need a DeepSpeed config (TrainingArguments.deepspeed / --deepspeed ds_config.json)"
            )));
        }
        let batch = batch_plan(args, dp, batches_per_epoch);
        if let Some(d) = deepspeed.as_mut() {
            d.finalize(batch.warmup_steps, batch.total_steps);
        }
        // torch's AdamW from TrainingArguments, unless the ds_config names one.
        let args_adamw = AdamWParams {
            beta1: args.adam_beta1,
            beta2: args.adam_beta2,
            eps: args.adam_epsilon,
            weight_decay: args.weight_decay,
        };
        let plan = match deepspeed {
            None => TrainPlan {
                layout,
                zero: ZeroStrategy::Plain,
                precision: if args.fp16 {
                    // torch.amp.GradScaler's defaults (2^16, doubling every
                    // 2000 clean steps, halving on each overflow).
                    Precision::Fp16 {
                        scaler: Fp16Config {
                            enabled: true,
                            loss_scale: 0.0,
                            initial_scale_power: 16,
                            loss_scale_window: 2000,
                            hysteresis: 1,
                            consecutive_hysteresis: false,
                            min_loss_scale: 0.0,
                        },
                    }
                } else if args.bf16 {
                    Precision::Bf16
                } else {
                    Precision::F32
                },
                adamw: args_adamw,
                learning_rate: args.learning_rate,
                max_grad_norm: args.max_grad_norm,
                schedule: hf_schedule(args, &batch),
                batch,
                recompute: args.gradient_checkpointing,
                steps_per_print: None,
                deepspeed: None,
            },
            Some(d) => {
                let zero = ZeroStrategy::from_ds_config(&d);
                let (adamw, learning_rate) = match &d.optimizer {
                    Some(o) => (
                        AdamWParams {
                            beta1: o.betas.0,
                            beta2: o.betas.1,
                            eps: o.eps,
                            weight_decay: o.weight_decay,
                        },
                        o.lr,
                    ),
                    // No optimizer block: HF builds torch's AdamW from
                    // TrainingArguments.
                    None => (args_adamw, args.learning_rate),
                };
                TrainPlan {
                    layout,
                    zero,
                    precision: if d.fp16.enabled {
                        Precision::Fp16 {
                            scaler: d.fp16.clone(),
                        }
                    } else if d.bf16 {
                        Precision::Bf16
                    } else {
                        Precision::F32
                    },
                    adamw,
                    learning_rate,
                    max_grad_norm: d.gradient_clipping,
                    schedule: match &d.scheduler {
                        Some(s) => Schedule::DeepSpeed {
                            config: s.clone(),
                            block: d.resolved["scheduler"].clone(),
                        },
                        None => hf_schedule(args, &batch),
                    },
                    batch,
                    recompute: zero.stage() == 3 || args.gradient_checkpointing,
                    steps_per_print: d.steps_per_print,
                    deepspeed: Some(d),
                }
            }
        };
        if layout.tp * layout.pp > 1 {
            plan.check_model_parallel(cfg)?;
        }
        Ok(plan)
    }

    /// The ranks' layout `args` ask for: Megatron-LM's sizes, or the
    /// ds_config's `tensor_parallel.autotp_size` and `pipeline.stages`
    /// (when both name a size above 1, they must agree; a flag at 1, its
    /// default, leaves the size to the ds_config).
    pub fn parallel_layout(args: &TrainingArguments, world_size: usize) -> Result<ParallelLayout> {
        let (tp, pp) = crate::zero::ds_config::model_parallel_sizes(args.deepspeed.as_ref())?;
        let pick = |flag: usize, name: &str, ds: Option<usize>, key: &str| match ds {
            Some(n) if flag != 1 && flag != n => Err(TrainError::Args(format!(
                "{name} is {flag} but the ds_config's {key} is {n}: give one of them"
            ))),
            Some(n) => Ok(n),
            None => Ok(flag),
        };
        ParallelLayout::new(
            world_size.max(1),
            pick(
                args.tensor_model_parallel_size,
                "tensor_model_parallel_size",
                tp,
                "tensor_parallel.autotp_size",
            )?,
            pick(
                args.pipeline_model_parallel_size,
                "pipeline_model_parallel_size",
                pp,
                "pipeline.stages",
            )?,
        )
        .map_err(TrainError::Args)
    }

    /// What the tensor- and pipeline-parallel path runs: fp32 AdamW with
    /// ZeRO-1 at most over the data-parallel group (Megatron's distributed
    /// optimizer; DeepSpeed's pipeline engine refuses ZeRO-2 and 3 too),
    /// blocks and heads split evenly (the vocabulary is padded).
    fn check_model_parallel(&self, cfg: &GPT2Config) -> Result<()> {
        let l = self.layout;
        let bad = |m: String| {
            Err(TrainError::Args(format!(
                "tensor_model_parallel_size {} × pipeline_model_parallel_size {}: {m}",
                l.tp, l.pp
            )))
        };
        if self.zero.stage() > 1 || self.zero.offload_optimizer() || self.zero.offload_param() {
            return bad(format!(
                "ZeRO stage {}{} is not run with tensor or pipeline parallelism; use stage 1 (the data-parallel group's distributed optimizer) or 0",
                self.zero.stage(),
                if self.zero.stage() <= 1 { " with offload" } else { "" }
            ));
        }
        if self.zero.stage() == 0 && l.dp > 1 {
            return bad(format!(
                "{} data-parallel replicas keep Adam's state partitioned (ZeRO-1): set zero_optimization.stage to 1",
                l.dp
            ));
        }
        if self.precision != Precision::F32 {
            return bad("runs in fp32 only: leave bf16 and fp16 off".into());
        }
        if self.recompute {
            return bad("does not recompute blocks: leave gradient_checkpointing off".into());
        }
        for (what, n, by) in [("n_layer", cfg.n_layer, l.pp), ("n_head", cfg.n_head, l.tp)] {
            if !n.is_multiple_of(by) {
                return bad(format!("{what} {n} is not divisible by {by}"));
            }
        }
        Ok(())
    }

    /// The settings that shape the engine and the model's copy (placement,
    /// dtype): fixed once the Trainer is built.
    pub(crate) fn same_engine(&self, other: &TrainPlan) -> bool {
        self.zero == other.zero
            && self.precision == other.precision
            && self.batch.world_size == other.batch.world_size
            && self.layout == other.layout
    }
}

fn hf_schedule(args: &TrainingArguments, b: &BatchPlan) -> Schedule {
    Schedule::Hf {
        kind: args.lr_scheduler_type,
        warmup_steps: b.warmup_steps,
        total_steps: b.total_steps,
    }
}

/// HF's step count: `max_steps`, else epochs × updates per epoch. An
/// accumulation longer than an epoch ends at the epoch's last batch, as
/// transformers' Trainer ends it: one update per epoch.
fn batch_plan(args: &TrainingArguments, world: usize, batches_per_epoch: usize) -> BatchPlan {
    let per = args.per_device_train_batch_size;
    let global = per * world;
    let accum = args
        .gradient_accumulation_steps
        .min(batches_per_epoch.max(1));
    let total_steps = if args.max_steps > 0 {
        args.max_steps as usize
    } else {
        let per_epoch = (batches_per_epoch / accum).max(1);
        (args.num_train_epochs * per_epoch as f64).ceil() as usize
    };
    BatchPlan {
        per_device_train_batch_size: per,
        gradient_accumulation_steps: accum,
        world_size: world,
        train_batch_size: global * accum,
        batches_per_epoch,
        total_steps,
        warmup_steps: args.num_warmup_steps(total_steps),
    }
}
