//! Pure status derivation for a user-registered Adapter: from the Adapter and its verification
//! pods to the status to write, what to do with the pods, and the Events to record.
//!
//! One verification per spec generation: a result for the current generation is final until the
//! spec changes. A verified pod is deleted once its result is in the status (nothing more to see);
//! a failed one is kept for its logs until the next generation replaces it.

use finetune_crds::Adapter;
use finetune_crds::adapter::{AdapterPhase, AdapterStatus};
use finetune_crds::contract::{AdapterVerification, VerificationReason};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::build::{in_pod_paths, verification_pod_name};
use crate::conditions::{self, Transition};

/// Condition saying whether the files were verified.
pub const VERIFIED: &str = "Verified";
/// Condition saying whether the adapter may be used (`kubectl wait --for=condition=Ready`).
pub const READY: &str = "Ready";

/// What to do with verification pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodAction {
    /// Create the current generation's verification pod.
    Create,
    /// Delete this pod: verified (its result is in the status) or of an older generation.
    Delete(String),
}

/// The outcome of one derivation.
#[derive(Clone, Debug, PartialEq)]
pub struct Derived {
    /// The status to write.
    pub status: AdapterStatus,
    /// What to do with the pods, after the status is written.
    pub actions: Vec<PodAction>,
    /// Events for changes of phase or reason.
    pub transitions: Vec<Transition>,
}

/// Derives the status of `adapter` from its verification `pods`; `None` for an Adapter a
/// FinetuneJob produced (`spec.source.fromJob`), whose status the job controller writes.
pub fn derive(adapter: &Adapter, pods: &[Pod], now: Timestamp) -> Option<Derived> {
    if adapter.spec.source.from_job.is_some() {
        return None;
    }
    let generation = adapter.metadata.generation;
    let previous = adapter.status.clone().unwrap_or_default();
    let current = verification_pod_name(adapter);
    let mut actions: Vec<PodAction> = pods
        .iter()
        .filter_map(|pod| pod.metadata.name.clone())
        .filter(|name| name != &current)
        .map(PodAction::Delete)
        .collect();
    let pod = pods
        .iter()
        .find(|pod| pod.metadata.name.as_deref() == Some(current.as_str()));

    let settled = previous.observed_generation == generation
        && matches!(
            previous.phase,
            Some(AdapterPhase::Ready | AdapterPhase::Failed)
        );
    if settled {
        if pod.is_some_and(|pod| pod_phase(pod) == "Succeeded") {
            actions.push(PodAction::Delete(current));
        }
        return Some(Derived {
            status: previous,
            actions,
            transitions: Vec::new(),
        });
    }

    let mut status = AdapterStatus {
        observed_generation: generation,
        lineage: None,
        ..previous.clone()
    };
    // Digests describe what was verified; a result in progress or without a report has none.
    status.files.clear();
    let outcome = match (in_pod_paths(adapter), pod) {
        (Err(why), _) => Outcome::Failed {
            reason: "InvalidSource".into(),
            message: why,
        },
        (Ok(_), None) => {
            actions.push(PodAction::Create);
            let refused = previous
                .conditions
                .iter()
                .find(|c| c.type_ == VERIFIED && c.reason == "PodCreationFailed")
                .filter(|_| previous.observed_generation == generation);
            match refused {
                // Still the apiserver's refusal until a pod exists: no flip-flop per retry.
                Some(c) => Outcome::Verifying {
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                },
                None => Outcome::Verifying {
                    reason: "VerificationStarted".into(),
                    message: format!(
                        "pod {current} checks {} against base model {}",
                        adapter.spec.source.uri.as_deref().unwrap_or_default(),
                        adapter.spec.base_model.uri
                    ),
                },
            }
        }
        (Ok(_), Some(pod)) => {
            let outcome = pod_outcome(pod, &current);
            // Deleted or evicted before it reported: not the adapter's fault. Once the pod is
            // gone, a new one is created under the same name.
            if matches!(outcome, Outcome::Interrupted { .. })
                && pod.metadata.deletion_timestamp.is_none()
            {
                actions.push(PodAction::Delete(current.clone()));
            }
            outcome
        }
    };
    match outcome {
        Outcome::Verifying { reason, message } => {
            set_verifying(&mut status, &reason, &message, now);
        }
        Outcome::Interrupted { message } => {
            set_verifying(&mut status, "Interrupted", &message, now);
        }
        Outcome::Verified(report) => {
            set_result(
                &mut status,
                AdapterPhase::Ready,
                "Verified",
                &report.message,
                now,
            );
            status.files = report.files;
            status.verified_time = Some(Time(now));
            actions.push(PodAction::Delete(current));
        }
        Outcome::Failed { reason, message } => {
            set_result(&mut status, AdapterPhase::Failed, &reason, &message, now);
        }
        Outcome::NotVerified(report) => {
            let reason = reason_text(report.reason);
            set_result(
                &mut status,
                AdapterPhase::Failed,
                &reason,
                &report.message,
                now,
            );
            status.files = report.files;
        }
    }
    let transitions = transitions(&previous, &status);
    Some(Derived {
        status,
        actions,
        transitions,
    })
}

enum Outcome {
    Verifying { reason: String, message: String },
    Interrupted { message: String },
    Verified(AdapterVerification),
    NotVerified(AdapterVerification),
    Failed { reason: String, message: String },
}

fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn terminated(pod: &Pod) -> Option<&ContainerStateTerminated> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.first()?.state.as_ref()?.terminated.as_ref()
}

/// What the verification pod says so far.
fn pod_outcome(pod: &Pod, name: &str) -> Outcome {
    let phase = pod_phase(pod);
    if !matches!(phase, "Succeeded" | "Failed") {
        let unschedulable = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_deref())
            .unwrap_or_default()
            .iter()
            .find(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
            .map(|c| c.message.clone().unwrap_or_default());
        return match unschedulable {
            Some(why) => Outcome::Verifying {
                reason: "Unschedulable".into(),
                message: format!("verification pod {name} cannot be scheduled: {why}"),
            },
            // Same reason as when the pod was created: no Event for pending → running.
            None => Outcome::Verifying {
                reason: "VerificationStarted".into(),
                message: format!("verification pod {name} is {}", phase.to_lowercase()),
            },
        };
    }
    let state = terminated(pod);
    let report: Option<AdapterVerification> = state
        .and_then(|t| t.message.as_deref())
        .and_then(|m| serde_json::from_str(m).ok());
    let status = pod.status.as_ref();
    let disrupted = pod.metadata.deletion_timestamp.is_some()
        || matches!(
            status.and_then(|s| s.reason.as_deref()),
            Some("Evicted" | "Preempting" | "NodeLost" | "Terminated")
        )
        || status
            .and_then(|s| s.conditions.as_deref())
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "DisruptionTarget" && c.status == "True");
    match report {
        Some(report) if report.verified && phase == "Succeeded" => Outcome::Verified(report),
        Some(report) if !report.verified => Outcome::NotVerified(report),
        _ if disrupted => Outcome::Interrupted {
            message: format!(
                "verification pod {name} was stopped before it reported (deleted, evicted or its node lost); it runs again"
            ),
        },
        _ => {
            // No report: the verifier crashed, was killed, or never started (deadline).
            let pod_status = pod.status.as_ref();
            let why = match state {
                Some(t) => {
                    let reason = t.reason.as_deref().unwrap_or("Error");
                    let said = t.message.as_deref().map(last_chars).unwrap_or_default();
                    let said = if said.is_empty() {
                        String::new()
                    } else {
                        format!(": {said}")
                    };
                    format!("exited with code {} ({reason}){said}", t.exit_code)
                }
                None => format!(
                    "{}: {}",
                    pod_status
                        .and_then(|s| s.reason.as_deref())
                        .unwrap_or("Failed"),
                    pod_status
                        .and_then(|s| s.message.as_deref())
                        .unwrap_or("no container ran")
                ),
            };
            Outcome::Failed {
                reason: "VerificationPodFailed".into(),
                message: format!("verification pod {name} {why}"),
            }
        }
    }
}

/// The apiserver refused the verification pod: still Verifying (the controller retries), with
/// the apiserver's words in the conditions.
pub fn pod_creation_failed(status: &mut AdapterStatus, message: &str, now: Timestamp) {
    set_verifying(status, "PodCreationFailed", message, now);
}

/// Phase Verifying, not Ready, for `reason`.
fn set_verifying(status: &mut AdapterStatus, reason: &str, message: &str, now: Timestamp) {
    set_phase(
        status,
        AdapterPhase::Verifying,
        "Unknown",
        reason,
        message,
        now,
    );
}

/// A final result: Ready (Verified and Ready True) or Failed (both False).
fn set_result(
    status: &mut AdapterStatus,
    phase: AdapterPhase,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    let verified = if phase == AdapterPhase::Ready {
        "True"
    } else {
        "False"
    };
    set_phase(status, phase, verified, reason, message, now);
}

/// The phase, the Verified condition as given, and Ready True only when the phase is Ready;
/// `verifiedTime` is cleared (a Ready result sets it again).
fn set_phase(
    status: &mut AdapterStatus,
    phase: AdapterPhase,
    verified: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    let ready = if phase == AdapterPhase::Ready {
        "True"
    } else {
        "False"
    };
    status.phase = Some(phase);
    status.verified_time = None;
    // Bounded: a verifier's message can be long (a log tail, a list of mismatches).
    let message: String = message.chars().take(1000).collect();
    // No observedGeneration per condition: the Adapter's status records it once.
    let conditions = &mut status.conditions;
    conditions::set(conditions, VERIFIED, verified, reason, &message, None, now);
    conditions::set(conditions, READY, ready, reason, &message, None, now);
}

/// The end of a log excerpt (the kubelet's fallback message is the log's tail; its end says most).
fn last_chars(text: &str) -> String {
    let chars: Vec<char> = text.trim().chars().collect();
    chars[chars.len().saturating_sub(400)..].iter().collect()
}

/// The condition reason for a verifier's reason.
fn reason_text(reason: VerificationReason) -> String {
    serde_json::to_value(reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{reason:?}"))
}

/// An Event when the phase or the Verified reason changes.
fn transitions(before: &AdapterStatus, after: &AdapterStatus) -> Vec<Transition> {
    let verified = |status: &AdapterStatus| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == VERIFIED)
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    let (reason, message) = verified(after).unwrap_or_default();
    let changed = before.phase != after.phase
        || before.observed_generation != after.observed_generation
        || verified(before).map(|(r, _)| r) != Some(reason.clone());
    if !changed {
        return Vec::new();
    }
    let failed = matches!(after.phase, Some(AdapterPhase::Failed));
    vec![Transition {
        warning: failed || reason == "Unschedulable",
        // The Event's own reason says it failed; the verifier's reason leads its message.
        message: if failed {
            format!("{reason}: {message}")
        } else {
            message
        },
        reason: if failed {
            "VerificationFailed".into()
        } else {
            reason
        },
    }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use finetune_crds::adapter::{AdapterSource, AdapterSpec, FileDigest};
    use finetune_crds::model::BaseModel;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStatus, PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn adapter(generation: i64) -> Adapter {
        let mut adapter = Adapter::new(
            "support-bot",
            AdapterSpec {
                base_model: BaseModel {
                    uri: "pvc://models/m.gguf".into(),
                    format: Default::default(),
                    token_secret_ref: None,
                    rope_scaling: None,
                },
                source: AdapterSource {
                    uri: Some("pvc://adapters/sft".into()),
                    from_job: None,
                },
                lora: None,
                expected_sha256: Default::default(),
                s3: None,
            },
        );
        adapter.metadata.namespace = Some("team".into());
        adapter.metadata.generation = Some(generation);
        adapter
    }

    fn pod(name: &str, phase: &str, exit: Option<(i32, &str)>) -> Pod {
        let terminated = exit.map(|(code, message)| ContainerStatus {
            name: "verifier".into(),
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    message: Some(message.into()),
                    reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        });
        Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some(phase.into()),
                container_statuses: terminated.map(|t| vec![t]),
                ..PodStatus::default()
            }),
        }
    }

    fn report(verified: bool, reason: VerificationReason, message: &str) -> String {
        serde_json::to_string(&AdapterVerification {
            verified,
            reason,
            message: message.into(),
            files: vec![FileDigest {
                name: "adapter_config.json".into(),
                sha256: "c".repeat(64),
                size: 300,
            }],
        })
        .unwrap()
    }

    fn condition<'a>(status: &'a AdapterStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    /// `adapter` with the derived status written, as the next reconcile sees it.
    fn with_status(mut adapter: Adapter, derived: &Derived) -> Adapter {
        adapter.status = Some(derived.status.clone());
        adapter
    }

    #[test]
    fn a_new_adapter_gets_a_pod_then_a_verified_result_then_the_pod_goes() {
        let a = adapter(1);
        let started = derive(&a, &[], now()).unwrap();
        assert_eq!(started.actions, [PodAction::Create]);
        assert_eq!(started.status.phase, Some(AdapterPhase::Verifying));
        assert_eq!(started.status.observed_generation, Some(1));
        assert_eq!(condition(&started.status, READY).status, "False");
        assert_eq!(started.transitions[0].reason, "VerificationStarted");
        assert!(
            started.transitions[0]
                .message
                .contains("pod support-bot-verify-1 checks pvc://adapters/sft")
        );

        let a = with_status(a, &started);
        let running = derive(&a, &[pod("support-bot-verify-1", "Running", None)], now()).unwrap();
        assert!(
            running.actions.is_empty() && running.transitions.is_empty(),
            "{running:?}"
        );
        assert_eq!(running.status.phase, Some(AdapterPhase::Verifying));

        let done = pod(
            "support-bot-verify-1",
            "Succeeded",
            Some((
                0,
                &report(true, VerificationReason::Verified, "4 LoRA layer(s) fit"),
            )),
        );
        let verified = derive(&a, std::slice::from_ref(&done), now()).unwrap();
        assert_eq!(verified.status.phase, Some(AdapterPhase::Ready));
        assert_eq!(verified.status.files.len(), 1);
        assert_eq!(verified.status.verified_time, Some(Time(now())));
        for type_ in [VERIFIED, READY] {
            let c = condition(&verified.status, type_);
            assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Verified"));
        }
        assert_eq!(
            verified.actions,
            [PodAction::Delete("support-bot-verify-1".into())]
        );
        assert_eq!(verified.transitions[0].reason, "Verified");
        assert!(!verified.transitions[0].warning);

        // Written; the pod, if still cached, goes again; nothing else changes.
        let a = with_status(a, &verified);
        let settled = derive(&a, &[done], now()).unwrap();
        assert_eq!(settled.status, verified.status);
        assert_eq!(
            settled.actions,
            [PodAction::Delete("support-bot-verify-1".into())]
        );
        assert!(settled.transitions.is_empty());
        assert!(derive(&a, &[], now()).unwrap().actions.is_empty());
    }

    #[test]
    fn a_failed_check_names_the_reason_and_keeps_the_pod_for_its_logs() {
        let a = adapter(2);
        let a = with_status(a.clone(), &derive(&a, &[], now()).unwrap());
        let failed_pod = pod(
            "support-bot-verify-2",
            "Failed",
            Some((
                2,
                &report(
                    false,
                    VerificationReason::BaseModelMismatch,
                    "shape mismatch: adapter for another base model",
                ),
            )),
        );
        let failed = derive(&a, std::slice::from_ref(&failed_pod), now()).unwrap();
        assert_eq!(failed.status.phase, Some(AdapterPhase::Failed));
        let c = condition(&failed.status, VERIFIED);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str(), c.message.as_str()),
            (
                "False",
                "BaseModelMismatch",
                "shape mismatch: adapter for another base model"
            )
        );
        assert_eq!(condition(&failed.status, READY).reason, "BaseModelMismatch");
        assert!(
            failed.actions.is_empty(),
            "the failed pod stays: {:?}",
            failed.actions
        );
        let event = &failed.transitions[0];
        assert!(event.warning);
        assert_eq!(event.reason, "VerificationFailed");
        assert!(
            event
                .message
                .starts_with("BaseModelMismatch: shape mismatch")
        );

        // Final for this generation: no second pod, no second Event.
        let a = with_status(a, &failed);
        let again = derive(&a, std::slice::from_ref(&failed_pod), now()).unwrap();
        assert!(again.actions.is_empty() && again.transitions.is_empty());
        assert!(derive(&a, &[], now()).unwrap().actions.is_empty());

        // A new spec is verified again, and the old generation's pod goes.
        let mut edited = a.clone();
        edited.metadata.generation = Some(3);
        let retried = derive(&edited, &[failed_pod], now()).unwrap();
        assert_eq!(
            retried.actions,
            [
                PodAction::Delete("support-bot-verify-2".into()),
                PodAction::Create
            ]
        );
        assert_eq!(retried.status.phase, Some(AdapterPhase::Verifying));
    }

    #[test]
    fn a_verifier_that_leaves_no_report_fails_with_what_the_pod_says() {
        let a = adapter(1);
        let killed = pod("support-bot-verify-1", "Failed", Some((137, "")));
        let derived = derive(&a, &[killed], now()).unwrap();
        let c = condition(&derived.status, VERIFIED);
        assert_eq!(c.reason, "VerificationPodFailed");
        assert_eq!(
            c.message,
            "verification pod support-bot-verify-1 exited with code 137 (Error)"
        );

        let mut deadline = pod("support-bot-verify-1", "Failed", None);
        let status = deadline.status.as_mut().unwrap();
        status.reason = Some("DeadlineExceeded".into());
        status.message =
            Some("Pod was active on the node longer than the specified deadline".into());
        let derived = derive(&a, &[deadline], now()).unwrap();
        assert!(
            condition(&derived.status, VERIFIED)
                .message
                .contains("DeadlineExceeded: Pod was active"),
        );
    }

    #[test]
    fn an_unschedulable_pod_is_reported_while_verifying() {
        let a = adapter(1);
        let a = with_status(a.clone(), &derive(&a, &[], now()).unwrap());
        let mut pending = pod("support-bot-verify-1", "Pending", None);
        pending.status.as_mut().unwrap().conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("0/3 nodes are available: 3 node(s) didn't match selector".into()),
            ..PodCondition::default()
        }]);
        let derived = derive(&a, &[pending], now()).unwrap();
        assert_eq!(derived.status.phase, Some(AdapterPhase::Verifying));
        assert_eq!(condition(&derived.status, VERIFIED).reason, "Unschedulable");
        assert!(derived.transitions[0].warning);
        assert!(
            derived.transitions[0]
                .message
                .contains("didn't match selector")
        );
    }

    #[test]
    fn job_adapters_are_left_to_their_job_and_bad_sources_fail_without_a_pod() {
        let mut from_job = adapter(1);
        from_job.spec.source = AdapterSource {
            uri: None,
            from_job: Some("sft".into()),
        };
        assert!(derive(&from_job, &[], now()).is_none());

        let mut bad = adapter(1);
        bad.spec.source.uri = Some("configmap://maps/adapter".into());
        let derived = derive(&bad, &[], now()).unwrap();
        assert!(derived.actions.is_empty());
        assert_eq!(derived.status.phase, Some(AdapterPhase::Failed));
        let c = condition(&derived.status, VERIFIED);
        assert_eq!(c.reason, "InvalidSource");
        assert!(c.message.contains("spec.source.uri"), "{}", c.message);
    }

    #[test]
    fn an_interrupted_verification_runs_again_instead_of_failing() {
        let a = adapter(1);
        let a = with_status(a.clone(), &derive(&a, &[], now()).unwrap());
        // Evicted: the kubelet leaves it Failed with a DisruptionTarget condition, no report.
        let mut evicted = pod("support-bot-verify-1", "Failed", Some((143, "")));
        evicted.status.as_mut().unwrap().conditions = Some(vec![PodCondition {
            type_: "DisruptionTarget".into(),
            status: "True".into(),
            ..PodCondition::default()
        }]);
        let derived = derive(&a, std::slice::from_ref(&evicted), now()).unwrap();
        assert_eq!(derived.status.phase, Some(AdapterPhase::Verifying));
        assert_eq!(condition(&derived.status, VERIFIED).reason, "Interrupted");
        assert_eq!(
            derived.actions,
            [PodAction::Delete("support-bot-verify-1".into())]
        );
        // Deleting: wait for it to go; gone: a new pod.
        evicted.metadata.deletion_timestamp = Some(Time(now()));
        let a = with_status(a, &derived);
        assert!(derive(&a, &[evicted], now()).unwrap().actions.is_empty());
        assert_eq!(derive(&a, &[], now()).unwrap().actions, [PodAction::Create]);
    }

    #[test]
    fn a_new_generation_forgets_the_old_digests() {
        let a = adapter(1);
        let done = pod(
            "support-bot-verify-1",
            "Succeeded",
            Some((0, &report(true, VerificationReason::Verified, "ok"))),
        );
        let a = with_status(a.clone(), &derive(&a, &[done], now()).unwrap());
        assert_eq!(a.status.as_ref().unwrap().files.len(), 1);
        let mut edited = a;
        edited.metadata.generation = Some(2);
        let derived = derive(&edited, &[], now()).unwrap();
        assert!(derived.status.files.is_empty());
        assert!(derived.status.verified_time.is_none());
    }

    #[test]
    fn a_refused_pod_keeps_the_apiservers_words_while_it_is_retried() {
        let a = adapter(1);
        let mut status = derive(&a, &[], now()).unwrap().status;
        pod_creation_failed(
            &mut status,
            "pods \"x\" is forbidden: exceeded quota",
            now(),
        );
        let a = with_status(
            a,
            &Derived {
                status,
                actions: vec![],
                transitions: vec![],
            },
        );
        let retry = derive(&a, &[], now()).unwrap();
        assert_eq!(retry.actions, [PodAction::Create]);
        assert_eq!(
            Some(&retry.status),
            a.status.as_ref(),
            "nothing new to write"
        );
        assert!(retry.transitions.is_empty());
        assert_eq!(
            condition(&retry.status, VERIFIED).reason,
            "PodCreationFailed"
        );
    }
}
