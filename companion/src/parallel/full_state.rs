//! A 3D-parallel run's whole training state, in the whole model's flat
//! layout (the ZeRO engine's [`FlatState`]: every parameter end to end in
//! `named_parameters` order): gathered from the shards of every rank for a
//! checkpoint, and cut again for any tp × pp × dp when a run resumes. The
//! ZeRO engine reads and writes the same state, so a checkpoint moves
//! between layouts and ZeRO stages in one step (Megatron-Core's and
//! PyTorch DCP's resharding on load; DeepSpeed needs its universal-
//! checkpoint conversion for it, which is the layout a run here writes
//! under `--deepspeed`: `zero::ds_checkpoint::universal`).
//!
//! Which element of a shard is which element of the whole parameter is
//! found by cutting a tensor of positions with the same [`shard`] the
//! model's weights are cut with: one implementation of the cut.

use candle_core::{Device, Tensor};

use super::layout::{Coords, ParallelLayout};
use super::tensor::shard;
use super::three_d::ParallelTrainer;
use crate::config::GPT2Config;
use crate::params::Gpt2Params;
use crate::zero::FlatState;

type Result<T> = candle_core::Result<T>;

/// One parameter's shard on one rank: the positions of its elements in the
/// whole model's flat buffer, plus one (0: the vocabulary's padding), and
/// whether this rank is the one that speaks for them (a replicated
/// parameter on tensor rank 0 only; a tied embedding's copy on the last
/// stage never).
struct ShardPositions {
    positions: Vec<u32>,
    speaks: bool,
}

/// The shards of tensor rank `t` of pipeline stage `s`, in the order the
/// stage holds them (`named_parameters` order).
fn shard_positions(
    cfg: &GPT2Config,
    l: &ParallelLayout,
    t: usize,
    s: usize,
) -> Result<Vec<ShardPositions>> {
    let params = Gpt2Params::new(cfg);
    if params.numel() >= u32::MAX as usize {
        candle_core::bail!(
            "{} parameters: more than positions of 32 bits address",
            params.numel()
        );
    }
    let mut out = Vec::new();
    for (spec, range) in params.specs.iter().zip(params.ranges()) {
        if !super::stages::holds(&spec.name, cfg, l.pp, s) {
            continue;
        }
        let all = Tensor::arange(range.start as u32 + 1, range.end as u32 + 1, &Device::Cpu)?
            .reshape(spec.shape.as_slice())?;
        let positions = shard(&spec.name, &all, t, l.tp)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        let speaks = super::tensor::speaks_for(&spec.name, cfg, t, l.pp, s);
        out.push(ShardPositions { positions, speaks });
    }
    Ok(out)
}

/// Walk the elements of a rank's flat shard vector within `range` that the
/// rank speaks for (padding left out): `f(index in the shard vector,
/// position in the model)`.
fn spoken(
    shards: &[ShardPositions],
    range: std::ops::Range<usize>,
    mut f: impl FnMut(usize, usize),
) {
    let mut at = 0;
    for s in shards {
        let n = s.positions.len();
        if s.speaks {
            let lo = range.start.clamp(at, at + n);
            let hi = range.end.clamp(at, at + n);
            for i in lo..hi {
                if let Some(p) = (s.positions[i - at] as usize).checked_sub(1) {
                    f(i, p);
                }
            }
        }
        at += n;
    }
}

impl ParallelTrainer {
    /// The whole model's weights and Adam moments, on every rank: a
    /// collective over the world (each rank sends what it alone holds).
    pub fn gather_full_state(&self) -> Result<FlatState> {
        let full = self.gather_full_state_on(None)?;
        full.ok_or_else(|| candle_core::Error::Msg("gathered on no rank".into()))
    }

    /// [`Self::gather_full_state`] assembled only on world rank `root`
    /// (`None`: on every rank); the others take part and get `None` (a
    /// checkpoint, which rank 0 alone writes, spares them 12 bytes a
    /// parameter).
    pub fn gather_full_state_on(&self, root: Option<usize>) -> Result<Option<FlatState>> {
        let (cfg, l, me) = (
            &self.stage.model.config,
            self.groups.layout,
            self.groups.coords,
        );
        let numel = Gpt2Params::new(cfg).numel();
        // My weights (data-parallel rank 0 speaks for its replicas) and my
        // part of the moments.
        let mine = shard_positions(cfg, &l, me.tp, me.pp)?;
        let flat: Vec<f32> = self
            .shards()
            .iter()
            .map(|(_, t)| t.flatten_all()?.to_vec1::<f32>())
            .collect::<Result<Vec<_>>>()?
            .concat();
        let (part, (m, v)) = (self.optimizer.part_range(), self.optimizer.moments()?);
        let mut send = Vec::new();
        if me.dp == 0 {
            spoken(&mine, 0..flat.len(), |i, _| send.push(flat[i]));
        }
        let mut mv = (Vec::new(), Vec::new());
        spoken(&mine, part.clone(), |i, _| {
            mv.0.push(m[i - part.start]);
            mv.1.push(v[i - part.start]);
        });
        send.extend(mv.0);
        send.extend(mv.1);
        let all = self
            .world
            .exchange(send)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if root.is_some_and(|r| r != self.world.rank()) {
            return Ok(None);
        }
        let mut full = FlatState {
            fp32: vec![0.0; numel],
            m: vec![0.0; numel],
            v: vec![0.0; numel],
        };
        for (t, s) in (0..l.tp).flat_map(|t| (0..l.pp).map(move |s| (t, s))) {
            let theirs = shard_positions(cfg, &l, t, s)?;
            let len: usize = theirs.iter().map(|x| x.positions.len()).sum();
            let mut weights = Vec::new();
            spoken(&theirs, 0..len, |_, p| weights.push(p));
            for d in 0..l.dp {
                let rank = l.rank(Coords {
                    tp: t,
                    dp: d,
                    pp: s,
                });
                let got = &all[rank];
                let mut ps = Vec::new();
                spoken(&theirs, super::optimizer::part_of(len, l.dp, d), |_, p| {
                    ps.push(p)
                });
                // Data-parallel rank 0 sends the weights first.
                let at = if d == 0 { weights.len() } else { 0 };
                if got.len() != at + 2 * ps.len() {
                    candle_core::bail!(
                        "rank {rank} sent {} numbers, {} expected",
                        got.len(),
                        at + 2 * ps.len()
                    );
                }
                for (k, &p) in weights.iter().enumerate().take(at) {
                    full.fp32[p] = got[k];
                }
                for (k, &p) in ps.iter().enumerate() {
                    full.m[p] = got[at + k];
                    full.v[p] = got[at + ps.len() + k];
                }
            }
        }
        Ok(Some(full))
    }

    /// This rank's part of a run on `tp` × `pp` (× what is left of `world`)
    /// from a whole state (a checkpoint of any layout or ZeRO stage), Adam
    /// at step `adam_steps`, its shards on `device`. A collective over
    /// `world`.
    pub fn from_full_state(
        config: &GPT2Config,
        full: &FlatState,
        adam_steps: u64,
        world: std::sync::Arc<dyn crate::zero::comm::Communicator>,
        (tp, pp): (usize, usize),
        adam: crate::optim::adamw::AdamWParams,
        device: &Device,
    ) -> Result<Self> {
        let params = Gpt2Params::new(config);
        let numel = params.numel();
        if [full.fp32.len(), full.m.len(), full.v.len()] != [numel; 3] {
            candle_core::bail!(
                "the state holds {} weights and {}/{} moments, the model has {numel}",
                full.fp32.len(),
                full.m.len(),
                full.v.len()
            );
        }
        let weights = params
            .specs
            .iter()
            .zip(params.ranges())
            .map(|(s, r)| {
                Ok((
                    s.name.clone(),
                    Tensor::from_slice(&full.fp32[r], s.shape.as_slice(), device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        crate::zero::state::check_moments("the state", "its", &full.m, &full.v)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut me = Self::new(config, &weights, world, tp, pp, adam)?;
        let c = me.groups.coords;
        let shards = shard_positions(config, &me.groups.layout, c.tp, c.pp)?;
        let part = me.optimizer.part_range();
        let (mut m, mut v) = (vec![0f32; part.len()], vec![0f32; part.len()]);
        // Every element of the part, spoken for or not (a replica's copy
        // has the same moments as the one that speaks).
        let mut at = 0;
        for s in &shards {
            for (k, &p) in s.positions.iter().enumerate() {
                let i = at + k;
                if let (true, Some(p)) = (part.contains(&i), (p as usize).checked_sub(1)) {
                    m[i - part.start] = full.m[p];
                    v[i - part.start] = full.v[p];
                }
            }
            at += s.positions.len();
        }
        me.optimizer.set_moments(m, v, adam_steps)?;
        Ok(me)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GPT2LMHeadModel;
    use crate::optim::adamw::AdamWParams;
    use crate::zero::comm::{run_ranks, CommError};

    type Steps = Vec<Vec<Vec<Vec<u32>>>>;

    fn batches(n: u32) -> Steps {
        (0..n)
            .map(|s| {
                (0..4u32)
                    .map(|m| {
                        (0..2u32)
                            .map(|i| {
                                (0..9)
                                    .map(|j| (s * 31 + m * 13 + i * 7 + j * 5 + 3) % 63)
                                    .collect()
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    const ADAM: AdamWParams = AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };

    /// `steps` on `(tp, pp, world)` from `start` (a whole state and Adam's
    /// step): every rank's losses and the gathered state after them.
    fn run(
        cfg: &GPT2Config,
        start: &(FlatState, u64),
        (tp, pp, world): (usize, usize, usize),
        steps: &[Vec<Vec<Vec<u32>>>],
    ) -> Vec<(Vec<f64>, FlatState, u64)> {
        run_ranks(world, |_, comm| -> std::result::Result<_, CommError> {
            let err = |e: candle_core::Error| CommError::Transport(e.to_string());
            let mut t = ParallelTrainer::from_full_state(
                cfg,
                &start.0,
                start.1,
                comm,
                (tp, pp),
                ADAM,
                &Device::Cpu,
            )
            .map_err(err)?;
            let losses = steps
                .iter()
                .map(|mb| t.step(mb, 1e-3, 1.0).map(|o| o.loss))
                .collect::<Result<Vec<_>>>()
                .map_err(err)?;
            let full = t.gather_full_state().map_err(err)?;
            Ok((losses, full, t.optimizer.adam_steps))
        })
        .unwrap()
    }

    /// A new model's whole state, with moments that are not zero (to see
    /// them land where they belong).
    fn start_state(cfg: &GPT2Config) -> FlatState {
        let model = GPT2LMHeadModel::new(cfg, 5, &Device::Cpu).unwrap();
        let layout = crate::zero::FlatLayout::new(cfg, 1);
        let fp32 = crate::zero::layout::flatten_params(&model, &layout).unwrap();
        let n = fp32.len();
        let m: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 1e-4 - 4e-3).collect();
        let v: Vec<f32> = (0..n).map(|i| (i % 89) as f32 * 1e-6).collect();
        FlatState { fp32, m, v }
    }

    /// With the distributed optimizer's state on the device (as a GPU
    /// rank keeps it), gathering gives back exactly the state the ranks were
    /// cut from, and moments set again from the host land where they were.
    #[test]
    fn the_device_state_gathers_and_resumes_exactly() {
        let cfg = crate::parallel::tiny_config(2);
        let start = start_state(&cfg);
        let got = run_ranks(8, |_, comm| -> std::result::Result<_, CommError> {
            let err = |e: candle_core::Error| CommError::Transport(e.to_string());
            let mut t =
                ParallelTrainer::from_full_state(&cfg, &start, 7, comm, (2, 2), ADAM, &Device::Cpu)
                    .map_err(err)?;
            t.optimizer
                .place_state_on_device(&t.stage.model)
                .map_err(err)?;
            let first = t.gather_full_state().map_err(err)?;
            let (m, v) = t.optimizer.moments().map_err(err)?;
            let k = t.optimizer.part_range().len();
            let zero = vec![0f32; k];
            t.optimizer
                .set_moments(zero.clone(), zero, 7)
                .map_err(err)?;
            let cleared = t.gather_full_state().map_err(err)?;
            t.optimizer
                .set_moments(m[..k].to_vec(), v[..k].to_vec(), 7)
                .map_err(err)?;
            Ok((first, cleared, t.gather_full_state().map_err(err)?))
        })
        .unwrap();
        for (first, cleared, again) in got {
            assert_eq!(first, start);
            assert!(cleared.m.iter().all(|&x| x == 0.0) && cleared.fp32 == start.fp32);
            assert_eq!(again, start);
        }
    }

    /// Gathering gives back exactly the state a run started from, on every
    /// rank and layout; a run stopped after 3 steps on one layout and
    /// resumed from its gathered state on another gives the uninterrupted
    /// run's next 2 losses (1e-5 relative), tied and untied.
    #[test]
    fn a_run_resumes_on_another_layout() {
        let mut cfg = crate::parallel::tiny_config(4);
        // 63: tp 2 and 4 pad the vocabulary's last shard.
        cfg.vocab_size = 63;
        let steps = batches(5);
        for tied in [true, false] {
            cfg.tie_word_embeddings = tied;
            let start = (start_state(&cfg), 7);
            for layout in [(2, 2, 4), (1, 1, 2), (2, 1, 4), (1, 4, 4)] {
                for (_, full, steps_done) in run(&cfg, &start, layout, &[]) {
                    assert_eq!((full, steps_done), start.clone(), "{layout:?} tied {tied}");
                }
            }
            let whole = run(&cfg, &start, (2, 2, 4), &steps).remove(0);
            let first = run(&cfg, &start, (2, 2, 4), &steps[..3]).remove(0);
            for to in [(1, 1, 2), (4, 1, 4), (1, 2, 2)] {
                for (rest, _, adam_steps) in run(&cfg, &(first.1.clone(), first.2), to, &steps[3..])
                {
                    assert_eq!(adam_steps, 7 + 5);
                    for (a, b) in rest.iter().zip(&whole.0[3..]) {
                        assert!(
                            (a - b).abs() <= 1e-5 * b,
                            "to {to:?} tied {tied}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
