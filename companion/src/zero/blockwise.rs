//! ZeRO-3 and gradient checkpointing: the forward pass keeps only each
//! block's input; the backward pass gathers the block's weights again (stage
//! 3), recomputes it from that input with the same dropout masks,
//! differentiates it alone and reduce-scatters its gradients.

use candle_core::{DType, Tensor, Var};

use super::engine::ZeroEngine;
use super::error::{Result, ZeroError};
use super::layout::{add_into, intersect, tensors, var_tensors};
use crate::model::{causal_lm_loss_sum, GPT2LMHeadModel};

impl ZeroEngine {
    /// Block by block (stage 3, or `gradient_checkpointing`): the forward
    /// pass keeps only each block's input; the backward pass recomputes each
    /// block from it with the same dropout masks and differentiates it alone.
    /// Under stage 3 each block's weights are gathered for the moment they
    /// are used, so no rank ever holds the whole model.
    pub(super) fn micro_step_blockwise(
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
            .ok_or_else(|| ZeroError::Args("no gradient reached the last block".into()))?
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
                .ok_or_else(|| ZeroError::Args(format!("no gradient reached block {l}")))?
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
    pub(super) fn loss_backward(
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
    pub(super) fn scale(&self) -> f64 {
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
}
