//! Where the base model comes from and how its context is stretched.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The pretrained model to fine-tune.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.uri.matches('^(pvc://[a-z0-9]([-.a-z0-9]*[a-z0-9])?(/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+))+|file:///.+|hf://[^/@]+/[^/@]+(@[^@]+)?|s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+))+)$')")
        .message("baseModel.uri must be pvc://CLAIM/PATH (no . or .. segments), file:///PATH, hf://ORG/NAME[@REVISION] or s3://BUCKET/KEY")
        .field_path(".uri"),
    validation = Rule::new("!has(self.tokenSecretRef) || self.uri.startsWith('hf://')")
        .message("baseModel.tokenSecretRef is only used with hf:// model URIs")
        .field_path(".tokenSecretRef"),
)]
pub struct BaseModel {
    /// Location of the model: `pvc://CLAIM/PATH` (a directory or file on a PersistentVolumeClaim),
    /// `file:///PATH` (a path inside the trainer image or a local run), `hf://ORG/NAME[@REVISION]`
    /// (downloaded through the Hub's API, from the Hub or the operator's mirror, into the model
    /// cache before training; the commit it resolves to is recorded in status and lineage), or
    /// `s3://BUCKET/KEY` (a `.gguf` object or a prefix holding a Hugging Face layout, downloaded
    /// into the model cache with `spec.s3`'s settings, keyed by the objects' ETags).
    #[schemars(length(min = 1, max = 2048))]
    pub uri: String,
    /// Weight format. `auto` picks GGUF for a `.gguf` file and Hugging Face safetensors for a
    /// directory holding `config.json`.
    #[serde(default)]
    pub format: ModelFormat,
    /// Secret holding a Hugging Face token (key `token` unless given), for gated or private
    /// `hf://` models. The token is passed to the trainer as an environment variable and never
    /// logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
    /// RoPE scaling applied for fine-tuning past the model's native context length; written into
    /// the merged model's `config.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
}

/// How the model weights are stored.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// Decide from what the URI points at.
    #[default]
    Auto,
    /// Hugging Face layout: config.json, (sharded) model.safetensors, tokenizer.json.
    Safetensors,
    /// A single GGUF file (F32/F16/BF16/Q8_0/Q4_0/Q4_1), dequantized on load.
    Gguf,
}

/// A key in a Secret in the job's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[serde(default = "default_token_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_token_key() -> String {
    "token".into()
}

/// Rotary-embedding scaling, with the same names and meaning as `rope_scaling` in a Hugging Face
/// `config.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.type == 'llama3' || (!has(self.lowFreqFactor) && !has(self.highFreqFactor))")
        .message("ropeScaling.lowFreqFactor and highFreqFactor only apply to type llama3"),
    validation = Rule::new("self.type == 'yarn' || (!has(self.betaFast) && !has(self.betaSlow))")
        .message("ropeScaling.betaFast and betaSlow only apply to type yarn"),
)]
pub struct RopeScaling {
    /// Scaling method.
    #[serde(rename = "type")]
    pub kind: RopeScalingType,
    /// How many times the original context the model should handle (e.g. 4.0 for 2k → 8k).
    #[schemars(range(min = 1.0, max = 128.0))]
    pub factor: f64,
    /// The context length the base model was trained with; defaults to the model's
    /// `max_position_embeddings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub original_max_position_embeddings: Option<i64>,
    /// llama3 only: wavelengths longer than original/lowFreqFactor are scaled fully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0.0, "exclusiveMinimum" = true))]
    pub low_freq_factor: Option<f64>,
    /// llama3 only: wavelengths shorter than original/highFreqFactor are left unscaled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0.0, "exclusiveMinimum" = true))]
    pub high_freq_factor: Option<f64>,
    /// yarn only: the fast boundary of the interpolation ramp (default 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0.0, "exclusiveMinimum" = true))]
    pub beta_fast: Option<f64>,
    /// yarn only: the slow boundary of the interpolation ramp (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0.0, "exclusiveMinimum" = true))]
    pub beta_slow: Option<f64>,
}

/// The RoPE scaling methods the trainer implements.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RopeScalingType {
    /// Position interpolation: positions divided by the factor.
    Linear,
    /// Dynamic NTK: the base frequency grows with the sequence length.
    Dynamic,
    /// YaRN: per-frequency interpolation with attention temperature.
    Yarn,
    /// Llama 3.1 style: low frequencies scaled, high frequencies kept.
    Llama3,
}
