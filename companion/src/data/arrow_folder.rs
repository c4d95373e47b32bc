//! A folder written by `datasets.Dataset.save_to_disk` (Arrow IPC stream
//! files named in `state.json`) or `DatasetDict.save_to_disk`
//! (`dataset_dict.json` and one such folder per split), read record batch
//! by record batch through the `arrow` crates, so memory stays that of one
//! batch (`datasets` writes 1000 rows per batch).

use std::path::{Path, PathBuf};

use arrow_array::{Array as _, LargeStringArray, RecordBatch, StringArray};
use arrow_ipc::reader::StreamReader;
use arrow_schema::DataType;
use serde::Deserialize;

use super::documents::{io_error, CorpusError, Documents, Split};

#[derive(Deserialize)]
struct State {
    #[serde(rename = "_data_files")]
    data_files: Vec<DataFile>,
}

#[derive(Deserialize)]
struct DataFile {
    filename: String,
}

#[derive(Deserialize)]
struct DatasetDict {
    splits: Vec<String>,
}

fn arrow_error(path: &Path, msg: impl Into<String>) -> CorpusError {
    CorpusError::Arrow {
        path: path.into(),
        msg: msg.into(),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, CorpusError> {
    let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        arrow_error(
            path,
            format!(
                "not the file `datasets` writes: {}: {}",
                e.path(),
                e.inner()
            ),
        )
    })
}

/// The `Dataset` folder of `split` inside `dir` (`dir` itself when it is a
/// `Dataset` folder).
fn dataset_folder(dir: &Path, split: Split) -> Result<PathBuf, CorpusError> {
    let dict = dir.join("dataset_dict.json");
    if !dict.exists() {
        if dir.join("state.json").exists() {
            return Ok(dir.to_path_buf());
        }
        return Err(arrow_error(
            dir,
            "a folder, but not one `datasets.save_to_disk` wrote (no state.json or \
             dataset_dict.json)",
        ));
    }
    let d: DatasetDict = read_json(&dict)?;
    let want = split.name();
    if !d.splits.iter().any(|s| s == want) {
        return Err(arrow_error(
            dir,
            format!(
                "the DatasetDict has no `{want}` split (splits: {})",
                d.splits.join(", ")
            ),
        ));
    }
    Ok(dir.join(want))
}

/// The Arrow files of the folder, in `state.json`'s order. A file name
/// that would leave the folder is refused.
pub fn data_files(dir: &Path, split: Split) -> Result<Vec<PathBuf>, CorpusError> {
    let folder = dataset_folder(dir, split)?;
    let state_path = folder.join("state.json");
    let state: State = read_json(&state_path)?;
    if state.data_files.is_empty() {
        return Err(arrow_error(&state_path, "_data_files is empty"));
    }
    state
        .data_files
        .iter()
        .map(|f| {
            let name = Path::new(&f.filename);
            let plain = name.components().count() == 1
                && matches!(
                    name.components().next(),
                    Some(std::path::Component::Normal(_))
                );
            if !plain {
                return Err(arrow_error(
                    &state_path,
                    format!(
                        "_data_files names `{}`, which is not a file of this folder",
                        f.filename
                    ),
                ));
            }
            Ok(folder.join(name))
        })
        .collect()
}

/// An Arrow stream reader on `file`, with the column `field` selected.
fn open(
    file: &Path,
    field: &str,
) -> Result<StreamReader<std::io::BufReader<std::fs::File>>, CorpusError> {
    let reader = |projection| {
        let f = std::fs::File::open(file).map_err(|e| io_error(file, e))?;
        StreamReader::try_new_buffered(f, projection)
            .map_err(|e| arrow_error(file, format!("not an Arrow stream: {e}")))
    };
    let schema = reader(None)?.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let Some(col) = names.iter().position(|n| *n == field) else {
        return Err(arrow_error(
            file,
            format!("no column `{field}` (columns: {})", names.join(", ")),
        ));
    };
    let ty = schema.field(col).data_type();
    if !matches!(ty, DataType::Utf8 | DataType::LargeUtf8) {
        return Err(arrow_error(
            file,
            format!("column `{field}` holds {ty}, expected strings"),
        ));
    }
    reader(Some(vec![col]))
}

/// The non-empty strings of one record batch's only column.
fn strings(file: &Path, field: &str, batch: &RecordBatch) -> Result<Vec<String>, CorpusError> {
    fn non_empty<'a>(values: impl Iterator<Item = Option<&'a str>>) -> Vec<String> {
        values
            .flatten()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }
    let col = batch.column(0);
    if let Some(a) = col.as_any().downcast_ref::<StringArray>() {
        Ok(non_empty(a.iter()))
    } else if let Some(a) = col.as_any().downcast_ref::<LargeStringArray>() {
        Ok(non_empty(a.iter()))
    } else {
        Err(arrow_error(
            file,
            format!(
                "column `{field}` holds {}, expected strings",
                col.data_type()
            ),
        ))
    }
}

/// Stream the documents of column `field`, file by file, batch by batch.
pub fn documents(dir: &Path, field: &str, split: Split) -> Result<Documents, CorpusError> {
    let files = data_files(dir, split)?;
    // Check every file's column now, so a bad folder fails before any work.
    for f in &files {
        open(f, field)?;
    }
    let field = field.to_string();
    let docs = files.into_iter().flat_map(move |file| {
        let field = field.clone();
        let batches: Box<dyn Iterator<Item = Result<Vec<String>, CorpusError>> + Send> =
            match open(&file, &field) {
                Err(e) => Box::new(std::iter::once(Err(e))),
                Ok(reader) => Box::new(reader.map(move |b| {
                    let b = b.map_err(|e| arrow_error(&file, e.to_string()))?;
                    strings(&file, &field, &b)
                })),
            };
        batches.flat_map(|r| match r {
            Ok(v) => v.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => vec![Err(e)],
        })
    });
    Ok(Box::new(docs))
}
