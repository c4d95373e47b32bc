//! What holds a run's weights and optimizer state and takes its steps: the
//! ZeRO engine (data parallelism, ZeRO 0–3, offload, mixed precision), or,
//! when the run splits the model itself (`tensor_model_parallel_size` or
//! `pipeline_model_parallel_size` above 1), the 3D-parallel trainer
//! (Megatron-LM's tensor and pipeline parallelism with its distributed
//! optimizer over the data-parallel group). Both give the whole training
//! state as one [`FlatState`] and take one back, so a checkpoint of either
//! resumes in the other.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::error::Result;
use crate::model::GPT2LMHeadModel;
use crate::optim::adamw::AdamWParams;
use crate::parallel::ParallelTrainer;
use crate::zero::comm::Communicator;
use crate::zero::{FlatLayout, FlatState, ModelStateBytes, ZeroEngine};

// One per Trainer: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Engine {
    Zero(ZeroEngine),
    /// Tensor × pipeline × data parallel (ZeRO-1 over the data-parallel group).
    ModelParallel(ModelParallel),
}

/// A 3D-parallel rank and what the Trainer needs beside it.
pub struct ModelParallel {
    pub trainer: Box<ParallelTrainer>,
    /// The whole model's flat layout (what its state is read and written in).
    pub layout: FlatLayout,
    /// The most activation bytes the last step kept between a micro-batch's
    /// forward and its backward on this rank.
    pub activations_held: usize,
    /// The share of the last step this rank waited on its pipeline
    /// neighbours (the bubble, with the transfers).
    pub last_bubble: f64,
}

impl Engine {
    /// The ZeRO engine, when the run has one.
    pub fn zero(&self) -> Option<&ZeroEngine> {
        match self {
            Engine::Zero(e) => Some(e),
            Engine::ModelParallel(_) => None,
        }
    }

    pub fn zero_mut(&mut self) -> Option<&mut ZeroEngine> {
        match self {
            Engine::Zero(e) => Some(e),
            Engine::ModelParallel(_) => None,
        }
    }

    /// The run's communicator (every rank).
    pub fn comm(&self) -> &Arc<dyn Communicator> {
        match self {
            Engine::Zero(e) => &e.comm,
            Engine::ModelParallel(p) => &p.trainer.world,
        }
    }

    pub fn rank(&self) -> usize {
        self.comm().rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm().world_size()
    }

    /// This rank's data-parallel replica and their number: what its data
    /// loader reads (every rank of a model-parallel group reads the same).
    pub fn data_parallel(&self) -> (usize, usize) {
        match self {
            Engine::Zero(e) => (e.rank(), e.world_size()),
            Engine::ModelParallel(p) => (p.trainer.groups.coords.dp, p.trainer.groups.layout.dp),
        }
    }

    pub fn adam(&self) -> AdamWParams {
        match self {
            Engine::Zero(e) => e.adam,
            Engine::ModelParallel(p) => p.trainer.optimizer.adam,
        }
    }

    pub fn set_adam(&mut self, a: AdamWParams) {
        match self {
            Engine::Zero(e) => e.adam = a,
            Engine::ModelParallel(p) => p.trainer.optimizer.adam = a,
        }
    }

    /// Adam's step count.
    pub fn adam_steps(&self) -> u64 {
        match self {
            Engine::Zero(e) => e.step,
            Engine::ModelParallel(p) => p.trainer.optimizer.adam_steps,
        }
    }

    /// Steps an fp16 overflow skipped (the 3D path runs fp32: none).
    pub fn skipped_steps(&self) -> usize {
        self.zero().map_or(0, |e| e.skipped_steps)
    }

    /// The ZeRO stage: the 3D path's distributed optimizer is ZeRO-1 over
    /// several data-parallel replicas.
    pub fn stage(&self) -> u8 {
        match self {
            Engine::Zero(e) => e.stage(),
            Engine::ModelParallel(p) => p.stage(),
        }
    }

    pub fn compute_dtype(&self) -> DType {
        self.zero().map_or(DType::F32, |e| e.compute_dtype)
    }

    pub fn layout(&self) -> &FlatLayout {
        match self {
            Engine::Zero(e) => &e.layout,
            Engine::ModelParallel(p) => &p.layout,
        }
    }

    /// Whether the weights the Trainer's `model` holds are not the whole
    /// fp32 model (ZeRO-3's partitions, a half-precision copy, a 3D rank's
    /// shards): saving gathers them first.
    pub fn model_is_partial(&self) -> bool {
        match self {
            Engine::Zero(e) => e.stage() == 3 || e.mixed_precision(),
            Engine::ModelParallel(_) => true,
        }
    }

    /// The whole training state on every rank (a collective).
    pub fn gather_full_state(&self, model: &GPT2LMHeadModel) -> Result<FlatState> {
        Ok(match self {
            Engine::Zero(e) => e.gather_full_state(model)?,
            Engine::ModelParallel(p) => p.trainer.gather_full_state()?,
        })
    }

    /// Whether every number this rank keeps is finite.
    pub fn state_is_finite(&self) -> Result<bool> {
        match self {
            Engine::Zero(e) => Ok(e.state_is_finite()?),
            Engine::ModelParallel(p) => {
                let (m, v) = p.trainer.optimizer.moments()?;
                let mut ok = m.iter().chain(&v).all(|x| x.is_finite());
                for (_, t) in p.trainer.shards() {
                    ok &= crate::model::all_finite(&t)?;
                }
                Ok(ok)
            }
        }
    }
}

impl ModelParallel {
    /// The ZeRO stage of the distributed optimizer: 1 over several
    /// data-parallel replicas, 0 over one.
    pub fn stage(&self) -> u8 {
        u8::from(self.trainer.groups.layout.dp > 1)
    }

    /// What this rank keeps, measured: its shards (weights, and the
    /// gradients of a step), its part of Adam's moments, and the
    /// activations the last step kept in flight.
    pub fn memory(&self) -> ModelStateBytes {
        let t = &self.trainer;
        let held: usize = t.shards().iter().map(|(_, s)| s.elem_count() * 4).sum();
        ModelStateBytes {
            rank: t.world.rank(),
            stage: self.stage(),
            world_size: t.world.world_size(),
            params: held,
            grads: held,
            optimizer_states: t.optimizer.state_bytes(),
            offloaded_to_host: 0,
            peak_gathered_params: 0,
            activations_held: Some(self.activations_held),
        }
    }
}

/// The whole model's weights by name from its flat fp32 buffer.
pub fn tensors_by_name(
    layout: &FlatLayout,
    fp32: &[f32],
    device: &candle_core::Device,
) -> Result<HashMap<String, Tensor>> {
    (0..layout.params.len())
        .map(|i| {
            let t = Tensor::from_slice(&fp32[layout.range(i)], layout.shape(i), device)?;
            Ok((layout.name(i).to_string(), t))
        })
        .collect()
}
