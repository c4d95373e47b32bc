//! Ranks as threads of one process: the exchange is a rendezvous in shared
//! memory, every rank publishing its buffer and reading everyone's.

use std::sync::{Arc, Condvar, Mutex};

use super::communicator::{CommError, Communicator, Gathered, Result};

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
