//! `GPT2Config`: every field of Hugging Face's GPT-2 `config.json`, read and
//! written so that Python `transformers` and we exchange the same file.
//! Unknown fields are kept and written back.
//!
//! A surprise kept on purpose, because `transformers` behaves so:
//! `n_ctx` is not a model parameter. `AutoConfig.from_pretrained("gpt2",
//! n_ctx=512)` only stores `n_ctx: 512`; the position table still has
//! `n_positions` (1024) rows, and that is what limits the sequence length.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::hub;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Hub(#[from] hub::HubError),
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    #[error("config: {0}")]
    Invalid(String),
}

/// The fields of `transformers.GPT2Config`, with its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GPT2Config {
    pub activation_function: String,
    pub attn_pdrop: f64,
    pub embd_pdrop: f64,
    pub resid_pdrop: f64,
    pub layer_norm_epsilon: f64,
    pub initializer_range: f64,
    /// Stored but not used by the model (see the module doc).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_ctx: Option<usize>,
    pub n_embd: usize,
    pub n_head: usize,
    /// MLP width; `None` means 4 × n_embd.
    pub n_inner: Option<usize>,
    pub n_layer: usize,
    pub n_positions: usize,
    pub vocab_size: usize,
    pub scale_attn_weights: bool,
    pub scale_attn_by_inverse_layer_idx: bool,
    pub reorder_and_upcast_attn: bool,
    pub use_cache: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub summary_type: String,
    pub summary_use_proj: bool,
    pub summary_activation: Option<String>,
    pub summary_proj_to_labels: bool,
    pub summary_first_dropout: f64,
    pub tie_word_embeddings: bool,
    pub add_cross_attention: bool,
    pub model_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// Every other key of `config.json` (`task_specific_params`,
    /// `transformers_version`, `dtype`, …), kept as read.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for GPT2Config {
    fn default() -> Self {
        GPT2Config {
            activation_function: "gelu_new".into(),
            attn_pdrop: 0.1,
            embd_pdrop: 0.1,
            resid_pdrop: 0.1,
            layer_norm_epsilon: 1e-5,
            initializer_range: 0.02,
            n_ctx: None,
            n_embd: 768,
            n_head: 12,
            n_inner: None,
            n_layer: 12,
            n_positions: 1024,
            vocab_size: 50257,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            use_cache: true,
            bos_token_id: Some(50256),
            eos_token_id: Some(50256),
            pad_token_id: None,
            summary_type: "cls_index".into(),
            summary_use_proj: true,
            summary_activation: None,
            summary_proj_to_labels: true,
            summary_first_dropout: 0.1,
            tie_word_embeddings: true,
            add_cross_attention: false,
            model_type: "gpt2".into(),
            architectures: None,
            extra: BTreeMap::new(),
        }
    }
}

/// Overrides as keyword arguments of `AutoConfig.from_pretrained(…, **kwargs)`
/// (and as flags, `--n-layer 4`, of the commands that build a config).
#[derive(Debug, Clone, Default, PartialEq, clap::Args)]
pub struct ConfigOverrides {
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Stored only: like `transformers`, n_ctx does not resize the position table (n_positions does).
    #[arg(long)]
    pub n_ctx: Option<usize>,
    #[arg(long)]
    pub n_positions: Option<usize>,
    #[arg(long)]
    pub n_embd: Option<usize>,
    #[arg(long)]
    pub n_layer: Option<usize>,
    #[arg(long)]
    pub n_head: Option<usize>,
    #[arg(long)]
    pub bos_token_id: Option<u32>,
    #[arg(long)]
    pub eos_token_id: Option<u32>,
    #[arg(long)]
    pub pad_token_id: Option<u32>,
}

impl GPT2Config {
    /// The configs of the `gpt2` family on the hub, as their `config.json` says.
    pub fn preset(name: &str) -> Option<Self> {
        let (n_embd, n_head, n_layer) = match name {
            "gpt2" | "openai-community/gpt2" => (768, 12, 12),
            "gpt2-medium" | "openai-community/gpt2-medium" => (1024, 16, 24),
            "gpt2-large" | "openai-community/gpt2-large" => (1280, 20, 36),
            "gpt2-xl" | "openai-community/gpt2-xl" => (1600, 25, 48),
            "distilgpt2" | "distilbert/distilgpt2" => (768, 12, 6),
            _ => return None,
        };
        let mut extra = BTreeMap::new();
        extra.insert(
            "task_specific_params".into(),
            json!({"text-generation": {"do_sample": true, "max_length": 50}}),
        );
        Some(GPT2Config {
            n_embd,
            n_head,
            n_layer,
            n_ctx: Some(1024),
            architectures: Some(vec!["GPT2LMHeadModel".into()]),
            extra,
            ..Default::default()
        })
    }

    /// `AutoConfig.from_pretrained(id_or_dir)`: a folder's or the hub cache's
    /// `config.json`; the `gpt2` family also works offline from the presets.
    pub fn from_pretrained(id_or_dir: &str) -> Result<Self, ConfigError> {
        match hub::get_file(id_or_dir, "config.json") {
            Ok(path) => Self::from_file(&path),
            Err(e) => {
                if !hub::is_local(id_or_dir) {
                    if let Some(p) = Self::preset(id_or_dir) {
                        return Ok(p);
                    }
                }
                Err(e.into())
            }
        }
    }

    /// `AutoConfig.from_pretrained(id, **overrides)`.
    pub fn from_pretrained_with(id_or_dir: &str, o: &ConfigOverrides) -> Result<Self, ConfigError> {
        let mut c = Self::from_pretrained(id_or_dir)?;
        c.apply(o);
        c.validate()?;
        Ok(c)
    }

    pub fn apply(&mut self, o: &ConfigOverrides) {
        if let Some(v) = o.vocab_size {
            self.vocab_size = v;
        }
        if let Some(v) = o.n_ctx {
            self.n_ctx = Some(v);
        }
        if let Some(v) = o.n_positions {
            self.n_positions = v;
        }
        if let Some(v) = o.n_embd {
            self.n_embd = v;
        }
        if let Some(v) = o.n_layer {
            self.n_layer = v;
        }
        if let Some(v) = o.n_head {
            self.n_head = v;
        }
        if o.bos_token_id.is_some() {
            self.bos_token_id = o.bos_token_id;
        }
        if o.eos_token_id.is_some() {
            self.eos_token_id = o.eos_token_id;
        }
        if o.pad_token_id.is_some() {
            self.pad_token_id = o.pad_token_id;
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let err = |msg: String| ConfigError::File {
            path: path.display().to_string(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let c: GPT2Config =
            serde_json::from_str(&text).map_err(|e| err(format!("not a GPT-2 config: {e}")))?;
        if c.model_type != "gpt2" {
            return Err(err(format!(
                "model_type is `{}`, expected `gpt2`",
                c.model_type
            )));
        }
        c.validate().map_err(|e| err(e.to_string()))?;
        Ok(c)
    }

    /// Checks that the model can be built from this config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_embd ({}) must be divisible by n_head ({})",
                self.n_embd, self.n_head
            ));
        }
        if self.add_cross_attention {
            return bad(
                "add_cross_attention: true (a GPT-2 decoder with cross-attention to an encoder) \
                 is not supported: this crate builds the decoder-only GPT2LMHeadModel"
                    .into(),
            );
        }
        if self.n_layer == 0 || self.vocab_size == 0 || self.n_positions == 0 {
            return bad("n_layer, vocab_size and n_positions must be positive".into());
        }
        // Four bytes a parameter (fp32) must fit in a u64 byte count.
        match self.checked_num_parameters() {
            Some(n) if n.checked_mul(4).is_some() => {}
            _ => {
                return bad(format!(
                    "n_layer {}, n_embd {}, n_positions {}, vocab_size {}, n_inner {:?} imply \
                     more parameters than this machine can count",
                    self.n_layer, self.n_embd, self.n_positions, self.vocab_size, self.n_inner
                ))
            }
        }
        // LayerNorm divides by sqrt(var + eps): eps must be a positive number.
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon.is_finite()) {
            return bad(format!(
                "layer_norm_epsilon must be a positive number, got {}",
                self.layer_norm_epsilon
            ));
        }
        if Activation::parse(&self.activation_function).is_none() {
            return bad(format!(
                "activation_function `{}` is not one GPT-2 accepts ({})",
                self.activation_function,
                Activation::NAMES.join(", ")
            ));
        }
        for (name, p) in [
            ("attn_pdrop", self.attn_pdrop),
            ("embd_pdrop", self.embd_pdrop),
            ("resid_pdrop", self.resid_pdrop),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} must be in [0, 1), got {p}"));
            }
        }
        Ok(())
    }

    /// Width of the MLP (`n_inner`, or 4 × `n_embd`).
    pub fn inner_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// GPT-2's attention score scale for layer `l`: 1/√head_dim when
    /// `scale_attn_weights`, and a further 1/(l + 1) when
    /// `scale_attn_by_inverse_layer_idx`.
    pub fn attn_scale(&self, l: usize) -> f32 {
        let mut scale = 1.0f64;
        if self.scale_attn_weights {
            scale /= (self.head_dim() as f64).sqrt();
        }
        if self.scale_attn_by_inverse_layer_idx {
            scale /= (l + 1) as f64;
        }
        scale as f32
    }

    /// The number of parameters (`model.num_parameters()`: a tied lm_head
    /// is `wte` and counted once).
    /// (`usize::MAX` when the count overflows: [`GPT2Config::validate`]
    /// refuses such configs.)
    /// Training FLOPs per token at sequence length `seq`: 6N for the
    /// weights' forward and backward, plus attention's 12·L·T·C (PaLM,
    /// appendix B). What MFU divides by the machine's peak.
    pub fn train_flops_per_token(&self, seq: usize) -> f64 {
        6.0 * self.num_parameters() as f64 + 12.0 * (self.n_layer * seq * self.n_embd) as f64
    }

    pub fn num_parameters(&self) -> usize {
        self.checked_num_parameters().unwrap_or(usize::MAX)
    }

    /// The parameter count in overflow-checked arithmetic (`None`: more
    /// than a `usize` holds).
    pub fn checked_num_parameters(&self) -> Option<usize> {
        let (c, v, p, l) = (self.n_embd, self.vocab_size, self.n_positions, self.n_layer);
        let i = match self.n_inner {
            Some(i) => i,
            None => c.checked_mul(4)?,
        };
        let mul = |a: usize, b: usize| a.checked_mul(b);
        // ln_1 + ln_2, c_attn, c_proj, c_fc, mlp c_proj (weights and biases)
        let block = [
            mul(4, c)?,
            mul(mul(3, c)?, c)?.checked_add(mul(3, c)?)?,
            mul(c, c)?.checked_add(c)?,
            mul(c, i)?.checked_add(i)?,
            mul(i, c)?.checked_add(c)?,
        ]
        .into_iter()
        .try_fold(0usize, |a, b| a.checked_add(b))?;
        let head = if self.tie_word_embeddings {
            0
        } else {
            mul(v, c)?
        };
        [mul(v, c)?, mul(p, c)?, mul(l, block)?, mul(2, c)?, head]
            .into_iter()
            .try_fold(0usize, |a, b| a.checked_add(b))
    }

    /// The JSON object `config.json` holds.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("config serialises")
    }

    /// `config.to_json_string()`: sorted keys, indent 2, Python's float format.
    pub fn to_json_string(&self) -> String {
        crate::hf_json::dumps(&self.to_value()) + "\n"
    }

    /// `config.save_pretrained(dir)` (atomic).
    pub fn save_pretrained(&self, dir: &Path) -> std::io::Result<()> {
        let mut c = self.clone();
        c.architectures
            .get_or_insert_with(|| vec!["GPT2LMHeadModel".into()]);
        crate::atomic_write::write_files_atomically(
            dir,
            &[("config.json", c.to_json_string().as_bytes())],
        )
    }
}

/// `print(config)`: the class name, then the JSON.
impl std::fmt::Display for GPT2Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GPT2Config {}", self.to_json_string())
    }
}

/// The activations `GPT2Config.activation_function` may name (HF's `ACT2FN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    Gelu,
    Relu,
    Silu,
    Tanh,
    Sigmoid,
    QuickGelu,
    Linear,
}

impl Activation {
    pub const NAMES: &'static [&'static str] = &[
        "gelu_new",
        "gelu_pytorch_tanh",
        "gelu_fast",
        "gelu",
        "relu",
        "silu",
        "swish",
        "tanh",
        "sigmoid",
        "quick_gelu",
        "linear",
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "gelu" => Self::Gelu,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            "tanh" => Self::Tanh,
            "sigmoid" => Self::Sigmoid,
            "quick_gelu" => Self::QuickGelu,
            "linear" => Self::Linear,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_has_124m_parameters() {
        assert_eq!(
            GPT2Config::preset("gpt2").unwrap().num_parameters(),
            124_439_808
        );
    }

    #[test]
    fn n_ctx_does_not_change_positions() {
        let o = ConfigOverrides {
            n_ctx: Some(512),
            vocab_size: Some(30003),
            ..Default::default()
        };
        let c = GPT2Config::from_pretrained_with("gpt2", &o).unwrap();
        assert_eq!(
            (c.n_ctx, c.n_positions, c.vocab_size),
            (Some(512), 1024, 30003)
        );
    }

    #[test]
    fn bad_heads_rejected() {
        let c = GPT2Config {
            n_embd: 100,
            n_head: 3,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("divisible"));
    }

    #[test]
    fn unknown_fields_survive() {
        let text = r#"{"model_type": "gpt2", "my_field": [1, 2], "n_layer": 2}"#;
        let c: GPT2Config = serde_json::from_str(text).unwrap();
        assert_eq!(c.n_layer, 2);
        assert_eq!(c.to_value()["my_field"], json!([1, 2]));
    }
}
