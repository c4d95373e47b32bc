//! DeepSpeed's flat buffers: every parameter laid end to end in one fp32
//! buffer in `named_parameters` order, padded to a multiple of the world
//! size and cut into one contiguous partition per rank.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;

use super::error::{Result, ZeroError};
use crate::model::{parameter_shapes, GPT2LMHeadModel};
use crate::optim::adamw::decays;
use crate::optim::adamw::Moments;

/// Where each parameter sits in the flat buffer and which slice each rank owns.
#[derive(Debug, Clone)]
pub struct FlatLayout {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub offsets: Vec<usize>,
    /// Real elements (Ψ).
    pub numel: usize,
    pub world: usize,
    /// Elements per partition: ⌈Ψ / N⌉ (the last one is padded).
    pub part: usize,
}

impl FlatLayout {
    pub fn new(cfg: &crate::config::GPT2Config, world: usize) -> Self {
        let (mut names, mut shapes, mut offsets) = (vec![], vec![], vec![]);
        let mut at = 0;
        for (n, s) in parameter_shapes(cfg) {
            offsets.push(at);
            at += s.iter().product::<usize>();
            names.push(n);
            shapes.push(s);
        }
        let world = world.max(1);
        FlatLayout {
            names,
            shapes,
            offsets,
            numel: at,
            world,
            part: at.div_ceil(world),
        }
    }

    /// The flat elements rank `r` owns (may run past `numel`: padding).
    pub fn partition(&self, r: usize) -> Range<usize> {
        r * self.part..(r + 1) * self.part
    }

    /// The flat elements of parameter `i`.
    pub fn range(&self, i: usize) -> Range<usize> {
        let n: usize = self.shapes[i].iter().product();
        self.offsets[i]..self.offsets[i] + n
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }
}

pub(crate) fn intersect(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    let s = a.start.max(b.start);
    let e = a.end.min(b.end).max(s);
    s..e
}

pub(crate) fn tensors(p: &[(String, Tensor)]) -> HashMap<String, Tensor> {
    p.iter().map(|(n, t)| (n.clone(), t.clone())).collect()
}

pub(crate) fn var_tensors(p: &[(String, Var)]) -> HashMap<String, Tensor> {
    p.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

pub(crate) fn add_into(acc: &mut [f32], x: &[f32]) {
    acc.par_iter_mut()
        .zip(x.par_iter())
        .for_each(|(a, b)| *a += b);
}

/// Σx² in f64, in fixed chunks summed in order: rayon's own `sum` splits
/// where work stealing happens to, so its rounding (and through clipping,
/// the weights) would change from run to run.
pub(crate) fn sum_sq(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x
        .par_chunks(1 << 16)
        .map(|c| c.iter().map(|v| (*v as f64) * (*v as f64)).sum())
        .collect();
    parts.iter().sum()
}

/// The model's weights laid end to end, fp32.
pub(crate) fn flatten_params(model: &GPT2LMHeadModel, layout: &FlatLayout) -> Result<Vec<f32>> {
    let mut flat = Vec::with_capacity(layout.numel);
    for (_, var) in model.named_parameters() {
        let v: Vec<f32> = var
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        flat.extend_from_slice(&v);
    }
    if flat.len() != layout.numel {
        return Err(ZeroError::Args(format!(
            "the model holds {} weights, the ZeRO layout expects {} (a partitioned model has none)",
            flat.len(),
            layout.numel
        )));
    }
    Ok(flat)
}

/// Write `flat` (the whole model) back into its Vars.
pub(crate) fn set_params(model: &GPT2LMHeadModel, layout: &FlatLayout, flat: &[f32]) -> Result<()> {
    for (i, (_, var)) in model.named_parameters().iter().enumerate() {
        let t = Tensor::from_slice(&flat[layout.range(i)], var.shape(), var.device())?
            .to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// Runs of `owned` (clipped to real elements) with one weight-decay flag each.
pub(crate) fn decay_segments(layout: &FlatLayout, owned: &Range<usize>) -> Vec<(usize, bool)> {
    (0..layout.names.len())
        .filter_map(|i| {
            let x = intersect(&layout.range(i), owned);
            (!x.is_empty()).then(|| (x.len(), decays(&layout.names[i])))
        })
        .collect()
}

/// 1.0 where weight decay applies, per owned element (padding: 0).
pub(crate) fn decay_mask(layout: &FlatLayout, owned: &Range<usize>) -> Vec<f32> {
    let mut mask = Vec::with_capacity(owned.len());
    for (len, d) in decay_segments(layout, owned) {
        mask.extend(std::iter::repeat_n(if d { 1.0 } else { 0.0 }, len));
    }
    mask.resize(owned.len(), 0.0);
    mask
}

/// Adam's moments as zero tensors on `device`, with the weight-decay mask.
pub(crate) fn device_moments(
    layout: &FlatLayout,
    owned: &Range<usize>,
    device: &Device,
) -> Result<Moments> {
    let n = owned.len();
    Ok(Moments::Device {
        m: Tensor::zeros(n, DType::F32, device)?,
        v: Tensor::zeros(n, DType::F32, device)?,
        decay: Tensor::from_vec(decay_mask(layout, owned), n, device)?,
    })
}
