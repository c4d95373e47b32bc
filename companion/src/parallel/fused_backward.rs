//! The backward pass of a [`FusedStage`] over one micro-batch's
//! [`MicroActs`]: the head and the vocabulary-parallel cross-entropy on the
//! last stage, each block in reverse (the partial input gradients of its
//! column-parallel products summed over the group before each layer norm),
//! and the embeddings' rows on the first stage.

use super::collective_ops::vocab_parallel_grad;
use super::fused_stage::{comm_err, vocab_slice, with_weights, FusedStage, MicroActs};
use super::tensor::TensorParallelGpt2;
use crate::cpu::block::BlockScratch;
use crate::cpu::gemm::{matmul, two_mut};
use crate::cpu::layers::{layer_norm_backward, mul_mask};

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
                    let (gw, gb) = two_mut(grads, g(ln_f.weight), g(ln_f.bias));
                    let (mean, rstd) = (&acts.lnf_mean, &acts.lnf_rstd);
                    layer_norm_backward(&mut dres, gw, gb, &dln, x, w[ln_f.weight], mean, rstd);
                }
                (None, None, Some(go)) if go.len() == bt * width => dres.copy_from_slice(go),
                _ => candle_core::bail!(
                    "stage {}: the gradient of its {bt}×{width} output expected",
                    m.stage
                ),
            }
            // Each block (`cpu::block`), with scratch for the largest.
            let tp = m.comm.world_size();
            let (inner, heads) = (c.inner_dim() / tp, c.n_head / tp);
            let (mut dtmp, mut dln) = (vec![0f32; bt * width], vec![0f32; bt * width]);
            let mut dfc = vec![0f32; bt * inner];
            let mut dqkv = vec![0f32; bt * 3 * (width / tp)];
            let mut datt = vec![0f32; b * heads * t * t];
            let mut reduce = |y: &mut [f32]| m.comm.all_reduce_sum(y).map_err(comm_err);
            for (li, blk) in self.blocks.iter().enumerate().rev() {
                let run = Self::block_run(m, w, blk, (b, t), acts.dropout);
                let scratch = BlockScratch {
                    dtmp: &mut dtmp,
                    dln: &mut dln,
                    dfc: &mut dfc,
                    dqkv: &mut dqkv,
                    datt: &mut datt,
                };
                let (a, x_in) = (&acts.layers[li], &acts.res[li]);
                run.backward(
                    a,
                    x_in,
                    &mut dres,
                    (grads, &self.ranges),
                    scratch,
                    &mut reduce,
                )?;
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
}
