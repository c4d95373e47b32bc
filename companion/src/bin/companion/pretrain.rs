//! The chapter end to end (`companion pretrain`): tokenizer → config →
//! model → datasets → Trainer → save_model → generate. Defaults are sized
//! for a 2-core CPU and the shipped corpus.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use companion::config::GPT2Config;
use companion::data::corpus::Split;
use companion::data::{DataCollatorForLanguageModeling, Dataset, PrepareOptions};
use companion::generate::GenerationConfig;
use companion::model::GPT2LMHeadModel;
use companion::tokenizer::{self, AutoTokenizer, TrainArgs};
use companion::train::{Schedule, TrainPlan, Trainer, TrainingArguments};
use companion::zero::comm::{run_ranks, Communicator, SingleRank};

use crate::options::{Backend, PretrainError, PretrainOptions, RankDevice};
use crate::preflight::{args_error, check_before_work, check_nccl, mpi_rank};

/// The vocabulary a tokenizer trained by `pretrain` has unless asked otherwise.
pub const DEFAULT_VOCAB_SIZE: usize = 8192;

/// The tokenizer: given, reused from `dir`, or trained on the corpus.
pub fn tokenizer_for(opts: &PretrainOptions, dir: &Path) -> Result<AutoTokenizer, PretrainError> {
    let unused = |tok: &AutoTokenizer, from: &str| {
        if let Some(v) = opts.tokenizer_vocab_size.filter(|&v| v != tok.vocab_size()) {
            eprintln!(
                "warning: --tokenizer-vocab-size {v} is not used: the tokenizer {from} was trained to {} tokens",
                tok.vocab_size()
            );
        }
    };
    let mut tok = if let Some(t) = &opts.tokenizer {
        let tok = AutoTokenizer::from_pretrained(t)?;
        unused(&tok, &format!("given by --tokenizer ({t})"));
        tok
    } else if dir.join("tokenizer.json").exists() {
        eprintln!("reusing the tokenizer in {}", dir.display());
        let tok = AutoTokenizer::from_pretrained(&dir.to_string_lossy())?;
        unused(
            &tok,
            &format!(
                "reused from {} (remove that folder to train a new one)",
                dir.display()
            ),
        );
        tok
    } else {
        let vocab_size = opts.tokenizer_vocab_size.unwrap_or(DEFAULT_VOCAB_SIZE);
        eprintln!(
            "training a byte-level BPE tokenizer ({vocab_size} tokens) on {}",
            opts.train_file.display()
        );
        let docs = companion::data::corpus::documents_of(&[&opts.train_file], &opts.text_field)?;
        let args = TrainArgs {
            vocab_size,
            show_progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            ..TrainArgs::default()
        };
        let docs = docs.map(|d| d.map_err(PretrainError::from));
        let tok = tokenizer::train_stream(&args, docs)?;
        tok.save_pretrained(dir)?;
        tok
    };
    tok.pad_with_eos()?;
    Ok(tok)
}

/// Run the chapter; returns a JSON summary (also printed by the CLI).
pub fn run(opts: &PretrainOptions, args: TrainingArguments) -> Result<Value, PretrainError> {
    // `hf://datasets/…` files come from the Hugging Face cache or the hub.
    let mut resolved = opts.clone();
    resolved.train_file = companion::data::corpus::resolve(&opts.train_file.to_string_lossy())?;
    if let Some(v) = &opts.validation_file {
        resolved.validation_file = Some(companion::data::corpus::resolve(&v.to_string_lossy())?);
    }
    let opts = &resolved;
    let out = PathBuf::from(&args.output_dir);
    check_before_work(opts, &args, &out)?;
    // Under MPI every process runs this; rank 0 trains the tokenizer and
    // tokenizes the corpus (filling the cache) while the others wait.
    let mpi = mpi_rank(opts)?;
    check_nccl(opts)?;
    let rank0 = mpi.as_ref().is_none_or(|c| c.rank() == 0);
    // One run per output_dir, from the tokenizer it writes there to the
    // end (rank 0 holds it; under MPI a refused rank 0 ends the job).
    let _lock = rank0
        .then(|| companion::train::OutputDirLock::acquire(&out))
        .transpose()?;
    if !rank0 {
        mpi.as_ref().expect("mpi").barrier()?;
    }
    let tok = tokenizer_for(opts, &out.join("tokenizer"))?;
    let mut o = opts.overrides.clone();
    o.vocab_size = Some(tok.len());
    o.bos_token_id = tok.bos_token_id();
    o.eos_token_id = tok.eos_token_id();
    let mut cfg = GPT2Config::from_pretrained_with(&opts.config_from, &o)?;
    // The special ids are the tokenizer's, none when it has none: never
    // the base config's (GPT-2's 50256) in a smaller vocabulary.
    cfg.bos_token_id = tok.bos_token_id();
    cfg.eos_token_id = tok.eos_token_id();
    if let Some(p) = opts.dropout {
        cfg.attn_pdrop = p;
        cfg.embd_pdrop = p;
        cfg.resid_pdrop = p;
    }
    if opts.block_size < 2 {
        return Err(companion::train::TrainError::Args(format!(
            "block_size {}: a block needs at least 2 tokens (one to predict from, one to predict)",
            opts.block_size
        ))
        .into());
    }
    if opts.block_size > cfg.n_positions {
        return Err(companion::train::TrainError::Args(format!(
            "block_size {} is longer than n_positions {}",
            opts.block_size, cfg.n_positions
        ))
        .into());
    }
    // The final generation must fit the model: say so before training.
    let prompt_len = tok.encode(&opts.prompt)?.len().max(1);
    if prompt_len >= cfg.n_positions {
        return Err(args_error(format!(
            "--prompt is {prompt_len} tokens, as long as the model's n_positions {} or longer: \
             give a shorter prompt (or a larger --n-positions)",
            cfg.n_positions
        )));
    }
    if prompt_len.saturating_add(opts.max_new_tokens) > cfg.n_positions {
        return Err(args_error(format!(
            "--prompt ({prompt_len} tokens) plus --max-new-tokens {} is more than n_positions {} \
             of the model: ask for at most {} new tokens",
            opts.max_new_tokens,
            cfg.n_positions,
            cfg.n_positions.saturating_sub(prompt_len)
        )));
    }
    let prepare = |path: &Path, split: Split| -> Result<Dataset, PretrainError> {
        let options = PrepareOptions {
            block_size: opts.block_size,
            append_eos: tok.eos_token_id(),
            show_progress: rank0,
            ..PrepareOptions::default()
        };
        let p = companion::data::prepare(path, &opts.text_field, split, &tok, &options)?;
        if rank0 {
            let how = if p.built { "prepared" } else { "reusing" };
            eprintln!("{how} {} ({} blocks)", p.dir.display(), p.dataset.len());
        }
        Ok(p.dataset)
    };
    let train_ds = prepare(&opts.train_file, Split::Train)?;
    let eval_ds: Option<Dataset> = match &opts.validation_file {
        Some(v) => {
            let mut ds = prepare(v, Split::Validation)?;
            if let Some(n) = opts.max_eval_samples {
                ds.truncate(n);
            }
            if (0..ds.len()).all(|i| ds.example(i).len() < 2) {
                return Err(args_error(format!(
                    "{}: no held-out block to evaluate on ({} blocks of {} tokens after \
                     --max-eval-samples): give more validation text, a larger \
                     --max-eval-samples, or --no-validation",
                    v.display(),
                    ds.len(),
                    opts.block_size
                )));
            }
            Some(ds)
        }
        None => None,
    };
    if rank0 {
        eprintln!(
            "model: {} layers, {} wide, {} heads, vocab {}, {:.2}M parameters; {} training blocks of {} tokens",
            cfg.n_layer,
            cfg.n_embd,
            cfg.n_head,
            cfg.vocab_size,
            cfg.num_parameters() as f64 / 1e6,
            train_ds.len(),
            opts.block_size
        );
        for f in args.unused_fields() {
            eprintln!("warning: TrainingArguments field accepted but not acted on: {f}");
        }
    }
    if let (Some(c), true) = (&mpi, rank0) {
        c.barrier()?;
    }
    let world = opts.num_ranks.max(1);
    if world > 1 || opts.rank_device != RankDevice::Cpu {
        // Fail before any rank starts if a GPU is missing.
        for r in 0..world {
            opts.rank_device.device(r)?;
        }
    }
    let job = |comm: Arc<dyn Communicator>| -> Result<Option<Value>, PretrainError> {
        let device = opts.rank_device.device(comm.rank())?;
        let model = GPT2LMHeadModel::new(&cfg, args.seed, &device)?;
        let collator = DataCollatorForLanguageModeling::new(&tok);
        let trainer = Trainer::new_distributed(
            model,
            args.clone(),
            collator,
            train_ds.clone(),
            eval_ds.clone(),
            Some(tok.clone()),
            comm,
        )?;
        train_and_save(opts, trainer, &tok)
    };
    if let Some(c) = mpi {
        // One rank per process; only rank 0 reports.
        return Ok(job(c)?.unwrap_or(Value::Null));
    }
    if world == 1 {
        return Ok(job(Arc::new(SingleRank))?.expect("rank 0 reports"));
    }
    if opts.backend == Backend::Nccl {
        return nccl_ranks(opts, world, &job);
    }
    let mut out = run_ranks(world, |_, comm| job(comm))?;
    Ok(out.remove(0).expect("rank 0 reports"))
}

/// `world` GPU ranks in this process, joined through NCCL.
fn nccl_ranks(
    opts: &PretrainOptions,
    world: usize,
    job: &(dyn Fn(Arc<dyn Communicator>) -> Result<Option<Value>, PretrainError> + Sync),
) -> Result<Value, PretrainError> {
    #[cfg(feature = "nccl")]
    {
        use companion::zero::comm::nccl::{new_id, NcclRank};
        use companion::zero::comm::{run_ranks_with, CommError};
        let id = new_id()?;
        let make = |r: usize| -> Result<Arc<dyn Communicator>, CommError> {
            let dev = opts
                .rank_device
                .device(r)
                .map_err(|e| CommError::Transport(e.to_string()))?;
            Ok(Arc::new(NcclRank::new(&dev, r, world, id)?))
        };
        let mut out = run_ranks_with(world, make, |_| {}, |_, comm| job(comm))?;
        Ok(out.remove(0).expect("rank 0 reports"))
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = (opts, world, job);
        unreachable!("check_nccl refuses --backend nccl without the feature")
    }
}

/// What a run trained with, in the JSON summary, so that the same recipe can
/// be run elsewhere (bench/pretrain.sh passes it to PyTorch). `eval_steps` is
/// the interval the Trainer resolved (0: no evaluation every N steps).
fn recipe(
    opts: &PretrainOptions,
    cfg: &GPT2Config,
    args: &TrainingArguments,
    plan: &TrainPlan,
    eval_steps: usize,
) -> Value {
    // The values that ran (the ds_config's where it sets them), under
    // TrainingArguments' names so the recipe can be handed to transformers.
    let a = plan.adamw;
    let deepspeed_scheduler = match &plan.schedule {
        Schedule::DeepSpeed { block, .. } => block.clone(),
        Schedule::Hf { .. } => Value::Null,
    };
    json!({
        "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "n_head": cfg.n_head,
        "n_positions": cfg.n_positions,
        "vocab_size": cfg.vocab_size,
        "dropout": [cfg.embd_pdrop, cfg.attn_pdrop, cfg.resid_pdrop],
        "block_size": opts.block_size,
        "max_eval_samples": opts.max_eval_samples,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "learning_rate": plan.learning_rate,
        "weight_decay": a.weight_decay,
        "adam_beta1": a.beta1,
        "adam_beta2": a.beta2,
        "adam_epsilon": a.eps,
        "max_grad_norm": plan.max_grad_norm,
        "lr_scheduler_type": args.lr_scheduler_type,
        "deepspeed_scheduler": deepspeed_scheduler,
        "warmup_ratio": args.warmup_ratio,
        "warmup_steps": args.warmup_steps,
        "eval_strategy": args.eval_strategy,
        "eval_steps": eval_steps,
        "seed": args.seed,
    })
}

/// Train, evaluate, save and sample on one rank (all ranks run it; rank 0
/// returns the summary).
fn train_and_save(
    opts: &PretrainOptions,
    mut trainer: Trainer,
    tok: &AutoTokenizer,
) -> Result<Option<Value>, PretrainError> {
    let before = if trainer.args.resume_from_checkpoint.is_none() {
        trainer
            .eval_dataset
            .clone()
            .map(|ds| trainer.evaluate_dataset(&ds))
            .transpose()?
    } else {
        None
    };
    let result = trainer.train()?;
    let after = trainer.final_evaluation()?;
    trainer.save_model(&opts.save_model_dir)?;
    let model = trainer.full_model()?;
    trainer.save_state()?;
    if let Err(e) = trainer.save_loss_plot() {
        eprintln!("warning: could not draw the loss plot: {e}");
    }
    if !trainer.is_world_process_zero() {
        return Ok(None);
    }
    let gen = GenerationConfig {
        max_new_tokens: Some(opts.max_new_tokens),
        repetition_penalty: 1.1,
        pad_token_id: tok.eos_token_id(),
        eos_token_id: tok.eos_token_id().map(companion::generate::TokenIds::One),
        ..Default::default()
    };
    let ids = tok.encode(&opts.prompt)?;
    let out_ids = model.generate(&[ids], None, &gen)?.sequences.remove(0);
    let text = tok.decode(&out_ids, false)?;
    Ok(Some(json!({
        "global_step": result.global_step,
        "train_loss": result.training_loss,
        "train_runtime": result.metrics["train_runtime"],
        "before": before,
        "after": after,
        "model_dir": opts.save_model_dir.display().to_string(),
        "prompt": opts.prompt,
        "generation": text,
        "parameters": model.config.num_parameters(),
        "world_size": trainer.engine.world_size(),
        "zero_stage": trainer.engine.stage(),
        "tensor_model_parallel_size": trainer.plan.layout.tp,
        "pipeline_model_parallel_size": trainer.plan.layout.pp,
        "data_parallel_size": trainer.plan.layout.dp,
        "recipe": recipe(
            opts,
            &model.config,
            &trainer.args,
            &trainer.plan,
            trainer.state.eval_steps,
        ),
    })))
}
