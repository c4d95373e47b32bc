//! Ranks on NVIDIA GPUs, one thread of this process per GPU, talking
//! through NCCL (`--num-gpus N --backend nccl`). A ZeRO state kept on the
//! device is summed and gathered where it lives (the gradients' all-reduce,
//! the weights' all-gather after the step); host buffers go to the rank's
//! GPU, through the NCCL collective, and back: all-reduce and
//! reduce-scatter are NCCL's own; the general exchange is an all-gather of
//! the sizes, then of the buffers padded to the largest. Sub-groups (the
//! tensor-, pipeline- and data-parallel groups) are NCCL communicators of
//! their own, each made from an id its first rank draws and hands to the
//! others over the parent group (`ncclCommInitRank`, as
//! `torch.distributed.new_group` does). Pipeline stages exchange their
//! activations on the device too (the lengths through the host, then one
//! all-gather on the pair's communicator). Built with the `nccl` feature
//! (which implies `cuda`); compiled in CI, not yet run on several GPUs.

use super::communicator::{
    bytes_to_floats, floats_to_bytes, split_members, CommError, Communicator, Gathered, Result,
    SingleRank,
};
use candle_core::{DType, Tensor};
use cudarc::driver::{CudaSlice, CudaStream, CudaView};
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
    device: candle_core::Device,
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
    pub fn new(device: &candle_core::Device, rank: usize, world: usize, id: Id) -> Result<Self> {
        let candle_core::Device::Cuda(d) = device else {
            return Err(CommError::Transport(format!(
                "NCCL rank {rank} needs a CUDA device, got {device:?}"
            )));
        };
        let stream = d.cuda_stream();
        let comm = Comm::from_rank(stream.clone(), rank, world, id).map_err(|e| err("init", e))?;
        Ok(NcclRank {
            comm: Mutex::new(comm),
            device: device.clone(),
            stream,
            rank,
            world,
        })
    }

    /// Run a collective from `t`'s fp32 elements (on this rank's GPU) into
    /// a new device buffer of `out_len` elements, returned as a tensor.
    fn on_device(
        &self,
        t: &Tensor,
        out_len: usize,
        what: &str,
        op: impl FnOnce(
            &Comm,
            &CudaView<f32>,
            &mut CudaSlice<f32>,
        ) -> std::result::Result<(), cudarc::nccl::result::NcclError>,
    ) -> Result<Tensor> {
        let t = t
            .to_dtype(DType::F32)
            .and_then(|t| t.contiguous())
            .map_err(|e| err(what, e))?;
        let candle_core::Device::Cuda(dev) = t.device() else {
            return Err(CommError::Transport(format!(
                "NCCL {what}: the tensor is on {:?}, not a GPU",
                t.device()
            )));
        };
        let mut dst = self
            .stream
            .alloc_zeros::<f32>(out_len)
            .map_err(|e| err("alloc", e))?;
        {
            let (storage, layout) = t.storage_and_layout();
            let candle_core::Storage::Cuda(cs) = &*storage else {
                return Err(CommError::Transport(format!(
                    "NCCL {what}: not CUDA storage"
                )));
            };
            let slice = cs.as_cuda_slice::<f32>().map_err(|e| err(what, e))?;
            let (a, b) = layout
                .contiguous_offsets()
                .ok_or_else(|| CommError::Transport(format!("NCCL {what}: not contiguous")))?;
            let view = slice.slice(a..b);
            op(&self.comm.lock().expect("nccl comm"), &view, &mut dst).map_err(|e| err(what, e))?;
        }
        let out = candle_core::CudaStorage::wrap_cuda_slice(dst, dev.clone());
        Ok(Tensor::from_storage(
            candle_core::Storage::Cuda(out),
            out_len,
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }

    /// [`Communicator::exchange_on_device`]: the lengths gathered through
    /// the host, then every rank's tensor, padded to the longest, gathered
    /// on the device.
    fn exchange_tensors(&self, t: Option<&Tensor>) -> Result<Vec<Option<Tensor>>> {
        let cuda = |e: candle_core::Error| err("exchange", e);
        // Prepared before any collective; a rank that cannot sends a length
        // no tensor has, so every rank fails together (none is left waiting).
        let mine = t
            .map(|t| t.flatten_all()?.to_dtype(DType::F32)?.contiguous())
            .transpose();
        let n = match &mine {
            Ok(m) => m.as_ref().map_or(0, Tensor::elem_count) as u64,
            Err(_) => u64::MAX,
        };
        let lens = self.gather_equal(&[n])?;
        let mine = mine.map_err(cuda)?;
        if let Some(r) = lens.iter().position(|&l| l == u64::MAX) {
            return Err(CommError::Transport(format!(
                "NCCL exchange: rank {r} could not prepare its tensor"
            )));
        }
        let max = lens.iter().copied().max().unwrap_or(0) as usize;
        if max == 0 {
            return Ok(vec![None; self.world]);
        }
        let zeros = |k: usize| Tensor::zeros(k, DType::F32, &self.device).map_err(cuda);
        let padded = match mine {
            Some(m) if m.elem_count() == max => m,
            Some(m) => Tensor::cat(&[&m, &zeros(max - m.elem_count())?], 0).map_err(cuda)?,
            // No zero-element tensor (CUDA refuses empty allocations).
            None => zeros(max)?,
        };
        let all = self.on_device(&padded, max * self.world, "exchange", |c, src, dst| {
            c.all_gather(src, dst).map(|_| ())
        })?;
        lens.iter()
            .enumerate()
            .map(|(r, &len)| match len {
                0 => Ok(None),
                len => all.narrow(0, r * max, len as usize).map(Some).map_err(cuda),
            })
            .collect()
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
        if max == 0 {
            // Nobody sends anything (a barrier): no zero-byte NCCL buffers.
            return Ok(Arc::new(
                (0..self.world).map(|_| Arc::new(vec![])).collect(),
            ));
        }
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

    fn all_reduce_sum_on_device(&self, t: &Tensor) -> Option<Result<Tensor>> {
        Some(
            self.on_device(t, t.elem_count(), "all_reduce", |c, src, dst| {
                c.all_reduce(src, dst, &ReduceOp::Sum).map(|_| ())
            }),
        )
    }

    fn all_gather_on_device(&self, t: &Tensor) -> Option<Result<Tensor>> {
        // ZeRO's partitions are equal-sized on every rank.
        Some(self.on_device(
            t,
            t.elem_count() * self.world,
            "all_gather",
            |c, src, dst| c.all_gather(src, dst).map(|_| ()),
        ))
    }

    fn exchange_on_device(&self, t: Option<&Tensor>) -> Option<Result<Vec<Option<Tensor>>>> {
        Some(self.exchange_tensors(t))
    }

    fn reduce_scatter_sum_on_device(&self, t: &Tensor) -> Option<Result<Tensor>> {
        // The callers pad every rank's chunk to the longest.
        Some(self.on_device(
            t,
            t.elem_count() / self.world,
            "reduce_scatter",
            |c, src, dst| c.reduce_scatter(src, dst, &ReduceOp::Sum).map(|_| ()),
        ))
    }

    fn split(&self, color: usize) -> Result<Arc<dyn Communicator>> {
        let (me, members) = split_members(self, color)?;
        // Every rank takes part in the id's exchange, whatever happens: the
        // sub-group's first rank sends the id it drew (a NaN if it could
        // not), the others nothing.
        let drawn = (me == 0 && members.len() > 1).then(new_id);
        let send = match &drawn {
            Some(Ok(id)) => id_to_floats(id),
            Some(Err(_)) => vec![f32::NAN],
            None => vec![],
        };
        let all = self.exchange(send)?;
        if let Some(Err(e)) = drawn {
            return Err(e);
        }
        if members.len() == 1 {
            return Ok(Arc::new(SingleRank));
        }
        let first = &all[members[0]];
        if first.first().is_some_and(|x| x.is_nan()) {
            return Err(CommError::Transport(format!(
                "NCCL split: rank {} could not draw the sub-group's id",
                members[0]
            )));
        }
        let id = id_from_floats(first)?;
        Ok(Arc::new(NcclRank::new(
            &self.device,
            me,
            members.len(),
            id,
        )?))
    }

    fn abort(&self, why: &str) {
        // NCCL has no way to wake peers blocked in a collective short of
        // aborting the communicator, which dropping it does.
        eprintln!("rank {}: {why}", self.rank);
    }
}

/// An NCCL id's 128 bytes as floats, for the exchange.
fn id_to_floats(id: &Id) -> Vec<f32> {
    let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
    bytes_to_floats(&bytes)
}

/// [`id_to_floats`] undone.
fn id_from_floats(v: &[f32]) -> Result<Id> {
    let bytes = floats_to_bytes(v, 128, "NCCL split: the sub-group's id")?;
    let mut raw = [0 as std::ffi::c_char; 128];
    raw.iter_mut()
        .zip(bytes)
        .for_each(|(r, b)| *r = b as std::ffi::c_char);
    Ok(Id::uninit(raw))
}
