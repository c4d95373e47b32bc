//! What the kernels are given: the model's weights as slices, where to draw
//! dropout masks, and which configs they compute.

use super::inputs::InputError;
use crate::config::{Activation, GPT2Config};
use crate::params::{BlockParams, Gpt2Params};

/// Whether these kernels compute a model of `cfg` (fp32 on the CPU is the
/// caller's to check): GPT-2's tanh-form GELU (`gelu_new`).
pub fn supports(cfg: &GPT2Config) -> bool {
    Activation::parse(&cfg.activation_function) == Some(Activation::GeluTanh)
}

/// A model's weights as fp32 slices in `named_parameters` order, with the
/// index that says which is which.
pub struct Weights<'a> {
    pub params: &'a Gpt2Params,
    pub values: &'a [&'a [f32]],
}

impl Weights<'_> {
    /// The index of a model of `cfg`, checked against the slices given.
    pub(crate) fn index(&self, cfg: &GPT2Config) -> Result<&Gpt2Params, InputError> {
        if self.params.blocks.len() != cfg.n_layer || self.values.len() != self.params.len() {
            return Err(InputError(format!(
                "{} weights of a {}-layer model given for a {}-layer config",
                self.values.len(),
                self.params.blocks.len(),
                cfg.n_layer
            )));
        }
        Ok(self.params)
    }
}

/// `(W_fc, b_fc, W_proj, b_proj)` of block `b`'s MLP.
pub(crate) fn mlp_weights<'a>(
    b: &BlockParams,
    w: &[&'a [f32]],
) -> (&'a [f32], &'a [f32], &'a [f32], &'a [f32]) {
    (
        w[b.c_fc.weight],
        w[b.c_fc.bias],
        w[b.mlp_c_proj.weight],
        w[b.mlp_c_proj.bias],
    )
}

/// Where the training step draws its dropout masks: each element 0 or
/// 1/(1 − p), in a fixed order, so that the autograd path draws the same.
pub trait DropoutMasks {
    fn fill_mask(&self, out: &mut [f32], p: f64);
}
