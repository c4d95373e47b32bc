//! The PyTorch files of transformers' `checkpoint-N/`, written beside ours
//! (which stay the source we resume from): `optimizer.pt`, the state dict of
//! `torch.optim.AdamW` with the two parameter groups `Trainer` builds (decay
//! first, then no decay, each in `named_parameters()` order, parameters
//! numbered across both), and `scheduler.pt`, the state dict of the
//! `LambdaLR` its schedules are. With them, Python tools that read a
//! Trainer checkpoint's optimizer and schedule (`Trainer._load_optimizer_and_scheduler`)
//! find them in the files they expect.

use super::error::{Result, TrainError};
use crate::config::GPT2Config;
use crate::optim::adamw::AdamWParams;
use crate::params::Gpt2Params;
use crate::torch_file::{PyValue, TorchTensor};

fn s(x: &str) -> PyValue {
    PyValue::Str(x.into())
}

/// One AdamW parameter group as torch 2.x writes it (`initial_lr` is what
/// `LambdaLR` adds).
fn group(
    lr_now: f64,
    base_lr: f64,
    adam: &AdamWParams,
    weight_decay: f64,
    params: std::ops::Range<usize>,
) -> PyValue {
    PyValue::Dict(vec![
        (s("weight_decay"), PyValue::Float(weight_decay)),
        (s("lr"), PyValue::Float(lr_now)),
        (
            s("betas"),
            PyValue::Tuple(vec![PyValue::Float(adam.beta1), PyValue::Float(adam.beta2)]),
        ),
        (s("eps"), PyValue::Float(adam.eps)),
        (s("amsgrad"), PyValue::Bool(false)),
        (s("maximize"), PyValue::Bool(false)),
        (s("foreach"), PyValue::None),
        (s("capturable"), PyValue::Bool(false)),
        (s("differentiable"), PyValue::Bool(false)),
        (s("fused"), PyValue::None),
        (s("decoupled_weight_decay"), PyValue::Bool(true)),
        (s("initial_lr"), PyValue::Float(base_lr)),
        (
            s("params"),
            PyValue::List(params.map(|i| PyValue::Int(i as i64)).collect()),
        ),
    ])
}

/// `optimizer.pt` from Adam's moments by parameter name; `step` is Adam's
/// step count (torch keeps it per parameter, as a float32 scalar tensor).
pub(super) fn optimizer_pt(
    cfg: &GPT2Config,
    moments: &[(String, Vec<f32>, Vec<f32>)],
    step: u64,
    lr_now: f64,
    base_lr: f64,
    adam: &AdamWParams,
) -> Result<PyValue> {
    let specs = Gpt2Params::new(cfg).specs;
    let ordered: Vec<_> = specs
        .iter()
        .filter(|p| p.decay)
        .chain(specs.iter().filter(|p| !p.decay))
        .collect();
    let n_decay = specs.iter().filter(|p| p.decay).count();
    let mut state = Vec::with_capacity(ordered.len());
    for (i, p) in ordered.iter().enumerate() {
        let (_, m, v) = moments
            .iter()
            .find(|(n, _, _)| *n == p.name)
            .ok_or_else(|| TrainError::Args(format!("optimizer.pt: no moments for {}", p.name)))?;
        let t = |x: &[f32]| PyValue::Tensor(TorchTensor::f32(p.shape.clone(), x));
        state.push((
            PyValue::Int(i as i64),
            PyValue::Dict(vec![
                (
                    s("step"),
                    PyValue::Tensor(TorchTensor::f32(vec![], &[step as f32])),
                ),
                (s("exp_avg"), t(m)),
                (s("exp_avg_sq"), t(v)),
            ]),
        ));
    }
    Ok(PyValue::Dict(vec![
        (s("state"), PyValue::Dict(state)),
        (
            s("param_groups"),
            PyValue::List(vec![
                group(lr_now, base_lr, adam, adam.weight_decay, 0..n_decay),
                group(lr_now, base_lr, adam, 0.0, n_decay..ordered.len()),
            ]),
        ),
    ]))
}

/// `scheduler.pt`: `LambdaLR.state_dict()` after `step` scheduler steps, for
/// the two parameter groups (the lambdas themselves are not saved by torch).
pub(super) fn scheduler_pt(base_lr: f64, lr_now: f64, step: usize) -> PyValue {
    let two = |x: f64| PyValue::List(vec![PyValue::Float(x), PyValue::Float(x)]);
    PyValue::Dict(vec![
        (s("base_lrs"), two(base_lr)),
        (s("last_epoch"), PyValue::Int(step as i64)),
        (s("_step_count"), PyValue::Int(step as i64 + 1)),
        (s("_is_initial"), PyValue::Bool(false)),
        (s("_get_lr_called_within_step"), PyValue::Bool(false)),
        (s("_last_lr"), two(lr_now)),
        (
            s("lr_lambdas"),
            PyValue::List(vec![PyValue::None, PyValue::None]),
        ),
    ])
}
