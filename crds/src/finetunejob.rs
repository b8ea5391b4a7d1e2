//! The `FinetuneJob` resource: one fine-tuning run, from base model and data to an `Adapter`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::data::DatasetSpec;
use crate::model::BaseModel;
use crate::runtime::{Output, Resources, RunPolicy, Storage};
use crate::s3::S3Access;
use crate::training::{
    AdapterSettings, CheckpointPolicy, Evaluation, ForgettingGuard, Hyperparameters, Method,
    Vocabulary,
};

/// A fine-tuning run: which base model learns from which data, how, and where the result goes.
// printcolumn(...) repeats the same keys on purpose; clippy reads them as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "finetune.dev",
    version = "v1alpha1",
    kind = "FinetuneJob",
    doc = "A fine-tuning run: a base model learns from a dataset (SFT or DPO, LoRA or full) and the result becomes an Adapter.",
    plural = "finetunejobs",
    shortname = "ftj",
    category = "finetune",
    namespaced,
    status = "FinetuneJobStatus",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress.percentText"),
    printcolumn(name = "Loss", type_ = "number", json_path = ".status.metrics.trainLoss"),
    printcolumn(name = "Eval-Loss", type_ = "number", json_path = ".status.metrics.evalLoss", priority = "1"),
    printcolumn(name = "Adapter", type_ = "string", json_path = ".status.adapterRef.name"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    // No fieldPath: the apiserver accepts field paths into the schema only, and metadata is not
    // part of it, so the message names the field itself.
    validation = Rule::new("size(self.metadata.name) <= 48")
        .message("metadata.name must be at most 48 characters: pods are named NAME-attempt-N and labelled with NAME (63 characters at most)"),
    validation = Rule::new("!has(self.status) || !has(self.status.startTime) || self.spec.baseModel == oldSelf.spec.baseModel")
        .message("spec.baseModel cannot change once the job has started: its checkpoints belong to that model; create a new FinetuneJob")
        .field_path(".spec.baseModel"),
    validation = Rule::new("!has(self.status) || !has(self.status.startTime) || self.spec.dataset == oldSelf.spec.dataset")
        .message("spec.dataset cannot change once the job has started: resuming would mix data; create a new FinetuneJob")
        .field_path(".spec.dataset"),
    validation = Rule::new("!has(self.status) || !has(self.status.startTime) || self.spec.method == oldSelf.spec.method")
        .message("spec.method cannot change once the job has started; create a new FinetuneJob")
        .field_path(".spec.method"),
    validation = Rule::new("!has(self.status) || !has(self.status.startTime) || self.spec.adapter == oldSelf.spec.adapter")
        .message("spec.adapter cannot change once the job has started: checkpoints hold that adapter's weights; create a new FinetuneJob")
        .field_path(".spec.adapter"),
    validation = Rule::new("!has(self.status) || !has(self.status.startTime) || self.spec.hyperparameters == oldSelf.spec.hyperparameters")
        .message("spec.hyperparameters cannot change once the job has started: an exact resume needs the same schedule; create a new FinetuneJob")
        .field_path(".spec.hyperparameters"),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.method.type != 'dpo' || self.dataset.format == 'preference'")
        .message("method.type dpo trains on preference pairs: set dataset.format: preference")
        .field_path(".dataset.format"),
    validation = Rule::new("self.dataset.format != 'preference' || self.method.type == 'dpo'")
        .message("dataset.format preference is only used by method.type: dpo")
        .field_path(".method.type"),
    validation = Rule::new("!has(self.evaluation) || !has(self.evaluation.earlyStopping) || has(self.dataset.eval) || has(self.dataset.evalSplit)")
        .message("evaluation.earlyStopping needs eval data: set dataset.eval or dataset.evalSplit")
        .field_path(".evaluation.earlyStopping"),
    validation = Rule::new("!has(self.forgettingGuard) || !has(self.forgettingGuard.l2ToInit) || self.adapter.type == 'full'")
        .message("forgettingGuard.l2ToInit pulls full fine-tuning toward the initial weights; with LoRA use selfDistillation or selfReplay")
        .field_path(".forgettingGuard.l2ToInit"),
    validation = Rule::new("!has(self.forgettingGuard) || !has(self.forgettingGuard.layerAnchor) || self.adapter.type == 'lora'")
        .message("forgettingGuard.layerAnchor holds a LoRA adapter's change to each layer's output; full fine-tuning uses l2ToInit")
        .field_path(".forgettingGuard.layerAnchor"),
)]
pub struct FinetuneJobSpec {
    /// The pretrained model to start from.
    pub base_model: BaseModel,
    /// Training and evaluation data.
    pub dataset: DatasetSpec,
    /// Training objective: supervised fine-tuning or preference alignment.
    #[serde(default)]
    pub method: Method,
    /// LoRA adapters or full fine-tuning.
    #[serde(default)]
    pub adapter: AdapterSettings,
    /// Optimisation settings.
    pub hyperparameters: Hyperparameters,
    /// Evaluation beyond the training loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<Evaluation>,
    /// Guards against catastrophic forgetting of general abilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forgetting_guard: Option<ForgettingGuard>,
    /// Tokens to add to the vocabulary before training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocabulary: Option<Vocabulary>,
    /// Checkpoint interval and retention.
    #[serde(default)]
    pub checkpoint: CheckpointPolicy,
    /// Storage for checkpoints and outputs.
    #[serde(default)]
    pub storage: Storage,
    /// Resources and placement of the trainer pod.
    #[serde(default)]
    pub resources: Resources,
    /// Retries, deadlines and suspension.
    #[serde(default)]
    pub run_policy: RunPolicy,
    /// The result's name and extra exports.
    #[serde(default)]
    pub output: Output,
    /// Endpoint and credentials for the job's `s3://` URIs (datasets, `output.uri`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Access>,
    /// Trainer image; the operator's default when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
}

/// Lifecycle phases, in the order a successful job passes them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum JobPhase {
    /// Accepted; children being created.
    #[default]
    Pending,
    /// Waiting for GPUs or admission.
    Queued,
    /// The trainer is running.
    Running,
    /// Finished; the adapter is ready.
    Succeeded,
    /// Finished without a result; see the conditions for why.
    Failed,
    /// Stopped at a checkpoint by `runPolicy.suspend`.
    Suspended,
}

impl JobPhase {
    /// Every phase, in declaration order.
    pub const ALL: [JobPhase; 6] = [
        Self::Pending,
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Suspended,
    ];
}

/// The observed state of a FinetuneJob.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FinetuneJobStatus {
    /// Where the job is in its lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    /// Latest observations, one per type (Created, Queued, Running, Succeeded, Failed, ...), each
    /// with a machine-readable reason and a message for people.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Training progress as reported by the trainer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Latest training and evaluation metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<TrainingMetrics>,
    /// The newest verified checkpoint; retries resume from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_checkpoint: Option<CheckpointRef>,
    /// Attempts that failed and counted against `runPolicy.backoffLimit`.
    #[serde(default)]
    pub failed_attempts: i32,
    /// Attempts ended by preemption or eviction; not counted against the backoff limit.
    #[serde(default)]
    pub preemptions: i32,
    /// The most recent attempts, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub attempts: Vec<Attempt>,
    /// When the next attempt starts, while backing off after a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_time: Option<Time>,
    /// The commit an `hf://` base model's revision resolved to (set once the trainer has
    /// fetched it; every later attempt loads the same commit from the cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_commit: Option<String>,
    /// The Adapter this job produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_ref: Option<AdapterRef>,
    /// When the first attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Training progress.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Optimizer steps done.
    pub step: i64,
    /// Optimizer steps planned.
    pub total_steps: i64,
    /// Epochs done, fractional.
    pub epoch: f64,
    /// Share of steps done, 0–100.
    pub percent: f64,
    /// `percent` formatted for `kubectl get` (e.g. "42%").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent_text: Option<String>,
    /// Estimated seconds until training ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
    /// While the trainer downloads an `hf://` base model: bytes done and total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<crate::contract::DownloadProgress>,
    /// When the trainer last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_time: Option<Time>,
}

/// Training and evaluation metrics; absent values were not measured.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingMetrics {
    /// Mean token loss of the last optimizer step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    /// Mean token loss on the eval set at the last evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Lowest eval loss so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_eval_loss: Option<f64>,
    /// Current learning rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// Training throughput.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Tokens trained on so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_tokens: Option<i64>,
    /// Share of the base model's general answers the tuned model preserves, 0–1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_score: Option<f64>,
    /// Retention-set loss after minus before training (forgetting shows as a positive delta).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_loss_delta: Option<f64>,
    /// Exact-match accuracy of generated eval answers, 0–1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_exact_match: Option<f64>,
    /// DPO: share of held-out pairs where the chosen answer has the higher reward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference_accuracy: Option<f64>,
    /// DPO: mean reward margin chosen − rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_margin: Option<f64>,
    /// Eval samples that copy a training sample or share most of their specific n-grams with
    /// training text (`evaluation.contamination`); the list, with the training lines they copy,
    /// is in the run's `training_summary.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contaminated_eval_samples: Option<i64>,
    /// Sequences per forward pass, when smaller than `hyperparameters.batchSize` (set, or halved
    /// by the trainer after running out of memory; the update is unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch_size: Option<i64>,
}

/// A checkpoint on the job's storage.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointRef {
    /// Optimizer step the checkpoint was written after.
    pub step: i64,
    /// Path on the job's storage.
    pub path: String,
    /// When it was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// One run of the trainer pod.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    /// 0 for the first attempt.
    pub index: i32,
    /// The pod that ran it.
    pub pod_name: String,
    /// When the pod started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the pod ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
    /// Why it ended (e.g. Completed, Preempted, OutOfMemory, InvalidInput, Diverged, Error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The trainer's exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The checkpoint step this attempt resumed from (absent when it started fresh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<i64>,
    /// The trainer's or kubelet's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The gang's pods when `resources.nodes` is above 1, by rank: rank 0 is created first and
    /// the others once it has an address to meet at. Empty for a one-pod attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<Member>,
}

/// One pod of a gang attempt.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// Its rank among the attempt's pods (node rank).
    pub rank: i32,
    /// The pod.
    pub pod_name: String,
    /// The node it runs on, once scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The pod's phase as last seen (Pending, Running, Succeeded, Failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

/// A reference to an Adapter in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterRef {
    /// The Adapter's name.
    pub name: String,
}
