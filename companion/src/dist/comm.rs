//! Collective communication between ranks: the five operations ZeRO needs
//! (all-reduce, reduce-scatter, all-gather, broadcast, barrier), over a
//! [`Communicator`] with one backend per transport. Here: a single rank
//! ([`SingleRank`]) and ranks as threads of one process sharing memory
//! ([`InProcessGroup`]), each with its own model replica and device.
//!
//! Every reduction adds the ranks' contributions in rank order, so all ranks
//! get bit-identical results and a run is reproducible.

use std::sync::{Arc, Condvar, Mutex};

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommError {
    /// Another rank failed; this one stops instead of waiting forever.
    #[error("rank {rank} stopped because another rank failed: {why}")]
    Aborted { rank: usize, why: String },
    #[error("collective called with mismatched sizes: {0}")]
    Size(String),
    /// The transport itself failed (NCCL, CUDA).
    #[error("{0}")]
    Transport(String),
}

pub type Result<T> = std::result::Result<T, CommError>;

/// What every rank sent in one exchange, indexed by rank.
pub type Gathered = Arc<Vec<Arc<Vec<f32>>>>;

/// A process group: this rank's view of the collectives.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The transport's one primitive here: every rank contributes a buffer
    /// (any length) and gets everyone's, in rank order.
    fn exchange(&self, send: Vec<f32>) -> Result<Gathered>;
    /// Tell the other ranks this one failed, so none waits forever.
    fn abort(&self, why: &str);

    /// Sum `buf` over all ranks, in place (`dist.all_reduce`).
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let all = self.exchange(buf.to_vec())?;
        check_same_len(&all)?;
        buf.copy_from_slice(&all[0]);
        for other in &all[1..] {
            buf.iter_mut().zip(other.iter()).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    /// Sum of one scalar over all ranks, in f64 (losses, token counts).
    fn all_reduce_f64(&self, x: f64) -> Result<f64> {
        if self.world_size() == 1 {
            return Ok(x);
        }
        // An f64 travels as two f32 bit patterns so it loses nothing.
        let bits = x.to_bits();
        let all = self.exchange(vec![
            f32::from_bits((bits >> 32) as u32),
            f32::from_bits(bits as u32),
        ])?;
        Ok(all
            .iter()
            .map(|v| f64::from_bits(((v[0].to_bits() as u64) << 32) | v[1].to_bits() as u64))
            .sum())
    }

    /// `send` is split into consecutive chunks of `counts[r]` elements; rank
    /// r receives the sum over ranks of chunk r (`dist.reduce_scatter`).
    fn reduce_scatter_sum(&self, send: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        let (r, n) = (self.rank(), self.world_size());
        if counts.len() != n || counts.iter().sum::<usize>() != send.len() {
            return Err(CommError::Size(format!(
                "reduce_scatter of {} elements into counts {counts:?} on {n} ranks",
                send.len()
            )));
        }
        let start: usize = counts[..r].iter().sum();
        let mine = start..start + counts[r];
        if n == 1 {
            return Ok(send.to_vec());
        }
        let all = self.exchange(send.to_vec())?;
        check_same_len(&all)?;
        let mut out = all[0][mine.clone()].to_vec();
        for other in &all[1..] {
            out.iter_mut()
                .zip(&other[mine.clone()])
                .for_each(|(a, b)| *a += b);
        }
        Ok(out)
    }

    /// Every rank's `send` (lengths may differ), concatenated in rank order
    /// (`dist.all_gather`).
    fn all_gather(&self, send: &[f32]) -> Result<Vec<f32>> {
        if self.world_size() == 1 {
            return Ok(send.to_vec());
        }
        let all = self.exchange(send.to_vec())?;
        Ok(all.iter().flat_map(|v| v.iter().copied()).collect())
    }

    /// Replace `buf` with rank `root`'s (`dist.broadcast`).
    fn broadcast(&self, buf: &mut Vec<f32>, root: usize) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let send = if self.rank() == root {
            std::mem::take(buf)
        } else {
            vec![]
        };
        let all = self.exchange(send)?;
        *buf = all[root].to_vec();
        Ok(())
    }

    /// Wait until every rank gets here (`dist.barrier`).
    fn barrier(&self) -> Result<()> {
        if self.world_size() > 1 {
            self.exchange(vec![])?;
        }
        Ok(())
    }
}

fn check_same_len(all: &[Arc<Vec<f32>>]) -> Result<()> {
    if all.iter().any(|v| v.len() != all[0].len()) {
        let lens: Vec<usize> = all.iter().map(|v| v.len()).collect();
        return Err(CommError::Size(format!(
            "ranks sent buffers of different lengths {lens:?}"
        )));
    }
    Ok(())
}

/// World size 1: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn exchange(&self, send: Vec<f32>) -> Result<Gathered> {
        Ok(Arc::new(vec![Arc::new(send)]))
    }
    fn abort(&self, _why: &str) {}
}

#[derive(Default)]
struct Round {
    generation: u64,
    arrived: usize,
    slots: Vec<Option<Arc<Vec<f32>>>>,
    published: Option<Gathered>,
    aborted: Option<String>,
}

/// Ranks as threads of one process: an exchange is a rendezvous on shared
/// memory (no copies beyond the sender's buffer). Make one group with
/// [`InProcessGroup::new`] and hand [`InProcessGroup::rank`] to each thread.
pub struct InProcessGroup {
    world: usize,
    round: Mutex<Round>,
    cv: Condvar,
}

impl InProcessGroup {
    pub fn new(world: usize) -> Arc<Self> {
        assert!(world >= 1, "a group has at least one rank");
        Arc::new(InProcessGroup {
            world,
            round: Mutex::new(Round {
                slots: vec![None; world],
                ..Round::default()
            }),
            cv: Condvar::new(),
        })
    }

    /// The communicator rank `rank` uses.
    pub fn rank(self: &Arc<Self>, rank: usize) -> InProcessRank {
        assert!(rank < self.world);
        InProcessRank {
            group: self.clone(),
            rank,
        }
    }
}

/// One thread's handle on an [`InProcessGroup`].
pub struct InProcessRank {
    group: Arc<InProcessGroup>,
    rank: usize,
}

impl Communicator for InProcessRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.group.world
    }
    fn exchange(&self, send: Vec<f32>) -> Result<Gathered> {
        let g = &self.group;
        let mut r = g.round.lock().unwrap_or_else(|e| e.into_inner());
        let aborted = |r: &Round| {
            r.aborted.clone().map(|why| CommError::Aborted {
                rank: self.rank,
                why,
            })
        };
        if let Some(e) = aborted(&r) {
            return Err(e);
        }
        r.slots[self.rank] = Some(Arc::new(send));
        r.arrived += 1;
        if r.arrived == g.world {
            let all: Vec<Arc<Vec<f32>>> = r
                .slots
                .iter_mut()
                .map(|s| s.take().expect("every rank sent"))
                .collect();
            let all = Arc::new(all);
            r.published = Some(all.clone());
            r.arrived = 0;
            r.generation += 1;
            g.cv.notify_all();
            return Ok(all);
        }
        let gen = r.generation;
        while r.generation == gen {
            if let Some(e) = aborted(&r) {
                return Err(e);
            }
            r = g.cv.wait(r).unwrap_or_else(|e| e.into_inner());
        }
        Ok(r.published.clone().expect("published with the generation"))
    }
    fn abort(&self, why: &str) {
        let mut r = self.group.round.lock().unwrap_or_else(|e| e.into_inner());
        if r.aborted.is_none() {
            r.aborted = Some(format!("rank {}: {why}", self.rank));
        }
        self.group.cv.notify_all();
    }
}

/// Run `f(rank, communicator)` on `world` threads and collect the results in
/// rank order. A rank that fails aborts the group, so the others stop at
/// their next collective instead of hanging; the first real error is returned.
pub fn run_ranks<T, E, F>(world: usize, f: F) -> std::result::Result<Vec<T>, E>
where
    T: Send,
    E: Send + From<CommError> + std::fmt::Display,
    F: Fn(usize, Arc<dyn Communicator>) -> std::result::Result<T, E> + Sync,
{
    let group = InProcessGroup::new(world);
    let make = |r: usize| -> Result<Arc<dyn Communicator>> { Ok(Arc::new(group.rank(r))) };
    run_ranks_with(world, make, |r| group.rank(r).abort("panicked"), f)
}

/// [`run_ranks`] over communicators that `make` builds inside each rank's
/// thread (NCCL's set-up is itself a collective: every rank must be in it
/// at once). `on_panic(r)` tells the others when rank r's thread panics.
///
/// Each rank runs its parallel loops on a rayon pool of its own, with an
/// equal share of the cores: ranks share the machine as DeepSpeed's one
/// process per device does, instead of queueing on one global pool where
/// every rank waits for the others' work (on 2 cores, 2 ranks ran 25%
/// slower than 1 rank doing the same work that way).
///
/// The error returned is the root cause: the first rank that failed (or
/// panicked) before the group was aborted, not the ranks that stopped
/// because of the abort.
pub fn run_ranks_with<T, E, F>(
    world: usize,
    make: impl Fn(usize) -> Result<Arc<dyn Communicator>> + Sync,
    on_panic: impl Fn(usize) + Sync,
    f: F,
) -> std::result::Result<Vec<T>, E>
where
    T: Send,
    E: Send + From<CommError> + std::fmt::Display,
    F: Fn(usize, Arc<dyn Communicator>) -> std::result::Result<T, E> + Sync,
{
    const NONE: usize = usize::MAX;
    let first_failure = std::sync::atomic::AtomicUsize::new(NONE);
    let claim = |r: usize| {
        let _ = first_failure.compare_exchange(
            NONE,
            r,
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        );
    };
    let threads_per_rank = (rayon::current_num_threads() / world.max(1)).max(1);
    let results: Vec<std::result::Result<T, E>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let (f, make, on_panic, claim) = (&f, &make, &on_panic, &claim);
                std::thread::Builder::new()
                    .name(format!("rank{r}"))
                    .spawn_scoped(s, move || {
                        // Unwinding out of this thread aborts the group, so
                        // that ranks waiting in a collective for this one
                        // stop within moments instead of waiting forever.
                        let _guard = AbortOnUnwind(|| {
                            claim(r);
                            on_panic(r);
                        });
                        let comm = make(r)?;
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(threads_per_rank)
                            .thread_name(move |i| format!("rank{r}-worker{i}"))
                            .build()
                            .map_err(|e| {
                                CommError::Transport(format!("rank {r}: thread pool: {e}"))
                            })?;
                        let out = pool.install(|| f(r, comm.clone()));
                        if let Err(e) = &out {
                            claim(r);
                            comm.abort(&e.to_string());
                        }
                        out
                    })
                    .expect("spawn a rank thread")
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(CommError::Aborted {
                        rank: r,
                        why: "the rank's thread panicked".into(),
                    }
                    .into())
                })
            })
            .collect()
    });
    let root = first_failure.load(std::sync::atomic::Ordering::SeqCst);
    let mut out = Vec::with_capacity(world);
    let mut errors: Vec<(usize, E)> = Vec::new();
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(v) => out.push(v),
            Err(e) => errors.push((r, e)),
        }
    }
    if errors.is_empty() {
        return Ok(out);
    }
    let i = errors.iter().position(|(r, _)| *r == root).unwrap_or(0);
    Err(errors.swap_remove(i).1)
}

/// Runs its closure when dropped during a panic.
struct AbortOnUnwind<F: Fn()>(F);

impl<F: Fn()> Drop for AbortOnUnwind<F> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            (self.0)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_on_four_threads() {
        let out = run_ranks::<_, CommError, _>(4, |r, c| {
            let mut a = vec![r as f32, 1.0];
            c.all_reduce_sum(&mut a)?;
            let rs = c.reduce_scatter_sum(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], &[2, 2, 2, 1])?;
            let ag = c.all_gather(&vec![r as f32; r])?;
            let mut b = if r == 2 { vec![9.0, 8.0] } else { vec![] };
            c.broadcast(&mut b, 2)?;
            c.barrier()?;
            let s = c.all_reduce_f64(0.1 * r as f64)?;
            Ok((a, rs, ag, b, s))
        })
        .unwrap();
        for (r, (a, rs, ag, b, s)) in out.into_iter().enumerate() {
            assert_eq!(a, vec![6.0, 4.0]);
            let whole = [4.0, 8.0, 12.0, 16.0, 20.0, 24.0, 28.0];
            let start = 2 * r;
            assert_eq!(
                rs,
                whole[start..(start + if r == 3 { 1 } else { 2 })].to_vec()
            );
            assert_eq!(ag, vec![1.0, 2.0, 2.0, 3.0, 3.0, 3.0]);
            assert_eq!(b, vec![9.0, 8.0]);
            assert_eq!(s, 0.0 + 0.1 + 0.2 + 0.30000000000000004);
        }
    }

    #[test]
    fn a_failing_rank_stops_the_others() {
        let err = run_ranks::<(), CommError, _>(3, |r, c| {
            if r == 1 {
                return Err(CommError::Size("rank 1 broke".into()));
            }
            c.barrier()?;
            c.barrier()?;
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("rank 1 broke"), "{err}");
    }

    #[test]
    fn a_panicking_rank_ends_the_run_with_an_error_naming_it() {
        // Rank 0 waits in a collective for rank 2, which panics: without the
        // abort on unwind, rank 0 would wait forever (joined first).
        let start = std::time::Instant::now();
        let err = run_ranks::<(), CommError, _>(3, |r, c| {
            if r == 2 {
                std::thread::sleep(std::time::Duration::from_millis(50));
                panic!("rank 2 hit a bug");
            }
            c.barrier()?;
            Ok(())
        })
        .unwrap_err();
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        assert!(
            matches!(err, CommError::Aborted { rank: 2, .. }),
            "the root cause is rank 2's panic: {err}"
        );
    }

    #[test]
    fn each_rank_runs_on_its_own_share_of_the_cores() {
        let per_rank = (rayon::current_num_threads() / 2).max(1);
        let seen =
            run_ranks::<usize, CommError, _>(2, |_, _| Ok(rayon::current_num_threads())).unwrap();
        assert_eq!(seen, vec![per_rank, per_rank]);
    }
}

/// Ranks as MPI processes (`mpirun -np N …`, one rank per process, on one
/// machine or several): the exchange is `MPI_Allgather` of the sizes, then
/// `MPI_Allgatherv` of the data. Built with the `mpi` feature.
#[cfg(feature = "mpi")]
pub mod mpi_backend {
    use super::{CommError, Communicator, Gathered, Result};
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
}

/// Ranks on NVIDIA GPUs, one thread of this process per GPU, talking
/// through NCCL (`--num-gpus N --backend nccl`). Buffers go to the rank's
/// GPU, through the NCCL collective, and back: all-reduce and
/// reduce-scatter are NCCL's own; the general exchange is an all-gather of
/// the sizes, then of the buffers padded to the largest. Built with the
/// `nccl` feature (which implies `cuda`).
#[cfg(feature = "nccl")]
pub mod nccl_backend {
    use super::{CommError, Communicator, Gathered, Result};
    use cudarc::driver::CudaStream;
    use cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use std::sync::{Arc, Mutex};

    fn err(what: &str, e: impl std::fmt::Debug) -> CommError {
        CommError::Transport(format!("NCCL {what}: {e:?}"))
    }

    /// The unique id rank 0 makes and every rank joins with.
    pub fn new_id() -> Result<Id> {
        Id::new().map_err(|e| err("id", e))
    }

    /// One rank's NCCL communicator on its GPU.
    pub struct NcclRank {
        comm: Mutex<Comm>,
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
    }

    // SAFETY: an NCCL communicator may be used from any thread as long as
    // calls on it do not overlap; the mutex serialises them.
    unsafe impl Send for NcclRank {}
    unsafe impl Sync for NcclRank {}

    impl NcclRank {
        /// Join the group `id` names as `rank` of `world`, on `device`
        /// (`cuda:rank`). Every rank must call this at the same time.
        pub fn new(
            device: &candle_core::Device,
            rank: usize,
            world: usize,
            id: Id,
        ) -> Result<Self> {
            let candle_core::Device::Cuda(d) = device else {
                return Err(CommError::Transport(format!(
                    "NCCL rank {rank} needs a CUDA device, got {device:?}"
                )));
            };
            let stream = d.cuda_stream();
            let comm =
                Comm::from_rank(stream.clone(), rank, world, id).map_err(|e| err("init", e))?;
            Ok(NcclRank {
                comm: Mutex::new(comm),
                stream,
                rank,
                world,
            })
        }

        /// All-gather of equal-length buffers, on the host side.
        fn gather_equal<T>(&self, send: &[T]) -> Result<Vec<T>>
        where
            T: cudarc::driver::DeviceRepr
                + cudarc::driver::ValidAsZeroBits
                + cudarc::nccl::safe::NcclType
                + Clone
                + Default,
        {
            let s = &self.stream;
            let src = s.clone_htod(send).map_err(|e| err("upload", e))?;
            let mut dst = s
                .alloc_zeros::<T>(send.len() * self.world)
                .map_err(|e| err("alloc", e))?;
            self.comm
                .lock()
                .expect("nccl comm")
                .all_gather(&src, &mut dst)
                .map_err(|e| err("all_gather", e))?;
            s.clone_dtoh(&dst).map_err(|e| err("download", e))
        }
    }

    impl Communicator for NcclRank {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world_size(&self) -> usize {
            self.world
        }

        fn exchange(&self, send: Vec<f32>) -> Result<Gathered> {
            let lens = self.gather_equal(&[send.len() as u64])?;
            let max = lens.iter().copied().max().unwrap_or(0) as usize;
            let mut padded = send;
            padded.resize(max, 0.0);
            let all = self.gather_equal(&padded)?;
            Ok(Arc::new(
                lens.iter()
                    .enumerate()
                    .map(|(r, &n)| Arc::new(all[r * max..r * max + n as usize].to_vec()))
                    .collect(),
            ))
        }

        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
            if self.world == 1 {
                return Ok(());
            }
            let s = &self.stream;
            let mut dev = s.clone_htod(&*buf).map_err(|e| err("upload", e))?;
            self.comm
                .lock()
                .expect("nccl comm")
                .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
                .map_err(|e| err("all_reduce", e))?;
            s.memcpy_dtoh(&dev, buf).map_err(|e| err("download", e))
        }

        fn reduce_scatter_sum(&self, send: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
            let equal = counts.len() == self.world
                && counts.iter().all(|&c| c == counts[0])
                && counts.iter().sum::<usize>() == send.len();
            if !equal || self.world == 1 {
                // Uneven chunks: the general path over `exchange`.
                let all = self.exchange(send.to_vec())?;
                let start: usize = counts[..self.rank.min(counts.len())].iter().sum();
                let n = counts.get(self.rank).copied().unwrap_or(0);
                let mut out = vec![0f32; n];
                for other in all.iter() {
                    out.iter_mut()
                        .zip(&other[start..start + n])
                        .for_each(|(a, b)| *a += b);
                }
                return Ok(out);
            }
            let s = &self.stream;
            let src = s.clone_htod(send).map_err(|e| err("upload", e))?;
            let mut dst = s
                .alloc_zeros::<f32>(counts[0])
                .map_err(|e| err("alloc", e))?;
            self.comm
                .lock()
                .expect("nccl comm")
                .reduce_scatter(&src, &mut dst, &ReduceOp::Sum)
                .map_err(|e| err("reduce_scatter", e))?;
            s.clone_dtoh(&dst).map_err(|e| err("download", e))
        }

        fn abort(&self, why: &str) {
            // NCCL has no way to wake peers blocked in a collective short of
            // aborting the communicator, which dropping it does.
            eprintln!("rank {}: {why}", self.rank);
        }
    }
}
