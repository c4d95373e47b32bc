//! What the notebooks show and check: rich output for the evcxr kernel
//! ([`display`]; the loss plot is [`crate::train::plot`]'s) and doctest-style checks ([`check!`](crate::check)).

pub mod check;
pub mod display;
pub mod reference;
pub mod shard_map;
pub mod watch;

pub use check::{fail, CheckFailed, CHECK_FAILED_EXIT_CODE};
pub use display::*;
pub use reference::{NotebookMode, ReferenceRun};
pub use shard_map::ShardMap;
pub use watch::{Sample, WatchTraining};

use std::path::Path;

use serde_json::Value;

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

/// A generation that ends by repeating one stretch of tokens: the last
/// `span` tokens (from `start`) have period `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loop {
    pub start: usize,
    pub period: usize,
    pub span: usize,
}

impl Loop {
    /// How many times the repeated stretch occurs (the last one may be cut).
    pub fn repeats(&self) -> f64 {
        self.span as f64 / self.period as f64
    }

    /// The longest periodic tail of `ids` (period at most `max_period`) that
    /// repeats its stretch at least three times; the shortest period wins a
    /// tie. `None` when the output does not end in a loop.
    pub fn find(ids: &[u32], max_period: usize) -> Option<Loop> {
        let n = ids.len();
        let mut best: Option<Loop> = None;
        for period in 1..=max_period.min(n / 3) {
            let mut start = n - period;
            while start > 0 && ids[start - 1] == ids[start - 1 + period] {
                start -= 1;
            }
            let span = n - start;
            if span >= 3 * period && best.is_none_or(|b| span > b.span) {
                best = Some(Loop {
                    start,
                    period,
                    span,
                });
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::{Loop, TextStats};

    #[test]
    fn loops_are_found_at_the_tail_only() {
        let ids = [9, 8, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1];
        let l = Loop::find(&ids, 8).unwrap();
        assert_eq!((l.start, l.period, l.span), (2, 3, 10));
        assert!((l.repeats() - 10.0 / 3.0).abs() < 1e-12);
        assert_eq!(Loop::find(&[5, 5, 5, 5], 8).unwrap().period, 1);
        // Two repeats are not a loop; a repeat earlier on is not one at the end.
        assert_eq!(Loop::find(&[1, 2, 1, 2, 7], 8), None);
        assert_eq!(Loop::find(&[1, 2, 3, 4, 5, 6], 8), None);
    }

    #[test]
    fn text_stats_count_words_and_blank_runs() {
        let t = TextStats::of("a b a\n\n\n\nc");
        assert_eq!((t.words, t.distinct_words, t.longest_blank_run), (4, 3, 3));
        assert_eq!(TextStats::of("x\ny\n").longest_blank_run, 1);
        assert_eq!(TextStats::of("one line").longest_blank_run, 0);
    }
}
