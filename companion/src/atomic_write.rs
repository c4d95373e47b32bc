//! Writing files so that a crash or a full disk never leaves a half-written
//! checkpoint, tokenizer or model folder: every file is written to a
//! temporary file in the same folder first and renamed into place only when
//! all of them were written completely; a whole model folder is staged
//! beside the old one and swapped in by one rename ([`replace_folder`]).
//! Files get the usual `0666 & !umask` mode (what Python's `open` gives),
//! not the temporary file's 0600.

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

/// Replace the folder `dir` with one holding `files`, so that a reader
/// (or a crash) sees the old folder or the new one, never a mix: the new
/// folder is staged beside it as `.NAME.staged-PID`, synced, and swapped
/// in by one rename (Linux: `renameat2(RENAME_EXCHANGE)`; elsewhere the
/// old folder is renamed aside for the moment between two renames). The
/// old folder's other regular files are carried over, as `save_pretrained`
/// keeps them. A folder holding anything else (sub-folders such as
/// checkpoints, hidden files such as a lock) is updated file by file
/// instead ([`write_files_atomically`]). Staging folders that a killed
/// process left are removed first.
pub fn replace_folder(dir: &Path, files: &[(&str, &[u8])]) -> std::io::Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| std::io::Error::other(format!("{}: not a folder name", dir.display())))?;
    std::fs::create_dir_all(&parent)?;
    let prefix = format!(".{name}.staged-");
    remove_stale_staging(&parent, &prefix);
    let mut carried = Vec::new();
    if dir.exists() {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let n = entry.file_name().to_string_lossy().to_string();
            if !entry.file_type()?.is_file() || n.starts_with('.') {
                return write_files_atomically(dir, files);
            }
            if !files.iter().any(|(f, _)| *f == n) {
                carried.push(entry.path());
            }
        }
    }
    let staged = parent.join(format!("{prefix}{}", std::process::id()));
    if staged.exists() {
        std::fs::remove_dir_all(&staged)?;
    }
    std::fs::create_dir(&staged)?;
    for (n, bytes) in files {
        let mut f = std::fs::File::create(staged.join(n))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    for old in &carried {
        let to = staged.join(old.file_name().expect("a file"));
        if std::fs::hard_link(old, &to).is_err() {
            std::fs::copy(old, &to)?;
        }
    }
    sync_dir(&staged)?;
    if dir.exists() {
        exchange(&staged, dir)?;
        // `staged` now holds the old folder.
        std::fs::remove_dir_all(&staged)?;
    } else {
        std::fs::rename(&staged, dir)?;
    }
    sync_dir(&parent)
}

/// Swap the folders `a` and `b` (each path then names the other's folder).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::ffi::OsStrExt;
        let ca = std::ffi::CString::new(a.as_os_str().as_bytes())?;
        let cb = std::ffi::CString::new(b.as_os_str().as_bytes())?;
        // SAFETY: two NUL-terminated paths that live across the call.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        // Filesystems without the exchange say EINVAL; old kernels ENOSYS.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(e);
        }
    }
    let aside = a.with_extension("aside");
    std::fs::rename(b, &aside)?;
    std::fs::rename(a, b)?;
    std::fs::rename(&aside, a)
}

/// Remove `parent/PREFIX<pid>` folders whose process is gone (a kill
/// during [`replace_folder`], or while preparing data); a live process's
/// staging is left alone.
pub fn remove_stale_staging(parent: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let n = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = n.strip_prefix(prefix).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if !alive && Path::new("/proc/self").exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Flush a folder's entries (new names, renames) to disk.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model folder is replaced whole: new files in, the old folder's
    /// other files carried over, no staging left; a killed process's
    /// staging folder is removed; a folder with sub-folders (an output_dir
    /// with checkpoints) is updated file by file and keeps them.
    #[test]
    fn a_folder_is_replaced_whole() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("model");
        replace_folder(&dir, &[("config.json", b"old"), ("w.bin", b"0")]).unwrap();
        std::fs::write(dir.join("README.md"), "mine").unwrap();
        // What a process killed while staging leaves (its pid cannot exist).
        let stale = root.path().join(".model.staged-4294967294");
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("config.json"), "half").unwrap();
        replace_folder(&dir, &[("config.json", b"new"), ("w.bin", b"1")]).unwrap();
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
        assert_eq!(
            (read("config.json"), read("w.bin")),
            ("new".into(), "1".into())
        );
        assert_eq!(read("README.md"), "mine");
        let left: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(left, vec!["model".to_string()], "staging left behind");
        std::fs::create_dir(dir.join("checkpoint-1")).unwrap();
        replace_folder(&dir, &[("config.json", b"third")]).unwrap();
        assert_eq!(read("config.json"), "third");
        assert!(dir.join("checkpoint-1").is_dir() && dir.join("w.bin").is_file());
    }

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
