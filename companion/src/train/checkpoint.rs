//! `output_dir/checkpoint-N/` folders: written atomically (a temporary
//! folder renamed into place), rotated by `save_total_limit` (read back by
//! `load_checkpoint`); and `trainer.save_model`.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::error::{io_err, Result, TrainError};
use super::output_dir::{kept_checkpoint, list_checkpoints};
use super::trainer::Trainer;
use crate::model::GPT2LMHeadModel;
use crate::zero::{FlatLayout, FlatState, NamedMoments};

impl Trainer {
    /// Files of a checkpoint folder (rank 0's): transformers' — the model,
    /// `optimizer.pt` and `scheduler.pt` as its Trainer writes them
    /// (`hf_checkpoint`; under DeepSpeed Adam's state is in `global_stepN/`
    /// instead, and `latest` names it, or `latest_universal` a
    /// tensor/pipeline-parallel run's universal checkpoint, which this
    /// function adds), `trainer_state.json` — and our JSON
    /// beside them: `optimizer.json` (Adam's step and fp16-skipped steps),
    /// `scheduler.json`, `rng_state.json` (the data loader's place; our
    /// RNG streams are not torch's, so there is no `rng_state.pth`),
    /// `training_args.json`.
    /// `gathered`: the whole state, when it was gathered for this save.
    fn checkpoint_files(
        &self,
        model: &GPT2LMHeadModel,
        gathered: Option<&FlatState>,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let mut files: Vec<(String, Vec<u8>)> = model
            .pretrained_files()?
            .into_iter()
            .map(|(n, b)| (n.to_string(), b))
            .collect();
        let gen = crate::generate::GenerationConfig::from_model_config(&model.config);
        files.push((
            "generation_config.json".into(),
            gen.to_json_string().into_bytes(),
        ));
        let base = self.plan.learning_rate;
        let now = self.plan.schedule.lr_at(self.state.global_step, base);
        let pt = |name: &str, v: crate::torch_file::PyValue| {
            crate::torch_file::to_bytes(&v)
                .map(|b| (name.to_string(), b))
                .map_err(|e| TrainError::Io {
                    path: name.into(),
                    msg: e.to_string(),
                })
        };
        let sched = || super::hf_checkpoint::scheduler_pt(base, now, self.state.global_step, 2);
        if !self.writes_deepspeed_files() && !self.writes_universal() {
            // Adam's state as transformers' Trainer writes it (the one copy:
            // resuming reads it back, here and in Python).
            let moments = match (gathered, self.engine.zero()) {
                (Some(full), _) => named_moments(self.engine.layout(), full),
                (None, Some(e)) => e.moments_by_name()?,
                (None, None) => {
                    return Err(TrainError::Args(
                        "a model-parallel checkpoint needs the gathered state".into(),
                    ))
                }
            };
            let opt_pt = super::hf_checkpoint::optimizer_pt(
                &model.config,
                &moments,
                self.engine.adam_steps(),
                now,
                base,
                &self.engine.adam(),
            )?;
            files.push(pt("optimizer.pt", opt_pt)?);
            files.push(pt("scheduler.pt", sched())?);
        } else {
            let tag = format!("global_step{}", self.state.global_step);
            if self.writes_universal() {
                let full = gathered.ok_or_else(|| {
                    TrainError::Args("a universal checkpoint needs the gathered state".into())
                })?;
                for (name, bytes) in self.universal_files(full)? {
                    files.push((format!("{tag}/{name}"), bytes));
                }
                let latest = crate::zero::ds_checkpoint::LATEST_UNIVERSAL;
                files.push((latest.into(), tag.into_bytes()));
            } else {
                files.push(("latest".into(), tag.into_bytes()));
            }
            // With neither an optimizer nor a scheduler in the ds_config,
            // transformers' Trainer builds its own LambdaLR beside DeepSpeed
            // and reads its position from scheduler.pt.
            let resolved = self.plan.deepspeed.as_ref().map(|d| &d.resolved);
            if resolved
                .is_some_and(|r| r.get("optimizer").is_none() && r.get("scheduler").is_none())
            {
                files.push(pt("scheduler.pt", sched())?);
            }
        }
        let a = self.engine.adam();
        let lr = self.plan.learning_rate;
        let l = self.plan.layout;
        files.push((
            "optimizer.json".into(),
            crate::hf_json::dumps(
                &json!({"type": "AdamW", "step": self.engine.adam_steps(), "lr": lr,
                "betas": [a.beta1, a.beta2], "eps": a.eps, "weight_decay": a.weight_decay,
                "zero_stage": self.engine.stage(), "world_size": self.engine.world_size(),
                "tensor_model_parallel_size": l.tp, "pipeline_model_parallel_size": l.pp,
                "skipped_steps": self.engine.skipped_steps()}),
            )
            .into_bytes(),
        ));
        let sched = self
            .plan
            .schedule
            .state_json(self.plan.learning_rate, self.state.global_step);
        files.push((
            "scheduler.json".into(),
            serde_json::to_vec_pretty(&sched).expect("json"),
        ));
        let loader = self.loader()?;
        let (epoch, batch) =
            loader.position(self.state.global_step * self.plan.batch.gradient_accumulation_steps);
        files.push((
            "rng_state.json".into(),
            crate::hf_json::dumps(&json!({"seed": self.args.seed, "global_step": self.state.global_step,
                "data_loader": {"epoch": epoch, "batch_in_epoch": batch,
                    "batches_per_epoch": loader.batches_per_epoch(), "num_examples": loader.len,
                    "shuffle": loader.shuffle, "world_size": loader.world_size,
                    "batch_size": loader.batch_size},
                "note": "data order and dropout are functions of (seed, step): resuming seeks to data_loader's place"}))
            .into_bytes(),
        ));
        files.push((
            "trainer_state.json".into(),
            self.state.to_json_string().into_bytes(),
        ));
        files.push((
            "training_args.json".into(),
            crate::hf_json::dumps(&serde_json::to_value(&self.args).expect("json")).into_bytes(),
        ));
        if let Some(tok) = &self.tokenizer {
            let tf = tok.pretrained_files()?;
            files.extend(tf.into_iter().map(|(n, b)| (n.to_string(), b)));
        }
        Ok(files)
    }

    pub(crate) fn barrier(&self) -> Result<()> {
        Ok(self.engine.comm().barrier()?)
    }

    /// Whether Adam's state goes into DeepSpeed's `global_stepN/` files
    /// (each rank its partition): under a ds_config on the data-parallel
    /// path.
    pub(super) fn writes_deepspeed_files(&self) -> bool {
        self.plan.zero.is_deepspeed() && self.engine.zero().is_some()
    }

    /// Whether Adam's state goes into DeepSpeed's universal checkpoint
    /// (written by rank 0 from the gathered state): under a ds_config on
    /// the tensor/pipeline-parallel path, whose layout DeepSpeed's own
    /// files could not be loaded on another one without a conversion.
    pub(super) fn writes_universal(&self) -> bool {
        self.plan.zero.is_deepspeed() && self.engine.zero().is_none()
    }

    /// Write `output_dir/checkpoint-N/` (every rank calls it): into a
    /// temporary folder first, renamed into place only when complete, so a
    /// crash never leaves a partial checkpoint; then apply `save_total_limit`.
    /// Under DeepSpeed every rank adds its files of `global_stepN/` in
    /// DeepSpeed's own layout (`ds_files`), and `model.safetensors` holds
    /// the consolidated weights, so the folder also loads as a plain HF model.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let out = PathBuf::from(&self.args.output_dir);
        let step = self.state.global_step;
        let name = format!("checkpoint-{step}");
        let dest = out.join(&name);
        // Named per run, so a partial folder is never another run's.
        let tmp = out.join(format!(".{name}.partial-{}", self.run_tag()?));
        let rank0 = self.is_world_process_zero();
        let (gathered, full) = self.model_for_saving()?;
        self.refuse_non_finite(full.as_ref(), &out)?;
        let tag_dir = tmp.join(format!("global_step{step}"));
        if rank0 {
            std::fs::create_dir_all(&out).map_err(io_err(&out))?;
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
            }
            let d = if self.writes_deepspeed_files() {
                &tag_dir
            } else {
                &tmp
            };
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        self.barrier()?;
        let written = (|| -> Result<()> {
            if self.writes_deepspeed_files() {
                for (name, bytes) in self.deepspeed_files()? {
                    write_synced(&tag_dir.join(name), &bytes)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = written {
            self.engine.comm().abort(&e.to_string());
            return Err(e);
        }
        self.barrier()?;
        if rank0 {
            let result = (|| -> Result<()> {
                let model = full.as_ref().unwrap_or(&self.model);
                let files = self.checkpoint_files(model, gathered.as_ref())?;
                for (i, (f, bytes)) in files.iter().enumerate() {
                    if self.faults.fail_checkpoint_at_step == Some(step) && i == files.len() / 2 {
                        return Err(TrainError::Io {
                            path: tmp.join(f).display().to_string(),
                            msg: "injected failure while writing the checkpoint".into(),
                        });
                    }
                    let path = tmp.join(f);
                    if let Some(dir) = path.parent().filter(|_| f.contains('/')) {
                        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
                    }
                    write_synced(&path, bytes)?;
                }
                if dest.exists() {
                    remove_dir_safely(&dest)?;
                }
                std::fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
                // transformers deletes nothing when the limit is ≤ 0, and
                // ignores a folder it cannot delete (rmtree ignore_errors):
                // the run goes on, with a warning here.
                if let Some(limit) = self.args.save_total_limit.filter(|&l| l > 0) {
                    let mut ckpts = list_checkpoints(&out);
                    while ckpts.len() > limit {
                        let (_, p) = ckpts.remove(0);
                        let removed = if self.faults.fail_rotation {
                            Err(TrainError::Io {
                                path: p.display().to_string(),
                                msg: "injected failure while deleting".into(),
                            })
                        } else {
                            remove_dir_safely(&p)
                        };
                        if let Err(e) = removed {
                            eprintln!(
                                "warning: save_total_limit {limit}: could not delete an old \
                                 checkpoint, kept it and went on: {e}"
                            );
                        }
                    }
                }
                Ok(())
            })();
            if let Err(e) = result {
                let _ = std::fs::remove_dir_all(&tmp);
                self.engine.comm().abort(&e.to_string());
                return Err(e);
            }
        }
        self.barrier()?;
        Ok(dest)
    }

    /// A checkpoint whose weights or optimizer state hold a NaN or an
    /// infinity is never written (every rank checks its own state; rank 0
    /// also the weights it would save): resuming from it could only fail
    /// again, and rotation would delete the last good one.
    fn refuse_non_finite(&self, full: Option<&GPT2LMHeadModel>, out: &Path) -> Result<()> {
        let mut bad = !self.engine.state_is_finite()?;
        if self.is_world_process_zero() && !bad {
            let model = full.unwrap_or(&self.model);
            for (_, v) in model.named_parameters() {
                if !crate::model::all_finite(v.as_tensor())? {
                    bad = true;
                    break;
                }
            }
        }
        let bad_ranks = self
            .engine
            .comm()
            .all_reduce_f64(if bad { 1.0 } else { 0.0 })?;
        if bad_ranks == 0.0 {
            return Ok(());
        }
        let kept = kept_checkpoint(&out.to_string_lossy());
        Err(TrainError::NonFinite(format!(
            "the weights or optimizer state are not finite (NaN or infinity) at step {}: \
             checkpoint-{} was not written and {kept} (lower the learning_rate)",
            self.state.global_step, self.state.global_step
        )))
    }

    /// `trainer.save_model(dir)`: a model folder Python `transformers` loads
    /// (config, weights, generation config, tokenizer), replacing `dir` as
    /// a whole. Every rank calls it; rank 0 writes (under ZeRO-3 after
    /// gathering the weights).
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        let (_, full) = self.model_for_saving()?;
        if !self.is_world_process_zero() {
            return Ok(());
        }
        let model = full.as_ref().unwrap_or(&self.model);
        let mut files: Vec<(String, Vec<u8>)> = model
            .pretrained_files()?
            .into_iter()
            .map(|(n, b)| (n.to_string(), b))
            .collect();
        let mut gen = crate::generate::GenerationConfig::from_model_config(&model.config);
        if gen.pad_token_id.is_none() {
            gen.pad_token_id = self.tokenizer.as_ref().and_then(|t| t.pad_token_id());
        }
        files.push((
            "generation_config.json".into(),
            gen.to_json_string().into_bytes(),
        ));
        if let Some(tok) = &self.tokenizer {
            let tf = tok.pretrained_files()?;
            files.extend(tf.into_iter().map(|(n, b)| (n.to_string(), b)));
        }
        // The folder is staged whole and swapped in by one rename: a full
        // disk or a kill never leaves new weights beside an old config.
        let refs: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        crate::atomic_write::replace_folder(dir, &refs).map_err(io_err(dir))
    }

    /// `trainer.save_state()`: the final `trainer_state.json` in
    /// `output_dir`, beside the checkpoints (rank 0 writes it).
    pub fn save_state(&self) -> Result<()> {
        if !self.is_world_process_zero() {
            return Ok(());
        }
        let path = Path::new(&self.args.output_dir).join("trainer_state.json");
        crate::atomic_write::write_file_atomically(&path, self.state.to_json_string().as_bytes())
            .map_err(io_err(&path))
    }

    /// `loss.svg` and `loss.png` of `log_history` in `output_dir` (rank 0).
    pub fn save_loss_plot(&self) -> std::result::Result<(), String> {
        if !self.is_world_process_zero() {
            return Ok(());
        }
        super::plot::save_loss_plot(&self.state, Path::new(&self.args.output_dir))
    }
}

/// Write a file and flush it to disk before the folder holding it is
/// renamed into place.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Delete a checkpoint folder by first renaming it aside (one atomic step),
/// so a crash while deleting never leaves a half-deleted `checkpoint-N`
/// that looks complete; the aside folder is removed at the next start.
fn remove_dir_safely(dir: &Path) -> Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string());
    let aside = dir.with_file_name(format!(
        ".{}.deleting-{}",
        name.unwrap_or_default(),
        std::process::id()
    ));
    std::fs::rename(dir, &aside).map_err(io_err(dir))?;
    std::fs::remove_dir_all(&aside).map_err(io_err(&aside))
}

/// Adam's moments by parameter name from a whole flat state.
fn named_moments(layout: &FlatLayout, full: &FlatState) -> Vec<NamedMoments> {
    (0..layout.params.len())
        .map(|i| {
            let r = layout.range(i);
            (
                layout.name(i).to_string(),
                full.m[r.clone()].to_vec(),
                full.v[r].to_vec(),
            )
        })
        .collect()
}
