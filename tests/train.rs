//! 4.3.4's Trainer: one-step parity with PyTorch + HF Trainer semantics,
//! the schedules, resume, crash safety, bad input, and `companion pretrain`.

mod common;

use candle_core::{DType, Device};
use common::*;
use companion::model::GPT2LMHeadModel;
use companion::optim::{lr_at, SchedulerType};
use companion::train::{Trainer, TrainingArguments};
use serde_json::Value;

fn tiny_model(dropout: bool) -> GPT2LMHeadModel {
    let mut m = tiny_gpt2();
    if !dropout {
        m.config.attn_pdrop = 0.0;
        m.config.embd_pdrop = 0.0;
        m.config.resid_pdrop = 0.0;
    }
    m
}

#[test]
fn two_steps_equal_pytorch_and_hf_trainer() {
    let fx = read_json(&fixture("train_step.json"));
    let dir = tempfile::tempdir().unwrap();
    let mut args = TrainingArguments::from_value(fx["args"].clone()).unwrap();
    args.output_dir = dir.path().join("out").display().to_string();
    args.logging_steps = 1.0;
    // The fixture runs 2 updates of a 4-step linear schedule: train 4 steps
    // and compare the checkpoint written after step 2.
    args.save_steps = 2.0;
    // Our loader walks the examples in order (no shuffling): lay them out so
    // that consecutive batches of 2 are the fixture's micro-batches A, B, C, D.
    let mut rows = Vec::new();
    for name in ["A", "B", "C", "D"] {
        let b = &fx["micro_batches"][name];
        let ids: Vec<Vec<u32>> = serde_json::from_value(b["input_ids"].clone()).unwrap();
        let mask: Vec<Vec<u32>> = serde_json::from_value(b["attention_mask"].clone()).unwrap();
        for (r, m) in ids.iter().zip(&mask) {
            rows.push(r[..m.iter().sum::<u32>() as usize].to_vec());
        }
    }
    let mut t = Trainer::new(
        tiny_model(false),
        args,
        collator(),
        dataset_of(rows),
        None,
        None,
    )
    .unwrap();
    t.shuffle = false;
    t.verbose = false;
    t.train().unwrap();
    let logs: Vec<&serde_json::Map<String, Value>> = t
        .state
        .log_history
        .iter()
        .filter(|e| e.contains_key("loss"))
        .collect();
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
    for (i, step) in fx["steps"].as_array().unwrap().iter().enumerate() {
        let (loss, norm, lr) = (
            logs[i]["loss"].as_f64().unwrap(),
            logs[i]["grad_norm"].as_f64().unwrap(),
            logs[i]["learning_rate"].as_f64().unwrap(),
        );
        assert!(
            rel(loss, step["loss"].as_f64().unwrap()) < 1e-5,
            "step {i} loss {loss} vs {}",
            step["loss"]
        );
        assert!(
            rel(norm, step["grad_norm"].as_f64().unwrap()) < 1e-5,
            "step {i} grad_norm {norm} vs {}",
            step["grad_norm"]
        );
        assert!(
            rel(lr, step["learning_rate"].as_f64().unwrap()) < 1e-12,
            "step {i} lr {lr}"
        );
    }
    let ckpt = dir.path().join("out/checkpoint-2");
    let after =
        GPT2LMHeadModel::from_pretrained(ckpt.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let want = fx["params_after"].as_object().unwrap();
    // The attention key bias has an exactly-zero true gradient (softmax is
    // shift invariant); AdamW turns rounding noise there into arbitrary
    // updates in both implementations, so those slices are left out.
    let noise = fx["noise_dominated"].as_object().unwrap();
    let (mut diff2, mut norm2) = (0f64, 0f64);
    for (name, var) in after.named_parameters() {
        let mut ours: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let mut theirs: Vec<f32> = serde_json::from_value(want[&name].clone()).unwrap();
        if let Some(r) = noise.get(&name) {
            let (a, b) = (
                r[0].as_u64().unwrap() as usize,
                r[1].as_u64().unwrap() as usize,
            );
            ours.drain(a..b);
            theirs.drain(a..b);
        }
        for (a, b) in ours.iter().zip(&theirs) {
            // Entries with gradients near 1e-7 are AdamW-amplified rounding
            // noise (HF's own Trainer differs from torch by up to 4e-5 there).
            assert!((a - b).abs() < 1e-4, "{name}: {a} vs {b}");
            diff2 += ((a - b) as f64).powi(2);
            norm2 += (*b as f64).powi(2);
        }
    }
    let rel = (diff2 / norm2).sqrt();
    assert!(
        rel < 1e-5,
        "updated weights differ by {rel} (relative, all parameters)"
    );
}

#[test]
fn schedules_equal_hf() {
    let fx = read_json(&fixture("lr_schedules.json"));
    for case in fx["cases"].as_array().unwrap() {
        let kind = case["name"].as_str().unwrap();
        let sched: SchedulerType = serde_json::from_value(case["name"].clone()).unwrap();
        let warmup = case["num_warmup_steps"].as_u64().unwrap() as usize;
        let total = case["num_training_steps"].as_u64().unwrap() as usize;
        for (step, want) in case["lrs"].as_array().unwrap().iter().enumerate() {
            let ours = lr_at(sched, 1.0, step, warmup, total);
            let want = want.as_f64().unwrap();
            assert!(
                (ours - want).abs() < 1e-9,
                "{kind} w={warmup} t={total} step {step}: {ours} vs {want}"
            );
        }
    }
}

fn small_run(out: &std::path::Path, max_steps: i64, dropout: bool) -> Trainer {
    let rows: Vec<Vec<u32>> = (0..24u32)
        .map(|i| (0..8).map(|j| 1 + (i * 7 + j * 3) % 60).collect())
        .collect();
    let args = TrainingArguments {
        output_dir: out.display().to_string(),
        max_steps,
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 2,
        learning_rate: 1e-2,
        weight_decay: 0.1,
        lr_scheduler_type: SchedulerType::Cosine,
        warmup_steps: 2.0,
        logging_steps: 1.0,
        save_steps: 3.0,
        ..Default::default()
    };
    let mut t = Trainer::new(
        tiny_model(dropout),
        args,
        collator(),
        dataset_of(rows),
        None,
        None,
    )
    .unwrap();
    t.verbose = false;
    t
}

/// The steps of the `checkpoint-N` folders in `out`, in order.
fn checkpoint_steps(out: &std::path::Path) -> Vec<usize> {
    companion::train::list_checkpoints(out)
        .iter()
        .map(|c| c.0)
        .collect()
}

fn weights(t: &Trainer) -> Vec<u8> {
    t.model.state_dict_bytes().unwrap()
}

#[test]
fn resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    // Straight: 6 steps, dropout on, checkpoints at 3 and 6.
    let mut a = small_run(&dir.path().join("a"), 6, true);
    a.train().unwrap();
    // Interrupted: the same run stopped after 3 steps, then resumed to 6.
    let mut b = small_run(&dir.path().join("b"), 6, true);
    b.args.max_steps = 3;
    b.train().unwrap();
    let mut c = small_run(&dir.path().join("b"), 6, true);
    c.args.resume_from_checkpoint = Some("latest".into());
    c.train().unwrap();
    assert_eq!(c.state.global_step, 6);
    assert_eq!(
        weights(&a),
        weights(&c),
        "resumed weights differ from a straight run"
    );
    // 6 steps × 2 micro-batches × 2 examples × 8 tokens; FLOPs = 6·N per token.
    let n = a.model.num_parameters() as f64;
    for t in [&a, &c] {
        assert_eq!(t.state.num_input_tokens_seen, 192);
        assert_eq!(t.state.total_flos, 6.0 * n * 192.0);
    }
    let losses = |t: &Trainer| -> Vec<Value> {
        t.state
            .log_history
            .iter()
            .filter_map(|e| e.get("loss").cloned())
            .collect()
    };
    let la = losses(&a);
    let lc = losses(&c);
    assert_eq!(la[..6], lc[..6], "losses differ");
    // trainer_state.json keeps HF's field names.
    let st = read_json(&dir.path().join("a/checkpoint-6/trainer_state.json"));
    for k in [
        "epoch",
        "global_step",
        "max_steps",
        "log_history",
        "logging_steps",
        "save_steps",
        "train_batch_size",
        "total_flos",
        "best_metric",
    ] {
        assert!(st.get(k).is_some(), "trainer_state.json lacks {k}");
    }
    assert_eq!(st["global_step"], 6);
}

#[test]
fn a_crash_while_checkpointing_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut t = small_run(&out, 6, false);
    t.faults.fail_checkpoint_at_step = Some(6);
    let err = t.train().unwrap_err().to_string();
    assert!(err.contains("injected failure"), "{err}");
    assert_eq!(
        checkpoint_steps(&out),
        vec![3],
        "only the complete checkpoint-3 is there"
    );
    assert!(std::fs::read_dir(&out).unwrap().flatten().all(|e| {
        let n = e.file_name().to_string_lossy().to_string();
        !n.starts_with("checkpoint-6")
    }));
    // And it resumes.
    let mut r = small_run(&out, 6, false);
    r.args.resume_from_checkpoint = Some("latest".into());
    r.train().unwrap();
    assert_eq!(r.state.global_step, 6);
    let mut straight = small_run(&dir.path().join("s"), 6, false);
    straight.train().unwrap();
    assert_eq!(weights(&r), weights(&straight));
}

/// transformers ignores an old checkpoint it cannot delete
/// (`shutil.rmtree(..., ignore_errors=True)`): so does rotation here, with
/// a warning, and the run ends normally with both checkpoints kept.
#[test]
fn a_checkpoint_that_cannot_be_deleted_does_not_stop_training() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut t = small_run(&out, 6, false);
    t.args.save_total_limit = Some(1);
    t.faults.fail_rotation = true;
    t.train().unwrap();
    assert_eq!(t.state.global_step, 6);
    let ckpts = checkpoint_steps(&out);
    assert_eq!(
        ckpts,
        vec![3, 6],
        "the old checkpoint stays, the new one is written"
    );
    // Without the fault the limit holds.
    let out = dir.path().join("ok");
    let mut t = small_run(&out, 6, false);
    t.args.save_total_limit = Some(1);
    t.train().unwrap();
    let ckpts = checkpoint_steps(&out);
    assert_eq!(ckpts, vec![6]);
}

/// HF passes `model` to its callbacks; here a callback asks for it at the
/// steps it wants (before the first step, after others) and gets the weights
/// of that moment: those the checkpoint of the same step holds.
#[test]
fn a_callback_gets_the_model_at_the_steps_it_asks_for() {
    use companion::train::{TrainerCallback, TrainerControl, TrainerState};
    use std::sync::{Arc, Mutex};
    type Seen = Arc<Mutex<Vec<(usize, Vec<u8>)>>>;
    struct Grab(Seen);
    impl TrainerCallback for Grab {
        fn on_step_end(&mut self, _: &TrainingArguments, _: &TrainerState, _: &mut TrainerControl) {
        }
        fn wants_model(&self, s: &TrainerState) -> bool {
            [0, 3].contains(&s.global_step)
        }
        fn on_model(
            &mut self,
            _: &TrainingArguments,
            s: &TrainerState,
            m: &GPT2LMHeadModel,
        ) -> Result<(), String> {
            self.0
                .lock()
                .unwrap()
                .push((s.global_step, m.state_dict_bytes().unwrap()));
            Ok(())
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut t = small_run(&out, 6, false);
    let before = weights(&t);
    let got = Arc::new(Mutex::new(Vec::new()));
    t.add_callback(Grab(got.clone()));
    t.train().unwrap();
    let got = got.lock().unwrap();
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![0, 3]);
    assert_eq!(got[0].1, before, "step 0: the initial weights");
    let at3 = GPT2LMHeadModel::from_pretrained(
        out.join("checkpoint-3").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        got[1].1,
        at3.state_dict_bytes().unwrap(),
        "step 3: checkpoint-3's weights"
    );
}

/// transformers' Trainer loads a checkpoint written here the way
/// `resume_from_checkpoint` does (`_load_optimizer_and_scheduler`:
/// `torch.load(optimizer.pt / scheduler.pt, weights_only=True)` into the
/// AdamW and LambdaLR it builds): every parameter's Adam moments equal
/// the trainer's own, its groups are HF's decay / no-decay split, and
/// the schedule stands at our step and learning rate.
#[test]
fn transformers_loads_our_optimizer_and_scheduler_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut t = small_run(&out, 6, false);
    // Stop at step 3 of the 6-step schedule (checkpoint-3 is written there).
    t.add_callback(companion::train::StopAtStep(3));
    t.train().unwrap();
    let ckpt = out.join("checkpoint-3");
    let got = run_python(
        "hf_load_optimizer.py",
        &[ckpt.to_str().unwrap(), "0.01", "0.1", "cosine", "2", "6"],
    );
    // What the trainer itself holds at step 3.
    let ours = t.engine.zero().unwrap().moments_by_name().unwrap();
    let state = got["state"].as_object().unwrap();
    assert_eq!(state.len(), ours.len(), "every parameter has its moments");
    for (name, st) in state {
        let (_, m, v) = ours.iter().find(|(n, _, _)| n == name).unwrap();
        for (key, want) in [("exp_avg", m), ("exp_avg_sq", v)] {
            let have: Vec<f32> = serde_json::from_value(st[key].clone()).unwrap();
            assert_eq!(&have, want, "{name}.{key}");
        }
        assert_eq!(st["step"], 3.0);
    }
    // HF's groups: weights of Linear/Conv1D/Embedding layers decay, biases and LayerNorms do not.
    let groups = got["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2);
    assert_eq!(
        (
            groups[0]["weight_decay"].as_f64(),
            groups[1]["weight_decay"].as_f64()
        ),
        (Some(0.1), Some(0.0))
    );
    for p in groups[0]["params"].as_array().unwrap() {
        let p = p.as_str().unwrap();
        assert!(p.ends_with(".weight") && !p.contains("ln_"), "{p} decays");
    }
    for p in groups[1]["params"].as_array().unwrap() {
        let p = p.as_str().unwrap();
        assert!(
            p.ends_with(".bias") || p.contains("ln_"),
            "{p} does not decay"
        );
    }
    let lr3 = lr_at(SchedulerType::Cosine, 0.01, 3, 2, 6);
    assert_eq!(got["last_epoch"], 3);
    for g in groups {
        assert!(
            (g["lr"].as_f64().unwrap() - lr3).abs() < 1e-12,
            "{} vs {lr3}",
            g["lr"]
        );
    }
    assert!((got["last_lr"][0].as_f64().unwrap() - lr3).abs() < 1e-12);
}

/// A callback that stops training (HF: `control.should_training_stop`)
/// leaves the first steps of the full run: the same log entries, one
/// evaluation at the step it stopped on (not a second, final one), and the
/// weights of the full run's checkpoint at that step. The notebooks' quick
/// mode relies on it.
#[test]
fn a_callback_stops_training_after_the_full_runs_first_steps() {
    let dir = tempfile::tempdir().unwrap();
    let eval_rows: Vec<Vec<u32>> = (0..4u32)
        .map(|i| (0..8).map(|j| 1 + (i * 5 + j) % 60).collect())
        .collect();
    let run = |name: &str, stop: Option<usize>| {
        let mut t = small_run(&dir.path().join(name), 6, true);
        t.eval_dataset = Some(dataset_of(eval_rows.clone()));
        t.args.eval_strategy = companion::train::IntervalStrategy::Steps;
        t.args.eval_steps = Some(3.0);
        if let Some(k) = stop {
            t.add_callback(companion::train::StopAtStep(k));
        }
        t.train().unwrap();
        t
    };
    let full = run("full", None);
    let quick = run("quick", Some(3));
    assert_eq!(quick.state.global_step, 3);
    assert_eq!(quick.state.max_steps, 6, "the schedule is the full run's");
    let upto = |t: &Trainer, k: u64| -> Vec<Value> {
        t.state
            .log_history
            .iter()
            .filter(|e| !e.contains_key("train_runtime"))
            .filter(|e| e["step"].as_u64().unwrap() <= k)
            .map(|e| {
                let mut e = e.clone();
                e.retain(|k, _| {
                    !k.ends_with("_runtime")
                        && !k.ends_with("_per_second")
                        && k != "mfu"
                        && k != "eta_seconds"
                });
                Value::Object(e)
            })
            .collect()
    };
    assert_eq!(upto(&quick, 3), upto(&full, 3));
    let evals = |t: &Trainer| {
        t.state
            .log_history
            .iter()
            .filter(|e| e.contains_key("eval_loss"))
            .count()
    };
    assert_eq!(
        (evals(&quick), evals(&full)),
        (1, 2),
        "one evaluation at step 3; the full run's at 3 and 6"
    );
    let at3 = companion::GPT2LMHeadModel::from_pretrained(
        dir.path().join("full/checkpoint-3").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        weights(&quick),
        at3.state_dict_bytes().unwrap(),
        "the weights of the full run at step 3"
    );
}

#[test]
fn save_total_limit_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = small_run(&dir.path().join("o"), 9, false);
    t.args.save_total_limit = Some(2);
    t.train().unwrap();
    assert_eq!(checkpoint_steps(&dir.path().join("o")), vec![6, 9]);
}

#[test]
fn nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let mut t = small_run(&out, 9, false);
    t.train().unwrap();
    let before = std::fs::read(out.join("checkpoint-9/model.safetensors")).unwrap();
    let mut t = small_run(&out, 12, false);
    t.args.resume_from_checkpoint = Some("latest".into());
    t.args.learning_rate = 1e30;
    t.args.max_grad_norm = 0.0;
    let err = t.train().unwrap_err().to_string();
    assert!(
        err.contains("training stopped") && err.contains("checkpoint"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(out.join("checkpoint-9/model.safetensors")).unwrap(),
        before
    );
}

#[test]
fn output_dir_that_is_a_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("file");
    std::fs::write(&f, "x").unwrap();
    let mut t = small_run(&f, 2, false);
    let err = t.train().unwrap_err().to_string();
    assert!(err.contains("not a folder"), "{err}");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "x");
}

#[test]
fn pretrain_cli_runs_the_chapter_and_saves_a_transformers_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let model = dir.path().join("pretrained_model");
    let valid = data("corpus/validation.jsonl");
    let o = companion(
        &[
            "pretrain",
            "--train-file",
            valid.to_str().unwrap(),
            "--validation-file",
            valid.to_str().unwrap(),
            "--tokenizer-vocab-size",
            "400",
            "--n-layer",
            "1",
            "--n-embd",
            "32",
            "--n-head",
            "2",
            "--n-positions",
            "64",
            "--block-size",
            "64",
            "--max-eval-samples",
            "4",
            "--max-steps",
            "3",
            "--logging-steps",
            "1",
            "--save-steps",
            "2",
            "--eval-steps",
            "2",
            "--per-device-train-batch-size",
            "2",
            "--learning-rate",
            "1e-3",
            "--output-dir",
            out.to_str().unwrap(),
            "--save-model-dir",
            model.to_str().unwrap(),
            "--max-new-tokens",
            "5",
            "--json",
        ],
        &[(
            "HF_DATASETS_CACHE",
            dir.path().join("cache").to_str().unwrap(),
        )],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["global_step"], 3);
    // The recipe it ran, which bench/pretrain.sh hands to PyTorch.
    let r = &v["recipe"];
    assert_eq!(
        (
            r["n_layer"].as_u64(),
            r["n_embd"].as_u64(),
            r["n_head"].as_u64()
        ),
        (Some(1), Some(32), Some(2))
    );
    assert_eq!(r["n_positions"], 64);
    assert_eq!(r["block_size"], 64);
    assert_eq!(r["per_device_train_batch_size"], 2);
    assert_eq!(r["max_eval_samples"], 4);
    assert_eq!(r["learning_rate"], 1e-3);
    assert_eq!(r["lr_scheduler_type"], "cosine");
    assert_eq!(r["eval_steps"], 2);
    assert_eq!(r["adam_epsilon"], 1e-8);
    assert_eq!(r["dropout"], serde_json::json!([0.0, 0.0, 0.0]));
    assert!(
        v["before"]["bits_per_byte"].as_f64().unwrap()
            > v["after"]["bits_per_byte"].as_f64().unwrap()
    );
    assert!(v["generation"]
        .as_str()
        .unwrap()
        .starts_with("Hi, how are you?"));
    for f in [
        "checkpoint-2/optimizer.pt",
        "checkpoint-3/trainer_state.json",
        "loss.svg",
        "loss.png",
        "tokenizer/tokenizer.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    // A real 640×420 PNG (signature, then the IHDR chunk's width and height).
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&png[12..16], b"IHDR");
    assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 640);
    assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 420);
    for f in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
    ] {
        assert!(model.join(f).exists(), "{f}");
    }
    // The saved model folder loads in Python transformers with our logits.
    let d = logits_diff_with_transformers(&model);
    assert!(d < 1e-4, "{d}");
    // `companion eval` on the saved folder reproduces the held-out figures
    // pretrain reported after training (same blocks, same weights).
    let e = companion(
        &[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            valid.to_str().unwrap(),
            "--max-samples",
            "4",
            "--json",
        ],
        &[],
    );
    assert!(e.status.success(), "{}", stderr(&e));
    let ev: Value = serde_json::from_str(&stdout(&e)).unwrap();
    for k in ["eval_loss", "bits_per_byte"] {
        let (got, want) = (ev[k].as_f64().unwrap(), v["after"][k].as_f64().unwrap());
        assert!(
            (got - want).abs() <= 1e-6 * want,
            "{k}: eval {got}, pretrain {want}"
        );
    }
    assert_eq!(ev["blocks"], 4);
    let missing = companion(
        &[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            "no/such.jsonl",
        ],
        &[],
    );
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("no/such.jsonl"),
        "{}",
        stderr(&missing)
    );
    // A second run reuses the tokenizer and the tokenized cache, and bad flags fail.
    let bad = companion(&["pretrain", "--no-such-flag", "1"], &[]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("--no-such-flag"), "{}", stderr(&bad));
    let bad = companion(
        &[
            "pretrain",
            "--per-device-train-batch-size",
            "0",
            "--output-dir",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("per_device_train_batch_size"),
        "{}",
        stderr(&bad)
    );
    let bad = companion(&["pretrain", "--lr-scheduler-type", "zigzag"], &[]);
    assert!(
        stderr(&bad).contains("--lr-scheduler-type") && stderr(&bad).contains("cosine"),
        "the flag and its possible values: {}",
        stderr(&bad)
    );
    let bad = companion(
        &[
            "pretrain",
            "--train-file",
            "missing.jsonl",
            "--output-dir",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("missing.jsonl"), "{}", stderr(&bad));
}

/// `trainer.args` changed after the Trainer was built count at `train()`,
/// as in transformers: turning on gradient checkpointing switches the
/// gradient path to block-by-block recomputation.
#[test]
fn gradient_checkpointing_set_after_building_the_trainer_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = small_run(&dir.path().join("o"), 2, false);
    assert_ne!(t.gradient_path.name(), "blockwise");
    t.args.gradient_checkpointing = true;
    t.train().unwrap();
    assert_eq!(t.gradient_path.name(), "blockwise");
    assert!(t.plan.recompute);
}
