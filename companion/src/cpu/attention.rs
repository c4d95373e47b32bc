//! Causal self-attention of the training step, forward and backward, one
//! (sequence, head) pair per task: the scores and the probabilities are
//! `[T, T]` per pair, the products go to the matrix multiply directly on
//! strided views of the fused `qkv` buffer.

use rayon::prelude::*;

use super::gemm::{gemm_raw, Mat, SharedMut};
use super::layers::{masked_softmax_row, softmax_backward_row};
use super::workspace::LayerActs;

/// Causal self-attention of every (sequence, head) pair, in parallel:
/// `att = softmax(scale·q·kᵀ + mask)`, dropout (when `a.att_d` holds a mask,
/// it becomes the dropped probabilities), `atty = att·v`.
pub(crate) fn attention_forward(
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
                masked_softmax_row(row, scale, |j| {
                    j <= i && key_mask.is_none_or(|m| m[bb][j] == 1)
                });
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
pub(crate) fn attention_backward(
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
            softmax_backward_row(row, p, scale);
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
