//! What a ZeRO rank saves in a checkpoint and loads back: its part of the
//! fp32 weights and Adam moments, the whole model's (gathered), or by name.

use candle_core::Tensor;

use super::engine::ZeroEngine;
use super::error::{Result, ZeroError};
use super::layout::{flatten_params, intersect};
use crate::model::GPT2LMHeadModel;
use crate::optim::adamw::Moments;

/// A parameter's name with its `exp_avg` and `exp_avg_sq`.
pub type NamedMoments = (String, Vec<f32>, Vec<f32>);

/// Flat fp32 weights and Adam moments over a range of the flat buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatState {
    pub fp32: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl ZeroEngine {
    /// This rank's part of the training state over its flat range
    /// (`owned`; padding zero): the fp32 weights (stage 3's partition, the
    /// fp32 masters under mixed precision, else the model's own) and Adam's
    /// moments.
    pub fn partition_state(&self, model: &GPT2LMHeadModel) -> Result<FlatState> {
        let (m, v) = self.moments_on_host()?;
        let n = self.owned.len();
        let mut fp32 = if self.stage() == 3 {
            self.params_on_host()?
        } else if self.mixed_precision() {
            self.master_on_host()?
        } else {
            let valid = intersect(&self.owned, &(0..self.layout.numel));
            flatten_params(model, &self.layout)?[valid].to_vec()
        };
        fp32.resize(n, 0.0);
        Ok(FlatState { fp32, m, v })
    }

    /// The whole model's training state, flat (Ψ elements each), on every
    /// rank: a collective (all-gathers of the partitions).
    pub fn gather_full_state(&self, model: &GPT2LMHeadModel) -> Result<FlatState> {
        let mut part = self.partition_state(model)?;
        if self.stage() > 0 {
            for x in [&mut part.fp32, &mut part.m, &mut part.v] {
                *x = self.comm.all_gather(x)?;
            }
        }
        for x in [&mut part.fp32, &mut part.m, &mut part.v] {
            x.truncate(self.layout.numel);
        }
        Ok(part)
    }

    fn moments_on_host(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(match &self.moments {
            Moments::Host { m, v } => (m.clone(), v.clone()),
            Moments::Device { m, v, .. } => (m.to_vec1()?, v.to_vec1()?),
        })
    }

    /// Whether every number this rank keeps (its weights, fp32 master copy
    /// and Adam moments) is finite: a checkpoint of anything else would
    /// poison every run resumed from it.
    pub fn state_is_finite(&self) -> Result<bool> {
        let finite = |x: &[f32]| x.iter().all(|v| v.is_finite());
        let moments = match &self.moments {
            Moments::Host { m, v } => finite(m) && finite(v),
            Moments::Device { m, v, .. } => {
                crate::model::all_finite(m)? && crate::model::all_finite(v)?
            }
        };
        Ok(moments
            && finite(&self.params)
            && finite(&self.master)
            && self.device_state_is_finite()?)
    }

    /// Take this rank's part of a whole model's state (a resume: the
    /// checkpoint may have been written by another stage or world size).
    /// The model's weights are the caller's to set, from `full.fp32`.
    pub fn load_full_state(&mut self, full: &FlatState, file: &str) -> Result<()> {
        let n = self.layout.numel;
        if [full.fp32.len(), full.m.len(), full.v.len()] != [n; 3] {
            return Err(ZeroError::Io {
                path: file.into(),
                msg: format!(
                    "the checkpoint holds {} weights and {}/{} moments, this model has {n}",
                    full.fp32.len(),
                    full.m.len(),
                    full.v.len()
                ),
            });
        }
        check_moments(file, "the checkpoint's", &full.m, &full.v)?;
        let valid = intersect(&self.owned, &(0..n));
        let mine = |x: &[f32]| {
            let mut p = x[valid.clone()].to_vec();
            p.resize(self.owned.len(), 0.0);
            p
        };
        let (m, v) = (mine(&full.m), mine(&full.v));
        let len = self.owned.len();
        match &mut self.moments {
            Moments::Host { m: hm, v: hv } => {
                *hm = m;
                *hv = v;
            }
            Moments::Device { m: dm, v: dv, .. } => {
                *dm = Tensor::from_vec(m, len, &self.device)?;
                *dv = Tensor::from_vec(v, len, &self.device)?;
            }
        }
        if self.stage() == 3 {
            let me = intersect(&self.layout.partition(self.rank()), &(0..n));
            let mut p = full.fp32[me].to_vec();
            p.resize(self.layout.part, 0.0);
            self.set_params_from_host(p)?;
        } else if self.mixed_precision() {
            self.set_master_from_host(full.fp32[valid].to_vec())?;
        }
        Ok(())
    }

    /// Adam moments by parameter name for a stage-0 engine (the whole model):
    /// what a checkpoint's `optimizer.pt` is written from.
    pub fn moments_by_name(&self) -> Result<Vec<NamedMoments>> {
        let (m, v): (Vec<f32>, Vec<f32>) = match &self.moments {
            Moments::Host { m, v } => (m.clone(), v.clone()),
            Moments::Device { m, v, .. } => (m.to_vec1()?, v.to_vec1()?),
        };
        if self.owned != (0..self.layout.numel) {
            return Err(ZeroError::Args(
                "moments_by_name needs the whole model's moments (stage 0)".into(),
            ));
        }
        Ok((0..self.layout.params.len())
            .map(|i| {
                let r = self.layout.range(i);
                (
                    self.layout.name(i).to_string(),
                    m[r.clone()].to_vec(),
                    v[r].to_vec(),
                )
            })
            .collect())
    }
}

/// Adam's moments as a checkpoint holds them: finite, and `exp_avg_sq` (a
/// mean of squares) never negative; anything else would poison every step
/// after the resume.
pub(crate) fn check_moments(file: &str, name: &str, m: &[f32], v: &[f32]) -> Result<()> {
    let bad = |msg: String| {
        Err(ZeroError::Io {
            path: file.into(),
            msg,
        })
    };
    if let Some(x) = m.iter().find(|x| !x.is_finite()) {
        return bad(format!("{name} exp_avg holds {x}"));
    }
    if let Some(x) = v.iter().find(|x| !x.is_finite() || **x < 0.0) {
        return bad(format!(
            "{name} exp_avg_sq holds {x} (a mean of squares is finite and never negative)"
        ));
    }
    Ok(())
}
