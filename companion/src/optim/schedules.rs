//! Learning-rate schedules: transformers' (`get_scheduler`: linear,
//! cosine, constant, constant with warmup) and DeepSpeed's `WarmupLR`,
//! `WarmupDecayLR` and `WarmupCosineLR` (a ds_config `scheduler` block).

use serde::{Deserialize, Serialize};

/// The learning-rate schedule (`lr_scheduler_type`, HF's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum SchedulerType {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
}

/// HF's schedules (`get_scheduler`): the learning rate after `step` updates.
pub fn lr_at(kind: SchedulerType, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    let s = step as f64;
    let w = warmup as f64;
    if step < warmup && kind != SchedulerType::Constant {
        return base * s / w.max(1.0);
    }
    match kind {
        SchedulerType::Linear => base * ((total as f64 - s) / (total as f64 - w).max(1.0)).max(0.0),
        SchedulerType::Cosine => {
            let progress = (s - w) / (total as f64 - w).max(1.0);
            base * (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
        }
        SchedulerType::Constant | SchedulerType::ConstantWithWarmup => base,
    }
}

/// The `scheduler` block: DeepSpeed's warmup schedules.
#[derive(Debug, Clone, PartialEq)]
pub enum SchedulerConfig {
    WarmupLR {
        min_lr: f64,
        max_lr: f64,
        warmup_num_steps: usize,
        log_warmup: bool,
    },
    WarmupDecayLR {
        min_lr: f64,
        max_lr: f64,
        warmup_num_steps: usize,
        total_num_steps: usize,
        log_warmup: bool,
    },
    WarmupCosineLR {
        total_num_steps: usize,
        warmup_min_ratio: f64,
        warmup_num_steps: usize,
        cos_min_ratio: f64,
        log_warmup: bool,
    },
}

impl SchedulerConfig {
    /// The learning rate DeepSpeed uses for optimizer step `step` (0-based):
    /// the scheduler starts at iteration -1 and steps after each update.
    /// `base_lr` is the optimizer's lr (WarmupCosineLR scales it).
    pub fn lr_at(&self, step: usize, base_lr: f64) -> f64 {
        let it = step as i64 - 1;
        let warm = |w: usize, log: bool| -> f64 {
            let w = w.max(2) as f64;
            if log {
                ((it + 1) as f64).ln() / w.ln()
            } else {
                it as f64 / w
            }
        };
        match *self {
            SchedulerConfig::WarmupLR {
                min_lr,
                max_lr,
                warmup_num_steps,
                log_warmup,
            } => {
                if it < 0 {
                    return min_lr;
                }
                let g = if (it as usize) < warmup_num_steps.max(2) {
                    warm(warmup_num_steps, log_warmup)
                } else {
                    1.0
                };
                min_lr + (max_lr - min_lr) * g
            }
            SchedulerConfig::WarmupDecayLR {
                min_lr,
                max_lr,
                warmup_num_steps,
                total_num_steps,
                log_warmup,
            } => {
                if it < 0 {
                    return min_lr;
                }
                let w = warmup_num_steps.max(2);
                let g = if (it as usize) < w {
                    warm(warmup_num_steps, log_warmup)
                } else {
                    ((total_num_steps as f64 - it as f64)
                        / (total_num_steps as f64 - w as f64).max(1.0))
                    .max(0.0)
                };
                min_lr + (max_lr - min_lr) * g
            }
            SchedulerConfig::WarmupCosineLR {
                total_num_steps,
                warmup_min_ratio,
                warmup_num_steps,
                cos_min_ratio,
                log_warmup,
            } => {
                if it < 0 {
                    return 0.0;
                }
                let w = warmup_num_steps.max(2);
                let ratio = if (it as usize) < w {
                    warmup_min_ratio + warm(warmup_num_steps, log_warmup) * (1.0 - warmup_min_ratio)
                } else {
                    let real = (it as f64) - w as f64 + 1.0;
                    let total = (total_num_steps as f64 - w as f64).max(1.0);
                    // Clamped: past the end the ratio stays at cos_min_ratio.
                    let progress = (real / total).min(1.0);
                    let c = (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0;
                    (cos_min_ratio + (1.0 - cos_min_ratio) * c).max(0.0)
                };
                base_lr * ratio
            }
        }
    }
}
