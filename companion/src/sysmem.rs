//! What this machine can give: memory, checked before a large allocation
//! (so that a config asking for terabytes is an error naming the size
//! instead of an abort inside the allocator), the memory this process has
//! used at most, and the matrix-multiply rate MFU is measured against.

/// Bytes the kernel says can be allocated without swapping (`MemAvailable`
/// of `/proc/meminfo`); `None` where that is not known (then nothing is
/// refused).
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// `Err` with a message naming `what` when `bytes` is more than this
/// machine has available.
pub fn check_fits(bytes: u64, what: &str) -> Result<(), String> {
    match available_bytes() {
        Some(avail) if bytes > avail => Err(format!(
            "{what} needs {} but this machine has {} available",
            human_bytes(bytes),
            human_bytes(avail)
        )),
        _ => Ok(()),
    }
}

/// Bytes as people read them (TB, GB, MB with two decimals, else kB).
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    for (unit, scale) in [("TB", 1e12), ("GB", 1e9), ("MB", 1e6)] {
        if b >= scale {
            return format!("{:.2} {unit}", b / scale);
        }
    }
    format!("{:.1} kB", b / 1e3)
}

/// Peak resident memory of this process (`VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The matrix-multiply rate of `device` in `dtype` through candle
/// (GFLOP/s), an `n`×`n` product of random values timed five times after a
/// warm-up: the peak MFU is measured against (what this machine's GEMM
/// reaches, not a datasheet; fp32 on a CPU, bf16 on a GPU).
pub fn gemm_gflops(
    device: &candle_core::Device,
    dtype: candle_core::DType,
    n: usize,
) -> candle_core::Result<f64> {
    use candle_core::{DType, Tensor};
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let wait = |c: &Tensor| c.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>();
    wait(&a.matmul(&b)?)?;
    let reps = 5;
    let t = std::time::Instant::now();
    let mut c = a.matmul(&b)?;
    for _ in 1..reps {
        c = a.matmul(&b)?;
    }
    // Reading a value waits for a GPU to finish.
    wait(&c)?;
    Ok(2.0 * (n * n * n) as f64 * reps as f64 / t.elapsed().as_secs_f64() / 1e9)
}

/// The GEMM rate MFU is measured against on `device`, in `dtype`: 1024³
/// on a CPU, 8192³ on a GPU (smaller products do not fill one).
pub fn peak_gflops(
    device: &candle_core::Device,
    dtype: candle_core::DType,
) -> candle_core::Result<f64> {
    gemm_gflops(device, dtype, if device.is_cpu() { 1024 } else { 8192 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_petabyte_does_not_fit_and_a_byte_does() {
        if available_bytes().is_none() {
            return; // not Linux: nothing is measured, so nothing is refused
        }
        let err = check_fits(1 << 50, "the model").unwrap_err();
        assert!(err.starts_with("the model needs 1125.90 TB"), "{err}");
        check_fits(1, "a byte").unwrap();
    }
}
