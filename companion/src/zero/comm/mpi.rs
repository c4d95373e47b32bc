//! Ranks as MPI processes (`mpirun -np N …`, one rank per process, on one
//! machine or several): the exchange is `MPI_Allgather` of the sizes, then
//! `MPI_Allgatherv` of the data. Built with the `mpi` feature.

use super::communicator::{CommError, Communicator, Gathered, Result};
use mpi::collective::CommunicatorCollectives;
use mpi::datatype::PartitionMut;
use mpi::topology::Communicator as MpiCommunicator;
use std::sync::Arc;

/// This process's rank in `MPI_COMM_WORLD`; dropping it finalises MPI.
pub struct MpiRank {
    world: mpi::topology::SimpleCommunicator,
    // Declared last: dropped (MPI_Finalize) after the communicator.
    _universe: mpi::environment::Universe,
}

// Collectives are only ever called from the thread that owns the
// Trainer (MPI_THREAD_FUNNELED); the handles themselves are plain ids.
unsafe impl Send for MpiRank {}
unsafe impl Sync for MpiRank {}

impl MpiRank {
    /// `MPI_Init`; fails when MPI is already initialised.
    pub fn init() -> std::result::Result<Self, CommError> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| CommError::Size("MPI was already initialised".into()))?;
        Ok(MpiRank {
            world: universe.world(),
            _universe: universe,
        })
    }
}

impl Communicator for MpiRank {
    fn rank(&self) -> usize {
        MpiCommunicator::rank(&self.world) as usize
    }
    fn world_size(&self) -> usize {
        MpiCommunicator::size(&self.world) as usize
    }
    fn exchange(&self, send: Vec<f32>) -> Result<Gathered> {
        let n = self.world_size();
        let mut counts = vec![0i32; n];
        self.world
            .all_gather_into(&(send.len() as i32), &mut counts[..]);
        let displs: Vec<i32> = counts
            .iter()
            .scan(0, |acc, &c| {
                let d = *acc;
                *acc += c;
                Some(d)
            })
            .collect();
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let mut buf = vec![0f32; total];
        {
            let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(&send[..], &mut part);
        }
        let all = counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| Arc::new(buf[d as usize..(d + c) as usize].to_vec()))
            .collect();
        Ok(Arc::new(all))
    }
    fn abort(&self, why: &str) {
        eprintln!("rank {}: {why}; aborting the MPI job", self.rank());
        MpiCommunicator::abort(&self.world, 1);
    }
}
