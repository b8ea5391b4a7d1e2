//! Reads llama.cpp's GGUF files (versions 2 and 3): metadata, tensor directory, and tensors
//! dequantized to the model dtype on load. Tensor names are mapped to Hugging Face names and the
//! Q/K row permutation that llama.cpp's converter applies is undone, mirroring transformers'
//! `modeling_gguf_pytorch_utils.py`, so a GGUF model and its HF original compute the same function.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use finetune_crds::training::BaseQuantization;
use half::f16;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::config::{Architecture, ModelConfig};
use crate::model::ggml::GgmlBlocks;
use crate::model::quantized::QuantizedWeight;
use crate::model::rope::RopeScaling;
use crate::model::weights::WeightMap;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    UInt(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::UInt(v) => Some(v),
            MetaValue::Int(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::UInt(v) => i64::try_from(v).ok(),
            MetaValue::Int(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::Float(v) => Some(v),
            MetaValue::UInt(v) => Some(v as f64),
            MetaValue::Int(v) => Some(v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types this loader can dequantize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// `(elements per block, bytes per block)`.
    pub fn block(self) -> (u64, u64) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
        }
    }
}

/// Names of ggml type ids, for the "unsupported type" message.
fn ggml_type_name(id: u32) -> String {
    const NAMES: [&str; 31] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    NAMES
        .get(id as usize)
        .map_or(format!("type {id}"), |n| n.to_string())
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: fastest-varying dimension first (the reverse of the torch shape).
    pub dims: Vec<u64>,
    pub type_id: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn torch_shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }
    fn numel(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
    }
}

/// A parsed GGUF header; tensor data stay on disk until [`GgufFile::load_weights`].
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    data_offset: u64,
    file_len: u64,
}

/// Reads the header, tracking the position so that every declared length or count can be checked
/// against the bytes that remain: a corrupt length fails at once instead of allocating.
struct Reader<'a> {
    inner: BufReader<File>,
    path: &'a Path,
    file_len: u64,
    pos: u64,
}

/// Elements preallocated for a declared array length; beyond that the vector grows as items parse.
const PREALLOC_ITEMS: usize = 1 << 16;

/// Metadata plus tensor directory. The largest real headers (256k-token vocabularies with merges
/// and scores) are ~15 MB; the cap bounds what a header can make us allocate even when the file
/// is large (or sparse) enough to back any declared length.
pub const MAX_HEADER_BYTES: u64 = 64 << 20;

impl Reader<'_> {
    /// Bytes the header may still use: up to the end of the file or of [`MAX_HEADER_BYTES`].
    fn remaining(&self) -> u64 {
        self.file_len.min(MAX_HEADER_BYTES).saturating_sub(self.pos)
    }
    fn corrupt(&self, what: String) -> Error {
        Error::format(
            self.path,
            format!("corrupt GGUF header at byte {}: {what}", self.pos),
        )
    }
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.inner
            .read_exact(&mut b)
            .map_err(|_| Error::format(self.path, "truncated GGUF header"))?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    /// A count of items of at least `min_item_bytes` each, which must fit in what remains.
    fn count(&mut self, what: &str, min_item_bytes: u64) -> Result<u64> {
        let n = self.u64()?;
        if n.saturating_mul(min_item_bytes) > self.remaining() {
            return Err(self.corrupt(format!(
                "{what} {n} does not fit in the {} header bytes that remain (file size, at most \
                 {MAX_HEADER_BYTES})",
                self.remaining()
            )));
        }
        Ok(n)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.count("string length", 1)?;
        let mut b = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut b)
            .map_err(|_| Error::format(self.path, "truncated GGUF header"))?;
        self.pos += n;
        String::from_utf8(b).map_err(|_| Error::format(self.path, "GGUF string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::UInt(u8::from_le_bytes(self.bytes()?) as u64),
            1 => MetaValue::Int(i8::from_le_bytes(self.bytes()?) as i64),
            2 => MetaValue::UInt(u16::from_le_bytes(self.bytes()?) as u64),
            3 => MetaValue::Int(i16::from_le_bytes(self.bytes()?) as i64),
            4 => MetaValue::UInt(self.u32()? as u64),
            5 => MetaValue::Int(i32::from_le_bytes(self.bytes()?) as i64),
            6 => MetaValue::Float(f32::from_le_bytes(self.bytes()?) as f64),
            7 => MetaValue::Bool(self.bytes::<1>()?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 if depth == 0 => {
                let item = self.u32()?;
                let n = self.count("array length", 1)?;
                let mut v = Vec::with_capacity((n as usize).min(PREALLOC_ITEMS));
                for _ in 0..n {
                    v.push(self.value(item, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::UInt(self.u64()?),
            11 => MetaValue::Int(i64::from_le_bytes(self.bytes()?)),
            12 => MetaValue::Float(f64::from_le_bytes(self.bytes()?)),
            other => {
                return Err(Error::format(
                    self.path,
                    format!("corrupt GGUF header: unknown metadata value type {other}"),
                ));
            }
        })
    }
}

impl GgufFile {
    /// Parses header, metadata and tensor directory.
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut r = Reader {
            inner: BufReader::with_capacity(1 << 20, f),
            path,
            file_len,
            pos: 0,
        };
        let magic: [u8; 4] = r
            .bytes()
            .map_err(|_| Error::format(path, "not a GGUF file (too short)"))?;
        if &magic != b"GGUF" {
            return Err(Error::format(path, "not a GGUF file (bad magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::unsupported(
                path,
                format!("GGUF version {version} (supported: 2, 3)"),
            ));
        }
        // A tensor entry is at least 24 bytes (name length, dims, type, offset); a key-value pair 13.
        let n_tensors = r.count("tensor count", 24)?;
        let n_kv = r.count("metadata count", 13)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity((n_tensors as usize).min(PREALLOC_ITEMS));
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims > 4 {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("corrupt GGUF header: {n_dims} dimensions"),
                ));
            }
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            if dims.iter().any(|&d| d > i64::MAX as u64) {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("corrupt GGUF header: dimensions {dims:?}"),
                ));
            }
            let type_id = r.u32()?;
            let offset = r.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                type_id,
                offset,
            });
        }
        let align = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two() && *a <= 1 << 20)
                .ok_or_else(|| {
                    Error::format(
                        path,
                        format!("general.alignment {v:?} is not a power of two up to 1 MiB"),
                    )
                })?,
        };
        let data_offset = r.pos.div_ceil(align) * align;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_offset,
            file_len,
        })
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn architecture(&self) -> Result<&str> {
        self.get("general.architecture")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| Error::format(&self.path, "no general.architecture in GGUF metadata"))
    }

    /// The model configuration from `{arch}.*` metadata, with the key mapping transformers uses.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch_name = self.architecture()?;
        let architecture = match arch_name {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(Error::unsupported(
                    &self.path,
                    format!("GGUF architecture `{other}` (supported: llama, qwen2)"),
                ));
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let int = |k: &str| self.get(&key(k)).and_then(MetaValue::as_i64);
        let need = |k: &str| {
            int(k).ok_or_else(|| {
                Error::format(&self.path, format!("missing GGUF metadata `{}`", key(k)))
            })
        };
        let hidden_size = need("embedding_length")?;
        let num_heads = need("attention.head_count")?;
        let vocab_size = int("vocab_size")
            .or_else(|| {
                self.get("tokenizer.ggml.tokens")
                    .and_then(MetaValue::as_array)
                    .map(|a| a.len() as i64)
            })
            .ok_or_else(|| {
                Error::format(&self.path, "no vocab_size and no tokenizer.ggml.tokens")
            })?;
        // `rope.dimension_count` is the head size for llama (transformers maps it to head_dim only there).
        let head_dim = match architecture {
            Architecture::Llama => int("rope.dimension_count")
                .unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0)),
            Architecture::Qwen2 => hidden_size.checked_div(num_heads).unwrap_or(0),
        };
        let token_id = |k: &str| self.get(k).and_then(MetaValue::as_i64);
        let cfg = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: need("feed_forward_length")?,
            num_layers: need("block_count")?,
            num_heads,
            num_kv_heads: int("attention.head_count_kv").unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: self
                .get(&key("attention.layer_norm_rms_epsilon"))
                .and_then(MetaValue::as_f64)
                .unwrap_or(1e-6),
            max_position_embeddings: int("context_length").unwrap_or(2048),
            rope_theta: self
                .get(&key("rope.freq_base"))
                .and_then(MetaValue::as_f64)
                .unwrap_or(10000.0),
            rope_scaling: RopeScaling::Default,
            tie_word_embeddings: !self.tensors.iter().any(|t| t.name == "output.weight"),
            qkv_bias: architecture == Architecture::Qwen2,
            o_bias: false,
            mlp_bias: false,
            eos_token_ids: token_id("tokenizer.ggml.eos_token_id")
                .into_iter()
                .collect(),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        };
        cfg.validate(&self.path)?;
        Ok(cfg)
    }

    /// Dequantizes every tensor to `kind` on `device` under its Hugging Face name. With `base`
    /// `gguf`, the decoder layers' block-quantized weights (Q8_0, Q4_0, Q4_1) are kept as the
    /// file's blocks instead ([`GgmlBlocks`]), never expanded; `nf4`/`int8` requantize each as it
    /// is read ([`super::store`]).
    pub fn load_weights(
        &self,
        cfg: &ModelConfig,
        kind: Kind,
        device: Device,
        base: Option<BaseQuantization>,
    ) -> Result<WeightMap> {
        let mut f = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let mut weights = WeightMap::default();
        for info in &self.tensors {
            let Some(hf_name) = hf_name(&info.name) else {
                // e.g. `rope_freqs.weight`: precomputed llama3 factors transformers also ignores.
                continue;
            };
            let ty = GgmlType::from_id(info.type_id).ok_or_else(|| {
                Error::tensor(
                    &self.path,
                    &info.name,
                    format!(
                        "unsupported GGUF tensor type {} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)",
                        ggml_type_name(info.type_id)
                    ),
                )
            })?;
            let numel = info.numel().ok_or_else(|| {
                Error::tensor(
                    &self.path,
                    &info.name,
                    format!("dimensions {:?} overflow", info.dims),
                )
            })?;
            let (block_elems, block_bytes) = ty.block();
            if numel % block_elems != 0 {
                return Err(Error::tensor(
                    &self.path,
                    &info.name,
                    format!(
                        "{numel} elements is not a whole number of {block_elems}-element blocks"
                    ),
                ));
            }
            let nbytes = numel / block_elems * block_bytes;
            let start = self.data_offset.checked_add(info.offset);
            let end = start.and_then(|s| s.checked_add(nbytes));
            let (Some(start), Some(end)) = (start, end) else {
                return Err(Error::tensor(
                    &self.path,
                    &info.name,
                    format!("offset {} overflows", info.offset),
                ));
            };
            if end > self.file_len {
                return Err(Error::tensor(
                    &self.path,
                    &info.name,
                    format!(
                        "data ends at byte {end} but the file has {} bytes (truncated?)",
                        self.file_len
                    ),
                ));
            }
            let mut raw = vec![0u8; nbytes as usize];
            f.seek(SeekFrom::Start(start))
                .map_err(|e| Error::io(&self.path, e))?;
            f.read_exact(&mut raw)
                .map_err(|e| Error::io(&self.path, e))?;
            let shape = info.torch_shape();
            let heads = match cfg.architecture {
                Architecture::Llama if info.name.contains(".attn_q.") => Some(cfg.num_heads),
                Architecture::Llama if info.name.contains(".attn_k.") => Some(cfg.num_kv_heads),
                _ => None,
            };
            let keep = base == Some(BaseQuantization::Gguf)
                && super::is_decoder_linear_weight(&hf_name)
                && shape.len() == 2;
            if let Some(blocks) = keep
                .then(|| GgmlBlocks::from_raw(ty, &raw, shape[0], shape[1]))
                .flatten()
            {
                let blocks = match heads {
                    Some(n_head) => blocks
                        .try_map_rows(|t| unpermute(t, n_head))
                        .map_err(|m| Error::tensor(&self.path, &info.name, m))?,
                    None => blocks,
                };
                let q = QuantizedWeight::Ggml(blocks.to_device(device));
                weights.insert_quantized(hf_name, q, &self.path);
                continue;
            }
            let t = match ty {
                GgmlType::F32 => Tensor::f_from_data_size(&raw, &shape, Kind::Float),
                GgmlType::F16 => Tensor::f_from_data_size(&raw, &shape, Kind::Half),
                GgmlType::BF16 => Tensor::f_from_data_size(&raw, &shape, Kind::BFloat16),
                GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
                    Tensor::from_slice(&dequantize(ty, &raw)).f_reshape(&shape)
                }
            }
            .map_err(|e| Error::tensor(&self.path, &info.name, e.to_string()))?;
            let t = t.to_kind(Kind::Float);
            let t = match heads {
                Some(n_head) => {
                    unpermute(&t, n_head).map_err(|m| Error::tensor(&self.path, &info.name, m))?
                }
                None => t,
            };
            let t = t.to_kind(kind).to_device(device);
            super::store(&mut weights, hf_name, t, &self.path, base);
        }
        Ok(weights)
    }
}

/// Undoes llama.cpp's rotary permutation of Q/K rows (`_reverse_permute_weights` in transformers):
/// rows are stored per head as interleaved pairs; HF expects the two halves one after the other.
/// Fails when the rows are not a whole number of head pairs.
pub fn unpermute(t: &Tensor, n_head: i64) -> std::result::Result<Tensor, String> {
    let shape = t.size();
    let rows = shape.first().copied().unwrap_or(0);
    if n_head <= 0 || rows % (2 * n_head) != 0 {
        return Err(format!(
            "shape {shape:?}: rows are not a whole number of pairs for {n_head} heads"
        ));
    }
    let mut grouped = vec![n_head, rows / n_head / 2, 2];
    grouped.extend_from_slice(&shape[1..]);
    Ok(t.reshape(&grouped).transpose(1, 2).reshape(&shape))
}

/// The Hugging Face parameter name of a GGUF tensor, `None` for tensors the model does not use.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{param}"))
}

/// Dequantizes ggml blocks to float32 (`raw` holds whole blocks; checked by the caller).
pub fn dequantize(ty: GgmlType, raw: &[u8]) -> Vec<f32> {
    let (_, block_bytes) = ty.block();
    let mut out = Vec::with_capacity(raw.len() / block_bytes as usize * 32);
    let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    for block in raw.chunks_exact(block_bytes as usize) {
        match ty {
            // f16 scale, then 32 signed bytes: x = q·d.
            GgmlType::Q8_0 => {
                let d = half(&block[0..2]);
                out.extend(block[2..34].iter().map(|&q| (q as i8) as f32 * d));
            }
            // f16 scale, 16 bytes of nibbles: low nibbles are elements 0..16, high 16..32; x = (q−8)·d.
            GgmlType::Q4_0 => {
                let d = half(&block[0..2]);
                let qs = &block[2..18];
                out.extend(qs.iter().map(|&q| ((q & 0x0f) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
            // f16 scale d and minimum m, 16 bytes of nibbles: x = q·d + m.
            GgmlType::Q4_1 => {
                let d = half(&block[0..2]);
                let m = half(&block[2..4]);
                let qs = &block[4..20];
                out.extend(qs.iter().map(|&q| (q & 0x0f) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("not block-quantized"),
        }
    }
    out
}
