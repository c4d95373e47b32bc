//! Ranks as threads of one process: the exchange is a rendezvous in shared
//! memory, every rank publishing its buffer and reading everyone's.

use std::sync::{Arc, Condvar, Mutex};

use super::communicator::{split_members, CommError, Communicator, Gathered, Result};

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
    /// Sub-groups made by `split`, by (the round that exchanged the colours,
    /// color): the first rank of a color to arrive makes it, the others take it.
    subgroups: Mutex<std::collections::HashMap<(u64, usize), Arc<InProcessGroup>>>,
    /// The group this one was split from: a failure anywhere stops them all.
    parent: Option<std::sync::Weak<InProcessGroup>>,
}

impl InProcessGroup {
    pub fn new(world: usize) -> Arc<Self> {
        Self::with_parent(world, None)
    }

    fn with_parent(world: usize, parent: Option<std::sync::Weak<InProcessGroup>>) -> Arc<Self> {
        assert!(world >= 1, "a group has at least one rank");
        Arc::new(InProcessGroup {
            parent,
            world,
            round: Mutex::new(Round {
                slots: vec![None; world],
                ..Round::default()
            }),
            cv: Condvar::new(),
            subgroups: Mutex::default(),
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

impl InProcessGroup {
    fn abort_all(&self, why: &str) {
        {
            let mut r = self.round.lock().unwrap_or_else(|e| e.into_inner());
            if r.aborted.is_none() {
                r.aborted = Some(why.to_string());
            }
            self.cv.notify_all();
        }
        let subs: Vec<_> = self
            .subgroups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for g in subs {
            g.abort_all(why);
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
    fn split(&self, color: usize) -> Result<Arc<dyn Communicator>> {
        let (me, members) = split_members(self, color)?;
        // The round that exchanged the colours names this split: the same
        // number on every rank of it (no round can end until this rank
        // joins the next), never used again.
        let n = self
            .group
            .round
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .generation;
        let sub = {
            let mut subs = self
                .group
                .subgroups
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            subs.entry((n, color))
                .or_insert_with(|| {
                    InProcessGroup::with_parent(members.len(), Some(Arc::downgrade(&self.group)))
                })
                .clone()
        };
        // A failure between the colours' exchange and here reaches it too.
        let aborted = {
            let r = self.group.round.lock().unwrap_or_else(|e| e.into_inner());
            r.aborted.clone()
        };
        if let Some(why) = aborted {
            sub.abort_all(&why);
        }
        Ok(Arc::new(sub.rank(me)))
    }
    fn abort(&self, why: &str) {
        // From the group everything was split from, down to every sub-group.
        let mut root = self.group.clone();
        while let Some(p) = root.parent.as_ref().and_then(std::sync::Weak::upgrade) {
            root = p;
        }
        let who = if self.group.parent.is_some() {
            format!("rank {} of a sub-group of {}", self.rank, self.group.world)
        } else {
            format!("rank {}", self.rank)
        };
        root.abort_all(&format!("{who}: {why}"));
    }
}
