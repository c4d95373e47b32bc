//! `companion env`: what this build and this machine can run, as DeepSpeed's
//! `ds_report` and `torch.utils.collect_env` print it — the features built
//! in, the CPU and its measured matrix-multiply rate, the CUDA driver and
//! devices (name, memory, compute capability), the shared libraries this
//! process loaded and from where, and one tiny forward/backward per device
//! compared with the CPU. Each missing piece is a [`Problem`] saying what
//! to fix.

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::config::GPT2Config;
use crate::model::{GPT2LMHeadModel, GradientPath, LocalStore, MicroBatch};

/// The whole report (`companion env --json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct EnvReport {
    pub version: &'static str,
    pub features: Features,
    pub cpu: CpuReport,
    /// The CUDA driver's version (`cuDriverGetVersion`, e.g. "13.0"), when
    /// the build has CUDA and a driver answered.
    pub cuda_driver: Option<String>,
    pub devices: Vec<DeviceReport>,
    /// Shared libraries this process loaded that matter here (CUDA, NCCL,
    /// MPI), with the file each came from.
    pub libraries: Vec<LoadedLibrary>,
    /// Where models from the hub and prepared datasets are cached.
    pub caches: Caches,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Caches {
    pub hub: String,
    pub datasets: String,
}

/// The optional backends compiled in.
#[derive(Debug, Clone, Serialize)]
pub struct Features {
    pub cuda: bool,
    pub nccl: bool,
    pub mpi: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CpuReport {
    pub model: Option<String>,
    pub threads: usize,
    pub memory_available_gib: Option<f64>,
    /// fp32 GEMM rate measured now (what CPU MFU is measured against).
    pub gemm_f32_gflops: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    pub ordinal: usize,
    pub name: String,
    pub memory_gib: f64,
    pub compute_capability: (i32, i32),
    /// The tiny model's loss and gradients here against the CPU's.
    pub check: Option<ParityCheck>,
    /// Each fused kernel here against its CPU twin (f32 and bf16).
    pub kernels: Vec<crate::kernel_twins::TwinCheck>,
}

/// One tiny forward/backward on a device against the same on the CPU (fp32).
#[derive(Debug, Clone, Serialize)]
pub struct ParityCheck {
    pub loss: f64,
    pub cpu_loss: f64,
    /// max over parameters of ‖g − g_cpu‖ / ‖g_cpu‖.
    pub max_gradient_rel_diff: f64,
    pub passed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadedLibrary {
    pub name: String,
    pub path: String,
}

/// Something missing, and what to do about it.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub what: String,
    pub fix: String,
}

/// What a report must show for the run to go on (`companion env --expect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Expect {
    /// The cuda feature, a driver, at least one device, and its check passed.
    Cuda,
    Nccl,
    Mpi,
}

/// Relative gradient difference under which a device agrees with the CPU
/// (fp32; cuBLAS without TF32 lands near 1e-6).
pub const PARITY_TOLERANCE: f64 = 1e-4;

/// Collect the report; `measure` times the CPU's GEMM (about a second).
pub fn collect(measure: bool, expect: &[Expect]) -> EnvReport {
    let features = Features {
        cuda: cfg!(feature = "cuda"),
        nccl: cfg!(feature = "nccl"),
        mpi: cfg!(feature = "mpi"),
    };
    let cpu = CpuReport {
        model: cpu_model(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_available_gib: crate::sysmem::available_bytes()
            .map(|b| b as f64 / (1u64 << 30) as f64),
        gemm_f32_gflops: measure
            .then(|| crate::sysmem::peak_gflops(&Device::Cpu, DType::F32).ok())
            .flatten(),
    };
    let mut problems = Vec::new();
    let (cuda_driver, devices) = cuda::devices(&mut problems);
    let want = |e: Expect| expect.contains(&e);
    for (e, built, name) in [
        (Expect::Cuda, features.cuda, "cuda"),
        (Expect::Nccl, features.nccl, "nccl"),
        (Expect::Mpi, features.mpi, "mpi"),
    ] {
        if want(e) && !built {
            problems.push(Problem {
                what: format!("this build has no {name} feature"),
                fix: match e {
                    Expect::Mpi => "build with --features mpi (Debian: apt install libopenmpi-dev openmpi-bin libclang-dev)".into(),
                    _ => "build with ./scripts/build-cuda (or cargo build --release -p companion --features nccl with your CUDA toolkit)".into(),
                },
            });
        }
    }
    if want(Expect::Cuda) && features.cuda && devices.is_empty() && problems.is_empty() {
        problems.push(Problem {
            what: "no CUDA device was found".into(),
            fix: "check nvidia-smi and CUDA_VISIBLE_DEVICES".into(),
        });
    }
    for d in &devices {
        if let Some(c) = d.check.as_ref().filter(|c| !c.passed) {
            problems.push(Problem {
                what: format!(
                    "cuda:{}: the tiny model's gradients differ from the CPU's by {:.2e} (loss {} vs {})",
                    d.ordinal, c.max_gradient_rel_diff, c.loss, c.cpu_loss
                ),
                fix: "report it: fp32 on the device should agree with the CPU".into(),
            });
        }
        for k in d.kernels.iter().filter(|k| !k.passed) {
            problems.push(Problem {
                what: format!(
                    "cuda:{}: the fused kernel {} ({}) {}",
                    d.ordinal,
                    k.op,
                    k.dtype,
                    match &k.error {
                        Some(e) => format!("failed: {e}"),
                        None => format!(
                            "differs from its CPU twin by {:.2e} (tolerance {:.0e})",
                            k.max_rel_diff, k.tolerance
                        ),
                    }
                ),
                fix: "set COMPANION_FUSED_CUDA=0 to train with candle's composite ops instead, and report it".into(),
            });
        }
    }
    EnvReport {
        version: env!("CARGO_PKG_VERSION"),
        features,
        cpu,
        cuda_driver,
        devices,
        libraries: loaded_libraries(),
        caches: Caches {
            hub: crate::hub::cache_dir().display().to_string(),
            datasets: crate::data::cache_dir().display().to_string(),
        },
        problems,
    }
}

/// A device by the name the flags use: `cpu`, `cuda` (= `cuda:0`) or
/// `cuda:N`. `Err` says what to fix (a build without CUDA, no such GPU).
pub fn device_from_name(name: &str) -> Result<Device, String> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => name
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| format!("device `{name}`: expected cpu, cuda or cuda:N"))?,
    };
    if !cfg!(feature = "cuda") {
        return Err(format!(
            "device `{name}` needs a build with CUDA (./scripts/build-cuda, or --features cuda with your toolkit)"
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| format!("device `{name}`: {e}"))
}

/// Bytes in use on `device` now (the driver's total − free; `None` on
/// the CPU): sampled after each step, the highest is a run's peak.
pub fn device_memory_used(device: &Device) -> Option<u64> {
    cuda::memory_used(device)
}

/// The tiny model's loss and gradients on `device` against the CPU's:
/// the same weights (drawn on the host from one seed), the same batch.
pub fn check_device(device: &Device) -> crate::model::Result<ParityCheck> {
    let cfg = GPT2Config {
        vocab_size: 96,
        n_positions: 16,
        n_embd: 32,
        n_layer: 2,
        n_head: 4,
        ..GPT2Config::default()
    };
    let run = |device: &Device| -> crate::model::Result<(f64, LocalStore)> {
        let model = GPT2LMHeadModel::new(&cfg, 3, device)?;
        let ids: Vec<u32> = (0..2 * 12).map(|i| (i * 37 + 5) % 96).collect();
        let ids = Tensor::from_vec(ids, (2, 12), device)?;
        let labels = ids.to_dtype(DType::I64)?;
        let batch = MicroBatch {
            input_ids: &ids,
            labels: &labels,
            attention_mask: None,
            n_items: 22.0,
            loss_scale: 1.0,
        };
        let mut store = LocalStore::new(&model);
        let loss = GradientPath::Autograd.forward_backward(&model, &batch, &mut store)?;
        Ok((loss, store))
    };
    let (cpu_loss, want) = run(&Device::Cpu)?;
    let (loss, got) = run(device)?;
    let mut worst = 0f64;
    for i in 0..want.num_tensors() {
        let (a, b) = (got.gradient(i), want.gradient(i));
        let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        worst = worst.max((diff / norm.max(f64::MIN_POSITIVE)).sqrt());
    }
    let loss_ok = (loss - cpu_loss).abs() <= PARITY_TOLERANCE * cpu_loss.abs();
    Ok(ParityCheck {
        loss,
        cpu_loss,
        max_gradient_rel_diff: worst,
        passed: loss_ok && worst <= PARITY_TOLERANCE && worst.is_finite(),
    })
}

/// The CPU's model name, from /proc/cpuinfo.
fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// The CUDA, NCCL and MPI libraries mapped into this process, and from
/// which file (/proc/self/maps): which copy the loader found.
fn loaded_libraries() -> Vec<LoadedLibrary> {
    const WATCH: &[&str] = &[
        "libcuda.",
        "libcudart.",
        "libcublas.",
        "libcublasLt.",
        "libcurand.",
        "libnvrtc.",
        "libnccl.",
        "libmpi.",
    ];
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let mut seen = std::collections::BTreeMap::new();
    for path in maps.lines().filter_map(|l| l.split_whitespace().nth(5)) {
        let name = path.rsplit('/').next().unwrap_or(path);
        if WATCH.iter().any(|w| name.starts_with(w)) {
            seen.entry(name.to_string())
                .or_insert_with(|| path.to_string());
        }
    }
    seen.into_iter()
        .map(|(name, path)| LoadedLibrary { name, path })
        .collect()
}

/// The driver and devices: only a build with the cuda feature can ask.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaContext};

    pub fn devices(problems: &mut Vec<Problem>) -> (Option<String>, Vec<DeviceReport>) {
        let count = match CudaContext::device_count() {
            Ok(n) => n.max(0) as usize,
            Err(e) => {
                problems.push(Problem {
                    what: format!("the CUDA driver did not start: {e}"),
                    fix: "check that nvidia-smi works and that libcuda.so.1 is the driver's".into(),
                });
                return (None, Vec::new());
            }
        };
        let mut version = 0;
        // SAFETY: cuDriverGetVersion writes one int; the driver is initialised.
        let driver = (unsafe { sys::cuDriverGetVersion(&mut version) }
            == sys::CUresult::CUDA_SUCCESS)
            .then(|| format!("{}.{}", version / 1000, (version % 1000) / 10));
        let mut out = Vec::new();
        for ordinal in 0..count {
            let report = (|| -> Result<DeviceReport, String> {
                let ctx = CudaContext::new(ordinal).map_err(|e| e.to_string())?;
                let device = Device::new_cuda(ordinal).map_err(|e| e.to_string())?;
                let kernels =
                    crate::kernel_twins::check_twins(&device).map_err(|e| e.to_string())?;
                // A kernel that differs or fails: this process (and the
                // fix the problem names) trains on candle's composite ops.
                if kernels.iter().any(|k| !k.passed) {
                    crate::model::autograd_ops::set_fused_cuda_kernels(false);
                }
                let check = check_device(&device).map_err(|e| e.to_string())?;
                Ok(DeviceReport {
                    ordinal,
                    name: ctx.name().map_err(|e| e.to_string())?,
                    memory_gib: ctx.total_mem().map_err(|e| e.to_string())? as f64
                        / (1u64 << 30) as f64,
                    compute_capability: ctx.compute_capability().map_err(|e| e.to_string())?,
                    check: Some(check),
                    kernels,
                })
            })();
            match report {
                Ok(r) => out.push(r),
                Err(e) => problems.push(Problem {
                    fix: if e.contains("UNSUPPORTED_PTX_VERSION") {
                        "the driver is older than the nvcc that built the kernels: build with ./scripts/build-cuda (CUDA 13.0) or a toolkit no newer than the driver".into()
                    } else if e.contains("NO_BINARY_FOR_GPU") || e.contains("INVALID_PTX") {
                        "the kernels were built for another GPU: set CUDA_COMPUTE_CAP to this one's (e.g. 90) and rebuild".into()
                    } else {
                        "see the error; nvidia-smi shows whether the device is usable".into()
                    },
                    what: format!("cuda:{ordinal}: {e}"),
                }),
            }
        }
        (driver, out)
    }

    pub fn memory_used(device: &Device) -> Option<u64> {
        let Device::Cuda(d) = device else {
            return None;
        };
        let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
        Some((total - free) as u64)
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use super::*;

    pub fn devices(_: &mut Vec<Problem>) -> (Option<String>, Vec<DeviceReport>) {
        (None, Vec::new())
    }

    pub fn memory_used(_: &Device) -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_agrees_with_itself_and_a_missing_feature_is_a_problem() {
        let c = check_device(&Device::Cpu).unwrap();
        assert!(
            c.passed && c.max_gradient_rel_diff == 0.0 && c.loss == c.cpu_loss,
            "{c:?}"
        );
        // The tiny model's loss starts near ln(vocab) (GPT-2's 0.02 init).
        assert!((c.loss - (96f64).ln()).abs() < 0.1, "{}", c.loss);
        let r = collect(false, &[Expect::Cuda]);
        assert_eq!(r.features.cuda, cfg!(feature = "cuda"));
        if !cfg!(feature = "cuda") {
            assert!(r.devices.is_empty());
            assert!(
                r.problems
                    .iter()
                    .any(|p| p.what.contains("no cuda feature")
                        && p.fix.contains("scripts/build-cuda")),
                "{:?}",
                r.problems
            );
        }
        assert!(collect(false, &[]).problems.is_empty() || cfg!(feature = "cuda"));
        assert!(r.cpu.threads >= 1);
        assert!(matches!(device_from_name("cpu"), Ok(Device::Cpu)));
        assert!(device_from_name("gpu0")
            .unwrap_err()
            .contains("expected cpu, cuda or cuda:N"));
        if !cfg!(feature = "cuda") {
            assert!(device_from_name("cuda:1")
                .unwrap_err()
                .contains("build-cuda"));
        }
    }
}
