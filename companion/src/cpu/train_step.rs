//! The fused training step: GPT-2's forward and backward pass over the
//! buffers of a [`Workspace`], gradients added straight into a flat buffer
//! (the ZeRO engine's), every layer's backward in reverse order of its
//! forward.

use std::ops::Range;

use rayon::prelude::*;

use super::block::{BlockMask, BlockRun, BlockScratch};
use super::gemm::{matmul, two_mut};
use super::inputs::{
    check_label, check_length, check_mask, check_token_ids, positions, InputError,
};
use super::layers::{cross_entropy_backward, layer_norm, layer_norm_backward, mul_mask};
use super::weights::{supports, DropoutMasks, Weights};
use super::workspace::Workspace;
use crate::config::GPT2Config;
use crate::data::IGNORE_INDEX;
use crate::params::Gpt2Params;

/// One micro-batch: `ids` and `labels` `[B][T]`, `mask` (1 = token) or none.
pub struct Batch<'a> {
    pub ids: &'a [Vec<u32>],
    pub labels: &'a [Vec<i64>],
    pub mask: Option<&'a [Vec<u32>]>,
}

/// Check the batch the way the model and the loss do, with their messages.
fn validate(cfg: &GPT2Config, batch: &Batch) -> Result<(usize, usize), InputError> {
    let b = batch.ids.len();
    let t = batch.ids.first().map_or(0, |r| r.len());
    if b == 0 || t == 0 || batch.ids.iter().any(|r| r.len() != t) {
        return Err(InputError(format!(
            "input_ids must be a non-empty [B, T] batch of equal rows, got {b} rows"
        )));
    }
    check_length(t, cfg.n_positions)?;
    check_token_ids(batch.ids.iter().flatten().copied().max(), cfg.vocab_size)?;
    if batch.labels.len() != b || batch.labels.iter().any(|r| r.len() != t) {
        return Err(InputError(format!(
            "labels must have shape [{b}, {t}] like input_ids"
        )));
    }
    for &l in batch.labels.iter().flat_map(|r| &r[1..]) {
        check_label(l, cfg.vocab_size)?;
    }
    check_mask(batch.mask, b, t)?;
    Ok((b, t))
}

impl Workspace {
    /// Forward and backward of one micro-batch. Returns the summed
    /// cross-entropy over the label tokens (as `model::causal_lm_loss_sum`);
    /// when it is finite, adds `grad_scale ×` its gradient into `grads`,
    /// where weight `i` of `weights` owns `grads[ranges[i]]`. With
    /// `dropout`, the model is in training mode and draws its masks there.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &mut self,
        cfg: &GPT2Config,
        weights: &Weights,
        batch: &Batch,
        dropout: Option<&dyn DropoutMasks>,
        grads: &mut [f32],
        ranges: &[Range<usize>],
        grad_scale: f32,
    ) -> Result<f64, InputError> {
        if !supports(cfg) {
            return Err(InputError(
                "the fused CPU kernels need gelu_new (GPT-2's activation)".into(),
            ));
        }
        let (b, t) = validate(cfg, batch)?;
        if ranges.len() != weights.params.len() || ranges.iter().any(|r| r.end > grads.len()) {
            return Err(InputError(
                "gradient ranges do not match the model's parameters".into(),
            ));
        }
        let idx = weights.index(cfg)?;
        self.run(
            cfg,
            idx,
            weights.values,
            batch,
            dropout,
            (b, t),
            grads,
            ranges,
            grad_scale,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        cfg: &GPT2Config,
        idx: &Gpt2Params,
        w: &[&[f32]],
        batch: &Batch,
        dropout: Option<&dyn DropoutMasks>,
        (b, t): (usize, usize),
        grads: &mut [f32],
        ranges: &[Range<usize>],
        grad_scale: f32,
    ) -> Result<f64, InputError> {
        let (c, h, v) = (cfg.n_embd, cfg.n_head, cfg.vocab_size);
        let f = cfg.inner_dim();
        let bt = b * t;
        let eps = cfg.layer_norm_epsilon as f32;
        let p = |p: f64| if dropout.is_some() { p } else { 0.0 };
        let (p_emb, p_att, p_res) = (p(cfg.embd_pdrop), p(cfg.attn_pdrop), p(cfg.resid_pdrop));
        let fill = |out: &mut [f32], p: f64| {
            if let Some(d) = dropout {
                d.fill_mask(out, p)
            }
        };
        self.allocate(cfg, b, t, [p_emb > 0.0, p_att > 0.0, p_res > 0.0]);
        let mask = batch.mask;
        let pos = positions(b, t, 0, mask);
        let ids: Vec<u32> = batch.ids.iter().flatten().copied().collect();

        // ---- forward
        // Embeddings, then dropout.
        {
            let (wte, wpe) = (w[idx.wte], w[idx.wpe]);
            let x = &mut self.res[0];
            x.par_chunks_mut(c).enumerate().for_each(|(r, row)| {
                let (tok, p) = (ids[r] as usize, pos[r] as usize);
                let (te, pe) = (&wte[tok * c..(tok + 1) * c], &wpe[p * c..(p + 1) * c]);
                for i in 0..c {
                    row[i] = te[i] + pe[i];
                }
            });
            if p_emb > 0.0 {
                fill(&mut self.emb_mask, p_emb);
                let m = &self.emb_mask;
                x.par_chunks_mut(4096)
                    .zip(m.par_chunks(4096))
                    .for_each(|(x, m)| x.iter_mut().zip(m).for_each(|(x, m)| *x *= m));
            }
        }
        let block = |l: usize| BlockRun {
            w,
            p: &idx.blocks[l],
            b,
            t,
            c,
            cl: c,
            heads: h,
            inner: f,
            eps,
            scale: cfg.attn_scale(l),
            p_att,
            p_res,
            adds_bias: true,
            key_mask: mask,
        };
        let mut one_rank = |_: &mut [f32]| Ok::<(), InputError>(());
        for l in 0..cfg.n_layer {
            let (head, rest) = self.res.split_at_mut(l + 1);
            let mut draw = |k: BlockMask, out: &mut [f32]| {
                fill(
                    out,
                    if k == BlockMask::Attention {
                        p_att
                    } else {
                        p_res
                    },
                )
            };
            block(l).forward(
                &mut self.layers[l],
                &head[l],
                &mut rest[0],
                &mut self.tmp,
                &mut draw,
                &mut one_rank,
            )?;
        }
        let x_last = &self.res[cfg.n_layer];
        layer_norm(
            x_last,
            w[idx.ln_f.weight],
            w[idx.ln_f.bias],
            eps,
            &mut self.lnf,
            &mut self.lnf_mean,
            &mut self.lnf_rstd,
        );
        let head = w[idx.head()];
        matmul(
            &mut self.logits,
            (&self.lnf, c, 1),
            (head, 1, c),
            bt,
            v,
            c,
            false,
        );

        // ---- loss, and its gradient in place of the logits
        let targets: Vec<i64> = (0..bt)
            .map(|r| {
                let (row, i) = (r / t, r % t);
                if i + 1 < t {
                    batch.labels[row][i + 1]
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        // Row losses collected, then summed in order: rayon's `sum` would
        // round differently from run to run.
        let row_losses: Vec<f64> = self
            .logits
            .par_chunks_mut(v)
            .zip(targets.par_iter())
            .map(|(row, &tg)| {
                if tg < 0 {
                    row.fill(0.0);
                    return 0.0;
                }
                cross_entropy_backward(row, tg as usize, grad_scale)
            })
            .collect();
        let loss: f64 = row_losses.iter().sum();
        if !loss.is_finite() {
            return Ok(loss);
        }

        // ---- backward
        let g = |i: usize| ranges[i].clone();
        // Head: logits = ln_f(x) · headᵀ (head = wte when tied).
        matmul(
            &mut self.dln,
            (&self.logits, v, 1),
            (head, c, 1),
            bt,
            c,
            v,
            false,
        );
        matmul(
            &mut grads[g(idx.head())],
            (&self.logits, 1, v),
            (&self.lnf, c, 1),
            v,
            c,
            bt,
            true,
        );
        self.dres.fill(0.0);
        let (gw, gb) = two_mut(grads, g(idx.ln_f.weight), g(idx.ln_f.bias));
        layer_norm_backward(
            &mut self.dres,
            gw,
            gb,
            &self.dln,
            x_last,
            w[idx.ln_f.weight],
            &self.lnf_mean,
            &self.lnf_rstd,
        );
        for l in (0..cfg.n_layer).rev() {
            let scratch = BlockScratch {
                dtmp: &mut self.dtmp,
                dln: &mut self.dln,
                dfc: &mut self.dfc,
                dqkv: &mut self.dqkv,
                datt: &mut self.datt,
            };
            let (a, x_in) = (&self.layers[l], &self.res[l]);
            block(l).backward(
                a,
                x_in,
                &mut self.dres,
                (grads, ranges),
                scratch,
                &mut one_rank,
            )?;
        }
        // Embeddings: scatter-add into the rows of wte and wpe (tied wte
        // already holds the head's gradient).
        mul_mask(
            &mut self.dtmp,
            &self.dres,
            (p_emb > 0.0).then_some(&self.emb_mask[..]),
        );
        {
            let gte = &mut grads[g(idx.wte)];
            for (r, d) in self.dtmp.chunks(c).enumerate() {
                let tok = ids[r] as usize;
                gte[tok * c..(tok + 1) * c]
                    .iter_mut()
                    .zip(d)
                    .for_each(|(a, d)| *a += d);
            }
        }
        {
            let gpe = &mut grads[g(idx.wpe)];
            for (r, d) in self.dtmp.chunks(c).enumerate() {
                let p = pos[r] as usize;
                gpe[p * c..(p + 1) * c]
                    .iter_mut()
                    .zip(d)
                    .for_each(|(a, d)| *a += d);
            }
        }
        Ok(loss)
    }
}
