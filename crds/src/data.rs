//! The datasets a job trains and evaluates on.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Training and evaluation data. Every file is JSON Lines; what a line holds depends on `format`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.eval) && has(self.evalSplit))")
        .message("set either dataset.eval or dataset.evalSplit, not both")
        .field_path(".evalSplit"),
    validation = Rule::new("!has(self.evalSplit) || (self.evalSplit > 0.0 && self.evalSplit <= 0.5)")
        .message("dataset.evalSplit is the fraction of training samples held out for evaluation and must be in (0, 0.5]")
        .field_path(".evalSplit"),
)]
pub struct DatasetSpec {
    /// Training data: `pvc://CLAIM/PATH.jsonl`, `file:///PATH.jsonl` or `configmap://NAME/KEY`.
    pub train: DataSource,
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
}

/// A JSON Lines file the trainer reads.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.uri.matches('^(pvc://[a-z0-9]([-.a-z0-9]*[a-z0-9])?(/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+))+|file:///.+|configmap://[a-z0-9]([-.a-z0-9]*[a-z0-9])?/([-_a-zA-Z0-9][-._a-zA-Z0-9]*|[.][-_a-zA-Z0-9][-._a-zA-Z0-9]*|[.][.][-._a-zA-Z0-9]+))$')")
    .message("dataset URIs must be pvc://CLAIM/PATH (no . or .. segments), file:///PATH or configmap://NAME/KEY")
    .field_path(".uri"))]
pub struct DataSource {
    /// `pvc://CLAIM/PATH`, `file:///PATH` or `configmap://NAME/KEY`.
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
