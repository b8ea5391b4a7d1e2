//! Reads Hugging Face safetensors checkpoints (single file or sharded through
//! `model.safetensors.index.json`). The header is parsed here rather than by a library so that every
//! corruption names the file and the tensor; data is read tensor by tensor with plain file I/O
//! (no memory map, hence no `unsafe`), so peak memory is the model plus one tensor.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use finetune_crds::training::BaseQuantization;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::limits::{MAX_SIDE_FILE, read_text};
use crate::model::weights::WeightMap;

/// Largest header accepted; real headers are kilobytes to a few megabytes.
const MAX_HEADER: u64 = 100 * 1024 * 1024;

/// One entry of a safetensors header.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub kind: Kind,
    pub shape: Vec<i64>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

fn dtype_kind(dtype: &str) -> Option<(Kind, u64)> {
    Some(match dtype {
        "F32" => (Kind::Float, 4),
        "F16" => (Kind::Half, 2),
        "BF16" => (Kind::BFloat16, 2),
        "F64" => (Kind::Double, 8),
        "I64" => (Kind::Int64, 8),
        "I32" => (Kind::Int, 4),
        "I8" => (Kind::Int8, 1),
        "U8" => (Kind::Uint8, 1),
        "BOOL" => (Kind::Bool, 1),
        _ => return None,
    })
}

/// Parses and validates the header of `path`: every offset must lie inside the file and match its
/// dtype and shape.
pub fn read_header(path: &Path) -> Result<Vec<TensorEntry>> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    f.read_exact(&mut len_bytes).map_err(|_| {
        Error::format(
            path,
            "not a safetensors file: shorter than its 8-byte header length",
        )
    })?;
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER || n + 8 > file_len {
        return Err(Error::format(
            path,
            format!(
                "corrupt safetensors header: declared header length {n} but the file has {file_len} bytes"
            ),
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_slice(&header).map_err(|e| {
        Error::format(
            path,
            format!("corrupt safetensors header: invalid JSON: {e}"),
        )
    })?;
    let obj = v
        .as_object()
        .ok_or_else(|| Error::format(path, "corrupt safetensors header: not a JSON object"))?;
    let data_start = 8 + n;
    let mut out = Vec::with_capacity(obj.len());
    for (name, entry) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |m: &str| Error::tensor(path, name, format!("corrupt safetensors header: {m}"));
        let dtype = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no dtype"))?;
        let (kind, elem) = dtype_kind(dtype)
            .ok_or_else(|| Error::tensor(path, name, format!("unsupported dtype {dtype}")))?;
        let shape: Vec<i64> = entry
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| i64::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape is not a list of non-negative integers"))?;
        let offsets = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| bad("data_offsets is not [start, end]"))?;
        let numel = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let expected = numel.and_then(|n| n.checked_mul(elem));
        if offsets.1 < offsets.0 || Some(offsets.1 - offsets.0) != expected {
            return Err(bad(&format!(
                "data_offsets {offsets:?} do not hold a {dtype} tensor of shape {shape:?}"
            )));
        }
        if offsets.1 > file_len - data_start {
            return Err(bad(&format!(
                "data ends at byte {} but the file has {file_len} bytes (truncated?)",
                data_start.saturating_add(offsets.1)
            )));
        }
        out.push(TensorEntry {
            name: name.clone(),
            kind,
            shape,
            start: data_start + offsets.0,
            end: data_start + offsets.1,
        });
    }
    check_tiling(path, &mut out, data_start, file_len)?;
    Ok(out)
}

/// The tensors must tile the data section exactly, as the safetensors format requires: no two
/// share bytes (one tensor's data read as another's) and no byte is left unowned (a header that
/// describes less than the file, e.g. one spliced from another checkpoint).
fn check_tiling(
    path: &Path,
    entries: &mut [TensorEntry],
    data_start: u64,
    file_len: u64,
) -> Result<()> {
    entries.sort_by_key(|e| (e.start, e.end));
    let mut expected = data_start;
    for e in entries.iter() {
        if e.start != expected {
            let what = if e.start < expected {
                "overlaps the tensor before it"
            } else {
                "leaves a gap before it"
            };
            return Err(Error::tensor(
                path,
                &e.name,
                format!("corrupt safetensors header: its data_offsets {what}"),
            ));
        }
        expected = e.end;
    }
    if expected != file_len {
        return Err(Error::format(
            path,
            format!(
                "corrupt safetensors file: {} bytes after the last tensor's data",
                file_len - expected
            ),
        ));
    }
    Ok(())
}

/// Reads every tensor of one file into `weights`, converted to `kind` on `device`; a QLoRA
/// run's decoder linear weights quantized as `base` asks, one at a time ([`super::store`]).
pub fn load_file(
    path: &Path,
    weights: &mut WeightMap,
    kind: Kind,
    device: Device,
    base: Option<BaseQuantization>,
) -> Result<()> {
    let entries = read_header(path)?;
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    for e in entries {
        let mut buf = vec![0u8; (e.end - e.start) as usize];
        f.seek(SeekFrom::Start(e.start))
            .map_err(|err| Error::io(path, err))?;
        f.read_exact(&mut buf).map_err(|err| Error::io(path, err))?;
        let t = Tensor::f_from_data_size(&buf, &e.shape, e.kind)
            .map_err(|err| Error::tensor(path, &e.name, err.to_string()))?;
        let t = if matches!(
            e.kind,
            Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
        ) {
            t.to_kind(kind)
        } else {
            t
        };
        super::store(weights, e.name, t.to_device(device), path, base);
    }
    Ok(())
}

/// The weight files of a Hugging Face model directory: the shards listed by
/// `model.safetensors.index.json` if present, else `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = read_text(&index, MAX_SIDE_FILE, "the shard index")?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&index, format!("invalid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::format(&index, "no `weight_map` object"))?;
        let files: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        return files
            .into_iter()
            .map(|f| shard_path(dir, &index, f))
            .collect();
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::format(
        dir,
        "no model.safetensors or model.safetensors.index.json in the model directory",
    ))
}

/// A shard named by the index: a plain file name inside the model directory, never a path that
/// leaves it (`../`, absolute) or reaches into a subdirectory.
fn shard_path(dir: &Path, index: &Path, name: &str) -> Result<PathBuf> {
    let mut parts = Path::new(name).components();
    match (parts.next(), parts.next()) {
        (Some(std::path::Component::Normal(file)), None) => Ok(dir.join(file)),
        _ => Err(Error::format(
            index,
            format!(
                "weight_map names `{name}`: shards must be plain file names in the model directory"
            ),
        )),
    }
}

/// Loads every tensor of a Hugging Face model directory, shard by shard.
pub fn load_dir(
    dir: &Path,
    kind: Kind,
    device: Device,
    base: Option<BaseQuantization>,
) -> Result<WeightMap> {
    let mut weights = WeightMap::default();
    for file in weight_files(dir)? {
        load_file(&file, &mut weights, kind, device, base)?;
    }
    Ok(weights)
}
