//! DeepSpeed's flat buffers: every parameter laid end to end in one fp32
//! buffer in `named_parameters` order, padded to a multiple of twice the
//! world size and cut into one contiguous partition per rank.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::error::{Result, ZeroError};
use crate::model::GPT2LMHeadModel;
use crate::optim::adamw::Moments;
use crate::params::Gpt2Params;

/// Where each parameter sits in the flat buffer and which slice each rank owns.
#[derive(Debug, Clone)]
pub struct FlatLayout {
    /// The parameters laid out, in order.
    pub params: Gpt2Params,
    pub offsets: Vec<usize>,
    /// Real elements (Ψ).
    pub numel: usize,
    pub world: usize,
    /// Elements per partition: Ψ padded to a multiple of 2N, over N, as
    /// DeepSpeed's stage 1/2 pads its flat buffer (`nccl_start_alignment_factor`
    /// 2 times the world size), so each rank holds what a DeepSpeed rank holds
    /// (with one parameter group). The last partitions hold the padding.
    pub part: usize,
}

impl FlatLayout {
    pub fn new(cfg: &crate::config::GPT2Config, world: usize) -> Self {
        let params = Gpt2Params::new(cfg);
        let mut offsets = Vec::with_capacity(params.len());
        let mut at = 0;
        for s in &params.specs {
            offsets.push(at);
            at += s.numel();
        }
        let world = world.max(1);
        FlatLayout {
            params,
            offsets,
            numel: at,
            world,
            part: at.div_ceil(2 * world) * 2,
        }
    }

    /// The flat elements rank `r` owns (may run past `numel`: padding).
    pub fn partition(&self, r: usize) -> Range<usize> {
        r * self.part..(r + 1) * self.part
    }

    /// The flat elements of parameter `i`.
    pub fn range(&self, i: usize) -> Range<usize> {
        self.offsets[i]..self.offsets[i] + self.params.specs[i].numel()
    }

    /// Every parameter's flat range, in order.
    pub fn ranges(&self) -> Vec<Range<usize>> {
        self.params.ranges()
    }

    /// The slices of parameters `idx` that rank `r`'s partition holds, in
    /// the order of `idx` (how a reduce-scatter or a gather of those
    /// parameters lays out rank `r`'s share).
    pub fn pieces(&self, idx: &[usize], r: usize) -> Vec<PartitionPiece> {
        let part = self.partition(r);
        idx.iter()
            .enumerate()
            .filter_map(|(k, &i)| {
                let range = self.range(i);
                let x = intersect(&range, &part);
                (!x.is_empty()).then(|| PartitionPiece {
                    k,
                    in_param: x.start - range.start,
                    in_part: x.start - part.start,
                    len: x.len(),
                })
            })
            .collect()
    }

    pub fn name(&self, i: usize) -> &str {
        self.params.name(i)
    }

    pub fn shape(&self, i: usize) -> &[usize] {
        &self.params.specs[i].shape
    }
}

/// A slice of one parameter within one rank's partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionPiece {
    /// Which of the parameters asked for.
    pub k: usize,
    /// Where it starts within the parameter, and within the partition.
    pub in_param: usize,
    pub in_part: usize,
    pub len: usize,
}

pub(crate) fn intersect(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    let s = a.start.max(b.start);
    let e = a.end.min(b.end).max(s);
    s..e
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
    (0..layout.params.len())
        .filter_map(|i| {
            let x = intersect(&layout.range(i), owned);
            (!x.is_empty()).then(|| (x.len(), layout.params.specs[i].decay))
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
        decay: decay_tensor(layout, owned, device)?,
    })
}

/// [`decay_mask`] as a tensor on `device`.
pub(crate) fn decay_tensor(
    layout: &FlatLayout,
    owned: &Range<usize>,
    device: &Device,
) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        decay_mask(layout, owned),
        owned.len(),
        device,
    )?)
}
