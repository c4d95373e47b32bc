//! `AutoTokenizer`: a `tokenizers` pipeline with the special-token roles,
//! padding and files that `transformers`' `PreTrainedTokenizerFast` adds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer, TokenizerImpl,
};

use super::cache_key::CacheKey;
use super::fast_ids::{post_processor_adds, ByteLevelIds};
use crate::hub;

/// The concrete `tokenizers` pipeline type behind `Tokenizer`.
pub(crate) type Pipeline = TokenizerImpl<
    ModelWrapper,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// GPT-2's one special token: bos, eos and unk of the `gpt2` tokenizer.
pub const GPT2_ENDOFTEXT: &str = "<|endoftext|>";
/// SentencePiece's marker for a preceding space.
pub const METASPACE: char = '▁';

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Hub(#[from] hub::HubError),
    #[error("{path}: not a valid tokenizer file: {msg}")]
    Corrupt { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Io { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
    #[error("tokenizers: {0}")]
    Tokenizers(String),
}

pub(crate) type Result<T> = std::result::Result<T, TokenizerError>;

/// One encode of `tokenizers`, its panic an error too ([`super::guard`]).
fn guarded<T, E: std::fmt::Display>(f: impl FnOnce() -> std::result::Result<T, E>) -> Result<T> {
    super::guard::guarded(f).map_err(TokenizerError::Tokenizers)
}

pub(crate) fn tk<E: std::fmt::Display>(e: E) -> TokenizerError {
    TokenizerError::Tokenizers(e.to_string())
}

/// Token ids and their byte offsets `(start, end)` in the text.
pub type IdsAndOffsets = (Vec<u32>, Vec<(usize, usize)>);

/// Which side padding goes on (`tokenizer.padding_side`); GPT-2's is right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaddingSide {
    Left,
    Right,
}

/// The output of `tokenizer(texts, padding=True)`: ids and attention masks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BatchEncoding {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
}

/// A tokenizer with its special-token roles, as `AutoTokenizer` gives one.
pub struct AutoTokenizer {
    pub(super) tokenizer: Tokenizer,
    /// Which copy of this code last keyed the BPE cache (see [`CacheKey`]).
    cache_key: CacheKey,
    /// The ids-only path for byte-level BPE, built on first use; reset when
    /// the vocabulary changes.
    fast: std::sync::OnceLock<Option<ByteLevelIds>>,
    pub(super) bos_token: Option<String>,
    pub(super) eos_token: Option<String>,
    pub(super) pad_token: Option<String>,
    pub(super) unk_token: Option<String>,
    /// `model_max_length` from `tokenizer_config.json`, when set.
    pub model_max_length: Option<usize>,
    pub padding_side: PaddingSide,
    /// Every other field of `tokenizer_config.json`, kept for `save_pretrained`.
    extra_config: Map<String, Value>,
}

impl Clone for AutoTokenizer {
    fn clone(&self) -> Self {
        AutoTokenizer {
            tokenizer: self.tokenizer.clone(),
            // The clone's BPE has a fresh cache id from whichever copy of
            // `tokenizers` cloned it: key it again on first use.
            cache_key: CacheKey::default(),
            fast: std::sync::OnceLock::new(),
            bos_token: self.bos_token.clone(),
            eos_token: self.eos_token.clone(),
            pad_token: self.pad_token.clone(),
            unk_token: self.unk_token.clone(),
            model_max_length: self.model_max_length,
            padding_side: self.padding_side,
            extra_config: self.extra_config.clone(),
        }
    }
}

impl std::fmt::Debug for AutoTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutoTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("len", &self.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("pad_token", &self.pad_token)
            .field("unk_token", &self.unk_token)
            .field("model_max_length", &self.model_max_length)
            .field("padding_side", &self.padding_side)
            .finish()
    }
}

/// A special token in `tokenizer_config.json`/`special_tokens_map.json` is a
/// string or an object with `content`.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| TokenizerError::Io {
        path: path.into(),
        msg: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| TokenizerError::Corrupt {
        path: path.into(),
        msg: e.to_string(),
    })
}

/// Where to end a piece of `text` of at most about `limit` bytes: before a
/// space with a non-space on each side, searching forward from `limit`;
/// the whole text when there is no such place.
fn safe_cut(text: &str, limit: usize) -> usize {
    let b = text.as_bytes();
    if b.len() <= limit {
        return b.len();
    }
    let ok = |i: usize| {
        b[i] == b' '
            && i + 1 < b.len()
            && !(b[i - 1] as char).is_ascii_whitespace()
            && !(b[i + 1] as char).is_ascii_whitespace()
    };
    (limit.max(1)..b.len()).find(|&i| ok(i)).unwrap_or(b.len())
}

impl AutoTokenizer {
    /// `AutoTokenizer.from_pretrained(id_or_dir)`: `tokenizer.json` plus the
    /// roles in `tokenizer_config.json` / `special_tokens_map.json`.
    pub fn from_pretrained(id_or_dir: &str) -> Result<Self> {
        let file = hub::get_file(id_or_dir, "tokenizer.json")?;
        let mut tok = Self::from_file(&file)?;
        let mut config = Map::new();
        if let Some(p) = hub::get_optional(id_or_dir, "special_tokens_map.json") {
            if let Value::Object(o) = read_json(&p)? {
                config.extend(o);
            }
        }
        if let Some(p) = hub::get_optional(id_or_dir, "tokenizer_config.json") {
            match read_json(&p)? {
                Value::Object(o) => config.extend(o),
                _ => {
                    return Err(TokenizerError::Corrupt {
                        path: p,
                        msg: "expected a JSON object".into(),
                    })
                }
            }
        }
        tok.apply_config(config);
        Ok(tok)
    }

    /// Load a bare `tokenizer.json` (`Tokenizer.from_file`). GPT-2's
    /// `<|endoftext|>`, when present, becomes bos/eos/unk as in
    /// `GPT2TokenizerFast`'s defaults.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TokenizerError::Io {
            path: path.into(),
            msg: e.to_string(),
        })?;
        let tokenizer: Tokenizer = text.parse().map_err(|e| TokenizerError::Corrupt {
            path: path.into(),
            msg: format!("{e}"),
        })?;
        Ok(Self::from_tokenizer(tokenizer))
    }

    /// Wrap a `tokenizers::Tokenizer` (`PreTrainedTokenizerFast(tokenizer_object=…)`).
    /// Truncation and padding stored in it are switched off, as
    /// transformers does for a call that does not ask for them: they would
    /// silently cut or pad every text (padding here is the collator's).
    pub fn from_tokenizer(mut tokenizer: Tokenizer) -> Self {
        tokenizer.with_padding(None);
        let _ = tokenizer.with_truncation(None); // cannot fail for None
        let has_eot = tokenizer.token_to_id(GPT2_ENDOFTEXT).is_some();
        let eot = has_eot.then(|| GPT2_ENDOFTEXT.to_string());
        AutoTokenizer {
            tokenizer,
            cache_key: CacheKey::default(),
            fast: std::sync::OnceLock::new(),
            bos_token: eot.clone(),
            eos_token: eot.clone(),
            unk_token: eot,
            pad_token: None,
            model_max_length: None,
            padding_side: PaddingSide::Right,
            extra_config: Map::new(),
        }
    }

    fn apply_config(&mut self, mut config: Map<String, Value>) {
        for (key, slot) in [
            ("bos_token", &mut self.bos_token),
            ("eos_token", &mut self.eos_token),
            ("pad_token", &mut self.pad_token),
            ("unk_token", &mut self.unk_token),
        ] {
            if let Some(v) = config.remove(key) {
                *slot = token_str(Some(&v));
            }
        }
        if let Some(n) = config.remove("model_max_length") {
            // transformers writes 1e30 ("no limit") as a huge number.
            self.model_max_length = n.as_u64().map(|n| n as usize);
        }
        if let Some(side) = config.remove("padding_side") {
            if side.as_str() == Some("left") {
                self.padding_side = PaddingSide::Left;
            }
        }
        // Written anew by save_pretrained from the tokenizer itself.
        config.remove("added_tokens_decoder");
        self.extra_config = config;
    }

    /// The wrapped `tokenizers::Tokenizer` (`tokenizer.backend_tokenizer`),
    /// its BPE cache keyed for the calling copy of this code.
    pub fn backend(&self) -> &Tokenizer {
        self.cache_key.ensure(&self.tokenizer);
        &self.tokenizer
    }

    /// `len(tokenizer)`: the vocabulary including added tokens.
    pub fn len(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Never true for a loaded tokenizer; here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `tokenizer.vocab_size`: the base vocabulary without added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(false)
    }

    /// `tokenizer.tokenize(text)`: token strings, no special tokens added.
    pub fn tokenize(&self, text: &str) -> Result<Vec<String>> {
        let enc = guarded(|| self.backend().encode(text, false))?;
        Ok(enc.get_tokens().to_vec())
    }

    /// `tokenizer(text)["input_ids"]`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if let Some(ids) = self.fast_ids(text)? {
            return Ok(ids);
        }
        // encode_fast: the same ids, without tracking offsets.
        let enc = guarded(|| self.backend().encode_fast(text, true))?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`AutoTokenizer::encode`] for a document of any length in bounded
    /// memory: a long text is encoded in pieces of about `piece_bytes`,
    /// cut just before a space that follows a non-space and precedes one
    /// (GPT-2's and SentencePiece's pre-tokenizers split there anyway, so
    /// the ids are the same), instead of holding one `Encoding` (offsets,
    /// token strings, masks: ~200 bytes a token) for all of it. Tokenizers
    /// whose post-processor adds tokens are encoded whole, and so is any
    /// text the ids-only path takes (it holds no `Encoding`).
    pub fn encode_long(&self, text: &str, piece_bytes: usize) -> Result<Vec<u32>> {
        if let Some(ids) = self.fast_ids(text)? {
            return Ok(ids);
        }
        if text.len() <= piece_bytes || post_processor_adds(self.backend()) {
            return self.encode(text);
        }
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let cut = safe_cut(rest, piece_bytes);
            let enc = guarded(|| self.backend().encode_fast(&rest[..cut], false))?;
            ids.extend_from_slice(enc.get_ids());
            rest = &rest[cut..];
        }
        Ok(ids)
    }

    /// Whether [`AutoTokenizer::encode`] takes the ids-only path for this
    /// pipeline (for the tests that compare it with `tokenizers`).
    #[doc(hidden)]
    pub fn has_fast_ids(&self) -> bool {
        self.fast().is_some()
    }

    /// The ids-only path, built on first use (`None`: not this pipeline).
    fn fast(&self) -> Option<&ByteLevelIds> {
        self.fast
            .get_or_init(|| ByteLevelIds::for_pipeline(&self.tokenizer))
            .as_ref()
    }

    /// `text`'s ids through [`ByteLevelIds`] when it applies (GPT-2-style
    /// byte-level BPE, no added token in `text`): the same ids as
    /// `encode_fast`, at a fraction of its allocations.
    fn fast_ids(&self, text: &str) -> Result<Option<Vec<u32>>> {
        let Some(fast) = self.fast() else {
            return Ok(None);
        };
        let mut ids = Vec::with_capacity(text.len() / 4);
        let model = self.backend().get_model();
        Ok(guarded(|| fast.encode_into(model, text, &mut ids))?.then_some(ids))
    }

    /// Ids with byte offsets into `text`, as `return_offsets_mapping=True` gives.
    pub fn encode_with_offsets(&self, text: &str) -> Result<IdsAndOffsets> {
        let enc = guarded(|| self.backend().encode(text, true))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// `tokenizer(texts, padding=…, truncation=True, max_length=…)` on all cores.
    /// `padding` pads to the longest sequence on `padding_side` with the pad token.
    pub fn encode_batch(
        &self,
        texts: &[&str],
        padding: bool,
        max_length: Option<usize>,
    ) -> Result<BatchEncoding> {
        let encs = guarded(|| self.backend().encode_batch(texts.to_vec(), true))?;
        let mut input_ids: Vec<Vec<u32>> = encs.iter().map(|e| e.get_ids().to_vec()).collect();
        if let Some(m) = max_length {
            input_ids.iter_mut().for_each(|ids| ids.truncate(m));
        }
        let mut attention_mask: Vec<Vec<u32>> =
            input_ids.iter().map(|ids| vec![1; ids.len()]).collect();
        if padding {
            let pad = self.pad_token_id().ok_or_else(|| {
                TokenizerError::Invalid(
                    "asked for padding but the tokenizer has no pad token; set one \
                     (GPT-2 users set pad_token = eos_token)"
                        .into(),
                )
            })?;
            let longest = input_ids.iter().map(Vec::len).max().unwrap_or(0);
            for (ids, mask) in input_ids.iter_mut().zip(attention_mask.iter_mut()) {
                let n = longest - ids.len();
                match self.padding_side {
                    PaddingSide::Right => {
                        ids.extend(std::iter::repeat_n(pad, n));
                        mask.extend(std::iter::repeat_n(0, n));
                    }
                    PaddingSide::Left => {
                        ids.splice(0..0, std::iter::repeat_n(pad, n));
                        mask.splice(0..0, std::iter::repeat_n(0, n));
                    }
                }
            }
        }
        Ok(BatchEncoding {
            input_ids,
            attention_mask,
        })
    }

    /// `tokenizer.decode(ids, skip_special_tokens=…)`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer.decode(ids, skip_special_tokens).map_err(tk)
    }

    /// `tokenizer.batch_decode(...)`.
    pub fn batch_decode(&self, ids: &[Vec<u32>], skip_special_tokens: bool) -> Result<Vec<String>> {
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        self.tokenizer
            .decode_batch(&refs, skip_special_tokens)
            .map_err(tk)
    }

    /// `tokenizer.convert_tokens_to_ids(token)`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// `tokenizer.convert_ids_to_tokens(id)`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }
    pub fn unk_token(&self) -> Option<&str> {
        self.unk_token.as_deref()
    }
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_to_id(t))
    }
    pub fn unk_token_id(&self) -> Option<u32> {
        self.unk_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Set a special-token role (`tokenizer.pad_token = tokenizer.eos_token`).
    /// A token not yet in the vocabulary is added as a special token.
    pub fn set_special_token(&mut self, role: SpecialRole, token: &str) -> Result<()> {
        if self.token_to_id(token).is_none() {
            self.tokenizer
                .add_special_tokens([AddedToken::from(token, true)])
                .map_err(tk)?;
            self.fast = std::sync::OnceLock::new();
        }
        let slot = match role {
            SpecialRole::Bos => &mut self.bos_token,
            SpecialRole::Eos => &mut self.eos_token,
            SpecialRole::Pad => &mut self.pad_token,
            SpecialRole::Unk => &mut self.unk_token,
        };
        *slot = Some(token.to_string());
        Ok(())
    }

    /// The `tokenizer_config.json` that `save_pretrained` writes.
    pub fn tokenizer_config(&self) -> Value {
        let mut decoder = BTreeMap::new();
        for (id, t) in self.tokenizer.get_added_tokens_decoder() {
            decoder.insert(
                id,
                json!({
                    "content": t.content,
                    "lstrip": t.lstrip,
                    "normalized": t.normalized,
                    "rstrip": t.rstrip,
                    "single_word": t.single_word,
                    "special": t.special,
                }),
            );
        }
        let mut out = Map::new();
        out.insert(
            "added_tokens_decoder".into(),
            Value::Object(
                decoder
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            ),
        );
        for (k, v) in &self.extra_config {
            out.insert(k.clone(), v.clone());
        }
        for (key, v) in self.roles() {
            out.insert(key.into(), json!(v));
        }
        if let Some(m) = self.model_max_length {
            out.insert("model_max_length".into(), json!(m));
        }
        out.insert(
            "padding_side".into(),
            json!(match self.padding_side {
                PaddingSide::Left => "left",
                PaddingSide::Right => "right",
            }),
        );
        out.entry("clean_up_tokenization_spaces")
            .or_insert(json!(false));
        out.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        Value::Object(
            out.into_iter()
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .collect(),
        )
    }

    fn roles(&self) -> Vec<(&'static str, String)> {
        [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("unk_token", &self.unk_token),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
    }

    /// `tokenizer.save_pretrained(dir)`: `tokenizer.json`,
    /// `tokenizer_config.json` and `special_tokens_map.json`. The files are
    /// written into a temporary folder beside `dir` and moved in only when all
    /// are complete, so a failure never leaves a half-written tokenizer.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let files = self.pretrained_files()?;
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        crate::atomic_write::write_files_atomically(dir, &refs).map_err(|e| TokenizerError::Io {
            path: dir.into(),
            msg: e.to_string(),
        })
    }

    /// The files `save_pretrained` writes, by name (checkpoints write them too).
    pub fn pretrained_files(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let json_text = self.tokenizer.to_string(true).map_err(tk)?;
        let config = serde_json::to_string_pretty(&self.tokenizer_config()).expect("json");
        let map: Map<String, Value> = self
            .roles()
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    json!({"content": v, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false}),
                )
            })
            .collect();
        let map = serde_json::to_string_pretty(&Value::Object(map)).expect("json");
        Ok(vec![
            ("tokenizer.json", json_text.into_bytes()),
            ("tokenizer_config.json", config.into_bytes()),
            ("special_tokens_map.json", map.into_bytes()),
        ])
    }
}

/// A special-token role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialRole {
    Bos,
    Eos,
    Pad,
    Unk,
}

/// The token count of a model's tokenizer over `texts`, and the characters in
/// them: tokens per character is how the chapter compares tokenizers.
pub fn count_tokens<S: AsRef<str> + Sync>(
    tok: &AutoTokenizer,
    texts: &[S],
) -> Result<(usize, usize)> {
    use rayon::prelude::*;
    texts
        .par_iter()
        .map(|t| {
            let n = tok.backend().encode(t.as_ref(), false).map_err(tk)?.len();
            Ok((n, t.as_ref().chars().count()))
        })
        .try_reduce(|| (0, 0), |a, b| Ok((a.0 + b.0, a.1 + b.1)))
}

/// The model behind a tokenizer, for display: `BPE` or `Unigram`.
pub fn model_name(tok: &AutoTokenizer) -> &'static str {
    match tok.tokenizer.get_model() {
        ModelWrapper::BPE(_) => "BPE",
        ModelWrapper::Unigram(_) => "Unigram",
        ModelWrapper::WordPiece(_) => "WordPiece",
        ModelWrapper::WordLevel(_) => "WordLevel",
    }
}
