//! Where and how the trainer pod runs: storage, resources, retries and the result's name.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Storage for checkpoints and outputs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.claimName) || (!has(self.size) && !has(self.storageClassName))")
        .message("storage.claimName uses an existing claim; size and storageClassName only apply when the operator creates one")
        .field_path(".claimName"),
    validation = Rule::new("!has(self.size) || string(self.size).matches('^([0-9]+([.][0-9]*)?|[.][0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$')")
        .message("storage.size must be a Kubernetes quantity such as 20Gi")
        .field_path(".size"),
)]
pub struct Storage {
    /// An existing PersistentVolumeClaim to use; otherwise the operator creates one owned by the
    /// job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: Option<String>,
    /// Size of the claim the operator creates (default 20Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// StorageClass of the claim the operator creates; the cluster default when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
}

/// Compute resources and placement of the trainer pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.cpu) || string(self.cpu).matches('^([0-9]+([.][0-9]*)?|[.][0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$')")
        .message("resources.cpu must be a Kubernetes quantity such as 4 or 500m")
        .field_path(".cpu"),
    validation = Rule::new("!has(self.memory) || string(self.memory).matches('^([0-9]+([.][0-9]*)?|[.][0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$')")
        .message("resources.memory must be a Kubernetes quantity such as 16Gi")
        .field_path(".memory"),
)]
pub struct Resources {
    /// GPUs for the trainer (0 trains on CPU). With more than one, the pod runs one
    /// data-parallel rank per GPU (NCCL): the same update as one process on the whole batch,
    /// in less time.
    #[serde(default = "default_gpus")]
    #[schemars(range(min = 0, max = 64))]
    pub gpus: i32,
    /// Pods in each attempt, one per node (default 1): a data-parallel gang of `nodes` pods,
    /// each with `gpus` GPUs (world size `nodes` × max(gpus, 1)). The gang is one attempt: a
    /// member that fails ends it, a member preempted or deleted makes it a preemption, and the
    /// retry restarts every member from the last checkpoint. With Kueue's queue label the pods
    /// carry its pod-group labels, so Kueue admits the gang whole. Rank 0 writes checkpoints
    /// and outputs; every member mounts the job's storage, which must therefore be
    /// ReadWriteMany (the claim the operator creates asks for it).
    // Left out when 1, so the manifests (and applied hashes) of jobs written before it existed
    // do not change.
    #[serde(default = "default_nodes", skip_serializing_if = "is_one")]
    #[schemars(range(min = 1, max = 256))]
    pub nodes: i32,
    /// Memory of each GPU (e.g. `80Gi` for an H100 80GB, `141Gi` for an H200). With it, the
    /// operator predicts the job's peak memory from the base model's shape before creating a pod
    /// and fails a job that cannot fit even one sequence per forward pass with reason
    /// `WillNotFit`, the numbers and the fixes (`finetune-trainer plan` prints the same plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory: Option<Quantity>,
    /// Extended resource name of the GPU.
    #[serde(default = "default_gpu_resource_name")]
    #[schemars(length(min = 1, max = 253))]
    pub gpu_resource_name: String,
    /// CPU request and limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory request and limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Node labels the pod must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pod tolerates (GPU nodes are often tainted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,
    /// PriorityClass of the pod; lets the scheduler preempt it for more important work (the job
    /// then resumes from its checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
}

fn default_nodes() -> i32 {
    1
}

fn is_one(value: &i32) -> bool {
    *value == 1
}

fn default_gpus() -> i32 {
    1
}
fn default_gpu_resource_name() -> String {
    "nvidia.com/gpu".into()
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            gpus: default_gpus(),
            nodes: default_nodes(),
            gpu_resource_name: default_gpu_resource_name(),
            gpu_memory: None,
            cpu: None,
            memory: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            priority_class_name: None,
        }
    }
}

/// Retries, deadlines and suspension, named as in batch/v1 Job and Kubeflow's runPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    /// Failed attempts allowed before the job fails. Preemptions and evictions are not counted;
    /// invalid input and divergence are never retried.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub backoff_limit: i32,
    /// Wall-clock limit for the whole job, from its first start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Stop the trainer (it checkpoints first) and keep the job; setting it back to false resumes
    /// from that checkpoint. Queue controllers such as Kueue admit jobs through this field.
    #[serde(default)]
    pub suspend: bool,
    /// Delete the finished job (and its children) this long after it succeeds or fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
}

fn default_backoff_limit() -> i32 {
    3
}

impl Default for RunPolicy {
    fn default() -> Self {
        Self {
            backoff_limit: default_backoff_limit(),
            active_deadline_seconds: None,
            suspend: false,
            ttl_seconds_after_finished: None,
        }
    }
}

/// What the job produces.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.adapterName) || self.adapterName.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("output.adapterName must be a lowercase DNS label: letters, digits and '-', starting and ending with a letter or digit")
        .field_path(".adapterName"),
    validation = Rule::new("!has(self.uri) || self.uri.matches('^s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+))+$')")
        .message("output.uri must be s3://BUCKET/PREFIX (no empty, . or .. segments)")
        .field_path(".uri"),
)]
pub struct Output {
    /// Name of the `Adapter` created on success; the job's name when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub adapter_name: Option<String>,
    /// Also upload the results (adapter or model files, exports, `training_summary.json`,
    /// `report.html`) to `s3://BUCKET/PREFIX/` once training succeeds, with
    /// `finetune-manifest.json` (every file's size and sha256) written last: a prefix without
    /// it is incomplete. An Adapter's `source.uri` can then point at the prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub uri: Option<String>,
    /// Also write a merged Hugging Face model (base + adapter folded in).
    #[serde(default)]
    pub merge: bool,
    /// Also export a GGUF file of the merged model in this type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gguf: Option<GgufType>,
}

/// GGUF export types.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GgufType {
    /// 16-bit floats.
    F16,
    /// 8-bit blocks of 32 with one f16 scale.
    Q8_0,
}
