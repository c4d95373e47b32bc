//! `resume_from_checkpoint`: a `checkpoint-N/` folder read back (ours,
//! transformers' Trainer's, or DeepSpeed's `global_stepN/` of any ZeRO
//! stage and rank count, or its universal checkpoint), its whole training
//! state rebuilt by parameter name and cut for this run's engine: another
//! ZeRO stage, or another
//! tensor × pipeline × data layout, with the data loader continuing at the
//! same example. `resume` checks each file first.

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde_json::{json, Value};

use super::engine::Engine;
use super::error::{io_err, Result, TrainError};
use super::output_dir::latest_checkpoint;
use super::resume;
use super::state::TrainerState;
use super::trainer::Trainer;
use crate::model::GPT2LMHeadModel;

impl Trainer {
    /// `resume_from_checkpoint`: load the checkpoint it names (or the latest).
    pub(crate) fn resume(&mut self) -> Result<()> {
        // (An output_dir that is a file was refused when train() took its lock.)
        let out_dir = PathBuf::from(&self.args.output_dir);
        let Some(r) = self.args.resume_from_checkpoint.clone() else {
            return Ok(());
        };
        let ckpt = if r == "latest" || r == "true" {
            latest_checkpoint(&out_dir).ok_or_else(|| {
                TrainError::Args(format!(
                    "no checkpoint-N folder in {} to resume from",
                    out_dir.display()
                ))
            })?
        } else {
            PathBuf::from(r)
        };
        self.load_checkpoint(&ckpt)?;
        if self.verbose && self.is_world_process_zero() {
            eprintln!(
                "resumed from {} at step {}",
                ckpt.display(),
                self.state.global_step
            );
        }
        Ok(())
    }

    /// Restore model, optimizer, scheduler position and trainer state (every
    /// rank calls it). The checkpoint's whole training state is rebuilt by
    /// parameter name — from `optimizer.pt` + `model.safetensors`, or from
    /// DeepSpeed's `global_stepN/` of any ZeRO stage — and each rank takes
    /// its part for this run's stage. The number of ranks must be the
    /// checkpoint's when it records its data loader (`rng_state.json`).
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let device = self.model.device().clone();
        resume::check_shape(dir, &self.model.config)?;
        let latest = [
            dir.join("latest"),
            dir.join(crate::zero::ds_checkpoint::LATEST_UNIVERSAL),
        ]
        .into_iter()
        .find(|f| f.is_file());
        let by_deepspeed = latest.is_some();
        // A DeepSpeed checkpoint's weights are its fp32 partitions (under
        // ZeRO-3 transformers writes no model.safetensors beside them).
        let mut model = if by_deepspeed {
            let cfg = crate::config::GPT2Config::from_file(&dir.join("config.json"))
                .map_err(|e| TrainError::Args(e.to_string()))?;
            GPT2LMHeadModel::new(&cfg, self.args.seed, &device)?
        } else {
            GPT2LMHeadModel::from_pretrained(
                dir.to_str()
                    .ok_or_else(|| TrainError::Args("checkpoint path is not UTF-8".into()))?,
                DType::F32,
                &device,
            )?
        };
        let st = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&st).map_err(io_err(&st))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::Io {
            path: st.display().to_string(),
            msg: e.to_string(),
        })?;
        resume::check_folder_step(dir, state.global_step)?;
        self.check_data_loader(dir, state.global_step)?;
        let (full, step_in_files, skipped_in_files, where_) = if by_deepspeed {
            let (full, step, skipped) = self.read_deepspeed(dir)?;
            (full, step, skipped, latest.unwrap_or_default())
        } else {
            let (full, step) = self.read_plain_state(dir, &model, state.global_step)?;
            (full, step, None, dir.join("optimizer.pt"))
        };
        // optimizer.json is ours (transformers writes none): it also counts
        // the steps an fp16 overflow skipped.
        let oj = dir.join("optimizer.json");
        let (adam_step, skipped_steps) = if oj.exists() {
            let o: Value = serde_json::from_str(
                &std::fs::read_to_string(&oj).map_err(io_err(&oj))?,
            )
            .map_err(|e| TrainError::Io {
                path: oj.display().to_string(),
                msg: e.to_string(),
            })?;
            resume::optimizer_steps(&o, &oj, state.global_step)?
        } else {
            let o =
                json!({ "step": step_in_files, "skipped_steps": skipped_in_files.unwrap_or(0) });
            resume::optimizer_steps(&o, &where_, state.global_step)?
        };
        if adam_step != step_in_files {
            return Err(TrainError::Io {
                path: where_.display().to_string(),
                msg: format!(
                    "Adam is at step {step_in_files}, optimizer.json says {adam_step}: the files \
                     of two checkpoints are mixed"
                ),
            });
        }
        // The run's dropout, not the checkpoint's: transformers loads a
        // checkpoint's weights into the model the script built.
        model.config.attn_pdrop = self.model.config.attn_pdrop;
        model.config.resid_pdrop = self.model.config.resid_pdrop;
        model.config.embd_pdrop = self.model.config.embd_pdrop;
        let at = where_.display().to_string();
        match &mut self.engine {
            Engine::Zero(e) => {
                e.load_full_state(&full, &at)?;
                crate::zero::layout::set_params(&model, &e.layout, &full.fp32)?;
                e.step = adam_step;
                e.skipped_steps = skipped_steps;
                let model = if e.mixed_precision() {
                    model.to_dtype(e.compute_dtype)?
                } else {
                    model
                };
                self.model = if e.stage() == 3 {
                    model.partitioned()
                } else {
                    model
                };
            }
            Engine::ModelParallel(p) => {
                // Cut again for this run's layout (a collective).
                let (t, l) = (&p.trainer, p.trainer.groups.layout);
                let trainer = crate::parallel::ParallelTrainer::from_full_state(
                    &model.config,
                    &full,
                    adam_step,
                    t.world.clone(),
                    (l.tp, l.pp),
                    t.optimizer.adam,
                    &t.stage.model.device()?,
                )
                .map_err(|e| TrainError::Io {
                    path: at.clone(),
                    msg: e.to_string(),
                })?;
                *p.trainer = trainer;
                self.model = model.partitioned();
            }
        }
        self.state = state;
        let rank0 = self.is_world_process_zero();
        self.state.is_local_process_zero = rank0;
        self.state.is_world_process_zero = rank0;
        Ok(())
    }

    /// `optimizer.pt` (and `scheduler.pt`'s position) with the weights of
    /// `model`, as a whole flat state; and Adam's step.
    fn read_plain_state(
        &self,
        dir: &Path,
        model: &GPT2LMHeadModel,
        global_step: usize,
    ) -> Result<(crate::zero::FlatState, u64)> {
        let of = dir.join("optimizer.pt");
        let adam = self.engine.adam();
        let saved = super::hf_checkpoint::read_optimizer_pt(&of, &model.config, &adam)?;
        let sf = dir.join("scheduler.pt");
        let last_epoch = super::hf_checkpoint::read_scheduler_pt(&sf)?;
        if last_epoch != global_step as i64 {
            return Err(TrainError::Io {
                path: sf.display().to_string(),
                msg: format!(
                    "the schedule is at step {last_epoch}, trainer_state.json's global_step is \
                     {global_step}"
                ),
            });
        }
        let layout = self.engine.layout();
        let fp32 = crate::zero::layout::flatten_params(model, layout)?;
        let (mut m, mut v) = (vec![0f32; layout.numel], vec![0f32; layout.numel]);
        for i in 0..layout.params.len() {
            let (a, b) = &saved.moments[layout.name(i)];
            let r = layout.range(i);
            m[r.clone()].copy_from_slice(a);
            v[r].copy_from_slice(b);
        }
        Ok((crate::zero::FlatState { fp32, m, v }, saved.step))
    }

    /// The loader a checkpoint recorded must be this run's: the same
    /// examples in the same order, or resuming would silently train on
    /// other data than the uninterrupted run (older checkpoints say nothing
    /// and are taken as they are). The number of data-parallel replicas may
    /// change (another layout) when each global micro-batch holds the same
    /// examples (per-replica batch × replicas) and the run continues at the
    /// recorded place.
    fn check_data_loader(&self, dir: &Path, global_step: usize) -> Result<()> {
        let f = dir.join("rng_state.json");
        let Some(v) = resume::rng_state(dir, global_step)? else {
            return Ok(());
        };
        let Some(saved) = v.get("data_loader") else {
            return Ok(());
        };
        let l = self.loader()?;
        let refuse = |what: String| {
            Err(TrainError::Args(format!(
                "{}: {what}: resume with the same training data, block size and batch \
                 arithmetic (per-rank batch × data-parallel ranks, gradient accumulation, \
                 dataloader_drop_last)",
                f.display()
            )))
        };
        let now = json!({"num_examples": l.len, "shuffle": l.shuffle, "world_size": l.world_size});
        let mut keys = vec!["num_examples", "shuffle"];
        let per_batch = |d: &Value| -> Option<u64> {
            Some(d.get("batch_size")?.as_u64()? * d.get("world_size")?.as_u64()?)
        };
        match per_batch(saved) {
            Some(n) if n != (l.batch_size * l.world_size) as u64 => {
                return refuse(format!(
                    "the checkpoint's global micro-batch held {n} examples ({} per replica × {} \
                     replicas), this run's holds {} ({} × {})",
                    saved["batch_size"],
                    saved["world_size"],
                    l.batch_size * l.world_size,
                    l.batch_size,
                    l.world_size
                ));
            }
            Some(_) => {}
            // Written before the batch size was recorded: the same ranks.
            None => keys.push("world_size"),
        }
        for key in keys {
            if saved.get(key) != now.get(key) {
                return refuse(format!(
                    "the checkpoint's data loader had {key} = {}, this run's has {}",
                    saved.get(key).unwrap_or(&Value::Null),
                    now[key]
                ));
            }
        }
        let (epoch, batch) = l.position(global_step * self.plan.batch.gradient_accumulation_steps);
        let at = (saved.get("epoch"), saved.get("batch_in_epoch"));
        if at != (Some(&json!(epoch)), Some(&json!(batch))) {
            return refuse(format!(
                "the checkpoint stopped at epoch {}, batch {} of its data loader; with this \
                 run's gradient_accumulation_steps ({}) and dataloader_drop_last ({}) step \
                 {global_step} would continue at epoch {epoch}, batch {batch}",
                at.0.unwrap_or(&Value::Null),
                at.1.unwrap_or(&Value::Null),
                self.plan.batch.gradient_accumulation_steps,
                l.drop_last
            ));
        }
        Ok(())
    }
}
