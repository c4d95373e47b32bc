//! candle's autograd over the whole model: the forward pass records the
//! graph ([`GPT2LMHeadModel::forward`]), `backward()` walks it. Runs any
//! dtype on any device; the reference the other paths are tested against.

use super::batch::{loss_backward, MicroBatch};
use super::store::ParamStore;
use crate::model::error::Result;
use crate::model::gpt2::GPT2LMHeadModel;

/// Forward, loss and backward of `batch`; every parameter's gradient is
/// added to the store's flat buffer.
pub fn forward_backward(
    model: &GPT2LMHeadModel,
    batch: &MicroBatch,
    store: &mut dyn ParamStore,
) -> Result<f64> {
    let logits = model.forward(batch.input_ids, batch.attention_mask, None)?;
    let (loss, grads) = loss_backward(&logits, batch)?;
    let params = model.named_parameters();
    let ranges = model.params.ranges();
    store.with_flat_gradients(&mut |flat| {
        let Some(g) = &grads else { return Ok(loss) };
        for ((_, var), r) in params.iter().zip(&ranges) {
            if let Some(t) = g.get(var.as_tensor()) {
                let v: Vec<f32> = t
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()?;
                flat[r.clone()]
                    .iter_mut()
                    .zip(&v)
                    .for_each(|(a, b)| *a += b);
            }
        }
        Ok(loss)
    })
}
