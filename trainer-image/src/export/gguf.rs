//! Writing a model as a GGUF v3 file the way llama.cpp's `convert_hf_to_gguf.py` does for the
//! `llama` (and `qwen2`) architecture: the `{arch}.*` hyper-parameter keys, the byte-level BPE
//! tokenizer as `tokenizer.ggml.*` (model `gpt2`, the pre-tokenizer name llama.cpp selects its
//! text split by — see [`llama_cpp_pre_name`] —, tokens, token types, merges, special ids,
//! add-BOS/EOS flags, chat template), and tensors under llama.cpp names (`token_embd`, `blk.N.attn_q`, …, `output_norm`,
//! `output` unless the embeddings are tied) with the Q/K rotary row permutation llama.cpp applies
//! (the inverse of [`crate::load::gguf::unpermute`]), so our loader, gguf-py and transformers read
//! the file back as the same model, and llama.cpp loads it (`tests/reference/test_gguf_llama_cpp.py`).
//!
//! The tokenizer keys follow what llama.cpp's `llama_vocab::impl::load` (`src/llama-vocab.cpp`)
//! reads for a BPE vocabulary: `pre` must be a name it knows (else it refuses the file); merges are
//! `"a b"` split at the first space after the first byte; token types NORMAL (1), CONTROL (3, special
//! added tokens), USER_DEFINED (4, other added tokens), UNUSED (5, padding rows); `add_bos_token` /
//! `add_eos_token` decide what `tokenize(…, add_special)` adds (absent = false for BPE); the
//! end-of-generation set is EOS plus tokens it recognizes by text (`<|im_end|>`, `<|endoftext|>`, …).
//!
//! Tensor types follow llama.cpp's converter: 1-D tensors (norms, biases) stay F32; 2-D tensors
//! are F32, F16 or Q8_0 as asked. Q8_0 needs rows that are a multiple of 32 elements; a tensor
//! whose rows are not falls back to F16, as llama.cpp's converter does.
//!
//! Q8_0 is ggml's reference quantizer (`quantize_row_q8_0_ref`, gguf-py `quants.Q8_0`): per block
//! of 32 consecutive elements of a row, `d = max|x| / 127` (float32), `q = round_half_away(x / d)`
//! as i8, stored as the f16 `d` followed by the 32 bytes. Per-element error is at most `d/2` plus
//! the f16 rounding of `d` (≤ 2⁻¹¹ relative), i.e. ≈ 0.4 % of the block's largest magnitude.
//! The bytes are identical to gguf-py's `quants.quantize(…, Q8_0)` (checked in
//! `tests/reference/test_merge_export.py`).
//!
//! Measured effect on logits against the float32 model (same test; CPU): f32 exports are lossless
//! (max abs logit difference 0, through our loader and transformers'); f16 ≤ 4.7e-3 on a tiny Llama
//! (logits ±4) and 3.9e-2 on SmolLM2-135M with a merged adapter (logits ±36); q8_0 0.12 and 1.36
//! respectively, with top-1 agreement 35/38 (random model, near-ties) and 37/38. The test's
//! tolerances are about 2–4× these numbers.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use half::f16;
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::rope::RopeScaling;
use crate::model::{Architecture, CausalLm};
use crate::text::TextTokenizer;
use crate::text::pre_tokenizer::{self, PreName};

/// Alignment of the data section and of every tensor in it (GGUF's default, `general.alignment`).
pub const ALIGNMENT: u64 = 32;
/// Elements per Q8_0 block.
pub const QK8_0: usize = 32;
/// Bytes per Q8_0 block: an f16 scale and 32 signed bytes.
pub const Q8_0_BLOCK_BYTES: usize = 2 + QK8_0;

/// The tensor type of an export (`--type`): what 2-D weights are stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufType {
    F32,
    F16,
    #[value(name = "q8_0")]
    Q8_0,
}

impl GgufType {
    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_ALL_F32`, `MOSTLY_F16`, `MOSTLY_Q8_0`).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgufType::F32 => "f32",
            GgufType::F16 => "f16",
            GgufType::Q8_0 => "q8_0",
        }
    }
}

/// `spec.output.gguf` of a FinetuneJob (the API offers no f32 export).
impl From<finetune_crds::runtime::GgufType> for GgufType {
    fn from(t: finetune_crds::runtime::GgufType) -> Self {
        match t {
            finetune_crds::runtime::GgufType::F16 => GgufType::F16,
            finetune_crds::runtime::GgufType::Q8_0 => GgufType::Q8_0,
        }
    }
}

/// ggml type ids of the tensor types written here.
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;
const GGML_Q8_0: u32 = 8;

/// Quantizes `x` (a whole number of 32-element blocks) to Q8_0 bytes.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    assert!(
        x.len().is_multiple_of(QK8_0),
        "Q8_0 needs whole 32-element blocks"
    );
    let mut out = Vec::with_capacity(x.len() / QK8_0 * Q8_0_BLOCK_BYTES);
    for block in x.chunks_exact(QK8_0) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        // `f32::round` rounds half away from zero, like C's roundf in ggml.
        out.extend(block.iter().map(|&v| ((v * id).round() as i8) as u8));
    }
    out
}

/// A metadata value as written (the GGUF value type is implied by the variant).
#[derive(Debug, Clone, PartialEq)]
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
}

/// One tensor ready to be written.
struct OutTensor {
    name: String,
    /// ggml order (fastest-varying first).
    dims: Vec<u64>,
    ggml_type: u32,
    data: Vec<u8>,
}

/// What an export wrote, printed by `export-gguf` as JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GgufSummary {
    pub path: String,
    pub r#type: String,
    pub tensors: usize,
    pub metadata_keys: usize,
    pub bytes: u64,
    /// Tensors that were asked to be Q8_0 but stored as F16 (rows not a multiple of 32).
    pub f16_fallback: Vec<String>,
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_meta(buf: &mut Vec<u8>, key: &str, v: &Meta) {
    put_str(buf, key);
    match v {
        Meta::U32(x) => {
            buf.extend_from_slice(&4u32.to_le_bytes());
            buf.extend_from_slice(&x.to_le_bytes());
        }
        Meta::F32(x) => {
            buf.extend_from_slice(&6u32.to_le_bytes());
            buf.extend_from_slice(&x.to_le_bytes());
        }
        Meta::Bool(x) => {
            buf.extend_from_slice(&7u32.to_le_bytes());
            buf.push(u8::from(*x));
        }
        Meta::Str(s) => {
            buf.extend_from_slice(&8u32.to_le_bytes());
            put_str(buf, s);
        }
        Meta::StrArray(a) => {
            buf.extend_from_slice(&9u32.to_le_bytes());
            buf.extend_from_slice(&8u32.to_le_bytes());
            buf.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for s in a {
                put_str(buf, s);
            }
        }
        Meta::I32Array(a) => {
            buf.extend_from_slice(&9u32.to_le_bytes());
            buf.extend_from_slice(&5u32.to_le_bytes());
            buf.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                buf.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// Serializes a GGUF v3 file: header, metadata, tensor directory, aligned data.
fn write_file(path: &Path, metadata: &[(String, Meta)], tensors: &[OutTensor]) -> Result<u64> {
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_meta(&mut head, k, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut head, &t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&t.ggml_type.to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + t.data.len() as u64).div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    head.resize(
        (head.len() as u64).div_ceil(ALIGNMENT) as usize * ALIGNMENT as usize,
        0,
    );
    let tmp = path.with_extension("gguf.partial");
    let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let io = |e| Error::io(&tmp, e);
    w.write_all(&head).map_err(io)?;
    let mut total = head.len() as u64;
    for t in tensors {
        w.write_all(&t.data).map_err(io)?;
        let padded = (t.data.len() as u64).div_ceil(ALIGNMENT) * ALIGNMENT;
        w.write_all(&vec![0u8; (padded - t.data.len() as u64) as usize])
            .map_err(io)?;
        total += padded;
    }
    w.flush().map_err(io)?;
    drop(w);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(total)
}

/// The llama.cpp name of a Hugging Face parameter (the inverse of [`crate::load::gguf::hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{param}"))
}

/// llama.cpp's rotary permutation of Q/K rows (`LlamaModel.permute` in `convert_hf_to_gguf.py`):
/// per head, the two halves `[x0..x(d/2), y0..]` become interleaved pairs. Inverse of
/// [`crate::load::gguf::unpermute`].
pub fn permute(t: &Tensor, n_head: i64) -> Tensor {
    let shape = t.size();
    let dim = shape[0] / n_head / 2;
    let mut grouped = vec![n_head, 2, dim];
    grouped.extend_from_slice(&shape[1..]);
    t.reshape(&grouped).transpose(1, 2).reshape(&shape)
}

/// The tokenizer as `tokenizer.ggml.*` metadata, read from its `tokenizer.json` form: byte-level
/// BPE only (`model.type == "BPE"` with a ByteLevel pre-tokenizer), as llama.cpp's `gpt2` model.
fn tokenizer_metadata(
    tok: &TextTokenizer,
    pre_name: &str,
    vocab_size: i64,
    source: &Path,
) -> Result<Vec<(String, Meta)>> {
    let bad = |m: String| Error::unsupported(source, format!("tokenizer: {m}"));
    let v: Value = serde_json::from_str(&tok.to_json()?)
        .map_err(|e| bad(format!("cannot re-read tokenizer JSON: {e}")))?;
    let model = &v["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(format!(
            "model type {} (only byte-level BPE is exported to GGUF)",
            model["type"]
        )));
    }
    let pre = &v["pre_tokenizer"];
    let pre_text = pre.to_string();
    if !pre_text.contains("\"ByteLevel\"") {
        return Err(bad(
            "pre-tokenizer is not ByteLevel (only byte-level BPE is exported to GGUF)".into(),
        ));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("no model.vocab".into()))?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size as usize];
    let mut types = vec![1i32; vocab_size as usize];
    let mut place = |id: i64, t: &str| -> Result<()> {
        let slot = usize::try_from(id)
            .ok()
            .and_then(|i| tokens.get_mut(i))
            .ok_or_else(|| {
                bad(format!(
                    "token id {id} ({t:?}) is outside the model's vocab_size {vocab_size}"
                ))
            })?;
        *slot = Some(t.to_string());
        Ok(())
    };
    for (t, id) in vocab {
        place(id.as_i64().unwrap_or(-1), t)?;
    }
    for a in v["added_tokens"].as_array().into_iter().flatten() {
        let id = a["id"].as_i64().unwrap_or(-1);
        let content = a["content"].as_str().unwrap_or_default();
        place(id, content)?;
        // llama.cpp: CONTROL (3) for special added tokens, USER_DEFINED (4) for the others.
        types[id as usize] = if a["special"].as_bool() == Some(true) {
            3
        } else {
            4
        };
    }
    // Rows of the embedding no token names (padding to a multiple): llama.cpp's `[PAD{i}]`, UNUSED.
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            Value::Array(p) => p
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        })
        .collect();
    let mut out = vec![
        ("tokenizer.ggml.model".to_string(), Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Meta::Str(pre_name.into())),
        ("tokenizer.ggml.tokens".to_string(), Meta::StrArray(tokens)),
        (
            "tokenizer.ggml.token_type".to_string(),
            Meta::I32Array(types),
        ),
        ("tokenizer.ggml.merges".to_string(), Meta::StrArray(merges)),
    ];
    let id_of = |t: &Option<String>| t.as_deref().and_then(|t| tok.token_to_id(t));
    for (key, t) in [
        ("tokenizer.ggml.bos_token_id", &tok.bos_token),
        ("tokenizer.ggml.eos_token_id", &tok.eos_token),
        ("tokenizer.ggml.unknown_token_id", &tok.unk_token),
        ("tokenizer.ggml.padding_token_id", &tok.pad_token),
    ] {
        if let Some(id) = id_of(t) {
            out.push((key.to_string(), Meta::U32(id as u32)));
        }
    }
    // Whether the post-processor prepends BOS / appends EOS (what `add_special_tokens=True` does):
    // llama.cpp's `tokenize(…, add_special)` reads these two keys (defaults for BPE: false).
    let with_special = tok.encode("a", true).unwrap_or_default();
    let adds = |t: &Option<String>, at: Option<&i64>| {
        t.as_deref()
            .is_some_and(|t| at.copied() == tok.token_to_id(t))
    };
    out.push((
        "tokenizer.ggml.add_bos_token".to_string(),
        Meta::Bool(adds(&tok.bos_token, with_special.first())),
    ));
    out.push((
        "tokenizer.ggml.add_eos_token".to_string(),
        Meta::Bool(adds(&tok.eos_token, with_special.last())),
    ));
    // Byte-level BPE marks spaces itself (`Ġ`): no SentencePiece-style leading space. llama.cpp's
    // BPE default too; written because SmolLM2's converted GGUF states it.
    out.push((
        "tokenizer.ggml.add_space_prefix".to_string(),
        Meta::Bool(false),
    ));
    Ok(out)
}

/// The model's hyper-parameters under `{arch}.*` keys, as `convert_hf_to_gguf.py` writes them.
fn model_metadata(model: &CausalLm, arch: &str, source: &Path) -> Result<Vec<(String, Meta)>> {
    let c = &model.config;
    if c.rope_scaling != RopeScaling::Default {
        return Err(Error::unsupported(
            source,
            format!(
                "rope scaling {:?} is not exported to GGUF yet (only the default rope)",
                c.rope_scaling
            ),
        ));
    }
    if c.o_bias || c.mlp_bias || (c.qkv_bias && c.architecture == Architecture::Llama) {
        return Err(Error::unsupported(
            source,
            "Llama attention/MLP biases have no tensors in llama.cpp's llama architecture",
        ));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let u = |x: i64| Meta::U32(x as u32);
    let mut out = vec![
        (k("context_length"), u(c.max_position_embeddings)),
        (k("embedding_length"), u(c.hidden_size)),
        (k("block_count"), u(c.num_layers)),
        (k("feed_forward_length"), u(c.intermediate_size)),
        (k("attention.head_count"), u(c.num_heads)),
        (k("attention.head_count_kv"), u(c.num_kv_heads)),
        (k("rope.freq_base"), Meta::F32(c.rope_theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Meta::F32(c.rms_norm_eps as f32),
        ),
        (k("vocab_size"), u(c.vocab_size)),
    ];
    if c.architecture == Architecture::Llama {
        // transformers maps it to head_dim for llama; llama.cpp to the rotary width (= head_dim).
        out.push((k("rope.dimension_count"), u(c.head_dim)));
    } else if c.head_dim * c.num_heads != c.hidden_size {
        return Err(Error::unsupported(
            source,
            "qwen2 GGUF has no head_dim key: head_dim must be hidden_size / num_attention_heads",
        ));
    }
    Ok(out)
}

/// Writes `model` (with any LoRA adapters folded in, see [`crate::export::merge::merged_parameters`])
/// as a GGUF v3 file of type `ty`. `tokenizer`, its llama.cpp pre-tokenizer name `pre_name` (see
/// [`llama_cpp_pre_name`]) and `chat_template` (the template's source text) become the
/// `tokenizer.*` metadata; `name` is `general.name`; `source` names the model in errors.
#[allow(clippy::too_many_arguments)]
pub fn write_gguf(
    path: &Path,
    model: &CausalLm,
    tokenizer: &TextTokenizer,
    pre_name: &str,
    chat_template: Option<&str>,
    name: &str,
    ty: GgufType,
    source: &Path,
) -> Result<GgufSummary> {
    let arch = match model.config.architecture {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
    };
    let mut metadata = vec![
        ("general.architecture".to_string(), Meta::Str(arch.into())),
        ("general.type".to_string(), Meta::Str("model".into())),
        ("general.name".to_string(), Meta::Str(name.into())),
    ];
    metadata.extend(model_metadata(model, arch, source)?);
    metadata.push(("general.file_type".into(), Meta::U32(ty.file_type())));
    metadata.extend(tokenizer_metadata(
        tokenizer,
        pre_name,
        model.config.vocab_size,
        source,
    )?);
    if let Some(t) = chat_template {
        metadata.push(("tokenizer.chat_template".into(), Meta::Str(t.into())));
    }
    metadata.push(("general.quantization_version".into(), Meta::U32(2)));

    let c = &model.config;
    let mut tensors = Vec::new();
    let mut f16_fallback = Vec::new();
    for (hf, t) in crate::export::merge::merged_parameters(model) {
        let name = gguf_name(&hf)
            .ok_or_else(|| Error::tensor(source, &hf, "no llama.cpp name for this tensor"))?;
        let t = if c.architecture == Architecture::Llama && hf.contains(".self_attn.q_proj.") {
            permute(&t, c.num_heads)
        } else if c.architecture == Architecture::Llama && hf.contains(".self_attn.k_proj.") {
            permute(&t, c.num_kv_heads)
        } else {
            t
        };
        let shape = t.size();
        let values = Vec::<f32>::try_from(t.contiguous().view([-1]))
            .map_err(|e| Error::tensor(source, &hf, e.to_string()))?;
        let row = *shape.last().unwrap_or(&1) as usize;
        let (ggml_type, data) = match (shape.len(), ty) {
            (1, _) | (_, GgufType::F32) => (GGML_F32, f32_bytes(&values)),
            (_, GgufType::F16) => (GGML_F16, f16_bytes(&values)),
            (_, GgufType::Q8_0) if row.is_multiple_of(QK8_0) => (GGML_Q8_0, quantize_q8_0(&values)),
            (_, GgufType::Q8_0) => {
                f16_fallback.push(name.clone());
                (GGML_F16, f16_bytes(&values))
            }
        };
        tensors.push(OutTensor {
            name,
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ggml_type,
            data,
        });
    }
    let bytes = write_file(path, &metadata, &tensors)?;
    Ok(GgufSummary {
        path: path.display().to_string(),
        r#type: ty.name().into(),
        tensors: tensors.len(),
        metadata_keys: metadata.len(),
        bytes,
        f16_fallback,
    })
}

/// The `tokenizer.ggml.pre` to write for a model read from `src` with tokenizer `tok`: a GGUF
/// source's own value verbatim; otherwise derived as llama.cpp's converter does (the hash of the
/// tokenizer's ids for its probe text, [`pre_tokenizer::derive_llama_cpp_pre`]), so a merged
/// SmolLM2 written as a Hugging Face directory gets `smollm` back. An unknown hash falls back to
/// the name of the split the `tokenizer.json` performs, when it is one llama.cpp names (with a
/// warning); anything else is an error — llama.cpp refuses a file without a name it knows.
pub fn llama_cpp_pre_name(src: &crate::load::ModelSource, tok: &TextTokenizer) -> Result<String> {
    if let crate::load::ModelSource::Gguf(g) = src
        && let Some(pre) = g
            .get("tokenizer.ggml.pre")
            .and_then(crate::load::gguf::MetaValue::as_str)
    {
        return Ok(pre.to_string());
    }
    let tokenizer_file = match src {
        crate::load::ModelSource::HfDir(d) => d.join("tokenizer.json"),
        crate::load::ModelSource::Gguf(g) => g.path.clone(),
    };
    match pre_tokenizer::derive_llama_cpp_pre(tok) {
        Ok(PreName::Hash(name)) => Ok(name.to_string()),
        Ok(PreName::Structure { name, chkhsh }) => {
            eprintln!(
                "warning: {}: llama.cpp's converter does not know this tokenizer (chkhsh {chkhsh}); \
                 its pre-tokenizer splits text as llama.cpp's `{name}` does, so tokenizer.ggml.pre = {name}",
                tokenizer_file.display()
            );
            Ok(name.to_string())
        }
        Err(why) => Err(Error::unsupported(
            &tokenizer_file,
            format!(
                "cannot name the tokenizer's pre-tokenizer for llama.cpp (tokenizer.ggml.pre): {why}. \
                 Export from the base model's GGUF file, or convert with llama.cpp's \
                 convert_hf_to_gguf.py, which knows more tokenizers"
            ),
        )),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| f16::from_f32(x).to_le_bytes())
        .collect()
}

/// `export-gguf`: reads a model (HF directory or GGUF) on the CPU in float32 and writes it as GGUF.
pub fn export_gguf(model_path: &Path, output: &Path, ty: GgufType) -> Result<GgufSummary> {
    let src = crate::load::ModelSource::open(model_path)?;
    let m = src.load(Kind::Float, tch::Device::Cpu)?;
    let template = src.chat_template_source()?;
    let pre_name = llama_cpp_pre_name(&src, &m.tokenizer)?;
    let name = model_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    write_gguf(
        output,
        &m.model,
        &m.tokenizer,
        &pre_name,
        template.as_deref(),
        &name,
        ty,
        model_path,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::gguf::{GgmlType, dequantize, unpermute};

    fn sample(n: usize, seed: u32) -> Vec<f32> {
        // A small deterministic generator: values in (-3, 3) with a few exact zeros and ties.
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                if i % 17 == 0 {
                    0.0
                } else {
                    ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 6.0
                }
            })
            .collect()
    }

    #[test]
    fn q8_0_round_trip_is_within_half_a_step() {
        let x = sample(32 * 64, 7);
        let q = quantize_q8_0(&x);
        assert_eq!(q.len(), 64 * Q8_0_BLOCK_BYTES);
        let y = dequantize(GgmlType::Q8_0, &q);
        assert_eq!(y.len(), x.len());
        for (bx, by) in x.chunks(32).zip(y.chunks(32)) {
            let amax = bx.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            // Half a quantization step, plus the f16 rounding of the scale applied to |q| ≤ 127.
            let tol = d / 2.0 + 127.0 * d * 2f32.powi(-11) + 1e-7;
            for (a, b) in bx.iter().zip(by) {
                assert!((a - b).abs() <= tol, "{a} vs {b} (tol {tol})");
            }
            // The largest magnitude maps to ±127 exactly.
            let i = bx.iter().position(|v| v.abs() == amax).unwrap();
            assert!((by[i] - bx[i]).abs() <= 127.0 * d * 2f32.powi(-11) + 1e-7);
        }
    }

    #[test]
    fn q8_0_matches_ggml_reference_bytes() {
        // One block: d = 127/127 = 1, so q = round(x) with ties away from zero.
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = -127.0;
        x[2] = 2.5;
        x[3] = -2.5;
        x[4] = 0.49;
        let q = quantize_q8_0(&x);
        assert_eq!(&q[0..2], &f16::from_f32(1.0).to_le_bytes());
        assert_eq!(q[2] as i8, 127);
        assert_eq!(q[3] as i8, -127);
        assert_eq!(q[4] as i8, 3);
        assert_eq!(q[5] as i8, -3);
        assert_eq!(q[6] as i8, 0);
        // An all-zero block has scale 0 and decodes to zeros.
        let z = quantize_q8_0(&[0.0; 32]);
        assert!(z.iter().all(|&b| b == 0));
        assert!(dequantize(GgmlType::Q8_0, &z).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn permute_is_inverted_by_the_loader() {
        let t = Tensor::arange(4 * 8 * 3, (Kind::Float, tch::Device::Cpu)).view([32, 3]);
        let p = permute(&t, 4);
        assert!(!p.equal(&t));
        assert!(unpermute(&p, 4).unwrap().equal(&t));
        let b = Tensor::arange(16, (Kind::Float, tch::Device::Cpu));
        assert!(unpermute(&permute(&b, 2), 2).unwrap().equal(&b));
    }

    #[test]
    fn names_round_trip() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.3.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.bias",
            "model.layers.11.mlp.down_proj.weight",
            "model.layers.2.post_attention_layernorm.weight",
        ] {
            let g = gguf_name(hf).unwrap();
            assert_eq!(crate::load::gguf::hf_name(&g).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(gguf_name("model.layers.0.foo.weight"), None);
    }
}
