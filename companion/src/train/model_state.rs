//! What the Trainer's engine holds, gathered: every rank's model-state
//! bytes and the whole model (collectives: every rank calls them).

use candle_core::DType;

use super::engine::Engine;
use super::error::Result;
use super::trainer::Trainer;
use crate::model::GPT2LMHeadModel;
use crate::zero::{FlatState, ModelStateBytes};

impl Trainer {
    /// Every rank's model-state bytes, measured (a collective: all ranks call it).
    pub fn memory_report(&self) -> Result<Vec<ModelStateBytes>> {
        let m = match &self.engine {
            Engine::Zero(e) => e.memory(&self.model),
            Engine::ModelParallel(p) => p.memory(),
        };
        let row = [
            m.params as f64,
            m.grads as f64,
            m.optimizer_states as f64,
            m.offloaded_to_host as f64,
            m.peak_gathered_params as f64,
            m.activations_held.map_or(-1.0, |a| a as f64),
        ];
        let mut out = Vec::new();
        for r in 0..self.engine.world_size() {
            let mut v = [0f64; 6];
            for (k, x) in row.iter().enumerate() {
                v[k] = self
                    .engine
                    .comm()
                    .all_reduce_f64(if r == m.rank { *x } else { 0.0 })?;
            }
            out.push(ModelStateBytes {
                rank: r,
                stage: m.stage,
                world_size: m.world_size,
                params: v[0] as usize,
                grads: v[1] as usize,
                optimizer_states: v[2] as usize,
                offloaded_to_host: v[3] as usize,
                peak_gathered_params: v[4] as usize,
                activations_held: (v[5] >= 0.0).then_some(v[5] as usize),
            });
        }
        Ok(out)
    }

    /// The whole model with its current weights (a collective under ZeRO-3,
    /// which gathers them from every rank).
    pub fn full_model(&self) -> Result<GPT2LMHeadModel> {
        match &self.engine {
            Engine::Zero(e) => {
                let t = e.full_state_dict(&self.model)?;
                Ok(GPT2LMHeadModel::from_tensors(
                    self.model.config.clone(),
                    t,
                    DType::F32,
                    self.model.device(),
                    "(ZeRO-3 partitions)",
                )?)
            }
            Engine::ModelParallel(p) => self.model_from_flat(&p.trainer.gather_full_state()?.fp32),
        }
    }

    /// What rank 0 writes when the model it holds is not the whole fp32
    /// model (a collective either way): a 3D run's whole state, assembled
    /// on rank 0 only, and the model built from it; under ZeRO-3 or mixed
    /// precision the gathered model (on every rank). `(None, None)`: the
    /// rank's own model is the whole one.
    pub(crate) fn model_for_saving(&self) -> Result<(Option<FlatState>, Option<GPT2LMHeadModel>)> {
        Ok(match &self.engine {
            Engine::ModelParallel(p) => {
                let g = p.trainer.gather_full_state_on(Some(0))?;
                let full = g
                    .as_ref()
                    .map(|g| self.model_from_flat(&g.fp32))
                    .transpose()?;
                (g, full)
            }
            Engine::Zero(_) if self.engine.model_is_partial() => (None, Some(self.full_model()?)),
            Engine::Zero(_) => (None, None),
        })
    }

    /// The whole model from its weights laid end to end (a gathered state).
    pub(crate) fn model_from_flat(&self, fp32: &[f32]) -> Result<GPT2LMHeadModel> {
        let t = super::engine::tensors_by_name(self.engine.layout(), fp32, self.model.device())?;
        Ok(GPT2LMHeadModel::from_tensors(
            self.model.config.clone(),
            t,
            DType::F32,
            self.model.device(),
            "(the gathered state)",
        )?)
    }
}
