//! Shared helpers of the end-to-end tests.
#![allow(dead_code)]

pub mod parallel_runs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (this package's folder).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn data(p: &str) -> PathBuf {
    root().join("data").join(p)
}

pub fn fixture(p: &str) -> PathBuf {
    root().join("tests").join("fixtures").join(p)
}

pub fn read_json(p: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `cargo`, run from the workspace root without the variables cargo sets for
/// a test process: build scripts that watch them (ring's watches
/// `CARGO_MANIFEST_DIR`) would otherwise see a change and rebuild, with
/// everything above them, what the test command has just built.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let set_for_tests = k.starts_with("CARGO_PKG_")
            || matches!(
                &*k,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
            );
        if set_for_tests {
            cmd.env_remove(&*k);
        }
    }
    cmd.current_dir(root());
    cmd
}

/// The `companion` program of this checkout, built by the same cargo
/// selection as the tests (a no-op when the test command built it first).
/// Asking cargo, rather than taking whatever `companion` lies in the target
/// folder, matters because the test command shares one target folder
/// between clones: the binary there may be another checkout's.
pub fn companion_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test exe");
        let release = exe
            .parent()
            .and_then(|d| d.parent())
            .is_some_and(|d| d.ends_with("release"));
        let mut args = vec![
            "build",
            "--workspace",
            "--exclude",
            "evcxr-cells",
            "--all-targets",
        ];
        args.push("--message-format=json-render-diagnostics");
        if cfg!(feature = "mpi") {
            args.extend(["--features", "mpi"]);
        }
        if release {
            args.push("--release");
        }
        let out = cargo()
            .args(&args)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run cargo build");
        assert!(out.status.success(), "building the companion binary failed");
        let bin = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["kind"][0] == "bin")
            .filter(|m| m["target"]["name"] == "companion" && m["profile"]["test"] == false)
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported the companion binary");
        assert!(bin.exists(), "{} is missing", bin.display());
        bin
    })
    .clone()
}

/// Run `companion ARGS` with extra environment variables.
pub fn companion(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(companion_bin());
    cmd.args(args).current_dir(root());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run companion")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The Python that has transformers/tokenizers/torch (scripts/test installs them).
pub fn python() -> String {
    std::env::var("COMPANION_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Run a Python script of tests/python and parse the JSON it prints on its
/// last line (libraries it imports may log to stdout before it: DeepSpeed's
/// accelerator notice does).
pub fn run_python(script: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(python())
        .arg(root().join("tests").join("python").join(script))
        .args(args)
        .current_dir(root())
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .expect("python3 must be installed (scripts/test installs its packages)");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Documents of a JSONL corpus file.
pub fn docs(p: &Path) -> Vec<String> {
    companion::data::corpus::read_file(p, "text").expect("corpus")
}

/// Largest absolute elementwise difference of two tensors of one shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensors of one shape")
}

/// Largest absolute difference, over the positions where `mask` is 1.
pub fn max_diff(
    ours: &candle_core::Tensor,
    want: &[Vec<Vec<f32>>],
    mask: Option<&[Vec<u32>]>,
) -> f32 {
    let ours: Vec<Vec<Vec<f32>>> = ours.to_vec3().unwrap();
    assert_eq!(ours.len(), want.len());
    let mut m = 0f32;
    for (b, (ro, rw)) in ours.iter().zip(want).enumerate() {
        assert_eq!(ro.len(), rw.len());
        for (t, (po, pw)) in ro.iter().zip(rw).enumerate() {
            if mask.map(|mk| mk[b][t] == 0).unwrap_or(false) {
                continue;
            }
            for (a, b) in po.iter().zip(pw) {
                m = m.max((a - b).abs());
            }
        }
    }
    m
}

/// Largest difference between our logits and Python `transformers`' for a
/// saved model folder (`check_model_roundtrip.py` loads it with
/// `GPT2LMHeadModel.from_pretrained`).
pub fn logits_diff_with_transformers(model_dir: &Path) -> f32 {
    use candle_core::{DType, Device, Tensor};
    let m = companion::GPT2LMHeadModel::from_pretrained(
        model_dir.to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let ids = vec![vec![1u32, 5, 9, 100, 200]];
    let ours = m
        .forward(&Tensor::new(ids.clone(), &Device::Cpu).unwrap(), None, None)
        .unwrap();
    let py = run_python(
        "check_model_roundtrip.py",
        &[
            model_dir.to_str().unwrap(),
            &serde_json::to_string(&ids).unwrap(),
        ],
    );
    let theirs: Vec<Vec<Vec<f32>>> = serde_json::from_value(py["logits"].clone()).unwrap();
    max_diff(&ours, &theirs, None)
}

/// The tiny GPT-2 fixture (2 layers, 16 wide, vocab 64, dropout 0.1) made by
/// `make_tiny_gpt2.py`.
pub fn tiny_gpt2() -> companion::GPT2LMHeadModel {
    companion::GPT2LMHeadModel::from_pretrained(
        fixture("tiny_gpt2").to_str().unwrap(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

/// `DataCollatorForLanguageModeling(mlm=False)` padding right with id 0.
pub fn collator() -> companion::data::DataCollatorForLanguageModeling {
    companion::data::DataCollatorForLanguageModeling {
        pad_token_id: Some(0),
        mlm: false,
        pad_to_multiple_of: None,
        padding_side: companion::tokenizer::PaddingSide::Right,
    }
}

/// A dataset of token rows (4 text bytes per token, for bits per byte).
pub fn dataset_of(rows: Vec<Vec<u32>>) -> companion::data::Dataset {
    let tokens = rows.iter().map(Vec::len).sum();
    companion::data::Dataset::from_rows(rows, tokens * 4, tokens)
}

/// `companion pretrain` flags for a tiny, short run on the shipped
/// validation split, writing `DIR/NAME` and `DIR/NAME_model`.
pub fn pretrain_flags(dir: &std::path::Path, name: &str) -> Vec<String> {
    let valid = data("corpus/validation.jsonl");
    let mut a: Vec<String> = [
        "pretrain",
        "--train-file",
        valid.to_str().unwrap(),
        "--no-validation",
        "--tokenizer-vocab-size",
        "300",
        "--n-layer",
        "2",
        "--n-embd",
        "32",
        "--n-head",
        "2",
        "--n-positions",
        "32",
        "--block-size",
        "32",
        "--max-steps",
        "3",
        "--logging-steps",
        "1",
        "--save-steps",
        "2",
        "--per-device-train-batch-size",
        "2",
        "--learning-rate",
        "1e-3",
        "--dropout",
        "0.1",
        "--max-new-tokens",
        "3",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend([
        "--output-dir".into(),
        dir.join(name).display().to_string(),
        "--save-model-dir".into(),
        dir.join(format!("{name}_model")).display().to_string(),
    ]);
    a
}

/// Run `companion pretrain` with those flags and `extra`.
pub fn pretrain(dir: &std::path::Path, name: &str, extra: &[&str]) -> std::process::Output {
    let flags = pretrain_flags(dir, name);
    let mut a: Vec<&str> = flags.iter().map(String::as_str).collect();
    a.extend(extra);
    let cache = dir.join("cache").display().to_string();
    companion(&a, &[("HF_DATASETS_CACHE", &cache)])
}

/// Whether `companion` was built with MPI ranks (COMPANION_REQUIRE_MPI set
/// makes a build without them a failure, not a skip).
pub fn has_mpi() -> bool {
    let version = stdout(&companion(&["--version"], &[]));
    let has = version.contains("(mpi)");
    if std::env::var_os("COMPANION_REQUIRE_MPI").is_some() {
        assert!(
            has,
            "COMPANION_REQUIRE_MPI is set but `companion --version` says {version}"
        );
    }
    has
}

/// `companion` with pretrain `flags` as `np` MPI processes (`--backend
/// mpi`) and, beside it, as `np` thread ranks (`--num-ranks`), sharing the
/// datasets cache `cache`: the two runs' JSON summaries.
pub fn mpirun_and_threads(
    np: usize,
    flags: &dyn Fn(&str) -> Vec<String>,
    cache: &Path,
) -> (serde_json::Value, serde_json::Value) {
    let mut mpi_args = vec!["-np".to_string(), np.to_string(), "--oversubscribe".into()];
    mpi_args.push(companion_bin().display().to_string());
    mpi_args.extend(flags("mpi"));
    mpi_args.extend(["--backend".into(), "mpi".into()]);
    let o = Command::new("mpirun")
        .args(&mpi_args)
        .current_dir(root())
        .env("HF_DATASETS_CACHE", cache)
        // Containers often run as root, which OpenMPI refuses unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("run mpirun (OpenMPI's launcher)");
    assert!(o.status.success(), "mpirun failed: {}", stderr(&o));
    let mpi = serde_json::from_str(stdout(&o).trim()).unwrap();
    let mut threads = flags("threads");
    threads.extend(["--num-ranks".into(), np.to_string()]);
    let t: Vec<&str> = threads.iter().map(String::as_str).collect();
    let o = companion(&t, &[("HF_DATASETS_CACHE", cache.to_str().unwrap())]);
    assert!(o.status.success(), "{}", stderr(&o));
    (mpi, serde_json::from_str(&stdout(&o)).unwrap())
}

/// A weight's values as the trainers' comparisons take them: all of them,
/// but for `c_attn.bias` without its key third, whose true gradient is
/// exactly zero (softmax is shift invariant along the keys), so AdamW turns
/// the rounding noise there into steps that depend on summation order.
pub fn compared_values(name: &str, t: &candle_core::Tensor) -> Vec<f32> {
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    if name.ends_with("attn.c_attn.bias") {
        let c = v.len() / 3; // [q | k | v]
        v.drain(c..2 * c);
    }
    v
}
