//! Dropout on a split model, drawing the masks the whole model draws: the
//! model's generator is counter-based and draws, per micro-batch, the
//! embeddings' mask, then per block the attention probabilities', the
//! attention output's and the MLP output's, one after another (a mask whose
//! probability is 0 is not drawn and takes no place in the stream). A stage
//! starts at its first block's place in that stream, and a tensor rank
//! takes the part of the attention mask that covers its heads (the other
//! masks cover replicated activations: every tensor rank draws them whole).
//! So a run split any way drops exactly what one rank drops.

use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::config::GPT2Config;
use crate::model::Dropout;

type Result<T> = candle_core::Result<T>;

/// One micro-batch's masks (`b` rows of `t` tokens) on a split model.
pub struct StageDropout<'a> {
    pub generator: &'a Dropout,
    pub config: &'a GPT2Config,
    pub b: usize,
    pub t: usize,
}

impl StageDropout<'_> {
    /// Draws of the attention probabilities' mask [B, H, T, T] (none at p = 0).
    fn probs(&self) -> u64 {
        let (b, t) = (self.b as u64, self.t as u64);
        drawn(self.config.attn_pdrop) * b * self.config.n_head as u64 * t * t
    }

    /// Draws of one residual branch's mask [B·T, C] (none at p = 0).
    fn branch(&self) -> u64 {
        drawn(self.config.resid_pdrop) * (self.b * self.t * self.config.n_embd) as u64
    }

    /// Draws of one block: attention probabilities, then the attention and
    /// MLP outputs.
    fn per_block(&self) -> u64 {
        self.probs() + 2 * self.branch()
    }

    fn embeddings(&self) -> u64 {
        drawn(self.config.embd_pdrop) * (self.b * self.t * self.config.n_embd) as u64
    }

    fn draw(&self, offset: u64, len: usize, p: f64) -> Vec<f32> {
        let mut m = vec![0f32; len];
        self.generator.fill_mask_at(offset, &mut m, p);
        m
    }

    /// `x` `[B·T, C]` with dropout `p` drawn at `offset` (unchanged at p = 0).
    fn whole(&self, x: &Tensor, offset: u64, p: f64) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let m = self.draw(offset, x.elem_count(), p);
        x * Tensor::from_vec(m, x.shape(), &Device::Cpu)?
    }

    /// The embeddings' dropout (`embd_pdrop`).
    pub fn embeddings_out(&self, x: &Tensor) -> Result<Tensor> {
        self.whole(x, 0, self.config.embd_pdrop)
    }

    /// Block `layer`'s dropout of the attention probabilities `att`
    /// `[B, heads.len(), T, T]` of this rank's `heads` (`attn_pdrop`).
    pub fn attention(&self, att: &Tensor, layer: usize, heads: Range<usize>) -> Result<Tensor> {
        let p = self.config.attn_pdrop;
        if p <= 0.0 {
            return Ok(att.clone());
        }
        let (h, tt) = (self.config.n_head as u64, (self.t * self.t) as u64);
        let start = self.embeddings() + layer as u64 * self.per_block();
        let mut m = Vec::with_capacity(att.elem_count());
        for row in 0..self.b as u64 {
            let at = start + (row * h + heads.start as u64) * tt;
            m.extend(self.draw(at, heads.len() * tt as usize, p));
        }
        att * Tensor::from_vec(m, att.shape(), &Device::Cpu)?
    }

    /// Block `layer`'s dropout of the attention output (`mlp: false`) or
    /// the MLP output (`mlp: true`), `[B·T, C]` (`resid_pdrop`).
    pub fn residual(&self, x: &Tensor, layer: usize, mlp: bool) -> Result<Tensor> {
        let offset = self.embeddings()
            + layer as u64 * self.per_block()
            + self.probs()
            + if mlp { self.branch() } else { 0 };
        self.whole(x, offset, self.config.resid_pdrop)
    }
}

/// Whether a mask of dropout probability `p` is drawn (1) or skipped (0).
fn drawn(p: f64) -> u64 {
    u64::from(p > 0.0)
}
