//! `report_to="tensorboard"`: the scalars of every `log_history` entry in a
//! TensorBoard event file, named and placed as transformers'
//! `TensorBoardCallback` does (`train/loss`, `eval/loss`, …, under
//! `output_dir/runs/<date>_<host>`), so `tensorboard --logdir output_dir/runs`
//! shows a run of ours beside a run of theirs.
//!
//! Written here rather than through a crate: the one Rust writer
//! (tensorboard-rs) is unmaintained and pulls an old protobuf and image
//! stack, while the format is two small protobuf messages (declared below
//! with prost, which we already use) in TFRecord framing (a length and the
//! data, each followed by its masked CRC-32C, from the crc32c crate).

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;

use super::error::{io_err, Result};
use super::state::LogEntry;

/// `tensorflow.Event` (the fields TensorBoard reads for scalars).
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with `simple_value`.
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// TFRecord's checksum: CRC-32C, rotated and offset.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// transformers' `default_logdir()`: `runs/<Mon DD_HH-MM-SS>_<host>`.
pub fn default_logdir(output_dir: &Path) -> PathBuf {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let now = chrono::Local::now().format("%b%d_%H-%M-%S");
    output_dir
        .join("runs")
        .join(format!("{now}_{}", host.trim()))
}

/// `log_history` keys as TensorBoard tags (transformers' `rewrite_logs`).
fn tag(key: &str) -> String {
    match key.strip_prefix("eval_") {
        Some(k) => format!("eval/{k}"),
        None => format!("train/{key}"),
    }
}

/// One event file, appended to and flushed after every entry, so a crash
/// loses at most the entry being written and TensorBoard sees a live run.
pub struct SummaryWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl SummaryWriter {
    /// A new event file in `logdir` (created), named as TensorFlow names it.
    pub fn new(logdir: &Path) -> Result<Self> {
        std::fs::create_dir_all(logdir).map_err(io_err(logdir))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let name = format!(
            "events.out.tfevents.{secs}.{}.{}.0",
            host.trim(),
            std::process::id()
        );
        let path = logdir.join(name);
        let file = std::fs::File::create(&path).map_err(io_err(&path))?;
        let mut w = SummaryWriter { file, path };
        w.write_event(&Event {
            wall_time: wall_time(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every number of a `log_history` entry at `step` (`epoch`, `step`
    /// and non-numbers are left out, as transformers leaves them).
    pub fn add_log(&mut self, entry: &LogEntry, step: usize) -> Result<()> {
        let value = entry
            .iter()
            .filter(|(k, _)| k.as_str() != "step")
            .filter_map(|(k, v)| {
                Some(SummaryValue {
                    tag: tag(k),
                    simple_value: Some(v.as_f64()? as f32),
                })
            })
            .collect();
        self.write_event(&Event {
            wall_time: wall_time(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value }),
        })
    }

    fn write_event(&mut self, e: &Event) -> Result<()> {
        let data = e.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(&data);
        rec.extend_from_slice(&masked_crc(&data).to_le_bytes());
        let path = self.path.clone();
        self.file.write_all(&rec).map_err(io_err(&path))?;
        self.file.flush().map_err(io_err(&path))
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_equals_tensorboards() {
        // tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c(b"123456789")
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn tags_follow_rewrite_logs() {
        assert_eq!(tag("loss"), "train/loss");
        assert_eq!(tag("eval_loss"), "eval/loss");
    }
}
