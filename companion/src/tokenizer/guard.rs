//! `tokenizers`' encodes, with a panic inside them turned into an error.
//! Oniguruma gives up on a pre-tokenizer regex that backtracks without end
//! (`(a|a?)+$` on a long run of `a`) and the binding panics; a tokenizer.json
//! can carry such a regex, so it must end the run with an error naming the
//! problem (and let the caller clean up), not abort it.

use std::cell::Cell;

thread_local! {
    /// How many guarded encodes this thread is inside: their panics are
    /// caught and reported as errors, so the panic hook stays quiet.
    static GUARDED: Cell<usize> = const { Cell::new(0) };
}

/// The process's panic hook, silent for panics a guard catches.
fn quiet_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(Cell::get) == 0 {
                previous(info);
            }
        }));
    });
}

/// Run `f`, one encode of `tokenizers`; its error or its panic comes back
/// as the message of a `TokenizerError::Tokenizers`.
pub(crate) fn guarded<T, E: std::fmt::Display>(
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, String> {
    quiet_hook();
    GUARDED.with(|g| g.set(g.get() + 1));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(g.get() - 1));
    match caught {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            Err(format!(
                "encoding failed inside `tokenizers`: {msg} (a pre-tokenizer or normalizer regex in tokenizer.json that backtracks without end does this: fix the regex)"
            ))
        }
    }
}
