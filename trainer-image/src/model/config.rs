//! The model hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata. Both
//! sources end in the same [`ModelConfig`], so the model code never knows where weights came from.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::rope::RopeScaling;

/// Which member of the Llama family: they differ only in which linear layers carry a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (also Mistral-without-sliding-window, SmolLM): biases per `attention_bias`/`mlp_bias`.
    Llama,
    /// `Qwen2ForCausalLM`: q/k/v projections always carry a bias, o_proj and the MLP never do.
    Qwen2,
}

/// Everything the forward pass needs to know about a checkpoint.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: i64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama `attention_bias` only).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Token ids that end generation (config's `eos_token_id`, which may be a list).
    pub eos_token_ids: Vec<i64>,
    pub bos_token_id: Option<i64>,
}

fn get_i64(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}

fn get_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn ids(v: Option<&Value>) -> Vec<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`. Missing optional keys take `LlamaConfig`'s defaults.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = crate::limits::read_text(path, crate::limits::MAX_SIDE_FILE, "config.json")?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
        Self::from_hf_value(path, &v)
    }

    pub fn from_hf_value(path: &Path, v: &Value) -> Result<Self> {
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .or_else(|| v.get("model_type").and_then(Value::as_str))
            .unwrap_or("<none>");
        let architecture = match arch_name {
            "LlamaForCausalLM" | "llama" | "MistralForCausalLM" | "mistral" => Architecture::Llama,
            "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
            other => {
                return Err(Error::unsupported(
                    path,
                    format!(
                        "architecture `{other}` (supported: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)"
                    ),
                ));
            }
        };
        if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true)
            || (arch_name.starts_with("Mistral")
                && v.get("sliding_window").is_some_and(|s| !s.is_null()))
        {
            return Err(Error::unsupported(path, "sliding-window attention"));
        }
        let need = |key: &str| {
            get_i64(v, key).ok_or_else(|| Error::format(path, format!("missing integer `{key}`")))
        };
        let hidden_size = need("hidden_size")?;
        let num_heads = need("num_attention_heads")?;
        let num_kv_heads = get_i64(v, "num_key_value_heads").unwrap_or(num_heads);
        // A zero head count is caught by `validate`; 0 here only keeps the division total.
        let head_dim =
            get_i64(v, "head_dim").unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0));
        let max_position_embeddings = get_i64(v, "max_position_embeddings").unwrap_or(2048);
        // transformers v5 writes `rope_parameters` (with rope_theta inside); older files write a
        // top-level `rope_theta` and an optional `rope_scaling`.
        let rope = v
            .get("rope_parameters")
            .filter(|r| r.is_object())
            .or_else(|| v.get("rope_scaling").filter(|r| r.is_object()));
        let rope_theta = rope
            .and_then(|r| get_f64(r, "rope_theta"))
            .or_else(|| get_f64(v, "rope_theta"))
            .unwrap_or(10000.0);
        let partial = rope
            .and_then(|r| get_f64(r, "partial_rotary_factor"))
            .or_else(|| get_f64(v, "partial_rotary_factor"))
            .unwrap_or(1.0);
        if partial != 1.0 {
            return Err(Error::unsupported(path, "partial_rotary_factor != 1"));
        }
        let rope_scaling = match rope {
            Some(r) => RopeScaling::from_json(r, v, max_position_embeddings)
                .map_err(|m| Error::format(path, format!("rope parameters: {m}")))?,
            None => RopeScaling::Default,
        };
        let attention_bias = v
            .get("attention_bias")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Llama => (attention_bias, attention_bias),
            Architecture::Qwen2 => (true, false),
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size: need("vocab_size")?,
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            num_layers: need("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: get_f64(v, "rms_norm_eps").unwrap_or(1e-6),
            max_position_embeddings,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false),
            eos_token_ids: ids(v.get("eos_token_id")),
            bos_token_id: get_i64(v, "bos_token_id"),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Rejects configurations the attention code cannot run, before any weight is read. Sizes are
    /// bounded so that nothing derived from them (rotary tables, masks, layer lists) can overflow
    /// or allocate without limit; the bounds are far above any published model.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bounded = [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_hidden_layers", self.num_layers, 1024),
            ("num_attention_heads", self.num_heads, 1024),
            ("head_dim", self.head_dim, 4096),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 24,
            ),
        ];
        for (name, value, max) in bounded {
            if !(1..=max).contains(&value) {
                return Err(Error::format(
                    path,
                    format!("{name} is {value}; expected 1 to {max}"),
                ));
            }
        }
        if self.num_kv_heads <= 0 || self.num_heads % self.num_kv_heads != 0 {
            return Err(Error::format(
                path,
                format!(
                    "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(Error::format(
                path,
                "head_dim must be even for rotary embeddings",
            ));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(self.rms_norm_eps) || !positive(self.rope_theta) {
            return Err(Error::format(
                path,
                format!(
                    "rms_norm_eps ({}) and rope_theta ({}) must be finite and positive",
                    self.rms_norm_eps, self.rope_theta
                ),
            ));
        }
        Ok(())
    }
}
