//! world = tp × dp × pp ranks, numbered as Megatron-LM numbers them:
//! tensor-parallel ranks adjacent (they exchange every layer, so they share
//! a node's fastest links), then data parallel, then pipeline stages
//! (rank = tp_rank + tp · (dp_rank + dp · pp_rank)).

use std::sync::Arc;

use crate::zero::comm::{CommError, Communicator};

/// The sizes of the three kinds of groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelLayout {
    pub world: usize,
    /// `--tensor-model-parallel-size`.
    pub tp: usize,
    /// `--pipeline-model-parallel-size`.
    pub pp: usize,
    /// The data-parallel size, derived: world / (tp · pp).
    pub dp: usize,
}

/// A rank's place in each kind of group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coords {
    pub tp: usize,
    pub dp: usize,
    pub pp: usize,
}

impl ParallelLayout {
    /// Megatron-LM's check: tp · pp must divide the world.
    pub fn new(world: usize, tp: usize, pp: usize) -> Result<Self, String> {
        if world == 0 || tp == 0 || pp == 0 {
            return Err(format!(
                "world {world}, --tensor-model-parallel-size {tp}, --pipeline-model-parallel-size {pp}: each must be at least 1"
            ));
        }
        if !world.is_multiple_of(tp * pp) {
            return Err(format!(
                "world size ({world}) is not divisible by tensor_model_parallel_size ({tp}) x pipeline_model_parallel_size ({pp})"
            ));
        }
        Ok(ParallelLayout {
            world,
            tp,
            pp,
            dp: world / (tp * pp),
        })
    }

    pub fn coords(&self, rank: usize) -> Coords {
        Coords {
            tp: rank % self.tp,
            dp: (rank / self.tp) % self.dp,
            pp: rank / (self.tp * self.dp),
        }
    }

    pub fn rank(&self, c: Coords) -> usize {
        c.tp + self.tp * (c.dp + self.dp * c.pp)
    }

    /// The ranks of `rank`'s tensor-parallel group (same data-parallel
    /// index and stage), in order.
    pub fn tp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.tp)
            .map(|tp| self.rank(Coords { tp, ..c }))
            .collect()
    }

    /// The ranks holding the same shard of the same stage: `rank`'s
    /// data-parallel group.
    pub fn dp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.dp)
            .map(|dp| self.rank(Coords { dp, ..c }))
            .collect()
    }

    /// `rank`'s pipeline: one rank per stage, first stage first.
    pub fn pp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.pp)
            .map(|pp| self.rank(Coords { pp, ..c }))
            .collect()
    }
}

/// This rank's three groups as communicators (each a sub-group of the
/// run's), with its layout and place.
pub struct ParallelGroups {
    pub layout: ParallelLayout,
    pub coords: Coords,
    pub tp: Arc<dyn Communicator>,
    pub dp: Arc<dyn Communicator>,
    pub pp: Arc<dyn Communicator>,
}

impl ParallelGroups {
    /// Split `world` into the layout's groups: a collective, every rank of
    /// `world` calls it with the same sizes.
    pub fn new(world: &dyn Communicator, tp: usize, pp: usize) -> Result<Self, CommError> {
        let layout = ParallelLayout::new(world.world_size(), tp, pp).map_err(CommError::Size)?;
        let me = world.rank();
        let c = layout.coords(me);
        // Each group's color: the coordinates it does not vary.
        let tp_comm = world.split(c.dp + layout.dp * c.pp)?;
        let dp_comm = world.split(c.tp + layout.tp * c.pp)?;
        let pp_comm = world.split(c.tp + layout.tp * c.dp)?;
        Ok(ParallelGroups {
            layout,
            coords: c,
            tp: tp_comm,
            dp: dp_comm,
            pp: pp_comm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zero::comm::run_ranks;

    #[test]
    fn groups_are_megatrons() {
        // Megatron-LM's own example (initialize_model_parallel's docstring):
        // 16 GPUs, tensor 2, pipeline 4, so data parallel 2.
        let l = ParallelLayout::new(16, 2, 4).unwrap();
        assert_eq!(l.dp, 2);
        let groups = |f: &dyn Fn(usize) -> Vec<usize>| {
            let mut g: Vec<Vec<usize>> = (0..16).map(f).collect();
            g.sort();
            g.dedup();
            g
        };
        assert_eq!(
            groups(&|r| l.tp_group(r)),
            (0..8).map(|i| vec![2 * i, 2 * i + 1]).collect::<Vec<_>>()
        );
        assert_eq!(
            groups(&|r| l.dp_group(r)),
            vec![
                vec![0, 2],
                vec![1, 3],
                vec![4, 6],
                vec![5, 7],
                vec![8, 10],
                vec![9, 11],
                vec![12, 14],
                vec![13, 15]
            ]
        );
        assert_eq!(
            groups(&|r| l.pp_group(r)),
            vec![
                vec![0, 4, 8, 12],
                vec![1, 5, 9, 13],
                vec![2, 6, 10, 14],
                vec![3, 7, 11, 15]
            ]
        );
        for r in 0..16 {
            assert_eq!(l.rank(l.coords(r)), r);
        }
        let e = ParallelLayout::new(12, 4, 2).unwrap_err();
        assert!(e.contains("not divisible"), "{e}");
    }

    #[test]
    fn each_group_sums_over_its_own_ranks() {
        // 8 thread ranks as tp 2 × dp 2 × pp 2: an all-reduce of the world
        // rank in each group gives the sum of exactly that group's ranks.
        let out = run_ranks(8, |rank, world| -> Result<_, CommError> {
            let g = ParallelGroups::new(world.as_ref(), 2, 2)?;
            let sum = |c: &Arc<dyn Communicator>| -> Result<f32, CommError> {
                let mut x = [rank as f32];
                c.all_reduce_sum(&mut x)?;
                Ok(x[0])
            };
            Ok((
                (sum(&g.tp)?, sum(&g.dp)?, sum(&g.pp)?),
                (g.tp.rank(), g.dp.rank(), g.pp.rank()),
                (g.tp.world_size(), g.dp.world_size(), g.pp.world_size()),
            ))
        })
        .unwrap();
        let l = ParallelLayout::new(8, 2, 2).unwrap();
        for (rank, (sums, ranks, sizes)) in out.into_iter().enumerate() {
            let total = |g: Vec<usize>| g.iter().sum::<usize>() as f32;
            assert_eq!(
                sums,
                (
                    total(l.tp_group(rank)),
                    total(l.dp_group(rank)),
                    total(l.pp_group(rank))
                ),
                "rank {rank}"
            );
            let c = l.coords(rank);
            assert_eq!(ranks, (c.tp, c.dp, c.pp), "rank {rank}");
            assert_eq!(sizes, (2, 2, 2));
        }
    }

    /// Run `body` on 8 ranks as tp 2 × dp 2 × pp 2 and return the run's
    /// error; a watchdog turns a hang (an abort that did not reach a
    /// waiting rank) into a failure.
    fn failing_run(body: fn(usize, &ParallelGroups) -> Result<(), CommError>) -> String {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = run_ranks(8, |rank, world| -> Result<(), CommError> {
                let g = ParallelGroups::new(world.as_ref(), 2, 2)?;
                body(rank, &g)
            });
            let _ = tx.send(r.map_err(|e| e.to_string()));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the ranks hung: the abort did not reach a waiting rank");
        r.unwrap_err()
    }

    #[test]
    fn a_failure_in_one_group_stops_every_rank() {
        // Rank 0 fails before its collectives (run_ranks aborts the world
        // group); rank 1 waits for it in their tensor-parallel group and is
        // stopped only if the abort reaches the sub-groups.
        let e = failing_run(|rank, g| {
            if rank == 0 {
                return Err(CommError::Transport("injected failure".into()));
            }
            g.tp.barrier()?;
            g.dp.barrier()?;
            g.pp.barrier()
        });
        assert!(e.contains("injected failure"), "{e}");
    }

    #[test]
    fn a_failure_in_a_nested_sub_group_reaches_every_group() {
        // Rank 0 aborts from a sub-group of its pipeline group (as the
        // pipeline's neighbour links are made) and fails no other way; rank
        // 7 waits in its own data-parallel group, which shares no rank with
        // rank 0's groups but the world: the abort must go up to the world
        // and down again.
        let e = failing_run(|rank, g| {
            let pair = g.pp.split(0)?;
            match rank {
                // Rank 0 then waits in its tensor group, which rank 1 never
                // joins: only the abort can end that wait.
                0 => {
                    pair.abort("injected failure");
                    g.tp.barrier()
                }
                7 => g.dp.barrier().and_then(|_| g.dp.barrier()),
                _ => Ok(()),
            }
        });
        assert!(e.contains("injected failure"), "{e}");
    }
}
