//! The model cache on disk, shared by every job that mounts it:
//!
//! ```text
//! CACHE/hf/models/ORG/NAME/COMMIT/          complete, verified, read-only: the model
//! CACHE/hf/models/ORG/NAME/.COMMIT.partial/ being downloaded (kept across attempts: resume)
//! CACHE/hf/models/ORG/NAME/.COMMIT.lock     held (flock) by the one job downloading COMMIT
//! ```
//!
//! A commit never changes, so a complete directory is used as is; it appears by one `rename`,
//! so no job sees half of one. Jobs that want the same commit take the lock in turn: the first
//! downloads, the others wait and then find it complete.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use super::FetchError;

/// One repository's place in the cache.
pub struct RepoCache {
    dir: PathBuf,
}

/// The lock on one commit's download, released on drop.
pub struct CommitLock {
    _file: File,
}

impl RepoCache {
    pub fn new(cache_root: &Path, repo: &str) -> Self {
        RepoCache {
            dir: cache_root.join("hf").join("models").join(repo),
        }
    }

    /// The complete model of `commit`.
    pub fn complete(&self, commit: &str) -> PathBuf {
        self.dir.join(commit)
    }

    pub fn is_complete(&self, commit: &str) -> bool {
        self.complete(commit).is_dir()
    }

    /// Where `commit` is downloaded before it is complete.
    pub fn partial(&self, commit: &str) -> PathBuf {
        self.dir.join(format!(".{commit}.partial"))
    }

    /// Takes the download lock of `commit`, waiting while another process holds it.
    /// `waiting` is called once if the lock is busy, before blocking.
    pub fn lock(&self, commit: &str, waiting: impl FnOnce()) -> Result<CommitLock, FetchError> {
        fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        let path = self.dir.join(format!(".{commit}.lock"));
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
        Ok(CommitLock { _file: file })
    }

    /// Publishes a finished download: files made read-only, then one rename.
    pub fn publish(&self, commit: &str) -> Result<PathBuf, FetchError> {
        let partial = self.partial(commit);
        for entry in fs::read_dir(&partial).map_err(|e| io(&partial, e))? {
            let path = entry.map_err(|e| io(&partial, e))?.path();
            if path.is_file() {
                let mut perms = fs::metadata(&path).map_err(|e| io(&path, e))?.permissions();
                perms.set_readonly(true);
                fs::set_permissions(&path, perms).map_err(|e| io(&path, e))?;
            }
        }
        let complete = self.complete(commit);
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
    fn publishing_makes_the_commit_complete_and_read_only() {
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
