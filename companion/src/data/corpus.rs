//! Reading a corpus as a stream of documents: JSONL (one `{"text": …}`
//! document per line, the format `datasets` exports), Parquet
//! (`dataset.to_parquet`, the hub's dataset files), a `datasets.save_to_disk`
//! folder (Arrow), or plain text (one example per line, as the `text` loader
//! of `datasets` reads it). Errors name the file and the line (or column).
//! `hf://datasets/OWNER/NAME/PATH` names a file of a dataset repository on
//! the hub (looked up in the Hugging Face cache first).

use std::path::{Path, PathBuf};

use super::documents::io_error;
pub use super::documents::{CorpusError, Documents, Split};

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

/// Stream the documents of `path`: a `datasets.save_to_disk` folder (see
/// [`super::arrow_folder`]), `.parquet` by column `field`, `.jsonl`/`.json`
/// by field `field`, anything else line by line.
pub fn documents(path: &Path, field: &str, split: Split) -> Result<Documents, CorpusError> {
    if path.is_dir() {
        return super::arrow_folder::documents(path, field, split);
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => super::parquet_file::documents(path, field),
        Some("jsonl") | Some("json") => lines(path, Some(field.to_string())),
        _ => lines(path, None),
    }
}

/// The files `documents(path, …)` reads, in order (for fingerprints and
/// progress).
pub fn source_files(path: &Path, split: Split) -> Result<Vec<PathBuf>, CorpusError> {
    if path.is_dir() {
        super::arrow_folder::data_files(path, split)
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

/// A line-per-document file: JSON objects (`json_field`) or plain text.
fn lines(path: &Path, json_field: Option<String>) -> Result<Documents, CorpusError> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let path = path.to_path_buf();
    let mut raw = Vec::new();
    let mut line_no = 0usize;
    let next = move || -> Option<Result<String, CorpusError>> {
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(io_error(&path, e))),
            }
            line_no += 1;
            let doc = parse_line(&path, line_no, &raw, json_field.as_deref());
            match doc {
                Ok(Some(d)) => return Some(Ok(d)),
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    };
    Ok(Box::new(std::iter::from_fn(next).fuse()))
}

/// One line: its document, or `None` for an empty line/document.
fn parse_line(
    path: &Path,
    line_no: usize,
    raw: &[u8],
    json_field: Option<&str>,
) -> Result<Option<String>, CorpusError> {
    // A UTF-8 byte-order mark opens the file, as Python's `utf-8-sig` reads it.
    let raw = match line_no {
        1 => raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw),
        _ => raw,
    };
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let line = std::str::from_utf8(raw).map_err(|e| CorpusError::NotUtf8 {
        path: path.into(),
        line: line_no,
        byte: e.valid_up_to(),
    })?;
    let Some(field) = json_field else {
        return Ok((!line.is_empty()).then(|| line.to_string()));
    };
    if line.trim().is_empty() {
        return Ok(None);
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
    Ok((!text.is_empty()).then(|| text.to_string()))
}

/// Read the documents of one file or `datasets` folder (its train split)
/// into memory. Empty documents are dropped.
pub fn read_file(path: &Path, field: &str) -> Result<Vec<String>, CorpusError> {
    documents(path, field, Split::Train)?.collect()
}

/// The documents of every file in turn, as one stream; its last item is
/// [`CorpusError::Empty`] when none of them held any text. Each file is
/// opened (and its format checked) before the first document is read.
pub fn documents_of<P: AsRef<Path>>(paths: &[P], field: &str) -> Result<Documents, CorpusError> {
    if paths.is_empty() {
        return Err(CorpusError::NoFiles);
    }
    let mut docs = paths
        .iter()
        .map(|p| documents(p.as_ref(), field, Split::Train))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten();
    let mut names = Some(
        paths
            .iter()
            .map(|p| p.as_ref().display().to_string())
            .collect(),
    );
    let mut text = false;
    Ok(Box::new(std::iter::from_fn(move || match docs.next() {
        Some(d) => {
            text |= d.as_ref().is_ok_and(|t| !t.trim().is_empty());
            Some(d)
        }
        None => names
            .take()
            .filter(|_| !text)
            .map(|paths| Err(CorpusError::Empty { paths })),
    })))
}

/// Read every file into memory; an error if none holds any text.
pub fn read_files<P: AsRef<Path>>(paths: &[P], field: &str) -> Result<Vec<String>, CorpusError> {
    documents_of(paths, field)?.collect()
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
