//! Tensor and pipeline parallelism beyond one run: a checkpoint written on
//! one layout and ZeRO stage resumes on another with the uninterrupted
//! run's losses, the ds_config sets the layout, MPI processes run it like
//! threads, and one rank's bad batch stops them all.

mod common;

use std::sync::Arc;

use common::parallel_runs::*;
use common::*;
use companion::train::{TrainError, Trainer};
use companion::zero::comm::{run_ranks, Communicator};
use serde_json::{json, Value};

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
