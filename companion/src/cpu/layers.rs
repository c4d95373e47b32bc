//! GPT-2's layers on slices, each forward beside its backward (as llm.c
//! lays them out): layer norm, GELU (tanh form), the masked softmax of
//! attention, cross-entropy, dropout masks and residuals. These are the one
//! implementation of this math: the fused training step and decoding use
//! them directly, and candle's custom ops (`model::autograd_ops`) call them
//! for the autograd path.

use std::ops::Range;

use rayon::prelude::*;

use super::gemm::{linear, reduce_rows};
use super::simd::{exp_shifted, sum_exp_shifted, tanh_fast};

// ---------------------------------------------------------------- layer norm

/// A row's mean and reciprocal standard deviation.
pub(crate) fn ln_row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// One row: `y = (x − mean)·rstd·w + b`.
pub(crate) fn ln_row(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], (mean, rstd): (f32, f32)) {
    for i in 0..w.len() {
        y[i] = (x[i] - mean) * rstd * w[i] + b[i];
    }
}

/// One row of the input gradient, added into `dx`:
/// `rstd · (g·w − mean(g·w) − x̂ · mean(g·w·x̂))`.
pub(crate) fn ln_row_grad_x(
    dx: &mut [f32],
    g: &[f32],
    x: &[f32],
    w: &[f32],
    (mean, rstd): (f32, f32),
) {
    let c = w.len();
    let (mut m1, mut m2) = (0f32, 0f32);
    for i in 0..c {
        let gw = g[i] * w[i];
        m1 += gw;
        m2 += gw * (x[i] - mean) * rstd;
    }
    m1 /= c as f32;
    m2 /= c as f32;
    for i in 0..c {
        let xhat = (x[i] - mean) * rstd;
        dx[i] += rstd * (g[i] * w[i] - m1 - xhat * m2);
    }
}

/// One row's share of `[dw; db] = [Σ g·x̂; Σ g]`, added into `acc` (`2C`).
pub(crate) fn ln_row_grad_wb(acc: &mut [f32], g: &[f32], x: &[f32], (mean, rstd): (f32, f32)) {
    let c = g.len();
    for i in 0..c {
        acc[i] += g[i] * (x[i] - mean) * rstd;
        acc[c + i] += g[i];
    }
}

/// Layer norm of each `c`-row of `x` into `out`, keeping each row's mean
/// and reciprocal standard deviation for the backward pass.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let c = w.len();
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((y, x), (m, r))| {
            (*m, *r) = ln_row_stats(x, eps);
            ln_row(y, x, w, b, (*m, *r));
        });
}

/// Layer-norm backward: `dx += rstd·(g·w − mean(g·w) − x̂·mean(g·w·x̂))`,
/// `dw += Σ g·x̂`, `db += Σ g`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    g: &[f32],
    x: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
) {
    let c = w.len();
    dx.par_chunks_mut(c)
        .zip(g.par_chunks(c).zip(x.par_chunks(c)))
        .zip(mean.par_iter().zip(rstd.par_iter()))
        .for_each(|((dx, (g, x)), (&mu, &rs))| ln_row_grad_x(dx, g, x, w, (mu, rs)));
    let sums = layer_norm_grad_wb(g, x, c, |row| (mean[row], rstd[row]));
    dw.iter_mut().zip(&sums[..c]).for_each(|(d, s)| *d += s);
    db.iter_mut().zip(&sums[c..]).for_each(|(d, s)| *d += s);
}

/// `[Σ g·x̂; Σ g]` over the rows of `g` and `x` (`c` wide), as a `2c`
/// vector: the weight and bias gradients of layer norm, summed over fixed
/// row chunks so that the result does not depend on the thread count.
pub(crate) fn layer_norm_grad_wb(
    g: &[f32],
    x: &[f32],
    c: usize,
    stats: impl Fn(usize) -> (f32, f32) + Sync,
) -> Vec<f32> {
    reduce_rows(x.len() / c, 2 * c, |r: Range<usize>, acc| {
        for row in r {
            let (g, x) = (&g[row * c..(row + 1) * c], &x[row * c..(row + 1) * c]);
            ln_row_grad_wb(acc, g, x, stats(row));
        }
    })
}

// ---------------------------------------------------------------------- GELU

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

#[inline(always)]
fn gelu_body(x: &[f32], y: &mut [f32]) {
    for (y, &v) in y.iter_mut().zip(x) {
        *y = 0.5 * v * (1.0 + tanh_fast(SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)));
    }
}

vectorised! {
    /// HF's `gelu_new` of one chunk.
    fn gelu_chunk(x: &[f32], y: &mut [f32]) = gelu_body
}

#[inline(always)]
fn gelu_backward_body(g: &mut [f32], x: &[f32]) {
    for (g, &v) in g.iter_mut().zip(x) {
        let t = tanh_fast(SQRT_2_OVER_PI * (v + 0.044715 * v * v * v));
        let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * v * v);
        *g *= 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du;
    }
}

vectorised! {
    /// `g ← g · gelu_new'(x)` on one chunk.
    fn gelu_backward_chunk(g: &mut [f32], x: &[f32]) = gelu_backward_body
}

/// HF's `gelu_new`: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
pub(crate) fn gelu(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(y, x)| gelu_chunk(x, y));
}

/// `g ← g · gelu'(x)`, in place.
pub(crate) fn gelu_backward(g: &mut [f32], x: &[f32]) {
    g.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(g, x)| gelu_backward_chunk(g, x));
}

// ------------------------------------------------------------ masked softmax

/// The score a masked (future or padding) key gets before the softmax.
pub const MASKED: f32 = -1e9;

/// One row of attention: `row[j] ← softmax_j(scale · row[j])` over the keys
/// `allowed(j)` admits (the others get [`MASKED`], so `e^…` is 0).
pub(crate) fn masked_softmax_row(row: &mut [f32], scale: f32, allowed: impl Fn(usize) -> bool) {
    let mut m = f32::NEG_INFINITY;
    for (j, x) in row.iter_mut().enumerate() {
        *x = if allowed(j) { *x * scale } else { MASKED };
        m = m.max(*x);
    }
    let inv = 1.0 / exp_shifted(row, m);
    row.iter_mut().for_each(|x| *x *= inv);
}

/// The backward of [`masked_softmax_row`] given its output `p`: `g` (the
/// gradient of the probabilities) becomes the gradient of the raw scores,
/// `scale · p · (g − Σ g·p)`.
pub(crate) fn softmax_backward_row(g: &mut [f32], p: &[f32], scale: f32) {
    let dot: f32 = g.iter().zip(p).map(|(g, p)| g * p).sum();
    for (g, &p) in g.iter_mut().zip(p) {
        *g = p * (*g - dot) * scale;
    }
}

// ------------------------------------------------------------- cross-entropy

/// `logsumexp(row) − row[target]`: the cross-entropy of one row of logits.
pub(crate) fn cross_entropy_loss(row: &[f32], target: usize) -> f64 {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let z = sum_exp_shifted(row, m);
    (m + z.ln() - row[target]) as f64
}

/// [`cross_entropy_loss`] of `row`, returned, with its gradient times
/// `scale`, `scale · (softmax(row) − onehot(target))`, written over `row`.
pub(crate) fn cross_entropy_backward(row: &mut [f32], target: usize, scale: f32) -> f64 {
    let picked = row[target];
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let z = exp_shifted(row, m);
    let inv = scale / z;
    row.iter_mut().for_each(|x| *x *= inv);
    row[target] -= scale;
    (m + z.ln() - picked) as f64
}

// ------------------------------------------------ dropout masks and residuals

/// `x += h · mask` (the residual connection after a dropped-out branch).
pub(crate) fn add_dropped(x: &mut [f32], h: &[f32], mask: Option<&[f32]>) {
    match mask {
        Some(m) => x
            .par_chunks_mut(4096)
            .zip(h.par_chunks(4096).zip(m.par_chunks(4096)))
            .for_each(|(x, (h, m))| {
                for i in 0..x.len() {
                    x[i] += h[i] * m[i];
                }
            }),
        None => x
            .par_chunks_mut(4096)
            .zip(h.par_chunks(4096))
            .for_each(|(x, h)| x.iter_mut().zip(h).for_each(|(x, h)| *x += h)),
    }
}

/// `out = g · mask` (or a copy of `g`).
pub(crate) fn mul_mask(out: &mut [f32], g: &[f32], mask: Option<&[f32]>) {
    match mask {
        Some(m) => out
            .par_chunks_mut(4096)
            .zip(g.par_chunks(4096).zip(m.par_chunks(4096)))
            .for_each(|(o, (g, m))| {
                for i in 0..o.len() {
                    o[i] = g[i] * m[i];
                }
            }),
        None => out.copy_from_slice(g),
    }
}

// ----------------------------------------------------------------------- MLP

/// The MLP after `ln_2`: `out = gelu(h·W_fc + b)·W_proj + b`, keeping the
/// activation's input and output (the backward pass needs both). `w` is
/// `(W_fc, b_fc, W_proj, b_proj)`.
pub(crate) fn mlp_forward(
    h: &[f32],
    fc: &mut [f32],
    fc_act: &mut [f32],
    out: &mut [f32],
    (w_fc, b_fc, w_proj, b_proj): (&[f32], &[f32], &[f32], &[f32]),
    (rows, c, f): (usize, usize, usize),
) {
    linear(fc, h, w_fc, b_fc, rows, c, f);
    gelu(fc, fc_act);
    linear(out, fc_act, w_proj, b_proj, rows, f, c);
}
