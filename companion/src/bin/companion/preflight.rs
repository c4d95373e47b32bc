//! What `companion pretrain` checks before any work: every setting that
//! would otherwise fail only after training, the folders it will write,
//! and whether the requested backend exists in this build.

use std::path::Path;
use std::sync::Arc;

use companion::train::TrainingArguments;
use companion::zero::comm::Communicator;

use crate::options::{Backend, PretrainError, PretrainOptions, RankDevice};

pub fn args_error(msg: String) -> PretrainError {
    companion::train::TrainError::Args(msg).into()
}

/// Every setting that would otherwise fail only after training, and every
/// folder the run writes, checked before any work.
pub fn check_before_work(
    opts: &PretrainOptions,
    args: &TrainingArguments,
    out: &Path,
) -> Result<(), PretrainError> {
    args.validate()?;
    let limit = companion::zero::comm::max_ranks_in_process();
    if opts.num_ranks == 0 || opts.num_ranks > limit {
        return Err(args_error(format!(
            "--num-ranks {} (or --num-gpus): give 1 to {limit} ranks",
            opts.num_ranks
        )));
    }
    if out.exists() && !out.is_dir() {
        return Err(args_error(format!(
            "output_dir {} exists and is not a folder",
            out.display()
        )));
    }
    let save = &opts.save_model_dir;
    if save.exists() && !save.is_dir() {
        return Err(args_error(format!(
            "--save-model-dir {} exists and is not a folder",
            save.display()
        )));
    }
    // Folders that cannot be written are found now, not at the first save.
    let probe = |dir: &Path, what: &str| {
        companion::atomic_write::probe_writable(dir)
            .map_err(|e| args_error(format!("{what} {}: cannot write there: {e}", dir.display())))
    };
    probe(out, "output_dir")?;
    match save
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && !save.exists())
    {
        Some(parent) if parent.is_dir() => probe(parent, "the folder of --save-model-dir")?,
        _ if save.is_dir() => probe(save, "--save-model-dir")?,
        _ => {}
    }
    Ok(())
}

/// `--backend nccl` needs GPU ranks and a build that has NCCL; say so
/// before any work.
pub fn check_nccl(opts: &PretrainOptions) -> Result<(), PretrainError> {
    if opts.backend != Backend::Nccl {
        return Ok(());
    }
    if !cfg!(feature = "nccl") {
        return Err(companion::train::TrainError::Args(
            "--backend nccl needs a build with the nccl feature \
             (`cargo build --release --features nccl`, CUDA toolkit and libnccl installed); \
             without it, --num-gpus ranks exchange through host memory (--backend threads)"
                .into(),
        )
        .into());
    }
    if opts.rank_device != RankDevice::Cuda {
        return Err(companion::train::TrainError::Args(
            "--backend nccl runs GPU ranks: use --num-gpus N (CPU ranks use --backend threads)"
                .into(),
        )
        .into());
    }
    Ok(())
}

/// This process's MPI rank when `--backend mpi` asked for one.
pub fn mpi_rank(opts: &PretrainOptions) -> Result<Option<Arc<dyn Communicator>>, PretrainError> {
    if opts.backend != Backend::Mpi {
        return Ok(None);
    }
    if opts.num_ranks > 1 {
        return Err(companion::train::TrainError::Args(
            "with --backend mpi the ranks are the processes `mpirun -np N` starts; drop --num-ranks"
                .into(),
        )
        .into());
    }
    #[cfg(feature = "mpi")]
    {
        Ok(Some(Arc::new(companion::zero::comm::mpi::MpiRank::init()?)))
    }
    #[cfg(not(feature = "mpi"))]
    {
        Err(companion::train::TrainError::Args(
            "--backend mpi: this build has no mpi backend (rebuild with `--features mpi`, which needs \
             an MPI library; ranks in one process: --num-ranks N on CPUs, --num-gpus N on GPUs)"
                .into(),
        )
        .into())
    }
}
