//! transformers' DeepSpeed integration (`HfTrainerDeepSpeedConfig`):
//! every `"auto"` of a ds_config takes its TrainingArguments value
//! (`fill_match`), and a value that is not "auto" must agree with it; the
//! bucket sizes take HF's sizes from the model width (`fill_only`).

use serde_json::Value;

/// The `TrainingArguments` values that HF's DeepSpeed integration fills
/// `"auto"` from, and checks other values against.
#[derive(Debug, Clone, PartialEq)]
pub struct HfTrainingValues {
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub max_grad_norm: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub weight_decay: f64,
    pub fp16: bool,
    pub bf16: bool,
}

/// Numbers compare by value (1 == 1.0), as Python's `!=` does.
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// Fill `v`'s "auto"s for `world` ranks and a model `hidden_size` wide;
/// `Err` lists every value that contradicts TrainingArguments.
pub(super) fn fill_auto(
    v: &mut Value,
    args: &HfTrainingValues,
    world: usize,
    hidden_size: usize,
) -> Result<(), String> {
    // HF's fill_match: "auto" takes the TrainingArguments value; any other
    // value must agree with it.
    let mut mismatches = Vec::new();
    let micro = args.per_device_train_batch_size;
    let accum = args.gradient_accumulation_steps;
    let mut fill = |v: &mut Value, key: &str, hf: Value, hf_name: &str, must_match: bool| {
        let mut cur = &mut *v;
        let parts: Vec<&str> = key.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            match cur.get_mut(*p) {
                Some(next) if next.is_object() => cur = next,
                _ => return,
            }
        }
        let last = parts[parts.len() - 1];
        let Some(slot) = cur.get_mut(last) else {
            return;
        };
        if slot == "auto" {
            *slot = hf;
        } else if must_match && !json_eq(slot, &hf) {
            mismatches.push(format!("- ds {key}={slot} vs hf {hf_name}={hf}"));
        }
    };
    let lr = args.learning_rate;
    fill(
        v,
        "train_micro_batch_size_per_gpu",
        micro.into(),
        "per_device_train_batch_size",
        true,
    );
    fill(
        v,
        "gradient_accumulation_steps",
        accum.into(),
        "gradient_accumulation_steps",
        true,
    );
    fill(
        v,
        "train_batch_size",
        (micro * accum * world).into(),
        "train_batch_size (world × micro × accumulation)",
        true,
    );
    fill(
        v,
        "gradient_clipping",
        args.max_grad_norm.into(),
        "max_grad_norm",
        true,
    );
    fill(v, "optimizer.params.lr", lr.into(), "learning_rate", true);
    fill(
        v,
        "optimizer.params.betas",
        serde_json::json!([args.adam_beta1, args.adam_beta2]),
        "adam_beta1+adam_beta2",
        true,
    );
    fill(
        v,
        "optimizer.params.eps",
        args.adam_epsilon.into(),
        "adam_epsilon",
        true,
    );
    fill(
        v,
        "optimizer.params.weight_decay",
        args.weight_decay.into(),
        "weight_decay",
        true,
    );
    fill(
        v,
        "scheduler.params.warmup_min_lr",
        0.0.into(),
        "(0)",
        false,
    );
    fill(
        v,
        "scheduler.params.warmup_max_lr",
        lr.into(),
        "learning_rate",
        true,
    );
    fill(v, "fp16.enabled", args.fp16.into(), "fp16", true);
    fill(v, "bf16.enabled", args.bf16.into(), "bf16", true);
    let h2 = hidden_size * hidden_size;
    fill(
        v,
        "zero_optimization.reduce_bucket_size",
        h2.into(),
        "hidden_size²",
        false,
    );
    fill(
        v,
        "zero_optimization.stage3_prefetch_bucket_size",
        ((0.9 * h2 as f64) as usize).into(),
        "0.9 × hidden_size²",
        false,
    );
    fill(
        v,
        "zero_optimization.stage3_param_persistence_threshold",
        (10 * hidden_size).into(),
        "10 × hidden_size",
        false,
    );
    if !mismatches.is_empty() {
        return Err(format!(
            "these DeepSpeed config values contradict TrainingArguments (set them to \"auto\" to take the TrainingArguments value):\n{}",
            mismatches.join("\n")
        ));
    }
    Ok(())
}
