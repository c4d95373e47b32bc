//! Writing files so that a crash or a full disk never leaves a half-written
//! checkpoint, tokenizer or model folder: every file is written to a
//! temporary file in the same folder first and renamed into place only when
//! all of them were written completely. Files get the usual `0666 & !umask`
//! mode (what Python's `open` gives), not the temporary file's 0600.

use std::io::Write;
use std::path::Path;

/// A temporary-file builder in `dir` whose file is created with mode 0666,
/// which the kernel narrows by the process's umask, as `open(…, "w")` does.
fn staging_file(dir: &Path, name: &str) -> std::io::Result<tempfile::NamedTempFile> {
    let prefix = format!(".{name}.");
    let mut b = tempfile::Builder::new();
    b.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(0o666));
    }
    b.tempfile_in(dir)
}

/// Check before any work that files can be created in `dir` (made if
/// missing): a read-only or full output folder is found at the start of a
/// run, not at its first save.
pub fn probe_writable(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut f = staging_file(dir, "write-probe")?;
    f.write_all(b"probe")?;
    f.as_file().sync_all()?;
    f.close()
}

/// Write `files` (name, bytes) into `dir`, creating it if needed. Other files
/// already in `dir` are kept, as `save_pretrained` does.
pub fn write_files_atomically(dir: &Path, files: &[(&str, &[u8])]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut staged = Vec::with_capacity(files.len());
    for (name, bytes) in files {
        let mut tmp = staging_file(dir, name)?;
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

/// Open (creating if missing, never truncating) the lock file `path`
/// without following a symbolic link: a lock file someone replaced with a
/// link must not let us lock, empty or write a file outside the folder.
/// Refuses anything but a regular file.
pub fn open_lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW);
    }
    let refuse = || {
        std::io::Error::other(
            "not a regular file (a symbolic link or other file there is not followed)",
        )
    };
    let file = options
        .open(path)
        .map_err(|e| if path.is_symlink() { refuse() } else { e })?;
    if !file.metadata()?.is_file() {
        return Err(refuse());
    }
    Ok(file)
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

    /// A batch that fails while staging (what a full disk does) replaces
    /// nothing: the old folder is whole, with no temporary files left.
    #[test]
    fn a_batch_that_fails_to_stage_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        write_files_atomically(
            dir.path(),
            &[("model.safetensors", b"old"), ("tokenizer.json", b"old")],
        )
        .unwrap();
        // The second file cannot be staged (its folder does not exist).
        let err = write_files_atomically(
            dir.path(),
            &[
                ("model.safetensors", b"new"),
                ("no/such/tokenizer.json", b"new"),
            ],
        );
        assert!(err.is_err());
        for f in ["model.safetensors", "tokenizer.json"] {
            assert_eq!(std::fs::read(dir.path().join(f)).unwrap(), b"old", "{f}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[cfg(unix)]
    #[test]
    fn files_get_the_umask_mode_not_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        write_file_atomically(&dir.path().join("a.json"), b"{}").unwrap();
        let mode = std::fs::metadata(dir.path().join("a.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        // What a plain create gives under this process's umask.
        std::fs::write(dir.path().join("plain"), b"").unwrap();
        let plain = std::fs::metadata(dir.path().join("plain"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, plain, "mode {mode:o}, a plain create gives {plain:o}");
        assert_ne!(mode, 0o600, "test needs a umask other than 077");
    }

    #[test]
    fn probe_finds_a_folder_that_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        probe_writable(&dir.path().join("new")).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("new")).unwrap().count(),
            0
        );
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(probe_writable(&file).is_err());
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
