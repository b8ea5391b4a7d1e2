//! Checkpoints: `step-N/` directories written atomically (`step-N.tmp/`, every file fsynced,
//! renamed, parent fsynced) with a `manifest.json` holding each file's sha256 and size. Resuming
//! picks the newest directory whose manifest verifies and skips (with a warning) corrupt, truncated
//! or half-written ones.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use finetune_crds::adapter::FileDigest;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub step: i64,
    pub files: Vec<FileDigest>,
}

/// sha256 (hex) and size of a file.
pub fn digest_file(path: &Path) -> Result<(String, i64)> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0i64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        size += n as i64;
        h.update(&buf[..n]);
    }
    let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, size))
}

/// Digests of the given files of `dir`, named relative to it.
pub fn digest_files(dir: &Path, names: &[String]) -> Result<Vec<FileDigest>> {
    names
        .iter()
        .map(|n| {
            let (sha256, size) = digest_file(&dir.join(n))?;
            Ok(FileDigest {
                name: n.clone(),
                sha256,
                size,
            })
        })
        .collect()
}

fn fsync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

pub fn step_dir(root: &Path, step: i64) -> PathBuf {
    root.join(format!("step-{step}"))
}

/// Writes checkpoint `step` under `root`: `fill` writes the files into the temporary directory and
/// returns their names; then the manifest, fsync and the rename. Returns the final directory.
pub fn write(
    root: &Path,
    step: i64,
    fill: impl FnOnce(&Path) -> Result<Vec<String>>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let tmp = root.join(format!("step-{step}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let names = fill(&tmp)?;
    for n in &names {
        fsync(&tmp.join(n))?;
    }
    let manifest = Manifest {
        step,
        files: digest_files(&tmp, &names)?,
    };
    let mpath = tmp.join(MANIFEST);
    let mut f = File::create(&mpath).map_err(|e| Error::io(&mpath, e))?;
    f.write_all(
        serde_json::to_string_pretty(&manifest)
            .expect("manifest serializes")
            .as_bytes(),
    )
    .and_then(|_| f.sync_all())
    .map_err(|e| Error::io(&mpath, e))?;
    fsync(&tmp)?;
    let dst = step_dir(root, step);
    if dst.exists() {
        std::fs::remove_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
    }
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    fsync(root)?;
    Ok(dst)
}

/// Checks every file of the manifest (size and sha256). The error says which file is wrong.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let mpath = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&mpath).map_err(|e| Error::io(&mpath, e))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| Error::format(&mpath, format!("invalid manifest: {e}")))?;
    for f in &manifest.files {
        let path = dir.join(&f.name);
        let (sha, size) = digest_file(&path)?;
        if size != f.size {
            return Err(Error::format(
                &path,
                format!("truncated or grown: {size} bytes, manifest says {}", f.size),
            ));
        }
        if sha != f.sha256 {
            return Err(Error::format(&path, "sha256 differs from the manifest"));
        }
    }
    Ok(manifest)
}

/// `(step, dir)` of every `step-N` directory, newest first.
pub fn list(root: &Path) -> Vec<(i64, PathBuf)> {
    let mut out: Vec<(i64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.parse::<i64>().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    out
}

/// The newest checkpoint that verifies; every newer one that fails is reported on stderr.
pub fn latest_valid(root: &Path) -> Option<(i64, PathBuf)> {
    for (step, dir) in list(root) {
        match verify(&dir) {
            Ok(m) if m.step == step => return Some((step, dir)),
            Ok(m) => eprintln!(
                "warning: skipping checkpoint {}: manifest is for step {}",
                dir.display(),
                m.step
            ),
            Err(e) => eprintln!(
                "warning: skipping corrupt checkpoint {}: {e}",
                dir.display()
            ),
        }
    }
    None
}

/// Deletes all but the newest `keep` checkpoints (and leftover `.tmp` directories), never `protect`.
pub fn prune(root: &Path, keep: usize, protect: Option<i64>) {
    for (i, (step, dir)) in list(root).into_iter().enumerate() {
        if i >= keep && Some(step) != protect {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().ends_with(".tmp") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
