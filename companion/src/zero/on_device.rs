//! A GPU rank's ZeRO state in device memory: the flat gradient buffer,
//! stage 3's weight partition, the fp32 master weights and Adam's moments
//! are tensors on the rank's device, and the step (fp16 unscaling, the
//! norm, clipping, AdamW, the half-precision copy of the weights) runs as
//! tensor ops on them. What comes to the host in a step is scalars: the
//! gradient norm (the Trainer logs it; ranks sum it as an f64) and, under
//! fp16, whether the gradients overflowed. Between several ranks every
//! collective (stages 0–1's all-reduce, the weights' all-gather, stages
//! 2–3's reduce-scatter and stage 3's per-block gathers, each rank's share
//! padded to the longest) runs on the device where the transport can
//! (NCCL), and through its host buffers otherwise; on one rank there are
//! none.
//!
//! The same code runs on candle's CPU device, which is how CI tests it
//! against the host path ([`ZeroEngine::place_state_on_device`]); offload
//! keeps the host path, as DeepSpeed's does.

use candle_core::{DType, Device, Tensor};

use super::device_buffers::{
    all_finite, all_gather, all_reduce, flatten_on_device, pad_to, reduce_scatter, set_params,
    sum_sq, to_device, to_host, OnDevice,
};
use super::engine::{clip_coefficient, ZeroEngine};
use super::error::Result;
use super::layout::{decay_tensor, intersect, PartitionPiece};
use crate::model::GPT2LMHeadModel;
use crate::optim::adamw::{self, Moments};

impl ZeroEngine {
    /// Keep this rank's flat buffers and moments as tensors on its device
    /// and step there. A GPU rank without offload does this from the start;
    /// on the CPU device it runs the same code (how tests check it). With
    /// offload the state stays in host memory.
    pub fn place_state_on_device(&mut self) -> Result<()> {
        if self.on_device.is_some()
            || self.strategy.offload_optimizer()
            || self.strategy.offload_param()
        {
            return Ok(());
        }
        let dev = self.device.clone();
        let up = |v: &[f32]| Tensor::from_slice(v, v.len(), &dev);
        let params = if self.stage() == 3 {
            Some(up(&self.params)?)
        } else {
            None
        };
        let master = if self.master.is_empty() {
            None
        } else {
            Some(up(&self.master)?)
        };
        self.on_device = Some(OnDevice {
            grads: up(&self.grads)?,
            params,
            master,
        });
        (self.grads, self.params, self.master) = (vec![], vec![], vec![]);
        if let Moments::Host { m, v } = &self.moments {
            self.moments = Moments::Device {
                m: up(m)?,
                v: up(v)?,
                decay: decay_tensor(&self.layout, &self.owned, &dev)?,
            };
        }
        Ok(())
    }

    /// Whether the state lives on the device ([`Self::place_state_on_device`]).
    pub fn state_on_device(&self) -> bool {
        self.on_device.is_some()
    }

    fn dev(&mut self) -> &mut OnDevice {
        self.on_device.as_mut().expect("state on the device")
    }

    /// [`ZeroEngine::step`] on device buffers.
    pub(super) fn step_on_device(
        &mut self,
        model: &GPT2LMHeadModel,
        lr: f64,
        max_grad_norm: f64,
    ) -> Result<f64> {
        let stage = self.stage();
        let mut g = self.dev().grads.clone();
        if stage <= 1 {
            g = all_reduce(&*self.comm, &g)?;
        }
        self.last_step_skipped = false;
        if self.poisoned {
            let inf = Tensor::new(&[f32::INFINITY], g.device())?;
            g = Tensor::cat(&[&inf, &g.narrow(0, 1, g.elem_count() - 1)?], 0)?;
            self.poisoned = false;
        }
        if self.loss_scaler.is_some() {
            // fp16: an overflow anywhere skips the step on every rank.
            let bad = !all_finite(&g)?;
            let any = self.comm.all_reduce_f64(if bad { 1.0 } else { 0.0 })? > 0.0;
            let scaler = self.loss_scaler.as_mut().expect("fp16");
            let used = scaler.cur_scale;
            self.last_overflow_message = scaler.update(any);
            if any {
                self.skipped_steps += 1;
                self.last_step_skipped = true;
                self.dev().grads = g.zeros_like()?;
                return Ok(f64::INFINITY);
            }
            if used != 1.0 {
                g = (g * ((1.0 / used) as f32) as f64)?;
            }
        }
        // Each rank's share of ‖g‖²: all of it when gradients are replicated.
        let local = if stage <= 1 && self.rank() != 0 {
            0.0
        } else {
            sum_sq(&g)?
        };
        let norm = self.comm.all_reduce_f64(local)?.sqrt();
        if !norm.is_finite() {
            self.dev().grads = g;
            return Ok(norm);
        }
        // Clipping scales the gradients inside the update.
        let gscale = match clip_coefficient(norm, max_grad_norm) {
            coef if max_grad_norm > 0.0 && coef < 1.0 => coef as f64,
            _ => 1.0,
        };
        self.step += 1;
        let valid = intersect(&self.owned, &(0..self.layout.numel));
        let p_owned = match stage {
            3 => self
                .dev()
                .params
                .as_ref()
                .expect("stage 3")
                .narrow(0, 0, valid.len())?,
            _ if self.mixed_precision() => self.dev().master.clone().expect("fp32 masters"),
            _ => flatten_on_device(model)?.narrow(0, valid.start, valid.len())?,
        };
        let g_owned = match stage {
            0 => g.clone(),
            1 => g.narrow(0, valid.start, valid.len())?,
            _ => g.narrow(0, 0, valid.len())?,
        };
        let Moments::Device { m, v, decay } = &mut self.moments else {
            unreachable!("place_state_on_device put the moments on the device")
        };
        let len = m.elem_count();
        let p_new = adamw::update_tensors(
            self.adam,
            self.step,
            m,
            v,
            decay,
            &pad_to(&p_owned, len)?,
            &pad_to(&g_owned, len)?,
            lr,
            gscale,
        )?
        .narrow(0, 0, valid.len())?;
        if self.mixed_precision() && stage < 3 {
            self.dev().master = Some(p_new.clone());
        }
        match stage {
            3 => {
                let part = self.layout.part;
                let d = self.dev();
                let old = d.params.take().expect("stage 3");
                d.params = Some(if valid.len() < part {
                    Tensor::cat(
                        &[&p_new, &old.narrow(0, valid.len(), part - valid.len())?],
                        0,
                    )?
                } else {
                    p_new
                });
            }
            0 => set_params(model, &self.layout, &p_new)?,
            _ => {
                let mine = pad_to(&p_new, self.layout.part)?;
                let all = all_gather(&*self.comm, &mine)?;
                set_params(model, &self.layout, &all.narrow(0, 0, self.layout.numel)?)?;
            }
        }
        self.dev().grads = g.zeros_like()?;
        Ok(norm)
    }

    /// Add gradients of parameters `idx` to the device buffer: in place at
    /// their flat offsets (stages 0–1, or one rank), else reduce-scattered
    /// through the communicator into this rank's partition.
    pub(super) fn add_on_device(&mut self, idx: &[usize], grads: &[Tensor]) -> Result<()> {
        if self.stage() <= 1 || self.layout.world == 1 {
            let buf = &self.on_device.as_ref().expect("on device").grads;
            for (&i, t) in idx.iter().zip(grads) {
                let r = self.layout.range(i);
                let sum = (buf.narrow(0, r.start, r.len())? + t)?;
                buf.slice_set(&sum, 0, r.start)?;
            }
            return Ok(());
        }
        // Each rank's slices of these gradients end to end, padded to the
        // longest share, summed over ranks where they live.
        let world = self.layout.world;
        let shares: Vec<Vec<PartitionPiece>> =
            (0..world).map(|r| self.layout.pieces(idx, r)).collect();
        let longest = longest_share(&shares);
        let flat = grads
            .iter()
            .map(|g| g.flatten_all()?.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let chunks = shares
            .iter()
            .map(|share| {
                let parts = share
                    .iter()
                    .map(|p| flat[p.k].narrow(0, p.in_param, p.len))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                cat_padded(parts, longest, &self.device)
            })
            .collect::<Result<Vec<_>>>()?;
        let mine = reduce_scatter(&*self.comm, &Tensor::cat(&chunks, 0)?)?;
        let buf = &self.on_device.as_ref().expect("on device").grads;
        let mut at = 0;
        for p in &shares[self.rank()] {
            let sum = (buf.narrow(0, p.in_part, p.len)? + mine.narrow(0, at, p.len)?)?;
            buf.slice_set(&sum, 0, p.in_part)?;
            at += p.len;
        }
        Ok(())
    }

    /// Stage 3 across ranks with the partitions on the devices: each rank's
    /// slices of parameters `idx`, padded to the longest share, all-gathered
    /// where they live and put back together parameter by parameter, in the
    /// compute dtype. Counts toward the peak of gathered bytes.
    pub(super) fn gather_on_device(&mut self, idx: &[usize]) -> Result<Vec<Tensor>> {
        let shares: Vec<Vec<PartitionPiece>> = (0..self.layout.world)
            .map(|r| self.layout.pieces(idx, r))
            .collect();
        let longest = longest_share(&shares);
        let params = self
            .on_device
            .as_ref()
            .and_then(|d| d.params.as_ref())
            .expect("stage 3 on the device");
        let mine = shares[self.rank()]
            .iter()
            .map(|p| params.narrow(0, p.in_part, p.len))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let all = all_gather(&*self.comm, &cat_padded(mine, longest, &self.device)?)?;
        let mut parts: Vec<Vec<Tensor>> = vec![Vec::new(); idx.len()];
        for (r, share) in shares.iter().enumerate() {
            let mut at = r * longest;
            for p in share {
                parts[p.k].push(all.narrow(0, at, p.len)?);
                at += p.len;
            }
        }
        let live: usize = idx
            .iter()
            .map(|&i| self.layout.range(i).len())
            .sum::<usize>()
            * self.compute_dtype.size_in_bytes();
        self.peak_gathered = self.peak_gathered.max(live);
        idx.iter()
            .zip(parts)
            .map(|(&i, p)| {
                Ok(Tensor::cat(&p, 0)?
                    .reshape(self.layout.shape(i).to_vec())?
                    .to_dtype(self.compute_dtype)?)
            })
            .collect()
    }

    /// Stage 3 on one rank: parameters `idx` straight from the partition
    /// (which holds everything), in the compute dtype.
    pub(super) fn gather_on_one_device(&self, idx: &[usize]) -> Result<Vec<Tensor>> {
        let params = self
            .on_device
            .as_ref()
            .and_then(|d| d.params.as_ref())
            .expect("stage 3 on the device");
        idx.iter()
            .map(|&i| {
                let r = self.layout.range(i);
                Ok(params
                    .narrow(0, r.start, r.len())?
                    .reshape(self.layout.shape(i).to_vec())?
                    .to_dtype(self.compute_dtype)?)
            })
            .collect()
    }

    /// Stage 3's partition (all `part` elements), wherever it lives.
    pub(super) fn params_on_host(&self) -> Result<Vec<f32>> {
        match self.on_device.as_ref().and_then(|d| d.params.as_ref()) {
            Some(t) => to_host(t),
            None => Ok(self.params.clone()),
        }
    }

    /// The fp32 master weights (empty without mixed precision).
    pub(super) fn master_on_host(&self) -> Result<Vec<f32>> {
        match self.on_device.as_ref().and_then(|d| d.master.as_ref()) {
            Some(t) => to_host(t),
            None => Ok(self.master.clone()),
        }
    }

    pub(super) fn set_params_from_host(&mut self, v: Vec<f32>) -> Result<()> {
        match &mut self.on_device {
            Some(d) => d.params = Some(to_device(v, &self.device)?),
            None => self.params = v,
        }
        Ok(())
    }

    pub(super) fn set_master_from_host(&mut self, v: Vec<f32>) -> Result<()> {
        match &mut self.on_device {
            Some(d) => d.master = Some(to_device(v, &self.device)?),
            None => self.master = v,
        }
        Ok(())
    }

    /// Elements of the fp32 masters (0 without mixed precision).
    pub(super) fn master_len(&self) -> usize {
        match self.on_device.as_ref().and_then(|d| d.master.as_ref()) {
            Some(t) => t.elem_count(),
            None => self.master.len(),
        }
    }

    /// Elements of stage 3's partition (0 for other stages).
    pub(super) fn params_len(&self) -> usize {
        match self.on_device.as_ref().and_then(|d| d.params.as_ref()) {
            Some(t) => t.elem_count(),
            None => self.params.len(),
        }
    }

    /// Elements of the gradient buffer.
    pub(super) fn grads_len(&self) -> usize {
        match &self.on_device {
            Some(d) => d.grads.elem_count(),
            None => self.grads.len(),
        }
    }

    /// Whether the weights and masters kept on the device are finite
    /// (moments are checked by the caller).
    pub(super) fn device_state_is_finite(&self) -> Result<bool> {
        let Some(d) = &self.on_device else {
            return Ok(true);
        };
        for t in [d.params.as_ref(), d.master.as_ref()].into_iter().flatten() {
            if !all_finite(t)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The longest rank's share of a set of parameters (what every rank's
/// chunk is padded to: NCCL's collectives move equal chunks).
fn longest_share(shares: &[Vec<PartitionPiece>]) -> usize {
    shares
        .iter()
        .map(|s| s.iter().map(|p| p.len).sum::<usize>())
        .max()
        .unwrap_or(0)
}

/// `parts` end to end, padded with zeros to `len` (zeros alone when empty).
fn cat_padded(parts: Vec<Tensor>, len: usize, device: &Device) -> Result<Tensor> {
    if parts.is_empty() {
        return Ok(Tensor::zeros(len, DType::F32, device)?);
    }
    pad_to(&Tensor::cat(&parts, 0)?, len)
}
