//! `companion eval` and `companion generate`: a saved model (folder or hub
//! id) scored on a text file, or continuing a prompt (4.3.5).

use std::io::Write;

use anyhow::Result;
use candle_core::Device;
use clap::Args;
use serde_json::json;

use companion::data::DataCollatorForLanguageModeling;
use companion::generate::{load_pretrained, GenerationConfig};

#[derive(Args)]
pub struct GenerateCmd {
    /// A model folder (config.json, model.safetensors, tokenizer files) or hub id.
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long)]
    pub min_new_tokens: Option<usize>,
    #[arg(long)]
    pub do_sample: bool,
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    #[arg(long)]
    pub no_repeat_ngram_size: Option<usize>,
    /// Beam search with this many beams (greedy when 1).
    #[arg(long)]
    pub num_beams: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct EvalCmd {
    /// A model folder (config.json, model.safetensors, tokenizer files) or hub id.
    #[arg(long)]
    pub model: String,
    /// Text, JSONL or Parquet file (or `hf://datasets/OWNER/NAME/PATH`).
    #[arg(long)]
    pub data: String,
    /// The JSONL/Parquet field holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Tokens per block (run_clm's `group_texts`); default the model's n_positions.
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Evaluate only the first N blocks.
    #[arg(long)]
    pub max_samples: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn eval_cmd(c: EvalCmd) -> Result<()> {
    let (model, tok) = load_pretrained(&c.model, &Device::Cpu)?;
    let block_size = c.block_size.unwrap_or(model.config.n_positions);
    if block_size == 0 || block_size > model.config.n_positions {
        anyhow::bail!(
            "--block-size {block_size}: expected 1..={} (the model's n_positions)",
            model.config.n_positions
        );
    }
    let path = companion::data::corpus::resolve(&c.data)?;
    let options = companion::data::PrepareOptions {
        block_size,
        append_eos: tok.eos_token_id(),
        show_progress: true,
        ..Default::default()
    };
    let split = companion::data::corpus::Split::Validation;
    let mut ds = companion::data::prepare(&path, &c.text_field, split, &tok, &options)?.dataset;
    if c.max_samples == Some(0) {
        anyhow::bail!("--max-samples 0: evaluate at least 1 block");
    }
    if let Some(n) = c.max_samples {
        ds.truncate(n);
    }
    if ds.is_empty() {
        anyhow::bail!(
            "{}: no block of {block_size} tokens to evaluate (the text is shorter; try a smaller --block-size)",
            path.display()
        );
    }
    let collator = DataCollatorForLanguageModeling::new(&tok);
    let m = companion::train::evaluate_model(&model, &ds, &collator, c.batch_size)?;
    if c.json {
        println!(
            "{}",
            serde_json::json!({
                "model": c.model,
                "data": path.display().to_string(),
                "block_size": block_size,
                "blocks": ds.len(),
                "eval_loss": m.eval_loss,
                "perplexity": m.perplexity,
                "bits_per_byte": m.bits_per_byte,
                "tokens": m.tokens,
            })
        );
    } else {
        println!(
            "eval_loss {:.4}, perplexity {:.2}, bits/byte {:.3} over {} tokens ({} blocks of {block_size})",
            m.eval_loss,
            m.perplexity,
            m.bits_per_byte,
            m.tokens,
            ds.len()
        );
    }
    Ok(())
}

pub fn generate_cmd(c: GenerateCmd) -> Result<()> {
    let (model, tok) = load_pretrained(&c.model, &Device::Cpu)?;
    let mut cfg = GenerationConfig::from_pretrained(&c.model, &model.config)?;
    // --max-new-tokens, else the file's max_new_tokens or max_length (as
    // transformers reads it), else 128 new tokens.
    let file_sets_length = cfg.max_length.is_some();
    if let Some(n) = c.max_new_tokens {
        cfg.max_new_tokens = Some(n);
    } else if cfg.max_new_tokens.is_none() && !file_sets_length {
        cfg.max_new_tokens = Some(128);
    }
    cfg.num_beams = c.num_beams.unwrap_or(cfg.num_beams);
    cfg.min_new_tokens = c.min_new_tokens.or(cfg.min_new_tokens);
    cfg.do_sample |= c.do_sample;
    cfg.temperature = c.temperature.unwrap_or(cfg.temperature);
    cfg.top_k = c.top_k.unwrap_or(cfg.top_k);
    cfg.top_p = c.top_p.unwrap_or(cfg.top_p);
    cfg.repetition_penalty = c.repetition_penalty.unwrap_or(cfg.repetition_penalty);
    cfg.no_repeat_ngram_size = c.no_repeat_ngram_size.unwrap_or(cfg.no_repeat_ngram_size);
    cfg.seed = c.seed.or(cfg.seed);
    // The chapter passes pad_token_id = eos_token_id (the tokenizer pads with eos).
    if cfg.pad_token_id.is_none() {
        cfg.pad_token_id = tok.pad_token_id();
    }
    if cfg.eos_token_id.is_none() {
        cfg.eos_token_id = tok.eos_token_id().map(companion::generate::TokenIds::One);
    }
    let prompt_ids = tok.encode(&c.prompt)?;
    let start = std::time::Instant::now();
    let mut stream = tok.backend().decode_stream(false);
    let mut stdout = std::io::stdout();
    if !c.json {
        print!("{}", c.prompt);
        stdout.flush().ok();
    }
    let out = model.generate_with_streamer(
        std::slice::from_ref(&prompt_ids),
        None,
        &cfg,
        false,
        |_, id| {
            if !c.json {
                if let Ok(Some(piece)) = stream.step(id) {
                    print!("{piece}");
                    std::io::stdout().flush().ok();
                }
            }
        },
    )?;
    let secs = start.elapsed().as_secs_f64();
    let seq = &out.sequences[0];
    // An empty prompt starts from bos (as HF does): that is not a new token.
    let prompt_len = if prompt_ids.is_empty() {
        usize::from(cfg.bos_token_id.is_some())
    } else {
        prompt_ids.len()
    };
    let new_ids: Vec<u32> = seq[prompt_len.min(seq.len())..].to_vec();
    if c.json {
        println!(
            "{}",
            json!({
                "prompt": c.prompt,
                "text": tok.decode(seq, false)?,
                "generated_text": tok.decode(&new_ids, false)?,
                "token_ids": new_ids,
                "new_tokens": new_ids.len(),
                "seconds": secs,
                "tokens_per_second": new_ids.len() as f64 / secs.max(1e-9),
            })
        );
    } else {
        println!();
        eprintln!(
            "{} new tokens in {:.2} s ({:.1} tokens/s)",
            new_ids.len(),
            secs,
            new_ids.len() as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}
