//! `model.generate(...)` as in 4.3.5, with `transformers`' semantics:
//! `GenerationConfig` (HF names and defaults, `generation_config.json`), the
//! logits processors in HF's order (repetition penalty → no-repeat n-gram →
//! min new tokens, then for sampling temperature → top-k → top-p), eos
//! stopping per sequence with `pad_token_id` after it, left-padded batches,
//! and a KV cache so that each new token costs one position.

use std::path::Path;

use crate::rng::SeededRng;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::{GPT2LMHeadModel, KvCache, ModelError, Result};

/// One id or several, as `eos_token_id` may be in `generation_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// `transformers.GenerationConfig`: the fields `generate` reads, HF defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    /// Total length (prompt included); `max_new_tokens` wins when set.
    pub max_length: usize,
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub do_sample: bool,
    pub temperature: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    pub top_p: f64,
    pub repetition_penalty: f64,
    pub no_repeat_ngram_size: usize,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub num_return_sequences: usize,
    /// Seed of the sampling generator (HF uses `torch.manual_seed`; ours
    /// cannot reproduce torch's numbers, only our own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Every other key of `generation_config.json`, kept.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_length: 20,
            max_new_tokens: None,
            min_new_tokens: None,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            eos_token_id: None,
            pad_token_id: None,
            bos_token_id: None,
            num_return_sequences: 1,
            seed: None,
            extra: serde_json::Map::new(),
        }
    }
}

impl GenerationConfig {
    /// `GenerationConfig.from_model_config(config)`: bos/eos/pad from the model.
    pub fn from_model_config(cfg: &crate::config::GPT2Config) -> Self {
        GenerationConfig {
            bos_token_id: cfg.bos_token_id,
            eos_token_id: cfg.eos_token_id.map(TokenIds::One),
            pad_token_id: cfg.pad_token_id,
            ..Default::default()
        }
    }

    /// Read `generation_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let err = |msg: String| ModelError::File {
            file: path.display().to_string(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| err(format!("not a generation config: {e}")))
    }

    /// The model folder's `generation_config.json`, else one from its config.
    pub fn from_pretrained(id_or_dir: &str, model_cfg: &crate::config::GPT2Config) -> Result<Self> {
        match crate::hub::get_optional(id_or_dir, "generation_config.json") {
            Some(p) => Self::from_file(&p),
            None => Ok(Self::from_model_config(model_cfg)),
        }
    }

    pub fn to_json_string(&self) -> String {
        crate::hf_json::dumps(&serde_json::to_value(self).expect("serialises")) + "\n"
    }

    /// Write `generation_config.json` into `dir` (atomically).
    pub fn save_pretrained(&self, dir: &Path) -> std::io::Result<()> {
        crate::atomic_write::write_files_atomically(
            dir,
            &[("generation_config.json", self.to_json_string().as_bytes())],
        )
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Input(m));
        if self.do_sample && self.temperature <= 0.0 {
            return bad(format!(
                "temperature must be > 0 when sampling, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.repetition_penalty <= 0.0 {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        if self.num_return_sequences == 0 {
            return bad("num_return_sequences must be at least 1".into());
        }
        if self.num_return_sequences > 1 && !self.do_sample {
            return bad(
                "greedy decoding gives one sequence per prompt: num_return_sequences > 1 needs do_sample"
                    .into(),
            );
        }
        Ok(())
    }
}

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

/// HF's `RepetitionPenaltyLogitsProcessor`: every id already in the sequence
/// (prompt and padding included) has its score divided by the penalty if
/// positive, multiplied if negative.
pub fn apply_repetition_penalty(scores: &mut [f32], ids: &[u32], penalty: f64) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; scores.len()];
    for &id in ids {
        let i = id as usize;
        if i < scores.len() && !seen[i] {
            seen[i] = true;
            let s = scores[i];
            scores[i] = if s < 0.0 {
                s * penalty as f32
            } else {
                s / penalty as f32
            };
        }
    }
}

/// HF's `NoRepeatNGramLogitsProcessor`: ban every token that would repeat an
/// n-gram already in the sequence.
pub fn apply_no_repeat_ngram(scores: &mut [f32], ids: &[u32], n: usize) {
    if n == 0 || ids.len() + 1 < n {
        return;
    }
    let prefix = &ids[ids.len() + 1 - n..];
    for start in 0..=(ids.len() - n) {
        if &ids[start..start + n - 1] == prefix {
            let banned = ids[start + n - 1] as usize;
            if banned < scores.len() {
                scores[banned] = f32::NEG_INFINITY;
            }
        }
    }
}

/// HF's `TopKLogitsWarper`: keep the k highest scores (ties at the k-th kept).
pub fn apply_top_k(scores: &mut [f32], k: usize) {
    if k == 0 || k >= scores.len() {
        return;
    }
    let mut sorted: Vec<f32> = scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    for s in scores.iter_mut() {
        if *s < kth {
            *s = f32::NEG_INFINITY;
        }
    }
}

fn softmax(scores: &[f32]) -> Vec<f64> {
    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = scores.iter().map(|&s| ((s as f64) - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// HF's `TopPLogitsWarper`: keep the smallest set of tokens whose probability
/// reaches `top_p` (at least one).
pub fn apply_top_p(scores: &mut [f32], top_p: f64) {
    if top_p >= 1.0 {
        return;
    }
    let probs = softmax(scores);
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Ascending, as HF sorts; remove while the cumulative mass ≤ 1 − top_p.
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut cum = 0.0;
    let last = order.len() - 1;
    for (rank, &i) in order.iter().enumerate() {
        cum += probs[i];
        if cum <= 1.0 - top_p && rank < last {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

fn sample(scores: &[f32], rng: &mut SeededRng) -> u32 {
    let probs = softmax(scores);
    let r = rng.uniform();
    let mut cum = 0.0;
    let mut last_ok = 0;
    for (i, p) in probs.iter().enumerate() {
        if *p > 0.0 {
            last_ok = i;
        }
        cum += p;
        if r < cum {
            return i as u32;
        }
    }
    last_ok as u32
}

/// Process one row's logits in HF's order and pick the next token.
fn next_token(
    logits: &[f32],
    ids: &[u32],
    new_tokens: usize,
    cfg: &GenerationConfig,
    eos: &[u32],
    rng: &mut SeededRng,
) -> (u32, Vec<f32>) {
    let mut s = logits.to_vec();
    apply_repetition_penalty(&mut s, ids, cfg.repetition_penalty);
    apply_no_repeat_ngram(&mut s, ids, cfg.no_repeat_ngram_size);
    if new_tokens < cfg.min_new_tokens.unwrap_or(0) {
        for &e in eos {
            if (e as usize) < s.len() {
                s[e as usize] = f32::NEG_INFINITY;
            }
        }
    }
    if !cfg.do_sample {
        return (argmax(&s), s);
    }
    if cfg.temperature != 1.0 {
        s.iter_mut().for_each(|x| *x /= cfg.temperature as f32);
    }
    apply_top_k(&mut s, cfg.top_k);
    apply_top_p(&mut s, cfg.top_p);
    (sample(&s, rng), s)
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
        let max_len = match cfg.max_new_tokens {
            Some(n) => width + n,
            None => cfg.max_length,
        };
        if max_len > self.config.n_positions {
            return Err(ModelError::Input(format!(
                "prompt ({width} tokens) plus new tokens makes {max_len}, more than the model's \
                 n_positions = {}; ask for fewer new tokens",
                self.config.n_positions
            )));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_divides_positive_multiplies_negative() {
        let mut s = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut s, &[0, 1, 1], 2.0);
        assert_eq!(s, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn no_repeat_ngram_bans_completions() {
        let mut s = vec![0.0; 5];
        // bigram (1, 2) seen; the sequence ends in 1 → 2 is banned.
        apply_no_repeat_ngram(&mut s, &[1, 2, 3, 1], 2);
        assert_eq!(s[2], f32::NEG_INFINITY);
        assert_eq!(s.iter().filter(|x| x.is_infinite()).count(), 1);
    }

    #[test]
    fn top_k_and_top_p_keep_the_head() {
        let mut s = vec![1.0, 3.0, 2.0, 0.0];
        apply_top_k(&mut s, 2);
        assert_eq!(s[0], f32::NEG_INFINITY);
        assert_eq!(s[3], f32::NEG_INFINITY);
        assert_eq!((s[1], s[2]), (3.0, 2.0));
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps two.
        let mut s = vec![3.0, 2.0, 1.0, 0.0];
        apply_top_p(&mut s, 0.7);
        assert!(s[0].is_finite() && s[1].is_finite());
        assert!(s[2].is_infinite() && s[3].is_infinite());
        // top_p tiny still keeps the best token.
        let mut s = vec![3.0, 2.0];
        apply_top_p(&mut s, 1e-9);
        assert!(s[0].is_finite() && s[1].is_infinite());
    }
}
