//! Fault injection: `kill -9` at random (seeded) moments of a run that
//! saves a checkpoint every step, plain and under ZeRO-3 on 2 ranks. After
//! every kill each `checkpoint-N` left must load (weights and trainer
//! state at step N), and resuming from the latest one, again and again,
//! must end on the same final weights, byte for byte, as a run that was
//! never interrupted.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::*;
use companion::model::GPT2LMHeadModel;
use rand::{Rng, SeedableRng};

const STEPS: &str = "40";
const KILLS: usize = 5;

fn flags(dir: &Path, name: &str, extra: &[&str]) -> Vec<String> {
    let mut a = pretrain_flags(dir, name);
    for (flag, value) in [
        ("--max-steps", STEPS),
        ("--save-steps", "1"),
        ("--logging-steps", "4"),
    ] {
        let i = a.iter().position(|x| x == flag).unwrap();
        a[i + 1] = value.to_string();
    }
    a.extend(["--save-total-limit".into(), "3".into()]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn command(args: &[String], dir: &Path) -> Command {
    let mut cmd = Command::new(companion_bin());
    cmd.args(args)
        .current_dir(root())
        .env("HF_DATASETS_CACHE", dir.join("cache"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Every checkpoint left in `out` is whole: its weights load and its
/// trainer state is at its step.
fn all_checkpoints_load(out: &Path) -> usize {
    let mut n = 0;
    for (step, dir) in companion::train::list_checkpoints(out) {
        GPT2LMHeadModel::from_pretrained(
            dir.to_str().unwrap(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let state = read_json(&dir.join("trainer_state.json"));
        assert_eq!(state["global_step"], step, "{}", dir.display());
        n += 1;
    }
    n
}

fn latest_step(out: &Path) -> usize {
    companion::train::list_checkpoints(out)
        .last()
        .map_or(0, |(n, _)| *n)
}

fn campaign(label: &str, extra: &[&str], seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    // The run never interrupted, and how long it takes.
    let t = Instant::now();
    let o = command(&flags(dir.path(), "straight", extra), dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let full = t.elapsed();
    let want = std::fs::read(dir.path().join("straight_model/model.safetensors")).unwrap();

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let out = dir.path().join("killed");
    let mut kills = 0;
    for _ in 0..KILLS {
        let mut args = flags(dir.path(), "killed", extra);
        if companion::train::latest_checkpoint(&out).is_some() {
            args.extend(["--resume-from-checkpoint".into(), "latest".into()]);
        }
        let start = latest_step(&out);
        let mut child = command(&args, dir.path()).spawn().unwrap();
        // Once this run has saved a checkpoint, kill it at a random moment
        // within about one step (training, or writing the next checkpoint,
        // or rotating the oldest away).
        while latest_step(&out) == start && child.try_wait().unwrap().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let step = full.div_f64(STEPS.parse().unwrap());
        std::thread::sleep(step.mul_f64(rng.random_range(0.0..2.0)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        all_checkpoints_load(&out);
    }
    // Finish from wherever the kills left it.
    let mut args = flags(dir.path(), "killed", extra);
    if companion::train::latest_checkpoint(&out).is_some() {
        args.extend(["--resume-from-checkpoint".into(), "latest".into()]);
    }
    let o = command(&args, dir.path()).output().unwrap();
    assert!(o.status.success(), "{label}: {}", stderr(&o));
    assert!(all_checkpoints_load(&out) > 0);
    let got = std::fs::read(dir.path().join("killed_model/model.safetensors")).unwrap();
    assert!(
        got == want,
        "{label}: after {kills} kills and resumes the final weights differ from the straight run's"
    );
    // The last checkpoint, every file of it (optimizer state, ZeRO shards,
    // trainer state aside from timings), is byte for byte the straight run's.
    let last = format!("checkpoint-{STEPS}");
    for f in [
        "model.safetensors",
        "optimizer.json",
        "scheduler.json",
        "optimizer.pt",
        "scheduler.pt",
    ]
    .into_iter()
    .map(String::from)
    .chain((0..2).flat_map(|r| {
        ["optim", "model"]
            .map(|k| format!("global_step{STEPS}/zero_pp_rank_{r}_mp_rank_00_{k}_states.pt"))
    }))
    .chain(std::iter::once(format!(
        "global_step{STEPS}/mp_rank_00_model_states.pt"
    ))) {
        let a = dir.path().join("straight").join(&last).join(&f);
        let b = out.join(&last).join(&f);
        if a.exists() || b.exists() {
            assert!(
                std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
                "{label}: {last}/{f} differs between the straight and the killed run"
            );
        }
    }
    assert!(
        kills >= 3,
        "{label}: only {kills} of {KILLS} kills landed before the run ended ({full:?})"
    );
    eprintln!("{label}: {kills} kills, run {full:?}");
}

#[test]
fn kill_9_during_saving_plain() {
    campaign("plain", &[], 1);
}

#[test]
fn kill_9_during_saving_zero3_on_two_ranks() {
    let z3 = data("ds_config/zero3_offload.json");
    campaign(
        "zero3",
        &["--deepspeed", z3.to_str().unwrap(), "--num-ranks", "2"],
        2,
    );
}

/// `kill -9` while `save_model` replaces a model folder: runs of two widths
/// save into one folder and are killed around their end, where the save
/// is. After every kill the folder loads whole (the old model or the new,
/// config and weights of one width), and no staging folder outlives the
/// next save.
#[test]
fn kill_9_during_save_model_leaves_the_old_or_the_new_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let run = |i: usize, n_embd: &str| {
        let mut a = pretrain_flags(dir.path(), &format!("run{i}"));
        let at = a.iter().position(|x| x == "--save-model-dir").unwrap();
        a[at + 1] = model.display().to_string();
        let at = a.iter().position(|x| x == "--n-embd").unwrap();
        a[at + 1] = n_embd.to_string();
        if i > 0 {
            let tok = dir.path().join("run0/tokenizer");
            a.extend(["--tokenizer".into(), tok.display().to_string()]);
        }
        command(&a, dir.path())
    };
    let t = Instant::now();
    let o = run(0, "32").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let full = t.elapsed();
    let loads = |when: &str| {
        let m = GPT2LMHeadModel::from_pretrained(
            model.to_str().unwrap(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{when}: the model folder does not load whole: {e}"));
        m.config.n_embd
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut widths = std::collections::BTreeSet::new();
    for i in 1..=20 {
        let mut child = run(i, if i % 2 == 1 { "16" } else { "32" })
            .spawn()
            .unwrap();
        std::thread::sleep(full.mul_f64(rng.random_range(0.5..1.2)));
        let _ = child.kill();
        child.wait().unwrap();
        widths.insert(loads(&format!("after kill {i}")));
    }
    let o = run(21, "16").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(loads("after a finished run"), 16);
    let staging: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".staged-"))
        .collect();
    assert!(staging.is_empty(), "left behind: {staging:?}");
    eprintln!("save_model kills: widths seen after kills {widths:?}");
}
