//! A ds_config.json as types: every key DeepSpeed 0.19 knows in the blocks
//! it validates with pydantic (`DeepSpeedZeroConfig`, the offload configs,
//! `DeepSpeedFP16Config`, `DeepSpeedBF16Config`, all `extra="forbid"`), the
//! top-level keys it reads itself, and the `optimizer` / `scheduler` blocks.
//! These structs are the one list of keys: deserialising refuses what
//! DeepSpeed refuses, with its coercions ([`super::ds_values`]), and says
//! where (`zero_optimization.reduce_bucket_size: must be at least 1, got -5`).
//! The rules between fields (batch arithmetic, offload needs a stage,
//! TrainingArguments) are [`super::ds_config`]'s. tests/deepspeed_parity.rs
//! compares the verdicts with DeepSpeed's on the same files.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::ds_values::{json, lax};

/// The whole file. Top-level keys not named here are kept in `unknown`
/// (DeepSpeed ignores them too); `"auto"`s are filled before this is read.
#[derive(Debug, Default, Deserialize)]
pub struct DsConfigFile {
    #[serde(default, deserialize_with = "json::uint")]
    pub train_batch_size: Option<usize>,
    #[serde(default, deserialize_with = "json::uint")]
    pub train_micro_batch_size_per_gpu: Option<usize>,
    #[serde(default, deserialize_with = "json::uint")]
    pub gradient_accumulation_steps: Option<usize>,
    #[serde(default, deserialize_with = "json::float")]
    pub gradient_clipping: Option<f64>,
    #[serde(default, deserialize_with = "json::uint")]
    pub steps_per_print: Option<usize>,
    #[serde(default, deserialize_with = "json::bool")]
    pub wall_clock_breakdown: Option<bool>,
    #[serde(default)]
    pub zero_optimization: Option<ZeroBlock>,
    #[serde(default)]
    pub fp16: Option<Fp16Block>,
    #[serde(default)]
    pub bf16: Option<Bf16Block>,
    #[serde(default)]
    pub optimizer: Option<OptimizerBlock>,
    #[serde(default)]
    pub scheduler: Option<SchedulerBlock>,
    /// `autotp_size` and `stages`: read with the layout, before the rest
    /// (`ds_config::model_parallel_sizes`).
    pub tensor_parallel: Option<Value>,
    pub pipeline: Option<Value>,
    // DeepSpeed's keys that runs here accept and do not act on.
    pub zero_allow_untested_optimizer: Option<Value>,
    pub zero_force_ds_cpu_optimizer: Option<Value>,
    pub prescale_gradients: Option<Value>,
    pub gradient_predivide_factor: Option<Value>,
    pub communication_data_type: Option<Value>,
    pub dump_state: Option<Value>,
    pub tensorboard: Option<Value>,
    pub wandb: Option<Value>,
    pub csv_monitor: Option<Value>,
    pub flops_profiler: Option<Value>,
    pub comms_logger: Option<Value>,
    pub activation_checkpointing: Option<Value>,
    pub checkpoint: Option<Value>,
    pub data_types: Option<Value>,
    pub amp: Option<Value>,
    /// Keys DeepSpeed does not know either.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// `DeepSpeedZeroConfig`'s fields, by name and by alias (it populates by both).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZeroBlock {
    #[serde(default, deserialize_with = "lax::stage")]
    pub stage: Option<u8>,
    #[serde(default)]
    pub offload_optimizer: Option<OffloadOptimizerBlock>,
    #[serde(default)]
    pub offload_param: Option<OffloadParamBlock>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub contiguous_gradients: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub reduce_scatter: Option<bool>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 1>")]
    pub reduce_bucket_size: Option<i64>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub use_multi_rank_bucket_allreduce: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub allgather_partitions: Option<bool>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub allgather_bucket_size: Option<i64>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub overlap_comm: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub compute_grad_norm: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub load_from_fp32_weights: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub elastic_checkpoint: Option<bool>,
    pub zenflow: Option<Value>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub sub_group_size: Option<i64>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub cpu_offload_param: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub cpu_offload_use_pin_memory: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub cpu_offload: Option<bool>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub prefetch_bucket_size: Option<i64>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub stage3_prefetch_bucket_size: Option<i64>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub param_persistence_threshold: Option<i64>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub stage3_param_persistence_threshold: Option<i64>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub model_persistence_threshold: Option<i64>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub stage3_model_persistence_threshold: Option<i64>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub max_live_parameters: Option<i64>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub stage3_max_live_parameters: Option<i64>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub max_reuse_distance: Option<i64>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub stage3_max_reuse_distance: Option<i64>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub gather_16bit_weights_on_model_save: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub stage3_gather_16bit_weights_on_model_save: Option<bool>,
    #[serde(default, deserialize_with = "lax::int")]
    pub module_granularity_threshold: Option<i64>,
    #[serde(default, deserialize_with = "lax::int")]
    pub stage3_module_granularity_threshold: Option<i64>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub use_all_reduce_for_fetch_params: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub stage3_use_all_reduce_for_fetch_params: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub allgather_sequential: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub stage3_allgather_sequential: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub stage3_gather_fp16_weights_on_model_save: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub ignore_unused_parameters: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub legacy_stage1: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub round_robin_gradients: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub parameter_alignment: Option<bool>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub zero_hpz_partition_size: Option<i64>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub zero_quantized_weights: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub zero_quantized_nontrainable_weights: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub zero_quantized_gradients: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub memory_efficient_linear: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub pipeline_loading_checkpoint: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub override_module_apply: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub log_trace_cache_warnings: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub enable_sanity_checks: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub save_muon_momentum_buffer_in_memory: Option<bool>,
    pub leaf_module: Option<Value>,
}

/// Where an offload block puts its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffloadTarget {
    None,
    Cpu,
    Nvme,
}

/// `DeepSpeedZeroOffloadOptimizerConfig`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffloadOptimizerBlock {
    #[serde(default)]
    pub device: Option<OffloadTarget>,
    pub nvme_path: Option<Value>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub buffer_count: Option<i64>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub pin_memory: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub pipeline_read: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub pipeline_write: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub fast_init: Option<bool>,
    #[serde(default, deserialize_with = "lax::fraction")]
    pub ratio: Option<f64>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub super_offload: Option<bool>,
    #[serde(default, deserialize_with = "lax::fraction")]
    pub cpuadam_cores_perc: Option<f64>,
}

/// `DeepSpeedZeroOffloadParamConfig`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffloadParamBlock {
    #[serde(default)]
    pub device: Option<OffloadTarget>,
    pub nvme_path: Option<Value>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub buffer_count: Option<i64>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub buffer_size: Option<i64>,
    #[serde(default, deserialize_with = "lax::int_at_least::<_, 0>")]
    pub max_in_cpu: Option<i64>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub pin_memory: Option<bool>,
}

/// `DeepSpeedFP16Config` (dynamic loss scaling when `loss_scale` is 0).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fp16Block {
    #[serde(default, deserialize_with = "lax::bool")]
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub auto_cast: Option<bool>,
    #[serde(default, deserialize_with = "lax::float")]
    pub loss_scale: Option<f64>,
    #[serde(default, deserialize_with = "lax::int")]
    pub initial_scale_power: Option<i64>,
    #[serde(default, deserialize_with = "lax::int")]
    pub loss_scale_window: Option<i64>,
    #[serde(default, deserialize_with = "lax::int")]
    pub hysteresis: Option<i64>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub consecutive_hysteresis: Option<bool>,
    #[serde(default, deserialize_with = "lax::int")]
    pub min_loss_scale: Option<i64>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub fp16_master_weights_and_grads: Option<bool>,
}

/// `DeepSpeedBF16Config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bf16Block {
    #[serde(default, deserialize_with = "lax::bool")]
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub immediate_grad_update: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub check_grad_overflow: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub bf16_master_weights_and_grads: Option<bool>,
    #[serde(default, deserialize_with = "lax::bool")]
    pub bf16_optimizer_states: Option<bool>,
}

/// The `optimizer` block.
#[derive(Debug, Default, Deserialize)]
pub struct OptimizerBlock {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub params: Option<OptimizerParams>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// AdamW's parameters (DeepSpeed's `Adam` takes `adam_w_mode`).
#[derive(Debug, Default, Deserialize)]
pub struct OptimizerParams {
    #[serde(default, deserialize_with = "json::float")]
    pub lr: Option<f64>,
    #[serde(default, deserialize_with = "json::pair")]
    pub betas: Option<(f64, f64)>,
    #[serde(default, deserialize_with = "json::float")]
    pub eps: Option<f64>,
    #[serde(default, deserialize_with = "json::float")]
    pub weight_decay: Option<f64>,
    #[serde(default, deserialize_with = "json::bool")]
    pub adam_w_mode: Option<bool>,
    pub torch_adam: Option<Value>,
    /// Parameters of other optimizers: accepted, not acted on.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// The `scheduler` block.
#[derive(Debug, Default, Deserialize)]
pub struct SchedulerBlock {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub params: Option<SchedulerParams>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// The parameters of DeepSpeed's warmup schedules.
#[derive(Debug, Default, Deserialize)]
pub struct SchedulerParams {
    #[serde(default, deserialize_with = "json::float")]
    pub warmup_min_lr: Option<f64>,
    #[serde(default, deserialize_with = "json::float")]
    pub warmup_max_lr: Option<f64>,
    #[serde(default, deserialize_with = "steps")]
    pub warmup_num_steps: Option<Steps>,
    #[serde(default, deserialize_with = "steps")]
    pub total_num_steps: Option<Steps>,
    pub warmup_type: Option<WarmupType>,
    #[serde(default, deserialize_with = "json::float")]
    pub warmup_min_ratio: Option<f64>,
    #[serde(default, deserialize_with = "json::float")]
    pub cos_min_ratio: Option<f64>,
    pub last_batch_iteration: Option<Value>,
    /// Parameters of other schedules: accepted, not acted on.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// A step count, or "auto" (HF fills it when the Trainer knows the total).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steps {
    Auto,
    N(usize),
}

fn steps<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Steps>, D::Error> {
    let v = Value::deserialize(d)?;
    if v == "auto" {
        return Ok(Some(Steps::Auto));
    }
    Ok(json::uint(&v)
        .map_err(serde::de::Error::custom)?
        .map(Steps::N))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmupType {
    Log,
    Linear,
}

/// Read `v` (its "auto"s filled) as DeepSpeed would. `Err` says
/// `block.key: reason`.
pub fn parse(v: &Value) -> Result<DsConfigFile, String> {
    if !v.is_object() {
        return Err("expected a JSON object at the top level".into());
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde lists every field it knows; DeepSpeed says "extra inputs".
        if inner.starts_with("unknown field") {
            format!("{path}: not a field DeepSpeed knows (extra inputs are not permitted)")
        } else {
            format!("{path}: {inner}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn blocks_are_coerced_and_checked_as_deepspeed_does() {
        let f = parse(
            &json!({"zero_optimization": {"stage": "2", "overlap_comm": "yes",
            "reduce_bucket_size": 5e8, "offload_optimizer": {"device": "cpu", "ratio": "0.5"}},
            "foo": 1}),
        )
        .unwrap();
        let z = f.zero_optimization.unwrap();
        assert_eq!(z.stage, Some(2));
        assert_eq!(z.overlap_comm, Some(true));
        assert_eq!(z.reduce_bucket_size, Some(500_000_000));
        let o = z.offload_optimizer.unwrap();
        assert_eq!((o.device, o.ratio), (Some(OffloadTarget::Cpu), Some(0.5)));
        assert!(f.unknown.contains_key("foo"));
        for (bad, want) in [
            (
                json!({"zero_optimization": {"reduce_bucket_size": -5}}),
                "zero_optimization.reduce_bucket_size: must be at least 1, got -5",
            ),
            (
                json!({"zero_optimization": {"reduce_bucket_size": "big"}}),
                "zero_optimization.reduce_bucket_size: expected an integer",
            ),
            (
                json!({"zero_optimization": {"no_such_key": 1}}),
                "zero_optimization.no_such_key: not a field DeepSpeed knows",
            ),
            (
                json!({"zero_optimization": {"offload_optimizer": {"device": "gpu"}}}),
                "zero_optimization.offload_optimizer.device: unknown variant `gpu`",
            ),
            (
                json!({"fp16": {"enabled": true, "foo": 1}}),
                "fp16.foo: not a field",
            ),
            (
                json!({"zero_optimization": 3}),
                "zero_optimization: invalid type",
            ),
            (
                json!({"train_micro_batch_size_per_gpu": "2"}),
                "train_micro_batch_size_per_gpu: expected a non-negative integer",
            ),
            (
                json!({"optimizer": {"params": {"betas": [0.9]}}}),
                "optimizer.params.betas: expected [beta1, beta2]",
            ),
            (json!([1]), "expected a JSON object at the top level"),
        ] {
            let e = parse(&bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
