//! Tests of ds_config.rs: "auto" filling, contradictions, schedules.
use super::*;
use serde_json::json;

/// TrainingArguments' defaults, with batch 4, accumulation 2, lr 1e-3.
fn args() -> HfTrainingValues {
    HfTrainingValues {
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: 2,
        learning_rate: 1e-3,
        max_grad_norm: 1.0,
        adam_beta1: 0.9,
        adam_beta2: 0.999,
        adam_epsilon: 1e-8,
        weight_decay: 0.0,
        fp16: false,
        bf16: false,
    }
}

#[test]
fn auto_is_filled_from_training_arguments() {
    let v = json!({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "overlap_comm": true},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto", "total_num_steps": "auto"}},
        "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}
    });
    let mut c = DeepSpeedConfig::from_value(v, "ds.json", &args(), 2, 64).unwrap();
    assert_eq!(
        (
            c.train_batch_size,
            c.train_micro_batch_size_per_gpu,
            c.gradient_accumulation_steps
        ),
        (16, 4, 2)
    );
    assert_eq!(c.zero.stage, 2);
    assert_eq!(
        c.resolved["zero_optimization"]["reduce_bucket_size"],
        json!(4096)
    );
    assert_eq!(c.optimizer.as_ref().unwrap().lr, 1e-3);
    c.finalize(10, 100);
    assert_eq!(
        c.scheduler,
        Some(SchedulerConfig::WarmupDecayLR {
            min_lr: 0.0,
            max_lr: 1e-3,
            warmup_num_steps: 10,
            total_num_steps: 100,
            log_warmup: true
        })
    );
    assert!(
        c.warnings.iter().any(|w| w.contains("overlap_comm")),
        "{:?}",
        c.warnings
    );
}

#[test]
fn contradictions_and_bad_values_are_named() {
    let e = |v: Value, world| {
        DeepSpeedConfig::from_value(v, "ds.json", &args(), world, 64)
            .unwrap_err()
            .to_string()
    };
    let m = e(
        json!({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}),
        2,
    );
    assert!(
        m.contains("train_batch_size") && m.contains("hf train_batch_size"),
        "{m}"
    );
    let m = e(
        json!({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": 0.5}),
        1,
    );
    assert!(
        m.contains("gradient_clipping=0.5 vs hf max_grad_norm=1.0"),
        "{m}"
    );
    let m = e(
        json!({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 4}}),
        1,
    );
    assert!(
        m.contains("zero_optimization.stage: expected 0, 1, 2 or 3, got 4"),
        "{m}"
    );
    let m = e(
        json!({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}),
        1,
    );
    assert!(
        m.contains("\"nvme\" (ZeRO-Infinity) is not supported"),
        "{m}"
    );
    let m = e(
        json!({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}),
        1,
    );
    assert!(m.contains("offload_param needs stage 3"), "{m}");
    let m = e(
        json!({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "optimizer": {"type": "Lamb"}}),
        1,
    );
    assert!(m.contains("optimizer.type"), "{m}");
    // Two of three given: the third is inferred, then checked.
    let c = DeepSpeedConfig::from_value(
        json!({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 4}),
        "ds.json",
        &args(),
        3,
        64,
    )
    .unwrap();
    assert_eq!(c.gradient_accumulation_steps, 2);
}

#[test]
fn deepspeed_warmup_schedules() {
    // WarmupLR, log warmup over 10 steps from 0 to 1e-3: the first step
    // uses warmup_min_lr (the scheduler starts at iteration -1).
    let s = SchedulerConfig::WarmupLR {
        min_lr: 0.0,
        max_lr: 1e-3,
        warmup_num_steps: 10,
        log_warmup: true,
    };
    assert_eq!(s.lr_at(0, 0.0), 0.0);
    assert_eq!(s.lr_at(1, 0.0), 0.0);
    assert!((s.lr_at(5, 0.0) - 1e-3 * (5f64).ln() / (10f64).ln()).abs() < 1e-15);
    assert_eq!(s.lr_at(50, 0.0), 1e-3);
    let d = SchedulerConfig::WarmupDecayLR {
        min_lr: 0.0,
        max_lr: 1.0,
        warmup_num_steps: 4,
        total_num_steps: 12,
        log_warmup: false,
    };
    assert_eq!(d.lr_at(3, 0.0), 0.5);
    assert_eq!(d.lr_at(9, 0.0), 0.5);
    assert_eq!(d.lr_at(13, 0.0), 0.0);
}
