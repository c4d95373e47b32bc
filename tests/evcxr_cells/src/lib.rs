//! One "notebook cell": under the evcxr kernel every cell is compiled into a
//! shared library of its own, which links its own copy of `companion` and of
//! `tokenizers` (their `static`s and thread-locals included), while the
//! values a cell makes live on in the process and are used by later cells.
//! `tests/evcxr_cells.rs` loads this library twice under two file names to
//! get the same situation without a Jupyter kernel.
//!
//! Each function takes and returns plain C values; tokenizers cross between
//! the copies as pointers, as evcxr's variables do (the same compiled type).
//!
//! # Safety (every function)
//! String arguments are NUL-terminated and live for the call; tokenizer
//! pointers come from `cell_from_pretrained` / `cell_train_bpe` of either
//! copy and are never freed; strings passed to `cell_free_string` came from
//! `cell_tokenize`.

use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use companion::tokenizer::{self, AutoTokenizer, TrainArgs};

/// # Safety
/// `p` is a NUL-terminated string that lives for the call.
unsafe fn text(p: *const c_char) -> String {
    // SAFETY: as the caller promised.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn out(s: String) -> *mut c_char {
    CString::new(s).expect("no NUL").into_raw()
}

/// `AutoTokenizer::from_pretrained(dir)`, made in this copy; null on error.
///
/// # Safety
/// See the module doc.
#[no_mangle]
pub unsafe extern "C" fn cell_from_pretrained(dir: *const c_char) -> *mut AutoTokenizer {
    // SAFETY: see the module doc.
    match AutoTokenizer::from_pretrained(&unsafe { text(dir) }) {
        Ok(t) => Box::into_raw(Box::new(t)),
        Err(_) => std::ptr::null_mut(),
    }
}

/// A byte-level BPE of `vocab_size` tokens trained in this copy on the
/// `text` field of a JSONL corpus; null on error.
///
/// # Safety
/// See the module doc.
#[no_mangle]
pub unsafe extern "C" fn cell_train_bpe(
    corpus: *const c_char,
    vocab_size: usize,
) -> *mut AutoTokenizer {
    let run = || -> Option<AutoTokenizer> {
        // SAFETY: see the module doc.
        let path = unsafe { text(corpus) };
        let docs = companion::data::corpus::read_file(Path::new(&path), "text").ok()?;
        let args = TrainArgs {
            vocab_size,
            ..TrainArgs::default()
        };
        tokenizer::train(&args, docs.iter()).ok()
    };
    match run() {
        Some(t) => Box::into_raw(Box::new(t)),
        None => std::ptr::null_mut(),
    }
}

/// `tokenizer.tokenize(text)` run by this copy's code, tokens joined by a
/// space; a panic or an error comes back as text starting with `ERROR`.
///
/// # Safety
/// See the module doc.
#[no_mangle]
pub unsafe extern "C" fn cell_tokenize(tok: *const AutoTokenizer, s: *const c_char) -> *mut c_char {
    // SAFETY: see the module doc.
    let s = unsafe { text(s) };
    // SAFETY: see the module doc.
    let tok = unsafe { &*tok };
    let r = catch_unwind(AssertUnwindSafe(|| tok.tokenize(&s)));
    out(match r {
        Ok(Ok(tokens)) => tokens.join(" "),
        Ok(Err(e)) => format!("ERROR {e}"),
        Err(_) => "ERROR panic while tokenizing".into(),
    })
}

/// Free a string returned by `cell_tokenize`.
///
/// # Safety
/// See the module doc.
#[no_mangle]
pub unsafe extern "C" fn cell_free_string(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: see the module doc.
        drop(unsafe { CString::from_raw(s) });
    }
}
