//! Batches of example indices for each rank and step.

use std::sync::{Arc, Mutex};

use super::error::{DataError, Result};

/// An epoch and its order of example indices.
type EpochOrder = Option<(usize, Arc<Vec<usize>>)>;

/// Batches of example indices: a seeded permutation per epoch (seed + epoch),
/// `drop_last`, and the rank's share of each global batch for data
/// parallelism. The sequence is a pure function of (seed, epoch, position),
/// so a resumed run sees exactly the batches an uninterrupted one would,
/// and resuming costs one permutation whatever the step: nothing is
/// replayed or skipped through.
#[derive(Debug, Clone)]
pub struct DataLoader {
    pub len: usize,
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    /// The last epoch's order, computed once per epoch, not per batch.
    order_cache: Arc<Mutex<EpochOrder>>,
}

impl DataLoader {
    pub fn new(len: usize, batch_size: usize, shuffle: bool, seed: u64) -> Result<Self> {
        if batch_size == 0 {
            return Err(DataError::Invalid("batch size must be at least 1".into()));
        }
        if len == 0 {
            return Err(DataError::Invalid(
                "the dataset has no examples (is the corpus shorter than one block?)".into(),
            ));
        }
        Ok(DataLoader {
            len,
            batch_size,
            shuffle,
            drop_last: false,
            seed,
            rank: 0,
            world_size: 1,
            order_cache: Arc::default(),
        })
    }

    /// Global batches per epoch (each rank takes `batch_size` of a global
    /// batch of `batch_size × world_size`).
    pub fn batches_per_epoch(&self) -> usize {
        let global = self.batch_size * self.world_size;
        if self.drop_last {
            (self.len / global).max(1)
        } else {
            self.len.div_ceil(global)
        }
    }

    fn order(&self, epoch: usize) -> Arc<Vec<usize>> {
        let mut cache = self.order_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((e, order)) = cache.as_ref() {
            if *e == epoch {
                return order.clone();
            }
        }
        let mut idx: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            crate::rng::SeededRng::new(self.seed.wrapping_add(epoch as u64)).shuffle(&mut idx);
        }
        let order = Arc::new(idx);
        *cache = Some((epoch, order.clone()));
        order
    }

    /// Where global batch `n` is: (epoch, batch within the epoch).
    pub fn position(&self, n: usize) -> (usize, usize) {
        let per = self.batches_per_epoch();
        (n / per, n % per)
    }

    /// This rank's example indices of global batch `n` (counting across epochs).
    pub fn batch(&self, n: usize) -> Vec<usize> {
        let (epoch, k) = self.position(n);
        let order = self.order(epoch);
        let global = self.batch_size * self.world_size;
        let start = k * global;
        let end = (start + global).min(order.len());
        let slice = &order[start..end];
        // Rank r takes the r-th contiguous share (DistributedSampler-like).
        let s = (self.rank * self.batch_size).min(slice.len());
        let e = ((self.rank + 1) * self.batch_size).min(slice.len());
        slice[s..e].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_is_seeded_and_shards() {
        let mut l = DataLoader::new(10, 2, true, 7).unwrap();
        l.drop_last = true;
        l.world_size = 2;
        assert_eq!(l.batches_per_epoch(), 2);
        let a: Vec<usize> = (0..2).flat_map(|n| l.batch(n)).collect();
        l.rank = 1;
        let b: Vec<usize> = (0..2).flat_map(|n| l.batch(n)).collect();
        assert!(
            a.iter().all(|i| !b.contains(i)),
            "ranks see disjoint examples"
        );
        assert_eq!(l.batch(0), l.clone().batch(0));
        assert_ne!(l.batch(0), l.batch(2), "a new epoch reshuffles");
        assert!(DataLoader::new(10, 0, true, 0).is_err());
    }
}
