//! Writing files so that a crash or a full disk never leaves a half-written
//! checkpoint, tokenizer or model folder: every file is written to a
//! temporary file in the same folder first and renamed into place only when
//! all of them were written completely.

use std::io::Write;
use std::path::Path;

/// Write `files` (name, bytes) into `dir`, creating it if needed. Other files
/// already in `dir` are kept, as `save_pretrained` does.
pub fn write_files_atomically(dir: &Path, files: &[(&str, &[u8])]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut staged = Vec::with_capacity(files.len());
    for (name, bytes) in files {
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(dir)?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        staged.push((tmp, dir.join(name)));
    }
    for (tmp, dest) in staged {
        tmp.persist(&dest).map_err(|e| e.error)?;
    }
    Ok(())
}

/// Write one file atomically.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| std::io::Error::other(format!("{}: not a file name", path.display())))?;
    write_files_atomically(dir, &[(name, bytes)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_all_files_and_keeps_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keep.txt"), "old").unwrap();
        write_files_atomically(dir.path(), &[("a.json", b"{}"), ("b.txt", b"hi")]).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a.json")).unwrap(),
            "{}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("b.txt")).unwrap(),
            "hi"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("keep.txt")).unwrap(),
            "old"
        );
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn a_folder_that_is_a_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("out");
        std::fs::write(&file, "x").unwrap();
        assert!(write_files_atomically(&file, &[("a", b"1")]).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
    }
}
