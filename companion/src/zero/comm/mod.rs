//! Collective communication between ranks: the five operations ZeRO needs
//! (all-reduce, reduce-scatter, all-gather, broadcast, barrier), over a
//! [`Communicator`] with one backend per transport: a single rank
//! ([`SingleRank`]), ranks as threads of one process sharing memory
//! ([`threads`]), MPI processes ([`mpi`], the `mpi` feature) and NCCL on
//! GPUs ([`nccl`], the `nccl` feature).
//!
//! Every reduction adds the ranks' contributions in rank order, so all ranks
//! get bit-identical results and a run is reproducible.

use std::sync::Arc;

mod communicator;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod threads;

pub use communicator::{CommError, Communicator, Gathered, Result, SingleRank};
pub use threads::InProcessGroup;

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
    let limit = max_ranks_in_process();
    if world == 0 || world > limit {
        return Err(CommError::Transport(format!(
            "{world} ranks: a group in one process needs 1 to {limit} ranks here (each rank is \
             a thread with its share of the {} cores; more ranks than that only wait on each \
             other; across machines use MPI)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ))
        .into());
    }
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

/// The most ranks one process runs as threads: 8 a core, at least 64 (the
/// tests run more ranks than cores on purpose; thousands would exhaust
/// the process's threads).
pub fn max_ranks_in_process() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (8 * cores).max(64)
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

    /// Every byte value crosses the exchange as a float and back (an NCCL
    /// sub-group's id travels so); other numbers or non-bytes are refused.
    #[test]
    fn bytes_cross_the_exchange_unchanged() {
        use communicator::{bytes_to_floats, floats_to_bytes};
        let bytes: Vec<u8> = (0..=255).rev().collect();
        let got = run_ranks::<_, CommError, _>(2, |r, c| {
            let send = if r == 0 {
                bytes_to_floats(&bytes)
            } else {
                vec![]
            };
            let all = c.exchange(send)?;
            floats_to_bytes(&all[0], 256, "the id")
        })
        .unwrap();
        assert!(got.iter().all(|g| *g == bytes));
        assert!(floats_to_bytes(&[1.0; 127], 128, "x").is_err());
        assert!(floats_to_bytes(&[256.0], 1, "x").is_err());
        assert!(floats_to_bytes(&[0.5], 1, "x").is_err());
        assert!(floats_to_bytes(&[-1.0], 1, "x").is_err());
    }

    /// A color the exchange cannot carry on one rank fails the split on
    /// every rank (none waits for it), naming that rank.
    #[test]
    fn a_color_too_large_on_one_rank_fails_the_split_everywhere() {
        let got = run_ranks::<_, CommError, _>(3, |r, c| {
            let color = if r == 1 { 1 << 24 } else { 0 };
            Ok(c.split(color).err().map(|e| e.to_string()))
        })
        .unwrap();
        for e in got {
            assert!(e.is_some_and(|e| e.contains("rank 1's color")));
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
