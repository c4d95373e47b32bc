//! 3D parallelism: how the ranks of a run are laid out into tensor-,
//! pipeline- and data-parallel groups, as Megatron-LM lays them out
//! (`parallel_state.initialize_model_parallel`, order tp-dp-pp), and those
//! groups made as sub-communicators of the run's communicator.
//!
//! The groups are the first piece of the 3D parallel training the section
//! describes; the tensor- and pipeline-parallel model comes next (issue 29).

mod layout;

pub use layout::{ParallelGroups, ParallelLayout};
