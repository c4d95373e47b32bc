//! A DeepSpeed run's `checkpoint-N/global_stepN/`: DeepSpeed's own files
//! (`zero::ds_checkpoint`), written by every rank for its partition, and
//! read back on resume. Reading rebuilds the whole model's fp32 weights and
//! Adam moments by name, so a checkpoint DeepSpeed wrote resumes here, and
//! one written with another ZeRO stage resumes too (each rank takes its
//! part of the whole; the trainer keeps the number of ranks, which decides
//! each rank's batches).

use std::path::Path;

use super::error::{Result, TrainError};
use super::plan::Schedule;
use super::trainer::Trainer;
use crate::torch_file::PyValue;
use crate::zero::ds_checkpoint::{self as ds, AdamInfo, DsCheckpoint, Grouping, RunInfo};
use crate::zero::FlatState;

fn io(name: &str, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io {
        path: name.into(),
        msg: e.to_string(),
    }
}

impl Trainer {
    /// The scheduler's state dict as DeepSpeed saves it: HF's `LambdaLR`
    /// (one entry per parameter group), or DeepSpeed's own schedulers'
    /// `last_batch_iteration`.
    fn ds_lr_scheduler(&self, groups: usize) -> PyValue {
        let base = self.plan.learning_rate;
        let step = self.state.global_step;
        match &self.plan.schedule {
            Schedule::Hf { .. } => {
                let now = self.plan.schedule.lr_at(step, base);
                super::hf_checkpoint::scheduler_pt(base, now, step, groups)
            }
            Schedule::DeepSpeed { .. } => PyValue::Dict(vec![(
                PyValue::str("last_batch_iteration"),
                PyValue::Int(step as i64 - 1),
            )]),
        }
    }

    /// This rank's files of `global_stepN/` (a collective: the whole
    /// state is gathered on every rank, 3 × 4 bytes per parameter, to cut
    /// stage 3's per-parameter pieces and rank 0's `module`).
    pub(super) fn deepspeed_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let e = self
            .engine
            .zero()
            .ok_or_else(|| TrainError::Args("DeepSpeed's files are the ZeRO engine's".into()))?;
        let (stage, rank, layout) = (e.stage(), e.rank(), &e.layout);
        let full = e.gather_full_state(&self.model)?;
        let ds = self.plan.deepspeed.as_ref();
        // Without an `optimizer` block transformers' Trainer builds AdamW
        // itself (two groups) and DeepSpeed partitions each group.
        let hf_optimizer = ds.is_none_or(|d| d.resolved.get("optimizer").is_none());
        let grouping = Grouping::new(layout, hf_optimizer, e.adam.weight_decay);
        let ds_config = PyValue::from_json(&ds.map(|d| d.resolved.clone()).unwrap_or_default());
        let base = self.plan.learning_rate;
        let a = e.adam;
        let scaler = e.loss_scaler.as_ref();
        let adam = AdamInfo {
            step: e.step,
            lr: self.plan.schedule.lr_at(self.state.global_step, base),
            base_lr: base,
            betas: (a.beta1, a.beta2),
            eps: a.eps,
            clip: self.plan.max_grad_norm,
            loss_scaler: scaler.map_or_else(
                || crate::zero::precision::LossScaler::unit().to_py(),
                |s| s.to_py(),
            ),
            dynamic_loss_scale: scaler.is_some_and(|s| s.dynamic),
        };
        let bytes = |name: String, v: PyValue| -> Result<(String, Vec<u8>)> {
            let b = crate::torch_file::to_bytes(&v).map_err(|e| io(&name, e))?;
            Ok((name, b))
        };
        let mut files = vec![bytes(
            ds::optim_states_name(rank),
            ds::optim_states(layout, &grouping, stage, rank, &full, &adam, &ds_config),
        )?];
        if stage == 3 || rank == 0 {
            let run = RunInfo {
                stage,
                world: e.world_size(),
                global_steps: self.state.global_step as u64,
                global_samples: (self.state.global_step * self.plan.batch.train_batch_size) as u64,
                skipped_steps: e.skipped_steps as u64,
                lr_scheduler: self.ds_lr_scheduler(grouping.groups.len()),
                ds_config,
            };
            let module = (stage < 3).then_some(full.fp32.as_slice());
            let tied = self.model.config.tie_word_embeddings;
            files.push(bytes(
                ds::model_states_name(stage, rank),
                ds::model_states(layout, &grouping, tied, module, &run),
            )?);
        }
        Ok(files)
    }

    /// The whole training state in `dir/<latest tag>/` (DeepSpeed's files
    /// of any stage and number of ranks), Adam's step and the steps an fp16
    /// overflow skipped (when recorded). The saved hyperparameters must be
    /// this run's; a dynamic loss scaler takes the saved position.
    pub(super) fn read_deepspeed(&mut self, dir: &Path) -> Result<(FlatState, u64, Option<u64>)> {
        let ck = DsCheckpoint::open(&ds::latest_tag_dir(dir)?)?;
        let a = self.engine.adam();
        for g in &ck.groups {
            let wd_ok = g
                .weight_decay
                .is_some_and(|w| w == a.weight_decay || w == 0.0);
            if g.betas != (Some(a.beta1), Some(a.beta2)) || g.eps != Some(a.eps) || !wd_ok {
                return Err(TrainError::Io {
                    path: ck.dir.display().to_string(),
                    msg: format!(
                        "a parameter group has betas {:?}, eps {:?}, weight_decay {:?}; this run \
                         has betas ({}, {}), eps {}, weight_decay {}: resume with the settings \
                         that wrote it",
                        g.betas, g.eps, g.weight_decay, a.beta1, a.beta2, a.eps, a.weight_decay
                    ),
                });
            }
        }
        let full = ck.full_state(self.engine.layout())?;
        let scaler = self.engine.zero_mut().and_then(|e| e.loss_scaler.as_mut());
        if let (Some(saved), Some(sc)) = (&ck.loss_scaler, scaler) {
            sc.restore(saved).map_err(|msg| TrainError::Io {
                path: ck.dir.display().to_string(),
                msg,
            })?;
        }
        Ok((full, ck.step, ck.skipped_steps))
    }
}
