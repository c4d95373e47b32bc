//! Writing: each rank's `*_optim_states.pt` and the `*_model_states.pt`,
//! cut from the whole model's state in DeepSpeed's layout for the stage.

use super::files::{f32s, s, DS_VERSION};
use crate::torch_file::{PyValue, TorchTensor};
use crate::zero::layout::{intersect, FlatLayout};
use crate::zero::state::FlatState;

/// What `model_states` records beside the weights.
pub struct RunInfo {
    pub stage: u8,
    pub world: usize,
    pub global_steps: u64,
    pub global_samples: u64,
    pub skipped_steps: u64,
    pub lr_scheduler: PyValue,
    /// The resolved ds_config, as a Python dict.
    pub ds_config: PyValue,
}

/// `*_model_states.pt`: `full` is the whole model's fp32 weights (stage ≤ 2;
/// `None` under stage 3, whose module tensors are empty as DeepSpeed's).
pub fn model_states(
    layout: &FlatLayout,
    grouping: &Grouping,
    tied: bool,
    full: Option<&[f32]>,
    run: &RunInfo,
) -> PyValue {
    let mut module = Vec::new();
    let mut shapes = vec![Vec::new(); grouping.groups.len()];
    let group_of = |i: usize| {
        grouping
            .groups
            .iter()
            .position(|g| g.contains(&i))
            .unwrap_or(0)
    };
    for i in 0..layout.params.len() {
        let (name, shape) = (layout.name(i), layout.shape(i));
        let t = match full {
            Some(f) => TorchTensor::f32(shape.to_vec(), &f[layout.range(i)]),
            None => TorchTensor::f32(vec![0], &[]),
        };
        module.push((s(name), PyValue::Tensor(t.clone())));
        if tied && name == "transformer.wte.weight" {
            // state_dict() lists the tied head under its own name.
            module.push((s("lm_head.weight"), PyValue::Tensor(t)));
        }
        let dims = shape.iter().map(|&d| PyValue::Int(d as i64)).collect();
        let size = PyValue::Reduce {
            module: "torch".into(),
            name: "Size".into(),
            args: vec![PyValue::Tuple(dims)],
        };
        shapes[group_of(i)].push((s(name), size));
    }
    let shared = if tied {
        vec![(s("lm_head.weight"), s("transformer.wte.weight"))]
    } else {
        vec![]
    };
    let int = |x: u64| PyValue::Int(x as i64);
    PyValue::Dict(vec![
        (s("module"), PyValue::Dict(module)),
        (s("buffer_names"), PyValue::List(vec![])),
        (s("optimizer"), PyValue::None),
        (
            s("param_shapes"),
            PyValue::List(shapes.into_iter().map(PyValue::Dict).collect()),
        ),
        (s("frozen_param_shapes"), PyValue::Dict(vec![])),
        (s("shared_params"), PyValue::Dict(shared)),
        (s("frozen_param_fragments"), PyValue::Dict(vec![])),
        (s("lr_scheduler"), run.lr_scheduler.clone()),
        (s("data_sampler"), PyValue::None),
        (s("random_ltd"), PyValue::None),
        (s("sparse_tensor_module_names"), PyValue::Dict(vec![])),
        (s("skipped_steps"), int(run.skipped_steps)),
        (s("global_steps"), int(run.global_steps)),
        (s("global_samples"), int(run.global_samples)),
        (s("dp_world_size"), int(run.world as u64)),
        (s("mp_world_size"), PyValue::Int(1)),
        (s("ds_config"), run.ds_config.clone()),
        (s("ds_version"), s(DS_VERSION)),
        (s("written_by"), s("companion")),
    ])
}

/// Adam's hyperparameters and position, as the optimizer state records them.
pub struct AdamInfo {
    pub step: u64,
    pub lr: f64,
    pub base_lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub clip: f64,
    /// DeepSpeed's loss scaler object (`LossScaler` with scale 1 when
    /// there is none, as DeepSpeed writes it).
    pub loss_scaler: PyValue,
    pub dynamic_loss_scale: bool,
}

/// How DeepSpeed groups the parameters: one group when the ds_config names
/// the optimizer (DeepSpeed builds it over all parameters), transformers'
/// decay and no-decay groups when its Trainer builds `torch.optim.AdamW`
/// (DeepSpeed then flattens and partitions each group by itself).
pub struct Grouping {
    /// Parameter indices (layout order) of each group.
    pub groups: Vec<Vec<usize>>,
    pub weight_decay: Vec<f64>,
    /// The groups are `torch.optim.AdamW`'s (its state dict keys), not
    /// DeepSpeed's own optimizer's.
    pub torch_adamw: bool,
}

impl Grouping {
    pub fn new(layout: &FlatLayout, hf_optimizer: bool, weight_decay: f64) -> Self {
        let all = 0..layout.params.len();
        if hf_optimizer {
            let decay = |i: &usize| layout.params.specs[*i].decay;
            Grouping {
                groups: vec![
                    all.clone().filter(decay).collect(),
                    all.filter(|i| !decay(i)).collect(),
                ],
                weight_decay: vec![weight_decay, 0.0],
                torch_adamw: true,
            }
        } else {
            Grouping {
                groups: vec![all.collect()],
                weight_decay: vec![weight_decay],
                torch_adamw: false,
            }
        }
    }
}

/// Rank `rank`'s flat vector of group `g` in the stage's layout, cut from
/// the whole model's flat vector `full`: stage 3 holds its ⌈n / world⌉
/// piece of every parameter; stages 1/2 the rank's contiguous part of the
/// group's parameters end to end, padded to a multiple of 2 × world.
/// Also returns the group's padding (DeepSpeed's `group_paddings`: on the
/// last rank only).
pub fn rank_slice(
    layout: &FlatLayout,
    grouping: &Grouping,
    g: usize,
    stage: u8,
    full: &[f32],
    rank: usize,
) -> (Vec<f32>, usize) {
    let w = layout.world;
    let mut out = Vec::new();
    if stage == 3 {
        for &i in &grouping.groups[g] {
            let r = layout.range(i);
            let piece = r.len().div_ceil(w);
            let mine = intersect(&(r.start + rank * piece..r.start + (rank + 1) * piece), &r);
            out.extend_from_slice(&full[mine.clone()]);
            out.resize(out.len() + piece - mine.len(), 0.0);
        }
        return (out, 0);
    }
    let mut flat = Vec::new();
    for &i in &grouping.groups[g] {
        flat.extend_from_slice(&full[layout.range(i)]);
    }
    let numel = flat.len();
    flat.resize(numel.div_ceil(2 * w) * 2 * w, 0.0);
    let part = flat.len() / w;
    let padding = if rank + 1 == w { flat.len() - numel } else { 0 };
    (flat[rank * part..(rank + 1) * part].to_vec(), padding)
}

/// `zero_pp_rank_R_mp_rank_00_optim_states.pt` for `rank`, cut from the
/// whole model's state `full`.
pub fn optim_states(
    layout: &FlatLayout,
    grouping: &Grouping,
    stage: u8,
    rank: usize,
    full: &FlatState,
    adam: &AdamInfo,
    ds_config: &PyValue,
) -> PyValue {
    let n = grouping.groups.len();
    let (mut fp32, mut states, mut groups, mut paddings) = (vec![], vec![], vec![], vec![]);
    for g in 0..n {
        let cut = |x: &[f32]| rank_slice(layout, grouping, g, stage, x, rank);
        let (p, pad) = cut(&full.fp32);
        let (m, v) = (cut(&full.m).0, cut(&full.v).0);
        fp32.push(f32s(&p));
        paddings.push(PyValue::Int(pad as i64));
        states.push((
            PyValue::Int(g as i64),
            PyValue::Dict(vec![
                (s("step"), step_value(grouping, adam)),
                (s("exp_avg"), f32s(&m)),
                (s("exp_avg_sq"), f32s(&v)),
            ]),
        ));
        groups.push(param_group(grouping, g, adam));
    }
    let adam_state = PyValue::Dict(vec![
        (s("state"), PyValue::Dict(states)),
        (s("param_groups"), PyValue::List(groups)),
    ]);
    let world = layout.world as i64;
    let mut sd = vec![
        (s("zero_stage"), PyValue::Int(stage as i64)),
        (s("loss_scaler"), adam.loss_scaler.clone()),
        (
            s("dynamic_loss_scale"),
            PyValue::Bool(adam.dynamic_loss_scale),
        ),
        (s("overflow"), PyValue::Bool(false)),
    ];
    if stage == 3 {
        sd.push((s("partition_count"), PyValue::Int(world)));
        sd.push((s("optimizer_state_dict"), adam_state));
        sd.push((s("fp32_flat_groups"), PyValue::List(fp32)));
    } else {
        sd.push((s("clip_grad"), PyValue::Float(adam.clip)));
        sd.push((s("base_optimizer_state"), adam_state));
        sd.push((s("single_partition_of_fp32_groups"), PyValue::List(fp32)));
        sd.push((s("group_paddings"), PyValue::List(paddings)));
        sd.push((
            s("partition_count"),
            PyValue::List(vec![PyValue::Int(world); n]),
        ));
    }
    sd.push((s("ds_version"), s(DS_VERSION)));
    PyValue::Dict(vec![
        (s("optimizer_state_dict"), PyValue::Dict(sd)),
        (s("ds_config"), ds_config.clone()),
        (s("ds_version"), s(DS_VERSION)),
    ])
}

/// Adam's step as its optimizer's state keeps it: torch's AdamW as a
/// float32 scalar tensor (it refuses anything else), DeepSpeed's Adams as
/// an int.
pub(super) fn step_value(grouping: &Grouping, adam: &AdamInfo) -> PyValue {
    if grouping.torch_adamw {
        PyValue::Tensor(TorchTensor::f32(vec![], &[adam.step as f32]))
    } else {
        PyValue::Int(adam.step as i64)
    }
}

/// Group `g`'s hyperparameters with the keys its optimizer's state dict
/// has (torch's AdamW, or DeepSpeed's Adam); the group's one flat
/// parameter is numbered `g`.
pub(super) fn param_group(grouping: &Grouping, g: usize, adam: &AdamInfo) -> PyValue {
    let f = PyValue::Float;
    let betas = vec![f(adam.betas.0), f(adam.betas.1)];
    let wd = grouping.weight_decay[g];
    let params = (s("params"), PyValue::List(vec![PyValue::Int(g as i64)]));
    if grouping.torch_adamw {
        PyValue::Dict(vec![
            (s("lr"), f(adam.lr)),
            (s("betas"), PyValue::Tuple(betas)),
            (s("eps"), f(adam.eps)),
            (s("weight_decay"), f(wd)),
            (s("amsgrad"), PyValue::Bool(false)),
            (s("foreach"), PyValue::None),
            (s("maximize"), PyValue::Bool(false)),
            (s("capturable"), PyValue::Bool(false)),
            (s("differentiable"), PyValue::Bool(false)),
            (s("fused"), PyValue::None),
            (s("decoupled_weight_decay"), PyValue::Bool(true)),
            (s("initial_lr"), f(adam.base_lr)),
            params,
        ])
    } else {
        PyValue::Dict(vec![
            (s("lr"), f(adam.lr)),
            (s("bias_correction"), PyValue::Bool(true)),
            (s("betas"), PyValue::List(betas)),
            (s("eps"), f(adam.eps)),
            (s("weight_decay"), f(wd)),
            (s("initial_lr"), f(adam.base_lr)),
            (s("step"), PyValue::Int(0)),
            params,
        ])
    }
}
