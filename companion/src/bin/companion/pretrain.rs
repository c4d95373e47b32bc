//! The chapter end to end (`companion pretrain`): tokenizer → config →
//! model → datasets → Trainer → save_model → generate. Defaults are sized
//! for a 2-core CPU and the shipped corpus.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use serde_json::{json, Value};

use companion::config::{ConfigOverrides, GPT2Config};
use companion::data::corpus::Split;
use companion::data::{DataCollatorForLanguageModeling, Dataset, PrepareOptions};
use companion::generate::GenerationConfig;
use companion::model::GPT2LMHeadModel;
use companion::tokenizer::{self, AutoTokenizer, SpecialRole, TrainArgs};
use companion::train::{IntervalStrategy, SchedulerType, Trainer, TrainingArguments};
use companion::zero::comm::{run_ranks, Communicator, SingleRank};

use crate::preflight::{args_error, check_before_work, check_nccl, mpi_rank};

/// What `companion pretrain` needs besides `TrainingArguments`.
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainOptions {
    pub train_file: PathBuf,
    pub validation_file: Option<PathBuf>,
    pub text_field: String,
    /// An existing tokenizer folder/id; else one is trained (or reused from
    /// `output_dir/tokenizer`).
    pub tokenizer: Option<String>,
    pub tokenizer_vocab_size: usize,
    /// Model config to start from and its overrides.
    pub config_from: String,
    pub overrides: ConfigOverrides,
    /// Dropout for all three places (the chapter's config keeps GPT-2's 0.1).
    pub dropout: Option<f64>,
    pub block_size: usize,
    pub max_eval_samples: Option<usize>,
    /// Where the final model goes (`trainer.save_model("pretrained_model")`).
    pub save_model_dir: PathBuf,
    pub prompt: String,
    pub max_new_tokens: usize,
    /// Ranks in this process (threads, DeepSpeed's data-parallel world).
    pub num_ranks: usize,
    /// Where each rank runs: the CPU, or GPU `cuda:rank` (`--num-gpus`).
    pub rank_device: RankDevice,
    /// How ranks talk: threads of this process, or MPI processes.
    pub backend: Backend,
}

/// `companion pretrain`'s own flags (TrainingArguments are flattened beside
/// them); the defaults are the main job's, [`PretrainOptions::default`].
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Data, model and run")]
pub struct PretrainFlags {
    /// The training corpus: JSONL (`{"text": …}` per line), Parquet, plain text, or
    /// `hf://datasets/OWNER/NAME/PATH` (a file of a hub dataset).
    #[arg(long, value_name = "PATH", default_value = "data/corpus/train.jsonl")]
    pub train_file: PathBuf,
    /// The held-out corpus for evaluation (before and after training).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "data/corpus/validation.jsonl"
    )]
    pub validation_file: PathBuf,
    /// Train without held-out data.
    #[arg(long, conflicts_with = "validation_file")]
    pub no_validation: bool,
    /// The field of each JSONL / Parquet row that holds the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// A tokenizer folder or hub id; without it a byte-level BPE is trained
    /// (or reused from output_dir/tokenizer).
    #[arg(long, value_name = "DIR|ID")]
    pub tokenizer: Option<String>,
    /// The vocabulary of the tokenizer trained when --tokenizer is not given.
    #[arg(long, default_value_t = 8192)]
    pub tokenizer_vocab_size: usize,
    /// The config to start from (a preset such as `gpt2`, a folder or a hub id).
    #[arg(long, default_value = "gpt2")]
    pub config_from: String,
    /// Transformer blocks.
    #[arg(long, default_value_t = 4)]
    pub n_layer: usize,
    /// Width of the hidden states.
    #[arg(long, default_value_t = 128)]
    pub n_embd: usize,
    /// Attention heads (n_embd must be a multiple).
    #[arg(long, default_value_t = 2)]
    pub n_head: usize,
    /// Positions of the model (the longest input; also stored as n_ctx).
    #[arg(long, default_value_t = 128)]
    pub n_positions: usize,
    /// Dropout of embeddings, attention and residuals (gpt2's config has 0.1).
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Tokens per training example (run_clm's block_size).
    #[arg(long, default_value_t = 128)]
    pub block_size: usize,
    /// Evaluate on the first N held-out blocks.
    #[arg(long, default_value_t = 128)]
    pub max_eval_samples: usize,
    /// Where the trained model goes (`trainer.save_model(...)`).
    #[arg(long, value_name = "DIR", default_value = "pretrained_model")]
    pub save_model_dir: PathBuf,
    /// The prompt of the generation printed at the end.
    #[arg(long, default_value = "Hi, how are you?")]
    pub prompt: String,
    #[arg(long, default_value_t = 40)]
    pub max_new_tokens: usize,
    /// Data-parallel ranks as threads of this process, on the CPU.
    #[arg(long, default_value_t = 1, conflicts_with = "num_gpus")]
    pub num_ranks: usize,
    /// Data-parallel ranks, one per GPU (a build with --features cuda).
    #[arg(long)]
    pub num_gpus: Option<usize>,
    /// How ranks exchange: threads of this process, MPI processes
    /// (`mpirun -np N`, --features mpi), or NCCL between GPUs (--features nccl).
    #[arg(long, value_enum, default_value_t = Backend::Threads)]
    pub backend: Backend,
}

impl PretrainFlags {
    pub fn into_options(self) -> PretrainOptions {
        PretrainOptions {
            train_file: self.train_file,
            validation_file: (!self.no_validation).then_some(self.validation_file),
            text_field: self.text_field,
            tokenizer: self.tokenizer,
            tokenizer_vocab_size: self.tokenizer_vocab_size,
            config_from: self.config_from,
            overrides: ConfigOverrides {
                n_layer: Some(self.n_layer),
                n_embd: Some(self.n_embd),
                n_head: Some(self.n_head),
                n_positions: Some(self.n_positions),
                n_ctx: Some(self.n_positions),
                ..Default::default()
            },
            dropout: Some(self.dropout),
            block_size: self.block_size,
            max_eval_samples: Some(self.max_eval_samples),
            save_model_dir: self.save_model_dir,
            prompt: self.prompt,
            max_new_tokens: self.max_new_tokens,
            num_ranks: self.num_gpus.unwrap_or(self.num_ranks),
            rank_device: if self.num_gpus.is_some() {
                RankDevice::Cuda
            } else {
                RankDevice::Cpu
            },
            backend: self.backend,
        }
    }
}

/// The collective-communication backend (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Ranks are threads of this process (`--num-ranks`, `--num-gpus`).
    Threads,
    /// Ranks are the processes of `mpirun -np N` (the `mpi` feature).
    Mpi,
    /// Ranks are threads of this process, one per GPU, exchanging through
    /// NCCL (`--num-gpus N`, the `nccl` feature).
    Nccl,
}

/// The device of each in-process rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankDevice {
    Cpu,
    /// Rank r on `cuda:r` (needs the `cuda` feature).
    Cuda,
}

impl RankDevice {
    pub fn device(self, rank: usize) -> Result<Device, PretrainError> {
        match self {
            RankDevice::Cpu => Ok(Device::Cpu),
            RankDevice::Cuda => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(companion::train::TrainError::Args(
                        "--num-gpus needs a build with CUDA (`cargo build --release --features cuda`); \
                         use --num-ranks N for CPU ranks"
                            .into(),
                    )
                    .into());
                }
                Device::new_cuda(rank).map_err(|e| {
                    companion::train::TrainError::Args(format!(
                        "rank {rank} has no GPU cuda:{rank} (more ranks than GPUs?): {e}"
                    ))
                    .into()
                })
            }
        }
    }
}

impl Default for PretrainOptions {
    fn default() -> Self {
        PretrainOptions {
            train_file: "data/corpus/train.jsonl".into(),
            validation_file: Some("data/corpus/validation.jsonl".into()),
            text_field: "text".into(),
            tokenizer: None,
            tokenizer_vocab_size: 8192,
            config_from: "gpt2".into(),
            overrides: ConfigOverrides {
                n_layer: Some(4),
                n_embd: Some(128),
                n_head: Some(2),
                n_positions: Some(128),
                n_ctx: Some(128),
                ..Default::default()
            },
            dropout: Some(0.0),
            block_size: 128,
            // 128 blocks of 128 tokens: the first 16k validation tokens.
            max_eval_samples: Some(128),
            save_model_dir: "pretrained_model".into(),
            prompt: "Hi, how are you?".into(),
            max_new_tokens: 40,
            num_ranks: 1,
            rank_device: RankDevice::Cpu,
            backend: Backend::Threads,
        }
    }
}

/// The main job's TrainingArguments: a recipe that learns in minutes on a
/// CPU. (The chapter's learning rate of 1e-6 is far too small to train a
/// model from scratch; 2e-3 with warmup and cosine decay does.) Chosen by
/// held-out bits per byte after the same 4 minutes of training on the
/// shipped corpus: a 4-layer, 128-wide model on blocks of 128 tokens ends at
/// 1.70; on the same blocks 6×128 ends at 1.90 and 4×256 at 1.84 (scored on
/// the first 64 blocks only); on 256-token blocks 4×128 ends at 1.78, 4×192
/// at 1.93 and 4×256 at 2.00. For 4×128, a learning rate of 3e-3 costs 0.01
/// and adam_beta2 0.95 0.07; batch 8 at 1.5e-3 ties batch 16. At this
/// compute a small model that sees more tokens learns more than a wide one
/// that sees fewer.
pub fn default_training_args() -> TrainingArguments {
    TrainingArguments {
        output_dir: "output".into(),
        max_steps: 2000,
        per_device_train_batch_size: 16,
        per_device_eval_batch_size: 16,
        learning_rate: 2e-3,
        weight_decay: 0.1,
        lr_scheduler_type: SchedulerType::Cosine,
        warmup_ratio: 0.05,
        logging_steps: 10.0,
        logging_first_step: true,
        eval_strategy: IntervalStrategy::Steps,
        eval_steps: Some(100.0),
        save_steps: 100.0,
        save_total_limit: Some(2),
        seed: 42,
        ..Default::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PretrainError {
    #[error(transparent)]
    Train(#[from] companion::train::TrainError),
    #[error(transparent)]
    Data(#[from] companion::data::DataError),
    #[error(transparent)]
    Tokenizer(#[from] companion::tokenizer::TokenizerError),
    #[error(transparent)]
    Model(#[from] companion::model::ModelError),
    #[error(transparent)]
    Config(#[from] companion::config::ConfigError),
    #[error(transparent)]
    Corpus(#[from] companion::data::corpus::CorpusError),
    #[error(transparent)]
    Comm(#[from] companion::zero::comm::CommError),
}

/// The tokenizer: given, reused from `dir`, or trained on the corpus.
pub fn tokenizer_for(opts: &PretrainOptions, dir: &Path) -> Result<AutoTokenizer, PretrainError> {
    let mut tok = if let Some(t) = &opts.tokenizer {
        AutoTokenizer::from_pretrained(t)?
    } else if dir.join("tokenizer.json").exists() {
        eprintln!("reusing the tokenizer in {}", dir.display());
        AutoTokenizer::from_pretrained(&dir.to_string_lossy())?
    } else {
        eprintln!(
            "training a byte-level BPE tokenizer ({} tokens) on {}",
            opts.tokenizer_vocab_size,
            opts.train_file.display()
        );
        let docs = companion::data::corpus::documents_of(&[&opts.train_file], &opts.text_field)?;
        let args = TrainArgs {
            vocab_size: opts.tokenizer_vocab_size,
            show_progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            ..TrainArgs::default()
        };
        let docs = docs.map(|d| d.map_err(PretrainError::from));
        let tok = tokenizer::train_stream(&args, docs)?;
        tok.save_pretrained(dir)?;
        tok
    };
    // As in the chapter: pad with eos when there is no pad token.
    if tok.pad_token_id().is_none() {
        if let Some(eos) = tok.eos_token().map(str::to_string) {
            tok.set_special_token(SpecialRole::Pad, &eos)?;
        }
    }
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
    if let Some(p) = opts.dropout {
        cfg.attn_pdrop = p;
        cfg.embd_pdrop = p;
        cfg.resid_pdrop = p;
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
    eval_steps: usize,
) -> Value {
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
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "adam_beta1": args.adam_beta1,
        "adam_beta2": args.adam_beta2,
        "adam_epsilon": args.adam_epsilon,
        "max_grad_norm": args.max_grad_norm,
        "lr_scheduler_type": args.lr_scheduler_type,
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
    // train() ends with an evaluation when eval_strategy is set; else run one.
    let after = match trainer
        .state
        .log_history
        .iter()
        .rev()
        .find(|e| e.contains_key("eval_loss"))
    {
        Some(e) if e["step"] == json!(trainer.state.global_step) => Some(json!({
            "eval_loss": e["eval_loss"],
            "perplexity": e["eval_perplexity"],
            "bits_per_byte": e["eval_bits_per_byte"],
        })),
        _ => trainer
            .eval_dataset
            .clone()
            .map(|ds| trainer.evaluate_dataset(&ds))
            .transpose()?
            .map(|m| serde_json::to_value(m).expect("json")),
    };
    trainer.save_model(&opts.save_model_dir)?;
    let model = trainer.full_model()?;
    if !trainer.is_world_process_zero() {
        return Ok(None);
    }
    // trainer.save_state(): the final state beside the checkpoints.
    let state_file = Path::new(&trainer.args.output_dir).join("trainer_state.json");
    companion::atomic_write::write_file_atomically(
        &state_file,
        trainer.state.to_json_string().as_bytes(),
    )
    .map_err(|e| companion::train::TrainError::Io {
        path: state_file.display().to_string(),
        msg: e.to_string(),
    })?;
    if let Err(e) = companion::notebook::plot::save_loss_plot(
        &trainer.state,
        Path::new(&trainer.args.output_dir),
    ) {
        eprintln!("warning: could not draw the loss plot: {e}");
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
        "zero_stage": trainer.engine.stage,
        "recipe": recipe(opts, &model.config, &trainer.args, trainer.state.eval_steps),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        f: PretrainFlags,
    }

    #[test]
    fn the_flags_default_to_the_main_job() {
        let given = Flags::parse_from(["pretrain"]).f.into_options();
        assert_eq!(given, PretrainOptions::default());
        let gpus = Flags::parse_from(["pretrain", "--num-gpus", "2", "--no-validation"]).f;
        let o = gpus.into_options();
        assert_eq!((o.num_ranks, o.rank_device), (2, RankDevice::Cuda));
        assert_eq!(o.validation_file, None);
    }
}
