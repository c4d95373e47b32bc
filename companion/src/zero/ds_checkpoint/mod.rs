//! DeepSpeed's checkpoint files, `global_stepN/`, as DeepSpeed 0.19.8 lays
//! them out (read in its `engine.save_checkpoint`, `stage_1_and_2.py`,
//! `stage3.py` and `zero_to_fp32.py`):
//!
//! - `mp_rank_00_model_states.pt` (stage ≤ 2; under stage 3 every rank
//!   writes `zero_pp_rank_R_mp_rank_00_model_states.pt` with empty
//!   tensors): `module` (the weights), `param_shapes` (one dict of
//!   `torch.Size` per parameter group), `shared_params` (tied weights),
//!   `buffer_names`, the schedule, the step counters, `ds_config`,
//!   `ds_version`;
//! - `zero_pp_rank_R_mp_rank_00_optim_states.pt` per rank: the rank's flat
//!   fp32 weights and Adam moments. Stages 1/2 cut one flat buffer of all
//!   parameters (padded to 2 × world size) into contiguous partitions
//!   (`single_partition_of_fp32_groups`, `base_optimizer_state`); stage 3
//!   cuts each parameter into ⌈n / world⌉-element pieces and a rank holds its
//!   piece of every parameter (`fp32_flat_groups`, `optimizer_state_dict`).
//!
//! Written with DeepSpeed's parameter groups for the run (one when the
//! ds_config names the optimizer, transformers' decay / no-decay groups
//! when its Trainer builds AdamW), cut from the whole state gathered on
//! every rank. Reading accepts any number of groups and any world size, and
//! rebuilds the whole model's state by parameter name, one parameter at a
//! time (so `zero-to-fp32` holds one tensor, not the model).
//!
//! A tensor- or pipeline-parallel run writes DeepSpeed's universal
//! checkpoint instead (`universal`): every parameter's state whole, by
//! name, which loads on any layout.

mod files;
mod read;
mod universal;
mod write;

pub use files::{latest_tag_dir, model_states_name, optim_states_name, tag_dir, DS_VERSION};
pub use read::{DsCheckpoint, DsParam, GroupHyper, Which};
pub use universal::{read_universal, universal_files, Universal, LATEST_UNIVERSAL};
pub use write::{model_states, optim_states, rank_slice, AdamInfo, Grouping, RunInfo};
