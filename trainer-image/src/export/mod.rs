//! Writing results: a LoRA adapter in PEFT's layout (`adapter_config.json` +
//! `adapter_model.safetensors` with `base_model.model.…lora_A.weight` names, loadable with
//! `PeftModel.from_pretrained`), reading one back onto a [`CausalLm`], and a full fine-tuned model
//! in Hugging Face layout.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::{Architecture, CausalLm, LoraConfig};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const PEFT_PREFIX: &str = "base_model.model.";

/// `adapter_config.json` for `cfg`, as PEFT 0.21 writes it for a CAUSAL_LM LoRA.
pub fn adapter_config_json(cfg: &LoraConfig, base_model: &str) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
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
        "revision": null,
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

/// Writes the PEFT adapter files into `dir` (created); returns the file names.
pub fn write_peft_adapter(
    dir: &Path,
    model: &CausalLm,
    cfg: &LoraConfig,
    base_model: &str,
) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_json(
        &dir.join(ADAPTER_CONFIG),
        &adapter_config_json(cfg, base_model),
    )?;
    write_safetensors(&dir.join(ADAPTER_WEIGHTS), &peft_tensors(model))?;
    Ok(vec![ADAPTER_CONFIG.into(), ADAPTER_WEIGHTS.into()])
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
        if let Some(m) = n.strip_suffix(".lora_A.weight") {
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

/// Loads a PEFT adapter onto `model` (inference: frozen, enabled, no dropout).
pub fn apply_peft_adapter(model: &mut CausalLm, dir: &Path) -> Result<usize> {
    let (cfg, weights) = read_peft_adapter(dir)?;
    let n = model.set_lora_weights(&cfg, weights, &dir.join(ADAPTER_WEIGHTS))?;
    if n == 0 {
        return Err(Error::format(dir, "the adapter holds no LoRA weights"));
    }
    Ok(n)
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
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.o_bias,
        "mlp_bias": c.mlp_bias,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids.first(),
        "torch_dtype": "float32",
    })
}

/// Writes a full model (`model.safetensors`, float32, HF names, plus `config.json`); returns the
/// file names. Tokenizer files of an HF `source` directory are copied alongside.
pub fn write_full_model(
    dir: &Path,
    model: &CausalLm,
    source: Option<&Path>,
) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors: Vec<(String, Tensor)> = model
        .named_parameters()
        .into_iter()
        .map(|(n, t)| {
            (
                n,
                t.detach()
                    .to_kind(Kind::Float)
                    .to_device(tch::Device::Cpu)
                    .contiguous(),
            )
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    write_json(&dir.join("config.json"), &hf_config_json(model))?;
    let mut names = vec!["model.safetensors".to_string(), "config.json".to_string()];
    if let Some(src) = source.filter(|s| s.is_dir()) {
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "generation_config.json",
        ] {
            if src.join(f).exists() {
                std::fs::copy(src.join(f), dir.join(f)).map_err(|e| Error::io(&src.join(f), e))?;
                names.push(f.to_string());
            }
        }
    }
    Ok(names)
}
