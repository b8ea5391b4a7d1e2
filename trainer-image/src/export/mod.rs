//! Writing results: a LoRA adapter in PEFT's layout (`adapter_config.json` +
//! `adapter_model.safetensors` with `base_model.model.…lora_A.weight` names, loadable with
//! `PeftModel.from_pretrained`), reading one back onto a [`CausalLm`], a full (or merged: LoRA
//! folded in, [`merge`]) model in Hugging Face layout, and GGUF files ([`gguf`]).

pub mod gguf;
pub mod merge;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::load::gguf::GgufFile;
use crate::model::rope::RopeScaling;
use crate::model::{Architecture, CausalLm, LoraConfig};
use crate::text::TextTokenizer;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const PEFT_PREFIX: &str = "base_model.model.";
/// How the names of PEFT's trainable token rows end.
pub const TOKENS_DELTA_SUFFIX: &str = ".token_adapter.trainable_tokens_delta";

/// Next to a LoRA adapter trained with a rope the base checkpoint does not have (long-context
/// fine-tuning): the `config.json` keys to override on the base, as a JSON object. PEFT ignores
/// the file; `AutoModelForCausalLM.from_pretrained(base, **overrides)` applies it, and so does
/// [`apply_peft_adapter`] (`merge`, `logits`, `generate` with `--adapter`).
pub const CONFIG_OVERRIDES: &str = "config_overrides.json";

/// The base model an adapter names in `adapter_config.json` (PEFT's `base_model_name_or_path`
/// and `revision`): a Hub repository and the commit it was trained on, so that
/// `AutoPeftModelForCausalLM` finds that very base, or the job's URI for other bases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseModelRef {
    pub name: String,
    pub revision: Option<String>,
}

impl BaseModelRef {
    /// A base known by name only (a URI or a path).
    pub fn named(name: impl Into<String>) -> Self {
        BaseModelRef {
            name: name.into(),
            revision: None,
        }
    }
}

/// `adapter_config.json` for `cfg`, as PEFT 0.21 writes it for a CAUSAL_LM LoRA.
pub fn adapter_config_json(cfg: &LoraConfig, base: &BaseModelRef) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.name,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "use_rslora": cfg.rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
        "revision": base.revision,
    })
}

/// The adapter's tensors under PEFT names, float32 on the CPU, contiguous.
pub fn peft_tensors(model: &CausalLm) -> Vec<(String, Tensor)> {
    model
        .lora_parameters()
        .into_iter()
        .map(|(n, t)| {
            (
                format!("{PEFT_PREFIX}{n}"),
                t.detach()
                    .to_kind(Kind::Float)
                    .to_device(tch::Device::Cpu)
                    .contiguous(),
            )
        })
        .collect()
}

pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    std::fs::write(
        path,
        serde_json::to_string_pretty(v).expect("JSON serializes") + "\n",
    )
    .map_err(|e| Error::io(path, e))
}

/// Writes `tensors` (already named) to a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, path)?;
    Ok(())
}

/// Writes the PEFT adapter files into `dir` (created); returns the file names. A model with an
/// extended vocabulary adds `trainable_token_indices` to the config and writes the extended
/// tokenizer next to the adapter: PEFT users load the tokenizer from there and resize the base to
/// `len(tokenizer)` before `PeftModel.from_pretrained`.
pub fn write_peft_adapter(
    dir: &Path,
    model: &CausalLm,
    cfg: &LoraConfig,
    base: &BaseModelRef,
) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut config = adapter_config_json(cfg, base);
    if let Some(t) = model.trainable_token_indices_json() {
        config["trainable_token_indices"] = t;
    }
    write_json(&dir.join(ADAPTER_CONFIG), &config)?;
    write_safetensors(&dir.join(ADAPTER_WEIGHTS), &peft_tensors(model))?;
    let mut names = vec![ADAPTER_CONFIG.to_string(), ADAPTER_WEIGHTS.to_string()];
    if let Some(v) = &model.added_vocab {
        names.extend(v.write(dir)?);
    }
    if model.rope_changed() {
        write_json(&dir.join(CONFIG_OVERRIDES), &config_overrides_json(model))?;
        names.push(CONFIG_OVERRIDES.into());
    }
    Ok(names)
}

/// [`CONFIG_OVERRIDES`] for `model`: its rope settings, the only config keys training changes.
pub fn config_overrides_json(model: &CausalLm) -> Value {
    let c = &model.config;
    json!({
        "max_position_embeddings": c.max_position_embeddings,
        "rope_parameters": rope_parameters_json(&c.rope_scaling, c.rope_theta),
    })
}

/// Applies an adapter directory's [`CONFIG_OVERRIDES`] (if any) to `model`; returns whether it had one.
pub fn apply_config_overrides(model: &mut CausalLm, dir: &Path) -> Result<bool> {
    let path = dir.join(CONFIG_OVERRIDES);
    if !path.exists() {
        return Ok(false);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))?;
    let max_pos = v
        .get("max_position_embeddings")
        .and_then(Value::as_i64)
        .unwrap_or(model.config.max_position_embeddings);
    let Some(rope) = v.get("rope_parameters").filter(|r| r.is_object()) else {
        return Err(Error::format(&path, "missing object `rope_parameters`"));
    };
    if let Some(theta) = rope.get("rope_theta").and_then(Value::as_f64)
        && theta != model.config.rope_theta
    {
        return Err(Error::format(
            &path,
            format!(
                "rope_theta {theta} differs from the base model's {}: adapter for another base model",
                model.config.rope_theta
            ),
        ));
    }
    let scaling = RopeScaling::from_json(rope, &v, max_pos)
        .map_err(|m| Error::format(&path, format!("rope_parameters: {m}")))?;
    model.set_rope_scaling(scaling, max_pos);
    Ok(true)
}

/// Reads a PEFT LoRA adapter directory: its config and `module path → (lora_A, lora_B)`.
#[allow(clippy::type_complexity)]
pub fn read_peft_adapter(dir: &Path) -> Result<(LoraConfig, BTreeMap<String, (Tensor, Tensor)>)> {
    let cpath = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cpath).map_err(|e| Error::io(&cpath, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&cpath, format!("invalid JSON: {e}")))?;
    let bad = |m: String| Error::format(&cpath, m);
    if v.get("peft_type").and_then(Value::as_str) != Some("LORA") {
        return Err(bad("peft_type must be LORA".into()));
    }
    for (key, ok) in [
        (
            "use_dora",
            v.get("use_dora").is_none_or(|x| x == &json!(false)),
        ),
        ("bias", v.get("bias").is_none_or(|x| x == &json!("none"))),
        (
            "fan_in_fan_out",
            v.get("fan_in_fan_out").is_none_or(|x| x == &json!(false)),
        ),
        (
            "modules_to_save",
            v.get("modules_to_save").is_none_or(Value::is_null),
        ),
        (
            "rank_pattern",
            v.get("rank_pattern")
                .is_none_or(|x| x.as_object().is_none_or(|o| o.is_empty())),
        ),
        (
            "alpha_pattern",
            v.get("alpha_pattern")
                .is_none_or(|x| x.as_object().is_none_or(|o| o.is_empty())),
        ),
    ] {
        if !ok {
            return Err(bad(format!(
                "unsupported adapter setting `{key}`: {}",
                v[key]
            )));
        }
    }
    let rank = v
        .get("r")
        .and_then(Value::as_i64)
        .ok_or_else(|| bad("missing integer `r`".into()))?;
    let alpha = v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
    let target_modules = match v.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    };
    let cfg = LoraConfig {
        rank,
        alpha,
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        target_modules,
        rslora: v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    let wpath = dir.join(ADAPTER_WEIGHTS);
    if !wpath.exists() {
        return Err(Error::io(
            &wpath,
            std::io::Error::new(std::io::ErrorKind::NotFound, "adapter weights not found"),
        ));
    }
    let tensors = Tensor::read_safetensors(&wpath)
        .map_err(|e| Error::format(&wpath, format!("cannot read: {e}")))?;
    let mut a_map = BTreeMap::new();
    let mut b_map = BTreeMap::new();
    for (name, t) in tensors {
        let n = name.strip_prefix(PEFT_PREFIX).unwrap_or(&name);
        let n = n.replace(".default.", ".");
        if n.ends_with(TOKENS_DELTA_SUFFIX) {
            // Trainable token rows: read by `merge::attach_adapter` (`model::vocab`).
            continue;
        } else if let Some(m) = n.strip_suffix(".lora_A.weight") {
            a_map.insert(m.to_string(), t);
        } else if let Some(m) = n.strip_suffix(".lora_B.weight") {
            b_map.insert(m.to_string(), t);
        } else {
            return Err(Error::tensor(&wpath, name, "not a LoRA A/B weight"));
        }
    }
    let mut out = BTreeMap::new();
    for (m, a) in a_map {
        let b = b_map
            .remove(&m)
            .ok_or_else(|| Error::tensor(&wpath, format!("{m}.lora_B.weight"), "missing"))?;
        out.insert(m, (a, b));
    }
    if let Some(m) = b_map.keys().next() {
        return Err(Error::tensor(
            &wpath,
            format!("{m}.lora_A.weight"),
            "missing",
        ));
    }
    Ok((cfg, out))
}

/// Loads a PEFT adapter onto `model` (inference: frozen, enabled, no dropout), after checking that
/// it was made for this base ([`merge::check_adapter`]).
pub fn apply_peft_adapter(model: &mut CausalLm, dir: &Path) -> Result<usize> {
    merge::attach_adapter(model, dir)
}

/// The rope settings as transformers 5 writes them (`rope_parameters`, `rope_theta` inside).
pub fn rope_parameters_json(scaling: &RopeScaling, theta: f64) -> Value {
    let mut v = match scaling {
        RopeScaling::Default => json!({"rope_type": "default"}),
        RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Dynamic { factor } => json!({"rope_type": "dynamic", "factor": factor}),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": *original_max_position_embeddings as i64,
        }),
        RopeScaling::Yarn {
            factor,
            attention_factor,
            beta_fast,
            beta_slow,
            original_max_position_embeddings,
            truncate,
        } => json!({
            "rope_type": "yarn", "factor": factor, "attention_factor": attention_factor,
            "beta_fast": beta_fast, "beta_slow": beta_slow,
            "original_max_position_embeddings": *original_max_position_embeddings as i64,
            "truncate": truncate,
        }),
    };
    v["rope_theta"] = json!(theta);
    v
}

/// A Hugging Face `config.json` for the model (Llama or Qwen2 keys).
pub fn hf_config_json(model: &CausalLm) -> Value {
    let c = &model.config;
    let (arch, ty) = match c.architecture {
        Architecture::Llama => ("LlamaForCausalLM", "llama"),
        Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
    };
    json!({
        "architectures": [arch],
        "model_type": ty,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "rope_parameters": rope_parameters_json(&c.rope_scaling, c.rope_theta),
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.o_bias,
        "mlp_bias": c.mlp_bias,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids.first(),
        "torch_dtype": "float32",
    })
}

/// `config.json` of a written model: the source directory's own `config.json` (keeping keys this
/// trainer does not model, e.g. `pad_token_id`, `sliding_window: null`) with every key the model
/// defines overwritten from the model, or [`hf_config_json`] alone for a GGUF source.
pub fn full_config_json(model: &CausalLm, source: Option<&Path>) -> Result<Value> {
    let ours = hf_config_json(model);
    let Some(cfg_path) = source
        .filter(|s| s.is_dir())
        .map(|s| s.join("config.json"))
        .filter(|p| p.exists())
    else {
        return Ok(ours);
    };
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let mut v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&cfg_path, format!("invalid JSON: {e}")))?;
    let Some(obj) = v.as_object_mut() else {
        return Ok(ours);
    };
    for k in ["rope_scaling", "dtype", "torch_dtype"] {
        obj.remove(k);
    }
    // A list of EOS ids stays a list (generation stops at any of them).
    let keep_eos = obj.get("eos_token_id").is_some_and(Value::is_array);
    for (k, val) in ours.as_object().into_iter().flatten() {
        if k == "eos_token_id" && keep_eos {
            continue;
        }
        obj.insert(k.clone(), val.clone());
    }
    Ok(v)
}

/// Tokenizer files for a model read from GGUF: `tokenizer.json` (the byte-level BPE rebuilt from
/// `tokenizer.ggml.*`), `tokenizer_config.json` (special tokens and the chat template) and
/// `generation_config.json`. Returns the file names.
fn write_gguf_tokenizer_files(
    dir: &Path,
    gguf_path: &Path,
    model: &CausalLm,
) -> Result<Vec<String>> {
    let g = GgufFile::open(gguf_path)?;
    let tok = TextTokenizer::from_gguf(&g)?;
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, tok.to_json()?).map_err(|e| Error::io(&path, e))?;
    let mut cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
        "model_max_length": model.config.max_position_embeddings,
    });
    for (key, t) in [
        ("bos_token", &tok.bos_token),
        ("eos_token", &tok.eos_token),
        ("unk_token", &tok.unk_token),
        ("pad_token", &tok.pad_token),
    ] {
        cfg[key] = t.as_ref().map_or(Value::Null, |t| json!(t));
    }
    if let Some(t) = g.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
        cfg["chat_template"] = json!(t);
    }
    write_json(&dir.join("tokenizer_config.json"), &cfg)?;
    let pad = g
        .get("tokenizer.ggml.padding_token_id")
        .and_then(|v| v.as_i64());
    write_json(
        &dir.join("generation_config.json"),
        &generation_config_json(model, pad),
    )?;
    Ok(vec![
        "tokenizer.json".into(),
        "tokenizer_config.json".into(),
        "generation_config.json".into(),
    ])
}

/// A minimal `generation_config.json` from the model config (written when the source has none).
fn generation_config_json(model: &CausalLm, pad: Option<i64>) -> Value {
    let c = &model.config;
    let eos = match c.eos_token_ids.as_slice() {
        [one] => json!(one),
        many => json!(many),
    };
    let mut v =
        json!({"_from_model_config": true, "bos_token_id": c.bos_token_id, "eos_token_id": eos});
    if let Some(p) = pad {
        v["pad_token_id"] = json!(p);
    }
    v
}

/// Writes a full model in Hugging Face layout: `model.safetensors` (float32, HF names, any attached
/// LoRA adapters folded in — so a LoRA model is written merged) and `config.json`; then the
/// tokenizer files: copied from an HF `source` directory (`tokenizer.json`, `tokenizer_config.json`,
/// `special_tokens_map.json`, `chat_template.jinja`, `generation_config.json`, written from the
/// config if absent), or rebuilt from a GGUF `source`'s metadata. Returns the file names.
pub fn write_full_model(
    dir: &Path,
    model: &CausalLm,
    source: Option<&Path>,
) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors = merge::merged_parameters(model);
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    drop(tensors);
    write_json(&dir.join("config.json"), &full_config_json(model, source)?)?;
    let mut names = vec!["model.safetensors".to_string(), "config.json".to_string()];
    match source {
        Some(src) if src.is_dir() => {
            for f in [
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "chat_template.jinja",
                "generation_config.json",
            ] {
                if src.join(f).exists() {
                    std::fs::copy(src.join(f), dir.join(f))
                        .map_err(|e| Error::io(&src.join(f), e))?;
                    names.push(f.to_string());
                }
            }
            if !src.join("generation_config.json").exists() {
                write_json(
                    &dir.join("generation_config.json"),
                    &generation_config_json(model, None),
                )?;
                names.push("generation_config.json".into());
            }
        }
        Some(src) if src.extension().is_some_and(|e| e == "gguf") => {
            names.extend(write_gguf_tokenizer_files(dir, src, model)?);
        }
        _ => {}
    }
    // An extended vocabulary: its tokenizer replaces the source's.
    if let Some(v) = &model.added_vocab {
        for n in v.write(dir)? {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    Ok(names)
}
