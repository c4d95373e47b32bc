//! Watching 4.3.4's training as it happens: a progress line every N steps
//! (loss, learning rate, tokens/s, ETA, the held-out figures when the step
//! evaluated) and a greedy generation for the chapter's prompt at chosen
//! steps, so the reader sees text emerge. One format serves the live run and
//! the replay of the committed run in the test command's quick mode, so both
//! print the same lines (the clock's figures aside).

use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::check::{fail, CheckFailed};
use super::reference::{NotebookMode, ReferenceRun};
use crate::generate::GenerationConfig;
use crate::model::GPT2LMHeadModel;
use crate::tokenizer::AutoTokenizer;
use crate::train::{TrainerCallback, TrainerControl, TrainerState, TrainingArguments};

/// A generation made during training.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub step: usize,
    pub text: String,
}

/// Tokens each sample continues the prompt by.
pub const SAMPLE_TOKENS: usize = 24;

/// The progress line for `step`, from the log entries the Trainer wrote for
/// it; `None` when it logged no training loss at that step.
pub fn progress_line(state: &TrainerState, step: usize) -> Option<String> {
    let at = |key: &str| {
        state.log_history.iter().find_map(|e| {
            (e.get("step")?.as_u64()? == step as u64)
                .then(|| e.get(key)?.as_f64())
                .flatten()
        })
    };
    let loss = at("loss")?;
    let mut line = format!(
        "step {step:>5}/{}  epoch {:.2}  loss {loss:.4}  lr {:.2e}  {:.0} tokens/s  ETA {:.0} s",
        state.max_steps,
        at("epoch").unwrap_or(0.0),
        at("learning_rate").unwrap_or(0.0),
        at("tokens_per_second").unwrap_or(0.0),
        at("eta_seconds").unwrap_or(0.0),
    );
    if let (Some(l), Some(b)) = (at("eval_loss"), at("eval_bits_per_byte")) {
        line.push_str(&format!("  | eval loss {l:.4}, {b:.3} bits/byte"));
    }
    Some(line)
}

/// How a sample is printed under its progress line.
pub fn sample_line(s: &Sample) -> String {
    format!("    sample at step {}: {:?}", s.step, s.text)
}

/// HF-style callback: prints [`progress_line`] every `every` steps and, at
/// the steps in `sample_at` (0 = before training), generates greedily for the
/// prompt (the chapter's settings: `repetition_penalty=1.1`) and prints the
/// text. Add it on every rank (the model is a collective under ZeRO-3); only
/// the one made with `print = true` prints and generates.
pub struct WatchTraining {
    every: usize,
    sample_at: Vec<usize>,
    prompt: Vec<u32>,
    tokenizer: AutoTokenizer,
    print: bool,
    pending: Option<Sample>,
    samples: Arc<Mutex<Vec<Sample>>>,
}

impl WatchTraining {
    pub fn new(
        tokenizer: &AutoTokenizer,
        prompt: &str,
        every: usize,
        sample_at: &[usize],
        print: bool,
    ) -> Result<Self, CheckFailed> {
        let prompt = tokenizer
            .encode(prompt)
            .map_err(|e| fail(format!("the prompt {prompt:?}: {e}")))?;
        Ok(WatchTraining {
            every: every.max(1),
            sample_at: sample_at.to_vec(),
            prompt,
            tokenizer: tokenizer.clone(),
            print,
            pending: None,
            samples: Arc::default(),
        })
    }

    /// The samples made so far (shared with the callback inside the Trainer).
    pub fn samples(&self) -> Arc<Mutex<Vec<Sample>>> {
        self.samples.clone()
    }

    /// The sample this callback makes at `step` with `model`.
    pub fn sample(&self, model: &GPT2LMHeadModel, step: usize) -> Result<Sample, CheckFailed> {
        self.generate(model, step).map_err(CheckFailed)
    }

    fn generate(&self, model: &GPT2LMHeadModel, step: usize) -> Result<Sample, String> {
        let max_new = SAMPLE_TOKENS.min(model.config.n_positions.saturating_sub(self.prompt.len()));
        let cfg = GenerationConfig {
            max_new_tokens: Some(max_new),
            do_sample: false,
            repetition_penalty: 1.1,
            pad_token_id: self.tokenizer.eos_token_id(),
            ..GenerationConfig::from_model_config(&model.config)
        };
        let out = model
            .generate(std::slice::from_ref(&self.prompt), None, &cfg)
            .map_err(|e| format!("generating at step {step}: {e}"))?;
        let text = self
            .tokenizer
            .decode(&out.sequences[0], false)
            .map_err(|e| format!("decoding the sample at step {step}: {e}"))?;
        Ok(Sample { step, text })
    }
}

impl TrainerCallback for WatchTraining {
    fn wants_model(&self, state: &TrainerState) -> bool {
        self.sample_at.contains(&state.global_step)
    }

    fn on_model(
        &mut self,
        _: &TrainingArguments,
        state: &TrainerState,
        model: &GPT2LMHeadModel,
    ) -> Result<(), String> {
        if !self.print {
            return Ok(());
        }
        let s = self.generate(model, state.global_step)?;
        self.samples
            .lock()
            .map_err(|e| e.to_string())?
            .push(s.clone());
        if state.global_step == 0 {
            println!("{}", sample_line(&s));
        } else {
            self.pending = Some(s);
        }
        Ok(())
    }

    fn on_step_end(&mut self, _: &TrainingArguments, state: &TrainerState, _: &mut TrainerControl) {
        if !self.print {
            return;
        }
        print_step(
            state,
            state.global_step,
            self.every,
            self.pending.take().iter(),
        );
    }
}

/// What is printed after `step`: its progress line when it falls on `every`
/// (or is the last), then its samples. The live run and the replay share it.
fn print_step<'a>(
    state: &TrainerState,
    step: usize,
    every: usize,
    samples: impl Iterator<Item = &'a Sample>,
) {
    if step.is_multiple_of(every.max(1)) || step == state.max_steps {
        if let Some(line) = progress_line(state, step) {
            println!("{line}");
        }
    }
    for s in samples {
        println!("{}", sample_line(s));
    }
}

/// Print what [`WatchTraining`] printed for the steps after `after` of a
/// finished run (the committed run, in the quick mode), with its samples.
pub fn replay(state: &TrainerState, samples: &[Sample], after: usize, every: usize) {
    for step in after + 1..=state.max_steps {
        print_step(
            state,
            step,
            every,
            samples.iter().filter(|s| s.step == step),
        );
    }
}

/// After training in a notebook: in the quick mode, the samples made live
/// must be the committed run's at the same steps; then the committed run's
/// lines after the quick steps are printed as the live run would have
/// printed them, and its samples are returned. In full mode, `live` itself.
pub fn show_rest(
    reference: &Path,
    mode: NotebookMode,
    live: &[Sample],
    every: usize,
) -> Result<Vec<Sample>, CheckFailed> {
    let NotebookMode::Quick { steps } = mode else {
        return Ok(live.to_vec());
    };
    let run = ReferenceRun::load(reference)?;
    let committed = load_samples(&reference.join("samples.json"))?;
    for s in live {
        match committed.iter().find(|c| c.step == s.step) {
            Some(c) if c == s => {}
            Some(c) => {
                return Err(fail(format!(
                    "the sample at step {} is {:?}; the committed run in {} wrote {:?} \
                     (remake it with notebooks/make_reference.sh)",
                    s.step,
                    s.text,
                    reference.display(),
                    c.text
                )))
            }
            None => {
                return Err(fail(format!(
                    "the committed run in {} has no sample at step {}",
                    reference.display(),
                    s.step
                )))
            }
        }
    }
    replay(&run.state, &committed, steps, every);
    Ok(committed)
}

/// `samples.json` beside a run's `trainer_state.json`.
pub fn save_samples(path: &Path, samples: &[Sample]) -> Result<(), CheckFailed> {
    let text = serde_json::to_string_pretty(samples).map_err(|e| fail(e.to_string()))?;
    crate::atomic_write::write_file_atomically(path, text.as_bytes())
        .map_err(|e| fail(format!("{}: {e}", path.display())))
}

pub fn load_samples(path: &Path) -> Result<Vec<Sample>, CheckFailed> {
    let text =
        std::fs::read_to_string(path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| fail(format!("{}: not a list of samples: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state() -> TrainerState {
        let mut s = crate::notebook::reference::tests::state(json!([
            {"step": 100, "loss": 6.29, "learning_rate": 0.00198, "epoch": 0.1, "tokens_per_second": 11350.2, "eta_seconds": 357.0},
            {"step": 100, "eval_loss": 5.5, "eval_bits_per_byte": 2.2, "epoch": 0.1},
            {"step": 150, "loss": 5.0},
            {"step": 200, "loss": 4.5, "learning_rate": 0.0, "epoch": 0.2, "tokens_per_second": 11000.0, "eta_seconds": 0.0},
        ]));
        s.max_steps = 200;
        s
    }

    #[test]
    fn progress_lines_come_from_the_log() {
        let s = state();
        assert_eq!(
            progress_line(&s, 100).unwrap(),
            "step   100/200  epoch 0.10  loss 6.2900  lr 1.98e-3  11350 tokens/s  ETA 357 s  | eval loss 5.5000, 2.200 bits/byte"
        );
        assert!(progress_line(&s, 120).is_none());
        assert!(progress_line(&s, 200)
            .unwrap()
            .starts_with("step   200/200  epoch 0.20  loss 4.5000"));
    }

    #[test]
    fn samples_round_trip_and_print_one_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("samples.json");
        let v = vec![Sample {
            step: 0,
            text: "Hi\nthere".into(),
        }];
        save_samples(&p, &v).unwrap();
        assert_eq!(load_samples(&p).unwrap(), v);
        assert_eq!(sample_line(&v[0]), "    sample at step 0: \"Hi\\nthere\"");
        std::fs::write(&p, "{}").unwrap();
        assert!(load_samples(&p)
            .unwrap_err()
            .0
            .contains("not a list of samples"));
    }
}
