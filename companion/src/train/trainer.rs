//! `Trainer(model, args, data_collator, train_dataset, eval_dataset,
//! processing_class)`: every optimizer step goes through the ZeRO engine
//! (plain AdamW on one rank without DeepSpeed) or, when the model is split
//! over ranks, the 3D-parallel trainer (`model_parallel`), with gradient accumulation,
//! clipping, HF's schedules, logging into `log_history`, evaluation and
//! checkpoints at their intervals.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde_json::json;

use super::args::{IntervalStrategy, TrainingArguments};
use super::callback::TrainerCallback;
use super::engine::{Engine, ModelParallel};
use super::error::{Result, TrainError};
use super::logging::{log_entry, train_metrics, Live, LogWindow, Sinks, StepReport};
use super::plan::TrainPlan;
use super::state::{TrainOutput, TrainerState};
use crate::data::{Batch, DataCollatorForLanguageModeling, DataLoader, Dataset};
use crate::model::{GPT2LMHeadModel, GradientPath};
use crate::tokenizer::AutoTokenizer;
use crate::zero::comm::{Communicator, SingleRank};
use crate::zero::ZeroEngine;

/// Hooks for tests: fail halfway through writing the checkpoint of step N;
/// make the gradients of a step overflow.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultInjection {
    pub fail_checkpoint_at_step: Option<usize>,
    /// Make the gradients of this (1-based) step overflow, as fp16 can.
    pub overflow_at_step: Option<usize>,
    /// Make deleting old checkpoints (save_total_limit) fail.
    pub fail_rotation: bool,
}

/// `Trainer(model, args, data_collator, train_dataset, eval_dataset, tokenizer)`.
pub struct Trainer {
    pub model: GPT2LMHeadModel,
    pub args: TrainingArguments,
    pub collator: DataCollatorForLanguageModeling,
    pub train_dataset: Dataset,
    pub eval_dataset: Option<Dataset>,
    pub tokenizer: Option<AutoTokenizer>,
    pub state: TrainerState,
    /// The run's settings, resolved from `args` and its ds_config when
    /// built and again when `train()` starts (so changes to `args` in
    /// between count, as in transformers).
    pub plan: TrainPlan,
    /// The optimizer and its ZeRO partitioning (stage 0 on one rank without
    /// DeepSpeed: plain AdamW), or the 3D-parallel trainer holding this
    /// rank's shards.
    pub engine: Engine,
    /// How gradients are computed, chosen once: candle's autograd, the
    /// fused CPU kernels, or block by block (ZeRO-3, gradient checkpointing).
    pub gradient_path: GradientPath,
    #[doc(hidden)]
    pub faults: FaultInjection,
    /// Print log lines to stderr (the notebooks turn this off).
    pub verbose: bool,
    /// Shuffle the training examples each epoch (seeded); tests turn it off.
    pub shuffle: bool,
    /// Rank 0's process id once known (names partial checkpoint folders).
    pub(crate) run_tag: u64,
    /// Micro-batches this rank has collated (a resumed run reads only the
    /// steps it trains: tests check no batch is replayed to get there).
    #[doc(hidden)]
    pub batches_read: usize,
    /// HF's `callbacks`: told after every step, they may stop training.
    callbacks: Vec<Box<dyn TrainerCallback>>,
    /// The last `evaluate()` and the step it was made at.
    pub(crate) last_eval: Option<(usize, super::state::EvalMetrics)>,
}

/// Logging, evaluation and saving intervals in steps (0: never).
struct Intervals {
    logging: usize,
    eval: usize,
    save: usize,
}

impl Intervals {
    /// Whether the loop evaluates after `step` (the last step's evaluation
    /// comes after the loop).
    fn evaluates_after(&self, step: usize, total: usize) -> bool {
        self.eval > 0 && step.is_multiple_of(self.eval) && step != total
    }
}

impl Trainer {
    pub fn new(
        model: GPT2LMHeadModel,
        args: TrainingArguments,
        collator: DataCollatorForLanguageModeling,
        train_dataset: Dataset,
        eval_dataset: Option<Dataset>,
        tokenizer: Option<AutoTokenizer>,
    ) -> Result<Self> {
        Self::new_distributed(
            model,
            args,
            collator,
            train_dataset,
            eval_dataset,
            tokenizer,
            Arc::new(SingleRank),
        )
    }

    /// The Trainer of one rank of `comm`'s group: every rank builds one with
    /// the same arguments and calls `train()`; rank 0 logs and writes the
    /// shared files. `args.deepspeed` picks the ZeRO stage and offload.
    pub fn new_distributed(
        mut model: GPT2LMHeadModel,
        args: TrainingArguments,
        collator: DataCollatorForLanguageModeling,
        train_dataset: Dataset,
        eval_dataset: Option<Dataset>,
        tokenizer: Option<AutoTokenizer>,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let world = comm.world_size();
        let layout = TrainPlan::parallel_layout(&args, world)?;
        let replica = layout.coords(comm.rank()).dp;
        let batches_per_epoch =
            data_loader(&args, train_dataset.len(), replica, layout.dp, true)?.batches_per_epoch();
        let plan = TrainPlan::resolve(&args, world, &model.config, batches_per_epoch)?;
        let dtype = plan.precision.dtype();
        let gradient_path =
            GradientPath::choose(&model.config, model.device(), dtype, plan.recompute);
        let rank0 = comm.rank() == 0;
        let engine = if layout.tp * layout.pp > 1 {
            if collator.padding_side == crate::tokenizer::PaddingSide::Left {
                return Err(TrainError::Args(
                    "tensor/pipeline parallelism takes batches padded on the right (causal \
                     attention never looks at the end of a row); the collator pads on the left"
                        .into(),
                ));
            }
            let weights: Vec<(String, Tensor)> = model.named_tensors();
            let trainer = crate::parallel::ParallelTrainer::new(
                &model.config,
                &weights,
                comm,
                layout.tp,
                layout.pp,
                plan.adamw,
            )?;
            let flat = crate::zero::FlatLayout::new(&model.config, world);
            // The rank holds only its shards (inside the 3D trainer).
            model = model.partitioned();
            Engine::ModelParallel(ModelParallel {
                trainer: Box::new(trainer),
                layout: flat,
                activations_held: 0,
                last_bubble: 0.0,
            })
        } else {
            let engine = ZeroEngine::new(&model, plan.zero, plan.adamw, comm)?
                .with_precision(&model, &plan.precision)?;
            if dtype != DType::F32 {
                // The half-precision copy forward and backward run on.
                model = model.to_dtype(dtype)?;
            }
            if plan.zero.stage() == 3 {
                // The rank now holds only its partition (inside the engine).
                model = model.partitioned();
            }
            Engine::Zero(engine)
        };
        Ok(Trainer {
            model,
            collator,
            train_dataset,
            eval_dataset,
            tokenizer,
            state: TrainerState {
                epoch: 0.0,
                global_step: 0,
                max_steps: 0,
                logging_steps: 0,
                eval_steps: 0,
                save_steps: 0,
                train_batch_size: args.per_device_train_batch_size,
                num_train_epochs: args.num_train_epochs.ceil() as usize,
                num_input_tokens_seen: 0,
                total_flos: 0.0,
                log_history: vec![],
                best_metric: None,
                best_global_step: None,
                best_model_checkpoint: None,
                is_local_process_zero: rank0,
                is_world_process_zero: rank0,
                is_hyper_param_search: false,
                trial_name: None,
                trial_params: None,
                stateful_callbacks: json!({}),
            },
            plan,
            engine,
            gradient_path,
            args,
            faults: FaultInjection::default(),
            verbose: true,
            shuffle: true,
            run_tag: 0,
            batches_read: 0,
            callbacks: Vec::new(),
            last_eval: None,
        })
    }

    /// HF: `trainer.add_callback(callback)`.
    pub fn add_callback(&mut self, callback: impl TrainerCallback + 'static) {
        self.callbacks.push(Box::new(callback));
    }

    /// Rank 0 of the group (it logs and writes shared files).
    pub fn is_world_process_zero(&self) -> bool {
        self.engine.rank() == 0
    }

    /// Hand the whole model to the callbacks that ask for it now.
    fn callbacks_with_model(&mut self) -> Result<()> {
        let mut callbacks = std::mem::take(&mut self.callbacks);
        let r = super::callback::on_model(&mut callbacks, &self.args, &self.state, || {
            let mut m = self.full_model()?;
            m.set_training(false);
            Ok(m)
        });
        self.callbacks = callbacks;
        r
    }

    pub(crate) fn loader(&self) -> Result<DataLoader> {
        let (replica, replicas) = self.engine.data_parallel();
        data_loader(
            &self.args,
            self.train_dataset.len(),
            replica,
            replicas,
            self.shuffle,
        )
    }

    /// The plan `args` (as they are now) give this Trainer.
    pub fn resolve_plan(&self) -> Result<TrainPlan> {
        TrainPlan::resolve(
            &self.args,
            self.engine.world_size(),
            &self.model.config,
            self.loader()?.batches_per_epoch(),
        )
    }

    /// Total optimiser steps (HF: max_steps, else epochs × updates per epoch).
    pub fn total_steps(&self) -> Result<usize> {
        Ok(self.resolve_plan()?.batch.total_steps)
    }

    /// Take up changes made to `args` since the Trainer was built; those
    /// that would move model states (stage, offload, precision, ranks, the
    /// tensor/pipeline layout) are refused.
    fn refresh_plan(&mut self) -> Result<()> {
        let plan = self.resolve_plan()?;
        if !plan.same_engine(&self.plan) {
            return Err(TrainError::Args(
                "the ZeRO stage, offload, precision or tensor/pipeline layout changed after the \
                 Trainer was built; build a new Trainer"
                    .into(),
            ));
        }
        if plan.recompute != self.plan.recompute {
            // gradient_checkpointing changed: the path follows it.
            self.gradient_path = GradientPath::choose(
                &self.model.config,
                self.model.device(),
                plan.precision.dtype(),
                plan.recompute,
            );
        }
        self.engine.set_adam(plan.adamw);
        self.plan = plan;
        Ok(())
    }

    pub(crate) fn batch_of(&self, ds: &Dataset, idx: &[usize]) -> Result<Batch> {
        let examples = ds.examples(idx);
        let refs: Vec<&[u32]> = examples.iter().map(|e| &**e).collect();
        Ok(self.collator.collate(&refs)?)
    }

    /// This rank's micro-batches of the current step's global batch (None
    /// where its share is empty: the end of an epoch).
    pub(super) fn step_batches(&mut self, loader: &DataLoader) -> Result<Vec<Option<Batch>>> {
        let (step, accum) = (
            self.state.global_step,
            self.plan.batch.gradient_accumulation_steps,
        );
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
        Ok(batches)
    }

    /// The error a step's loss that is not finite stops training with.
    pub(super) fn non_finite_loss(&self, loss: f64) -> TrainError {
        TrainError::NonFinite(format!(
            "the loss became {loss} at step {}; training stopped and {} (lower the \
             learning_rate or check the data)",
            self.state.global_step + 1,
            super::output_dir::kept_checkpoint(&self.args.output_dir)
        ))
    }

    pub(crate) fn tensors(&self, b: &Batch) -> Result<(Tensor, Tensor)> {
        let dev = self.model.device();
        Ok((
            Tensor::new(b.input_ids.clone(), dev)?,
            Tensor::new(b.labels.clone(), dev)?,
        ))
    }

    /// `trainer.train(resume_from_checkpoint=…)`: `None` uses
    /// `args.resume_from_checkpoint`; `"latest"` or `"true"` picks the last
    /// `checkpoint-N` in `output_dir`.
    pub fn train(&mut self) -> Result<TrainOutput> {
        let _guard = self.hold_output_dir()?;
        self.train_locked()
    }

    fn train_locked(&mut self) -> Result<TrainOutput> {
        self.refresh_plan()?;
        let total = self.plan.batch.total_steps;
        let every = self.intervals(total);
        self.state.max_steps = total;
        self.state.logging_steps = every.logging;
        self.state.eval_steps = every.eval;
        self.state.save_steps = every.save;
        self.resume()?;
        let loader = self.loader()?;
        let verbose = self.verbose && self.is_world_process_zero();
        let memory = self.memory_report()?;
        if let Some(ds) = self.plan.deepspeed.as_ref().filter(|_| verbose) {
            super::logging::print_memory(&ds.warnings, &memory);
        }
        let l = self.plan.layout;
        if verbose && l.tp * l.pp > 1 {
            eprintln!(
                "{} ranks: tensor parallel {} × pipeline parallel {} × data parallel {} \
                 (Megatron-LM's rank order), {} micro-batches a step in 1F1B order",
                l.world, l.tp, l.pp, l.dp, self.plan.batch.gradient_accumulation_steps
            );
        }
        let bar = if verbose && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            indicatif::ProgressBar::new(total as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_position(self.state.global_step as u64);
        let per_epoch = loader.batches_per_epoch() as f64;
        let accum = self.plan.batch.gradient_accumulation_steps;
        if verbose && accum < self.args.gradient_accumulation_steps {
            eprintln!(
                "gradient_accumulation_steps {} is more than the {} batches of an epoch: each optimizer step accumulates the epoch's {accum} (transformers ends the accumulation at the epoch's end too)",
                self.args.gradient_accumulation_steps,
                loader.batches_per_epoch()
            );
        }
        let n_params = self.engine.layout().numel;
        let (start, start_step) = (Instant::now(), self.state.global_step);
        let (live, mut sinks) = self.live_figures(start_step, total, verbose, &bar)?;
        let mut window = LogWindow::new();
        let mut total_loss = 0f64;
        self.callbacks_with_model()?;
        self.model.set_training(true);
        while self.state.global_step < total {
            let step = self.optimizer_step(&loader)?;
            let zero = self.engine.zero();
            if zero.is_some_and(|e| e.last_step_skipped) {
                if let (true, Some(m)) =
                    (verbose, zero.and_then(|e| e.last_overflow_message.as_ref()))
                {
                    bar.suspend(|| eprintln!("{m}"));
                }
            } else if !step.norm.is_finite() {
                return Err(TrainError::NonFinite(format!(
                    "the gradient norm became {} at step {}; training stopped and {}",
                    step.norm,
                    self.state.global_step + 1,
                    super::output_dir::kept_checkpoint(&self.args.output_dir)
                )));
            }
            self.state.global_step += 1;
            self.state.epoch = (self.state.global_step * accum) as f64 / per_epoch;
            if let Some(every) = self.plan.steps_per_print {
                if verbose && self.state.global_step.is_multiple_of(every) {
                    let (gs, skipped) = (self.state.global_step, self.engine.skipped_steps());
                    let line =
                        super::logging::ds_step_line(gs, skipped, step.lr, &self.engine.adam());
                    bar.suspend(|| eprintln!("{line}"));
                }
            }
            self.state.total_flos += 6.0 * n_params as f64 * step.tokens as f64;
            window.add(&step);
            total_loss += step.loss;
            bar.inc(1);
            let gs = self.state.global_step;
            let log_now = (every.logging > 0 && gs.is_multiple_of(every.logging))
                || (gs == 1 && self.args.logging_first_step)
                || gs == total;
            if log_now && window.steps > 0 {
                let e = log_entry(&self.state, &step, &mut window, &live);
                if verbose {
                    let line = super::logging::log_line(&e, gs, total, &step, self.state.epoch);
                    bar.suspend(|| eprintln!("{line}"));
                }
                self.state.log_history.push(e);
            }
            if every.evaluates_after(gs, total) {
                bar.suspend(|| self.evaluate())?;
            }
            if every.save > 0 && gs.is_multiple_of(every.save) {
                self.save_checkpoint()?;
            }
            sinks.write_new(&self.state.log_history)?;
            self.callbacks_with_model()?;
            if super::callback::on_step_end(&mut self.callbacks, &self.args, &self.state) {
                break;
            }
        }
        bar.finish_and_clear();
        self.model.set_training(false);
        // The last step's evaluation, unless the loop just made it (a
        // callback stopped training on an evaluation step).
        let evaluated = every.evaluates_after(self.state.global_step, total);
        if self.args.eval_strategy != IntervalStrategy::No && !evaluated {
            self.evaluate()?;
        }
        let steps_done = (self.state.global_step - start_step).max(1);
        let train_loss = total_loss / steps_done as f64;
        let m = train_metrics(
            &self.args,
            self.plan.batch.gradient_accumulation_steps,
            &self.state,
            start.elapsed().as_secs_f64(),
            steps_done,
            train_loss,
        );
        self.state.log_history.push(m.clone());
        sinks.write_new(&self.state.log_history)?;
        if self.args.save_strategy != IntervalStrategy::No
            && !self.state.global_step.is_multiple_of(every.save.max(1))
        {
            self.save_checkpoint()?;
        }
        Ok(TrainOutput {
            global_step: self.state.global_step,
            training_loss: train_loss,
            metrics: m,
        })
    }

    /// MFU and ETA's reference, and TensorBoard's writer when asked for
    /// (announced once on a printed run).
    fn live_figures(
        &self,
        start_step: usize,
        total: usize,
        verbose: bool,
        bar: &indicatif::ProgressBar,
    ) -> Result<(Live, Sinks)> {
        let dev = self.model.device();
        let devices = if dev.is_cpu() {
            1
        } else {
            self.engine.world_size()
        };
        let live = Live::start(dev, self.engine.compute_dtype(), devices, start_step, total);
        let rank0 = self.is_world_process_zero();
        let sinks = Sinks::open(&self.args, rank0, self.state.log_history.len())?;
        if verbose {
            let tb = sinks
                .event_file()
                .map(|p| format!("; TensorBoard: {}", p.display()))
                .unwrap_or_default();
            let peak = live.peak_flops / 1e9;
            let against = if dev.is_cpu() {
                "this machine's fp32 GEMM peak".to_string()
            } else {
                format!("the GPUs' {:?} GEMM rate", self.engine.compute_dtype())
            };
            bar.suspend(|| eprintln!("MFU is measured against {against}, {peak:.1} GFLOP/s{tb}"));
        }
        Ok((live, sinks))
    }

    /// Logging, evaluation and saving intervals for `total` steps (0: never).
    fn intervals(&self, total: usize) -> Intervals {
        let a = &self.args;
        let every = |strategy: IntervalStrategy, steps: f64| match strategy {
            IntervalStrategy::Steps => a.resolve_steps(steps, total).max(1),
            IntervalStrategy::No | IntervalStrategy::Epoch => 0,
        };
        Intervals {
            logging: every(a.logging_strategy, a.logging_steps),
            // eval_steps unset or 0: logging_steps, as transformers falls back.
            eval: every(
                a.eval_strategy,
                a.eval_steps.filter(|&s| s > 0.0).unwrap_or(a.logging_steps),
            ),
            save: every(a.save_strategy, a.save_steps),
        }
    }

    /// One optimizer step on the run's path: data parallelism (the ZeRO
    /// engine) or tensor/pipeline parallelism (the 3D trainer).
    fn optimizer_step(&mut self, loader: &DataLoader) -> Result<StepReport> {
        match self.engine {
            Engine::Zero(_) => self.data_parallel_step(loader),
            Engine::ModelParallel(_) => self.model_parallel_step(loader),
        }
    }
}

/// Each replica's data loader over `len` training examples.
fn data_loader(
    args: &TrainingArguments,
    len: usize,
    rank: usize,
    world: usize,
    shuffle: bool,
) -> Result<DataLoader> {
    let mut l = DataLoader::new(len, args.per_device_train_batch_size, shuffle, args.seed)?;
    l.drop_last = args.dataloader_drop_last;
    l.rank = rank;
    l.world_size = world;
    Ok(l)
}
