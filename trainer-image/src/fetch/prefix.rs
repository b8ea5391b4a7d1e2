//! A directory of results as objects under an `s3://` prefix.
//!
//! S3 has no rename, so a set of objects cannot appear at once. The commit point is instead
//! one object, [`MANIFEST`], written last and listing every file's size and sha256: an upload
//! first deletes the old manifest, then writes the files, then the new manifest. A reader that
//! finds no manifest knows the prefix is incomplete; one that finds it checks each file it reads
//! against it, so a file replaced by a later, unfinished upload is caught too.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::FetchError;
use super::s3::S3Bucket;
use crate::limits::MAX_REMOTE_FILE;
use crate::train::checkpoint::digest_file;

/// The commit object of an uploaded prefix.
pub const MANIFEST: &str = "finetune-manifest.json";
/// A manifest larger than this is not one of ours.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Files listed in one manifest at most.
const MAX_FILES: usize = 4096;

/// What [`MANIFEST`] holds.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Every uploaded file, relative to the prefix (`/`-separated).
    pub files: Vec<ManifestFile>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ManifestFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// Joins a prefix and a relative name into a key.
fn key(prefix: &str, name: &str) -> String {
    format!("{}/{name}", prefix.trim_end_matches('/'))
}

/// Uploads the regular files under `dir` (recursively, skipping `skip` and hidden entries) to
/// `prefix`, then the manifest. Returns the manifest.
pub fn upload_dir(
    bucket: &S3Bucket,
    prefix: &str,
    dir: &Path,
    skip: &[&Path],
    progress: &mut dyn FnMut(&str),
) -> Result<Manifest, FetchError> {
    let mut names = Vec::new();
    // Refuses more than MAX_FILES as it lists.
    list_files(dir, dir, skip, &mut names)?;
    names.sort();
    bucket.delete(&key(prefix, MANIFEST))?;
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(&name);
        let (sha256, size) = digest_file(&path).map_err(|e| FetchError::Cache(format!("{e}")))?;
        bucket.upload(&key(prefix, &name), &path)?;
        progress(&name);
        files.push(ManifestFile {
            name,
            size: size as u64,
            sha256,
        });
    }
    let manifest = Manifest { files };
    let json = serde_json::to_vec_pretty(&manifest).expect("the manifest serializes");
    bucket.put(&key(prefix, MANIFEST), json)?;
    Ok(manifest)
}

/// Relative `/`-separated names of the regular files under `dir`.
fn list_files(
    root: &Path,
    dir: &Path,
    skip: &[&Path],
    out: &mut Vec<String>,
) -> Result<(), FetchError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| FetchError::Cache(format!("{}: {e}", dir.display())))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if hidden || skip.iter().any(|s| *s == path) {
            continue;
        }
        // Not followed: a link could lead outside the results.
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            list_files(root, &path, skip, out)?;
        } else if kind.is_file() {
            let relative = path.strip_prefix(root).expect("listed under root");
            let parts: Vec<_> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push(parts.join("/"));
        }
    }
    if out.len() > MAX_FILES {
        return Err(FetchError::Unusable(format!(
            "{}: more than the {MAX_FILES} files an upload takes",
            root.display()
        )));
    }
    Ok(())
}

/// Reads the manifest of `prefix`; a missing one means an incomplete (or no) upload.
pub fn read_manifest(bucket: &S3Bucket, prefix: &str) -> Result<Manifest, FetchError> {
    let at = key(prefix, MANIFEST);
    let bytes = bucket.read(&at, MAX_MANIFEST_BYTES).map_err(|e| match e {
        FetchError::NotFound(_) => FetchError::NotFound(format!(
            "{}: no {MANIFEST}, so no complete upload is there (it is written last)",
            key_uri(bucket, prefix)
        )),
        other => other,
    })?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| FetchError::Protocol(format!("{}: {e}", key_uri(bucket, &at))))?;
    if manifest.files.len() > MAX_FILES {
        return Err(FetchError::Protocol(format!(
            "{}: lists more than {MAX_FILES} files",
            key_uri(bucket, &at)
        )));
    }
    Ok(manifest)
}

fn key_uri(bucket: &S3Bucket, key: &str) -> String {
    format!("s3://{}/{key}", bucket.name())
}

/// Downloads the manifest's files named in `wanted` (those it lists; names it lacks are left
/// for the caller to report) from `prefix` into `dir`, each checked against the manifest's
/// size and sha256. Returns the paths written.
pub fn download_listed(
    bucket: &S3Bucket,
    prefix: &str,
    manifest: &Manifest,
    wanted: &[&str],
    dir: &Path,
) -> Result<Vec<PathBuf>, FetchError> {
    let mut written = Vec::new();
    for file in manifest
        .files
        .iter()
        .filter(|f| wanted.contains(&f.name.as_str()))
    {
        let relative = Path::new(&file.name);
        // A manifest is read from the network: its names must stay inside `dir`.
        if !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(FetchError::Protocol(format!(
                "{MANIFEST} names `{}`, which is not a path inside the prefix",
                file.name
            )));
        }
        let dest = dir.join(relative);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| FetchError::Cache(format!("{}: {e}", parent.display())))?;
        }
        let uri = key_uri(bucket, &key(prefix, &file.name));
        if file.size > MAX_REMOTE_FILE {
            return Err(FetchError::Unusable(format!(
                "{uri}: {MANIFEST} says {} bytes, more than the {MAX_REMOTE_FILE} a file may have",
                file.size
            )));
        }
        bucket.download(&key(prefix, &file.name), &dest, file.size)?;
        let (sha256, size) = digest_file(&dest).map_err(|e| FetchError::Cache(format!("{e}")))?;
        if size as u64 != file.size || sha256 != file.sha256 {
            return Err(FetchError::Corrupt(format!(
                "{uri}: sha256 {sha256} ({size} bytes) but {MANIFEST} says {} ({} bytes): the prefix changed after its upload finished, or is being uploaded again",
                file.sha256, file.size
            )));
        }
        written.push(dest);
    }
    Ok(written)
}
