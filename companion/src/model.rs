//! `GPT2LMHeadModel` on candle, laid out like `modeling_gpt2.py` (and
//! nanoGPT's `model.py`): config → attention → MLP → block → model.
//!
//! Parameter names are HF's (`transformer.h.0.attn.c_attn.weight`, …) and are
//! the single source of truth for loading and saving. GPT-2's `Conv1D` stores
//! its weight `[in, out]`, so `x @ W + b` with no transpose. `lm_head` shares
//! `wte`'s weight (tied) and is not stored separately.
//!
//! Every op used here has a backward in candle 0.11 (layer norm and softmax
//! are built from differentiable primitives, because candle's fused
//! `LayerNorm` and `softmax_last_dim` silently have no gradient).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use crate::config::GPT2Config;
use crate::hub;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Hub(#[from] hub::HubError),
    #[error("{file}: tensor `{name}` is missing from the checkpoint")]
    MissingTensor { file: String, name: String },
    #[error("{file}: tensor `{name}` has shape {found:?}, the config expects {expected:?}")]
    WrongShape {
        file: String,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{file}: {msg}")]
    File { file: String, msg: String },
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;

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

    fn forward(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GeluTanh => crate::ops::gelu_tanh(x),
            Self::Gelu => x.gelu_erf(),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
            Self::Tanh => x.tanh(),
            Self::Sigmoid => candle_nn::ops::sigmoid(x),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Linear => Ok(x.clone()),
        }
    }
}

/// Where a dropout generator stands: its seed and how many draws it has
/// made. Saved and restored around a recomputed piece so that it draws the
/// same masks (ZeRO-3, gradient checkpointing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutState {
    seed: u64,
    offset: u64,
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash of a counter.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Dropout with its own seeded generator, so that training is reproducible
/// and resumable (candle's `ops::dropout` draws from an unseeded one). The
/// generator is counter-based (draw `i` is a hash of the seed and `i`, as
/// PyTorch's Philox is), so a mask of millions of elements is drawn on every
/// thread at once, and the autograd path and the fused kernels
/// ([`crate::kernels`]) draw identical masks.
pub struct Dropout {
    state: Mutex<DropoutState>,
}

impl Dropout {
    pub fn new(seed: u64) -> Self {
        Dropout {
            state: Mutex::new(DropoutState {
                seed: mix64(seed),
                offset: 0,
            }),
        }
    }

    pub fn reseed(&self, seed: u64) {
        *self.state.lock().expect("dropout state") = DropoutState {
            seed: mix64(seed),
            offset: 0,
        };
    }

    pub fn state(&self) -> DropoutState {
        *self.state.lock().expect("dropout state")
    }

    pub fn set_state(&self, state: DropoutState) {
        *self.state.lock().expect("dropout state") = state;
    }

    /// Fill `out` with the next mask of dropout probability `p`: 0 for a
    /// dropped element, `1 / (1 − p)` for a kept one.
    pub fn fill_mask(&self, out: &mut [f32], p: f64) {
        let s = {
            let mut st = self.state.lock().expect("dropout state");
            let s = *st;
            st.offset += out.len() as u64;
            s
        };
        let scale = (1.0 / (1.0 - p)) as f32;
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
            let base = s.offset + (c * CHUNK) as u64;
            for (i, m) in o.iter_mut().enumerate() {
                let h = mix64(s.seed ^ (base + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let u = (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                *m = if u < p { 0.0 } else { scale };
            }
        });
    }

    fn apply(&self, x: &Tensor, p: f64) -> candle_core::Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let mut mask = vec![0f32; x.elem_count()];
        self.fill_mask(&mut mask, p);
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

/// `nn.LayerNorm` (a fused kernel with its backward on the CPU).
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        crate::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// GPT-2's `Conv1D`: a linear layer whose weight is stored `[in, out]`.
struct Conv1D {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1D {
    /// `x @ W + b` on `[rows, in]`: a plain 2-D matmul, whose backward needs
    /// no broadcast-and-sum over the batch.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let (k, n) = self.weight.dims2()?;
        let rows = x.elem_count() / k;
        let y = x
            .reshape((rows, k))?
            .matmul(&self.weight)?
            .broadcast_add(&self.bias)?;
        let mut out = dims;
        *out.last_mut().expect("rank ≥ 1") = n;
        y.reshape(out)
    }
}

/// Keys and values of earlier positions, one entry per layer, in buffers
/// `[B, H, capacity, D]` that grow by doubling: appending a token writes one
/// position instead of copying the whole cache, so each new token costs the
/// same whatever its position.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// The fused CPU kernels' cache (fp32 CPU models in eval mode).
    fused: Option<crate::kernels::KvBuffers>,
    /// Keep to candle's ops even where the fused kernels apply (tests
    /// compare the two).
    pub autograd_path: bool,
}

#[derive(Clone)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerCache {
    /// Append `[B, H, t, D]` keys and values; return views of all positions.
    fn append(
        slot: &mut Option<LayerCache>,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, usize)> {
        let (b, h, t, d) = k.dims4()?;
        let past = slot.as_ref().map(|c| c.len).unwrap_or(0);
        let cap = slot.as_ref().map(|c| c.k.dim(2)).transpose()?.unwrap_or(0);
        if past + t > cap {
            let new_cap = (past + t).max(2 * cap).max(64);
            let nk = Tensor::zeros((b, h, new_cap, d), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, h, new_cap, d), v.dtype(), v.device())?;
            if let Some(c) = slot.as_ref() {
                nk.slice_set(&c.k.narrow(2, 0, past)?.contiguous()?, 2, 0)?;
                nv.slice_set(&c.v.narrow(2, 0, past)?.contiguous()?, 2, 0)?;
            }
            *slot = Some(LayerCache {
                k: nk,
                v: nv,
                len: past,
            });
        }
        let c = slot.as_mut().expect("allocated above");
        // Detached: a cached tensor must not keep the autograd graph of every
        // earlier step (and its activations) alive.
        c.k.slice_set(&k.detach().contiguous()?, 2, past)?;
        c.v.slice_set(&v.detach().contiguous()?, 2, past)?;
        c.len = past + t;
        Ok((c.k.narrow(2, 0, c.len)?, c.v.narrow(2, 0, c.len)?, past))
    }
}

impl KvCache {
    pub fn new(n_layer: usize) -> Self {
        KvCache {
            layers: vec![None; n_layer],
            fused: None,
            autograd_path: false,
        }
    }

    /// How many positions the cache holds.
    pub fn len(&self) -> usize {
        if let Some(f) = &self.fused {
            return f.len();
        }
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|c| c.len)
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Attention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    n_head: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        key_mask: Option<&[Vec<u32>]>,
        cache: Option<&mut Option<LayerCache>>,
        model: &GPT2LMHeadModel,
    ) -> candle_core::Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let qkv = self.c_attn.forward(x)?;
        let split = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(D::Minus1, i * c, c)?
                .reshape((b, t, self.n_head, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, mut k, mut v) = (split(0)?, split(1)?, split(2)?);
        let mut past = 0;
        if let Some(slot) = cache {
            let (ck, cv, p) = LayerCache::append(slot, &k, &v)?;
            (k, v, past) = (ck, cv, p);
        }
        let scores = q.matmul(&k.t()?)?;
        let att = crate::ops::masked_softmax(&scores, self.scale, past, key_mask)?;
        let att = model.dropout(&att, model.config.attn_pdrop)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        let y = self.c_proj.forward(&y)?;
        model.dropout(&y, model.config.resid_pdrop)
    }
}

struct Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
    act: Activation,
}

impl Mlp {
    fn forward(&self, x: &Tensor, model: &GPT2LMHeadModel) -> candle_core::Result<Tensor> {
        let h = self.act.forward(&self.c_fc.forward(x)?)?;
        let h = self.c_proj.forward(&h)?;
        model.dropout(&h, model.config.resid_pdrop)
    }
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

/// The output of a forward pass: logits `[B, T, V]` and, with labels, the loss.
pub struct CausalLMOutput {
    pub logits: Tensor,
    pub loss: Option<Tensor>,
}

/// GPT-2 with its language-modelling head.
pub struct GPT2LMHeadModel {
    pub config: GPT2Config,
    /// Every trainable parameter by its HF name.
    pub varmap: VarMap,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    device: Device,
    dtype: DType,
    training: bool,
    dropout: Dropout,
}

/// Input checks shared by the candle forward pass, the loss and the fused
/// kernels, so all three refuse the same input with the same words.
pub(crate) fn check_length(tokens: usize, n_positions: usize) -> Result<()> {
    if tokens > n_positions {
        return Err(ModelError::Input(format!(
            "sequence of {tokens} tokens is longer than n_positions = {n_positions} (the model's position table)"
        )));
    }
    Ok(())
}

/// `max_id`, the largest token id of a batch, must index the vocabulary.
pub(crate) fn check_token_ids(max_id: Option<u32>, vocab_size: usize) -> Result<()> {
    match max_id {
        Some(max) if max as usize >= vocab_size => Err(ModelError::Input(format!(
            "token id {max} is outside the vocabulary (vocab_size = {vocab_size}); was the text \
             encoded with another tokenizer?"
        ))),
        _ => Ok(()),
    }
}

/// A label is -100 or a token id.
pub(crate) fn check_label(l: i64, vocab_size: usize) -> Result<()> {
    if l != IGNORE_INDEX && (l < 0 || l as usize >= vocab_size) {
        return Err(ModelError::Input(format!(
            "label {l} is outside the vocabulary (0..{vocab_size}) and is not -100"
        )));
    }
    Ok(())
}

/// `attention_mask` must be `rows` rows of `total` (past + new) positions.
pub(crate) fn check_mask(mask: Option<&[Vec<u32>]>, rows: usize, total: usize) -> Result<()> {
    if let Some(m) = mask {
        if m.len() != rows || m.iter().any(|r| r.len() != total) {
            return Err(ModelError::Input(format!(
                "attention_mask must be {rows} rows of {total} (past + new tokens)"
            )));
        }
    }
    Ok(())
}

/// Position ids: arange, or the running count of real tokens when a mask is
/// given (padding gets 1, as HF's generate fills it).
pub(crate) fn positions(
    b: usize,
    t: usize,
    past: usize,
    attention_mask: Option<&[Vec<u32>]>,
) -> Vec<u32> {
    let total = past + t;
    let mut pos = Vec::with_capacity(b * t);
    for row in 0..b {
        match attention_mask {
            Some(m) => {
                let mut seen: u32 = m[row][..past].iter().sum();
                for &keep in &m[row][past..total] {
                    seen += keep;
                    pos.push(if keep == 0 { 1 } else { seen - 1 });
                }
            }
            None => pos.extend(past as u32..total as u32),
        }
    }
    pos
}

fn piece(params: &HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    params
        .get(name)
        .cloned()
        .ok_or_else(|| ModelError::MissingTensor {
            file: "(parameters passed to a forward piece)".into(),
            name: name.into(),
        })
}

/// The parameters of block `l`, with their shapes, in `named_parameters` order.
pub fn block_parameter_names(cfg: &GPT2Config, l: usize) -> Vec<(String, Vec<usize>)> {
    let p = format!("transformer.h.{l}.");
    parameter_shapes(cfg)
        .into_iter()
        .filter(|(n, _)| n.starts_with(&p))
        .collect()
}

/// HF's parameter names and shapes for a config, in the order
/// `model.named_parameters()` lists them.
pub fn parameter_shapes(cfg: &GPT2Config) -> Vec<(String, Vec<usize>)> {
    let (c, i) = (cfg.n_embd, cfg.inner_dim());
    let mut v = vec![
        (
            "transformer.wte.weight".to_string(),
            vec![cfg.vocab_size, c],
        ),
        (
            "transformer.wpe.weight".to_string(),
            vec![cfg.n_positions, c],
        ),
    ];
    for l in 0..cfg.n_layer {
        let p = |s: &str| format!("transformer.h.{l}.{s}");
        v.extend([
            (p("ln_1.weight"), vec![c]),
            (p("ln_1.bias"), vec![c]),
            (p("attn.c_attn.weight"), vec![c, 3 * c]),
            (p("attn.c_attn.bias"), vec![3 * c]),
            (p("attn.c_proj.weight"), vec![c, c]),
            (p("attn.c_proj.bias"), vec![c]),
            (p("ln_2.weight"), vec![c]),
            (p("ln_2.bias"), vec![c]),
            (p("mlp.c_fc.weight"), vec![c, i]),
            (p("mlp.c_fc.bias"), vec![i]),
            (p("mlp.c_proj.weight"), vec![i, c]),
            (p("mlp.c_proj.bias"), vec![c]),
        ]);
    }
    v.push(("transformer.ln_f.weight".into(), vec![c]));
    v.push(("transformer.ln_f.bias".into(), vec![c]));
    v
}

/// HF's `_init_weights` for GPT-2: normal(0, initializer_range) for
/// embeddings and Conv1D weights, `c_proj` weights scaled by 1/sqrt(2·n_layer),
/// zero biases, LayerNorm weight 1.
fn init_value(
    cfg: &GPT2Config,
    name: &str,
    shape: &[usize],
    rng: &mut rand::rngs::StdRng,
) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if name.contains(".ln_") || name.starts_with("transformer.ln_f") {
        return vec![if name.ends_with("weight") { 1.0 } else { 0.0 }; n];
    }
    if name.ends_with("bias") {
        return vec![0.0; n];
    }
    let mut std = cfg.initializer_range;
    if name.ends_with("c_proj.weight") {
        std /= (2.0 * cfg.n_layer as f64).sqrt();
    }
    let normal = Normal::new(0.0f32, std as f32).expect("std > 0");
    (0..n).map(|_| normal.sample(rng)).collect()
}

fn build_ln(config: &GPT2Config, p: &str, get: &dyn Fn(&str) -> Tensor) -> LayerNorm {
    LayerNorm {
        weight: get(&format!("{p}.weight")),
        bias: get(&format!("{p}.bias")),
        eps: config.layer_norm_epsilon,
    }
}

/// Block `l` over the tensors `get` returns for its HF parameter names.
fn build_block(config: &GPT2Config, l: usize, get: &dyn Fn(&str) -> Tensor) -> Block {
    let p = format!("transformer.h.{l}");
    let conv = |p: &str| Conv1D {
        weight: get(&format!("{p}.weight")),
        bias: get(&format!("{p}.bias")),
    };
    let mut scale = 1.0;
    if config.scale_attn_weights {
        scale /= (config.head_dim() as f64).sqrt();
    }
    if config.scale_attn_by_inverse_layer_idx {
        scale /= (l + 1) as f64;
    }
    Block {
        ln_1: build_ln(config, &format!("{p}.ln_1"), get),
        attn: Attention {
            c_attn: conv(&format!("{p}.attn.c_attn")),
            c_proj: conv(&format!("{p}.attn.c_proj")),
            n_head: config.n_head,
            head_dim: config.head_dim(),
            scale,
        },
        ln_2: build_ln(config, &format!("{p}.ln_2"), get),
        mlp: Mlp {
            c_fc: conv(&format!("{p}.mlp.c_fc")),
            c_proj: conv(&format!("{p}.mlp.c_proj")),
            act: Activation::parse(&config.activation_function).expect("validated"),
        },
    }
}

impl Block {
    /// `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
    fn forward(
        &self,
        x: &Tensor,
        key_mask: Option<&[Vec<u32>]>,
        cache: Option<&mut Option<LayerCache>>,
        model: &GPT2LMHeadModel,
    ) -> candle_core::Result<Tensor> {
        let h = self
            .attn
            .forward(&self.ln_1.forward(x)?, key_mask, cache, model)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.ln_2.forward(&x)?, model)?;
        x + h
    }
}

impl GPT2LMHeadModel {
    /// `GPT2LMHeadModel(config)`: a fresh model with HF's initialisation, seeded.
    pub fn new(config: &GPT2Config, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in parameter_shapes(config) {
            let data = init_value(config, &name, &shape, &mut rng);
            tensors.insert(name, Tensor::from_vec(data, shape, device)?);
        }
        Self::from_tensors(config.clone(), tensors, DType::F32, device, "(new model)")
    }

    /// Build from named tensors, checking that every parameter is there with
    /// the shape the config implies.
    pub fn from_tensors(
        config: GPT2Config,
        mut tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        file: &str,
    ) -> Result<Self> {
        config.validate()?;
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap");
            for (name, shape) in parameter_shapes(&config) {
                let t = tensors
                    .remove(&name)
                    .ok_or_else(|| ModelError::MissingTensor {
                        file: file.into(),
                        name: name.clone(),
                    })?;
                if t.dims() != shape.as_slice() {
                    return Err(ModelError::WrongShape {
                        file: file.into(),
                        name,
                        found: t.dims().to_vec(),
                        expected: shape,
                    });
                }
                let t = t.to_device(device)?.to_dtype(dtype)?;
                data.insert(name, Var::from_tensor(&t)?);
            }
        }
        Ok(Self::assemble(config, varmap, dtype, device, false))
    }

    /// Build the modules over the parameters of `varmap`. With `detached`,
    /// the modules see the same storage without the autograd flag, so a
    /// forward pass records no graph (what `torch.no_grad()` gives).
    fn assemble(
        config: GPT2Config,
        varmap: VarMap,
        dtype: DType,
        device: &Device,
        detached: bool,
    ) -> Self {
        let get = |n: &str| -> Tensor {
            let t = varmap.data().lock().expect("varmap")[n].as_tensor().clone();
            if detached {
                t.detach()
            } else {
                t
            }
        };
        let blocks = (0..config.n_layer)
            .map(|l| build_block(&config, l, &get))
            .collect();
        GPT2LMHeadModel {
            wte: get("transformer.wte.weight"),
            wpe: get("transformer.wpe.weight"),
            ln_f: build_ln(&config, "transformer.ln_f", &get),
            blocks,
            varmap,
            config,
            device: device.clone(),
            dtype,
            training: false,
            dropout: Dropout::new(0),
        }
    }

    /// A view of this model for inference: same weights (shared, so later
    /// training steps show through), no gradient bookkeeping, eval mode.
    pub fn for_inference(&self) -> Self {
        Self::assemble(
            self.config.clone(),
            self.varmap.clone(),
            self.dtype,
            &self.device,
            true,
        )
    }

    /// `GPT2LMHeadModel.from_pretrained(id_or_dir)`: `config.json` and
    /// `model.safetensors` (or a sharded `model.safetensors.index.json`),
    /// from a folder, the HF cache or the hub. Original GPT-2 checkpoints
    /// without the `transformer.` prefix and with `attn.bias` buffers load too.
    pub fn from_pretrained(id_or_dir: &str, dtype: DType, device: &Device) -> Result<Self> {
        let config = GPT2Config::from_file(&hub::get_file(id_or_dir, "config.json")?)?;
        let mut files = Vec::new();
        if let Some(index) = hub::get_optional(id_or_dir, "model.safetensors.index.json") {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::File {
                file: index.display().to_string(),
                msg: e.to_string(),
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::File {
                    file: index.display().to_string(),
                    msg: format!("not a safetensors index: {e}"),
                })?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| ModelError::File {
                    file: index.display().to_string(),
                    msg: "no `weight_map` object".into(),
                })?;
            let mut shards: Vec<&str> = map.values().filter_map(|s| s.as_str()).collect();
            shards.sort();
            shards.dedup();
            for s in shards {
                files.push(hub::get_file(id_or_dir, s)?);
            }
        } else {
            files.push(hub::get_file(id_or_dir, "model.safetensors")?);
        }
        let mut tensors = HashMap::new();
        for f in &files {
            let loaded =
                candle_core::safetensors::load(f, &Device::Cpu).map_err(|e| ModelError::File {
                    file: f.display().to_string(),
                    msg: format!("not a valid safetensors file: {e}"),
                })?;
            for (name, t) in loaded {
                if name.ends_with(".attn.bias")
                    || name.ends_with(".attn.masked_bias")
                    || name == "lm_head.weight"
                {
                    continue; // causal-mask buffers and the tied head
                }
                let name = if name.starts_with("transformer.") {
                    name
                } else {
                    format!("transformer.{name}")
                };
                tensors.insert(name, t.to_dtype(DType::F32)?);
            }
        }
        let label = files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Self::from_tensors(config, tensors, dtype, device, &label)
    }

    /// The parameters by HF name, in `named_parameters()` order.
    pub fn named_parameters(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap");
        parameter_shapes(&self.config)
            .into_iter()
            .map(|(n, _)| {
                let v = data[&n].clone();
                (n, v)
            })
            .collect()
    }

    /// `model.num_parameters()`.
    pub fn num_parameters(&self) -> usize {
        self.named_parameters()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// The tensors `save_pretrained` writes, as f32 safetensors bytes.
    pub fn state_dict_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (n, v) in self.named_parameters() {
            tensors.push((
                n,
                v.as_tensor()
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?,
            ));
        }
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta)).map_err(
            |e| ModelError::File {
                file: "model.safetensors".into(),
                msg: e.to_string(),
            },
        )
    }

    /// `model.save_pretrained(dir)`: `config.json` and `model.safetensors` in
    /// HF's layout (tied `lm_head` not stored), both written atomically.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let files = self.pretrained_files()?;
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        crate::atomic_write::write_files_atomically(dir, &refs).map_err(|e| ModelError::File {
            file: dir.display().to_string(),
            msg: e.to_string(),
        })
    }

    /// The files `save_pretrained` writes, by name (checkpoints write them too).
    pub fn pretrained_files(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let mut config = self.config.clone();
        config.architectures = Some(vec!["GPT2LMHeadModel".into()]);
        Ok(vec![
            ("model.safetensors", self.state_dict_bytes()?),
            ("config.json", config.to_json_string().into_bytes()),
        ])
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `model.train()` / `model.eval()`: dropout only in training.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Reseed the dropout generator (the Trainer does this per step).
    pub fn seed_dropout(&self, seed: u64) {
        self.dropout.reseed(seed);
    }

    /// The next dropout mask of probability `p` (for the fused kernels,
    /// which apply it themselves; they call this only in training).
    pub(crate) fn dropout_fill(&self, out: &mut [f32], p: f64) {
        self.dropout.fill_mask(out, p);
    }

    fn dropout(&self, x: &Tensor, p: f64) -> candle_core::Result<Tensor> {
        if self.training {
            self.dropout.apply(x, p)
        } else {
            Ok(x.clone())
        }
    }

    /// Forward pass: `input_ids` `[B, T]` (u32). `attention_mask` `[B, T+past]`
    /// (1 = token, 0 = padding) masks padded keys; positions then count only
    /// real tokens, as `generate` computes them for left-padded batches.
    /// With a cache, `input_ids` are the new tokens only.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&[Vec<u32>]>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let total = past + t;
        check_length(total, self.config.n_positions)?;
        check_mask(attention_mask, b, total)?;
        if let Some(c) = cache.as_deref_mut() {
            // Inference with a cache on the CPU (generate): the fused kernels.
            // Not if candle's path has already filled this cache.
            let candle_filled = c.layers.iter().any(Option::is_some);
            if !self.training
                && !c.autograd_path
                && !candle_filled
                && crate::kernels::supported(self)
            {
                let ids: Vec<Vec<u32>> = input_ids.to_vec2()?;
                let fused = c.fused.get_or_insert_with(Default::default);
                let logits = crate::kernels::forward_cached(self, &ids, attention_mask, fused)?;
                return Ok(Tensor::from_vec(
                    logits,
                    (b, t, self.config.vocab_size),
                    &self.device,
                )?);
            }
            if c.fused.is_some() {
                return Err(ModelError::Input(
                    "this KvCache was filled by the fused CPU kernels; continue in eval mode \
                     with the same fp32 CPU model, or start a new cache"
                        .into(),
                ));
            }
        }
        let pos = positions(b, t, past, attention_mask);
        let pos = Tensor::from_vec(pos, (b * t,), &self.device)?;
        let mut x = self.embed(&self.wte, &self.wpe, input_ids, &pos)?;
        for (l, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| {
                if c.layers.len() < self.blocks.len() {
                    c.layers.resize(self.blocks.len(), None);
                }
                &mut c.layers[l]
            });
            x = block.forward(&x, attention_mask, slot, self)?;
        }
        self.head(&self.ln_f, &self.wte, &x)
    }

    /// Token plus position embeddings, then dropout: `[B, T, C]`.
    fn embed(
        &self,
        wte: &Tensor,
        wpe: &Tensor,
        input_ids: &Tensor,
        pos: &Tensor,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids = input_ids.flatten_all()?;
        let max = if ids.elem_count() > 0 {
            Some(ids.max(0)?.to_scalar::<u32>()?)
        } else {
            None
        };
        check_token_ids(max, self.config.vocab_size)?;
        let tok = wte.index_select(&ids, 0)?;
        let posv = wpe.index_select(pos, 0)?;
        let x = (tok + posv)?.reshape((b, t, self.config.n_embd))?;
        Ok(self.dropout(&x, self.config.embd_pdrop)?)
    }

    /// `ln_f`, then the head tied to `wte`: logits `[B, T, V]`.
    fn head(&self, ln_f: &LayerNorm, wte: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let x = ln_f.forward(x)?;
        Ok(x.reshape((b * t, c))?
            .matmul(&wte.t()?)?
            .reshape((b, t, self.config.vocab_size))?)
    }

    /// The same weights in `dtype` (`model.to(dtype)`), for mixed precision.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let tensors: HashMap<String, Tensor> = self
            .named_parameters()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        let mut m =
            Self::from_tensors(self.config.clone(), tensors, dtype, &self.device, "(model)")?;
        m.training = self.training;
        m.dropout.set_state(self.dropout.state());
        Ok(m)
    }

    /// A model whose parameters live elsewhere (ZeRO-3 partitions them over
    /// ranks): every parameter is an empty tensor, as DeepSpeed leaves
    /// `param.numel() == 0` placeholders. Only the `*_with` pieces run on it.
    pub fn partitioned(&self) -> Self {
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap");
            for (name, _) in parameter_shapes(&self.config) {
                let empty = Var::zeros(0, self.dtype, &self.device).expect("an empty tensor");
                data.insert(name, empty);
            }
        }
        let mut m = Self::assemble(self.config.clone(), varmap, self.dtype, &self.device, false);
        m.training = self.training;
        m.dropout.set_state(self.dropout.state());
        m
    }

    /// The generator of the dropout masks (saved and restored around a
    /// recomputed piece so it draws the same masks).
    pub fn dropout_state(&self) -> DropoutState {
        self.dropout.state()
    }

    pub fn set_dropout_state(&self, state: DropoutState) {
        self.dropout.set_state(state)
    }

    /// The forward pass in pieces, over parameters passed in by HF name:
    /// embeddings (`transformer.wte.weight`, `transformer.wpe.weight`) for
    /// unpadded `input_ids` `[B, T]`.
    pub fn embed_with(
        &self,
        params: &HashMap<String, Tensor>,
        input_ids: &Tensor,
        attention_mask: Option<&[Vec<u32>]>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        check_length(t, self.config.n_positions)?;
        let pos = positions(b, t, 0, attention_mask);
        let pos = Tensor::from_vec(pos, (b * t,), &self.device)?;
        let get = |n: &str| piece(params, n);
        self.embed(
            &get("transformer.wte.weight")?,
            &get("transformer.wpe.weight")?,
            input_ids,
            &pos,
        )
    }

    /// Block `l` over `x` `[B, T, C]` with its parameters (`transformer.h.{l}.*`).
    pub fn block_with(
        &self,
        l: usize,
        params: &HashMap<String, Tensor>,
        x: &Tensor,
        attention_mask: Option<&[Vec<u32>]>,
    ) -> Result<Tensor> {
        if l >= self.config.n_layer {
            return Err(ModelError::Input(format!(
                "block {l} of a {}-layer model",
                self.config.n_layer
            )));
        }
        for (name, _) in block_parameter_names(&self.config, l) {
            piece(params, &name)?;
        }
        let block = build_block(&self.config, l, &|n: &str| params[n].clone());
        Ok(block.forward(x, attention_mask, None, self)?)
    }

    /// `ln_f` and the tied head (`transformer.ln_f.*`, `transformer.wte.weight`).
    pub fn head_with(&self, params: &HashMap<String, Tensor>, x: &Tensor) -> Result<Tensor> {
        let ln_f = LayerNorm {
            weight: piece(params, "transformer.ln_f.weight")?,
            bias: piece(params, "transformer.ln_f.bias")?,
            eps: self.config.layer_norm_epsilon,
        };
        self.head(&ln_f, &piece(params, "transformer.wte.weight")?, x)
    }

    /// Forward with labels: the loss is HF's shifted cross-entropy, ignoring
    /// label -100, averaged over the counted tokens.
    pub fn forward_with_labels(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&[Vec<u32>]>,
        labels: &Tensor,
    ) -> Result<CausalLMOutput> {
        let logits = self.forward(input_ids, attention_mask, None)?;
        let (sum, count) = causal_lm_loss_sum(&logits, labels)?;
        let loss = (sum / count.max(1) as f64)?;
        Ok(CausalLMOutput {
            logits,
            loss: Some(loss),
        })
    }
}

pub use crate::data::IGNORE_INDEX;

/// Shifted cross-entropy summed over the tokens whose label is not -100,
/// and their count: logits `[B, T, V]` predict labels `[B, T]` (i64) one
/// position later. The Trainer divides by the count of the whole
/// accumulated batch, as transformers ≥ 4.46 does.
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    if labels.dims() != [b, t] {
        return Err(ModelError::Input(format!(
            "labels have shape {:?}, expected [{b}, {t}]",
            labels.dims()
        )));
    }
    if t < 2 {
        let zero = Tensor::zeros((), logits.dtype(), logits.device())?;
        return Ok((zero, 0));
    }
    let logits = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let lab: Vec<i64> = labels.narrow(1, 1, t - 1)?.flatten_all()?.to_vec1()?;
    let mut count = 0usize;
    for &l in &lab {
        check_label(l, v)?;
        if l != IGNORE_INDEX {
            count += 1;
        }
    }
    let sum = crate::ops::cross_entropy_sum(&logits, lab)?;
    Ok((sum, count))
}

/// A seeded RNG for callers that need one (generation, data shuffling).
pub fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> GPT2Config {
        GPT2Config {
            n_embd: 16,
            n_head: 2,
            n_layer: 2,
            n_positions: 32,
            vocab_size: 50,
            ..Default::default()
        }
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        let mut m = GPT2LMHeadModel::new(&tiny(), 0, &Device::Cpu).unwrap();
        m.set_training(true);
        let ids = Tensor::new(&[[1u32, 5, 7, 9, 2], [3, 4, 5, 6, 7]], &Device::Cpu).unwrap();
        let labels = ids.to_dtype(DType::I64).unwrap();
        let out = m.forward_with_labels(&ids, None, &labels).unwrap();
        let grads = out.loss.unwrap().backward().unwrap();
        for (name, var) in m.named_parameters() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(norm > 0.0, "zero gradient for {name}");
        }
    }

    #[test]
    fn kv_cache_matches_full_forward() {
        // The fused kernels' cache, and candle's.
        for autograd_path in [false, true] {
            let mut cache = KvCache::new(2);
            cache.autograd_path = autograd_path;
            cached_equals_full(cache);
        }
    }

    fn cached_equals_full(mut cache: KvCache) {
        let m = GPT2LMHeadModel::new(&tiny(), 1, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[1u32, 5, 7, 9, 2, 8]], &Device::Cpu).unwrap();
        let full = m.forward(&ids, None, None).unwrap();
        let a = m
            .forward(&ids.narrow(1, 0, 4).unwrap(), None, Some(&mut cache))
            .unwrap();
        let b = m
            .forward(&ids.narrow(1, 4, 2).unwrap(), None, Some(&mut cache))
            .unwrap();
        let inc = Tensor::cat(&[a, b], 1).unwrap();
        let diff: f32 = (full - inc)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn too_long_is_an_error() {
        let m = GPT2LMHeadModel::new(&tiny(), 0, &Device::Cpu).unwrap();
        let ids = Tensor::zeros((1, 33), DType::U32, &Device::Cpu).unwrap();
        let e = m.forward(&ids, None, None).err().unwrap().to_string();
        assert!(e.contains("n_positions"), "{e}");
    }

    #[test]
    fn out_of_vocabulary_ids_are_an_error() {
        let cfg = GPT2Config {
            n_layer: 1,
            n_embd: 8,
            n_head: 2,
            vocab_size: 10,
            n_positions: 8,
            ..Default::default()
        };
        let m = GPT2LMHeadModel::new(&cfg, 0, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[1u32, 10]], &Device::Cpu).unwrap();
        let e = m.forward(&ids, None, None).unwrap_err().to_string();
        assert!(
            e.contains("token id 10 is outside the vocabulary (vocab_size = 10)"),
            "{e}"
        );
        let ok = Tensor::new(&[[1u32, 9]], &Device::Cpu).unwrap();
        assert!(m.forward(&ok, None, None).is_ok());
    }
}
