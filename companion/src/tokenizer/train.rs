//! Training a tokenizer as 4.3.2 does: `ByteLevelBPETokenizer().train_from_iterator`
//! or a SentencePiece-style unigram, with the chapter's special tokens added
//! after the learned vocabulary.

use std::collections::HashSet;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::unigram::{Unigram, UnigramTrainerBuilder};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::{Replace, Sequence, NFKC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer, TokenizerImpl,
};

use super::auto::{tk, AutoTokenizer, Pipeline, Result, SpecialRole, TokenizerError, METASPACE};

/// Which model to train: `ByteLevelBPETokenizer` or SentencePiece's unigram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    Bpe,
    Unigram,
}

impl std::str::FromStr for TokenizerKind {
    type Err = TokenizerError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bpe" | "byte-level-bpe" => Ok(Self::Bpe),
            "unigram" | "sentencepiece" => Ok(Self::Unigram),
            _ => Err(TokenizerError::Invalid(format!(
                "unknown tokenizer model `{s}`: expected `bpe` or `unigram`"
            ))),
        }
    }
}

/// Settings for [`train`]; the defaults are the chapter's.
#[derive(Debug, Clone)]
pub struct TrainArgs {
    pub kind: TokenizerKind,
    /// Size of the learned vocabulary (the chapter: 30000).
    pub vocab_size: usize,
    /// `min_frequency` of `train_from_iterator` (BPE only; default 2).
    pub min_frequency: u64,
    /// Added after training, so their ids follow the learned vocabulary:
    /// bos, eos, pad in that order.
    pub special_tokens: Vec<String>,
    pub show_progress: bool,
}

impl Default for TrainArgs {
    fn default() -> Self {
        TrainArgs {
            kind: TokenizerKind::Bpe,
            vocab_size: 30000,
            min_frequency: 2,
            special_tokens: vec!["<bos>".into(), "<eos>".into(), "<pad>".into()],
            show_progress: false,
        }
    }
}

/// `ByteLevelBPETokenizer()`: no normalizer, byte-level pre-tokenizer without
/// a prefix space, byte-level decoder and post-processor.
pub fn byte_level_bpe() -> Tokenizer {
    let mut t: Pipeline = TokenizerImpl::new(ModelWrapper::BPE(BPE::default()));
    t.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, true, true,
    ))));
    t.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    t.with_post_processor(Some(PostProcessorWrapper::ByteLevel(ByteLevel::new(
        false, false, true,
    ))));
    Tokenizer::from(t)
}

/// `SentencePieceUnigramTokenizer()`: SentencePiece's normalisation (NFKC,
/// runs of spaces folded), `▁` for spaces with one prepended, unigram model.
pub fn sentencepiece_unigram() -> Tokenizer {
    let mut t: Pipeline = TokenizerImpl::new(ModelWrapper::Unigram(Unigram::default()));
    let folds = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(" {2,}".into()),
        " ",
    )
    .expect("valid regex");
    t.with_normalizer(Some(NormalizerWrapper::Sequence(Sequence::new(vec![
        NormalizerWrapper::Nmt(tokenizers::normalizers::Nmt),
        NormalizerWrapper::NFKC(NFKC),
        NormalizerWrapper::Replace(folds),
    ]))))
    .expect("normalizer");
    let meta = Metaspace::new(METASPACE, PrependScheme::Always, true);
    t.with_pre_tokenizer(Some(PreTokenizerWrapper::Metaspace(meta.clone())));
    t.with_decoder(Some(DecoderWrapper::Metaspace(meta)));
    Tokenizer::from(t)
}

/// [`train`] on documents read as they come, so that a corpus of any size
/// trains in the memory of its word counts, not of its text; the first
/// error of the stream (a bad line, say) stops training and is returned.
pub fn train_stream<I, E>(args: &TrainArgs, docs: I) -> std::result::Result<AutoTokenizer, E>
where
    I: Iterator<Item = std::result::Result<String, E>> + Send,
    E: From<TokenizerError> + Send,
{
    let failed = std::sync::Mutex::new(None);
    let texts = docs.map_while(|d| {
        d.map_err(|e| *failed.lock().expect("not poisoned") = Some(e))
            .ok()
    });
    let trained = train(args, texts);
    if let Some(e) = failed.into_inner().expect("not poisoned") {
        return Err(e);
    }
    Ok(trained?)
}

/// Refuse a vocabulary the trainers could not allocate before they try:
/// ids are u32, and the trainers allocate about 72 bytes per entry up
/// front (4e9 entries asked for 283 GB).
fn check_vocab_size(vocab_size: usize) -> Result<()> {
    let invalid = |msg: String| TokenizerError::Invalid(format!("vocab_size {vocab_size}: {msg}"));
    if vocab_size > u32::MAX as usize {
        return Err(invalid(
            "token ids are 32-bit; give at most 4294967295".into(),
        ));
    }
    crate::sysmem::check_fits(
        (vocab_size as u64).saturating_mul(72),
        &format!("training a vocabulary of {vocab_size} entries"),
    )
    .map_err(invalid)
}

/// Train a tokenizer on `texts` (one document each, as
/// `train_from_iterator(dataset["text"])`), on all cores.
pub fn train<I, S>(args: &TrainArgs, texts: I) -> Result<AutoTokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let n_special = args.special_tokens.len();
    check_vocab_size(args.vocab_size)?;
    let mut tokenizer = match args.kind {
        TokenizerKind::Bpe => {
            let alphabet = ByteLevel::alphabet();
            if args.vocab_size <= alphabet.len() {
                return Err(TokenizerError::Invalid(format!(
                    "vocab_size {} is too small: byte-level BPE needs more than its {}-symbol \
                     byte alphabet (the {} special tokens are added on top)",
                    args.vocab_size,
                    alphabet.len(),
                    n_special
                )));
            }
            let trainer = BpeTrainerBuilder::new()
                .vocab_size(args.vocab_size)
                .min_frequency(args.min_frequency)
                .show_progress(args.show_progress)
                .initial_alphabet(alphabet.into_iter().collect::<HashSet<char>>())
                .build();
            let mut trainer = TrainerWrapper::BpeTrainer(trainer);
            let mut t = byte_level_bpe();
            t.train(&mut trainer, texts).map_err(tk)?;
            t
        }
        TokenizerKind::Unigram => {
            if args.vocab_size < 2 {
                return Err(TokenizerError::Invalid(format!(
                    "vocab_size {} is too small for a unigram model (it needs <unk> and pieces)",
                    args.vocab_size
                )));
            }
            let trainer = UnigramTrainerBuilder::default()
                .vocab_size(args.vocab_size as u32)
                .show_progress(args.show_progress)
                .special_tokens(vec![AddedToken::from("<unk>", true)])
                .unk_token(Some("<unk>".into()))
                .build()
                .map_err(tk)?;
            let mut trainer = TrainerWrapper::UnigramTrainer(trainer);
            let mut t = sentencepiece_unigram();
            t.train(&mut trainer, texts).map_err(tk)?;
            t
        }
    };
    let learned = tokenizer.get_vocab_size(false);
    if learned == 0 || (args.kind == TokenizerKind::Unigram && learned <= 1) {
        return Err(TokenizerError::Invalid(
            "the corpus holds no text to train on".into(),
        ));
    }
    if args.kind == TokenizerKind::Unigram && learned < args.vocab_size / 2 {
        // The unigram trainer silently stops short when the corpus has too few
        // distinct pieces; say so rather than hand back a tiny vocabulary.
        eprintln!(
            "warning: the corpus only supports {learned} unigram pieces (asked for {})",
            args.vocab_size
        );
    }
    let specials: Vec<AddedToken> = args
        .special_tokens
        .iter()
        .map(|s| AddedToken::from(s.as_str(), true))
        .collect();
    tokenizer.add_special_tokens(specials).map_err(tk)?;
    let mut out = AutoTokenizer::from_tokenizer(tokenizer);
    if args.kind == TokenizerKind::Unigram {
        out.unk_token = Some("<unk>".into());
    }
    // bos, eos, pad in the order given (the chapter's three).
    for (role, tok) in [SpecialRole::Bos, SpecialRole::Eos, SpecialRole::Pad]
        .into_iter()
        .zip(&args.special_tokens)
    {
        out.set_special_token(role, tok)?;
    }
    Ok(out)
}
