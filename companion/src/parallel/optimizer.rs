//! AdamW over a rank's shards (Megatron's optimizer): the gradient norm of
//! the whole model (each split parameter's shards summed over the
//! tensor-parallel group, each replicated parameter once, the stages summed,
//! a tied embedding's second copy left out), DeepSpeed's clipping factor,
//! then the update the ZeRO engine uses (`optim::adamw::update`, the one
//! AdamW here) over the shards laid end to end. With a data-parallel group
//! it is Megatron's distributed optimizer (ZeRO-1): the gradients are
//! reduce-scattered, each data-parallel rank keeps Adam's moments for, and
//! updates, its part of that flat vector, and the parts are all-gathered.
//! A GPU rank keeps that state on its device (`optimizer_on_device`).
//! (The flat vector is padded to a multiple of the group's size; the ZeRO
//! engine's `FlatLayout` pads to twice that, as DeepSpeed does.)

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::Tensor;

use super::tensor::TensorParallelGpt2;
use crate::optim::adamw::{self, AdamWParams};
use crate::zero::comm::Communicator;
use crate::zero::engine::clip_coefficient;
use crate::zero::layout::intersect;

type Result<T> = candle_core::Result<T>;

fn comm_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("optimizer: {e}"))
}

pub struct ShardOptimizer {
    pub adam: AdamWParams,
    /// Adam's step count.
    pub adam_steps: u64,
    /// Adam's moments of this rank's part (padded to `part`).
    pub(super) state: AdamState,
    /// (elements, weight decay) of each shard, in order.
    pub(super) segments: Vec<(usize, bool)>,
    /// The data-parallel group ZeRO-1 partitions over (None: every rank
    /// updates everything).
    pub(super) dp: Option<Arc<dyn Communicator>>,
    /// Elements of the flat vector and each data-parallel rank's part.
    pub(super) numel: usize,
    pub(super) part: usize,
}

/// Where Adam's moments live: host vectors (CPU ranks: the fused AdamW
/// loop), or tensors on the shards' device with the masks of this rank's
/// part (GPU ranks: `optimizer_on_device`).
pub(super) enum AdamState {
    Host {
        m: Vec<f32>,
        v: Vec<f32>,
    },
    Device {
        m: Tensor,
        v: Tensor,
        /// 1 where weight decay applies.
        decay: Tensor,
        /// 1 where the element counts in the whole model's norm.
        counted: Tensor,
    },
}

impl ShardOptimizer {
    /// For the shards of `model` on this rank.
    pub fn new(model: &TensorParallelGpt2, adam: AdamWParams) -> Result<Self> {
        Self::distributed(model, adam, None)
    }

    /// Partitioned over the data-parallel group `dp` (ZeRO-1).
    pub fn distributed(
        model: &TensorParallelGpt2,
        adam: AdamWParams,
        dp: Option<Arc<dyn Communicator>>,
    ) -> Result<Self> {
        let specs = &model.params.specs;
        let segments = model
            .shards
            .iter()
            .map(|(name, var)| {
                let decay = specs
                    .iter()
                    .find(|s| &s.name == name)
                    .is_some_and(|s| s.decay);
                (var.elem_count(), decay)
            })
            .collect::<Vec<_>>();
        let numel: usize = segments.iter().map(|s| s.0).sum();
        let ways = dp.as_ref().map_or(1, |d| d.world_size());
        let part = numel.div_ceil(ways);
        let mut me = ShardOptimizer {
            adam,
            adam_steps: 0,
            state: AdamState::Host {
                m: vec![0.0; part],
                v: vec![0.0; part],
            },
            segments,
            dp,
            numel,
            part,
        };
        if !model.device()?.is_cpu() {
            me.place_state_on_device(model)?;
        }
        Ok(me)
    }

    /// The elements of this rank's flat shard vector whose moments it keeps.
    pub fn part_range(&self) -> Range<usize> {
        let (ways, rank) = self
            .dp
            .as_ref()
            .map_or((1, 0), |d| (d.world_size(), d.rank()));
        part_of(self.numel, ways, rank)
    }

    /// Adam's moments of [`Self::part_range`] (padded to equal parts), in
    /// host memory.
    pub fn moments(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        match &self.state {
            AdamState::Host { m, v } => Ok((m.clone(), v.clone())),
            AdamState::Device { m, v, .. } => Ok((m.to_vec1()?, v.to_vec1()?)),
        }
    }

    /// Take moments for [`Self::part_range`] and Adam's step count (a resume).
    pub fn set_moments(&mut self, m: Vec<f32>, v: Vec<f32>, adam_steps: u64) -> Result<()> {
        let n = self.part_range().len();
        if m.len() != n || v.len() != n {
            candle_core::bail!(
                "moments of {}/{} elements for a part of {n}",
                m.len(),
                v.len()
            );
        }
        let (mut m, mut v) = (m, v);
        m.resize(self.part, 0.0);
        v.resize(self.part, 0.0);
        match &mut self.state {
            AdamState::Host { m: hm, v: hv } => (*hm, *hv) = (m, v),
            AdamState::Device { m: dm, v: dv, .. } => {
                let device = dm.device().clone();
                *dm = Tensor::from_vec(m, self.part, &device)?;
                *dv = Tensor::from_vec(v, self.part, &device)?;
            }
        }
        self.adam_steps = adam_steps;
        Ok(())
    }

    /// Bytes of Adam's state this rank keeps (its part of the moments).
    pub fn state_bytes(&self) -> usize {
        2 * self.part * 4
    }

    /// One optimizer step of a tensor-parallel model (one stage, no data
    /// parallelism) from `grads` of its loss; returns the gradient norm
    /// before clipping. A collective over the model's group.
    pub fn step(
        &mut self,
        model: &TensorParallelGpt2,
        grads: &GradStore,
        lr: f64,
        max_grad_norm: f64,
    ) -> Result<f64> {
        let by_name: HashMap<String, Tensor> = model
            .shards
            .iter()
            .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
            .collect();
        self.distributed_step(model, &by_name, lr, max_grad_norm, &[])
    }

    /// One step from this rank's gradients `grads` (by name; each data-
    /// parallel replica's of its own share of the batch's loss, so their
    /// sum is the batch's gradient): with a data-parallel group, the
    /// gradients are reduce-scattered over it (each rank gets the replicas'
    /// sum for its part), the norm is summed from
    /// the parts, the part updated and the parts all-gathered (Megatron's
    /// distributed optimizer); the norm is also summed over the tensor
    /// group and the `more` groups (the pipeline's stages). Returns the
    /// whole model's gradient norm before clipping.
    pub fn distributed_step(
        &mut self,
        model: &TensorParallelGpt2,
        grads: &HashMap<String, Tensor>,
        lr: f64,
        max_grad_norm: f64,
        more: &[&Arc<dyn Communicator>],
    ) -> Result<f64> {
        if matches!(self.state, AdamState::Device { .. }) {
            return self.step_on_device(model, grads, lr, max_grad_norm, more);
        }
        let ways = self.dp.as_ref().map_or(1, |d| d.world_size());
        let mut g = Vec::with_capacity(self.part * ways);
        let mut p = Vec::with_capacity(self.numel);
        // Whether each shard's squares count in the whole model's norm.
        let mut counted = Vec::with_capacity(model.shards.len());
        for (name, var) in &model.shards {
            match grads.get(name) {
                Some(t) => g.extend(t.flatten_all()?.to_vec1::<f32>()?),
                None => g.extend(std::iter::repeat_n(0.0, var.elem_count())),
            }
            p.extend(var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
            counted.push(super::tensor::speaks_for(
                name,
                &model.config,
                model.comm.rank(),
                model.stages,
                model.stage,
            ));
        }
        g.resize(self.part * ways, 0.0);
        let mine = self.part_range();
        let mut owned = match &self.dp {
            Some(d) if ways > 1 => {
                let mut x = d
                    .reduce_scatter_sum(&g, &vec![self.part; ways])
                    .map_err(comm_err)?;
                x.truncate(mine.len());
                x
            }
            _ => g[mine.clone()].to_vec(),
        };
        // The weight-decay runs and norm flags of this rank's part.
        let (mut segments, mut sq, mut at, mut off) = (Vec::new(), 0f64, 0, 0);
        for (&(len, decay), &count) in self.segments.iter().zip(&counted) {
            let x = intersect(&(at..at + len), &mine);
            if !x.is_empty() {
                segments.push((x.len(), decay));
                if count {
                    sq += owned[off..off + x.len()]
                        .iter()
                        .map(|&v| (v as f64) * (v as f64))
                        .sum::<f64>();
                }
                off += x.len();
            }
            at += len;
        }
        let norm = self.whole_norm(model, sq, more)?;
        if max_grad_norm > 0.0 {
            let coef = clip_coefficient(norm, max_grad_norm);
            if coef < 1.0 {
                owned.iter_mut().for_each(|x| *x *= coef);
            }
        }
        let mut mp = p[mine.clone()].to_vec();
        self.adam_steps += 1;
        let AdamState::Host { m, v } = &mut self.state else {
            unreachable!("the device state steps in step_on_device")
        };
        adamw::update(
            self.adam,
            self.adam_steps,
            m,
            v,
            &mut mp,
            &owned,
            lr,
            mine.len(),
            &segments,
        );
        let p = match &self.dp {
            Some(d) if ways > 1 => {
                mp.resize(self.part, 0.0);
                let mut all = d.all_gather(&mp).map_err(comm_err)?;
                all.truncate(self.numel);
                all
            }
            _ => mp,
        };
        let mut at = 0;
        for (_, var) in &model.shards {
            let k = var.elem_count();
            var.set(&Tensor::from_slice(
                &p[at..at + k],
                var.shape(),
                var.device(),
            )?)?;
            at += k;
        }
        Ok(norm)
    }
}

impl ShardOptimizer {
    /// The whole model's gradient norm from this rank's Σg² of its part:
    /// summed over the data-parallel replicas' parts, the tensor group's
    /// shards and the `more` groups (the pipeline's stages).
    pub(super) fn whole_norm(
        &self,
        model: &TensorParallelGpt2,
        mut sq: f64,
        more: &[&Arc<dyn Communicator>],
    ) -> Result<f64> {
        if let Some(d) = self.dp.as_ref().filter(|d| d.world_size() > 1) {
            sq = d.all_reduce_f64(sq).map_err(comm_err)?;
        }
        sq = model.comm.all_reduce_f64(sq).map_err(comm_err)?;
        for c in more {
            sq = c.all_reduce_f64(sq).map_err(comm_err)?;
        }
        Ok(sq.sqrt())
    }
}

/// Data-parallel rank `rank`'s part of a flat vector of `numel` elements
/// cut into `ways` equal parts (the last ones may be short or empty).
pub fn part_of(numel: usize, ways: usize, rank: usize) -> Range<usize> {
    let part = numel.div_ceil(ways.max(1));
    (rank * part).min(numel)..((rank + 1) * part).min(numel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GPT2LMHeadModel;
    use crate::parallel::tensor::shard;
    use crate::parallel::{compared_part, max_abs};
    use crate::zero::comm::{run_ranks, CommError};
    use candle_core::Device;

    /// 5 fp32 AdamW steps (weight decay, clipping active, lr 1e-3: fp32
    /// rounding in Adam's normalisation moves weights by about lr × 1e-3,
    /// so the tolerance holds at GPT-2's learning rates) on tp = 2 and 4
    /// give tp = 1's losses and weights within 1e-5 (tp = 1 is the whole
    /// model: its loss and gradients equal the model's, `tensor`'s test).
    #[test]
    fn five_tensor_parallel_steps_equal_one_rank() {
        let cfg = crate::parallel::tiny_config(2);
        let model = GPT2LMHeadModel::new(&cfg, 9, &Device::Cpu).unwrap();
        let weights: Vec<(String, Tensor)> = model.named_tensors();
        let adam = AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let batches: Vec<Vec<Vec<u32>>> = (0..5u32)
            .map(|s| {
                (0..2u32)
                    .map(|i| {
                        (0..12)
                            .map(|j| (s * 31 + i * 17 + j * 7 + 3) % 64)
                            .collect()
                    })
                    .collect()
            })
            .collect();
        type Run = (Vec<f32>, Vec<f64>, Vec<(String, Tensor)>);
        let run = |tp: usize| -> Vec<Run> {
            run_ranks(tp, |_, comm| -> std::result::Result<Run, CommError> {
                let err = |e: candle_core::Error| CommError::Transport(e.to_string());
                let m = TensorParallelGpt2::from_weights(&cfg, &weights, comm).map_err(err)?;
                let mut opt = ShardOptimizer::new(&m, adam).map_err(err)?;
                let (mut losses, mut norms) = (vec![], vec![]);
                for b in &batches {
                    let loss = m.loss(b).map_err(err)?;
                    losses.push(loss.to_scalar::<f32>().map_err(err)?);
                    let g = loss.backward().map_err(err)?;
                    norms.push(opt.step(&m, &g, 1e-3, 1.0).map_err(err)?);
                }
                let w = m
                    .shards
                    .iter()
                    .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                    .collect();
                Ok((losses, norms, w))
            })
            .unwrap()
        };
        let one = run(1).remove(0);
        assert!(
            one.1.iter().all(|&n| n > 1.0),
            "clipping is active: {:?}",
            one.1
        );
        for tp in [2, 4] {
            for (rank, (losses, norms, w)) in run(tp).into_iter().enumerate() {
                for (a, b) in losses.iter().zip(&one.0) {
                    assert!(
                        (a - b).abs() <= 1e-5 * b,
                        "tp {tp}: losses {losses:?} vs {:?}",
                        one.0
                    );
                }
                for (a, b) in norms.iter().zip(&one.1) {
                    assert!(
                        (a - b).abs() <= 1e-5 * b,
                        "tp {tp}: grad norms {norms:?} vs {:?}",
                        one.1
                    );
                }
                for (name, got) in &w {
                    let full = &one.2.iter().find(|(n, _)| n == name).unwrap().1;
                    let want = compared_part(name, &shard(name, full, rank, tp).unwrap());
                    let d = max_abs(&(compared_part(name, got) - &want).unwrap());
                    assert!(
                        d <= 1e-5,
                        "tp {tp} rank {rank}: {name} off by {d} after 5 steps"
                    );
                }
            }
        }
    }
}
