//! Keeps `tokenizers`' BPE cache right when this crate is loaded more than
//! once in one process (the evcxr kernel); see [`CacheKey`].

use tokenizers::{ModelWrapper, Tokenizer};

/// Keeps `tokenizers`' BPE cache correct when this crate is loaded more than
/// once in one process, as the evcxr kernel does: every notebook cell is a
/// shared library of its own, with its own copy of this code and of
/// `tokenizers`. That crate caches BPE merges in a thread-local map keyed by
/// a cache id drawn from a `static` counter, and each copy has its own
/// counter and its own thread-local map. A tokenizer built in one cell and
/// another built in a second cell can therefore carry the same id, and when a
/// third cell tokenizes with both, the second reads the first one's cached
/// merges: our BPE then spells GPT-2's token ids with its own vocabulary.
///
/// The fix: before a copy of this code encodes, it gives the tokenizer a new
/// cache id from *its own* counter (`clear_cache`), unless it already did.
/// All BPEs a copy encodes with then hold ids from one counter, which never
/// repeats. The check is one atomic load per call; re-keying empties the
/// cache once per copy (once per cell under evcxr, once per process
/// elsewhere).
#[derive(Debug, Default)]
pub(super) struct CacheKey(std::sync::atomic::AtomicUsize);

/// One byte whose address tells the copies of this code apart.
static THIS_COPY: u8 = 0;

impl CacheKey {
    fn this_copy() -> usize {
        &THIS_COPY as *const u8 as usize
    }

    /// Re-key `tokenizer`'s BPE cache when another copy of this code (or
    /// nobody) keyed it last.
    pub(super) fn ensure(&self, tokenizer: &Tokenizer) {
        use std::sync::atomic::Ordering;
        let me = Self::this_copy();
        if self.0.load(Ordering::Acquire) != me {
            if let ModelWrapper::BPE(bpe) = tokenizer.get_model() {
                bpe.clear_cache();
            }
            self.0.store(me, Ordering::Release);
        }
    }
}
