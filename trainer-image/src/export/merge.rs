//! Folding LoRA adapters into the base weights (`W ← W + scaling · B·A`, as PEFT's
//! `merge_and_unload`, with `scaling = alpha / r`, or `alpha / √r` under rsLoRA) and the `merge`
//! command: base model (HF directory or GGUF) + PEFT adapter directory → a Hugging Face layout
//! model directory (see [`crate::export::write_full_model`]).
//!
//! Before anything is applied the adapter is checked against the base, so an adapter trained for
//! another model fails with the file, the tensor or field, and what differs (hidden size, layer
//! count, a target module the architecture does not have) instead of a shape error in a matmul.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::export::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_peft_adapter, write_full_model};
use crate::load::ModelSource;
use crate::model::lora::LINEAR_MODULES;
use crate::model::{CausalLm, LoraConfig, ModelConfig};

/// Every parameter under its Hugging Face name (tied head omitted), float32 on the CPU, contiguous,
/// with each attached LoRA adapter folded into its layer's weight. Without adapters this is the
/// model's own parameters. The model itself is not changed.
pub fn merged_parameters(model: &CausalLm) -> Vec<(String, Tensor)> {
    let _guard = tch::no_grad_guard();
    let deltas: HashMap<String, Tensor> = model
        .linears()
        .into_iter()
        .filter_map(|(name, lin)| {
            let l = lin.lora.as_ref()?;
            let delta =
                l.b.to_kind(Kind::Float)
                    .matmul(&l.a.to_kind(Kind::Float).to_device(l.b.device()))
                    * l.scaling;
            Some((format!("{name}.weight"), delta))
        })
        .collect();
    // Trained token rows are written into the embedding (and an untied head), as PEFT's
    // `TrainableTokensLayer.merge` does with `index_copy`.
    let embed = model.embedding_weight();
    let head = model.head_weight_override();
    model
        .named_parameters()
        .into_iter()
        .map(|(n, t)| {
            let t = match (n.as_str(), &head) {
                ("model.embed_tokens.weight", _) => &embed,
                ("lm_head.weight", Some(h)) => h,
                _ => t,
            };
            let t = t.detach().to_kind(Kind::Float);
            let t = match deltas.get(&n) {
                Some(d) => {
                    let dev = t.device();
                    t + d.to_device(dev)
                }
                None => t,
            };
            (n, t.to_device(Device::Cpu).contiguous())
        })
        .collect()
}

/// `base_model_name_or_path` of an adapter, for messages.
fn adapter_base_name(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(ADAPTER_CONFIG)).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v.get("base_model_name_or_path")?
        .as_str()
        .map(str::to_string)
}

/// Checks that a PEFT adapter (`cfg`, `module path → (lora_A, lora_B)`, read from `dir`) fits
/// the base model `c` whose linears have the shapes `layers` (`(out, in)` by module path): every
/// target module is a linear layer of the architecture and has weights, every weight names an
/// existing layer, and the A/B shapes are `[r, in]` / `[out, r]` of that layer.
pub fn check_adapter(
    c: &ModelConfig,
    layers: &HashMap<String, (i64, i64)>,
    cfg: &LoraConfig,
    weights: &BTreeMap<String, (Tensor, Tensor)>,
    dir: &Path,
) -> Result<()> {
    let cpath = dir.join(ADAPTER_CONFIG);
    let wpath = dir.join(ADAPTER_WEIGHTS);
    let made_for = adapter_base_name(dir)
        .filter(|s| !s.is_empty())
        .map_or_else(String::new, |b| {
            format!(" (adapter_config.json says it was made for `{b}`)")
        });
    for t in &cfg.target_modules {
        let plain = t.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
        if plain && !LINEAR_MODULES.contains(&t.as_str()) {
            return Err(Error::format(
                &cpath,
                format!(
                    "target_modules: `{t}` is not a linear layer of this base model (it has {}): adapter for another model{made_for}",
                    LINEAR_MODULES.join(", ")
                ),
            ));
        }
        if plain && !weights.keys().any(|k| k.rsplit('.').next() == Some(t)) {
            return Err(Error::format(
                &wpath,
                format!("target_modules lists `{t}` but the adapter holds no weights for it"),
            ));
        }
    }
    for (name, (a, b)) in weights {
        let Some(&(out, inp)) = layers.get(name) else {
            let layer = name
                .strip_prefix("model.layers.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<i64>().ok());
            let why = match layer {
                Some(i) if i >= c.num_layers => format!(
                    "layer {i} does not exist: the base model has {} layers (num_hidden_layers): adapter for another base model{made_for}",
                    c.num_layers
                ),
                _ => format!(
                    "not a linear layer of this base model (expected model.layers.N.self_attn.{{q,k,v,o}}_proj or model.layers.N.mlp.{{gate,up,down}}_proj){made_for}"
                ),
            };
            return Err(Error::tensor(&wpath, format!("{name}.lora_A.weight"), why));
        };
        let (asz, bsz) = (a.size(), b.size());
        if asz.len() != 2 || bsz.len() != 2 {
            return Err(Error::tensor(
                &wpath,
                format!("{name}.lora_A/lora_B"),
                format!("expected 2-D matrices, got {asz:?} and {bsz:?}"),
            ));
        }
        if asz[0] != cfg.rank || bsz[1] != cfg.rank {
            return Err(Error::tensor(
                &wpath,
                format!("{name}.lora_A/lora_B"),
                format!(
                    "rank mismatch: adapter_config.json has r = {}, the tensors are {asz:?} and {bsz:?}",
                    cfg.rank
                ),
            ));
        }
        if asz[1] != inp || bsz[0] != out {
            let short = name.rsplit('.').next().unwrap_or(name);
            let hint = if matches!(short, "down_proj") {
                format!(
                    "intermediate_size {} / hidden_size {}",
                    c.intermediate_size, c.hidden_size
                )
            } else {
                format!(
                    "hidden_size {}, intermediate_size {}, {} heads × head_dim {}, {} kv heads",
                    c.hidden_size, c.intermediate_size, c.num_heads, c.head_dim, c.num_kv_heads
                )
            };
            return Err(Error::tensor(
                &wpath,
                format!("{name}.lora_A/lora_B"),
                format!(
                    "shape mismatch: the adapter maps {} → {} but the base's {short} is {inp} → {out} ({hint}): adapter for another base model{made_for}",
                    asz[1], bsz[0]
                ),
            ));
        }
    }
    Ok(())
}

/// Reads a PEFT adapter, checks it against `model` and attaches it (frozen, enabled), with the rope
/// of its `config_overrides.json` if it has one.
pub fn attach_adapter(model: &mut CausalLm, dir: &Path) -> Result<usize> {
    let (cfg, weights) = read_peft_adapter(dir)?;
    let layers = model
        .linears()
        .into_iter()
        .map(|(n, l)| (n, l.shape()))
        .collect();
    check_adapter(&model.config, &layers, &cfg, &weights, dir)?;
    let n = model.set_lora_weights(&cfg, weights, &dir.join(ADAPTER_WEIGHTS))?;
    if n == 0 {
        return Err(Error::format(dir, "the adapter holds no LoRA weights"));
    }
    attach_trainable_tokens(model, dir)?;
    // A long-context adapter was trained with a rope its base config does not have.
    crate::export::apply_config_overrides(model, dir)?;
    Ok(n)
}

/// The adapter's trainable token rows (`trainable_token_indices` in `adapter_config.json`, the
/// `…token_adapter.trainable_tokens_delta` tensors), if it has any: grows the vocabulary to cover
/// them (and the adapter's own `tokenizer.json`, which then becomes the model's tokenizer files
/// for anything written from it) and attaches the rows, frozen.
pub fn attach_trainable_tokens(model: &mut CausalLm, dir: &Path) -> Result<()> {
    let cpath = dir.join(ADAPTER_CONFIG);
    let wpath = dir.join(ADAPTER_WEIGHTS);
    let text = std::fs::read_to_string(&cpath).map_err(|e| Error::io(&cpath, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&cpath, format!("invalid JSON: {e}")))?;
    let ids_of =
        |x: &Value| -> Option<Vec<i64>> { x.as_array()?.iter().map(Value::as_i64).collect() };
    let bad = |m: &str| Error::format(&cpath, format!("trainable_token_indices: {m}"));
    let (ids, head_ids) = match v.get("trainable_token_indices") {
        None | Some(Value::Null) => return Ok(()),
        Some(x @ Value::Array(_)) => (ids_of(x).ok_or_else(|| bad("expected token ids"))?, None),
        Some(Value::Object(o)) => {
            let mut ids = None;
            let mut head = None;
            for (k, x) in o {
                let list = ids_of(x).ok_or_else(|| bad("expected token ids"))?;
                match k.rsplit('.').next() {
                    Some("embed_tokens") => ids = Some(list),
                    Some("lm_head") => head = Some(list),
                    _ => return Err(bad(&format!("unsupported layer `{k}`"))),
                }
            }
            (ids.ok_or_else(|| bad("no embed_tokens entry"))?, head)
        }
        Some(_) => return Err(bad("expected a list or an object")),
    };
    if head_ids.as_ref().is_some_and(|h| h != &ids) {
        return Err(bad(
            "embed_tokens and lm_head with different ids are not supported",
        ));
    }
    let mut rows: BTreeMap<String, Tensor> = Tensor::read_safetensors(&wpath)
        .map_err(|e| Error::format(&wpath, format!("cannot read: {e}")))?
        .into_iter()
        .filter(|(n, _)| n.ends_with(crate::export::TOKENS_DELTA_SUFFIX))
        .map(|(n, t)| {
            let n = n
                .strip_prefix(crate::export::PEFT_PREFIX)
                .unwrap_or(&n)
                .to_string();
            (n, t)
        })
        .collect();
    let h = model.config.hidden_size;
    let mut take = |name: &str| -> Result<Tensor> {
        let t = rows
            .remove(name)
            .ok_or_else(|| Error::tensor(&wpath, name.to_string(), "missing"))?;
        if t.size() != [ids.len() as i64, h] {
            return Err(Error::tensor(
                &wpath,
                name.to_string(),
                format!(
                    "shape {:?}, expected [{}, {h}] (token ids × hidden size)",
                    t.size(),
                    ids.len()
                ),
            ));
        }
        Ok(t)
    };
    let embed = take(crate::model::vocab::EMBED_TOKENS_DELTA)?;
    let head = match (&head_ids, &model.lm_head) {
        (Some(_), Some(_)) => Some(take(crate::model::vocab::LM_HEAD_TOKENS_DELTA)?),
        _ => None,
    };
    let tokenizer = dir.join("tokenizer.json");
    let tok = if tokenizer.exists() {
        Some(crate::text::TextTokenizer::from_json_file(&tokenizer)?)
    } else {
        None
    };
    let needed = ids.iter().max().map_or(0, |m| m + 1);
    let vocab = tok.as_ref().map_or(0, |t| t.vocab_size() as i64);
    model.resize_vocab(needed.max(vocab));
    model.add_trainable_tokens(&ids, Some((embed, head)));
    if let Some(t) = model.trainable_tokens.as_mut() {
        let _ = t.embed.set_requires_grad(false);
        if let Some(hd) = &t.head {
            let _ = hd.set_requires_grad(false);
        }
    }
    if let Some(tok) = tok {
        let mut files = Vec::new();
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
        ] {
            let p = dir.join(f);
            if p.exists() {
                files.push((
                    f.to_string(),
                    std::fs::read(&p).map_err(|e| Error::io(&p, e))?,
                ));
            }
        }
        let tokens = tok
            .added_tokens()
            .into_iter()
            .filter(|(id, _)| ids.contains(&i64::from(*id)))
            .map(|(id, t)| (i64::from(id), t))
            .collect();
        model.added_vocab = Some(crate::model::vocab::AddedVocab { tokens, files });
    }
    Ok(())
}

/// What `merge` wrote, printed as JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeSummary {
    pub output: String,
    pub files: Vec<String>,
    pub merged_layers: usize,
    pub scaling: f64,
}

/// `merge`: base (HF directory or GGUF, read in float32 on the CPU) + PEFT adapter → a Hugging Face
/// layout model in `output` (float32 `model.safetensors`, `config.json`, tokenizer files with the
/// chat template, `generation_config.json`).
pub fn merge(base: &Path, adapter: &Path, output: &Path) -> Result<MergeSummary> {
    if !adapter.is_dir() {
        return Err(Error::io(
            adapter,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "adapter directory not found (expected adapter_config.json + adapter_model.safetensors)",
            ),
        ));
    }
    let src = ModelSource::open(base)?;
    let mut m = src.load(Kind::Float, Device::Cpu)?;
    let n = attach_adapter(&mut m.model, adapter)?;
    let scaling = m
        .model
        .linears()
        .iter()
        .find_map(|(_, l)| l.lora.as_ref().map(|l| l.scaling))
        .unwrap_or(0.0);
    let files = write_full_model(output, &m.model, Some(base))?;
    Ok(MergeSummary {
        output: output.display().to_string(),
        files,
        merged_layers: n,
        scaling,
    })
}
