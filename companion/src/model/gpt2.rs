//! `GPT2LMHeadModel` on candle, laid out like `modeling_gpt2.py` (and
//! nanoGPT's `model.py`): layer norm → `Conv1D` → attention → MLP → block →
//! model, then the forward pass (whole, or in pieces for ZeRO-3).
//!
//! GPT-2's `Conv1D` stores its weight `[in, out]`, so `x @ W + b` with no
//! transpose. The head shares `wte`'s weight unless `tie_word_embeddings` is
//! false. Every op has a backward: layer norm, the masked softmax, GELU and
//! the loss are custom ops over the CPU math (`autograd_ops`), because
//! candle's fused `LayerNorm` and `softmax_last_dim` silently have none.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;

use super::dropout::{Dropout, DropoutState};
use super::error::{ModelError, Result};
use super::kv_cache::{KvCache, LayerCache};
use super::loss::causal_lm_loss_sum;
use crate::config::{Activation, GPT2Config};
use crate::cpu::inputs::{check_length, check_mask, check_token_ids, positions};
use crate::params::{Affine, BlockParams, Gpt2Params};

/// The activation on a candle tensor (`ACT2FN[name](x)`).
pub(crate) fn activation(act: Activation, x: &Tensor) -> candle_core::Result<Tensor> {
    match act {
        Activation::GeluTanh => super::autograd_ops::gelu_tanh(x),
        Activation::Gelu => x.gelu_erf(),
        Activation::Relu => x.relu(),
        Activation::Silu => x.silu(),
        Activation::Tanh => x.tanh(),
        Activation::Sigmoid => candle_nn::ops::sigmoid(x),
        Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        Activation::Linear => Ok(x.clone()),
    }
}

/// `nn.LayerNorm` (a fused kernel with its backward on the CPU).
pub(crate) struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        super::autograd_ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// GPT-2's `Conv1D`: a linear layer whose weight is stored `[in, out]`.
pub(crate) struct Conv1D {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1D {
    /// `x @ W + b`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.product(x)?.broadcast_add(&self.bias)
    }

    /// `x @ W` on `[…, in]`, as a plain 2-D matmul over the rows (whose
    /// backward needs no broadcast-and-sum over the batch).
    fn product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let (k, n) = self.weight.dims2()?;
        let rows = x.elem_count() / k;
        let y = x.reshape((rows, k))?.matmul(&self.weight)?;
        let mut out = dims;
        *out.last_mut().expect("rank ≥ 1") = n;
        y.reshape(out)
    }
}

/// What a block does at the edges of its products, and where its dropout
/// masks come from: on the whole model nothing, and the model's generator
/// (`GPT2LMHeadModel`'s impl); split over a tensor-parallel group,
/// Megatron's `f` before each column-parallel product (`c_attn`, `c_fc`),
/// `g` after each row-parallel one (`c_proj`, before its replicated bias),
/// and the whole model's masks for this rank's heads (`parallel::tensor`).
pub(crate) trait BlockEdges {
    /// Before `c_attn` and `c_fc` (Megatron's `f`).
    fn enter(&self, x: &Tensor) -> candle_core::Result<Tensor>;
    /// After `c_proj`'s product, before its bias (Megatron's `g`).
    fn exit(&self, y: &Tensor) -> candle_core::Result<Tensor>;
    /// Block `layer`'s dropout of its attention probabilities.
    fn attention_dropout(&self, att: &Tensor, layer: usize) -> candle_core::Result<Tensor>;
    /// Block `layer`'s dropout of its attention (`mlp` false) or MLP output.
    fn residual_dropout(&self, y: &Tensor, layer: usize, mlp: bool) -> candle_core::Result<Tensor>;
}

impl BlockEdges for GPT2LMHeadModel {
    fn enter(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(x.clone())
    }

    fn exit(&self, y: &Tensor) -> candle_core::Result<Tensor> {
        Ok(y.clone())
    }

    fn attention_dropout(&self, att: &Tensor, _layer: usize) -> candle_core::Result<Tensor> {
        self.dropout(att, self.config.attn_pdrop)
    }

    fn residual_dropout(
        &self,
        y: &Tensor,
        _layer: usize,
        _mlp: bool,
    ) -> candle_core::Result<Tensor> {
        self.dropout(y, self.config.resid_pdrop)
    }
}

struct Attention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    /// The heads this block computes (all, or a tensor-parallel rank's).
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
        (edges, layer): (&dyn BlockEdges, usize),
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let c = self.n_head * self.head_dim;
        let qkv = self.c_attn.forward(&edges.enter(x)?)?;
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
        let att = super::autograd_ops::masked_softmax(&scores, self.scale, past, key_mask)?;
        let att = edges.attention_dropout(&att, layer)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        let y = edges
            .exit(&self.c_proj.product(&y)?)?
            .broadcast_add(&self.c_proj.bias)?;
        edges.residual_dropout(&y, layer, false)
    }
}

struct Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
    act: Activation,
}

impl Mlp {
    fn forward(
        &self,
        x: &Tensor,
        (edges, layer): (&dyn BlockEdges, usize),
    ) -> candle_core::Result<Tensor> {
        let h = activation(self.act, &self.c_fc.forward(&edges.enter(x)?)?)?;
        let h = edges
            .exit(&self.c_proj.product(&h)?)?
            .broadcast_add(&self.c_proj.bias)?;
        edges.residual_dropout(&h, layer, true)
    }
}

pub(crate) struct Block {
    layer: usize,
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
    /// GPT-2's parameters for this config: names, shapes, roles.
    pub params: Gpt2Params,
    /// Every trainable parameter by its HF name.
    pub varmap: VarMap,
    pub(crate) wte: Tensor,
    pub(crate) wpe: Tensor,
    pub(crate) blocks: Vec<Block>,
    pub(crate) ln_f: LayerNorm,
    /// The output head when it is not tied to `wte` (`tie_word_embeddings: false`).
    pub(crate) lm_head: Option<Tensor>,
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    pub(crate) training: bool,
    pub(crate) dropout: Dropout,
}

/// A layer norm over the tensors `get` returns for parameter indices.
pub(crate) fn build_ln(config: &GPT2Config, p: Affine, get: &dyn Fn(usize) -> Tensor) -> LayerNorm {
    LayerNorm {
        weight: get(p.weight),
        bias: get(p.bias),
        eps: config.layer_norm_epsilon,
    }
}

/// Block `l` over the tensors `get` returns for its parameter indices,
/// computing `heads` of its heads (`config.n_head`, or a tensor-parallel
/// rank's share, whose shards `get` returns).
pub(crate) fn build_block(
    config: &GPT2Config,
    l: usize,
    heads: usize,
    p: &BlockParams,
    get: &dyn Fn(usize) -> Tensor,
) -> Block {
    let conv = |a: Affine| Conv1D {
        weight: get(a.weight),
        bias: get(a.bias),
    };
    Block {
        layer: l,
        ln_1: build_ln(config, p.ln_1, get),
        attn: Attention {
            c_attn: conv(p.c_attn),
            c_proj: conv(p.attn_c_proj),
            n_head: heads,
            head_dim: config.head_dim(),
            scale: config.attn_scale(l) as f64,
        },
        ln_2: build_ln(config, p.ln_2, get),
        mlp: Mlp {
            c_fc: conv(p.c_fc),
            c_proj: conv(p.mlp_c_proj),
            act: Activation::parse(&config.activation_function).expect("validated"),
        },
    }
}

/// Parameter `i` of `params` (passed by HF name to a forward piece).
fn piece(p: &Gpt2Params, params: &HashMap<String, Tensor>, i: usize) -> Result<Tensor> {
    params
        .get(p.name(i))
        .cloned()
        .ok_or_else(|| ModelError::MissingTensor {
            file: "(parameters passed to a forward piece)".into(),
            name: p.name(i).into(),
        })
}

impl Block {
    /// `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`, `x` `[B, T, C]`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        key_mask: Option<&[Vec<u32>]>,
        cache: Option<&mut Option<LayerCache>>,
        edges: &dyn BlockEdges,
    ) -> candle_core::Result<Tensor> {
        let at = (edges, self.layer);
        let h = self
            .attn
            .forward(&self.ln_1.forward(x)?, key_mask, cache, at)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.ln_2.forward(&x)?, at)?;
        x + h
    }
}

impl GPT2LMHeadModel {
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

    /// The dropout generator when training (the fused kernels draw their
    /// masks from it), none in eval mode.
    pub fn training_dropout(&self) -> Option<&Dropout> {
        self.training.then_some(&self.dropout)
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
            if !self.training && !c.autograd_path && !candle_filled && self.fused_kernels_apply() {
                let ids: Vec<Vec<u32>> = input_ids.to_vec2()?;
                let fused = c.fused.get_or_insert_with(Default::default);
                let logits = self.with_fp32_weights(|w| {
                    Ok(crate::cpu::forward_cached(
                        &self.config,
                        w,
                        &ids,
                        attention_mask,
                        fused,
                    )?)
                })?;
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
        self.head(&self.ln_f, self.lm_head.as_ref().unwrap_or(&self.wte), &x)
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

    /// `ln_f`, then the head `[V, C]` (`wte` when tied): logits `[B, T, V]`.
    fn head(&self, ln_f: &LayerNorm, head: &Tensor, x: &Tensor) -> Result<Tensor> {
        let x = ln_f.forward(x)?;
        let (b, t, _) = x.dims3()?;
        Ok(head_logits(&x, head, vocab_multiple(&self.device, b * t))?)
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
        let p = &self.params;
        self.embed(
            &piece(p, params, p.wte)?,
            &piece(p, params, p.wpe)?,
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
        let p = &self.params;
        let mut got = HashMap::new();
        for i in p.block_piece(l) {
            got.insert(i, piece(p, params, i)?);
        }
        let block = build_block(&self.config, l, self.config.n_head, &p.blocks[l], &|i| {
            got[&i].clone()
        });
        Ok(block.forward(x, attention_mask, None, self)?)
    }

    /// `ln_f` and the head (`transformer.ln_f.*`, and `lm_head.weight`, or
    /// `transformer.wte.weight` when tied): see [`Self::head_parameter`].
    pub fn head_with(&self, params: &HashMap<String, Tensor>, x: &Tensor) -> Result<Tensor> {
        let p = &self.params;
        let ln_f = LayerNorm {
            weight: piece(p, params, p.ln_f.weight)?,
            bias: piece(p, params, p.ln_f.bias)?,
            eps: self.config.layer_norm_epsilon,
        };
        self.head(&ln_f, &piece(p, params, p.head())?, x)
    }

    /// The name of the output head's weight: `lm_head.weight`, or
    /// `transformer.wte.weight` when the head is tied to the embedding.
    pub fn head_parameter(&self) -> &str {
        self.params.name(self.params.head())
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

/// What the head's GEMM pads the vocabulary to a multiple of for `rows`
/// tokens: 64 on a CUDA device (tensor-core GEMMs want aligned dimensions;
/// GPT-2's 50257 becomes 50304, as llm.c pads it), none elsewhere, nor for
/// a few rows (decoding: there the copy of the padded head would cost more
/// than the product).
pub(crate) fn vocab_multiple(device: &Device, rows: usize) -> usize {
    if device.is_cuda() && rows >= 64 {
        64
    } else {
        1
    }
}

/// Logits `[B, T, V]` of `x` `[B, T, C]` against the head `[V, C]`, the
/// GEMM run over the vocabulary padded with zero rows to a multiple of
/// `multiple`; the padding's columns are cut off (a view, which the loss
/// reads in place on CUDA), so the logits, the loss and every gradient are
/// those of the unpadded product.
pub(crate) fn head_logits(
    x: &Tensor,
    head: &Tensor,
    multiple: usize,
) -> candle_core::Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    let v = head.dim(0)?;
    let padded = v.div_ceil(multiple) * multiple;
    let w = if padded > v {
        let zeros = Tensor::zeros((padded - v, c), head.dtype(), head.device())?;
        Tensor::cat(&[head, &zeros], 0)?
    } else {
        head.clone()
    };
    let logits = x
        .reshape((b * t, c))?
        .matmul(&w.t()?)?
        .reshape((b, t, padded))?;
    if padded > v {
        logits.narrow(2, 0, v)
    } else {
        Ok(logits)
    }
}
