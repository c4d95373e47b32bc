//! How DeepSpeed reads the values of a ds_config, for the types in
//! [`super::ds_schema`] to deserialise with (`deserialize_with`):
//! - the blocks DeepSpeed checks with pydantic (`zero_optimization`, its
//!   offload blocks, `fp16`, `bf16`) coerce in pydantic's lax mode (`"2"` for
//!   2, `"yes"` for true, `5e8` for an integer): [`lax`];
//! - the rest DeepSpeed reads as plain JSON values: [`json`];
//!
//! Written by hand: pydantic's coercion rules exist in no Rust crate.

use serde::de::{self, Deserialize, Deserializer};
use serde_json::Value;

/// An error for the value `v`: "expected WHAT, got V".
fn expected<E: de::Error>(what: &str, v: &Value) -> E {
    E::custom(format!("expected {what}, got {v}"))
}

/// pydantic's lax mode. Each function reads an optional field: absent and
/// `null` are `None` (every field here is optional or has a default).
pub mod lax {
    use super::*;

    pub fn bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        let v = Value::deserialize(d)?;
        Ok(Some(match &v {
            Value::Null => return Ok(None),
            Value::Bool(b) => *b,
            Value::Number(n) if n.as_f64() == Some(0.0) => false,
            Value::Number(n) if n.as_f64() == Some(1.0) => true,
            Value::String(s) => match s.to_ascii_lowercase().as_str() {
                "0" | "off" | "f" | "false" | "n" | "no" => false,
                "1" | "on" | "t" | "true" | "y" | "yes" => true,
                _ => return Err(expected("a boolean", &v)),
            },
            _ => return Err(expected("a boolean", &v)),
        }))
    }

    /// An integer as pydantic reads one: a JSON integer, a float without a
    /// fractional part, or a string of digits.
    pub fn int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        let v = Value::deserialize(d)?;
        let n = match &v {
            Value::Null => return Ok(None),
            Value::Number(n) => n.as_i64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.2e18)
                    .map(|f| f as i64)
            }),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        n.map(Some).ok_or_else(|| expected("an integer", &v))
    }

    /// An integer of at least `MIN` (pydantic's `Field(ge=MIN)`).
    pub fn int_at_least<'de, D: Deserializer<'de>, const MIN: i64>(
        d: D,
    ) -> Result<Option<i64>, D::Error> {
        match int(d)? {
            Some(n) if n < MIN => Err(de::Error::custom(format!(
                "must be at least {MIN}, got {n}"
            ))),
            n => Ok(n),
        }
    }

    /// ZeRO's stage: 0, 1, 2 or 3.
    pub fn stage<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
        match int(d)? {
            Some(n @ 0..=3) => Ok(Some(n as u8)),
            Some(n) => Err(de::Error::custom(format!("expected 0, 1, 2 or 3, got {n}"))),
            None => Ok(None),
        }
    }

    /// A number (a string of one too).
    pub fn float<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        let v = Value::deserialize(d)?;
        let x = match &v {
            Value::Null => return Ok(None),
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        x.map(Some).ok_or_else(|| expected("a number", &v))
    }

    /// A number in [0, 1].
    pub fn fraction<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        match float(d)? {
            Some(x) if !(0.0..=1.0).contains(&x) => {
                Err(de::Error::custom(format!("must be in [0, 1], got {x}")))
            }
            x => Ok(x),
        }
    }
}

/// Plain JSON values, as DeepSpeed reads the keys pydantic does not check.
pub mod json {
    use super::*;

    pub fn uint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        let v = Value::deserialize(d)?;
        let n = match &v {
            Value::Null => return Ok(None),
            Value::Number(n) => n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19)
                    .map(|f| f as u64)
            }),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| expected("a non-negative integer", &v))
    }

    pub fn float<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        let v = Value::deserialize(d)?;
        match &v {
            Value::Null => Ok(None),
            Value::Number(n) => Ok(n.as_f64()),
            _ => Err(expected("a number", &v)),
        }
    }

    pub fn bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        let v = Value::deserialize(d)?;
        match &v {
            Value::Null => Ok(None),
            Value::Bool(b) => Ok(Some(*b)),
            _ => Err(expected("true or false", &v)),
        }
    }

    /// Adam's `[beta1, beta2]`.
    pub fn pair<'de, D: Deserializer<'de>>(d: D) -> Result<Option<(f64, f64)>, D::Error> {
        let v = Value::deserialize(d)?;
        match &v {
            Value::Null => Ok(None),
            Value::Array(a) if a.len() == 2 && a.iter().all(Value::is_number) => Ok(Some((
                a[0].as_f64().expect("a number"),
                a[1].as_f64().expect("a number"),
            ))),
            _ => Err(expected("[beta1, beta2]", &v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_coerced_as_pydantic_does() {
        let int = |v: Value| lax::int_at_least::<_, 1>(&v).map_err(|e| e.to_string());
        assert_eq!(int(json!(5e8)), Ok(Some(500_000_000)));
        assert_eq!(int(json!("2")), Ok(Some(2)));
        assert_eq!(int(Value::Null), Ok(None));
        for bad in [json!(-5), json!("big"), json!(1.5), json!([1])] {
            assert!(int(bad.clone()).is_err(), "{bad}");
        }
        assert_eq!(lax::bool(&json!("yes")).unwrap(), Some(true));
        assert_eq!(lax::bool(&json!(0)).unwrap(), Some(false));
        assert!(lax::bool(&json!("maybe")).is_err());
        assert_eq!(lax::stage(&json!("2")).unwrap(), Some(2));
        assert!(lax::stage(&json!(5)).is_err());
        assert!(lax::fraction(&json!(2)).is_err());
        // Outside the pydantic blocks, strings are not numbers.
        assert!(json::uint(&json!("2")).is_err());
        assert!(json::uint(&json!(-2)).is_err());
        assert_eq!(json::uint(&json!(4.0)).unwrap(), Some(4));
        assert!(json::float(&json!("big")).is_err());
    }
}
