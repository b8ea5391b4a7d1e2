//! The datasets a job trains and evaluates on.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::SecretKeyRef;

/// Training and evaluation data. Every file is JSON Lines; what a line holds depends on `format`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.format != 'preference' || !has(self.train.sources)")
        .message("dataset.train.sources (a mixture) is for SFT data: DPO reads one preference file in dataset.train.uri")
        .field_path(".train.sources"),
    validation = Rule::new("!(has(self.eval) && has(self.evalSplit))")
        .message("set either dataset.eval or dataset.evalSplit, not both")
        .field_path(".evalSplit"),
    validation = Rule::new("!has(self.evalSplit) || (self.evalSplit > 0.0 && self.evalSplit <= 0.5)")
        .message("dataset.evalSplit is the fraction of training samples held out for evaluation and must be in (0, 0.5]")
        .field_path(".evalSplit"),
)]
pub struct DatasetSpec {
    /// Training data: one file (`uri`), or a mixture of several (`sources`).
    pub train: TrainData,
    /// Separate evaluation data, same formats as `train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<DataSource>,
    /// Fraction of the (deduplicated) training samples held out for evaluation, in (0, 0.5],
    /// chosen with the job's seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_split: Option<f64>,
    /// What each JSON line holds.
    pub format: DataFormat,
    /// Drop exact duplicate samples before training.
    #[serde(default = "crate::defaults::yes")]
    pub deduplicate: bool,
    /// Use at most this many training samples (after deduplication), for quick trials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_samples: Option<i64>,
    /// Secret holding a Hugging Face token (key `token` unless given) for gated or private
    /// `hf://datasets/...` files; passed to the trainer by reference and never logged. Public
    /// datasets need none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
}

/// The training data: `uri`, one JSON Lines file, or `sources`, a seeded mixture of 2 to 16
/// files, each with its share of an epoch and its own format.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.uri) != has(self.sources)")
        .message("dataset.train needs uri (one file) or sources (a mixture of files), not both"),
    validation = Rule::new("!has(self.uri) || self.uri.matches('^(pvc://[a-z0-9]([-.a-z0-9]*[a-z0-9])?(/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+))+|file:///.+|s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+))+|hf://datasets/[^/@]+/[^/@]+(@[^/@]+)?(/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+))+|configmap://[a-z0-9]([-.a-z0-9]*[a-z0-9])?/([-_a-zA-Z0-9][-._a-zA-Z0-9]*|[.][-_a-zA-Z0-9][-._a-zA-Z0-9]*|[.][.][-._a-zA-Z0-9]+))$')")
        .message("dataset URIs must be pvc://CLAIM/PATH (no . or .. segments), file:///PATH, s3://BUCKET/KEY, hf://datasets/ORG/NAME[@REVISION]/PATH or configmap://NAME/KEY")
        .field_path(".uri"),
)]
pub struct TrainData {
    /// One file: `pvc://CLAIM/PATH.jsonl`, `file:///PATH.jsonl`, `s3://BUCKET/KEY.jsonl`,
    /// `hf://datasets/ORG/NAME[@REVISION]/PATH.jsonl` or `configmap://NAME/KEY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub uri: Option<String>,
    /// A mixture: each epoch draws from every source its share (`weight`) or its count
    /// (`samples`), with the job's seed; a source smaller than its share is repeated, a larger
    /// one subsampled. Eval data split off by `evalSplit` comes from each source before mixing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 2, max = 16))]
    pub sources: Vec<MixtureSource>,
}

impl TrainData {
    /// A single training file.
    pub fn file(uri: impl Into<String>) -> Self {
        TrainData {
            uri: Some(uri.into()),
            sources: Vec::new(),
        }
    }

    /// Every file it names, with the field that names it.
    pub fn uris(&self) -> Vec<(&'static str, &str)> {
        let single = self
            .uri
            .iter()
            .map(|u| ("spec.dataset.train.uri", u.as_str()));
        let mixed = self
            .sources
            .iter()
            .map(|s| ("spec.dataset.train.sources", s.uri.as_str()));
        single.chain(mixed).collect()
    }
}

/// One file of a training mixture.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.uri.matches('^(pvc://[a-z0-9]([-.a-z0-9]*[a-z0-9])?(/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+))+|file:///.+|s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+))+|hf://datasets/[^/@]+/[^/@]+(@[^/@]+)?(/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+))+|configmap://[a-z0-9]([-.a-z0-9]*[a-z0-9])?/([-_a-zA-Z0-9][-._a-zA-Z0-9]*|[.][-_a-zA-Z0-9][-._a-zA-Z0-9]*|[.][.][-._a-zA-Z0-9]+))$')")
        .message("dataset URIs must be pvc://CLAIM/PATH (no . or .. segments), file:///PATH, s3://BUCKET/KEY, hf://datasets/ORG/NAME[@REVISION]/PATH or configmap://NAME/KEY")
        .field_path(".uri"),
    validation = Rule::new("!(has(self.weight) && has(self.samples))")
        .message("a mixture source takes weight (its share of an epoch) or samples (a count), not both")
        .field_path(".samples"),
    validation = Rule::new("!has(self.format) || self.format != 'preference'")
        .message("mixtures are for SFT data: chat, instruction or text")
        .field_path(".format"),
)]
pub struct MixtureSource {
    /// `pvc://CLAIM/PATH.jsonl`, `file:///PATH.jsonl`, `s3://BUCKET/KEY.jsonl`,
    /// `hf://datasets/ORG/NAME[@REVISION]/PATH.jsonl` or `configmap://NAME/KEY`.
    #[schemars(length(min = 1, max = 2048))]
    pub uri: String,
    /// What each of its lines holds; `dataset.format` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DataFormat>,
    /// Its share of an epoch relative to the other weighted sources (1 when neither this nor
    /// `samples` is set). The weighted sources together fill as many samples per epoch as
    /// they hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.001, max = 1000.0))]
    pub weight: Option<f64>,
    /// Exactly this many of its samples per epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000000))]
    pub samples: Option<i64>,
}

/// A JSON Lines file the trainer reads.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.uri.matches('^(pvc://[a-z0-9]([-.a-z0-9]*[a-z0-9])?(/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+))+|file:///.+|s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+))+|hf://datasets/[^/@]+/[^/@]+(@[^/@]+)?(/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+))+|configmap://[a-z0-9]([-.a-z0-9]*[a-z0-9])?/([-_a-zA-Z0-9][-._a-zA-Z0-9]*|[.][-_a-zA-Z0-9][-._a-zA-Z0-9]*|[.][.][-._a-zA-Z0-9]+))$')")
    .message("dataset URIs must be pvc://CLAIM/PATH (no . or .. segments), file:///PATH, s3://BUCKET/KEY, hf://datasets/ORG/NAME[@REVISION]/PATH or configmap://NAME/KEY")
    .field_path(".uri"))]
pub struct DataSource {
    /// `pvc://CLAIM/PATH`, `file:///PATH`, `s3://BUCKET/KEY`,
    /// `hf://datasets/ORG/NAME[@REVISION]/PATH` or `configmap://NAME/KEY`.
    #[schemars(length(min = 1, max = 2048))]
    pub uri: String,
}

/// The layout of one JSON line.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// `{"messages": [{"role": "system|user|assistant", "content": "..."}]}`, rendered with the
    /// model's own chat template; loss on assistant turns only.
    Chat,
    /// `{"instruction": "...", "input": "...", "output": "..."}` (input optional), rendered as a
    /// user turn and an assistant turn; loss on the output only.
    Instruction,
    /// `{"text": "..."}` raw text for domain adaptation; loss on every token.
    Text,
    /// `{"prompt": "..." | "messages": [...], "chosen": "...", "rejected": "..."}` pairs for
    /// preference alignment (method `dpo`).
    Preference,
}
