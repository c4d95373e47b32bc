//! The bad-input suite: what a user can hand `companion` by mistake or by
//! malice (model files, configs, tokenizers, corpora, ds_configs, flags,
//! crashes during save, concurrency, hub stalls, path traversal), run as
//! the user meets it, through the program. Every case must end in a clear
//! error naming what is wrong, a non-zero exit that is not a crash (no
//! abort, no panic), and no damage to what was there before.
//! (`ds_config` verdicts against DeepSpeed's own are in tests/zero.rs, the
//! kill -9 campaign in tests/crash.rs.)

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A small trained model folder (config, weights, generation config,
/// tokenizer), made once for the cases that need one.
fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let o = pretrain(&dir, "base", &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        dir.join("base_model")
    })
}

/// A copy of the model folder to damage.
fn model_copy(into: &Path) -> PathBuf {
    let d = into.join("model");
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(model_dir()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    d
}

/// The run failed as an error, not a crash: exit status 1 (an abort is
/// 134, a panic 101), and stderr says `want`.
fn refused(o: &Output, want: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit {:?}: {err}", o.status);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(want), "wanted `{want}` in: {err}");
}

/// The tiny run of `pretrain_flags` with `extra` flags replacing the ones
/// it sets (`--flag value` or `--flag=value`).
fn pretrain_with(dir: &Path, name: &str, extra: &[&str]) -> Output {
    let mut a = pretrain_flags(dir, name);
    let mut i = 0;
    while i < extra.len() {
        let flag = extra[i];
        let value = extra
            .get(i + 1)
            .filter(|v| !flag.contains('=') && !v.starts_with("--"));
        if flag == "--validation-file" {
            a.retain(|x| x != "--no-validation");
        }
        match (a.iter().position(|x| x == flag), value) {
            (Some(p), Some(v)) => a[p + 1] = v.to_string(),
            (_, v) => {
                a.push(flag.to_string());
                a.extend(v.map(|v| v.to_string()));
            }
        }
        i += if value.is_some() { 2 } else { 1 };
    }
    let cache = dir.join("cache").display().to_string();
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    companion(&a, &[("HF_DATASETS_CACHE", &cache)])
}

/// `companion eval` of model folder `d` on the shipped validation split.
fn eval_on(d: &Path) -> Output {
    let valid = data("corpus/validation.jsonl");
    companion(
        &[
            "eval",
            "--model",
            d.to_str().unwrap(),
            "--data",
            valid.to_str().unwrap(),
        ],
        &[],
    )
}

fn checkpoints(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    v.sort();
    v
}

// ---- concurrency ----------------------------------------------------------

/// Hold `dir` as another process would (this test process, through the
/// lock file as a run takes it) until the file is dropped.
fn hold(dir: &Path) -> std::fs::File {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(dir.join(".companion.lock"))
        .unwrap();
    lock.try_lock().unwrap();
    lock
}

#[test]
fn a_second_run_into_a_held_output_dir_is_refused_and_a_finished_one_releases_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    let lock = hold(&out);
    std::fs::write(out.join(".companion.lock"), "process 4242 on elsewhere").unwrap();
    let o = pretrain_with(dir.path(), "run", &[]);
    refused(&o, "is in use by another run (process 4242 on elsewhere");
    assert!(checkpoints(&out).is_empty());
    drop(lock);
    let o = pretrain_with(dir.path(), "run", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Released at exit: the next run starts.
    let o = pretrain_with(dir.path(), "run", &["--max-steps", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Two tokenizer trainings into one `--out` folder: the second is refused
/// while the first holds it (they used to leave one mixed folder).
#[test]
fn a_second_tokenizer_training_into_a_held_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tok");
    std::fs::create_dir_all(&out).unwrap();
    let lock = hold(&out);
    let corpus = data("corpus/validation.jsonl");
    let args = [
        "tokenizer",
        "train",
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--vocab-size",
        "300",
    ];
    refused(&companion(&args, &[]), "is in use by another run");
    assert!(!out.join("tokenizer.json").exists());
    drop(lock);
    let o = companion(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A lock file replaced by a symbolic link is refused, and the file it
/// points to (outside the folder) is neither emptied nor written.
#[cfg(unix)]
#[test]
fn a_lock_file_that_is_a_symlink_is_refused_and_its_target_kept() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, "keep me").unwrap();
    std::os::unix::fs::symlink(&precious, out.join(".companion.lock")).unwrap();
    let o = pretrain_with(dir.path(), "run", &[]);
    refused(&o, "not a regular file");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
    assert!(checkpoints(&out).is_empty());
}

/// A tokenizer without bos/eos: the saved config and generation config
/// carry no special ids rather than GPT-2's 50256, which is outside a
/// 300-token vocabulary (transformers' generate() failed on it).
#[test]
fn a_tokenizer_without_bos_and_eos_gives_a_config_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok");
    let corpus = data("corpus/validation.jsonl");
    let o = companion(
        &[
            "tokenizer",
            "train",
            "--corpus",
            corpus.to_str().unwrap(),
            "--out",
            tok.to_str().unwrap(),
            "--vocab-size",
            "300",
            "--special-tokens",
            "",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = pretrain_with(dir.path(), "run", &["--tokenizer", tok.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let model = dir.path().join("run_model");
    for file in ["config.json", "generation_config.json"] {
        let v = read_json(&model.join(file));
        for key in ["bos_token_id", "eos_token_id"] {
            let id = &v[key];
            assert!(
                id.is_null() || id.as_u64().is_some_and(|i| i < 300),
                "{file}: {key} = {id} in a 300-token vocabulary"
            );
        }
    }
}

/// Settings that used to be accepted and make nonsense, or be read in a
/// way transformers does not: `eval_steps` 0 falls back to
/// `logging_steps`; a negative `layer_norm_epsilon` is refused; a flag
/// given twice takes the last value (argparse); a JSONL with a UTF-8
/// byte-order mark reads as Python's `utf-8-sig` does.
#[test]
fn settings_transformers_reads_otherwise_are_read_its_way() {
    let dir = tempfile::tempdir().unwrap();
    let valid = data("corpus/validation.jsonl");
    let o = pretrain_with(
        dir.path(),
        "ev",
        &[
            "--validation-file",
            valid.to_str().unwrap(),
            "--max-eval-samples",
            "2",
            "--eval-strategy",
            "steps",
            "--eval-steps",
            "0",
            "--logging-steps",
            "3",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let state = read_json(&dir.path().join("ev/trainer_state.json"));
    let evals: Vec<u64> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("eval_loss").is_some())
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        evals,
        vec![3],
        "eval_steps 0 evaluates every logging_steps (3 of 3 steps)"
    );

    let bad = dir.path().join("bad_config");
    std::fs::create_dir_all(&bad).unwrap();
    let mut cfg = read_json(&data("pretrained/gpt2/config.json"));
    cfg["layer_norm_epsilon"] = serde_json::json!(-1.0);
    std::fs::write(bad.join("config.json"), cfg.to_string()).unwrap();
    let o = companion(&["config", "--from", bad.to_str().unwrap()], &[]);
    refused(&o, "layer_norm_epsilon must be a positive number, got -1");

    let o = companion(
        &[
            "config",
            "--from",
            "gpt2",
            "--n-layer",
            "2",
            "--n-layer",
            "3",
            "--json",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["n_layer"], 3, "the last --n-layer wins");

    let bom = dir.path().join("bom.jsonl");
    let text = std::fs::read_to_string(&valid).unwrap();
    std::fs::write(&bom, format!("\u{feff}{text}")).unwrap();
    assert_eq!(
        companion::data::corpus::read_file(&bom, "text").unwrap(),
        companion::data::corpus::read_file(&valid, "text").unwrap()
    );
}

/// Messages that misled now say what is wrong: `eval --max-samples 0`
/// (it blamed the text's length), a prompt alone as long as n_positions
/// (it said to ask for fewer new tokens), a temperature whose inverse
/// overflows (it sampled token 0).
#[test]
fn misleading_messages_name_the_real_problem() {
    let model = root().join("notebooks/fixtures/pretrained_model");
    let model = model.to_str().unwrap();
    let valid = data("corpus/validation.jsonl");
    let o = companion(
        &[
            "eval",
            "--model",
            model,
            "--data",
            valid.to_str().unwrap(),
            "--max-samples",
            "0",
        ],
        &[],
    );
    refused(&o, "--max-samples 0: evaluate at least 1 block");
    let long = "hello ".repeat(200);
    let o = companion(&["generate", "--model", model, "--prompt", &long], &[]);
    refused(&o, "as long as the model's n_positions = 128 or longer");
    let o = companion(
        &[
            "generate",
            "--model",
            model,
            "--prompt",
            "Hi",
            "--do-sample",
            "--temperature",
            "1e-50",
        ],
        &[],
    );
    refused(&o, "temperature 1e-50 is too small");
    let dir = tempfile::tempdir().unwrap();
    let o = pretrain_with(dir.path(), "p", &["--prompt", &long]);
    refused(&o, "as long as the model's n_positions 32 or longer");
}

// ---- memory bombs ---------------------------------------------------------

/// Sizes no machine can allocate are refused by name before anything is
/// allocated (they aborted with 134 inside the tokenizer trainers and the
/// block packer), and zero counts in `bench` are flag errors, not panics.
#[test]
fn huge_vocabularies_and_blocks_and_zero_bench_steps_are_errors_not_aborts() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = data("corpus/validation.jsonl");
    let corpus = corpus.to_str().unwrap();
    let out = dir.path().join("tok");
    let out = out.to_str().unwrap();
    for model in ["bpe", "unigram"] {
        let o = companion(
            &[
                "tokenizer",
                "train",
                "--corpus",
                corpus,
                "--out",
                out,
                "--vocab-size",
                "4000000000",
                "--model",
                model,
            ],
            &[],
        );
        refused(&o, "vocab_size 4000000000");
    }
    let o = pretrain_with(dir.path(), "run", &["--tokenizer-vocab-size", "4000000000"]);
    refused(&o, "vocab_size 4000000000");
    let o = companion(
        &[
            "bench",
            "data",
            "--corpus",
            corpus,
            "--block-size",
            "1000000000000",
        ],
        &[],
    );
    refused(&o, "block_size 1000000000000");
    for args in [
        &["bench", "train", "--steps", "0"][..],
        &["bench", "generate", "--steps", "0"],
        &["bench", "trainer", "--steps", "0"],
    ] {
        let o = companion(args, &[]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("--steps") && !err.contains("panicked"),
            "{err}"
        );
    }
}

#[test]
fn configs_asking_for_more_memory_than_exists_are_errors_not_aborts() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, want) in [
        (
            vec!["--n-layer", "100000", "--n-embd", "1024", "--n-head", "8"],
            "available",
        ),
        (vec!["--n-positions", "1000000000000"], "available"),
        (vec!["--n-embd", "1000000", "--n-head", "1"], "available"),
    ] {
        let o = pretrain_with(dir.path(), "bomb", &flags);
        refused(&o, want);
    }
    let o = companion(
        &[
            "config",
            "--from",
            "gpt2",
            "--n-embd",
            "4294967296",
            "--n-head",
            "16",
        ],
        &[],
    );
    refused(&o, "more parameters than this machine can count");
    // A config.json that does not match its weights: refused before a
    // single tensor is read, in moments.
    let d = model_copy(dir.path());
    let mut c: Value = read_json(&d.join("config.json"));
    c["n_layer"] = 1_000_000_000.into();
    std::fs::write(d.join("config.json"), c.to_string()).unwrap();
    let t = Instant::now();
    let o = eval_on(&d);
    refused(&o, "more than these weights files");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

// ---- non-finite training --------------------------------------------------

#[test]
fn a_diverging_run_never_writes_a_non_finite_checkpoint_and_keeps_the_last_finite_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nan");
    let o = pretrain_with(
        dir.path(),
        "nan",
        &[
            "--learning-rate",
            "1e300",
            "--save-steps",
            "1",
            "--save-total-limit",
            "1",
            "--max-steps",
            "10",
            "--eval-strategy",
            "no",
        ],
    );
    refused(&o, "not finite");
    // What is left is finite (the first step's learning rate is 0 under
    // warmup, so checkpoint-1 is good), and the message names it.
    for c in checkpoints(&out) {
        let t = candle_core::safetensors::load(
            out.join(&c).join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for (name, w) in t {
            let v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{c}: {name}");
        }
        assert!(
            stderr(&o).contains(&format!("{c}, is kept")),
            "{}",
            stderr(&o)
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
    // Two good steps, then the same run resumed with a learning rate that
    // blows up: checkpoint-2 survives rotation and is named.
    let keep_one = |more: &[&'static str]| -> Vec<&'static str> {
        [&["--save-steps", "1", "--save-total-limit", "1"][..], more].concat()
    };
    let o = pretrain_with(dir.path(), "nan", &keep_one(&["--max-steps", "2"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = pretrain_with(
        dir.path(),
        "nan",
        &keep_one(&[
            "--max-steps",
            "6",
            "--learning-rate",
            "1e300",
            "--resume-from-checkpoint",
            "latest",
        ]),
    );
    refused(&o, "checkpoint-2");
    assert_eq!(checkpoints(&out), ["checkpoint-2"]);
    let o = pretrain_with(
        dir.path(),
        "nan",
        &[
            "--save-steps",
            "1",
            "--max-steps",
            "3",
            "--resume-from-checkpoint",
            "latest",
        ],
    );
    assert!(
        o.status.success(),
        "the kept checkpoint resumes: {}",
        stderr(&o)
    );
}

// ---- the hub --------------------------------------------------------------

/// `companion ARGS` with a hub at `endpoint`, an empty cache and online.
fn with_hub(args: &[&str], endpoint: &str, cache: &Path) -> (Output, Duration) {
    let mut cmd = Command::new(companion_bin());
    cmd.args(args)
        .current_dir(root())
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HUB_ETAG_TIMEOUT", "1")
        .env("HF_HUB_DOWNLOAD_TIMEOUT", "1");
    let t = Instant::now();
    let o = cmd.output().unwrap();
    (o, t.elapsed())
}

#[test]
fn a_hub_that_never_answers_times_out_naming_the_id_and_the_endpoint() {
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", server.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in server.incoming() {
            held.push(s); // accept, never answer
        }
    });
    let cache = tempfile::tempdir().unwrap();
    let (o, took) = with_hub(
        &[
            "tokenizer",
            "show",
            "--tokenizer",
            "someone/unknown-id",
            "--text",
            "x",
        ],
        &endpoint,
        cache.path(),
    );
    refused(&o, "someone/unknown-id");
    refused(&o, &endpoint);
    assert!(took < Duration::from_secs(15), "{took:?}");
    // A path that does not exist is not sent to the hub as an id.
    let (o, _) = with_hub(
        &[
            "tokenizer",
            "show",
            "--tokenizer",
            "/no/such/folder",
            "--text",
            "x",
        ],
        &endpoint,
        cache.path(),
    );
    refused(&o, "not a hub repo id");
    assert!(!stderr(&o).contains("download"), "{}", stderr(&o));
}

// ---- path traversal -------------------------------------------------------

#[test]
fn a_sharded_index_pointing_outside_the_model_folder_is_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    for target in [
        "../elsewhere.safetensors",
        "/etc/passwd",
        "sub/model.safetensors",
    ] {
        let d = model_copy(&dir.path().join(target.replace('/', "_")));
        std::fs::rename(
            d.join("model.safetensors"),
            d.join("../elsewhere.safetensors"),
        )
        .unwrap();
        let index =
            serde_json::json!({"metadata": {}, "weight_map": {"transformer.wte.weight": target}});
        std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let o = eval_on(&d);
        refused(&o, "not a file name in the model folder");
    }
}

#[test]
fn a_cache_ref_holding_a_path_does_not_leave_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--someone--m");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "../../../outside").unwrap();
    let outside = cache.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::copy(model_dir().join("config.json"), outside.join("config.json")).unwrap();
    let o = companion(
        &["config", "--from", "someone/m"],
        &[
            ("HF_HUB_CACHE", cache.path().to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    refused(&o, "does not hold a commit name");
}

// ---- checkpoints and saves ------------------------------------------------

#[test]
fn save_total_limit_zero_deletes_nothing_and_saved_files_have_the_umask_mode() {
    let dir = tempfile::tempdir().unwrap();
    let o = pretrain_with(
        dir.path(),
        "keep",
        &[
            "--save-steps",
            "1",
            "--max-steps",
            "3",
            "--save-total-limit",
            "0",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        checkpoints(&dir.path().join("keep")),
        ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        std::fs::write(dir.path().join("plain"), "").unwrap();
        let plain = mode(&dir.path().join("plain"));
        for f in [
            "keep_model/config.json",
            "keep_model/model.safetensors",
            "keep_model/tokenizer.json",
            "keep/trainer_state.json",
            "keep/tokenizer/tokenizer.json",
        ] {
            assert_eq!(mode(&dir.path().join(f)), plain, "{f}");
        }
    }
    // generation_config.json holds only what differs from the defaults
    // (no `max_length` for transformers to warn about).
    let g = read_json(&dir.path().join("keep_model/generation_config.json"));
    assert!(g.get("max_length").is_none(), "{g}");
    assert!(g.get("eos_token_id").is_some(), "{g}");
}

/// A DeepSpeed checkpoint resumes without DeepSpeed (the state is rebuilt
/// by parameter name from its ZeRO files; tests/checkpoint_interop.rs checks
/// the losses); what is refused is a checkpoint missing its files.
#[test]
fn a_deepspeed_checkpoint_resumes_without_deepspeed_unless_its_files_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let z2 = data("ds_config/zero2.json");
    let o = pretrain_with(dir.path(), "ds", &["--deepspeed", z2.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ckpt = dir.path().join("ds/checkpoint-2");
    let copy = dir.path().join("copy/checkpoint-2");
    std::fs::create_dir_all(copy.join("global_step2")).unwrap();
    for f in std::fs::read_dir(&ckpt).unwrap() {
        let f = f.unwrap();
        if f.path().is_file() {
            std::fs::copy(f.path(), copy.join(f.file_name())).unwrap();
        }
    }
    let o = pretrain_with(
        dir.path(),
        "ds",
        &["--resume-from-checkpoint", "latest", "--max-steps", "4"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resumed from"), "{}", stderr(&o));
    // The copy has `latest` but an empty global_step2/.
    let o = pretrain_with(
        dir.path(),
        "ds2",
        &[
            "--resume-from-checkpoint",
            copy.to_str().unwrap(),
            "--max-steps",
            "4",
        ],
    );
    refused(&o, "zero_pp_rank_0_mp_rank_00_optim_states.pt");
}

// ---- settings checked before any work -------------------------------------

#[test]
fn settings_that_would_fail_after_training_fail_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a_file");
    std::fs::write(&file, "x").unwrap();
    let valid = data("corpus/validation.jsonl");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--learning-rate", "nan"],
            "--learning-rate nan: expected a finite number",
        ),
        (vec!["--max-new-tokens", "1000000000"], "--max-new-tokens"),
        (
            vec!["--save-model-dir", file.to_str().unwrap()],
            "is not a folder",
        ),
        (vec!["--num-ranks", "0"], "give 1 to"),
        (vec!["--num-ranks", "100000"], "give 1 to"),
        (vec!["--adam-beta2", "2"], "adam_beta2 must be in [0, 1)"),
        (vec!["--warmup-ratio=-5"], "warmup_ratio must be in [0, 1]"),
        (
            vec!["--adam-epsilon=-1"],
            "adam_epsilon must be at least 0, got -1",
        ),
        (
            vec!["--learning-rate=-1"],
            "learning_rate must be at least 0, got -1",
        ),
        (vec!["--output-dir", ""], "output_dir is empty"),
        (
            vec!["--block-size", "1"],
            "block_size 1: a block needs at least 2 tokens",
        ),
        (
            vec![
                "--validation-file",
                valid.to_str().unwrap(),
                "--max-eval-samples",
                "0",
            ],
            "no held-out block",
        ),
    ];
    for (extra, want) in cases {
        let o = pretrain_with(dir.path(), "early", &extra);
        refused(&o, want);
        assert!(!stderr(&o).contains("step 1/"), "{extra:?} trained first");
    }
    assert!(!dir.path().join("early_model").exists());
}

#[test]
fn training_arguments_files_name_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for (json, want) in [
        (r#"{"max_steps": "ten"}"#, "max_steps"),
        (r#"{"no_such_field": 1}"#, "no_such_field"),
    ] {
        let f = dir.path().join("args.json");
        std::fs::write(&f, json).unwrap();
        let o = pretrain_with(dir.path(), "args", &["--args", f.to_str().unwrap()]);
        refused(&o, want);
        refused(&o, "args.json");
    }
}

// ---- generation and weights -----------------------------------------------

#[test]
fn nan_generation_settings_and_nan_weights_are_refused() {
    let m = model_dir().to_str().unwrap();
    for flags in [
        ["--temperature", "nan"],
        ["--repetition-penalty", "nan"],
        ["--top-p", "nan"],
    ] {
        let mut a = vec!["generate", "--model", m, "--prompt", "The"];
        a.extend(flags);
        let o = companion(&a, &[]);
        refused(
            &o,
            flags[0].trim_start_matches("--").replace('-', "_").as_str(),
        );
    }
    // A weights file with a NaN in it: named at load.
    let dir = tempfile::tempdir().unwrap();
    let d = model_copy(dir.path());
    let f = d.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&f, &candle_core::Device::Cpu).unwrap();
    let w = t.get("transformer.wpe.weight").unwrap();
    let mut v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    v[3] = f32::NAN;
    let bad = candle_core::Tensor::from_vec(v, w.shape(), &candle_core::Device::Cpu).unwrap();
    t.insert("transformer.wpe.weight".into(), bad);
    candle_core::safetensors::save(&t, &f).unwrap();
    let o = companion(
        &[
            "generate",
            "--model",
            d.to_str().unwrap(),
            "--prompt",
            "The",
        ],
        &[],
    );
    refused(&o, "tensor `transformer.wpe.weight` holds NaN");
}

#[test]
fn an_empty_prompt_counts_only_the_new_tokens() {
    let m = model_dir().to_str().unwrap();
    let o = companion(
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "",
            "--max-new-tokens",
            "5",
            "--json",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["new_tokens"], 5, "{v}");
}

// ---- corpora --------------------------------------------------------------

#[test]
fn corpora_that_are_not_corpora_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let broken = dir.path().join("broken.jsonl");
    std::fs::write(&broken, "{\"text\": \"a\"}\n{not json\n").unwrap();
    let wrong_field = dir.path().join("field.jsonl");
    std::fs::write(&wrong_field, "{\"body\": \"a\"}\n").unwrap();
    for (f, want) in [
        (&broken, "broken.jsonl"),
        (&wrong_field, "field.jsonl"),
        (&empty, "empty.jsonl"),
    ] {
        let mut a = pretrain_flags(dir.path(), "corpus");
        let i = a.iter().position(|x| x == "--train-file").unwrap();
        a[i + 1] = f.display().to_string();
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = companion(&a, &[]);
        refused(&o, want);
    }
}

/// A `--tokenizer-vocab-size` that cannot take effect is said: beside
/// `--tokenizer`, or when output_dir/tokenizer is reused at another size,
/// a warning names both sizes (the same size: silence).
#[test]
fn a_tokenizer_vocab_size_that_is_not_used_is_said() {
    let dir = tempfile::tempdir().unwrap();
    let o = pretrain_with(dir.path(), "run", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = pretrain_with(dir.path(), "run", &["--max-steps", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("is not used"), "{}", stderr(&o));
    let o = pretrain_with(
        dir.path(),
        "run",
        &["--max-steps", "5", "--tokenizer-vocab-size", "500"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--tokenizer-vocab-size 500 is not used: the tokenizer reused from")
            && stderr(&o).contains("was trained to 300 tokens"),
        "{}",
        stderr(&o)
    );
    let gpt2 = data("pretrained/gpt2");
    let o = pretrain_with(
        dir.path(),
        "other",
        &["--tokenizer", gpt2.to_str().unwrap(), "--max-steps", "1"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("--tokenizer-vocab-size 300 is not used: the tokenizer given by --tokenizer")
            && stderr(&o).contains("was trained to 50257 tokens"),
        "{}",
        stderr(&o)
    );
}

/// Every file a resume reads is checked before the first step, and one
/// that disagrees with the others or with the run is refused by name:
/// Adam's step, the RNG state, the folder's step, the model's shape, the
/// moments (a mean of squares is never negative).
#[test]
fn a_resume_refuses_checkpoint_files_that_disagree() {
    let dir = tempfile::tempdir().unwrap();
    let o = pretrain_with(dir.path(), "run", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let original = dir.path().join("run/checkpoint-2");
    fn edit_json(f: &Path, edit: &dyn Fn(&mut Value)) {
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(f, v.to_string()).unwrap();
    }
    type Damage<'a> = (&'a str, Box<dyn Fn(&Path)>, &'a str);
    let cases: Vec<Damage> = vec![
        (
            "optimizer.json",
            Box::new(|c: &Path| edit_json(&c.join("optimizer.json"), &|v| v["step"] = json!("x"))),
            "step: expected a non-negative integer",
        ),
        (
            "rng_state.json",
            Box::new(|c: &Path| {
                std::fs::write(c.join("rng_state.json"), [0xff, 0x00, 0x9c]).unwrap()
            }),
            "not the JSON a checkpoint writes",
        ),
        (
            "trainer_state.json",
            Box::new(|c: &Path| {
                edit_json(&c.join("trainer_state.json"), &|v| {
                    v["global_step"] = json!(100)
                })
            }),
            "global_step is 100, but the folder is checkpoint-2",
        ),
        (
            "config.json",
            Box::new(|c: &Path| edit_json(&c.join("config.json"), &|v| v["n_embd"] = json!(64))),
            "n_embd is 64, this run's model has 32",
        ),
        (
            "optimizer.pt",
            Box::new(|c: &Path| {
                use companion::torch_file::{PyValue, TorchTensor};
                let f = c.join("optimizer.pt");
                let mut v = companion::torch_file::load(&f)
                    .unwrap()
                    .to_owned_value()
                    .unwrap();
                let PyValue::Dict(state) = v.get_mut("state").unwrap() else {
                    panic!("optimizer.pt has a state dict")
                };
                let sq = state[0].1.get_mut("exp_avg_sq").unwrap();
                let PyValue::Tensor(t) = sq else {
                    panic!("exp_avg_sq is a tensor")
                };
                let n: usize = t.shape.iter().product();
                *sq = PyValue::Tensor(TorchTensor::f32(t.shape.clone(), &vec![-1.0; n]));
                companion::torch_file::save(&v, &f).unwrap();
            }),
            "exp_avg_sq holds -1",
        ),
        (
            "optimizer.pt",
            Box::new(|c: &Path| std::fs::write(c.join("optimizer.pt"), b"PK\x03\x04 cut").unwrap()),
            "not a torch.save file",
        ),
        (
            "scheduler.pt",
            Box::new(|c: &Path| {
                use companion::torch_file::PyValue;
                let v = PyValue::Dict(vec![(PyValue::str("last_epoch"), PyValue::Int(7))]);
                companion::torch_file::save(&v, &c.join("scheduler.pt")).unwrap();
            }),
            "the schedule is at step 7",
        ),
    ];
    for (i, (file, damage, want)) in cases.iter().enumerate() {
        let ckpt = dir.path().join(format!("case{i}/checkpoint-2"));
        std::fs::create_dir_all(&ckpt).unwrap();
        for e in std::fs::read_dir(&original).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), ckpt.join(e.file_name())).unwrap();
        }
        damage(&ckpt);
        let o = pretrain_with(
            dir.path(),
            "run",
            &["--resume-from-checkpoint", ckpt.to_str().unwrap()],
        );
        refused(&o, want);
        assert!(stderr(&o).contains(file), "{file}: {}", stderr(&o));
        assert!(!stderr(&o).contains("resumed from"), "{}", stderr(&o));
    }
}

/// An accumulation longer than an epoch ends at the epoch's last batch, as
/// transformers' Trainer ends it (one update per epoch), instead of
/// collecting micro-batches for ever; the run says so.
#[test]
fn an_accumulation_longer_than_an_epoch_steps_at_the_epochs_end() {
    let dir = tempfile::tempdir().unwrap();
    let o = pretrain_with(
        dir.path(),
        "run",
        &[
            "--gradient-accumulation-steps",
            "1000000000",
            "--per-device-train-batch-size",
            "64",
            "--max-steps",
            "2",
            "--save-strategy",
            "no",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(
            "gradient_accumulation_steps 1000000000 is more than the 96 batches of an epoch"
        ),
        "{}",
        stderr(&o)
    );
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("run/trainer_state.json")).unwrap(),
    )
    .unwrap();
    let epochs: Vec<f64> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("loss").is_some())
        .map(|e| e["epoch"].as_f64().unwrap())
        .collect();
    assert_eq!(epochs, vec![1.0, 2.0]);
}

/// A resume takes the run's dropout, as transformers loads a checkpoint's
/// weights into the model the script built: `--dropout 0.5` given on
/// resume is the saved model's dropout.
#[test]
fn dropout_given_on_resume_is_the_runs() {
    let dir = tempfile::tempdir().unwrap();
    let o = pretrain_with(dir.path(), "run", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ckpt = dir.path().join("run/checkpoint-2");
    let o = pretrain_with(
        dir.path(),
        "run",
        &[
            "--resume-from-checkpoint",
            ckpt.to_str().unwrap(),
            "--dropout",
            "0.5",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("run_model/config.json")).unwrap(),
    )
    .unwrap();
    for k in ["attn_pdrop", "resid_pdrop", "embd_pdrop"] {
        assert_eq!(cfg[k], json!(0.5), "{k}: {cfg}");
    }
}

/// A tokenizer.json whose pre-tokenizer regex backtracks without end makes
/// Oniguruma give up, and `tokenizers` panics: here it is an error naming
/// the regex (exit 1, not 101, and no panic message), and `pretrain`
/// leaves no staging folder in the dataset cache.
#[test]
fn a_regex_that_backtracks_without_end_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok");
    std::fs::create_dir_all(&tok).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(data("pretrained/gpt2").join(f), tok.join(f)).unwrap();
    }
    let f = tok.join("tokenizer.json");
    let mut t: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
    t["pre_tokenizer"] = json!({"type": "Split", "pattern": {"Regex": "(a|a?)+$"},
        "behavior": "Isolated", "invert": false});
    std::fs::write(&f, t.to_string()).unwrap();
    let text = format!("{}b", "a".repeat(60));
    let o = companion(
        &[
            "tokenizer",
            "show",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--text",
            &text,
        ],
        &[],
    );
    refused(&o, "regex in tokenizer.json that backtracks without end");
    let corpus = dir.path().join("corpus.jsonl");
    std::fs::write(&corpus, format!("{}\n", json!({ "text": text })).repeat(20)).unwrap();
    let (tok, corpus) = (tok.to_str().unwrap(), corpus.to_str().unwrap());
    let flags = ["--tokenizer", tok, "--train-file", corpus];
    refused(
        &pretrain_with(dir.path(), "run", &flags),
        "backtracks without end",
    );
    let cache = dir.path().join("cache/companion");
    // (The key's lock file stays, as lock files do; no staging folder.)
    let left: Vec<_> = std::fs::read_dir(&cache)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.iter().all(|n| n.to_string_lossy().ends_with(".lock")),
        "left in the cache: {left:?}"
    );
}

/// `zero-estimate` with counts no cluster has is refused naming them, not
/// answered with figures saturated at 2^64 bytes.
#[test]
fn zero_estimate_refuses_counts_whose_bytes_overflow() {
    let estimate = |gpus: &str| {
        let flags = [
            "zero-estimate",
            "--model",
            "gpt2",
            "--num-gpus",
            gpus,
            "--num-nodes",
            "2",
        ];
        companion(&flags, &[("HF_HUB_OFFLINE", "1")])
    };
    refused(
        &estimate(&u64::MAX.to_string()),
        "the estimates exceed 2^64 bytes",
    );
    let o = estimate("8");
    assert!(o.status.success(), "{}", stderr(&o));
}
