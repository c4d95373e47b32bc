//! The collectives ZeRO needs, over one primitive (`exchange`), and the
//! group of one rank.

use std::sync::Arc;

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

    /// `MPI_Comm_split` / `dist.new_group`: a collective over this group
    /// that returns the sub-group of the ranks that gave the same `color`,
    /// numbered in this group's rank order. Tensor-, pipeline- and
    /// data-parallel groups are made this way.
    fn split(&self, color: usize) -> Result<Arc<dyn Communicator>> {
        if self.world_size() == 1 {
            return Ok(Arc::new(SingleRank));
        }
        let _ = color;
        Err(CommError::Transport(
            "this transport does not make sub-groups (threads, MPI and NCCL ranks do)".into(),
        ))
    }

    /// The sum over ranks of `t` (fp32, on this rank's device), computed
    /// where it lives; `None` when this transport exchanges host memory
    /// (the caller then goes through [`all_reduce_sum`](Self::all_reduce_sum)).
    fn all_reduce_sum_on_device(
        &self,
        _t: &candle_core::Tensor,
    ) -> Option<Result<candle_core::Tensor>> {
        None
    }

    /// Every rank's `t` end to end in rank order, on the device; `None` as
    /// for [`all_reduce_sum_on_device`](Self::all_reduce_sum_on_device).
    fn all_gather_on_device(
        &self,
        _t: &candle_core::Tensor,
    ) -> Option<Result<candle_core::Tensor>> {
        None
    }

    /// This rank's chunk of the sum over ranks of `t` (`world` equal
    /// chunks end to end, fp32, on this rank's device), computed where it
    /// lives; `None` as for [`all_reduce_sum_on_device`](Self::all_reduce_sum_on_device).
    fn reduce_scatter_sum_on_device(
        &self,
        _t: &candle_core::Tensor,
    ) -> Option<Result<candle_core::Tensor>> {
        None
    }

    /// Every rank's `t` (fp32, any length, or nothing) in rank order, on
    /// this rank's device: a pipeline stage's send and receive. `None` as
    /// for [`all_reduce_sum_on_device`](Self::all_reduce_sum_on_device)
    /// (the caller then goes through [`exchange`](Self::exchange)).
    fn exchange_on_device(
        &self,
        _t: Option<&candle_core::Tensor>,
    ) -> Option<Result<Vec<Option<candle_core::Tensor>>>> {
        None
    }

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

/// The ranks of `comm` that gave the same `color` to a split, in rank
/// order, and this rank's place among them (a collective over `comm`).
pub(crate) fn split_members<C: Communicator + ?Sized>(
    comm: &C,
    color: usize,
) -> Result<(usize, Vec<usize>)> {
    // Colors travel as f32 through the exchange: exact up to 2^24. A rank
    // with a larger one still takes part (a NaN), so every rank fails.
    let fits = color < 1 << 24;
    let colors = comm.exchange(vec![if fits { color as f32 } else { f32::NAN }])?;
    if let Some(r) = (0..comm.world_size()).find(|&r| colors[r].first().is_none_or(|c| c.is_nan()))
    {
        return Err(CommError::Size(format!(
            "split: rank {r}'s color is not below 2^24"
        )));
    }
    let members: Vec<usize> = (0..comm.world_size())
        .filter(|&r| colors[r].first() == Some(&(color as f32)))
        .collect();
    let me = members
        .iter()
        .position(|&r| r == comm.rank())
        .expect("a rank is in its own color");
    Ok((me, members))
}

/// Bytes as floats (each exact), to send through the exchange.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))] // NCCL ids
pub(crate) fn bytes_to_floats(bytes: &[u8]) -> Vec<f32> {
    bytes.iter().map(|&b| f32::from(b)).collect()
}

/// [`bytes_to_floats`] undone: `n` bytes, or an error naming `what` when
/// the floats are another number or not bytes.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))] // NCCL ids
pub(crate) fn floats_to_bytes(v: &[f32], n: usize, what: &str) -> Result<Vec<u8>> {
    if v.len() != n
        || v.iter()
            .any(|&x| x.fract() != 0.0 || !(0.0..256.0).contains(&x))
    {
        return Err(CommError::Transport(format!(
            "{what} came as {} values that are not {n} bytes",
            v.len()
        )));
    }
    Ok(v.iter().map(|&x| x as u8).collect())
}

pub(crate) fn check_same_len(all: &[Arc<Vec<f32>>]) -> Result<()> {
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
