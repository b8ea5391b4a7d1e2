//! Deterministic names and labels of a job's children, so a repeated reconcile finds (rather
//! than duplicates) what an earlier one created.

use std::collections::BTreeMap;

/// Label carrying the owning FinetuneJob's name.
pub const JOB_LABEL: &str = "finetune.dev/job";
/// Label carrying the 0-based attempt number of a trainer pod.
pub const ATTEMPT_LABEL: &str = "finetune.dev/attempt";
/// Kueue's queue label, passed through from the job to its pods.
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// Kueue's workload priority class, passed through like the queue name.
pub const KUEUE_PRIORITY_LABEL: &str = "kueue.x-k8s.io/priority-class";

/// The ConfigMap holding the job manifest.
pub fn manifest_config_map(job: &str) -> String {
    format!("{job}-manifest")
}

/// The PersistentVolumeClaim the operator creates for checkpoints and outputs.
pub fn storage_claim(job: &str) -> String {
    format!("{job}-storage")
}

/// The trainer pod of one attempt.
pub fn trainer_pod(job: &str, attempt: i32) -> String {
    format!("{job}-attempt-{attempt}")
}

/// Labels on every child of a job.
pub fn child_labels(job: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "finetune-trainer".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "finetune-operator".to_string(),
        ),
        (JOB_LABEL.to_string(), job.to_string()),
    ])
}
