//! HF's `TrainerCallback` / `TrainerControl`: code outside the loop that
//! looks at the state after each optimizer step and may end training early
//! (`control.should_training_stop`), as transformers' callbacks do. The loop
//! itself keeps logging, evaluation and saving; this is the hook a user adds.

use super::args::TrainingArguments;
use super::error::TrainError;
use super::state::TrainerState;
use crate::model::GPT2LMHeadModel;

/// What a callback asks of the loop (HF: `TrainerControl`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrainerControl {
    /// End training after this step's logging, evaluation and saving.
    pub should_training_stop: bool,
}

/// HF: `TrainerCallback.on_step_end(args, state, control)`, called on every
/// rank after each optimizer step, once that step's logs, evaluation and
/// checkpoint are done.
pub trait TrainerCallback: Send {
    fn on_step_end(
        &mut self,
        args: &TrainingArguments,
        state: &TrainerState,
        control: &mut TrainerControl,
    );

    /// Whether this callback wants the model's current weights at this state
    /// (before the first step, then after each). transformers passes `model`
    /// to every event; here the weights are assembled only when asked, since
    /// that is a copy of the model and, under ZeRO-3, a collective: every
    /// rank must answer the same, so add such a callback on every rank.
    fn wants_model(&self, _state: &TrainerState) -> bool {
        false
    }

    /// The whole model at a state `wants_model` asked for: before the first
    /// step, and after a step before `on_step_end`.
    /// An error ends training with it.
    fn on_model(
        &mut self,
        _args: &TrainingArguments,
        _state: &TrainerState,
        _model: &GPT2LMHeadModel,
    ) -> Result<(), String> {
        Ok(())
    }
}

/// Stop after optimizer step `N`, keeping the schedule of the full run
/// (`max_steps` still sets warmup and decay): the first `N` steps are those
/// of the whole run. The notebooks' quick mode uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopAtStep(pub usize);

impl TrainerCallback for StopAtStep {
    fn on_step_end(&mut self, _: &TrainingArguments, state: &TrainerState, c: &mut TrainerControl) {
        if state.global_step >= self.0 {
            c.should_training_stop = true;
        }
    }
}

/// Give the model to the callbacks that want it at `state` (`make` is
/// called once, and only if one does).
pub(super) fn on_model(
    callbacks: &mut [Box<dyn TrainerCallback>],
    args: &TrainingArguments,
    state: &TrainerState,
    make: impl FnOnce() -> Result<GPT2LMHeadModel, TrainError>,
) -> Result<(), TrainError> {
    if !callbacks.iter().any(|c| c.wants_model(state)) {
        return Ok(());
    }
    let model = make()?;
    for c in callbacks.iter_mut().filter(|c| c.wants_model(state)) {
        c.on_model(args, state, &model)
            .map_err(TrainError::Callback)?;
    }
    Ok(())
}

/// Tell every callback that a step ended; whether one asked to stop.
pub(super) fn on_step_end(
    callbacks: &mut [Box<dyn TrainerCallback>],
    args: &TrainingArguments,
    state: &TrainerState,
) -> bool {
    let mut control = TrainerControl::default();
    for c in callbacks {
        c.on_step_end(args, state, &mut control);
    }
    control.should_training_stop
}
