//! The Trainer's optimizer step on the data-parallel path: each rank's
//! micro-batches of the global batch forward and backward through the
//! gradient path into the ZeRO engine, then the engine's step (reduce,
//! clip, AdamW) at the schedule's learning rate.

use super::engine::Engine;
use super::error::{Result, TrainError};
use super::logging::StepReport;
use super::trainer::Trainer;
use crate::data::{Batch, DataLoader};
use crate::model::MicroBatch;
use crate::zero::ZeroEngine;

impl Trainer {
    /// One optimizer step: this rank's micro-batches of the global batch,
    /// forward and backward through the engine, the learning rate of the
    /// schedule, and the engine's step (reduce, clip, AdamW).
    pub(super) fn data_parallel_step(&mut self, loader: &DataLoader) -> Result<StepReport> {
        let step = self.state.global_step;
        let accum = self.plan.batch.gradient_accumulation_steps;
        let (world, rank) = (self.engine.world_size(), self.engine.rank());
        let comm = self.engine.comm().clone();
        let sum_ranks = |x: f64| -> Result<f64> { Ok(comm.all_reduce_f64(x)?) };
        // This rank's micro-batches of this update and the label-token count
        // of the whole global batch: every rank's loss is divided by it, so
        // the summed gradients equal one rank's on all of it.
        let batches = self.step_batches(loader)?;
        let local_items: usize = batches.iter().flatten().map(Batch::num_label_tokens).sum();
        let n_items = sum_ranks(local_items as f64)?.max(1.0);
        let local = super::logging::BatchFigures::of(&batches, &self.model.config);
        let tokens = sum_ranks(local.tokens as f64)? as usize;
        let real_tokens = sum_ranks(local.real_tokens as f64)? as usize;
        let flops = sum_ranks(local.flops)?;
        let mut local_loss = 0f64;
        for (k, b) in batches.iter().enumerate() {
            let Some(b) = b else {
                self.gradient_path
                    .skip(&self.model, zero_mut(&mut self.engine)?)?;
                continue;
            };
            // Dropout is seeded by the micro-batch's place in the global
            // order, so N ranks draw what one rank would.
            self.model
                .seed_dropout(dropout_seed(self.args.seed, step * accum + k, world, rank));
            let (ids, labels) = self.tensors(b)?;
            let mask = (!b.is_unpadded()).then_some(b.attention_mask.as_slice());
            let batch = MicroBatch {
                input_ids: &ids,
                labels: &labels,
                attention_mask: mask,
                n_items,
                loss_scale: zero_mut(&mut self.engine)?.loss_scale(),
            };
            let lv = self.gradient_path.forward_backward(
                &self.model,
                &batch,
                zero_mut(&mut self.engine)?,
            )?;
            local_loss += lv;
        }
        // Checked on the sum, which every rank sees: all stop together.
        let loss = sum_ranks(local_loss)?;
        if !loss.is_finite() {
            return Err(self.non_finite_loss(loss));
        }
        self.state.num_input_tokens_seen += tokens;
        // Skipped (fp16 overflow) steps do not advance the schedule, as
        // DeepSpeed does not step its scheduler then.
        let sched_step = step - self.engine.skipped_steps();
        let lr = self
            .plan
            .schedule
            .lr_at(sched_step, self.plan.learning_rate);
        let engine = zero_mut(&mut self.engine)?;
        if self.faults.overflow_at_step == Some(step + 1) {
            engine.poison_gradients();
        }
        let loss_scale = engine.loss_scaler.as_ref().map(|s| s.cur_scale);
        let norm = engine.step(&self.model, lr, self.plan.max_grad_norm)?;
        Ok(StepReport {
            loss,
            norm,
            lr,
            loss_scale,
            tokens,
            real_tokens,
            flops,
        })
    }
}

/// The dropout seed of micro-batch `micro` (counted over the run) on
/// data-parallel rank `rank` of `world`: a function of its place in the
/// global order, so N ranks draw what one rank would, on either path.
pub(super) fn dropout_seed(seed: u64, micro: usize, world: usize, rank: usize) -> u64 {
    let global_micro = (micro * world + rank) as u64;
    seed ^ global_micro.wrapping_mul(0x9E3779B97F4A7C15)
}

/// The ZeRO engine of a run that has one (the data-parallel path).
pub(super) fn zero_mut(e: &mut Engine) -> Result<&mut ZeroEngine> {
    e.zero_mut().ok_or_else(|| {
        TrainError::Args("the ZeRO engine's step on a tensor/pipeline-parallel run".into())
    })
}
