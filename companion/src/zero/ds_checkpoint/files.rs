//! The files' names and the DeepSpeed release whose layout they follow.

use crate::torch_file::{PyValue, TorchTensor};

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
