//! Streaming preparation into token shards: the same blocks as the
//! in-memory `dataset.map` + `group_texts`, a cache that is reused only for
//! the same corpus, tokenizer and packing, damaged shards rebuilt, and
//! `datasets.save_to_disk` folders (written by Python `datasets`,
//! tests/fixtures/make_datasets_fixtures.py) read like the JSONL they hold.

mod common;

use std::path::Path;

use serde_json::Value;

use common::*;
use companion::data::corpus::{documents, read_file, Split};
use companion::data::{prepare, tokenize_and_pack, Packing, PrepareOptions, TokenizeOptions};
use companion::tokenizer::AutoTokenizer;

fn gpt2() -> AutoTokenizer {
    AutoTokenizer::from_pretrained(data("pretrained/gpt2").to_str().unwrap()).unwrap()
}

fn options(cache: &Path, block_size: usize, tok: &AutoTokenizer) -> PrepareOptions {
    PrepareOptions {
        block_size,
        append_eos: tok.eos_token_id(),
        cache_dir: Some(cache.to_path_buf()),
        ..PrepareOptions::default()
    }
}

/// `path` prepared (train split, field `text`) in `cache` with blocks of `block_size`.
fn prepared(
    path: &Path,
    tok: &AutoTokenizer,
    cache: &Path,
    block_size: usize,
) -> companion::data::Prepared {
    prepare(
        path,
        "text",
        Split::Train,
        tok,
        &options(cache, block_size, tok),
    )
    .unwrap()
}

fn blocks(ds: &companion::data::Dataset) -> Vec<Vec<u32>> {
    (0..ds.len()).map(|i| ds.example(i).into_owned()).collect()
}

#[test]
fn shards_hold_the_blocks_of_map_and_group_texts() {
    let tok = gpt2();
    let cache = tempfile::tempdir().unwrap();
    let corpus = data("corpus/validation.jsonl");
    // Small map batches, so group_texts drops a remainder per batch here too.
    let mut o = options(cache.path(), 64, &tok);
    o.batch_size = 7;
    let p = prepare(&corpus, "text", Split::Train, &tok, &o).unwrap();
    assert!(p.built);
    let texts = read_file(&corpus, "text").unwrap();
    let want = tokenize_and_pack(
        &tok,
        &texts,
        &TokenizeOptions {
            packing: Packing::Group { block_size: 64 },
            batch_size: 7,
            append_eos: tok.eos_token_id(),
            show_progress: false,
        },
    )
    .unwrap();
    assert!(want.len() > 100);
    assert_eq!(blocks(&p.dataset), want.input_ids().unwrap());
    assert_eq!(p.dataset.text_bytes(), want.text_bytes());
    assert_eq!(p.dataset.text_tokens(), want.text_tokens());
    // GPT-2's 50257 ids fit in u16: two bytes a token on disk.
    let meta = &p.dataset.shards().unwrap().meta;
    assert_eq!(meta.bytes_per_token, 2);
    assert_eq!(meta.documents, texts.len());
    let shard = std::fs::metadata(p.dir.join("tokens-00000.bin"))
        .unwrap()
        .len();
    assert_eq!(shard as usize, 64 + want.len() * 64 * 2);
}

#[test]
fn the_cache_is_reused_only_for_the_same_corpus_tokenizer_and_packing() {
    let tok = gpt2();
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.jsonl");
    std::fs::copy(fixture("corpus_small.jsonl"), &corpus).unwrap();
    let o = options(cache.path(), 32, &tok);
    let first = prepare(&corpus, "text", Split::Train, &tok, &o).unwrap();
    let again = prepare(&corpus, "text", Split::Train, &tok, &o).unwrap();
    assert!(first.built && !again.built);
    assert_eq!(first.dir, again.dir);
    assert_eq!(blocks(&first.dataset), blocks(&again.dataset));
    // The cache's lock file replaced by a link to someone else's file: refused,
    // that file untouched (the lock's name is predictable in a shared cache).
    #[cfg(unix)]
    {
        let lock = std::fs::read_dir(cache.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "lock"))
            .expect("the preparation's lock file");
        let precious = dir.path().join("precious.txt");
        std::fs::write(&precious, "keep me").unwrap();
        std::fs::remove_file(&lock).unwrap();
        std::os::unix::fs::symlink(&precious, &lock).unwrap();
        let e = prepare(&corpus, "text", Split::Train, &tok, &o)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
        std::fs::remove_file(&lock).unwrap();
        // What a killed preparation leaves is removed when it is prepared again.
        let stale = first.dir.with_file_name(format!(
            "{}.tmp-4294967294",
            first.dir.file_name().unwrap().to_str().unwrap()
        ));
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("tokens-00000.bin"), [0u8; 64]).unwrap();
        std::fs::remove_dir_all(&first.dir).unwrap();
        let rebuilt = prepare(&corpus, "text", Split::Train, &tok, &o).unwrap();
        assert!(
            rebuilt.built && !stale.exists(),
            "the stale preparation is left"
        );
    }
    // The same name and size, one character changed: a new preparation.
    let text = std::fs::read_to_string(&corpus)
        .unwrap()
        .replacen("About", "Abous", 1);
    std::fs::write(&corpus, text).unwrap();
    let changed = prepare(&corpus, "text", Split::Train, &tok, &o).unwrap();
    assert!(changed.built && changed.dir != first.dir);
    // Another block size, another tokenizer: new preparations too.
    let other_block = prepare(
        &corpus,
        "text",
        Split::Train,
        &tok,
        &options(cache.path(), 16, &tok),
    )
    .unwrap();
    assert!(other_block.built && other_block.dir != changed.dir);
    let tok2 = companion::tokenizer::from_sentencepiece_model(&fixture("spm_small.model")).unwrap();
    let o = options(cache.path(), 32, &tok2);
    let other_tok = prepare(&corpus, "text", Split::Train, &tok2, &o).unwrap();
    assert!(other_tok.built && other_tok.dir != changed.dir);
}

#[test]
fn a_damaged_or_truncated_shard_is_detected_and_rebuilt() {
    let tok = gpt2();
    let cache = tempfile::tempdir().unwrap();
    let corpus = fixture("corpus_small.jsonl");
    let o = options(cache.path(), 32, &tok);
    let good = prepare(&corpus, "text", Split::Train, &tok, &o).unwrap();
    let want = blocks(&good.dataset);
    let shard = good.dir.join("tokens-00000.bin");
    let bytes = std::fs::read(&shard).unwrap();
    drop(good);
    let mut flipped = bytes.clone();
    flipped[100] ^= 0x40;
    for damaged in [flipped, bytes[..bytes.len() - 10].to_vec()] {
        std::fs::write(&shard, &damaged).unwrap();
        let e = companion::data::TokenShards::open(shard.parent().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tokens-00000.bin") && (e.contains("checksum") || e.contains("truncated")),
            "{e}"
        );
        let p = prepare(&corpus, "text", Split::Train, &tok, &o).unwrap();
        assert!(p.built, "a damaged cache is prepared again");
        assert_eq!(blocks(&p.dataset), want);
    }
}

#[test]
fn datasets_folders_read_like_the_jsonl_they_hold() {
    let want = read_file(&fixture("corpus_small.jsonl"), "text").unwrap();
    // A Dataset folder in 2 Arrow files; the empty and the null row dropped.
    let folder = fixture("datasets/corpus_small");
    let got: Vec<String> = documents(&folder, "text", Split::Train)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(got, want);
    // A DatasetDict: its train and validation splits.
    let dict = fixture("datasets/corpus_dict");
    let train: Vec<String> = documents(&dict, "text", Split::Train)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let valid: Vec<String> = documents(&dict, "text", Split::Validation)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(train, want);
    assert_eq!(valid, want[..2]);
    // Prepared like the JSONL.
    let tok = gpt2();
    let cache = tempfile::tempdir().unwrap();
    let o = options(cache.path(), 32, &tok);
    let a = prepare(&folder, "text", Split::Train, &tok, &o).unwrap();
    let b = prepare(
        &fixture("corpus_small.jsonl"),
        "text",
        Split::Train,
        &tok,
        &o,
    )
    .unwrap();
    assert_eq!(blocks(&a.dataset), blocks(&b.dataset));
}

#[test]
fn bad_datasets_folders_are_named() {
    let err = |p: &Path, field: &str, split: Split| match documents(p, field, split) {
        Ok(_) => panic!("{} read", p.display()),
        Err(e) => e.to_string(),
    };
    let folder = fixture("datasets/corpus_small");
    let e = err(&folder, "content", Split::Train);
    assert!(
        e.contains("corpus_small") && e.contains("no column `content` (columns: id, text)"),
        "{e}"
    );
    let e = err(&folder, "id", Split::Train);
    assert!(
        e.contains("column `id` holds Int64, expected strings"),
        "{e}"
    );
    let d = tempfile::tempdir().unwrap();
    let e = err(d.path(), "text", Split::Train);
    assert!(e.contains("not one `datasets.save_to_disk` wrote"), "{e}");
    // state.json naming a file outside the folder.
    std::fs::write(
        d.path().join("state.json"),
        r#"{"_data_files": [{"filename": "../x.arrow"}]}"#,
    )
    .unwrap();
    let e = err(d.path(), "text", Split::Train);
    assert!(e.contains("not a file of this folder"), "{e}");
    // A DatasetDict without the split asked for.
    std::fs::remove_file(d.path().join("state.json")).unwrap();
    std::fs::write(
        d.path().join("dataset_dict.json"),
        r#"{"splits": ["train"]}"#,
    )
    .unwrap();
    let e = err(d.path(), "text", Split::Validation);
    assert!(e.contains("no `validation` split (splits: train)"), "{e}");
    // An Arrow file that is not one.
    let bad = tempfile::tempdir().unwrap();
    std::fs::write(
        bad.path().join("state.json"),
        r#"{"_data_files": [{"filename": "data.arrow"}]}"#,
    )
    .unwrap();
    std::fs::write(bad.path().join("data.arrow"), b"not arrow").unwrap();
    let e = err(bad.path(), "text", Split::Train);
    assert!(
        e.contains("data.arrow") && e.contains("not an Arrow stream"),
        "{e}"
    );
}

/// A Trainer on the shards of the shipped validation split (GPT-2's
/// tokenizer, blocks of 32), shuffled, logging every step.
fn mapped_run(out: &Path, cache: &Path, max_steps: i64) -> companion::train::Trainer {
    use companion::config::GPT2Config;
    use companion::train::{Trainer, TrainingArguments};
    let tok = gpt2();
    let p = prepared(&data("corpus/validation.jsonl"), &tok, cache, 32);
    let cfg = GPT2Config {
        vocab_size: tok.len(),
        n_positions: 32,
        n_embd: 16,
        n_layer: 1,
        n_head: 2,
        ..GPT2Config::default()
    };
    let model = companion::GPT2LMHeadModel::new(&cfg, 1, &candle_core::Device::Cpu).unwrap();
    let args = TrainingArguments {
        max_steps,
        output_dir: out.display().to_string(),
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: 2,
        learning_rate: 1e-3,
        // A schedule that does not depend on max_steps, so a run of 3 steps
        // is the first 3 steps of a run of 9 (as a killed run is).
        lr_scheduler_type: companion::train::SchedulerType::Constant,
        logging_steps: 1.0,
        save_steps: 3.0,
        ..Default::default()
    };
    let collator = companion::data::DataCollatorForLanguageModeling::new(&tok);
    let mut t = Trainer::new(model, args, collator, p.dataset, None, None).unwrap();
    t.verbose = false;
    t
}

fn losses(t: &companion::train::Trainer) -> Vec<(u64, f64)> {
    t.state
        .log_history
        .iter()
        .filter_map(|e| Some((e.get("step")?.as_u64()?, e.get("loss")?.as_f64()?)))
        .collect()
}

#[test]
fn resuming_mid_epoch_on_mapped_shards_is_exact_and_replays_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut straight = mapped_run(&dir.path().join("a"), &cache, 9);
    assert!(
        straight.train_dataset.len() / 4 > 9 * 2,
        "the run stays inside its first epoch"
    );
    straight.train().unwrap();
    for stop in [3, 6] {
        let out = dir.path().join(format!("b{stop}"));
        let mut first = mapped_run(&out, &cache, stop);
        first.train().unwrap();
        let mut resumed = mapped_run(&out, &cache, 9);
        resumed.args.resume_from_checkpoint = Some("latest".into());
        resumed.train().unwrap();
        // Per-step losses bit for bit, before and after the interruption.
        let (a, b) = (losses(&straight), losses(&resumed));
        assert_eq!(a.len(), 9);
        assert_eq!(a, b, "stopped at {stop}");
        // The resumed run collated only the micro-batches of its own steps:
        // getting to step `stop` read nothing, whatever `stop` is.
        assert_eq!(resumed.batches_read, (9 - stop as usize) * 2);
        let rng = read_json(&out.join(format!("checkpoint-{stop}/rng_state.json")));
        assert_eq!(rng["data_loader"]["batch_in_epoch"], stop * 2);
        assert_eq!(rng["data_loader"]["epoch"], 0);
    }
    // Resuming on other data is refused, naming what differs.
    let out = dir.path().join("b3");
    let tok = gpt2();
    let small = prepared(&fixture("corpus_small.jsonl"), &tok, &cache, 32);
    let mut other = mapped_run(&out, &cache, 9);
    other.train_dataset = small.dataset;
    other.args.resume_from_checkpoint = Some(out.join("checkpoint-3").display().to_string());
    let e = other.train().unwrap_err().to_string();
    assert!(
        e.contains("num_examples") && e.contains("same training data"),
        "{e}"
    );
}

#[test]
fn pretrain_trains_on_a_datasets_folder_and_tensorboard_reads_its_logs() {
    let dir = tempfile::tempdir().unwrap();
    let dict = fixture("datasets/corpus_dict");
    let mut flags = pretrain_flags(dir.path(), "tb");
    let at = flags.iter().position(|f| f == "--train-file").unwrap();
    flags[at + 1] = dict.display().to_string();
    // The DatasetDict's validation split, evaluated at step 2 and at the end.
    flags.retain(|f| f != "--no-validation");
    for f in [
        "--validation-file",
        dict.to_str().unwrap(),
        "--eval-steps",
        "2",
        "--report-to",
        "tensorboard",
    ] {
        flags.push(f.into());
    }
    let cache = dir.path().join("cache").display().to_string();
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let o = companion(&args, &[("HF_DATASETS_CACHE", &cache)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let runs = dir.path().join("tb/runs");
    let run: Vec<_> = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(run.len(), 1, "one run folder under output_dir/runs");
    let name = run[0].file_name().unwrap().to_str().unwrap().to_string();
    assert!(
        name.contains('_') && name.len() > 15,
        "runs/<date>_<host>: {name}"
    );
    let tb = run_python("read_tensorboard.py", &[run[0].to_str().unwrap()]);
    let state = read_json(&dir.path().join("tb/checkpoint-3/trainer_state.json"));
    let logged: Vec<&Value> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("loss").is_some())
        .collect();
    assert_eq!(logged.len(), 3);
    for key in [
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "mfu",
    ] {
        let series = tb[format!("train/{key}")]
            .as_array()
            .unwrap_or_else(|| panic!("no train/{key} in {tb}"));
        assert_eq!(series.len(), 3, "{key}");
        for (e, p) in logged.iter().zip(series) {
            assert_eq!(p[0], e["step"], "{key}");
            let (want, got) = (e[key].as_f64().unwrap(), p[1].as_f64().unwrap());
            // TensorBoard keeps scalars as f32.
            assert_eq!(got as f32, want as f32, "{key} at step {}", e["step"]);
        }
    }
    let mfu = tb["train/mfu"][0][1].as_f64().unwrap();
    assert!(mfu > 0.0 && mfu < 1.0, "MFU {mfu}");
    // The evaluations (held-out loss, perplexity, bits per byte), and the final metrics.
    let evals: Vec<&Value> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("eval_loss").is_some())
        .collect();
    assert!(!evals.is_empty());
    for key in ["loss", "perplexity", "bits_per_byte"] {
        let series = tb[format!("eval/{key}")]
            .as_array()
            .unwrap_or_else(|| panic!("no eval/{key} in {tb}"));
        assert_eq!(series[0][0], evals[0]["step"]);
        assert_eq!(
            series[0][1].as_f64().unwrap() as f32,
            evals[0][format!("eval_{key}")].as_f64().unwrap() as f32
        );
    }
    assert!(tb.get("train/train_runtime").is_some(), "{tb}");
}
