//! Where a gradient path reads weights and puts gradients: the
//! [`ParamStore`] trait, and [`LocalStore`] for one process.

use candle_core::{Tensor, Var};

use crate::model::error::Result;
use crate::model::gpt2::GPT2LMHeadModel;

/// Where a gradient path reads weights and puts gradients. Parameters are
/// named by their index in [`crate::params::Gpt2Params`].
pub trait ParamStore {
    /// Weights `idx` for a forward pass without gradients.
    fn tensors(&mut self, model: &GPT2LMHeadModel, idx: &[usize]) -> Result<Vec<Tensor>>;
    /// Weights `idx` as Vars whose gradients `backward()` records.
    fn vars(&mut self, model: &GPT2LMHeadModel, idx: &[usize]) -> Result<Vec<Var>>;
    /// Add the gradients of parameters `idx` (fp32, whole tensors).
    fn add_gradients(&mut self, idx: &[usize], grads: &[Vec<f32>]) -> Result<()>;
    /// The same, given as flat fp32 tensors on the model's device. A store
    /// that keeps its buffers on that device adds them there; by default
    /// they are read out to host memory for [`add_gradients`](Self::add_gradients).
    fn add_gradient_tensors(&mut self, idx: &[usize], grads: &[Tensor]) -> Result<()> {
        self.add_gradients(idx, &to_host(grads)?)
    }
    /// Lend `f` a whole-model gradient buffer in flat-layout order to add
    /// into; what `f` returns (the loss) is passed back. When the store keeps
    /// only a partition, its share is taken from the buffer afterwards.
    fn with_flat_gradients(&mut self, f: &mut dyn FnMut(&mut [f32]) -> Result<f64>) -> Result<f64>;
}

/// Flat fp32 gradient tensors read out to host memory, for a store that
/// keeps its gradients there.
pub fn to_host(grads: &[Tensor]) -> Result<Vec<Vec<f32>>> {
    Ok(grads
        .iter()
        .map(|t| t.to_vec1::<f32>())
        .collect::<candle_core::Result<Vec<_>>>()?)
}

/// One process holding everything: weights are the model's own, gradients
/// accumulate in one flat fp32 buffer in layout order.
pub struct LocalStore {
    pub grads: Vec<f32>,
    ranges: Vec<std::ops::Range<usize>>,
}

impl LocalStore {
    pub fn new(model: &GPT2LMHeadModel) -> Self {
        LocalStore {
            grads: vec![0.0; model.params.numel()],
            ranges: model.params.ranges(),
        }
    }

    /// How many parameter tensors it holds gradients for.
    pub fn num_tensors(&self) -> usize {
        self.ranges.len()
    }

    /// The gradient of parameter `i`.
    pub fn gradient(&self, i: usize) -> &[f32] {
        &self.grads[self.ranges[i].clone()]
    }
}

impl ParamStore for LocalStore {
    fn tensors(&mut self, model: &GPT2LMHeadModel, idx: &[usize]) -> Result<Vec<Tensor>> {
        let p = model.named_parameters();
        Ok(idx.iter().map(|&i| p[i].1.as_detached_tensor()).collect())
    }

    fn vars(&mut self, model: &GPT2LMHeadModel, idx: &[usize]) -> Result<Vec<Var>> {
        let p = model.named_parameters();
        Ok(idx.iter().map(|&i| p[i].1.clone()).collect())
    }

    fn add_gradients(&mut self, idx: &[usize], grads: &[Vec<f32>]) -> Result<()> {
        for (&i, g) in idx.iter().zip(grads) {
            let dst = &mut self.grads[self.ranges[i].clone()];
            dst.iter_mut().zip(g).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn with_flat_gradients(&mut self, f: &mut dyn FnMut(&mut [f32]) -> Result<f64>) -> Result<f64> {
        f(&mut self.grads)
    }
}
