//! One transformer block's forward and backward passes over slices, shared
//! by the fused training step (the whole model on one rank) and a
//! tensor-parallel pipeline stage (`parallel::fused_stage`: a rank's heads
//! and MLP columns). The math is one. A split block sums over its group,
//! through `reduce`, the partial outputs of its row-parallel layers (the two
//! `c_proj`) in the forward pass and the partial input gradients of its
//! column-parallel ones (`c_attn`, `c_fc`) in the backward pass; one rank of
//! the group adds the replicated `c_proj` biases before the sum.

use std::ops::Range;

use super::attention::{attention_backward, attention_forward};
use super::gemm::{linear, linear_backward, two_mut};
use super::layers::{
    add_dropped, gelu_backward, layer_norm, layer_norm_backward, mlp_forward, mul_mask,
};
use super::workspace::LayerActs;
use crate::params::BlockParams;

/// Which of a block's dropout masks is drawn (in this order, each only when
/// its probability is above 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockMask {
    /// The attention probabilities `[B, heads, T, T]`.
    Attention,
    /// The attention's output `[B·T, C]`.
    AttentionOut,
    /// The MLP's output `[B·T, C]`.
    MlpOut,
}

/// A block's weights and shape on this rank.
pub(crate) struct BlockRun<'a> {
    /// Every weight by parameter index, and the block's indices.
    pub w: &'a [&'a [f32]],
    pub p: &'a BlockParams,
    /// Rows, tokens per row, the residual width, this rank's attention
    /// columns and heads, and its MLP columns.
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub cl: usize,
    pub heads: usize,
    pub inner: usize,
    pub eps: f32,
    /// The attention's score scale.
    pub scale: f32,
    /// Dropout of the attention probabilities and of the residual branches
    /// (0: off).
    pub p_att: f64,
    pub p_res: f64,
    /// Whether this rank adds the `c_proj` biases (one rank of a group).
    pub adds_bias: bool,
    pub key_mask: Option<&'a [Vec<u32>]>,
}

/// Scratch for the backward pass (overwritten): `dtmp`, `dln` `[B·T, C]`,
/// `dfc` `[B·T, inner]`, `dqkv` `[B·T, 3·cl]`, `datt` like the attention.
pub(crate) struct BlockScratch<'a> {
    pub dtmp: &'a mut [f32],
    pub dln: &'a mut [f32],
    pub dfc: &'a mut [f32],
    pub dqkv: &'a mut [f32],
    pub datt: &'a mut [f32],
}

impl BlockRun<'_> {
    /// The `c_proj` bias this rank adds: the block's, or zeros.
    fn proj_bias<'z>(&'z self, i: usize, zeros: &'z [f32]) -> &'z [f32] {
        if self.adds_bias {
            self.w[i]
        } else {
            zeros
        }
    }

    /// The forward pass from `x_in` to `x_out` (`[B·T, C]`), keeping in `a`
    /// what the backward pass needs (sized by the caller, `LayerActs::size`);
    /// `tmp` is `[B·T, C]` scratch. `fill` draws a mask; `reduce` sums over
    /// the tensor-parallel group in place (nothing to do on one rank).
    pub(crate) fn forward<E>(
        &self,
        a: &mut LayerActs,
        x_in: &[f32],
        x_out: &mut [f32],
        tmp: &mut [f32],
        fill: &mut dyn FnMut(BlockMask, &mut [f32]),
        reduce: &mut dyn FnMut(&mut [f32]) -> Result<(), E>,
    ) -> Result<(), E> {
        let (w, p) = (self.w, self.p);
        let (bt, c, cl) = (self.b * self.t, self.c, self.cl);
        let zeros = if self.adds_bias {
            Vec::new()
        } else {
            vec![0f32; c]
        };
        let (drop_att, drop_res) = (self.p_att > 0.0, self.p_res > 0.0);
        let (ln1, c_attn) = (p.ln_1, p.c_attn);
        layer_norm(
            x_in,
            w[ln1.weight],
            w[ln1.bias],
            self.eps,
            &mut a.ln1,
            &mut a.ln1_mean,
            &mut a.ln1_rstd,
        );
        linear(
            &mut a.qkv,
            &a.ln1,
            w[c_attn.weight],
            w[c_attn.bias],
            bt,
            c,
            3 * cl,
        );
        if drop_att {
            fill(BlockMask::Attention, &mut a.att_d);
        }
        attention_forward(a, self.key_mask, self.t, cl, self.heads, self.scale);
        let proj = p.attn_c_proj;
        linear(
            tmp,
            &a.atty,
            w[proj.weight],
            self.proj_bias(proj.bias, &zeros),
            bt,
            cl,
            c,
        );
        reduce(tmp)?;
        if drop_res {
            fill(BlockMask::AttentionOut, &mut a.attn_mask);
        }
        a.x2.copy_from_slice(x_in);
        add_dropped(&mut a.x2, tmp, drop_res.then_some(&a.attn_mask[..]));
        let ln2 = p.ln_2;
        layer_norm(
            &a.x2,
            w[ln2.weight],
            w[ln2.bias],
            self.eps,
            &mut a.ln2,
            &mut a.ln2_mean,
            &mut a.ln2_rstd,
        );
        let (fc, mp) = (p.c_fc, p.mlp_c_proj);
        let weights = (
            w[fc.weight],
            w[fc.bias],
            w[mp.weight],
            self.proj_bias(mp.bias, &zeros),
        );
        mlp_forward(
            &a.ln2,
            &mut a.fc,
            &mut a.fc_act,
            tmp,
            weights,
            (bt, c, self.inner),
        );
        reduce(tmp)?;
        if drop_res {
            fill(BlockMask::MlpOut, &mut a.mlp_mask);
        }
        x_out.copy_from_slice(&a.x2);
        add_dropped(x_out, tmp, drop_res.then_some(&a.mlp_mask[..]));
        Ok(())
    }

    /// The backward pass: `dres`, the gradient of the block's output, becomes
    /// that of its input `x_in`; the weights' gradients are added into
    /// `grads` (parameter `i` at `ranges[i]`); `s` is scratch.
    pub(crate) fn backward<E>(
        &self,
        a: &LayerActs,
        x_in: &[f32],
        dres: &mut [f32],
        (grads, ranges): (&mut [f32], &[Range<usize>]),
        s: BlockScratch,
        reduce: &mut dyn FnMut(&mut [f32]) -> Result<(), E>,
    ) -> Result<(), E> {
        let (w, p) = (self.w, self.p);
        let (b, t, c, cl, inner) = (self.b, self.t, self.c, self.cl, self.inner);
        let bt = b * t;
        let g = |i: usize| ranges[i].clone();
        let drop_res = self.p_res > 0.0;
        // MLP branch: x_out = x2 + dropout(gelu(ln_2(x2)·W_fc + b)·W_proj + b).
        mul_mask(s.dtmp, dres, drop_res.then_some(&a.mlp_mask[..]));
        let mp = p.mlp_c_proj;
        let dfc = &mut s.dfc[..bt * inner];
        linear_backward(
            dfc,
            grads,
            (g(mp.weight), g(mp.bias)),
            (&a.fc_act, w[mp.weight], s.dtmp),
            (bt, inner, c),
        );
        gelu_backward(dfc, &a.fc);
        let fc = p.c_fc;
        linear_backward(
            s.dln,
            grads,
            (g(fc.weight), g(fc.bias)),
            (&a.ln2, w[fc.weight], dfc),
            (bt, c, inner),
        );
        reduce(s.dln)?;
        let ln2 = p.ln_2;
        let (gw, gb) = two_mut(grads, g(ln2.weight), g(ln2.bias));
        layer_norm_backward(
            dres,
            gw,
            gb,
            s.dln,
            &a.x2,
            w[ln2.weight],
            &a.ln2_mean,
            &a.ln2_rstd,
        );
        // Attention branch: x2 = x + dropout(attn(ln_1(x))·W_proj + b); the
        // heads' output gradient is kept in `dln` until the attention's
        // backward has read it.
        mul_mask(s.dtmp, dres, drop_res.then_some(&a.attn_mask[..]));
        let proj = p.attn_c_proj;
        let datty = &mut s.dln[..bt * cl];
        linear_backward(
            datty,
            grads,
            (g(proj.weight), g(proj.bias)),
            (&a.atty, w[proj.weight], s.dtmp),
            (bt, cl, c),
        );
        let drop = (self.p_att > 0.0).then(|| (1.0 / (1.0 - self.p_att)) as f32);
        let dqkv = &mut s.dqkv[..bt * 3 * cl];
        attention_backward(
            a,
            datty,
            dqkv,
            s.datt,
            (b, t, cl, self.heads),
            self.scale,
            drop,
        );
        let qkv = p.c_attn;
        linear_backward(
            s.dln,
            grads,
            (g(qkv.weight), g(qkv.bias)),
            (&a.ln1, w[qkv.weight], dqkv),
            (bt, c, 3 * cl),
        );
        reduce(s.dln)?;
        let ln1 = p.ln_1;
        let (gw, gb) = two_mut(grads, g(ln1.weight), g(ln1.bias));
        layer_norm_backward(
            dres,
            gw,
            gb,
            s.dln,
            x_in,
            w[ln1.weight],
            &a.ln1_mean,
            &a.ln1_rstd,
        );
        Ok(())
    }
}
