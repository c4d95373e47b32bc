//! What the notebooks show and check: rich output for the evcxr kernel
//! ([`display`], [`plot`]) and doctest-style checks ([`check!`](crate::check)).

pub mod display;
pub mod plot;

pub use display::*;

/// A claim a notebook cell makes that did not hold: the message says what
/// was expected and what the cell got.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("check failed: {0}")]
pub struct CheckFailed(pub String);

/// `check!(condition, "what was expected, got {}", x)`: the doctest-style
/// assertion of the notebooks. Under the evcxr kernel a panic only prints to
/// stderr and the cell still counts as run, so a failed `assert!` would not
/// fail the notebook's test; an error returned through `?` does (the kernel
/// replies with an error, and nbval fails the cell). `check!` returns
/// [`CheckFailed`] that way, from a cell or from any function whose error
/// type converts from it.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            ::core::result::Result::Err($crate::notebook::CheckFailed(format!($($msg)+)))?;
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
