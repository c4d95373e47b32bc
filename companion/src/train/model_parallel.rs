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
        let (step, accum) = (
            self.state.global_step,
            self.plan.batch.gradient_accumulation_steps,
        );
        let batches = self.step_batches(loader)?;
        let local = BatchFigures::of(&batches, &self.model.config);
        // (A rank that refuses its batch aborts its communicator: the
        // others stop in their next collective instead of waiting.)
        for b in batches.iter().flatten() {
            runs_split(b, &self.model.config)?;
        }
        let (replica, replicas) = self.engine.data_parallel();
        let (mut ids, mut labels, mut seeds) = (Vec::new(), Vec::new(), Vec::new());
        for (k, b) in batches.iter().enumerate() {
            let Some(b) = b else { continue };
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
        let lr = self.plan.schedule.lr_at(step, self.plan.learning_rate);
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
        // The loss is summed over every rank's group: all see the same.
        if !out.loss.is_finite() {
            return Err(self.non_finite_loss(out.loss));
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
        let batches = (replica..n_batches)
            .step_by(replicas)
            .map(|i| {
                let idx: Vec<usize> = (i * bs..((i + 1) * bs).min(ds.len())).collect();
                self.batch_of(ds, &idx)
            })
            .collect::<Result<Vec<_>>>()?;
        for b in &batches {
            runs_split(b, &self.model.config)?;
        }
        let Engine::ModelParallel(mp) = &mut self.engine else {
            return Err(TrainError::Args("not a model-parallel run".into()));
        };
        let (mut sum, mut count) = (0f64, 0usize);
        for b in &batches {
            if let Some((s, n)) = mp.trainer.forward_loss_sum(&b.input_ids, Some(&b.labels))? {
                sum += s;
                count += n;
            }
        }
        Ok((sum, count))
    }
}

/// What the split model runs exactly: rows of 1 to `n_positions` tokens
/// inside the vocabulary, padded (if at all) at the end of each row, where
/// causal attention never looks and the collator's labels skip the loss.
fn runs_split(b: &Batch, cfg: &crate::config::GPT2Config) -> Result<()> {
    let t = b.input_ids.first().map_or(0, Vec::len);
    if t == 0 || t > cfg.n_positions {
        return Err(TrainError::Args(format!(
            "a batch of rows of {t} tokens: between 1 and n_positions {}",
            cfg.n_positions
        )));
    }
    crate::cpu::inputs::check_token_ids(
        b.input_ids.iter().flatten().copied().max(),
        cfg.vocab_size,
    )
    .map_err(|e| TrainError::Args(e.to_string()))?;
    let right = b
        .attention_mask
        .iter()
        .all(|r| r.windows(2).all(|w| w[0] >= w[1]));
    if !right {
        return Err(TrainError::Args(
            "a batch padded on the left: the tensor- and pipeline-parallel path takes right \
             padding only (the collator's padding_side)"
                .into(),
        ));
    }
    Ok(())
}
