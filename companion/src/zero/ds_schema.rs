//! DeepSpeed's own validation of a ds_config, as its pydantic models do it
//! (DeepSpeed 0.19: `DeepSpeedZeroConfig`, the offload configs,
//! `DeepSpeedFP16Config`, `DeepSpeedBF16Config`, all with
//! `extra="forbid"`), and its refusal of duplicate keys. A config DeepSpeed
//! refuses is refused here with the same reason; values pydantic coerces
//! (`"2"` for 2, `"yes"` for true, `5e8` for an integer) are coerced the same
//! way. tests/zero.rs compares the verdicts with DeepSpeed's on the same
//! files (tests/fixtures/ds_verdicts.json).

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// What a field accepts.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Bool,
    /// An integer, at least `min`.
    Int {
        min: i64,
    },
    /// An integer of any sign.
    AnyInt,
    /// A number in `[min, max]`.
    Float {
        min: f64,
        max: f64,
    },
    Stage,
    Device,
    /// A nested model checked by its own table.
    Offload(&'static [(&'static str, Kind)]),
    /// Anything (a path, a nested model we do not use).
    Any,
}

use Kind::*;

const OFFLOAD_OPTIMIZER: &[(&str, Kind)] = &[
    ("device", Device),
    ("nvme_path", Any),
    ("buffer_count", Int { min: 0 }),
    ("pin_memory", Bool),
    ("pipeline_read", Bool),
    ("pipeline_write", Bool),
    ("fast_init", Bool),
    ("ratio", Float { min: 0.0, max: 1.0 }),
    ("super_offload", Bool),
    ("cpuadam_cores_perc", Float { min: 0.0, max: 1.0 }),
];

const OFFLOAD_PARAM: &[(&str, Kind)] = &[
    ("device", Device),
    ("nvme_path", Any),
    ("buffer_count", Int { min: 0 }),
    ("buffer_size", Int { min: 0 }),
    ("max_in_cpu", Int { min: 0 }),
    ("pin_memory", Bool),
];

/// `DeepSpeedZeroConfig`'s fields, by name and by alias (it populates by both).
const ZERO: &[(&str, Kind)] = &[
    ("stage", Stage),
    ("contiguous_gradients", Bool),
    ("reduce_scatter", Bool),
    ("reduce_bucket_size", Int { min: 1 }),
    ("use_multi_rank_bucket_allreduce", Bool),
    ("allgather_partitions", Bool),
    ("allgather_bucket_size", Int { min: 0 }),
    ("overlap_comm", Bool),
    ("compute_grad_norm", Bool),
    ("load_from_fp32_weights", Bool),
    ("elastic_checkpoint", Bool),
    ("offload_param", Offload(OFFLOAD_PARAM)),
    ("offload_optimizer", Offload(OFFLOAD_OPTIMIZER)),
    ("zenflow", Any),
    ("sub_group_size", Int { min: 0 }),
    ("cpu_offload_param", Bool),
    ("cpu_offload_use_pin_memory", Bool),
    ("cpu_offload", Bool),
    ("prefetch_bucket_size", Int { min: 0 }),
    ("stage3_prefetch_bucket_size", Int { min: 0 }),
    ("param_persistence_threshold", Int { min: 0 }),
    ("stage3_param_persistence_threshold", Int { min: 0 }),
    ("model_persistence_threshold", Int { min: 0 }),
    ("stage3_model_persistence_threshold", Int { min: 0 }),
    ("max_live_parameters", Int { min: 0 }),
    ("stage3_max_live_parameters", Int { min: 0 }),
    ("max_reuse_distance", Int { min: 0 }),
    ("stage3_max_reuse_distance", Int { min: 0 }),
    ("gather_16bit_weights_on_model_save", Bool),
    ("stage3_gather_16bit_weights_on_model_save", Bool),
    ("module_granularity_threshold", AnyInt),
    ("stage3_module_granularity_threshold", AnyInt),
    ("use_all_reduce_for_fetch_params", Bool),
    ("stage3_use_all_reduce_for_fetch_params", Bool),
    ("allgather_sequential", Bool),
    ("stage3_allgather_sequential", Bool),
    ("stage3_gather_fp16_weights_on_model_save", Bool),
    ("ignore_unused_parameters", Bool),
    ("legacy_stage1", Bool),
    ("round_robin_gradients", Bool),
    ("parameter_alignment", Bool),
    ("zero_hpz_partition_size", Int { min: 0 }),
    ("zero_quantized_weights", Bool),
    ("zero_quantized_nontrainable_weights", Bool),
    ("zero_quantized_gradients", Bool),
    ("memory_efficient_linear", Bool),
    ("pipeline_loading_checkpoint", Bool),
    ("override_module_apply", Bool),
    ("log_trace_cache_warnings", Bool),
    ("enable_sanity_checks", Bool),
    ("save_muon_momentum_buffer_in_memory", Bool),
    ("leaf_module", Any),
];

const FP16: &[(&str, Kind)] = &[
    ("enabled", Bool),
    ("auto_cast", Bool),
    (
        "loss_scale",
        Float {
            min: f64::MIN,
            max: f64::MAX,
        },
    ),
    ("initial_scale_power", AnyInt),
    ("loss_scale_window", AnyInt),
    ("hysteresis", AnyInt),
    ("consecutive_hysteresis", Bool),
    ("min_loss_scale", AnyInt),
    ("fp16_master_weights_and_grads", Bool),
];

const BF16: &[(&str, Kind)] = &[
    ("enabled", Bool),
    ("immediate_grad_update", Bool),
    ("check_grad_overflow", Bool),
    ("bf16_master_weights_and_grads", Bool),
    ("bf16_optimizer_states", Bool),
];

/// Check the blocks DeepSpeed validates with pydantic, coercing values as
/// pydantic does. `Err` says `block.key: reason`.
pub fn validate(config: &mut Value) -> Result<(), String> {
    let Some(top) = config.as_object_mut() else {
        return Err("expected a JSON object at the top level".into());
    };
    for (name, table) in [("zero_optimization", ZERO), ("fp16", FP16), ("bf16", BF16)] {
        match top.get_mut(name) {
            None | Some(Value::Null) => {}
            Some(Value::Object(o)) => check_block(name, o, table)?,
            Some(x) => return Err(format!("{name}: expected an object, got {x}")),
        }
    }
    Ok(())
}

fn check_block(
    path: &str,
    o: &mut Map<String, Value>,
    table: &[(&str, Kind)],
) -> Result<(), String> {
    for (k, v) in o.iter_mut() {
        let Some((_, kind)) = table.iter().find(|(n, _)| n == k) else {
            return Err(format!(
                "{path}.{k}: not a field DeepSpeed knows (extra inputs are not permitted)"
            ));
        };
        coerce(&format!("{path}.{k}"), v, *kind)?;
    }
    Ok(())
}

/// pydantic's lax-mode coercion of one value (None passes: every field
/// here is optional or has a default).
fn coerce(path: &str, v: &mut Value, kind: Kind) -> Result<(), String> {
    if v.is_null() {
        return Ok(());
    }
    let bad = |what: &str| Err(format!("{path}: expected {what}, got {v}"));
    match kind {
        Any => Ok(()),
        Bool => {
            let b = match &*v {
                Value::Bool(b) => *b,
                Value::Number(n) if n.as_i64() == Some(0) || n.as_f64() == Some(0.0) => false,
                Value::Number(n) if n.as_i64() == Some(1) || n.as_f64() == Some(1.0) => true,
                Value::String(s) => match s.to_ascii_lowercase().as_str() {
                    "0" | "off" | "f" | "false" | "n" | "no" => false,
                    "1" | "on" | "t" | "true" | "y" | "yes" => true,
                    _ => return bad("a boolean"),
                },
                _ => return bad("a boolean"),
            };
            *v = Value::Bool(b);
            Ok(())
        }
        Int { .. } | AnyInt | Stage => {
            let n = match as_integer(v) {
                Some(n) => n,
                None => return bad("an integer"),
            };
            match kind {
                Int { min } if n < min => {
                    return Err(format!("{path}: must be at least {min}, got {n}"))
                }
                Stage if !(0..=3).contains(&n) => {
                    return Err(format!("{path}: expected 0, 1, 2 or 3, got {n}"))
                }
                _ => {}
            }
            *v = Value::from(n);
            Ok(())
        }
        Float { min, max } => {
            let x = match &*v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            match x {
                Some(x) if x >= min && x <= max => {
                    *v = Value::from(x);
                    Ok(())
                }
                Some(x) => Err(format!("{path}: must be in [{min}, {max}], got {x}")),
                None => bad("a number"),
            }
        }
        Device => match v.as_str() {
            Some("none" | "cpu" | "nvme") => Ok(()),
            _ => bad("\"none\", \"cpu\" or \"nvme\""),
        },
        Offload(table) => match v {
            Value::Object(o) => check_block(path, o, table),
            _ => bad("an object"),
        },
    }
}

/// An integer as pydantic reads one: a JSON integer, a float without a
/// fractional part, or a string of digits.
fn as_integer(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.2e18)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// `Err` naming the first key given twice in one object, anywhere in
/// `text` (DeepSpeed loads its config with a hook that refuses them;
/// serde_json would silently keep the last).
pub fn refuse_duplicate_keys(text: &str) -> Result<(), String> {
    let mut de = serde_json::Deserializer::from_str(text);
    de::DeserializeSeed::deserialize(NoDuplicates(String::new()), &mut de)
        .map_err(|e| e.to_string())
}

/// Visits a JSON document, refusing a key seen twice in one object (the
/// string is the path so far, for the message).
struct NoDuplicates(String);

impl<'de> de::DeserializeSeed<'de> for NoDuplicates {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NoDuplicates {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while seq
            .next_element_seed(NoDuplicates(format!("{}[{i}]", self.0)))?
            .is_some()
        {
            i += 1;
        }
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(k) = map.next_key::<String>()? {
            let path = if self.0.is_empty() {
                k.clone()
            } else {
                format!("{}.{k}", self.0)
            };
            if !seen.insert(k) {
                return Err(de::Error::custom(format!(
                    "duplicate key `{path}` (DeepSpeed refuses configs with duplicate keys)"
                )));
            }
            map.next_value_seed(NoDuplicates(path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn duplicates_are_found_at_any_depth() {
        refuse_duplicate_keys(r#"{"a": {"b": 1, "c": [ {"d": 1} ]}}"#).unwrap();
        let e = refuse_duplicate_keys(r#"{"z": {"stage": 2, "stage": 3}}"#).unwrap_err();
        assert!(e.contains("duplicate key `z.stage`"), "{e}");
    }

    #[test]
    fn values_are_coerced_as_pydantic_does() {
        let mut v = json!({"zero_optimization": {"stage": "2", "overlap_comm": "yes",
            "reduce_bucket_size": 5e8}});
        validate(&mut v).unwrap();
        assert_eq!(
            v["zero_optimization"],
            json!({"stage": 2, "overlap_comm": true, "reduce_bucket_size": 500000000})
        );
        for bad in [
            json!({"zero_optimization": {"reduce_bucket_size": -5}}),
            json!({"zero_optimization": {"reduce_bucket_size": "big"}}),
            json!({"zero_optimization": {"reduce_bucket_size": 1.5}}),
            json!({"zero_optimization": {"no_such_key": 1}}),
            json!({"zero_optimization": {"offload_optimizer": {"device": "gpu"}}}),
            json!({"fp16": {"enabled": true, "foo": 1}}),
        ] {
            assert!(validate(&mut bad.clone()).is_err(), "{bad}");
        }
    }
}
