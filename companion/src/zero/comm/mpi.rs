//! Ranks as MPI processes (`mpirun -np N …`, one rank per process, on one
//! machine or several): the exchange is `MPI_Allgather` of the sizes, then
//! `MPI_Allgatherv` of the data; sub-groups (tensor-, pipeline- and
//! data-parallel) are `MPI_Comm_split`. Built with the `mpi` feature.

use super::communicator::{CommError, Communicator, Gathered, Result};
use mpi::collective::CommunicatorCollectives;
use mpi::datatype::PartitionMut;
use mpi::topology::{Color, Communicator as MpiCommunicator, SimpleCommunicator};
use std::sync::{Arc, Mutex};

/// This process's rank in `MPI_COMM_WORLD` or in a sub-group split from it;
/// dropping the last of them finalises MPI.
pub struct MpiRank {
    /// Freed (`MPI_Comm_free`, a collective) under `calls` in `drop`.
    comm: std::mem::ManuallyDrop<SimpleCommunicator>,
    /// Every MPI call of the process, on any of its communicators, takes
    /// this lock (MPI_THREAD_SERIALIZED).
    calls: Arc<Mutex<()>>,
    rank: usize,
    size: usize,
    // Declared last: dropped after the communicator (MPI_Comm_free), and
    // MPI_Finalize runs when the last communicator lets go of it.
    universe: Arc<mpi::environment::Universe>,
}

// SAFETY: an MPI communicator handle is a process-wide id that any thread
// may use as long as no two calls overlap, which is what
// MPI_THREAD_SERIALIZED (asked for in `init`) promises; every call takes
// the `calls` mutex shared by all of the process's communicators, so calls
// never overlap whichever thread makes them. The universe is touched only
// when the last communicator is dropped (MPI_Finalize).
unsafe impl Send for MpiRank {}
// SAFETY: as above: shared references reach MPI only through the mutex.
unsafe impl Sync for MpiRank {}

impl Drop for MpiRank {
    fn drop(&mut self) {
        let _serial = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: `comm` is dropped once, here, and not used after.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.comm) };
    }
}

impl MpiRank {
    /// `MPI_Init`; fails when MPI is already initialised.
    pub fn init() -> std::result::Result<Self, CommError> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| CommError::Size("MPI was already initialised".into()))?;
        let world = universe.world();
        Ok(MpiRank {
            rank: MpiCommunicator::rank(&world) as usize,
            size: MpiCommunicator::size(&world) as usize,
            comm: std::mem::ManuallyDrop::new(world),
            calls: Arc::new(Mutex::new(())),
            universe: Arc::new(universe),
        })
    }
}

impl Communicator for MpiRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn exchange(&self, send: Vec<f32>) -> Result<Gathered> {
        let n = self.world_size();
        let _serial = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let world = &*self.comm;
        let mut counts = vec![0i32; n];
        world.all_gather_into(&(send.len() as i32), &mut counts[..]);
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
            world.all_gather_varcount_into(&send[..], &mut part);
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
        match self.calls.try_lock() {
            Ok(_serial) => MpiCommunicator::abort(&*self.comm, 1),
            // Another call is under way on this process: leaving with an
            // error makes mpirun end the whole job just the same.
            Err(_) => std::process::exit(1),
        }
    }

    fn split(&self, color: usize) -> Result<Arc<dyn Communicator>> {
        let c = i32::try_from(color)
            .map_err(|_| CommError::Size(format!("split color {color} is not an MPI color")))?;
        let sub = {
            let _serial = self.calls.lock().unwrap_or_else(|p| p.into_inner());
            self.comm.split_by_color(Color::with_value(c))
        }
        .ok_or_else(|| CommError::Transport("MPI_Comm_split gave no communicator".into()))?;
        Ok(Arc::new(MpiRank {
            rank: MpiCommunicator::rank(&sub) as usize,
            size: MpiCommunicator::size(&sub) as usize,
            comm: std::mem::ManuallyDrop::new(sub),
            calls: self.calls.clone(),
            universe: self.universe.clone(),
        }))
    }
}
