//! DeepSpeed's universal checkpoint: the layout its `ds_to_universal.py`
//! converts a checkpoint into and its `"checkpoint": {"load_universal":
//! true}` loads on any tensor-, pipeline- and data-parallel layout (read in
//! DeepSpeed 0.19.8's `checkpoint/ds_to_universal.py`,
//! `checkpoint/universal_checkpoint.py` and
//! `runtime/base_optimizer.py::load_hp_checkpoint_state_from_checkpoint_dir`):
//!
//! - `mp_rank_00_model_states.pt`, as a ZeRO run writes it (the weights);
//! - `zero/optimizer_state.pt`: the optimizer's global state (loss scaler,
//!   clipping, version) and its `param_groups`;
//! - per parameter, by its name, `zero/<name>/fp32.pt`, `exp_avg.pt` and
//!   `exp_avg_sq.pt` (each `{"param": the whole tensor}`) and `step.pt`;
//! - `latest_universal` beside the folder, naming it.
//!
//! A tensor- or pipeline-parallel run writes it under `--deepspeed`: the
//! whole state by name, which DeepSpeed loads on another layout without a
//! conversion step, and which a resume here cuts for any layout.

use std::path::Path;

use super::files::{bad, open, s, DS_VERSION};
use super::read::{step_of, GroupHyper};
use super::write::{param_group, step_value, AdamInfo, Grouping};
use crate::torch_file::{PyValue, TorchTensor};
use crate::zero::error::Result;
use crate::zero::layout::FlatLayout;
use crate::zero::state::FlatState;

/// The file beside the tag folders that names the universal one.
pub const LATEST_UNIVERSAL: &str = "latest_universal";

/// The names of a parameter's state files, with what each holds.
const STATES: [(&str, usize); 3] = [("fp32", 0), ("exp_avg", 1), ("exp_avg_sq", 2)];

/// The files of the folder (paths relative to it) but the model states:
/// `zero/optimizer_state.pt` and each parameter's state, from the whole
/// state `full` (ZeRO stage ≤ 2's global state; `stage` as the run had it).
pub fn universal_files(
    layout: &FlatLayout,
    grouping: &Grouping,
    stage: u8,
    full: &FlatState,
    adam: &AdamInfo,
) -> Vec<(String, PyValue)> {
    let n = grouping.groups.len();
    let groups = (0..n).map(|g| param_group(grouping, g, adam)).collect();
    let global = PyValue::Dict(vec![
        (s("zero_stage"), PyValue::Int(stage as i64)),
        (s("loss_scaler"), adam.loss_scaler.clone()),
        (
            s("dynamic_loss_scale"),
            PyValue::Bool(adam.dynamic_loss_scale),
        ),
        (s("overflow"), PyValue::Bool(false)),
        (s("clip_grad"), PyValue::Float(adam.clip)),
        (s("ds_version"), s(DS_VERSION)),
        (s("param_groups"), PyValue::List(groups)),
    ]);
    let mut files = vec![("zero/optimizer_state.pt".to_string(), global)];
    for i in 0..layout.params.len() {
        let (name, shape, r) = (layout.name(i), layout.shape(i), layout.range(i));
        for (file, k) in STATES {
            let v = [&full.fp32, &full.m, &full.v][k];
            let t = TorchTensor::f32(shape.to_vec(), &v[r.clone()]);
            files.push((
                format!("zero/{name}/{file}.pt"),
                PyValue::Dict(vec![(s("param"), PyValue::Tensor(t))]),
            ));
        }
        // DeepSpeed puts it into the optimizer's state as it is: the type
        // that optimizer keeps (ds_to_universal copies it from there).
        files.push((format!("zero/{name}/step.pt"), step_value(grouping, adam)));
    }
    files
}

/// A universal folder read back for the model a layout describes.
#[derive(Debug)]
pub struct Universal {
    pub state: FlatState,
    /// Adam's step.
    pub step: u64,
    /// The saved parameter groups' hyperparameters.
    pub groups: Vec<GroupHyper>,
    /// The loss scaler DeepSpeed pickled (its attributes), if any.
    pub loss_scaler: Option<PyValue>,
}

/// What a universal folder holds for the model `layout` describes.
pub fn read_universal(dir: &Path, layout: &FlatLayout) -> Result<Universal> {
    let zero = dir.join("zero");
    let global_file = zero.join("optimizer_state.pt");
    let global = open(&global_file)?;
    let groups: Vec<GroupHyper> = global
        .value
        .get("param_groups")
        .and_then(PyValue::items)
        .map(|gs| gs.iter().map(GroupHyper::of).collect())
        .ok_or_else(|| bad(&global_file, "expected a list param_groups"))?;
    let loss_scaler = global.value.get("loss_scaler").cloned();
    let n = layout.numel;
    let mut st = FlatState {
        fp32: vec![0.0; n],
        m: vec![0.0; n],
        v: vec![0.0; n],
    };
    let mut step = None;
    for i in 0..layout.params.len() {
        let (name, shape, r) = (layout.name(i), layout.shape(i), layout.range(i));
        let folder = zero.join(name);
        for (file, k) in STATES {
            let path = folder.join(format!("{file}.pt"));
            let f = open(&path)?;
            let Some(PyValue::Stored(t)) = f.value.get("param") else {
                return Err(bad(&path, "expected {\"param\": a tensor}"));
            };
            if t.shape != shape {
                return Err(bad(
                    &path,
                    format!("{name} has shape {:?}, the model's is {shape:?}", t.shape),
                ));
            }
            let out = match k {
                0 => &mut st.fp32,
                1 => &mut st.m,
                _ => &mut st.v,
            };
            out[r.clone()].copy_from_slice(&f.f32s(t).map_err(|e| bad(&path, e))?);
        }
        let path = folder.join("step.pt");
        let f = open(&path)?;
        let s = step_of(&f, Some(&f.value))?
            .ok_or_else(|| bad(&path, "expected Adam's step (an int or a scalar tensor)"))?;
        match step {
            Some(x) if x != s => {
                return Err(bad(&path, format!("step {s}, another parameter's is {x}")))
            }
            _ => step = Some(s),
        }
    }
    let step = step.ok_or_else(|| bad(dir, "a model without parameters"))?;
    Ok(Universal {
        state: st,
        step,
        groups,
        loss_scaler,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::torch_file::to_bytes;

    /// Written and read back: the same state and step, each parameter by
    /// name; a parameter of another shape is refused naming its file.
    #[test]
    fn a_universal_folder_round_trips() {
        let mut cfg = crate::config::GPT2Config::preset("gpt2").unwrap();
        (
            cfg.vocab_size,
            cfg.n_positions,
            cfg.n_embd,
            cfg.n_layer,
            cfg.n_head,
        ) = (11, 4, 8, 1, 2);
        let layout = FlatLayout::new(&cfg, 2);
        let n = layout.numel;
        let full = FlatState {
            fp32: (0..n).map(|i| i as f32 * 0.5).collect(),
            m: (0..n).map(|i| -(i as f32)).collect(),
            v: (0..n).map(|i| i as f32 * 0.25).collect(),
        };
        for hf in [true, false] {
            let grouping = Grouping::new(&layout, hf, 0.1);
            let adam = AdamInfo {
                step: 7,
                lr: 1e-3,
                base_lr: 2e-3,
                betas: (0.9, 0.95),
                eps: 1e-8,
                clip: 1.0,
                loss_scaler: PyValue::None,
                dynamic_loss_scale: false,
            };
            let dir = tempfile::tempdir().unwrap();
            let files = universal_files(&layout, &grouping, 1, &full, &adam);
            assert_eq!(files.len(), 1 + 4 * layout.params.len());
            for (name, v) in &files {
                let p = dir.path().join(name);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, to_bytes(v).unwrap()).unwrap();
            }
            let got = read_universal(dir.path(), &layout).unwrap();
            let st = got.state;
            assert_eq!(
                (st.fp32, st.m, st.v, got.step),
                (full.fp32.clone(), full.m.clone(), full.v.clone(), 7)
            );
            assert_eq!(got.groups.len(), if hf { 2 } else { 1 });
            assert_eq!(got.groups[0].betas, (Some(0.9), Some(0.95)));
            // Another model's parameter: refused by name.
            let wte = dir.path().join("zero/transformer.wte.weight/fp32.pt");
            let other = TorchTensor::f32(vec![3, 8], &[0.0; 24]);
            std::fs::write(
                &wte,
                to_bytes(&PyValue::Dict(vec![(s("param"), PyValue::Tensor(other))])).unwrap(),
            )
            .unwrap();
            let err = read_universal(dir.path(), &layout).unwrap_err().to_string();
            assert!(
                err.contains("transformer.wte.weight") && err.contains("[3, 8]"),
                "{err}"
            );
        }
    }
}
