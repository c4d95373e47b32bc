//! A SentencePiece `.model` file (what `spm.SentencePieceTrainer.Train`
//! writes) converted to a tokenizer as `transformers`' `SpmConverter` does.

use std::path::Path;

use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Precompiled, Replace, Sequence, Strip};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PreTokenizerWrapper, Tokenizer,
    TokenizerImpl,
};

use super::auto::{tk, AutoTokenizer, Pipeline, Result, TokenizerError, METASPACE};

/// Load a SentencePiece `.model` file (what `spm.SentencePieceTrainer.Train`
/// writes) and convert it as `transformers`' `SpmConverter` does.
pub fn from_sentencepiece_model(path: &Path) -> Result<AutoTokenizer> {
    let bytes = std::fs::read(path).map_err(|e| TokenizerError::Io {
        path: path.into(),
        msg: e.to_string(),
    })?;
    let corrupt = |msg: String| TokenizerError::Corrupt {
        path: path.into(),
        msg,
    };
    let proto = proto::ModelProto::decode_bytes(&bytes)
        .map_err(|e| corrupt(format!("not a SentencePiece model: {e}")))?;
    if proto.pieces.is_empty() {
        return Err(corrupt("the model has no pieces".into()));
    }
    let trainer = proto.trainer_spec.clone().unwrap_or_default();
    let model_type = trainer.model_type.unwrap_or(1);
    if model_type != 1 {
        return Err(corrupt(format!(
            "model_type {model_type} is not supported: only unigram (1) models convert"
        )));
    }
    // JSON has no inf or NaN: such a score would make a tokenizer.json
    // that neither tokenizers nor transformers can load.
    if let Some((i, p)) = proto
        .pieces
        .iter()
        .enumerate()
        .find(|(_, p)| !p.score.unwrap_or(0.0).is_finite())
    {
        return Err(corrupt(format!(
            "piece {i} ({:?}) has score {}: a tokenizer.json can only hold finite scores",
            p.piece.as_deref().unwrap_or(""),
            p.score.unwrap_or(0.0)
        )));
    }
    // SentencePiece itself refuses a model without an unknown piece, and
    // unk_id must name it: any other piece would stand in for every
    // character the vocabulary lacks.
    let unk = trainer.unk_id.unwrap_or(0);
    let unk_id = match usize::try_from(unk)
        .ok()
        .and_then(|u| proto.pieces.get(u).map(|p| (u, p)))
    {
        Some((u, p)) if p.r#type == Some(2) => u,
        _ => {
            let found = proto.pieces.iter().position(|p| p.r#type == Some(2));
            return Err(corrupt(match found {
                Some(f) => format!(
                    "trainer_spec.unk_id is {unk}, but the unknown piece (type 2) is piece {f}"
                ),
                None => {
                    "the model has no unknown piece (type 2, `<unk>`), which SentencePiece requires"
                        .into()
                }
            }));
        }
    };
    let vocab: Vec<(String, f64)> = proto
        .pieces
        .iter()
        .map(|p| {
            (
                p.piece.clone().unwrap_or_default(),
                p.score.unwrap_or(0.0) as f64,
            )
        })
        .collect();
    let byte_fallback = trainer.byte_fallback.unwrap_or(false);
    let model =
        Unigram::from(vocab, Some(unk_id), byte_fallback).map_err(|e| corrupt(e.to_string()))?;
    let mut t: Pipeline = TokenizerImpl::new(ModelWrapper::Unigram(model));
    let norm = proto.normalizer_spec.clone().unwrap_or_default();
    let mut normalizers = Vec::new();
    let charsmap = norm.precompiled_charsmap.clone().unwrap_or_default();
    if !charsmap.is_empty() {
        let pre = Precompiled::from(&charsmap)
            .map_err(|e| corrupt(format!("precompiled_charsmap: {e}")))?;
        normalizers.push(NormalizerWrapper::Precompiled(pre));
    }
    if norm.remove_extra_whitespaces.unwrap_or(true) {
        normalizers.push(NormalizerWrapper::StripNormalizer(Strip::new(false, true)));
        normalizers.push(NormalizerWrapper::Replace(
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(" {2,}".into()),
                "▁",
            )
            .expect("valid regex"),
        ));
    }
    t.with_normalizer(Some(NormalizerWrapper::Sequence(Sequence::new(
        normalizers,
    ))))
    .map_err(tk)?;
    let scheme = if norm.add_dummy_prefix.unwrap_or(true) {
        PrependScheme::Always
    } else {
        PrependScheme::Never
    };
    let meta = Metaspace::new(METASPACE, scheme, true);
    t.with_pre_tokenizer(Some(PreTokenizerWrapper::Metaspace(meta.clone())));
    t.with_decoder(Some(DecoderWrapper::Metaspace(meta)));
    // Control and user-defined pieces are special tokens in transformers.
    let specials: Vec<AddedToken> = proto
        .pieces
        .iter()
        .filter(|p| matches!(p.r#type, Some(2) | Some(3)))
        .map(|p| AddedToken::from(p.piece.clone().unwrap_or_default(), true))
        .collect();
    t.add_special_tokens(specials).map_err(tk)?;
    let mut out = AutoTokenizer::from_tokenizer(Tokenizer::from(t));
    let piece = |id: Option<i32>| -> Option<String> {
        let id = id?;
        (id >= 0)
            .then(|| proto.pieces.get(id as usize))
            .flatten()
            .and_then(|p| p.piece.clone())
    };
    out.unk_token = piece(Some(trainer.unk_id.unwrap_or(0)));
    out.bos_token = piece(Some(trainer.bos_id.unwrap_or(1)));
    out.eos_token = piece(Some(trainer.eos_id.unwrap_or(2)));
    out.pad_token = piece(Some(trainer.pad_id.unwrap_or(-1)));
    Ok(out)
}

/// The parts of SentencePiece's `sentencepiece_model.proto` (proto2) that a
/// `.model` file needs for conversion to a `tokenizer.json`. Field numbers are
/// SentencePiece's; unknown fields are skipped by prost. Written by hand
/// because the schema is tiny and stable, and a build-time protobuf compiler
/// would be one more tool to install.
pub mod proto {
    use prost::Message;

    #[derive(Clone, PartialEq, Message)]
    pub struct ModelProto {
        #[prost(message, repeated, tag = "1")]
        pub pieces: Vec<SentencePiece>,
        #[prost(message, optional, tag = "2")]
        pub trainer_spec: Option<TrainerSpec>,
        #[prost(message, optional, tag = "3")]
        pub normalizer_spec: Option<NormalizerSpec>,
    }

    impl ModelProto {
        pub fn decode_bytes(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
            Self::decode(bytes)
        }
    }

    /// One piece; `type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    #[derive(Clone, PartialEq, Message)]
    pub struct SentencePiece {
        #[prost(string, optional, tag = "1")]
        pub piece: Option<String>,
        #[prost(float, optional, tag = "2")]
        pub score: Option<f32>,
        #[prost(int32, optional, tag = "3")]
        pub r#type: Option<i32>,
    }

    /// `model_type`: 1 unigram, 2 bpe, 3 word, 4 char.
    #[derive(Clone, PartialEq, Message)]
    pub struct TrainerSpec {
        #[prost(int32, optional, tag = "3")]
        pub model_type: Option<i32>,
        #[prost(int32, optional, tag = "4")]
        pub vocab_size: Option<i32>,
        #[prost(bool, optional, tag = "35")]
        pub byte_fallback: Option<bool>,
        #[prost(int32, optional, tag = "40")]
        pub unk_id: Option<i32>,
        #[prost(int32, optional, tag = "41")]
        pub bos_id: Option<i32>,
        #[prost(int32, optional, tag = "42")]
        pub eos_id: Option<i32>,
        #[prost(int32, optional, tag = "43")]
        pub pad_id: Option<i32>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct NormalizerSpec {
        #[prost(string, optional, tag = "1")]
        pub name: Option<String>,
        #[prost(bytes = "vec", optional, tag = "2")]
        pub precompiled_charsmap: Option<Vec<u8>>,
        #[prost(bool, optional, tag = "3")]
        pub add_dummy_prefix: Option<bool>,
        #[prost(bool, optional, tag = "4")]
        pub remove_extra_whitespaces: Option<bool>,
        #[prost(bool, optional, tag = "5")]
        pub escape_whitespaces: Option<bool>,
    }
}

#[cfg(test)]
mod tests {
    use super::proto::ModelProto;
    use super::*;
    use prost::Message;

    /// The fixture model changed by `edit`, converted.
    fn convert_edited(edit: impl Fn(&mut ModelProto)) -> Result<AutoTokenizer> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/spm_small.model");
        let mut m = ModelProto::decode_bytes(&std::fs::read(path).unwrap()).unwrap();
        edit(&mut m);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("edited.model");
        std::fs::write(&out, m.encode_to_vec()).unwrap();
        from_sentencepiece_model(&out)
    }

    #[test]
    fn scores_that_json_cannot_hold_and_a_missing_unk_are_refused() {
        let t = convert_edited(|_| {}).unwrap();
        assert_eq!(t.unk_token.as_deref(), Some("<unk>"));
        for bad in [f32::NEG_INFINITY, f32::NAN] {
            let e = convert_edited(|m| m.pieces[5].score = Some(bad))
                .unwrap_err()
                .to_string();
            assert!(e.contains("piece 5") && e.contains("finite scores"), "{e}");
        }
        let e = convert_edited(|m| m.pieces[0].r#type = Some(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no unknown piece"), "{e}");
        let e = convert_edited(|m| m.trainer_spec.as_mut().unwrap().unk_id = Some(4))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unk_id is 4, but the unknown piece (type 2) is piece 0"),
            "{e}"
        );
    }
}
