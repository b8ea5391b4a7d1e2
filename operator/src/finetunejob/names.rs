//! Deterministic names and labels of a job's children, so a repeated reconcile finds (rather
//! than duplicates) what an earlier one created.

use std::collections::BTreeMap;

/// Label carrying the owning FinetuneJob's name.
pub const JOB_LABEL: &str = "finetune.dev/job";
/// Label carrying the 0-based attempt number of a trainer pod.
pub const ATTEMPT_LABEL: &str = "finetune.dev/attempt";
/// Label carrying a gang member's rank (node rank) among its attempt's pods.
pub const RANK_LABEL: &str = "finetune.dev/rank";
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

/// The pod of `rank` in a gang attempt of `nodes` pods: a one-pod attempt keeps the plain name.
pub fn member_pod(job: &str, attempt: i32, rank: i32, nodes: i32) -> String {
    if nodes <= 1 {
        trainer_pod(job, attempt)
    } else {
        format!("{job}-attempt-{attempt}-rank-{rank}")
    }
}

/// Kueue's pod group (its Workload's name) of one gang attempt: a new one per attempt, so a
/// retry is a new admission and never adopts the ended attempt's Workload.
/// Kueue takes it from a label, so it is cut to 63 characters, keeping it unique with a hash.
pub fn pod_group(job: &str, attempt: i32) -> String {
    let name = format!("{job}-attempt-{attempt}");
    if name.len() <= 63 {
        return name;
    }
    let hash = format!("{:08x}", crate::api::fnv1a(name.as_bytes()) as u32);
    let cut = floor_boundary(job, 63 - hash.len() - 2 - format!("{attempt}").len());
    format!(
        "{}-{hash}-{attempt}",
        job[..cut].trim_end_matches(['-', '.'])
    )
}

fn floor_boundary(text: &str, at: usize) -> usize {
    (0..=at.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gang_members_are_named_by_rank_and_a_one_pod_attempt_keeps_its_name() {
        assert_eq!(member_pod("j", 2, 0, 1), "j-attempt-2");
        assert_eq!(member_pod("j", 2, 1, 4), "j-attempt-2-rank-1");
    }

    #[test]
    fn pod_groups_fit_a_label_and_stay_distinct() {
        assert_eq!(pod_group("j", 3), "j-attempt-3");
        let long = "a".repeat(80);
        let (first, second) = (pod_group(&long, 1), pod_group(&long, 2));
        assert!(first.len() <= 63 && second.len() <= 63, "{first} {second}");
        assert_ne!(first, second);
        assert!(
            first.ends_with("-1") && first.starts_with("aaaa"),
            "{first}"
        );
    }
}
