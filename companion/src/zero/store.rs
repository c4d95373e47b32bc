//! The engine as the [`ParamStore`] a gradient path runs against: weights
//! local, or gathered from their owners one piece at a time (stage 3);
//! gradients added to the flat buffer (stages 0–1) or reduce-scattered into
//! this rank's partition (stages 2–3). Evaluation's forward pass under
//! stage 3 gathers the same way.

use candle_core::{Tensor, Var};

use super::device_buffers::to_device;
use super::engine::ZeroEngine;
use super::error::{Result, ZeroError};
use super::layout::add_into;
use crate::model::gradient::{blockwise, ParamStore};
use crate::model::GPT2LMHeadModel;

fn store_error(e: ZeroError) -> crate::model::ModelError {
    crate::model::ModelError::Store(Box::new(e))
}

impl ParamStore for ZeroEngine {
    fn tensors(
        &mut self,
        model: &GPT2LMHeadModel,
        idx: &[usize],
    ) -> crate::model::Result<Vec<Tensor>> {
        if self.stage() == 3 {
            return self.gather(idx).map_err(store_error);
        }
        let params = model.named_parameters();
        Ok(idx
            .iter()
            .map(|&i| params[i].1.as_detached_tensor())
            .collect())
    }

    fn vars(&mut self, model: &GPT2LMHeadModel, idx: &[usize]) -> crate::model::Result<Vec<Var>> {
        if self.stage() == 3 {
            return Ok(self
                .gather(idx)
                .map_err(store_error)?
                .iter()
                .map(Var::from_tensor)
                .collect::<candle_core::Result<_>>()?);
        }
        let params = model.named_parameters();
        Ok(idx.iter().map(|&i| params[i].1.clone()).collect())
    }

    fn add_gradients(&mut self, idx: &[usize], grads: &[Vec<f32>]) -> crate::model::Result<()> {
        if self.state_on_device() {
            let ts = grads
                .iter()
                .map(|g| to_device(g.clone(), &self.device))
                .collect::<Result<Vec<_>>>()
                .map_err(store_error)?;
            return self.add_on_device(idx, &ts).map_err(store_error);
        }
        if self.stage() >= 2 {
            return self.reduce_scatter_flat(idx, grads).map_err(store_error);
        }
        for (&i, g) in idx.iter().zip(grads) {
            add_into(&mut self.grads[self.layout.range(i)], g);
        }
        Ok(())
    }

    fn add_gradient_tensors(
        &mut self,
        idx: &[usize],
        grads: &[Tensor],
    ) -> crate::model::Result<()> {
        if self.state_on_device() {
            return self.add_on_device(idx, grads).map_err(store_error);
        }
        self.add_gradients(idx, &crate::model::gradient::store::to_host(grads)?)
    }

    fn with_flat_gradients(
        &mut self,
        f: &mut dyn FnMut(&mut [f32]) -> crate::model::Result<f64>,
    ) -> crate::model::Result<f64> {
        if self.state_on_device() {
            // The fused CPU kernels write host memory: add it on the device.
            let mut full = vec![0f32; self.layout.numel];
            let loss = f(&mut full)?;
            let idx: Vec<usize> = (0..self.layout.params.len()).collect();
            let ts = idx
                .iter()
                .map(|&i| to_device(full[self.layout.range(i)].to_vec(), &self.device))
                .collect::<Result<Vec<_>>>()
                .map_err(store_error)?;
            self.add_on_device(&idx, &ts).map_err(store_error)?;
            return Ok(loss);
        }
        if self.stage() <= 1 {
            return f(&mut self.grads);
        }
        // Stages 2–3: the whole micro-batch's gradients, summed over the
        // ranks, of which this rank keeps its partition. Exchanged even
        // when the loss is not finite, so no rank waits for another.
        let mut full = vec![0f32; self.layout.part * self.layout.world];
        let loss = f(&mut full[..self.layout.numel])?;
        self.add_reduce_scattered(&full).map_err(store_error)?;
        Ok(loss)
    }
}

/// Where a piece of a reduce-scattered share goes: (offset in the
/// partition, offset in the share, length).
pub(super) type Piece = (usize, usize, usize);

impl ZeroEngine {
    /// Logits without gradients (evaluation): under stage 3, gathering one
    /// piece at a time.
    pub fn forward(
        &mut self,
        model: &GPT2LMHeadModel,
        ids: &Tensor,
        mask: Option<&[Vec<u32>]>,
    ) -> Result<Tensor> {
        if self.stage() != 3 {
            return Ok(model.for_inference().forward(ids, mask, None)?);
        }
        Ok(blockwise::forward(model, self, ids, mask)?)
    }

    /// The collectives of [`forward`](Self::forward) for a rank with no
    /// batch this round, so the others are not left waiting.
    pub fn skip_forward(&mut self, model: &GPT2LMHeadModel) -> Result<()> {
        if self.stage() == 3 {
            blockwise::skip_forward(model, self)?;
        }
        Ok(())
    }

    /// All-gather parameters `idx` from their owners (stage 3), in the
    /// compute dtype. Counts toward the peak of gathered bytes.
    fn gather(&mut self, idx: &[usize]) -> Result<Vec<Tensor>> {
        if self.state_on_device() {
            return match self.layout.world {
                1 => self.gather_on_one_device(idx),
                _ => self.gather_on_device(idx),
            };
        }
        let mut send = Vec::new();
        for p in self.layout.pieces(idx, self.rank()) {
            send.extend_from_slice(&self.params[p.in_part..p.in_part + p.len]);
        }
        let all = self.comm.all_gather(&send)?;
        // `all` is, rank by rank, each parameter's slice: put them back together.
        let mut out: Vec<Vec<f32>> = idx
            .iter()
            .map(|&i| Vec::with_capacity(self.layout.range(i).len()))
            .collect();
        let mut at = 0;
        for r in 0..self.layout.world {
            for p in self.layout.pieces(idx, r) {
                out[p.k].extend_from_slice(&all[at..at + p.len]);
                at += p.len;
            }
        }
        let live: usize =
            out.iter().map(Vec::len).sum::<usize>() * self.compute_dtype.size_in_bytes();
        self.peak_gathered = self.peak_gathered.max(live);
        idx.iter()
            .zip(out)
            .map(|(&i, data)| {
                Ok(
                    Tensor::from_vec(data, self.layout.shape(i).to_vec(), &self.device)?
                        .to_dtype(self.compute_dtype)?,
                )
            })
            .collect()
    }

    /// Reduce-scatter whole gradients of parameters `idx` into this rank's
    /// partition of the gradient buffer.
    fn reduce_scatter_flat(&mut self, idx: &[usize], full: &[Vec<f32>]) -> Result<()> {
        let (mine, pieces) = self.reduce_scatter_pieces(idx, full)?;
        for (dst, src, len) in pieces {
            add_into(&mut self.grads[dst..dst + len], &mine[src..src + len]);
        }
        Ok(())
    }

    /// This rank's share of the sum over ranks of `full` (whole gradients
    /// of parameters `idx`), and where each piece of it goes: (offset in
    /// the partition, offset in the share, length).
    pub(super) fn reduce_scatter_pieces(
        &self,
        idx: &[usize],
        full: &[Vec<f32>],
    ) -> Result<(Vec<f32>, Vec<Piece>)> {
        let mut send = Vec::new();
        let mut counts = Vec::with_capacity(self.layout.world);
        for r in 0..self.layout.world {
            let before = send.len();
            for p in self.layout.pieces(idx, r) {
                send.extend_from_slice(&full[p.k][p.in_param..p.in_param + p.len]);
            }
            counts.push(send.len() - before);
        }
        let mine = self.comm.reduce_scatter_sum(&send, &counts)?;
        let mut at = 0;
        let pieces = self
            .layout
            .pieces(idx, self.rank())
            .into_iter()
            .map(|p| {
                at += p.len;
                (p.in_part, at - p.len, p.len)
            })
            .collect();
        Ok((mine, pieces))
    }
}
