//! How much memory this machine can give, checked before a large
//! allocation, so that a config asking for terabytes is an error naming the
//! size instead of an abort inside the allocator.

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
