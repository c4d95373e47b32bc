//! AdamW as `torch.optim.AdamW` (`adamw_torch`) computes it, with HF
//! Trainer's parameter groups (no weight decay for biases and LayerNorm
//! weights): on host memory by a parallel loop (CPU ranks, offload), in
//! place on a model's weights, or with tensor ops on a device.

use std::ops::Range;

use candle_core::Tensor;
use rayon::prelude::*;

use crate::model::GPT2LMHeadModel;

/// AdamW's hyper-parameters (`adamw_torch`, or the ds_config optimizer block).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Adam's moments for the elements this rank updates.
pub enum Moments {
    /// `offload_optimizer: cpu`: host memory, updated by a parallel loop.
    Host { m: Vec<f32>, v: Vec<f32> },
    /// On the rank's device, updated with tensor ops; `decay` is 1 where
    /// weight decay applies, 0 on biases and LayerNorm weights.
    Device { m: Tensor, v: Tensor, decay: Tensor },
}

/// The constants of one AdamW update of one parameter.
#[derive(Clone, Copy)]
pub struct AdamWStep {
    b1: f32,
    b2: f32,
    eps: f32,
    bc2_sqrt: f32,
    step_size: f32,
    /// `1 − lr·weight_decay`, or 1 where no decay applies.
    decay: f32,
}

/// The update's constants for a parameter that decays or not.
pub fn adamw_consts(
    a: AdamWParams,
    lr: f64,
    bc2_sqrt: f64,
    step_size: f64,
) -> impl Fn(bool) -> AdamWStep {
    move |decays| AdamWStep {
        b1: a.beta1 as f32,
        b2: a.beta2 as f32,
        eps: a.eps as f32,
        bc2_sqrt: bc2_sqrt as f32,
        step_size: step_size as f32,
        decay: if decays {
            (1.0 - lr * a.weight_decay) as f32
        } else {
            1.0
        },
    }
}

/// `torch.optim.AdamW`'s update of `p` in place, in parallel chunks.
pub fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamWStep) {
    p.par_chunks_mut(4096)
        .zip(g.par_chunks(4096))
        .zip(m.par_chunks_mut(4096))
        .zip(v.par_chunks_mut(4096))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                p[i] *= s.decay;
                m[i] = s.b1 * m[i] + (1.0 - s.b1) * g[i];
                v[i] = s.b2 * v[i] + (1.0 - s.b2) * g[i] * g[i];
                let denom = v[i].sqrt() / s.bc2_sqrt + s.eps;
                p[i] -= s.step_size * m[i] / denom;
            }
        });
}

/// AdamW as a candle in-place op on one fp32 CPU parameter.
struct InPlaceAdamW<'a> {
    g: &'a [f32],
    /// The moments (behind a lock: in-place ops get `&self`).
    mv: std::sync::Mutex<(&'a mut [f32], &'a mut [f32])>,
    step: AdamWStep,
}

impl candle_core::InplaceOp1 for InPlaceAdamW<'_> {
    fn name(&self) -> &'static str {
        "companion-adamw"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("in-place AdamW: expected fp32 weights");
        };
        let Some((a, z)) = layout.contiguous_offsets() else {
            candle_core::bail!("in-place AdamW: expected contiguous weights");
        };
        let mut mv = self.mv.lock().expect("moments");
        let (m, v) = &mut *mv;
        if z - a != self.g.len() || m.len() != self.g.len() {
            candle_core::bail!(
                "in-place AdamW: {} weights, {} gradients",
                z - a,
                self.g.len()
            );
        }
        adamw_update(&mut data[a..z], self.g, m, v, self.step);
        Ok(())
    }
}

/// Adam's bias corrections at step `t`: `√(1 − β₂ᵗ)` and the step size
/// `lr / (1 − β₁ᵗ)`.
pub fn bias_corrections(a: AdamWParams, t: u64, lr: f64) -> (f64, f64) {
    let t = t as i32;
    ((1.0 - a.beta2.powi(t)).sqrt(), lr / (1.0 - a.beta1.powi(t)))
}

/// One AdamW update at step `t` of the `n` elements `p` (gradients `g`,
/// host moments `m`, `v`), split at parameter boundaries by `segments`
/// (length, weight decay applies) so that each run has one decay factor.
/// (A state whose moments live on a device steps with [`update_tensors`].)
#[allow(clippy::too_many_arguments)]
pub fn update(
    a: AdamWParams,
    t: u64,
    m: &mut [f32],
    v: &mut [f32],
    p: &mut [f32],
    g: &[f32],
    lr: f64,
    n: usize,
    segments: &[(usize, bool)],
) {
    let (bc2_sqrt, step_size) = bias_corrections(a, t, lr);
    let with = adamw_consts(a, lr, bc2_sqrt, step_size);
    let (mut rest_m, mut rest_v) = (&mut m[..n], &mut v[..n]);
    let mut rest_p = &mut p[..];
    let mut rest_g = g;
    for &(len, dec) in segments {
        let len = len.min(rest_p.len());
        let (pp, rp) = rest_p.split_at_mut(len);
        let (gg, rg) = rest_g.split_at(len);
        let (mm, rm) = rest_m.split_at_mut(len);
        let (vv, rv) = rest_v.split_at_mut(len);
        (rest_p, rest_g, rest_m, rest_v) = (rp, rg, rm, rv);
        adamw_update(pp, gg, mm, vv, with(dec));
    }
}

/// AdamW at step `t` as tensor ops on the device that holds the moments:
/// `p` and `g · gscale` (fp32, the moments' length; `gscale` the clipping
/// coefficient) give the new weights; `m` and `v` are replaced by their
/// updated values, `decay` is 1 where weight decay applies. On a CUDA
/// device this is one fused kernel (`adamw.cu`, `optim::adamw_cuda`).
#[allow(clippy::too_many_arguments)]
pub fn update_tensors(
    a: AdamWParams,
    t: u64,
    m: &mut Tensor,
    v: &mut Tensor,
    decay: &Tensor,
    p: &Tensor,
    g: &Tensor,
    lr: f64,
    gscale: f64,
) -> candle_core::Result<Tensor> {
    let (bc2_sqrt, step_size) = bias_corrections(a, t, lr);
    #[cfg(feature = "cuda")]
    if p.device().is_cuda() && crate::model::autograd_ops::fused_cuda_kernels() {
        let consts = [
            a.beta1,
            a.beta2,
            a.eps,
            bc2_sqrt,
            step_size,
            lr * a.weight_decay,
        ];
        let consts = consts.map(|x| x as f32);
        let (p1, m1, v1) =
            super::adamw_cuda::adamw_fused(p, g, m, v, decay, gscale as f32, consts)?;
        (*m, *v) = (m1, v1);
        return Ok(p1);
    }
    let scaled;
    let g = if gscale == 1.0 {
        g
    } else {
        scaled = (g * gscale)?;
        &scaled
    };
    let m1 = ((&*m * a.beta1)? + (g * (1.0 - a.beta1))?)?;
    let v1 = ((&*v * a.beta2)? + (g.sqr()? * (1.0 - a.beta2))?)?;
    let denom = ((v1.sqrt()? / bc2_sqrt)? + a.eps)?;
    let factor = ((decay * (-lr * a.weight_decay))? + 1.0)?;
    let upd = ((&m1 / &denom)? * step_size)?;
    let p1 = ((p * factor)? - upd)?;
    *m = m1;
    *v = v1;
    Ok(p1)
}

/// AdamW at step `t` straight into `model`'s weights (a candle in-place op
/// per parameter): parameter `i` has gradients `grads[ranges[i]]` and host
/// moments `m`, `v` over the same ranges. No flat copy of the model is
/// taken out and written back (stage 0 on the CPU).
#[allow(clippy::too_many_arguments)]
pub fn update_in_place(
    a: AdamWParams,
    t: u64,
    model: &GPT2LMHeadModel,
    grads: &[f32],
    ranges: &[Range<usize>],
    m: &mut [f32],
    v: &mut [f32],
    lr: f64,
) -> candle_core::Result<()> {
    let (bc2_sqrt, step_size) = bias_corrections(a, t, lr);
    let with = adamw_consts(a, lr, bc2_sqrt, step_size);
    let params = model.named_parameters();
    for (((_, var), spec), r) in params.iter().zip(&model.params.specs).zip(ranges) {
        let op = InPlaceAdamW {
            g: &grads[r.clone()],
            mv: std::sync::Mutex::new((&mut m[r.clone()], &mut v[r.clone()])),
            step: with(spec.decay),
        };
        var.as_tensor().inplace_op1(&op)?;
    }
    Ok(())
}
