//! Launching the fused CUDA kernels: the PTX the build compiled from the
//! `.cu` files (`build.rs`), the element types they come in, and launch
//! shapes (also for `optim::adamw_cuda`).

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchArgs, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CudaDevice, Layout, Result};

/// The PTX of each `.cu` file, by its name in upper case (`LAYER_NORM`…).
pub(crate) mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// An element type the kernels come in, and the suffix of their names.
pub(crate) trait Elem: CudaDType + DeviceRepr {
    const SUFFIX: &'static str;
}
impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// Run `f` with the element type of `dtype` (f32 or bf16).
macro_rules! with_elem {
    ($dtype:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            d => candle_core::bail!("the fused CUDA kernels take f32 or bf16, not {d:?}"),
        }
    };
}
pub(crate) use with_elem;

/// A loaded kernel and the device's stream it launches on.
pub(crate) struct Kernel {
    stream: std::sync::Arc<CudaStream>,
    func: CudaFunction,
}

impl Kernel {
    pub(crate) fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// Kernel `name` of the module compiled from `ptx` (loaded once per device).
pub(crate) fn kernel(
    dev: &CudaDevice,
    module: &str,
    ptx: &'static str,
    name: &str,
) -> Result<Kernel> {
    let func = dev.get_or_load_custom_func(name, module, ptx)?;
    Ok(Kernel {
        stream: dev.cuda_stream(),
        func: func.into_cuda_function(),
    })
}

/// `name` with the suffix of `T`'s kernels (`layer_norm_bf16`).
pub(crate) fn elem_name<T: Elem>(name: &str) -> String {
    format!("{name}_{}", T::SUFFIX)
}

/// A device buffer of `n` elements for a kernel to fill: every kernel these
/// ops and `optim::adamw_cuda` launch writes each element of its outputs
/// before anything reads them.
pub(crate) fn output<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: as above, nothing reads the buffer before a kernel writes it.
    unsafe { dev.alloc::<T>(n) }
}

/// Launch a [`Kernel`] over a `LaunchConfig` with the arguments in the
/// order and types of its `extern "C"` signature.
macro_rules! launch {
    ($kernel:expr, $cfg:expr; $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        // One expression: the arguments (temporaries too) live until the launch.
        // SAFETY: the arguments are the kernel's, in its signature's order and types.
        candle_core::cuda_backend::WrapErr::w(unsafe { $kernel.builder() $(.arg($arg))+ .launch($cfg) })
    }};
}
pub(crate) use launch;

/// A contiguous tensor's elements on the device.
pub(crate) fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// One block per row of `width`: a multiple of 32 threads, at most `cap`.
pub(crate) fn per_row(rows: usize, width: usize, cap: u32) -> LaunchConfig {
    let threads = (width.div_ceil(32) * 32).clamp(32, cap as usize) as u32;
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride loop over `n` elements.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 8192) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
