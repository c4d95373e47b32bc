//! The notebooks' quick mode: 4.3.4's full recipe (2000 steps) takes about
//! ten minutes on two cores, so the test command trains only the first
//! steps and checks that their log equals the committed run's
//! (`notebooks/fixtures/pretrained_model/`, made by the same notebook in
//! full mode); the cells after it then show that committed run, and 4.3.5
//! generates with its model. Every stored output stays the output of the code
//! under test: the committed run was made by it, and its first steps are
//! re-made and compared on every test run. A reader (no `COMPANION_NOTEBOOKS`)
//! and `./scripts/test --full` train every step.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::check::{fail, CheckFailed};
use crate::train::{LogEntry, TrainerState};

/// How much of 4.3.4's training a run does (`COMPANION_NOTEBOOKS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotebookMode {
    /// Unset or `full`: every step of the recipe.
    Full,
    /// `quick` (the first [`QUICK_STEPS`]) or `quick:N`: the first N steps,
    /// compared with the committed run.
    Quick { steps: usize },
}

/// Steps the quick mode trains: past warmup and the first evaluation.
pub const QUICK_STEPS: usize = 100;

/// Relative difference allowed between a re-made step and the committed one:
/// fp32 sums in another order (another CPU's GEMM kernels) differ by far
/// less over 100 steps; a change to the training code differs by far more.
pub const QUICK_RTOL: f64 = 1e-4;

/// A full run on another machine may drift from the committed one over 2000
/// steps; it must still reach the same held-out bits per byte within this.
pub const FULL_BPB_TOLERANCE: f64 = 0.02;

impl NotebookMode {
    pub fn from_env() -> Result<Self, CheckFailed> {
        let v = std::env::var("COMPANION_NOTEBOOKS").unwrap_or_default();
        Self::parse(&v)
    }

    pub fn parse(v: &str) -> Result<Self, CheckFailed> {
        match v.trim() {
            "" | "full" => Ok(NotebookMode::Full),
            "quick" => Ok(NotebookMode::Quick { steps: QUICK_STEPS }),
            s => s
                .strip_prefix("quick:")
                .and_then(|n| n.parse().ok())
                .filter(|&n: &usize| n > 0)
                .map(|steps| NotebookMode::Quick { steps })
                .ok_or_else(|| {
                    fail(format!(
                        "COMPANION_NOTEBOOKS={s:?}: expected full, quick or quick:N (N > 0)"
                    ))
                }),
        }
    }

    pub fn quick_steps(&self) -> Option<usize> {
        match *self {
            NotebookMode::Full => None,
            NotebookMode::Quick { steps } => Some(steps),
        }
    }
}

/// The committed full run of 4.3.4: its saved model folder and the
/// `trainer_state.json` beside it.
#[derive(Debug, Clone)]
pub struct ReferenceRun {
    pub dir: PathBuf,
    pub state: TrainerState,
}

impl ReferenceRun {
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, CheckFailed> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join("trainer_state.json");
        let text =
            std::fs::read_to_string(&path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
        let state = serde_json::from_str(&text)
            .map_err(|e| fail(format!("{}: not a trainer_state.json: {e}", path.display())))?;
        Ok(ReferenceRun { dir, state })
    }

    /// The last held-out bits per byte the run logged.
    pub fn final_bits_per_byte(state: &TrainerState) -> Option<f64> {
        state
            .log_history
            .iter()
            .rev()
            .find_map(|e| e.get("eval_bits_per_byte")?.as_f64())
    }

    /// Check that `run`'s log entries up to step `upto` are the committed
    /// run's: the same entries, every figure that does not depend on the
    /// clock within `rtol`. Returns how many entries were compared.
    pub fn check_prefix(
        &self,
        run: &TrainerState,
        upto: usize,
        rtol: f64,
    ) -> Result<usize, CheckFailed> {
        let ours = logged_upto(run, upto);
        let theirs = logged_upto(&self.state, upto);
        if ours.len() != theirs.len() || ours.is_empty() {
            return Err(fail(format!(
                "{} log entries up to step {upto}, the committed run has {}",
                ours.len(),
                theirs.len()
            )));
        }
        for (a, b) in ours.iter().zip(&theirs) {
            if let Some(why) = differs(a, b, rtol) {
                return Err(fail(format!(
                    "step {}: {why}; the committed run in {} is not what this code trains \
                     (remake it with notebooks/make_reference.sh)",
                    a.get("step").unwrap_or(&Value::Null),
                    self.dir.display()
                )));
            }
        }
        Ok(ours.len())
    }

    /// What 4.3.4 shows after training, given the committed run's folder:
    /// in quick mode, the committed run, once `run`'s first steps are checked
    /// against it (its model is copied into `model_dir` for 4.3.5); in full
    /// mode, `run` itself (the cell saved it in `model_dir`), which must reach
    /// the committed run's held-out bits per byte within
    /// [`FULL_BPB_TOLERANCE`] (when there is one: `make_reference.sh` moves
    /// it aside while it remakes it). Prints which mode ran.
    pub fn check_run(
        reference: &Path,
        mode: NotebookMode,
        run: TrainerState,
        model_dir: &Path,
    ) -> Result<TrainerState, CheckFailed> {
        if let NotebookMode::Quick { steps } = mode {
            let this = Self::load(reference)?;
            let n = this.check_prefix(&run, steps, QUICK_RTOL)?;
            this.install_model(model_dir)?;
            println!(
                "notebook mode: quick: steps 1-{steps} of {} trained here; their {n} log entries \
                 equal the committed run's, which the cells below show ({})",
                this.state.max_steps,
                reference.display()
            );
            return Ok(this.state);
        }
        let ours = Self::final_bits_per_byte(&run)
            .ok_or_else(|| fail("the run logged no evaluation".into()))?;
        if reference.exists() {
            let theirs =
                Self::final_bits_per_byte(&Self::load(reference)?.state).unwrap_or(f64::NAN);
            let close = (ours - theirs).abs() <= FULL_BPB_TOLERANCE;
            crate::check!(
                close,
                "held-out bits per byte {ours:.4}, the committed run's {theirs:.4}: more than \
                 {FULL_BPB_TOLERANCE} apart"
            );
        }
        println!(
            "notebook mode: full: all {} steps trained here",
            run.global_step
        );
        Ok(run)
    }

    /// Copy the committed model's files into `to` (replacing its files),
    /// where 4.3.5 reads the model 4.3.4 saved.
    pub fn install_model(&self, to: &Path) -> Result<(), CheckFailed> {
        let err = |p: &Path, e: std::io::Error| fail(format!("{}: {e}", p.display()));
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| err(&self.dir, e))? {
            let path = entry.map_err(|e| err(&self.dir, e))?.path();
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if path.is_file() && name != "trainer_state.json" {
                files.push((name, std::fs::read(&path).map_err(|e| err(&path, e))?));
            }
        }
        std::fs::create_dir_all(to).map_err(|e| err(to, e))?;
        let files: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        crate::atomic_write::write_files_atomically(to, &files).map_err(|e| err(to, e))
    }
}

/// `run`'s log entries of steps 1..=`upto`, without `train()`'s summary.
fn logged_upto(run: &TrainerState, upto: usize) -> Vec<&LogEntry> {
    run.log_history
        .iter()
        .filter(|e| !e.contains_key("train_runtime"))
        .filter(|e| {
            e.get("step")
                .and_then(Value::as_u64)
                .is_some_and(|s| s as usize <= upto)
        })
        .collect()
}

/// Figures that depend on the clock, not on the training.
fn clocked(key: &str) -> bool {
    key.ends_with("_runtime")
        || key.ends_with("_per_second")
        || matches!(key, "mfu" | "eta_seconds")
}

/// Why two log entries differ, if they do.
fn differs(a: &LogEntry, b: &LogEntry, rtol: f64) -> Option<String> {
    let keys = |e: &LogEntry| -> Vec<String> {
        let mut k: Vec<String> = e.keys().filter(|k| !clocked(k)).cloned().collect();
        k.sort();
        k
    };
    if keys(a) != keys(b) {
        return Some(format!(
            "logged {:?}, the committed run {:?}",
            keys(a),
            keys(b)
        ));
    }
    for k in keys(a) {
        let (x, y) = (&a[&k], &b[&k]);
        let same = match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => (x - y).abs() <= rtol * x.abs().max(y.abs()),
            _ => x == y,
        };
        if !same {
            return Some(format!("{k} is {x}, the committed run's {y}"));
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A trainer_state.json with these log entries.
    pub(crate) fn state(entries: Value) -> TrainerState {
        let mut s: TrainerState = serde_json::from_value(json!({
            "epoch": 0.0, "global_step": 0, "max_steps": 0, "logging_steps": 0, "eval_steps": 0,
            "save_steps": 0, "train_batch_size": 1, "num_train_epochs": 1, "num_input_tokens_seen": 0,
            "total_flos": 0.0, "log_history": [], "best_metric": null, "best_global_step": null,
            "best_model_checkpoint": null, "is_local_process_zero": true, "is_world_process_zero": true,
            "is_hyper_param_search": false, "trial_name": null, "trial_params": null,
            "stateful_callbacks": {}
        }))
        .unwrap();
        s.log_history = serde_json::from_value(entries).unwrap();
        s
    }

    #[test]
    fn modes_parse_and_refuse_nonsense() {
        assert_eq!(NotebookMode::parse("").unwrap(), NotebookMode::Full);
        assert_eq!(NotebookMode::parse("full").unwrap(), NotebookMode::Full);
        assert_eq!(
            NotebookMode::parse("quick").unwrap().quick_steps(),
            Some(QUICK_STEPS)
        );
        assert_eq!(
            NotebookMode::parse("quick:7").unwrap().quick_steps(),
            Some(7)
        );
        for bad in ["quick:0", "quick:x", "fast"] {
            assert!(NotebookMode::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_prefix_must_match_up_to_the_step_and_ignores_the_clock() {
        let reference = ReferenceRun {
            dir: "ref".into(),
            state: state(json!([
                {"loss": 9.0, "step": 1, "tokens_per_second": 10.0},
                {"loss": 5.0, "step": 10, "tokens_per_second": 10.0},
                {"eval_loss": 4.0, "eval_runtime": 1.0, "step": 10},
                {"loss": 3.0, "step": 20},
                {"train_runtime": 9.0, "train_loss": 4.0, "step": 20}
            ])),
        };
        let quick = state(json!([
            {"loss": 9.0, "step": 1, "tokens_per_second": 99.0},
            {"loss": 5.0000001, "step": 10, "tokens_per_second": 12.0},
            {"eval_loss": 4.0, "eval_runtime": 7.0, "step": 10},
            {"train_runtime": 1.0, "train_loss": 7.0, "step": 10}
        ]));
        assert_eq!(reference.check_prefix(&quick, 10, 1e-4).unwrap(), 3);
        // A figure that moved, a missing evaluation, a key of another run.
        let moved = state(
            json!([{"loss": 9.0, "step": 1}, {"loss": 5.01, "step": 10}, {"eval_loss": 4.0, "step": 10}]),
        );
        assert!(reference.check_prefix(&moved, 10, 1e-4).is_err());
        let short = state(json!([{"loss": 9.0, "step": 1}, {"loss": 5.0, "step": 10}]));
        assert!(reference.check_prefix(&short, 10, 1e-4).is_err());
        let other = state(
            json!([{"loss": 9.0, "step": 1, "loss_scale": 1.0}, {"loss": 5.0, "step": 10}, {"eval_loss": 4.0, "step": 10}]),
        );
        assert!(reference.check_prefix(&other, 10, 1e-4).is_err());
        // Nothing logged is a failure, not a vacuous pass.
        assert!(reference.check_prefix(&state(json!([])), 10, 1e-4).is_err());
    }
}
