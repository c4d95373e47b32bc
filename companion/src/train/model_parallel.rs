//! The Trainer's step and evaluation when the model is split over ranks
//! (tensor and pipeline parallelism): every rank of a data-parallel
//! replica reads the replica's micro-batches (its data loader is the
//! replica's), the gradient-accumulation micro-batches run through the
//! pipeline in 1F1B order, and the distributed optimizer takes the step.

use super::engine::Engine;
use super::error::{Result, TrainError};
use super::logging::{BatchFigures, StepReport};
use super::trainer::Trainer;
use crate::data::{Batch, DataLoader, Dataset};

impl Trainer {
    /// One optimizer step on the 3D-parallel path.
    pub(super) fn model_parallel_step(&mut self, loader: &DataLoader) -> Result<StepReport> {
        let step = self.state.global_step;
        let accum = self.plan.batch.gradient_accumulation_steps;
        let batches: Vec<Option<Batch>> = (0..accum)
            .map(|k| {
                let idx = loader.batch(step * accum + k);
                if idx.is_empty() {
                    Ok(None)
                } else {
                    self.batch_of(&self.train_dataset, &idx).map(Some)
                }
            })
            .collect::<Result<_>>()?;
        self.batches_read += batches.iter().flatten().count();
        let local = BatchFigures::of(&batches, &self.model.config);
        // Padding on the right is exact on this path (attention is causal
        // and the collator's labels skip it); on the left it is not.
        let (replica, replicas) = self.engine.data_parallel();
        let (mut ids, mut labels, mut seeds) = (Vec::new(), Vec::new(), Vec::new());
        for (k, b) in batches.iter().enumerate() {
            let Some(b) = b else { continue };
            right_padded(b)?;
            ids.push(b.input_ids.clone());
            labels.push(b.labels.clone());
            let micro = step * accum + k;
            seeds.push(super::data_parallel::dropout_seed(
                self.args.seed,
                micro,
                replicas,
                replica,
            ));
        }
        let sched_step = step;
        let lr = self
            .plan
            .schedule
            .lr_at(sched_step, self.plan.learning_rate);
        let clip = self.plan.max_grad_norm;
        let Engine::ModelParallel(mp) = &mut self.engine else {
            return Err(TrainError::Args("not a model-parallel run".into()));
        };
        let extras = crate::parallel::pipeline::MicroExtras {
            labels: Some(&labels),
            dropout_seeds: Some(&seeds),
        };
        let out = mp.trainer.step_replica(&ids, extras, lr, clip)?;
        mp.activations_held = mp.trainer.last_activations_held;
        mp.last_bubble = out.bubble;
        // The replica's figures summed over the replicas (the other ranks
        // of a replica read the same batches).
        let dp = &mp.trainer.groups.dp;
        let sum = |x: f64| -> Result<f64> { Ok(dp.all_reduce_f64(x)?) };
        let tokens = sum(local.tokens as f64)? as usize;
        let real_tokens = sum(local.real_tokens as f64)? as usize;
        let flops = sum(local.flops)?;
        if !out.loss.is_finite() {
            return Err(TrainError::NonFinite(format!(
                "the loss became {} at step {}; training stopped and {} (lower the \
                 learning_rate or check the data)",
                out.loss,
                step + 1,
                super::output_dir::kept_checkpoint(&self.args.output_dir)
            )));
        }
        self.state.num_input_tokens_seen += tokens;
        Ok(StepReport {
            loss: out.loss,
            norm: out.grad_norm,
            lr,
            loss_scale: None,
            tokens,
            real_tokens,
            flops,
        })
    }

    /// The summed loss and token count of `ds` on the 3D-parallel path:
    /// batches dealt to the data-parallel replicas in turn, each run
    /// forward through its pipeline; summed over the ranks (the last stage
    /// of each replica's first tensor rank speaks).
    pub(super) fn model_parallel_eval(&mut self, ds: &Dataset) -> Result<(f64, usize)> {
        let bs = self.args.per_device_eval_batch_size;
        let (replica, replicas) = self.engine.data_parallel();
        let n_batches = ds.len().div_ceil(bs);
        let (mut sum, mut count) = (0f64, 0usize);
        for i in (replica..n_batches).step_by(replicas) {
            let start = i * bs;
            let idx: Vec<usize> = (start..(start + bs).min(ds.len())).collect();
            let b = self.batch_of(ds, &idx)?;
            right_padded(&b)?;
            let Engine::ModelParallel(mp) = &mut self.engine else {
                return Err(TrainError::Args("not a model-parallel run".into()));
            };
            if let Some((s, n)) = mp.trainer.forward_loss_sum(&b.input_ids, Some(&b.labels))? {
                sum += s;
                count += n;
            }
        }
        Ok((sum, count))
    }
}

/// A batch whose padding, if any, ends each row (the attention mask's ones
/// then zeros): what the tensor- and pipeline-parallel path runs exactly.
fn right_padded(b: &Batch) -> Result<()> {
    let ok = b
        .attention_mask
        .iter()
        .all(|r| r.windows(2).all(|w| w[0] >= w[1]));
    if ok {
        Ok(())
    } else {
        Err(TrainError::Args(
            "a batch padded on the left: the tensor- and pipeline-parallel path takes right \
             padding only (the collator's padding_side)"
                .into(),
        ))
    }
}
