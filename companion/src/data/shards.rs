//! Token shards: a prepared dataset on disk, as nanoGPT's and llm.c's flat
//! token files are, but checked. A folder holds `meta.json` (what the
//! tokens are: sizes, fingerprints, the shard list) and `tokens-NNNNN.bin`
//! files, each a 64-byte header then its tokens, little-endian u16 when the
//! vocabulary fits (else u32). Training reads blocks in place through a
//! memory map: nothing is copied or loaded up front. Opening reads each
//! shard once, through that map, to check it (xxh3 runs at memory speed, and
//! the page cache is shared by every rank on a machine); training then
//! reads only the blocks of its own rank.
//!
//! Header: magic `CMPTOKS\0`, version (u32), bytes per token (u32), block
//! size (u64), tokens in the shard (u64), vocabulary size (u64), xxh3-64 of
//! the token bytes (u64), zeros to 64 bytes. A shard is trusted only when
//! its size, header, checksum and every id check out.

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use twox_hash::XxHash3_64;

const MAGIC: &[u8; 8] = b"CMPTOKS\0";
const VERSION: u32 = 1;
pub(crate) const HEADER: usize = 64;
/// Tokens per shard file (512 MiB of u16): large enough to keep the file
/// count small, small enough to copy or check one at a time.
const SHARD_TOKENS: usize = 1 << 28;

/// `meta.json`: what the shards hold and where they came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardsMeta {
    pub format: String,
    pub version: u32,
    /// 2 (u16) or 4 (u32).
    pub bytes_per_token: u32,
    pub block_size: usize,
    pub blocks: usize,
    pub vocab_size: usize,
    /// UTF-8 bytes of the text the tokens came from (for bits per byte).
    pub text_bytes: usize,
    /// Tokens before packing dropped any (for bits per byte).
    pub text_tokens: usize,
    /// Documents read.
    pub documents: usize,
    /// What the cache key was made of (corpus, tokenizer, packing).
    pub key: String,
    pub shards: Vec<ShardEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub file: String,
    pub tokens: usize,
}

const FORMAT: &str = "companion-token-shards";

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("{path}: {msg}")]
    Bad { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn bad(path: &Path, msg: impl Into<String>) -> ShardError {
    ShardError::Bad {
        path: path.into(),
        msg: msg.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ShardError + '_ {
    move |source| ShardError::Io {
        path: path.into(),
        source,
    }
}

/// Bytes per token for a vocabulary: u16 when every id fits.
pub fn bytes_per_token(vocab_size: usize) -> u32 {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// Writes whole blocks into shard files in `dir` (a fresh folder the
/// caller renames into place once [`ShardWriter::finish`] returns).
pub struct ShardWriter {
    dir: PathBuf,
    bytes_per_token: u32,
    block_size: usize,
    vocab_size: usize,
    per_shard: usize,
    current: Option<(std::io::BufWriter<std::fs::File>, XxHash3_64, usize)>,
    shards: Vec<ShardEntry>,
    blocks: usize,
}

impl ShardWriter {
    pub fn new(dir: &Path, block_size: usize, vocab_size: usize) -> Result<Self, ShardError> {
        if block_size == 0 {
            return Err(bad(dir, "block_size must be at least 1"));
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(ShardWriter {
            dir: dir.into(),
            bytes_per_token: bytes_per_token(vocab_size),
            block_size,
            vocab_size,
            // Whole blocks per shard, so block i lives in shard i / per_shard.
            per_shard: (SHARD_TOKENS / block_size).max(1) * block_size,
            current: None,
            shards: Vec::new(),
            blocks: 0,
        })
    }

    /// Append whole blocks (`tokens.len()` a multiple of the block size).
    pub fn push_blocks(&mut self, tokens: &[u32]) -> Result<(), ShardError> {
        assert!(
            tokens.len().is_multiple_of(self.block_size),
            "whole blocks only"
        );
        let mut rest = tokens;
        while !rest.is_empty() {
            if self.current.as_ref().is_none_or(|c| c.2 == self.per_shard) {
                self.roll()?;
            }
            let (w, hash, count) = self.current.as_mut().expect("an open shard");
            let n = (self.per_shard - *count).min(rest.len());
            let (now, later) = rest.split_at(n);
            let mut bytes = Vec::with_capacity(n * self.bytes_per_token as usize);
            for &id in now {
                if id as usize >= self.vocab_size {
                    return Err(bad(
                        &self.dir,
                        format!(
                            "token id {id} is outside the vocabulary of {}",
                            self.vocab_size
                        ),
                    ));
                }
                match self.bytes_per_token {
                    2 => bytes.extend_from_slice(&(id as u16).to_le_bytes()),
                    _ => bytes.extend_from_slice(&id.to_le_bytes()),
                }
            }
            std::hash::Hasher::write(hash, &bytes);
            let path = self.dir.join(&self.shards.last().expect("entry").file);
            w.write_all(&bytes).map_err(io(&path))?;
            *count += n;
            self.blocks += n / self.block_size;
            rest = later;
        }
        Ok(())
    }

    /// Close the open shard (header filled in) and start the next.
    fn roll(&mut self) -> Result<(), ShardError> {
        self.close()?;
        let file = format!("tokens-{:05}.bin", self.shards.len());
        let path = self.dir.join(&file);
        let mut w = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&path).map_err(io(&path))?,
        );
        w.write_all(&[0u8; HEADER]).map_err(io(&path))?;
        self.shards.push(ShardEntry { file, tokens: 0 });
        self.current = Some((w, XxHash3_64::with_seed(0), 0));
        Ok(())
    }

    fn close(&mut self) -> Result<(), ShardError> {
        use std::io::{Seek, SeekFrom};
        let Some((w, hash, count)) = self.current.take() else {
            return Ok(());
        };
        let entry = self.shards.last_mut().expect("entry");
        let path = self.dir.join(&entry.file);
        let mut f = w.into_inner().map_err(|e| io(&path)(e.into_error()))?;
        let header = header_bytes(
            self.bytes_per_token,
            self.block_size,
            count,
            self.vocab_size,
            std::hash::Hasher::finish(&hash),
        );
        f.seek(SeekFrom::Start(0)).map_err(io(&path))?;
        f.write_all(&header).map_err(io(&path))?;
        f.sync_all().map_err(io(&path))?;
        entry.tokens = count;
        Ok(())
    }

    /// Close the last shard and write `meta.json` (last, so a folder with a
    /// `meta.json` is a complete one).
    pub fn finish(
        mut self,
        text_bytes: usize,
        text_tokens: usize,
        documents: usize,
        key: String,
    ) -> Result<ShardsMeta, ShardError> {
        self.close()?;
        let meta = ShardsMeta {
            format: FORMAT.into(),
            version: VERSION,
            bytes_per_token: self.bytes_per_token,
            block_size: self.block_size,
            blocks: self.blocks,
            vocab_size: self.vocab_size,
            text_bytes,
            text_tokens,
            documents,
            key,
            shards: self.shards,
        };
        let path = self.dir.join("meta.json");
        let json = serde_json::to_vec_pretty(&meta).expect("meta serializes");
        crate::atomic_write::write_file_atomically(&path, &json).map_err(io(&path))?;
        Ok(meta)
    }
}

fn header_bytes(bpt: u32, block: usize, count: usize, vocab: usize, sum: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&bpt.to_le_bytes());
    for (i, v) in [block as u64, count as u64, vocab as u64, sum]
        .into_iter()
        .enumerate()
    {
        h[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes());
    }
    h
}

/// A prepared dataset, read in place: fixed-size blocks over memory-mapped
/// shards. `limit` caps the blocks seen (`max_eval_samples`).
#[derive(Debug, Clone)]
pub struct TokenShards {
    pub dir: PathBuf,
    pub meta: ShardsMeta,
    maps: std::sync::Arc<Vec<memmap2::Mmap>>,
    blocks_per_shard: usize,
    limit: usize,
}

impl PartialEq for TokenShards {
    fn eq(&self, other: &Self) -> bool {
        self.dir == other.dir && self.meta == other.meta && self.limit == other.limit
    }
}

impl TokenShards {
    /// Open a shard folder, checking `meta.json`, each shard's size and
    /// header, its checksum and that every id is inside the vocabulary
    /// (one pass over the mapped file; nothing is allocated or mapped from
    /// a size before the file is known to hold it).
    pub fn open(dir: &Path) -> Result<Self, ShardError> {
        let meta_path = dir.join("meta.json");
        let bytes = std::fs::read(&meta_path).map_err(io(&meta_path))?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        let meta: ShardsMeta = serde_path_to_error::deserialize(de)
            .map_err(|e| bad(&meta_path, format!("{}: {}", e.path(), e.inner())))?;
        if meta.format != FORMAT || meta.version != VERSION {
            return Err(bad(
                &meta_path,
                format!(
                    "format {} version {}, expected {FORMAT} version {VERSION}",
                    meta.format, meta.version
                ),
            ));
        }
        if !matches!(meta.bytes_per_token, 2 | 4) || meta.block_size == 0 {
            return Err(bad(
                &meta_path,
                "bytes_per_token must be 2 or 4 and block_size at least 1",
            ));
        }
        let per_shard = (SHARD_TOKENS / meta.block_size).max(1) * meta.block_size;
        let mut maps = Vec::with_capacity(meta.shards.len().min(1 << 16));
        let mut total = 0usize;
        for (i, s) in meta.shards.iter().enumerate() {
            let name = Path::new(&s.file);
            if name.components().count() != 1
                || !matches!(
                    name.components().next(),
                    Some(std::path::Component::Normal(_))
                )
            {
                return Err(bad(
                    &meta_path,
                    format!("shard `{}` is not a file of this folder", s.file),
                ));
            }
            let last = i + 1 == meta.shards.len();
            if s.tokens % meta.block_size != 0
                || s.tokens > per_shard
                || (!last && s.tokens != per_shard)
            {
                return Err(bad(
                    &meta_path,
                    format!(
                        "shard {} claims {} tokens, not whole blocks of the layout",
                        s.file, s.tokens
                    ),
                ));
            }
            let path = dir.join(name);
            let file = std::fs::File::open(&path).map_err(io(&path))?;
            let len = file.metadata().map_err(io(&path))?.len();
            let want = (HEADER + s.tokens * meta.bytes_per_token as usize) as u64;
            if len != want {
                return Err(bad(
                    &path,
                    format!("{len} bytes, expected {want} (the shard is truncated or damaged)"),
                ));
            }
            // SAFETY: the shard folder is ours and is never written after
            // meta.json exists (a rebuild makes a new folder and renames it);
            // a file changed under us anyway could give wrong ids, never
            // unsafety, since every read goes through bounds-checked slices.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(&path))?;
            if map.len() as u64 != want {
                return Err(bad(&path, "changed while it was being opened"));
            }
            check_shard(&path, &map, &meta, s.tokens)?;
            maps.push(map);
            total += s.tokens / meta.block_size;
        }
        if total != meta.blocks {
            return Err(bad(
                &meta_path,
                format!("says {} blocks, the shards hold {total}", meta.blocks),
            ));
        }
        Ok(TokenShards {
            dir: dir.into(),
            limit: meta.blocks,
            blocks_per_shard: per_shard / meta.block_size,
            meta,
            maps: std::sync::Arc::new(maps),
        })
    }

    pub fn len(&self) -> usize {
        self.limit
    }

    pub fn is_empty(&self) -> bool {
        self.limit == 0
    }

    pub fn block_size(&self) -> usize {
        self.meta.block_size
    }

    /// The same shards, showing at most `n` blocks.
    pub fn truncated(&self, n: usize) -> Self {
        let mut s = self.clone();
        s.limit = n.min(self.limit);
        s
    }

    /// Block `i` (`i < len()`), widened to u32 ids.
    pub fn block(&self, i: usize) -> Cow<'_, [u32]> {
        assert!(i < self.limit, "block {i} of {}", self.limit);
        let (shard, k) = (i / self.blocks_per_shard, i % self.blocks_per_shard);
        let bpt = self.meta.bytes_per_token as usize;
        let n = self.meta.block_size;
        let bytes = &self.maps[shard][HEADER + k * n * bpt..HEADER + (k + 1) * n * bpt];
        let ids = ids_of(bytes, bpt).collect();
        Cow::Owned(ids)
    }
}

/// The little-endian ids of `bytes`, `bpt` (2 or 4) bytes each.
fn ids_of(bytes: &[u8], bpt: usize) -> impl Iterator<Item = u32> + '_ {
    bytes.chunks_exact(bpt).map(move |c| match bpt {
        2 => u16::from_le_bytes([c[0], c[1]]) as u32,
        _ => u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
    })
}

/// One mapped shard's header, checksum and ids (its size is checked
/// before it is mapped): the pages read here are the ones training reads.
fn check_shard(
    path: &Path,
    map: &[u8],
    meta: &ShardsMeta,
    tokens: usize,
) -> Result<(), ShardError> {
    let (header, body) = map.split_at(HEADER);
    let sum = u64::from_le_bytes(header[40..48].try_into().expect("8 bytes"));
    let expect = header_bytes(
        meta.bytes_per_token,
        meta.block_size,
        tokens,
        meta.vocab_size,
        sum,
    );
    if header != expect {
        return Err(bad(
            path,
            "its header does not match meta.json (not a shard of this folder)",
        ));
    }
    if twox_hash::XxHash3_64::oneshot(body) != sum {
        return Err(bad(
            path,
            "its checksum does not match (the shard is damaged)",
        ));
    }
    let max_id = ids_of(body, meta.bytes_per_token as usize).max();
    if let Some(max_id) = max_id.filter(|&m| m as usize >= meta.vocab_size) {
        return Err(bad(
            path,
            format!(
                "holds token id {max_id}, outside the vocabulary of {}",
                meta.vocab_size
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, vocab: usize) -> ShardsMeta {
        let mut w = ShardWriter::new(dir, 4, vocab).unwrap();
        w.push_blocks(&[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        w.push_blocks(&[9, 10, 11, 12]).unwrap();
        w.finish(30, 13, 2, "k".into()).unwrap()
    }

    #[test]
    fn shards_round_trip_in_u16_and_u32() {
        for vocab in [50257, 100_000] {
            let d = tempfile::tempdir().unwrap();
            let meta = write(d.path(), vocab);
            assert_eq!(meta.bytes_per_token, if vocab < 65536 { 2 } else { 4 });
            let s = TokenShards::open(d.path()).unwrap();
            assert_eq!(s.len(), 3);
            assert_eq!(&*s.block(2), &[9, 10, 11, 12]);
            let len = std::fs::metadata(d.path().join("tokens-00000.bin"))
                .unwrap()
                .len();
            assert_eq!(len as usize, HEADER + 12 * meta.bytes_per_token as usize);
        }
    }

    #[test]
    fn damaged_shards_are_named() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), 50257);
        let f = d.path().join("tokens-00000.bin");
        let good = std::fs::read(&f).unwrap();
        let mut b = good.clone();
        b[HEADER + 3] ^= 1;
        std::fs::write(&f, &b).unwrap();
        let e = TokenShards::open(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("tokens-00000.bin") && e.contains("checksum"),
            "{e}"
        );
        std::fs::write(&f, &good[..good.len() - 2]).unwrap();
        let e = TokenShards::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        // An id outside the vocabulary behind a valid checksum.
        std::fs::write(&f, &good).unwrap();
        let meta_file = d.path().join("meta.json");
        let mut meta: ShardsMeta =
            serde_json::from_slice(&std::fs::read(&meta_file).unwrap()).unwrap();
        let write_meta =
            |m: &ShardsMeta| std::fs::write(&meta_file, serde_json::to_vec(m).unwrap());
        meta.vocab_size = 10;
        write_meta(&meta).unwrap();
        let e = TokenShards::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("header does not match"), "{e}");
        // A shard name that leaves the folder.
        meta.vocab_size = 50257;
        meta.shards[0].file = "../x.bin".into();
        write_meta(&meta).unwrap();
        let e = TokenShards::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("not a file of this folder"), "{e}");
    }
}
