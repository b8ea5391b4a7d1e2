//! `finetune-trainer init-random --config config.json --out DIR`: a checkpoint of random weights
//! for a Llama-family `config.json`, in the Hugging Face layout (sharded with
//! `model.safetensors.index.json` when larger than one shard), so that benchmarks and the memory
//! planner's validation can use any model shape without downloading one.
//!
//! Weights are drawn as transformers' `_init_weights` does for Llama: normal with
//! `initializer_range` (0.02 by default) for every matrix, ones for the norms, zeros for biases.
//! Shards are generated and written one at a time, so a 70B config needs the memory of one shard,
//! not of the model.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::ModelConfig;

/// How one tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    Normal,
    Ones,
    Zeros,
}

/// Every tensor of the model under its Hugging Face name, in the order transformers saves them.
fn tensors(c: &ModelConfig) -> Vec<(String, Vec<i64>, Init)> {
    let (h, hd) = (c.hidden_size, c.head_dim);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, h],
        Init::Normal,
    )];
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let linears = [
            ("self_attn.q_proj", c.num_heads * hd, h, c.qkv_bias),
            ("self_attn.k_proj", c.num_kv_heads * hd, h, c.qkv_bias),
            ("self_attn.v_proj", c.num_kv_heads * hd, h, c.qkv_bias),
            ("self_attn.o_proj", h, c.num_heads * hd, c.o_bias),
            ("mlp.gate_proj", c.intermediate_size, h, c.mlp_bias),
            ("mlp.up_proj", c.intermediate_size, h, c.mlp_bias),
            ("mlp.down_proj", h, c.intermediate_size, c.mlp_bias),
        ];
        out.push((format!("{p}.input_layernorm.weight"), vec![h], Init::Ones));
        for (name, o, i, bias) in linears {
            out.push((format!("{p}.{name}.weight"), vec![o, i], Init::Normal));
            if bias {
                out.push((format!("{p}.{name}.bias"), vec![o], Init::Zeros));
            }
        }
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Init::Ones,
        ));
    }
    out.push(("model.norm.weight".into(), vec![h], Init::Ones));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![c.vocab_size, h], Init::Normal));
    }
    out
}

/// Cuts the tensors, in order, into shards of at most `shard_bytes` (a tensor larger than that is
/// a shard of its own, as in transformers).
fn shards(sizes: &[u64], shard_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, &s) in sizes.iter().enumerate() {
        if i > start && bytes + s > shard_bytes {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += s;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// Writes the checkpoint; returns the files written.
pub fn init_random(
    config_path: &Path,
    out: &Path,
    kind: Kind,
    shard_bytes: u64,
    seed: i64,
) -> Result<Vec<PathBuf>> {
    let text = crate::limits::read_text(config_path, crate::limits::MAX_SIDE_FILE, "config.json")?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(config_path, format!("invalid JSON: {e}")))?;
    let config = ModelConfig::from_hf_value(config_path, &v)?;
    let std = match v.get("initializer_range") {
        None => 0.02,
        Some(x) => x
            .as_f64()
            .filter(|s| s.is_finite() && *s > 0.0)
            .ok_or_else(|| {
                Error::format(
                    config_path,
                    format!("`initializer_range` must be a positive number, not {x}"),
                )
            })?,
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let all = tensors(&config);
    let elem = kind.elt_size_in_bytes() as u64;
    let sizes: Vec<u64> = all
        .iter()
        .map(|(_, s, _)| s.iter().product::<i64>() as u64 * elem)
        .collect();
    let groups = shards(&sizes, shard_bytes);
    tch::manual_seed(seed);
    let mut written = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (n, range) in groups.iter().enumerate() {
        let name = if groups.len() == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", n + 1, groups.len())
        };
        let shard: Vec<(&str, Tensor)> = all[range.clone()]
            .iter()
            .map(|(t, shape, init)| (t.as_str(), make(shape, *init, std, kind)))
            .collect();
        let path = out.join(&name);
        Tensor::write_safetensors(&shard, &path)
            .map_err(|e| Error::format(&path, format!("writing: {e}")))?;
        for (t, _) in &shard {
            weight_map.insert((*t).to_string(), json!(name));
        }
        written.push(path);
    }
    if groups.len() > 1 {
        let index = json!({
            "metadata": {"total_size": sizes.iter().sum::<u64>()},
            "weight_map": weight_map,
        });
        let path = out.join("model.safetensors.index.json");
        write(
            &path,
            &serde_json::to_string_pretty(&index).unwrap_or_default(),
        )?;
        written.push(path);
    }
    let path = out.join("config.json");
    write(&path, &text)?;
    written.push(path);
    Ok(written)
}

fn make(shape: &[i64], init: Init, std: f64, kind: Kind) -> Tensor {
    let opts = (Kind::Float, Device::Cpu);
    let t = match init {
        Init::Normal => Tensor::randn(shape, opts) * std,
        Init::Ones => Tensor::ones(shape, opts),
        Init::Zeros => Tensor::zeros(shape, opts),
    };
    t.to_kind(kind)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cut_before_the_tensor_that_would_overflow() {
        assert_eq!(shards(&[4, 4, 4, 4], 8), vec![0..2, 2..4]);
        assert_eq!(shards(&[10, 1, 1], 8), vec![0..1, 1..3]);
        assert_eq!(shards(&[1, 1], 100), vec![0..2]);
    }
}
