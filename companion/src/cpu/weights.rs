//! What the kernels are given: the model's weights as slices, where to draw
//! dropout masks, and which configs they compute.

use crate::config::{Activation, GPT2Config};

/// Whether these kernels compute a model of `cfg` (fp32 on the CPU is the
/// caller's to check): GPT-2's tanh-form GELU (`gelu_new`).
pub fn supports(cfg: &GPT2Config) -> bool {
    Activation::parse(&cfg.activation_function) == Some(Activation::GeluTanh)
}

/// A model's weights as fp32 slices, with their HF names, in
/// `named_parameters` order.
pub struct Weights<'a> {
    pub names: &'a [String],
    pub values: &'a [&'a [f32]],
}

/// Where the training step draws its dropout masks: each element 0 or
/// 1/(1 − p), in a fixed order, so that the autograd path draws the same.
pub trait DropoutMasks {
    fn fill_mask(&self, out: &mut [f32], p: f64);
}
