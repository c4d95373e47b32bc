//! Reading a corpus: JSONL (one `{"text": …}` document per line, the format
//! `datasets` exports), Parquet (`dataset.to_parquet`, the hub's dataset
//! files) or plain text (one example per line, as the `text` loader of
//! `datasets` reads it). Errors name the file and the line (or column).
//! `hf://datasets/OWNER/NAME/PATH` names a file of a dataset repository on
//! the hub (looked up in the Hugging Face cache first).

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
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
}

/// A corpus path as given: a local file, or `hf://datasets/OWNER/NAME/PATH`
/// (optionally `NAME@REVISION`) resolved through the Hugging Face cache or
/// the hub, as `huggingface_hub`'s file system names dataset files.
pub fn resolve(spec: &str) -> Result<PathBuf, CorpusError> {
    let Some(rest) = spec.strip_prefix("hf://datasets/") else {
        return Ok(PathBuf::from(spec));
    };
    let parts: Vec<&str> = rest.splitn(3, '/').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
        return Err(CorpusError::Io {
            path: spec.into(),
            msg: "expected hf://datasets/OWNER/NAME/PATH/TO/FILE".into(),
        });
    }
    let id = format!("{}/{}", parts[0], parts[1]);
    Ok(crate::hub::get_file_of(
        &id,
        parts[2],
        crate::hub::RepoType::Dataset,
    )?)
}

/// The string column `field` of a Parquet file, row by row.
fn read_parquet(path: &Path, field: &str) -> Result<Vec<String>, CorpusError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let err = |msg: String| CorpusError::Parquet {
        path: path.into(),
        msg,
    };
    let file = std::fs::File::open(path).map_err(|e| CorpusError::Io {
        path: path.into(),
        msg: e.to_string(),
    })?;
    let reader =
        SerializedFileReader::new(file).map_err(|e| err(format!("not a Parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let names: Vec<String> = schema
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    if !names.iter().any(|n| n == field) {
        return Err(err(format!(
            "no column `{field}` (columns: {})",
            names.join(", ")
        )));
    }
    let mut docs = Vec::new();
    for (i, row) in reader
        .get_row_iter(None)
        .map_err(|e| err(e.to_string()))?
        .enumerate()
    {
        let row = row.map_err(|e| err(format!("row {i}: {e}")))?;
        let value = row
            .get_column_iter()
            .find(|(n, _)| n.as_str() == field)
            .map(|(_, v)| v);
        match value {
            Some(Field::Str(s)) => {
                if !s.trim().is_empty() {
                    docs.push(s.clone());
                }
            }
            Some(Field::Null) | None => {}
            Some(other) => {
                return Err(err(format!(
                    "row {i}: column `{field}` holds {other}, expected a string"
                )))
            }
        }
    }
    Ok(docs)
}

/// Read the documents of one file: `.jsonl`/`.json` and `.parquet` by
/// `field`, anything else line by line. Empty documents are dropped.
pub fn read_file(path: &Path, field: &str) -> Result<Vec<String>, CorpusError> {
    if path.extension().and_then(|e| e.to_str()) == Some("parquet") {
        return read_parquet(path, field);
    }
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
