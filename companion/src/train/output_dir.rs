//! What `output_dir` holds between runs: its `checkpoint-N` folders, and
//! which of them a stopped run leaves to resume from.

use std::path::{Path, PathBuf};

/// What a stop leaves to resume from: the newest checkpoint of `output_dir`
/// (only finite ones are ever written), for the error message.
pub(crate) fn kept_checkpoint(output_dir: &str) -> String {
    match latest_checkpoint(Path::new(output_dir)) {
        Some(p) => format!(
            "the last finite checkpoint, {}, is kept (resume with --resume-from-checkpoint latest)",
            p.display()
        ),
        None => format!("{output_dir} holds no checkpoint to resume from"),
    }
}

/// `checkpoint-N` folders of `dir`, oldest first.
pub fn list_checkpoints(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().is_dir().then(|| (n, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// The newest complete checkpoint (`get_last_checkpoint`).
pub fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    list_checkpoints(dir).pop().map(|(_, p)| p)
}
