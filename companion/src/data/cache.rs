//! A tokenized-dataset cache, so a second run does not re-tokenize unchanged
//! input.

use std::path::{Path, PathBuf};

use super::dataset::{tokenize_and_pack, Dataset, Packing, TokenizeOptions};
use super::error::Result;
use crate::tokenizer::AutoTokenizer;

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
    let texts = crate::data::corpus::read_files(&[path], text_field)?;
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
    crate::atomic_write::write_file_atomically(file, &buf)
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
