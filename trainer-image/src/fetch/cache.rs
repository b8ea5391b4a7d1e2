//! The model cache on disk, shared by every job that mounts it:
//!
//! ```text
//! CACHE/hf/models/ORG/NAME/ENTRY/          complete, verified, read-only: the model
//! CACHE/hf/models/ORG/NAME/.ENTRY.partial/ being downloaded (kept across attempts: resume)
//! CACHE/hf/models/ORG/NAME/.ENTRY.lock     held (flock) by the one job downloading ENTRY
//! ```
//!
//! An entry is a commit in one layout (`COMMIT.safetensors`, `COMMIT.gguf`). A commit never
//! changes, so a complete directory is used as is; it appears by one `rename`, so no job sees
//! half of one. Jobs that want the same entry take the lock in turn: the first downloads, the
//! others wait and then find it complete.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use super::FetchError;

/// One repository's place in the cache.
pub struct RepoCache {
    dir: PathBuf,
}

/// The lock on one entry's download, released on drop.
pub struct EntryLock {
    _file: File,
}

impl RepoCache {
    /// The place of Hub repository `repo` (`ORG/NAME`).
    pub fn new(cache_root: &Path, repo: &str) -> Self {
        RepoCache::at(cache_root.join("hf").join("models").join(repo))
    }

    /// The place of the model at `s3://BUCKET/KEY`: `CACHE/s3/BUCKET/KEY/`.
    pub fn for_object(cache_root: &Path, bucket: &str, key: &str) -> Self {
        RepoCache::at(cache_root.join("s3").join(bucket).join(key))
    }

    fn at(dir: PathBuf) -> Self {
        RepoCache { dir }
    }

    /// The complete model of `entry`.
    pub fn complete(&self, entry: &str) -> PathBuf {
        self.dir.join(entry)
    }

    pub fn is_complete(&self, entry: &str) -> bool {
        self.complete(entry).is_dir()
    }

    /// Where `entry` is downloaded before it is complete.
    pub fn partial(&self, entry: &str) -> PathBuf {
        self.dir.join(format!(".{entry}.partial"))
    }

    /// Takes the download lock of `entry`, waiting while another process holds it.
    /// `waiting` is called once if the lock is busy, before blocking.
    pub fn lock(&self, entry: &str, waiting: impl FnOnce()) -> Result<EntryLock, FetchError> {
        fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        let path = self.dir.join(format!(".{entry}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                waiting();
                file.lock().map_err(|e| io(&path, e))?;
            }
            Err(fs::TryLockError::Error(e)) => return Err(io(&path, e)),
        }
        Ok(EntryLock { _file: file })
    }

    /// Publishes a finished download: files made read-only, then one rename.
    pub fn publish(&self, entry: &str) -> Result<PathBuf, FetchError> {
        let partial = self.partial(entry);
        for file in fs::read_dir(&partial).map_err(|e| io(&partial, e))? {
            let path = file.map_err(|e| io(&partial, e))?.path();
            if path.is_file() {
                let mut perms = fs::metadata(&path).map_err(|e| io(&path, e))?.permissions();
                perms.set_readonly(true);
                fs::set_permissions(&path, perms).map_err(|e| io(&path, e))?;
            }
        }
        let complete = self.complete(entry);
        fs::rename(&partial, &complete).map_err(|e| io(&complete, e))?;
        Ok(complete)
    }
}

pub fn io(path: &Path, e: std::io::Error) -> FetchError {
    FetchError::Cache(format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_until_the_first_lets_go() {
        let root = tempfile::tempdir().unwrap();
        let cache = RepoCache::new(root.path(), "org/m");
        let first = cache.lock("c1", || panic!("free lock")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let root_path = root.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let cache = RepoCache::new(&root_path, "org/m");
            let mut waited = false;
            let _lock = cache.lock("c1", || waited = true).unwrap();
            tx.send(waited).unwrap();
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(rx.try_recv().is_err(), "the second lock must wait");
        drop(first);
        assert!(rx.recv().unwrap(), "the waiter saw the lock busy");
        waiter.join().unwrap();
    }

    #[test]
    fn publishing_makes_the_entry_complete_and_read_only() {
        let root = tempfile::tempdir().unwrap();
        let cache = RepoCache::new(root.path(), "org/m");
        fs::create_dir_all(cache.partial("c1")).unwrap();
        fs::write(cache.partial("c1").join("config.json"), "{}").unwrap();
        assert!(!cache.is_complete("c1"));
        let dir = cache.publish("c1").unwrap();
        assert!(cache.is_complete("c1"));
        assert!(
            fs::metadata(dir.join("config.json"))
                .unwrap()
                .permissions()
                .readonly()
        );
        assert!(!cache.partial("c1").exists());
    }
}
