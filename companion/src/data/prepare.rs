//! Streaming preparation: a corpus of any size becomes token shards on disk
//! with memory that does not grow with it. Documents are read as a stream,
//! tokenized on all cores a window at a time, packed by run_clm's
//! `group_texts` as a stream (its remainder dropped at the end of each
//! `dataset.map(batched=True)` batch, as there), and written in order. The result lives in `HF_DATASETS_CACHE`
//! under a key of the corpus bytes, the tokenizer and the packing, so a
//! second run, rank or process opens it instead of tokenizing again; one
//! process writes it while the others wait on a lock, as `datasets` does.

use std::io::Read;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use twox_hash::XxHash3_64;

use super::corpus::{self, Split};
use super::dataset::{Dataset, GroupStream, PIECE_BYTES};
use super::error::{DataError, Result};
use super::shards::{ShardWriter, TokenShards};
use crate::tokenizer::AutoTokenizer;

/// How a corpus is prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareOptions {
    /// run_clm's `block_size`.
    pub block_size: usize,
    /// Appended to every document (run_clm's eos between documents).
    pub append_eos: Option<u32>,
    /// Documents per map batch (`dataset.map(batch_size=1000)`); a batch
    /// also ends at [`BATCH_BYTES`] of text, so memory stays bounded for
    /// corpora of very long documents.
    pub batch_size: usize,
    /// A progress bar with MB/s and ETA on stderr (when it is a terminal).
    pub show_progress: bool,
    /// Where prepared datasets are kept (`None`: [`cache_dir`]).
    pub cache_dir: Option<PathBuf>,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            block_size: 1024,
            append_eos: None,
            batch_size: 1000,
            show_progress: false,
            cache_dir: None,
        }
    }
}

/// A map batch ends at this much text even before `batch_size` documents.
pub const BATCH_BYTES: usize = 16 << 20;

/// Text tokenized at once, per thread.
const WINDOW_BYTES_PER_THREAD: usize = 1 << 20;

/// What [`prepare`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub dataset: Dataset,
    /// The shard folder in the cache.
    pub dir: PathBuf,
    /// False when an existing cache was opened.
    pub built: bool,
}

/// `dataset.map(tokenize, batched=True).map(group_texts, batched=True)` on
/// `path` (file or `datasets` folder), through the cache.
pub fn prepare(
    path: &Path,
    text_field: &str,
    split: Split,
    tok: &AutoTokenizer,
    options: &PrepareOptions,
) -> Result<Prepared> {
    if options.block_size == 0 || options.batch_size == 0 {
        return Err(DataError::Invalid(
            "block_size and map batch_size must be at least 1".into(),
        ));
    }
    // A block is held whole while it fills (u32 ids, and its copy on the way out).
    crate::sysmem::check_fits(
        (options.block_size as u64).saturating_mul(8),
        &format!("block_size {}", options.block_size),
    )
    .map_err(DataError::Invalid)?;
    let files = corpus::source_files(path, split)?;
    let key = cache_key(&files, text_field, tok, options)?;
    let root = options.cache_dir.clone().unwrap_or_else(cache_dir);
    let dir = root.join(format!("tokens-{key:016x}"));
    std::fs::create_dir_all(&root)
        .map_err(|e| DataError::Invalid(format!("{}: {e}", root.display())))?;
    // One writer: the others wait here, then open what it wrote.
    let lock_path = root.join(format!("tokens-{key:016x}.lock"));
    let lock = crate::atomic_write::open_lock_file(&lock_path)
        .and_then(|f| f.lock().map(|()| f))
        .map_err(|e| DataError::Invalid(format!("{}: cannot lock: {e}", lock_path.display())))?;
    if dir.join("meta.json").exists() {
        match TokenShards::open(&dir) {
            Ok(s) => {
                drop(lock);
                return Ok(Prepared {
                    dataset: Dataset::from_shards(s),
                    dir,
                    built: false,
                });
            }
            Err(why) => {
                eprintln!(
                    "warning: the prepared dataset {} is damaged ({why}); preparing it again",
                    dir.display()
                );
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| DataError::Invalid(format!("{}: {e}", dir.display())))?;
            }
        }
    }
    // What a killed preparation of this key left (13 MB per 30 MB of corpus).
    let tmp_prefix = format!("tokens-{key:016x}.tmp-");
    crate::atomic_write::remove_stale_staging(&root, &tmp_prefix);
    let tmp = root.join(format!("{tmp_prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let total_bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let label = format!(
        "{} ({} split, field `{text_field}`), block_size {}, eos {:?}, key {key:016x}",
        path.display(),
        split.name(),
        options.block_size,
        options.append_eos
    );
    let built = write_shards(
        path,
        text_field,
        split,
        tok,
        options,
        &tmp,
        total_bytes,
        label,
    );
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &dir)
        .map_err(|e| DataError::Invalid(format!("{}: {e}", dir.display())))?;
    let shards = TokenShards::open(&dir)?;
    drop(lock);
    Ok(Prepared {
        dataset: Dataset::from_shards(shards),
        dir,
        built: true,
    })
}

/// Where prepared datasets live: `HF_DATASETS_CACHE` (else
/// `$HF_HOME/datasets`, else `~/.cache/huggingface/datasets`, the home
/// folder from the password database when HOME is unset), under
/// `companion/`.
pub fn cache_dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var(k)
            .ok()
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let datasets = var("HF_DATASETS_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("datasets")))
        .unwrap_or_else(|| {
            // Never the current folder: with no home at all, the temp folder.
            std::env::home_dir()
                .filter(|h| h.is_absolute())
                .unwrap_or_else(std::env::temp_dir)
                .join(".cache/huggingface/datasets")
        });
    datasets.join("companion")
}

/// The cache key: xxh3 of every source file's bytes (a changed corpus is a
/// new key, whatever its name or date), the text field, the tokenizer's
/// whole JSON (vocabulary, merges, specials) and the packing.
fn cache_key(
    files: &[PathBuf],
    field: &str,
    tok: &AutoTokenizer,
    o: &PrepareOptions,
) -> Result<u64> {
    let mut h = XxHash3_64::with_seed(0);
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file = std::fs::File::open(f).map_err(|e| super::documents::io_error(f, e))?;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| super::documents::io_error(f, e))?;
            if n == 0 {
                break;
            }
            std::hash::Hasher::write(&mut h, &buf[..n]);
        }
        std::hash::Hasher::write(&mut h, b"\0file\0");
    }
    let tokenizer = tok.backend().to_string(false).map_err(|e| {
        DataError::Invalid(format!(
            "the tokenizer cannot be serialized for the cache key: {e}"
        ))
    })?;
    for part in [
        field,
        &tokenizer,
        &format!(
            "{:?}|{:?}|{}|{BATCH_BYTES}",
            o.block_size, o.append_eos, o.batch_size
        ),
    ] {
        std::hash::Hasher::write(&mut h, part.as_bytes());
        std::hash::Hasher::write(&mut h, b"\0");
    }
    Ok(std::hash::Hasher::finish(&h))
}

#[allow(clippy::too_many_arguments)]
fn write_shards(
    path: &Path,
    field: &str,
    split: Split,
    tok: &AutoTokenizer,
    o: &PrepareOptions,
    tmp: &Path,
    total_bytes: u64,
    label: String,
) -> Result<()> {
    let mut docs = corpus::documents(path, field, split)?;
    let mut writer = ShardWriter::new(tmp, o.block_size, tok.len())?;
    let bar = progress(total_bytes, o.show_progress);
    // Documents are tokenized a window at a time, in parallel, and then
    // grouped in order as a stream: memory is one window, whatever the
    // corpus or the map batch size.
    let window_bytes = WINDOW_BYTES_PER_THREAD * rayon::current_num_threads();
    let window_docs = 64 * rayon::current_num_threads();
    let mut group = GroupStream::new(o.block_size);
    let mut blocks = Vec::new();
    let (mut text_bytes, mut text_tokens, mut documents) = (0usize, 0usize, 0usize);
    // Where the current map batch stands (group_texts drops its remainder).
    let (mut batch_docs, mut batch_bytes) = (0usize, 0usize);
    loop {
        let mut window: Vec<String> = Vec::with_capacity(window_docs);
        let mut bytes = 0;
        while window.len() < window_docs && bytes < window_bytes {
            match docs.next() {
                Some(d) => {
                    let d = d?;
                    bytes += d.len();
                    window.push(d);
                }
                None => break,
            }
        }
        if window.is_empty() {
            break;
        }
        let ids: Vec<Vec<u32>> = window
            .par_iter()
            .map(|t| encode(tok, t, o.append_eos))
            .collect::<Result<_>>()?;
        for (doc, ids) in window.iter().zip(&ids) {
            group.push(ids, &mut blocks);
            text_tokens += ids.len();
            (batch_docs, batch_bytes) = (batch_docs + 1, batch_bytes + doc.len());
            if batch_docs == o.batch_size || batch_bytes >= BATCH_BYTES {
                group.end_batch();
                (batch_docs, batch_bytes) = (0, 0);
            }
        }
        documents += window.len();
        text_bytes += bytes;
        writer.push_blocks(&blocks)?;
        blocks.clear();
        bar.inc(bytes as u64);
    }
    bar.finish_and_clear();
    if text_bytes == 0 {
        return Err(DataError::Corpus(corpus::CorpusError::Empty {
            paths: vec![path.display().to_string()],
        }));
    }
    writer.finish(text_bytes, text_tokens, documents, label)?;
    Ok(())
}

/// One document's ids, with eos appended when asked.
fn encode(tok: &AutoTokenizer, text: &str, eos: Option<u32>) -> Result<Vec<u32>> {
    let mut ids = tok.encode_long(text, PIECE_BYTES)?;
    ids.extend(eos);
    Ok(ids)
}

fn progress(total_bytes: u64, show: bool) -> indicatif::ProgressBar {
    if !show || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total_bytes);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "preparing {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} [{elapsed}<{eta}]",
        )
        .expect("template"),
    );
    bar
}
