//! The notebooks' doctest-style checks: [`check!`](crate::check) and
//! [`check_eq!`](crate::check_eq), and what a failed one does under the
//! evcxr kernel.

/// A claim a notebook cell makes that did not hold: the message says what
/// was expected and what the cell got.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("check failed: {0}")]
pub struct CheckFailed(pub String);

/// The exit status of an evcxr evaluation process ended by a failed check.
pub const CHECK_FAILED_EXIT_CODE: i32 = 86;

/// A failed check, as [`check!`](crate::check) reports it. Under the evcxr
/// kernel (its evaluation process has `EVCXR_IS_RUNTIME` set) this prints
/// the message and ends the evaluation process: evcxr 0.22 treats a panic and
/// an error returned through `?` alike as a cell that ran fine (it only
/// prints them), so nbval would pass a notebook whose claims are false; a
/// process that exits is the one failure the kernel reports as an error
/// (`Subprocess terminated`), and nbval then fails the cell. The kernel
/// starts a new process, so the cells after it must be run again. Anywhere
/// else it returns [`CheckFailed`] for the caller to pass up with `?`.
pub fn fail(message: String) -> CheckFailed {
    if std::env::var_os("EVCXR_IS_RUNTIME").is_some() {
        use std::io::Write;
        eprintln!("check failed: {message}");
        let _ = std::io::stderr().flush();
        // Let the kernel forward the message before the process goes.
        std::thread::sleep(std::time::Duration::from_millis(200));
        std::process::exit(CHECK_FAILED_EXIT_CODE);
    }
    CheckFailed(message)
}

/// `check!(condition, "what was expected, got {}", x)`: the doctest-style
/// assertion of the notebooks. A false condition fails the cell under the
/// evcxr kernel and returns [`CheckFailed`] through `?` anywhere else (see
/// [`fail`] for why `assert!` would not do).
#[macro_export]
macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            ::core::result::Result::Err($crate::notebook::check::fail(format!($($msg)+)))?;
        }
    };
}

/// `check_eq!(left, right, "what")`: [`check!`](crate::check) that both
/// sides are equal, showing both when they are not.
#[macro_export]
macro_rules! check_eq {
    ($left:expr, $right:expr, $($msg:tt)+) => {
        match (&$left, &$right) {
            (l, r) => $crate::check!(
                *l == *r,
                "{}: expected {:?}, got {:?}",
                format!($($msg)+),
                r,
                l
            ),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::CheckFailed;

    fn claim(x: u32) -> Result<u32, CheckFailed> {
        crate::check!(x > 2, "x must exceed 2, got {x}");
        crate::check_eq!(x % 2, 1, "x odd");
        Ok(x)
    }

    #[test]
    fn checks_return_errors_that_name_the_claim() {
        assert_eq!(claim(3), Ok(3));
        assert_eq!(claim(1), Err(CheckFailed("x must exceed 2, got 1".into())));
        assert_eq!(
            claim(4),
            Err(CheckFailed("x odd: expected 1, got 0".into()))
        );
    }
}
