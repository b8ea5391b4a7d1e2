//! The `Adapter` resource: a fine-tuned adapter with verified files and lineage.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::finetunejob::TrainingMetrics;
use crate::model::BaseModel;
use crate::s3::S3Access;
use crate::training::Hyperparameters;

/// A LoRA adapter (or fully tuned model) that a FinetuneJob produced or a user registered.
// printcolumn(...) repeats the same keys on purpose; clippy reads them as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "finetune.dev",
    version = "v1alpha1",
    kind = "Adapter",
    doc = "A fine-tuned LoRA adapter (or fully tuned model) with verified files and lineage.",
    plural = "adapters",
    shortname = "adp",
    category = "finetune",
    namespaced,
    status = "AdapterStatus",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Base", type_ = "string", json_path = ".spec.baseModel.uri"),
    printcolumn(name = "Job", type_ = "string", json_path = ".spec.source.fromJob"),
    printcolumn(
        name = "Eval-Loss",
        type_ = "number",
        json_path = ".status.lineage.metrics.evalLoss"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AdapterSpec {
    /// The base model the adapter applies to.
    pub base_model: BaseModel,
    /// Where the adapter's files are.
    pub source: AdapterSource,
    /// Expected LoRA settings; verification fails when `adapter_config.json` disagrees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<AdapterLora>,
    /// Expected sha256 of files, by file name; verification fails on a mismatch.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub expected_sha256: BTreeMap<String, String>,
    /// Endpoint and credentials when `source.uri` is `s3://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Access>,
}

/// Where an adapter's files are: exactly one of `uri` and `fromJob`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.uri) != has(self.fromJob)")
        .message("adapter source needs exactly one of uri or fromJob"),
    validation = Rule::new("!has(self.uri) || self.uri.matches('^(pvc://[a-z0-9]([-.a-z0-9]*[a-z0-9])?(/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+))+|file:///.+|s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+))+)$')")
        .message("adapter source.uri must be pvc://CLAIM/PATH (no . or .. segments), file:///PATH or s3://BUCKET/PREFIX")
        .field_path(".uri"),
)]
pub struct AdapterSource {
    /// A directory in PEFT layout (`adapter_config.json`, `adapter_model.safetensors`):
    /// `pvc://CLAIM/PATH`, `file:///PATH`, or `s3://BUCKET/PREFIX` holding a job's uploaded
    /// `output.uri` (its `finetune-manifest.json` lists the files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub uri: Option<String>,
    /// The FinetuneJob in this namespace that produced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub from_job: Option<String>,
}

/// LoRA settings recorded in, and checked against, `adapter_config.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterLora {
    /// Rank of the update matrices.
    #[schemars(range(min = 1, max = 1024))]
    pub rank: i32,
    /// Scaling numerator.
    #[schemars(extend("minimum" = 0.0, "exclusiveMinimum" = true))]
    pub alpha: f64,
    /// Adapted modules.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub target_modules: Vec<String>,
    /// rsLoRA scaling.
    #[serde(default)]
    pub rslora: bool,
}

/// Adapter lifecycle.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AdapterPhase {
    /// Not yet looked at.
    #[default]
    Pending,
    /// A verification pod is checking the files.
    Verifying,
    /// Files verified; ready to serve.
    Ready,
    /// Verification failed; see the conditions.
    Failed,
}

/// The observed state of an Adapter.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterStatus {
    /// Where verification stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AdapterPhase>,
    /// Latest observations, one per type (Verified, Ready, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The adapter's files with size and sha256, as verified.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub files: Vec<FileDigest>,
    /// How the adapter was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Lineage>,
    /// When verification last succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_time: Option<Time>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One file with its digest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileDigest {
    /// Path relative to the adapter directory.
    pub name: String,
    /// Hex sha256.
    pub sha256: String,
    /// Bytes.
    pub size: i64,
}

/// One source of a training mixture, as trained on.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceDigest {
    /// The source's URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// sha256 over its curated samples, before the draw.
    pub digest: String,
    /// Its samples in each epoch of the mixture.
    pub samples: i64,
}

/// Where an adapter came from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lineage {
    /// The FinetuneJob that trained it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The job's UID, which survives a job of the same name being recreated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_uid: Option<String>,
    /// The base model URI it was trained from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// The commit an `hf://` base's revision resolved to when it was trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_commit: Option<String>,
    /// sha256 over the training data after deduplication and formatting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_digest: Option<String>,
    /// For a mixture (`dataset.train.sources`): each source's digest and samples per epoch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub dataset_sources: Vec<SourceDigest>,
    /// The hyperparameters it was trained with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hyperparameters: Option<Hyperparameters>,
    /// Final metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<TrainingMetrics>,
    /// The optimizer step of the checkpoint it was exported from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_step: Option<i64>,
}
