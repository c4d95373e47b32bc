//! GPT-2's parameters as one typed index: each parameter's HF name, shape,
//! initialisation and weight-decay membership, in `named_parameters` order,
//! with the roles (embedding, the blocks' layer norms and projections,
//! `ln_f`, the head) as indices into that list.
//!
//! Everything that walks the parameters reads this: building, loading and
//! saving the model, the ZeRO flat buffer and its pieces, the fused CPU
//! kernels, AdamW's decay mask. An architecture variant (a bias-free layer
//! norm, another head) changes this file and the math that uses the new
//! piece, nothing else.

use crate::config::GPT2Config;

/// How HF's `_init_weights` fills a parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    /// normal(0, std)
    Normal {
        std: f64,
    },
}

/// One parameter: HF name, shape, initialisation, and whether AdamW decays
/// it (HF Trainer: every weight except biases and LayerNorm weights).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    pub decay: bool,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A weight and its bias (a LayerNorm or a Conv1D), as parameter indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Affine {
    pub weight: usize,
    pub bias: usize,
}

/// One transformer block's parameters (`transformer.h.{l}.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockParams {
    pub ln_1: Affine,
    pub c_attn: Affine,
    pub attn_c_proj: Affine,
    pub ln_2: Affine,
    pub c_fc: Affine,
    pub mlp_c_proj: Affine,
}

impl BlockParams {
    /// The block's parameter indices in `named_parameters` order.
    pub fn indices(&self) -> Vec<usize> {
        [
            self.ln_1,
            self.c_attn,
            self.attn_c_proj,
            self.ln_2,
            self.c_fc,
            self.mlp_c_proj,
        ]
        .iter()
        .flat_map(|a| [a.weight, a.bias])
        .collect()
    }
}

/// GPT-2's parameters for one config: `specs` in `named_parameters` order
/// and each role's index into it.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Params {
    pub specs: Vec<ParamSpec>,
    pub wte: usize,
    pub wpe: usize,
    pub blocks: Vec<BlockParams>,
    pub ln_f: Affine,
    /// `lm_head.weight`: only when the head is not tied to `wte`
    /// (`tie_word_embeddings: false`).
    pub lm_head: Option<usize>,
}

impl Gpt2Params {
    pub fn new(cfg: &GPT2Config) -> Self {
        let (c, inner) = (cfg.n_embd, cfg.inner_dim());
        let std = cfg.initializer_range;
        // HF scales the residual projections by 1/√(2·n_layer).
        let proj_std = std / (2.0 * cfg.n_layer as f64).sqrt();
        let mut specs = Vec::new();
        let mut push = |name: String, shape: Vec<usize>, init: Init, decay: bool| {
            specs.push(ParamSpec {
                name,
                shape,
                init,
                decay,
            });
            specs.len() - 1
        };
        let wte = push(
            "transformer.wte.weight".into(),
            vec![cfg.vocab_size, c],
            Init::Normal { std },
            true,
        );
        let wpe = push(
            "transformer.wpe.weight".into(),
            vec![cfg.n_positions, c],
            Init::Normal { std },
            true,
        );
        let layer_norm = |push: &mut dyn FnMut(String, Vec<usize>, Init, bool) -> usize,
                          p: &str| Affine {
            weight: push(format!("{p}.weight"), vec![c], Init::Ones, false),
            bias: push(format!("{p}.bias"), vec![c], Init::Zeros, false),
        };
        let conv = |push: &mut dyn FnMut(String, Vec<usize>, Init, bool) -> usize,
                    p: &str,
                    (n_in, n_out): (usize, usize),
                    std: f64| Affine {
            weight: push(
                format!("{p}.weight"),
                vec![n_in, n_out],
                Init::Normal { std },
                true,
            ),
            bias: push(format!("{p}.bias"), vec![n_out], Init::Zeros, false),
        };
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let p = format!("transformer.h.{l}");
            blocks.push(BlockParams {
                ln_1: layer_norm(&mut push, &format!("{p}.ln_1")),
                c_attn: conv(&mut push, &format!("{p}.attn.c_attn"), (c, 3 * c), std),
                attn_c_proj: conv(&mut push, &format!("{p}.attn.c_proj"), (c, c), proj_std),
                ln_2: layer_norm(&mut push, &format!("{p}.ln_2")),
                c_fc: conv(&mut push, &format!("{p}.mlp.c_fc"), (c, inner), std),
                mlp_c_proj: conv(&mut push, &format!("{p}.mlp.c_proj"), (inner, c), proj_std),
            });
        }
        let ln_f = layer_norm(&mut push, "transformer.ln_f");
        let lm_head = (!cfg.tie_word_embeddings).then(|| {
            push(
                "lm_head.weight".into(),
                vec![cfg.vocab_size, c],
                Init::Normal { std },
                true,
            )
        });
        Gpt2Params {
            specs,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
        }
    }

    pub fn len(&self) -> usize {
        self.specs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Every parameter's element count, summed (Ψ).
    pub fn numel(&self) -> usize {
        self.specs.iter().map(ParamSpec::numel).sum()
    }

    /// The output head's weight: `lm_head`, or `wte` when tied.
    pub fn head(&self) -> usize {
        self.lm_head.unwrap_or(self.wte)
    }

    /// Each parameter's elements in a flat buffer of all of them, in order
    /// (ZeRO's flat layout, the fused kernels' gradient buffer).
    pub fn ranges(&self) -> Vec<std::ops::Range<usize>> {
        let mut at = 0;
        self.specs
            .iter()
            .map(|s| {
                at += s.numel();
                at - s.numel()..at
            })
            .collect()
    }

    pub fn name(&self, i: usize) -> &str {
        &self.specs[i].name
    }

    /// The index of the parameter HF calls `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.name == name)
    }

    /// The pieces a block-by-block pass runs in order: the embeddings
    /// (`wte`, `wpe`) ...
    pub fn embedding_piece(&self) -> Vec<usize> {
        vec![self.wte, self.wpe]
    }

    /// ... each block ...
    pub fn block_piece(&self, l: usize) -> Vec<usize> {
        self.blocks[l].indices()
    }

    /// ... and the head with `ln_f` (`wte` again when tied).
    pub fn head_piece(&self) -> Vec<usize> {
        vec![self.head(), self.ln_f.weight, self.ln_f.bias]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(tied: bool) -> GPT2Config {
        let mut cfg = GPT2Config::preset("gpt2").unwrap();
        (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size) = (2, 8, 2, 11);
        cfg.tie_word_embeddings = tied;
        cfg
    }

    /// HF's `named_parameters()` of GPT2LMHeadModel: 2 + 12 per block + 2,
    /// and `lm_head.weight` last only when untied; Ψ matches the config's count.
    #[test]
    fn the_index_lists_hf_parameters_in_order() {
        for tied in [true, false] {
            let cfg = tiny(tied);
            let p = Gpt2Params::new(&cfg);
            assert_eq!(p.len(), 2 + 12 * 2 + 2 + usize::from(!tied));
            assert_eq!(p.name(0), "transformer.wte.weight");
            assert_eq!(p.name(2), "transformer.h.0.ln_1.weight");
            assert_eq!(
                p.name(p.blocks[1].mlp_c_proj.bias),
                "transformer.h.1.mlp.c_proj.bias"
            );
            assert_eq!(p.name(p.ln_f.weight), "transformer.ln_f.weight");
            assert_eq!(
                p.name(p.head()),
                if tied {
                    "transformer.wte.weight"
                } else {
                    "lm_head.weight"
                }
            );
            assert_eq!(p.numel(), cfg.num_parameters());
            // Every index appears in exactly one piece (the tied head is wte).
            let mut seen: Vec<usize> = p.embedding_piece();
            (0..2).for_each(|l| seen.extend(p.block_piece(l)));
            seen.extend(p.head_piece());
            seen.sort();
            seen.dedup();
            assert_eq!(seen, (0..p.len()).collect::<Vec<_>>());
        }
    }

    /// HF Trainer's decay rule and GPT-2's `_init_weights`.
    #[test]
    fn decay_and_init_follow_hf() {
        let cfg = tiny(false);
        let p = Gpt2Params::new(&cfg);
        let spec = |n: &str| p.specs[p.index(n).unwrap()].clone();
        assert!(spec("transformer.h.0.attn.c_attn.weight").decay);
        assert!(spec("lm_head.weight").decay);
        assert!(!spec("transformer.h.0.attn.c_attn.bias").decay);
        assert!(!spec("transformer.h.1.ln_1.weight").decay);
        assert!(!spec("transformer.ln_f.weight").decay);
        assert_eq!(spec("transformer.ln_f.weight").init, Init::Ones);
        assert_eq!(spec("transformer.h.0.ln_2.bias").init, Init::Zeros);
        let proj = cfg.initializer_range / 2f64.sqrt() / 2f64.sqrt();
        match spec("transformer.h.1.attn.c_proj.weight").init {
            Init::Normal { std } => assert!((std - proj).abs() < 1e-12),
            other => panic!("{other:?}"),
        }
        assert_eq!(spec("transformer.h.0.mlp.c_fc.weight").shape, vec![8, 32]);
    }
}
