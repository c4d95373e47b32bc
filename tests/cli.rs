//! The `companion` program end to end: config, generate (streaming and JSON).

mod common;

use candle_core::{DType, Device};
use common::*;
use companion::generate::GenerationConfig;
use companion::tokenizer::{self, TrainArgs};
use companion::{AutoTokenizer, GPT2Config, GPT2LMHeadModel};
use serde_json::Value;

#[test]
fn config_from_gpt2_with_the_chapters_overrides() {
    let o = companion(
        &[
            "config",
            "--from",
            "gpt2",
            "--vocab-size",
            "30003",
            "--n-ctx",
            "512",
            "--bos-token-id",
            "30000",
            "--eos-token-id",
            "30001",
            "--json",
        ],
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["vocab_size"], 30003);
    assert_eq!(v["n_ctx"], 512);
    assert_eq!(
        v["n_positions"], 1024,
        "n_ctx does not resize the model, as in transformers"
    );
    assert_eq!(v["bos_token_id"], 30000);
    assert_eq!(v["eos_token_id"], 30001);
    let o = companion(
        &["config", "--from", "gpt2", "--n-ctx", "512"],
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert!(stdout(&o).starts_with("GPT2Config {"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("n_ctx = 512 is stored only"),
        "{}",
        stderr(&o)
    );
    let o = companion(
        &["config", "--from", "gpt2", "--n-head", "7"],
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("divisible"), "{}", stderr(&o));
}

/// A model folder as the chapter saves one: config, weights, tokenizer.
fn model_dir() -> tempfile::TempDir {
    let docs = docs(&data("corpus/validation.jsonl"));
    let tok = tokenizer::train(
        &TrainArgs {
            vocab_size: 400,
            ..TrainArgs::default()
        },
        docs.iter(),
    )
    .unwrap();
    let cfg = GPT2Config {
        vocab_size: tok.len(),
        n_positions: 64,
        n_embd: 32,
        n_layer: 2,
        n_head: 2,
        bos_token_id: tok.bos_token_id(),
        eos_token_id: tok.eos_token_id(),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    GPT2LMHeadModel::new(&cfg, 3, &Device::Cpu)
        .unwrap()
        .save_pretrained(dir.path())
        .unwrap();
    tok.save_pretrained(dir.path()).unwrap();
    dir
}

#[test]
fn generate_streams_text_and_reports_json() {
    let dir = model_dir();
    let m = dir.path().to_str().unwrap();
    let prompt = "Hi, how are you?";
    let args = [
        "generate",
        "--model",
        m,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "12",
        "--repetition-penalty",
        "1.1",
    ];
    let o = companion(&[&args[..], &["--json"]].concat(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let ids = v["token_ids"].as_array().unwrap();
    assert!(!ids.is_empty() && ids.len() <= 12);
    assert!(v["text"].as_str().unwrap().starts_with(prompt));
    assert!(v["tokens_per_second"].as_f64().unwrap() > 0.0);
    // Streaming prints the same text (greedy is deterministic).
    let o = companion(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim_end_matches('\n'),
        v["text"].as_str().unwrap()
    );
    // Sampling with a seed repeats itself.
    let s = ["--do-sample", "--seed", "5", "--top-p", "0.9", "--json"];
    let a: Value =
        serde_json::from_str(&stdout(&companion(&[&args[..], &s].concat(), &[]))).unwrap();
    let b: Value =
        serde_json::from_str(&stdout(&companion(&[&args[..], &s].concat(), &[]))).unwrap();
    assert_eq!(a["token_ids"], b["token_ids"]);
}

/// generation_config.json is read as transformers reads it: its max_length
/// bounds the output when no --max-new-tokens is given, num_beams runs beam
/// search, and a field transformers honours that we do not is refused.
#[test]
fn generate_honours_the_generation_config_file() {
    let dir = model_dir();
    let m = dir.path().to_str().unwrap();
    let gen = dir.path().join("generation_config.json");
    let write = |v: Value| std::fs::write(&gen, v.to_string()).unwrap();
    let run = |extra: &[&str]| {
        let o = companion(
            &[
                &["generate", "--model", m, "--prompt", "The", "--json"],
                extra,
            ]
            .concat(),
            &[],
        );
        (o.status.success(), stdout(&o), stderr(&o))
    };
    let prompt_len = AutoTokenizer::from_pretrained(m)
        .unwrap()
        .encode("The")
        .unwrap()
        .len();
    // max_length 9 and no eos: 9 - prompt tokens new tokens, not the default 128.
    write(serde_json::json!({"max_length": 9, "eos_token_id": 100000}));
    let (ok, out, err) = run(&[]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 9 - prompt_len);
    // --max-new-tokens still wins.
    let (ok, out, _) = run(&["--max-new-tokens", "3"]);
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 3);
    // Beam search from the flag equals the library's.
    let (ok, out, err) = run(&["--num-beams", "3", "--max-new-tokens", "6"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let model = GPT2LMHeadModel::from_pretrained(m, DType::F32, &Device::Cpu).unwrap();
    let cfg = GenerationConfig {
        num_beams: 3,
        max_new_tokens: Some(6),
        eos_token_id: Some(companion::generate::TokenIds::One(100000)),
        max_length: Some(9),
        ..GenerationConfig::from_model_config(&model.config)
    };
    let ids = AutoTokenizer::from_pretrained(m)
        .unwrap()
        .encode("The")
        .unwrap();
    let want = model
        .generate(std::slice::from_ref(&ids), None, &cfg)
        .unwrap()
        .sequences[0][ids.len()..]
        .to_vec();
    assert_eq!(v["token_ids"], serde_json::json!(want));
    // A field we cannot honour is refused by name.
    write(serde_json::json!({"typical_p": 0.5}));
    let (ok, _, err) = run(&[]);
    assert!(!ok && err.contains("typical_p"), "{err}");
}

#[test]
fn generate_rejects_bad_settings_and_unknown_models() {
    let dir = model_dir();
    let m = dir.path().to_str().unwrap();
    let o = companion(
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "x",
            "--do-sample",
            "--temperature",
            "0",
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("temperature"), "{}", stderr(&o));
    let o = companion(
        &["generate", "--model", m, "--prompt", "x", "--top-p", "1.5"],
        &[],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("top_p"), "{}", stderr(&o));
    let o = companion(
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "x",
            "--max-new-tokens",
            "100",
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("n_positions"), "{}", stderr(&o));
    let missing = dir.path().join("nope");
    let o = companion(
        &[
            "generate",
            "--model",
            missing.to_str().unwrap(),
            "--prompt",
            "x",
        ],
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nope"), "{}", stderr(&o));
}

/// `companion env` reports this build (the tests' build has mpi and no
/// cuda) and fails, naming the fix, when a missing feature is expected.
#[test]
fn env_reports_the_build_and_names_what_is_missing() {
    let o = companion(&["env", "--json", "--no-measure"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["features"]["cuda"], false);
    assert!(r["cpu"]["threads"].as_u64().unwrap() >= 1);
    assert!(r["problems"].as_array().unwrap().is_empty(), "{r}");
    assert_eq!(r["devices"], serde_json::json!([]));
    // With HOME unset the caches are still under the user's home (from the
    // password database), never relative to the current folder.
    let mut cmd = std::process::Command::new(companion_bin());
    cmd.args(["env", "--json", "--no-measure"])
        .env_remove("HOME");
    for k in ["HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE"] {
        cmd.env_remove(k);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in ["hub", "datasets"] {
        let p = r["caches"][k].as_str().unwrap();
        assert!(
            p.starts_with('/') && p.contains(".cache/huggingface"),
            "{k}: {p}"
        );
    }
    let o = companion(&["env", "--expect", "cuda", "--no-measure"], &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("no cuda feature") && err.contains("scripts/build-cuda"),
        "{err}"
    );
}
