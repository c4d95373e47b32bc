//! A Parquet file's string column as a stream of documents, row group by
//! row group (`dataset.to_parquet`, the hub's dataset exports).

use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::RowIter;
use parquet::record::Field;

use super::documents::{io_error, CorpusError, Documents};

/// The non-empty strings of column `field`, row by row.
pub fn documents(path: &Path, field: &str) -> Result<Documents, CorpusError> {
    let err = {
        let path = path.to_path_buf();
        move |msg: String| CorpusError::Parquet {
            path: path.clone(),
            msg,
        }
    };
    let file = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
    let reader =
        SerializedFileReader::new(file).map_err(|e| err(format!("not a Parquet file: {e}")))?;
    let names: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema_descr()
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
    let rows = RowIter::from_file_into(Box::new(reader));
    let field = field.to_string();
    let docs = rows.enumerate().filter_map(move |(i, row)| {
        let row = match row {
            Ok(r) => r,
            Err(e) => return Some(Err(err(format!("row {i}: {e}")))),
        };
        let value = row
            .get_column_iter()
            .find(|(n, _)| n.as_str() == field)
            .map(|(_, v)| v);
        match value {
            Some(Field::Str(s)) if !s.trim().is_empty() => Some(Ok(s.clone())),
            Some(Field::Str(_)) | Some(Field::Null) | None => None,
            Some(other) => Some(Err(err(format!(
                "row {i}: column `{field}` holds {}, expected a string",
                describe(other)
            )))),
        }
    });
    Ok(Box::new(docs))
}

/// A value for an error message: bytes by their count (a binary column
/// would print whole), anything else cut to 80 characters.
fn describe(v: &Field) -> String {
    match v {
        Field::Bytes(b) => format!("binary data ({} bytes)", b.len()),
        other => {
            let s = other.to_string();
            match s.char_indices().nth(80) {
                Some((at, _)) => format!("{}…", &s[..at]),
                None => s,
            }
        }
    }
}
