//! JSON written the way Python's `json.dumps(obj, indent=2, sort_keys=True)`
//! writes it, so that `config.json` and `trainer_state.json` look exactly like
//! the ones `transformers` writes (floats as `1e-05`, `0.1`, `3.0`); and
//! JSON read with its duplicate keys refused.

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// Python's `repr(float)`: shortest round-trip digits, `1e-05` for small and
/// large magnitudes, `3.0` for integral values.
pub fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let a = x.abs();
    if (1e-4..1e16).contains(&a) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        // Rust prints `1e-5`; Python prints `1e-05` (two exponent digits at least).
        let s = format!("{x:e}");
        let (mant, exp) = s.split_once('e').expect("exponent");
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ("-", d),
            None => ("+", exp),
        };
        format!("{mant}e{sign}{digits:0>2}")
    }
}

fn escape(s: &str) -> String {
    // Python's default ensure_ascii=True escapes non-ASCII characters.
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn write(v: &Value, indent: usize, out: &mut String) {
    let pad = |n: usize| " ".repeat(n);
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if n.is_f64() {
                out.push_str(&float_repr(n.as_f64().unwrap_or(0.0)))
            } else {
                out.push_str(&n.to_string())
            }
        }
        Value::String(s) => out.push_str(&escape(s)),
        Value::Array(a) => {
            if a.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push_str("[\n");
            for (i, x) in a.iter().enumerate() {
                out.push_str(&pad(indent + 2));
                write(x, indent + 2, out);
                if i + 1 < a.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&pad(indent));
            out.push(']');
        }
        Value::Object(o) => {
            if o.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            out.push_str("{\n");
            for (i, k) in keys.iter().enumerate() {
                out.push_str(&pad(indent + 2));
                out.push_str(&escape(k));
                out.push_str(": ");
                write(&o[*k], indent + 2, out);
                if i + 1 < keys.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&pad(indent));
            out.push('}');
        }
    }
}

/// `json.dumps(v, indent=2, sort_keys=True)`.
pub fn dumps(v: &Value) -> String {
    let mut out = String::new();
    write(v, 0, &mut out);
    out
}

/// `Err` naming the first key given twice in one object, anywhere in
/// `text` (`a.b` for a key inside `a`). Python's `json` and serde_json keep
/// the last silently; DeepSpeed refuses such a config, and a safetensors
/// header with one would lose a tensor and blame another.
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
                return Err(de::Error::custom(format!("duplicate key `{path}`")));
            }
            map.next_value_seed(NoDuplicates(path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_like_python() {
        assert_eq!(float_repr(1e-5), "1e-05");
        assert_eq!(float_repr(0.1), "0.1");
        assert_eq!(float_repr(3.0), "3.0");
        assert_eq!(float_repr(0.02), "0.02");
        assert_eq!(float_repr(1e-4), "0.0001");
        assert_eq!(float_repr(2.5e-7), "2.5e-07");
        assert_eq!(float_repr(1e16), "1e+16");
    }

    #[test]
    fn sorted_and_indented() {
        let v = serde_json::json!({"b": [1, 2.0], "a": {"x": null}, "c": "é"});
        assert_eq!(
            dumps(&v),
            "{\n  \"a\": {\n    \"x\": null\n  },\n  \"b\": [\n    1,\n    2.0\n  ],\n  \"c\": \"\\u00e9\"\n}"
        );
    }

    #[test]
    fn duplicates_are_found_at_any_depth() {
        super::refuse_duplicate_keys(r#"{"a": {"b": 1, "c": [ {"d": 1} ]}}"#).unwrap();
        let e = super::refuse_duplicate_keys(r#"{"z": {"stage": 2, "stage": 3}}"#).unwrap_err();
        assert!(e.contains("duplicate key `z.stage`"), "{e}");
    }
}
