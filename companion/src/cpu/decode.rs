//! Decoding on the CPU: GPT-2's forward pass for the new tokens only, with
//! the keys and values of earlier positions in a cache, each weight matrix
//! read once per new token.

use super::gemm::{for_blocks, linear, lm_head, SharedMut};
use super::inputs::{check_token_ids, positions, InputError};
use super::layers::{add_dropped, layer_norm, masked_softmax_row, mlp_forward};
use super::simd::{axpy, dot};
use super::weights::{mlp_weights, Weights};
use crate::config::GPT2Config;

/// Keys and values of earlier positions for [`forward_cached`]: per layer
/// `[B, H, capacity, head_dim]`, so each head's keys are contiguous; the
/// capacity doubles when full, so a token costs the same at any position.
#[derive(Clone, Default)]
pub struct KvBuffers {
    rows: usize,
    pub(crate) len: usize,
    cap: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvBuffers {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room for `total` positions of `rows` sequences, keeping what is held.
    fn reserve(&mut self, rows: usize, total: usize, n_layer: usize, h: usize, hd: usize) {
        if total <= self.cap {
            return;
        }
        let cap = total.max(2 * self.cap).max(64);
        let grow = |old: &[f32]| {
            let mut new = vec![0f32; rows * h * cap * hd];
            for bh in 0..rows * h {
                let n = self.len * hd;
                new[bh * cap * hd..bh * cap * hd + n]
                    .copy_from_slice(&old[bh * self.cap * hd..bh * self.cap * hd + n]);
            }
            new
        };
        self.k = (0..n_layer)
            .map(|l| grow(self.k.get(l).map_or(&[][..], |v| v)))
            .collect();
        self.v = (0..n_layer)
            .map(|l| grow(self.v.get(l).map_or(&[][..], |v| v)))
            .collect();
        self.rows = rows;
        self.cap = cap;
    }
}

/// Inference with a cache, as `GPT2LMHeadModel::forward` with a
/// `KvCache` computes it (the same masking and positions): `ids` are the new
/// tokens `[B][t]`, `mask` covers past and new positions. Returns the
/// logits `[B·t, V]`. fp32 on the CPU (see [`supports`](super::supports)), eval mode.
pub fn forward_cached(
    cfg: &GPT2Config,
    weights: &Weights,
    ids: &[Vec<u32>],
    mask: Option<&[Vec<u32>]>,
    cache: &mut KvBuffers,
) -> Result<Vec<f32>, InputError> {
    let (c, h, v, nl) = (cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.n_layer);
    let f = cfg.inner_dim();
    let hd = cfg.head_dim();
    let b = ids.len();
    let t = ids.first().map_or(0, |r| r.len());
    if b == 0 || t == 0 || ids.iter().any(|r| r.len() != t) {
        return Err(InputError(
            "input_ids must be a non-empty [B, T] batch".into(),
        ));
    }
    if !cache.is_empty() && cache.rows != b {
        return Err(InputError(format!(
            "the cache holds {} sequences, the input has {b}",
            cache.rows
        )));
    }
    check_token_ids(ids.iter().flatten().copied().max(), v)?;
    let past = cache.len;
    let total = past + t;
    cache.reserve(b, total, nl, h, hd);
    let cap = cache.cap;
    let eps = cfg.layer_norm_epsilon as f32;
    let pos = positions(b, t, past, mask);
    let idx = weights.index(cfg)?;
    let w = weights.values;
    {
        let bt = b * t;
        let mut x = vec![0f32; bt * c];
        for (r, row) in x.chunks_mut(c).enumerate() {
            let (tok, p) = (ids[r / t][r % t] as usize, pos[r] as usize);
            let (te, pe) = (
                &w[idx.wte][tok * c..(tok + 1) * c],
                &w[idx.wpe][p * c..(p + 1) * c],
            );
            row.iter_mut()
                .zip(te.iter().zip(pe))
                .for_each(|(x, (a, b))| *x = a + b);
        }
        let (mut hbuf, mut mean, mut rstd) = (vec![0f32; bt * c], vec![0f32; bt], vec![0f32; bt]);
        let mut qkv = vec![0f32; bt * 3 * c];
        let mut atty = vec![0f32; bt * c];
        let mut o = vec![0f32; bt * c];
        let (mut fc, mut fc_act) = (vec![0f32; bt * f], vec![0f32; bt * f]);
        for l in 0..nl {
            let bi = &idx.blocks[l];
            layer_norm(
                &x,
                w[bi.ln_1.weight],
                w[bi.ln_1.bias],
                eps,
                &mut hbuf,
                &mut mean,
                &mut rstd,
            );
            linear(
                &mut qkv,
                &hbuf,
                w[bi.c_attn.weight],
                w[bi.c_attn.bias],
                bt,
                c,
                3 * c,
            );
            let (kc, vc) = (&mut cache.k[l], &mut cache.v[l]);
            for r in 0..bt {
                let (bb, i) = (r / t, r % t);
                for hh in 0..h {
                    let at = ((bb * h + hh) * cap + past + i) * hd;
                    let src = r * 3 * c + hh * hd;
                    kc[at..at + hd].copy_from_slice(&qkv[src + c..src + c + hd]);
                    vc[at..at + hd].copy_from_slice(&qkv[src + 2 * c..src + 2 * c + hd]);
                }
            }
            let scale = cfg.attn_scale(l);
            let (kc, vc) = (&cache.k[l], &cache.v[l]);
            let out = SharedMut(atty.as_mut_ptr());
            let qkv = &qkv;
            for_blocks(b * h, b * h * t * total * hd, |bh| {
                let (bb, hh) = (bh / h, bh % h);
                let keys = &kc[bh * cap * hd..(bh * cap + total) * hd];
                let vals = &vc[bh * cap * hd..(bh * cap + total) * hd];
                let mut p = vec![0f32; total];
                let mut y = vec![0f32; hd];
                for i in 0..t {
                    let q = &qkv[(bb * t + i) * 3 * c + hh * hd..][..hd];
                    let allowed = |j: usize| j <= past + i && mask.is_none_or(|mk| mk[bb][j] == 1);
                    for (j, pj) in p.iter_mut().enumerate() {
                        if allowed(j) {
                            *pj = dot(q, &keys[j * hd..(j + 1) * hd]);
                        }
                    }
                    masked_softmax_row(&mut p, scale, allowed);
                    y.fill(0.0);
                    for (j, &pj) in p.iter().enumerate() {
                        if pj != 0.0 {
                            axpy(&mut y, pj, &vals[j * hd..(j + 1) * hd]);
                        }
                    }
                    // SAFETY: head hh of row (bb, i) is written by this task only.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            out.ptr().add((bb * t + i) * c + hh * hd),
                            hd,
                        )
                    };
                    dst.copy_from_slice(&y);
                }
            });
            linear(
                &mut o,
                &atty,
                w[bi.attn_c_proj.weight],
                w[bi.attn_c_proj.bias],
                bt,
                c,
                c,
            );
            add_dropped(&mut x, &o, None);
            layer_norm(
                &x,
                w[bi.ln_2.weight],
                w[bi.ln_2.bias],
                eps,
                &mut hbuf,
                &mut mean,
                &mut rstd,
            );
            mlp_forward(
                &hbuf,
                &mut fc,
                &mut fc_act,
                &mut o,
                mlp_weights(bi, w),
                (bt, c, f),
            );
            add_dropped(&mut x, &o, None);
        }
        layer_norm(
            &x,
            w[idx.ln_f.weight],
            w[idx.ln_f.bias],
            eps,
            &mut hbuf,
            &mut mean,
            &mut rstd,
        );
        let mut logits = vec![0f32; bt * v];
        lm_head(&mut logits, &hbuf, w[idx.head()], bt, c, v);
        cache.len = total;
        Ok(logits)
    }
}
