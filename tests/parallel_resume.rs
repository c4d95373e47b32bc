//! Tensor and pipeline parallelism beyond one run: a checkpoint written on
//! one layout and ZeRO stage resumes on another with the uninterrupted
//! run's losses, the ds_config sets the layout, MPI processes run it like
//! threads, and one rank's bad batch stops them all.

mod common;

use std::sync::Arc;

use common::parallel_runs::*;
use common::*;
use companion::train::{TrainError, Trainer, TrainingArguments};
use companion::zero::comm::{run_ranks, Communicator};
use serde_json::{json, Value};

/// 4 steps at tp 2 × pp 2 with ZeRO-1 saved (DeepSpeed's universal
/// checkpoint), resumed at 2 data-parallel replicas with ZeRO-3 (and the
/// other way round, and from no DeepSpeed to tp 2 × dp 2): the next 4
/// losses are the uninterrupted run's (1e-5 relative), the data loader
/// continuing at the same example. A global
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
        // Under DeepSpeed, a split model's state goes into DeepSpeed's
        // universal checkpoint (whole tensors by name), not optimizer.pt.
        let universal = from.stage.is_some() && from.tp * from.pp > 1;
        let tag = ckpt.join(format!("global_step{STOP}"));
        assert_eq!(ckpt.join("latest_universal").is_file(), universal);
        assert_eq!(
            tag.join("zero/transformer.h.1.mlp.c_fc.weight/exp_avg_sq.pt")
                .is_file(),
            universal
        );
        assert_eq!(ckpt.join("optimizer.pt").is_file(), from.stage.is_none());
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
    let twice = |a: &mut TrainingArguments| a.per_device_train_batch_size = 2 * GLOBAL_MICRO;
    let out = dir.path().join("bigger");
    let err = train_model(
        &|| model(true),
        &twice,
        train_rows(),
        &out,
        bigger,
        None,
        Some(&ckpt),
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
    // Four ranks, the flags left at 1 (or set against the ds_config).
    let run = |tp_flag: usize| {
        let ds_keys = |a: &mut TrainingArguments| {
            a.deepspeed = Some(ds.clone());
            (a.tensor_model_parallel_size, a.pipeline_model_parallel_size) = (tp_flag, 1);
        };
        let out = dir.path().join(format!("ds{tp_flag}"));
        let l = layout(2, 2, 1, None);
        train_model(
            &|| model(true),
            &ds_keys,
            train_rows(),
            &out,
            l,
            Some(2),
            None,
        )
    };
    let Run {
        layout: sizes,
        losses,
        ..
    } = run(1).unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    if !has_mpi() {
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
    let (mpi, thr) = mpirun_and_threads(4, &layout, &cache);
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
