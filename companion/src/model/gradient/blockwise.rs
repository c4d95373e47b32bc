//! Block by block, for ZeRO-3 and `gradient_checkpointing`: the forward
//! pass keeps only each block's input; the backward pass fetches the
//! block's weights again (gathered from their owners under ZeRO-3),
//! recomputes it from that input with the same dropout masks,
//! differentiates it alone and hands its gradients to the store.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use super::batch::{gradient_tensors, loss_backward, MicroBatch};
use super::store::ParamStore;
use crate::model::error::{ModelError, Result};
use crate::model::gpt2::GPT2LMHeadModel;

/// Parameters `idx` by HF name, as the model's `*_with` pieces take them.
fn named(model: &GPT2LMHeadModel, idx: &[usize], t: Vec<Tensor>) -> HashMap<String, Tensor> {
    idx.iter()
        .map(|&i| model.params.name(i).to_string())
        .zip(t)
        .collect()
}

fn named_vars(model: &GPT2LMHeadModel, idx: &[usize], v: &[Var]) -> HashMap<String, Tensor> {
    named(
        model,
        idx,
        v.iter().map(|v| v.as_tensor().clone()).collect(),
    )
}

/// Logits without gradients, one piece at a time (evaluation under ZeRO-3:
/// no rank holds more than one block's weights).
pub fn forward(
    model: &GPT2LMHeadModel,
    store: &mut dyn ParamStore,
    input_ids: &Tensor,
    attention_mask: Option<&[Vec<u32>]>,
) -> Result<Tensor> {
    let p = &model.params;
    let emb = p.embedding_piece();
    let w = store.tensors(model, &emb)?;
    let mut x = model.embed_with(&named(model, &emb, w), input_ids, attention_mask)?;
    for l in 0..p.blocks.len() {
        let idx = p.block_piece(l);
        let w = store.tensors(model, &idx)?;
        x = model.block_with(l, &named(model, &idx, w), &x, attention_mask)?;
    }
    let head = p.head_piece();
    let w = store.tensors(model, &head)?;
    model.head_with(&named(model, &head, w), &x)
}

/// [`forward`]'s fetches without a batch (a rank with none this round).
pub fn skip_forward(model: &GPT2LMHeadModel, store: &mut dyn ParamStore) -> Result<()> {
    let p = &model.params;
    store.tensors(model, &p.embedding_piece())?;
    for l in 0..p.blocks.len() {
        store.tensors(model, &p.block_piece(l))?;
    }
    store.tensors(model, &p.head_piece())?;
    Ok(())
}

/// Forward keeping each block's input, then backward block by block.
pub fn forward_backward(
    model: &GPT2LMHeadModel,
    batch: &MicroBatch,
    store: &mut dyn ParamStore,
) -> Result<f64> {
    let (ids, mask) = (batch.input_ids, batch.attention_mask);
    let p = &model.params;
    let n_layer = p.blocks.len();
    let (emb, head) = (p.embedding_piece(), p.head_piece());
    // Forward: keep each block's input and the dropout generator's state.
    let mut states = vec![model.dropout_state()];
    let w = store.tensors(model, &emb)?;
    let mut xs = vec![model.embed_with(&named(model, &emb, w), ids, mask)?];
    for l in 0..n_layer {
        states.push(model.dropout_state());
        let idx = p.block_piece(l);
        let w = store.tensors(model, &idx)?;
        let x = model.block_with(l, &named(model, &idx, w), &xs[l], mask)?;
        xs.push(x);
    }
    let after = model.dropout_state();
    // Head and loss, with gradients for ln_f, the head and the last activation.
    let v = store.vars(model, &head)?;
    let x_last = Var::from_tensor(&xs[n_layer])?;
    let logits = model.head_with(&named_vars(model, &head, &v), x_last.as_tensor())?;
    let (loss, g) = loss_backward(&logits, batch)?;
    let Some(g) = g else { return Ok(loss) };
    store.add_gradient_tensors(&head, &gradient_tensors(&g, &v)?)?;
    let mut gy = g
        .get(x_last.as_tensor())
        .ok_or_else(|| ModelError::Input("no gradient reached the last block".into()))?
        .clone();
    drop((v, g, logits));
    // Backward, block by block: fetch, recompute, differentiate, hand over.
    for l in (0..n_layer).rev() {
        model.set_dropout_state(states[l + 1]);
        let idx = p.block_piece(l);
        let v = store.vars(model, &idx)?;
        let x_in = Var::from_tensor(&xs[l])?;
        let y = model.block_with(l, &named_vars(model, &idx, &v), x_in.as_tensor(), mask)?;
        let g = (y * &gy)?.sum_all()?.backward()?;
        store.add_gradient_tensors(&idx, &gradient_tensors(&g, &v)?)?;
        gy = g
            .get(x_in.as_tensor())
            .ok_or_else(|| ModelError::Input(format!("no gradient reached block {l}")))?
            .clone();
        xs.truncate(l + 1);
    }
    model.set_dropout_state(states[0]);
    let v = store.vars(model, &emb)?;
    let x0 = model.embed_with(&named_vars(model, &emb, &v), ids, mask)?;
    let g = (x0 * &gy)?.sum_all()?.backward()?;
    store.add_gradient_tensors(&emb, &gradient_tensors(&g, &v)?)?;
    model.set_dropout_state(after);
    Ok(loss)
}

/// [`forward_backward`]'s fetches and hand-overs with zero gradients.
pub fn skip(model: &GPT2LMHeadModel, store: &mut dyn ParamStore) -> Result<()> {
    let p = &model.params;
    let zeros = |idx: &[usize]| -> Vec<Vec<f32>> {
        idx.iter().map(|&i| vec![0.0; p.specs[i].numel()]).collect()
    };
    store.tensors(model, &p.embedding_piece())?;
    for l in 0..p.blocks.len() {
        store.tensors(model, &p.block_piece(l))?;
    }
    let head = p.head_piece();
    store.vars(model, &head)?;
    store.add_gradients(&head, &zeros(&head))?;
    for l in (0..p.blocks.len()).rev() {
        let idx = p.block_piece(l);
        store.vars(model, &idx)?;
        store.add_gradients(&idx, &zeros(&idx))?;
    }
    let emb = p.embedding_piece();
    store.vars(model, &emb)?;
    store.add_gradients(&emb, &zeros(&emb))?;
    Ok(())
}
