//! `s3://BUCKET/KEY` base models, fetched into the model cache before loading: a `.gguf`
//! object, or a prefix holding a Hugging Face layout, of which only the files the format needs
//! are fetched (the same choice as for `hf://`, see [`super::select`]).
//!
//! An object has no commit; what identifies a version is its ETag (else its Last-Modified) and
//! size. The entry is named by a digest of those of every object the model is read from, so a
//! new upload is a new entry and an unchanged one is found in the cache with one listing. Entries
//! live at `CACHE/s3/BUCKET/KEY/VERSION.LAYOUT/`, published read-only under the same per-entry
//! lock as Hub commits ([`super::cache`]). A file whose ETag is a plain MD5 (a single-part
//! upload) is checked against it; other files are checked by size.

use std::fs;
use std::path::Path;

use finetune_crds::model::ModelFormat;
use md5::Md5;
use sha2::{Digest, Sha256};

use super::cache::{RepoCache, io};
use super::s3::{ObjectInfo, S3Bucket};
use super::{Event, FetchError, Fetched, select};
use crate::limits::{MAX_SIDE_FILE, read_text};

/// Objects listed under a model prefix at most (a model with more shards is not one).
const MAX_OBJECTS: usize = 4096;

/// The model to fetch, from the job's `baseModel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Model {
    pub bucket: String,
    /// A `.gguf` object, or the prefix of a Hugging Face layout (no trailing `/`).
    pub key: String,
    pub format: ModelFormat,
}

impl S3Model {
    fn uri(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    /// One object rather than a prefix.
    fn is_file(&self) -> bool {
        self.key.ends_with(".gguf")
    }
}

/// Fetches `model` into `cache_root` (or finds it there) and returns what to load; `commit` is
/// the version digest the entry is named by.
pub fn fetch_s3_model(
    model: &S3Model,
    bucket: &S3Bucket,
    cache_root: &Path,
    report: &mut dyn FnMut(Event),
) -> Result<Fetched, FetchError> {
    let (objects, selection) = objects(model, bucket)?;
    let version = version(&objects);
    let layout = match selection.format {
        ModelFormat::Gguf => "gguf",
        _ => "safetensors",
    };
    let entry = format!("{version}.{layout}");
    let cache = RepoCache::for_object(cache_root, &model.bucket, &model.key);
    let path_in = |dir: &Path| match &selection.gguf {
        Some(name) => dir.join(name),
        None => dir.to_path_buf(),
    };
    if cache.is_complete(&entry) {
        report(Event::Resolved {
            commit: version,
            cached: true,
        });
        return Ok(Fetched {
            path: path_in(&cache.complete(&entry)),
            commit: entry,
            downloaded: 0,
        });
    }
    let _lock = cache.lock(&entry, || report(Event::Waiting))?;
    let downloaded = if cache.is_complete(&entry) {
        0
    } else {
        report(Event::Resolved {
            commit: version,
            cached: false,
        });
        let partial = cache.partial(&entry);
        fs::create_dir_all(&partial).map_err(|e| io(&partial, e))?;
        let download = Download {
            model,
            bucket,
            objects: &objects,
            partial: &partial,
        };
        let bytes = download.run(&selection.files, report)?;
        cache.publish(&entry)?;
        bytes
    };
    Ok(Fetched {
        path: path_in(&cache.complete(&entry)),
        commit: entry,
        downloaded,
    })
}

/// The objects the model is read from, by name relative to the prefix, and the files its format
/// needs first (a sharded model's index; the shards follow from it).
fn objects(
    model: &S3Model,
    bucket: &S3Bucket,
) -> Result<(Vec<(String, ObjectInfo)>, select::Selection), FetchError> {
    let unusable = |why: String| FetchError::Unusable(format!("{}: {why}", model.uri()));
    if model.is_file() {
        let info = bucket.head(&model.key)?;
        let name = model
            .key
            .rsplit('/')
            .next()
            .unwrap_or(&model.key)
            .to_string();
        let selection = select::Selection {
            format: ModelFormat::Gguf,
            files: vec![name.clone()],
            gguf: Some(name.clone()),
        };
        return Ok((vec![(name, info)], selection));
    }
    let prefix = format!("{}/", model.key);
    let objects: Vec<(String, ObjectInfo)> = bucket
        .list_top(&model.key, MAX_OBJECTS)?
        .into_iter()
        .filter_map(|o| Some((o.key.strip_prefix(&prefix)?.to_string(), o)))
        .collect();
    if objects.is_empty() {
        return Err(FetchError::NotFound(format!(
            "{}: no objects under this prefix (a model is a .gguf object or a prefix holding config.json and safetensors)",
            model.uri()
        )));
    }
    let names: Vec<String> = objects.iter().map(|(n, _)| n.clone()).collect();
    let selection = select::select(model.format, &names).map_err(unusable)?;
    Ok((objects, selection))
}

/// 16 hex digits of a digest over every object's name, ETag (else Last-Modified) and size.
fn version(objects: &[(String, ObjectInfo)]) -> String {
    let mut sorted: Vec<&(String, ObjectInfo)> = objects.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = Sha256::new();
    for (name, info) in sorted {
        let stamp = info.etag.as_deref().unwrap_or(&info.modified);
        hasher.update(format!("{name}\0{stamp}\0{}\n", info.size));
    }
    hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The download of one entry's files into its partial directory.
struct Download<'a> {
    model: &'a S3Model,
    bucket: &'a S3Bucket,
    objects: &'a [(String, ObjectInfo)],
    partial: &'a Path,
}

impl Download<'_> {
    /// `files`, then the shards a safetensors index among them names; returns the bytes that
    /// travelled. Files an earlier attempt finished are kept.
    fn run(&self, files: &[String], report: &mut dyn FnMut(Event)) -> Result<u64, FetchError> {
        let mut downloaded = self.files(files, report)?;
        if let Some(index) = files.iter().find(|f| f.ends_with(".index.json")) {
            let path = self.partial.join(index);
            let text = read_text(&path, MAX_SIDE_FILE, "the safetensors index")
                .map_err(|e| FetchError::Unusable(e.to_string()))?;
            let shards = select::shards_from_index(&text)
                .map_err(|e| FetchError::Unusable(format!("{}: {e}", self.model.uri())))?;
            downloaded += self.files(&shards, report)?;
        }
        Ok(downloaded)
    }

    fn files(&self, names: &[String], report: &mut dyn FnMut(Event)) -> Result<u64, FetchError> {
        let infos = names
            .iter()
            .map(|name| {
                self.objects
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, info)| (name, info))
                    .ok_or_else(|| {
                        FetchError::Unusable(format!(
                            "{}: {name} is named by the model but not under the prefix",
                            self.model.uri()
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let total: u64 = infos.iter().map(|(_, i)| i.size).sum();
        let (mut done, mut downloaded) = (0, 0);
        for (name, info) in infos {
            let target = self.partial.join(name);
            if !target.is_file() {
                // Replaced since the listing: another version than the entry is named for. The
                // next attempt lists again.
                let changed = |got: String| {
                    FetchError::Corrupt(format!(
                        "{}: {got}; the object changed since it was listed",
                        self.model.uri()
                    ))
                };
                let size = self
                    .bucket
                    .download(&info.key, &target, info.size)
                    .map_err(|e| match e {
                        FetchError::Unusable(m) => changed(m),
                        other => other,
                    })?;
                if size != info.size {
                    let _ = fs::remove_file(&target);
                    return Err(changed(format!(
                        "{} has {size} bytes, not {}",
                        info.key, info.size
                    )));
                }
                check_md5(&target, info, &self.model.uri())?;
                downloaded += info.size;
            }
            done += info.size;
            report(Event::Bytes { done, total });
        }
        Ok(downloaded)
    }
}

/// Checks `path` against an ETag that is a plain MD5 (32 hex digits: a single-part upload);
/// deletes it on a mismatch so that the next attempt fetches it again.
fn check_md5(path: &Path, info: &ObjectInfo, uri: &str) -> Result<(), FetchError> {
    let Some(etag) = info
        .etag
        .as_deref()
        .filter(|e| e.len() == 32 && e.bytes().all(|b| b.is_ascii_hexdigit()))
    else {
        return Ok(());
    };
    let mut file = fs::File::open(path).map_err(|e| io(path, e))?;
    let mut hasher = Md5::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| io(path, e))?;
    let got: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if !got.eq_ignore_ascii_case(etag) {
        let _ = fs::remove_file(path);
        return Err(FetchError::Corrupt(format!(
            "{uri}: {} has MD5 {got} but its ETag says {etag}",
            info.key
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(key: &str, etag: Option<&str>, size: u64) -> (String, ObjectInfo) {
        let name = key.rsplit('/').next().unwrap().to_string();
        let info = ObjectInfo {
            key: key.into(),
            size,
            etag: etag.map(str::to_string),
            modified: "2026-12-05T00:00:00+00:00".into(),
        };
        (name, info)
    }

    #[test]
    fn the_version_follows_every_etag_and_size_but_not_the_listing_order() {
        let a = info("m/config.json", Some("aa"), 10);
        let b = info("m/model.safetensors", Some("bb"), 20);
        let base = version(&[a.clone(), b.clone()]);
        assert_eq!(base, version(&[b.clone(), a.clone()]));
        assert_eq!(base.len(), 16);
        let mut changed = b.clone();
        changed.1.etag = Some("cc".into());
        assert_ne!(base, version(&[a.clone(), changed]));
        let mut resized = b.clone();
        resized.1.size = 21;
        assert_ne!(base, version(&[a.clone(), resized]));
        // Without an ETag the modification time stands in.
        let mut no_etag = b.clone();
        no_etag.1.etag = None;
        assert_ne!(base, version(&[a, no_etag]));
    }

    #[test]
    fn a_plain_md5_etag_is_checked_and_a_mismatch_deletes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"hello").unwrap();
        let (_, mut object) = info("m/f", Some("5d41402abc4b2a76b9719d911017c592"), 5);
        check_md5(&path, &object, "s3://b/m").unwrap();
        object.etag = Some("00000000000000000000000000000000".into());
        let err = check_md5(&path, &object, "s3://b/m").unwrap_err();
        assert!(matches!(err, FetchError::Corrupt(_)), "{err}");
        assert!(!path.exists());
        // A multipart ETag cannot be checked this way: not an error.
        fs::write(&path, b"hello").unwrap();
        object.etag = Some("d41d8cd98f00b204e9800998ecf8427e-3".into());
        check_md5(&path, &object, "s3://b/m").unwrap();
    }
}
