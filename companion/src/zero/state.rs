//! What a ZeRO rank saves in a checkpoint and loads back: its shard of the
//! weights and Adam moments, by parameter name.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::engine::ZeroEngine;
use super::error::{Result, ZeroError};
use super::layout::{flatten_params, intersect};
use crate::model::GPT2LMHeadModel;
use crate::optim::adamw::Moments;

/// A parameter's name with its `exp_avg` and `exp_avg_sq`.
pub type NamedMoments = (String, Vec<f32>, Vec<f32>);

impl ZeroEngine {
    /// This rank's optimizer shard: Adam moments over its flat range, and
    /// (stage 3) its weights. With `full_state_dict` it is a checkpoint.
    pub fn shard(&self) -> Result<Vec<(String, Tensor)>> {
        let cpu = Device::Cpu;
        let (m, v) = match &self.moments {
            Moments::Host { m, v } => (
                Tensor::from_slice(m, m.len(), &cpu)?,
                Tensor::from_slice(v, v.len(), &cpu)?,
            ),
            Moments::Device { m, v, .. } => (m.to_device(&cpu)?, v.to_device(&cpu)?),
        };
        let mut out = vec![("exp_avg".to_string(), m), ("exp_avg_sq".to_string(), v)];
        if self.stage() == 3 {
            let p = self.params_on_host()?;
            out.push((
                "fp32_flat_partition".into(),
                Tensor::from_vec(p.clone(), p.len(), &cpu)?,
            ));
        }
        if self.master_len() > 0 {
            let m = self.master_on_host()?;
            out.push((
                "fp32_master".into(),
                Tensor::from_vec(m.clone(), m.len(), &cpu)?,
            ));
        }
        out.push((
            "loss_scale".into(),
            Tensor::new(&[self.loss_scale() as f32], &cpu)?,
        ));
        Ok(out)
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

    /// Restore a shard written by [`ZeroEngine::shard`] (same stage and world size).
    pub fn load_shard(&mut self, t: &HashMap<String, Tensor>, file: &str) -> Result<()> {
        let get = |k: &str, n: usize| -> Result<Vec<f32>> {
            let x = t.get(k).ok_or_else(|| ZeroError::Io {
                path: file.into(),
                msg: format!("no tensor `{k}` (was it written by another stage?)"),
            })?;
            if x.elem_count() != n {
                return Err(ZeroError::Io {
                    path: file.into(),
                    msg: format!(
                        "`{k}` has {} elements, expected {n}: resume with the world size and ZeRO stage that wrote it",
                        x.elem_count()
                    ),
                });
            }
            Ok(x.flatten_all()?.to_vec1()?)
        };
        let n = self.owned.len();
        let (m, v) = (get("exp_avg", n)?, get("exp_avg_sq", n)?);
        check_moments(file, "the shard's", &m, &v)?;
        match &mut self.moments {
            Moments::Host { m: hm, v: hv } => {
                *hm = m;
                *hv = v;
            }
            Moments::Device { m: dm, v: dv, .. } => {
                *dm = Tensor::from_vec(m, n, &self.device)?;
                *dv = Tensor::from_vec(v, n, &self.device)?;
            }
        }
        if self.stage() == 3 {
            let p = get("fp32_flat_partition", self.layout.part)?;
            self.set_params_from_host(p)?;
        }
        if self.master_len() > 0 {
            let m = get("fp32_master", self.master_len())?;
            self.set_master_from_host(m)?;
        }
        if let (Some(sc), Some(t)) = (self.loss_scaler.as_mut(), t.get("loss_scale")) {
            sc.cur_scale = t.flatten_all()?.to_vec1::<f32>()?[0] as f64;
        }
        Ok(())
    }

    /// After loading full fp32 weights (resume): stage 3 takes this rank's
    /// slice, mixed precision its fp32 masters.
    pub fn load_full_params(&mut self, model: &GPT2LMHeadModel) -> Result<()> {
        if self.mixed_precision() && self.stage() < 3 {
            let valid = intersect(&self.owned, &(0..self.layout.numel));
            let master = flatten_params(model, &self.layout)?[valid].to_vec();
            self.set_master_from_host(master)?;
        }
        if self.stage() == 3 {
            let flat = flatten_params(model, &self.layout)?;
            let me = intersect(&self.layout.partition(self.rank()), &(0..self.layout.numel));
            let mut params = vec![0.0; self.layout.part];
            params[..me.len()].copy_from_slice(&flat[me]);
            self.set_params_from_host(params)?;
        }
        Ok(())
    }

    /// Adam moments by parameter name for a stage-0 engine (the whole model):
    /// the `optimizer.safetensors` of a checkpoint without DeepSpeed.
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

    /// Set a stage-0 engine's moments from `optimizer.safetensors` tensors
    /// (read from `file`).
    pub fn set_moments_by_name(
        &mut self,
        named: &HashMap<String, (Vec<f32>, Vec<f32>)>,
        file: &str,
    ) -> Result<()> {
        for (name, (m, v)) in named {
            check_moments(file, name, m, v)?;
        }
        let n = self.layout.numel;
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        for (i, name) in self.layout.params.specs.iter().map(|s| &s.name).enumerate() {
            if let Some((a, b)) = named.get(name) {
                let r = self.layout.range(i);
                if a.len() != r.len() || b.len() != r.len() {
                    return Err(ZeroError::Args(format!(
                        "optimizer state for {name} has the wrong size"
                    )));
                }
                m[r.clone()].copy_from_slice(a);
                v[r].copy_from_slice(b);
            }
        }
        match &mut self.moments {
            Moments::Host { m: hm, v: hv } => {
                *hm = m;
                *hv = v;
            }
            Moments::Device { m: dm, v: dv, .. } => {
                *dm = Tensor::from_vec(m, n, &self.device)?;
                *dv = Tensor::from_vec(v, n, &self.device)?;
            }
        }
        Ok(())
    }
}

/// Adam's moments as a checkpoint holds them: finite, and `exp_avg_sq` (a
/// mean of squares) never negative; anything else would poison every step
/// after the resume.
fn check_moments(file: &str, name: &str, m: &[f32], v: &[f32]) -> Result<()> {
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
