//! `dataset.map(lambda d: tokenizer(d["text"]), batched=True)` and
//! run_clm's `group_texts`: documents become fixed-length blocks.

use std::borrow::Cow;

use rayon::prelude::*;

use super::shards::TokenShards;

use super::error::{DataError, Result};
use crate::tokenizer::AutoTokenizer;

/// How texts become training examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// One example per document, truncated to `max_length` (the chapter's way).
    Truncate { max_length: usize },
    /// run_clm's `group_texts`: documents joined with eos, cut into blocks of
    /// `block_size`, the remainder of each map batch dropped.
    Group { block_size: usize },
}

/// A tokenized dataset, in one of its two forms.
#[derive(Debug, Clone, PartialEq)]
pub enum Dataset {
    /// One `input_ids` row per example, in memory (what
    /// [`tokenize_and_pack`] makes, the notebooks' way).
    InMemory {
        input_ids: Vec<Vec<u32>>,
        /// UTF-8 bytes of the text the examples came from (for bits per byte).
        text_bytes: usize,
        /// Tokens before packing dropped any (for bits per byte).
        text_tokens: usize,
    },
    /// Fixed-size blocks read in place from memory-mapped token shards on
    /// disk (what [`super::prepare`] makes, for corpora of any size); the
    /// text's byte and token counts are in their metadata.
    Shards(TokenShards),
}

impl Dataset {
    /// A dataset of `input_ids` rows that came from `text_bytes` bytes of
    /// text, `text_tokens` tokens before packing.
    pub fn from_rows(input_ids: Vec<Vec<u32>>, text_bytes: usize, text_tokens: usize) -> Self {
        Dataset::InMemory {
            input_ids,
            text_bytes,
            text_tokens,
        }
    }

    /// A dataset of the blocks in `shards`.
    pub fn from_shards(shards: TokenShards) -> Self {
        Dataset::Shards(shards)
    }

    pub fn len(&self) -> usize {
        match self {
            Dataset::Shards(s) => s.len(),
            Dataset::InMemory { input_ids, .. } => input_ids.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Example `i`'s ids.
    pub fn example(&self, i: usize) -> Cow<'_, [u32]> {
        match self {
            Dataset::Shards(s) => s.block(i),
            Dataset::InMemory { input_ids, .. } => Cow::Borrowed(&input_ids[i]),
        }
    }

    /// The ids of examples `idx`, for the collator.
    pub fn examples(&self, idx: &[usize]) -> Vec<Cow<'_, [u32]>> {
        idx.iter().map(|&i| self.example(i)).collect()
    }

    /// Every example's ids, in order.
    pub fn iter(&self) -> impl Iterator<Item = Cow<'_, [u32]>> {
        (0..self.len()).map(|i| self.example(i))
    }

    /// `dataset["input_ids"]` of the in-memory form.
    pub fn input_ids(&self) -> Option<&[Vec<u32>]> {
        match self {
            Dataset::InMemory { input_ids, .. } => Some(input_ids),
            Dataset::Shards(_) => None,
        }
    }

    /// The token shards of the on-disk form.
    pub fn shards(&self) -> Option<&TokenShards> {
        match self {
            Dataset::Shards(s) => Some(s),
            Dataset::InMemory { .. } => None,
        }
    }

    /// Keep the first `n` examples (`max_eval_samples`).
    pub fn truncate(&mut self, n: usize) {
        match self {
            Dataset::Shards(s) => *s = s.truncated(n),
            Dataset::InMemory { input_ids, .. } => input_ids.truncate(n),
        }
    }

    /// UTF-8 bytes of the text the examples came from.
    pub fn text_bytes(&self) -> usize {
        match self {
            Dataset::Shards(s) => s.meta.text_bytes,
            Dataset::InMemory { text_bytes, .. } => *text_bytes,
        }
    }

    /// Tokens of that text before packing dropped any.
    pub fn text_tokens(&self) -> usize {
        match self {
            Dataset::Shards(s) => s.meta.text_tokens,
            Dataset::InMemory { text_tokens, .. } => *text_tokens,
        }
    }

    /// Bytes of text per token, to turn nats per token into bits per byte.
    pub fn bytes_per_token(&self) -> f64 {
        self.text_bytes() as f64 / self.text_tokens().max(1) as f64
    }
}

/// How [`tokenize_and_pack`] runs `dataset.map(tokenize, batched=True)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenizeOptions {
    pub packing: Packing,
    /// Documents per map batch (`batch_size=` of `dataset.map`; HF's default
    /// is 1000). `group_texts` drops each batch's remainder.
    pub batch_size: usize,
    /// An id appended to every document, usually eos (run_clm adds it
    /// through the tokenizer; GPT-2's does not, so we append it).
    pub append_eos: Option<u32>,
    /// A progress bar on stderr (when it is a terminal).
    pub show_progress: bool,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions {
            packing: Packing::Group { block_size: 1024 },
            batch_size: 1000,
            append_eos: None,
            show_progress: false,
        }
    }
}

/// Documents longer than this are tokenized in pieces (same ids, bounded
/// memory: see [`AutoTokenizer::encode_long`]).
pub(crate) const PIECE_BYTES: usize = 1 << 20;

/// `dataset.map(lambda d: tokenizer(d["text"]), batched=True)` on all cores,
/// then packed as `options.packing` says.
pub fn tokenize_and_pack(
    tok: &AutoTokenizer,
    texts: &[String],
    options: &TokenizeOptions,
) -> Result<Dataset> {
    let TokenizeOptions {
        packing,
        batch_size,
        append_eos: eos,
        show_progress,
    } = *options;
    if batch_size == 0 {
        return Err(DataError::Invalid(
            "map batch_size must be at least 1".into(),
        ));
    }
    let bar = progress(texts.len() as u64, "tokenizing", show_progress);
    let batches: Vec<Vec<Vec<u32>>> = texts
        .par_chunks(batch_size)
        .map(|chunk| {
            let mut out = Vec::with_capacity(chunk.len());
            for t in chunk {
                let mut ids = tok.encode_long(t, PIECE_BYTES)?;
                if let Some(e) = eos {
                    ids.push(e);
                }
                out.push(ids);
            }
            bar.inc(chunk.len() as u64);
            Ok(out)
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();
    let text_tokens = batches.iter().flatten().map(Vec::len).sum();
    let text_bytes = texts.iter().map(String::len).sum();
    let input_ids = match packing {
        Packing::Truncate { max_length } => batches
            .into_iter()
            .flatten()
            .map(|mut ids| {
                ids.truncate(max_length);
                ids
            })
            .filter(|ids| !ids.is_empty())
            .collect(),
        Packing::Group { block_size } => {
            if block_size == 0 {
                return Err(DataError::Invalid("block_size must be at least 1".into()));
            }
            batches
                .iter()
                .flat_map(|b| group_texts(b, block_size))
                .collect()
        }
    };
    Ok(Dataset::from_rows(input_ids, text_bytes, text_tokens))
}

/// run_clm's `group_texts` on one map batch: concatenate, drop the
/// remainder, split into `block_size` chunks.
pub fn group_texts(examples: &[Vec<u32>], block_size: usize) -> Vec<Vec<u32>> {
    group_flat(examples, block_size)
        .chunks(block_size)
        .map(<[u32]>::to_vec)
        .collect()
}

/// `group_texts` as one flat run of whole blocks (what shards store).
pub fn group_flat(examples: &[Vec<u32>], block_size: usize) -> Vec<u32> {
    let mut g = GroupStream::new(block_size);
    let mut out = Vec::new();
    for e in examples {
        g.push(e, &mut out);
    }
    out
}

/// `group_texts` one example at a time: whole blocks come out as soon as
/// they are full; [`GroupStream::end_batch`] drops the remainder, as
/// `group_texts` does at the end of each map batch.
#[derive(Debug, Clone)]
pub struct GroupStream {
    block_size: usize,
    carry: Vec<u32>,
}

impl GroupStream {
    pub fn new(block_size: usize) -> Self {
        GroupStream {
            block_size,
            // Grown as ids arrive: a huge block_size must not allocate up front.
            carry: Vec::with_capacity(block_size.min(1 << 16)),
        }
    }

    /// Add an example's ids; append the blocks they complete to `out`.
    pub fn push(&mut self, ids: &[u32], out: &mut Vec<u32>) {
        self.carry.extend_from_slice(ids);
        let whole = self.carry.len() / self.block_size * self.block_size;
        out.extend(self.carry.drain(..whole));
    }

    /// The map batch ends: its remainder is dropped.
    pub fn end_batch(&mut self) {
        self.carry.clear();
    }
}

fn progress(len: u64, msg: &'static str, show: bool) -> indicatif::ProgressBar {
    if !show || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} [{elapsed}<{eta}]")
            .expect("template"),
    );
    bar.set_message(msg);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_texts_drops_the_remainder() {
        let g = group_texts(&[vec![1, 2, 3], vec![4, 5], vec![6, 7, 8]], 3);
        assert_eq!(g, vec![vec![1, 2, 3], vec![4, 5, 6]]);
    }
}
