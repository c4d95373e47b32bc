//! GPT-2's parameters by HF name and shape, in `named_parameters` order:
//! the single source of truth for building, loading, saving and
//! partitioning the model.

use std::collections::HashMap;

use candle_core::Tensor;

use super::error::{ModelError, Result};
use crate::config::GPT2Config;

/// HF's parameter names and shapes for a config, in the order
/// `model.named_parameters()` lists them: `lm_head.weight` only when the
/// head is not tied to `wte` (`tie_word_embeddings: false`).
pub fn parameter_shapes(cfg: &GPT2Config) -> Vec<(String, Vec<usize>)> {
    let (c, i) = (cfg.n_embd, cfg.inner_dim());
    let mut v = vec![
        (
            "transformer.wte.weight".to_string(),
            vec![cfg.vocab_size, c],
        ),
        (
            "transformer.wpe.weight".to_string(),
            vec![cfg.n_positions, c],
        ),
    ];
    for l in 0..cfg.n_layer {
        let p = |s: &str| format!("transformer.h.{l}.{s}");
        v.extend([
            (p("ln_1.weight"), vec![c]),
            (p("ln_1.bias"), vec![c]),
            (p("attn.c_attn.weight"), vec![c, 3 * c]),
            (p("attn.c_attn.bias"), vec![3 * c]),
            (p("attn.c_proj.weight"), vec![c, c]),
            (p("attn.c_proj.bias"), vec![c]),
            (p("ln_2.weight"), vec![c]),
            (p("ln_2.bias"), vec![c]),
            (p("mlp.c_fc.weight"), vec![c, i]),
            (p("mlp.c_fc.bias"), vec![i]),
            (p("mlp.c_proj.weight"), vec![i, c]),
            (p("mlp.c_proj.bias"), vec![c]),
        ]);
    }
    v.push(("transformer.ln_f.weight".into(), vec![c]));
    v.push(("transformer.ln_f.bias".into(), vec![c]));
    if !cfg.tie_word_embeddings {
        v.push(("lm_head.weight".into(), vec![cfg.vocab_size, c]));
    }
    v
}

/// The parameters of block `l`, with their shapes, in `named_parameters` order.
pub fn block_parameter_names(cfg: &GPT2Config, l: usize) -> Vec<(String, Vec<usize>)> {
    let p = format!("transformer.h.{l}.");
    parameter_shapes(cfg)
        .into_iter()
        .filter(|(n, _)| n.starts_with(&p))
        .collect()
}

pub(crate) fn piece(params: &HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    params
        .get(name)
        .cloned()
        .ok_or_else(|| ModelError::MissingTensor {
            file: "(parameters passed to a forward piece)".into(),
            name: name.into(),
        })
}
