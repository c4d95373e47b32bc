//! Downloading one file of a hub repository into the Hugging Face cache
//! layout (`blobs/<etag>`, `snapshots/<commit>/<file>`, `refs/<revision>`),
//! as `huggingface_hub.hf_hub_download` does. Written here rather than
//! through `hf-hub`'s client because that client has no timeouts (a proxy
//! that accepts and never answers hangs it for ever) and no way to set one;
//! this one has the connect and read timeouts `huggingface_hub` reads from
//! `HF_HUB_ETAG_TIMEOUT` and `HF_HUB_DOWNLOAD_TIMEOUT` (10 s each by default).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where and how to download.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `HF_ENDPOINT`, default `https://huggingface.co`.
    pub url: String,
    /// The metadata request (`HF_HUB_ETAG_TIMEOUT`).
    pub etag_timeout: Duration,
    /// Connecting and each read of the download (`HF_HUB_DOWNLOAD_TIMEOUT`).
    pub download_timeout: Duration,
    pub token: Option<String>,
}

impl Endpoint {
    /// From the environment, as `huggingface_hub` reads it.
    pub fn from_env(token: Option<String>) -> Self {
        let secs = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0)
                .map_or(Duration::from_secs(10), Duration::from_secs_f64)
        };
        let url = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".to_string());
        Endpoint {
            url: url.trim_end_matches('/').to_string(),
            etag_timeout: secs("HF_HUB_ETAG_TIMEOUT"),
            download_timeout: secs("HF_HUB_DOWNLOAD_TIMEOUT"),
            token: std::env::var("HF_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .or(token),
        }
    }
}

/// A name that becomes one path component in the cache (a commit, an
/// etag): only letters, digits, `-`, `_` and `.` (not `.`/`..`), so it
/// cannot leave the cache.
pub fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn plain(what: &str, s: &str) -> Result<String, String> {
    if is_plain_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!("the server sent an unusable {what} `{s}`"))
    }
}

fn agent(connect: Duration, read: Duration, redirects: u32) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(connect)
        .timeout_read(read)
        .timeout_write(read)
        .redirects(redirects)
        .try_proxy_from_env(true)
        .build()
}

fn describe(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(401, _) | ureq::Error::Status(404, _) => {
            "not found (HTTP 404/401: no such repository or file, or it is gated or private; \
             set HF_TOKEN for private ones)"
                .to_string()
        }
        ureq::Error::Status(code, _) => format!("HTTP {code}"),
        ureq::Error::Transport(t) => t.to_string(),
    }
}

/// Download `file` of `repo_url_path` (`gpt2`, `datasets/owner/name`) at
/// `revision` into the cache folder `repo_dir` (`…/models--gpt2`); returns
/// the snapshot path.
pub fn download(
    ep: &Endpoint,
    repo_url_path: &str,
    revision: &str,
    file: &str,
    repo_dir: &Path,
) -> Result<PathBuf, String> {
    let url = format!(
        "{}/{repo_url_path}/resolve/{}/{file}",
        ep.url,
        revision.replace('/', "%2F")
    );
    let auth = ep.token.as_ref().map(|t| format!("Bearer {t}"));
    // Metadata: commit and etag, following only the hub's own (relative)
    // redirects, as huggingface_hub does.
    let meta = agent(ep.etag_timeout, ep.etag_timeout, 0);
    let mut target = url.clone();
    let mut response = None;
    for _ in 0..5 {
        let mut req = meta.head(&target);
        if let Some(a) = &auth {
            req = req.set("Authorization", a);
        }
        let r = req.call().map_err(describe)?;
        match (r.status(), r.header("location")) {
            (300..=399, Some(loc)) if loc.starts_with('/') => {
                target = format!("{}{loc}", ep.url);
            }
            _ => {
                response = Some(r);
                break;
            }
        }
    }
    let r = response.ok_or("too many redirects")?;
    let commit = plain(
        "commit",
        r.header("x-repo-commit")
            .ok_or("no X-Repo-Commit header: is HF_ENDPOINT a Hugging Face hub?")?,
    )?;
    let etag = r
        .header("x-linked-etag")
        .or_else(|| r.header("etag"))
        .ok_or("no ETag header")?
        .trim_start_matches("W/")
        .replace('"', "");
    let etag = plain("etag", &etag)?;
    let source = match (r.status(), r.header("location")) {
        (300..=399, Some(loc)) => loc.to_string(),
        _ => target,
    };
    // The file, into a temporary blob renamed into place when complete.
    let blobs = repo_dir.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(|e| format!("{}: {e}", blobs.display()))?;
    let blob = blobs.join(&etag);
    if !blob.is_file() {
        let mut req = agent(ep.download_timeout, ep.download_timeout, 5).get(&source);
        if let (Some(a), true) = (&auth, source.starts_with(&ep.url)) {
            req = req.set("Authorization", a);
        }
        let resp = req.call().map_err(describe)?;
        let expected: Option<u64> = resp.header("content-length").and_then(|l| l.parse().ok());
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{etag}."))
            .suffix(".incomplete")
            .tempfile_in(&blobs)
            .map_err(|e| format!("{}: {e}", blobs.display()))?;
        let n = std::io::copy(&mut resp.into_reader(), &mut tmp)
            .map_err(|e| format!("downloading {source}: {e}"))?;
        if expected.is_some_and(|want| want != n) {
            return Err(format!(
                "downloading {source}: got {n} bytes of {}",
                expected.unwrap_or(0)
            ));
        }
        tmp.flush().map_err(|e| e.to_string())?;
        tmp.persist(&blob).map_err(|e| e.error.to_string())?;
    }
    let snap = repo_dir.join("snapshots").join(&commit).join(file);
    if let Some(parent) = snap.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    if !snap.exists() {
        link_or_copy(&blob, &snap, file)?;
    }
    if revision != commit {
        let refs = repo_dir.join("refs").join(revision);
        crate::atomic_write::write_file_atomically(&refs, commit.as_bytes())
            .map_err(|e| format!("{}: {e}", refs.display()))?;
    }
    Ok(snap)
}

/// `snapshots/<commit>/<file>` → `../../blobs/<etag>` (one more `..` per
/// folder of `file`), a copy where links are not possible.
fn link_or_copy(blob: &Path, snap: &Path, file: &str) -> Result<(), String> {
    #[cfg(unix)]
    {
        let depth = file.split('/').count() + 1;
        let mut rel = PathBuf::new();
        for _ in 0..depth {
            rel.push("..");
        }
        rel.push("blobs");
        rel.push(blob.file_name().unwrap_or_default());
        if std::os::unix::fs::symlink(&rel, snap).is_ok() {
            return Ok(());
        }
    }
    let _ = file;
    std::fs::copy(blob, snap)
        .map(|_| ())
        .map_err(|e| format!("{}: {e}", snap.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::net::TcpListener;

    fn endpoint(url: String, secs: f64) -> Endpoint {
        Endpoint {
            url,
            etag_timeout: Duration::from_secs_f64(secs),
            download_timeout: Duration::from_secs_f64(secs),
            token: None,
        }
    }

    #[test]
    fn a_server_that_never_answers_times_out() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", server.local_addr().unwrap());
        // The server holds the connection until the test is done (30 s at
        // most): a download without its 0.5 s timeout would wait that long.
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let hold = std::thread::spawn(move || {
            let (s, _) = server.accept().unwrap();
            let _ = wait.recv_timeout(Duration::from_secs(30));
            drop(s);
        });
        let dir = tempfile::tempdir().unwrap();
        let t = std::time::Instant::now();
        let err = download(
            &endpoint(url, 0.5),
            "gpt2",
            "main",
            "config.json",
            dir.path(),
        )
        .unwrap_err();
        // Far below the 30 s hold, with room for a loaded machine.
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert!(err.to_lowercase().contains("timed out"), "{err}");
        drop(done);
        hold.join().unwrap();
    }

    /// A hub stand-in answering HEAD and GET for one file, the way the
    /// hub does (commit and etag headers).
    fn serve(body: &'static [u8], commit: &'static str) -> String {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", server.local_addr().unwrap());
        std::thread::spawn(move || {
            for s in server.incoming().take(2) {
                let mut s = s.unwrap();
                let mut reader = BufReader::new(s.try_clone().unwrap());
                let mut first = String::new();
                reader.read_line(&mut first).unwrap();
                loop {
                    let mut l = String::new();
                    reader.read_line(&mut l).unwrap();
                    if l.trim().is_empty() {
                        break;
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nX-Repo-Commit: {commit}\r\nETag: \"abc123\"\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                s.write_all(head.as_bytes()).unwrap();
                if first.starts_with("GET") {
                    s.write_all(body).unwrap();
                }
                let _ = s.read(&mut [0u8; 1]);
            }
        });
        url
    }

    #[test]
    fn a_download_lands_in_the_cache_layout() {
        let url = serve(
            b"{\"n_layer\": 1}",
            "0123456789abcdef0123456789abcdef01234567",
        );
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("models--someone--tiny");
        let p = download(
            &endpoint(url, 5.0),
            "someone/tiny",
            "main",
            "config.json",
            &repo,
        )
        .unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"n_layer\": 1}");
        assert_eq!(
            p,
            repo.join("snapshots/0123456789abcdef0123456789abcdef01234567/config.json")
        );
        assert!(repo.join("blobs/abc123").is_file());
        assert_eq!(
            std::fs::read_to_string(repo.join("refs/main")).unwrap(),
            "0123456789abcdef0123456789abcdef01234567"
        );
    }

    #[test]
    fn a_commit_that_is_a_path_is_refused() {
        let url = serve(b"x", "../../../../escape");
        let dir = tempfile::tempdir().unwrap();
        let err = download(
            &endpoint(url, 5.0),
            "a/b",
            "main",
            "config.json",
            dir.path(),
        )
        .unwrap_err();
        assert!(err.contains("unusable commit"), "{err}");
        assert!(!dir.path().join("blobs").exists());
    }
}
