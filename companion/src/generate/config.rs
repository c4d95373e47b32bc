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

/// `early_stopping`: `true`, `false` or `"never"` (beam search only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EarlyStopping {
    Bool(bool),
    Never(NeverTag),
}

/// The string `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NeverTag {
    #[serde(rename = "never")]
    Never,
}

impl Default for EarlyStopping {
    fn default() -> Self {
        EarlyStopping::Bool(false)
    }
}

/// Fields of transformers' `GenerationConfig` that change what its
/// `generate` does for GPT-2 and that ours does not implement, with their
/// defaults: a file that sets one to another value is refused, naming it.
const NOT_IMPLEMENTED: &[(&str, &str)] = &[
    ("typical_p", "1.0"),
    ("encoder_repetition_penalty", "1.0"),
    ("encoder_no_repeat_ngram_size", "0"),
    ("epsilon_cutoff", "0.0"),
    ("eta_cutoff", "0.0"),
    ("min_p", "null"),
    ("top_h", "null"),
    ("diversity_penalty", "0.0"),
    ("num_beam_groups", "1"),
    ("penalty_alpha", "null"),
    ("dola_layers", "null"),
    ("renormalize_logits", "false"),
    ("forced_bos_token_id", "null"),
    ("forced_eos_token_id", "null"),
    ("remove_invalid_values", "false"),
    ("exponential_decay_length_penalty", "null"),
    ("sequence_bias", "null"),
    ("token_healing", "false"),
    ("guidance_scale", "null"),
    ("watermarking_config", "null"),
    ("constraints", "null"),
    ("force_words_ids", "null"),
    ("max_time", "null"),
    ("stop_strings", "null"),
    ("prompt_lookup_num_tokens", "null"),
];

/// `transformers.GenerationConfig`: the fields `generate` reads, HF defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    /// Total length (prompt included); `max_new_tokens` wins when set.
    /// Unset (and no `max_new_tokens`): 20 new tokens, at most the model's
    /// positions, as transformers 5 does when no one sets `max_length`.
    pub max_length: Option<usize>,
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
    /// Beam search when > 1 (`do_sample` must be off).
    pub num_beams: usize,
    /// Beam scores are divided by (new tokens)^length_penalty.
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    /// Total length (prompt included) before eos may be chosen.
    pub min_length: usize,
    /// Token sequences never to generate (the last token of each is banned
    /// where the others precede it).
    pub bad_words_ids: Option<Vec<Vec<u32>>>,
    /// Tokens never generated.
    pub suppress_tokens: Option<Vec<u32>>,
    /// Tokens not generated as the first new token.
    pub begin_suppress_tokens: Option<Vec<u32>>,
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
            max_length: None,
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
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::default(),
            min_length: 0,
            bad_words_ids: None,
            suppress_tokens: None,
            begin_suppress_tokens: None,
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

    /// transformers refuses `bad_words_ids` naming a token the model does
    /// not have.
    pub(crate) fn validate_ids(&self, vocab_size: usize) -> Result<()> {
        let beyond = self
            .bad_words_ids
            .iter()
            .flatten()
            .flatten()
            .find(|&&t| t as usize >= vocab_size);
        match beyond {
            Some(t) => Err(ModelError::Input(format!(
                "bad_words_ids names token {t}, beyond the model's vocabulary of {vocab_size}"
            ))),
            None => Ok(()),
        }
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
        if self.num_beams == 0 {
            return bad("num_beams must be at least 1".into());
        }
        if self.num_beams > 1 && self.do_sample {
            return bad(
                "beam sampling (do_sample with num_beams > 1) is not implemented: set do_sample \
                 false for beam search, or num_beams 1 for sampling"
                    .into(),
            );
        }
        if self.num_return_sequences > self.num_beams && !self.do_sample {
            return bad(format!(
                "num_return_sequences {} is more than num_beams {}: greedy decoding gives one \
                 sequence per prompt and beam search at most num_beams",
                self.num_return_sequences, self.num_beams
            ));
        }
        if !self.length_penalty.is_finite() {
            return bad(format!(
                "length_penalty must be finite, got {}",
                self.length_penalty
            ));
        }
        if let Some(b) = &self.bad_words_ids {
            if b.is_empty() || b.iter().any(|seq| seq.is_empty()) {
                return bad(
                    "bad_words_ids must be a non-empty list of non-empty lists of token ids".into(),
                );
            }
        }
        for (key, default) in NOT_IMPLEMENTED {
            let Some(v) = self.extra.get(*key) else {
                continue;
            };
            let default: serde_json::Value = serde_json::from_str(default).expect("a JSON default");
            let same = v.is_null()
                || *v == default
                || (v.as_f64().is_some() && v.as_f64() == default.as_f64());
            if !same {
                return bad(format!(
                    "generation config field {key} = {v} is not implemented here (transformers' \
                     generate would honour it): remove it, or set it to {default}"
                ));
            }
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
