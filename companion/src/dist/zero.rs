//! ZeRO (Rajbhandari et al. 2020) as DeepSpeed runs it, stage by stage.
//!
//! All parameters are laid end to end in one flat fp32 buffer (in
//! `named_parameters` order), padded to a multiple of the world size and cut
//! into one contiguous partition per rank — DeepSpeed's flat buffers. Then:
//!
//! | stage | parameters | gradients | Adam moments |
//! |---|---|---|---|
//! | 0 | full on every rank | full, all-reduced | full |
//! | 1 | full | full, all-reduced | own partition |
//! | 2 | full | own partition, reduce-scattered every micro-batch | own partition |
//! | 3 | own partition, gathered one block at a time | own partition | own partition |
//!
//! Each rank updates only its partition; stages 1–2 all-gather the updated
//! weights afterwards. Stage 3 never materialises the whole model: the
//! forward pass gathers each block's weights, runs it and drops them,
//! keeping only the block's input; the backward pass gathers the block
//! again, recomputes it from that input (with the same dropout masks), takes
//! its gradients and reduce-scatters them. `offload_optimizer: cpu` keeps the
//! Adam moments in host memory and updates there (multi-threaded);
//! otherwise they are tensors on the rank's device, updated with tensor ops.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;
use serde::Serialize;

use super::comm::Communicator;
use super::loss_scaler::LossScaler;
use crate::model::{causal_lm_loss_sum, parameter_shapes, GPT2LMHeadModel};
use crate::train::{decays, Result, TrainError};

/// Where each parameter sits in the flat buffer and which slice each rank owns.
#[derive(Debug, Clone)]
pub struct FlatLayout {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub offsets: Vec<usize>,
    /// Real elements (Ψ).
    pub numel: usize,
    pub world: usize,
    /// Elements per partition: ⌈Ψ / N⌉ (the last one is padded).
    pub part: usize,
}

impl FlatLayout {
    pub fn new(cfg: &crate::config::GPT2Config, world: usize) -> Self {
        let (mut names, mut shapes, mut offsets) = (vec![], vec![], vec![]);
        let mut at = 0;
        for (n, s) in parameter_shapes(cfg) {
            offsets.push(at);
            at += s.iter().product::<usize>();
            names.push(n);
            shapes.push(s);
        }
        let world = world.max(1);
        FlatLayout {
            names,
            shapes,
            offsets,
            numel: at,
            world,
            part: at.div_ceil(world),
        }
    }

    /// The flat elements rank `r` owns (may run past `numel`: padding).
    pub fn partition(&self, r: usize) -> Range<usize> {
        r * self.part..(r + 1) * self.part
    }

    /// The flat elements of parameter `i`.
    pub fn range(&self, i: usize) -> Range<usize> {
        let n: usize = self.shapes[i].iter().product();
        self.offsets[i]..self.offsets[i] + n
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }
}

fn intersect(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    let s = a.start.max(b.start);
    let e = a.end.min(b.end).max(s);
    s..e
}

/// Adam's moments for the elements this rank updates.
enum Moments {
    /// `offload_optimizer: cpu`: host memory, updated by a parallel loop.
    Host { m: Vec<f32>, v: Vec<f32> },
    /// On the rank's device, updated with tensor ops; `decay` is 1 where
    /// weight decay applies, 0 on biases and LayerNorm weights.
    Device { m: Tensor, v: Tensor, decay: Tensor },
}

/// AdamW's hyper-parameters (`adamw_torch`, or the ds_config optimizer block).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// A parameter's name with its `exp_avg` and `exp_avg_sq`.
pub type NamedMoments = (String, Vec<f32>, Vec<f32>);

/// Bytes of model state one rank really holds, measured from its buffers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ModelStateBytes {
    pub rank: usize,
    pub stage: u8,
    pub world_size: usize,
    /// fp32 weights kept between steps (the whole model, or a partition).
    pub params: usize,
    /// Gradient accumulation buffer.
    pub grads: usize,
    /// Adam's exp_avg and exp_avg_sq.
    pub optimizer_states: usize,
    /// How much of the above lives in host memory because of offload.
    pub offloaded_to_host: usize,
    /// Stage 3: the most gathered (full) weights alive at once.
    pub peak_gathered_params: usize,
}

impl ModelStateBytes {
    pub fn total(&self) -> usize {
        self.params + self.grads + self.optimizer_states
    }
}

/// One rank's ZeRO state and its training step.
pub struct ZeroEngine {
    pub stage: u8,
    pub offload_optimizer: bool,
    pub offload_param: bool,
    pub layout: FlatLayout,
    pub comm: Arc<dyn Communicator>,
    pub adam: AdamWParams,
    /// Optimizer steps taken (Adam's `t`).
    pub step: u64,
    /// Recompute each block in the backward pass instead of keeping its
    /// activations (`TrainingArguments.gradient_checkpointing`); stage 3
    /// always works this way.
    pub gradient_checkpointing: bool,
    /// The dtype forward and backward run in (F32, or BF16/F16 for mixed
    /// precision, with fp32 master weights kept here).
    pub compute_dtype: DType,
    /// fp16: the loss scaler (DeepSpeed's DynamicLossScaler).
    pub loss_scaler: Option<LossScaler>,
    /// Steps skipped because their gradients overflowed (fp16).
    pub skipped_steps: usize,
    /// Whether the last `step` was skipped.
    pub last_step_skipped: bool,
    /// DeepSpeed's log line for the last overflow.
    pub last_overflow_message: Option<String>,
    poisoned: bool,
    /// Mixed precision, stages 0–2: fp32 master weights of the owned
    /// elements (stage 3's `params` already are its fp32 master).
    master: Vec<f32>,
    device: Device,
    /// Stage 3 only: this rank's slice of the fp32 weights, the only copy.
    params: Vec<f32>,
    /// Accumulated gradients: the whole flat buffer (stages 0–1) or this
    /// rank's partition (2–3).
    grads: Vec<f32>,
    moments: Moments,
    /// Flat range the moments cover (everything for stage 0).
    owned: Range<usize>,
    peak_gathered: usize,
    /// Train fp32 CPU models through the hand-written kernels
    /// ([`crate::kernels`]) instead of candle's autograd (stages 0–2
    /// without gradient checkpointing). On by default; tests turn it off to
    /// compare the two.
    pub fused_kernels: bool,
    workspace: Option<crate::cpu::Workspace>,
}

impl ZeroEngine {
    /// Partition `model` for this rank. Stage 3 copies this rank's slice of
    /// the weights out of it; the caller then swaps the model for
    /// [`GPT2LMHeadModel::partitioned`].
    pub fn new(
        model: &GPT2LMHeadModel,
        stage: u8,
        offload_optimizer: bool,
        offload_param: bool,
        adam: AdamWParams,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        if stage > 3 {
            return Err(TrainError::Args(format!(
                "ZeRO stage must be 0, 1, 2 or 3, got {stage}"
            )));
        }
        let layout = FlatLayout::new(&model.config, comm.world_size());
        let rank = comm.rank();
        let owned = if stage == 0 {
            0..layout.numel
        } else {
            layout.partition(rank)
        };
        let device = model.device().clone();
        let params = if stage == 3 {
            let flat = flatten_params(model, &layout)?;
            let mut p = vec![0f32; layout.part];
            let r = intersect(&owned, &(0..layout.numel));
            p[..r.len()].copy_from_slice(&flat[r]);
            p
        } else {
            vec![]
        };
        let grads = vec![
            0f32;
            if stage >= 2 {
                layout.part
            } else {
                layout.numel
            }
        ];
        // Offloaded, or on CPU ranks (where the device is host memory): the
        // parallel loop, which updates in place instead of allocating a
        // tensor per operation.
        let moments = if offload_optimizer || device.is_cpu() {
            Moments::Host {
                m: vec![0.0; owned.len()],
                v: vec![0.0; owned.len()],
            }
        } else {
            device_moments(&layout, &owned, &device)?
        };
        Ok(ZeroEngine {
            stage,
            offload_optimizer,
            offload_param,
            layout,
            comm,
            adam,
            step: 0,
            gradient_checkpointing: false,
            compute_dtype: DType::F32,
            loss_scaler: None,
            skipped_steps: 0,
            last_step_skipped: false,
            last_overflow_message: None,
            poisoned: false,
            master: vec![],
            device,
            params,
            grads,
            moments,
            owned,
            peak_gathered: 0,
            fused_kernels: true,
            workspace: None,
        })
    }

    /// Mixed precision: forward/backward in `dtype` (the caller converts the
    /// model afterwards), fp32 master weights from `model` (still fp32) kept
    /// here, and for fp16 a loss scaler.
    pub fn with_precision(
        mut self,
        model: &GPT2LMHeadModel,
        dtype: DType,
        loss_scaler: Option<LossScaler>,
    ) -> Result<Self> {
        self.compute_dtype = dtype;
        self.loss_scaler = loss_scaler;
        if dtype != DType::F32 && self.stage < 3 {
            let valid = intersect(&self.owned, &(0..self.layout.numel));
            self.master = flatten_params(model, &self.layout)?[valid].to_vec();
        }
        Ok(self)
    }

    /// Whether weights are computed in half precision with fp32 masters.
    pub fn mixed_precision(&self) -> bool {
        self.compute_dtype != DType::F32
    }

    /// Test hook: make this step's gradients overflow, as fp16 can.
    pub fn poison_gradients(&mut self) {
        self.poisoned = true;
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// Forward and backward of one micro-batch, its loss scaled by
    /// `1 / n_items` (the label tokens of the whole global batch), gradients
    /// accumulated by stage. Returns the scaled loss.
    pub fn micro_step(
        &mut self,
        model: &GPT2LMHeadModel,
        ids: &Tensor,
        labels: &Tensor,
        mask: Option<&[Vec<u32>]>,
        n_items: f64,
    ) -> Result<f64> {
        if self.stage == 3 || self.gradient_checkpointing {
            return self.micro_step_blockwise(model, ids, labels, mask, n_items);
        }
        if self.fused_kernels && !self.mixed_precision() && model.fused_kernels_apply() {
            return self.micro_step_fused(model, ids, labels, mask, n_items);
        }
        let logits = model.forward(ids, mask, None)?;
        let (lv, g) = self.loss_backward(&logits, labels, n_items)?;
        let Some(g) = g else { return Ok(lv) };
        let mut full = vec![0f32; self.layout.part * self.layout.world];
        for (i, (name, var)) in model.named_parameters().iter().enumerate() {
            debug_assert_eq!(&self.layout.names[i], name);
            if let Some(t) = g.get(var.as_tensor()) {
                let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                full[self.layout.range(i)].copy_from_slice(&v);
            }
        }
        if self.stage == 2 {
            self.add_reduce_scattered(&full)?;
        } else {
            full.truncate(self.layout.numel);
            add_into(&mut self.grads, &full);
        }
        Ok(lv)
    }

    /// Stage 2: sum a whole-model gradient buffer over the ranks and add
    /// this rank's partition of the sum to its gradients.
    fn add_reduce_scattered(&mut self, full: &[f32]) -> Result<()> {
        let counts = vec![self.layout.part; self.layout.world];
        let mine = self.comm.reduce_scatter_sum(full, &counts)?;
        add_into(&mut self.grads, &mine);
        Ok(())
    }

    /// [`micro_step`](Self::micro_step) through the fused CPU kernels: the
    /// gradients land in the flat buffer directly (stages 0–1) or in a full
    /// buffer that is then reduce-scattered (stage 2).
    fn micro_step_fused(
        &mut self,
        model: &GPT2LMHeadModel,
        ids: &Tensor,
        labels: &Tensor,
        mask: Option<&[Vec<u32>]>,
        n_items: f64,
    ) -> Result<f64> {
        let ids: Vec<Vec<u32>> = ids.to_vec2()?;
        let labels: Vec<Vec<i64>> = labels.to_vec2()?;
        let batch = crate::cpu::Batch {
            ids: &ids,
            labels: &labels,
            mask,
        };
        let ranges: Vec<Range<usize>> = (0..self.layout.names.len())
            .map(|i| self.layout.range(i))
            .collect();
        let scale = (self.scale() / n_items) as f32;
        let mut ws = self.workspace.take().unwrap_or_default();
        let dropout = model
            .training_dropout()
            .map(|d| d as &dyn crate::cpu::DropoutMasks);
        let cfg = &model.config;
        let loss = if self.stage == 2 {
            let mut full = vec![0f32; self.layout.part * self.layout.world];
            let loss = model.with_fp32_weights(|w| {
                Ok(ws.forward_backward(cfg, w, &batch, dropout, &mut full, &ranges, scale)?)
            });
            if loss.as_ref().is_ok_and(|l| l.is_finite()) {
                self.add_reduce_scattered(&full)?;
            }
            loss
        } else {
            let grads = &mut self.grads;
            model.with_fp32_weights(|w| {
                Ok(ws.forward_backward(cfg, w, &batch, dropout, grads, &ranges, scale)?)
            })
        };
        self.workspace = Some(ws);
        Ok(loss? / n_items)
    }

    /// Block by block (stage 3, or `gradient_checkpointing`): the forward
    /// pass keeps only each block's input; the backward pass recomputes each
    /// block from it with the same dropout masks and differentiates it alone.
    /// Under stage 3 each block's weights are gathered for the moment they
    /// are used, so no rank ever holds the whole model.
    fn micro_step_blockwise(
        &mut self,
        model: &GPT2LMHeadModel,
        ids: &Tensor,
        labels: &Tensor,
        mask: Option<&[Vec<u32>]>,
        n_items: f64,
    ) -> Result<f64> {
        let cfg = model.config.clone();
        let (emb, blocks, head) = self.pieces();
        // Forward: keep each block's input and the dropout generator's state.
        let mut states = vec![model.dropout_state()];
        let p = self.fetch(model, &emb)?;
        let mut xs = vec![model.embed_with(&tensors(&p), ids, mask)?];
        drop(p);
        for l in 0..cfg.n_layer {
            states.push(model.dropout_state());
            let p = self.fetch(model, &blocks[l])?;
            let x = model.block_with(l, &tensors(&p), &xs[l], mask)?;
            xs.push(x);
        }
        let after = model.dropout_state();
        // Head and loss, with gradients for ln_f, wte and the last activation.
        let p = self.fetch_vars(model, &head)?;
        let x_last = Var::from_tensor(&xs[cfg.n_layer])?;
        let logits = model.head_with(&var_tensors(&p), x_last.as_tensor())?;
        let (lv, g) = self.loss_backward(&logits, labels, n_items)?;
        let Some(g) = g else { return Ok(lv) };
        self.accumulate(&head, &p, &g)?;
        let mut gy = g
            .get(x_last.as_tensor())
            .ok_or_else(|| TrainError::Args("no gradient reached the last block".into()))?
            .clone();
        drop((p, g, logits));
        // Backward, block by block: gather, recompute, differentiate, scatter.
        for l in (0..cfg.n_layer).rev() {
            model.set_dropout_state(states[l + 1]);
            let idx = &blocks[l];
            let p = self.fetch_vars(model, idx)?;
            let x_in = Var::from_tensor(&xs[l])?;
            let y = model.block_with(l, &var_tensors(&p), x_in.as_tensor(), mask)?;
            let g = (y * &gy)?.sum_all()?.backward()?;
            self.accumulate(idx, &p, &g)?;
            gy = g
                .get(x_in.as_tensor())
                .ok_or_else(|| TrainError::Args(format!("no gradient reached block {l}")))?
                .clone();
            xs.truncate(l + 1);
        }
        model.set_dropout_state(states[0]);
        let p = self.fetch_vars(model, &emb)?;
        let x0 = model.embed_with(&var_tensors(&p), ids, mask)?;
        let g = (x0 * &gy)?.sum_all()?.backward()?;
        self.accumulate(&emb, &p, &g)?;
        model.set_dropout_state(after);
        Ok(lv)
    }

    /// Weights `idx` for a forward pass without gradients: gathered from
    /// their owners (stage 3) or the model's own, detached.
    fn fetch(&mut self, model: &GPT2LMHeadModel, idx: &[usize]) -> Result<Vec<(String, Tensor)>> {
        if self.stage == 3 {
            return self.gather(idx);
        }
        let params = model.named_parameters();
        Ok(idx
            .iter()
            .map(|&i| (params[i].0.clone(), params[i].1.as_detached_tensor()))
            .collect())
    }

    /// Weights `idx` as Vars whose gradients backward records.
    fn fetch_vars(&mut self, model: &GPT2LMHeadModel, idx: &[usize]) -> Result<Vec<(String, Var)>> {
        if self.stage == 3 {
            return self.gather_vars(idx);
        }
        let params = model.named_parameters();
        Ok(idx.iter().map(|&i| params[i].clone()).collect())
    }

    /// Add the gradients of `vars` (parameters `idx`) to this rank's buffer:
    /// reduce-scattered into its partition (stages 2–3) or whole (0–1).
    fn accumulate(
        &mut self,
        idx: &[usize],
        vars: &[(String, Var)],
        g: &candle_core::backprop::GradStore,
    ) -> Result<()> {
        if self.stage >= 2 {
            return self.reduce_scatter_grads(idx, vars, g);
        }
        for (&i, (_, v)) in idx.iter().zip(vars) {
            if let Some(t) = g.get(v.as_tensor()) {
                let x: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                add_into(&mut self.grads[self.layout.range(i)], &x);
            }
        }
        Ok(())
    }

    /// The loss over `n_items` label tokens and, when it is finite, the
    /// gradients of the loss times the fp16 loss scale.
    fn loss_backward(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        n_items: f64,
    ) -> Result<(f64, Option<candle_core::backprop::GradStore>)> {
        let (sum, _) = causal_lm_loss_sum(logits, labels)?;
        let loss = (sum / n_items)?;
        let lv = loss.to_scalar::<f32>()? as f64;
        if !lv.is_finite() {
            return Ok((lv, None));
        }
        Ok((lv, Some((loss * self.scale())?.backward()?)))
    }

    /// The loss scale of this step (1 without fp16).
    fn scale(&self) -> f64 {
        self.loss_scaler.as_ref().map_or(1.0, |s| s.cur_scale)
    }

    /// Logits without gradients (evaluation): under stage 3, gathering one
    /// piece at a time.
    pub fn forward(
        &mut self,
        model: &GPT2LMHeadModel,
        ids: &Tensor,
        mask: Option<&[Vec<u32>]>,
    ) -> Result<Tensor> {
        if self.stage != 3 {
            return Ok(model.for_inference().forward(ids, mask, None)?);
        }
        let (emb, blocks, head) = self.pieces();
        let p = self.gather(&emb)?;
        let mut x = model.embed_with(&tensors(&p), ids, mask)?;
        drop(p);
        for (l, idx) in blocks.iter().enumerate() {
            let p = self.gather(idx)?;
            x = model.block_with(l, &tensors(&p), &x, mask)?;
        }
        let p = self.gather(&head)?;
        Ok(model.head_with(&tensors(&p), &x)?)
    }

    /// The collectives of [`forward`](Self::forward) for a rank with no
    /// batch this round, so the others are not left waiting.
    pub fn skip_forward(&mut self) -> Result<()> {
        if self.stage == 3 {
            let (emb, blocks, head) = self.pieces();
            self.gather(&emb)?;
            for idx in &blocks {
                self.gather(idx)?;
            }
            self.gather(&head)?;
        }
        Ok(())
    }

    /// The collectives of [`micro_step`](Self::micro_step), contributing
    /// zero gradients (a rank whose share of the last global batch is empty).
    pub fn skip_micro_step(&mut self, _model: &GPT2LMHeadModel) -> Result<()> {
        let zeros = |s: &Self, idx: &[usize]| -> Vec<Vec<f32>> {
            idx.iter()
                .map(|&i| vec![0.0; s.layout.range(i).len()])
                .collect()
        };
        match self.stage {
            2 => {
                let full = vec![0f32; self.layout.part * self.layout.world];
                self.add_reduce_scattered(&full)?;
            }
            3 => {
                self.skip_forward()?;
                let (emb, blocks, head) = self.pieces();
                self.reduce_scatter_flat(&head, &zeros(self, &head))?;
                for idx in blocks.iter().rev() {
                    self.gather(idx)?;
                    self.reduce_scatter_flat(idx, &zeros(self, idx))?;
                }
                self.gather(&emb)?;
                self.reduce_scatter_flat(&emb, &zeros(self, &emb))?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Parameter indices of the embedding, of each block, and of the head.
    fn pieces(&self) -> (Vec<usize>, Vec<Vec<usize>>, Vec<usize>) {
        let n_layer = self
            .layout
            .names
            .iter()
            .filter(|n| n.ends_with(".ln_1.weight"))
            .count();
        let emb = self.indices(&["transformer.wte.weight", "transformer.wpe.weight"]);
        // The head is `lm_head.weight` when the model has one (untied), else `wte`.
        let head_w = if self.layout.index("lm_head.weight").is_some() {
            "lm_head.weight"
        } else {
            "transformer.wte.weight"
        };
        let head = self.indices(&[head_w, "transformer.ln_f.weight", "transformer.ln_f.bias"]);
        let blocks = (0..n_layer)
            .map(|l| {
                let p = format!("transformer.h.{l}.");
                (0..self.layout.names.len())
                    .filter(|&i| self.layout.names[i].starts_with(&p))
                    .collect()
            })
            .collect();
        (emb, blocks, head)
    }

    fn indices(&self, names: &[&str]) -> Vec<usize> {
        names
            .iter()
            .map(|n| self.layout.index(n).expect("a GPT-2 parameter"))
            .collect()
    }

    /// All-gather parameters `idx` from their owners (stage 3): as plain
    /// tensors for the forward pass (no autograd graph keeps them alive), as
    /// Vars when their gradients are wanted. Counts toward the peak of
    /// gathered bytes.
    fn gather(&mut self, idx: &[usize]) -> Result<Vec<(String, Tensor)>> {
        let me = self.layout.partition(self.rank());
        let mut send = Vec::new();
        for &i in idx {
            let r = intersect(&self.layout.range(i), &me);
            if !r.is_empty() {
                send.extend_from_slice(&self.params[r.start - me.start..r.end - me.start]);
            }
        }
        let all = self.comm.all_gather(&send)?;
        // `all` is, rank by rank, each parameter's slice: put them back together.
        let mut out: Vec<Vec<f32>> = idx
            .iter()
            .map(|&i| Vec::with_capacity(self.layout.range(i).len()))
            .collect();
        let mut at = 0;
        for r in 0..self.layout.world {
            let part = self.layout.partition(r);
            for (k, &i) in idx.iter().enumerate() {
                let n = intersect(&self.layout.range(i), &part).len();
                out[k].extend_from_slice(&all[at..at + n]);
                at += n;
            }
        }
        let live: usize =
            out.iter().map(Vec::len).sum::<usize>() * self.compute_dtype.size_in_bytes();
        self.peak_gathered = self.peak_gathered.max(live);
        idx.iter()
            .zip(out)
            .map(|(&i, data)| {
                let t = Tensor::from_vec(data, self.layout.shapes[i].clone(), &self.device)?
                    .to_dtype(self.compute_dtype)?;
                Ok((self.layout.names[i].clone(), t))
            })
            .collect()
    }

    /// [`gather`](Self::gather) as Vars, whose gradients backward records.
    fn gather_vars(&mut self, idx: &[usize]) -> Result<Vec<(String, Var)>> {
        self.gather(idx)?
            .into_iter()
            .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
            .collect()
    }

    /// Reduce-scatter the gradients of gathered parameters into this rank's
    /// partition of the gradient buffer.
    fn reduce_scatter_grads(
        &mut self,
        idx: &[usize],
        vars: &[(String, Var)],
        g: &candle_core::backprop::GradStore,
    ) -> Result<()> {
        let full: Vec<Vec<f32>> = vars
            .iter()
            .map(|(_, v)| -> Result<Vec<f32>> {
                Ok(match g.get(v.as_tensor()) {
                    Some(t) => t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
                    None => vec![0.0; v.elem_count()],
                })
            })
            .collect::<Result<_>>()?;
        self.reduce_scatter_flat(idx, &full)
    }

    fn reduce_scatter_flat(&mut self, idx: &[usize], full: &[Vec<f32>]) -> Result<()> {
        let mut send = Vec::new();
        let mut counts = Vec::with_capacity(self.layout.world);
        for r in 0..self.layout.world {
            let part = self.layout.partition(r);
            let before = send.len();
            for (k, &i) in idx.iter().enumerate() {
                let range = self.layout.range(i);
                let x = intersect(&range, &part);
                if !x.is_empty() {
                    send.extend_from_slice(&full[k][x.start - range.start..x.end - range.start]);
                }
            }
            counts.push(send.len() - before);
        }
        let mine = self.comm.reduce_scatter_sum(&send, &counts)?;
        let me = self.layout.partition(self.rank());
        let mut at = 0;
        for &i in idx {
            let x = intersect(&self.layout.range(i), &me);
            if x.is_empty() {
                continue;
            }
            let dst = &mut self.grads[x.start - me.start..x.end - me.start];
            add_into(dst, &mine[at..at + x.len()]);
            at += x.len();
        }
        Ok(())
    }

    /// After the last micro-batch: reduce the gradients (stages 0–1), take
    /// the global norm, clip to `max_grad_norm`, update this rank's
    /// elements with AdamW at `lr`, and share the new weights (stages 1–2).
    /// Returns the gradient norm before clipping.
    pub fn step(&mut self, model: &GPT2LMHeadModel, lr: f64, max_grad_norm: f64) -> Result<f64> {
        if self.stage <= 1 {
            self.comm.all_reduce_sum(&mut self.grads)?;
        }
        self.last_step_skipped = false;
        if self.poisoned {
            self.grads[0] = f32::INFINITY;
            self.poisoned = false;
        }
        if let Some(scaler) = self.loss_scaler.as_mut() {
            // fp16: an overflow anywhere skips the step on every rank.
            let bad = self.grads.par_iter().any(|x| !x.is_finite());
            let any = self.comm.all_reduce_f64(if bad { 1.0 } else { 0.0 })? > 0.0;
            let used = scaler.cur_scale;
            self.last_overflow_message = scaler.update(any);
            if any {
                self.skipped_steps += 1;
                self.last_step_skipped = true;
                self.grads.iter_mut().for_each(|x| *x = 0.0);
                return Ok(f64::INFINITY);
            }
            if used != 1.0 {
                let inv = (1.0 / used) as f32;
                self.grads.par_iter_mut().for_each(|x| *x *= inv);
            }
        }
        // Each rank's share of ‖g‖²: all of it when gradients are replicated.
        let local = match self.stage {
            0 | 1 => {
                if self.rank() == 0 {
                    sum_sq(&self.grads)
                } else {
                    0.0
                }
            }
            _ => sum_sq(&self.grads),
        };
        let norm = self.comm.all_reduce_f64(local)?.sqrt();
        if !norm.is_finite() {
            return Ok(norm);
        }
        if max_grad_norm > 0.0 {
            let coef = (max_grad_norm / (norm + 1e-6)).min(1.0) as f32;
            if coef < 1.0 {
                self.grads.par_iter_mut().for_each(|x| *x *= coef);
            }
        }
        self.step += 1;
        if self.stage == 0
            && !self.mixed_precision()
            && matches!(self.moments, Moments::Host { .. })
            && model.device().is_cpu()
        {
            self.adamw_in_place(model, lr)?;
            self.grads.iter_mut().for_each(|x| *x = 0.0);
            return Ok(norm);
        }
        let owned = self.owned.clone();
        let valid = intersect(&owned, &(0..self.layout.numel));
        // The weights and gradients of the elements this rank updates. The
        // gradient buffer is lent to AdamW (which needs `&mut self`), not copied.
        let mut p_owned: Vec<f32> = match self.stage {
            3 => self.params[..valid.len()].to_vec(),
            _ if self.mixed_precision() => self.master.clone(),
            _ => {
                let mut flat = flatten_params(model, &self.layout)?;
                flat.truncate(valid.end);
                flat.drain(..valid.start);
                flat
            }
        };
        let grads = std::mem::take(&mut self.grads);
        let g_owned: &[f32] = match self.stage {
            0 => &grads,
            1 => &grads[valid.clone()],
            _ => &grads[..valid.len()],
        };
        let updated = self.adamw(&mut p_owned, g_owned, lr, valid.len());
        self.grads = grads;
        updated?;
        if self.mixed_precision() && self.stage < 3 {
            self.master.copy_from_slice(&p_owned);
        }
        match self.stage {
            3 => self.params[..valid.len()].copy_from_slice(&p_owned),
            0 => set_params(model, &self.layout, &p_owned)?,
            _ => {
                let mut mine = p_owned;
                mine.resize(self.layout.part, 0.0);
                let mut all = self.comm.all_gather(&mine)?;
                all.truncate(self.layout.numel);
                set_params(model, &self.layout, &all)?;
            }
        }
        self.grads.iter_mut().for_each(|x| *x = 0.0);
        Ok(norm)
    }

    /// Adam's bias corrections at this step: `√(1 − β₂ᵗ)` and the step size
    /// `lr / (1 − β₁ᵗ)`.
    fn bias_corrections(&self, lr: f64) -> (f64, f64) {
        let t = self.step as i32;
        let a = self.adam;
        ((1.0 - a.beta2.powi(t)).sqrt(), lr / (1.0 - a.beta1.powi(t)))
    }

    /// AdamW on this rank's elements (`torch.optim.AdamW`'s arithmetic).
    fn adamw(&mut self, p: &mut [f32], g: &[f32], lr: f64, n: usize) -> Result<()> {
        let a = self.adam;
        let (bc2_sqrt, step_size) = self.bias_corrections(lr);
        match &mut self.moments {
            Moments::Host { m, v } => {
                let (m, v) = (&mut m[..n], &mut v[..n]);
                let segs = decay_segments(&self.layout, &self.owned);
                let with = adamw_consts(a, lr, bc2_sqrt, step_size);
                // Split at parameter boundaries so each run has one decay factor.
                let mut rest_p = &mut p[..];
                let mut rest_g = g;
                let mut rest_m = m;
                let mut rest_v = v;
                for (len, dec) in segs {
                    let len = len.min(rest_p.len());
                    let (pp, rp) = rest_p.split_at_mut(len);
                    let (gg, rg) = rest_g.split_at(len);
                    let (mm, rm) = rest_m.split_at_mut(len);
                    let (vv, rv) = rest_v.split_at_mut(len);
                    (rest_p, rest_g, rest_m, rest_v) = (rp, rg, rm, rv);
                    adamw_update(pp, gg, mm, vv, with(dec));
                }
            }
            Moments::Device { m, v, decay } => {
                let dev = &self.device;
                let len = m.elem_count();
                let mut pv = p.to_vec();
                pv.resize(len, 0.0);
                let mut gv = g.to_vec();
                gv.resize(len, 0.0);
                let pt = Tensor::from_vec(pv, len, dev)?;
                let gt = Tensor::from_vec(gv, len, dev)?;
                let m1 = ((&*m * a.beta1)? + (&gt * (1.0 - a.beta1))?)?;
                let v1 = ((&*v * a.beta2)? + (gt.sqr()? * (1.0 - a.beta2))?)?;
                let denom = ((v1.sqrt()? / bc2_sqrt)? + a.eps)?;
                let factor = ((&*decay * (-lr * a.weight_decay))? + 1.0)?;
                let upd = ((&m1 / &denom)? * step_size)?;
                let p1 = ((pt * factor)? - upd)?;
                *m = m1;
                *v = v1;
                let out: Vec<f32> = p1.narrow(0, 0, n)?.to_vec1()?;
                p.copy_from_slice(&out);
            }
        }
        Ok(())
    }

    /// Stage 0 on the CPU: AdamW straight into the model's weights (a
    /// candle in-place op per parameter), with no flat copy of the model
    /// taken out and written back.
    fn adamw_in_place(&mut self, model: &GPT2LMHeadModel, lr: f64) -> Result<()> {
        let (bc2_sqrt, step_size) = self.bias_corrections(lr);
        let with = adamw_consts(self.adam, lr, bc2_sqrt, step_size);
        let Moments::Host { m, v } = &mut self.moments else {
            return Err(TrainError::Args("in-place AdamW needs host moments".into()));
        };
        for (i, (name, var)) in model.named_parameters().iter().enumerate() {
            let r = self.layout.range(i);
            let op = InPlaceAdamW {
                g: &self.grads[r.clone()],
                mv: std::sync::Mutex::new((&mut m[r.clone()], &mut v[r])),
                step: with(decays(name)),
            };
            var.as_tensor().inplace_op1(&op)?;
        }
        Ok(())
    }

    /// What this rank keeps between steps, measured from its buffers.
    pub fn memory(&self, model: &GPT2LMHeadModel) -> ModelStateBytes {
        let params = if self.stage == 3 {
            self.params.len() * 4
        } else {
            model
                .named_parameters()
                .iter()
                .map(|(_, v)| v.elem_count() * v.dtype().size_in_bytes())
                .sum()
        };
        // Adam's moments, plus the fp32 master weights under mixed precision
        // (the paper's K = 12 bytes: 4 master + 8 moments).
        let optimizer_states = match &self.moments {
            Moments::Host { m, v } => (m.len() + v.len()) * 4,
            Moments::Device { m, v, .. } => (m.elem_count() + v.elem_count()) * 4,
        } + self.master.len() * 4;
        let mut offloaded = 0;
        if self.offload_optimizer {
            offloaded += optimizer_states;
        }
        if self.offload_param && self.stage == 3 {
            offloaded += params;
        }
        ModelStateBytes {
            rank: self.rank(),
            stage: self.stage,
            world_size: self.world_size(),
            params,
            grads: self.grads.len() * 4,
            optimizer_states,
            offloaded_to_host: offloaded,
            peak_gathered_params: self.peak_gathered,
        }
    }

    /// Every weight by name, gathered from all ranks (a collective: every
    /// rank calls it). What DeepSpeed's `zero_to_fp32` consolidates.
    pub fn full_state_dict(&self, model: &GPT2LMHeadModel) -> Result<HashMap<String, Tensor>> {
        let flat = if self.stage == 3 {
            let mut all = self.comm.all_gather(&self.params)?;
            all.truncate(self.layout.numel);
            all
        } else if self.mixed_precision() {
            // The fp32 masters, not the half-precision copy.
            if self.stage == 0 {
                self.master.clone()
            } else {
                let mut mine = self.master.clone();
                mine.resize(self.layout.part, 0.0);
                let mut all = self.comm.all_gather(&mine)?;
                all.truncate(self.layout.numel);
                all
            }
        } else {
            flatten_params(model, &self.layout)?
        };
        let mut out = HashMap::new();
        for i in 0..self.layout.names.len() {
            let t = Tensor::from_slice(
                &flat[self.layout.range(i)],
                self.layout.shapes[i].clone(),
                &Device::Cpu,
            )?;
            out.insert(self.layout.names[i].clone(), t);
        }
        Ok(out)
    }

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
        if self.stage == 3 {
            out.push((
                "fp32_flat_partition".into(),
                Tensor::from_slice(&self.params, self.params.len(), &cpu)?,
            ));
        }
        if !self.master.is_empty() {
            out.push((
                "fp32_master".into(),
                Tensor::from_slice(&self.master, self.master.len(), &cpu)?,
            ));
        }
        out.push((
            "loss_scale".into(),
            Tensor::new(&[self.scale() as f32], &cpu)?,
        ));
        Ok(out)
    }

    /// Restore a shard written by [`ZeroEngine::shard`] (same stage and world size).
    pub fn load_shard(&mut self, t: &HashMap<String, Tensor>, file: &str) -> Result<()> {
        let get = |k: &str, n: usize| -> Result<Vec<f32>> {
            let x = t.get(k).ok_or_else(|| TrainError::Io {
                path: file.into(),
                msg: format!("no tensor `{k}` (was it written by another stage?)"),
            })?;
            if x.elem_count() != n {
                return Err(TrainError::Io {
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
        if self.stage == 3 {
            self.params = get("fp32_flat_partition", self.layout.part)?;
        }
        if !self.master.is_empty() {
            self.master = get("fp32_master", self.master.len())?;
        }
        if let (Some(sc), Some(t)) = (self.loss_scaler.as_mut(), t.get("loss_scale")) {
            sc.cur_scale = t.flatten_all()?.to_vec1::<f32>()?[0] as f64;
        }
        Ok(())
    }

    /// After loading full fp32 weights (resume): stage 3 takes this rank's
    /// slice, mixed precision its fp32 masters.
    pub fn load_full_params(&mut self, model: &GPT2LMHeadModel) -> Result<()> {
        if self.mixed_precision() && self.stage < 3 {
            let valid = intersect(&self.owned, &(0..self.layout.numel));
            self.master = flatten_params(model, &self.layout)?[valid].to_vec();
        }
        if self.stage == 3 {
            let flat = flatten_params(model, &self.layout)?;
            let me = intersect(&self.layout.partition(self.rank()), &(0..self.layout.numel));
            self.params = vec![0.0; self.layout.part];
            self.params[..me.len()].copy_from_slice(&flat[me]);
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
            return Err(TrainError::Args(
                "moments_by_name needs the whole model's moments (stage 0)".into(),
            ));
        }
        Ok((0..self.layout.names.len())
            .map(|i| {
                let r = self.layout.range(i);
                (
                    self.layout.names[i].clone(),
                    m[r.clone()].to_vec(),
                    v[r].to_vec(),
                )
            })
            .collect())
    }

    /// Set a stage-0 engine's moments from `optimizer.safetensors` tensors.
    pub fn set_moments_by_name(
        &mut self,
        named: &HashMap<String, (Vec<f32>, Vec<f32>)>,
    ) -> Result<()> {
        let n = self.layout.numel;
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        for (i, name) in self.layout.names.iter().enumerate() {
            if let Some((a, b)) = named.get(name) {
                let r = self.layout.range(i);
                if a.len() != r.len() || b.len() != r.len() {
                    return Err(TrainError::Args(format!(
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

fn tensors(p: &[(String, Tensor)]) -> HashMap<String, Tensor> {
    p.iter().map(|(n, t)| (n.clone(), t.clone())).collect()
}

fn var_tensors(p: &[(String, Var)]) -> HashMap<String, Tensor> {
    p.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    acc.par_iter_mut()
        .zip(x.par_iter())
        .for_each(|(a, b)| *a += b);
}

fn sum_sq(x: &[f32]) -> f64 {
    x.par_iter().map(|v| (*v as f64) * (*v as f64)).sum()
}

/// The model's weights laid end to end, fp32.
fn flatten_params(model: &GPT2LMHeadModel, layout: &FlatLayout) -> Result<Vec<f32>> {
    let mut flat = Vec::with_capacity(layout.numel);
    for (_, var) in model.named_parameters() {
        let v: Vec<f32> = var
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        flat.extend_from_slice(&v);
    }
    if flat.len() != layout.numel {
        return Err(TrainError::Args(format!(
            "the model holds {} weights, the ZeRO layout expects {} (a partitioned model has none)",
            flat.len(),
            layout.numel
        )));
    }
    Ok(flat)
}

/// The constants of one AdamW update of one parameter.
#[derive(Clone, Copy)]
struct AdamWStep {
    b1: f32,
    b2: f32,
    eps: f32,
    bc2_sqrt: f32,
    step_size: f32,
    /// `1 − lr·weight_decay`, or 1 where no decay applies.
    decay: f32,
}

/// The update's constants for a parameter that decays or not.
fn adamw_consts(
    a: AdamWParams,
    lr: f64,
    bc2_sqrt: f64,
    step_size: f64,
) -> impl Fn(bool) -> AdamWStep {
    move |decays| AdamWStep {
        b1: a.beta1 as f32,
        b2: a.beta2 as f32,
        eps: a.eps as f32,
        bc2_sqrt: bc2_sqrt as f32,
        step_size: step_size as f32,
        decay: if decays {
            (1.0 - lr * a.weight_decay) as f32
        } else {
            1.0
        },
    }
}

/// `torch.optim.AdamW`'s update of `p` in place, in parallel chunks.
fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamWStep) {
    p.par_chunks_mut(4096)
        .zip(g.par_chunks(4096))
        .zip(m.par_chunks_mut(4096))
        .zip(v.par_chunks_mut(4096))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                p[i] *= s.decay;
                m[i] = s.b1 * m[i] + (1.0 - s.b1) * g[i];
                v[i] = s.b2 * v[i] + (1.0 - s.b2) * g[i] * g[i];
                let denom = v[i].sqrt() / s.bc2_sqrt + s.eps;
                p[i] -= s.step_size * m[i] / denom;
            }
        });
}

/// AdamW as a candle in-place op on one fp32 CPU parameter.
struct InPlaceAdamW<'a> {
    g: &'a [f32],
    /// The moments (behind a lock: in-place ops get `&self`).
    mv: std::sync::Mutex<(&'a mut [f32], &'a mut [f32])>,
    step: AdamWStep,
}

impl candle_core::InplaceOp1 for InPlaceAdamW<'_> {
    fn name(&self) -> &'static str {
        "companion-adamw"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("in-place AdamW: expected fp32 weights");
        };
        let Some((a, z)) = layout.contiguous_offsets() else {
            candle_core::bail!("in-place AdamW: expected contiguous weights");
        };
        let mut mv = self.mv.lock().expect("moments");
        let (m, v) = &mut *mv;
        if z - a != self.g.len() || m.len() != self.g.len() {
            candle_core::bail!(
                "in-place AdamW: {} weights, {} gradients",
                z - a,
                self.g.len()
            );
        }
        adamw_update(&mut data[a..z], self.g, m, v, self.step);
        Ok(())
    }
}

/// Adam's moments as zero tensors on `device`, with the weight-decay mask.
fn device_moments(layout: &FlatLayout, owned: &Range<usize>, device: &Device) -> Result<Moments> {
    let n = owned.len();
    Ok(Moments::Device {
        m: Tensor::zeros(n, DType::F32, device)?,
        v: Tensor::zeros(n, DType::F32, device)?,
        decay: Tensor::from_vec(decay_mask(layout, owned), n, device)?,
    })
}

/// Write `flat` (the whole model) back into its Vars.
fn set_params(model: &GPT2LMHeadModel, layout: &FlatLayout, flat: &[f32]) -> Result<()> {
    for (i, (_, var)) in model.named_parameters().iter().enumerate() {
        let t = Tensor::from_slice(&flat[layout.range(i)], var.shape(), var.device())?
            .to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// Runs of `owned` (clipped to real elements) with one weight-decay flag each.
fn decay_segments(layout: &FlatLayout, owned: &Range<usize>) -> Vec<(usize, bool)> {
    (0..layout.names.len())
        .filter_map(|i| {
            let x = intersect(&layout.range(i), owned);
            (!x.is_empty()).then(|| (x.len(), decays(&layout.names[i])))
        })
        .collect()
}

/// 1.0 where weight decay applies, per owned element (padding: 0).
fn decay_mask(layout: &FlatLayout, owned: &Range<usize>) -> Vec<f32> {
    let mut mask = Vec::with_capacity(owned.len());
    for (len, d) in decay_segments(layout, owned) {
        mask.extend(std::iter::repeat_n(if d { 1.0 } else { 0.0 }, len));
    }
    mask.resize(owned.len(), 0.0);
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cover_the_buffer_once() {
        let cfg = crate::config::GPT2Config::preset("gpt2").unwrap();
        let l = FlatLayout::new(&cfg, 3);
        assert_eq!(l.numel, 124_439_808);
        assert_eq!(l.part, 124_439_808usize.div_ceil(3));
        assert_eq!(l.partition(2).end, 3 * l.part);
        let covered: usize = (0..3)
            .map(|r| intersect(&l.partition(r), &(0..l.numel)).len())
            .sum();
        assert_eq!(covered, l.numel);
        let mask = decay_mask(&l, &l.partition(0));
        assert_eq!(mask[0], 1.0); // wte decays
    }

    /// The tensor-op AdamW (moments on a GPU) and the host loop (offload,
    /// and CPU ranks) update identically: the CPU runs the first only here.
    #[test]
    fn device_and_host_moments_give_the_same_step() {
        use crate::dist::comm::SingleRank;
        let mut cfg = crate::config::GPT2Config::preset("gpt2").unwrap();
        (
            cfg.n_layer,
            cfg.n_embd,
            cfg.n_head,
            cfg.vocab_size,
            cfg.n_positions,
        ) = (1, 16, 2, 50, 8);
        let adam = AdamWParams {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let ids = Tensor::new(vec![vec![1u32, 7, 3, 9, 4]], &Device::Cpu).unwrap();
        let labels = ids.to_dtype(DType::I64).unwrap();
        let run = |on_device: bool| {
            let model = GPT2LMHeadModel::new(&cfg, 1, &Device::Cpu).unwrap();
            let mut e =
                ZeroEngine::new(&model, 1, false, false, adam, Arc::new(SingleRank)).unwrap();
            assert!(
                matches!(e.moments, Moments::Host { .. }),
                "CPU ranks use the host loop"
            );
            if on_device {
                e.moments = device_moments(&e.layout, &e.owned, &Device::Cpu).unwrap();
            }
            for _ in 0..2 {
                e.micro_step(&model, &ids, &labels, None, 4.0).unwrap();
                e.step(&model, 1e-2, 1.0).unwrap();
            }
            flatten_params(&model, &e.layout).unwrap()
        };
        let (host, device) = (run(false), run(true));
        let d = host
            .iter()
            .zip(&device)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Updates are ~lr = 1e-2; the two differ only in rounding order.
        assert!(d < 1e-5, "max difference {d}");
    }
}
