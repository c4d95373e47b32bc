//! Parity with DeepSpeed and transformers' DeepSpeed integration, against
//! fixtures they produced (tests/fixtures/make_deepspeed_fixtures.py,
//! make_ds_verdict_fixtures.py): the memory estimates, the learning-rate
//! schedules, "auto" resolution, the fp16 loss scaler, and which
//! ds_config files are accepted at all.

mod common;

use common::*;
use companion::train::TrainingArguments;
use serde_json::{json, Value};

#[test]
fn estimates_equal_deepspeeds() {
    let fx = read_json(&fixture("zero_estimates.json"));
    let cfg = companion::GPT2Config::preset("gpt2").unwrap();
    let (params, largest) = (
        cfg.num_parameters() as u64,
        companion::zero::memory::largest_layer(&cfg),
    );
    assert_eq!(params, fx["total_params"].as_u64().unwrap());
    assert_eq!(largest, fx["largest_layer_params"].as_u64().unwrap());
    for case in fx["cases"].as_array().unwrap() {
        let (g, n) = (
            case["gpus_per_node"].as_u64().unwrap() as usize,
            case["nodes"].as_u64().unwrap() as usize,
        );
        let ours = companion::zero::memory::deepspeed_estimates(params, largest, g, n);
        let theirs: Vec<&Value> = case["zero2"]
            .as_array()
            .unwrap()
            .iter()
            .chain(case["zero3"].as_array().unwrap())
            .collect();
        assert_eq!(ours.len(), theirs.len());
        for (o, t) in ours.iter().zip(theirs) {
            assert_eq!(
                o.offload_optimizer,
                t["offload_optimizer"].as_bool().unwrap()
            );
            if o.stage == 3 {
                assert_eq!(o.offload_param, t["offload_param"].as_bool().unwrap());
                assert_eq!(o.zero_init, t["zero_init"].as_bool().unwrap());
            }
            assert_eq!(
                (o.gpu_bytes, o.cpu_bytes),
                (t["gpu"].as_u64().unwrap(), t["cpu"].as_u64().unwrap()),
                "{g}x{n} {o:?}"
            );
        }
        // DeepSpeed on Python ≥ 3.11 prints its enum as `OffloadDeviceEnum.cpu`
        // where it means the padded `cpu ` (what it prints on 3.10).
        let printed = format!(
            "{}{}",
            case["printed_zero2"].as_str().unwrap(),
            case["printed_zero3"].as_str().unwrap()
        )
        .replace("OffloadDeviceEnum.cpu", "cpu ");
        assert_eq!(
            companion::zero::memory::estimate_text(params, largest, g, n),
            printed
        );
    }
    // The command prints the same.
    let o = companion(
        &["zero-estimate", "--model", "gpt2", "--num-gpus", "8"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let c0 = &fx["cases"][0];
    assert_eq!(c0["gpus_per_node"], 8);
    let want = format!(
        "{}{}",
        c0["printed_zero2"].as_str().unwrap(),
        c0["printed_zero3"].as_str().unwrap()
    )
    .replace("OffloadDeviceEnum.cpu", "cpu ");
    assert_eq!(stdout(&o), want);
}

#[test]
fn schedules_equal_deepspeeds() {
    use companion::zero::ds_config::DeepSpeedConfig;
    let fx = read_json(&fixture("ds_schedules.json"));
    for case in fx.as_array().unwrap() {
        let cfg = json!({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                         "scheduler": {"type": case["type"], "params": case["params"]}});
        // HF insists that warmup_max_lr equals learning_rate.
        let lr = case["params"]
            .get("warmup_max_lr")
            .and_then(Value::as_f64)
            .unwrap_or(5e-5);
        let a = TrainingArguments {
            per_device_train_batch_size: 2,
            learning_rate: lr,
            ..Default::default()
        };
        let c = DeepSpeedConfig::from_value(cfg, "case", &a.deepspeed_values(), 1, 16).unwrap();
        let s = c.scheduler.unwrap();
        for (step, want) in case["lrs"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = s.lr_at(step, case["optimizer_lr"].as_f64().unwrap());
            assert!(
                (got - want).abs() <= 1e-12 * want.abs().max(1e-12),
                "{} step {step}: {got} vs {want}",
                case["type"]
            );
        }
    }
}

#[test]
fn auto_values_resolve_like_transformers() {
    use companion::zero::ds_config::{json_eq, DeepSpeedConfig};
    let fx = read_json(&fixture("ds_auto.json"));
    let a = TrainingArguments::from_value(fx["training_args"].clone()).unwrap();
    let hidden = fx["hidden_size"].as_u64().unwrap() as usize;
    let mut c = DeepSpeedConfig::from_value(
        fx["ds_config"].clone(),
        "ds_auto",
        &a.deepspeed_values(),
        1,
        hidden,
    )
    .unwrap();
    c.finalize(a.num_warmup_steps(100), 100);
    assert!(
        json_eq(&c.resolved, &fx["resolved"]),
        "ours {}\nHF's {}",
        c.resolved,
        fx["resolved"]
    );
    // The shipped examples: resolved as HF does, read as DeepSpeed reads them.
    let ex = read_json(&fixture("ds_examples.json"));
    let a = TrainingArguments::from_value(ex["training_args"].clone()).unwrap();
    let hidden = ex["hidden_size"].as_u64().unwrap() as usize;
    let files = ex["configs"].as_object().unwrap();
    assert_eq!(files.len(), 6);
    for (name, want) in files {
        let c = DeepSpeedConfig::from_file(
            &data(&format!("ds_config/{name}")),
            &a.deepspeed_values(),
            1,
            hidden,
        )
        .unwrap();
        assert!(
            json_eq(&c.resolved, &want["resolved"]),
            "{name}: ours {}\nHF's {}",
            c.resolved,
            want["resolved"]
        );
        let d = &want["deepspeed"];
        assert_eq!(c.zero.stage as u64, d["stage"].as_u64().unwrap(), "{name}");
        assert_eq!(
            c.train_batch_size as u64,
            d["train_batch_size"].as_u64().unwrap()
        );
        assert_eq!(
            c.train_micro_batch_size_per_gpu as u64,
            d["train_micro_batch_size_per_gpu"].as_u64().unwrap()
        );
        assert_eq!(
            c.gradient_accumulation_steps as u64,
            d["gradient_accumulation_steps"].as_u64().unwrap()
        );
        assert_eq!(
            c.gradient_clipping,
            d["gradient_clipping"].as_f64().unwrap()
        );
        let off = c.zero.offload_optimizer == companion::zero::ds_config::OffloadDevice::Cpu;
        assert_eq!(off, d["offload_optimizer"] == "cpu", "{name}");
    }
}

#[test]
fn loss_scaler_equals_deepspeeds() {
    use companion::zero::ds_config::Fp16Config;
    use companion::zero::precision::LossScaler;
    let fx = read_json(&fixture("ds_loss_scaler.json"));
    for case in fx.as_array().unwrap() {
        let mut s = LossScaler::from_config(&Fp16Config {
            enabled: true,
            loss_scale: 0.0,
            initial_scale_power: case["initial_scale_power"].as_u64().unwrap() as u32,
            loss_scale_window: case["loss_scale_window"].as_u64().unwrap() as usize,
            hysteresis: case["hysteresis"].as_u64().unwrap() as usize,
            consecutive_hysteresis: case["consecutive_hysteresis"].as_bool().unwrap(),
            min_loss_scale: case["min_loss_scale"].as_f64().unwrap(),
        });
        let pattern = case["overflows"].as_str().unwrap();
        let mut scales = Vec::new();
        for ch in pattern.chars() {
            scales.push(s.cur_scale);
            let msg = s.update(ch == 'x');
            assert_eq!(msg.is_some(), ch == 'x');
        }
        let want: Vec<f64> = serde_json::from_value(case["scales"].clone()).unwrap();
        assert_eq!(scales, want, "{case}");
    }
}

/// TrainingArguments' defaults with batch 2 (the verdict files' micro
/// batch), no accumulation, and the precision a case turns on.
fn hf_values(fp16: bool, bf16: bool) -> companion::zero::HfTrainingValues {
    companion::zero::HfTrainingValues {
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 1,
        learning_rate: 1e-3,
        max_grad_norm: 1.0,
        adam_beta1: 0.9,
        adam_beta2: 0.999,
        adam_epsilon: 1e-8,
        weight_decay: 0.0,
        fp16,
        bf16,
    }
}

/// Our ds_config verdicts equal DeepSpeed's on the same files
/// (tests/fixtures/ds_verdicts.json, from make_ds_verdict_fixtures.py),
/// except where we are stricter on purpose: values DeepSpeed only trips
/// over later (a loss scale of 2^4294967312, a gradient clipping of "big").
#[test]
fn ds_config_verdicts_equal_deepspeeds() {
    use companion::zero::DeepSpeedConfig;
    const STRICTER: &[&str] = &[
        "initial_scale_power_huge",
        "initial_scale_power_negative",
        "gradient_clipping_word",
    ];
    let v = read_json(&fixture("ds_verdicts.json"));
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (name, case) in v["cases"].as_object().unwrap() {
        let text = case["text"].as_str().unwrap();
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, text).unwrap();
        let args = hf_values(
            text.contains(r#""fp16": {"enabled": true"#),
            text.contains(r#""bf16": {"enabled": true"#),
        );
        let ours = DeepSpeedConfig::from_file(&path, &args, 1, 64);
        let deepspeed_accepts = case["accepts"].as_bool().unwrap();
        if STRICTER.contains(&name.as_str()) {
            assert!(
                deepspeed_accepts,
                "{name}: DeepSpeed refuses it now; drop it from STRICTER"
            );
            assert!(ours.is_err(), "{name}: accepted");
        } else {
            assert_eq!(
                ours.is_ok(),
                deepspeed_accepts,
                "{name}: ours {:?}, DeepSpeed {}",
                ours.as_ref().err().map(|e| e.to_string()),
                case["error"]
            );
        }
        if let Err(e) = ours {
            let msg = e.to_string();
            assert!(msg.contains(&*path.display().to_string()), "{name}: {msg}");
        }
        checked += 1;
    }
    assert_eq!(checked, 26);
    // The reasons name the field, as DeepSpeed's do.
    for (name, want) in [
        (
            "unknown_key_in_zero_optimization",
            "zero_optimization.no_such_key",
        ),
        (
            "duplicate_key_in_zero_optimization",
            "duplicate key `zero_optimization.stage`",
        ),
        (
            "reduce_bucket_size_negative",
            "zero_optimization.reduce_bucket_size: must be at least 1",
        ),
        ("initial_scale_power_huge", "fp16.initial_scale_power"),
    ] {
        let path = dir.path().join(format!("{name}.json"));
        let args = hf_values(name.starts_with("initial"), false);
        let msg = DeepSpeedConfig::from_file(&path, &args, 1, 64)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(want), "{name}: {msg}");
    }
}

/// Keys a ds_config leaves out take DeepSpeed's own defaults
/// (tests/fixtures/ds_defaults.json, from make_ds_defaults_fixture.py):
/// clipping, the progress line, stage, accumulation, offload, precision and
/// the fp16 loss scaler's settings.
#[test]
fn absent_keys_take_deepspeeds_defaults() {
    use companion::zero::ds_config::{json_eq, OffloadDevice};
    use companion::zero::DeepSpeedConfig;
    let v = read_json(&fixture("ds_defaults.json"));
    let parse = |case: &Value, fp16: bool| {
        let text: Value = serde_json::from_str(case["text"].as_str().unwrap()).unwrap();
        DeepSpeedConfig::from_value(text, "case", &hf_values(fp16, false), 1, 64).unwrap()
    };
    let c = parse(&v["minimal"], false);
    let minimal = json!({
        "gradient_clipping": c.gradient_clipping,
        "steps_per_print": c.steps_per_print,
        "zero_optimization_stage": c.zero.stage,
        "gradient_accumulation_steps": c.gradient_accumulation_steps,
        "train_batch_size": c.train_batch_size,
        "wall_clock_breakdown": c.wall_clock_breakdown,
        "fp16_enabled": c.fp16.enabled,
        "bf16_enabled": c.bf16,
        "offload_optimizer": c.zero.offload_optimizer == OffloadDevice::Cpu,
        "offload_param": c.zero.offload_param == OffloadDevice::Cpu,
    });
    let f = parse(&v["fp16"], true).fp16;
    assert!(f.enabled);
    let fp16 = json!({
        "loss_scale": f.loss_scale,
        "initial_scale_power": f.initial_scale_power,
        "loss_scale_window": f.loss_scale_window,
        "hysteresis": f.hysteresis,
        "consecutive_hysteresis": f.consecutive_hysteresis,
        "min_loss_scale": f.min_loss_scale,
    });
    for (case, ours) in [("minimal", minimal), ("fp16", fp16)] {
        for (key, want) in v[case].as_object().unwrap() {
            if key != "text" {
                assert!(
                    json_eq(&ours[key], want),
                    "{case}.{key}: ours {}, DeepSpeed {want}",
                    ours[key]
                );
            }
        }
    }
}
