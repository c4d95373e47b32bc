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

fn bytes(name: String, v: PyValue) -> Result<(String, Vec<u8>)> {
    let b = crate::torch_file::to_bytes(&v).map_err(|e| io(&name, e))?;
    Ok((name, b))
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
        let (grouping, adam, run) = self.ds_info(e.loss_scaler.as_ref());
        let mut files = vec![bytes(
            ds::optim_states_name(rank),
            ds::optim_states(layout, &grouping, stage, rank, &full, &adam, &run.ds_config),
        )?];
        if stage == 3 || rank == 0 {
            let module = (stage < 3).then_some(full.fp32.as_slice());
            let tied = self.model.config.tie_word_embeddings;
            files.push(bytes(
                ds::model_states_name(stage, rank),
                ds::model_states(layout, &grouping, tied, module, &run),
            )?);
        }
        Ok(files)
    }

    /// A tensor/pipeline-parallel run's `global_stepN/` under DeepSpeed:
    /// its universal checkpoint (`zero::ds_checkpoint::universal`), made on
    /// rank 0 from the whole state gathered for the save; paths relative to
    /// the tag folder.
    pub(super) fn universal_files(&self, full: &FlatState) -> Result<Vec<(String, Vec<u8>)>> {
        let layout = self.engine.layout();
        let (grouping, adam, run) = self.ds_info(None);
        let tied = self.model.config.tie_word_embeddings;
        let mut files = vec![bytes(
            ds::model_states_name(run.stage, 0),
            ds::model_states(layout, &grouping, tied, Some(&full.fp32), &run),
        )?];
        for (name, v) in ds::universal_files(layout, &grouping, run.stage, full, &adam) {
            files.push(bytes(name, v)?);
        }
        Ok(files)
    }

    /// What DeepSpeed's files record of this run: its parameter groups,
    /// Adam's state and the run's counters (`scaler`: fp16's loss scaler).
    fn ds_info(
        &self,
        scaler: Option<&crate::zero::precision::LossScaler>,
    ) -> (Grouping, AdamInfo, RunInfo) {
        let ds = self.plan.deepspeed.as_ref();
        // Without an `optimizer` block transformers' Trainer builds AdamW
        // itself (two groups) and DeepSpeed partitions each group.
        let hf_optimizer = ds.is_none_or(|d| d.resolved.get("optimizer").is_none());
        let a = self.engine.adam();
        let grouping = Grouping::new(self.engine.layout(), hf_optimizer, a.weight_decay);
        let ds_config = PyValue::from_json(&ds.map(|d| d.resolved.clone()).unwrap_or_default());
        let base = self.plan.learning_rate;
        let adam = AdamInfo {
            step: self.engine.adam_steps(),
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
        let run = RunInfo {
            stage: self.engine.stage(),
            world: self.engine.data_parallel().1,
            global_steps: self.state.global_step as u64,
            global_samples: (self.state.global_step * self.plan.batch.train_batch_size) as u64,
            skipped_steps: self.engine.skipped_steps() as u64,
            lr_scheduler: self.ds_lr_scheduler(grouping.groups.len()),
            ds_config,
        };
        (grouping, adam, run)
    }

    /// The whole training state in `dir/<latest tag>/` (DeepSpeed's files
    /// of any stage and number of ranks), Adam's step and the steps an fp16
    /// overflow skipped (when recorded). The saved hyperparameters must be
    /// this run's; a dynamic loss scaler takes the saved position.
    pub(super) fn read_deepspeed(&mut self, dir: &Path) -> Result<(FlatState, u64, Option<u64>)> {
        if !dir.join("latest").is_file() {
            // A universal checkpoint (a tensor/pipeline-parallel run's, or
            // ds_to_universal's output).
            let tag = ds::tag_dir(dir, ds::LATEST_UNIVERSAL)?;
            let u = ds::read_universal(&tag, self.engine.layout())?;
            self.check_saved_groups(&tag, &u.groups)?;
            self.restore_loss_scaler(&tag, u.loss_scaler.as_ref())?;
            return Ok((u.state, u.step, None));
        }
        let ck = DsCheckpoint::open(&ds::latest_tag_dir(dir)?)?;
        self.check_saved_groups(&ck.dir, &ck.groups)?;
        let full = ck.full_state(self.engine.layout())?;
        self.restore_loss_scaler(&ck.dir, ck.loss_scaler.as_ref())?;
        Ok((full, ck.step, ck.skipped_steps))
    }

    /// A dynamic loss scaler takes the saved one's position.
    fn restore_loss_scaler(&mut self, dir: &Path, saved: Option<&PyValue>) -> Result<()> {
        let scaler = self.engine.zero_mut().and_then(|e| e.loss_scaler.as_mut());
        if let (Some(saved), Some(sc)) = (saved, scaler) {
            sc.restore(saved).map_err(|msg| TrainError::Io {
                path: dir.display().to_string(),
                msg,
            })?;
        }
        Ok(())
    }

    /// The saved parameter groups' hyperparameters must be this run's.
    fn check_saved_groups(&self, dir: &Path, groups: &[ds::GroupHyper]) -> Result<()> {
        let a = self.engine.adam();
        for g in groups {
            let wd_ok = g
                .weight_decay
                .is_some_and(|w| w == a.weight_decay || w == 0.0);
            if g.betas != (Some(a.beta1), Some(a.beta2)) || g.eps != Some(a.eps) || !wd_ok {
                return Err(TrainError::Io {
                    path: dir.display().to_string(),
                    msg: format!(
                        "a parameter group has betas {:?}, eps {:?}, weight_decay {:?}; this run \
                         has betas ({}, {}), eps {}, weight_decay {}: resume with the settings \
                         that wrote it",
                        g.betas, g.eps, g.weight_decay, a.beta1, a.beta2, a.eps, a.weight_decay
                    ),
                });
            }
        }
        Ok(())
    }
}
