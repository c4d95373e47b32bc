//! What the Trainer logs: one `log_history` entry per logging interval
//! (loss, grad norm, learning rate, with HF's keys, and the figures people
//! training models watch: non-padding tokens/s, MFU and ETA), the final
//! metrics of `train()`, and the copy of each entry TensorBoard reads.

use std::time::Instant;

use serde_json::json;

use super::args::TrainingArguments;
use super::state::{LogEntry, TrainerState};

/// `1h02m`, `3m05s`, `12s`: an ETA for a log line.
pub(crate) fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// A number for `log_history` (JSON).
pub(crate) fn num(x: f64) -> serde_json::Value {
    json!(x)
}

/// What one optimizer step did.
pub(super) struct StepReport {
    /// The summed (scaled) loss of the global batch.
    pub(super) loss: f64,
    pub(super) norm: f64,
    pub(super) lr: f64,
    pub(super) loss_scale: Option<f64>,
    /// Tokens of the global batch.
    pub(super) tokens: usize,
    /// Its tokens that are not padding (transformers'
    /// `include_num_input_tokens_seen="non_padding"`).
    pub(super) real_tokens: usize,
    /// Its model FLOPs ([`crate::config::GPT2Config::train_flops_per_token`]).
    pub(super) flops: f64,
}

/// What MFU and ETA are measured against: the machine's matrix-multiply
/// peak (measured once per process and device, printed at the start) and
/// the start of this `train()`.
pub(super) struct Live {
    /// FLOP/s of every device the ranks use (CPU ranks share one machine).
    pub(super) peak_flops: f64,
    pub(super) start: Instant,
    pub(super) start_step: usize,
    pub(super) total: usize,
}

impl Live {
    /// `dtype` is the one forward and backward run in: a GPU's peak is
    /// measured in it; a CPU's is fp32.
    pub(super) fn start(
        device: &candle_core::Device,
        dtype: candle_core::DType,
        devices: usize,
        start_step: usize,
        total: usize,
    ) -> Self {
        static PEAK: std::sync::Mutex<Vec<(String, f64)>> = std::sync::Mutex::new(Vec::new());
        let dtype = if device.is_cpu() {
            candle_core::DType::F32
        } else {
            dtype
        };
        let key = format!("{device:?} {dtype:?}");
        let mut known = PEAK.lock().unwrap_or_else(|p| p.into_inner());
        let gflops = match known.iter().find(|(k, _)| *k == key) {
            Some((_, g)) => *g,
            None => {
                let g = crate::sysmem::peak_gflops(device, dtype).unwrap_or(f64::NAN);
                known.push((key, g));
                g
            }
        };
        Live {
            peak_flops: gflops * 1e9 * devices as f64,
            start: Instant::now(),
            start_step,
            total,
        }
    }

    /// Seconds left at `step`, from the mean step time of this run.
    pub(super) fn eta_seconds(&self, step: usize) -> f64 {
        let done = step.saturating_sub(self.start_step).max(1) as f64;
        self.start.elapsed().as_secs_f64() / done * self.total.saturating_sub(step) as f64
    }
}

/// Tokens, non-padding tokens and model FLOPs of a rank's micro-batches.
pub(super) struct BatchFigures {
    pub(super) tokens: usize,
    pub(super) real_tokens: usize,
    pub(super) flops: f64,
}

impl BatchFigures {
    pub(super) fn of(
        batches: &[Option<crate::data::Batch>],
        cfg: &crate::config::GPT2Config,
    ) -> Self {
        let mut f = BatchFigures {
            tokens: 0,
            real_tokens: 0,
            flops: 0.0,
        };
        for b in batches.iter().flatten() {
            let t = b.input_ids.first().map_or(0, Vec::len);
            let n = b.input_ids.len() * t;
            f.tokens += n;
            f.real_tokens += b
                .attention_mask
                .iter()
                .flatten()
                .filter(|&&m| m == 1)
                .count();
            f.flops += n as f64 * cfg.train_flops_per_token(t);
        }
        f
    }
}

/// DeepSpeed's `steps_per_print` line.
pub(super) fn ds_step_line(
    step: usize,
    skipped: usize,
    lr: f64,
    adam: &crate::optim::adamw::AdamWParams,
) -> String {
    format!(
        "[Rank 0] step={step}, skipped={skipped}, lr=[{lr}], mom=[({}, {})]",
        adam.beta1, adam.beta2
    )
}

/// The log line a printed run shows for entry `e`.
pub(super) fn log_line(
    e: &LogEntry,
    step: usize,
    total: usize,
    s: &StepReport,
    epoch: f64,
) -> String {
    let get = |k: &str| e.get(k).and_then(|v| v.as_f64());
    format!(
        "step {step}/{total}: loss {:.4}, lr {:.3e}, grad_norm {:.3}, epoch {epoch:.2}, {:.0} tokens/s, MFU {:.1}%, ETA {}",
        get("loss").unwrap_or(f64::NAN),
        s.lr,
        s.norm,
        get("tokens_per_second").unwrap_or(0.0),
        100.0 * get("mfu").unwrap_or(f64::NAN),
        duration(get("eta_seconds").unwrap_or(0.0))
    )
}

/// The steps since the last log line.
pub(super) struct LogWindow {
    pub(super) loss: f64,
    pub(super) steps: usize,
    pub(super) tokens: usize,
    pub(super) real_tokens: usize,
    pub(super) flops: f64,
    pub(super) since: Instant,
}

impl LogWindow {
    pub(super) fn new() -> Self {
        LogWindow {
            loss: 0.0,
            steps: 0,
            tokens: 0,
            real_tokens: 0,
            flops: 0.0,
            since: Instant::now(),
        }
    }

    pub(super) fn add(&mut self, s: &StepReport) {
        self.loss += s.loss;
        self.steps += 1;
        self.tokens += s.tokens;
        self.real_tokens += s.real_tokens;
        self.flops += s.flops;
    }
}

/// The `log_history` entry for the steps of `window` (then emptied),
/// ending with `step`.
pub(super) fn log_entry(
    state: &TrainerState,
    step: &StepReport,
    window: &mut LogWindow,
    live: &Live,
) -> LogEntry {
    let secs = window.since.elapsed().as_secs_f64();
    let mut e = LogEntry::new();
    e.insert("loss".into(), num(window.loss / window.steps as f64));
    e.insert("grad_norm".into(), num(step.norm));
    if let Some(sc) = step.loss_scale {
        // fp16: the scale this step used (DeepSpeed logs it).
        e.insert("loss_scale".into(), num(sc));
    }
    e.insert("learning_rate".into(), num(step.lr));
    e.insert("epoch".into(), num(state.epoch));
    e.insert("step".into(), json!(state.global_step));
    let secs = secs.max(1e-9);
    e.insert(
        "tokens_per_second".into(),
        num(window.real_tokens as f64 / secs),
    );
    e.insert(
        "num_input_tokens_seen".into(),
        json!(state.num_input_tokens_seen),
    );
    if live.peak_flops.is_finite() && live.peak_flops > 0.0 {
        e.insert("mfu".into(), num(window.flops / secs / live.peak_flops));
    }
    e.insert(
        "eta_seconds".into(),
        num(live.eta_seconds(state.global_step)),
    );
    *window = LogWindow::new();
    e
}

/// The final `log_history` entry of `train()`.
pub(super) fn train_metrics(
    args: &TrainingArguments,
    accum: usize,
    state: &TrainerState,
    secs: f64,
    steps_done: usize,
    train_loss: f64,
) -> LogEntry {
    let samples = steps_done * accum * args.per_device_train_batch_size;
    let mut m = LogEntry::new();
    m.insert("train_runtime".into(), num(secs));
    m.insert(
        "train_samples_per_second".into(),
        num(samples as f64 / secs),
    );
    m.insert(
        "train_steps_per_second".into(),
        num(steps_done as f64 / secs),
    );
    m.insert("total_flos".into(), num(state.total_flos));
    m.insert("train_loss".into(), num(train_loss));
    m.insert("epoch".into(), num(state.epoch));
    m.insert("step".into(), json!(state.global_step));
    m
}

/// Where log entries go besides `log_history`: TensorBoard, when
/// `report_to` asks for it (rank 0 only).
pub(super) struct Sinks {
    tensorboard: Option<super::tensorboard::SummaryWriter>,
    /// `log_history` entries already written.
    written: usize,
}

impl Sinks {
    pub(super) fn open(
        args: &TrainingArguments,
        rank0: bool,
        written: usize,
    ) -> super::error::Result<Self> {
        let tensorboard = if rank0 && args.reports_to_tensorboard()? {
            let dir = match (&args.logging_dir, std::env::var("TENSORBOARD_LOGGING_DIR")) {
                (Some(d), _) => std::path::PathBuf::from(d),
                (None, Ok(d)) if !d.is_empty() => d.into(),
                _ => super::tensorboard::default_logdir(std::path::Path::new(&args.output_dir)),
            };
            Some(super::tensorboard::SummaryWriter::new(&dir)?)
        } else {
            None
        };
        Ok(Sinks {
            tensorboard,
            written,
        })
    }

    /// The TensorBoard event file, if one is written.
    pub(super) fn event_file(&self) -> Option<&std::path::Path> {
        self.tensorboard.as_ref().map(|w| w.path())
    }

    /// Write the entries of `history` not written yet.
    pub(super) fn write_new(&mut self, history: &[LogEntry]) -> super::error::Result<()> {
        if let Some(tb) = self.tensorboard.as_mut() {
            for e in &history[self.written.min(history.len())..] {
                let step = e.get("step").and_then(|s| s.as_u64()).unwrap_or(0) as usize;
                tb.add_log(e, step)?;
            }
        }
        self.written = history.len();
        Ok(())
    }
}

/// A rank's model-state bytes, as DeepSpeed's memory report gives them.
/// Under DeepSpeed, the config's warnings and each rank's model-state bytes.
pub(super) fn print_memory(warnings: &[String], memory: &[crate::zero::ModelStateBytes]) {
    for w in warnings {
        eprintln!("deepspeed: {w}");
    }
    for m in memory {
        eprintln!("{}", memory_line(m));
    }
}

pub(super) fn memory_line(m: &crate::zero::ModelStateBytes) -> String {
    let h = |b: usize| crate::sysmem::human_bytes(b as u64);
    format!(
        "[rank {}] ZeRO-{} model states: params {}, grads {}, optimizer {} ({} offloaded to host)",
        m.rank,
        m.stage,
        h(m.params),
        h(m.grads),
        h(m.optimizer_states),
        h(m.offloaded_to_host)
    )
}
