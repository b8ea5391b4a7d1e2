//! A gang attempt: `resources.nodes` pods that train as one data-parallel group (one rank per
//! pod, or one per GPU inside each through the trainer's launcher).
//!
//! Rank 0 is created first; the others once it has a pod IP, which they are given as
//! `MASTER_ADDR`. Pod IPs reach every pod in a conformant cluster, so the gang needs no Service
//! and no DNS record, and no member starts before there is an address to meet at (Kubeflow's
//! PyTorchJob adds an init container to wait for the master's DNS name for the same reason).
//! Under Kueue every member carries the attempt's pod group and rank 0 asks for fast admission,
//! so quota for the whole gang is reserved before rank 0 runs and the others are admitted into
//! it as they are created.

use finetune_crds::finetunejob::{Attempt, Member};
use finetune_crds::{FinetuneJob, FinetuneJobStatus};
use k8s_openapi::api::core::v1::Pod;

use super::attempts::{Failure, Observed, PodState, rank_of};
use super::names;

/// The members of gang `attempt` of job `name` with `nodes` pods, the first `created` of them:
/// empty for a one-pod attempt.
pub fn members(name: &str, attempt: i32, nodes: i32, created: i32) -> Vec<Member> {
    if nodes <= 1 {
        return Vec::new();
    }
    (0..created.min(nodes))
        .map(|rank| Member {
            rank,
            pod_name: names::member_pod(name, attempt, rank, nodes),
            ..Member::default()
        })
        .collect()
}

/// The members on record with where their pods run and their phase as `pods` show them now;
/// one whose pod is gone keeps what was last seen.
pub(super) fn seen(mut recorded: Vec<Member>, pods: &[&Pod]) -> Vec<Member> {
    for member in &mut recorded {
        let pod = pods.iter().find(|p| {
            p.metadata.name.as_deref() == Some(&member.pod_name) && rank_of(p) == member.rank
        });
        if let Some(pod) = pod {
            member.node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            member.phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        }
    }
    recorded
}

/// The failure of a gang that lost a member pod before it ended: a preemption, never charged.
pub(super) fn member_lost(message: String) -> Failure {
    Failure {
        reason: "Preempted".into(),
        exit_code: None,
        message: Some(message),
        retryable: true,
        counts_against_backoff: false,
        termination: None,
        finished_at: None,
    }
}

/// Rank 0's address when the other members of the `latest` attempt are due: the job runs a
/// gang, only rank 0 is on record, it has not ended and it has a pod IP.
pub(super) fn rank_zero_address(
    job: &FinetuneJob,
    status: &FinetuneJobStatus,
    latest: &Observed,
) -> Option<String> {
    let record: &Attempt = status.attempts.iter().find(|a| a.index == latest.index)?;
    if job.spec.resources.nodes <= 1 || record.members.len() != 1 {
        return None;
    }
    if matches!(latest.state, PodState::Failed(_) | PodState::Succeeded(_)) {
        return None;
    }
    let rank_zero = latest.members.iter().find(|pod| rank_of(pod) == 0)?;
    let live = rank_zero.metadata.deletion_timestamp.is_none();
    let status = rank_zero.status.as_ref()?;
    let phase = status.phase.as_deref();
    let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
    (live && matches!(phase, Some("Pending" | "Running"))).then(|| ip.to_string())
}

/// The members of `latest` still to be stopped: not ended and not already being deleted.
pub(super) fn live_members(latest: &Observed) -> Vec<String> {
    unended(latest)
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .map(|pod| pod.metadata.name.clone().unwrap_or_default())
        .collect()
}

/// Whether a member of `latest` is being deleted and has not ended yet: rank 0 may still be
/// writing its SIGTERM checkpoint, which the next attempt must find whole.
pub(super) fn members_stopping(latest: &Observed) -> bool {
    unended(latest).any(|pod| pod.metadata.deletion_timestamp.is_some())
}

fn unended<'a>(latest: &'a Observed) -> impl Iterator<Item = &'a &'a Pod> {
    latest.members.iter().filter(|pod| {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        !matches!(phase, Some("Succeeded" | "Failed"))
    })
}

/// Why Kueue holds a Workload (its JSON), in its own words: the `QuotaReserved=False` reason
/// and message (e.g. `Pending: couldn't assign flavors to pod set ...: insufficient quota for
/// nvidia.com/gpu ...`), or that it is admitted and its pods are about to be released.
pub fn admission_message(workload: &serde_json::Value) -> String {
    let conditions = workload["status"]["conditions"].as_array();
    let condition = |type_: &str| {
        conditions
            .into_iter()
            .flatten()
            .find(|c| c["type"] == type_)
    };
    let text = |c: &serde_json::Value| {
        format!(
            "{}: {}",
            c["reason"].as_str().unwrap_or("Unknown"),
            c["message"].as_str().unwrap_or("")
        )
    };
    match (condition("QuotaReserved"), condition("Admitted")) {
        (_, Some(admitted)) if admitted["status"] == "True" => {
            "admitted; Kueue is releasing its pods".into()
        }
        (Some(reserved), _) if reserved["status"] == "False" => text(reserved),
        (Some(_), Some(admitted)) => text(admitted),
        _ => "Kueue has not considered its Workload yet".into(),
    }
}

#[cfg(test)]
mod tests {
    use finetune_crds::JobPhase;
    use k8s_openapi::jiff::Timestamp;

    use finetune_crds::contract::TerminationMessage;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::super::attempts::fixtures::{example_job, exited, finished, now};
    use super::super::attempts::succeeded_termination;
    use super::super::status::{Action, derive};
    use super::*;

    fn gang_job() -> FinetuneJob {
        let mut job = example_job();
        job.metadata.name = Some("j".into());
        job.spec.resources.nodes = 2;
        job
    }

    /// Member `rank` of `attempt` in `phase`, with a pod IP once past Pending-unscheduled.
    fn member(attempt: i32, rank: i32, phase: &str, ip: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": names::member_pod("j", attempt, rank, 2),
                "labels": {names::ATTEMPT_LABEL: attempt.to_string(),
                           names::RANK_LABEL: rank.to_string()}},
            "spec": {"nodeName": format!("node-{rank}"), "containers": []},
            "status": {"phase": phase, "podIP": ip}
        }))
        .unwrap()
    }

    /// Derives `job` from `pods` and carries the status forward, as a reconcile would.
    fn step(job: &mut FinetuneJob, pods: &[Pod], at: Timestamp) -> Action {
        let derived = derive(job, pods, None, at);
        job.status = Some(derived.status);
        derived.action
    }

    #[test]
    fn rank_zero_starts_first_and_the_others_meet_it_at_its_pod_ip() {
        let mut job = gang_job();
        assert_eq!(step(&mut job, &[], now()), Action::CreatePod(0));
        let record = &job.status.as_ref().unwrap().attempts[0];
        assert_eq!(record.pod_name, "j-attempt-0-rank-0");
        assert_eq!(record.members.len(), 1);

        // No address yet: nothing more to create.
        let waiting = [member(0, 0, "Pending", None)];
        assert_eq!(step(&mut job, &waiting, now()), Action::Wait);
        let scheduled = [member(0, 0, "Pending", Some("10.0.0.7"))];
        assert_eq!(
            step(&mut job, &scheduled, now()),
            Action::CreateMembers {
                attempt: 0,
                master_addr: "10.0.0.7".into()
            }
        );
        let members = &job.status.as_ref().unwrap().attempts[0].members;
        let names: Vec<&str> = members.iter().map(|m| m.pod_name.as_str()).collect();
        assert_eq!(names, ["j-attempt-0-rank-0", "j-attempt-0-rank-1"]);

        // Rank 0 alone running is not yet a running gang; both are.
        let half = [
            member(0, 0, "Running", Some("10.0.0.7")),
            member(0, 1, "Pending", None),
        ];
        assert_eq!(step(&mut job, &half, now()), Action::Wait);
        assert_eq!(job.status.as_ref().unwrap().phase, Some(JobPhase::Pending));
        let both = [
            member(0, 0, "Running", Some("10.0.0.7")),
            member(0, 1, "Running", Some("10.0.0.8")),
        ];
        assert_eq!(
            step(&mut job, &both, now()),
            Action::PollProgress("j-attempt-0-rank-0".into())
        );
        let status = job.status.as_ref().unwrap();
        assert_eq!(status.phase, Some(JobPhase::Running));
        let nodes: Vec<_> = status.attempts[0]
            .members
            .iter()
            .map(|m| (m.node_name.as_deref(), m.phase.as_deref()))
            .collect();
        assert_eq!(
            nodes,
            [
                (Some("node-0"), Some("Running")),
                (Some("node-1"), Some("Running"))
            ]
        );

        // Every member succeeded: the job did.
        let done = [
            member(0, 0, "Succeeded", Some("10.0.0.7")),
            member(0, 1, "Succeeded", Some("10.0.0.8")),
        ];
        step(&mut job, &done, now());
        assert_eq!(
            job.status.as_ref().unwrap().phase,
            Some(JobPhase::Succeeded)
        );
        // What the job registers is rank 0's report, whichever member the cache lists first.
        let report = |rank: i32, digest: &str| {
            let message = TerminationMessage {
                dataset_digest: Some(digest.into()),
                ..TerminationMessage::default()
            };
            exited(
                member(0, rank, "Succeeded", None),
                0,
                "Completed",
                Some(&message),
            )
        };
        let registered = succeeded_termination(&[report(1, "rank-1"), report(0, "rank-0")]);
        assert_eq!(
            registered.unwrap().dataset_digest.as_deref(),
            Some("rank-0")
        );
    }

    fn running_gang(job: &mut FinetuneJob) {
        step(job, &[], now());
        step(job, &[member(0, 0, "Pending", Some("10.0.0.7"))], now());
        let both = [
            member(0, 0, "Running", Some("10.0.0.7")),
            member(0, 1, "Running", Some("10.0.0.8")),
        ];
        step(job, &both, now());
    }

    #[test]
    fn a_deleted_member_is_a_preemption_of_the_gang_which_stops_and_restarts_whole() {
        let mut job = gang_job();
        running_gang(&mut job);
        // Rank 1's pod is gone under a running gang: rank 0 is stopped first, nothing charged.
        let alone = [member(0, 0, "Running", Some("10.0.0.7"))];
        assert_eq!(
            step(&mut job, &alone, now()),
            Action::DeletePods(vec!["j-attempt-0-rank-0".into()])
        );
        let status = job.status.as_ref().unwrap();
        assert_eq!((status.preemptions, status.failed_attempts), (1, 0));
        let record = &status.attempts[0];
        assert_eq!(record.reason.as_deref(), Some("Preempted"));
        assert!(
            record
                .message
                .as_deref()
                .unwrap()
                .contains("j-attempt-0-rank-1"),
            "{record:?}"
        );
        // While rank 0 is being deleted (writing its SIGTERM checkpoint) nothing new starts.
        let mut terminating = member(0, 0, "Running", Some("10.0.0.7"));
        terminating.metadata.deletion_timestamp = Some(Time(now()));
        assert_eq!(step(&mut job, &[terminating], now()), Action::Wait);
        // Rank 0 crashed on its lost peer instead: still the preemption decided first.
        let crashed = exited(member(0, 0, "Failed", Some("10.0.0.7")), 1, "Error", None);
        assert_eq!(step(&mut job, &[crashed], now()), Action::CreatePod(1));
        let status = job.status.as_ref().unwrap();
        assert_eq!((status.preemptions, status.failed_attempts), (1, 0));
        assert_eq!(status.attempts[0].reason.as_deref(), Some("Preempted"));
        // Or it checkpointed and exited 143: the same.
        let mut job = gang_job();
        running_gang(&mut job);
        step(
            &mut job,
            &[member(0, 0, "Running", Some("10.0.0.7"))],
            now(),
        );
        let stopped = exited(member(0, 0, "Failed", Some("10.0.0.7")), 143, "Error", None);
        assert_eq!(step(&mut job, &[stopped], now()), Action::CreatePod(1));
        let status = job.status.as_ref().unwrap();
        assert_eq!((status.preemptions, status.failed_attempts), (1, 0));
        assert_eq!(status.attempts[1].pod_name, "j-attempt-1-rank-0");
    }

    #[test]
    fn a_failed_member_ends_the_attempt_charged_and_named_and_the_others_are_stopped() {
        let mut job = gang_job();
        running_gang(&mut job);
        let crashed = finished(
            exited(member(0, 1, "Failed", Some("10.0.0.8")), 1, "Error", None),
            now(),
        );
        let pods = [member(0, 0, "Running", Some("10.0.0.7")), crashed.clone()];
        assert_eq!(
            step(&mut job, &pods, now()),
            Action::DeletePods(vec!["j-attempt-0-rank-0".into()])
        );
        let status = job.status.as_ref().unwrap();
        assert_eq!(status.failed_attempts, 1);
        let record = &status.attempts[0];
        assert_eq!(record.pod_name, "j-attempt-0-rank-0");
        assert_eq!(record.exit_code, Some(1));
        assert!(
            record
                .message
                .as_deref()
                .unwrap()
                .starts_with("rank 1 (j-attempt-0-rank-1)"),
            "{record:?}"
        );
        // Rank 0, stopped by us, checkpoints and exits 143: the attempt stays rank 1's charged
        // failure (not also a preemption), and the retry waits out the backoff from it.
        let after = finished(
            exited(member(0, 0, "Failed", Some("10.0.0.7")), 143, "Error", None),
            now(),
        );
        assert_eq!(step(&mut job, &[after, crashed], now()), Action::Wait);
        let status = job.status.as_ref().unwrap();
        assert_eq!((status.failed_attempts, status.preemptions), (1, 0));
        assert_eq!(status.attempts[0].reason.as_deref(), Some("Error"));
        assert!(status.next_retry_time.is_some());
    }

    #[test]
    fn kueues_reason_for_a_held_gang_is_the_jobs_queued_message() {
        let mut job = gang_job();
        step(&mut job, &[], now());
        let mut gated = member(0, 0, "Pending", None);
        gated.status.as_mut().unwrap().conditions =
            Some(vec![k8s_openapi::api::core::v1::PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("SchedulingGated".into()),
                ..Default::default()
            }]);
        let workload = serde_json::json!({"status": {"conditions": [
            {"type": "QuotaReserved", "status": "False", "reason": "Pending",
             "message": "couldn't assign flavors to pod set 1a2b: insufficient quota for nvidia.com/gpu"}
        ]}});
        let why = admission_message(&workload);
        let derived = super::super::status::derive_queued(&job, &[gated], None, Some(&why), now());
        assert_eq!(derived.status.phase, Some(JobPhase::Queued));
        let queued = derived
            .status
            .conditions
            .iter()
            .find(|c| c.status == "True")
            .unwrap();
        assert_eq!(queued.reason, "AwaitingAdmission");
        assert!(
            queued.message.ends_with("Pending: couldn't assign flavors to pod set 1a2b: insufficient quota for nvidia.com/gpu"),
            "{}",
            queued.message
        );
        let admitted = serde_json::json!({"status": {"conditions": [
            {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": ""},
            {"type": "Admitted", "status": "True", "reason": "Admitted", "message": ""}
        ]}});
        assert_eq!(
            admission_message(&admitted),
            "admitted; Kueue is releasing its pods"
        );
        assert_eq!(
            admission_message(&serde_json::json!({})),
            "Kueue has not considered its Workload yet"
        );
    }

    #[test]
    fn a_preempted_member_makes_the_gang_preempted_whatever_the_others_did_after() {
        let mut job = gang_job();
        running_gang(&mut job);
        let evicted: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "j-attempt-0-rank-1",
                         "labels": {names::ATTEMPT_LABEL: "0", names::RANK_LABEL: "1"}},
            "status": {"phase": "Failed", "reason": "Evicted"}
        }))
        .unwrap();
        // Rank 0 crashed later on the lost peer; the eviction is the cause.
        let later: Timestamp = "2026-11-26T12:00:05Z".parse().unwrap();
        let peer_lost = finished(
            exited(member(0, 0, "Failed", Some("10.0.0.7")), 1, "Error", None),
            later,
        );
        assert_eq!(
            step(&mut job, &[peer_lost, evicted], later),
            Action::CreatePod(1)
        );
        let status = job.status.as_ref().unwrap();
        assert_eq!((status.preemptions, status.failed_attempts), (1, 0));
    }
}
