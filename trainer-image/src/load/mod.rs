//! Turning a `--model` path into a model, tokenizer and chat template. A path is either a `.gguf`
//! file or a Hugging Face model directory (`config.json` + safetensors + `tokenizer.json`).

pub mod gguf;
pub mod safetensors;

use std::path::{Path, PathBuf};

use finetune_crds::training::BaseQuantization;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::limits::{MAX_SIDE_FILE, read_text};
use crate::model::quantized::QuantizedWeight;
use crate::model::weights::WeightMap;
use crate::model::{CausalLm, ModelConfig};
use crate::text::tokenizer::read_tokenizer_config;
use crate::text::{ChatTemplate, TextTokenizer};

/// Where a model comes from; opening one reads only headers and metadata, not weights.
#[derive(Debug)]
pub enum ModelSource {
    Gguf(Box<gguf::GgufFile>),
    HfDir(PathBuf),
}

/// Everything `generate` and `eval` need.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: CausalLm,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Ids that end generation: config/generation-config EOS plus the tokenizer's EOS token.
    pub eos_ids: Vec<i64>,
}

impl ModelSource {
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let config = path.join("config.json");
            if !config.exists() {
                return Err(Error::io(
                    &config,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "config.json not found in the model directory",
                    ),
                ));
            }
            return Ok(ModelSource::HfDir(path.to_path_buf()));
        }
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        if path.extension().is_some_and(|e| e == "gguf") {
            return Ok(ModelSource::Gguf(Box::new(gguf::GgufFile::open(path)?)));
        }
        Err(Error::format(
            path,
            "expected a .gguf file or a Hugging Face model directory",
        ))
    }

    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Gguf(g) => &g.path,
            ModelSource::HfDir(d) => d,
        }
    }

    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            ModelSource::Gguf(g) => g.config(),
            ModelSource::HfDir(d) => ModelConfig::from_hf_json(&d.join("config.json")),
        }
    }

    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        match self {
            ModelSource::Gguf(g) => TextTokenizer::from_gguf(g),
            ModelSource::HfDir(d) => TextTokenizer::from_hf_dir(d),
        }
    }

    /// The model's chat template, if it ships one: GGUF `tokenizer.chat_template`, or a directory's
    /// `chat_template.jinja` / `tokenizer_config.json` `chat_template` (string, or the list form,
    /// where the entry named `default` is used).
    pub fn chat_template(&self, tok: &TextTokenizer) -> Result<Option<ChatTemplate>> {
        self.chat_template_source()?
            .map(|s| {
                ChatTemplate::new(
                    &s,
                    tok.bos_token.clone(),
                    tok.eos_token.clone(),
                    tok.unk_token.clone(),
                    tok.pad_token.clone(),
                )
            })
            .transpose()
    }

    /// The chat template's source text, found as [`chat_template`](Self::chat_template) describes.
    pub fn chat_template_source(&self) -> Result<Option<String>> {
        Ok(match self {
            ModelSource::Gguf(g) => g
                .get("tokenizer.chat_template")
                .and_then(gguf::MetaValue::as_str)
                .map(str::to_string),
            ModelSource::HfDir(d) => {
                let jinja = d.join("chat_template.jinja");
                if jinja.exists() {
                    Some(read_text(&jinja, MAX_SIDE_FILE, "chat_template.jinja")?)
                } else {
                    match read_tokenizer_config(d)?.and_then(|c| c.get("chat_template").cloned()) {
                        Some(Value::String(s)) => Some(s),
                        Some(Value::Array(list)) => list
                            .iter()
                            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                            .and_then(|t| t.get("template").and_then(Value::as_str))
                            .map(str::to_string),
                        _ => None,
                    }
                }
            }
        })
    }

    /// Reads and converts all weights: the full model, tokenizer and template.
    pub fn load(&self, kind: Kind, device: Device) -> Result<LoadedModel> {
        self.load_with(kind, device, None)
    }

    /// [`load`](Self::load) for a QLoRA run: the decoder's linear weights are stored as `base`
    /// asks while they are read ([`store`]), so the full-precision model never exists whole.
    pub fn load_with(
        &self,
        kind: Kind,
        device: Device,
        base: Option<BaseQuantization>,
    ) -> Result<LoadedModel> {
        let config = self.config()?;
        let tokenizer = self.tokenizer()?;
        let chat_template = self.chat_template(&tokenizer)?;
        let weights = match self {
            ModelSource::Gguf(g) => g.load_weights(&config, kind, device, base)?,
            ModelSource::HfDir(d) => safetensors::load_dir(d, kind, device, base)?,
        };
        let mut eos_ids = config.eos_token_ids.clone();
        if let ModelSource::HfDir(d) = self {
            let gen_config = d.join("generation_config.json");
            if gen_config.exists() {
                let text = read_text(&gen_config, MAX_SIDE_FILE, "generation_config.json")?;
                let v: Value = serde_json::from_str(&text)
                    .map_err(|e| Error::format(&gen_config, format!("invalid JSON: {e}")))?;
                match v.get("eos_token_id") {
                    Some(Value::Number(n)) => eos_ids.extend(n.as_i64()),
                    Some(Value::Array(a)) => eos_ids.extend(a.iter().filter_map(Value::as_i64)),
                    _ => {}
                }
            }
        }
        if let Some(id) = tokenizer
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
        {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let model = CausalLm::from_weights(config, weights, self.path(), kind, device)?;
        Ok(LoadedModel {
            model,
            tokenizer,
            chat_template,
            eos_ids,
        })
    }
}

/// Whether `name` is the weight of a decoder layer's linear projection: the weights a QLoRA run
/// holds quantized.
pub fn is_decoder_linear_weight(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

/// Puts a tensor a loader has just read (already in the compute dtype, on the device) into
/// `weights`: a decoder linear weight of a QLoRA run is quantized at once (NF4 or int8) and its
/// full-precision copy dropped, so a large base is held quantized layer by layer as it loads.
/// `gguf` quantizes nothing here: the GGUF loader keeps the file's blocks itself.
pub fn store(
    weights: &mut WeightMap,
    name: String,
    t: Tensor,
    file: &Path,
    base: Option<BaseQuantization>,
) {
    let quantized = base
        .filter(|_| is_decoder_linear_weight(&name) && t.dim() == 2)
        .and_then(|how| QuantizedWeight::quantize(how, &t));
    match quantized {
        Some(q) => weights.insert_quantized(name, q, file),
        None => weights.insert(name, t, file),
    }
}

/// Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX-BF16, from the kernel's
/// `/proc/cpuinfo` flags): there libtorch's bf16 matrix products run about twice as fast as
/// float32 ones; elsewhere they are emulated and slower. Read once.
pub fn cpu_has_native_bf16() -> bool {
    static NATIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NATIVE.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo")
            .map(|info| cpuinfo_has_native_bf16(&info))
            .unwrap_or(false)
    })
}

fn cpuinfo_has_native_bf16(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .take(1)
        .flat_map(|l| l.split_whitespace())
        .any(|flag| flag == "avx512_bf16" || flag == "amx_bf16")
}

/// `auto` = CUDA in bfloat16 when available, else CPU in float32.
pub fn pick_device(name: &str) -> Result<(Device, Kind)> {
    match name {
        "auto" if tch::Cuda::is_available() => Ok((Device::Cuda(0), Kind::BFloat16)),
        "auto" | "cpu" => Ok((Device::Cpu, Kind::Float)),
        "cuda" if tch::Cuda::is_available() => Ok((Device::Cuda(0), Kind::BFloat16)),
        "cuda" => Err(Error::Usage(
            "--device cuda: no CUDA device is available".into(),
        )),
        other => Err(Error::Usage(format!(
            "--device {other}: expected auto, cpu or cuda"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::cpuinfo_has_native_bf16;

    #[test]
    fn native_bf16_is_read_from_the_first_flags_line() {
        let epyc = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n";
        let sapphire_rapids = "flags\t: avx2 avx512f amx_bf16 amx_tile\n";
        let avx2_only = "flags\t: fpu avx2 fma\nbugs\t: avx512_bf16_typo\n";
        assert!(cpuinfo_has_native_bf16(epyc));
        assert!(cpuinfo_has_native_bf16(sapphire_rapids));
        assert!(!cpuinfo_has_native_bf16(avx2_only));
        assert!(!cpuinfo_has_native_bf16(""));
    }
}
