//! ZeRO on CPU ranks (threads of this process): every stage, with and
//! without optimizer offload, on 1, 2 and 4 ranks, trains exactly like one
//! rank on the same global batch, and each rank holds the bytes the ZeRO
//! paper says it should.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::*;
use companion::data::Dataset;
use companion::model::GPT2LMHeadModel;
use companion::train::{IntervalStrategy, SchedulerType, TrainError, Trainer, TrainingArguments};
use companion::zero::comm::{run_ranks, Communicator};
use companion::zero::ModelStateBytes;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const MICRO: usize = 2;
const ACCUM: usize = 2;
const STEPS: usize = 3;

/// The tiny GPT-2 fixture, dropout on (stage 3 must replay the same masks).
fn model() -> GPT2LMHeadModel {
    tiny_gpt2()
}

/// A tiny GPT-2 fixture folder by name (`tiny_gpt2`, `tiny_gpt2_untied`).
fn fixture_model(name: &str) -> GPT2LMHeadModel {
    GPT2LMHeadModel::from_pretrained(fixture(name).to_str().unwrap(), DType::F32, &Device::Cpu)
        .unwrap()
}

/// 32 rows of 6–16 tokens, so batches need padding and attention masks.
fn dataset() -> Dataset {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let rows: Vec<Vec<u32>> = (0..32)
        .map(|_| {
            let n = rng.random_range(6..=16);
            (0..n).map(|_| rng.random_range(3..64)).collect()
        })
        .collect();
    dataset_of(rows)
}

fn args(out: &std::path::Path, accum: usize, ds: Option<Value>) -> TrainingArguments {
    TrainingArguments {
        output_dir: out.display().to_string(),
        per_device_train_batch_size: MICRO,
        gradient_accumulation_steps: accum,
        max_steps: STEPS as i64,
        learning_rate: 1e-2,
        weight_decay: 0.1,
        // Small enough that clipping acts on every step.
        max_grad_norm: 0.5,
        warmup_steps: 1.0,
        logging_steps: 1.0,
        save_strategy: IntervalStrategy::No,
        deepspeed: ds,
        ..Default::default()
    }
}

fn ds_config(stage: u8, offload: bool) -> Value {
    let mut z = json!({"stage": stage});
    if offload {
        z["offload_optimizer"] = json!({"device": "cpu", "pin_memory": true});
    }
    json!({
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": z,
    })
}

struct Run {
    losses: Vec<f64>,
    norms: Vec<f64>,
    weights: Vec<(String, Tensor)>,
    memory: Vec<ModelStateBytes>,
}

fn losses_and_norms(t: &Trainer) -> (Vec<f64>, Vec<f64>) {
    let logs: Vec<_> = t
        .state
        .log_history
        .iter()
        .filter(|e| e.contains_key("loss"))
        .collect();
    (
        logs.iter().map(|e| e["loss"].as_f64().unwrap()).collect(),
        logs.iter()
            .map(|e| e["grad_norm"].as_f64().unwrap())
            .collect(),
    )
}

/// One rank, no DeepSpeed, accumulating the whole global batch.
fn reference(world: usize) -> Run {
    reference_of(model(), world)
}

fn reference_of(model: GPT2LMHeadModel, world: usize) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(
        model,
        args(dir.path(), ACCUM * world, None),
        collator(),
        dataset(),
        None,
        None,
    )
    .unwrap();
    t.verbose = false;
    t.train().unwrap();
    let (losses, norms) = losses_and_norms(&t);
    let weights = t.model.named_tensors().into_iter().collect();
    Run {
        losses,
        norms,
        weights,
        memory: vec![],
    }
}

fn zero_run(world: usize, stage: u8, offload: bool) -> Run {
    zero_run_with(world, stage, offload, false)
}

fn zero_run_with(world: usize, stage: u8, offload: bool, checkpointing: bool) -> Run {
    zero_run_of("tiny_gpt2", world, stage, offload, checkpointing, false)
}

/// A ZeRO run of `world` ranks; `on_device` keeps each rank's state as
/// tensors on its device (as a GPU rank does) instead of host buffers.
fn zero_run_of(
    name: &str,
    world: usize,
    stage: u8,
    offload: bool,
    checkpointing: bool,
    on_device: bool,
) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let out = run_ranks(
        world,
        |_, comm: Arc<dyn Communicator>| -> Result<Run, TrainError> {
            let mut a = args(dir.path(), ACCUM, Some(ds_config(stage, offload)));
            a.gradient_checkpointing = checkpointing;
            let mut t = Trainer::new_distributed(
                fixture_model(name),
                a,
                collator(),
                dataset(),
                None,
                None,
                comm,
            )?;
            t.verbose = false;
            if on_device {
                t.engine.zero_mut().unwrap().place_state_on_device()?;
                // Offload keeps the state in host memory, as DeepSpeed's does.
                assert_eq!(t.engine.zero().unwrap().state_on_device(), !offload);
            }
            let memory = t.memory_report()?;
            t.train()?;
            let (losses, norms) = losses_and_norms(&t);
            let full = t.full_model()?;
            let weights = full.named_tensors().into_iter().collect();
            Ok(Run {
                losses,
                norms,
                weights,
                memory,
            })
        },
    )
    .unwrap();
    out.into_iter().next().unwrap()
}

fn assert_same(what: &str, got: &Run, want: &Run) {
    assert_eq!(got.losses.len(), STEPS, "{what}: logged steps");
    for (i, (a, b)) in got.losses.iter().zip(&want.losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "{what}: step {} loss {a} vs {b}",
            i + 1
        );
    }
    for (i, (a, b)) in got.norms.iter().zip(&want.norms).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "{what}: step {} grad_norm {a} vs {b}",
            i + 1
        );
    }
    assert_weights_close(what, &got.weights, &want.weights);
}

fn assert_weights_close(what: &str, got: &[(String, Tensor)], want: &[(String, Tensor)]) {
    // The attention key bias's slice is left out (`compared_values`).
    let (mut diff2, mut norm2) = (0f64, 0f64);
    for ((n, a), (m, b)) in got.iter().zip(want) {
        assert_eq!(n, m);
        let (a, b) = (compared_values(n, a), compared_values(m, b));
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-4 * scale.max(1e-2),
                "{what}: {n}: {x} vs {y}"
            );
            diff2 += ((x - y) as f64).powi(2);
            norm2 += (*y as f64).powi(2);
        }
    }
    let rel = (diff2 / norm2).sqrt();
    assert!(
        rel <= 1e-5,
        "{what}: final weights differ by {rel} (relative, all parameters)"
    );
}

#[test]
fn every_stage_and_offload_equals_one_rank() {
    for world in [1, 2, 4] {
        let want = reference(world);
        // The weights really moved, and differently per step (a check that
        // the comparison below has something to compare).
        assert!(want.losses.windows(2).all(|w| w[0] != w[1]));
        for stage in 0..=3u8 {
            for offload in [false, true] {
                if stage == 0 && offload {
                    continue; // DeepSpeed: offload needs stage ≥ 1
                }
                let got = zero_run(world, stage, offload);
                assert_same(
                    &format!("ZeRO-{stage} offload={offload} on {world} ranks"),
                    &got,
                    &want,
                );
            }
        }
    }
}

#[test]
fn an_untied_head_trains_alike_on_every_path() {
    // The fused kernels (one rank), ZeRO-2 on two ranks, and ZeRO-3's
    // block-wise recomputation (candle's autograd) on two ranks.
    let want = reference_of(fixture_model("tiny_gpt2_untied"), 2);
    for (stage, what) in [(2, "ZeRO-2, 2 ranks"), (3, "ZeRO-3, 2 ranks")] {
        let got = zero_run_of("tiny_gpt2_untied", 2, stage, false, false, false);
        assert_same(what, &got, &want);
    }
    // The head is trained as a parameter of its own.
    let before = fixture_model("tiny_gpt2_untied");
    let get = |w: &[(String, Tensor)], n: &str| {
        w.iter()
            .find(|(m, _)| m == n)
            .map(|(_, t)| t.clone())
            .unwrap()
    };
    let start: Vec<(String, Tensor)> = before.named_tensors();
    for name in ["lm_head.weight", "transformer.wte.weight"] {
        let moved = max_abs_diff(&get(&want.weights, name), &get(&start, name));
        assert!(moved > 0.0, "{name} did not train");
    }
    let head_vs_wte = max_abs_diff(
        &get(&want.weights, "lm_head.weight"),
        &get(&want.weights, "transformer.wte.weight"),
    );
    assert!(head_vs_wte > 0.1, "lm_head stays its own matrix");
}

#[test]
fn gradient_checkpointing_trains_the_same() {
    // Recomputing each block in the backward pass (with the same dropout
    // masks) gives the gradients of keeping its activations.
    for world in [1, 2] {
        let want = reference(world);
        for stage in 0..=2u8 {
            let got = zero_run_with(world, stage, false, true);
            assert_same(
                &format!("gradient_checkpointing, ZeRO-{stage} on {world} ranks"),
                &got,
                &want,
            );
        }
    }
}

#[test]
fn each_rank_holds_what_the_paper_says() {
    let psi = model().num_parameters() as f64;
    for world in [1, 2, 4] {
        for stage in 0..=3u8 {
            let run = zero_run(world, stage, stage > 0);
            assert_eq!(run.memory.len(), world);
            let n = world as f64;
            // fp32: 4Ψ weights, 4Ψ gradients, 8Ψ Adam moments; stage 1
            // divides the moments by N, stage 2 also the gradients, stage 3
            // everything.
            let want = [
                4.0 * psi / if stage >= 3 { n } else { 1.0 },
                4.0 * psi / if stage >= 2 { n } else { 1.0 },
                8.0 * psi / if stage >= 1 { n } else { 1.0 },
            ];
            for m in &run.memory {
                let got = [m.params as f64, m.grads as f64, m.optimizer_states as f64];
                for (k, (g, w)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (g - w).abs() <= 0.05 * w,
                        "stage {stage}, {world} ranks, rank {}: term {k} is {g} bytes, the paper says {w}",
                        m.rank
                    );
                }
                if stage > 0 {
                    assert_eq!(m.offloaded_to_host, m.optimizer_states);
                }
            }
        }
    }
}

#[test]
fn zero3_never_gathers_the_whole_model() {
    let run = zero_run(2, 3, false);
    let psi_bytes = model().num_parameters() * 4;
    for m in &run.memory {
        assert!(m.params < psi_bytes);
    }
    // After training: the largest piece gathered at once (embedding + head
    // share wte) is less than the model.
    let dir = tempfile::tempdir().unwrap();
    let peaks = run_ranks(
        2,
        |_, comm: Arc<dyn Communicator>| -> Result<usize, TrainError> {
            let mut t = Trainer::new_distributed(
                model(),
                args(dir.path(), ACCUM, Some(ds_config(3, false))),
                collator(),
                dataset(),
                None,
                None,
                comm,
            )?;
            t.verbose = false;
            t.train()?;
            Ok(t.memory_report()?[0].peak_gathered_params)
        },
    )
    .unwrap();
    assert!(
        peaks[0] > 0 && peaks[0] < psi_bytes,
        "peak {} of {psi_bytes}",
        peaks[0]
    );
}

#[test]
fn bad_configs_fail_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let err = |ds: Option<Value>, world: usize| -> String {
        run_ranks(
            world,
            |_, comm: Arc<dyn Communicator>| -> Result<(), TrainError> {
                Trainer::new_distributed(
                    model(),
                    args(dir.path(), ACCUM, ds.clone()),
                    collator(),
                    dataset(),
                    None,
                    None,
                    comm,
                )?;
                Ok(())
            },
        )
        .unwrap_err()
        .to_string()
    };
    let m = err(
        Some(
            json!({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}),
        ),
        2,
    );
    assert!(
        m.contains("train_batch_size=64 vs hf train_batch_size"),
        "{m}"
    );
    let mut c = ds_config(5, false);
    let m = err(Some(c.clone()), 1);
    assert!(
        m.contains("zero_optimization.stage: expected 0, 1, 2 or 3, got 5"),
        "{m}"
    );
    c["zero_optimization"] = json!({"stage": 2, "offload_optimizer": {"device": "nvme"}});
    let m = err(Some(c.clone()), 1);
    assert!(m.contains("nvme") && m.contains("not supported"), "{m}");
    c["zero_optimization"] = json!({"stage": 2});
    c["fp16"] = json!({"enabled": true});
    let m = err(Some(c), 1);
    assert!(m.contains("fp16.enabled"), "{m}");
    // Several ranks without a DeepSpeed config.
    let m = err(None, 2);
    assert!(m.contains("need a DeepSpeed config"), "{m}");
}

#[test]
fn zero_checkpoints_resume_and_load_as_plain_hf_folders() {
    // ZeRO-3 on 2 ranks: save at step 2, run to 3; then resume from the
    // checkpoint and run to 3 again: the same weights.
    let dir = tempfile::tempdir().unwrap();
    let train = |resume: Option<String>| -> Vec<(String, Tensor)> {
        run_ranks(
            2,
            |_, comm: Arc<dyn Communicator>| -> Result<Vec<(String, Tensor)>, TrainError> {
                let mut a = args(dir.path(), ACCUM, Some(ds_config(3, true)));
                a.save_strategy = IntervalStrategy::Steps;
                a.save_steps = 2.0;
                a.resume_from_checkpoint = resume.clone();
                let mut t =
                    Trainer::new_distributed(model(), a, collator(), dataset(), None, None, comm)?;
                t.verbose = false;
                t.train()?;
                let m = t.full_model()?;
                Ok(m.named_tensors().into_iter().collect())
            },
        )
        .unwrap()
        .remove(0)
    };
    let straight = train(None);
    let ckpt = dir.path().join("checkpoint-2");
    for f in [
        "model.safetensors",
        "config.json",
        "trainer_state.json",
        "latest",
        "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "global_step2/zero_pp_rank_0_mp_rank_00_model_states.pt",
        "global_step2/zero_pp_rank_1_mp_rank_00_model_states.pt",
    ] {
        assert!(ckpt.join(f).is_file(), "{f} missing");
    }
    assert_eq!(
        std::fs::read_to_string(ckpt.join("latest")).unwrap(),
        "global_step2"
    );
    // The consolidated weights load as a plain model.
    GPT2LMHeadModel::from_pretrained(ckpt.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let resumed = train(Some(ckpt.display().to_string()));
    for ((n, a), (_, b)) in resumed.iter().zip(&straight) {
        assert_eq!(max_abs_diff(a, b), 0.0, "{n} differs after resume");
    }
    // Another world size with the same per-rank batch would see other
    // batches: refused, by name.
    let e = run_ranks(
        1,
        |_, comm: Arc<dyn Communicator>| -> Result<(), TrainError> {
            let mut a = args(dir.path(), ACCUM * 2, Some(ds_config(3, true)));
            a.resume_from_checkpoint = Some(ckpt.display().to_string());
            let mut t =
                Trainer::new_distributed(model(), a, collator(), dataset(), None, None, comm)?;
            t.verbose = false;
            t.train()?;
            Ok(())
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("rng_state.json")
            && e.contains("global micro-batch held 4 examples (2 per replica × 2 replicas), this run's holds 2 (2 × 1)"),
        "{e}"
    );
}

#[test]
fn pretrain_cli_on_cpu_ranks_equals_one_rank_and_saves_an_hf_model() {
    let dir = tempfile::tempdir().unwrap();
    let z3 = data("ds_config/zero3_offload.json");
    let o = pretrain(
        dir.path(),
        "zero3",
        &["--deepspeed", z3.to_str().unwrap(), "--num-ranks", "2"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("[rank 1] ZeRO-3 model states"), "{err}");
    assert!(
        err.contains("overlap_comm: accepted, not acted on"),
        "{err}"
    );
    let zero: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        (zero["world_size"].as_u64(), zero["zero_stage"].as_u64()),
        (Some(2), Some(3))
    );
    let o = pretrain(
        dir.path(),
        "single",
        &["--gradient-accumulation-steps", "2"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let single: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let (a, b) = (
        zero["train_loss"].as_f64().unwrap(),
        single["train_loss"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() <= 1e-5 * b,
        "2 ZeRO-3 ranks {a} vs 1 rank {b}"
    );
    let ck = dir.path().join("zero3/checkpoint-2");
    for f in [
        "latest",
        "model.safetensors",
        "global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ] {
        assert!(ck.join(f).is_file(), "{f}");
    }
    // The saved model loads in Python transformers and gives our logits.
    let d = logits_diff_with_transformers(&dir.path().join("zero3_model"));
    assert!(d < 1e-4, "{d}");
}

#[test]
fn pretrain_cli_rejects_bad_distributed_input_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let z2 = data("ds_config/zero2.json");
    let bad = dir.path().join("nvme.json");
    std::fs::write(&bad, r#"{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}"#).unwrap();
    let batch = dir.path().join("batch.json");
    std::fs::write(&batch, r#"{"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}"#).unwrap();
    for (extra, want) in [
        (
            vec!["--deepspeed", bad.to_str().unwrap()],
            "\"nvme\" (ZeRO-Infinity) is not supported",
        ),
        (
            vec!["--deepspeed", batch.to_str().unwrap(), "--num-ranks", "2"],
            "train_batch_size=10 vs hf train_batch_size",
        ),
        (
            vec!["--deepspeed", z2.to_str().unwrap(), "--num-gpus", "2"],
            "--num-gpus needs a build with CUDA",
        ),
        (
            vec!["--deepspeed", z2.to_str().unwrap(), "--backend", "nccl"],
            "--backend nccl needs a build with the nccl feature",
        ),
        (
            vec![
                "--deepspeed",
                z2.to_str().unwrap(),
                "--backend",
                "mpi",
                "--num-ranks",
                "2",
            ],
            "drop --num-ranks",
        ),
        (
            vec!["--num-ranks", "2"],
            "2 data-parallel ranks need a DeepSpeed config",
        ),
        (
            vec!["--num-ranks", "3", "--tensor-model-parallel-size", "2"],
            "world size (3) is not divisible by tensor_model_parallel_size (2)",
        ),
        (
            vec![
                "--num-ranks",
                "4",
                "--tensor-model-parallel-size",
                "2",
                "--deepspeed",
                z2.to_str().unwrap(),
            ],
            "ZeRO stage 2 is not run with tensor or pipeline parallelism",
        ),
        (
            vec!["--num-ranks", "3", "--pipeline-model-parallel-size", "3"],
            "n_layer 2 is not divisible by 3",
        ),
    ] {
        let o = pretrain(dir.path(), "bad", &extra);
        assert!(!o.status.success(), "{extra:?} succeeded");
        let e = stderr(&o);
        assert!(e.contains(want), "{extra:?}: {e}");
        assert!(!e.contains("step 1/"), "{extra:?} started training: {e}");
    }
}

/// The state a GPU rank keeps on its device (flat gradients, weights,
/// masters, moments as tensors, the step as tensor ops), run here on the
/// CPU device: every stage, with and without offload, on 1 and 2 ranks,
/// equals one rank without ZeRO as the host state does; bf16 follows the
/// host state's bf16; an fp16 overflow skips its step and halves the scale.
#[test]
fn state_on_the_device_trains_like_state_on_the_host() {
    for world in [1, 2] {
        let want = reference(world);
        for stage in 0..=3u8 {
            for offload in [false, true] {
                if stage == 0 && offload {
                    continue;
                }
                let got = zero_run_of("tiny_gpt2", world, stage, offload, false, true);
                let what = format!("on the device: ZeRO-{stage} offload={offload}, {world} ranks");
                assert_same(&what, &got, &want);
            }
        }
    }
    for stage in [0u8, 3] {
        let mut c = ds_config(stage, false);
        c["bf16"] = json!({"enabled": true});
        let host = run_placed(1, c.clone(), STEPS as i64, false, Default::default(), false);
        let dev = run_placed(1, c, STEPS as i64, false, Default::default(), true);
        let loss = |logs: &[companion::train::LogEntry]| -> Vec<f64> {
            logs.iter()
                .filter_map(|e| e.get("loss").and_then(Value::as_f64))
                .collect()
        };
        for (a, b) in loss(&dev.0).iter().zip(&loss(&host.0)) {
            assert!(
                (a - b).abs() < 1e-3 * b,
                "bf16 ZeRO-{stage} on the device: {a} vs {b}"
            );
        }
    }
    let fp16 =
        json!({"enabled": true, "initial_scale_power": 4, "loss_scale_window": 2, "hysteresis": 1});
    for (stage, world) in [(0u8, 1usize), (3, 2)] {
        overflow_skips_the_step(world, stage, &fp16, true);
    }
}

/// An fp16 overflow injected at step 2 of 2 leaves the weights of step 1,
/// and the loss scale stays 16 for both steps (it halves after the step).
fn overflow_skips_the_step(world: usize, stage: u8, fp16: &Value, on_device: bool) {
    let inject = companion::train::FaultInjection {
        overflow_at_step: Some(2),
        ..Default::default()
    };
    let c = mp_config(stage, fp16.clone());
    let (logs, after_skip) = run_placed(world, c.clone(), 2, true, inject, on_device);
    let (_, one_step) = run_placed(world, c, 1, true, Default::default(), on_device);
    // Step 2 was skipped: the weights are those after step 1.
    for ((n, a), (_, b)) in after_skip.iter().zip(&one_step) {
        assert_eq!(
            max_abs_diff(a, b),
            0.0,
            "ZeRO-{stage} (on the device: {on_device}): {n} changed in the skipped step"
        );
    }
    let scales: Vec<f64> = logs
        .iter()
        .filter_map(|e| e.get("loss_scale").and_then(Value::as_f64))
        .collect();
    assert_eq!(
        scales,
        vec![16.0, 16.0],
        "ZeRO-{stage} (on the device: {on_device})"
    );
}

fn mp_config(stage: u8, fp16: Value) -> Value {
    let mut c = ds_config(stage, false);
    c["fp16"] = fp16;
    c
}

fn run_with(
    world: usize,
    ds: Value,
    steps: i64,
    lr_constant: bool,
    faults: companion::train::FaultInjection,
) -> (Vec<companion::train::LogEntry>, Vec<(String, Tensor)>) {
    run_placed(world, ds, steps, lr_constant, faults, false)
}

/// [`run_with`], the state on each rank's device when `on_device`.
fn run_placed(
    world: usize,
    ds: Value,
    steps: i64,
    lr_constant: bool,
    faults: companion::train::FaultInjection,
    on_device: bool,
) -> (Vec<companion::train::LogEntry>, Vec<(String, Tensor)>) {
    let dir = tempfile::tempdir().unwrap();
    run_ranks(
        world,
        |_, comm: Arc<dyn Communicator>| -> Result<_, TrainError> {
            let mut a = args(dir.path(), ACCUM, Some(ds.clone()));
            // HF insists that the config's precision agrees with the arguments.
            a.bf16 = ds["bf16"]["enabled"] == true;
            a.fp16 = ds["fp16"]["enabled"] == true;
            a.max_steps = steps;
            if lr_constant {
                a.lr_scheduler_type = SchedulerType::Constant;
            }
            let mut t =
                Trainer::new_distributed(model(), a, collator(), dataset(), None, None, comm)?;
            t.verbose = false;
            t.faults = faults;
            if on_device {
                t.engine.zero_mut().unwrap().place_state_on_device()?;
            }
            t.train()?;
            let w = t.full_model()?.named_tensors().into_iter().collect();
            Ok((t.state.log_history.clone(), w))
        },
    )
    .unwrap()
    .remove(0)
}

#[test]
fn bf16_mixed_precision_trains_alike_on_every_stage() {
    let want = reference(1);
    let bf16 = |stage: u8, world: usize| {
        let mut c = ds_config(stage, stage > 0);
        c["bf16"] = json!({"enabled": true});
        let (logs, w) = run_with(world, c, STEPS as i64, false, Default::default());
        let losses: Vec<f64> = logs
            .iter()
            .filter_map(|e| e.get("loss").and_then(Value::as_f64))
            .collect();
        (losses, w)
    };
    let (base, base_w) = bf16(0, 1);
    // bf16 (8 bits of mantissa) follows fp32 closely, not exactly.
    for (a, b) in base.iter().zip(&want.losses) {
        assert!((a - b).abs() < 0.02 * b, "bf16 loss {a} vs fp32 {b}");
    }
    // The saved weights are the fp32 masters, not bf16-rounded copies.
    let rounded = base_w.iter().all(|(_, t)| {
        let back = t
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        max_abs_diff(&back, t) == 0.0
    });
    assert!(!rounded, "full_model() returned bf16-rounded weights");
    // The same global batch on 2 ranks (each accumulating half of it).
    let two = |stage: u8| {
        let mut c = ds_config(stage, stage > 0);
        c["bf16"] = json!({"enabled": true});
        let dir = tempfile::tempdir().unwrap();
        run_ranks(
            2,
            |_, comm: Arc<dyn Communicator>| -> Result<Vec<f64>, TrainError> {
                let mut a = args(dir.path(), 1, Some(c.clone()));
                a.bf16 = true;
                let mut t =
                    Trainer::new_distributed(model(), a, collator(), dataset(), None, None, comm)?;
                t.verbose = false;
                t.train()?;
                Ok(losses_and_norms(&t).0)
            },
        )
        .unwrap()
        .remove(0)
    };
    for stage in 0..=3u8 {
        let l = two(stage);
        for (a, b) in l.iter().zip(&base) {
            assert!(
                (a - b).abs() < 1e-3 * b,
                "bf16 ZeRO-{stage} on 2 ranks: {a} vs {b}"
            );
        }
    }
}

#[test]
fn fp16_overflow_skips_that_step_and_halves_the_scale() {
    use companion::train::FaultInjection;
    let fp16 =
        json!({"enabled": true, "initial_scale_power": 4, "loss_scale_window": 2, "hysteresis": 1});
    for (stage, world) in [(0u8, 1usize), (2, 2), (3, 2)] {
        overflow_skips_the_step(world, stage, &fp16, false);
        // Then 2^4 → 8 after the overflow, and back to 16 after
        // loss_scale_window (2) clean steps.
        let inject = FaultInjection {
            overflow_at_step: Some(1),
            ..Default::default()
        };
        let (logs, _) = run_with(world, mp_config(stage, fp16.clone()), 5, true, inject);
        let scales: Vec<f64> = logs
            .iter()
            .filter_map(|e| e.get("loss_scale").and_then(Value::as_f64))
            .collect();
        assert_eq!(scales, vec![16.0, 8.0, 8.0, 8.0, 16.0], "ZeRO-{stage}");
        // The skipped step has no finite norm (JSON null), the others do.
        let norms: Vec<&Value> = logs.iter().filter_map(|e| e.get("grad_norm")).collect();
        assert!(
            norms[0].is_null() && norms[1..].iter().all(|n| n.is_f64()),
            "{norms:?}"
        );
    }
}

#[test]
fn mpirun_processes_train_like_threads() {
    let has_mpi = has_mpi();
    let dir = tempfile::tempdir().unwrap();
    let z3 = data("ds_config/zero3.json");
    if !has_mpi {
        // A build without the `mpi` feature says so before training.
        let o = pretrain(
            dir.path(),
            "mpi",
            &["--deepspeed", z3.to_str().unwrap(), "--backend", "mpi"],
        );
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("this build has no mpi backend"),
            "{}",
            stderr(&o)
        );
        return;
    }
    // Two MPI processes against two threads: the same run.
    let cache = dir.path().join("cache");
    let flags = |out: &str| -> Vec<String> {
        let mut f = pretrain_flags(dir.path(), out);
        f.extend(["--deepspeed".into(), z3.display().to_string()]);
        f
    };
    let (mpi, thr) = mpirun_and_threads(2, &flags, &cache);
    assert_eq!(mpi["world_size"], 2);
    // The same arithmetic; only the rayon thread pools differ (each process
    // has its own), which can change the last bit of a parallel sum.
    let (a, b) = (
        mpi["train_loss"].as_f64().unwrap(),
        thr["train_loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-6 * b, "mpirun {a} vs threads {b}");
    let load = |p: &str| {
        GPT2LMHeadModel::from_pretrained(
            dir.path().join(p).to_str().unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let named =
        |m: GPT2LMHeadModel| -> Vec<(String, Tensor)> { m.named_tensors().into_iter().collect() };
    assert_weights_close(
        "mpirun vs threads",
        &named(load("mpi_model")),
        &named(load("threads_model")),
    );
    assert!(dir
        .path()
        .join("mpi/checkpoint-2/global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt")
        .is_file());
}

/// ZeRO-3's sums do not depend on how many threads a rank has: 1 and 2
/// rayon threads per rank give the same bits (on 1 rank and on 2).
#[test]
fn zero3_gives_the_same_bits_with_one_and_two_threads_per_rank() {
    let in_pool = |threads: usize, world: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| zero_run(world, 3, true))
    };
    for world in [1, 2] {
        let one = in_pool(world, world);
        let two = in_pool(2 * world, world);
        assert_eq!(one.losses, two.losses, "{world} ranks: losses");
        for ((n, a), (_, b)) in one.weights.iter().zip(&two.weights) {
            let (a, b): (Vec<f32>, Vec<f32>) = (
                a.flatten_all().unwrap().to_vec1().unwrap(),
                b.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{world} ranks: {n} differs between 1 and 2 threads per rank"
            );
        }
    }
}
