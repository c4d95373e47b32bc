//! One rank's ZeRO engine: where the model states live (partitioned,
//! offloaded, fp32 masters), how ranks exchange them, and the optimiser
//! step with clipping and the weights' all-gather. Gradients come from a
//! [`crate::model::GradientPath`] run against the engine as its
//! [`crate::model::ParamStore`] (`store.rs`).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::comm::Communicator;
use super::device_buffers::{flatten_on_device, OnDevice};
use super::error::Result;
use super::layout::{
    add_into, decay_segments, device_moments, flatten_params, intersect, set_params, sum_sq,
    FlatLayout,
};
use super::memory::ModelStateBytes;
use super::precision::LossScaler;
use super::strategy::{Precision, ZeroStrategy};
use crate::model::GPT2LMHeadModel;
use crate::optim::adamw::{self, AdamWParams, Moments};

/// DeepSpeed's clipping factor for a gradient norm (`clip_grad_norm_`'s):
/// the gradients are multiplied by it when it is below 1.
pub(crate) fn clip_coefficient(norm: f64, max_grad_norm: f64) -> f32 {
    (max_grad_norm / (norm + 1e-6)).min(1.0) as f32
}

/// One rank's ZeRO state and its training step.
pub struct ZeroEngine {
    /// The stage and its offload settings.
    pub strategy: ZeroStrategy,
    pub layout: FlatLayout,
    pub comm: Arc<dyn Communicator>,
    pub adam: AdamWParams,
    /// Optimizer steps taken (Adam's `t`).
    pub step: u64,
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
    pub(super) poisoned: bool,
    /// Mixed precision, stages 0–2: fp32 master weights of the owned
    /// elements (stage 3's `params` already are its fp32 master).
    pub(super) master: Vec<f32>,
    pub(super) device: Device,
    /// Stage 3 only: this rank's slice of the fp32 weights, the only copy.
    pub(super) params: Vec<f32>,
    /// Accumulated gradients: the whole flat buffer (stages 0–1) or this
    /// rank's partition (2–3).
    pub(super) grads: Vec<f32>,
    pub(super) moments: Moments,
    /// A GPU rank's buffers on its device (then `params`, `grads` and
    /// `master` above are empty): `on_device.rs`.
    pub(super) on_device: Option<OnDevice>,
    /// Flat range the moments cover (everything for stage 0).
    pub(super) owned: Range<usize>,
    pub(super) peak_gathered: usize,
}

impl ZeroEngine {
    /// Partition `model` for this rank. Stage 3 copies this rank's slice of
    /// the weights out of it; the caller then swaps the model for
    /// [`GPT2LMHeadModel::partitioned`].
    pub fn new(
        model: &GPT2LMHeadModel,
        strategy: ZeroStrategy,
        adam: AdamWParams,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let stage = strategy.stage();
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
        let moments = if strategy.offload_optimizer() || device.is_cpu() {
            Moments::Host {
                m: vec![0.0; owned.len()],
                v: vec![0.0; owned.len()],
            }
        } else {
            device_moments(&layout, &owned, &device)?
        };
        let mut engine = ZeroEngine {
            strategy,
            layout,
            comm,
            adam,
            step: 0,
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
            on_device: None,
            owned,
            peak_gathered: 0,
        };
        if !engine.device.is_cpu() {
            engine.place_state_on_device()?;
        }
        Ok(engine)
    }

    /// Mixed precision: forward/backward in `dtype` (the caller converts the
    /// model afterwards), fp32 master weights from `model` (still fp32) kept
    /// here, and for fp16 a loss scaler.
    pub fn with_precision(
        mut self,
        model: &GPT2LMHeadModel,
        precision: &Precision,
    ) -> Result<Self> {
        let dtype = precision.dtype();
        self.compute_dtype = dtype;
        self.loss_scaler = match precision {
            Precision::Fp16 { scaler } => Some(LossScaler::from_config(scaler)),
            Precision::F32 | Precision::Bf16 => None,
        };
        if dtype != DType::F32 && self.stage() < 3 {
            let valid = intersect(&self.owned, &(0..self.layout.numel));
            match &mut self.on_device {
                Some(d) => {
                    d.master =
                        Some(flatten_on_device(model)?.narrow(0, valid.start, valid.len())?);
                }
                None => self.master = flatten_params(model, &self.layout)?[valid].to_vec(),
            }
        }
        Ok(self)
    }

    /// Whether weights are computed in half precision with fp32 masters.
    pub fn mixed_precision(&self) -> bool {
        self.compute_dtype != DType::F32
    }

    /// Test hook: make this step's gradients overflow, as fp16 can.
    #[doc(hidden)]
    pub fn poison_gradients(&mut self) {
        self.poisoned = true;
    }

    /// The ZeRO stage (0–3).
    pub fn stage(&self) -> u8 {
        self.strategy.stage()
    }

    /// The loss scale of this step (1 without fp16).
    pub fn loss_scale(&self) -> f64 {
        self.loss_scaler.as_ref().map_or(1.0, |s| s.cur_scale)
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// Stage 2: sum a whole-model gradient buffer over the ranks and add
    /// this rank's partition of the sum to its gradients.
    pub(super) fn add_reduce_scattered(&mut self, full: &[f32]) -> Result<()> {
        let counts = vec![self.layout.part; self.layout.world];
        let mine = self.comm.reduce_scatter_sum(full, &counts)?;
        add_into(&mut self.grads, &mine);
        Ok(())
    }

    /// After the last micro-batch: reduce the gradients (stages 0–1), take
    /// the global norm, clip to `max_grad_norm`, update this rank's
    /// elements with AdamW at `lr`, and share the new weights (stages 1–2).
    /// Returns the gradient norm before clipping.
    pub fn step(&mut self, model: &GPT2LMHeadModel, lr: f64, max_grad_norm: f64) -> Result<f64> {
        if self.on_device.is_some() {
            return self.step_on_device(model, lr, max_grad_norm);
        }
        if self.stage() <= 1 {
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
        let local = match self.stage() {
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
            let coef = clip_coefficient(norm, max_grad_norm);
            if coef < 1.0 {
                self.grads.par_iter_mut().for_each(|x| *x *= coef);
            }
        }
        self.step += 1;
        if self.stage() == 0
            && !self.mixed_precision()
            && matches!(self.moments, Moments::Host { .. })
            && model.device().is_cpu()
        {
            let Moments::Host { m, v } = &mut self.moments else {
                unreachable!("matched above")
            };
            let ranges: Vec<_> = (0..self.layout.params.len())
                .map(|i| self.layout.range(i))
                .collect();
            adamw::update_in_place(self.adam, self.step, model, &self.grads, &ranges, m, v, lr)?;
            self.grads.iter_mut().for_each(|x| *x = 0.0);
            return Ok(norm);
        }
        let owned = self.owned.clone();
        let valid = intersect(&owned, &(0..self.layout.numel));
        // The weights and gradients of the elements this rank updates. The
        // gradient buffer is lent to AdamW (which needs `&mut self`), not copied.
        let mut p_owned: Vec<f32> = match self.stage() {
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
        let g_owned: &[f32] = match self.stage() {
            0 => &grads,
            1 => &grads[valid.clone()],
            _ => &grads[..valid.len()],
        };
        let segments = decay_segments(&self.layout, &self.owned);
        let Moments::Host { m, v } = &mut self.moments else {
            unreachable!("a state whose moments are on a device steps there (on_device.rs)")
        };
        adamw::update(
            self.adam,
            self.step,
            m,
            v,
            &mut p_owned,
            g_owned,
            lr,
            valid.len(),
            &segments,
        );
        self.grads = grads;
        if self.mixed_precision() && self.stage() < 3 {
            self.master.copy_from_slice(&p_owned);
        }
        match self.stage() {
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

    /// What this rank keeps between steps, measured from its buffers.
    pub fn memory(&self, model: &GPT2LMHeadModel) -> ModelStateBytes {
        let params = if self.stage() == 3 {
            self.params_len() * 4
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
        } + self.master_len() * 4;
        let mut offloaded = 0;
        if self.strategy.offload_optimizer() {
            offloaded += optimizer_states;
        }
        if self.strategy.offload_param() {
            offloaded += params;
        }
        ModelStateBytes {
            rank: self.rank(),
            stage: self.stage(),
            world_size: self.world_size(),
            params,
            grads: self.grads_len() * 4,
            optimizer_states,
            offloaded_to_host: offloaded,
            peak_gathered_params: self.peak_gathered,
            activations_held: None,
        }
    }

    /// Every weight by name, gathered from all ranks (a collective: every
    /// rank calls it). What DeepSpeed's `zero_to_fp32` consolidates.
    pub fn full_state_dict(&self, model: &GPT2LMHeadModel) -> Result<HashMap<String, Tensor>> {
        let flat = if self.stage() == 3 {
            let mut all = self.comm.all_gather(&self.params_on_host()?)?;
            all.truncate(self.layout.numel);
            all
        } else if self.mixed_precision() {
            // The fp32 masters, not the half-precision copy.
            if self.stage() == 0 {
                self.master_on_host()?
            } else {
                let mut mine = self.master_on_host()?;
                mine.resize(self.layout.part, 0.0);
                let mut all = self.comm.all_gather(&mine)?;
                all.truncate(self.layout.numel);
                all
            }
        } else {
            flatten_params(model, &self.layout)?
        };
        let mut out = HashMap::new();
        for i in 0..self.layout.params.len() {
            let t = Tensor::from_slice(
                &flat[self.layout.range(i)],
                self.layout.shape(i).to_vec(),
                &Device::Cpu,
            )?;
            out.insert(self.layout.name(i).to_string(), t);
        }
        Ok(out)
    }
}
