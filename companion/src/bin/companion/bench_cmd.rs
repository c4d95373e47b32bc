//! `companion bench …` on the command line: the flags of each benchmark
//! and how its figures are printed (the measuring is in [`crate::bench`]).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use companion::tokenizer;
use serde_json::json;

use crate::bench;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Tokenizer training time and encoding throughput on a corpus.
    Tokenizer(BenchTokenizerCmd),
    /// Forward + backward + AdamW step: tokens/s, MFU, peak memory.
    Train(BenchModelCmd),
    /// Greedy generation of 128 tokens from an 8-token prompt: tokens/s.
    Generate(BenchModelCmd),
    /// The whole Trainer step (ZeRO engine, clipping, logging): tokens/s, peak
    /// memory, model-state bytes per rank.
    Trainer(BenchTrainerCmd),
    /// Streaming preparation of a corpus into token shards (tokenize +
    /// group_texts + write): seconds, MB/s, peak RSS.
    Data(BenchDataCmd),
}

/// A count flag that must be at least 1.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

#[derive(Args)]
pub struct BenchDataCmd {
    /// The corpus (JSONL, text, Parquet or a `datasets` folder).
    #[arg(long)]
    corpus: PathBuf,
    /// A tokenizer folder or hub id.
    #[arg(long, default_value = "data/pretrained/gpt2")]
    tokenizer: String,
    #[arg(long, default_value_t = 1024, value_parser = at_least_one())]
    block_size: usize,
    #[arg(long, default_value = "text")]
    text_field: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BenchTrainerCmd {
    #[arg(long, default_value = "small")]
    shape: String,
    #[arg(long, default_value_t = 5, value_parser = at_least_one())]
    steps: usize,
    #[arg(long)]
    gradient_checkpointing: bool,
    /// A ds_config.json (ZeRO stage, offload).
    #[arg(long)]
    deepspeed: Option<PathBuf>,
    /// CPU ranks (threads); more than one data-parallel rank needs --deepspeed.
    #[arg(long, default_value_t = 1)]
    num_ranks: usize,
    /// Megatron-LM's tensor-parallel size (ranks splitting each layer).
    #[arg(long, default_value_t = 1, value_parser = at_least_one())]
    tensor_model_parallel_size: usize,
    /// Megatron-LM's pipeline-parallel size (stages of blocks).
    #[arg(long, default_value_t = 1, value_parser = at_least_one())]
    pipeline_model_parallel_size: usize,
    /// Micro-batches a step (what the pipeline overlaps).
    #[arg(long, default_value_t = 1, value_parser = at_least_one())]
    gradient_accumulation_steps: usize,
    /// Where one rank runs: cpu, cuda or cuda:N (a build with the cuda feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BenchModelCmd {
    /// `small` (4 layers, 256 wide, vocab 8192, 8×256 tokens) or `gpt2` (124M, 1×512).
    #[arg(long, default_value = "small")]
    shape: String,
    /// Timed steps (train) or new tokens (generate).
    #[arg(long, value_parser = at_least_one())]
    steps: Option<usize>,
    /// train: candle's autograd instead of the fused CPU kernels, to compare.
    #[arg(long)]
    autograd: bool,
    /// Where to run: cpu, cuda or cuda:N (a build with the cuda feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Forward/backward precision: f32, or bf16 (with fp32 master weights,
    /// as the Trainer's `bf16=True`). MFU is against this dtype's GEMM rate.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    dtype: String,
    /// Sequences per step (default: the shape's).
    #[arg(long, value_parser = at_least_one())]
    batch: Option<usize>,
    /// Tokens per sequence (default: the shape's).
    #[arg(long, value_parser = at_least_one())]
    seq: Option<usize>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BenchTokenizerCmd {
    #[command(flatten)]
    training: crate::TokenizerTraining,
    #[arg(long)]
    json: bool,
}

pub fn run(c: BenchCmd) -> Result<()> {
    match c {
        BenchCmd::Tokenizer(c) => bench_tokenizer(c),
        BenchCmd::Train(c) => bench_model(c, true),
        BenchCmd::Generate(c) => bench_model(c, false),
        BenchCmd::Trainer(c) => bench_trainer(c),
        BenchCmd::Data(c) => bench_data(c),
    }
}

/// Prepares into a fresh cache folder, so the figures are a full build.
fn bench_data(c: BenchDataCmd) -> Result<()> {
    let tok = tokenizer::AutoTokenizer::from_pretrained(&c.tokenizer)
        .with_context(|| format!("loading the tokenizer `{}`", c.tokenizer))?;
    let cache = tempfile::tempdir()?;
    let options = companion::data::PrepareOptions {
        block_size: c.block_size,
        append_eos: tok.eos_token_id(),
        cache_dir: Some(cache.path().to_path_buf()),
        ..Default::default()
    };
    let split = companion::data::corpus::Split::Train;
    let t0 = std::time::Instant::now();
    let p = companion::data::prepare(&c.corpus, &c.text_field, split, &tok, &options)?;
    let secs = t0.elapsed().as_secs_f64();
    let meta = &p.dataset.shards().expect("prepared on disk").meta;
    let file_bytes: u64 = companion::data::corpus::source_files(&c.corpus, split)?
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let out = json!({
        "implementation": "companion (Rust)",
        "corpus": c.corpus.display().to_string(),
        "corpus_bytes": file_bytes,
        "threads": rayon::current_num_threads(),
        "seconds": secs,
        "mb_per_s": file_bytes as f64 / 1e6 / secs,
        "peak_rss_mib": companion::sysmem::peak_rss_mib(),
        "documents": meta.documents,
        "text_tokens": meta.text_tokens,
        "blocks": meta.blocks,
        "block_size": c.block_size,
    });
    if c.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

fn bench_tokenizer(c: BenchTokenizerCmd) -> Result<()> {
    let crate::TokenizerTraining {
        corpus,
        model,
        vocab_size,
    } = &c.training;
    let docs = companion::data::corpus::read_files(corpus, "text")?;
    let bytes: usize = docs.iter().map(String::len).sum();
    let mut args = crate::train_args(model, *vocab_size)?;
    args.show_progress = false;
    let t0 = std::time::Instant::now();
    let tok = tokenizer::train(&args, docs.iter())?;
    let train_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let (tokens, _) = tokenizer::count_tokens(&tok, &docs)?;
    let encode_s = t1.elapsed().as_secs_f64();
    let mb_s = bytes as f64 / 1e6 / encode_s;
    let out = json!({
        "implementation": "companion (Rust)",
        "model": model,
        "vocab_size": vocab_size,
        "corpus_bytes": bytes,
        "threads": rayon::current_num_threads(),
        "train_seconds": train_s,
        "encode_seconds": encode_s,
        "encode_mb_per_s": mb_s,
        "tokens": tokens,
    });
    if c.json {
        println!("{out}");
    } else {
        println!(
            "companion {}: train {:.2} s, encode {:.2} MB/s ({} tokens, {} bytes, {} threads)",
            model,
            train_s,
            mb_s,
            tokens,
            bytes,
            rayon::current_num_threads()
        );
    }
    Ok(())
}

fn bench_trainer(c: BenchTrainerCmd) -> Result<()> {
    let shape = bench::shape(&c.shape)
        .with_context(|| format!("unknown shape `{}`: expected `small` or `gpt2`", c.shape))?;
    let ds = c
        .deepspeed
        .as_ref()
        .map(|p| serde_json::Value::String(p.display().to_string()));
    let device = companion::collect_env::device_from_name(&c.device).map_err(anyhow::Error::msg)?;
    if !device.is_cpu() && c.num_ranks > 1 {
        anyhow::bail!("--num-ranks {} with --device {}: several ranks run on the CPU (use pretrain --num-gpus for GPUs)", c.num_ranks, c.device);
    }
    let run = bench::TrainerRun {
        steps: c.steps,
        gradient_checkpointing: c.gradient_checkpointing,
        deepspeed: ds,
        ranks: c.num_ranks,
        tensor_model_parallel_size: c.tensor_model_parallel_size,
        pipeline_model_parallel_size: c.pipeline_model_parallel_size,
        gradient_accumulation_steps: c.gradient_accumulation_steps,
    };
    let v = bench::trainer(&shape, &run, &device)?;
    if c.json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}

fn bench_model(c: BenchModelCmd, train: bool) -> Result<()> {
    let mut shape = bench::shape(&c.shape)
        .with_context(|| format!("unknown shape `{}`: expected `small` or `gpt2`", c.shape))?;
    shape.batch = c.batch.unwrap_or(shape.batch);
    shape.seq = c.seq.unwrap_or(shape.seq);
    if shape.seq > shape.config.n_positions {
        anyhow::bail!(
            "--seq {}: the `{}` shape has n_positions {}",
            shape.seq,
            shape.name,
            shape.config.n_positions
        );
    }
    let device = companion::collect_env::device_from_name(&c.device).map_err(anyhow::Error::msg)?;
    let dtype = match c.dtype.as_str() {
        "bf16" => candle_core::DType::BF16,
        _ => candle_core::DType::F32,
    };
    let v = if train {
        bench::train(&shape, c.steps.unwrap_or(5), c.autograd, &device, dtype)?
    } else {
        bench::generate(&shape, c.steps.unwrap_or(128), &device, dtype)?
    };
    if c.json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}
