//! `model.generate(...)` as in 4.3.5, with `transformers`' semantics:
//! `GenerationConfig` (HF names and defaults, `generation_config.json`), the
//! logits processors in HF's order (repetition penalty → no-repeat n-gram →
//! min new tokens, then for sampling temperature → top-k → top-p), eos
//! stopping per sequence with `pad_token_id` after it, left-padded batches,
//! and a KV cache so that each new token costs one position; beam search
//! ([`beam`]) when `num_beams > 1`.

mod beam;
pub mod config;
pub mod pipeline;
pub mod processors;

use candle_core::{DType, Tensor};

pub use config::{EarlyStopping, GenerationConfig, TokenIds};
pub use pipeline::{load_pretrained, PretrainedError};
pub use processors::{apply_no_repeat_ngram, apply_repetition_penalty, apply_top_k, apply_top_p};

use crate::model::{GPT2LMHeadModel, KvCache, ModelError, Result};
use crate::rng::SeededRng;
use processors::next_token;

/// What `generate` returns: the full sequences (prompt included, left
/// padding kept, `pad_token_id` after eos) and, on request, the raw logits of
/// every step (`output_logits=True`).
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub sequences: Vec<Vec<u32>>,
    /// Per step, per row, the model's raw next-token logits.
    pub logits: Vec<Vec<Vec<f32>>>,
    /// Per step, per row, the processed scores (`output_scores=True`).
    pub scores: Vec<Vec<Vec<f32>>>,
}

impl GPT2LMHeadModel {
    /// `model.generate(input_ids, attention_mask=…, **generation_config)`.
    pub fn generate(
        &self,
        input_ids: &[Vec<u32>],
        attention_mask: Option<&[Vec<u32>]>,
        cfg: &GenerationConfig,
    ) -> Result<GenerateOutput> {
        self.generate_with_streamer(input_ids, attention_mask, cfg, false, |_, _| {})
    }

    /// `generate` calling `on_token(row, token)` for every new token of an
    /// unfinished row as soon as it is chosen (HF's `streamer`). With
    /// `keep_scores`, the raw logits and processed scores of every step are
    /// returned too.
    pub fn generate_with_streamer(
        &self,
        input_ids: &[Vec<u32>],
        attention_mask: Option<&[Vec<u32>]>,
        cfg: &GenerationConfig,
        keep_scores: bool,
        mut on_token: impl FnMut(usize, u32),
    ) -> Result<GenerateOutput> {
        cfg.validate()?;
        cfg.validate_ids(self.config.vocab_size)?;
        // No autograd graph while generating (torch.no_grad in HF's generate).
        let model = self.for_inference();
        if input_ids.is_empty() {
            return Err(ModelError::Input(
                "generate needs at least one prompt".into(),
            ));
        }
        let eos = cfg
            .eos_token_id
            .as_ref()
            .map(|e| e.to_vec())
            .unwrap_or_default();
        // HF: with eos but no pad, pad with (the first) eos.
        let pad = cfg.pad_token_id.or(eos.first().copied());
        // Expand each prompt num_return_sequences times; an empty prompt
        // starts from bos as HF does.
        let mut seqs: Vec<Vec<u32>> = Vec::new();
        let mut mask: Vec<Vec<u32>> = Vec::new();
        for (r, ids) in input_ids.iter().enumerate() {
            let (ids, m) = if ids.is_empty() {
                let bos = cfg.bos_token_id.ok_or_else(|| {
                    ModelError::Input(
                        "the prompt is empty and there is no bos_token_id to start from".into(),
                    )
                })?;
                (vec![bos], vec![1])
            } else {
                let m = attention_mask
                    .map(|m| m[r].clone())
                    .unwrap_or(vec![1; ids.len()]);
                (ids.clone(), m)
            };
            for _ in 0..cfg.num_return_sequences {
                seqs.push(ids.clone());
                mask.push(m.clone());
            }
        }
        let width = seqs[0].len();
        if seqs.iter().any(|s| s.len() != width) || mask.iter().any(|m| m.len() != width) {
            return Err(ModelError::Input(
                "prompts in a batch must have one length: pad them (left) and pass an attention mask"
                    .into(),
            ));
        }
        let max_len = match (cfg.max_new_tokens, cfg.max_length) {
            (Some(n), _) => width.saturating_add(n),
            (None, Some(l)) => l,
            // transformers: "by default let's always generate 20 new tokens".
            (None, None) => (width + 20).min(self.config.n_positions),
        };
        if width >= self.config.n_positions {
            return Err(ModelError::Input(format!(
                "the prompt is {width} tokens, as long as the model's n_positions = {} or \
                 longer: no room for a new token; give a shorter prompt",
                self.config.n_positions
            )));
        }
        if max_len > self.config.n_positions {
            return Err(ModelError::Input(format!(
                "prompt ({width} tokens) plus new tokens makes {max_len}, more than the model's \
                 n_positions = {}; ask for fewer new tokens",
                self.config.n_positions
            )));
        }
        if cfg.num_beams > 1 {
            if keep_scores {
                return Err(ModelError::Input(
                    "per-step scores are not kept under beam search (num_beams > 1)".into(),
                ));
            }
            return beam_search(&model, &seqs, &mask, cfg, &eos, pad, max_len, on_token);
        }
        let rows = seqs.len();
        let mut rng = SeededRng::new(cfg.seed.unwrap_or(0));
        let mut cache = KvCache::new(self.config.n_layer);
        let mut unfinished = vec![true; rows];
        let mut out = GenerateOutput {
            sequences: vec![],
            logits: vec![],
            scores: vec![],
        };
        let mut step_input: Vec<Vec<u32>> = seqs.clone();
        let mut new_tokens = 0;
        while seqs[0].len() < max_len {
            let ids = Tensor::new(step_input.clone(), self.device())?;
            let logits = model.forward(&ids, Some(&mask), Some(&mut cache))?;
            let t = logits.dim(1)?;
            let last: Vec<Vec<f32>> = logits
                .narrow(1, t - 1, 1)?
                .squeeze(1)?
                .to_dtype(DType::F32)?
                .to_vec2()?;
            let mut step_scores = Vec::new();
            let mut next = Vec::with_capacity(rows);
            for r in 0..rows {
                let (tok, scores) = next_token(&last[r], &seqs[r], new_tokens, cfg, &eos, &mut rng);
                let tok = if unfinished[r] {
                    tok
                } else {
                    pad.unwrap_or(tok)
                };
                if keep_scores {
                    step_scores.push(scores);
                }
                next.push(tok);
            }
            if keep_scores {
                out.logits.push(last);
                out.scores.push(step_scores);
            }
            for r in 0..rows {
                seqs[r].push(next[r]);
                mask[r].push(1);
                if unfinished[r] {
                    on_token(r, next[r]);
                    if eos.contains(&next[r]) {
                        unfinished[r] = false;
                    }
                }
            }
            new_tokens += 1;
            step_input = next.iter().map(|&t| vec![t]).collect();
            if unfinished.iter().all(|u| !u) {
                break;
            }
        }
        out.sequences = seqs;
        Ok(out)
    }
}

/// Beam search for each prompt (`seqs` holds each one num_return_sequences
/// times); the results padded to one length as HF returns them, each row's
/// new tokens then given to `on_token` (HF refuses a streamer with beams:
/// nothing is final before the search ends).
#[allow(clippy::too_many_arguments)]
fn beam_search(
    model: &GPT2LMHeadModel,
    seqs: &[Vec<u32>],
    mask: &[Vec<u32>],
    cfg: &GenerationConfig,
    eos: &[u32],
    pad: Option<u32>,
    max_len: usize,
    mut on_token: impl FnMut(usize, u32),
) -> Result<GenerateOutput> {
    let width = seqs[0].len();
    let mut sequences = Vec::with_capacity(seqs.len());
    for r in (0..seqs.len()).step_by(cfg.num_return_sequences) {
        sequences.extend(beam::search(model, &seqs[r], &mask[r], cfg, eos, max_len)?);
    }
    let longest = sequences.iter().map(Vec::len).max().unwrap_or(width);
    // HF fills with `pad_token_id or eos_token_id[0]`: a pad id of 0 is falsy there.
    let fill = match (pad, eos.first()) {
        (Some(p), _) if p != 0 => p,
        (_, Some(&e)) => e,
        (p, None) => p.unwrap_or(0),
    };
    for (r, s) in sequences.iter_mut().enumerate() {
        for &t in &s[width..] {
            on_token(r, t);
        }
        s.resize(longest, fill);
    }
    Ok(GenerateOutput {
        sequences,
        logits: vec![],
        scores: vec![],
    })
}
