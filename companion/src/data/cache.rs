//! A tokenized-dataset cache, so a second run does not re-tokenize unchanged
//! input. A cache file is trusted only when its checksum, its sizes and
//! every token id check out; anything else is reported by name and rebuilt.

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
    if file.exists() {
        match read_cache(&file, tok.len()) {
            Ok(ds) => return Ok(ds),
            Err(why) => eprintln!(
                "warning: ignoring the tokenized-data cache {}: {why}; tokenizing again",
                file.display()
            ),
        }
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

const MAGIC: &[u8; 8] = b"CMPDS2\0\0";

fn checksum(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    fnv1a(&mut h, bytes);
    h
}

/// `MAGIC`, text bytes, text tokens, rows, then each row's length and ids
/// (little-endian), then the FNV-1a checksum of all that.
fn write_cache(file: &Path, ds: &Dataset) -> std::io::Result<()> {
    let mut buf = Vec::new();
    buf.extend_from_slice(MAGIC);
    for n in [ds.text_bytes, ds.text_tokens, ds.input_ids.len()] {
        buf.extend_from_slice(&(n as u64).to_le_bytes());
    }
    for row in &ds.input_ids {
        buf.extend_from_slice(&(row.len() as u64).to_le_bytes());
        for id in row {
            buf.extend_from_slice(&id.to_le_bytes());
        }
    }
    let sum = checksum(&buf);
    buf.extend_from_slice(&sum.to_le_bytes());
    crate::atomic_write::write_file_atomically(file, &buf)
}

/// Read a cache file, checking it before trusting any size in it.
fn read_cache(file: &Path, vocab_size: usize) -> std::result::Result<Dataset, String> {
    let b = std::fs::read(file).map_err(|e| e.to_string())?;
    if b.len() < 40 || &b[..8] != MAGIC {
        return Err("not a cache file of this version".into());
    }
    let (body, tail) = b.split_at(b.len() - 8);
    if checksum(body) != u64::from_le_bytes(tail.try_into().expect("8 bytes")) {
        return Err("its checksum does not match (the file is damaged)".into());
    }
    let mut pos = 8;
    let u64_at = |pos: &mut usize| -> std::result::Result<usize, String> {
        let v = body
            .get(*pos..*pos + 8)
            .ok_or("it ends early")
            .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))?;
        *pos += 8;
        usize::try_from(v).map_err(|_| format!("a size of {v} does not fit"))
    };
    let text_bytes = u64_at(&mut pos)?;
    let text_tokens = u64_at(&mut pos)?;
    let rows = u64_at(&mut pos)?;
    // Every row takes at least 8 bytes: a count larger than the file can
    // hold is refused before anything is allocated.
    if rows > body.len() / 8 {
        return Err(format!("it claims {rows} rows in {} bytes", body.len()));
    }
    let mut input_ids = Vec::with_capacity(rows);
    for r in 0..rows {
        let n = u64_at(&mut pos)?;
        let end = n
            .checked_mul(4)
            .and_then(|len| pos.checked_add(len))
            .filter(|&end| end <= body.len())
            .ok_or_else(|| format!("row {r} claims {n} tokens, more than the file holds"))?;
        let row: Vec<u32> = body[pos..end]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        if let Some(bad) = row.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(format!(
                "row {r} holds token id {bad}, outside the vocabulary of {vocab_size}"
            ));
        }
        input_ids.push(row);
        pos = end;
    }
    Ok(Dataset {
        input_ids,
        text_bytes,
        text_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Dataset {
        Dataset {
            input_ids: vec![vec![1, 2, 3], vec![4, 5]],
            text_bytes: 10,
            text_tokens: 5,
        }
    }

    #[test]
    fn a_cache_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.bin");
        write_cache(&f, &sample()).unwrap();
        let ds = read_cache(&f, 6).unwrap();
        assert_eq!(ds.input_ids, sample().input_ids);
        assert_eq!((ds.text_bytes, ds.text_tokens), (10, 5));
    }

    #[test]
    fn damaged_or_hostile_cache_files_are_refused_by_reason() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.bin");
        write_cache(&f, &sample()).unwrap();
        let good = std::fs::read(&f).unwrap();
        // A flipped token id: the checksum catches it.
        let mut b = good.clone();
        b[8 + 24 + 8] ^= 0xff;
        std::fs::write(&f, &b).unwrap();
        assert!(read_cache(&f, 6).unwrap_err().contains("checksum"));
        // A row count of 2^62 with a valid checksum: refused before allocating.
        let mut b = good[..good.len() - 8].to_vec();
        b[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
        let sum = checksum(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        std::fs::write(&f, &b).unwrap();
        assert!(read_cache(&f, 6).unwrap_err().contains("claims"));
        // An id outside the vocabulary with a valid checksum.
        write_cache(&f, &sample()).unwrap();
        assert!(read_cache(&f, 4)
            .unwrap_err()
            .contains("outside the vocabulary"));
    }
}
