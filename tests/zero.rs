//! ZeRO on CPU ranks (threads of this process): every stage, with and
//! without optimizer offload, on 1, 2 and 4 ranks, trains exactly like one
//! rank on the same global batch, and each rank holds the bytes the ZeRO
//! paper says it should.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::*;
use companion::data::{DataCollatorForLanguageModeling, Dataset};
use companion::dist::comm::{run_ranks, Communicator};
use companion::dist::zero::ModelStateBytes;
use companion::model::GPT2LMHeadModel;
use companion::tokenizer::PaddingSide;
use companion::train::{TrainError, Trainer, TrainingArguments};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const MICRO: usize = 2;
const ACCUM: usize = 2;
const STEPS: usize = 3;

/// The tiny GPT-2 fixture, dropout on (stage 3 must replay the same masks).
fn model() -> GPT2LMHeadModel {
    GPT2LMHeadModel::from_pretrained(
        fixture("tiny_gpt2").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
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
    let tokens = rows.iter().map(Vec::len).sum();
    Dataset {
        input_ids: rows,
        text_bytes: tokens * 4,
        text_tokens: tokens,
    }
}

fn collator() -> DataCollatorForLanguageModeling {
    DataCollatorForLanguageModeling {
        pad_token_id: Some(0),
        mlm: false,
        pad_to_multiple_of: None,
        padding_side: PaddingSide::Right,
    }
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
        save_strategy: "no".into(),
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
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(
        model(),
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
    let weights = t
        .model
        .named_parameters()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    Run {
        losses,
        norms,
        weights,
        memory: vec![],
    }
}

fn zero_run(world: usize, stage: u8, offload: bool) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let out = run_ranks(
        world,
        |_, comm: Arc<dyn Communicator>| -> Result<Run, TrainError> {
            let mut t = Trainer::new_distributed(
                model(),
                args(dir.path(), ACCUM, Some(ds_config(stage, offload))),
                collator(),
                dataset(),
                None,
                None,
                comm,
            )?;
            t.verbose = false;
            let memory = t.memory_report()?;
            t.train()?;
            let (losses, norms) = losses_and_norms(&t);
            let full = t.full_model()?;
            let weights = full
                .named_parameters()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone()))
                .collect();
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
    // The attention key bias has an exactly-zero true gradient (softmax is
    // shift invariant): AdamW turns the rounding noise there into arbitrary
    // steps, whatever the summation order, so that slice is left out.
    let c = model().config.n_embd;
    let (mut diff2, mut norm2) = (0f64, 0f64);
    for ((n, a), (m, b)) in got.weights.iter().zip(&want.weights) {
        assert_eq!(n, m);
        let mut a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let mut b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        if n.ends_with("attn.c_attn.bias") {
            a.drain(c..2 * c);
            b.drain(c..2 * c);
        }
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
    let err = |ds: Value, world: usize| -> String {
        run_ranks(
            world,
            |_, comm: Arc<dyn Communicator>| -> Result<(), TrainError> {
                Trainer::new_distributed(
                    model(),
                    args(dir.path(), ACCUM, Some(ds.clone())),
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
        json!({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}),
        2,
    );
    assert!(
        m.contains("train_batch_size=64 vs hf train_batch_size"),
        "{m}"
    );
    let mut c = ds_config(5, false);
    let m = err(c.clone(), 1);
    assert!(
        m.contains("zero_optimization.stage: expected 0, 1, 2 or 3, got 5"),
        "{m}"
    );
    c["zero_optimization"] = json!({"stage": 2, "offload_optimizer": {"device": "nvme"}});
    let m = err(c.clone(), 1);
    assert!(m.contains("nvme") && m.contains("not supported"), "{m}");
    c["zero_optimization"] = json!({"stage": 2});
    c["fp16"] = json!({"enabled": true});
    let m = err(c, 1);
    assert!(m.contains("fp16.enabled"), "{m}");
    // Several ranks without a DeepSpeed config.
    let m = run_ranks(
        2,
        |_, comm: Arc<dyn Communicator>| -> Result<(), TrainError> {
            Trainer::new_distributed(
                model(),
                args(dir.path(), ACCUM, None),
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
    .to_string();
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
                a.save_strategy = "steps".into();
                a.save_steps = 2.0;
                a.resume_from_checkpoint = resume.clone();
                let mut t =
                    Trainer::new_distributed(model(), a, collator(), dataset(), None, None, comm)?;
                t.verbose = false;
                t.train()?;
                let m = t.full_model()?;
                Ok(m.named_parameters()
                    .into_iter()
                    .map(|(n, v)| (n, v.as_tensor().clone()))
                    .collect())
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
        "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.safetensors",
        "global_step2/zero_pp_rank_1_mp_rank_00_optim_states.safetensors",
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
    // Another world size cannot resume these shards.
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
    assert!(e.contains("written by ZeRO stage 3 on 2 ranks"), "{e}");
}
