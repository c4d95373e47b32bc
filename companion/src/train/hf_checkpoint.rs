//! transformers' Trainer's PyTorch files in `checkpoint-N/`, the one copy of
//! the optimizer's state a checkpoint without DeepSpeed holds (resume reads
//! it back, here and in Python): `optimizer.pt`, the state dict of
//! `torch.optim.AdamW` with the two parameter groups `Trainer` builds
//! (decay first, then no decay, each in `named_parameters()` order,
//! parameters numbered across both), and `scheduler.pt`, the state dict of
//! the `LambdaLR` its schedules are.

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

/// The parameters in the order of transformers' two AdamW groups (decay
/// first, then no decay, each in `named_parameters()` order), and how many
/// decay.
fn hf_order(cfg: &GPT2Config) -> (Vec<crate::params::ParamSpec>, usize) {
    let specs = Gpt2Params::new(cfg).specs;
    let (decay, rest): (Vec<_>, Vec<_>) = specs.into_iter().partition(|p| p.decay);
    let n = decay.len();
    (decay.into_iter().chain(rest).collect(), n)
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
    let (ordered, n_decay) = hf_order(cfg);
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

/// `scheduler.pt`: `LambdaLR.state_dict()` after `step` scheduler steps,
/// one entry per parameter group (torch saves each lambda's `__dict__`:
/// `{}` for transformers' `functools.partial` schedules).
pub(super) fn scheduler_pt(base_lr: f64, lr_now: f64, step: usize, groups: usize) -> PyValue {
    let each = |x: PyValue| PyValue::List(vec![x; groups]);
    PyValue::Dict(vec![
        (s("base_lrs"), each(PyValue::Float(base_lr))),
        (s("last_epoch"), PyValue::Int(step as i64)),
        (s("_step_count"), PyValue::Int(step as i64 + 1)),
        (s("_is_initial"), PyValue::Bool(false)),
        (s("_get_lr_called_within_step"), PyValue::Bool(false)),
        (s("_last_lr"), each(PyValue::Float(lr_now))),
        (s("lr_lambdas"), each(PyValue::Dict(vec![]))),
    ])
}

/// What `optimizer.pt` holds for a resume: Adam's step and each
/// parameter's moments by name.
pub(super) struct AdamState {
    pub step: u64,
    pub moments: std::collections::HashMap<String, (Vec<f32>, Vec<f32>)>,
}

/// Read `optimizer.pt` as transformers' Trainer (or our own checkpoint)
/// wrote it: two parameter groups, decay then no decay, whose
/// hyperparameters must be this run's (torch's `load_state_dict` would put
/// the file's in place of the run's: refused instead of a silent change).
pub(super) fn read_optimizer_pt(
    path: &std::path::Path,
    cfg: &GPT2Config,
    adam: &AdamWParams,
) -> Result<AdamState> {
    let bad = |msg: String| TrainError::Io {
        path: path.display().to_string(),
        msg,
    };
    let f = crate::torch_file::load(path).map_err(|e| bad(e.to_string()))?;
    let (ordered, n_decay) = hf_order(cfg);
    let groups = f
        .value
        .get("param_groups")
        .and_then(PyValue::items)
        .ok_or_else(|| bad("no param_groups list: not an optimizer state dict".into()))?;
    let sizes: Vec<usize> = groups
        .iter()
        .map(|g| {
            g.get("params")
                .and_then(PyValue::items)
                .map_or(0, |p| p.len())
        })
        .collect();
    if sizes != [n_decay, ordered.len() - n_decay] {
        return Err(bad(format!(
            "param_groups hold {sizes:?} parameters; this model has {} with weight decay and {} \
             without (transformers' Trainer's two groups): was it written for another model?",
            n_decay,
            ordered.len() - n_decay
        )));
    }
    for (g, wd) in groups.iter().zip([adam.weight_decay, 0.0]) {
        let betas: Option<Vec<f64>> = g
            .get("betas")
            .and_then(PyValue::items)
            .and_then(|b| b.iter().map(PyValue::as_float).collect());
        let saved = (
            betas,
            g.get("eps").and_then(PyValue::as_float),
            g.get("weight_decay").and_then(PyValue::as_float),
        );
        let ours = (Some(vec![adam.beta1, adam.beta2]), Some(adam.eps), Some(wd));
        if saved != ours {
            return Err(bad(format!(
                "a parameter group has (betas, eps, weight_decay) = {saved:?}, this run has \
                 {ours:?}: resume with the adam_beta1/adam_beta2/adam_epsilon/weight_decay that \
                 wrote it"
            )));
        }
    }
    let state = f
        .value
        .get("state")
        .and_then(PyValue::pairs)
        .ok_or_else(|| bad("no state dict".into()))?;
    let mut out = AdamState {
        step: 0,
        moments: Default::default(),
    };
    for (i, p) in ordered.iter().enumerate() {
        let st = state
            .iter()
            .find(|(k, _)| k.as_int() == Some(i as i64))
            .map(|(_, v)| v)
            .ok_or_else(|| bad(format!("no state for parameter {i} ({})", p.name)))?;
        let tensor = |key: &str| -> Result<Vec<f32>> {
            match st.get(key) {
                Some(PyValue::Stored(t)) if t.shape == p.shape => {
                    f.f32s(t).map_err(|e| bad(e.to_string()))
                }
                Some(PyValue::Stored(t)) => Err(bad(format!(
                    "state {i} ({}) {key} has shape {:?}, the parameter {:?}",
                    p.name, t.shape, p.shape
                ))),
                _ => Err(bad(format!("state {i} ({}) has no {key} tensor", p.name))),
            }
        };
        let step = match st.get("step") {
            Some(PyValue::Stored(t)) if t.numel() == 1 => {
                f.f32s(t).map_err(|e| bad(e.to_string()))?[0] as f64
            }
            Some(v) => v
                .as_float()
                .ok_or_else(|| bad(format!("state {i} step is not a number")))?,
            None => return Err(bad(format!("state {i} ({}) has no step", p.name))),
        };
        if step < 0.0 || step.fract() != 0.0 || (i > 0 && step as u64 != out.step) {
            return Err(bad(format!(
                "state {i} ({}) is at step {step}, expected a whole number shared by every parameter",
                p.name
            )));
        }
        out.step = step as u64;
        out.moments
            .insert(p.name.clone(), (tensor("exp_avg")?, tensor("exp_avg_sq")?));
    }
    Ok(out)
}

/// `scheduler.pt`'s position: `last_epoch`, the scheduler steps taken.
pub(super) fn read_scheduler_pt(path: &std::path::Path) -> Result<i64> {
    let bad = |msg: String| TrainError::Io {
        path: path.display().to_string(),
        msg,
    };
    let f = crate::torch_file::load(path).map_err(|e| bad(e.to_string()))?;
    f.value
        .get("last_epoch")
        .and_then(PyValue::as_int)
        .ok_or_else(|| bad("no last_epoch: not a learning-rate scheduler's state dict".into()))
}
