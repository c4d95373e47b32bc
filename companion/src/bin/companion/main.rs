//! The `companion` program: the chapter's steps from the command line.
//! `--json` prints one JSON object on stdout; progress and logs go to stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use companion::train::TrainingArguments;
use serde_json::json;

use companion::tokenizer::{self, AutoTokenizer, TokenizerKind, TrainArgs};

mod bench;
mod bench_cmd;
mod inference;
mod options;
mod preflight;
mod pretrain;
mod zero_to_fp32;

/// `companion --version`, naming the optional backends built in.
#[cfg(feature = "mpi")]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (mpi)");
#[cfg(not(feature = "mpi"))]
const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Parser)]
#[command(
    name = "companion",
    version = VERSION,
    about = "The Rust companion to section 4.3 (Pretraining): tokenizers, GPT-2, training, generation",
    // A flag given twice takes the last value, as argparse (HfArgumentParser) does.
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train, convert or inspect tokenizers (4.3.2).
    #[command(subcommand)]
    Tokenizer(TokenizerCmd),
    /// The chapter end to end: tokenizer, model, Trainer, save_model, a generation.
    /// Every TrainingArguments field is a flag (`--max-steps 10`, `--learning-rate 3e-3`, …);
    /// `--args training_args.json` loads a set (flags win). `--deepspeed ds_config.json`
    /// with `--num-ranks N` (CPU ranks) or `--num-gpus N` trains with ZeRO. The defaults
    /// shown are the main job's.
    Pretrain(Box<PretrainCmd>),
    /// Print a GPT-2 config (`AutoConfig.from_pretrained(..., **overrides)`).
    Config(ConfigCmd),
    /// Generate text with a model folder or hub id (4.3.5).
    Generate(inference::GenerateCmd),
    /// Held-out loss, perplexity and bits per byte of a model on a corpus
    /// (`trainer.evaluate()` on a file), packed as `pretrain` packs it.
    Eval(inference::EvalCmd),
    /// Model-state memory per GPU and per CPU for ZeRO-2/3 with and without
    /// offload, as DeepSpeed's `estimate_zero2/3_model_states_mem_needs_all_live` print it.
    ZeroEstimate(ZeroEstimateCmd),
    /// DeepSpeed's `zero_to_fp32.py`: a checkpoint's whole fp32 weights, gathered from
    /// the ranks' ZeRO files one tensor at a time, as a model folder (`model.safetensors`
    /// + `config.json`) that `from_pretrained` loads.
    ZeroToFp32(zero_to_fp32::ZeroToFp32Cmd),
    /// Benchmarks that print figures (never pass/fail on speed).
    #[command(subcommand)]
    Bench(bench_cmd::BenchCmd),
    /// What this build and machine can run, as DeepSpeed's ds_report says it: features
    /// built in, the CPU and its GEMM rate, the CUDA driver and devices (each with a tiny
    /// forward/backward against the CPU), the libraries loaded and from where.
    /// Exits 1 naming what to fix when something is missing.
    Env(EnvCmd),
}

#[derive(Args)]
struct EnvCmd {
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Fail unless this is there and works (repeatable): cuda, nccl, mpi.
    #[arg(long, value_enum)]
    expect: Vec<companion::collect_env::Expect>,
    /// Skip timing the CPU's matrix multiply (about a second).
    #[arg(long)]
    no_measure: bool,
}

#[derive(Args)]
struct PretrainCmd {
    /// A JSON file of TrainingArguments fields (`training_args.json`); flags given win.
    #[arg(long, value_name = "FILE.json")]
    args: Option<PathBuf>,
    /// Print the run's summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    opts: options::PretrainFlags,
    #[command(flatten)]
    training: TrainingArguments,
}

#[derive(Subcommand)]
enum TokenizerCmd {
    /// Train a byte-level BPE or SentencePiece-style unigram tokenizer and save it.
    Train(TrainCmd),
    /// Tokenize a text with a tokenizer folder or hub id.
    Show(ShowCmd),
    /// Convert a SentencePiece `.model` file into a tokenizer folder.
    Convert(ConvertCmd),
}

/// What a tokenizer is trained on and how (`tokenizer train`, `bench tokenizer`).
#[derive(Args)]
pub struct TokenizerTraining {
    /// Corpus files: `.jsonl` (one `{"text": …}` per line), `.parquet`, or plain text (one
    /// example per line); `hf://datasets/OWNER/NAME/PATH` for a file of a hub dataset.
    #[arg(long, num_args = 1.., required = true)]
    pub corpus: Vec<PathBuf>,
    /// `bpe` (ByteLevelBPETokenizer) or `unigram` (SentencePiece).
    #[arg(long, default_value = "bpe")]
    pub model: String,
    #[arg(long, default_value_t = 30000)]
    pub vocab_size: usize,
}

#[derive(Args)]
struct TrainCmd {
    #[command(flatten)]
    training: TokenizerTraining,
    /// BPE: merges need a pair seen at least this often.
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    /// Special tokens added after the learned vocabulary (bos, eos, pad).
    #[arg(long, value_delimiter = ',', default_value = "<bos>,<eos>,<pad>")]
    special_tokens: Vec<String>,
    /// The JSONL field holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Sets `model_max_length` in tokenizer_config.json.
    #[arg(long)]
    model_max_length: Option<usize>,
    /// Output folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json).
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ShowCmd {
    /// A tokenizer folder or a hub id such as `gpt2`.
    #[arg(long)]
    tokenizer: String,
    #[arg(long)]
    text: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ConvertCmd {
    /// A SentencePiece `.model` file (`spm.SentencePieceTrainer.Train` writes one).
    #[arg(long)]
    spm_model: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct ConfigCmd {
    /// A preset (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `distilgpt2`), folder or hub id.
    #[arg(long, default_value = "gpt2")]
    from: String,
    #[command(flatten)]
    overrides: companion::config::ConfigOverrides,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ZeroEstimateCmd {
    /// A preset (`gpt2`, `gpt2-xl`, …), model folder or hub id (only its config is read).
    #[arg(long, default_value = "gpt2")]
    model: String,
    /// GPUs per node (DeepSpeed's `num_gpus_per_node`).
    #[arg(long, default_value_t = 1)]
    num_gpus: usize,
    #[arg(long, default_value_t = 1)]
    num_nodes: usize,
    #[arg(long)]
    json: bool,
}

/// The command line, with `pretrain`'s TrainingArguments defaults set to the
/// main job's recipe (so `--help` shows what a run uses).
fn command() -> clap::Command {
    Cli::command().mut_subcommand("pretrain", |c| {
        TrainingArguments::with_defaults(c, &options::default_training_args())
    })
}

fn main() -> ExitCode {
    let matches = command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> Result<()> {
    match cli.command {
        Command::Tokenizer(TokenizerCmd::Train(c)) => tokenizer_train(c),
        Command::Tokenizer(TokenizerCmd::Show(c)) => tokenizer_show(c),
        Command::Tokenizer(TokenizerCmd::Convert(c)) => {
            let tok = tokenizer::from_sentencepiece_model(&c.spm_model)?;
            tok.save_pretrained(&c.out)
                .with_context(|| format!("saving the tokenizer to {}", c.out.display()))?;
            eprintln!("saved {} pieces to {}", tok.len(), c.out.display());
            Ok(())
        }
        Command::Config(c) => config_cmd(c),
        Command::ZeroEstimate(c) => zero_estimate_cmd(c),
        Command::Pretrain(c) => pretrain_cmd(
            *c,
            matches
                .subcommand_matches("pretrain")
                .expect("the pretrain subcommand"),
        ),
        Command::Generate(c) => inference::generate_cmd(c),
        Command::Eval(c) => inference::eval_cmd(c),
        Command::Bench(c) => bench_cmd::run(c),
        Command::Env(c) => env_cmd(c),
        Command::ZeroToFp32(c) => zero_to_fp32::run(c),
    }
}

fn env_cmd(c: EnvCmd) -> Result<()> {
    let r = companion::collect_env::collect(!c.no_measure, &c.expect);
    if c.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let f = &r.features;
        println!(
            "companion {}: features cuda={} nccl={} mpi={}",
            r.version, f.cuda, f.nccl, f.mpi
        );
        let cpu = &r.cpu;
        println!(
            "cpu: {} ({} threads, {} GiB available, fp32 GEMM {})",
            cpu.model.as_deref().unwrap_or("unknown"),
            cpu.threads,
            cpu.memory_available_gib
                .map_or("?".into(), |g| format!("{g:.1}")),
            cpu.gemm_f32_gflops
                .map_or("not measured".into(), |g| format!("{g:.1} GFLOP/s"))
        );
        if f.cuda {
            println!(
                "cuda driver: {}",
                r.cuda_driver.as_deref().unwrap_or("not found")
            );
        }
        for d in &r.devices {
            let check = d.check.as_ref().map_or("not run".into(), |c| {
                format!(
                    "loss {:.6} vs CPU {:.6}, gradients within {:.1e}: {}",
                    c.loss,
                    c.cpu_loss,
                    c.max_gradient_rel_diff,
                    if c.passed { "ok" } else { "DIFFERENT" }
                )
            });
            println!(
                "cuda:{}: {}, {:.1} GiB, compute capability {}.{}; {check}",
                d.ordinal, d.name, d.memory_gib, d.compute_capability.0, d.compute_capability.1
            );
            for k in &d.kernels {
                println!(
                    "  fused kernel {} ({}): within {:.1e} of the CPU (tolerance {:.0e}): {}",
                    k.op,
                    k.dtype,
                    k.max_rel_diff,
                    k.tolerance,
                    if k.passed { "ok" } else { "DIFFERENT" }
                );
            }
        }
        for l in &r.libraries {
            println!("library {}: {}", l.name, l.path);
        }
        println!(
            "caches: hub {}, datasets {}",
            r.caches.hub, r.caches.datasets
        );
    }
    for p in &r.problems {
        eprintln!("problem: {}\n  fix: {}", p.what, p.fix);
    }
    if !r.problems.is_empty() {
        anyhow::bail!("{} problem(s) found (above)", r.problems.len());
    }
    Ok(())
}

fn train_args(model: &str, vocab_size: usize) -> Result<TrainArgs> {
    Ok(TrainArgs {
        kind: model.parse::<TokenizerKind>()?,
        vocab_size,
        // A progress bar only where someone watches it.
        show_progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ..TrainArgs::default()
    })
}

fn tokenizer_train(c: TrainCmd) -> Result<()> {
    let corpus = c
        .training
        .corpus
        .iter()
        .map(|p| companion::data::corpus::resolve(&p.to_string_lossy()))
        .collect::<Result<Vec<_>, _>>()?;
    let docs = companion::data::corpus::documents_of(&corpus, &c.text_field)?;
    let mut args = train_args(&c.training.model, c.training.vocab_size)?;
    // tokenizers' BPE trainer ends its progress bar with a newline on stdout.
    args.show_progress &= !c.json;
    args.min_frequency = c.min_frequency;
    args.special_tokens = c.special_tokens.clone();
    let start = std::time::Instant::now();
    let count = std::sync::atomic::AtomicUsize::new(0);
    let docs = docs
        .inspect(|_| _ = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
        .map(|d| d.map_err(anyhow::Error::from));
    let mut tok = tokenizer::train_stream(&args, docs)?;
    let secs = start.elapsed().as_secs_f64();
    tok.model_max_length = c.model_max_length;
    // Two trainings saving into one folder at once would leave a mix of both.
    let _lock = companion::train::OutputDirLock::acquire_for(&c.out, "--out", "--out")?;
    tok.save_pretrained(&c.out)
        .with_context(|| format!("saving the tokenizer to {}", c.out.display()))?;
    let documents = count.into_inner();
    let summary = json!({
        "out": c.out.display().to_string(),
        "model": tokenizer::model_name(&tok),
        "vocab_size": tok.vocab_size(),
        "len": tok.len(),
        "bos_token_id": tok.bos_token_id(),
        "eos_token_id": tok.eos_token_id(),
        "pad_token_id": tok.pad_token_id(),
        "documents": documents,
        "seconds": secs,
    });
    if c.json {
        println!("{summary}");
    } else {
        eprintln!(
            "trained a {} tokenizer ({} tokens incl. specials) on {} documents in {:.1} s, saved to {}",
            tokenizer::model_name(&tok),
            tok.len(),
            documents,
            secs,
            c.out.display()
        );
    }
    Ok(())
}

fn tokenizer_show(c: ShowCmd) -> Result<()> {
    let tok = AutoTokenizer::from_pretrained(&c.tokenizer)
        .with_context(|| format!("loading the tokenizer `{}`", c.tokenizer))?;
    let tokens = tok.tokenize(&c.text)?;
    let ids = tok.encode(&c.text)?;
    if c.json {
        println!(
            "{}",
            json!({
                "tokens": tokens,
                "ids": ids,
                "num_tokens": ids.len(),
                "num_chars": c.text.chars().count(),
                "model": tokenizer::model_name(&tok),
                "len": tok.len(),
            })
        );
    } else {
        println!("{tokens:?}");
        println!("{ids:?}");
    }
    Ok(())
}

fn zero_estimate_cmd(c: ZeroEstimateCmd) -> Result<()> {
    if c.num_gpus == 0 || c.num_nodes == 0 {
        anyhow::bail!("--num-gpus and --num-nodes must be at least 1");
    }
    let cfg = companion::GPT2Config::from_pretrained(&c.model)
        .with_context(|| format!("reading the config of `{}`", c.model))?;
    let params = cfg.num_parameters() as u64;
    // DeepSpeed's estimates multiply the parameters by up to 18 bytes and
    // by the GPUs of a node and the nodes: refuse counts whose bytes do not
    // fit 64 bits rather than print saturated figures.
    let bytes = (params as u128) * 18 * (c.num_gpus as u128) * (c.num_nodes as u128);
    if bytes > u64::MAX as u128 {
        anyhow::bail!(
            "--num-gpus {} × --num-nodes {} for {params} parameters: the estimates exceed 2^64 bytes; give the counts of a real cluster",
            c.num_gpus,
            c.num_nodes
        );
    }
    let largest = companion::zero::memory::largest_layer(&cfg);
    if c.json {
        let rows =
            companion::zero::memory::deepspeed_estimates(params, largest, c.num_gpus, c.num_nodes);
        println!(
            "{}",
            json!({"total_params": params, "largest_layer_params": largest,
                   "num_gpus_per_node": c.num_gpus, "num_nodes": c.num_nodes, "estimates": rows})
        );
    } else {
        print!(
            "{}",
            companion::zero::memory::estimate_text(params, largest, c.num_gpus, c.num_nodes)
        );
    }
    Ok(())
}

fn config_cmd(c: ConfigCmd) -> Result<()> {
    let cfg = companion::GPT2Config::from_pretrained_with(&c.from, &c.overrides)
        .with_context(|| format!("config of `{}`", c.from))?;
    if c.json {
        println!("{}", serde_json::to_string(&cfg.to_value())?);
    } else {
        print!("{cfg}");
        if let Some(n) = cfg.n_ctx.filter(|&n| n != cfg.n_positions) {
            eprintln!(
                "note: n_ctx = {n} is stored only; the model still has n_positions = {} positions",
                cfg.n_positions
            );
        }
        eprintln!("parameters: {}", cfg.num_parameters());
    }
    Ok(())
}

fn pretrain_cmd(c: PretrainCmd, matches: &clap::ArgMatches) -> Result<()> {
    let json_out = c.json;
    let opts = c.opts.into_options();
    let args = TrainingArguments::from_layers(
        &options::default_training_args(),
        c.args.as_deref(),
        matches,
    )?;
    let summary = pretrain::run(&opts, args)?;
    if summary.is_null() {
        // An MPI rank other than 0: rank 0 reports.
        return Ok(());
    }
    if json_out {
        println!("{summary}");
    } else {
        let fmt = |m: &serde_json::Value| {
            format!(
                "loss {:.4}, perplexity {:.1}, bits/byte {:.3}",
                m["eval_loss"].as_f64().unwrap_or(f64::NAN),
                m["perplexity"].as_f64().unwrap_or(f64::NAN),
                m["bits_per_byte"].as_f64().unwrap_or(f64::NAN)
            )
        };
        if !summary["before"].is_null() {
            println!("held-out before training: {}", fmt(&summary["before"]));
        }
        if !summary["after"].is_null() {
            println!("held-out after training:  {}", fmt(&summary["after"]));
        }
        println!(
            "model saved to {}",
            summary["model_dir"].as_str().unwrap_or("")
        );
        println!("{}", summary["generation"].as_str().unwrap_or(""));
    }
    Ok(())
}
