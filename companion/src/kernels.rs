//! GPT-2's training step, and its inference with a KV cache, on the CPU,
//! written out by hand as llm.c does in C.
//!
//! candle's autograd spends most of a CPU training step outside the matrix
//! products: a fresh tensor per primitive, each gradient summed into a new
//! zero tensor, broadcast reductions. Here the forward pass keeps exactly
//! the activations the backward pass needs, in buffers reused from step to
//! step, and the backward pass adds each gradient straight into the ZeRO
//! engine's flat gradient buffer. Matrix products go to the `gemm` crate
//! (candle's own, with its AVX-512 kernels); everything between them (layer
//! norm, the masked attention softmax, GELU, dropout, residuals,
//! cross-entropy) is one fused loop each.
//!
//! The semantics are those of [`GPT2LMHeadModel::forward`] and
//! [`causal_lm_loss_sum`](crate::model::causal_lm_loss_sum): the same
//! masking (causal and padding), positions, dropout masks (same generator,
//! same order) and loss. fp32 on the CPU with a tanh-GELU activation (the
//! GPT-2 default) runs here; other devices, dtypes and activations, ZeRO-3
//! and gradient checkpointing keep the autograd path, and the tests check
//! that both give the same loss and gradients. [`forward_cached`] is the
//! inference counterpart that `generate` uses.

use std::ops::Range;

use candle_core::{CpuStorage, DType, Device, Storage};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::model::{
    check_label, check_length, check_mask, check_token_ids, positions, Activation, GPT2LMHeadModel,
    ModelError, Result, IGNORE_INDEX,
};

// Masked attention scores get what `ops::masked_softmax` gives them.
use crate::ops::{ln_row, ln_row_grad_wb, ln_row_grad_x, ln_row_stats, MASKED};
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// Row chunks for the reductions over rows (bias and layer-norm gradients):
/// a fixed number, so the sums are the same whatever the thread count.
const REDUCE_CHUNKS: usize = 16;

/// Whether `model` trains through these kernels: fp32 weights on the CPU
/// and a tanh-form GELU (`gelu_new`, GPT-2's default).
pub fn supported(model: &GPT2LMHeadModel) -> bool {
    matches!(model.device(), Device::Cpu)
        && model.dtype() == DType::F32
        && Activation::parse(&model.config.activation_function) == Some(Activation::GeluTanh)
}

/// One micro-batch: `ids` and `labels` `[B][T]`, `mask` (1 = token) or none.
pub struct Batch<'a> {
    pub ids: &'a [Vec<u32>],
    pub labels: &'a [Vec<i64>],
    pub mask: Option<&'a [Vec<u32>]>,
}

// ------------------------------------------------------------------ matmul

/// A strided operand: element (i, j) at `ptr[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

/// A pointer that rayon tasks share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every task writes a region no other task touches (one attention
// head of one sequence), and the buffer outlives the parallel loop.
unsafe impl Send for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the whole `SharedMut`).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}
unsafe impl Sync for SharedMut {}
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

/// Index one past the last element an `rows × cols` view with strides reads.
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `dst[m×n]` (row stride `dst_rs`) `= a·b`, or `+= a·b` with `accumulate`.
///
/// # Safety
/// `dst`, `a` and `b` must be valid for the extents their strides give, and
/// `dst` must not overlap `a` or `b` nor be written by another thread.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(0.0);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.ptr,
        a.cs as isize,
        a.rs as isize,
        b.ptr,
        b.cs as isize,
        b.rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        if parallel {
            Parallelism::Rayon(0)
        } else {
            Parallelism::None
        },
    )
}

/// Safe `dst (+)= a·b` on whole slices, all threads: `a` is `m×k` and `b`
/// is `k×n`, each given with its (row, column) strides; `dst` is row-major
/// `m×n`. The strides express transposes without copying.
#[allow(clippy::too_many_arguments)]
fn matmul(
    dst: &mut [f32],
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    assert!(extent(m, n, n, 1) <= dst.len(), "matmul: dst too small");
    assert!(extent(m, k, a.1, a.2) <= a.0.len(), "matmul: lhs too small");
    assert!(extent(k, n, b.1, b.2) <= b.0.len(), "matmul: rhs too small");
    // SAFETY: extents checked above; `dst` is borrowed mutably, so it
    // overlaps neither operand.
    unsafe {
        gemm_raw(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            n,
            Mat {
                ptr: a.0.as_ptr(),
                rs: a.1,
                cs: a.2,
            },
            Mat {
                ptr: b.0.as_ptr(),
                rs: b.1,
                cs: b.2,
            },
            accumulate,
            true,
        )
    }
}

// ------------------------------------------------------------ fast math

/// `e^x` within about 1 ulp, in plain arithmetic that the compiler turns
/// into vector code (libm's `expf` and `tanhf` are one call per element,
/// and were a sixth of a training step): Cody–Waite range reduction to
/// `2^n · e^f` with |f| ≤ ln 2 / 2, then a degree-7 Taylor polynomial.
#[inline(always)]
fn exp_fast(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let r = xc * LOG2_E + ROUND;
    let n = r - ROUND;
    let k = (r.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let f = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0
                    + f * (1.0 / 24.0
                        + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((k + 127) as u32) << 23);
    let y = p * scale;
    if x < -87.0 {
        0.0
    } else if x > 88.0 {
        f32::INFINITY
    } else {
        y
    }
}

/// `tanh(u) = 1 − 2 / (e^{2u} + 1)`, with [`exp_fast`].
#[inline(always)]
fn tanh_fast(u: f32) -> f32 {
    1.0 - 2.0 / (exp_fast(2.0 * u) + 1.0)
}

/// Define `$name` to run `$body` compiled for AVX-512 or AVX2+FMA when the
/// CPU has them (chosen at run time, so one binary runs everywhere), and
/// for the baseline otherwise. The bodies are plain loops; only the target
/// features differ.
macro_rules! vectorised {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $body:ident) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `v4` is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above, for `v3`.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

#[inline(always)]
fn exp_shifted_body(row: &mut [f32], m: f32) -> f32 {
    let mut z = 0f32;
    for x in row.iter_mut() {
        *x = exp_fast(*x - m);
    }
    for x in row.iter() {
        z += *x;
    }
    z
}

vectorised! {
    /// `row[j] ← e^(row[j] − m)`; returns their sum.
    fn exp_shifted(row: &mut [f32], m: f32) -> f32 = exp_shifted_body
}

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

// ------------------------------------------------------ pointwise kernels

/// Layer norm of each `c`-row of `x` into `out`, keeping each row's mean
/// and reciprocal standard deviation for the backward pass.
#[allow(clippy::too_many_arguments)]
fn layer_norm(
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

/// Sum over row chunks: `f` folds chunk `rows` into a zeroed `width`-vector,
/// the partial vectors are added in chunk order (deterministic), then added
/// into each target.
fn reduce_rows(rows: usize, width: usize, f: impl Fn(Range<usize>, &mut [f32]) + Sync) -> Vec<f32> {
    let per = rows.div_ceil(REDUCE_CHUNKS).max(1);
    let parts: Vec<Vec<f32>> = (0..rows.div_ceil(per))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0f32; width];
            f(c * per..((c + 1) * per).min(rows), &mut acc);
            acc
        })
        .collect();
    let mut total = vec![0f32; width];
    for p in parts {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    total
}

/// `db += Σ_rows dy` for `dy` `[rows, n]`.
fn bias_grad(db: &mut [f32], dy: &[f32]) {
    let n = db.len();
    let sums = reduce_rows(dy.len() / n, n, |r, acc| {
        for row in dy[r.start * n..r.end * n].chunks(n) {
            acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
        }
    });
    db.iter_mut().zip(sums).for_each(|(d, s)| *d += s);
}

/// Layer-norm backward: `dx += rstd·(g·w − mean(g·w) − x̂·mean(g·w·x̂))`,
/// `dw += Σ g·x̂`, `db += Σ g`.
#[allow(clippy::too_many_arguments)]
fn layer_norm_backward(
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
    let sums = reduce_rows(x.len() / c, 2 * c, |r, acc| {
        for row in r {
            let (g, x) = (&g[row * c..(row + 1) * c], &x[row * c..(row + 1) * c]);
            ln_row_grad_wb(acc, g, x, (mean[row], rstd[row]));
        }
    });
    dw.iter_mut().zip(&sums[..c]).for_each(|(d, s)| *d += s);
    db.iter_mut().zip(&sums[c..]).for_each(|(d, s)| *d += s);
}

/// Fill each `n`-row of `out` with the bias `b` (the matmul then adds to it).
fn fill_bias(out: &mut [f32], b: &[f32]) {
    out.par_chunks_mut(b.len())
        .for_each(|r| r.copy_from_slice(b));
}

/// HF's `gelu_new`: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
fn gelu(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(y, x)| gelu_chunk(x, y));
}

/// `g ← g · gelu'(x)`, in place.
fn gelu_backward(g: &mut [f32], x: &[f32]) {
    g.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(g, x)| gelu_backward_chunk(g, x));
}

/// `x += h · mask` (the residual connection after a dropped-out branch).
fn add_dropped(x: &mut [f32], h: &[f32], mask: Option<&[f32]>) {
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
fn mul_mask(out: &mut [f32], g: &[f32], mask: Option<&[f32]>) {
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

// ------------------------------------------------------------- workspace

/// One block's saved activations.
#[derive(Default)]
struct LayerActs {
    ln1: Vec<f32>,
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    /// `[B·T, 3C]`: queries, keys, values.
    qkv: Vec<f32>,
    /// `[B, H, T, T]` attention probabilities, and after dropout (empty
    /// without attention dropout).
    att: Vec<f32>,
    att_d: Vec<f32>,
    /// `[B·T, C]` heads' outputs before `c_proj`.
    atty: Vec<f32>,
    attn_mask: Vec<f32>,
    /// The residual stream after attention: input of `ln_2`.
    x2: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    /// `[B·T, inner]` before and after the activation.
    fc: Vec<f32>,
    fc_act: Vec<f32>,
    mlp_mask: Vec<f32>,
}

/// Activation and gradient buffers for one batch shape, reused from step to
/// step (a fresh allocation per step costs page faults on every touch).
#[derive(Default)]
pub struct Workspace {
    shape: (usize, usize),
    /// The residual stream entering each block, and leaving the last.
    res: Vec<Vec<f32>>,
    layers: Vec<LayerActs>,
    emb_mask: Vec<f32>,
    lnf: Vec<f32>,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    /// `[B·T, V]` logits, overwritten by their gradient.
    logits: Vec<f32>,
    tmp: Vec<f32>,
    dres: Vec<f32>,
    dtmp: Vec<f32>,
    dln: Vec<f32>,
    dqkv: Vec<f32>,
    dfc: Vec<f32>,
    datt: Vec<f32>,
}

/// Resize `v` to `n` zeros, reusing its allocation.
fn zeroed(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

/// The parameters of one block, as indices into `named_parameters`.
struct BlockIdx {
    ln1: (usize, usize),
    attn: (usize, usize),
    attn_proj: (usize, usize),
    ln2: (usize, usize),
    fc: (usize, usize),
    mlp_proj: (usize, usize),
}

/// Parameter indices by role.
struct Index {
    wte: usize,
    wpe: usize,
    blocks: Vec<BlockIdx>,
    lnf: (usize, usize),
}

impl Index {
    fn new(names: &[String], n_layer: usize) -> Result<Self> {
        let find = |n: &str| {
            names
                .iter()
                .position(|m| m == n)
                .ok_or_else(|| ModelError::Input(format!("the model has no parameter `{n}`")))
        };
        let wb = |p: &str| -> Result<(usize, usize)> {
            Ok((find(&format!("{p}.weight"))?, find(&format!("{p}.bias"))?))
        };
        let blocks = (0..n_layer)
            .map(|l| {
                let p = format!("transformer.h.{l}");
                Ok(BlockIdx {
                    ln1: wb(&format!("{p}.ln_1"))?,
                    attn: wb(&format!("{p}.attn.c_attn"))?,
                    attn_proj: wb(&format!("{p}.attn.c_proj"))?,
                    ln2: wb(&format!("{p}.ln_2"))?,
                    fc: wb(&format!("{p}.mlp.c_fc"))?,
                    mlp_proj: wb(&format!("{p}.mlp.c_proj"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Index {
            wte: find("transformer.wte.weight")?,
            wpe: find("transformer.wpe.weight")?,
            blocks,
            lnf: wb("transformer.ln_f")?,
        })
    }
}

/// Check the batch the way the model and the loss do, with their messages.
fn validate(model: &GPT2LMHeadModel, batch: &Batch) -> Result<(usize, usize)> {
    let cfg = &model.config;
    let b = batch.ids.len();
    let t = batch.ids.first().map_or(0, |r| r.len());
    if b == 0 || t == 0 || batch.ids.iter().any(|r| r.len() != t) {
        return Err(ModelError::Input(format!(
            "input_ids must be a non-empty [B, T] batch of equal rows, got {b} rows"
        )));
    }
    check_length(t, cfg.n_positions)?;
    check_token_ids(batch.ids.iter().flatten().copied().max(), cfg.vocab_size)?;
    if batch.labels.len() != b || batch.labels.iter().any(|r| r.len() != t) {
        return Err(ModelError::Input(format!(
            "labels must have shape [{b}, {t}] like input_ids"
        )));
    }
    for &l in batch.labels.iter().flat_map(|r| &r[1..]) {
        check_label(l, cfg.vocab_size)?;
    }
    check_mask(batch.mask, b, t)?;
    Ok((b, t))
}

/// Borrow each parameter's fp32 storage as a slice.
fn with_params<R>(model: &GPT2LMHeadModel, f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let params = model.named_parameters();
    let guards: Vec<_> = params
        .iter()
        .map(|(_, v)| v.as_tensor().storage_and_layout())
        .collect();
    let mut slices = Vec::with_capacity(params.len());
    for ((name, _), (storage, layout)) in params.iter().zip(&guards) {
        let Storage::Cpu(CpuStorage::F32(v)) = &**storage else {
            return Err(ModelError::Input(format!(
                "{name}: expected fp32 on the CPU"
            )));
        };
        let Some((a, z)) = layout.contiguous_offsets() else {
            return Err(ModelError::Input(format!(
                "{name}: expected a contiguous tensor"
            )));
        };
        slices.push(&v[a..z]);
    }
    f(&slices)
}

impl Workspace {
    pub fn new() -> Self {
        Self::default()
    }

    fn allocate(&mut self, model: &GPT2LMHeadModel, b: usize, t: usize, drop: [bool; 3]) {
        let cfg = &model.config;
        let (c, h, l) = (cfg.n_embd, cfg.n_head, cfg.n_layer);
        let f = cfg.n_inner.unwrap_or(4 * c);
        let bt = b * t;
        let [emb, att, resid] = drop;
        let sized = |on: bool, n: usize| if on { n } else { 0 };
        if self.shape != (b, t) || self.layers.len() != l {
            *self = Workspace::default();
            self.shape = (b, t);
        }
        self.res.resize_with(l + 1, Vec::new);
        for r in &mut self.res {
            zeroed(r, bt * c);
        }
        self.layers.resize_with(l, LayerActs::default);
        for a in &mut self.layers {
            zeroed(&mut a.ln1, bt * c);
            zeroed(&mut a.ln1_mean, bt);
            zeroed(&mut a.ln1_rstd, bt);
            zeroed(&mut a.qkv, bt * 3 * c);
            zeroed(&mut a.att, b * h * t * t);
            zeroed(&mut a.att_d, sized(att, b * h * t * t));
            zeroed(&mut a.atty, bt * c);
            zeroed(&mut a.attn_mask, sized(resid, bt * c));
            zeroed(&mut a.x2, bt * c);
            zeroed(&mut a.ln2, bt * c);
            zeroed(&mut a.ln2_mean, bt);
            zeroed(&mut a.ln2_rstd, bt);
            zeroed(&mut a.fc, bt * f);
            zeroed(&mut a.fc_act, bt * f);
            zeroed(&mut a.mlp_mask, sized(resid, bt * c));
        }
        zeroed(&mut self.emb_mask, sized(emb, bt * c));
        zeroed(&mut self.lnf, bt * c);
        zeroed(&mut self.lnf_mean, bt);
        zeroed(&mut self.lnf_rstd, bt);
        zeroed(&mut self.logits, bt * cfg.vocab_size);
        zeroed(&mut self.tmp, bt * c);
        zeroed(&mut self.dres, bt * c);
        zeroed(&mut self.dtmp, bt * c);
        zeroed(&mut self.dln, bt * c);
        zeroed(&mut self.dqkv, bt * 3 * c);
        zeroed(&mut self.dfc, bt * f);
        zeroed(&mut self.datt, b * h * t * t);
    }

    /// Forward and backward of one micro-batch. Returns the summed
    /// cross-entropy over the label tokens (as `causal_lm_loss_sum`); when
    /// it is finite, adds `grad_scale ×` its gradient into `grads`, where
    /// parameter `i` of `named_parameters()` owns `grads[ranges[i]]`.
    /// Dropout follows `model`'s training flag and draws from its generator.
    pub fn forward_backward(
        &mut self,
        model: &GPT2LMHeadModel,
        batch: &Batch,
        grads: &mut [f32],
        ranges: &[Range<usize>],
        grad_scale: f32,
    ) -> Result<f64> {
        if !supported(model) {
            return Err(ModelError::Input(
                "the fused CPU kernels need fp32 weights on the CPU and gelu_new".into(),
            ));
        }
        let (b, t) = validate(model, batch)?;
        let names: Vec<String> = model.named_parameters().into_iter().map(|p| p.0).collect();
        if ranges.len() != names.len() || ranges.iter().any(|r| r.end > grads.len()) {
            return Err(ModelError::Input(
                "gradient ranges do not match the model's parameters".into(),
            ));
        }
        let idx = Index::new(&names, model.config.n_layer)?;
        with_params(model, |w| {
            self.run(model, &idx, w, batch, b, t, grads, ranges, grad_scale)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        model: &GPT2LMHeadModel,
        idx: &Index,
        w: &[&[f32]],
        batch: &Batch,
        b: usize,
        t: usize,
        grads: &mut [f32],
        ranges: &[Range<usize>],
        grad_scale: f32,
    ) -> Result<f64> {
        let cfg = &model.config;
        let (c, h, v) = (cfg.n_embd, cfg.n_head, cfg.vocab_size);
        let f = cfg.n_inner.unwrap_or(4 * c);
        let bt = b * t;
        let eps = cfg.layer_norm_epsilon as f32;
        let training = model.is_training();
        let p_emb = if training { cfg.embd_pdrop } else { 0.0 };
        let p_att = if training { cfg.attn_pdrop } else { 0.0 };
        let p_res = if training { cfg.resid_pdrop } else { 0.0 };
        self.allocate(model, b, t, [p_emb > 0.0, p_att > 0.0, p_res > 0.0]);
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
                model.dropout_fill(&mut self.emb_mask, p_emb);
                let m = &self.emb_mask;
                x.par_chunks_mut(4096)
                    .zip(m.par_chunks(4096))
                    .for_each(|(x, m)| x.iter_mut().zip(m).for_each(|(x, m)| *x *= m));
            }
        }
        for l in 0..cfg.n_layer {
            let bi = &idx.blocks[l];
            let (head, rest) = self.res.split_at_mut(l + 1);
            let (x_in, x_out) = (&head[l], &mut rest[0]);
            let a = &mut self.layers[l];
            layer_norm(
                x_in,
                w[bi.ln1.0],
                w[bi.ln1.1],
                eps,
                &mut a.ln1,
                &mut a.ln1_mean,
                &mut a.ln1_rstd,
            );
            linear(&mut a.qkv, &a.ln1, w[bi.attn.0], w[bi.attn.1], bt, c, 3 * c);
            let scale = attn_scale(cfg, l);
            if p_att > 0.0 {
                model.dropout_fill(&mut a.att_d, p_att);
            }
            attention_forward(a, mask, t, c, h, scale);
            linear(
                &mut self.tmp,
                &a.atty,
                w[bi.attn_proj.0],
                w[bi.attn_proj.1],
                bt,
                c,
                c,
            );
            if p_res > 0.0 {
                model.dropout_fill(&mut a.attn_mask, p_res);
            }
            a.x2.copy_from_slice(x_in);
            add_dropped(
                &mut a.x2,
                &self.tmp,
                (p_res > 0.0).then_some(&a.attn_mask[..]),
            );
            layer_norm(
                &a.x2,
                w[bi.ln2.0],
                w[bi.ln2.1],
                eps,
                &mut a.ln2,
                &mut a.ln2_mean,
                &mut a.ln2_rstd,
            );
            mlp_forward(
                &a.ln2,
                &mut a.fc,
                &mut a.fc_act,
                &mut self.tmp,
                w,
                bi,
                (bt, c, f),
            );
            if p_res > 0.0 {
                model.dropout_fill(&mut a.mlp_mask, p_res);
            }
            x_out.copy_from_slice(&a.x2);
            add_dropped(x_out, &self.tmp, (p_res > 0.0).then_some(&a.mlp_mask[..]));
        }
        let x_last = &self.res[cfg.n_layer];
        layer_norm(
            x_last,
            w[idx.lnf.0],
            w[idx.lnf.1],
            eps,
            &mut self.lnf,
            &mut self.lnf_mean,
            &mut self.lnf_rstd,
        );
        let wte = w[idx.wte];
        matmul(
            &mut self.logits,
            (&self.lnf, c, 1),
            (wte, 1, c),
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
        let loss: f64 = self
            .logits
            .par_chunks_mut(v)
            .zip(targets.par_iter())
            .map(|(row, &tg)| {
                if tg < 0 {
                    row.fill(0.0);
                    return 0.0;
                }
                let tg = tg as usize;
                let picked = row[tg];
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let z = exp_shifted(row, m);
                let inv = grad_scale / z;
                row.iter_mut().for_each(|x| *x *= inv);
                row[tg] -= grad_scale;
                (m + z.ln() - picked) as f64
            })
            .sum();
        if !loss.is_finite() {
            return Ok(loss);
        }

        // ---- backward
        let g = |i: usize| ranges[i].clone();
        // Head: logits = ln_f(x) · wteᵀ.
        matmul(
            &mut self.dln,
            (&self.logits, v, 1),
            (wte, c, 1),
            bt,
            c,
            v,
            false,
        );
        matmul(
            &mut grads[g(idx.wte)],
            (&self.logits, 1, v),
            (&self.lnf, c, 1),
            v,
            c,
            bt,
            true,
        );
        self.dres.fill(0.0);
        let (gw, gb) = two_mut(grads, g(idx.lnf.0), g(idx.lnf.1));
        layer_norm_backward(
            &mut self.dres,
            gw,
            gb,
            &self.dln,
            x_last,
            w[idx.lnf.0],
            &self.lnf_mean,
            &self.lnf_rstd,
        );
        for l in (0..cfg.n_layer).rev() {
            let bi = &idx.blocks[l];
            let a = &self.layers[l];
            let x_in = &self.res[l];
            // MLP branch: x_out = x2 + dropout(gelu(ln_2(x2)·W_fc + b)·W_proj + b).
            mul_mask(
                &mut self.dtmp,
                &self.dres,
                (p_res > 0.0).then_some(&a.mlp_mask[..]),
            );
            linear_backward(
                &mut self.dfc,
                grads,
                (g(bi.mlp_proj.0), g(bi.mlp_proj.1)),
                (&a.fc_act, w[bi.mlp_proj.0], &self.dtmp),
                (bt, f, c),
            );
            gelu_backward(&mut self.dfc, &a.fc);
            linear_backward(
                &mut self.dln,
                grads,
                (g(bi.fc.0), g(bi.fc.1)),
                (&a.ln2, w[bi.fc.0], &self.dfc),
                (bt, c, f),
            );
            let (gw, gb) = two_mut(grads, g(bi.ln2.0), g(bi.ln2.1));
            layer_norm_backward(
                &mut self.dres,
                gw,
                gb,
                &self.dln,
                &a.x2,
                w[bi.ln2.0],
                &a.ln2_mean,
                &a.ln2_rstd,
            );
            // Attention branch: x2 = x + dropout(attn(ln_1(x))·W_proj + b).
            mul_mask(
                &mut self.dtmp,
                &self.dres,
                (p_res > 0.0).then_some(&a.attn_mask[..]),
            );
            linear_backward(
                &mut self.dln,
                grads,
                (g(bi.attn_proj.0), g(bi.attn_proj.1)),
                (&a.atty, w[bi.attn_proj.0], &self.dtmp),
                (bt, c, c),
            );
            let scale = attn_scale(cfg, l);
            attention_backward(
                a,
                &self.dln,
                &mut self.dqkv,
                &mut self.datt,
                (b, t, c, h),
                scale,
                (p_att > 0.0).then(|| (1.0 / (1.0 - p_att)) as f32),
            );
            linear_backward(
                &mut self.dln,
                grads,
                (g(bi.attn.0), g(bi.attn.1)),
                (&a.ln1, w[bi.attn.0], &self.dqkv),
                (bt, c, 3 * c),
            );
            let (gw, gb) = two_mut(grads, g(bi.ln1.0), g(bi.ln1.1));
            layer_norm_backward(
                &mut self.dres,
                gw,
                gb,
                &self.dln,
                x_in,
                w[bi.ln1.0],
                &a.ln1_mean,
                &a.ln1_rstd,
            );
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

// ------------------------------------------------------------- inference

/// Keys and values of earlier positions for [`forward_cached`]: per layer
/// `[B, H, capacity, head_dim]`, so each head's keys are contiguous; the
/// capacity doubles when full, so a token costs the same at any position.
#[derive(Clone, Default)]
pub struct KvBuffers {
    rows: usize,
    len: usize,
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

/// Run `f` on blocks `0..n`: on all threads when the work (multiply-adds)
/// is large, on this thread when waking the others would cost more than
/// it saves (one token through a small model).
fn for_blocks(n: usize, work: usize, f: impl Fn(usize) + Sync + Send) {
    if work >= 1 << 12 {
        (0..n).into_par_iter().for_each(f);
    } else {
        (0..n).for_each(f);
    }
}

/// `y[m×n] = x[m×k] · w[k×n] + bias`: the matrix multiply for large `m`
/// (a prompt), and for a few rows (one new token each) a loop that streams
/// `w` once, split over column blocks, since then reading the weights is
/// all the work.
fn linear(y: &mut [f32], x: &[f32], w: &[f32], bias: &[f32], m: usize, k: usize, n: usize) {
    if m > 4 {
        fill_bias(y, bias);
        matmul(y, (x, k, 1), (w, n, 1), m, n, k, true);
        return;
    }
    const NB: usize = 128;
    let out = SharedMut(y.as_mut_ptr());
    assert!(y.len() >= m * n && x.len() >= m * k && w.len() >= k * n);
    for_blocks(n.div_ceil(NB), m * k * n, |blk| {
        let (c0, c1) = (blk * NB, ((blk + 1) * NB).min(n));
        let mut acc = [0f32; 4 * NB];
        for r in 0..m {
            acc[r * NB..r * NB + c1 - c0].copy_from_slice(&bias[c0..c1]);
        }
        rows_times_block(&mut acc, x, w, m, k, n, c0, c1);
        for r in 0..m {
            // SAFETY: columns c0..c1 of each row belong to this task alone.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.ptr().add(r * n + c0), c1 - c0) };
            dst.copy_from_slice(&acc[r * NB..r * NB + c1 - c0]);
        }
    });
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rows_times_block_body(
    acc: &mut [f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    c0: usize,
    c1: usize,
) {
    const NB: usize = 128;
    let width = c1 - c0;
    // Four rows of `w` per pass: four multiply-adds per load and store of
    // the accumulators.
    let k4 = k - k % 4;
    for kk in (0..k4).step_by(4) {
        let row = |i: usize| &w[(kk + i) * n + c0..(kk + i) * n + c1];
        let (w0, w1, w2, w3) = (row(0), row(1), row(2), row(3));
        for r in 0..m {
            let xa = &x[r * k + kk..r * k + kk + 4];
            let dst = &mut acc[r * NB..r * NB + width];
            for j in 0..width {
                dst[j] += xa[0] * w0[j] + xa[1] * w1[j] + xa[2] * w2[j] + xa[3] * w3[j];
            }
        }
    }
    for kk in k4..k {
        let wr = &w[kk * n + c0..kk * n + c1];
        for r in 0..m {
            let a = x[r * k + kk];
            let dst = &mut acc[r * NB..r * NB + width];
            for (d, &wv) in dst.iter_mut().zip(wr) {
                *d += a * wv;
            }
        }
    }
}

vectorised! {
    /// `acc[r][..] += Σ_k x[r][k] · w[k][c0..c1]` for the `m` rows.
    #[allow(clippy::too_many_arguments)]
    fn rows_times_block(acc: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize, c0: usize, c1: usize) = rows_times_block_body
}

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    // Sixteen running sums, so the loop vectorises (a single float sum
    // must keep its order and cannot).
    let mut s = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            s[i] += x[i] * y[i];
        }
    }
    let mut t: f32 = s.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        t += x * y;
    }
    t
}

vectorised! {
    /// `Σ a·b`.
    fn dot(a: &[f32], b: &[f32]) -> f32 = dot_body
}

#[inline(always)]
fn axpy_body(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

vectorised! {
    /// `y += a·x`.
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) = axpy_body
}

/// The logits `[m, V]` of `x` `[m, C]` through the tied head `wte` `[V, C]`:
/// a matrix multiply for many rows, dot products over vocabulary blocks
/// for a few.
fn lm_head(logits: &mut [f32], x: &[f32], wte: &[f32], m: usize, c: usize, v: usize) {
    if m > 4 {
        matmul(logits, (x, c, 1), (wte, 1, c), m, v, c, false);
        return;
    }
    const VB: usize = 512;
    let out = SharedMut(logits.as_mut_ptr());
    assert!(logits.len() >= m * v && wte.len() >= v * c);
    for_blocks(v.div_ceil(VB), m * v * c, |blk| {
        for tok in blk * VB..((blk + 1) * VB).min(v) {
            let row = &wte[tok * c..(tok + 1) * c];
            for r in 0..m {
                let d = dot(&x[r * c..(r + 1) * c], row);
                // SAFETY: logit (r, tok) is written by this task only.
                unsafe { *out.ptr().add(r * v + tok) = d };
            }
        }
    });
}

/// Inference with a cache, as [`GPT2LMHeadModel::forward`] with a
/// `KvCache` computes it (the same masking and positions): `ids` are the new
/// tokens `[B][t]`, `mask` covers past and new positions. Returns the
/// logits `[B·t, V]`. fp32 on the CPU (see [`supported`]), eval mode.
pub fn forward_cached(
    model: &GPT2LMHeadModel,
    ids: &[Vec<u32>],
    mask: Option<&[Vec<u32>]>,
    cache: &mut KvBuffers,
) -> Result<Vec<f32>> {
    let cfg = &model.config;
    let (c, h, v, nl) = (cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.n_layer);
    let f = cfg.n_inner.unwrap_or(4 * c);
    let hd = c / h;
    let b = ids.len();
    let t = ids.first().map_or(0, |r| r.len());
    if b == 0 || t == 0 || ids.iter().any(|r| r.len() != t) {
        return Err(ModelError::Input(
            "input_ids must be a non-empty [B, T] batch".into(),
        ));
    }
    if !cache.is_empty() && cache.rows != b {
        return Err(ModelError::Input(format!(
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
    let idx = Index::new(
        &model
            .named_parameters()
            .into_iter()
            .map(|p| p.0)
            .collect::<Vec<_>>(),
        nl,
    )?;
    with_params(model, |w| {
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
                w[bi.ln1.0],
                w[bi.ln1.1],
                eps,
                &mut hbuf,
                &mut mean,
                &mut rstd,
            );
            linear(&mut qkv, &hbuf, w[bi.attn.0], w[bi.attn.1], bt, c, 3 * c);
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
            let scale = attn_scale(cfg, l);
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
                    let mut m = f32::NEG_INFINITY;
                    for (j, pj) in p.iter_mut().enumerate() {
                        let allowed = j <= past + i && mask.is_none_or(|mk| mk[bb][j] == 1);
                        *pj = if allowed {
                            dot(q, &keys[j * hd..(j + 1) * hd]) * scale
                        } else {
                            MASKED
                        };
                        m = m.max(*pj);
                    }
                    let inv = 1.0 / exp_shifted(&mut p, m);
                    y.fill(0.0);
                    for (j, &pj) in p.iter().enumerate() {
                        if pj != 0.0 {
                            axpy(&mut y, pj * inv, &vals[j * hd..(j + 1) * hd]);
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
                w[bi.attn_proj.0],
                w[bi.attn_proj.1],
                bt,
                c,
                c,
            );
            add_dropped(&mut x, &o, None);
            layer_norm(
                &x,
                w[bi.ln2.0],
                w[bi.ln2.1],
                eps,
                &mut hbuf,
                &mut mean,
                &mut rstd,
            );
            mlp_forward(&hbuf, &mut fc, &mut fc_act, &mut o, w, bi, (bt, c, f));
            add_dropped(&mut x, &o, None);
        }
        layer_norm(
            &x,
            w[idx.lnf.0],
            w[idx.lnf.1],
            eps,
            &mut hbuf,
            &mut mean,
            &mut rstd,
        );
        let mut logits = vec![0f32; bt * v];
        lm_head(&mut logits, &hbuf, w[idx.wte], bt, c, v);
        cache.len = total;
        Ok(logits)
    })
}

/// The MLP after `ln_2`: `out = gelu(h·W_fc + b)·W_proj + b`, keeping the
/// activation's input and output (the backward pass needs both).
fn mlp_forward(
    h: &[f32],
    fc: &mut [f32],
    fc_act: &mut [f32],
    out: &mut [f32],
    w: &[&[f32]],
    bi: &BlockIdx,
    (rows, c, f): (usize, usize, usize),
) {
    linear(fc, h, w[bi.fc.0], w[bi.fc.1], rows, c, f);
    gelu(fc, fc_act);
    linear(out, fc_act, w[bi.mlp_proj.0], w[bi.mlp_proj.1], rows, f, c);
}

/// GPT-2's attention score scale for layer `l`.
fn attn_scale(cfg: &crate::config::GPT2Config, l: usize) -> f32 {
    let mut scale = 1.0f64;
    if cfg.scale_attn_weights {
        scale /= ((cfg.n_embd / cfg.n_head) as f64).sqrt();
    }
    if cfg.scale_attn_by_inverse_layer_idx {
        scale /= (l + 1) as f64;
    }
    scale as f32
}

/// Backward of `y = x·w + b` (`x` `[rows, k]`, `w` `[k, n]`), given `dy`:
/// `dw += xᵀ·dy` and `db += Σ dy` into `grads` at `(gw, gb)`, and
/// `dx = dy·wᵀ` (overwritten).
fn linear_backward(
    dx: &mut [f32],
    grads: &mut [f32],
    (gw, gb): (Range<usize>, Range<usize>),
    (x, w, dy): (&[f32], &[f32], &[f32]),
    (rows, k, n): (usize, usize, usize),
) {
    let (dw, db) = two_mut(grads, gw, gb);
    matmul(dw, (x, 1, k), (dy, n, 1), k, n, rows, true);
    bias_grad(db, dy);
    matmul(dx, (dy, n, 1), (w, 1, n), rows, k, n, false);
}

/// Two disjoint mutable ranges of one buffer.
fn two_mut(buf: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&mut [f32], &mut [f32]) {
    assert!(
        a.end <= b.start || b.end <= a.start,
        "overlapping gradient ranges"
    );
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        let (bb, aa) = (&mut lo[b], &mut hi[..a.end - a.start]);
        (aa, bb)
    }
}

/// Causal self-attention of every (sequence, head) pair, in parallel:
/// `att = softmax(scale·q·kᵀ + mask)`, dropout (when `a.att_d` holds a mask,
/// it becomes the dropped probabilities), `atty = att·v`.
fn attention_forward(
    a: &mut LayerActs,
    key_mask: Option<&[Vec<u32>]>,
    t: usize,
    c: usize,
    h: usize,
    scale: f32,
) {
    let hd = c / h;
    let qkv = Mat {
        ptr: a.qkv.as_ptr(),
        rs: 3 * c,
        cs: 1,
    };
    let out = SharedMut(a.atty.as_mut_ptr());
    let dropped = !a.att_d.is_empty();
    let att_d_ptr = SharedMut(a.att_d.as_mut_ptr());
    a.att
        .par_chunks_mut(t * t)
        .enumerate()
        .for_each(|(bh, att)| {
            // Whole values, not their raw-pointer fields (closures capture fields).
            let (qkv, out, att_d_ptr) = (qkv, out, att_d_ptr);
            let (bb, hh) = (bh / h, bh % h);
            let base = (bb * t * 3 * c + hh * hd) as isize;
            // SAFETY: q, k, v of this head lie inside `qkv` (T rows of stride
            // 3C from `base`); `att` is this task's own chunk.
            unsafe {
                let q = Mat {
                    ptr: qkv.ptr.offset(base),
                    ..qkv
                };
                let kt = Mat {
                    ptr: qkv.ptr.offset(base + c as isize),
                    rs: 1,
                    cs: 3 * c,
                };
                gemm_raw(t, t, hd, att.as_mut_ptr(), t, q, kt, false, false);
            }
            for (i, row) in att.chunks_mut(t).enumerate() {
                let allowed = |j: usize| j <= i && key_mask.is_none_or(|m| m[bb][j] == 1);
                let mut m = f32::NEG_INFINITY;
                for (j, x) in row.iter_mut().enumerate() {
                    *x = if allowed(j) { *x * scale } else { MASKED };
                    m = m.max(*x);
                }
                let inv = 1.0 / exp_shifted(row, m);
                row.iter_mut().for_each(|x| *x *= inv);
            }
            let probs: *const f32 = if dropped {
                // SAFETY: chunk `bh` of `att_d` belongs to this task alone.
                let d =
                    unsafe { std::slice::from_raw_parts_mut(att_d_ptr.0.add(bh * t * t), t * t) };
                d.iter_mut().zip(att.iter()).for_each(|(d, p)| *d *= p);
                d.as_ptr()
            } else {
                att.as_ptr()
            };
            // SAFETY: this head's output columns of `atty` are written by this
            // task only; v lies inside `qkv`.
            unsafe {
                let vm = Mat {
                    ptr: qkv.ptr.offset(base + 2 * c as isize),
                    ..qkv
                };
                let p = Mat {
                    ptr: probs,
                    rs: t,
                    cs: 1,
                };
                gemm_raw(
                    t,
                    hd,
                    t,
                    out.0.add(bb * t * c + hh * hd),
                    c,
                    p,
                    vm,
                    false,
                    false,
                );
            }
        });
}

/// The backward of [`attention_forward`]: from `datty` `[B·T, C]`, the
/// gradients of q, k and v into `dqkv` `[B·T, 3C]` (overwritten); `datt` is
/// scratch of the size of `a.att`.
fn attention_backward(
    a: &LayerActs,
    datty: &[f32],
    dqkv: &mut [f32],
    datt: &mut [f32],
    (b, t, c, h): (usize, usize, usize, usize),
    scale: f32,
    drop_scale: Option<f32>,
) {
    let hd = c / h;
    let dropped = drop_scale.is_some();
    assert!(datty.len() >= b * t * c && dqkv.len() >= b * t * 3 * c);
    let qkv = a.qkv.as_ptr();
    let dy = datty.as_ptr();
    let dq = SharedMut(dqkv.as_mut_ptr());
    let qkv = Mat {
        ptr: qkv,
        rs: 3 * c,
        cs: 1,
    };
    let dy = Mat {
        ptr: dy,
        rs: c,
        cs: 1,
    };
    datt.par_chunks_mut(t * t).enumerate().for_each(|(bh, d)| {
        let (qkv, dy, dq) = (qkv, dy, dq);
        let (bb, hh) = (bh / h, bh % h);
        let base = bb * t * 3 * c + hh * hd;
        let att = &a.att[bh * t * t..(bh + 1) * t * t];
        let probs = if dropped {
            &a.att_d[bh * t * t..(bh + 1) * t * t]
        } else {
            att
        };
        // SAFETY: every pointer below stays inside this head's rows of
        // `qkv`, `datty` and `dqkv`; only this task writes those of
        // `dqkv`, and `d` is its own chunk.
        unsafe {
            let dyh = Mat {
                ptr: dy.ptr.add(bb * t * c + hh * hd),
                ..dy
            };
            // d(att_d) = dy · vᵀ
            let vt = Mat {
                ptr: qkv.ptr.add(base + 2 * c),
                rs: 1,
                cs: 3 * c,
            };
            gemm_raw(t, t, hd, d.as_mut_ptr(), t, dyh, vt, false, false);
            // dv = att_dᵀ · dy
            let pt = Mat {
                ptr: probs.as_ptr(),
                rs: 1,
                cs: t,
            };
            gemm_raw(
                t,
                hd,
                t,
                dq.0.add(base + 2 * c),
                3 * c,
                pt,
                dyh,
                false,
                false,
            );
        }
        // Through dropout, then the softmax (times the score scale).
        for (i, row) in d.chunks_mut(t).enumerate() {
            let p = &att[i * t..(i + 1) * t];
            if let Some(s) = drop_scale {
                // Dropped elements have no gradient; kept ones were
                // scaled by 1/(1 − p).
                let pd = &probs[i * t..(i + 1) * t];
                for j in 0..t {
                    row[j] = if pd[j] != 0.0 { row[j] * s } else { 0.0 };
                }
            }
            let dot: f32 = row.iter().zip(p).map(|(g, p)| g * p).sum();
            for j in 0..t {
                row[j] = p[j] * (row[j] - dot) * scale;
            }
        }
        // SAFETY: as above.
        unsafe {
            let ds = Mat {
                ptr: d.as_ptr(),
                rs: t,
                cs: 1,
            };
            let k = Mat {
                ptr: qkv.ptr.add(base + c),
                ..qkv
            };
            // dq = dS · k
            gemm_raw(t, hd, t, dq.0.add(base), 3 * c, ds, k, false, false);
            // dk = dSᵀ · q
            let dst = Mat {
                ptr: d.as_ptr(),
                rs: 1,
                cs: t,
            };
            let q = Mat {
                ptr: qkv.ptr.add(base),
                ..qkv
            };
            gemm_raw(t, hd, t, dq.0.add(base + c), 3 * c, dst, q, false, false);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GPT2Config;
    use crate::model::causal_lm_loss_sum;
    use candle_core::Tensor;

    fn config(inverse_layer: bool) -> GPT2Config {
        let mut c = GPT2Config::preset("gpt2").unwrap();
        c.n_layer = 2;
        c.n_embd = 32;
        c.n_head = 4;
        c.n_inner = Some(48);
        c.vocab_size = 97;
        c.n_positions = 16;
        c.scale_attn_by_inverse_layer_idx = inverse_layer;
        c
    }

    /// A left-padded batch whose pads are labelled -100, one row of which
    /// starts with a pad and one row that is not padded.
    type Rows<T> = Vec<Vec<T>>;

    fn batch() -> (Rows<u32>, Rows<i64>, Rows<u32>) {
        let ids: Vec<Vec<u32>> = vec![
            vec![0, 0, 0, 5, 17, 33, 2, 90, 11, 4, 8],
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 96],
            vec![0, 44, 45, 46, 12, 13, 14, 15, 16, 60, 61],
        ];
        let mask: Vec<Vec<u32>> = vec![
            vec![0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
            vec![1; 11],
            vec![0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        ];
        let labels = ids
            .iter()
            .zip(&mask)
            .map(|(r, m)| {
                r.iter()
                    .zip(m)
                    .map(|(&i, &k)| if k == 1 { i as i64 } else { IGNORE_INDEX })
                    .collect()
            })
            .collect();
        (ids, labels, mask)
    }

    /// The fused step against candle's autograd through the model, with the
    /// same dropout masks: the same loss and every gradient.
    fn compare(training: bool, inverse_layer: bool, padded: bool) {
        let cfg = config(inverse_layer);
        let mut model = GPT2LMHeadModel::new(&cfg, 3, &Device::Cpu).unwrap();
        model.set_training(training);
        let (ids, labels, mask) = batch();
        let mask = padded.then_some(&mask[..]);
        let n_items = 25.0;
        let scale = 0.75f32;

        model.seed_dropout(11);
        let idt = Tensor::new(ids.clone(), &Device::Cpu).unwrap();
        let lt = Tensor::new(labels.clone(), &Device::Cpu).unwrap();
        let logits = model.forward(&idt, mask, None).unwrap();
        let (sum, _) = causal_lm_loss_sum(&logits, &lt).unwrap();
        let want_loss = sum.to_scalar::<f32>().unwrap() as f64;
        let grads = (sum * (scale as f64 / n_items))
            .unwrap()
            .backward()
            .unwrap();

        model.seed_dropout(11);
        let params = model.named_parameters();
        let mut ranges = vec![];
        let mut at = 0;
        for (_, v) in &params {
            ranges.push(at..at + v.elem_count());
            at += v.elem_count();
        }
        let mut flat = vec![0f32; at];
        let mut ws = Workspace::new();
        let b = Batch {
            ids: &ids,
            labels: &labels,
            mask,
        };
        let loss = ws
            .forward_backward(&model, &b, &mut flat, &ranges, scale / n_items as f32)
            .unwrap();
        assert!(
            (loss - want_loss).abs() <= 1e-5 * want_loss,
            "loss {loss} vs {want_loss}"
        );
        for ((name, var), r) in params.iter().zip(&ranges) {
            let want: Vec<f32> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = &flat[r.clone()];
            let norm = want.iter().map(|x| x.abs()).fold(0f32, f32::max);
            assert!(norm > 0.0, "{name}: no gradient");
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * norm,
                    "{name}: fused {g} vs autograd {w} (max |grad| {norm})"
                );
            }
        }
        // A second step reuses the buffers and accumulates.
        model.seed_dropout(11);
        let again = ws
            .forward_backward(&model, &b, &mut flat, &ranges, scale / n_items as f32)
            .unwrap();
        assert_eq!(again, loss);
        let (name, var) = &params[0];
        let want: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (g, w) in flat[ranges[0].clone()].iter().zip(&want) {
            assert!(
                (g - 2.0 * w).abs() <= 2e-4 * w.abs().max(1e-3),
                "{name}: not accumulated"
            );
        }
    }

    #[test]
    fn fused_step_matches_autograd_in_training_with_dropout_and_padding() {
        compare(true, false, true);
    }

    #[test]
    fn fused_step_matches_autograd_without_dropout_and_with_inverse_layer_scaling() {
        compare(false, true, true);
        compare(false, false, false);
    }

    #[test]
    fn fast_exp_and_tanh_are_within_a_few_ulp() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp_fast(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4.0 * f32::EPSILON, "exp: relative error {worst}");
        assert_eq!(exp_fast(-1e9), 0.0);
        assert_eq!(exp_fast(100.0), f32::INFINITY);
        let mut worst = 0f32;
        let mut u = -12.0f32;
        while u < 12.0 {
            worst = worst.max((tanh_fast(u) - u.tanh()).abs());
            u += 0.00113;
        }
        assert!(worst < 2e-7, "tanh: absolute error {worst}");
        let mut row = vec![0.5f32; 37];
        row[3] = -1e9;
        let z = exp_shifted(&mut row, 0.5);
        assert_eq!(row[3], 0.0);
        assert!((z - 36.0).abs() < 1e-5, "{z}");
    }

    #[test]
    fn bad_batches_are_errors_naming_the_problem() {
        let model = GPT2LMHeadModel::new(&config(false), 0, &Device::Cpu).unwrap();
        let n = model.num_parameters();
        let ranges: Vec<Range<usize>> = {
            let mut at = 0;
            model
                .named_parameters()
                .iter()
                .map(|(_, v)| {
                    at += v.elem_count();
                    at - v.elem_count()..at
                })
                .collect()
        };
        let mut flat = vec![0f32; n];
        let mut ws = Workspace::new();
        let mut run = |ids: Vec<Vec<u32>>, labels: Vec<Vec<i64>>| {
            let b = Batch {
                ids: &ids,
                labels: &labels,
                mask: None,
            };
            ws.forward_backward(&model, &b, &mut flat, &ranges, 1.0)
                .unwrap_err()
                .to_string()
        };
        assert!(run(vec![vec![97, 1]], vec![vec![1, 1]]).contains("outside the vocabulary"));
        assert!(run(vec![vec![1; 17]], vec![vec![1; 17]]).contains("n_positions"));
        assert!(run(vec![vec![1, 2]], vec![vec![1, 500]]).contains("label 500"));
        assert!(run(vec![vec![1, 2]], vec![vec![1]]).contains("labels must have shape"));
    }
}
