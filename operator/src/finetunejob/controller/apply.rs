//! Carries out a job's [`Plan`]: the writes in a slot of the write gate (none when the plan is
//! empty), then the Events, the metrics and the requeue. A refused child is recorded on the job
//! (condition and Warning Event) before the error retries the reconcile with backoff.

use std::time::Duration;

use finetune_crds::contract::TerminationMessage;
use finetune_crds::{Adapter, FinetuneJob, FinetuneJobStatus, JobPhase};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use tracing::{info, warn};

use super::context::{Context, strip_pod};
use super::plan::{Plan, PodChange, Requeue, StaleStorage};
use crate::api::{self, write_status, written_meta};
use crate::conditions::Transition;
use crate::error::Error;
use crate::finetunejob::produced;
use crate::finetunejob::status::{self, Outcome};
use crate::ours::{self, Refused};

/// Makes `plan`'s writes for `job` and says when to reconcile it again.
pub(super) async fn apply(ctx: &Context, job: &FinetuneJob, plan: Plan) -> Result<Action, Error> {
    let namespace = job.namespace().unwrap_or_default();
    let key = format!("{namespace}/{}", job.name_any());
    let jobs: Api<FinetuneJob> = Api::namespaced(ctx.client.clone(), &namespace);
    // Most reconciles write nothing; those that do wait for a slot, a job's first pod first.
    let _slot = if plan.is_empty() {
        None
    } else {
        Some(ctx.gate.acquire(plan.priority()).await)
    };
    // Storage first: the pod mounts the manifest ConfigMap and the claim by name, so it is
    // created only once both are known to be this job's. Were they written concurrently, a
    // user's object holding one of those names (a `NameConflict`) would be mounted into our
    // pod, and the trainer would read its manifest from it or write checkpoints into it.
    apply_storage(ctx, &jobs, job, &namespace, plan.storage).await?;
    change_pod(ctx, &jobs, job, plan.pod, &namespace).await?;

    // Only a changed status can hold a job's first start or first step.
    if let Some(status) = &plan.status {
        record_timings(ctx, job, status, &namespace);
        write_status(&jobs, job, status, &ctx.jobs_written).await?;
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    for pod_name in plan.prune {
        // Its attempt is in the status just written; its logs are no longer the newest.
        ours::deleted(pods.delete(&pod_name, &DeleteParams::background()).await)?;
    }
    if let Some(termination) = plan.register {
        register_adapter(ctx, job, &termination, &namespace).await?;
    }
    // Counted once the pod and the status are written: a failed write derives it again.
    count_outcome(ctx, &key, &namespace, plan.outcome);
    publish(ctx, job, &plan.transitions);
    ctx.metrics.set_phase(&key, plan.phase);
    if matches!(plan.phase, Some(JobPhase::Succeeded | JobPhase::Failed)) {
        ctx.progress.forget(&key);
    }
    if plan.delete_job {
        // ttlSecondsAfterFinished: the job goes; its children follow by owner reference.
        info!(job = %key, "ttlSecondsAfterFinished passed; deleting the job");
        let deleted = jobs
            .delete(&job.name_any(), &DeleteParams::background())
            .await;
        if let Err(error) = ours::deleted(deleted) {
            // Say it where the user looks: a 403 here means the operator's RBAC lacks `delete`.
            let event = Event {
                type_: EventType::Warning,
                reason: "TTLDeleteFailed".into(),
                note: Some(format!(
                    "ttlSecondsAfterFinished passed but the job cannot be deleted: {error}"
                )),
                action: "Delete".into(),
                secondary: None,
            };
            publish_detached(ctx, job, vec![event]);
            return Err(error.into());
        }
        return Ok(Action::await_change());
    }
    Ok(match plan.requeue {
        Requeue::OnChange => Action::await_change(),
        Requeue::After(wait) => Action::requeue(wait),
        Requeue::At { time, at_least } => Action::requeue(time_until(time).max(at_least)),
    })
}

/// How long until `at` (zero once it has passed).
fn time_until(at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(Timestamp::now())).unwrap_or_default()
}

/// Carries out the pod change.
async fn change_pod(
    ctx: &Context,
    jobs: &Api<FinetuneJob>,
    job: &FinetuneJob,
    change: PodChange,
    namespace: &str,
) -> Result<(), Error> {
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    match change {
        PodChange::Create { attempt, pods } => {
            for pod in pods {
                let pod_name = pod.name_any();
                match ours::create(&pods_api, &job_uid(job), &pod).await {
                    Ok(mut created) => {
                        strip_pod(&mut created);
                        ctx.caches.pods_written.record(created);
                    }
                    // Ours already: created by an earlier reconcile the cache has not shown yet.
                    Err(Refused::Api(error)) if ours::is_already_exists(&error) => {}
                    Err(refused) => {
                        let what = format!("pod {pod_name}");
                        return Err(refused_child(ctx, jobs, job, &what, refused).await);
                    }
                }
                info!(job = %format!("{namespace}/{}", job.name_any()), attempt, pod = %pod_name, "trainer pod created");
            }
        }
        PodChange::InitAdapterUnavailable(why) => {
            return Err(init_adapter_unavailable(ctx, jobs, job, why).await);
        }
        PodChange::Delete(pod_names) => {
            let grace =
                DeleteParams::default().grace_period(ctx.settings.termination_grace_seconds as u32);
            for pod_name in pod_names {
                ours::deleted(pods_api.delete(&pod_name, &grace).await)?;
            }
        }
        PodChange::None => {}
    }
    Ok(())
}

/// Creates or updates the stale storage children (never one that is not ours), recording each
/// for read-your-writes.
async fn apply_storage(
    ctx: &Context,
    jobs: &Api<FinetuneJob>,
    job: &FinetuneJob,
    namespace: &str,
    stale: Vec<StaleStorage>,
) -> Result<(), Error> {
    let uid = job_uid(job);
    for child in stale {
        let (what, written) = match &child {
            StaleStorage::Map(map) => {
                let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
                let written =
                    ours::create_or_update(&maps, &uid, map.as_ref())
                        .await
                        .map(|applied| {
                            ctx.caches
                                .maps_written
                                .record(written_meta(applied.metadata));
                        });
                (format!("configmap {}", map.name_any()), written)
            }
            StaleStorage::Claim(claim) => {
                let claims: Api<PersistentVolumeClaim> =
                    Api::namespaced(ctx.client.clone(), namespace);
                let written = ours::create_or_update(&claims, &uid, claim.as_ref())
                    .await
                    .map(|applied| {
                        ctx.caches
                            .claims_written
                            .record(written_meta(applied.metadata));
                    });
                (
                    format!("persistentvolumeclaim {}", claim.name_any()),
                    written,
                )
            }
        };
        if let Err(refused) = written {
            return Err(refused_child(ctx, jobs, job, &what, refused).await);
        }
    }
    Ok(())
}

fn job_uid(job: &FinetuneJob) -> String {
    job.uid().unwrap_or_default()
}

/// Records a child that was not written on the job and returns the error that retries the
/// reconcile with backoff: a name held by someone else's object is `NameConflict` (it clears
/// once they rename or delete it), anything else `ChildCreationFailed`.
async fn refused_child(
    ctx: &Context,
    jobs: &Api<FinetuneJob>,
    job: &FinetuneJob,
    child: &str,
    refused: Refused,
) -> Error {
    match refused {
        Refused::Api(error) => child_failed(ctx, jobs, job, child, error).await,
        Refused::NameConflict(message) => {
            let note = format!("cannot create {child}: {message}");
            record_creation_failure(ctx, jobs, job, child, &message, "NameConflict", note).await;
            Error::NameConflict(message)
        }
    }
}

/// Registers the Adapter a succeeded job produced (see `produced`): spec by server-side apply,
/// then its status with the lineage. Once per job (its UID); an Adapter of that name that comes
/// from another job is left alone with a Warning on this one.
async fn register_adapter(
    ctx: &Context,
    job: &FinetuneJob,
    termination: &TerminationMessage,
    namespace: &str,
) -> Result<(), Error> {
    let adapters: Api<Adapter> = Api::namespaced(ctx.client.clone(), namespace);
    let desired = produced::adapter(job, termination);
    let name = desired.name_any();
    if let Some(existing) = adapters.get_opt(&name).await? {
        if !produced::belongs_to(&existing, job) {
            let event = Event {
                type_: EventType::Warning,
                reason: "AdapterNameTaken".into(),
                note: Some(format!(
                    "Adapter {name} already exists and does not come from this job; the result stays in the job's storage"
                )),
                action: "Register".into(),
                secondary: None,
            };
            publish_detached(ctx, job, vec![event]);
            return Ok(());
        }
        if produced::is_registered(&existing, job) {
            return Ok(());
        }
    }
    api::apply(&adapters, &name, &desired).await?;
    let status = produced::adapter_status(job, termination, Timestamp::now());
    let files = status.files.len();
    api::patch_status(&adapters, &name, &status).await?;
    let event = Event {
        type_: EventType::Normal,
        reason: "AdapterRegistered".into(),
        note: Some(format!(
            "Adapter {name} registered with its lineage and {files} file digest(s)"
        )),
        action: "Register".into(),
        secondary: None,
    };
    publish_detached(ctx, job, vec![event]);
    Ok(())
}

/// Records on the job why its starting adapter cannot be used yet (condition + Warning event);
/// the returned error retries with backoff, so the pod follows once the Adapter is there.
async fn init_adapter_unavailable(
    ctx: &Context,
    jobs: &Api<FinetuneJob>,
    job: &FinetuneJob,
    why: String,
) -> Error {
    let note = format!("spec.adapter.initAdapter: {why}");
    record_creation_failure(
        ctx,
        jobs,
        job,
        "the trainer pod",
        &why,
        "InitAdapterUnavailable",
        note,
    )
    .await;
    Error::InitAdapter(why)
}

/// Records a failed child creation on the job (condition + Warning event) and returns the error
/// for a retry with backoff.
async fn child_failed(
    ctx: &Context,
    jobs: &Api<FinetuneJob>,
    job: &FinetuneJob,
    child: &str,
    error: kube::Error,
) -> Error {
    let message = match &error {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    };
    let note = format!("cannot create {child}: {message}");
    record_creation_failure(ctx, jobs, job, child, &message, "ChildCreationFailed", note).await;
    Error::Kube(error)
}

/// Why `child` could not be created: the job's `Created` condition says it, and a Warning
/// Event with `reason` and `note` goes with it. A status write that fails is only logged: the
/// caller's error retries the reconcile anyway.
async fn record_creation_failure(
    ctx: &Context,
    jobs: &Api<FinetuneJob>,
    job: &FinetuneJob,
    child: &str,
    message: &str,
    reason: &str,
    note: String,
) {
    let status = status::child_creation_failed(job, child, message, reason, Timestamp::now());
    if let Err(status_error) = write_status(jobs, job, &status, &ctx.jobs_written).await {
        warn!(%status_error, %reason, "cannot record the creation failure in status");
    }
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note),
        action: "Create".into(),
        secondary: None,
    };
    publish_detached(ctx, job, vec![event]);
}

/// Counts a job's transition into Failed, or the retry it starts, in the metrics.
pub(super) fn count_outcome(ctx: &Context, key: &str, namespace: &str, outcome: Option<Outcome>) {
    match outcome {
        Some(Outcome::Failed { reason }) => ctx.metrics.job_failed(namespace, &reason),
        Some(Outcome::Retried { attempt, reason }) => {
            ctx.metrics.job_retried(key, attempt, &reason);
        }
        None => {}
    }
}

/// Publishes an Event for each transition.
pub(super) fn publish(ctx: &Context, job: &FinetuneJob, transitions: &[Transition]) {
    let events = transitions
        .iter()
        .map(|transition| transition.event("Reconcile"))
        .collect();
    publish_detached(ctx, job, events);
}

/// Queues `events` on `job` for the background dispatcher (see `event_queue`).
fn publish_detached(ctx: &Context, job: &FinetuneJob, events: Vec<Event>) {
    ctx.events.publish(job.object_ref(&()), events);
}

/// Queue wait (creation → running) and time to first step, each observed once per job.
fn record_timings(ctx: &Context, job: &FinetuneJob, status: &FinetuneJobStatus, namespace: &str) {
    let Some(created) = job.metadata.creation_timestamp.as_ref().map(|t| t.0) else {
        return;
    };
    let since_creation = Timestamp::now()
        .duration_since(created)
        .as_secs_f64()
        .max(0.0);
    let previous = job.status.as_ref();
    let was_running_before = previous.and_then(|s| s.start_time.as_ref()).is_some();
    if status.start_time.is_some() && !was_running_before {
        ctx.metrics.observe_queue_wait(namespace, since_creation);
    }
    let stepped_before = previous
        .and_then(|s| s.progress.as_ref())
        .is_some_and(|p| p.step > 0);
    if status.progress.as_ref().is_some_and(|p| p.step > 0) && !stepped_before {
        ctx.metrics.observe_first_step(namespace, since_creation);
    }
}
