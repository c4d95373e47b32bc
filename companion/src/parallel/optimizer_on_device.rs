//! The distributed optimizer's state on a GPU rank: Adam's moments of this
//! rank's part, and the masks of which elements decay and which count in the
//! norm, are tensors on the shards' device, and a step runs as the ZeRO
//! engine's device state runs (`zero::on_device`): the gradients laid end
//! to end and reduce-scattered over the data-parallel group on the device
//! where the transport can (NCCL), the norm's Σg² summed as f64 scalars,
//! `optim::adamw::update_tensors` (one fused kernel on CUDA), the parts
//! all-gathered and the shards set. What reaches the host is scalars.
//!
//! The same code runs on candle's CPU device, which is how the tests hold
//! it to the host path ([`ShardOptimizer::place_state_on_device`]).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::optimizer::{AdamState, ShardOptimizer};
use super::tensor::TensorParallelGpt2;
use crate::optim::adamw;
use crate::zero::comm::Communicator;
use crate::zero::device_buffers::{all_gather, pad_to, reduce_scatter, sum_sq};
use crate::zero::engine::clip_coefficient;
use crate::zero::layout::intersect;

type Result<T> = candle_core::Result<T>;

fn comm_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("optimizer: {e}"))
}

impl ShardOptimizer {
    /// Keep Adam's state as tensors on the shards' device and step there
    /// (a GPU rank's optimizer does this from the start; on the CPU device
    /// it runs the same code, for tests).
    pub fn place_state_on_device(&mut self, model: &TensorParallelGpt2) -> Result<()> {
        let AdamState::Host { m, v } = &self.state else {
            return Ok(());
        };
        let device = model.device()?;
        let mine = self.part_range();
        let (mut decay, mut counted) = (vec![0f32; self.part], vec![0f32; self.part]);
        let mut at = 0;
        for ((name, _), &(len, decays)) in model.shards.iter().zip(&self.segments) {
            let speaks = super::tensor::speaks_for(
                name,
                &model.config,
                model.comm.rank(),
                model.stages,
                model.stage,
            );
            let x = intersect(&(at..at + len), &mine);
            for i in x {
                decay[i - mine.start] = f32::from(u8::from(decays));
                counted[i - mine.start] = f32::from(u8::from(speaks));
            }
            at += len;
        }
        let up = |x: Vec<f32>| Tensor::from_vec(x, self.part, &device);
        self.state = AdamState::Device {
            m: up(m.clone())?,
            v: up(v.clone())?,
            decay: up(decay)?,
            counted: up(counted)?,
        };
        Ok(())
    }

    /// [`ShardOptimizer::distributed_step`] with the state on the device.
    pub(super) fn step_on_device(
        &mut self,
        model: &TensorParallelGpt2,
        grads: &HashMap<String, Tensor>,
        lr: f64,
        max_grad_norm: f64,
        more: &[&Arc<dyn Communicator>],
    ) -> Result<f64> {
        let ways = self.dp.as_ref().map_or(1, |d| d.world_size());
        let mine = self.part_range();
        let device = model.device()?;
        let (mut g, mut p) = (Vec::new(), Vec::new());
        for (name, var) in &model.shards {
            g.push(match grads.get(name) {
                Some(t) => t.flatten_all()?,
                None => Tensor::zeros(var.elem_count(), DType::F32, &device)?,
            });
            p.push(var.as_tensor().flatten_all()?);
        }
        let g = pad_to(&Tensor::cat(&g, 0)?, self.part * ways).map_err(comm_err)?;
        let owned = match &self.dp {
            Some(d) if ways > 1 => reduce_scatter(d.as_ref(), &g).map_err(comm_err)?,
            _ => g.narrow(0, 0, self.part)?,
        };
        let AdamState::Device { counted, .. } = &self.state else {
            unreachable!("step_on_device runs on the device state")
        };
        let sq = sum_sq(&(&owned * counted)?).map_err(comm_err)?;
        let norm = self.whole_norm(model, sq, more)?;
        let gscale = match clip_coefficient(norm, max_grad_norm) {
            coef if max_grad_norm > 0.0 && coef < 1.0 => coef as f64,
            _ => 1.0,
        };
        self.adam_steps += 1;
        let p = Tensor::cat(&p, 0)?;
        let p_owned = pad_to(&p.narrow(0, mine.start, mine.len())?, self.part).map_err(comm_err)?;
        let AdamState::Device { m, v, decay, .. } = &mut self.state else {
            unreachable!("step_on_device runs on the device state")
        };
        let p_new = adamw::update_tensors(
            self.adam,
            self.adam_steps,
            m,
            v,
            decay,
            &p_owned,
            &owned,
            lr,
            gscale,
        )?;
        let all = match &self.dp {
            Some(d) if ways > 1 => all_gather(d.as_ref(), &p_new).map_err(comm_err)?,
            _ => p_new,
        };
        let mut at = 0;
        for (_, var) in &model.shards {
            let k = var.elem_count();
            var.set(&all.narrow(0, at, k)?.reshape(var.shape())?)?;
            at += k;
        }
        Ok(norm)
    }
}
