//! Resolve `"gpt2"`-style ids the way `from_pretrained` does.
//!
//! Order: an existing local folder → the Hugging Face cache
//! (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`;
//! `models--gpt2/refs/main` → `snapshots/<rev>/`) → a download with `hf-hub`
//! unless `HF_HUB_OFFLINE=1`. A miss is one error naming the id, the file and
//! every place looked.

use std::path::{Path, PathBuf};

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

fn find(id: &str, file: &str, repo_type: RepoType, looked: &mut Vec<String>) -> Option<PathBuf> {
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
    let dir = cache_dir();
    let repo = hub_repo(id, repo_type);
    let cache = Cache::new(dir.clone());
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
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(false)
        .build();
    match api.and_then(|api| api.repo(repo).get(file)) {
        Ok(p) => Some(p),
        Err(e) => {
            looked.push(format!("download from the hub failed: {e}"));
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
    }
}
