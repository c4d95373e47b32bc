//! Pipeline parallelism: GPT-2's blocks cut into `pp` stages (the
//! embeddings with the first, `ln_f` and the head with the last), micro-
//! batches run in PipeDream-Flush's one-forward-one-backward order (1F1B,
//! as Megatron-LM's `forward_backward_pipelining_without_interleaving` and
//! DeepSpeed's `PipelineEngine` run them), activations sent to the next
//! stage and their gradients back. With tied embeddings the last stage
//! holds a copy of `wte` for the head, and the two copies' gradients are
//! summed after the last micro-batch (Megatron's embedding group), so they
//! stay equal.
//!
//! Each stage's forward and backward run on the fused CPU kernels
//! ([`FusedStage`]) when they compute the model (GPT-2's `gelu_new`), else
//! on candle's autograd through [`TensorParallelGpt2::forward_stage`]; the
//! stage may itself be split over a tensor-parallel group either way.
//!
//! Point to point: each pair of neighbouring stages is a 2-rank
//! sub-communicator; every Megatron send/receive call is one exchange on
//! it, carrying what each side sends (possibly nothing). Megatron's calls
//! on neighbouring stages pair up one to one, so the exchanges do too.
//! On GPU ranks (NCCL) the exchange stays on the device
//! (`Communicator::exchange_on_device`); other transports exchange host
//! memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor, Var};

use super::fused_stage::{FusedStage, MicroActs};
use super::tensor::TensorParallelGpt2;
use crate::config::GPT2Config;
use crate::zero::comm::Communicator;

type Result<T> = candle_core::Result<T>;

fn comm_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("pipeline: {e}"))
}

/// One stage of the pipeline: its part of the model (split over its
/// tensor-parallel group) and the links to its neighbours.
pub struct PipelineStage {
    pub model: TensorParallelGpt2,
    /// The fused kernels' view of the model (none: autograd).
    fused: Option<FusedStage>,
    prev: Option<Arc<dyn Communicator>>,
    next: Option<Arc<dyn Communicator>>,
    /// First and last stage, for the tied embedding's gradient.
    embedding: Option<Arc<dyn Communicator>>,
    /// Time spent waiting on the neighbours, this step.
    pub waited: Duration,
}

impl PipelineStage {
    /// This rank's stage of the pipeline group `pp`, split over `tp` (a
    /// collective over `pp`).
    pub fn new(
        config: &GPT2Config,
        weights: &[(String, Tensor)],
        tp: Arc<dyn Communicator>,
        pp: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let (n, s) = (pp.world_size(), pp.rank());
        let model = TensorParallelGpt2::stage_from_weights(config, weights, tp, s, n)?;
        // Pairs (0,1), (2,3), … then (1,2), (3,4), …: two splits.
        let pair = |first_even: bool| -> Result<Option<Arc<dyn Communicator>>> {
            // The pair's first stage: even in the first split, odd in the second.
            let base = match (first_even, s % 2) {
                (true, _) => Some(s - s % 2),
                (false, 1) => Some(s),
                (false, _) => s.checked_sub(1),
            };
            let in_pair = base.is_some_and(|b| b + 1 < n);
            let color = match base {
                Some(b) if in_pair => b,
                _ => n + s,
            };
            let c = pp.split(color).map_err(comm_err)?;
            Ok(in_pair.then_some(c))
        };
        let even = pair(true)?;
        let odd = pair(false)?;
        let (prev, next) = if s % 2 == 0 { (odd, even) } else { (even, odd) };
        let tied = config.tie_word_embeddings && n > 1;
        let ends = tied && (s == 0 || s + 1 == n);
        let emb = pp.split(if ends { 0 } else { 1 + s }).map_err(comm_err)?;
        Ok(PipelineStage {
            fused: FusedStage::new(&model)?,
            model,
            prev: (s > 0).then_some(prev).flatten(),
            next: (s + 1 < n).then_some(next).flatten(),
            embedding: ends.then_some(emb),
            waited: Duration::ZERO,
        })
    }

    /// Run on candle's autograd instead of the fused kernels (`false`), or
    /// back on them where they compute the model.
    pub fn set_fused(&mut self, on: bool) -> Result<()> {
        self.fused = if on {
            FusedStage::new(&self.model)?
        } else {
            None
        };
        Ok(())
    }

    /// Whether this stage runs on the fused CPU kernels.
    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    /// One exchange with a neighbour: send `out` (or nothing), take theirs.
    fn swap(&mut self, to_next: bool, out: Option<&Tensor>) -> Result<Option<Tensor>> {
        let link = if to_next { &self.next } else { &self.prev };
        let link = link
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("no neighbour".into()))?;
        let start = Instant::now();
        let other = 1 - link.rank();
        let theirs = match link.exchange_on_device(out) {
            Some(all) => all.map_err(comm_err)?.swap_remove(other),
            None => {
                let send = match out {
                    Some(t) => t.flatten_all()?.to_vec1::<f32>()?,
                    None => vec![],
                };
                let all = link.exchange(send).map_err(comm_err)?;
                let theirs = &all[other];
                (!theirs.is_empty())
                    .then(|| Tensor::from_slice(theirs, theirs.len(), &self.model.device()?))
                    .transpose()?
            }
        };
        self.waited += start.elapsed();
        let width = self.model.config.n_embd;
        theirs
            .map(|t| t.reshape((t.elem_count() / width, width)))
            .transpose()
    }
}

/// A micro-batch between its forward and its backward.
enum InFlight {
    /// candle's graph: the input as a variable (none on the first stage), the output.
    Autograd(Option<Var>, Tensor),
    /// The fused kernels' activations.
    Fused(Box<MicroActs>),
}

/// What a pipeline step gives back (default: a step with no micro-batches).
#[derive(Default)]
pub struct PipelineStep {
    /// The loss summed over the micro-batches' tokens, over the
    /// denominator (last stage; 0 elsewhere).
    pub loss: f64,
    /// Gradients of this stage's parameters, by name (summed over the
    /// micro-batches, of the loss as `loss` counts it).
    pub grads: HashMap<String, Tensor>,
    /// The share of the step this stage spent in exchanges with its
    /// neighbours (waiting for them, the bubble, and the transfers).
    pub bubble: f64,
    /// The most bytes of stage inputs and outputs kept at once between a
    /// micro-batch's forward and its backward (1F1B keeps at most pp − s
    /// micro-batches in flight on stage s).
    pub activations_held: usize,
}

/// The forward pass alone over one batch (evaluation): activations handed
/// down the stages; the last stage gives the summed loss and its token count.
pub fn forward_only(
    st: &mut PipelineStage,
    rows: &[Vec<u32>],
    labels: Option<&[Vec<i64>]>,
) -> Result<Option<(f64, usize)>> {
    let (s, n) = (st.model.stage, st.model.stages);
    let input = if s > 0 { st.swap(false, None)? } else { None };
    let (out, count) = st.model.forward_stage(rows, labels, input.as_ref(), None)?;
    if s + 1 < n {
        st.swap(true, Some(&out))?;
        return Ok(None);
    }
    Ok(Some((out.to_scalar::<f32>()? as f64, count)))
}

/// The tokens the loss counts in `micro_batches` (with `labels`).
pub fn count_targets(
    micro_batches: &[Vec<Vec<u32>>],
    labels: Option<&[Vec<Vec<i64>>]>,
) -> Result<usize> {
    let mut n = 0;
    for (k, mb) in micro_batches.iter().enumerate() {
        let t = super::tensor::targets(mb, labels.map(|l| l[k].as_slice()))?;
        n += t.iter().filter(|&&x| x >= 0).count();
    }
    Ok(n)
}

/// What goes with each micro-batch of a step besides its token ids.
#[derive(Debug, Clone, Copy, Default)]
pub struct MicroExtras<'a> {
    /// The collator's labels (none: the ids).
    pub labels: Option<&'a [Vec<Vec<i64>>]>,
    /// The dropout generator's seed (the Trainer's per micro-batch); needed
    /// when the model has dropout.
    pub dropout_seeds: Option<&'a [u64]>,
}

/// One training step's forward and backward passes over `micro_batches`
/// (each of equal-length rows) in 1F1B order, with their `extras`, of the
/// loss summed over their tokens and divided by `denominator` (none: their
/// own token count; data parallelism gives the whole batch's). Every stage
/// of the pipeline calls it with the same micro-batches.
pub fn one_forward_one_backward(
    st: &mut PipelineStage,
    micro_batches: &[Vec<Vec<u32>>],
    extras: MicroExtras,
    denominator: Option<usize>,
) -> Result<PipelineStep> {
    let labels = extras.labels;
    let m = micro_batches.len();
    if m == 0 {
        candle_core::bail!("a pipeline step needs at least one micro-batch");
    }
    let (s, n) = (st.model.stage, st.model.stages);
    let last = s + 1 == n;
    if labels.is_some_and(|l| l.len() != m) || extras.dropout_seeds.is_some_and(|d| d.len() != m) {
        candle_core::bail!("labels or dropout seeds for another number of micro-batches");
    }
    let c = &st.model.config;
    if extras.dropout_seeds.is_none()
        && (c.attn_pdrop > 0.0 || c.resid_pdrop > 0.0 || c.embd_pdrop > 0.0)
    {
        candle_core::bail!(
            "dropout ({}, {}, {}) needs each micro-batch's dropout seed (MicroExtras::dropout_seeds)",
            c.attn_pdrop,
            c.resid_pdrop,
            c.embd_pdrop
        );
    }
    let label = |k: usize| labels.map(|l| l[k].as_slice());
    let tokens = match denominator {
        Some(d) => d,
        None => count_targets(micro_batches, labels)?,
    };
    let started = Instant::now();
    st.waited = Duration::ZERO;
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    let mut flat = st.fused.as_ref().map(FusedStage::zero_grads);
    let mut loss_sum = 0f64;
    // In flight: each micro-batch's saved state and the elements it holds.
    let mut in_flight: std::collections::VecDeque<(InFlight, usize)> = Default::default();
    let mut received: Option<Tensor> = None;
    let bytes = |f: &std::collections::VecDeque<(InFlight, usize)>| -> usize {
        f.iter().map(|(_, n)| n * 4).sum()
    };
    let mut held = 0;
    let warmup = (n - s - 1).min(m);
    let remaining = m - warmup;
    let mut fwd = 0;
    // One micro-batch forward: what it keeps, the elements it holds, and
    // the output to send on (the loss on the last stage).
    let run_forward = |st: &mut PipelineStage,
                       input: Option<Tensor>,
                       k: usize,
                       loss_sum: &mut f64|
     -> Result<(InFlight, usize, Tensor)> {
        let dropout = extras
            .dropout_seeds
            .map(|d| crate::model::Dropout::new(d[k]));
        if let Some(f) = &st.fused {
            let mut acts = Box::<MicroActs>::default();
            let x = input
                .map(|t| t.flatten_all()?.to_vec1::<f32>())
                .transpose()?;
            let (out, sum, _) = f.forward(
                &st.model,
                &micro_batches[k],
                label(k),
                x.as_deref(),
                dropout.as_ref(),
                &mut acts,
            )?;
            *loss_sum += sum;
            let n_held = acts.held(s == 0, last, st.model.config.n_embd);
            let out = match last {
                true => Tensor::new(sum as f32, &Device::Cpu)?,
                false => Tensor::from_vec(
                    out,
                    (acts.shape.0 * acts.shape.1, st.model.config.n_embd),
                    &Device::Cpu,
                )?,
            };
            return Ok((InFlight::Fused(acts), n_held, out));
        }
        let var = input.map(|t| Var::from_tensor(&t)).transpose()?;
        let (out, _) = st.model.forward_stage(
            &micro_batches[k],
            label(k),
            var.as_ref().map(|v| v.as_tensor()),
            dropout.as_ref(),
        )?;
        if last {
            *loss_sum += out.to_scalar::<f32>()? as f64;
        }
        let n_held = var.as_ref().map_or(0, |v| v.elem_count()) + out.elem_count();
        Ok((InFlight::Autograd(var, out.clone()), n_held, out))
    };
    let run_backward = |st: &PipelineStage,
                        saved: InFlight,
                        grad_out: Option<Tensor>,
                        grads: &mut HashMap<String, Tensor>,
                        flat: &mut Option<Vec<f32>>|
     -> Result<Option<Tensor>> {
        let (var, out) = match saved {
            InFlight::Fused(acts) => {
                let f = st
                    .fused
                    .as_ref()
                    .expect("a fused stage keeps fused micro-batches");
                let go = grad_out
                    .map(|t| t.flatten_all()?.to_vec1::<f32>())
                    .transpose()?;
                if go.is_none() && !last {
                    candle_core::bail!("stage {s}: the next stage sent no gradient back");
                }
                let buf = flat.as_mut().expect("a fused stage's gradient buffer");
                let grad_in = f.backward(&st.model, &acts, go.as_deref(), tokens, buf)?;
                let width = st.model.config.n_embd;
                return grad_in
                    .map(|g| {
                        Tensor::from_vec(g, (acts.shape.0 * acts.shape.1, width), &Device::Cpu)
                    })
                    .transpose();
            }
            InFlight::Autograd(var, out) => (var, out),
        };
        // The mean over all the step's tokens: each micro-batch's sum / total.
        let objective = match grad_out {
            None if last => (out / tokens as f64)?,
            None => candle_core::bail!("stage {s}: the next stage sent no gradient back"),
            Some(g) => (out * g)?.sum_all()?,
        };
        let g = objective.backward()?;
        for (name, v) in &st.model.shards {
            if let Some(d) = g.get(v.as_tensor()) {
                let e = grads.remove(name);
                grads.insert(
                    name.clone(),
                    match e {
                        Some(acc) => (acc + d)?,
                        None => d.clone(),
                    },
                );
            }
        }
        Ok(var.and_then(|v| g.get(v.as_tensor()).cloned()))
    };
    // Warm-up: forwards only.
    for _ in 0..warmup {
        let input = if s > 0 { st.swap(false, None)? } else { None };
        let (saved, n_held, out) = run_forward(st, input, fwd, &mut loss_sum)?;
        fwd += 1;
        st.swap(true, Some(&out))?;
        in_flight.push_back((saved, n_held));
        held = held.max(bytes(&in_flight));
    }
    if remaining > 0 && s > 0 {
        received = st.swap(false, None)?;
    }
    // Steady state: one forward, one backward.
    for i in 0..remaining {
        let (saved, n_held, out) = run_forward(st, received.take(), fwd, &mut loss_sum)?;
        fwd += 1;
        let grad_out = if last {
            None
        } else {
            st.swap(true, Some(&out))?
        };
        in_flight.push_back((saved, n_held));
        held = held.max(bytes(&in_flight));
        let (oldest, _) = in_flight.pop_front().expect("a micro-batch in flight");
        let grad_in = run_backward(st, oldest, grad_out, &mut grads, &mut flat)?;
        if s > 0 {
            if i + 1 == remaining {
                st.swap(false, grad_in.as_ref())?;
            } else {
                received = st.swap(false, grad_in.as_ref())?;
            }
        }
    }
    // Cool-down: the backwards still owed.
    for _ in 0..warmup {
        let grad_out = st.swap(true, None)?;
        let (oldest, _) = in_flight.pop_front().expect("a micro-batch in flight");
        let grad_in = run_backward(st, oldest, grad_out, &mut grads, &mut flat)?;
        if s > 0 {
            st.swap(false, grad_in.as_ref())?;
        }
    }
    // The fused stage's flat gradients, by shard name.
    if let (Some(f), Some(buf)) = (&st.fused, flat) {
        for ((name, v), r) in st.model.shards.iter().zip(&f.ranges) {
            let g = Tensor::from_slice(&buf[r.clone()], v.shape(), &Device::Cpu)?;
            grads.insert(name.clone(), g);
        }
    }
    // The tied embedding's two copies get the sum of their gradients.
    if let Some(e) = &st.embedding {
        let name = "transformer.wte.weight";
        let g = grads
            .get(name)
            .cloned()
            .unwrap_or(st.model.get(name)?.zeros_like()?);
        let g = super::collective_ops::all_reduce(&g.contiguous()?, e.as_ref())?;
        grads.insert(name.into(), g);
    }
    let total = started.elapsed().as_secs_f64().max(1e-9);
    Ok(PipelineStep {
        loss: if last { loss_sum / tokens as f64 } else { 0.0 },
        grads,
        bubble: st.waited.as_secs_f64() / total,
        activations_held: held,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GPT2LMHeadModel;
    use crate::zero::comm::{run_ranks, CommError};
    use candle_core::DType;

    /// pp = 2 and 4 stages, 1 to 4 micro-batches in 1F1B order: the loss of
    /// the whole batch and every parameter's gradient equal the whole
    /// model's on one rank over the same rows as one batch (1e-5), tied and
    /// untied.
    #[test]
    fn a_pipeline_of_micro_batches_equals_one_large_batch() {
        let mut cfg = crate::parallel::tiny_config(4);
        let rows: Vec<Vec<u32>> = (0..8u32)
            .map(|i| (0..10).map(|j| (i * 13 + j * 7 + 2) % 64).collect())
            .collect();

        for tied in [true, false] {
            cfg.tie_word_embeddings = tied;
            let model = GPT2LMHeadModel::new(&cfg, 11, &Device::Cpu).unwrap();
            let ids = Tensor::new(rows.clone(), &Device::Cpu).unwrap();
            let labels = ids.to_dtype(DType::I64).unwrap();
            let loss = model
                .forward_with_labels(&ids, None, &labels)
                .unwrap()
                .loss
                .unwrap();
            let g = loss.backward().unwrap();
            let want = loss.to_scalar::<f32>().unwrap() as f64;
            let full: Vec<(String, Tensor, Tensor)> = model
                .named_parameters()
                .into_iter()
                .map(|(n, v)| {
                    let d = g.get(v.as_tensor()).unwrap().clone();
                    (n, v.as_tensor().clone(), d)
                })
                .collect();
            let weights: Vec<(String, Tensor)> = full
                .iter()
                .map(|(n, w, _)| (n.clone(), w.clone()))
                .collect();
            // 4 micro-batches, and fewer than the warm-up would take (1F1B
            // clamps it to the micro-batches there are).
            for (pp, m) in [(2, 4), (4, 4), (2, 1), (4, 1), (4, 2), (4, 3)] {
                let micro: Vec<Vec<Vec<u32>>> = rows
                    .chunks(rows.len().div_ceil(m))
                    .map(|c| c.to_vec())
                    .collect();
                // On the fused kernels, and on candle's autograd.
                let out = run_ranks(2 * pp, |rank, comm| -> std::result::Result<_, CommError> {
                    let err = |e: candle_core::Error| CommError::Transport(e.to_string());
                    let one: Arc<dyn Communicator> = Arc::new(crate::zero::comm::SingleRank);
                    let pipe = comm.split(rank / pp)?;
                    let mut st = PipelineStage::new(&cfg, &weights, one, pipe).map_err(err)?;
                    assert!(st.is_fused());
                    st.set_fused(rank < pp).map_err(err)?;
                    let step = one_forward_one_backward(&mut st, &micro, Default::default(), None)
                        .map_err(err)?;
                    Ok((st.model.stage, step.loss, step.grads))
                })
                .unwrap();
                let mut seen = std::collections::HashSet::new();
                for (stage, got_loss, grads) in out {
                    if stage + 1 == pp {
                        assert!(
                            (got_loss - want).abs() <= 1e-5 * want,
                            "pp {pp}: loss {got_loss} vs {want}"
                        );
                    }
                    for (name, got) in &grads {
                        let (_, _, want_g) = full.iter().find(|(n, _, _)| n == name).unwrap();
                        let scale = crate::parallel::max_abs(want_g);
                        let d = crate::parallel::max_abs(&(got - want_g).unwrap());
                        assert!(
                            d <= 1e-5 * scale.max(1e-6),
                            "pp {pp} stage {stage} tied {tied}: {name} off by {d}"
                        );
                        seen.insert(name.clone());
                    }
                }
                assert_eq!(
                    seen.len(),
                    full.len(),
                    "pp {pp}: every parameter has a gradient on some stage"
                );
            }
        }
    }
}
