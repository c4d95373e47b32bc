//! The files' names, the folder `latest` names, opening a file, and the
//! DeepSpeed release whose layout they follow.

use std::path::{Path, PathBuf};

use crate::torch_file::{PyValue, TorchFile, TorchTensor};
use crate::zero::error::{Result, ZeroError};

/// The DeepSpeed release whose layout these files follow.
pub const DS_VERSION: &str = "0.19.8";

pub(super) fn s(x: &str) -> PyValue {
    PyValue::str(x)
}

pub(super) fn f32s(v: &[f32]) -> PyValue {
    PyValue::Tensor(TorchTensor::f32(vec![v.len()], v))
}

pub fn model_states_name(stage: u8, rank: usize) -> String {
    if stage == 3 {
        format!("zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    } else {
        "mp_rank_00_model_states.pt".into()
    }
}

pub fn optim_states_name(rank: usize) -> String {
    format!("zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
}

pub(super) fn bad(path: &Path, msg: impl std::fmt::Display) -> ZeroError {
    ZeroError::Io {
        path: path.display().to_string(),
        msg: msg.to_string(),
    }
}

pub(super) fn open(path: &Path) -> Result<TorchFile> {
    crate::torch_file::load(path).map_err(|e| bad(path, e))
}

/// The folder `checkpoint/latest` names (DeepSpeed's tag), refusing a
/// name that would leave the checkpoint folder.
pub fn latest_tag_dir(checkpoint: &Path) -> Result<PathBuf> {
    tag_dir(checkpoint, "latest")
}

/// The folder the file `checkpoint/latest` (`latest` or
/// `latest_universal`) names, as [`latest_tag_dir`].
pub fn tag_dir(checkpoint: &Path, latest: &str) -> Result<PathBuf> {
    let latest = checkpoint.join(latest);
    let tag = std::fs::read_to_string(&latest).map_err(|e| bad(&latest, e))?;
    let tag = tag.trim();
    if tag.is_empty() || tag.contains(['/', '\\']) || tag == "." || tag == ".." {
        return Err(bad(
            &latest,
            format!("expected a folder name like global_step2, got {tag:?}"),
        ));
    }
    Ok(checkpoint.join(tag))
}
