//! 4.3.4's data side: `dataset.map(tokenize, batched=True)`, run_clm's
//! `group_texts`, `DataCollatorForLanguageModeling(tokenizer, mlm=False)`,
//! and a loader with seeded per-epoch shuffling and per-rank sharding.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rayon::prelude::*;

use crate::model::IGNORE_INDEX;
use crate::tokenizer::{AutoTokenizer, PaddingSide};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Corpus(#[from] crate::corpus::CorpusError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, DataError>;

/// How texts become training examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// One example per document, truncated to `max_length` (the chapter's way).
    Truncate { max_length: usize },
    /// run_clm's `group_texts`: documents joined with eos, cut into blocks of
    /// `block_size`, the remainder of each map batch dropped.
    Group { block_size: usize },
}

/// A tokenized dataset: one `input_ids` row per example.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    pub input_ids: Vec<Vec<u32>>,
    /// UTF-8 bytes of the text the examples came from (for bits per byte).
    pub text_bytes: usize,
    /// Tokens before packing dropped any (for bits per byte).
    pub text_tokens: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Bytes of text per token, to turn nats per token into bits per byte.
    pub fn bytes_per_token(&self) -> f64 {
        self.text_bytes as f64 / self.text_tokens.max(1) as f64
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
                let mut ids = tok.encode(t)?;
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
    Ok(Dataset {
        input_ids,
        text_bytes,
        text_tokens,
    })
}

/// run_clm's `group_texts` on one map batch: concatenate, drop the
/// remainder, split into `block_size` chunks.
pub fn group_texts(examples: &[Vec<u32>], block_size: usize) -> Vec<Vec<u32>> {
    let all: Vec<u32> = examples.iter().flatten().copied().collect();
    let total = (all.len() / block_size) * block_size;
    all[..total]
        .chunks(block_size)
        .map(<[u32]>::to_vec)
        .collect()
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

/// A tokenized-dataset cache, so a second run does not re-tokenize unchanged
/// input: keyed by the corpus bytes, the tokenizer file and the settings.
/// Lives in `HF_DATASETS_CACHE` (else `~/.cache/huggingface/datasets`) under
/// `companion/`.
pub fn cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_DATASETS_CACHE") {
        if !p.is_empty() {
            return PathBuf::from(p).join("companion");
        }
    }
    if let Ok(h) = std::env::var("HF_HOME") {
        if !h.is_empty() {
            return PathBuf::from(h).join("datasets").join("companion");
        }
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home)
        .join(".cache")
        .join("huggingface")
        .join("datasets")
        .join("companion")
}

fn fnv1a(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= *b as u64;
        *h = h.wrapping_mul(0x100000001b3);
    }
}

/// Load a corpus file and tokenize it, through the cache.
pub fn load_tokenized(
    path: &Path,
    text_field: &str,
    tok: &AutoTokenizer,
    packing: Packing,
    eos: Option<u32>,
) -> Result<Dataset> {
    let texts = crate::corpus::read_files(&[path], text_field)?;
    let mut h: u64 = 0xcbf29ce484222325;
    for t in &texts {
        fnv1a(&mut h, t.as_bytes());
        fnv1a(&mut h, &[0]);
    }
    fnv1a(
        &mut h,
        tok.backend()
            .to_string(false)
            .unwrap_or_default()
            .as_bytes(),
    );
    fnv1a(&mut h, format!("{packing:?}{eos:?}").as_bytes());
    let file = cache_dir().join(format!("{h:016x}.bin"));
    if let Some(ds) = read_cache(&file) {
        return Ok(ds);
    }
    let options = TokenizeOptions {
        packing,
        append_eos: eos,
        show_progress: true,
        ..TokenizeOptions::default()
    };
    let ds = tokenize_and_pack(tok, &texts, &options)?;
    // A cache that cannot be written only costs time next run.
    let _ = write_cache(&file, &ds);
    Ok(ds)
}

fn write_cache(file: &Path, ds: &Dataset) -> std::io::Result<()> {
    let mut buf = Vec::new();
    buf.extend_from_slice(b"CMPDS1\0\0");
    for n in [ds.text_bytes, ds.text_tokens, ds.input_ids.len()] {
        buf.extend_from_slice(&(n as u64).to_le_bytes());
    }
    for row in &ds.input_ids {
        buf.extend_from_slice(&(row.len() as u64).to_le_bytes());
        for id in row {
            buf.extend_from_slice(&id.to_le_bytes());
        }
    }
    crate::io::write_file_atomically(file, &buf)
}

fn read_cache(file: &Path) -> Option<Dataset> {
    let b = std::fs::read(file).ok()?;
    if b.len() < 32 || &b[..8] != b"CMPDS1\0\0" {
        return None;
    }
    let mut pos = 8;
    let u64_at = |pos: &mut usize| -> Option<u64> {
        let v = u64::from_le_bytes(b.get(*pos..*pos + 8)?.try_into().ok()?);
        *pos += 8;
        Some(v)
    };
    let text_bytes = u64_at(&mut pos)? as usize;
    let text_tokens = u64_at(&mut pos)? as usize;
    let rows = u64_at(&mut pos)? as usize;
    let mut input_ids = Vec::with_capacity(rows);
    for _ in 0..rows {
        let n = u64_at(&mut pos)? as usize;
        let bytes = b.get(pos..pos + 4 * n)?;
        input_ids.push(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        );
        pos += 4 * n;
    }
    Some(Dataset {
        input_ids,
        text_bytes,
        text_tokens,
    })
}

/// A collated batch, as the collator's dict: `input_ids`, `attention_mask`, `labels`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
    pub labels: Vec<Vec<i64>>,
}

impl Batch {
    /// Label tokens the loss counts (after the shift the model applies).
    pub fn num_label_tokens(&self) -> usize {
        self.labels
            .iter()
            .map(|r| r.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count())
            .sum()
    }

    /// True when no position is padding (the mask can be left out).
    pub fn is_unpadded(&self) -> bool {
        self.attention_mask.iter().flatten().all(|&m| m == 1)
    }
}

/// `DataCollatorForLanguageModeling(tokenizer, mlm=False)`, written
/// `DataCollatorForLanguageModeling { mlm: false, ..DataCollatorForLanguageModeling::new(&tokenizer) }`
/// or just `::new(&tokenizer)`: pad to the
/// longest example (rounded up to `pad_to_multiple_of`) on the tokenizer's
/// padding side; labels are the input ids with -100 where the input is the
/// pad token (so with pad = eos, real eos tokens are not learned either, as
/// in HF). It does not shift: the model does.
#[derive(Debug, Clone)]
pub struct DataCollatorForLanguageModeling {
    pub pad_token_id: Option<u32>,
    pub mlm: bool,
    pub pad_to_multiple_of: Option<usize>,
    pub padding_side: PaddingSide,
}

impl DataCollatorForLanguageModeling {
    /// The causal-LM collator for `tok` (`mlm: false`; HF's own default is
    /// `mlm=True`, masked-LM as BERT trains, which GPT-2 does not use and
    /// `collate` refuses).
    pub fn new(tok: &AutoTokenizer) -> Self {
        DataCollatorForLanguageModeling {
            pad_token_id: tok.pad_token_id(),
            mlm: false,
            pad_to_multiple_of: None,
            padding_side: tok.padding_side,
        }
    }

    pub fn collate(&self, examples: &[&[u32]]) -> Result<Batch> {
        if self.mlm {
            return Err(DataError::Invalid(
                "mlm=True is masked-language modelling (BERT); GPT-2 is trained with mlm=False"
                    .into(),
            ));
        }
        let longest = examples.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut width = longest;
        if let Some(m) = self.pad_to_multiple_of.filter(|&m| m > 0) {
            width = width.div_ceil(m) * m;
        }
        let needs_pad = examples.iter().any(|e| e.len() != width);
        let pad =
            match self.pad_token_id {
                Some(p) => p,
                None if !needs_pad => 0,
                None => return Err(DataError::Invalid(
                    "the tokenizer has no pad token, so examples of different lengths cannot be \
                     batched; set one (GPT-2 users set pad_token = eos_token)"
                        .into(),
                )),
            };
        let mut b = Batch {
            input_ids: Vec::with_capacity(examples.len()),
            attention_mask: Vec::with_capacity(examples.len()),
            labels: Vec::with_capacity(examples.len()),
        };
        for e in examples {
            let n = width - e.len();
            let (ids, mask): (Vec<u32>, Vec<u32>) = match self.padding_side {
                PaddingSide::Right => (
                    e.iter()
                        .copied()
                        .chain(std::iter::repeat_n(pad, n))
                        .collect(),
                    std::iter::repeat_n(1, e.len())
                        .chain(std::iter::repeat_n(0, n))
                        .collect(),
                ),
                PaddingSide::Left => (
                    std::iter::repeat_n(pad, n)
                        .chain(e.iter().copied())
                        .collect(),
                    std::iter::repeat_n(0, n)
                        .chain(std::iter::repeat_n(1, e.len()))
                        .collect(),
                ),
            };
            let labels = ids
                .iter()
                .map(|&i| {
                    if self.pad_token_id == Some(i) {
                        IGNORE_INDEX
                    } else {
                        i as i64
                    }
                })
                .collect();
            b.input_ids.push(ids);
            b.attention_mask.push(mask);
            b.labels.push(labels);
        }
        Ok(b)
    }
}

/// Batches of example indices: a seeded permutation per epoch (seed + epoch),
/// `drop_last`, and the rank's share of each global batch for data
/// parallelism. The sequence is a pure function of (seed, epoch, position),
/// so a resumed run sees exactly the batches an uninterrupted one would.
#[derive(Debug, Clone)]
pub struct DataLoader {
    pub len: usize,
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
}

impl DataLoader {
    pub fn new(len: usize, batch_size: usize, shuffle: bool, seed: u64) -> Result<Self> {
        if batch_size == 0 {
            return Err(DataError::Invalid("batch size must be at least 1".into()));
        }
        if len == 0 {
            return Err(DataError::Invalid(
                "the dataset has no examples (is the corpus shorter than one block?)".into(),
            ));
        }
        Ok(DataLoader {
            len,
            batch_size,
            shuffle,
            drop_last: false,
            seed,
            rank: 0,
            world_size: 1,
        })
    }

    /// Global batches per epoch (each rank takes `batch_size` of a global
    /// batch of `batch_size × world_size`).
    pub fn batches_per_epoch(&self) -> usize {
        let global = self.batch_size * self.world_size;
        if self.drop_last {
            (self.len / global).max(1)
        } else {
            self.len.div_ceil(global)
        }
    }

    fn order(&self, epoch: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut rng = crate::model::rng(self.seed.wrapping_add(epoch as u64));
            idx.shuffle(&mut rng);
        }
        idx
    }

    /// This rank's example indices of global batch `n` (counting across epochs).
    pub fn batch(&self, n: usize) -> Vec<usize> {
        let per = self.batches_per_epoch();
        let (epoch, k) = (n / per, n % per);
        let order = self.order(epoch);
        let global = self.batch_size * self.world_size;
        let start = k * global;
        let end = (start + global).min(order.len());
        let slice = &order[start..end];
        // Rank r takes the r-th contiguous share (DistributedSampler-like).
        let s = (self.rank * self.batch_size).min(slice.len());
        let e = ((self.rank + 1) * self.batch_size).min(slice.len());
        slice[s..e].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_texts_drops_the_remainder() {
        let g = group_texts(&[vec![1, 2, 3], vec![4, 5], vec![6, 7, 8]], 3);
        assert_eq!(g, vec![vec![1, 2, 3], vec![4, 5, 6]]);
    }

    #[test]
    fn collator_pads_right_and_masks_pad_labels() {
        let c = DataCollatorForLanguageModeling {
            pad_token_id: Some(0),
            mlm: false,
            pad_to_multiple_of: Some(4),
            padding_side: PaddingSide::Right,
        };
        let b = c.collate(&[&[5, 6, 7], &[8, 0]]).unwrap();
        assert_eq!(b.input_ids, vec![vec![5, 6, 7, 0], vec![8, 0, 0, 0]]);
        assert_eq!(b.attention_mask, vec![vec![1, 1, 1, 0], vec![1, 1, 0, 0]]);
        // The real token 0 (= pad id) is masked too, as in HF.
        assert_eq!(
            b.labels,
            vec![vec![5, 6, 7, -100], vec![8, -100, -100, -100]]
        );
        assert_eq!(b.num_label_tokens(), 2);
        let none = DataCollatorForLanguageModeling {
            pad_token_id: None,
            ..c.clone()
        };
        assert!(none.collate(&[&[1, 2], &[3]]).is_err());
        let mlm = DataCollatorForLanguageModeling { mlm: true, ..c };
        assert!(mlm
            .collate(&[&[1]])
            .unwrap_err()
            .to_string()
            .contains("mlm"));
    }

    #[test]
    fn loader_is_seeded_and_shards() {
        let mut l = DataLoader::new(10, 2, true, 7).unwrap();
        l.drop_last = true;
        l.world_size = 2;
        assert_eq!(l.batches_per_epoch(), 2);
        let a: Vec<usize> = (0..2).flat_map(|n| l.batch(n)).collect();
        l.rank = 1;
        let b: Vec<usize> = (0..2).flat_map(|n| l.batch(n)).collect();
        assert!(
            a.iter().all(|i| !b.contains(i)),
            "ranks see disjoint examples"
        );
        assert_eq!(l.batch(0), l.clone().batch(0));
        assert_ne!(l.batch(0), l.batch(2), "a new epoch reshuffles");
        assert!(DataLoader::new(10, 0, true, 0).is_err());
    }
}
