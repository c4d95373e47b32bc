//! The three together: world = tp × dp × pp ranks in Megatron-LM's layout,
//! each rank one tensor-parallel shard of one pipeline stage of one
//! data-parallel replica. A step: each replica runs its share of the
//! micro-batches through the pipeline in 1F1B order, and the distributed
//! optimizer (ZeRO-1 over the data-parallel group) reduce-scatters the
//! replicas' gradients, clips by the whole model's norm and updates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::Tensor;

use super::layout::ParallelGroups;
use super::optimizer::ShardOptimizer;
use super::pipeline::{one_forward_one_backward, MicroExtras, PipelineStage, PipelineStep};
use super::traffic::{CountingCommunicator, Traffic};
use crate::config::GPT2Config;
use crate::optim::adamw::AdamWParams;
use crate::zero::comm::Communicator;

type Result<T> = candle_core::Result<T>;

fn comm_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("3D parallel: {e}"))
}

/// One rank of a 3D-parallel run.
pub struct ParallelTrainer {
    /// The run's communicator (the groups are split from it).
    pub world: Arc<dyn Communicator>,
    pub groups: ParallelGroups,
    pub stage: PipelineStage,
    pub optimizer: ShardOptimizer,
    /// Elements sent through the tensor, pipeline and data groups.
    counters: [Arc<AtomicU64>; 3],
    /// What the last step sent.
    pub last_traffic: Traffic,
    /// The most activation bytes the last step kept between a
    /// micro-batch's forward and backward.
    pub last_activations_held: usize,
}

/// What one step gives back.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// The mean loss over the global batch's tokens (on every rank).
    pub loss: f64,
    /// The whole model's gradient norm before clipping.
    pub grad_norm: f64,
    /// The share of the step this rank spent in exchanges with its pipeline
    /// neighbours (the pipeline's bubble, plus the transfers themselves).
    pub bubble: f64,
}

impl ParallelTrainer {
    /// This rank's part of the model `weights` (the whole model's, by
    /// name), for `tp` × `pp` (the data-parallel size is what is left of
    /// the world). A collective over `world`.
    pub fn new(
        config: &GPT2Config,
        weights: &[(String, Tensor)],
        world: Arc<dyn Communicator>,
        tp: usize,
        pp: usize,
        adam: AdamWParams,
    ) -> Result<Self> {
        // Every rank lays its shards out in `named_parameters` order, so each
        // knows where the others' are (`full_state`).
        let weights = crate::params::Gpt2Params::new(config)
            .specs
            .iter()
            .map(|s| {
                weights
                    .iter()
                    .find(|(n, _)| *n == s.name)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg(format!("no weights for {}", s.name)))
            })
            .collect::<Result<Vec<_>>>()?;
        let weights = weights.as_slice();
        let mut groups = ParallelGroups::new(world.as_ref(), tp, pp).map_err(comm_err)?;
        let (tp_c, tp_n) = CountingCommunicator::wrap(groups.tp.clone());
        let (pp_c, pp_n) = CountingCommunicator::wrap(groups.pp.clone());
        let (dp_c, dp_n) = CountingCommunicator::wrap(groups.dp.clone());
        (groups.tp, groups.pp, groups.dp) = (tp_c, pp_c, dp_c);
        let stage = PipelineStage::new(config, weights, groups.tp.clone(), groups.pp.clone())?;
        let optimizer = ShardOptimizer::distributed(&stage.model, adam, Some(groups.dp.clone()))?;
        Ok(ParallelTrainer {
            world,
            groups,
            stage,
            optimizer,
            counters: [tp_n, pp_n, dp_n],
            last_traffic: Traffic::default(),
            last_activations_held: 0,
        })
    }

    /// One optimizer step over the global batch `micro_batches` (every rank
    /// passes the same list; data-parallel replica r takes micro-batches r,
    /// r + dp, …; each micro-batch of equal-length rows).
    pub fn step(
        &mut self,
        micro_batches: &[Vec<Vec<u32>>],
        lr: f64,
        max_grad_norm: f64,
    ) -> Result<StepOutput> {
        let dp = self.groups.layout.dp;
        if micro_batches.is_empty() {
            candle_core::bail!("a step needs at least one micro-batch");
        }
        let mine: Vec<Vec<Vec<u32>>> = micro_batches
            .iter()
            .skip(self.groups.coords.dp)
            .step_by(dp)
            .cloned()
            .collect();
        self.step_replica(&mine, Default::default(), lr, max_grad_norm)
    }

    /// [`Self::step`] from this data-parallel replica's micro-batches only
    /// (each replica reads its own share, as a data loader gives it), with
    /// their `extras` (labels, dropout seeds). The loss is the mean
    /// over the whole global batch's counted tokens, however the replicas'
    /// shares differ (a replica may even have none, at an epoch's end).
    pub fn step_replica(
        &mut self,
        mine: &[Vec<Vec<u32>>],
        extras: MicroExtras,
        lr: f64,
        max_grad_norm: f64,
    ) -> Result<StepOutput> {
        for c in &self.counters {
            c.store(0, Ordering::Relaxed);
        }
        let local = super::pipeline::count_targets(mine, extras.labels)?;
        let global = self
            .groups
            .dp
            .all_reduce_f64(local as f64)
            .map_err(comm_err)? as usize;
        let out = if mine.is_empty() {
            PipelineStep::default()
        } else {
            one_forward_one_backward(&mut self.stage, mine, extras, Some(global.max(1)))?
        };
        self.last_activations_held = out.activations_held;
        // Reduce-scattered over the replicas inside the distributed optimizer.
        let norm = self.optimizer.distributed_step(
            &self.stage.model,
            &out.grads,
            lr,
            max_grad_norm,
            &[&self.groups.pp],
        )?;
        // The loss lives on the last stage: summed over the pipeline (the
        // other stages give 0) and over the replicas (each gives its share
        // of the global batch's mean).
        let mut loss = out.loss;
        loss = self.groups.pp.all_reduce_f64(loss).map_err(comm_err)?;
        loss = self.groups.dp.all_reduce_f64(loss).map_err(comm_err)?;
        let [t, p, d] = &self.counters;
        self.last_traffic = Traffic {
            tensor: t.load(Ordering::Relaxed),
            pipeline: p.load(Ordering::Relaxed),
            data: d.load(Ordering::Relaxed),
        };
        Ok(StepOutput {
            loss,
            grad_norm: norm,
            bubble: out.bubble,
        })
    }

    /// The summed loss and token count of `rows` (evaluation: forward
    /// only) on the rank that speaks for its replica (the last stage's
    /// first tensor rank); `None` on the others.
    pub fn forward_loss_sum(
        &mut self,
        rows: &[Vec<u32>],
        labels: Option<&[Vec<i64>]>,
    ) -> Result<Option<(f64, usize)>> {
        let r = super::pipeline::forward_only(&mut self.stage, rows, labels)?;
        Ok(r.filter(|_| self.groups.coords.tp == 0))
    }

    /// This rank's weights by name (its shards of its stage's parameters).
    pub fn shards(&self) -> Vec<(String, Tensor)> {
        self.stage
            .model
            .shards
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GPT2LMHeadModel;
    use crate::parallel::tensor::shard;
    use crate::parallel::{compared_part, max_abs};
    use crate::zero::comm::{run_ranks, CommError};
    use candle_core::Device;

    /// One step per global batch of `steps` (lr 1e-3, clipping at 1).
    fn steps_of(t: &mut ParallelTrainer, steps: &[Vec<Vec<Vec<u32>>>]) -> Result<Vec<StepOutput>> {
        steps.iter().map(|mb| t.step(mb, 1e-3, 1.0)).collect()
    }

    /// 5 fp32 steps (AdamW with weight decay, clipping active, lr 1e-3) on
    /// every tp ∈ {1, 2, 4} × pp ∈ {1, 2, 4} × dp ∈ {1, 2}, the vocabulary
    /// padded for tp, give one rank's losses and gradient norms
    /// (1e-5 relative) and weights (each within 1e-5, mean difference
    /// ≤ 1e-7; the key bias as in `optimizer`'s test).
    #[test]
    fn three_d_layouts_train_like_one_rank() {
        let mut cfg = crate::parallel::tiny_config(4);
        // 63: tp 2 and 4 pad the vocabulary's last shard.
        cfg.vocab_size = 63;
        let adam = AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let steps: Vec<Vec<Vec<Vec<u32>>>> = (0..5u32)
            .map(|s| {
                (0..4u32)
                    .map(|m| {
                        (0..2u32)
                            .map(|i| {
                                (0..10)
                                    .map(|j| (s * 41 + m * 19 + i * 7 + j * 3 + 1) % 63)
                                    .collect()
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        for tied in [true, false] {
            cfg.tie_word_embeddings = tied;
            let model = GPT2LMHeadModel::new(&cfg, 13, &Device::Cpu).unwrap();
            let weights: Vec<(String, Tensor)> = model.named_tensors();
            type Run = (
                Vec<StepOutput>,
                Vec<(String, Tensor)>,
                (usize, usize, usize),
            );
            // Split layouts run on the fused kernels; the one rank they are
            // held to runs on candle's autograd (an independent reference).
            let run = |tp: usize, pp: usize, world: usize| -> Vec<Run> {
                run_ranks(world, |_, comm| -> std::result::Result<Run, CommError> {
                    let err = |e: candle_core::Error| CommError::Transport(e.to_string());
                    let mut t =
                        ParallelTrainer::new(&cfg, &weights, comm, tp, pp, adam).map_err(err)?;
                    assert!(
                        t.stage.is_fused(),
                        "GPT-2's gelu_new runs on the fused kernels"
                    );
                    if world == 1 {
                        t.stage.set_fused(false).map_err(err)?;
                    }
                    let outs = steps_of(&mut t, &steps).map_err(err)?;
                    let c = t.groups.coords;
                    // What the last step sent, against the papers' count.
                    let held: usize = t
                        .stage
                        .model
                        .shards
                        .iter()
                        .map(|(_, v)| v.elem_count())
                        .sum();
                    assert_eq!(
                        held,
                        crate::parallel::traffic::expected_held(&cfg, tp, pp, c.pp),
                        "tp {tp} pp {pp}: parameters rank {:?} holds vs Megatron's split",
                        (c.tp, c.dp, c.pp)
                    );
                    let want =
                        crate::parallel::traffic::expected(&crate::parallel::traffic::StepShape {
                            config: &cfg,
                            tp,
                            pp,
                            dp: world / (tp * pp),
                            stage: c.pp,
                            micro_batches: 4 / (world / (tp * pp)),
                            rows: 2,
                            seq: 10,
                            held,
                        });
                    assert_eq!(
                        t.last_traffic,
                        want,
                        "tp {tp} pp {pp} world {world} rank {:?}",
                        (c.tp, c.dp, c.pp)
                    );
                    Ok((outs, t.shards(), (c.tp, c.dp, c.pp)))
                })
                .unwrap()
            };
            let one = run(1, 1, 1).remove(0);
            assert!(
                one.0.iter().all(|o| o.grad_norm > 1.0),
                "clipping active: {:?}",
                one.0
            );
            // Every tp ∈ {1, 2, 4} × pp ∈ {1, 2, 4} × dp ∈ {1, 2} (up to 32 ranks).
            let layouts = [1, 2, 4]
                .into_iter()
                .flat_map(|tp| [1, 2, 4].into_iter().map(move |pp| (tp, pp)))
                .flat_map(|(tp, pp)| [1, 2].into_iter().map(move |dp| (tp, pp, dp)))
                .filter(|&l| l != (1, 1, 1));
            for (tp, pp, dp) in layouts {
                for (outs, shards, (tr, _, _)) in run(tp, pp, tp * pp * dp) {
                    for (a, b) in outs.iter().zip(&one.0) {
                        assert!(
                            (a.loss - b.loss).abs() <= 1e-5 * b.loss,
                            "tp {tp} pp {pp} dp {dp} tied {tied}: loss {} vs {}",
                            a.loss,
                            b.loss
                        );
                        assert!(
                            (a.grad_norm - b.grad_norm).abs() <= 1e-5 * b.grad_norm,
                            "tp {tp} pp {pp} dp {dp}: norm {} vs {}",
                            a.grad_norm,
                            b.grad_norm
                        );
                    }
                    for (name, got) in &shards {
                        let full = &one.1.iter().find(|(n, _)| n == name).unwrap().1;
                        // (The key bias's slice left out: `compared_part`.)
                        let want = compared_part(name, &shard(name, full, tr, tp).unwrap());
                        let got = compared_part(name, got);
                        let d = max_abs(&(&got - &want).unwrap());
                        // Every weight within 1e-5 (the fused stages against
                        // one rank on autograd: 6.0e-6 at most here), and on
                        // average far closer.
                        let mean = (&got - &want)
                            .unwrap()
                            .abs()
                            .unwrap()
                            .mean_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap();
                        assert!(
                            d <= 1e-5 && mean <= 1e-7,
                            "tp {tp} pp {pp} dp {dp} tied {tied}: {name} off by {d} (max), {mean} (mean)"
                        );
                    }
                }
            }
        }
    }

    /// GPU ranks' path on CPU ranks: the split model on candle's autograd
    /// with a transport that sums, gathers and exchanges tensors itself (as
    /// NCCL does on the GPU), and the distributed optimizer's state on the
    /// device, trains tp 2 × pp 2 × dp 2 as the host path does, and its
    /// collectives are the ones used (each counted in the traffic).
    #[test]
    fn device_collectives_train_like_host_exchanges() {
        use std::sync::atomic::AtomicUsize;
        let cfg = crate::parallel::tiny_config(4);
        let model = GPT2LMHeadModel::new(&cfg, 17, &Device::Cpu).unwrap();
        let weights: Vec<(String, Tensor)> = model.named_tensors();
        let steps: Vec<Vec<Vec<Vec<u32>>>> = (0..3u32)
            .map(|s| {
                (0..4u32)
                    .map(|m| vec![(0..9).map(|j| (s * 29 + m * 13 + j * 5 + 2) % 64).collect()])
                    .collect()
            })
            .collect();
        let adam = AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        type Run = (Vec<StepOutput>, Vec<(String, Tensor)>, Traffic, [usize; 2]);
        let run = |on_device: bool| -> Vec<Run> {
            run_ranks(8, |_, comm| -> std::result::Result<Run, CommError> {
                let err = |e: candle_core::Error| CommError::Transport(e.to_string());
                let tensors = Arc::new(AtomicUsize::new(0));
                let exchanges = Arc::new(AtomicUsize::new(0));
                let comm: Arc<dyn Communicator> = match on_device {
                    true => Arc::new(crate::parallel::DeviceCollectives {
                        inner: comm,
                        tensors: tensors.clone(),
                        exchanges: exchanges.clone(),
                    }),
                    false => comm,
                };
                let mut t = ParallelTrainer::new(&cfg, &weights, comm, 2, 2, adam).map_err(err)?;
                t.stage.set_fused(false).map_err(err)?;
                if on_device {
                    // The distributed optimizer's state as a GPU rank keeps it.
                    t.optimizer
                        .place_state_on_device(&t.stage.model)
                        .map_err(err)?;
                }
                let outs = steps_of(&mut t, &steps).map_err(err)?;
                Ok((
                    outs,
                    t.shards(),
                    t.last_traffic,
                    [&tensors, &exchanges].map(|c| c.load(Ordering::Relaxed)),
                ))
            })
            .unwrap()
        };
        let (host, device) = (run(false), run(true));
        // The tensors each rank hands to the device collectives: per
        // micro-batch, forward, `g` after each block's attention and MLP,
        // the embedding's `g` on the first stage, the loss's gather of the
        // maxima and its two sums on the last; backward, `f`'s sum before
        // each block's attention and MLP and, on the last stage, before
        // ln_f. Per step, the tied embedding's two gradients summed, and the
        // distributed optimizer's reduce-scatter and all-gather over the 2
        // data-parallel replicas.
        let (blocks, micro_batches) = (4 / 2, 2 * steps.len());
        let per_micro_batch = |last: bool| match last {
            false => 1 + 2 * blocks + 2 * blocks,
            true => 2 * blocks + 3 + 2 * blocks + 1,
        };
        for (rank, (h, d)) in host.iter().zip(&device).enumerate() {
            assert_eq!(h.3, [0, 0]);
            // Megatron's order, tp-dp-pp: ranks 0–3 are the first stage.
            let want = per_micro_batch(rank >= 4) * micro_batches + 3 * steps.len();
            assert_eq!(d.3[0], want, "rank {rank}: tensors summed on the device");
            // 1F1B over 2 stages and 2 micro-batches: each stage's 3 sends
            // and receives per step (its neighbour's activations or their
            // gradients) are exchanges on the device.
            assert_eq!(d.3[1], 3 * steps.len(), "rank {rank}: exchanges");
            assert_eq!(h.2, d.2, "rank {rank}: the same payloads counted");
            for (a, b) in h.0.iter().zip(&d.0) {
                assert!((a.loss - b.loss).abs() <= 1e-6 * a.loss, "{a:?} vs {b:?}");
                assert!((a.grad_norm - b.grad_norm).abs() <= 1e-6 * a.grad_norm);
            }
            for ((name, a), (_, b)) in h.1.iter().zip(&d.1) {
                let diff = max_abs(&(a - b).unwrap());
                assert!(diff <= 1e-6, "rank {rank}: {name} off by {diff}");
            }
        }
    }
}
