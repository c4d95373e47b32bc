//! What every corpus reader gives and how it fails: a stream of documents,
//! the split asked for, and errors that name the file (and line or column).

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("{path}: cannot read: {msg}")]
    Io { path: PathBuf, msg: String },
    #[error("{path}:{line}: not valid UTF-8 (byte {byte} of the line)")]
    NotUtf8 {
        path: PathBuf,
        line: usize,
        byte: usize,
    },
    #[error("{path}:{line}: {msg}")]
    BadLine {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{}: no text in the corpus (every document is empty)", paths.join(", "))]
    Empty { paths: Vec<String> },
    #[error("no corpus files given")]
    NoFiles,
    #[error("{path}: {msg}")]
    Parquet { path: PathBuf, msg: String },
    /// A `datasets.save_to_disk` folder that cannot be read as one.
    #[error("{path}: {msg}")]
    Arrow { path: PathBuf, msg: String },
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
}

/// The documents of one corpus file or folder, read as a stream: one
/// document in memory at a time (a record batch for Arrow), whatever the
/// corpus size. Empty documents are skipped.
pub type Documents = Box<dyn Iterator<Item = Result<String, CorpusError>> + Send>;

/// Which split of a `DatasetDict` folder to read (a plain file or a
/// `Dataset` folder has only one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Validation,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
        }
    }
}

pub(crate) fn io_error(path: &Path, e: impl std::fmt::Display) -> CorpusError {
    CorpusError::Io {
        path: path.into(),
        msg: e.to_string(),
    }
}
