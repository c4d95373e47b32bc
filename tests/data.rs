//! 4.3.4's datasets from files `datasets` writes: Parquet (snappy and zstd)
//! read like the same documents in JSONL, and dataset files from the hub
//! (`hf://datasets/…`) through the Hugging Face cache.

mod common;

use common::*;
use companion::data::corpus::read_file;

#[test]
fn parquet_reads_like_jsonl() {
    let want = read_file(&fixture("corpus_small.jsonl"), "text").unwrap();
    assert_eq!(want.len(), 8);
    for f in ["corpus_small.parquet", "corpus_small_zstd.parquet"] {
        // The empty and the null row are dropped, as empty JSONL documents are.
        let got = read_file(&fixture(f), "text").unwrap();
        assert_eq!(got, want, "{f}");
    }
}

#[test]
fn parquet_errors_name_the_file_and_column() {
    let f = fixture("corpus_small.parquet");
    let e = read_file(&f, "content").unwrap_err().to_string();
    assert!(
        e.contains("corpus_small.parquet") && e.contains("no column `content` (columns: id, text)"),
        "{e}"
    );
    let e = read_file(&f, "id").unwrap_err().to_string();
    assert!(e.contains("column `id` holds 0, expected a string"), "{e}");
    // A binary column is described, not printed (tests/fixtures/
    // make_parquet_binary_fixture.py: rows of 4096 bytes).
    let e = read_file(&fixture("corpus_binary.parquet"), "text")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("column `text` holds binary data (4096 bytes), expected a string")
            && e.len() < 300,
        "{e}"
    );
    let e = read_file(
        &fixture("corpus_small.jsonl").with_extension("parquet.missing"),
        "text",
    );
    assert!(e.is_err());
    let not_parquet = tempfile::Builder::new()
        .suffix(".parquet")
        .tempfile()
        .unwrap();
    std::fs::write(not_parquet.path(), b"{\"text\": \"hello\"}\n").unwrap();
    let e = read_file(not_parquet.path(), "text")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a Parquet file"), "{e}");
}

/// A Hugging Face cache holding one dataset repository, laid out as
/// `huggingface_hub` does (`datasets--OWNER--NAME/refs/main`, `snapshots/REV/…`).
fn fake_dataset_cache() -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("datasets--someone--python-docs");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    let snap = repo.join("snapshots").join(rev).join("data");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::copy(
        fixture("corpus_small.parquet"),
        snap.join("train-00000-of-00001.parquet"),
    )
    .unwrap();
    cache
}

#[test]
fn hub_dataset_files_come_from_the_cache() {
    let cache = fake_dataset_cache();
    let out = tempfile::tempdir().unwrap();
    let env = [
        ("HF_HUB_CACHE", cache.path().to_str().unwrap()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let tok = out.path().join("tok");
    let o = companion(
        &[
            "tokenizer",
            "train",
            "--corpus",
            "hf://datasets/someone/python-docs/data/train-00000-of-00001.parquet",
            "--vocab-size",
            "300",
            "--out",
            tok.to_str().unwrap(),
            "--json",
        ],
        &env,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(tok.join("tokenizer.json").is_file());
    // A file the repository does not have: one error naming what was looked for and where.
    let o = companion(
        &[
            "tokenizer",
            "train",
            "--corpus",
            "hf://datasets/someone/python-docs/data/test.parquet",
            "--vocab-size",
            "300",
            "--out",
            tok.to_str().unwrap(),
        ],
        &env,
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("someone/python-docs")
            && e.contains("data/test.parquet")
            && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    let o = companion(
        &[
            "tokenizer",
            "train",
            "--corpus",
            "hf://datasets/just-a-name",
            "--out",
            tok.to_str().unwrap(),
        ],
        &env,
    );
    assert!(
        stderr(&o).contains("expected hf://datasets/OWNER/NAME/PATH/TO/FILE"),
        "{}",
        stderr(&o)
    );
}
