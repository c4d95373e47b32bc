//! GPT-2 split over a tensor-parallel group as Megatron-LM splits it
//! (Shoeybi et al. 2019): each rank holds `1/tp` of the heads of every
//! attention (`c_attn` by columns, head by head for q, k and v; `c_proj` by
//! rows), `1/tp` of every MLP (`c_fc` by columns, `c_proj` by rows) and
//! `1/tp` of the vocabulary (`wte`, and the head, tied or not); layer norms,
//! positions and the biases added after a row-parallel layer are
//! replicated. One all-reduce after each row-parallel layer in the forward
//! pass (`g`), one before each column-parallel layer in the backward pass
//! (`f`), and the vocabulary-parallel embedding and cross-entropy: the
//! logits are never gathered.
//!
//! Built on candle's autograd, from a whole model's weights (each rank
//! cuts its shards), fp32 on the device the weights are on: CPU ranks, or
//! GPUs whose group sums on the device (NCCL). Each block is the model's
//! own (`model::gpt2`'s `Block`, built over this rank's shards and heads)
//! with Megatron's `f` and `g` at its edges (`SplitEdges`); the embedding
//! and the loss are written here.

use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use super::collective_ops::{reduce_backward, reduce_forward, vocab_parallel_cross_entropy_sum};
use super::dropout::StageDropout;
use crate::config::GPT2Config;
use crate::model::autograd_ops::layer_norm;
use crate::model::gpt2::{build_block, BlockEdges};
use crate::model::GPT2LMHeadModel;
use crate::zero::comm::Communicator;

type Result<T> = candle_core::Result<T>;

/// How a parameter is cut over the tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The same on every rank.
    Replicated,
    /// The vocabulary's rows `[r·v, (r+1)·v)`, v = ⌈vocab/tp⌉, the last
    /// rank's padded with zero rows (Megatron pads the vocabulary too; the
    /// padding's logits are left out of the softmax, so it stays zero).
    Vocab,
    /// Rows `[r·n/tp, (r+1)·n/tp)` (a row-parallel layer).
    Rows,
    /// Columns likewise (a column-parallel layer's weight or bias).
    Columns,
    /// `c_attn`: q, k and v each cut by columns (this rank's heads).
    QkvColumns,
}

/// Megatron's cut for GPT-2's parameter `name`.
pub fn split_of(name: &str) -> Split {
    let ends = |s: &str| name.ends_with(s);
    if ends("wte.weight") || name == "lm_head.weight" {
        Split::Vocab
    } else if ends("attn.c_attn.weight") || ends("attn.c_attn.bias") {
        Split::QkvColumns
    } else if ends("mlp.c_fc.weight") || ends("mlp.c_fc.bias") {
        Split::Columns
    } else if ends("attn.c_proj.weight") || ends("mlp.c_proj.weight") {
        Split::Rows
    } else {
        Split::Replicated
    }
}

/// Vocabulary rows each of `tp` ranks holds (the last one's end in padding).
pub fn vocab_per_rank(vocab_size: usize, tp: usize) -> usize {
    vocab_size.div_ceil(tp)
}

/// Whether the shard of `name` on tensor rank `tp_rank` of stage `s` of
/// `pp` is the one that counts for the whole model (its norm, its saved
/// state): a replicated parameter on tensor rank 0 only, a tied
/// embedding's copy on the last stage never.
pub fn speaks_for(
    name: &str,
    cfg: &crate::config::GPT2Config,
    tp_rank: usize,
    pp: usize,
    s: usize,
) -> bool {
    let copy = cfg.tie_word_embeddings && pp > 1 && s + 1 == pp && name == "transformer.wte.weight";
    let replicated = split_of(name) == Split::Replicated;
    !copy && (!replicated || tp_rank == 0)
}

/// Rank `rank`'s shard of `full` (of parameter `name`) over `tp` ranks.
pub fn shard(name: &str, full: &Tensor, rank: usize, tp: usize) -> Result<Tensor> {
    let last = full.rank() - 1;
    let cut = |t: &Tensor, dim: usize| -> Result<Tensor> {
        let n = t.dim(dim)?;
        if !n.is_multiple_of(tp) {
            candle_core::bail!("{name}: {n} is not divisible by the tensor-parallel size {tp}");
        }
        t.narrow(dim, rank * n / tp, n / tp)
    };
    match split_of(name) {
        Split::Replicated => Ok(full.clone()),
        Split::Vocab => {
            let (vocab, width) = full.dims2()?;
            let per = vocab_per_rank(vocab, tp);
            let start = (rank * per).min(vocab);
            let real = per.min(vocab - start);
            if real == 0 {
                candle_core::bail!(
                    "{name}: a vocabulary of {vocab} leaves tensor rank {rank} of {tp} no rows"
                );
            }
            let rows = full.narrow(0, start, real)?;
            if real == per {
                return Ok(rows);
            }
            let pad = Tensor::zeros((per - real, width), full.dtype(), full.device())?;
            Tensor::cat(&[rows, pad], 0)
        }
        Split::Rows => cut(full, 0),
        Split::Columns => cut(full, last),
        Split::QkvColumns => {
            let third = full.dim(last)? / 3;
            let parts = (0..3)
                .map(|i| cut(&full.narrow(last, i * third, third)?, last))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, last)
        }
    }
}

/// Each position's target in HF's causal-LM loss: the next label (the
/// collator's, or the next id), -100 after a row's last position.
pub fn targets(rows: &[Vec<u32>], labels: Option<&[Vec<i64>]>) -> Result<Vec<i64>> {
    match labels {
        None => Ok(rows
            .iter()
            .flat_map(|r| r[1..].iter().map(|&i| i as i64).chain([-100]))
            .collect()),
        Some(l) => {
            if l.len() != rows.len() || l.iter().zip(rows).any(|(a, b)| a.len() != b.len()) {
                candle_core::bail!("labels of another shape than the input ids");
            }
            Ok(l.iter()
                .flat_map(|r| r[1..].iter().copied().chain([-100]))
                .collect())
        }
    }
}

/// A split block's edges: Megatron's `f` and `g` over the group, and the
/// whole model's dropout masks for this rank's `heads`.
struct SplitEdges<'a> {
    comm: &'a Arc<dyn Communicator>,
    dropout: Option<&'a StageDropout<'a>>,
    heads: std::ops::Range<usize>,
}

impl BlockEdges for SplitEdges<'_> {
    fn enter(&self, x: &Tensor) -> Result<Tensor> {
        reduce_backward(x, self.comm)
    }

    fn exit(&self, y: &Tensor) -> Result<Tensor> {
        reduce_forward(y, self.comm)
    }

    fn attention_dropout(&self, att: &Tensor, layer: usize) -> Result<Tensor> {
        match self.dropout {
            Some(d) => d.attention(att, layer, self.heads.clone()),
            None => Ok(att.clone()),
        }
    }

    fn residual_dropout(&self, y: &Tensor, layer: usize, mlp: bool) -> Result<Tensor> {
        match self.dropout {
            Some(d) => d.residual(y, layer, mlp),
            None => Ok(y.clone()),
        }
    }
}

/// GPT-2 over a tensor-parallel group: this rank's shards (trainable) and
/// the group.
pub struct TensorParallelGpt2 {
    pub config: GPT2Config,
    pub comm: Arc<dyn Communicator>,
    /// This rank's shard of every parameter its stage holds, by the whole
    /// parameter's name.
    pub shards: Vec<(String, Var)>,
    /// Which pipeline stage of how many this is (0 of 1: the whole model).
    pub stage: usize,
    pub stages: usize,
    /// The whole model's parameters (names and roles), for its blocks.
    pub(super) params: crate::params::Gpt2Params,
}

impl TensorParallelGpt2 {
    /// Cut this rank's shards from a whole model (every rank of `comm`
    /// holds the same one).
    pub fn from_model(model: &GPT2LMHeadModel, comm: Arc<dyn Communicator>) -> Result<Self> {
        let weights: Vec<(String, Tensor)> = model.named_tensors();
        Self::from_weights(&model.config, &weights, comm)
    }

    /// [`Self::from_model`] from the whole model's weights by name.
    pub fn from_weights(
        config: &GPT2Config,
        weights: &[(String, Tensor)],
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        Self::stage_from_weights(config, weights, comm, 0, 1)
    }

    /// Pipeline stage `stage` of `stages` (its blocks, the embeddings on the
    /// first, `ln_f` and the head on the last), split over the
    /// tensor-parallel group `comm`.
    pub fn stage_from_weights(
        config: &GPT2Config,
        weights: &[(String, Tensor)],
        comm: Arc<dyn Communicator>,
        stage: usize,
        stages: usize,
    ) -> Result<Self> {
        if stages == 0 || stage >= stages || !config.n_layer.is_multiple_of(stages) {
            candle_core::bail!(
                "stage {stage} of {stages}: n_layer {} must be divisible by the pipeline size",
                config.n_layer
            );
        }
        let (tp, rank) = (comm.world_size(), comm.rank());
        let c = config;
        if !c.n_head.is_multiple_of(tp) {
            candle_core::bail!(
                "n_head {} is not divisible by the tensor-parallel size {tp}",
                c.n_head
            );
        }
        let shards = weights
            .iter()
            .filter(|(n, _)| super::stages::holds(n, c, stages, stage))
            .map(|(n, t)| {
                let s = shard(n, &t.to_dtype(DType::F32)?, rank, tp)?;
                // A copy: the shards are trained in place, the caller's weights stay.
                Ok((n.clone(), Var::from_tensor(&s.detach().copy()?)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TensorParallelGpt2 {
            config: c.clone(),
            comm,
            shards,
            stage,
            stages,
            params: crate::params::Gpt2Params::new(c),
        })
    }

    /// Where this rank's shards live (every stage holds some).
    pub fn device(&self) -> Result<candle_core::Device> {
        match self.shards.first() {
            Some((_, v)) => Ok(v.device().clone()),
            None => candle_core::bail!(
                "stage {} of {} holds no parameters",
                self.stage,
                self.stages
            ),
        }
    }

    pub(super) fn get(&self, name: &str) -> Result<&Tensor> {
        self.shards
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg(format!("no parameter {name}")))
    }

    fn ln(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        layer_norm(
            x,
            self.get(&format!("{prefix}.weight"))?,
            self.get(&format!("{prefix}.bias"))?,
            self.config.layer_norm_epsilon,
        )
    }

    /// HF's causal-LM loss (shifted cross-entropy, the mean over predicted
    /// tokens) of equal-length rows, dropout off: the whole model's (one
    /// stage).
    pub fn loss(&self, rows: &[Vec<u32>]) -> Result<Tensor> {
        if self.stages != 1 {
            candle_core::bail!(
                "loss: a pipeline stage gives activations (one_forward_one_backward)"
            );
        }
        let (sum, count) = self.forward_stage(rows, None, None, None)?;
        sum / count.max(1) as f64
    }

    /// This stage's part of the forward pass over equal-length `rows`:
    /// token ids (first stage) or the previous stage's activations
    /// `[B·T, C]` in; activations out, or on the last stage the summed
    /// cross-entropy and the number of tokens it counts. `labels` are the
    /// collator's (-100: not counted; none: the ids), shifted as HF shifts
    /// them; rows padded on the right are exact (attention is causal).
    /// `dropout`: the micro-batch's freshly seeded generator (training), or
    /// none (no dropout: evaluation).
    pub fn forward_stage(
        &self,
        rows: &[Vec<u32>],
        labels: Option<&[Vec<i64>]>,
        input: Option<&Tensor>,
        dropout: Option<&crate::model::Dropout>,
    ) -> Result<(Tensor, usize)> {
        let c = &self.config;
        let (tp, rank) = (self.comm.world_size(), self.comm.rank());
        let (b, t) = (rows.len(), rows.first().map_or(0, Vec::len));
        if rows.iter().any(|r| r.len() != t) || t == 0 || t > c.n_positions {
            candle_core::bail!("rows of equal length between 1 and n_positions");
        }
        crate::cpu::inputs::check_token_ids(rows.iter().flatten().copied().max(), c.vocab_size)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let dev = self.device()?;
        let (width, heads) = (c.n_embd, c.n_head / tp);
        let vl = vocab_per_rank(c.vocab_size, tp);
        let off = rank * vl;
        // This rank's real vocabulary columns (the rest is padding).
        let real = vl.min(c.vocab_size.saturating_sub(off));
        let drop = dropout.map(|generator| super::dropout::StageDropout {
            generator,
            config: c,
            b,
            t,
        });
        let x = match input {
            Some(x) => x.clone(),
            None => {
                // Vocabulary-parallel embedding: the rows this rank holds, summed.
                let ids: Vec<u32> = rows.concat();
                let local: Vec<u32> = ids
                    .iter()
                    .map(|&i| {
                        (i as usize)
                            .checked_sub(off)
                            .filter(|&l| l < vl)
                            .unwrap_or(0) as u32
                    })
                    .collect();
                let mine: Vec<f32> = ids
                    .iter()
                    .map(|&i| ((off..off + vl).contains(&(i as usize))) as u8 as f32)
                    .collect();
                let emb = self
                    .get("transformer.wte.weight")?
                    .index_select(&Tensor::from_vec(local, b * t, &dev)?, 0)?
                    .broadcast_mul(&Tensor::from_vec(mine, (b * t, 1), &dev)?)?;
                let pos = Tensor::arange(0u32, t as u32, &dev)?;
                let wpe = self.get("transformer.wpe.weight")?.index_select(&pos, 0)?;
                let x = reduce_forward(&emb, &self.comm)?
                    .reshape((b, t, width))?
                    .broadcast_add(&wpe)?
                    .reshape((b * t, width))?;
                match &drop {
                    Some(d) => d.embeddings_out(&x)?,
                    None => x,
                }
            }
        };
        // The model's block over this rank's shards (its heads, its columns
        // of c_fc, its rows of both c_proj), the collectives at its edges.
        let edges = SplitEdges {
            comm: &self.comm,
            dropout: drop.as_ref(),
            heads: rank * heads..(rank + 1) * heads,
        };
        let params = &self.params;
        let mut x = x.reshape((b, t, width))?;
        for l in super::stages::stage_layers(c.n_layer, self.stages, self.stage) {
            let p = &params.blocks[l];
            let got = p
                .indices()
                .into_iter()
                .map(|i| Ok((i, self.get(params.name(i))?.clone())))
                .collect::<Result<std::collections::HashMap<_, _>>>()?;
            let block = build_block(c, l, heads, p, &|i| got[&i].clone());
            x = block.forward(&x, None, None, &edges)?;
        }
        let x = x.reshape((b * t, width))?;
        if self.stage + 1 < self.stages {
            return Ok((x, 0));
        }
        let x = reduce_backward(&self.ln(&x, "transformer.ln_f")?, &self.comm)?;
        let head = if c.tie_word_embeddings {
            self.get("transformer.wte.weight")?
        } else {
            self.get("lm_head.weight")?
        };
        let logits = x.matmul(&head.t()?)?;
        let logits = if real < vl {
            logits.narrow(1, 0, real)?
        } else {
            logits
        };
        let targets = targets(rows, labels)?;
        let count = targets.iter().filter(|&&x| x >= 0).count();
        let sum = vocab_parallel_cross_entropy_sum(&logits, targets, off, &self.comm)?;
        Ok((sum, count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zero::comm::{run_ranks, CommError};
    use candle_core::Device;

    /// The same loss and, cut the same way, the same gradients as the
    /// whole model on one rank, for tp = 1, 2, 4, tied and untied heads.
    #[test]
    fn tensor_parallel_loss_and_gradients_equal_one_rank() {
        let mut cfg = crate::parallel::tiny_config(2);
        let rows: Vec<Vec<u32>> = (0..3u32)
            .map(|i| (0..10).map(|j| (i * 17 + j * 5 + 1) % 64).collect())
            .collect();
        for tied in [true, false] {
            cfg.tie_word_embeddings = tied;
            let model = GPT2LMHeadModel::new(&cfg, 5, &Device::Cpu).unwrap();
            let ids = Tensor::new(rows.clone(), &Device::Cpu).unwrap();
            let labels = ids.to_dtype(DType::I64).unwrap();
            let want = model
                .forward_with_labels(&ids, None, &labels)
                .unwrap()
                .loss
                .unwrap();
            let grads = want.backward().unwrap();
            let want = want.to_scalar::<f32>().unwrap();
            let full: Vec<(String, Tensor, Tensor)> = model
                .named_parameters()
                .into_iter()
                .map(|(n, v)| {
                    let g = grads
                        .get(v.as_tensor())
                        .expect("every parameter has a gradient")
                        .clone();
                    (n, v.as_tensor().clone(), g)
                })
                .collect();
            let weights: Vec<(String, Tensor)> = full
                .iter()
                .map(|(n, w, _)| (n.clone(), w.clone()))
                .collect();
            for tp in [1, 2, 4] {
                let worst = run_ranks(tp, |rank, comm| -> std::result::Result<f32, CommError> {
                    let err = |e: candle_core::Error| CommError::Transport(e.to_string());
                    let m = TensorParallelGpt2::from_weights(&cfg, &weights, comm).map_err(err)?;
                    let loss = m.loss(&rows).map_err(err)?;
                    let got = loss.to_scalar::<f32>().map_err(err)?;
                    assert!((got - want).abs() <= 1e-5 * want, "tp {tp} rank {rank}: loss {got} vs {want}");
                    let g = loss.backward().map_err(err)?;
                    let mut worst = 0f32;
                    for (name, var) in &m.shards {
                        let (_, _, full_g) = full.iter().find(|(n, _, _)| n == name).unwrap();
                        let want_g = shard(name, full_g, rank, tp).map_err(err)?;
                        let got_g = g.get(var.as_tensor()).expect("a shard's gradient");
                        let scale = crate::parallel::max_abs(full_g);
                        let d = crate::parallel::max_abs(&(got_g - &want_g).unwrap()) / scale.max(1e-12);
                        assert!(d <= 1e-5, "tp {tp} rank {rank} tied {tied}: {name} gradient off by {d} (relative)");
                        worst = worst.max(d);
                    }
                    Ok(worst)
                })
                .unwrap();
                assert_eq!(worst.len(), tp);
            }
        }
    }
}
