//! Checkpoints: `step-N/` directories written atomically (`step-N.tmp/`, every file fsynced,
//! renamed, parent fsynced) with a `manifest.json` holding each file's sha256 and size. Resuming
//! picks the newest directory whose manifest verifies and skips (with a warning) corrupt, truncated
//! or half-written ones.
//!
//! [`Saver::save`] and [`resume`] are the training run's pair on top of that: what a step's
//! checkpoint holds (the trainable weights, the optimizer state, the [`Snapshots`] and
//! `trainer_state.json`) and how a later attempt takes it back.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use finetune_crds::adapter::FileDigest;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Tensor};

use crate::data::{Batcher, Cursor};
use crate::error::{Error, Result};
use crate::export::{self, PEFT_PREFIX};
use crate::model::{CausalLm, LoraConfig};
use crate::train::optim::AdamW;
use crate::train::state::TrainState;
use crate::train::stop::{Stop, invalid};

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

/// The weights a retention breach with `action: stop` falls back to, inside a checkpoint.
const LAST_GOOD_FILE: &str = "last_good.safetensors";
const BEST_FILE: &str = "best.safetensors";
const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";

/// Named trainable tensors on the CPU (as [`trainable_tensors`] returns them).
pub type Weights = Vec<(String, Tensor)>;

/// Copies of the weights that a run may end with instead of its last step's.
#[derive(Default)]
pub struct Snapshots {
    /// The best evaluated step's (early stopping only).
    pub best: Option<Weights>,
    /// The newest step that passed the retention floor (`action: stop` only).
    pub last_good: Option<Weights>,
}

/// Where and how a run writes its checkpoints.
pub struct Saver<'a> {
    pub root: &'a Path,
    /// Checkpoints kept (at least 1).
    pub keep_last: usize,
    /// LoRA runs save the adapter in PEFT's layout; full runs the whole model.
    pub lora: Option<&'a LoraConfig>,
    /// The base the adapter's config names.
    pub base_model: &'a export::BaseModelRef,
}

impl Saver<'_> {
    /// Writes checkpoint `st.step` (with the batcher at `cursor`, and `optimizer`, the whole
    /// optimizer state as [`AdamW::state_tensors`] names it) and prunes old ones; returns its
    /// directory and the seconds it took.
    pub fn save(
        &self,
        st: &TrainState,
        model: &CausalLm,
        optimizer: Vec<(String, Tensor)>,
        snapshots: &Snapshots,
        cursor: Cursor,
    ) -> std::result::Result<(PathBuf, f64), Stop> {
        let t = Instant::now();
        let mut state = st.clone();
        state.cursor = cursor;
        let dir = write(self.root, st.step, |tmp| {
            let mut names = Vec::new();
            if let Some(c) = self.lora {
                names.extend(export::write_peft_adapter(tmp, model, c, self.base_model)?);
            } else {
                export::write_safetensors(&tmp.join(MODEL_FILE), &trainable_tensors(model, false))?;
                names.push(MODEL_FILE.into());
            }
            let ostate: Vec<(String, Tensor)> = optimizer
                .into_iter()
                .map(|(n, t)| (n, t.to_device(Device::Cpu).contiguous()))
                .collect();
            export::write_safetensors(&tmp.join(OPTIMIZER_FILE), &ostate)?;
            names.push(OPTIMIZER_FILE.into());
            if let Some(b) = &snapshots.best {
                export::write_safetensors(&tmp.join(BEST_FILE), b)?;
                names.push(BEST_FILE.into());
            }
            if let Some(g) = &snapshots.last_good {
                export::write_safetensors(&tmp.join(LAST_GOOD_FILE), g)?;
                names.push(LAST_GOOD_FILE.into());
            }
            export::write_json(
                &tmp.join(STATE_FILE),
                &serde_json::to_value(&state).expect("state serializes"),
            )?;
            names.push(STATE_FILE.into());
            Ok(names)
        })?;
        prune(self.root, self.keep_last, None);
        Ok((dir, t.elapsed().as_secs_f64()))
    }
}

/// A run taken back from its newest valid checkpoint.
pub struct Resumed {
    pub step: i64,
    pub dir: PathBuf,
    pub state: TrainState,
    pub snapshots: Snapshots,
}

/// Loads the newest valid checkpoint under `root` into `model`, `opt` and `batcher`, if there is
/// one; refuses a checkpoint written under another `config_digest`.
pub fn resume(
    root: &Path,
    config_digest: &str,
    model: &CausalLm,
    lora: bool,
    opt: &mut AdamW,
    batcher: &mut Batcher,
) -> std::result::Result<Option<Resumed>, Stop> {
    let Some((step, dir)) = latest_valid(root) else {
        return Ok(None);
    };
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .map_err(|e| Stop::Error(format!("{}: {e}", state_path.display())))?;
    let mut saved: TrainState = serde_json::from_str(&text)
        .map_err(|e| Stop::Error(format!("{}: {e}", state_path.display())))?;
    if saved.config_digest != config_digest {
        return Err(invalid(
            format!(
                "checkpoint {} belongs to a different configuration or data set; use a new checkpoint directory",
                dir.display()
            ),
            "spec",
        ));
    }
    saved.recover_stop_kind();
    let wfile = dir.join(if lora {
        export::ADAPTER_WEIGHTS
    } else {
        MODEL_FILE
    });
    load_trainable(model, lora, read_tensors(&wfile)?, &wfile)?;
    let ofile = dir.join(OPTIMIZER_FILE);
    opt.load_state(read_tensors(&ofile)?, saved.step)
        .map_err(|e| Stop::Error(format!("{}: {e}", ofile.display())))?;
    let mut snapshots = Snapshots::default();
    let bfile = dir.join(BEST_FILE);
    if bfile.exists() {
        snapshots.best = Some(read_tensors(&bfile)?.into_iter().collect());
    }
    let gfile = dir.join(LAST_GOOD_FILE);
    if gfile.exists() {
        snapshots.last_good = Some(read_tensors(&gfile)?.into_iter().collect());
    }
    batcher.restore(saved.cursor);
    Ok(Some(Resumed {
        step,
        dir,
        state: saved,
        snapshots,
    }))
}

/// The trainable tensors as they are saved (PEFT names for LoRA, HF names for full), on the CPU.
///
/// Always copies: on the CPU, `to_device`/`contiguous` return the parameter's own storage, which
/// the optimizer keeps updating in place — a snapshot (best or last good weights) must not move.
pub fn trainable_tensors(model: &CausalLm, lora: bool) -> Weights {
    let live = if lora {
        export::peft_tensors(model)
    } else {
        model
            .named_parameters()
            .into_iter()
            .map(|(n, t)| (n, t.detach().to_device(Device::Cpu)))
            .collect()
    };
    live.into_iter().map(|(n, t)| (n, t.copy())).collect()
}

/// Copies saved tensors (as from [`trainable_tensors`]) into the model's parameters.
pub fn load_trainable(
    model: &CausalLm,
    lora: bool,
    mut saved: BTreeMap<String, Tensor>,
    file: &Path,
) -> std::result::Result<(), Stop> {
    let params: Vec<(String, Tensor)> = if lora {
        model
            .lora_parameters()
            .into_iter()
            .map(|(n, t)| (format!("{PEFT_PREFIX}{n}"), t))
            .collect()
    } else {
        model
            .named_parameters()
            .into_iter()
            .map(|(n, t)| (n, t.shallow_clone()))
            .collect()
    };
    for (name, mut p) in params {
        let src = saved
            .remove(&name)
            .ok_or_else(|| Stop::Error(format!("{}: missing tensor `{name}`", file.display())))?;
        if src.size() != p.size() {
            return Err(Stop::Error(format!(
                "{}: tensor `{name}` has the wrong shape",
                file.display()
            )));
        }
        tch::no_grad(|| p.copy_(&src));
    }
    Ok(())
}

fn read_tensors(path: &Path) -> std::result::Result<BTreeMap<String, Tensor>, Stop> {
    Tensor::read_safetensors(path)
        .map(|v| v.into_iter().collect())
        .map_err(|e| Stop::Error(format!("{}: {e}", path.display())))
}
