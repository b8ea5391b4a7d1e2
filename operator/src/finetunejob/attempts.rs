//! A FinetuneJob's attempts: the state of each trainer pod, why a failed one failed (the
//! contract's exit codes, OOM kills, evictions) and whether another attempt may help, the
//! records in `status.attempts` with the counters charged to `backoffLimit`, and which failed
//! pods may go. Choosing the job's phase from the latest attempt is `status`'s part; this module
//! never sets a phase, so `status` uses it and not the other way round (no import circle).

use std::collections::BTreeMap;

use finetune_crds::contract::{ExitCode, TerminationMessage};
use finetune_crds::finetunejob::{Attempt, CheckpointRef, Member};
use finetune_crds::{FinetuneJob, FinetuneJobStatus, JobPhase};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::{gang, names};

/// Most attempts kept in `status.attempts`.
pub const MAX_ATTEMPTS_RECORDED: usize = 20;

/// The state of one trainer pod, read from its status.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum PodState {
    /// Not yet bound; `Some(message)` when the scheduler reported it unschedulable.
    Pending { unschedulable: Option<String> },
    /// The trainer is running.
    Running,
    /// The trainer exited 0.
    Succeeded(Option<TerminationMessage>),
    /// The pod failed; why, and whether another attempt may help.
    Failed(Failure),
}

/// A failed attempt, classified.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Failure {
    pub(super) reason: String,
    pub(super) exit_code: Option<i32>,
    pub(super) message: Option<String>,
    pub(super) retryable: bool,
    pub(super) counts_against_backoff: bool,
    pub(super) termination: Option<TerminationMessage>,
    /// When the trainer container ended (the kubelet's `finishedAt`).
    pub(super) finished_at: Option<Timestamp>,
}

/// One attempt as seen now: its pod (`None` once the pod is gone and only its record is left)
/// and its state.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Observed<'a> {
    pub(super) index: i32,
    /// The pod the attempt's record and state follow: the only one, or in a gang the member
    /// whose failure ended it, else rank 0.
    pub(super) pod: Option<&'a Pod>,
    pub(super) state: PodState,
    /// Every pod of the attempt seen now (a gang's members, by rank).
    pub(super) members: Vec<&'a Pod>,
}

/// Brings `status.attempts`, `status.failedAttempts` and `status.preemptions` up to date with the
/// job's trainer `pods` (any order; `nodes` per gang attempt) at time `now`, and takes what failed attempts reported
/// (metrics, checkpoints). `status` comes in as last written. Returns the latest attempt, the
/// one the job's phase follows.
pub(super) fn record_attempts<'a>(
    status: &mut FinetuneJobStatus,
    pods: &'a [Pod],
    nodes: i32,
    now: Timestamp,
) -> Option<Observed<'a>> {
    // Each attempt's state is read once from its pods; the records, the counters and the phase
    // use it.
    let mut by_attempt: BTreeMap<i32, Vec<&'a Pod>> = BTreeMap::new();
    for pod in pods {
        if let Some(index) = attempt_of(pod) {
            by_attempt.entry(index).or_default().push(pod);
        }
    }
    let mut attempts: Vec<Observed<'a>> = by_attempt
        .into_iter()
        .map(|(index, mut members)| {
            members.sort_by_key(|pod| rank_of(pod));
            let on_record = recorded_members(status, index);
            let (pod, mut state) = attempt_state(&members, &on_record, nodes);
            // A gang's end is decided once: its other members, stopped after it, must not turn
            // a failure into a preemption or the other way round (counted twice, or charged for
            // someone else's eviction). Their reports still count (rank 0's checkpoint).
            if let (Some(record), PodState::Failed(seen)) = (ended_gang(status, index), &state) {
                state = PodState::Failed(Failure {
                    termination: seen.termination.clone(),
                    ..failure_of(record)
                });
            }
            Observed {
                index,
                pod: Some(pod),
                state,
                members,
            }
        })
        .collect();
    // Attempts recorded earlier whose pods are gone. One that had not ended was deleted under the
    // trainer (an eviction through the API, a drain, `kubectl delete`): a preemption.
    let vanished: Vec<Attempt> = status
        .attempts
        .iter()
        .filter(|record| !attempts.iter().any(|a| a.index == record.index))
        .map(|record| vanished_attempt(record, now))
        .collect();
    for record in &vanished {
        attempts.push(Observed {
            index: record.index,
            pod: None,
            state: PodState::Failed(failure_of(record)),
            members: Vec::new(),
        });
    }
    attempts.sort_by_key(|a| a.index);
    status.attempts = attempts
        .iter()
        .map(|a| match a.pod {
            Some(pod) => {
                let mut record = match ended_gang(status, a.index) {
                    Some(ended) => ended.clone(),
                    None => attempt_record(a.index, pod, &a.state),
                };
                record.members = gang::seen(recorded_members(status, a.index), &a.members);
                // A gang's record is named by rank 0, whichever member ended it.
                if let Some(rank_zero) = record.members.first() {
                    record.pod_name = rank_zero.pod_name.clone();
                    // ... and says which member did, and why.
                    if let PodState::Failed(failure) = &a.state {
                        record.message = failure.message.clone().or(record.message);
                    }
                }
                record
            }
            None => vanished
                .iter()
                .find(|record| record.index == a.index)
                .cloned()
                .expect("every attempt without a pod is a vanished record"),
        })
        .collect();
    trim_attempts(&mut status.attempts);
    let failures: Vec<&Failure> = attempts
        .iter()
        .filter_map(|a| match &a.state {
            PodState::Failed(failure) => Some(failure),
            _ => None,
        })
        .collect();
    // Counters never go down: the records are bounded, and a pod removed long ago is no longer
    // there to be counted.
    status.failed_attempts = status
        .failed_attempts
        .max(failures.iter().filter(|f| f.counts_against_backoff).count() as i32);
    status.preemptions = status.preemptions.max(
        failures
            .iter()
            .filter(|f| f.retryable && !f.counts_against_backoff)
            .count() as i32,
    );
    for failure in failures {
        absorb_termination(status, failure.termination.as_ref());
    }
    attempts.pop()
}

/// Puts `attempt`, about to be created, on record before its pod is first seen: a pod evicted or
/// deleted before the next reconcile would otherwise leave no trace, and attempt 0 would start
/// again under the same name, its history and the preemption lost. The controller confirms with
/// the apiserver that an unended attempt's pod is really gone before it counts as vanished
/// ([`unended_attempts_without_pods`]).
/// A gang's rank 0 is the attempt's first member on record; the others join the record when
/// they are created ([`record_members`]).
pub(super) fn record_created(job: &FinetuneJob, status: &mut FinetuneJobStatus, attempt: i32) {
    if !status.attempts.iter().any(|a| a.index == attempt) {
        let name = job.metadata.name.clone().unwrap_or_default();
        let nodes = job.spec.resources.nodes;
        status.attempts.push(Attempt {
            index: attempt,
            pod_name: names::member_pod(&name, attempt, 0, nodes),
            members: gang::members(&name, attempt, nodes, 1),
            ..Attempt::default()
        });
        trim_attempts(&mut status.attempts);
    }
}

/// Puts every member of gang `attempt` on record as ranks 1.. are created (the status is written
/// right after them), for the same reason as [`record_created`]: a member deleted before it is
/// first seen is still missed.
pub(super) fn record_members(job: &FinetuneJob, status: &mut FinetuneJobStatus, attempt: i32) {
    let name = job.metadata.name.clone().unwrap_or_default();
    let nodes = job.spec.resources.nodes;
    if let Some(record) = status.attempts.iter_mut().find(|a| a.index == attempt) {
        let mut members = gang::members(&name, attempt, nodes, nodes);
        for member in &mut members {
            if let Some(seen) = record.members.iter().find(|m| m.rank == member.rank) {
                *member = seen.clone();
            }
        }
        record.members = members;
    }
}

/// The record of gang `attempt` once it has ended in failure (the first member that failed or
/// went missing decided how): kept as it was, members aside.
fn ended_gang(status: &FinetuneJobStatus, attempt: i32) -> Option<&Attempt> {
    status.attempts.iter().find(|a| {
        a.index == attempt
            && !a.members.is_empty()
            && a.reason.as_deref().is_some_and(|r| r != "Completed")
    })
}

fn recorded_members(status: &FinetuneJobStatus, attempt: i32) -> Vec<Member> {
    status
        .attempts
        .iter()
        .find(|a| a.index == attempt)
        .map(|a| a.members.clone())
        .unwrap_or_default()
}

/// Recorded attempts that had not ended and whose pods are not among `pods`: before they count
/// as vanished (a preemption), the controller asks the apiserver for these pods, since a pod
/// created moments ago may not have reached the watch cache yet.
pub fn unended_attempts_without_pods<'a>(job: &'a FinetuneJob, pods: &[Pod]) -> Vec<&'a Attempt> {
    job.status
        .iter()
        // A finished job's records are final (one stopped at its deadline may look unended).
        .filter(|s| !matches!(s.phase, Some(JobPhase::Succeeded | JobPhase::Failed)))
        .flat_map(|s| s.attempts.iter())
        .filter(|record| record.reason.is_none())
        .filter(|record| !pods.iter().any(|pod| attempt_of(pod) == Some(record.index)))
        .collect()
}

/// Gang members on record for attempts that have not ended whose pods are not among `pods`,
/// by name: like [`unended_attempts_without_pods`], the controller confirms each with the
/// apiserver before a missing member ends its attempt as a preemption.
pub fn unended_members_without_pods(job: &FinetuneJob, pods: &[Pod]) -> Vec<String> {
    let seen = |name: &str| {
        pods.iter()
            .any(|pod| pod.metadata.name.as_deref() == Some(name))
    };
    job.status
        .iter()
        .filter(|s| !matches!(s.phase, Some(JobPhase::Succeeded | JobPhase::Failed)))
        .flat_map(|s| s.attempts.iter())
        .filter(|record| record.reason.is_none())
        .flat_map(|record| record.members.iter())
        .filter(|member| !seen(&member.pod_name))
        .map(|member| member.pod_name.clone())
        .collect()
}

/// The termination message of the job's succeeded trainer pod, if one succeeded and wrote one.
/// A gang's is rank 0's: the only member that writes outputs.
pub fn succeeded_termination(pods: &[Pod]) -> Option<TerminationMessage> {
    let mut writers = pods.iter().filter(|pod| rank_of(pod) == 0);
    writers.find_map(|pod| match pod_state(pod) {
        PodState::Succeeded(termination) => termination,
        _ => None,
    })
}

/// Failed trainer pods to delete so that only the newest `keep` stay (for their logs): older
/// ones whose attempt is on record in `status` (ended), never the newest attempt's pod, which
/// the next derivation reads. Their attempts stay in `status.attempts` with exit code and reason.
pub fn failed_pods_to_prune(pods: &[Pod], status: &FinetuneJobStatus, keep: usize) -> Vec<String> {
    let newest = pods.iter().filter_map(attempt_of).max();
    let mut failed: Vec<(i32, String)> = pods
        .iter()
        .filter(|pod| pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed"))
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter_map(|pod| Some((attempt_of(pod)?, pod.metadata.name.clone()?)))
        .filter(|(attempt, _)| Some(*attempt) != newest)
        .collect();
    failed.sort_by_key(|(attempt, _)| std::cmp::Reverse(*attempt));
    let on_record = |attempt: i32| {
        status
            .attempts
            .iter()
            .any(|a| a.index == attempt && a.end_time.is_some())
    };
    // The newest attempt's pod counts toward `keep` when it failed too.
    let newest_failed = pods.iter().any(|pod| {
        attempt_of(pod) == newest
            && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
    });
    let keep = keep.saturating_sub(usize::from(newest_failed));
    failed
        .into_iter()
        .skip(keep)
        .filter(|(attempt, _)| on_record(*attempt))
        .map(|(_, name)| name)
        .collect()
}

/// The attempt a trainer pod runs, from its label; `None` for a pod that is not a trainer's.
pub fn attempt_of(pod: &Pod) -> Option<i32> {
    pod.metadata
        .labels
        .as_ref()?
        .get(names::ATTEMPT_LABEL)?
        .parse()
        .ok()
}

/// Whether the scheduler holds `pod` for its scheduling gates (Kueue's admission gate, say).
pub fn gated(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_deref());
    conditions.unwrap_or_default().iter().any(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("SchedulingGated")
    })
}

/// A gang member's rank, from its label; 0 for a one-pod attempt.
pub fn rank_of(pod: &Pod) -> i32 {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(names::RANK_LABEL))
        .and_then(|rank| rank.parse().ok())
        .unwrap_or(0)
}

/// One attempt's pod and state from its `members` (by rank; one pod unless a gang) and the
/// members on record (empty unless a gang). A gang is one attempt: a member that failed ends
/// it, a preempted one first (then the gang was preempted, whatever its other members did
/// after losing it); a member on record whose pod is gone was deleted under it, a preemption;
/// it succeeds when every member did, with rank 0's report; it runs once all run.
fn attempt_state<'a>(members: &[&'a Pod], on_record: &[Member], nodes: i32) -> (&'a Pod, PodState) {
    let rank_zero = members[0];
    if on_record.is_empty() {
        return (rank_zero, pod_state(rank_zero));
    }
    let states: Vec<(&'a Pod, PodState)> = members.iter().map(|p| (*p, pod_state(p))).collect();
    let failed = states.iter().filter_map(|(pod, state)| match state {
        PodState::Failed(failure) => Some((*pod, failure)),
        _ => None,
    });
    let first_failed = failed.min_by_key(|(_, f)| {
        let preempted = f.retryable && !f.counts_against_backoff;
        (!preempted, f.finished_at)
    });
    if let Some((pod, failure)) = first_failed {
        let mut failure = failure.clone();
        let why = failure.message.as_deref().unwrap_or(&failure.reason);
        failure.message = Some(format!("rank {} ({}): {why}", rank_of(pod), pod_name(pod)));
        return (pod, PodState::Failed(failure));
    }
    let seen = |name: &str| {
        members
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some(name))
    };
    if let Some(gone) = on_record.iter().find(|m| !seen(&m.pod_name)) {
        let message = format!(
            "gang member {} (rank {}) was deleted before the attempt finished (an eviction, a \
             drain or by hand); the whole gang restarts from the last checkpoint",
            gone.pod_name, gone.rank
        );
        return (rank_zero, PodState::Failed(gang::member_lost(message)));
    }
    if let Some((pod, state)) = states.iter().find(|(_, s)| {
        matches!(
            s,
            PodState::Pending {
                unschedulable: Some(_)
            }
        )
    }) {
        return (*pod, state.clone());
    }
    let succeeded = |s: &PodState| matches!(s, PodState::Succeeded(_));
    if states.iter().all(|(_, s)| succeeded(s)) && members.len() >= on_record.len() {
        return (rank_zero, states[0].1.clone());
    }
    let running = |s: &PodState| matches!(s, PodState::Running | PodState::Succeeded(_));
    let all_created = on_record.len() >= nodes.max(1) as usize && members.len() >= on_record.len();
    if states.iter().all(|(_, s)| running(s)) && all_created {
        return (rank_zero, PodState::Running);
    }
    (
        rank_zero,
        PodState::Pending {
            unschedulable: None,
        },
    )
}

pub(super) fn pod_name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

fn trainer_termination(pod: &Pod) -> Option<&ContainerStateTerminated> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.first()?.state.as_ref()?.terminated.as_ref()
}

fn pod_state(pod: &Pod) -> PodState {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let terminated = trainer_termination(pod);
    let termination: Option<TerminationMessage> = terminated
        .and_then(|t| t.message.as_deref())
        .and_then(|m| serde_json::from_str(m).ok());
    match phase {
        "Succeeded" => PodState::Succeeded(termination),
        "Failed" => PodState::Failed(classify_failure(pod, terminated, termination)),
        "Running" => PodState::Running,
        _ => {
            let conditions = status
                .and_then(|s| s.conditions.as_deref())
                .unwrap_or_default();
            let unschedulable = conditions
                .iter()
                .find(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                })
                .map(|c| c.message.clone().unwrap_or_else(|| "unschedulable".into()));
            PodState::Pending { unschedulable }
        }
    }
}

/// What an OOM-killed attempt records: the limit it hit and the settings that lower the peak.
pub const OUT_OF_MEMORY_ADVICE: &str = "the kernel killed the trainer at the pod's memory limit \
     (OOMKilled): raise spec.resources.memory, or set hyperparameters.microBatchSize below \
     batchSize (the update stays the same), turn on gradientCheckpointing, or lower \
     maxSeqLength";

/// Classifies a failed pod. Evictions and preemptions (a `DisruptionTarget` condition, the
/// `Evicted`/`Preempting` reasons, or exit 143 after a checkpoint) are retried without charge;
/// invalid input and divergence are never retried; everything else is charged.
fn classify_failure(
    pod: &Pod,
    terminated: Option<&ContainerStateTerminated>,
    termination: Option<TerminationMessage>,
) -> Failure {
    let status = pod.status.as_ref();
    let disrupted = status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "DisruptionTarget" && c.status == "True");
    let pod_reason = status.and_then(|s| s.reason.clone());
    let exit_code = terminated.map(|t| t.exit_code);
    let kubelet_reason = terminated.and_then(|t| t.reason.clone());
    let trainer_message = termination
        .as_ref()
        .and_then(|t| t.error.as_ref())
        .map(|e| match &e.param {
            Some(param) => format!("{} ({param})", e.message),
            None => e.message.clone(),
        });
    let message = trainer_message.or_else(|| status.and_then(|s| s.message.clone()));
    let failure = |reason: &str, retryable, charged| Failure {
        reason: reason.to_string(),
        exit_code,
        message: message.clone(),
        retryable,
        counts_against_backoff: charged,
        termination: termination.clone(),
        finished_at: terminated.and_then(|t| t.finished_at.as_ref()).map(|t| t.0),
    };
    if disrupted
        || matches!(
            pod_reason.as_deref(),
            Some("Evicted" | "Preempting" | "Terminated" | "NodeLost")
        )
    {
        return failure("Preempted", true, false);
    }
    if kubelet_reason.as_deref() == Some("OOMKilled") {
        // The kernel gives the trainer no chance to say why: the fix is ours to tell.
        let mut failure = failure("OutOfMemory", true, true);
        failure
            .message
            .get_or_insert_with(|| OUT_OF_MEMORY_ADVICE.into());
        return failure;
    }
    let Some(code) = exit_code else {
        return failure("Error", true, true);
    };
    let outcome = ExitCode::from_code(code);
    failure(
        outcome.reason(),
        outcome.is_retryable(),
        outcome.counts_against_backoff(),
    )
}

fn attempt_record(index: i32, pod: &Pod, state: &PodState) -> Attempt {
    let terminated = trainer_termination(pod);
    let (reason, termination) = match state {
        PodState::Failed(failure) => (Some(failure.reason.clone()), failure.termination.as_ref()),
        PodState::Succeeded(termination) => (Some("Completed".to_string()), termination.as_ref()),
        _ => (None, None),
    };
    Attempt {
        index,
        pod_name: pod_name(pod),
        start_time: pod.status.as_ref().and_then(|s| s.start_time.clone()),
        end_time: terminated.and_then(|t| t.finished_at.clone()),
        reason,
        exit_code: terminated.map(|t| t.exit_code),
        resumed_from_step: termination.and_then(|t| t.resumed_from_step),
        members: Vec::new(),
        message: termination
            .and_then(|t| t.error.as_ref())
            .map(|e| e.message.clone())
            .or_else(|| match state {
                PodState::Failed(failure) if failure.reason == "OutOfMemory" => {
                    failure.message.clone()
                }
                _ => None,
            }),
    }
}

/// The record of an attempt whose pod is gone: as it was when it had ended; one that had not
/// ended is closed now as a preemption.
fn vanished_attempt(record: &Attempt, now: Timestamp) -> Attempt {
    let mut record = record.clone();
    if record.reason.is_none() {
        record.reason = Some(ExitCode::Preempted.reason().into());
        record.end_time = Some(Time(now));
        record.message = Some(
            "the trainer pod was deleted before it finished (an eviction, a drain or by hand)"
                .into(),
        );
    }
    record
}

/// A recorded attempt classified again, for a pod that is no longer there to read: by the
/// reason recorded when it ended (see [`classify_failure`]).
fn failure_of(record: &Attempt) -> Failure {
    let reason = record.reason.clone().unwrap_or_else(|| "Error".into());
    let (retryable, charged) = match reason.as_str() {
        "Preempted" => (true, false),
        "OutOfMemory" | "Error" => (true, true),
        // Completed, InvalidInput, Diverged, RetentionBelowMinimum: the job already finished
        // on them; nothing to retry.
        _ => (false, false),
    };
    Failure {
        reason,
        exit_code: record.exit_code,
        message: record.message.clone(),
        retryable,
        counts_against_backoff: charged,
        termination: None,
        finished_at: record.end_time.as_ref().map(|t| t.0),
    }
}

/// Keeps the first attempt (how the job began) and the most recent ones.
fn trim_attempts(attempts: &mut Vec<Attempt>) {
    if attempts.len() > MAX_ATTEMPTS_RECORDED {
        let excess = attempts.len() - MAX_ATTEMPTS_RECORDED;
        attempts.drain(1..=excess);
    }
}

/// Takes an attempt's final metrics and its newest checkpoint into the job's status (a newer
/// checkpoint only).
pub(super) fn absorb_termination(
    status: &mut FinetuneJobStatus,
    termination: Option<&TerminationMessage>,
) {
    let Some(termination) = termination else {
        return;
    };
    if let Some(metrics) = &termination.metrics {
        status.metrics = Some(metrics.clone());
    }
    if let Some(commit) = &termination.base_model_commit {
        status.base_model_commit = Some(commit.clone());
    }
    if let (Some(step), Some(path)) = (termination.checkpoint_step, &termination.checkpoint_path) {
        let newer = status
            .latest_checkpoint
            .as_ref()
            .is_none_or(|c| c.step <= step);
        if newer {
            let time = status
                .latest_checkpoint
                .as_ref()
                .and_then(|c| c.time.clone());
            status.latest_checkpoint = Some(CheckpointRef {
                step,
                path: path.clone(),
                time,
            });
        }
    }
}

#[cfg(test)]
pub(super) mod fixtures {
    //! Trainer pods as the kubelet reports them, for the tests of this module and of `status`.

    use std::collections::BTreeMap;

    use finetune_crds::contract::TerminationMessage;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, Pod, PodCondition, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use k8s_openapi::jiff::Timestamp;

    use crate::finetunejob::names;

    /// The SFT example as a stored job (generation 1).
    pub(in crate::finetunejob) fn example_job() -> finetune_crds::FinetuneJob {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/sft-lora-smollm2.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let mut job: finetune_crds::FinetuneJob =
            finetune_crds::parse_manifest(&text, "x").unwrap();
        job.metadata.generation = Some(1);
        job
    }

    pub(in crate::finetunejob) fn now() -> Timestamp {
        "2026-11-26T12:00:00Z".parse().unwrap()
    }

    pub(in crate::finetunejob) fn pod(attempt: i32, phase: &str) -> Pod {
        named_pod("j", attempt, phase)
    }

    /// The trainer pod of `job`'s `attempt`, in `phase`, as the cache shows it.
    pub(in crate::finetunejob) fn named_pod(job: &str, attempt: i32, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(names::trainer_pod(job, attempt)),
                labels: Some(BTreeMap::from([(
                    names::ATTEMPT_LABEL.to_string(),
                    attempt.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..PodStatus::default()
            }),
        }
    }

    pub(in crate::finetunejob) fn exited(
        mut pod: Pod,
        code: i32,
        reason: &str,
        message: Option<&TerminationMessage>,
    ) -> Pod {
        let status = pod.status.as_mut().unwrap();
        status.container_statuses = Some(vec![ContainerStatus {
            name: "trainer".into(),
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    reason: Some(reason.into()),
                    message: message.map(|m| m.to_bounded_json()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]);
        pod
    }

    pub(in crate::finetunejob) fn condition(
        mut pod: Pod,
        type_: &str,
        status: &str,
        reason: &str,
        message: &str,
    ) -> Pod {
        pod.status
            .as_mut()
            .unwrap()
            .conditions
            .get_or_insert_with(Vec::new)
            .push(PodCondition {
                type_: type_.into(),
                status: status.into(),
                reason: Some(reason.into()),
                message: Some(message.into()),
                ..PodCondition::default()
            });
        pod
    }

    pub(in crate::finetunejob) fn finished(mut pod: Pod, at: Timestamp) -> Pod {
        let status = pod.status.as_mut().unwrap();
        for c in status.container_statuses.iter_mut().flatten() {
            if let Some(t) = c.state.as_mut().and_then(|s| s.terminated.as_mut()) {
                t.finished_at = Some(Time(at));
            }
        }
        pod
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{exited, now, pod};
    use super::*;

    #[test]
    fn only_the_newest_failed_pods_are_kept_once_their_attempts_are_on_record() {
        let failed = |attempt| exited(pod(attempt, "Failed"), 1, "Error", None);
        let recorded = |indices: &[i32]| FinetuneJobStatus {
            attempts: indices
                .iter()
                .map(|&index| Attempt {
                    index,
                    pod_name: format!("j-attempt-{index}"),
                    end_time: Some(Time(now())),
                    ..Attempt::default()
                })
                .collect(),
            ..FinetuneJobStatus::default()
        };
        let pods = [failed(0), failed(1), failed(2), pod(3, "Running")];
        let status = recorded(&[0, 1, 2]);
        assert_eq!(
            failed_pods_to_prune(&pods, &status, 1),
            ["j-attempt-1", "j-attempt-0"]
        );
        assert_eq!(failed_pods_to_prune(&pods, &status, 2), ["j-attempt-0"]);
        assert!(failed_pods_to_prune(&pods, &status, 5).is_empty());
        assert_eq!(failed_pods_to_prune(&pods, &status, 0).len(), 3);
        // Not on record yet (the status write failed): nothing is lost by waiting.
        assert_eq!(
            failed_pods_to_prune(&pods, &recorded(&[1, 2]), 1),
            ["j-attempt-1"]
        );
        // The newest attempt's failed pod is never deleted, and it is the one kept.
        let all_failed = [failed(0), failed(1)];
        assert_eq!(
            failed_pods_to_prune(&all_failed, &recorded(&[0, 1]), 1),
            ["j-attempt-0"]
        );
        assert!(failed_pods_to_prune(&all_failed, &recorded(&[0, 1]), 0) == ["j-attempt-0"]);
        // Succeeded pods are never pruned.
        let done = [failed(0), pod(1, "Succeeded")];
        assert_eq!(
            failed_pods_to_prune(&done, &recorded(&[0, 1]), 0),
            ["j-attempt-0"]
        );
        assert!(failed_pods_to_prune(&done, &recorded(&[0, 1]), 1).is_empty());
    }
}
