//! A model folder or hub id loaded for inference, model and tokenizer
//! together, as `pipeline("text-generation", model=…)` loads them.

use candle_core::{DType, Device};

use crate::model::{GPT2LMHeadModel, ModelError};
use crate::tokenizer::{AutoTokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum PretrainedError {
    #[error("loading the model `{id}`: {source}")]
    Model { id: String, source: ModelError },
    #[error("loading the tokenizer of `{id}`: {source}")]
    Tokenizer { id: String, source: TokenizerError },
}

/// The fp32 model and its tokenizer from `id` (a folder or hub id); a
/// tokenizer without a pad token pads with eos, as the chapter sets it.
pub fn load_pretrained(
    id: &str,
    device: &Device,
) -> Result<(GPT2LMHeadModel, AutoTokenizer), PretrainedError> {
    let model = GPT2LMHeadModel::from_pretrained(id, DType::F32, device).map_err(|source| {
        PretrainedError::Model {
            id: id.into(),
            source,
        }
    })?;
    let tokenizer_error = |source| PretrainedError::Tokenizer {
        id: id.into(),
        source,
    };
    let mut tok = AutoTokenizer::from_pretrained(id).map_err(tokenizer_error)?;
    tok.pad_with_eos().map_err(tokenizer_error)?;
    Ok((model, tok))
}
