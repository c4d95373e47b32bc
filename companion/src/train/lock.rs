//! One run per `output_dir`: an advisory lock on `output_dir/.companion.lock`
//! held while a run trains or saves into the folder. Two runs writing the
//! same checkpoints would silently mix each other's weights and state, so
//! the second is refused at its start, naming the process that holds the
//! folder. The operating system drops the lock when the holder exits or
//! crashes, so a stale lock file never blocks a later run.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::error::{io_err, Result, TrainError};
use super::trainer::Trainer;

/// The lock file's name inside the folder it guards.
pub const LOCK_FILE: &str = ".companion.lock";

/// Folders this process holds, with their locked file and how many guards
/// share it: the lock is per process (the CLI holds the folder for the
/// whole run, and the Trainer inside it takes it again for `train()`).
static HELD: Mutex<Option<HashMap<PathBuf, (File, usize)>>> = Mutex::new(None);

/// Holds `dir` for this process until dropped.
#[derive(Debug)]
pub struct OutputDirLock {
    key: PathBuf,
    path: PathBuf,
}

impl OutputDirLock {
    /// Take the lock of `dir` (created if missing), or say who holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        Self::acquire_for(dir, "output_dir", "--output-dir")
    }

    /// [`Self::acquire`] for a folder the user named as `what` (its flag
    /// `flag`), e.g. `tokenizer train --out`.
    pub fn acquire_for(dir: &Path, what: &str, flag: &str) -> Result<Self> {
        if dir.exists() && !dir.is_dir() {
            return Err(TrainError::Args(format!(
                "{what} {} exists and is not a folder",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let key = dir.canonicalize().map_err(io_err(dir))?;
        let path = dir.join(LOCK_FILE);
        let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
        let held = held.get_or_insert_with(HashMap::new);
        if let Some((_, n)) = held.get_mut(&key) {
            *n += 1;
            return Ok(OutputDirLock { key, path });
        }
        let mut file = crate::atomic_write::open_lock_file(&path).map_err(|e| TrainError::Io {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "another process".to_string(),
                    h => h.to_string(),
                };
                return Err(TrainError::Args(format!(
                    "{what} {} is in use by another run ({holder}; lock file {}): two runs \
                     writing one folder would mix their files; wait for it to finish or \
                     choose another {flag}",
                    dir.display(),
                    path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(TrainError::Io {
                    path: path.display().to_string(),
                    msg: format!("could not lock: {e}"),
                })
            }
        }
        // Who holds it, for the message another run prints.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let who = format!("process {} on {}", std::process::id(), host.trim());
        file.set_len(0).map_err(io_err(&path))?;
        file.rewind().map_err(io_err(&path))?;
        file.write_all(who.as_bytes()).map_err(io_err(&path))?;
        held.insert(key.clone(), (file, 1));
        Ok(OutputDirLock { key, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputDirLock {
    fn drop(&mut self) {
        let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
        let Some(held) = held.as_mut() else { return };
        let last = match held.get_mut(&self.key) {
            Some((_, n)) => {
                *n -= 1;
                *n == 0
            }
            None => false,
        };
        if last {
            if let Some((file, _)) = held.remove(&self.key) {
                let _ = file.set_len(0);
                let _ = file.unlock();
            }
        }
    }
}

impl Trainer {
    /// At the start of `train()` (every rank calls it): rank 0 takes
    /// `output_dir`'s lock and removes partial checkpoint folders that a
    /// crashed run left (no other run can be writing them now); every rank
    /// learns the run's tag, which names its partial folders. `train()`
    /// holds the returned guard until it ends.
    pub(crate) fn hold_output_dir(&mut self) -> Result<Option<OutputDirLock>> {
        let rank0 = self.is_world_process_zero();
        let mut guard = None;
        let mut failure = None;
        if rank0 {
            match OutputDirLock::acquire(Path::new(&self.args.output_dir)) {
                Ok(l) => {
                    guard = Some(l);
                    remove_stale_partials(Path::new(&self.args.output_dir));
                }
                Err(e) => failure = Some(e),
            }
        }
        let failed =
            self.engine
                .comm()
                .all_reduce_f64(if failure.is_some() { 1.0 } else { 0.0 })?;
        if let Some(e) = failure {
            return Err(e);
        }
        if failed > 0.0 {
            return Err(TrainError::Args(format!(
                "rank 0 could not take the lock of output_dir {}",
                self.args.output_dir
            )));
        }
        self.run_tag()?;
        Ok(guard)
    }

    /// A tag shared by the ranks of this run (rank 0's process id), which
    /// names the partial folders of its checkpoints (a collective the first
    /// time).
    pub(crate) fn run_tag(&mut self) -> Result<u64> {
        if self.run_tag == 0 {
            let pid = if self.is_world_process_zero() {
                std::process::id() as f64
            } else {
                0.0
            };
            self.run_tag = (self.engine.comm().all_reduce_f64(pid)? as u64).max(1);
        }
        Ok(self.run_tag)
    }
}

/// Remove `.checkpoint-N.partial-*` folders and `.checkpoint-N.deleting-*`
/// folders left by a crash (only called by the lock's holder).
fn remove_stale_partials(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".checkpoint-")
            && (name.contains(".partial") || name.contains(".deleting"))
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_taken_on_the_file_and_shared_within_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let first = OutputDirLock::acquire(dir.path()).unwrap();
        let again = OutputDirLock::acquire(dir.path()).unwrap();
        // Another open file description (what another process has) is refused.
        let other = File::open(dir.path().join(LOCK_FILE)).unwrap();
        assert!(other.try_lock().is_err());
        let holder = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert!(holder.starts_with(&format!("process {}", std::process::id())));
        drop(first);
        assert!(other.try_lock().is_err(), "one guard is still alive");
        drop(again);
        other.try_lock().unwrap();
    }
}
