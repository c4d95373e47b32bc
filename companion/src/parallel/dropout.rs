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

use candle_core::Tensor;

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

    /// The embeddings' mask into `out` `[B·T, C]` (`embd_pdrop`; untouched at p = 0).
    pub fn fill_embeddings(&self, out: &mut [f32]) {
        self.fill_at(0, out, self.config.embd_pdrop);
    }

    /// Block `layer`'s mask of the attention probabilities of this rank's
    /// `heads` into `out` `[B, heads.len(), T, T]` (`attn_pdrop`).
    pub fn fill_attention(&self, out: &mut [f32], layer: usize, heads: Range<usize>) {
        let p = self.config.attn_pdrop;
        if p <= 0.0 {
            return;
        }
        let (h, tt) = (self.config.n_head as u64, (self.t * self.t) as u64);
        let start = self.embeddings() + layer as u64 * self.per_block();
        let width = heads.len() * tt as usize;
        for (row, chunk) in out.chunks_mut(width).enumerate() {
            let at = start + (row as u64 * h + heads.start as u64) * tt;
            self.generator.fill_mask_at(at, chunk, p);
        }
    }

    /// Block `layer`'s mask of the attention output (`mlp: false`) or the
    /// MLP output (`mlp: true`) into `out` `[B·T, C]` (`resid_pdrop`).
    pub fn fill_residual(&self, out: &mut [f32], layer: usize, mlp: bool) {
        let offset = self.embeddings()
            + layer as u64 * self.per_block()
            + self.probs()
            + if mlp { self.branch() } else { 0 };
        self.fill_at(offset, out, self.config.resid_pdrop);
    }

    fn fill_at(&self, offset: u64, out: &mut [f32], p: f64) {
        if p > 0.0 {
            self.generator.fill_mask_at(offset, out, p);
        }
    }

    /// `x` times the mask `fill` draws (unchanged at p = 0).
    fn masked(&self, x: &Tensor, p: f64, fill: impl FnOnce(&mut [f32])) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let mut m = vec![0f32; x.elem_count()];
        fill(&mut m);
        x * Tensor::from_vec(m, x.shape(), x.device())?
    }

    /// The embeddings' dropout (`embd_pdrop`).
    pub fn embeddings_out(&self, x: &Tensor) -> Result<Tensor> {
        self.masked(x, self.config.embd_pdrop, |m| self.fill_embeddings(m))
    }

    /// Block `layer`'s dropout of the attention probabilities `att`
    /// `[B, heads.len(), T, T]` of this rank's `heads` (`attn_pdrop`).
    pub fn attention(&self, att: &Tensor, layer: usize, heads: Range<usize>) -> Result<Tensor> {
        self.masked(att, self.config.attn_pdrop, |m| {
            self.fill_attention(m, layer, heads)
        })
    }

    /// Block `layer`'s dropout of the attention output (`mlp: false`) or
    /// the MLP output (`mlp: true`), `B·T·C` elements in row order, of any
    /// shape (`resid_pdrop`).
    pub fn residual(&self, x: &Tensor, layer: usize, mlp: bool) -> Result<Tensor> {
        self.masked(x, self.config.resid_pdrop, |m| {
            self.fill_residual(m, layer, mlp)
        })
    }
}

/// Whether a mask of dropout probability `p` is drawn (1) or skipped (0).
fn drawn(p: f64) -> u64 {
    u64::from(p > 0.0)
}
