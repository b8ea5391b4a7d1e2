//! `hf://ORG/NAME[@REVISION]` base models, fetched into the model cache before loading: the
//! revision resolved to its commit, only the files the format needs, each checked against the
//! hash the Hub publishes (the LFS sha256, or the git blob id of a small file), resumed where an
//! earlier attempt stopped, and published read-only under `repo/commit` for every later job.
//!
//! * [`hub`] — the Hub's HTTP API (`HF_ENDPOINT` for a mirror, the token only to that host).
//! * [`select`] — which files a format needs.
//! * [`cache`] — the cache layout and the per-commit download lock.
//!
//! `s3://` objects have their own modules: [`s3`] (the store's client), [`s3_model`] (base
//! models into the same cache, keyed by ETags) and [`prefix`] (a directory of results uploaded
//! under a prefix and committed by its manifest).

pub mod cache;
pub mod hub;
pub mod prefix;
pub mod s3;
pub mod s3_model;
pub mod select;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use finetune_crds::model::ModelFormat;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::limits::{MAX_REMOTE_FILE, MAX_SIDE_FILE, read_text};
use cache::{RepoCache, io};
pub use hub::HubClient;
use hub::{Body, Check, RemoteFile};
use select::Selection;

/// Tries per file before the attempt fails (the operator's retry then resumes the download).
const TRIES: u32 = 4;
/// The wait before the second try; doubled for each try after it.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const CHUNK: usize = 1 << 20;

/// The model to fetch, from the job's `baseModel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    /// `ORG/NAME`.
    pub repo: String,
    /// Branch, tag or commit (`main` when the URI names none).
    pub revision: String,
    pub format: ModelFormat,
}

/// A model in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The directory (Hugging Face layout) or the `.gguf` file to load.
    pub path: PathBuf,
    pub commit: String,
    /// Bytes this call downloaded (0 when the cache had the model).
    pub downloaded: u64,
}

/// What a fetch reports while it works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Resolved {
        commit: String,
        cached: bool,
    },
    /// Another process holds this commit's download lock.
    Waiting,
    Bytes {
        done: u64,
        total: u64,
    },
    /// A file is fetched again: a broken connection (resumed) or a hash mismatch (from zero).
    Retry {
        file: String,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// The Hub refused the token, or wants one (not retried: a new token is needed).
    Refused(String),
    /// No such repository or revision.
    NotFound(String),
    /// The repository has no model in the asked format.
    Unusable(String),
    /// The connection broke or the server failed; a later try may work.
    Transport(String),
    /// The server answered something that is not the Hub's API.
    Protocol(String),
    /// A file kept failing its hash.
    Corrupt(String),
    /// The cache directory could not be written.
    Cache(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(m)
            | Self::NotFound(m)
            | Self::Unusable(m)
            | Self::Transport(m)
            | Self::Protocol(m)
            | Self::Corrupt(m)
            | Self::Cache(m) => f.write_str(m),
        }
    }
}

/// Fetches `model` into `cache_root` (or finds it there) and returns what to load.
pub fn fetch_model(
    model: &HubModel,
    client: &HubClient,
    cache_root: &Path,
    report: &mut dyn FnMut(Event),
) -> Result<Fetched, FetchError> {
    let cache = RepoCache::new(cache_root, &model.repo);
    // A pinned commit already complete needs no network at all (a mirror outage does not stop it).
    if hub::is_commit_hash(&model.revision) {
        let layouts: &[ModelFormat] = match model.format {
            ModelFormat::Auto => &[ModelFormat::Safetensors, ModelFormat::Gguf],
            ref one => std::slice::from_ref(one),
        };
        for &layout in layouts {
            if let Some(fetched) = cached(&cache, &model.revision, layout, report)? {
                return Ok(fetched);
            }
        }
    }
    let revision = with_tries(&model.revision, report, |_| {
        client.revision(&model.repo, &model.revision)
    })?;
    let commit = revision.commit.clone();
    let selection =
        select::select(model.format, &revision.files).map_err(|e| unusable(model, &e))?;
    if let Some(fetched) = cached(&cache, &commit, selection.format, report)? {
        return Ok(fetched);
    }
    let entry = entry_name(&commit, selection.format);
    let _lock = cache.lock(&entry, || report(Event::Waiting))?;
    // Another job may have finished it while this one waited.
    if let Some(fetched) = cached(&cache, &commit, selection.format, report)? {
        return Ok(fetched);
    }
    report(Event::Resolved {
        commit: commit.clone(),
        cached: false,
    });
    let download = Download {
        client,
        model,
        commit: &commit,
        partial: cache.partial(&entry),
    };
    let downloaded = download.run(&selection, report)?;
    let dir = cache.publish(&entry)?;
    Ok(Fetched {
        path: model_path(&dir, selection.gguf.as_deref()),
        commit,
        downloaded,
    })
}

/// One file of a Hub repository (a dataset's JSON Lines file, `repo` = `datasets/ORG/NAME`)
/// downloaded to `dir/PATH`, checked against the hash the Hub publishes and retried as a model's
/// files are. Always fetched afresh: the revision may have moved since an earlier attempt.
/// Returns the commit the revision resolved to and the file's bytes.
pub fn fetch_file(
    client: &HubClient,
    repo: &str,
    revision: &str,
    path: &str,
    dir: &Path,
    report: &mut dyn FnMut(Event),
) -> Result<(String, u64), FetchError> {
    let model = HubModel {
        repo: repo.to_string(),
        revision: revision.to_string(),
        format: ModelFormat::Auto,
    };
    let commit = with_tries(revision, report, |_| client.revision(repo, revision))?.commit;
    let download = Download {
        client,
        model: &model,
        commit: &commit,
        partial: dir.to_path_buf(),
    };
    let files = download.paths_info(&[path.to_string()], report)?;
    let Some(file) = files.iter().find(|f| f.path == path) else {
        return Err(FetchError::NotFound(format!(
            "`{repo}@{revision}` (commit {commit}) has no file `{path}`"
        )));
    };
    if file.size > MAX_REMOTE_FILE {
        return Err(FetchError::Unusable(format!(
            "`{repo}@{revision}`: `{path}` has {} bytes, more than the {MAX_REMOTE_FILE} a file may have",
            file.size
        )));
    }
    let target = dir.join(path);
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    }
    if target.exists() {
        fs::remove_file(&target).map_err(|e| io(&target, e))?;
    }
    let mut progress = Progress::new(std::slice::from_ref(file), dir);
    download.files(std::slice::from_ref(file), &mut progress, report)?;
    Ok((commit, file.size))
}

/// One commit in one layout: `COMMIT.safetensors` or `COMMIT.gguf` (a repository may hold both).
fn entry_name(commit: &str, layout: ModelFormat) -> String {
    match layout {
        ModelFormat::Gguf => format!("{commit}.gguf"),
        _ => format!("{commit}.safetensors"),
    }
}

fn unusable(model: &HubModel, why: &str) -> FetchError {
    FetchError::Unusable(format!("`{}@{}`: {why}", model.repo, model.revision))
}

/// The cached `commit` in `layout`, if complete: its directory, or for GGUF its one `.gguf` file.
fn cached(
    cache: &RepoCache,
    commit: &str,
    layout: ModelFormat,
    report: &mut dyn FnMut(Event),
) -> Result<Option<Fetched>, FetchError> {
    let entry = entry_name(commit, layout);
    if !cache.is_complete(&entry) {
        return Ok(None);
    }
    let dir = cache.complete(&entry);
    let gguf = match layout {
        ModelFormat::Gguf => fs::read_dir(&dir)
            .map_err(|e| io(&dir, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.ends_with(".gguf")),
        _ => None,
    };
    report(Event::Resolved {
        commit: commit.to_string(),
        cached: true,
    });
    Ok(Some(Fetched {
        path: model_path(&dir, gguf.as_deref()),
        commit: commit.to_string(),
        downloaded: 0,
    }))
}

fn model_path(dir: &Path, gguf: Option<&str>) -> PathBuf {
    match gguf {
        Some(name) => dir.join(name),
        None => dir.to_path_buf(),
    }
}

/// The download of one cache entry's files into its partial directory.
struct Download<'a> {
    client: &'a HubClient,
    model: &'a HubModel,
    commit: &'a str,
    partial: PathBuf,
}

impl Download<'_> {
    /// The selected files, then the shards a safetensors index names; returns the bytes that
    /// travelled.
    fn run(&self, selection: &Selection, report: &mut dyn FnMut(Event)) -> Result<u64, FetchError> {
        let partial = &self.partial;
        fs::create_dir_all(partial).map_err(|e| io(partial, e))?;
        let files = self.paths_info(&selection.files, report)?;
        let mut progress = Progress::new(&files, partial);
        self.files(&files, &mut progress, report)?;
        if let Some(index) = files.iter().find(|f| f.path.ends_with(".index.json")) {
            let path = partial.join(&index.path);
            let text = read_text(&path, MAX_SIDE_FILE, "the safetensors index")
                .map_err(|e| FetchError::Unusable(e.to_string()))?;
            let shards = select::shards_from_index(&text).map_err(|e| unusable(self.model, &e))?;
            let shard_files = self.paths_info(&shards, report)?;
            progress.add(&shard_files, partial);
            self.files(&shard_files, &mut progress, report)?;
        }
        Ok(progress.downloaded)
    }

    fn paths_info(
        &self,
        paths: &[String],
        report: &mut dyn FnMut(Event),
    ) -> Result<Vec<RemoteFile>, FetchError> {
        with_tries("paths-info", report, |_| {
            self.client.paths_info(&self.model.repo, self.commit, paths)
        })
    }

    /// Downloads the files not yet in the partial directory, each with its own tries.
    fn files(
        &self,
        files: &[RemoteFile],
        progress: &mut Progress,
        report: &mut dyn FnMut(Event),
    ) -> Result<(), FetchError> {
        for file in files {
            if self.partial.join(&file.path).is_file() {
                continue;
            }
            with_tries(&file.path, report, |report| {
                self.one(file, progress, report)
            })?;
            progress.finished += file.size;
            report(Event::Bytes {
                done: progress.finished,
                total: progress.total,
            });
        }
        Ok(())
    }
}

/// Byte counts across all files of one fetch.
struct Progress {
    total: u64,
    /// Bytes of finished files, verified earlier or in this fetch.
    finished: u64,
    downloaded: u64,
}

impl Progress {
    fn new(files: &[RemoteFile], partial: &Path) -> Self {
        let mut p = Progress {
            total: 0,
            finished: 0,
            downloaded: 0,
        };
        p.add(files, partial);
        p
    }

    fn add(&mut self, files: &[RemoteFile], partial: &Path) {
        for f in files {
            self.total += f.size;
            if partial.join(&f.path).is_file() {
                self.finished += f.size;
            }
        }
    }
}

impl Download<'_> {
    /// Downloads one file to `PARTIAL/PATH.incomplete` (resuming what is there when the server
    /// honours `Range`), checks its hash, and renames it to `PARTIAL/PATH`. A mismatch deletes the
    /// bytes, so the next try starts from zero.
    fn one(
        &self,
        file: &RemoteFile,
        progress: &mut Progress,
        report: &mut dyn FnMut(Event),
    ) -> Result<(), FetchError> {
        let partial = &self.partial;
        let target = partial.join(&file.path);
        let incomplete = partial.join(format!("{}.incomplete", file.path));
        let have = fs::metadata(&incomplete).map(|m| m.len()).unwrap_or(0);
        let from = if have <= file.size { have } else { 0 };
        let (mut out, mut hasher, body, mut written) =
            match self
                .client
                .open(&self.model.repo, self.commit, &file.path, from)?
            {
                Body::Partial(body) if from > 0 => {
                    let hasher = FileHasher::over_prefix(&file.check, &incomplete, file.size)?;
                    let out = OpenOptions::new()
                        .append(true)
                        .open(&incomplete)
                        .map_err(|e| io(&incomplete, e))?;
                    (out, hasher, body, from)
                }
                Body::Partial(body) | Body::Whole(body) => {
                    let out = File::create(&incomplete).map_err(|e| io(&incomplete, e))?;
                    (out, FileHasher::new(&file.check, file.size), body, 0)
                }
            };
        copy_capped(
            body,
            &mut out,
            &mut hasher,
            file,
            &mut written,
            &mut |delta, written| {
                progress.downloaded += delta;
                report(Event::Bytes {
                    done: progress.finished + written,
                    total: progress.total,
                });
            },
        )?;
        out.sync_all().map_err(|e| io(&incomplete, e))?;
        if written < file.size {
            return Err(FetchError::Transport(format!(
                "{}: the connection ended after {written} of {} bytes",
                file.path, file.size
            )));
        }
        let got = hasher.finish();
        if !got.matches(&file.check) {
            let _ = fs::remove_file(&incomplete);
            return Err(FetchError::Corrupt(format!(
                "{}: {} mismatch (the Hub publishes {}, the download has {})",
                file.path,
                got.kind(),
                file.check.hex(),
                got.hex()
            )));
        }
        fs::rename(&incomplete, &target).map_err(|e| io(&target, e))
    }
}

/// Copies `body` to `out` through the hasher, refusing more bytes than the Hub declared (a
/// server cannot make the trainer fill its disk). `on_chunk(delta, written)` after each chunk.
fn copy_capped(
    mut body: Box<dyn Read + Send>,
    out: &mut File,
    hasher: &mut FileHasher,
    file: &RemoteFile,
    written: &mut u64,
    on_chunk: &mut dyn FnMut(u64, u64),
) -> Result<(), FetchError> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // What arrived stays in the file; the next try resumes after it.
            Err(e) => return Err(FetchError::Transport(format!("{}: {e}", file.path))),
        };
        if *written + n as u64 > file.size {
            return Err(FetchError::Protocol(format!(
                "{}: the server sent more than the {} bytes the Hub declares",
                file.path, file.size
            )));
        }
        out.write_all(&buf[..n])
            .map_err(|e| FetchError::Cache(format!("{}: {e}", file.path)))?;
        hasher.update(&buf[..n]);
        *written += n as u64;
        on_chunk(n as u64, *written);
    }
}

/// The hash a [`Check`] compares against, computed as the bytes arrive.
enum FileHasher {
    Sha256(Sha256),
    GitBlob(Sha1),
}

/// A computed digest.
struct Got {
    hex: String,
    git_blob: bool,
}

impl FileHasher {
    fn new(check: &Check, size: u64) -> Self {
        match check {
            Check::Sha256(_) => FileHasher::Sha256(Sha256::new()),
            Check::GitBlob(_) => {
                let mut h = Sha1::new();
                h.update(format!("blob {size}\0").as_bytes());
                FileHasher::GitBlob(h)
            }
        }
    }

    /// A hasher that has seen the first bytes of a resumed download.
    fn over_prefix(check: &Check, path: &Path, size: u64) -> Result<Self, FetchError> {
        let mut hasher = FileHasher::new(check, size);
        let mut f = File::open(path).map_err(|e| io(path, e))?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = f.read(&mut buf).map_err(|e| io(path, e))?;
            if n == 0 {
                return Ok(hasher);
            }
            hasher.update(&buf[..n]);
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            FileHasher::Sha256(h) => h.update(bytes),
            FileHasher::GitBlob(h) => h.update(bytes),
        }
    }

    fn finish(self) -> Got {
        match self {
            FileHasher::Sha256(h) => Got {
                hex: hex(&h.finalize()),
                git_blob: false,
            },
            FileHasher::GitBlob(h) => Got {
                hex: hex(&h.finalize()),
                git_blob: true,
            },
        }
    }
}

impl Got {
    fn matches(&self, check: &Check) -> bool {
        self.hex.eq_ignore_ascii_case(check.hex())
    }

    fn kind(&self) -> &'static str {
        if self.git_blob {
            "git blob id"
        } else {
            "sha256"
        }
    }

    fn hex(&self) -> &str {
        &self.hex
    }
}

impl Check {
    fn hex(&self) -> &str {
        match self {
            Check::Sha256(h) | Check::GitBlob(h) => h,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Retries `call` after a broken connection or server error (the server may be restarting) or
/// a hash mismatch (the next download starts from zero), with a doubling backoff; `call` gets
/// the reporter for its own events.
fn with_tries<T>(
    what: &str,
    report: &mut dyn FnMut(Event),
    mut call: impl FnMut(&mut dyn FnMut(Event)) -> Result<T, FetchError>,
) -> Result<T, FetchError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match call(report) {
            Err(e @ (FetchError::Transport(_) | FetchError::Corrupt(_))) if tries < TRIES => {
                report(Event::Retry {
                    file: what.to_string(),
                    reason: format!("{e} (try {} of {TRIES} next)", tries + 1),
                });
                std::thread::sleep(FIRST_BACKOFF * 2u32.pow(tries - 1));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A file server for the error paths of one download: answers `resolve` with `body`,
    /// honouring `Range` when `ranges` is set, and records each request's Range header.
    fn serve(body: Vec<u8>, ranges: bool) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let port = server.server_addr().to_ip().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for request in server.incoming_requests() {
                let range = request
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Range"))
                    .map(|h| h.value.to_string());
                log.lock().unwrap().push(range.clone());
                let from = range
                    .filter(|_| ranges)
                    .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok());
                let response = match from {
                    Some(from) => {
                        tiny_http::Response::from_data(body[from..].to_vec()).with_status_code(206)
                    }
                    None => tiny_http::Response::from_data(body.clone()),
                };
                let _ = request.respond(response);
            }
        });
        (format!("http://127.0.0.1:{port}"), seen)
    }

    fn remote(body: &[u8], size: u64) -> RemoteFile {
        RemoteFile {
            path: "model.safetensors".into(),
            size,
            check: Check::Sha256(hex(&Sha256::digest(body))),
        }
    }

    fn fetch(endpoint: &str, file: &RemoteFile, partial: &Path) -> Result<u64, FetchError> {
        let client = HubClient::new(endpoint, None, None);
        let model = HubModel {
            repo: "org/m".into(),
            revision: "main".into(),
            format: ModelFormat::Auto,
        };
        let files = vec![file.clone()];
        let mut progress = Progress::new(&files, partial);
        let download = Download {
            client: &client,
            model: &model,
            commit: "c",
            partial: partial.to_path_buf(),
        };
        download.one(file, &mut progress, &mut |_| {})?;
        Ok(progress.downloaded)
    }

    /// A 300 000-byte file whose first `have` bytes are already on disk, fetched from a server
    /// that does or does not honour `Range`; returns the bytes that travelled and the Range
    /// headers the server saw, after checking the result is the whole file.
    fn resume(ranges: bool, have: usize) -> (u64, Vec<Option<String>>) {
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (endpoint, seen) = serve(body.clone(), ranges);
        let dir = tempfile::tempdir().unwrap();
        let incomplete = dir.path().join("model.safetensors.incomplete");
        fs::write(incomplete, &body[..have]).unwrap();
        let downloaded = fetch(&endpoint, &remote(&body, 300_000), dir.path()).unwrap();
        let done = fs::read(dir.path().join("model.safetensors")).unwrap();
        assert_eq!(done, body);
        (downloaded, seen.lock().unwrap().clone())
    }

    #[test]
    fn a_download_resumes_after_the_bytes_it_has_when_the_server_honours_range() {
        let (downloaded, seen) = resume(true, 100_000);
        assert_eq!(downloaded, 200_000, "only the missing bytes travel");
        assert_eq!(seen, vec![Some("bytes=100000-".into())]);
    }

    #[test]
    fn a_server_that_ignores_range_sends_the_file_again_from_its_start() {
        let (downloaded, _) = resume(false, 100_000);
        assert_eq!(downloaded, 300_000);
    }

    #[test]
    fn more_bytes_than_declared_and_a_wrong_hash_are_refused_and_kept_out_of_the_cache() {
        let body = vec![7u8; 4096];
        let (endpoint, _) = serve(body.clone(), false);
        let dir = tempfile::tempdir().unwrap();
        let short = remote(&body, 1000);
        assert!(matches!(
            fetch(&endpoint, &short, dir.path()),
            Err(FetchError::Protocol(_))
        ));
        let wrong = RemoteFile {
            check: Check::Sha256("00".repeat(32)),
            ..remote(&body, 4096)
        };
        let err = fetch(&endpoint, &wrong, dir.path()).unwrap_err();
        assert!(matches!(err, FetchError::Corrupt(ref m) if m.contains("sha256 mismatch")));
        assert!(!dir.path().join("model.safetensors").exists());
        assert!(!dir.path().join("model.safetensors.incomplete").exists());
    }

    #[test]
    fn small_files_are_checked_by_their_git_blob_id() {
        // `git hash-object` of "hello\n".
        let body = b"hello\n".to_vec();
        let (endpoint, _) = serve(body.clone(), false);
        let dir = tempfile::tempdir().unwrap();
        let file = RemoteFile {
            path: "config.json".into(),
            size: 6,
            check: Check::GitBlob("ce013625030ba8dba906f756967f9e9ca394464a".into()),
        };
        fetch(&endpoint, &file, dir.path()).unwrap();
        assert_eq!(fs::read(dir.path().join("config.json")).unwrap(), body);
    }
}
