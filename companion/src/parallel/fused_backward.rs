//! The backward pass of a [`FusedStage`] over one micro-batch's
//! [`MicroActs`]: the head and the vocabulary-parallel cross-entropy on the
//! last stage, each block in reverse (the partial input gradients of its
//! column-parallel products summed over the group before each layer norm),
//! and the embeddings' rows on the first stage.

use super::collective_ops::vocab_parallel_grad;
use super::fused_stage::{comm_err, vocab_slice, with_weights, Block, FusedStage, MicroActs};
use super::tensor::TensorParallelGpt2;
use crate::cpu::attention::attention_backward;
use crate::cpu::gemm::{linear_backward, matmul, two_mut};
use crate::cpu::layers::{gelu_backward, layer_norm_backward, mul_mask};

type Result<T> = candle_core::Result<T>;

impl FusedStage {
    /// One micro-batch's backward pass, its gradients added into `grads`
    /// (shard `i` at `self.ranges[i]`): from the gradient of the stage's
    /// output, or on the last stage (`grad_out` none) of the loss summed
    /// over the micro-batch and divided by `tokens`. Gives the gradient of
    /// the stage's input (none on the first stage).
    pub fn backward(
        &self,
        m: &TensorParallelGpt2,
        acts: &MicroActs,
        grad_out: Option<&[f32]>,
        tokens: usize,
        grads: &mut [f32],
    ) -> Result<Option<Vec<f32>>> {
        let c = &m.config;
        let (b, t) = acts.shape;
        let (bt, width) = (b * t, c.n_embd);
        let g = |i: usize| self.ranges[i].clone();
        with_weights(m, |w| {
            let mut dres = vec![0f32; bt * width];
            match (self.ln_f, self.head, grad_out) {
                (Some(ln_f), Some(head), None) => {
                    let d = self.logits_grad(m, acts, tokens);
                    let (vl, _, _) = vocab_slice(m);
                    // The head: logits = ln_f(x) · headᵀ (head = wte when tied).
                    let mut dln = vec![0f32; bt * width];
                    matmul(
                        &mut dln,
                        (&d, vl, 1),
                        (w[head], width, 1),
                        bt,
                        width,
                        vl,
                        false,
                    );
                    let gh = &mut grads[g(head)];
                    matmul(gh, (&d, 1, vl), (&acts.lnf, width, 1), vl, width, bt, true);
                    m.comm.all_reduce_sum(&mut dln).map_err(comm_err)?;
                    let x = &acts.res[self.blocks.len()];
                    let (gw, gb) = two_mut(grads, g(ln_f.w), g(ln_f.b));
                    let (mean, rstd) = (&acts.lnf_mean, &acts.lnf_rstd);
                    layer_norm_backward(&mut dres, gw, gb, &dln, x, w[ln_f.w], mean, rstd);
                }
                (None, None, Some(go)) if go.len() == bt * width => dres.copy_from_slice(go),
                _ => candle_core::bail!(
                    "stage {}: the gradient of its {bt}×{width} output expected",
                    m.stage
                ),
            }
            for (li, blk) in self.blocks.iter().enumerate().rev() {
                self.block_backward(m, w, blk, li, acts, &mut dres, grads)?;
            }
            let (Some(wte), Some(wpe)) = (self.wte, self.wpe) else {
                return Ok(Some(dres));
            };
            // Embeddings: this rank's rows of wte, and the positions.
            let mut d = vec![0f32; bt * width];
            let dropped = acts.dropout && c.embd_pdrop > 0.0;
            mul_mask(&mut d, &dres, dropped.then_some(&acts.emb_mask[..]));
            let (vl, off, _) = vocab_slice(m);
            let gte = &mut grads[g(wte)];
            for (row, &id) in d.chunks(width).zip(&acts.ids) {
                if let Some(l) = (id as usize).checked_sub(off).filter(|&l| l < vl) {
                    let dst = &mut gte[l * width..(l + 1) * width];
                    dst.iter_mut().zip(row).for_each(|(a, v)| *a += v);
                }
            }
            let gpe = &mut grads[g(wpe)];
            for (r, row) in d.chunks(width).enumerate() {
                let p = r % t;
                let dst = &mut gpe[p * width..(p + 1) * width];
                dst.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            Ok(None)
        })
    }

    /// The gradient of the loss (÷ `tokens`) with respect to this rank's
    /// logits (`collective_ops::vocab_parallel_grad`).
    fn logits_grad(&self, m: &TensorParallelGpt2, acts: &MicroActs, tokens: usize) -> Vec<f32> {
        let (vl, off, real) = vocab_slice(m);
        let mut d = acts.logits.clone();
        let stats = (&acts.max[..], &acts.sumexp[..]);
        let scale = 1.0 / tokens.max(1) as f32;
        vocab_parallel_grad(&mut d, (vl, real), &acts.targets, off, stats, scale);
        d
    }

    /// One block's backward on this rank's heads and MLP columns; `dres`
    /// (the residual stream's gradient) goes from the block's output to its
    /// input.
    #[allow(clippy::too_many_arguments)]
    fn block_backward(
        &self,
        m: &TensorParallelGpt2,
        w: &[&[f32]],
        blk: &Block,
        li: usize,
        acts: &MicroActs,
        dres: &mut [f32],
        grads: &mut [f32],
    ) -> Result<()> {
        let c = &m.config;
        let tp = m.comm.world_size();
        let (b, t) = acts.shape;
        let (bt, width, heads, inner) = (b * t, c.n_embd, c.n_head / tp, c.inner_dim() / tp);
        let cl = width / tp;
        let p_att = if acts.dropout { c.attn_pdrop } else { 0.0 };
        let p_res = if acts.dropout { c.resid_pdrop } else { 0.0 };
        let g = |i: usize| self.ranges[i].clone();
        let a = &acts.layers[li];
        // MLP branch: x_out = x2 + dropout(gelu(ln_2(x2)·W_fc + b)·W_proj + b).
        let mut dtmp = vec![0f32; bt * width];
        mul_mask(&mut dtmp, dres, (p_res > 0.0).then_some(&a.mlp_mask[..]));
        let mut dfc = vec![0f32; bt * inner];
        let (pw, pb) = (g(blk.mlp_proj.w), g(blk.mlp_proj.b));
        let x = (&a.fc_act[..], w[blk.mlp_proj.w], &dtmp[..]);
        linear_backward(&mut dfc, grads, (pw, pb), x, (bt, inner, width));
        gelu_backward(&mut dfc, &a.fc);
        let mut dln = vec![0f32; bt * width];
        let (fw, fb) = (g(blk.c_fc.w), g(blk.c_fc.b));
        let x = (&a.ln2[..], w[blk.c_fc.w], &dfc[..]);
        linear_backward(&mut dln, grads, (fw, fb), x, (bt, width, inner));
        m.comm.all_reduce_sum(&mut dln).map_err(comm_err)?;
        let (gw, gb) = two_mut(grads, g(blk.ln_2.w), g(blk.ln_2.b));
        let (mean, rstd) = (&a.ln2_mean, &a.ln2_rstd);
        layer_norm_backward(dres, gw, gb, &dln, &a.x2, w[blk.ln_2.w], mean, rstd);
        // Attention branch: x2 = x + dropout(attn(ln_1(x))·W_proj + b).
        mul_mask(&mut dtmp, dres, (p_res > 0.0).then_some(&a.attn_mask[..]));
        let mut datty = vec![0f32; bt * cl];
        let (pw, pb) = (g(blk.attn_proj.w), g(blk.attn_proj.b));
        let x = (&a.atty[..], w[blk.attn_proj.w], &dtmp[..]);
        linear_backward(&mut datty, grads, (pw, pb), x, (bt, cl, width));
        let mut dqkv = vec![0f32; bt * 3 * cl];
        let mut datt = vec![0f32; b * heads * t * t];
        let scale = c.attn_scale(blk.layer);
        let drop = (p_att > 0.0).then(|| (1.0 / (1.0 - p_att)) as f32);
        attention_backward(
            a,
            &datty,
            &mut dqkv,
            &mut datt,
            (b, t, cl, heads),
            scale,
            drop,
        );
        let (qw, qb) = (g(blk.c_attn.w), g(blk.c_attn.b));
        let x = (&a.ln1[..], w[blk.c_attn.w], &dqkv[..]);
        linear_backward(&mut dln, grads, (qw, qb), x, (bt, width, 3 * cl));
        m.comm.all_reduce_sum(&mut dln).map_err(comm_err)?;
        let (gw, gb) = two_mut(grads, g(blk.ln_1.w), g(blk.ln_1.b));
        let (mean, rstd) = (&a.ln1_mean, &a.ln1_rstd);
        layer_norm_backward(dres, gw, gb, &dln, &acts.res[li], w[blk.ln_1.w], mean, rstd);
        Ok(())
    }
}
