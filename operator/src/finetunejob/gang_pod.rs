//! What makes a trainer pod a gang member (`resources.nodes` > 1): the torch.distributed
//! variables, the launcher's node flags, Kueue's pod-group metadata, and a preference to run
//! apart from the other members. Pure, like `build`, which calls it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Container, EnvVar, EnvVarSource, ObjectFieldSelector, PodAffinityTerm,
    PodAntiAffinity, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use super::build::Member;
use super::names;
use crate::pods::plain_env;

/// Where rank 0's TCPStore listens, on its pod IP (torchrun's default port).
pub const MASTER_PORT: u16 = 29500;

/// Kueue's plain-pod group: every member names the attempt's group and its size, so Kueue
/// makes one Workload of them and admits it whole.
pub const KUEUE_GROUP_LABEL: &str = "kueue.x-k8s.io/pod-group-name";
/// The group's size, on every member.
pub const KUEUE_TOTAL_COUNT: &str = "kueue.x-k8s.io/pod-group-total-count";
/// Admit on the first member: ranks 1.. are created only once rank 0 runs, so Kueue must
/// reserve the whole group's quota from rank 0 alone.
pub const KUEUE_FAST_ADMISSION: &str = "kueue.x-k8s.io/pod-group-fast-admission";
/// Members are never replaced inside an attempt (the retry is a new group), so Kueue finishes
/// the Workload, freeing its quota, once no member runs.
pub const KUEUE_RETRIABLE: &str = "kueue.x-k8s.io/retriable-in-group";
/// The member's index in its group.
pub const KUEUE_POD_INDEX: &str = "kueue.x-k8s.io/pod-group-pod-index";

/// Kueue's pod-group labels and annotations on a member of `job`'s gang of `nodes`.
pub fn kueue_group(metadata: &mut ObjectMeta, job: &str, member: &Member, nodes: i32) {
    let labels = metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(
        KUEUE_GROUP_LABEL.into(),
        names::pod_group(job, member.attempt),
    );
    labels.insert(KUEUE_POD_INDEX.into(), member.rank.to_string());
    let annotations = metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(KUEUE_TOTAL_COUNT.into(), nodes.to_string());
    annotations.insert(KUEUE_FAST_ADMISSION.into(), "true".into());
    annotations.insert(KUEUE_RETRIABLE.into(), "false".into());
}

/// The torch.distributed variables of a member, and with several GPUs the launcher's node
/// flags (one rank per GPU, `nodes` × `gpus` in all). Rank 0 meets at its own pod IP (from the
/// downward API); the others are given it.
pub fn distributed(container: &mut Container, member: &Member, nodes: i32, gpus: i32) {
    let env = container.env.get_or_insert_with(Vec::new);
    env.push(match member.master_addr {
        Some(address) => plain_env("MASTER_ADDR", address),
        None => EnvVar {
            name: "MASTER_ADDR".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "status.podIP".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
    });
    env.push(plain_env("MASTER_PORT", &MASTER_PORT.to_string()));
    if gpus > 1 {
        // The launcher sets each local rank's variables from its flags.
        let flags = [
            "--nnodes".to_string(),
            nodes.to_string(),
            "--node-rank".into(),
            member.rank.to_string(),
            "--master-addr".into(),
            "$(MASTER_ADDR)".into(),
            "--master-port".into(),
            MASTER_PORT.to_string(),
        ];
        if let Some(args) = container.args.as_mut() {
            let at = args.iter().position(|a| a == "launch").map_or(0, |i| i + 1);
            args.splice(at..at, flags);
        }
        return;
    }
    for (name, value) in [
        ("WORLD_SIZE", nodes.to_string()),
        ("RANK", member.rank.to_string()),
        ("LOCAL_RANK", "0".into()),
        ("LOCAL_WORLD_SIZE", "1".into()),
    ] {
        env.push(plain_env(name, &value));
    }
}

/// Members prefer nodes without another member of the same attempt: a gang exists to use
/// several nodes' GPUs, and two members on one node would share its network and memory. A
/// preference, not a rule, so a gang still runs where one node has room for two members.
pub fn spread(job: &str, attempt: i32) -> Affinity {
    let selector = LabelSelector {
        match_labels: Some(BTreeMap::from([
            (names::JOB_LABEL.to_string(), job.to_string()),
            (names::ATTEMPT_LABEL.to_string(), attempt.to_string()),
        ])),
        ..LabelSelector::default()
    };
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(selector),
                        topology_key: "kubernetes.io/hostname".into(),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}
