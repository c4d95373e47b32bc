//! What a resume reads, checked against itself and against the run before
//! the first step: the folder's step, `trainer_state.json`,
//! `optimizer.json`, `rng_state.json` and the model's shape (Adam's moments
//! are checked where the ZeRO engine loads them). A file that disagrees is
//! refused by name, instead of a run that silently resets Adam, trains no
//! step, or fails deep inside.

use std::path::Path;

use serde_json::Value;

use super::error::{Result, TrainError};
use crate::config::GPT2Config;

fn refuse(file: &Path, msg: String) -> TrainError {
    TrainError::Io {
        path: file.display().to_string(),
        msg,
    }
}

/// A `checkpoint-N` folder holds the state of step N.
pub(super) fn check_folder_step(dir: &Path, global_step: usize) -> Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string());
    if let Some(n) = name.as_deref().and_then(|n| n.strip_prefix("checkpoint-")) {
        if let Ok(n) = n.parse::<usize>() {
            if n != global_step {
                return Err(refuse(
                    &dir.join("trainer_state.json"),
                    format!(
                        "global_step is {global_step}, but the folder is {} (step {n}): the files of two checkpoints are mixed",
                        name.unwrap_or_default()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `optimizer.json`'s Adam step and skipped steps: non-negative integers
/// that together are no more than the steps the trainer state counts.
pub(super) fn optimizer_steps(o: &Value, file: &Path, global_step: usize) -> Result<(u64, usize)> {
    let count = |key: &str, required: bool| -> Result<u64> {
        match o.get(key) {
            None if !required => Ok(0),
            Some(v) => v.as_u64().ok_or_else(|| {
                refuse(
                    file,
                    format!("{key}: expected a non-negative integer, got {v}"),
                )
            }),
            None => Err(refuse(file, format!("{key}: missing"))),
        }
    };
    let step = count("step", true)?;
    let skipped = count("skipped_steps", false)?;
    if step.saturating_add(skipped) > global_step as u64 {
        return Err(refuse(
            file,
            format!(
                "step {step} and skipped_steps {skipped} are more optimizer steps than the checkpoint's global_step {global_step}"
            ),
        ));
    }
    Ok((step, skipped as usize))
}

/// `rng_state.json`, when there is one: a JSON object whose global_step is
/// the checkpoint's.
pub(super) fn rng_state(dir: &Path, global_step: usize) -> Result<Option<Value>> {
    let f = dir.join("rng_state.json");
    let bytes = match std::fs::read(&f) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(refuse(&f, e.to_string())),
    };
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| refuse(&f, format!("not the JSON a checkpoint writes: {e}")))?;
    if !v.is_object() {
        return Err(refuse(&f, format!("expected a JSON object, got {v}")));
    }
    if let Some(s) = v.get("global_step") {
        if s.as_u64() != Some(global_step as u64) {
            return Err(refuse(
                &f,
                format!(
                    "global_step is {s}, the checkpoint's trainer_state.json says {global_step}"
                ),
            ));
        }
    }
    Ok(Some(v))
}

/// The checkpoint's model has this run's shape.
pub(super) fn check_shape(dir: &Path, ours: &GPT2Config) -> Result<()> {
    let f = dir.join("config.json");
    let saved = GPT2Config::from_file(&f).map_err(|e| refuse(&f, e.to_string()))?;
    let fields = [
        ("vocab_size", saved.vocab_size, ours.vocab_size),
        ("n_positions", saved.n_positions, ours.n_positions),
        ("n_embd", saved.n_embd, ours.n_embd),
        ("n_layer", saved.n_layer, ours.n_layer),
        ("n_head", saved.n_head, ours.n_head),
        (
            "tie_word_embeddings",
            saved.tie_word_embeddings as usize,
            ours.tie_word_embeddings as usize,
        ),
    ];
    for (name, a, b) in fields {
        if a != b {
            return Err(refuse(
                &f,
                format!(
                    "{name} is {a}, this run's model has {b}: resume with the same model settings"
                ),
            ));
        }
    }
    Ok(())
}
