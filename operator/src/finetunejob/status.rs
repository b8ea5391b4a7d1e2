//! Pure status derivation: from a job and its trainer pods to the job's observed status and the
//! next action, tested case by case without an apiserver. [`derive`] is two steps: the attempts
//! are brought on record (`attempts`: pod states, failure classification, counters), then the
//! job's phase follows from the latest attempt (`next_phase`).

use std::time::Duration;

use finetune_crds::contract::{StatusReport, StopKind, TerminationMessage, TrainerPhase};
use finetune_crds::finetunejob::{AdapterRef, CheckpointRef, Progress, TrainingMetrics};
use finetune_crds::{FinetuneJob, FinetuneJobStatus, JobPhase};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::attempts::{self, Failure, Observed, PodState, pod_name};
use super::gang;
use crate::conditions::{self, Transition};

/// What the reconciler should do after writing the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create the trainer pod of this attempt (a gang's rank 0).
    CreatePod(i32),
    /// Create ranks 1.. of a gang attempt, to meet rank 0 at its pod IP.
    CreateMembers {
        /// The attempt.
        attempt: i32,
        /// Rank 0's pod IP.
        master_addr: String,
    },
    /// Delete these pods (suspend, deadline, the rest of a gang that lost a member): the
    /// trainer checkpoints on SIGTERM and exits.
    DeletePods(Vec<String>),
    /// Poll the running trainer's `/status`.
    PollProgress(String),
    /// Nothing to do until something changes.
    Wait,
}

/// The outcome of one derivation.
#[derive(Clone, Debug, PartialEq)]
pub struct Derived {
    /// The status to write.
    pub status: FinetuneJobStatus,
    /// What to do next.
    pub action: Action,
    /// Events for phase changes.
    pub transitions: Vec<Transition>,
}

/// What one derivation adds to the operator's job counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The job reached phase Failed, for the Failed condition's reason.
    Failed {
        /// e.g. `InvalidInput`, `RetentionBelowMinimum`, `BackoffLimitExceeded`.
        reason: String,
    },
    /// Attempt `attempt` starts because the one before it ended for `reason`.
    Retried {
        /// The attempt being created.
        attempt: i32,
        /// Why the previous attempt ended, e.g. `Preempted`, `OutOfMemory`, `Error`.
        reason: String,
    },
}

/// The counted outcome of `derived`, given the job's phase before it: a transition into Failed,
/// or the creation of a retry attempt. Retries are derived again until the new pod is seen, so
/// the caller counts each attempt once.
pub fn outcome(phase_before: Option<JobPhase>, derived: &Derived) -> Option<Outcome> {
    if derived.status.phase == Some(JobPhase::Failed) && phase_before != Some(JobPhase::Failed) {
        let reason = derived
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Failed" && c.status == "True")
            .map_or_else(|| "Unknown".to_string(), |c| c.reason.clone());
        return Some(Outcome::Failed { reason });
    }
    match derived.action {
        Action::CreatePod(attempt) if attempt > 0 => {
            let reason = derived
                .status
                .attempts
                .iter()
                .find(|a| a.index == attempt - 1)
                .and_then(|a| a.reason.clone())
                .unwrap_or_else(|| "Error".to_string());
            Some(Outcome::Retried { attempt, reason })
        }
        _ => None,
    }
}

/// The condition set (alongside Succeeded) when training ended before its planned last step.
pub const EARLY_STOPPED_CONDITION: &str = "EarlyStopped";

/// Which rule ended a successful run before its planned last step, from the trainer's typed
/// `stopKind`: `RetentionFloor` when the retention probe fell below
/// `evaluation.retention.minScore` (`action: stop`), `EarlyStopping` when the eval loss did not
/// improve within the patience. `None` without a `stopReason`: the run reached its last step (the
/// `EarlyStopped` condition's message is the `stopReason`, so a kind alone sets nothing).
///
/// A `stopReason` without a kind comes from a trainer image older than the typed field (a job
/// may pin one with `spec.image`); it is read as those trainers wrote it: their retention-floor
/// stop was the only reason that named retention. Kept so that mixing versions loses no warning.
pub fn stop_kind(termination: &TerminationMessage) -> Option<StopKind> {
    match (termination.stop_kind, &termination.stop_reason) {
        (_, None) => None,
        (Some(kind), Some(_)) => Some(kind),
        (None, Some(reason)) if reason.contains("retention") => Some(StopKind::RetentionFloor),
        (None, Some(_)) => Some(StopKind::EarlyStopping),
    }
}

/// First wait before retrying a failure charged to `backoffLimit`; it doubles with each one.
pub const RETRY_DELAY_FIRST: Duration = Duration::from_secs(10);

/// The longest wait between attempts.
pub const RETRY_DELAY_MAX: Duration = Duration::from_secs(300);

/// How long to wait before the next attempt after `charged` failures charged to `backoffLimit`
/// (10 s, 20 s, 40 s, … up to 5 min). A crash that repeats at once, such as a bad node or a
/// registry outage, then does not burn the whole budget in seconds.
pub fn retry_delay(charged: i32) -> Duration {
    let doublings = charged.saturating_sub(1).clamp(0, 16) as u32;
    RETRY_DELAY_FIRST
        .saturating_mul(1 << doublings)
        .min(RETRY_DELAY_MAX)
}

/// Derives the status of `job` from its trainer pods (any order) at time `now`.
/// `progress` is the latest `/status` report of the running trainer, if one was polled.
pub fn derive(
    job: &FinetuneJob,
    pods: &[Pod],
    progress: Option<&StatusReport>,
    now: Timestamp,
) -> Derived {
    derive_queued(job, pods, progress, None, now)
}

/// [`derive`], with why Kueue has not yet admitted the latest attempt's gated pods (the
/// reason and message of its Workload), when that was read.
pub fn derive_queued(
    job: &FinetuneJob,
    pods: &[Pod],
    progress: Option<&StatusReport>,
    admission: Option<&str>,
    now: Timestamp,
) -> Derived {
    let mut status = job.status.clone().unwrap_or_default();
    // A finished job's status is final, whatever its pods do now.
    if matches!(status.phase, Some(JobPhase::Succeeded | JobPhase::Failed)) {
        return Derived {
            status,
            action: Action::Wait,
            transitions: Vec::new(),
        };
    }
    status.observed_generation = job.metadata.generation;
    // Set again only while a retry is backing off.
    status.next_retry_time = None;
    let latest = attempts::record_attempts(&mut status, pods, job.spec.resources.nodes, now);
    let reports = Reports {
        progress,
        admission,
    };
    let (action, transitions) = next_phase(job, &mut status, latest, reports, now);
    match &action {
        Action::CreatePod(attempt) => attempts::record_created(job, &mut status, *attempt),
        Action::CreateMembers { attempt, .. } => {
            attempts::record_members(job, &mut status, *attempt)
        }
        _ => {}
    }
    Derived {
        status,
        action,
        transitions,
    }
}

/// Sets a job's phase during one derivation: the phase, its condition (the other phase
/// conditions turn False), and an Event when the phase differs from the one the derivation
/// started from.
struct PhaseSetter {
    before: Option<JobPhase>,
    generation: Option<i64>,
    now: Timestamp,
    transitions: Vec<Transition>,
}

impl PhaseSetter {
    fn set(
        &mut self,
        status: &mut FinetuneJobStatus,
        phase: JobPhase,
        reason: &str,
        message: String,
        warning: bool,
    ) {
        status.phase = Some(phase);
        conditions::set_phase(
            &mut status.conditions,
            phase,
            reason,
            &message,
            self.generation,
            self.now,
        );
        if self.before != Some(phase) {
            self.transitions.push(Transition {
                warning,
                reason: reason.to_string(),
                message,
            });
        }
    }
}

/// The job's phase after its `latest` attempt (`None` before the first), and what to do next.
/// `status` holds the attempts as [`attempts::record_attempts`] left them; the phase, the
/// conditions and the times are set here. Returns the action and the Events to record.
/// What was read about the latest attempt besides its pods.
#[derive(Clone, Copy)]
struct Reports<'a> {
    /// The trainer's `/status`.
    progress: Option<&'a StatusReport>,
    /// Why Kueue holds the attempt's pods.
    admission: Option<&'a str>,
}

fn next_phase(
    job: &FinetuneJob,
    status: &mut FinetuneJobStatus,
    latest: Option<Observed>,
    reports: Reports,
    now: Timestamp,
) -> (Action, Vec<Transition>) {
    let mut phases = PhaseSetter {
        before: status.phase,
        generation: job.metadata.generation,
        now,
        transitions: Vec::new(),
    };
    // Members of the latest attempt still running: a gang that ended (a member failed or was
    // lost), is suspended or is past its deadline stops them before anything else happens.
    let live = latest.as_ref().map(gang::live_members).unwrap_or_default();
    let stopping = latest.as_ref().is_some_and(gang::members_stopping);
    let stop_live = || delete_or_wait(&live);
    if let Some(message) = deadline_passed(job, status, now) {
        // Past the deadline: stop whatever runs; the job fails and is never retried.
        status.completion_time = Some(Time(now));
        status.next_retry_time = None;
        phases.set(status, JobPhase::Failed, "DeadlineExceeded", message, true);
        return (stop_live(), phases.transitions);
    }
    let suspend = job.spec.run_policy.suspend;
    if let Some(observed) = latest.as_ref().filter(|_| !suspend)
        && let Some(action) = gang_members_due(job, status, observed, &mut phases)
    {
        return (action, phases.transitions);
    }
    let ended = latest
        .as_ref()
        .is_some_and(|o| matches!(o.state, PodState::Failed(_)));
    let action = match latest {
        None if suspend => {
            let message = "runPolicy.suspend is true; no trainer pod runs".into();
            phases.set(status, JobPhase::Suspended, "Suspended", message, false);
            Action::Wait
        }
        None => {
            let message = "creating the trainer pod (attempt 0)".into();
            phases.set(status, JobPhase::Pending, "Created", message, false);
            Action::CreatePod(0)
        }
        Some(Observed {
            pod: Some(_),
            state: PodState::Pending { .. } | PodState::Running,
            ..
        }) if suspend => {
            let message = "runPolicy.suspend is true; the trainer checkpoints and stops".into();
            phases.set(status, JobPhase::Suspended, "Suspending", message, false);
            stop_live()
        }
        Some(Observed {
            index: attempt,
            state: PodState::Pending {
                unschedulable: Some(message),
            },
            ..
        }) => {
            let message = format!("attempt {attempt} waits for resources: {message}");
            phases.set(status, JobPhase::Queued, "Unschedulable", message, false);
            Action::Wait
        }
        Some(Observed {
            index: attempt,
            pod: Some(pod),
            state: PodState::Pending {
                unschedulable: None,
            },
            ..
        }) if attempts::gated(pod) => {
            let message = awaiting_admission(attempt, reports.admission);
            phases.set(
                status,
                JobPhase::Queued,
                "AwaitingAdmission",
                message,
                false,
            );
            Action::Wait
        }
        Some(Observed {
            index: attempt,
            state: PodState::Pending {
                unschedulable: None,
            },
            ..
        }) => {
            let message = format!("trainer pod of attempt {attempt} created");
            phases.set(status, JobPhase::Pending, "PodCreated", message, false);
            Action::Wait
        }
        Some(Observed {
            index: attempt,
            pod,
            state: PodState::Running,
            ..
        }) => {
            let pod = pod.expect("only attempts whose pods are gone lack one, and they ended");
            status.start_time.get_or_insert(Time(now));
            let (reason, message) = running_reason(attempt, reports.progress);
            phases.set(status, JobPhase::Running, reason, message, false);
            if let Some(report) = reports.progress {
                let before = status.metrics.take();
                absorb_progress(status, report, now);
                let reduced = micro_batch_reduced(job, before.as_ref(), status.metrics.as_ref());
                phases.transitions.extend(reduced);
            }
            Action::PollProgress(pod_name(pod))
        }
        Some(Observed {
            state: PodState::Succeeded(termination),
            ..
        }) => succeed(job, status, termination, &mut phases),
        Some(Observed {
            state: PodState::Failed(failure),
            ..
        }) if failure.retryable && suspend => {
            // A suspended pod's SIGTERM exit (or any retryable end while suspended) waits for
            // the resume instead of starting the next attempt.
            let message =
                "runPolicy.suspend is true; the next attempt resumes from the last checkpoint";
            phases.set(
                status,
                JobPhase::Suspended,
                "Suspended",
                message.into(),
                false,
            );
            Action::Wait
        }
        Some(Observed {
            index: attempt,
            state: PodState::Failed(failure),
            ..
        }) => after_failure(job, status, attempt, &failure, &mut phases),
    };
    // A gang that ended stops its other members first: the next attempt, or the job's end,
    // waits until none of them runs (they would hold the GPUs, and rank 0 the storage), those
    // already being deleted included.
    let action = match action {
        _ if ended && (stopping || !live.is_empty()) => stop_live(),
        action => action,
    };
    (action, phases.transitions)
}

/// Deletes `pods`, or nothing to do when there are none.
fn delete_or_wait(pods: &[String]) -> Action {
    match pods.is_empty() {
        true => Action::Wait,
        false => Action::DeletePods(pods.to_vec()),
    }
}

/// Ranks 1.. of a gang attempt whose rank 0 has an address to meet at (see `gang`), with the
/// phase that says so; `None` when none are due.
fn gang_members_due(
    job: &FinetuneJob,
    status: &mut FinetuneJobStatus,
    latest: &Observed,
    phases: &mut PhaseSetter,
) -> Option<Action> {
    let master_addr = gang::rank_zero_address(job, status, latest)?;
    let attempt = latest.index;
    let message = format!(
        "attempt {attempt}: rank 0 is at {master_addr}; creating ranks 1 to {}",
        job.spec.resources.nodes - 1
    );
    phases.set(status, JobPhase::Pending, "GangStarting", message, false);
    Some(Action::CreateMembers {
        attempt,
        master_addr,
    })
}

/// The Queued message of an attempt held by scheduling gates: Kueue's reason when it was read.
fn awaiting_admission(attempt: i32, kueue_reason: Option<&str>) -> String {
    match kueue_reason {
        Some(why) => format!("attempt {attempt} waits for Kueue to admit it: {why}"),
        None => {
            format!("attempt {attempt} waits for admission: its pod is held by scheduling gates")
        }
    }
}

/// The Failed message once `runPolicy.activeDeadlineSeconds` has passed since the job first
/// started; `None` before then or without a deadline.
fn deadline_passed(
    job: &FinetuneJob,
    status: &FinetuneJobStatus,
    now: Timestamp,
) -> Option<String> {
    let limit = job.spec.run_policy.active_deadline_seconds?;
    let started = status.start_time.as_ref()?.0;
    let deadline = started
        .checked_add(Duration::from_secs(limit.max(0) as u64))
        .ok()?;
    (now >= deadline).then(|| {
        format!(
            "runPolicy.activeDeadlineSeconds {limit} passed at {deadline} (first started {started}); the trainer was stopped"
        )
    })
}

/// The progress of a run that finished before the progress poller ever reached the trainer (a
/// short job, or a poll that was backing off): the steps its termination message names, all done
/// (the plan's total and the epochs are not in the message, so the steps done stand for the
/// total and the epochs read 0). Without it the job would show no progress at all, and its first
/// step would never be counted in `finetune_operator_time_to_first_step_seconds`.
fn final_progress(termination: &TerminationMessage) -> Option<Progress> {
    let step = termination.step.filter(|&s| s > 0)?;
    Some(Progress {
        step,
        total_steps: step,
        epoch: 0.0,
        percent: 100.0,
        percent_text: Some("100%".into()),
        eta_seconds: Some(0),
        download: None,
        last_update_time: None,
    })
}

/// The job succeeded: the trainer's final report, full progress, the Adapter to register, and
/// the `EarlyStopped` condition when training ended before its planned last step.
fn succeed(
    job: &FinetuneJob,
    status: &mut FinetuneJobStatus,
    termination: Option<TerminationMessage>,
    phases: &mut PhaseSetter,
) -> Action {
    let now = phases.now;
    status.start_time.get_or_insert(Time(now));
    let before = status.metrics.clone();
    attempts::absorb_termination(status, termination.as_ref());
    let reduced = micro_batch_reduced(job, before.as_ref(), status.metrics.as_ref());
    phases.transitions.extend(reduced);
    if let Some(progress) = status.progress.as_mut() {
        progress.step = progress.total_steps.max(progress.step);
        progress.percent = 100.0;
        progress.percent_text = Some("100%".into());
        progress.eta_seconds = Some(0);
    } else {
        status.progress = termination.as_ref().and_then(final_progress);
    }
    status.adapter_ref = Some(AdapterRef {
        name: adapter_name(job),
    });
    status.completion_time = Some(Time(now));
    let stop_reason = termination.as_ref().and_then(|t| t.stop_reason.clone());
    let mut message = format!("training finished; adapter {}", adapter_name(job));
    if let Some(stop_reason) = &stop_reason {
        message.push_str(&format!("; stopped before the last step: {stop_reason}"));
    }
    phases.set(status, JobPhase::Succeeded, "Completed", message, false);
    if let Some(event) = contamination_warning(termination.as_ref()) {
        phases.transitions.push(event);
    }
    if let Some(kind) = termination.as_ref().and_then(stop_kind)
        && let Some(stop_reason) = stop_reason
    {
        conditions::set(
            &mut status.conditions,
            EARLY_STOPPED_CONDITION,
            "True",
            kind.reason(),
            &stop_reason,
            phases.generation,
            now,
        );
        // The model forgetting what it knew is worth a warning even though a result (an
        // earlier step) was kept; early stopping on the eval loss is routine.
        phases.transitions.push(Transition {
            warning: kind == StopKind::RetentionFloor,
            reason: kind.reason().to_string(),
            message: stop_reason,
        });
    }
    Action::Wait
}

/// A Warning for eval data that copies training data: the job succeeded, but its eval numbers
/// measure recall of training samples for that many prompts.
fn contamination_warning(termination: Option<&TerminationMessage>) -> Option<Transition> {
    let metrics = termination?.metrics.as_ref()?;
    let count = metrics.contaminated_eval_samples.filter(|&n| n > 0)?;
    Some(Transition {
        warning: true,
        reason: "EvalContaminated".into(),
        message: format!(
            "{count} eval samples copy or largely overlap training samples, so the eval results \
             overstate the model on them; the list, with the training lines copied, is in the \
             run's training_summary.json"
        ),
    })
}

/// A Warning when the trainer split its batches further than the spec asks: it ran out of memory
/// and halved the micro-batch. The run goes on with the same updates, only slower, and the next
/// job is better started there.
fn micro_batch_reduced(
    job: &FinetuneJob,
    before: Option<&TrainingMetrics>,
    after: Option<&TrainingMetrics>,
) -> Option<Transition> {
    let now = after?.micro_batch_size?;
    let hp = &job.spec.hyperparameters;
    let configured = i64::from(hp.micro_batch_size.unwrap_or(hp.batch_size));
    let was = before
        .and_then(|m| m.micro_batch_size)
        .unwrap_or(configured);
    if now >= was {
        return None;
    }
    Some(Transition {
        warning: true,
        reason: "MicroBatchReduced".into(),
        message: format!(
            "the trainer ran out of memory with micro-batches of {was} sequences and goes on with \
             {now} from the same step (the update of batchSize {} is unchanged, each step takes \
             longer); start the next job with hyperparameters.microBatchSize: {now} or \
             gradientCheckpointing: true",
            hp.batch_size
        ),
    })
}

/// The latest attempt `attempt` failed: wait out the backoff, start the next attempt, or fail
/// the job (not retryable, or `backoffLimit` spent).
fn after_failure(
    job: &FinetuneJob,
    status: &mut FinetuneJobStatus,
    attempt: i32,
    failure: &Failure,
    phases: &mut PhaseSetter,
) -> Action {
    let now = phases.now;
    let backoff_limit = job.spec.run_policy.backoff_limit;
    let budget_left = status.failed_attempts <= backoff_limit;
    let retry_at = failure
        .finished_at
        .filter(|_| failure.counts_against_backoff)
        .and_then(|end| end.checked_add(retry_delay(status.failed_attempts)).ok());
    if failure.retryable && budget_left && retry_at.is_some_and(|at| now < at) {
        let at = retry_at.expect("checked above");
        status.next_retry_time = Some(Time(at));
        let why = failure
            .message
            .clone()
            .unwrap_or_else(|| failure.reason.clone());
        let message = format!(
            "attempt {attempt} ended ({}: {why}); attempt {} starts at {at} (backoff {} s after failure {} of backoffLimit {backoff_limit})",
            failure.reason,
            attempt + 1,
            retry_delay(status.failed_attempts).as_secs(),
            status.failed_attempts,
        );
        phases.set(status, JobPhase::Pending, "BackingOff", message, true);
        Action::Wait
    } else if failure.retryable && budget_left {
        let next = attempt + 1;
        let why = failure
            .message
            .clone()
            .unwrap_or_else(|| failure.reason.clone());
        let message = format!(
            "attempt {attempt} ended ({}: {why}); starting attempt {next}",
            failure.reason
        );
        phases.set(status, JobPhase::Pending, "Retrying", message, true);
        Action::CreatePod(next)
    } else {
        let why = failure.message.clone().unwrap_or_default();
        let message = if failure.retryable {
            format!(
                "backoffLimit {backoff_limit} reached; last attempt: {}: {why}",
                failure.reason
            )
        } else {
            format!("{} (not retried): {why}", failure.reason)
        };
        status.completion_time = Some(Time(now));
        let reason = if failure.retryable {
            "BackoffLimitExceeded"
        } else {
            failure.reason.as_str()
        };
        phases.set(status, JobPhase::Failed, reason, message, true);
        Action::Wait
    }
}

/// When a job with `status` is due for deletion (`runPolicy.ttlSecondsAfterFinished` after its
/// completion); `None` while it runs or without a TTL.
pub fn ttl_expiry(job: &FinetuneJob, status: &FinetuneJobStatus) -> Option<Timestamp> {
    let ttl = job.spec.run_policy.ttl_seconds_after_finished?;
    if !matches!(status.phase, Some(JobPhase::Succeeded | JobPhase::Failed)) {
        return None;
    }
    let done = status.completion_time.as_ref()?.0;
    done.checked_add(Duration::from_secs(ttl.max(0) as u64))
        .ok()
}

/// The status of a job whose spec fails validation (`InvalidSpec`) or the cluster policy
/// (`NotAllowed`): Failed at once, with every problem named.
pub fn rejected_spec(job: &FinetuneJob, reason: &str, message: &str, now: Timestamp) -> Derived {
    let mut status = job.status.clone().unwrap_or_default();
    let was = status.phase;
    status.phase = Some(JobPhase::Failed);
    status.observed_generation = job.metadata.generation;
    status.completion_time.get_or_insert(Time(now));
    conditions::set_phase(
        &mut status.conditions,
        JobPhase::Failed,
        reason,
        message,
        job.metadata.generation,
        now,
    );
    let transitions = if was == Some(JobPhase::Failed) {
        Vec::new()
    } else {
        vec![Transition {
            warning: true,
            reason: reason.into(),
            message: message.to_string(),
        }]
    };
    Derived {
        status,
        action: Action::Wait,
        transitions,
    }
}

/// The status after creating a child failed: the phase stays, the `Created` condition turns
/// False with the apiserver's words, so `kubectl describe` says why nothing runs.
pub fn child_creation_failed(
    job: &FinetuneJob,
    child: &str,
    error: &str,
    reason: &str,
    now: Timestamp,
) -> FinetuneJobStatus {
    let mut status = job.status.clone().unwrap_or_default();
    status.phase.get_or_insert(JobPhase::Pending);
    status.observed_generation = job.metadata.generation;
    let message = format!("cannot create {child}: {error}");
    let generation = job.metadata.generation;
    // Written whole with this refusal's time (`put`), as it always was; `set` would keep the
    // first refusal's time while the condition stays False.
    conditions::put(
        &mut status.conditions,
        Condition {
            type_: "Created".into(),
            status: "False".into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: Time(now),
        },
    );
    status
}

/// The Adapter a successful job creates.
pub fn adapter_name(job: &FinetuneJob) -> String {
    job.spec
        .output
        .adapter_name
        .clone()
        .unwrap_or_else(|| job.metadata.name.clone().unwrap_or_default())
}

/// The Running condition's reason: `Downloading` (with the bytes) while the trainer fetches an
/// `hf://` base, `Running` otherwise.
fn running_reason(attempt: i32, progress: Option<&StatusReport>) -> (&'static str, String) {
    match progress {
        Some(StatusReport {
            phase: TrainerPhase::Downloading,
            download,
            ..
        }) => {
            let mib = |b: i64| b as f64 / f64::from(1 << 20);
            let bytes = download
                .as_ref()
                .map(|d| {
                    format!(
                        ": {:.0} of {:.0} MiB",
                        mib(d.bytes_done),
                        mib(d.bytes_total)
                    )
                })
                .unwrap_or_default();
            (
                "Downloading",
                format!("attempt {attempt} is downloading the base model{bytes}"),
            )
        }
        _ => ("Running", format!("attempt {attempt} is training")),
    }
}

fn absorb_progress(status: &mut FinetuneJobStatus, report: &StatusReport, now: Timestamp) {
    let percent = if report.total_steps > 0 {
        100.0 * report.step as f64 / report.total_steps as f64
    } else {
        0.0
    };
    status.progress = Some(Progress {
        step: report.step,
        total_steps: report.total_steps,
        epoch: report.epoch,
        percent: (percent * 10.0).round() / 10.0,
        percent_text: Some(format!("{}%", percent.floor() as i64)),
        eta_seconds: report.eta_seconds.map(|s| s.round() as i64),
        download: report.download.clone(),
        last_update_time: Some(Time(now)),
    });
    if let Some(commit) = &report.base_model_commit {
        status.base_model_commit = Some(commit.clone());
    }
    status.metrics = Some(report.metrics.clone());
    if let Some(step) = report.checkpoint_step {
        let path = status
            .latest_checkpoint
            .as_ref()
            .map(|c| c.path.clone())
            .unwrap_or_default();
        if status.latest_checkpoint.as_ref().map(|c| c.step) != Some(step) {
            status.latest_checkpoint = Some(CheckpointRef {
                step,
                path,
                time: Some(Time(now)),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finetunejob::attempts::fixtures::{
        condition, example_job, exited, finished, now, pod,
    };
    use crate::finetunejob::attempts::unended_attempts_without_pods;
    use finetune_crds::contract::TrainerError;
    use finetune_crds::finetunejob::TrainingMetrics;

    fn job() -> FinetuneJob {
        example_job()
    }

    fn true_condition(status: &FinetuneJobStatus) -> (&str, &str) {
        let c = status
            .conditions
            .iter()
            .find(|c| c.status == "True")
            .expect("one True condition");
        (c.type_.as_str(), c.reason.as_str())
    }

    #[test]
    fn a_new_job_creates_attempt_zero() {
        let derived = derive(&job(), &[], None, now());
        assert_eq!(derived.action, Action::CreatePod(0));
        assert_eq!(derived.status.phase, Some(JobPhase::Pending));
        assert_eq!(true_condition(&derived.status), ("Created", "Created"));
        assert_eq!(derived.status.observed_generation, Some(1));
        assert_eq!(derived.transitions.len(), 1);
        // On record at once, not yet started.
        let record = &derived.status.attempts[0];
        assert_eq!(
            (record.index, record.pod_name.as_str()),
            (0, "smollm2-kubectl-sft-attempt-0")
        );
        assert!(record.start_time.is_none() && record.reason.is_none());
    }

    #[test]
    fn a_pod_gone_before_it_was_first_seen_is_a_preemption_not_a_second_attempt_zero() {
        let mut job = job();
        job.status = Some(derive(&job, &[], None, now()).status);
        // The controller asks the apiserver about this pod before it counts as gone.
        let unseen = unended_attempts_without_pods(&job, &[]);
        assert_eq!(unseen.len(), 1);
        assert_eq!(unseen[0].pod_name, "smollm2-kubectl-sft-attempt-0");
        assert!(unended_attempts_without_pods(&job, &[pod(0, "Pending")]).is_empty());

        let derived = derive(&job, &[], None, now());
        assert_eq!(derived.action, Action::CreatePod(1));
        assert_eq!(
            (derived.status.preemptions, derived.status.failed_attempts),
            (1, 0)
        );
        assert_eq!(
            derived.status.attempts[0].reason.as_deref(),
            Some("Preempted")
        );
        assert_eq!(derived.status.attempts[1].index, 1);
    }

    #[test]
    fn a_suspended_job_starts_nothing() {
        let mut job = job();
        job.spec.run_policy.suspend = true;
        let derived = derive(&job, &[], None, now());
        assert_eq!(
            (derived.status.phase, derived.action),
            (Some(JobPhase::Suspended), Action::Wait)
        );
        let derived = derive(&job, &[pod(0, "Running")], None, now());
        assert_eq!(
            derived.action,
            Action::DeletePods(vec!["j-attempt-0".into()])
        );
    }

    #[test]
    fn unschedulable_pods_queue_the_job_with_the_schedulers_words() {
        let waiting = condition(
            pod(0, "Pending"),
            "PodScheduled",
            "False",
            "Unschedulable",
            "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        );
        let derived = derive(&job(), &[waiting], None, now());
        assert_eq!(derived.status.phase, Some(JobPhase::Queued));
        let queued = derived
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Queued")
            .unwrap();
        assert_eq!(queued.reason, "Unschedulable");
        assert!(
            queued.message.contains("Insufficient nvidia.com/gpu"),
            "{}",
            queued.message
        );
    }

    #[test]
    fn a_trainer_downloading_its_base_shows_the_bytes_and_then_the_commit() {
        let report = StatusReport {
            phase: TrainerPhase::Downloading,
            download: Some(finetune_crds::contract::DownloadProgress {
                bytes_done: 64 << 20,
                bytes_total: 256 << 20,
            }),
            ..StatusReport::default()
        };
        let derived = derive(&job(), &[pod(0, "Running")], Some(&report), now());
        let running = derived
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Running")
            .unwrap();
        assert_eq!(running.reason, "Downloading");
        assert!(
            running
                .message
                .ends_with("downloading the base model: 64 of 256 MiB"),
            "{}",
            running.message
        );
        let download = derived.status.progress.unwrap().download.unwrap();
        assert_eq!(download.bytes_total, 256 << 20);
        let training = StatusReport {
            phase: TrainerPhase::Training,
            base_model_commit: Some("c".repeat(40)),
            ..StatusReport::default()
        };
        let derived = derive(&job(), &[pod(0, "Running")], Some(&training), now());
        assert_eq!(derived.status.base_model_commit, Some("c".repeat(40)));
        let running = derived
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Running");
        assert_eq!(running.unwrap().reason, "Running");
        assert_eq!(derived.status.progress.unwrap().download, None);
    }

    #[test]
    fn running_jobs_take_progress_from_the_trainer() {
        let report = StatusReport {
            step: 30,
            total_steps: 120,
            epoch: 0.5,
            eta_seconds: Some(90.4),
            metrics: TrainingMetrics {
                train_loss: Some(1.25),
                ..TrainingMetrics::default()
            },
            checkpoint_step: Some(25),
            ..StatusReport::default()
        };
        let derived = derive(&job(), &[pod(0, "Running")], Some(&report), now());
        assert_eq!(derived.action, Action::PollProgress("j-attempt-0".into()));
        let progress = derived.status.progress.clone().unwrap();
        assert_eq!(
            (
                progress.percent,
                progress.percent_text.as_deref(),
                progress.eta_seconds
            ),
            (25.0, Some("25%"), Some(90))
        );
        assert_eq!(
            derived.status.metrics.as_ref().unwrap().train_loss,
            Some(1.25)
        );
        assert_eq!(derived.status.latest_checkpoint.as_ref().unwrap().step, 25);
        assert_eq!(derived.status.start_time, Some(Time(now())));
        assert_eq!(true_condition(&derived.status), ("Running", "Running"));
    }

    #[test]
    fn a_trainer_that_halved_its_micro_batch_raises_one_warning_naming_the_fix() {
        let report = |micro: Option<i64>| StatusReport {
            step: 3,
            total_steps: 120,
            metrics: TrainingMetrics {
                micro_batch_size: micro,
                ..TrainingMetrics::default()
            },
            ..StatusReport::default()
        };
        let mut job = job();
        assert_eq!(job.spec.hyperparameters.batch_size, 8);
        let first = derive(&job, &[pod(0, "Running")], Some(&report(Some(2))), now());
        let warned: Vec<&Transition> = first
            .transitions
            .iter()
            .filter(|t| t.reason == "MicroBatchReduced")
            .collect();
        assert_eq!(warned.len(), 1, "{:?}", first.transitions);
        assert!(warned[0].warning);
        let m = &warned[0].message;
        assert!(
            m.contains("of 8 sequences") && m.contains("microBatchSize: 2"),
            "{m}"
        );
        assert_eq!(
            first.status.metrics.as_ref().unwrap().micro_batch_size,
            Some(2)
        );
        // The next poll reports the same size: nothing new to say.
        job.status = Some(first.status);
        let again = derive(&job, &[pod(0, "Running")], Some(&report(Some(2))), now());
        assert!(
            again
                .transitions
                .iter()
                .all(|t| t.reason != "MicroBatchReduced")
        );
        // A micro-batch the spec asked for is not a reduction.
        let mut asked = self::job();
        asked.spec.hyperparameters.micro_batch_size = Some(2);
        let planned = derive(&asked, &[pod(0, "Running")], Some(&report(Some(2))), now());
        assert!(
            planned
                .transitions
                .iter()
                .all(|t| t.reason != "MicroBatchReduced")
        );
    }

    #[test]
    fn success_records_metrics_checkpoint_and_adapter() {
        let message = TerminationMessage {
            metrics: Some(TrainingMetrics {
                eval_loss: Some(0.4),
                ..TrainingMetrics::default()
            }),
            checkpoint_step: Some(30),
            checkpoint_path: Some("/var/lib/finetune/j/checkpoints/step-30".into()),
            ..TerminationMessage::default()
        };
        let done = exited(pod(0, "Succeeded"), 0, "Completed", Some(&message));
        let derived = derive(&job(), &[done], None, now());
        let status = derived.status;
        assert_eq!(status.phase, Some(JobPhase::Succeeded));
        assert_eq!(status.adapter_ref.unwrap().name, "smollm2-kubectl");
        assert_eq!(status.metrics.unwrap().eval_loss, Some(0.4));
        assert_eq!(status.latest_checkpoint.unwrap().step, 30);
        assert_eq!(status.attempts[0].reason.as_deref(), Some("Completed"));
        assert!(status.completion_time.is_some());
        assert!(
            derived.transitions.iter().all(|t| !t.warning),
            "a clean run warns of nothing"
        );
    }

    #[test]
    fn a_run_never_polled_gets_its_progress_from_the_termination_message() {
        let message = TerminationMessage {
            step: Some(6),
            ..TerminationMessage::default()
        };
        let done = exited(pod(0, "Succeeded"), 0, "Completed", Some(&message));
        let progress = derive(&job(), &[done], None, now()).status.progress;
        let progress = progress.expect("the finished run's steps are its progress");
        assert_eq!((progress.step, progress.total_steps), (6, 6));
        assert_eq!(progress.percent_text.as_deref(), Some("100%"));
        // A message without steps (a run that stopped before its first) invents none.
        let bare = exited(pod(0, "Succeeded"), 0, "Completed", None);
        assert!(
            derive(&job(), &[bare], None, now())
                .status
                .progress
                .is_none()
        );
    }

    #[test]
    fn contaminated_eval_data_is_counted_in_status_and_warned_of_once() {
        let message = TerminationMessage {
            metrics: Some(TrainingMetrics {
                contaminated_eval_samples: Some(5),
                ..TrainingMetrics::default()
            }),
            ..TerminationMessage::default()
        };
        let done = exited(pod(0, "Succeeded"), 0, "Completed", Some(&message));
        let derived = derive(&job(), std::slice::from_ref(&done), None, now());
        let metrics = derived.status.metrics.as_ref().unwrap();
        assert_eq!(metrics.contaminated_eval_samples, Some(5));
        let warnings: Vec<&Transition> = derived.transitions.iter().filter(|t| t.warning).collect();
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].reason, "EvalContaminated");
        assert!(warnings[0].message.starts_with("5 eval samples copy"));
        // Derived again from the finished status: no second Event.
        let mut finished = job();
        finished.status = Some(derived.status.clone());
        let again = derive(&finished, &[done], None, now());
        assert!(again.transitions.is_empty(), "{:?}", again.transitions);
    }

    #[test]
    fn invalid_input_fails_at_once_with_the_trainers_message() {
        let message = TerminationMessage {
            error: Some(TrainerError {
                code: "invalid_data".into(),
                message: "line 7: missing role".into(),
                param: Some("train.jsonl:7".into()),
            }),
            ..TerminationMessage::default()
        };
        let failed = exited(pod(0, "Failed"), 2, "Error", Some(&message));
        let derived = derive(&job(), &[failed], None, now());
        assert_eq!(derived.status.phase, Some(JobPhase::Failed));
        let condition = derived
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Failed")
            .unwrap();
        assert_eq!(condition.reason, "InvalidInput");
        assert!(
            condition.message.contains("train.jsonl:7"),
            "{}",
            condition.message
        );
        assert!(derived.transitions[0].warning);
        assert_eq!(derived.action, Action::Wait);
    }

    fn stopped_early(kind: StopKind, stop_reason: &str) -> Derived {
        let message = TerminationMessage {
            checkpoint_step: Some(40),
            checkpoint_path: Some("/var/lib/finetune/j/checkpoints/step-40".into()),
            stop_reason: Some(stop_reason.into()),
            stop_kind: Some(kind),
            ..TerminationMessage::default()
        };
        let done = exited(pod(0, "Succeeded"), 0, "Completed", Some(&message));
        derive(&job(), &[done], None, now())
    }

    fn condition_of<'a>(status: &'a FinetuneJobStatus, type_: &str) -> &'a Condition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_} condition: {:?}", status.conditions))
    }

    #[test]
    fn early_stopping_is_surfaced_in_conditions_and_events() {
        let why =
            "early stopping: no eval loss improvement in 3 evaluations; the result is step 40";
        let derived = stopped_early(StopKind::EarlyStopping, why);
        assert_eq!(derived.status.phase, Some(JobPhase::Succeeded));
        let succeeded = condition_of(&derived.status, "Succeeded");
        assert_eq!(
            (succeeded.status.as_str(), succeeded.reason.as_str()),
            ("True", "Completed")
        );
        assert!(succeeded.message.contains(why), "{}", succeeded.message);
        let stopped = condition_of(&derived.status, EARLY_STOPPED_CONDITION);
        assert_eq!(
            (
                stopped.status.as_str(),
                stopped.reason.as_str(),
                stopped.message.as_str()
            ),
            ("True", "EarlyStopping", why)
        );
        let reasons: Vec<(&str, bool)> = derived
            .transitions
            .iter()
            .map(|t| (t.reason.as_str(), t.warning))
            .collect();
        assert_eq!(reasons, [("Completed", false), ("EarlyStopping", false)]);
        assert_eq!(derived.transitions[1].message, why);
        // The phase conditions still have exactly one True.
        let true_phases = derived
            .status
            .conditions
            .iter()
            .filter(|c| c.status == "True" && c.type_ != EARLY_STOPPED_CONDITION)
            .count();
        assert_eq!(true_phases, 1);
    }

    #[test]
    fn a_retention_floor_stop_is_a_warning() {
        let why = "retention score 0.400 (2/5 base answers kept) fell below \
                   evaluation.retention.minScore 0.8 at step 30; the result is step 20";
        let derived = stopped_early(StopKind::RetentionFloor, why);
        assert_eq!(derived.status.phase, Some(JobPhase::Succeeded));
        let stopped = condition_of(&derived.status, EARLY_STOPPED_CONDITION);
        assert_eq!(stopped.reason, "RetentionFloor");
        let event = derived
            .transitions
            .iter()
            .find(|t| t.reason == "RetentionFloor")
            .expect("a RetentionFloor event");
        assert!(event.warning);
        assert!(event.message.contains("the result is step 20"));
    }

    #[test]
    fn a_stop_reason_from_a_trainer_without_stop_kind_is_read_as_it_wrote_it() {
        let legacy = |reason: &str| TerminationMessage {
            stop_reason: Some(reason.into()),
            ..TerminationMessage::default()
        };
        let floor = legacy("retention score 0.400 (2/5 base answers kept) fell below 0.8");
        let done = exited(pod(0, "Succeeded"), 0, "Completed", Some(&floor));
        let derived = derive(&job(), &[done], None, now());
        let stopped = condition_of(&derived.status, EARLY_STOPPED_CONDITION);
        assert_eq!(stopped.reason, "RetentionFloor");
        assert!(derived.transitions.iter().any(|t| t.warning));
        let patience = legacy("no eval loss improvement in 3 evaluations; the result is step 20");
        assert_eq!(stop_kind(&patience), Some(StopKind::EarlyStopping));
        let kind_only = TerminationMessage {
            stop_kind: Some(StopKind::RetentionFloor),
            ..TerminationMessage::default()
        };
        assert_eq!(
            stop_kind(&kind_only),
            None,
            "no stopReason: ran to the last step"
        );
    }

    #[test]
    fn a_full_run_has_no_early_stop_condition() {
        let done = exited(pod(0, "Succeeded"), 0, "Completed", None);
        let derived = derive(&job(), &[done], None, now());
        assert!(
            derived
                .status
                .conditions
                .iter()
                .all(|c| c.type_ != EARLY_STOPPED_CONDITION)
        );
        assert_eq!(derived.transitions.len(), 1);
        assert_eq!(
            condition_of(&derived.status, "Succeeded").message,
            "training finished; adapter smollm2-kubectl"
        );
    }

    #[test]
    fn retention_below_minimum_fails_at_once_with_the_trainers_message() {
        let message = TerminationMessage {
            step: Some(30),
            error: Some(TrainerError {
                code: "retention_below_minimum".into(),
                message: "retention score 0.400 (2/5 base answers kept) fell below \
                          evaluation.retention.minScore 0.8 at step 30"
                    .into(),
                param: Some("evaluation.retention.minScore".into()),
            }),
            ..TerminationMessage::default()
        };
        let mut job = job();
        job.spec.run_policy.backoff_limit = 5;
        let failed = exited(pod(0, "Failed"), 5, "Error", Some(&message));
        let derived = derive(&job, &[failed], None, now());
        assert_eq!(
            (derived.status.phase, &derived.action),
            (Some(JobPhase::Failed), &Action::Wait),
            "not retried although backoffLimit allows it"
        );
        let failed = condition_of(&derived.status, "Failed");
        assert_eq!(failed.reason, "RetentionBelowMinimum");
        assert!(
            failed
                .message
                .starts_with("RetentionBelowMinimum (not retried): retention score 0.400"),
            "{}",
            failed.message
        );
        assert!(
            failed
                .message
                .contains("evaluation.retention.minScore 0.8 at step 30")
        );
        assert_eq!(
            (derived.status.failed_attempts, derived.status.preemptions),
            (0, 0),
            "not charged against the backoff limit"
        );
        assert_eq!(
            derived.status.attempts[0].reason.as_deref(),
            Some("RetentionBelowMinimum")
        );
        assert!(derived.transitions[0].warning);
        assert_eq!(
            outcome(Some(JobPhase::Running), &derived),
            Some(Outcome::Failed {
                reason: "RetentionBelowMinimum".into()
            })
        );
        // Once Failed is recorded, the next derivation counts nothing.
        assert_eq!(outcome(Some(JobPhase::Failed), &derived), None);
    }

    #[test]
    fn retries_are_outcomes_with_the_previous_attempts_reason() {
        let oom = exited(pod(0, "Failed"), 137, "OOMKilled", None);
        let derived = derive(&job(), &[oom], None, now());
        assert_eq!(
            outcome(Some(JobPhase::Running), &derived),
            Some(Outcome::Retried {
                attempt: 1,
                reason: "OutOfMemory".into()
            })
        );
        assert_eq!(outcome(None, &derive(&job(), &[], None, now())), None);
        let invalid = rejected_spec(&job(), "InvalidSpec", "spec.x: bad", now());
        assert_eq!(
            outcome(None, &invalid),
            Some(Outcome::Failed {
                reason: "InvalidSpec".into()
            })
        );
    }

    #[test]
    fn divergence_is_not_retried() {
        let derived = derive(
            &job(),
            &[exited(pod(0, "Failed"), 3, "Error", None)],
            None,
            now(),
        );
        assert_eq!(
            (derived.status.phase, derived.action),
            (Some(JobPhase::Failed), Action::Wait)
        );
        assert_eq!(true_condition(&derived.status).1, "Diverged");
    }

    #[test]
    fn crashes_are_retried_until_the_backoff_limit() {
        let mut job = job();
        job.spec.run_policy.backoff_limit = 1;
        let first = exited(pod(0, "Failed"), 1, "Error", None);
        let derived = derive(&job, std::slice::from_ref(&first), None, now());
        assert_eq!(derived.action, Action::CreatePod(1));
        assert_eq!(derived.status.failed_attempts, 1);

        let second = exited(pod(1, "Failed"), 137, "OOMKilled", None);
        let derived = derive(&job, &[first, second], None, now());
        assert_eq!(derived.status.phase, Some(JobPhase::Failed));
        assert_eq!(true_condition(&derived.status).1, "BackoffLimitExceeded");
        assert_eq!(
            derived.status.attempts[1].reason.as_deref(),
            Some("OutOfMemory")
        );
        // With the fix named on the attempt and in the Failed condition.
        let advice = crate::finetunejob::attempts::OUT_OF_MEMORY_ADVICE;
        assert_eq!(derived.status.attempts[1].message.as_deref(), Some(advice));
        let failed = derived
            .status
            .conditions
            .iter()
            .find(|c| c.status == "True");
        let message = failed.map(|c| c.message.as_str()).unwrap_or_default();
        assert!(message.contains("spec.resources.memory"), "{message}");
    }

    #[test]
    fn a_job_past_its_deadline_stops_its_pod_and_fails() {
        let mut job = job();
        job.spec.run_policy.active_deadline_seconds = Some(60);
        let started = now().checked_sub(Duration::from_secs(61)).unwrap();
        job.status = Some(FinetuneJobStatus {
            phase: Some(JobPhase::Running),
            start_time: Some(Time(started)),
            ..FinetuneJobStatus::default()
        });
        let running = pod(0, "Running");
        let derived = derive(&job, std::slice::from_ref(&running), None, now());
        assert_eq!(
            derived.action,
            Action::DeletePods(vec!["j-attempt-0".into()])
        );
        assert_eq!(derived.status.phase, Some(JobPhase::Failed));
        assert_eq!(true_condition(&derived.status).1, "DeadlineExceeded");
        // Within the deadline nothing changes.
        let early = started.checked_add(Duration::from_secs(59)).unwrap();
        let derived = derive(&job, &[running], None, early);
        assert_eq!(derived.status.phase, Some(JobPhase::Running));
    }

    #[test]
    fn finished_jobs_expire_their_ttl_after_completion() {
        let mut job = job();
        job.spec.run_policy.ttl_seconds_after_finished = Some(30);
        let mut status = FinetuneJobStatus::default();
        assert_eq!(ttl_expiry(&job, &status), None, "not started");
        status.phase = Some(JobPhase::Succeeded);
        status.completion_time = Some(Time(now()));
        let due = now().checked_add(Duration::from_secs(30)).unwrap();
        assert_eq!(ttl_expiry(&job, &status), Some(due));
        status.phase = Some(JobPhase::Running);
        assert_eq!(
            ttl_expiry(&job, &status),
            None,
            "a running job does not expire"
        );
    }

    #[test]
    fn a_pod_deleted_under_the_trainer_is_a_preemption_and_the_next_attempt_starts() {
        let mut job = job();
        job.spec.run_policy.backoff_limit = 0;
        // Attempt 0 was seen running; now its pod is gone (evicted through the API).
        let seen = derive(&job, &[pod(0, "Running")], None, now());
        job.status = Some(seen.status);
        let derived = derive(&job, &[], None, now());
        assert_eq!(derived.action, Action::CreatePod(1));
        assert_eq!(
            (derived.status.preemptions, derived.status.failed_attempts),
            (1, 0)
        );
        let record = &derived.status.attempts[0];
        assert_eq!(record.reason.as_deref(), Some("Preempted"));
        assert!(record.end_time.is_some() && record.message.is_some());

        // Once attempt 1 runs, attempt 0's record and the count stay.
        job.status = Some(derived.status);
        let derived = derive(&job, &[pod(1, "Running")], None, now());
        assert_eq!(derived.status.attempts.len(), 2);
        assert_eq!(derived.status.preemptions, 1);
        assert_eq!(derived.action, Action::PollProgress("j-attempt-1".into()));
    }

    #[test]
    fn a_failed_pod_removed_while_backing_off_keeps_its_charge_and_its_wait() {
        let mut job = job();
        job.spec.run_policy.backoff_limit = 3;
        let ended = now().checked_sub(Duration::from_secs(4)).unwrap();
        let crashed = finished(exited(pod(0, "Failed"), 1, "Error", None), ended);
        let backing_off = derive(&job, &[crashed], None, now());
        assert_eq!(true_condition(&backing_off.status).1, "BackingOff");
        let due = backing_off.status.next_retry_time.clone();
        job.status = Some(backing_off.status);
        // Someone deletes the failed pod: the attempt stays charged and the retry waits as before.
        let derived = derive(&job, &[], None, now());
        assert_eq!(derived.status.failed_attempts, 1);
        assert_eq!(derived.status.attempts[0].reason.as_deref(), Some("Error"));
        assert_eq!(derived.action, Action::Wait);
        assert_eq!(derived.status.next_retry_time, due);
    }

    #[test]
    fn charged_failures_back_off_doubling_to_five_minutes() {
        let secs = |n| retry_delay(n).as_secs();
        assert_eq!(
            [
                secs(0),
                secs(1),
                secs(2),
                secs(3),
                secs(5),
                secs(6),
                secs(40)
            ],
            [10, 10, 20, 40, 160, 300, 300]
        );
    }

    #[test]
    fn a_crash_waits_out_its_backoff_before_the_next_attempt() {
        let mut job = job();
        job.spec.run_policy.backoff_limit = 3;
        let ended = now().checked_sub(Duration::from_secs(4)).unwrap();
        let first = finished(exited(pod(0, "Failed"), 1, "Error", None), ended);
        let derived = derive(&job, std::slice::from_ref(&first), None, now());
        assert_eq!(derived.action, Action::Wait);
        assert_eq!(derived.status.phase, Some(JobPhase::Pending));
        assert_eq!(true_condition(&derived.status).1, "BackingOff");
        let due = ended.checked_add(Duration::from_secs(10)).unwrap();
        assert_eq!(derived.status.next_retry_time, Some(Time(due)));

        let later = due.checked_add(Duration::from_secs(1)).unwrap();
        let derived = derive(&job, std::slice::from_ref(&first), None, later);
        assert_eq!(derived.action, Action::CreatePod(1));
        assert_eq!(derived.status.next_retry_time, None);

        // The second charged failure waits twice as long.
        let second = finished(exited(pod(1, "Failed"), 1, "Error", None), later);
        let derived = derive(&job, &[first, second], None, later);
        let due = later.checked_add(Duration::from_secs(20)).unwrap();
        assert_eq!(derived.status.next_retry_time, Some(Time(due)));
    }

    #[test]
    fn a_preemption_is_retried_without_waiting() {
        let evicted = finished(
            condition(
                exited(pod(0, "Failed"), 143, "Error", None),
                "DisruptionTarget",
                "True",
                "EvictionByEvictionAPI",
                "evicted",
            ),
            now(),
        );
        let derived = derive(&job(), &[evicted], None, now());
        assert_eq!(derived.action, Action::CreatePod(1));
        assert_eq!(derived.status.next_retry_time, None);
    }

    #[test]
    fn a_suspended_jobs_stopped_pod_starts_no_new_attempt() {
        let mut job = job();
        job.spec.run_policy.suspend = true;
        let stopped = exited(pod(0, "Failed"), 143, "Error", None);
        let derived = derive(&job, &[stopped], None, now());
        assert_eq!(derived.action, Action::Wait);
        assert_eq!(derived.status.phase, Some(JobPhase::Suspended));
    }

    #[test]
    fn preemptions_are_retried_without_charge() {
        let mut job = job();
        job.spec.run_policy.backoff_limit = 0;
        let evicted = condition(
            exited(pod(0, "Failed"), 143, "Error", None),
            "DisruptionTarget",
            "True",
            "PreemptionByScheduler",
            "preempted",
        );
        let sigterm = exited(pod(1, "Failed"), 143, "Error", None);
        let derived = derive(&job, &[evicted, sigterm], None, now());
        assert_eq!(derived.action, Action::CreatePod(2));
        assert_eq!(
            (derived.status.preemptions, derived.status.failed_attempts),
            (2, 0)
        );
    }

    #[test]
    fn invalid_specs_fail_once_with_the_problems() {
        let derived = rejected_spec(
            &job(),
            "InvalidSpec",
            "spec.adapter.lora.rank: Invalid value: 0",
            now(),
        );
        assert_eq!(derived.status.phase, Some(JobPhase::Failed));
        assert_eq!(true_condition(&derived.status), ("Failed", "InvalidSpec"));
        let mut failed = job();
        failed.status = Some(derived.status);
        assert!(
            rejected_spec(&failed, "InvalidSpec", "same", now())
                .transitions
                .is_empty()
        );
    }

    #[test]
    fn child_creation_failures_are_visible_in_status() {
        let status = child_creation_failed(
            &job(),
            "pod j-attempt-0",
            "exceeded quota: gpu",
            "ChildCreationFailed",
            now(),
        );
        let created = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Created")
            .unwrap();
        assert_eq!(
            (created.status.as_str(), created.reason.as_str()),
            ("False", "ChildCreationFailed")
        );
        assert!(created.message.contains("exceeded quota"));
        assert_eq!(status.phase, Some(JobPhase::Pending));
    }

    #[test]
    fn finished_jobs_stay_finished() {
        let mut job = job();
        job.status = Some(FinetuneJobStatus {
            phase: Some(JobPhase::Succeeded),
            ..FinetuneJobStatus::default()
        });
        let derived = derive(&job, &[pod(0, "Running")], None, now());
        assert_eq!(
            (derived.action, derived.transitions.len()),
            (Action::Wait, 0)
        );
    }

    #[test]
    fn conditions_keep_their_transition_time_and_one_is_true() {
        let mut job = job();
        let first = derive(&job, &[pod(0, "Running")], None, now());
        job.status = Some(first.status);
        let later: Timestamp = "2026-11-26T12:05:00Z".parse().unwrap();
        let second = derive(&job, &[pod(0, "Running")], None, later);
        let running = second
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Running")
            .unwrap();
        assert_eq!(running.last_transition_time, Time(now()));
        assert!(
            second.transitions.is_empty(),
            "no event without a phase change"
        );
        assert_eq!(
            second
                .status
                .conditions
                .iter()
                .filter(|c| c.status == "True")
                .count(),
            1
        );
    }
}
