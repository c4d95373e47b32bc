//! Token ids for GPT-2-style byte-level BPE without `tokenizers`' bookkeeping.
//!
//! `Tokenizer::encode_fast` keeps, for every document, a `NormalizedString`
//! per pre-token (an alignment pair per byte, rebuilt when the bytes are
//! mapped to GPT-2's alphabet), a `Token` with its own `String` per id, and
//! an `Encoding` of seven vectors. Preparing a corpus needs none of it, only
//! the ids: profiled on the shipped corpus with GPT-2's tokenizer, over half
//! of `encode_fast`'s time was `malloc` and `free`, 3% the BPE merges.
//!
//! For the pipeline GPT-2 and the chapter's own tokenizer use (no
//! normalizer; the `ByteLevel` pre-tokenizer with its regex and no prefix
//! space; a BPE model without dropout; no truncation, padding or tokens
//! added by the post-processor), this does the same steps on plain slices:
//! it splits with the regex engine `tokenizers` itself was built with
//! (`tokenizers::utils::SysRegex`, through the same `Pattern` split), maps
//! each piece's bytes to GPT-2's alphabet, and asks the same BPE model for
//! the ids of each piece it has not seen before; a per-thread cache keeps
//! the ids of short pieces. A text holding an added token (`<|endoftext|>`
//! written out, say), and any other pipeline, goes through `tokenizers`
//! whole. Tests check the ids equal `encode` on both shipped corpora and on
//! edge cases (whitespace runs, contractions, digits, CJK, emoji).
//! No crate does this: `tiktoken-rs` has its own vocabularies, not ours.

use std::cell::RefCell;

use aho_corasick::AhoCorasick;
use tokenizers::pattern::Pattern;
use tokenizers::utils::SysRegex;
use tokenizers::{Model, ModelWrapper, PreTokenizerWrapper, Tokenizer};

use super::byte_level::bytes_to_unicode;

/// The split regex of `tokenizers`' `ByteLevel` pre-tokenizer (GPT-2's).
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Pieces a thread remembers before it starts afresh: English text has far
/// fewer distinct words, and the cache stays a few MiB a thread.
const CACHE_PIECES: usize = 1 << 16;
/// Longer pieces (rare: runs of CJK or of symbols) are not remembered.
const CACHE_PIECE_BYTES: usize = 48;

/// Whether `t`'s post-processor adds tokens to a single text (a BOS, say).
pub(crate) fn post_processor_adds(t: &Tokenizer) -> bool {
    t.get_post_processor()
        .is_some_and(|p| tokenizers::PostProcessor::added_tokens(p, false) > 0)
}

/// The fast path for one tokenizer; see the module doc.
pub(crate) struct ByteLevelIds {
    split: SysRegex,
    /// Every added token's text: a document that holds one is not ours.
    added: Option<AhoCorasick>,
    alphabet: [char; 256],
    cache: thread_local::ThreadLocal<RefCell<Cache>>,
}

#[derive(Default)]
struct Cache {
    ids: ahash::AHashMap<Box<[u8]>, Box<[u32]>>,
    /// The piece in GPT-2's alphabet, reused between pieces.
    chars: String,
}

impl ByteLevelIds {
    /// The fast path when `t` is a pipeline it gives the same ids for.
    pub(crate) fn for_pipeline(t: &Tokenizer) -> Option<Self> {
        let byte_level = matches!(
            t.get_pre_tokenizer(),
            Some(PreTokenizerWrapper::ByteLevel(b)) if !b.add_prefix_space && b.use_regex
        );
        let bpe = matches!(t.get_model(), ModelWrapper::BPE(m) if m.dropout.is_none());
        if !byte_level
            || !bpe
            || post_processor_adds(t)
            || t.get_normalizer().is_some()
            || t.get_truncation().is_some()
            || t.get_padding().is_some()
        {
            return None;
        }
        let added: Vec<String> = t
            .get_added_tokens_decoder()
            .into_values()
            .map(|a| a.content)
            .filter(|c| !c.is_empty())
            .collect();
        let added = match added.is_empty() {
            true => None,
            false => Some(AhoCorasick::new(&added).ok()?),
        };
        Some(ByteLevelIds {
            split: SysRegex::new(GPT2_SPLIT).ok()?,
            added,
            alphabet: bytes_to_unicode(),
            cache: thread_local::ThreadLocal::new(),
        })
    }

    /// `text`'s ids appended to `out`, as `model` (the pipeline's) gives
    /// them; `false`, with nothing appended, when `text` holds an added
    /// token and must go through `tokenizers`.
    pub(crate) fn encode_into(
        &self,
        model: &ModelWrapper,
        text: &str,
        out: &mut Vec<u32>,
    ) -> tokenizers::Result<bool> {
        if self.added.as_ref().is_some_and(|a| a.is_match(text)) {
            return Ok(false);
        }
        let mut cache = self.cache.get_or_default().borrow_mut();
        for ((start, end), _) in (&self.split).find_matches(text)? {
            self.piece(model, &text.as_bytes()[start..end], &mut cache, out)?;
        }
        Ok(true)
    }

    fn piece(
        &self,
        model: &ModelWrapper,
        piece: &[u8],
        cache: &mut Cache,
        out: &mut Vec<u32>,
    ) -> tokenizers::Result<()> {
        if let Some(ids) = cache.ids.get(piece) {
            out.extend_from_slice(ids);
            return Ok(());
        }
        cache.chars.clear();
        cache
            .chars
            .extend(piece.iter().map(|&b| self.alphabet[b as usize]));
        let start = out.len();
        out.extend(model.tokenize(&cache.chars)?.into_iter().map(|t| t.id));
        if piece.len() <= CACHE_PIECE_BYTES {
            if cache.ids.len() >= CACHE_PIECES {
                cache.ids.clear();
            }
            cache.ids.insert(piece.into(), out[start..].into());
        }
        Ok(())
    }
}
