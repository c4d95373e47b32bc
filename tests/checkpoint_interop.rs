//! Checkpoints move between this Trainer and the Python tools in the middle
//! of a run: transformers' Trainer (alone, and with DeepSpeed's engine)
//! continues a run started here, a run they started continues here, with
//! the losses of the uninterrupted run (within fp32 noise); DeepSpeed's
//! `zero_to_fp32.py` rebuilds our ZeRO checkpoints' weights. Both trainers
//! see the batches in order (our loader without shuffling, HF's
//! `train_sampling_strategy = "sequential"`), with dropout off, so the runs
//! are the same run.

mod common;

use candle_core::{DType, Device};
use common::*;
use companion::optim::SchedulerType;
use companion::train::{Trainer, TrainingArguments};
use serde_json::{json, Value};

const STEPS: i64 = 6;
const STOP: usize = 3;

fn rows() -> Vec<Vec<u32>> {
    // 24 rows, 2 per micro-batch, 2 micro-batches per step: 6 steps = 1 epoch.
    (0..24u32)
        .map(|i| (0..8).map(|j| 1 + (i * 7 + j * 3) % 60).collect())
        .collect()
}

/// The arguments both trainers take (HF's names and values).
fn hf_fields() -> Value {
    json!({"max_steps": STEPS, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
           "learning_rate": 1e-2, "weight_decay": 0.1, "lr_scheduler_type": "cosine",
           "warmup_steps": 2, "max_grad_norm": 1.0, "seed": 42})
}

fn trainer(out: &std::path::Path, model: companion::model::GPT2LMHeadModel) -> Trainer {
    trainer_with(out, model, None)
}

fn trainer_with(
    out: &std::path::Path,
    model: companion::model::GPT2LMHeadModel,
    deepspeed: Option<Value>,
) -> Trainer {
    let args = args_for(out, deepspeed);
    let mut t = Trainer::new(model, args, collator(), dataset_of(rows()), None, None).unwrap();
    t.shuffle = false;
    t.verbose = false;
    t
}

/// Our Trainer for one of four ranks (`comm`) of tensor 2 × pipeline 2,
/// with the other tests' arguments, `tweak`ed.
fn split_trainer(
    out: &std::path::Path,
    deepspeed: &Value,
    comm: std::sync::Arc<dyn companion::zero::comm::Communicator>,
    tweak: impl FnOnce(&mut TrainingArguments),
) -> Result<Trainer, companion::train::TrainError> {
    let mut args = args_for(out, Some(deepspeed.clone()));
    (
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
    ) = (2, 2);
    tweak(&mut args);
    let mut t = distributed_trainer(args, comm)?;
    t.shuffle = false;
    Ok(t)
}

/// Our Trainer of the tiny model on the rows, as one rank of `comm`.
fn distributed_trainer(
    args: TrainingArguments,
    comm: std::sync::Arc<dyn companion::zero::comm::Communicator>,
) -> Result<Trainer, companion::train::TrainError> {
    let mut t = Trainer::new_distributed(
        tiny(),
        args,
        collator(),
        dataset_of(rows()),
        None,
        None,
        comm,
    )?;
    t.verbose = false;
    Ok(t)
}

fn args_for(out: &std::path::Path, deepspeed: Option<Value>) -> TrainingArguments {
    TrainingArguments {
        output_dir: out.display().to_string(),
        max_steps: STEPS,
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 2,
        learning_rate: 1e-2,
        weight_decay: 0.1,
        lr_scheduler_type: SchedulerType::Cosine,
        warmup_steps: 2.0,
        logging_steps: 1.0,
        save_steps: STOP as f64,
        deepspeed,
        ..Default::default()
    }
}

fn tiny() -> companion::model::GPT2LMHeadModel {
    let mut m = tiny_gpt2();
    m.config.attn_pdrop = 0.0;
    m.config.embd_pdrop = 0.0;
    m.config.resid_pdrop = 0.0;
    m
}

/// Losses by step from a trainer's log history.
fn our_losses(t: &Trainer) -> Vec<(u64, f64)> {
    t.state
        .log_history
        .iter()
        .filter_map(|e| Some((e.get("step")?.as_u64()?, e.get("loss")?.as_f64()?)))
        .collect()
}

/// transformers 5.24's Trainer divides each step's summed loss by the
/// labels it counts before the shift (8 per row here), not by the 7 per row
/// the model predicts (tests/fixtures/train_step.json records the same as
/// `trainer_unshifted_count`): its logged losses and gradients are ours
/// times 7/8. Both trainers clip to max_grad_norm 1.0, and every step's
/// gradient norm is above it (checked), so the clipped gradients, the
/// weights and Adam's moments are the same in both; only the logged loss
/// carries the factor, undone here.
const HF_LOSS_SCALE: f64 = 8.0 / 7.0;

/// HF's losses by step, in our convention.
fn python_losses(v: &Value) -> Vec<(u64, f64)> {
    let mut out: Vec<(u64, f64)> = v["losses"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, x)| {
            let (loss, norm) = (x[0].as_f64().unwrap(), x[1].as_f64().unwrap());
            assert!(norm > 1.0, "step {k}: grad_norm {norm} is not clipped");
            (k.parse().unwrap(), loss * HF_LOSS_SCALE)
        })
        .collect();
    out.sort_by_key(|x| x.0);
    out
}

fn assert_same_losses(got: &[(u64, f64)], want: &[(u64, f64)], what: &str) {
    let want: Vec<_> = want.iter().filter(|(s, _)| *s > STOP as u64).collect();
    let got: Vec<_> = got.iter().filter(|(s, _)| *s > STOP as u64).collect();
    assert_eq!(
        got.iter().map(|x| x.0).collect::<Vec<_>>(),
        want.iter().map(|x| x.0).collect::<Vec<_>>(),
        "{what}: the steps after the resume"
    );
    for ((s, a), (_, b)) in got.iter().zip(&want) {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "{what}: step {s} loss {a} vs {b} (uninterrupted)"
        );
    }
}

#[test]
fn transformers_trainer_continues_a_run_started_here() {
    let dir = tempfile::tempdir().unwrap();
    let mut straight = trainer(&dir.path().join("straight"), tiny());
    straight.train().unwrap();
    let want = our_losses(&straight);
    assert_eq!(want.len(), STEPS as usize, "{want:?}");

    let out = dir.path().join("stopped");
    let mut t = trainer(&out, tiny());
    t.add_callback(companion::train::StopAtStep(STOP));
    t.train().unwrap();
    let ckpt = out.join(format!("checkpoint-{STOP}"));
    let rows = serde_json::to_string(&rows()).unwrap();
    let got = run_python(
        "hf_resume.py",
        &[
            "resume",
            ckpt.to_str().unwrap(),
            &rows,
            &hf_fields().to_string(),
        ],
    );
    assert_same_losses(&python_losses(&got), &want, "transformers resuming ours");
}

#[test]
fn a_run_transformers_started_continues_here() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init");
    tiny().save_pretrained(&init).unwrap();
    let out = dir.path().join("hf");
    let rows = serde_json::to_string(&rows()).unwrap();
    let hf = run_python(
        "hf_resume.py",
        &[
            "train",
            init.to_str().unwrap(),
            &rows,
            &hf_fields().to_string(),
            out.to_str().unwrap(),
            &STOP.to_string(),
        ],
    );
    let want = python_losses(&hf);
    assert_eq!(want.len(), STEPS as usize, "{want:?}");
    // Our own uninterrupted run takes the same steps as transformers'.
    let mut straight = trainer(&dir.path().join("straight"), tiny());
    straight.train().unwrap();
    for ((s, a), (_, b)) in our_losses(&straight).iter().zip(&want) {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "step {s}: ours {a}, transformers {b}"
        );
    }
    let ckpt = out.join(format!("checkpoint-{STOP}"));
    assert!(
        !ckpt.join("optimizer.json").exists() && ckpt.join("optimizer.pt").exists(),
        "a checkpoint as transformers writes it"
    );
    let mut t = trainer(&dir.path().join("resumed"), tiny());
    t.args.resume_from_checkpoint = Some(ckpt.display().to_string());
    t.train().unwrap();
    assert_eq!(t.state.global_step, STEPS as usize);
    assert_same_losses(&our_losses(&t), &want, "ours resuming transformers'");
}

/// A ds_config naming the optimizer (DeepSpeed then builds one parameter
/// group, our flat buffer's layout); weight decay 0, because DeepSpeed's
/// optimizer would decay biases and layer norms too and ours does not.
fn ds_config(stage: u8) -> Value {
    let mut c = hf_ds_config(stage);
    c["optimizer"] = json!({"type": "AdamW", "params": {"lr": "auto", "betas": "auto",
                                                          "eps": "auto", "weight_decay": "auto"}});
    c
}

/// A ds_config without an optimizer: transformers' Trainer builds its own
/// AdamW (decay and no-decay groups, as ours) and DeepSpeed flattens each group.
fn hf_ds_config(stage: u8) -> Value {
    json!({"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
           "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
           "gradient_clipping": "auto"})
}

fn ds_fields(stage: u8) -> Value {
    let mut f = hf_fields();
    f["weight_decay"] = json!(0.0);
    f["deepspeed"] = ds_config(stage);
    f
}

fn ds_trainer(out: &std::path::Path, stage: u8) -> Trainer {
    let mut t = trainer_with(out, tiny(), Some(ds_config(stage)));
    t.args.weight_decay = 0.0;
    t
}

/// The Python fields and our trainer for a DeepSpeed run of `stage`, its
/// ds_config naming the optimizer or not (then weight decay is on).
fn ds_case(stage: u8, named: bool, out: &std::path::Path) -> (Value, Trainer) {
    if named {
        (ds_fields(stage), ds_trainer(out, stage))
    } else {
        let mut f = hf_fields();
        f["deepspeed"] = hf_ds_config(stage);
        (f, trainer_with(out, tiny(), Some(hf_ds_config(stage))))
    }
}

const DS_CASES: [(u8, bool); 4] = [(2, true), (3, true), (2, false), (3, false)];

/// DeepSpeed's engine (under transformers' Trainer, one CPU rank) takes a
/// ZeRO checkpoint written here and continues with our run's losses, with
/// the optimizer the ds_config names (one group) and with transformers' own
/// (two groups, weight decay on).
#[test]
fn deepspeed_continues_a_zero_run_started_here() {
    for (stage, named) in DS_CASES {
        let dir = tempfile::tempdir().unwrap();
        let (fields, mut straight) = ds_case(stage, named, &dir.path().join("straight"));
        straight.train().unwrap();
        let want = our_losses(&straight);
        let out = dir.path().join("stopped");
        let mut t = ds_case(stage, named, &out).1;
        t.add_callback(companion::train::StopAtStep(STOP));
        t.train().unwrap();
        let ckpt = out.join(format!("checkpoint-{STOP}"));
        deepspeed_continues(
            &ckpt,
            &fields,
            &want,
            &format!("DeepSpeed resuming our ZeRO-{stage} (optimizer named: {named})"),
        );
    }
}

/// DeepSpeed's engine (under transformers' Trainer, one CPU rank, ZeRO-1
/// with `"checkpoint": {"load_universal": true}`) takes the universal
/// checkpoint of a tensor 2 × pipeline 2 run of four ranks written here and
/// continues with the uninterrupted run's losses: a split model's state
/// resumed on another layout by DeepSpeed itself, without its conversion
/// step; with transformers' optimizer (two groups) and the one the
/// ds_config names.
#[test]
fn deepspeed_continues_a_tensor_and_pipeline_parallel_run_from_its_universal_checkpoint() {
    use companion::zero::comm::run_ranks;
    for named in [false, true] {
        let mut ds = if named { ds_config(1) } else { hf_ds_config(1) };
        ds["checkpoint"] = json!({"load_universal": true});
        let mut fields = hf_fields();
        fields["deepspeed"] = ds.clone();
        // DeepSpeed's named optimizer decays every parameter (one group):
        // weight decay off, as in `ds_case`.
        let decay = if named { 0.0 } else { 0.1 };
        fields["weight_decay"] = json!(decay);
        let dir = tempfile::tempdir().unwrap();
        let mut straight = trainer_with(&dir.path().join("straight"), tiny(), Some(ds.clone()));
        straight.args.weight_decay = decay;
        straight.train().unwrap();
        let want = our_losses(&straight);
        let out = dir.path().join("split");
        run_ranks(4, |_, comm| {
            let mut t = split_trainer(&out, &ds, comm, |a| a.weight_decay = decay)?;
            t.add_callback(companion::train::StopAtStep(STOP));
            t.train()
        })
        .unwrap();
        let ckpt = out.join(format!("checkpoint-{STOP}"));
        let tag = ckpt.join(format!("global_step{STOP}"));
        assert!(
            std::fs::read_to_string(ckpt.join("latest_universal")).unwrap()
                == format!("global_step{STOP}")
                && tag.join("zero/optimizer_state.pt").is_file()
                && tag.join("mp_rank_00_model_states.pt").is_file()
                && !ckpt.join("latest").exists(),
            "a universal checkpoint, as ds_to_universal.py lays it out"
        );
        deepspeed_continues(
            &ckpt,
            &fields,
            &want,
            &format!("DeepSpeed resuming our tp 2 × pp 2 run (optimizer named: {named})"),
        );
    }
}

/// transformers' Trainer with DeepSpeed (`fields`) resumes from `ckpt`
/// and takes the steps after it with the uninterrupted run's losses `want`.
fn deepspeed_continues(ckpt: &std::path::Path, fields: &Value, want: &[(u64, f64)], what: &str) {
    let rows = serde_json::to_string(&rows()).unwrap();
    let got = run_python(
        "hf_resume.py",
        &["resume", ckpt.to_str().unwrap(), &rows, &fields.to_string()],
    );
    assert_same_losses(&python_losses(&got), want, what);
}

/// transformers' Trainer with DeepSpeed (`fields`) from the tiny model, in
/// `dir`: its uninterrupted run's losses, and the `checkpoint-STOP` folder
/// of the same run stopped there.
fn deepspeed_run(dir: &std::path::Path, fields: &Value) -> (Vec<(u64, f64)>, std::path::PathBuf) {
    let init = dir.join("init");
    tiny().save_pretrained(&init).unwrap();
    let out = dir.join("ds");
    let rows = serde_json::to_string(&rows()).unwrap();
    let ds = run_python(
        "hf_resume.py",
        &[
            "train",
            init.to_str().unwrap(),
            &rows,
            &fields.to_string(),
            out.to_str().unwrap(),
            &STOP.to_string(),
        ],
    );
    (python_losses(&ds), out.join(format!("checkpoint-{STOP}")))
}

/// A run DeepSpeed's engine started (and checkpointed in its own files)
/// continues here with the losses DeepSpeed's uninterrupted run had: with
/// the optimizer the ds_config names (one group) and with transformers' own
/// (two groups, weight decay on).
#[test]
fn a_zero_run_deepspeed_started_continues_here() {
    for (stage, named) in DS_CASES {
        let dir = tempfile::tempdir().unwrap();
        let (fields, mut t) = ds_case(stage, named, &dir.path().join("resumed"));
        let (want, ckpt) = deepspeed_run(dir.path(), &fields);
        let tag = ckpt.join(format!("global_step{STOP}"));
        assert!(
            tag.join("zero_pp_rank_0_mp_rank_00_optim_states.pt")
                .is_file()
                && !ckpt.join("optimizer.json").exists(),
            "a checkpoint as DeepSpeed writes it"
        );
        t.args.resume_from_checkpoint = Some(ckpt.display().to_string());
        t.train().unwrap();
        assert_eq!(t.state.global_step, STEPS as usize);
        assert_same_losses(
            &our_losses(&t),
            &want,
            &format!("ours resuming DeepSpeed's ZeRO-{stage} (optimizer named: {named})"),
        );
    }
}

/// A run DeepSpeed's engine started (ZeRO-2, one rank) and checkpointed,
/// converted by DeepSpeed's `ds_to_universal.py` (its own files then
/// removed, so only the universal checkpoint is left), continues here on
/// four ranks as tensor 2 × pipeline 2 with ZeRO-1, with the losses of
/// DeepSpeed's uninterrupted run.
#[test]
fn deepspeeds_universal_checkpoint_resumes_here_on_another_layout() {
    use companion::zero::comm::run_ranks;
    let dir = tempfile::tempdir().unwrap();
    let mut fields = hf_fields();
    fields["deepspeed"] = hf_ds_config(2);
    let (want, ckpt) = deepspeed_run(dir.path(), &fields);
    let tag = ckpt.join(format!("global_step{STOP}"));
    let converted = std::process::Command::new(python())
        .args([
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--inject_missing_state",
        ])
        .arg("--input_folder")
        .arg(&tag)
        .arg("--output_folder")
        .arg(ckpt.join("universal"))
        .env("DS_ACCELERATOR", "cpu")
        .output()
        .unwrap();
    assert!(converted.status.success(), "{}", stderr(&converted));
    assert!(ckpt.join("latest_universal").is_file());
    std::fs::remove_dir_all(&tag).unwrap();
    std::fs::remove_file(ckpt.join("latest")).unwrap();
    let resumed = dir.path().join("resumed");
    let losses = run_ranks(4, |_, comm| {
        let resume =
            |a: &mut TrainingArguments| a.resume_from_checkpoint = Some(ckpt.display().to_string());
        let mut t = split_trainer(&resumed, &hf_ds_config(1), comm, resume)?;
        t.train()?;
        Ok::<_, companion::train::TrainError>(our_losses(&t))
    })
    .unwrap();
    assert_same_losses(
        &losses[0],
        &want,
        "ours at tp 2 × pp 2 resuming DeepSpeed's universal checkpoint of a ZeRO-2 run",
    );
}

/// DeepSpeed's `zero_to_fp32.py`, on a checkpoint of 2 ranks written here
/// (ZeRO-2 with one parameter group, ZeRO-3 with transformers' two),
/// rebuilds exactly the weights of its `model.safetensors`.
#[test]
fn zero_to_fp32_rebuilds_our_weights() {
    use companion::zero::comm::{run_ranks, Communicator};
    use std::sync::Arc;
    for (stage, named) in [(2, true), (3, false)] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        run_ranks(
            2,
            |_, comm: Arc<dyn Communicator>| -> Result<(), companion::train::TrainError> {
                let mut args = ds_case(stage, named, &out).1.args;
                args.max_steps = STOP as i64;
                distributed_trainer(args, comm)?.train()?;
                Ok(())
            },
        )
        .unwrap();
        let ckpt = out.join(format!("checkpoint-{STOP}"));
        let got = run_python("zero_to_fp32.py", &[ckpt.to_str().unwrap()]);
        assert_eq!(
            (got["stage"].as_u64(), got["world_size"].as_u64()),
            (Some(stage as u64), Some(2))
        );
        assert_eq!(got["missing"], json!([]), "ZeRO-{stage}");
        assert_eq!(
            got["extra"],
            json!(["lm_head.weight"]),
            "the tied head, as DeepSpeed lists it"
        );
        assert_eq!(got["max_abs_diff"], 0.0, "ZeRO-{stage}");
        // `companion zero-to-fp32` gives the same weights, as a model folder.
        let conv = dir.path().join("fp32");
        let o = companion(
            &[
                "zero-to-fp32",
                ckpt.to_str().unwrap(),
                conv.to_str().unwrap(),
                "--json",
            ],
            &[],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(summary["zero_stage"], stage);
        let ours =
            candle_core::safetensors::load(ckpt.join("model.safetensors"), &Device::Cpu).unwrap();
        let conv_w =
            candle_core::safetensors::load(conv.join("model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(conv_w.len(), ours.len());
        for (k, a) in &ours {
            let b = &conv_w[k];
            assert_eq!(a.shape(), b.shape(), "{k}");
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{k}");
        }
        companion::GPT2LMHeadModel::from_pretrained(
            conv.to_str().unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        // A second run never overwrites the folder; a rank's missing file is named.
        let again = companion(
            &[
                "zero-to-fp32",
                ckpt.to_str().unwrap(),
                conv.to_str().unwrap(),
            ],
            &[],
        );
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("exists and is not empty"));
        let tag = ckpt.join(format!("global_step{STOP}"));
        std::fs::remove_file(tag.join("zero_pp_rank_1_mp_rank_00_optim_states.pt")).unwrap();
        let broken = companion(
            &[
                "zero-to-fp32",
                ckpt.to_str().unwrap(),
                dir.path().join("x").to_str().unwrap(),
            ],
            &[],
        );
        let err = String::from_utf8_lossy(&broken.stderr);
        assert!(
            !broken.status.success()
                && err.contains("partition_count says 2 ranks, but 1 *_optim_states.pt"),
            "{err}"
        );
        assert!(!dir.path().join("x").exists(), "nothing written on failure");
    }
}

/// A checkpoint resumes under another ZeRO stage, or with DeepSpeed turned
/// on or off: the state is rebuilt by parameter name and cut again for the
/// new run, which takes the uninterrupted run's steps.
#[test]
fn a_checkpoint_resumes_under_another_zero_stage() {
    let dir = tempfile::tempdir().unwrap();
    let mut straight = trainer(&dir.path().join("straight"), tiny());
    straight.args.weight_decay = 0.0;
    straight.train().unwrap();
    let want = our_losses(&straight);
    // (written by, resumed by): None is a run without DeepSpeed.
    let cases: [(Option<u8>, Option<u8>); 6] = [
        (Some(3), Some(1)),
        (Some(1), Some(3)),
        (None, Some(2)),
        (Some(2), None),
        (Some(0), Some(2)),
        (Some(3), Some(0)),
    ];
    for (i, (from, to)) in cases.into_iter().enumerate() {
        let make = |out: &std::path::Path, stage: Option<u8>| match stage {
            Some(s) => ds_trainer(out, s),
            None => {
                let mut t = trainer(out, tiny());
                t.args.weight_decay = 0.0;
                t
            }
        };
        let out = dir.path().join(format!("case{i}"));
        let mut t = make(&out, from);
        t.add_callback(companion::train::StopAtStep(STOP));
        t.train().unwrap();
        let mut r = make(&dir.path().join(format!("resumed{i}")), to);
        r.args.resume_from_checkpoint =
            Some(out.join(format!("checkpoint-{STOP}")).display().to_string());
        r.train().unwrap();
        let got = our_losses(&r);
        for ((s, a), (_, b)) in got.iter().zip(&want).filter(|((s, _), _)| *s > STOP as u64) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "written by {from:?}, resumed by {to:?}: step {s} loss {a} vs {b}"
            );
        }
        assert_eq!(got.len(), STEPS as usize, "{from:?} → {to:?}: {got:?}");
    }
}
