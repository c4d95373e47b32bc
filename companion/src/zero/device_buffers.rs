//! The flat buffers of a rank whose ZeRO state lives on its device, and
//! the moves between them and host memory, each counted
//! ([`host_transfers`]) so that a test can show what a step moves: the
//! tensor-op helpers the device step (`on_device.rs`) is made of.

use std::cell::Cell;

use candle_core::{DType, Tensor};

use super::comm::Communicator;
use super::error::Result;
use super::layout::FlatLayout;
use crate::model::GPT2LMHeadModel;

/// The flat buffers of a rank whose state lives on its device.
pub(super) struct OnDevice {
    /// The whole flat buffer (stages 0–1) or this rank's partition (2–3).
    pub grads: Tensor,
    /// Stage 3: this rank's partition of the fp32 weights.
    pub params: Option<Tensor>,
    /// Mixed precision, stages 0–2: fp32 master weights of the owned elements.
    pub master: Option<Tensor>,
}

thread_local! {
    static TRANSFERS: Cell<HostTransfers> = const { Cell::new(HostTransfers { buffers: 0, scalars: 0 }) };
}

/// Transfers between a device-resident state and host memory made on this
/// thread (a rank's thread), counted where they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostTransfers {
    /// Buffers (gradients, weights) copied either way.
    pub buffers: usize,
    /// Single numbers read (the gradient norm, the overflow flag).
    pub scalars: usize,
}

/// This thread's count so far.
pub fn host_transfers() -> HostTransfers {
    TRANSFERS.with(Cell::get)
}

fn count(buffers: usize, scalars: usize) {
    TRANSFERS.with(|c| {
        let t = c.get();
        c.set(HostTransfers {
            buffers: t.buffers + buffers,
            scalars: t.scalars + scalars,
        })
    });
}

pub(super) fn to_host(t: &Tensor) -> Result<Vec<f32>> {
    count(1, 0);
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}

pub(super) fn to_device(v: Vec<f32>, device: &candle_core::Device) -> Result<Tensor> {
    count(1, 0);
    let n = v.len();
    Ok(Tensor::from_vec(v, n, device)?)
}

pub(super) fn scalar(t: &Tensor) -> Result<f64> {
    count(0, 1);
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Σx² in f64 on the device (on CUDA one fused kernel, `optim/adamw.cu`).
pub(crate) fn sum_sq(t: &Tensor) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if t.device().is_cuda()
        && t.dtype() == DType::F32
        && crate::model::autograd_ops::fused_cuda_kernels()
    {
        count(0, 1);
        return Ok(crate::optim::adamw_cuda::sum_squares(t)?);
    }
    scalar(&t.to_dtype(DType::F64)?.sqr()?.sum_all()?)
}

/// Whether every element is finite: x·0 is 0 unless x is inf or NaN.
pub(super) fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(sum_sq(&(t * 0.0)?)?.is_finite())
}

/// `t` with zeros appended up to `len` elements.
pub(crate) fn pad_to(t: &Tensor, len: usize) -> Result<Tensor> {
    let n = t.elem_count();
    if n >= len {
        return Ok(t.clone());
    }
    let zeros = Tensor::zeros(len - n, DType::F32, t.device())?;
    Ok(Tensor::cat(&[t, &zeros], 0)?)
}

/// Sum over ranks (none to do on one rank): on the device where the
/// transport can (NCCL), else through host memory.
pub(crate) fn all_reduce(comm: &dyn Communicator, t: &Tensor) -> Result<Tensor> {
    if comm.world_size() == 1 {
        return Ok(t.clone());
    }
    if let Some(r) = comm.all_reduce_sum_on_device(t) {
        return Ok(r?);
    }
    let mut v = to_host(t)?;
    comm.all_reduce_sum(&mut v)?;
    to_device(v, t.device())
}

/// This rank's chunk of the sum over ranks of `t` (`world` equal chunks end
/// to end): NCCL's reduce-scatter where the tensor lives, else through host
/// memory.
pub(crate) fn reduce_scatter(comm: &dyn Communicator, t: &Tensor) -> Result<Tensor> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(t.clone());
    }
    if let Some(r) = comm.reduce_scatter_sum_on_device(t) {
        return Ok(r?);
    }
    let chunk = t.elem_count() / world;
    let mine = comm.reduce_scatter_sum(&to_host(t)?, &vec![chunk; world])?;
    to_device(mine, t.device())
}

/// Every rank's `t`, end to end in rank order.
pub(crate) fn all_gather(comm: &dyn Communicator, t: &Tensor) -> Result<Tensor> {
    if comm.world_size() == 1 {
        return Ok(t.clone());
    }
    if let Some(r) = comm.all_gather_on_device(t) {
        return Ok(r?);
    }
    let all = comm.all_gather(&to_host(t)?)?;
    to_device(all, t.device())
}

/// The model's weights laid end to end, fp32, on its device.
pub(super) fn flatten_on_device(model: &GPT2LMHeadModel) -> Result<Tensor> {
    let parts = model
        .named_parameters()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all()?.to_dtype(DType::F32))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// Write the whole model's flat fp32 weights into its Vars (in their dtype).
pub(super) fn set_params(
    model: &GPT2LMHeadModel,
    layout: &FlatLayout,
    flat: &Tensor,
) -> Result<()> {
    for (i, (_, var)) in model.named_parameters().iter().enumerate() {
        let r = layout.range(i);
        let t = flat
            .narrow(0, r.start, r.len())?
            .reshape(var.shape())?
            .to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}
