//! Tokenizers made in one evcxr cell and used in another give their own
//! tokens. Under the evcxr kernel every cell is a shared library with its own
//! copy of `companion` and `tokenizers`; `tokenizers` keys its thread-local
//! BPE cache by an id from a per-copy `static` counter, so tokenizers made in
//! two cells could share an id and one would read the other's cached merges
//! (the 4.3.2 notebook once showed GPT-2's token ids spelled with our
//! vocabulary). This test loads the stand-in cell library of
//! `tests/evcxr_cells/` twice, makes GPT-2's tokenizer in one copy and a
//! trained BPE in the other, and tokenizes with both in the first copy.

mod common;

use std::ffi::{c_char, CStr, CString};
use std::path::PathBuf;

use companion::tokenizer::{self, AutoTokenizer, TrainArgs};

/// Build the cell library (with the notebooks' features, which only this
/// package selects) and return its path. It takes this build's `mpi` too:
/// then every dependency but `tokenizers` (its regex engine) resolves the
/// same features as the workspace build, and cargo reuses them instead of
/// compiling candle, arrow and the rest a second time.
fn build_cell_library() -> PathBuf {
    let mut args = vec!["build", "-p", "evcxr-cells", "--message-format=json"];
    if cfg!(feature = "mpi") {
        args.extend(["--features", "companion/mpi"]);
    }
    let out = common::cargo()
        .args(args)
        .output()
        .expect("run cargo build -p evcxr-cells");
    assert!(
        out.status.success(),
        "building tests/evcxr_cells failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "evcxr_cells")
        .flat_map(|m| {
            m["filenames"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|f| f.as_str().map(PathBuf::from))
        })
        .find(|f| {
            f.extension()
                .is_some_and(|e| e == std::env::consts::DLL_EXTENSION)
        })
        .expect("cargo reported the cell library")
}

type Make = unsafe extern "C" fn(*const c_char) -> *mut AutoTokenizer;
type Train = unsafe extern "C" fn(*const c_char, usize) -> *mut AutoTokenizer;
type Tokenize = unsafe extern "C" fn(*const AutoTokenizer, *const c_char) -> *mut c_char;
type Free = unsafe extern "C" fn(*mut c_char);

/// One loaded copy of the cell library.
struct Cell {
    _lib: libloading::Library,
    make: Make,
    train: Train,
    tokenize: Tokenize,
    free: Free,
}

impl Cell {
    /// Load `lib` under its own file name in `dir`, so the loader maps a
    /// second, independent copy (as evcxr's per-cell libraries are).
    fn load(lib: &std::path::Path, dir: &std::path::Path, name: &str) -> Cell {
        let copy = dir.join(format!("{name}.{}", std::env::consts::DLL_EXTENSION));
        std::fs::copy(lib, &copy).expect("copy the cell library");
        // SAFETY: the library is ours, built by the same compiler for this
        // process; its initialisers have no side effects.
        unsafe {
            let l = libloading::Library::new(&copy).expect("load the cell library");
            let make = *l.get::<Make>(b"cell_from_pretrained").expect("symbol");
            let train = *l.get::<Train>(b"cell_train_bpe").expect("symbol");
            let tokenize = *l.get::<Tokenize>(b"cell_tokenize").expect("symbol");
            let free = *l.get::<Free>(b"cell_free_string").expect("symbol");
            Cell {
                _lib: l,
                make,
                train,
                tokenize,
                free,
            }
        }
    }

    fn tokenize(&self, tok: *const AutoTokenizer, text: &str) -> String {
        let c = CString::new(text).unwrap();
        // SAFETY: `tok` is a live tokenizer made by a cell; the string is freed by its maker.
        unsafe {
            let p = (self.tokenize)(tok, c.as_ptr());
            let s = CStr::from_ptr(p).to_string_lossy().into_owned();
            (self.free)(p);
            s
        }
    }
}

fn cstr(p: &std::path::Path) -> CString {
    CString::new(p.to_string_lossy().as_bytes()).unwrap()
}

#[test]
fn tokenizers_made_in_different_cells_keep_their_own_tokens() {
    let lib = build_cell_library();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (
        Cell::load(&lib, tmp.path(), "cell_a"),
        Cell::load(&lib, tmp.path(), "cell_b"),
    );
    let text = "abstract: This is an example of text. introduction: This is an introduction.";
    let corpus = common::data("corpus/validation.jsonl");

    // Cell B trains our BPE; its cache id comes from B's counter.
    // SAFETY: plain C calls into the loaded library with live strings.
    let ours = unsafe { (b.train)(cstr(&corpus).as_ptr(), 2000) };
    assert!(!ours.is_null(), "training in cell B failed");
    // Cell A loads GPT-2's tokenizer several times, so that A's counter hands
    // out every small id, and tokenizes with each (filling A's cache).
    let gpt2_dir = cstr(&common::data("pretrained/gpt2"));
    let gpt2_tokens: Vec<String> = (0..16)
        .map(|_| {
            // SAFETY: as above.
            let g = unsafe { (a.make)(gpt2_dir.as_ptr()) };
            assert!(!g.is_null(), "loading gpt2 in cell A failed");
            a.tokenize(g, text)
        })
        .collect();

    // What each tokenizer must give: the same files loaded and trained in
    // this test's own copy of the code.
    let gpt2 =
        AutoTokenizer::from_pretrained(&common::data("pretrained/gpt2").to_string_lossy()).unwrap();
    let docs = companion::data::corpus::read_file(&corpus, "text").unwrap();
    let trained = tokenizer::train(
        &TrainArgs {
            vocab_size: 2000,
            ..TrainArgs::default()
        },
        docs.iter(),
    )
    .unwrap();
    let want_gpt2 = gpt2.tokenize(text).unwrap().join(" ");
    let want_ours = trained.tokenize(text).unwrap().join(" ");
    assert!(want_gpt2.starts_with("ab stract"), "{want_gpt2}");
    assert_ne!(want_ours, want_gpt2);
    for got in &gpt2_tokens {
        assert_eq!(got, &want_gpt2);
    }
    // Cell A now tokenizes with the tokenizer cell B made, then both cells
    // with both tokenizers, in turn.
    assert_eq!(a.tokenize(ours, text), want_ours, "our BPE used in cell A");
    for cell in [&a, &b, &a] {
        assert_eq!(cell.tokenize(ours, text), want_ours);
    }
}
