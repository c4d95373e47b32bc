//! Evaluation: held-out loss per token, perplexity and bits per byte
//! (`trainer.evaluate()`, and `companion eval` on a saved model).

use std::time::Instant;

use candle_core::{Device, Tensor};
use serde_json::json;

use super::error::{Result, TrainError};
use super::logging::num;
use super::state::{EvalMetrics, LogEntry};
use super::trainer::Trainer;
use crate::data::{Batch, DataCollatorForLanguageModeling, Dataset};
use crate::model::{causal_lm_loss_sum, GPT2LMHeadModel};

/// Held-out loss of `model` on `ds` in one process, batches of `batch_size`
/// (what `companion eval` runs; the Trainer's own evaluation also handles
/// ranks and ZeRO-3).
pub fn evaluate_model(
    model: &GPT2LMHeadModel,
    ds: &Dataset,
    collator: &DataCollatorForLanguageModeling,
    batch_size: usize,
) -> Result<EvalMetrics> {
    if batch_size == 0 {
        return Err(TrainError::Args(
            "the evaluation batch size must be at least 1".into(),
        ));
    }
    let model = model.for_inference();
    let dev = model.device().clone();
    let (mut sum, mut count) = (0f64, 0usize);
    let idx: Vec<usize> = (0..ds.len()).collect();
    for rows in idx.chunks(batch_size) {
        let examples = ds.examples(rows);
        let refs: Vec<&[u32]> = examples.iter().map(|e| &**e).collect();
        let b = collator.collate(&refs)?;
        let (s, n) = batch_loss_sum(&b, &dev, |ids, mask| Ok(model.forward(ids, mask, None)?))?;
        sum += s;
        count += n;
    }
    EvalMetrics::from_sum(sum, count, ds.bytes_per_token(), ds.len())
}

/// The summed loss and label-token count of one collated batch, with the
/// logits `forward` gives for its input ids and attention mask (none when
/// nothing is padded).
fn batch_loss_sum(
    b: &Batch,
    dev: &Device,
    forward: impl FnOnce(&Tensor, Option<&[Vec<u32>]>) -> Result<Tensor>,
) -> Result<(f64, usize)> {
    let ids = Tensor::new(b.input_ids.clone(), dev)?;
    let labels = Tensor::new(b.labels.clone(), dev)?;
    let mask = (!b.is_unpadded()).then_some(b.attention_mask.as_slice());
    let logits = forward(&ids, mask)?;
    let (s, n) = causal_lm_loss_sum(&logits, &labels)?;
    Ok((s.to_scalar::<f32>()? as f64, n))
}

impl Trainer {
    /// Mean loss per counted token over `ds`, perplexity and bits per byte.
    pub fn evaluate_dataset(&mut self, ds: &Dataset) -> Result<EvalMetrics> {
        let was = self.model.is_training();
        self.model.set_training(false);
        let (sum, count) = if self.engine.zero().is_some() {
            self.zero_eval(ds)?
        } else {
            self.model_parallel_eval(ds)?
        };
        let comm = self.engine.comm().clone();
        let reduce = |x: f64| -> Result<f64> { Ok(comm.all_reduce_f64(x)?) };
        let sum = reduce(sum)?;
        let count = reduce(count as f64)? as usize;
        self.model.set_training(was);
        EvalMetrics::from_sum(sum, count, ds.bytes_per_token(), ds.len())
    }

    /// This rank's summed loss and token count on the data-parallel path:
    /// batches dealt to ranks in turn; every rank makes the same number of
    /// passes (ZeRO-3 gathers weights in each).
    fn zero_eval(&mut self, ds: &Dataset) -> Result<(f64, usize)> {
        let bs = self.args.per_device_eval_batch_size;
        let (rank, world) = (self.engine.rank(), self.engine.world_size());
        let n_batches = ds.len().div_ceil(bs);
        let (mut sum, mut count) = (0f64, 0usize);
        for i in (0..n_batches.div_ceil(world)).map(|j| j * world + rank) {
            let engine = super::data_parallel::zero_mut(&mut self.engine)?;
            if i >= n_batches {
                engine.skip_forward(&self.model)?;
                continue;
            }
            let start = i * bs;
            let idx: Vec<usize> = (start..(start + bs).min(ds.len())).collect();
            let b = self.batch_of(ds, &idx)?;
            let dev = self.model.device().clone();
            let (engine, model) = (
                super::data_parallel::zero_mut(&mut self.engine)?,
                &self.model,
            );
            let (s, n) =
                batch_loss_sum(&b, &dev, |ids, mask| Ok(engine.forward(model, ids, mask)?))?;
            sum += s;
            count += n;
        }
        Ok((sum, count))
    }

    /// `trainer.evaluate()` on the eval dataset; logged into `log_history`.
    pub fn evaluate(&mut self) -> Result<Option<EvalMetrics>> {
        let Some(ds) = self.eval_dataset.clone() else {
            return Ok(None);
        };
        let t = Instant::now();
        let m = self.evaluate_dataset(&ds)?;
        let secs = t.elapsed().as_secs_f64();
        let mut e = LogEntry::new();
        e.insert("eval_loss".into(), num(m.eval_loss));
        e.insert("eval_perplexity".into(), num(m.perplexity));
        e.insert("eval_bits_per_byte".into(), num(m.bits_per_byte));
        e.insert("eval_runtime".into(), num(secs));
        e.insert(
            "eval_samples_per_second".into(),
            num(ds.len() as f64 / secs),
        );
        let steps = ds.len().div_ceil(self.args.per_device_eval_batch_size);
        e.insert("eval_steps_per_second".into(), num(steps as f64 / secs));
        e.insert("epoch".into(), num(self.state.epoch));
        e.insert("step".into(), json!(self.state.global_step));
        if self.verbose && self.is_world_process_zero() {
            eprintln!(
                "step {}: eval_loss {:.4}, perplexity {:.2}, bits/byte {:.3}",
                self.state.global_step, m.eval_loss, m.perplexity, m.bits_per_byte
            );
        }
        self.state.log_history.push(e);
        self.last_eval = Some((self.state.global_step, m));
        Ok(Some(m))
    }

    /// The evaluation of the weights as they are now: the one `train()`
    /// made at its last step when it made one, else a new one (not logged).
    pub fn final_evaluation(&mut self) -> Result<Option<EvalMetrics>> {
        match &self.last_eval {
            Some((step, m)) if *step == self.state.global_step => Ok(Some(*m)),
            _ => self
                .eval_dataset
                .clone()
                .map(|ds| self.evaluate_dataset(&ds))
                .transpose(),
        }
    }
}
