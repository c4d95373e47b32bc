//! Reading: every rank's files opened, each parameter's weights and
//! moments gathered from the partitions by name, for a resume or for
//! `zero-to-fp32` (one tensor at a time).

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::files::{bad, model_states_name, open, optim_states_name};
use crate::torch_file::{PyValue, StoredTensor, TorchFile};
use crate::zero::error::{Result, ZeroError};
use crate::zero::layout::{intersect, FlatLayout};
use crate::zero::state::FlatState;

/// Which of a parameter's flat vectors to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Fp32,
    ExpAvg,
    ExpAvgSq,
}

/// One parameter as the checkpoint records it: name, shape, and where its
/// elements are (group and offset for stages ≤ 2, per-rank offset for 3).
#[derive(Debug, Clone)]
pub struct DsParam {
    pub name: String,
    pub shape: Vec<usize>,
    group: usize,
    offset: usize,
}

impl DsParam {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parameter group's Adam hyperparameters as a checkpoint saved them.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupHyper {
    pub betas: (Option<f64>, Option<f64>),
    pub eps: Option<f64>,
    pub weight_decay: Option<f64>,
}

/// An opened `global_stepN/` folder.
pub struct DsCheckpoint {
    pub dir: PathBuf,
    pub stage: u8,
    pub world: usize,
    pub params: Vec<DsParam>,
    /// (name, name it is tied to).
    pub shared: Vec<(String, String)>,
    /// Adam's step.
    pub step: u64,
    /// Steps an fp16 overflow skipped (`model_states`' `skipped_steps`).
    pub skipped_steps: Option<u64>,
    /// Each parameter group's hyperparameters, as saved.
    pub groups: Vec<GroupHyper>,
    /// The loss scaler DeepSpeed pickled (its attributes), if any.
    pub loss_scaler: Option<PyValue>,
    /// Rank → its optimizer file.
    optim: Vec<TorchFile>,
}

impl GroupHyper {
    /// A saved parameter group's (a `param_groups` entry's) hyperparameters.
    pub(super) fn of(g: &PyValue) -> Self {
        let f = |k: &str| g.get(k).and_then(PyValue::as_float);
        let betas = g.get("betas").and_then(PyValue::items);
        let b = |i: usize| betas.and_then(|b| b.get(i)).and_then(PyValue::as_float);
        GroupHyper {
            betas: (b(0), b(1)),
            eps: f("eps"),
            weight_decay: f("weight_decay"),
        }
    }
}

/// Adam's step as an optimizer state saves it in `file`: an int
/// (DeepSpeed's Adam) or a scalar tensor (torch's AdamW).
pub(super) fn step_of(file: &TorchFile, v: Option<&PyValue>) -> Result<Option<u64>> {
    Ok(match v {
        Some(PyValue::Stored(t)) => file
            .f32s(t)
            .map_err(|e| bad(&file.path, e))?
            .first()
            .map(|x| *x as u64),
        Some(v) => v.as_int().map(|x| x.max(0) as u64),
        None => None,
    })
}

impl DsCheckpoint {
    /// Open the files of `dir` (a `global_stepN` folder).
    pub fn open(dir: &Path) -> Result<Self> {
        let mut optim = Vec::new();
        while dir.join(optim_states_name(optim.len())).is_file() {
            optim.push(open(&dir.join(optim_states_name(optim.len())))?);
        }
        let Some(first) = optim.first() else {
            return Err(bad(
                dir,
                format!(
                    "no {} (a DeepSpeed checkpoint's optimizer states)",
                    optim_states_name(0)
                ),
            ));
        };
        let sd = |f: &TorchFile| f.value.get("optimizer_state_dict").cloned();
        let first_sd = sd(first).ok_or_else(|| {
            bad(
                &first.path,
                "no optimizer_state_dict: not a ZeRO checkpoint",
            )
        })?;
        let stage = first_sd
            .get("zero_stage")
            .and_then(PyValue::as_int)
            .filter(|s| (0..=3).contains(s))
            .ok_or_else(|| bad(&first.path, "zero_stage: expected 0, 1, 2 or 3"))?
            as u8;
        let count = first_sd.get("partition_count").map(|p| match p.items() {
            Some(v) => v.iter().filter_map(PyValue::as_int).max(),
            None => p.as_int(),
        });
        let world = optim.len();
        match count.flatten() {
            Some(n) if n == world as i64 => {}
            Some(n) => {
                return Err(bad(
                    dir,
                    format!(
                        "partition_count says {n} ranks, but {world} *_optim_states.pt files are \
                         here (zero_pp_rank_0… upward): a rank's file is missing, or another \
                         run's is mixed in"
                    ),
                ))
            }
            None => {
                return Err(bad(
                    &first.path,
                    "no partition_count: not a ZeRO checkpoint",
                ))
            }
        }
        let model_file = dir.join(model_states_name(stage, 0));
        let model = open(&model_file)?;
        let shapes = model
            .value
            .get("param_shapes")
            .and_then(PyValue::items)
            .ok_or_else(|| {
                bad(
                    &model_file,
                    "no param_shapes: not a DeepSpeed model states file",
                )
            })?;
        let paddings = first_sd
            .get("param_alignment_paddings")
            .and_then(PyValue::items);
        let mut params = Vec::new();
        let mut stage3_offset = 0usize;
        for (g, group) in shapes.iter().enumerate() {
            let pairs = group
                .pairs()
                .ok_or_else(|| bad(&model_file, "param_shapes: expected dicts"))?;
            let mut offset = 0usize;
            for (j, (k, v)) in pairs.iter().enumerate() {
                let PyValue::Str(name) = k else {
                    return Err(bad(
                        &model_file,
                        "param_shapes: a name that is not a string",
                    ));
                };
                let dims = match v {
                    PyValue::Reduce { args, .. } if args.len() == 1 => args[0].items(),
                    other => other.items(),
                };
                let shape: Option<Vec<usize>> = dims.and_then(|d| {
                    d.iter()
                        .map(|x| x.as_int().and_then(|i| usize::try_from(i).ok()))
                        .collect()
                });
                let shape = shape.ok_or_else(|| {
                    bad(
                        &model_file,
                        format!("param_shapes[{name}]: expected a torch.Size"),
                    )
                })?;
                let n = shape
                    .iter()
                    .try_fold(1usize, |a, &d| a.checked_mul(d))
                    .ok_or_else(|| {
                        bad(
                            &model_file,
                            format!("param_shapes[{name}]: {shape:?} overflows"),
                        )
                    })?;
                let p = if stage == 3 {
                    let at = stage3_offset;
                    stage3_offset = stage3_offset.saturating_add(n.div_ceil(world));
                    DsParam {
                        name: name.clone(),
                        shape,
                        group: 0,
                        offset: at,
                    }
                } else {
                    let at = offset;
                    offset = offset.saturating_add(n);
                    if let Some(pad) = paddings
                        .and_then(|p| p.get(g))
                        .and_then(PyValue::items)
                        .and_then(|p| p.get(j))
                        .and_then(PyValue::as_int)
                    {
                        offset = offset.saturating_add(pad.max(0) as usize);
                    }
                    DsParam {
                        name: name.clone(),
                        shape,
                        group: g,
                        offset: at,
                    }
                };
                params.push(p);
            }
        }
        let shared = model
            .value
            .get("shared_params")
            .and_then(PyValue::pairs)
            .map(|kv| {
                kv.iter()
                    .filter_map(|(k, v)| match (k, v) {
                        (PyValue::Str(a), PyValue::Str(b)) => Some((a.clone(), b.clone())),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let adam = if stage == 3 {
            "optimizer_state_dict"
        } else {
            "base_optimizer_state"
        };
        let state0 = first_sd
            .get(adam)
            .and_then(|a| a.get("state"))
            .and_then(PyValue::pairs)
            .and_then(|s| s.first())
            .map(|(_, v)| v.clone());
        let step = step_of(first, state0.as_ref().and_then(|s| s.get("step")))?
        .ok_or_else(|| bad(&first.path, format!("{adam}: no Adam state with a step (an elastic checkpoint, or one written before the first step?)")))?;
        let loss_scaler = first_sd.get("loss_scaler").cloned();
        let groups = first_sd
            .get(adam)
            .and_then(|a| a.get("param_groups"))
            .and_then(PyValue::items)
            .map(|gs| gs.iter().map(GroupHyper::of).collect())
            .unwrap_or_default();
        let skipped_steps = model
            .value
            .get("skipped_steps")
            .and_then(PyValue::as_int)
            .map(|x| x.max(0) as u64);
        let ck = DsCheckpoint {
            dir: dir.to_path_buf(),
            stage,
            world,
            params,
            shared,
            step,
            skipped_steps,
            groups,
            loss_scaler,
            optim,
        };
        ck.check_sizes()?;
        Ok(ck)
    }

    /// Every parameter lies inside the ranks' partitions, and the moments
    /// have the weights' sizes: checked from the files' shapes before
    /// anything is allocated for them.
    fn check_sizes(&self) -> Result<()> {
        let len = |r: usize, which: Which, g: usize| -> Result<usize> {
            Ok(self
                .segments(r, which, g)?
                .iter()
                .map(StoredTensor::numel)
                .sum())
        };
        let groups = self
            .params
            .iter()
            .map(|p| p.group)
            .max()
            .map_or(0, |g| g + 1);
        for r in 0..self.world {
            for g in 0..groups.max(1) {
                let g = if self.stage == 3 { 0 } else { g };
                let n = len(r, Which::Fp32, g)?;
                for which in [Which::ExpAvg, Which::ExpAvgSq] {
                    if len(r, which, g)? != n {
                        return Err(bad(
                            &self.optim[r].path,
                            format!(
                                "its {which:?} has another size than its weights ({n} elements)"
                            ),
                        ));
                    }
                }
            }
        }
        for p in &self.params {
            let (need, have) = if self.stage == 3 {
                (
                    p.offset.saturating_add(p.numel().div_ceil(self.world)),
                    len(0, Which::Fp32, 0)?,
                )
            } else {
                let total: usize = (0..self.world)
                    .map(|r| len(r, Which::Fp32, p.group))
                    .sum::<Result<usize>>()?;
                (p.offset.saturating_add(p.numel()), total)
            };
            if need > have {
                return Err(bad(
                    &self.dir,
                    format!(
                        "{} {:?} needs {need} elements of the ranks' partitions, they hold {have}",
                        p.name, p.shape
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The stored tensors that make up rank `r`'s flat vector `which` of
    /// parameter group `g` (stage 3: all sub-groups, concatenated).
    fn segments(&self, r: usize, which: Which, g: usize) -> Result<Vec<StoredTensor>> {
        let f = &self.optim[r];
        let sd = f.value.get("optimizer_state_dict");
        let list = |v: Option<&PyValue>| -> Option<Vec<StoredTensor>> {
            v?.items()?
                .iter()
                .map(|x| match x {
                    PyValue::Stored(t) => Some(t.clone()),
                    _ => None,
                })
                .collect()
        };
        let adam = if self.stage == 3 {
            "optimizer_state_dict"
        } else {
            "base_optimizer_state"
        };
        let segs = match which {
            Which::Fp32 => {
                let key = if self.stage == 3 {
                    "fp32_flat_groups"
                } else {
                    "single_partition_of_fp32_groups"
                };
                list(sd.and_then(|s| s.get(key)))
            }
            Which::ExpAvg | Which::ExpAvgSq => {
                let key = if which == Which::ExpAvg {
                    "exp_avg"
                } else {
                    "exp_avg_sq"
                };
                sd.and_then(|s| s.get(adam))
                    .and_then(|a| a.get("state"))
                    .and_then(PyValue::pairs)
                    .map(|st| {
                        st.iter()
                            .filter_map(|(_, v)| match v.get(key) {
                                Some(PyValue::Stored(t)) => Some(t.clone()),
                                _ => None,
                            })
                            .collect()
                    })
            }
        };
        let segs = segs.ok_or_else(|| {
            bad(
                &f.path,
                format!("no {which:?} tensors in the rank's optimizer state"),
            )
        })?;
        Ok(if self.stage == 3 {
            segs
        } else {
            segs.get(g).cloned().into_iter().collect()
        })
    }

    /// Elements `range` of rank `r`'s flat vector (its segments end to end).
    fn rank_range(&self, r: usize, segs: &[StoredTensor], range: Range<usize>) -> Result<Vec<f32>> {
        let f = &self.optim[r];
        let mut out = Vec::with_capacity(range.len());
        let mut at = 0;
        for t in segs {
            let x = intersect(&range, &(at..at + t.numel()));
            if !x.is_empty() {
                out.extend(
                    f.f32_range(t, x.start - at..x.end - at)
                        .map_err(|e| bad(&f.path, e))?,
                );
            }
            at += t.numel();
        }
        if out.len() != range.len() {
            return Err(bad(
                &f.path,
                format!(
                    "a flat partition of {at} elements ends before element {}",
                    range.end
                ),
            ));
        }
        Ok(out)
    }

    /// One parameter's whole vector `which`, gathered from the ranks.
    pub fn param(&self, p: &DsParam, which: Which) -> Result<Vec<f32>> {
        let n = p.numel();
        let mut out = Vec::with_capacity(n);
        if self.stage == 3 {
            let piece = n.div_ceil(self.world);
            for r in 0..self.world {
                let segs = self.segments(r, which, 0)?;
                out.extend(self.rank_range(r, &segs, p.offset..p.offset + piece)?);
            }
            out.truncate(n);
        } else {
            let want = p.offset..p.offset + n;
            let mut at = 0;
            for r in 0..self.world {
                let segs = self.segments(r, which, p.group)?;
                let len: usize = segs.iter().map(StoredTensor::numel).sum();
                let x = intersect(&want, &(at..at + len));
                if !x.is_empty() {
                    out.extend(self.rank_range(r, &segs, x.start - at..x.end - at)?);
                }
                at += len;
            }
        }
        if out.len() != n {
            return Err(bad(
                &self.dir,
                format!(
                    "{}: found {} of its {n} elements in the ranks' partitions",
                    p.name,
                    out.len()
                ),
            ));
        }
        Ok(out)
    }

    /// The whole model's state in our flat layout (parameters matched by
    /// name, shapes checked).
    pub fn full_state(&self, layout: &FlatLayout) -> Result<FlatState> {
        let n = layout.numel;
        let mut st = FlatState {
            fp32: vec![0.0; n],
            m: vec![0.0; n],
            v: vec![0.0; n],
        };
        for i in 0..layout.params.len() {
            let name = layout.name(i);
            let p = self.params.iter().find(|p| p.name == name).ok_or_else(|| {
                bad(
                    &self.dir,
                    format!("param_shapes has no {name}: written for another model"),
                )
            })?;
            if p.shape != layout.shape(i) {
                return Err(bad(
                    &self.dir,
                    format!(
                        "{name} has shape {:?} here, {:?} in this model",
                        p.shape,
                        layout.shape(i)
                    ),
                ));
            }
            let r = layout.range(i);
            st.fp32[r.clone()].copy_from_slice(&self.param(p, Which::Fp32)?);
            st.m[r.clone()].copy_from_slice(&self.param(p, Which::ExpAvg)?);
            st.v[r].copy_from_slice(&self.param(p, Which::ExpAvgSq)?);
        }
        if self.params.len() != layout.params.len() {
            return Err(bad(
                &self.dir,
                format!(
                    "{} parameters here, {} in this model",
                    self.params.len(),
                    layout.params.len()
                ),
            ));
        }
        Ok(st)
    }
}

/// A parameter's fp32 weights, read from the ranks' partitions only when
/// the safetensors writer asks for them (one tensor in memory at a time).
struct LazyParam<'a> {
    ck: &'a DsCheckpoint,
    p: &'a DsParam,
    failed: &'a std::cell::RefCell<Option<ZeroError>>,
}

impl safetensors::View for LazyParam<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.p.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let v = match self.ck.param(self.p, Which::Fp32) {
            Ok(v) => v,
            Err(e) => {
                self.failed.borrow_mut().get_or_insert(e);
                vec![0.0; self.p.numel()]
            }
        };
        std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.p.numel() * 4
    }
}

impl DsCheckpoint {
    /// `zero_to_fp32`: the whole model's fp32 weights in one safetensors
    /// file, each parameter gathered from the ranks as it is written (peak
    /// memory one tensor; DeepSpeed's script holds the model twice). Tied
    /// names (`shared_params`) are left out, as transformers saves them.
    /// Returns the tensors and elements written.
    pub fn write_fp32_safetensors(&self, file: &Path) -> Result<(usize, usize)> {
        let failed = std::cell::RefCell::new(None);
        let tensors: Vec<(String, LazyParam)> = self
            .params
            .iter()
            .filter(|p| !self.shared.iter().any(|(alias, _)| *alias == p.name))
            .map(|p| {
                (
                    p.name.clone(),
                    LazyParam {
                        ck: self,
                        p,
                        failed: &failed,
                    },
                )
            })
            .collect();
        let count = (tensors.len(), tensors.iter().map(|t| t.1.p.numel()).sum());
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(tensors, Some(meta), file).map_err(|e| bad(file, e))?;
        if let Some(e) = failed.into_inner() {
            let _ = std::fs::remove_file(file);
            return Err(e);
        }
        Ok(count)
    }
}
