//! Resolve `"gpt2"`-style ids the way `from_pretrained` does.
//!
//! Order: an existing local folder → the Hugging Face cache
//! (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`;
//! `models--gpt2/refs/main` → `snapshots/<rev>/`, read through `hf-hub`'s
//! cache layout) → a download unless `HF_HUB_OFFLINE=1` ([`download`]: our
//! own client, because `hf-hub`'s has no timeouts; from `HF_ENDPOINT`).
//! A miss is one error naming the id, the file and every place looked.
//! Nothing a file or a server says can make us read outside the folder or
//! the cache: ids, file names and `refs/` contents must be plain names.

pub mod download;

use std::path::{Component, Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType as HubRepoType};

/// What kind of hub repository an id names (`repo_type=` in `huggingface_hub`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoType {
    Model,
    Dataset,
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("could not find `{file}` for `{id}`; looked in: {}", looked.join("; "))]
    NotFound {
        id: String,
        file: String,
        looked: Vec<String>,
    },
}

/// The cache folder `huggingface_hub` uses: `HF_HUB_CACHE`, else `$HF_HOME/hub`,
/// else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = env_nonempty("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(home) = env_nonempty("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    Cache::from_env().path().clone()
}

/// `HF_HUB_OFFLINE` set to a true value (`1`, `true`, `yes`, `on`), as `huggingface_hub` reads it.
pub fn is_offline() -> bool {
    env_nonempty("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn hub_repo(id: &str, repo_type: RepoType) -> Repo {
    // `id@revision` pins a revision, as `revision=` does in Python.
    let (name, rev) = match id.split_once('@') {
        Some((n, r)) => (n.to_string(), r.to_string()),
        None => (id.to_string(), "main".to_string()),
    };
    let t = match repo_type {
        RepoType::Model => HubRepoType::Model,
        RepoType::Dataset => HubRepoType::Dataset,
    };
    Repo::with_revision(name, t, rev)
}

/// True when `id` names a local folder rather than a hub id.
pub fn is_local(id: &str) -> bool {
    Path::new(id).is_dir()
}

/// Find `file` for `id` (a folder or a hub id). Errors when it is nowhere.
pub fn get_file(id: &str, file: &str) -> Result<PathBuf, HubError> {
    get_file_of(id, file, RepoType::Model)
}

/// [`get_file`] for a given repository type.
pub fn get_file_of(id: &str, file: &str, repo_type: RepoType) -> Result<PathBuf, HubError> {
    let mut looked = Vec::new();
    match find(id, file, repo_type, &mut looked) {
        Some(p) => Ok(p),
        None => Err(HubError::NotFound {
            id: id.to_string(),
            file: file.to_string(),
            looked,
        }),
    }
}

/// Like [`get_file`], but a file that is nowhere is `None` (for optional files
/// such as `generation_config.json` or a sharded weights index).
pub fn get_optional(id: &str, file: &str) -> Option<PathBuf> {
    find(id, file, RepoType::Model, &mut Vec::new())
}

/// A hub repo id as the hub allows them: `name` or `owner/name`, each part
/// letters, digits, `-`, `_`, `.`, without `--` or `..`, not starting or
/// ending with `-` or `.` (an optional `@revision` is split off first).
pub fn is_repo_id(id: &str) -> bool {
    let (name, rev) = match id.split_once('@') {
        Some((n, r)) => (n, Some(r)),
        None => (id, None),
    };
    if rev.is_some_and(|r| !is_inside(r)) {
        return false;
    }
    let parts: Vec<&str> = name.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 96
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !p.contains("--")
                && !p.contains("..")
                && !p.starts_with(['-', '.'])
                && !p.ends_with(['-', '.'])
        })
}

/// A file name inside a repository or folder: relative, only plain
/// components (no `..`, no root).
pub fn is_inside(file: &str) -> bool {
    !file.is_empty()
        && !file.contains('\\')
        && Path::new(file)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

fn find(id: &str, file: &str, repo_type: RepoType, looked: &mut Vec<String>) -> Option<PathBuf> {
    if !is_inside(file) {
        looked.push(format!(
            "`{file}` is not a file name inside the repository (no `..`, no absolute path)"
        ));
        return None;
    }
    let local = Path::new(id);
    if local.is_dir() {
        let p = local.join(file);
        if p.is_file() {
            return Some(p);
        }
        looked.push(format!("local folder {}", local.display()));
        // A folder that exists is what the user meant: do not go to the hub.
        return None;
    }
    looked.push(format!("no local folder named `{id}`"));
    if !is_repo_id(id) {
        // A path that does not exist is not sent to the hub as an id.
        looked.push(format!(
            "`{id}` is not a hub repo id either (`name` or `owner/name`)"
        ));
        return None;
    }
    let dir = cache_dir();
    let repo = hub_repo(id, repo_type);
    let cache = Cache::new(dir.clone());
    let repo_dir = dir.join(repo.folder_name());
    // `refs/<revision>` names a snapshot folder: a plain commit name only.
    let refs = repo_dir.join("refs").join(repo.revision());
    let ref_ok = match std::fs::read_to_string(&refs) {
        Ok(commit) => download::is_plain_name(commit.trim()),
        Err(_) => true,
    };
    if !ref_ok {
        looked.push(format!(
            "{} does not hold a commit name (it must not be a path)",
            refs.display()
        ));
        return None;
    }
    if let Some(p) = cache.repo(repo.clone()).get(file) {
        return Some(p);
    }
    looked.push(format!(
        "Hugging Face cache {} ({}/refs/{})",
        dir.display(),
        repo.folder_name(),
        repo.revision()
    ));
    if is_offline() {
        looked.push("no download: HF_HUB_OFFLINE is set".to_string());
        return None;
    }
    let ep = download::Endpoint::from_env(cache.token());
    match download::download(&ep, &repo.url(), repo.revision(), file, &repo_dir) {
        Ok(p) => Some(p),
        Err(e) => {
            looked.push(format!("download from {} failed: {e}", ep.url));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_folder_wins_and_missing_file_names_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let id = dir.path().to_str().unwrap();
        assert_eq!(
            get_file(id, "config.json").unwrap(),
            dir.path().join("config.json")
        );
        let err = get_file(id, "model.safetensors").unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
        assert!(err.contains("local folder"), "{err}");
        let err = get_file(id, "../config.json").unwrap_err().to_string();
        assert!(err.contains("not a file name inside"), "{err}");
    }

    #[test]
    fn repo_ids_are_told_from_paths() {
        for id in [
            "gpt2",
            "openai-community/gpt2",
            "rinna/japanese-gpt2-small@main",
            "a.b_c",
        ] {
            assert!(is_repo_id(id), "{id}");
        }
        for id in [
            "/tmp/x", "./model", "../m", "a/b/c", "~/m", "a--b", "a/..", "", "C:\\m",
        ] {
            assert!(!is_repo_id(id), "{id}");
        }
    }

    #[test]
    fn a_missing_path_is_not_sent_to_the_hub() {
        let err = get_file("/no/such/folder", "config.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a hub repo id"), "{err}");
        assert!(!err.contains("download"), "{err}");
    }
}
