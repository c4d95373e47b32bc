//! Tensor and pipeline parallelism through the Trainer, on thread ranks:
//! Megatron-LM's layouts train like one rank on the same global batch, and
//! a checkpoint written on one layout and ZeRO stage resumes on another
//! with the uninterrupted run's losses.

mod common;

use std::sync::Arc;

use candle_core::Tensor;
use common::*;
use companion::data::Dataset;
use companion::model::GPT2LMHeadModel;
use companion::train::{IntervalStrategy, SchedulerType, TrainError, Trainer, TrainingArguments};
use companion::zero::comm::{run_ranks, Communicator};
use companion::zero::ModelStateBytes;
use serde_json::{json, Value};

const STEPS: i64 = 8;
const STOP: usize = 4;
/// Examples per global micro-batch (per replica × replicas) and micro-batches per step.
const GLOBAL_MICRO: usize = 4;
const ACCUM: usize = 2;

/// The tiny GPT-2 fixture (2 blocks, 2 heads, vocabulary 64) without
/// dropout (its own 0.1 in `dropout_model`).
fn model(tied: bool) -> GPT2LMHeadModel {
    let mut m = dropout_model(tied);
    (
        m.config.attn_pdrop,
        m.config.embd_pdrop,
        m.config.resid_pdrop,
    ) = (0.0, 0.0, 0.0);
    m
}

fn dropout_model(tied: bool) -> GPT2LMHeadModel {
    let name = if tied {
        "tiny_gpt2"
    } else {
        "tiny_gpt2_untied"
    };
    let m = GPT2LMHeadModel::from_pretrained(
        fixture(name).to_str().unwrap(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(m.config.attn_pdrop, 0.1);
    m
}

/// 20 training rows of 12 tokens: 8 steps of 8 rows run 3.2 epochs, shuffled.
fn train_rows() -> Dataset {
    dataset_of(
        (0..20u32)
            .map(|i| (0..12).map(|j| 1 + (i * 7 + j * 5) % 63).collect())
            .collect(),
    )
}

/// 20 rows of 5–12 tokens with id 0 (the collator's pad id, whose labels
/// it masks) among them: batches padded on the right, replicas with
/// different numbers of counted tokens.
fn ragged_rows() -> Dataset {
    dataset_of(
        (0..20u32)
            .map(|i| (0..5 + i % 8).map(|j| (i * 7 + j * 5) % 64).collect())
            .collect(),
    )
}

fn eval_rows() -> Dataset {
    dataset_of(
        (0..5u32)
            .map(|i| (0..12).map(|j| 1 + (i * 11 + j * 3) % 63).collect())
            .collect(),
    )
}

/// A run's layout: tensor and pipeline sizes, data-parallel replicas, and
/// the ZeRO stage of its ds_config (none: no DeepSpeed).
#[derive(Debug, Clone, Copy)]
struct Layout {
    tp: usize,
    pp: usize,
    dp: usize,
    stage: Option<u8>,
}

const fn layout(tp: usize, pp: usize, dp: usize, stage: Option<u8>) -> Layout {
    Layout { tp, pp, dp, stage }
}

fn args(out: &std::path::Path, l: Layout) -> TrainingArguments {
    TrainingArguments {
        output_dir: out.display().to_string(),
        per_device_train_batch_size: GLOBAL_MICRO / l.dp,
        per_device_eval_batch_size: 2,
        gradient_accumulation_steps: ACCUM,
        max_steps: STEPS,
        learning_rate: 1e-2,
        weight_decay: 0.1,
        lr_scheduler_type: SchedulerType::Cosine,
        warmup_steps: 2.0,
        // Small enough that clipping acts on every step.
        max_grad_norm: 0.5,
        logging_steps: 1.0,
        save_steps: STOP as f64,
        eval_strategy: IntervalStrategy::Steps,
        eval_steps: Some(STOP as f64),
        tensor_model_parallel_size: l.tp,
        pipeline_model_parallel_size: l.pp,
        deepspeed: l.stage.map(|s| {
            json!({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                   "gradient_clipping": "auto", "zero_optimization": {"stage": s}})
        }),
        ..Default::default()
    }
}

/// What a run gives back (rank 0's view; every rank's memory row).
struct Run {
    losses: Vec<(u64, f64)>,
    norms: Vec<f64>,
    eval_losses: Vec<f64>,
    weights: Vec<(String, Tensor)>,
    memory: Vec<ModelStateBytes>,
}

fn logged(t: &Trainer, key: &str) -> Vec<(u64, f64)> {
    t.state
        .log_history
        .iter()
        .filter_map(|e| Some((e.get("step")?.as_u64()?, e.get(key)?.as_f64()?)))
        .collect()
}

/// Train `l` in `out` (stopping after `stop` steps, resuming from `resume`).
fn train(
    out: &std::path::Path,
    l: Layout,
    tied: bool,
    stop: Option<usize>,
    resume: Option<&std::path::Path>,
) -> Result<Run, TrainError> {
    train_on(train_rows(), out, l, tied, stop, resume)
}

fn train_on(
    data: Dataset,
    out: &std::path::Path,
    l: Layout,
    tied: bool,
    stop: Option<usize>,
    resume: Option<&std::path::Path>,
) -> Result<Run, TrainError> {
    train_model(&|| model(tied), &|_| {}, data, out, l, stop, resume)
}

/// [`train_on`] with the model `make` gives and the arguments `tweak` changes.
fn train_model(
    make: &(dyn Fn() -> GPT2LMHeadModel + Sync),
    tweak: &(dyn Fn(&mut TrainingArguments) + Sync),
    data: Dataset,
    out: &std::path::Path,
    l: Layout,
    stop: Option<usize>,
    resume: Option<&std::path::Path>,
) -> Result<Run, TrainError> {
    let world = l.tp * l.pp * l.dp;
    let mut runs = run_ranks(
        world,
        |_, comm: Arc<dyn Communicator>| -> Result<Run, TrainError> {
            let mut a = args(out, l);
            a.resume_from_checkpoint = resume.map(|p| p.display().to_string());
            tweak(&mut a);
            let mut t = Trainer::new_distributed(
                make(),
                a,
                collator(),
                data.clone(),
                Some(eval_rows()),
                None,
                comm,
            )?;
            t.verbose = false;
            if let Some(s) = stop {
                t.add_callback(companion::train::StopAtStep(s));
            }
            t.train()?;
            let memory = t.memory_report()?;
            let full = t.full_model()?;
            Ok(Run {
                losses: logged(&t, "loss"),
                norms: logged(&t, "grad_norm").into_iter().map(|x| x.1).collect(),
                eval_losses: logged(&t, "eval_loss").into_iter().map(|x| x.1).collect(),
                weights: full
                    .named_parameters()
                    .into_iter()
                    .map(|(n, v)| (n, v.as_tensor().clone()))
                    .collect(),
                memory,
            })
        },
    )?;
    Ok(runs.remove(0))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * b.abs()
}

/// tp × pp × dp layouts (with DeepSpeed's ZeRO-1 over two replicas) give one
/// rank's losses, gradient norms, evaluation losses (1e-5 relative) and
/// weights (1e-4), tied and untied; each rank holds less than the whole
/// model, a replica's ranks all of it, and each pipeline stage the
/// activations 1F1B keeps in flight.
#[test]
fn tensor_and_pipeline_parallel_runs_train_like_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    for tied in [true, false] {
        let one = train(
            &dir.path().join("one"),
            layout(1, 1, 1, None),
            tied,
            None,
            None,
        )
        .unwrap();
        assert_eq!(one.losses.len(), STEPS as usize);
        assert!(
            one.norms.iter().all(|&n| n > 0.5),
            "clipping acts: {:?}",
            one.norms
        );
        assert_eq!(one.eval_losses.len(), 2, "evaluated at steps 4 and 8");
        let whole: usize = one.memory[0].params;
        for (i, l) in [
            layout(2, 1, 1, None),
            layout(1, 2, 1, None),
            layout(2, 2, 1, None),
            layout(2, 1, 2, Some(1)),
            layout(1, 2, 2, Some(1)),
        ]
        .into_iter()
        .enumerate()
        {
            let what = format!("{l:?} tied {tied}");
            let run = train(&dir.path().join(format!("l{i}{tied}")), l, tied, None, None).unwrap();
            assert_eq!(run.losses.len(), STEPS as usize, "{what}");
            for ((s, a), (_, b)) in run.losses.iter().zip(&one.losses) {
                assert!(close(*a, *b), "{what}: step {s} loss {a} vs {b}");
            }
            for (a, b) in run.norms.iter().zip(&one.norms) {
                assert!(close(*a, *b), "{what}: grad_norm {a} vs {b}");
            }
            for (a, b) in run.eval_losses.iter().zip(&one.eval_losses) {
                assert!(close(*a, *b), "{what}: eval_loss {a} vs {b}");
            }
            assert_eq!(run.eval_losses.len(), 2, "{what}");
            for ((name, a), (_, b)) in run.weights.iter().zip(&one.weights) {
                // The key bias's gradient is zero but for rounding (softmax
                // is blind to a shift along the keys) and Adam scales that
                // noise to ±lr: its third of c_attn.bias is left out.
                let qv = |t: &Tensor| {
                    let k = t.dim(0).unwrap() / 3;
                    let (q, v) = (t.narrow(0, 0, k).unwrap(), t.narrow(0, 2 * k, k).unwrap());
                    Tensor::cat(&[q, v], 0).unwrap()
                };
                let (a, b) = if name.ends_with("attn.c_attn.bias") {
                    (qv(a), qv(b))
                } else {
                    (a.clone(), b.clone())
                };
                let d = max_abs_diff(&a, &b);
                assert!(d <= 1e-4, "{what}: {name} off by {d}");
            }
            // Every rank holds less than the whole model; a replica's ranks
            // together hold it (plus the replicated layer norms and biases
            // on each tensor rank, and a tied head's copy on the last stage).
            assert_eq!(run.memory.len(), l.tp * l.pp * l.dp, "{what}");
            for m in &run.memory {
                assert!(
                    m.params < whole,
                    "{what}: rank {} holds {}",
                    m.rank,
                    m.params
                );
                assert_eq!(m.stage, u8::from(l.dp > 1), "{what}");
                assert!(m.activations_held.is_some(), "{what}");
            }
            let replica0: usize = run
                .memory
                .iter()
                .filter(|m| (m.rank / l.tp) % l.dp == 0)
                .map(|m| m.params)
                .sum();
            assert!(
                replica0 >= whole,
                "{what}: a replica holds {replica0} of {whole}"
            );
            if l.pp == 2 {
                // 1F1B keeps min(pp − s, micro-batches) in flight on stage s:
                // the first stage both micro-batches' outputs [B·T, C], the
                // last one micro-batch's input and its loss.
                let first = run.memory.iter().find(|m| m.rank < l.tp * l.dp).unwrap();
                let last = run.memory.iter().find(|m| m.rank >= l.tp * l.dp).unwrap();
                let acts = (GLOBAL_MICRO / l.dp) * 12 * 16;
                assert_eq!(first.activations_held, Some(2 * acts * 4), "{what}");
                assert_eq!(last.activations_held, Some((acts + 1) * 4), "{what}");
            }
        }
        assert!(one.memory[0].activations_held.is_none());
    }
}

/// Rows of different lengths padded on the right, the pad id's labels
/// masked by the collator: every layout counts the tokens one rank counts
/// (the loss is the global batch's mean however the replicas' shares
/// differ) and gives its losses within 1e-5.
#[test]
fn padded_batches_and_masked_labels_train_like_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let one = train_on(
        ragged_rows(),
        &dir.path().join("one"),
        layout(1, 1, 1, None),
        true,
        None,
        None,
    )
    .unwrap();
    for (i, l) in [
        layout(2, 2, 1, None),
        layout(1, 2, 2, Some(1)),
        layout(2, 1, 2, Some(1)),
    ]
    .into_iter()
    .enumerate()
    {
        let run = train_on(
            ragged_rows(),
            &dir.path().join(format!("l{i}")),
            l,
            true,
            None,
            None,
        )
        .unwrap();
        assert_eq!(run.losses.len(), STEPS as usize, "{l:?}");
        for ((s, a), (_, b)) in run.losses.iter().zip(&one.losses) {
            assert!(close(*a, *b), "{l:?}: step {s} loss {a} vs {b}");
        }
    }
}

/// With dropout (0.1 on the embeddings, the attention probabilities and
/// both residual branches, or some of them off) every layout drops exactly
/// what one rank drops:
/// each stage draws its blocks' part of the model's counter-based masks,
/// each tensor rank the part of the attention mask over its heads. Losses
/// within 1e-5 of one rank's.
#[test]
fn dropout_on_a_split_model_drops_what_one_rank_drops() {
    let dir = tempfile::tempdir().unwrap();
    // Masks follow each micro-batch's place in the global order (as on the
    // ZeRO path): two replicas of 2-row micro-batches draw what one rank
    // draws with 2-row micro-batches and twice the accumulation.
    let run = |name: &str, l: Layout, one_rank_of: usize| {
        let out = dir.path().join(name);
        let tweak = |a: &mut TrainingArguments| {
            if one_rank_of > 1 {
                a.per_device_train_batch_size = GLOBAL_MICRO / one_rank_of;
                a.gradient_accumulation_steps = ACCUM * one_rank_of;
            }
        };
        train_model(
            &|| dropout_model(true),
            &tweak,
            ragged_rows(),
            &out,
            l,
            None,
            None,
        )
        .unwrap()
        .losses
    };
    let one = run("one", layout(1, 1, 1, None), 1);
    let without = train_on(
        ragged_rows(),
        &dir.path().join("nodrop"),
        layout(1, 1, 1, None),
        true,
        None,
        None,
    )
    .unwrap()
    .losses;
    assert!(
        one.iter()
            .zip(&without)
            .all(|(a, b)| (a.1 - b.1).abs() > 1e-3),
        "dropout changes every step: {one:?} vs {without:?}"
    );
    let one_of_two = run("one_of_two", layout(1, 1, 1, None), 2);
    // Some masks off (not drawn, so the others move up the stream).
    for (attn, embd) in [(0.0, 0.1), (0.1, 0.0)] {
        let make = || {
            let mut m = dropout_model(true);
            (m.config.attn_pdrop, m.config.embd_pdrop) = (attn, embd);
            m
        };
        let go = |name: &str, l: Layout| {
            train_model(
                &make,
                &|_| {},
                ragged_rows(),
                &dir.path().join(name),
                l,
                None,
                None,
            )
            .unwrap()
            .losses
        };
        let want = go(&format!("one{attn}{embd}"), layout(1, 1, 1, None));
        let got = go(&format!("tp2pp2{attn}{embd}"), layout(2, 2, 1, None));
        for ((s, a), (_, b)) in got.iter().zip(&want) {
            assert!(
                close(*a, *b),
                "attn {attn} embd {embd}: step {s} loss {a} vs {b}"
            );
        }
    }
    for (i, l) in [
        layout(2, 2, 1, None),
        layout(2, 1, 2, Some(1)),
        layout(1, 2, 2, Some(1)),
    ]
    .into_iter()
    .enumerate()
    {
        let got = run(&format!("l{i}"), l, 1);
        let want = if l.dp == 2 { &one_of_two } else { &one };
        assert_eq!(got.len(), STEPS as usize, "{l:?}");
        for ((s, a), (_, b)) in got.iter().zip(want) {
            assert!(close(*a, *b), "{l:?}: step {s} loss {a} vs {b}");
        }
    }
}

/// 4 steps at tp 2 × pp 2 with ZeRO-1 saved, resumed at 2 data-parallel
/// replicas with ZeRO-3 (and the other way round, and from no DeepSpeed to
/// tp 2 × dp 2): the next 4 losses are the uninterrupted run's (1e-5
/// relative), the data loader continuing at the same example. A global
/// micro-batch of another size is refused, naming the file.
#[test]
fn a_checkpoint_resumes_on_another_layout_and_zero_stage() {
    let dir = tempfile::tempdir().unwrap();
    let want = train(
        &dir.path().join("straight"),
        layout(1, 1, 1, None),
        true,
        None,
        None,
    )
    .unwrap()
    .losses;
    let cases = [
        (layout(2, 2, 1, Some(1)), layout(1, 1, 2, Some(3))),
        (layout(1, 1, 2, Some(3)), layout(2, 2, 1, Some(1))),
        (layout(1, 1, 1, None), layout(2, 1, 2, Some(1))),
        // Data parallelism alone, on another number of ranks and stage.
        (layout(1, 1, 2, Some(3)), layout(1, 1, 1, Some(1))),
    ];
    for (i, (from, to)) in cases.into_iter().enumerate() {
        let out = dir.path().join(format!("from{i}"));
        train(&out, from, true, Some(STOP), None).unwrap();
        let ckpt = out.join(format!("checkpoint-{STOP}"));
        let optimizer: Value = read_json(&ckpt.join("optimizer.json"));
        assert_eq!(optimizer["tensor_model_parallel_size"], json!(from.tp));
        let got = train(
            &dir.path().join(format!("to{i}")),
            to,
            true,
            None,
            Some(&ckpt),
        )
        .unwrap()
        .losses;
        let after: Vec<_> = got.iter().filter(|(s, _)| *s > STOP as u64).collect();
        assert_eq!(
            after.len(),
            STEPS as usize - STOP,
            "{from:?} → {to:?}: {got:?}"
        );
        for (s, a) in after {
            let b = want[*s as usize - 1].1;
            assert!(close(*a, b), "{from:?} → {to:?}: step {s} loss {a} vs {b}");
        }
    }
    // Twice the examples per global micro-batch: another data order.
    let out = dir.path().join("from0");
    let ckpt = out.join(format!("checkpoint-{STOP}"));
    let mut bigger = layout(1, 1, 2, Some(3));
    bigger.dp = 1;
    let err = run_ranks(
        1,
        |_, comm: Arc<dyn Communicator>| -> Result<(), TrainError> {
            let mut a = args(&dir.path().join("bigger"), bigger);
            a.per_device_train_batch_size = 2 * GLOBAL_MICRO;
            a.resume_from_checkpoint = Some(ckpt.display().to_string());
            let mut t = Trainer::new_distributed(
                model(true),
                a,
                collator(),
                train_rows(),
                None,
                None,
                comm,
            )?;
            t.verbose = false;
            t.train().map(|_| ())
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("rng_state.json") && err.contains("global micro-batch held 4 examples"),
        "{err}"
    );
}

/// DeepSpeed's keys set the layout too (`tensor_parallel.autotp_size`,
/// `pipeline.stages`), with the same result as the flags; a flag that
/// disagrees with them is refused, naming both.
#[test]
fn the_ds_config_sets_the_layout_with_deepspeeds_keys() {
    let dir = tempfile::tempdir().unwrap();
    let ds = json!({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                    "gradient_clipping": "auto", "zero_optimization": {"stage": 1},
                    "tensor_parallel": {"autotp_size": 2}, "pipeline": {"stages": 2}});
    let flags = train(
        &dir.path().join("flags"),
        layout(2, 2, 1, Some(1)),
        true,
        Some(2),
        None,
    )
    .unwrap()
    .losses;
    let run = |tp_flag: usize| {
        run_ranks(
            4,
            |_, comm: Arc<dyn Communicator>| -> Result<_, TrainError> {
                let mut a = args(
                    &dir.path().join(format!("ds{tp_flag}")),
                    layout(1, 1, 1, None),
                );
                (a.deepspeed, a.tensor_model_parallel_size) = (Some(ds.clone()), tp_flag);
                let mut t = Trainer::new_distributed(
                    model(true),
                    a,
                    collator(),
                    train_rows(),
                    None,
                    None,
                    comm,
                )?;
                t.verbose = false;
                t.add_callback(companion::train::StopAtStep(2));
                t.train()?;
                let l = t.plan.layout;
                Ok(((l.tp, l.pp, l.dp), logged(&t, "loss")))
            },
        )
    };
    let (sizes, losses) = run(1).unwrap().remove(0);
    assert_eq!(sizes, (2, 2, 1));
    assert_eq!(losses, flags);
    let err = run(4).unwrap_err().to_string();
    assert!(
        err.contains(
            "tensor_model_parallel_size is 4 but the ds_config's tensor_parallel.autotp_size is 2"
        ),
        "{err}"
    );
}

/// Tensor 2 × pipeline 2 as four MPI processes (sub-groups split with
/// `MPI_Comm_split`) against four thread ranks, through `companion
/// pretrain` with dropout on: the same run. A build without MPI says so.
#[test]
fn mpirun_processes_run_tensor_and_pipeline_parallel_like_threads() {
    let version = stdout(&companion(&["--version"], &[]));
    let has_mpi = version.contains("(mpi)");
    if std::env::var_os("COMPANION_REQUIRE_MPI").is_some() {
        assert!(
            has_mpi,
            "COMPANION_REQUIRE_MPI is set but `companion --version` says {version}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    if !has_mpi {
        let o = pretrain(dir.path(), "mpi", &["--backend", "mpi"]);
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("this build has no mpi backend"),
            "{}",
            stderr(&o)
        );
        return;
    }
    let cache = dir.path().join("cache");
    // Tensor 2 × pipeline 2 over four processes (sub-groups split with
    // MPI_Comm_split) against four threads, dropout on: the same run.
    let layout = |out: &str| -> Vec<String> {
        let mut f = pretrain_flags(dir.path(), out);
        f.extend(
            [
                "--tensor-model-parallel-size",
                "2",
                "--pipeline-model-parallel-size",
                "2",
            ]
            .map(String::from),
        );
        f
    };
    let mut mpi_args = vec!["-np".to_string(), "4".into(), "--oversubscribe".into()];
    mpi_args.push(companion_bin().display().to_string());
    mpi_args.extend(layout("mpi3d"));
    mpi_args.extend(["--backend".into(), "mpi".into()]);
    let o = std::process::Command::new("mpirun")
        .args(&mpi_args)
        .current_dir(root())
        .env("HF_DATASETS_CACHE", &cache)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("run mpirun");
    assert!(o.status.success(), "mpirun 3D failed: {}", stderr(&o));
    let mpi: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let mut threads = layout("threads3d");
    threads.extend(["--num-ranks".into(), "4".into()]);
    let t: Vec<&str> = threads.iter().map(String::as_str).collect();
    let o = companion(&t, &[("HF_DATASETS_CACHE", cache.to_str().unwrap())]);
    assert!(o.status.success(), "{}", stderr(&o));
    let thr: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(mpi["world_size"], 4);
    assert_eq!(mpi["tensor_model_parallel_size"], 2);
    let (a, b) = (
        mpi["train_loss"].as_f64().unwrap(),
        thr["train_loss"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() <= 1e-6 * b,
        "tp 2 × pp 2: mpirun {a} vs threads {b}"
    );
}

/// A batch one data-parallel replica cannot run (a token id outside the
/// vocabulary) stops every rank, the run's error naming it: the failed
/// rank aborts the communicator, so none waits in a collective it never
/// joins.
#[test]
fn a_batch_one_replica_refuses_stops_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows: Vec<Vec<u32>> = (0..20u32)
        .map(|i| (0..12).map(|j| 1 + (i * 7 + j * 5) % 63).collect())
        .collect();
    rows[5][3] = 100;
    let out = dir.path().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = run_ranks(
            4,
            |_, comm: Arc<dyn Communicator>| -> Result<(), TrainError> {
                let a = args(&out, layout(1, 2, 2, Some(1)));
                let mut t = Trainer::new_distributed(
                    model(true),
                    a,
                    collator(),
                    dataset_of(rows.clone()),
                    None,
                    None,
                    comm,
                )?;
                t.verbose = false;
                t.train().map(|_| ())
            },
        );
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("every rank returns (no rank hangs in a collective)");
    let e = r.unwrap_err();
    assert!(e.contains("token id 100 is outside the vocabulary"), "{e}");
}
