//! Reading a corpus: JSONL (one `{"text": …}` document per line, the format
//! `datasets` exports) or plain text (one example per line, as the `text`
//! loader of `datasets` reads it). Errors name the file and the line.

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
}

/// Read the documents of one file: `.jsonl`/`.json` by `field`, anything else
/// line by line. Empty documents are dropped.
pub fn read_file(path: &Path, field: &str) -> Result<Vec<String>, CorpusError> {
    let bytes = std::fs::read(path).map_err(|e| CorpusError::Io {
        path: path.into(),
        msg: e.to_string(),
    })?;
    let jsonl = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl") | Some("json")
    );
    let mut docs = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let line = std::str::from_utf8(raw).map_err(|e| CorpusError::NotUtf8 {
            path: path.into(),
            line: line_no,
            byte: e.valid_up_to(),
        })?;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if jsonl {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |msg: String| CorpusError::BadLine {
                path: path.into(),
                line: line_no,
                msg,
            };
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(format!("not a JSON object: {e}")))?;
            let text = v
                .get(field)
                .ok_or_else(|| bad(format!("no `{field}` field")))?
                .as_str()
                .ok_or_else(|| bad(format!("the `{field}` field is not a string")))?;
            if !text.is_empty() {
                docs.push(text.to_string());
            }
        } else if !line.is_empty() {
            docs.push(line.to_string());
        }
    }
    Ok(docs)
}

/// Read every file; an error if none holds any text.
pub fn read_files<P: AsRef<Path>>(paths: &[P], field: &str) -> Result<Vec<String>, CorpusError> {
    if paths.is_empty() {
        return Err(CorpusError::NoFiles);
    }
    let mut docs = Vec::new();
    for p in paths {
        docs.extend(read_file(p.as_ref(), field)?);
    }
    if docs.iter().all(|d| d.trim().is_empty()) {
        return Err(CorpusError::Empty {
            paths: paths
                .iter()
                .map(|p| p.as_ref().display().to_string())
                .collect(),
        });
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(&p, "{\"text\": \"a\"}\n{\"body\": \"b\"}\n").unwrap();
        let e = read_file(&p, "text").unwrap_err().to_string();
        assert!(
            e.contains("c.jsonl:2") && e.contains("no `text` field"),
            "{e}"
        );
    }

    #[test]
    fn text_lines_and_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.txt");
        std::fs::write(&p, b"one\n\ntwo\r\n").unwrap();
        assert_eq!(read_file(&p, "text").unwrap(), vec!["one", "two"]);
        std::fs::write(&p, b"ok\nbad \xff byte\n").unwrap();
        let e = read_file(&p, "text").unwrap_err().to_string();
        assert!(e.contains("c.txt:2") && e.contains("UTF-8"), "{e}");
        std::fs::write(&p, b"\n\n").unwrap();
        assert!(matches!(
            read_files(&[&p], "text"),
            Err(CorpusError::Empty { .. })
        ));
    }
}
