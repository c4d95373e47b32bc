//! Benchmarks that print figures (`companion bench …`): they measure, they
//! never pass or fail. Shapes are the ones the issues name, so that
//! `bench/model.py` can run the same ones in PyTorch in the same session.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use companion::config::GPT2Config;
use companion::generate::GenerationConfig;
use companion::model::{GPT2LMHeadModel, GradientPath, MicroBatch, Result};

/// A benchmark shape: model config plus batch and sequence length.
pub struct Shape {
    pub name: &'static str,
    pub config: GPT2Config,
    pub batch: usize,
    pub seq: usize,
}

/// `small`: 4 layers, 256 wide, vocab 8192, 8 × 256 tokens.
/// `gpt2`: the 124M model, 1 × 512 tokens.
pub fn shape(name: &str) -> Option<Shape> {
    match name {
        "small" => Some(Shape {
            name: "small",
            config: GPT2Config {
                n_layer: 4,
                n_embd: 256,
                n_head: 4,
                vocab_size: 8192,
                n_positions: 256,
                ..Default::default()
            },
            batch: 8,
            seq: 256,
        }),
        "gpt2" => Some(Shape {
            name: "gpt2",
            config: GPT2Config::preset("gpt2").expect("preset"),
            batch: 1,
            seq: 512,
        }),
        _ => None,
    }
}

pub use companion::sysmem::peak_rss_mib;

/// `dtype` as the flags and reports name it.
fn dtype_name(dtype: DType) -> &'static str {
    if dtype == DType::BF16 {
        "bf16"
    } else {
        "f32"
    }
}

fn random_ids(rows: usize, cols: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = companion::rng::SeededRng::new(seed);
    (0..rows)
        .map(|_| (0..cols).map(|_| rng.below(vocab as u64) as u32).collect())
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Forward + backward + AdamW step as the Trainer runs it (the ZeRO
/// engine, stage 0 on one rank), timed per step (median after a warm-up).
/// `autograd` runs candle's autograd instead of the fused CPU kernels (the
/// only path off the CPU or in bf16); bf16 keeps fp32 master weights.
pub fn train(
    shape: &Shape,
    steps: usize,
    autograd: bool,
    device: &Device,
    dtype: DType,
) -> std::result::Result<Value, companion::train::TrainError> {
    use companion::collect_env::device_memory_used;
    use companion::optim::AdamWParams;
    use companion::zero::comm::SingleRank;
    use companion::zero::{Precision, ZeroEngine};
    let cfg = &shape.config;
    let mut model = GPT2LMHeadModel::new(cfg, 0, device)?;
    model.set_training(true);
    let adam = AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut engine = ZeroEngine::new(
        &model,
        companion::zero::ZeroStrategy::Stage0,
        adam,
        std::sync::Arc::new(SingleRank),
    )?;
    if dtype == DType::BF16 {
        engine = engine.with_precision(&model, &Precision::Bf16)?;
        model = model.to_dtype(dtype)?;
    }
    let mut path = if autograd {
        GradientPath::Autograd
    } else {
        GradientPath::choose(cfg, device, dtype, false)
    };
    let ids = Tensor::new(
        random_ids(shape.batch, shape.seq, cfg.vocab_size, 1),
        device,
    )?;
    let labels = ids.to_dtype(DType::I64)?;
    let n_items = (shape.batch * (shape.seq - 1)) as f64;
    let (mut times, mut fwd_bwd) = (Vec::new(), Vec::new());
    let mut peak_device = 0u64;
    for step in 0..steps + 1 {
        let t = Instant::now();
        let batch = MicroBatch {
            input_ids: &ids,
            labels: &labels,
            attention_mask: None,
            n_items,
            loss_scale: 1.0,
        };
        path.forward_backward(&model, &batch, &mut engine)?;
        let t_fb = t.elapsed().as_secs_f64();
        engine.step(&model, 1e-4, 1.0)?;
        if step > 0 {
            times.push(t.elapsed().as_secs_f64());
            fwd_bwd.push(t_fb);
        }
        peak_device = peak_device.max(device_memory_used(device).unwrap_or(0));
    }
    let step_s = median(times);
    let fb_s = median(fwd_bwd);
    let tokens = (shape.batch * shape.seq) as f64;
    let flops_per_token = cfg.train_flops_per_token(shape.seq);
    let achieved = flops_per_token * tokens / step_s / 1e9;
    // MFU is against the GEMM rate in the run's dtype on its device.
    let peak = companion::sysmem::peak_gflops(device, dtype)?;
    Ok(json!({
        "implementation": match path.name() {
            "fused" => "companion (fused CPU kernels)",
            _ => "companion (candle autograd)",
        },
        "bench": "train",
        "device": format!("{device:?}"),
        "dtype": dtype_name(dtype),
        "shape": shape.name,
        "batch": shape.batch,
        "seq": shape.seq,
        "parameters": cfg.num_parameters(),
        "threads": rayon::current_num_threads(),
        "step_seconds": step_s,
        "forward_backward_seconds": fb_s,
        "optimizer_seconds": step_s - fb_s,
        "tokens_per_second": tokens / step_s,
        "model_gflops": achieved,
        "gemm_peak_gflops": peak,
        "mfu": achieved / peak,
        "peak_rss_mib": peak_rss_mib(),
        "peak_device_memory_gib": (!device.is_cpu()).then(|| peak_device as f64 / (1u64 << 30) as f64),
    }))
}

/// 128 new tokens from an 8-token prompt, greedy with repetition penalty 1.1.
pub fn generate(shape: &Shape, new_tokens: usize, device: &Device, dtype: DType) -> Result<Value> {
    let mut cfg = shape.config.clone();
    cfg.n_positions = cfg.n_positions.max(8 + new_tokens);
    let model = GPT2LMHeadModel::new(&cfg, 0, device)?.to_dtype(dtype)?;
    let prompt = random_ids(1, 8, cfg.vocab_size, 2);
    let gen = GenerationConfig {
        max_new_tokens: Some(new_tokens),
        repetition_penalty: 1.1,
        ..Default::default()
    };
    let mut stamps = Vec::with_capacity(new_tokens);
    let t = Instant::now();
    model.generate_with_streamer(&prompt, None, &gen, false, |_, _| {
        stamps.push(t.elapsed().as_secs_f64())
    })?;
    let total = t.elapsed().as_secs_f64();
    let per_token: Vec<f64> = stamps.windows(2).map(|w| w[1] - w[0]).collect();
    let k = (per_token.len() / 8).max(1);
    let first = median(per_token[..k].to_vec());
    let last = median(per_token[per_token.len() - k..].to_vec());
    let tps = new_tokens as f64 / total;
    let weight_bytes = (cfg.num_parameters() * dtype.size_in_bytes()) as f64;
    Ok(json!({
        "implementation": "companion (candle)",
        "bench": "generate",
        "device": format!("{device:?}"),
        "dtype": dtype_name(dtype),
        "shape": shape.name,
        "prompt_tokens": 8,
        "new_tokens": new_tokens,
        "threads": rayon::current_num_threads(),
        "seconds": total,
        "tokens_per_second": tps,
        "ms_per_token_first": first * 1e3,
        "ms_per_token_last": last * 1e3,
        "weights_gb_per_second": weight_bytes * tps / 1e9,
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// How `bench trainer` runs: timed steps, recomputation, the ds_config,
/// CPU ranks, and their tensor × pipeline layout with the micro-batches a
/// step (gradient accumulation, the pipeline's micro-batches).
pub struct TrainerRun {
    pub steps: usize,
    pub gradient_checkpointing: bool,
    pub deepspeed: Option<Value>,
    pub ranks: usize,
    pub tensor_model_parallel_size: usize,
    pub pipeline_model_parallel_size: usize,
    pub gradient_accumulation_steps: usize,
}

/// The whole `Trainer` step (collation, forward, backward, clipping, AdamW
/// through the ZeRO engine or the 3D trainer, logging) on `ranks` CPU
/// ranks: tokens/s, peak memory and each rank's model-state bytes; with
/// tensor or pipeline parallelism also each rank's bubble and the elements
/// it sent through each group in the last step beside the papers' count.
/// Against `train` (a bare forward/backward/AdamW loop) it shows what the
/// Trainer adds; with `gradient_checkpointing` what recomputation costs
/// and saves.
pub fn trainer(
    shape: &Shape,
    run: &TrainerRun,
    device: &Device,
) -> std::result::Result<Value, companion::train::TrainError> {
    use companion::zero::comm::{run_ranks, Communicator, SingleRank};
    use std::sync::Arc;
    let (steps, ranks) = (run.steps, run.ranks.max(1));
    let (tp, pp, accum) = (
        run.tensor_model_parallel_size.max(1),
        run.pipeline_model_parallel_size.max(1),
        run.gradient_accumulation_steps.max(1),
    );
    let cfg = shape.config.clone();
    let dp = (ranks / (tp * pp)).max(1);
    let rows = random_ids(
        shape.batch * dp * accum * (steps + 1),
        shape.seq,
        cfg.vocab_size,
        1,
    );
    let tokens = rows.len() * shape.seq;
    let ds = companion::data::Dataset::from_rows(rows, tokens * 4, tokens);
    let dir = tempfile::tempdir().map_err(|e| companion::train::TrainError::Io {
        path: "(temp dir)".into(),
        msg: e.to_string(),
    })?;
    let job =
        |comm: Arc<dyn Communicator>| -> std::result::Result<Value, companion::train::TrainError> {
            let model = GPT2LMHeadModel::new(&cfg, 0, device)?;
            let args = companion::train::TrainingArguments {
                output_dir: dir.path().display().to_string(),
                max_steps: (steps + 1) as i64,
                per_device_train_batch_size: shape.batch,
                gradient_accumulation_steps: accum,
                learning_rate: 1e-4,
                logging_steps: 1.0,
                save_strategy: companion::train::IntervalStrategy::No,
                gradient_checkpointing: run.gradient_checkpointing,
                deepspeed: run.deepspeed.clone(),
                tensor_model_parallel_size: tp,
                pipeline_model_parallel_size: pp,
                ..Default::default()
            };
            let collator = companion::data::DataCollatorForLanguageModeling {
                pad_token_id: Some(0),
                mlm: false,
                pad_to_multiple_of: None,
                padding_side: companion::tokenizer::PaddingSide::Right,
            };
            let mut t = companion::train::Trainer::new_distributed(
                model,
                args,
                collator,
                ds.clone(),
                None,
                None,
                comm,
            )?;
            t.verbose = false;
            t.shuffle = false;
            t.train()?;
            let tps: Vec<f64> = t
                .state
                .log_history
                .iter()
                .filter_map(|e| e.get("tokens_per_second").and_then(Value::as_f64))
                .skip(1)
                .collect();
            let memory = t.memory_report()?;
            Ok(json!({
                "tokens_per_second": median(tps),
                "model_state_bytes_per_rank": memory,
                "rank": t.engine.rank(),
                "parallel": parallel_figures(&t, &cfg, shape),
            }))
        };
    let all = if ranks == 1 {
        vec![job(Arc::new(SingleRank))?]
    } else {
        run_ranks(ranks, |_, comm| job(comm))?
    };
    let mut r = all[0].clone();
    let o = r.as_object_mut().expect("object");
    o.remove("rank");
    o.remove("parallel");
    if tp * pp > 1 {
        let ranks_fig: Vec<&Value> = all.iter().map(|v| &v["parallel"]).collect();
        // PipeDream-Flush's bubble: (pp − 1) idle slots of m + pp − 1.
        let m = accum as f64;
        o.insert(
            "bubble_formula".into(),
            json!((pp as f64 - 1.0) / (m + pp as f64 - 1.0)),
        );
        o.insert("per_rank".into(), json!(ranks_fig));
    }
    o.insert("tensor_model_parallel_size".into(), json!(tp));
    o.insert("pipeline_model_parallel_size".into(), json!(pp));
    o.insert("data_parallel_size".into(), json!(dp));
    o.insert("micro_batches_per_step".into(), json!(accum));
    o.insert("implementation".into(), json!("companion Trainer (candle)"));
    o.insert("device".into(), json!(format!("{device:?}")));
    o.insert("bench".into(), json!("trainer"));
    o.insert("shape".into(), json!(shape.name));
    o.insert("batch_per_rank".into(), json!(shape.batch));
    o.insert("seq".into(), json!(shape.seq));
    o.insert("ranks".into(), json!(ranks));
    o.insert(
        "gradient_checkpointing".into(),
        json!(run.gradient_checkpointing),
    );
    o.insert("threads".into(), json!(rayon::current_num_threads()));
    o.insert("peak_rss_mib".into(), json!(peak_rss_mib()));
    Ok(r)
}

/// A tensor/pipeline-parallel rank's last step: its place, the share of
/// the step it waited on its pipeline neighbours, and the bytes it sent
/// through each group beside the Megatron and ZeRO papers' count.
fn parallel_figures(
    t: &companion::train::Trainer,
    cfg: &companion::config::GPT2Config,
    shape: &Shape,
) -> Value {
    let companion::train::engine::Engine::ModelParallel(mp) = &t.engine else {
        return Value::Null;
    };
    let p = &mp.trainer;
    let (l, c) = (p.groups.layout, p.groups.coords);
    let held: usize = p.shards().iter().map(|(_, s)| s.elem_count()).sum();
    let want = companion::parallel::traffic::expected(&companion::parallel::traffic::StepShape {
        config: cfg,
        tp: l.tp,
        pp: l.pp,
        dp: l.dp,
        stage: c.pp,
        micro_batches: t.plan.batch.gradient_accumulation_steps,
        rows: shape.batch,
        seq: shape.seq,
        held,
    });
    let bytes = |x: &companion::parallel::traffic::Traffic| json!({"tensor": x.tensor * 4, "pipeline": x.pipeline * 4, "data": x.data * 4});
    json!({
        "rank": t.engine.rank(),
        "tp_rank": c.tp, "dp_rank": c.dp, "stage": c.pp,
        "bubble_measured": mp.last_bubble,
        "sent_bytes_measured": bytes(&p.last_traffic),
        "sent_bytes_formula": bytes(&want),
        "params_bytes_measured": held * 4,
        "params_bytes_formula": companion::parallel::traffic::expected_held(cfg, l.tp, l.pp, c.pp) * 4,
        "activations_held_bytes": mp.activations_held,
    })
}
