//! What the notebooks show and check: rich output for the evcxr kernel
//! ([`display`], [`plot`]) and doctest-style checks ([`check!`](crate::check)).

pub mod display;
pub mod plot;

pub use display::*;

use std::path::Path;

use serde_json::Value;

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
            ::core::result::Result::Err($crate::notebook::fail(format!($($msg)+)))?;
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

/// A JSON fixture that Python `transformers`/`tokenizers` wrote, read from
/// the notebooks' `fixtures/` folder (the kernel runs in the notebook's folder).
#[derive(Debug, Clone)]
pub struct Fixture(pub Value);

impl Fixture {
    /// `fixtures/{name}.json`.
    pub fn load(name: &str) -> Result<Self, CheckFailed> {
        Self::from_file(&Path::new("fixtures").join(format!("{name}.json")))
    }

    pub fn from_file(path: &Path) -> Result<Self, CheckFailed> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CheckFailed(format!("{}: {e}", path.display())))?;
        serde_json::from_str(&text)
            .map(Fixture)
            .map_err(|e| CheckFailed(format!("{}: not JSON: {e}", path.display())))
    }

    /// The value at a JSON pointer (`/gpt2/chapter/ids`), as `T`.
    pub fn at<T: serde::de::DeserializeOwned>(&self, pointer: &str) -> Result<T, CheckFailed> {
        let v = self
            .0
            .pointer(pointer)
            .ok_or_else(|| CheckFailed(format!("the fixture has no {pointer}")))?;
        serde_json::from_value(v.clone())
            .map_err(|e| CheckFailed(format!("fixture {pointer}: {e}")))
    }
}

/// What tells generated text from degenerate output (a run of newlines, one
/// word repeated): counts a cell can bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextStats {
    /// Whitespace-separated words.
    pub words: usize,
    pub distinct_words: usize,
    /// The longest run of consecutive empty lines.
    pub longest_blank_run: usize,
}

impl TextStats {
    pub fn of(text: &str) -> Self {
        let words: Vec<&str> = text.split_whitespace().collect();
        let distinct: std::collections::HashSet<&str> = words.iter().copied().collect();
        let (mut run, mut longest) = (0, 0);
        for line in text.split('\n').skip(1) {
            run = if line.trim().is_empty() { run + 1 } else { 0 };
            longest = longest.max(run);
        }
        TextStats {
            words: words.len(),
            distinct_words: distinct.len(),
            longest_blank_run: longest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{CheckFailed, TextStats};

    #[test]
    fn text_stats_count_words_and_blank_runs() {
        let t = TextStats::of("a b a\n\n\n\nc");
        assert_eq!((t.words, t.distinct_words, t.longest_blank_run), (4, 3, 3));
        assert_eq!(TextStats::of("x\ny\n").longest_blank_run, 1);
        assert_eq!(TextStats::of("one line").longest_blank_run, 0);
    }

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
