//! Matrix products on slices: the `gemm` crate (candle's own matrix
//! multiply) with strides instead of transposes, and for the few rows of one
//! new token, loops that stream each weight matrix once.

use std::ops::Range;

use gemm::Parallelism;
use rayon::prelude::*;

use super::simd::dot;

/// Row chunks for the reductions over rows (bias and layer-norm gradients):
/// a fixed number, so the sums are the same whatever the thread count.
pub(crate) const REDUCE_CHUNKS: usize = 16;

/// A strided operand: element (i, j) at `ptr[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub(crate) ptr: *const f32,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

/// A pointer that rayon tasks share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);

// SAFETY: every task writes a region no other task touches (one attention
// head of one sequence), and the buffer outlives the parallel loop.
unsafe impl Send for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the whole `SharedMut`).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: as for Send: tasks share the pointer, each writes only its own
// disjoint region, and no task reads another's region while it is written.
unsafe impl Sync for SharedMut {}

// SAFETY: a `Mat` is a read-only view; the matrices it points into are
// borrowed for the whole parallel loop and nobody writes them meanwhile.
unsafe impl Send for Mat {}

// SAFETY: as for Send: shared read-only access to memory that outlives
// every task.
unsafe impl Sync for Mat {}

/// Index one past the last element an `rows × cols` view with strides reads.
pub(crate) fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
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
pub(crate) unsafe fn gemm_raw(
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
pub(crate) fn matmul(
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

/// Sum over row chunks: `f` folds chunk `rows` into a zeroed `width`-vector,
/// the partial vectors are added in chunk order (deterministic), then added
/// into each target.
pub(crate) fn reduce_rows(
    rows: usize,
    width: usize,
    f: impl Fn(Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
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
pub(crate) fn bias_grad(db: &mut [f32], dy: &[f32]) {
    let n = db.len();
    let sums = reduce_rows(dy.len() / n, n, |r, acc| {
        for row in dy[r.start * n..r.end * n].chunks(n) {
            acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
        }
    });
    db.iter_mut().zip(sums).for_each(|(d, s)| *d += s);
}

/// Fill each `n`-row of `out` with the bias `b` (the matmul then adds to it).
pub(crate) fn fill_bias(out: &mut [f32], b: &[f32]) {
    out.par_chunks_mut(b.len())
        .for_each(|r| r.copy_from_slice(b));
}

/// Run `f` on blocks `0..n`: on all threads when the work (multiply-adds)
/// is large, on this thread when waking the others would cost more than
/// it saves (one token through a small model).
pub(crate) fn for_blocks(n: usize, work: usize, f: impl Fn(usize) + Sync + Send) {
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
pub(crate) fn linear(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    m: usize,
    k: usize,
    n: usize,
) {
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

/// The logits `[m, V]` of `x` `[m, C]` through the tied head `wte` `[V, C]`:
/// a matrix multiply for many rows, dot products over vocabulary blocks
/// for a few.
pub(crate) fn lm_head(logits: &mut [f32], x: &[f32], wte: &[f32], m: usize, c: usize, v: usize) {
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

/// Backward of `y = x·w + b` (`x` `[rows, k]`, `w` `[k, n]`), given `dy`:
/// `dw += xᵀ·dy` and `db += Σ dy` into `grads` at `(gw, gb)`, and
/// `dx = dy·wᵀ` (overwritten).
pub(crate) fn linear_backward(
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
pub(crate) fn two_mut(
    buf: &mut [f32],
    a: Range<usize>,
    b: Range<usize>,
) -> (&mut [f32], &mut [f32]) {
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
