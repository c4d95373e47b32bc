//! The 3D-parallel tests' runs (tests/parallel*.rs): the tiny GPT-2
//! fixture trained through the Trainer on a tensor × pipeline × data
//! layout of thread ranks, and what each run gives back.

use std::sync::Arc;

use super::*;
use candle_core::Tensor;
use companion::data::Dataset;
use companion::model::GPT2LMHeadModel;
use companion::train::{IntervalStrategy, SchedulerType, TrainError, Trainer, TrainingArguments};
use companion::zero::comm::{run_ranks, Communicator};
use companion::zero::ModelStateBytes;
use serde_json::json;

pub const STEPS: i64 = 8;
pub const STOP: usize = 4;
/// Examples per global micro-batch (per replica × replicas) and micro-batches per step.
pub const GLOBAL_MICRO: usize = 4;
pub const ACCUM: usize = 2;

/// The tiny GPT-2 fixture (2 blocks, 2 heads, vocabulary 64) without
/// dropout (its own 0.1 in `dropout_model`).
pub fn model(tied: bool) -> GPT2LMHeadModel {
    let mut m = dropout_model(tied);
    (
        m.config.attn_pdrop,
        m.config.embd_pdrop,
        m.config.resid_pdrop,
    ) = (0.0, 0.0, 0.0);
    m
}

pub fn dropout_model(tied: bool) -> GPT2LMHeadModel {
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
pub fn train_rows() -> Dataset {
    dataset_of(
        (0..20u32)
            .map(|i| (0..12).map(|j| 1 + (i * 7 + j * 5) % 63).collect())
            .collect(),
    )
}

/// 20 rows of 5–12 tokens with id 0 (the collator's pad id, whose labels
/// it masks) among them: batches padded on the right, replicas with
/// different numbers of counted tokens.
pub fn ragged_rows() -> Dataset {
    dataset_of(
        (0..20u32)
            .map(|i| (0..5 + i % 8).map(|j| (i * 7 + j * 5) % 64).collect())
            .collect(),
    )
}

pub fn eval_rows() -> Dataset {
    dataset_of(
        (0..5u32)
            .map(|i| (0..12).map(|j| 1 + (i * 11 + j * 3) % 63).collect())
            .collect(),
    )
}

/// A run's layout: tensor and pipeline sizes, data-parallel replicas, and
/// the ZeRO stage of its ds_config (none: no DeepSpeed).
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
    pub stage: Option<u8>,
}

pub const fn layout(tp: usize, pp: usize, dp: usize, stage: Option<u8>) -> Layout {
    Layout { tp, pp, dp, stage }
}

pub fn args(out: &std::path::Path, l: Layout) -> TrainingArguments {
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
#[derive(Debug)]
pub struct Run {
    pub losses: Vec<(u64, f64)>,
    pub norms: Vec<f64>,
    pub eval_losses: Vec<f64>,
    pub weights: Vec<(String, Tensor)>,
    pub memory: Vec<ModelStateBytes>,
    /// The run's (tp, pp, dp), as the Trainer resolved them.
    pub layout: (usize, usize, usize),
}

pub fn logged(t: &Trainer, key: &str) -> Vec<(u64, f64)> {
    t.state
        .log_history
        .iter()
        .filter_map(|e| Some((e.get("step")?.as_u64()?, e.get(key)?.as_f64()?)))
        .collect()
}

/// Train `l` in `out` (stopping after `stop` steps, resuming from `resume`).
pub fn train(
    out: &std::path::Path,
    l: Layout,
    tied: bool,
    stop: Option<usize>,
    resume: Option<&std::path::Path>,
) -> Result<Run, TrainError> {
    train_on(train_rows(), out, l, tied, stop, resume)
}

pub fn train_on(
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
pub fn train_model(
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
                weights: full.named_tensors().into_iter().collect(),
                memory,
                layout: (t.plan.layout.tp, t.plan.layout.pp, t.plan.layout.dp),
            })
        },
    )?;
    Ok(runs.remove(0))
}

pub fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * b.abs()
}
