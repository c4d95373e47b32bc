//! `output_dir/checkpoint-N/` folders: written atomically (a temporary
//! folder renamed into place), rotated by `save_total_limit`, loaded back
//! for `resume_from_checkpoint`; and `trainer.save_model`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::error::{io_err, Result, TrainError};
use super::state::{SchedulerState, TrainerState};
use super::trainer::Trainer;
use crate::model::GPT2LMHeadModel;

impl Trainer {
    /// `resume_from_checkpoint`: load the checkpoint it names (or the latest).
    pub(crate) fn resume(&mut self) -> Result<()> {
        let out_dir = PathBuf::from(&self.args.output_dir);
        if out_dir.exists() && !out_dir.is_dir() {
            return Err(TrainError::Args(format!(
                "output_dir {} exists and is not a folder",
                out_dir.display()
            )));
        }
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

    /// Files of a checkpoint folder (HF's, with safetensors/JSON for the
    /// PyTorch pickles: optimizer.safetensors + optimizer.json = optimizer.pt,
    /// scheduler.json = scheduler.pt, rng_state.json = rng_state.pth,
    /// training_args.json = training_args.bin). Under DeepSpeed the Adam
    /// moments are in each rank's shard instead (see `save_checkpoint`).
    fn checkpoint_files(&self, model: &GPT2LMHeadModel) -> Result<Vec<(String, Vec<u8>)>> {
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
        if self.deepspeed.is_none() {
            // Optimizer moments by parameter name.
            let mut tensors: Vec<(String, Tensor)> = Vec::new();
            for (name, m, v) in self.engine.moments_by_name()? {
                let shape = model
                    .named_parameters()
                    .into_iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.shape().clone());
                let shape =
                    shape.ok_or_else(|| TrainError::Args(format!("no parameter {name}")))?;
                tensors.push((
                    format!("{name}.exp_avg"),
                    Tensor::from_vec(m, shape.clone(), &Device::Cpu)?,
                ));
                tensors.push((
                    format!("{name}.exp_avg_sq"),
                    Tensor::from_vec(v, shape, &Device::Cpu)?,
                ));
            }
            let opt = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
                .map_err(|e| TrainError::Io {
                    path: "optimizer.safetensors".into(),
                    msg: e.to_string(),
                })?;
            files.push(("optimizer.safetensors".into(), opt));
        } else {
            files.push((
                "latest".into(),
                format!("global_step{}", self.state.global_step).into_bytes(),
            ));
        }
        let a = self.engine.adam;
        let lr = self
            .deepspeed
            .as_ref()
            .and_then(|d| d.optimizer.as_ref())
            .map_or(self.args.learning_rate, |o| o.lr);
        files.push((
            "optimizer.json".into(),
            crate::hf_json::dumps(&json!({"type": "AdamW", "step": self.engine.step, "lr": lr,
                "betas": [a.beta1, a.beta2], "eps": a.eps, "weight_decay": a.weight_decay,
                "zero_stage": self.engine.stage, "world_size": self.engine.world_size(),
                "skipped_steps": self.engine.skipped_steps}))
            .into_bytes(),
        ));
        let total = self.state.max_steps;
        let sched = SchedulerState {
            kind: self.args.lr_scheduler_type,
            base_lr: self.args.learning_rate,
            warmup_steps: self.args.num_warmup_steps(total),
            total_steps: total,
            last_epoch: self.state.global_step,
        };
        files.push((
            "scheduler.json".into(),
            serde_json::to_vec_pretty(&sched).expect("json"),
        ));
        files.push((
            "rng_state.json".into(),
            crate::hf_json::dumps(&json!({"seed": self.args.seed, "global_step": self.state.global_step,
                "note": "data order and dropout are functions of (seed, step), so this is all the RNG state"}))
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
            let tf = tok
                .pretrained_files()
                .map_err(|e| TrainError::Args(e.to_string()))?;
            files.extend(tf.into_iter().map(|(n, b)| (n.to_string(), b)));
        }
        Ok(files)
    }

    pub(crate) fn barrier(&self) -> Result<()> {
        Ok(self.engine.comm.barrier()?)
    }

    /// Write `output_dir/checkpoint-N/` (every rank calls it): into a
    /// temporary folder first, renamed into place only when complete, so a
    /// crash never leaves a partial checkpoint; then apply `save_total_limit`.
    /// Under DeepSpeed each rank adds its shard as
    /// `global_stepN/zero_pp_rank_R_mp_rank_00_optim_states.safetensors`
    /// (DeepSpeed's names) and `model.safetensors` holds the consolidated
    /// weights, so the folder also loads as a plain HF model.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let out = PathBuf::from(&self.args.output_dir);
        let name = format!("checkpoint-{}", self.state.global_step);
        let dest = out.join(&name);
        let tmp = out.join(format!(".{name}.partial"));
        let rank0 = self.is_world_process_zero();
        let full = if self.engine.stage == 3 || self.engine.mixed_precision() {
            Some(self.full_model()?)
        } else {
            None
        };
        let shard_dir = tmp.join(format!("global_step{}", self.state.global_step));
        if rank0 {
            std::fs::create_dir_all(&out).map_err(io_err(&out))?;
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
            }
            let d = if self.deepspeed.is_some() {
                &shard_dir
            } else {
                &tmp
            };
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        self.barrier()?;
        let written = (|| -> Result<()> {
            if self.deepspeed.is_some() {
                let f = shard_dir.join(format!(
                    "zero_pp_rank_{}_mp_rank_00_optim_states.safetensors",
                    self.engine.rank()
                ));
                let shard = self.engine.shard()?;
                let meta: HashMap<String, String> = [
                    ("zero_stage".to_string(), self.engine.stage.to_string()),
                    (
                        "world_size".to_string(),
                        self.engine.world_size().to_string(),
                    ),
                    ("rank".to_string(), self.engine.rank().to_string()),
                    ("step".to_string(), self.engine.step.to_string()),
                ]
                .into();
                let bytes =
                    safetensors::serialize(shard.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
                        .map_err(|e| TrainError::Io {
                            path: f.display().to_string(),
                            msg: e.to_string(),
                        })?;
                std::fs::write(&f, bytes).map_err(io_err(&f))?;
            }
            Ok(())
        })();
        if let Err(e) = written {
            self.engine.comm.abort(&e.to_string());
            return Err(e);
        }
        self.barrier()?;
        if rank0 {
            let result = (|| -> Result<()> {
                let model = full.as_ref().unwrap_or(&self.model);
                let files = self.checkpoint_files(model)?;
                for (i, (f, bytes)) in files.iter().enumerate() {
                    if self.faults.fail_checkpoint_at_step == Some(self.state.global_step)
                        && i == files.len() / 2
                    {
                        return Err(TrainError::Io {
                            path: tmp.join(f).display().to_string(),
                            msg: "injected failure while writing the checkpoint".into(),
                        });
                    }
                    std::fs::write(tmp.join(f), bytes).map_err(io_err(&tmp.join(f)))?;
                }
                if dest.exists() {
                    std::fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
                }
                std::fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
                if let Some(limit) = self.args.save_total_limit {
                    let mut ckpts = list_checkpoints(&out);
                    while ckpts.len() > limit.max(1) {
                        let (_, p) = ckpts.remove(0);
                        std::fs::remove_dir_all(&p).map_err(io_err(&p))?;
                    }
                }
                Ok(())
            })();
            if let Err(e) = result {
                let _ = std::fs::remove_dir_all(&tmp);
                self.engine.comm.abort(&e.to_string());
                return Err(e);
            }
        }
        self.barrier()?;
        Ok(dest)
    }

    /// Restore model, optimizer, scheduler position and trainer state (every
    /// rank calls it; a DeepSpeed checkpoint needs the world size and ZeRO
    /// stage that wrote it).
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let device = self.model.device().clone();
        let model = GPT2LMHeadModel::from_pretrained(
            dir.to_str()
                .ok_or_else(|| TrainError::Args("checkpoint path is not UTF-8".into()))?,
            DType::F32,
            &device,
        )?;
        let st = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&st).map_err(io_err(&st))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::Io {
            path: st.display().to_string(),
            msg: e.to_string(),
        })?;
        let oj = dir.join("optimizer.json");
        let o: Value = serde_json::from_str(&std::fs::read_to_string(&oj).map_err(io_err(&oj))?)
            .map_err(|e| TrainError::Io {
                path: oj.display().to_string(),
                msg: e.to_string(),
            })?;
        let (stage, world) = (self.engine.stage as u64, self.engine.world_size() as u64);
        let saved_stage = o["zero_stage"].as_u64().unwrap_or(0);
        let saved_world = o["world_size"].as_u64().unwrap_or(1);
        if self.deepspeed.is_some() && (saved_stage != stage || saved_world != world) {
            return Err(TrainError::Io {
                path: oj.display().to_string(),
                msg: format!(
                    "written by ZeRO stage {saved_stage} on {saved_world} ranks; this run is stage {stage} on {world} ranks (resume with the same stage and world size)"
                ),
            });
        }
        if self.deepspeed.is_some() {
            let latest = dir.join("latest");
            let tag = std::fs::read_to_string(&latest).map_err(io_err(&latest))?;
            let f = dir.join(tag.trim()).join(format!(
                "zero_pp_rank_{}_mp_rank_00_optim_states.safetensors",
                self.engine.rank()
            ));
            let t =
                candle_core::safetensors::load(&f, &Device::Cpu).map_err(|e| TrainError::Io {
                    path: f.display().to_string(),
                    msg: e.to_string(),
                })?;
            self.engine.load_shard(&t, &f.display().to_string())?;
        } else {
            let of = dir.join("optimizer.safetensors");
            let t =
                candle_core::safetensors::load(&of, &Device::Cpu).map_err(|e| TrainError::Io {
                    path: of.display().to_string(),
                    msg: e.to_string(),
                })?;
            let mut named: HashMap<String, (Vec<f32>, Vec<f32>)> = HashMap::new();
            for (k, v) in t {
                let data: Vec<f32> = v.flatten_all()?.to_vec1()?;
                if let Some(n) = k.strip_suffix(".exp_avg_sq") {
                    named.entry(n.to_string()).or_default().1 = data;
                } else if let Some(n) = k.strip_suffix(".exp_avg") {
                    named.entry(n.to_string()).or_default().0 = data;
                }
            }
            self.engine.set_moments_by_name(&named)?;
        }
        self.engine.step = o["step"].as_u64().unwrap_or(0);
        self.engine.skipped_steps = o["skipped_steps"].as_u64().unwrap_or(0) as usize;
        self.engine.load_full_params(&model)?;
        let model = if self.engine.mixed_precision() {
            model.to_dtype(self.engine.compute_dtype)?
        } else {
            model
        };
        if self.engine.stage == 3 {
            self.model = model.partitioned();
        } else {
            self.model = model;
        }
        self.state = state;
        let rank0 = self.is_world_process_zero();
        self.state.is_local_process_zero = rank0;
        self.state.is_world_process_zero = rank0;
        Ok(())
    }

    /// `trainer.save_model(dir)`: a model folder Python `transformers` loads
    /// (config, weights, generation config, tokenizer). Every rank calls it;
    /// rank 0 writes (under ZeRO-3 after gathering the weights).
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        let full = if self.engine.stage == 3 || self.engine.mixed_precision() {
            Some(self.full_model()?)
        } else {
            None
        };
        if !self.is_world_process_zero() {
            return Ok(());
        }
        let model = full.as_ref().unwrap_or(&self.model);
        model.save_pretrained(dir)?;
        let mut gen = crate::generate::GenerationConfig::from_model_config(&model.config);
        if gen.pad_token_id.is_none() {
            gen.pad_token_id = self.tokenizer.as_ref().and_then(|t| t.pad_token_id());
        }
        gen.save_pretrained(dir).map_err(io_err(dir))?;
        if let Some(tok) = &self.tokenizer {
            tok.save_pretrained(dir)
                .map_err(|e| TrainError::Args(e.to_string()))?;
        }
        Ok(())
    }
}

/// `checkpoint-N` folders of `dir`, oldest first.
pub fn list_checkpoints(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().is_dir().then(|| (n, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// The newest complete checkpoint (`get_last_checkpoint`).
pub fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    list_checkpoints(dir).pop().map(|(_, p)| p)
}
