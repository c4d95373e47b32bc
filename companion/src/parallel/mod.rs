//! 3D parallelism: how the ranks of a run are laid out into tensor-,
//! pipeline- and data-parallel groups, as Megatron-LM lays them out
//! (`parallel_state.initialize_model_parallel`, order tp-dp-pp), and those
//! groups made as sub-communicators of the run's communicator.
//!
//! Here so far: the groups; GPT-2 split by tensor parallelism (`tensor`,
//! with Megatron's conjugate collectives in `collective_ops`) checked
//! against the whole model on one rank; AdamW over the shards
//! (`optimizer`, ZeRO-1 over the data-parallel group); pipeline stages run
//! in 1F1B order (`pipeline`); the three composed (`three_d`), checked
//! against one rank, with each group's traffic counted against the papers'
//! formulas (`traffic`). The 4.3.3 notebook runs them; the Trainer, the
//! command line and checkpoints do not use them yet.

mod collective_ops;
mod layout;
pub mod optimizer;
pub mod pipeline;
pub mod stages;
pub mod tensor;
pub mod three_d;
pub mod traffic;

pub use layout::{Coords, ParallelGroups, ParallelLayout};
pub use optimizer::ShardOptimizer;
pub use tensor::TensorParallelGpt2;
pub use three_d::{ParallelTrainer, StepOutput};
