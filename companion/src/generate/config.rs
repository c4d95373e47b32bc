//! `GenerationConfig`: HF's names and defaults, `generation_config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::{ModelError, Result};

/// One id or several, as `eos_token_id` may be in `generation_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// `transformers.GenerationConfig`: the fields `generate` reads, HF defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    /// Total length (prompt included); `max_new_tokens` wins when set.
    pub max_length: usize,
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub do_sample: bool,
    pub temperature: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    pub top_p: f64,
    pub repetition_penalty: f64,
    pub no_repeat_ngram_size: usize,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub num_return_sequences: usize,
    /// Seed of the sampling generator (HF uses `torch.manual_seed`; ours
    /// cannot reproduce torch's numbers, only our own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Every other key of `generation_config.json`, kept.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_length: 20,
            max_new_tokens: None,
            min_new_tokens: None,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            eos_token_id: None,
            pad_token_id: None,
            bos_token_id: None,
            num_return_sequences: 1,
            seed: None,
            extra: serde_json::Map::new(),
        }
    }
}

impl GenerationConfig {
    /// `GenerationConfig.from_model_config(config)`: bos/eos/pad from the model.
    pub fn from_model_config(cfg: &crate::config::GPT2Config) -> Self {
        GenerationConfig {
            bos_token_id: cfg.bos_token_id,
            eos_token_id: cfg.eos_token_id.map(TokenIds::One),
            pad_token_id: cfg.pad_token_id,
            ..Default::default()
        }
    }

    /// Read `generation_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let err = |msg: String| ModelError::File {
            file: path.display().to_string(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| err(format!("not a generation config: {e}")))
    }

    /// The model folder's `generation_config.json`, else one from its config.
    pub fn from_pretrained(id_or_dir: &str, model_cfg: &crate::config::GPT2Config) -> Result<Self> {
        match crate::hub::get_optional(id_or_dir, "generation_config.json") {
            Some(p) => Self::from_file(&p),
            None => Ok(Self::from_model_config(model_cfg)),
        }
    }

    /// The JSON `save_pretrained` writes: only the fields that differ from
    /// the defaults, as transformers' `to_json_string(use_diff=True)` does
    /// (writing `"max_length": 20` beside a `max_new_tokens` makes
    /// transformers warn that both are set).
    pub fn to_json_string(&self) -> String {
        let default = serde_json::to_value(GenerationConfig::default()).expect("serialises");
        let mut v = serde_json::to_value(self).expect("serialises");
        if let (Some(obj), Some(d)) = (v.as_object_mut(), default.as_object()) {
            obj.retain(|k, x| d.get(k) != Some(x));
        }
        crate::hf_json::dumps(&v) + "\n"
    }

    /// Write `generation_config.json` into `dir` (atomically).
    pub fn save_pretrained(&self, dir: &Path) -> std::io::Result<()> {
        crate::atomic_write::write_files_atomically(
            dir,
            &[("generation_config.json", self.to_json_string().as_bytes())],
        )
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Input(m));
        // Written so that NaN fails every check.
        if !(self.temperature.is_finite() && (self.temperature > 0.0 || !self.do_sample)) {
            return bad(format!(
                "temperature must be a finite number (> 0 when sampling), got {}",
                self.temperature
            ));
        }
        // Logits are divided by it in f32: 1e-50 would make them all infinite.
        if self.do_sample && !(1.0 / self.temperature as f32).is_finite() {
            return bad(format!(
                "temperature {:e} is too small: logits divided by it overflow (give at least 1e-30)",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            ));
        }
        if self.num_return_sequences == 0 {
            return bad("num_return_sequences must be at least 1".into());
        }
        if self.num_return_sequences > 1 && !self.do_sample {
            return bad(
                "greedy decoding gives one sequence per prompt: num_return_sequences > 1 needs do_sample"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_json_holds_only_what_differs_from_the_defaults() {
        let mut g = GenerationConfig {
            bos_token_id: Some(0),
            eos_token_id: Some(TokenIds::One(0)),
            ..Default::default()
        };
        g.max_new_tokens = Some(40);
        let v: serde_json::Value = serde_json::from_str(&g.to_json_string()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["bos_token_id", "eos_token_id", "max_new_tokens"]);
        let back: GenerationConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back, g);
    }

    #[test]
    fn nan_settings_are_refused() {
        for g in [
            GenerationConfig {
                temperature: f64::NAN,
                ..Default::default()
            },
            GenerationConfig {
                temperature: f64::NAN,
                do_sample: true,
                ..Default::default()
            },
            GenerationConfig {
                repetition_penalty: f64::NAN,
                ..Default::default()
            },
            GenerationConfig {
                top_p: f64::NAN,
                ..Default::default()
            },
        ] {
            assert!(g.validate().is_err(), "{g:?}");
        }
    }
}
