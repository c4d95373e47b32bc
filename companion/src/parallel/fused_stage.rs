//! A pipeline stage split over a tensor-parallel group, on the fused CPU
//! kernels: the math of [`TensorParallelGpt2::forward_stage`] and its
//! backward written out over slices with `cpu`'s layers, attention and
//! matrix products (as `cpu::train_step` writes the whole model), the
//! collectives between the pieces. Each micro-batch in flight keeps its own
//! activations ([`MicroActs`]); a step's gradients go into one flat buffer
//! in the order of the stage's shards.
//!
//! Megatron's conjugate pair: after each row-parallel product the partial
//! sums are all-reduced (forward), and before each layer norm that feeds a
//! column-parallel product the partial input gradients are (backward). The
//! vocabulary-parallel embedding sums each rank's rows; the
//! vocabulary-parallel cross-entropy gathers each row's maxima and sums its
//! exponentials and target logits over the group.

use std::ops::Range;

use candle_core::{CpuStorage, Storage};

use super::collective_ops::vocab_parallel_forward;
use super::dropout::StageDropout;
use super::tensor::{targets, vocab_per_rank, TensorParallelGpt2};
use crate::cpu::block::{BlockMask, BlockRun};
use crate::cpu::gemm::matmul;
use crate::cpu::layers::layer_norm;
use crate::cpu::workspace::{zeroed, LayerActs};
use crate::params::{Affine, BlockParams};

type Result<T> = candle_core::Result<T>;

pub(super) fn comm_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("tensor-parallel collective: {e}"))
}

/// The stage's shards by role (indices into `TensorParallelGpt2::shards`).
pub struct FusedStage {
    pub(super) wte: Option<usize>,
    pub(super) wpe: Option<usize>,
    /// Each block's index in the whole model, and its shards.
    pub(super) blocks: Vec<(usize, BlockParams)>,
    pub(super) ln_f: Option<Affine>,
    pub(super) head: Option<usize>,
    /// Each shard's range in the flat gradient buffer.
    pub ranges: Vec<Range<usize>>,
}

/// One micro-batch's activations, from its forward to its backward.
#[derive(Default)]
pub struct MicroActs {
    pub(super) ids: Vec<u32>,
    /// The residual stream entering each of the stage's blocks, and leaving the last.
    pub(super) res: Vec<Vec<f32>>,
    pub(super) layers: Vec<LayerActs>,
    pub(super) emb_mask: Vec<f32>,
    pub(super) lnf: Vec<f32>,
    pub(super) lnf_mean: Vec<f32>,
    pub(super) lnf_rstd: Vec<f32>,
    /// This rank's logits `[B·T, V/tp]`, and per row the maximum and the
    /// sum of exponentials over the whole vocabulary.
    pub(super) logits: Vec<f32>,
    pub(super) max: Vec<f32>,
    pub(super) sumexp: Vec<f32>,
    pub(super) targets: Vec<i64>,
    /// Rows and tokens per row.
    pub(super) shape: (usize, usize),
    pub(super) dropout: bool,
}

impl MicroActs {
    /// The stage input and output it holds, in elements (as the autograd
    /// path counts them: the input received, the output sent or the loss).
    pub fn held(&self, first: bool, last: bool, width: usize) -> usize {
        let bt = self.shape.0 * self.shape.1;
        (if first { 0 } else { bt * width }) + if last { 1 } else { bt * width }
    }
}

/// Read-only slices of the stage's shards (their storage locked meanwhile).
pub(super) fn with_weights<R>(
    m: &TensorParallelGpt2,
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = m
        .shards
        .iter()
        .map(|(_, v)| v.as_tensor().storage_and_layout())
        .collect();
    let mut w = Vec::with_capacity(guards.len());
    for (g, l) in &guards {
        let Storage::Cpu(CpuStorage::F32(v)) = &**g else {
            candle_core::bail!("the fused stage takes fp32 shards on the CPU");
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("the fused stage takes contiguous shards");
        };
        w.push(&v[a..b]);
    }
    f(&w)
}

impl FusedStage {
    /// The roles of `m`'s shards, or `None` when the fused kernels do not
    /// compute this model (an activation other than `gelu_new`).
    pub fn new(m: &TensorParallelGpt2) -> Result<Option<Self>> {
        if !crate::cpu::supports(&m.config) || !m.device()?.is_cpu() {
            return Ok(None);
        }
        let find = |name: &str| -> Result<usize> {
            m.shards
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| candle_core::Error::Msg(format!("no shard {name}")))
        };
        let affine = |p: &str| -> Result<Affine> {
            Ok(Affine {
                weight: find(&format!("{p}.weight"))?,
                bias: find(&format!("{p}.bias"))?,
            })
        };
        let (first, last) = (m.stage == 0, m.stage + 1 == m.stages);
        let blocks = super::stages::stage_layers(m.config.n_layer, m.stages, m.stage)
            .map(|l| {
                let p = format!("transformer.h.{l}");
                let params = BlockParams {
                    ln_1: affine(&format!("{p}.ln_1"))?,
                    c_attn: affine(&format!("{p}.attn.c_attn"))?,
                    attn_c_proj: affine(&format!("{p}.attn.c_proj"))?,
                    ln_2: affine(&format!("{p}.ln_2"))?,
                    c_fc: affine(&format!("{p}.mlp.c_fc"))?,
                    mlp_c_proj: affine(&format!("{p}.mlp.c_proj"))?,
                };
                Ok((l, params))
            })
            .collect::<Result<Vec<_>>>()?;
        let head_name = if m.config.tie_word_embeddings {
            "transformer.wte.weight"
        } else {
            "lm_head.weight"
        };
        let mut at = 0;
        let ranges = m
            .shards
            .iter()
            .map(|(_, v)| {
                at += v.elem_count();
                at - v.elem_count()..at
            })
            .collect();
        Ok(Some(FusedStage {
            wte: first.then(|| find("transformer.wte.weight")).transpose()?,
            wpe: first.then(|| find("transformer.wpe.weight")).transpose()?,
            blocks,
            ln_f: last.then(|| affine("transformer.ln_f")).transpose()?,
            head: last.then(|| find(head_name)).transpose()?,
            ranges,
        }))
    }

    /// A zeroed gradient buffer for the stage's shards.
    pub fn zero_grads(&self) -> Vec<f32> {
        vec![0.0; self.ranges.last().map_or(0, |r| r.end)]
    }

    /// The forward pass of one micro-batch (equal-length `rows`): the stage
    /// input (the previous stage's output; none on the first) in, the
    /// output `[B·T, C]` out, or on the last stage the summed cross-entropy
    /// and the tokens it counts. `dropout`: the micro-batch's generator.
    pub fn forward(
        &self,
        m: &TensorParallelGpt2,
        rows: &[Vec<u32>],
        labels: Option<&[Vec<i64>]>,
        input: Option<&[f32]>,
        dropout: Option<&crate::model::Dropout>,
        acts: &mut MicroActs,
    ) -> Result<(Vec<f32>, f64, usize)> {
        let c = &m.config;
        let (b, t) = (rows.len(), rows.first().map_or(0, Vec::len));
        if rows.iter().any(|r| r.len() != t) || t == 0 || t > c.n_positions {
            candle_core::bail!("rows of equal length between 1 and n_positions");
        }
        crate::cpu::inputs::check_token_ids(rows.iter().flatten().copied().max(), c.vocab_size)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (width, bt) = (c.n_embd, b * t);
        let drop = dropout.map(|generator| StageDropout {
            generator,
            config: c,
            b,
            t,
        });
        let on = |p: f64| drop.is_some() && p > 0.0;
        acts.shape = (b, t);
        acts.dropout = drop.is_some();
        acts.ids = rows.concat();
        acts.res.resize_with(self.blocks.len() + 1, Vec::new);
        acts.layers
            .resize_with(self.blocks.len(), LayerActs::default);
        with_weights(m, |w| {
            // The stage input: the embeddings on the first stage.
            match (input, self.wte, self.wpe) {
                (Some(x), _, _) if x.len() == bt * width => acts.res[0] = x.to_vec(),
                (None, Some(wte), Some(wpe)) => {
                    let x = self.embed(m, &acts.ids, (w[wte], w[wpe]), t)?;
                    acts.res[0] = x;
                    zeroed(
                        &mut acts.emb_mask,
                        if on(c.embd_pdrop) { bt * width } else { 0 },
                    );
                    if let Some(d) = drop.as_ref().filter(|_| on(c.embd_pdrop)) {
                        d.fill_embeddings(&mut acts.emb_mask);
                        let x = &mut acts.res[0];
                        x.iter_mut().zip(&acts.emb_mask).for_each(|(x, m)| *x *= m);
                    }
                }
                _ => candle_core::bail!("stage {}: an input of {bt}×{width} expected", m.stage),
            }
            let heads = c.n_head / m.comm.world_size();
            let mine = m.comm.rank() * heads..(m.comm.rank() + 1) * heads;
            let mut tmp = vec![0f32; bt * width];
            let mut reduce = |y: &mut [f32]| m.comm.all_reduce_sum(y).map_err(comm_err);
            for (li, blk) in self.blocks.iter().enumerate() {
                let run = Self::block_run(m, w, blk, (b, t), drop.is_some());
                let dims = (run.c, run.cl, run.heads, run.inner);
                acts.layers[li].size((b, t), dims, (run.p_att > 0.0, run.p_res > 0.0));
                let mut draw = |k: BlockMask, out: &mut [f32]| {
                    if let Some(d) = &drop {
                        match k {
                            BlockMask::Attention => d.fill_attention(out, blk.0, mine.clone()),
                            BlockMask::AttentionOut => d.fill_residual(out, blk.0, false),
                            BlockMask::MlpOut => d.fill_residual(out, blk.0, true),
                        }
                    }
                };
                zeroed(&mut acts.res[li + 1], bt * width);
                let (head, rest) = acts.res.split_at_mut(li + 1);
                let a = &mut acts.layers[li];
                run.forward(a, &head[li], &mut rest[0], &mut tmp, &mut draw, &mut reduce)?;
            }
            let out = &acts.res[self.blocks.len()];
            let (Some(ln_f), Some(head)) = (self.ln_f, self.head) else {
                return Ok((out.clone(), 0.0, 0));
            };
            let eps = c.layer_norm_epsilon as f32;
            zeroed(&mut acts.lnf, bt * width);
            zeroed(&mut acts.lnf_mean, bt);
            zeroed(&mut acts.lnf_rstd, bt);
            layer_norm(
                out,
                w[ln_f.weight],
                w[ln_f.bias],
                eps,
                &mut acts.lnf,
                &mut acts.lnf_mean,
                &mut acts.lnf_rstd,
            );
            let (vl, _, _) = vocab_slice(m);
            zeroed(&mut acts.logits, bt * vl);
            matmul(
                &mut acts.logits,
                (&acts.lnf, width, 1),
                (w[head], 1, width),
                bt,
                vl,
                width,
                false,
            );
            acts.targets = targets(rows, labels)?;
            let (sum, count) = self.cross_entropy(m, acts)?;
            Ok((Vec::new(), sum, count))
        })
    }

    /// The vocabulary-parallel embedding `[B·T, C]`: this rank's rows of
    /// `wte` summed over the group, plus the positions.
    fn embed(
        &self,
        m: &TensorParallelGpt2,
        ids: &[u32],
        (wte, wpe): (&[f32], &[f32]),
        t: usize,
    ) -> Result<Vec<f32>> {
        let c = m.config.n_embd;
        let (vl, off, _) = vocab_slice(m);
        let mut x = vec![0f32; ids.len() * c];
        for (row, &id) in x.chunks_mut(c).zip(ids) {
            if let Some(l) = (id as usize).checked_sub(off).filter(|&l| l < vl) {
                row.copy_from_slice(&wte[l * c..(l + 1) * c]);
            }
        }
        m.comm.all_reduce_sum(&mut x).map_err(comm_err)?;
        for (r, row) in x.chunks_mut(c).enumerate() {
            let p = r % t;
            row.iter_mut()
                .zip(&wpe[p * c..(p + 1) * c])
                .for_each(|(x, e)| *x += e);
        }
        Ok(x)
    }

    /// Block `blk` on this rank's heads and MLP columns (`cpu::block`), for
    /// a micro-batch of `(b, t)` tokens with dropout on or off.
    pub(super) fn block_run<'a>(
        m: &TensorParallelGpt2,
        w: &'a [&'a [f32]],
        (layer, p): &'a (usize, BlockParams),
        (b, t): (usize, usize),
        dropout: bool,
    ) -> BlockRun<'a> {
        let c = &m.config;
        let tp = m.comm.world_size();
        BlockRun {
            w,
            p,
            b,
            t,
            c: c.n_embd,
            cl: c.n_embd / tp,
            heads: c.n_head / tp,
            inner: c.inner_dim() / tp,
            eps: c.layer_norm_epsilon as f32,
            scale: c.attn_scale(*layer),
            p_att: if dropout { c.attn_pdrop } else { 0.0 },
            p_res: if dropout { c.resid_pdrop } else { 0.0 },
            adds_bias: m.comm.rank() == 0,
            key_mask: None,
        }
    }

    /// Summed cross-entropy over this rank's slice of the vocabulary (the
    /// one vocabulary-parallel implementation, `collective_ops`). Keeps the
    /// rows' maxima and sums for the backward pass.
    fn cross_entropy(&self, m: &TensorParallelGpt2, acts: &mut MicroActs) -> Result<(f64, usize)> {
        let (vl, off, real) = vocab_slice(m);
        let comm = m.comm.as_ref();
        let cols = (vl, real);
        let (total, max, sumexp) =
            vocab_parallel_forward(&acts.logits, cols, &acts.targets, off, comm)?;
        (acts.max, acts.sumexp) = (max, sumexp);
        let count = acts.targets.iter().filter(|&&x| x >= 0).count();
        Ok((total, count))
    }
}

/// This rank's slice of the vocabulary: rows per rank (with padding), the
/// first row's id, and how many rows are real.
pub(super) fn vocab_slice(m: &TensorParallelGpt2) -> (usize, usize, usize) {
    let vl = vocab_per_rank(m.config.vocab_size, m.comm.world_size());
    let off = m.comm.rank() * vl;
    (vl, off, vl.min(m.config.vocab_size.saturating_sub(off)))
}
