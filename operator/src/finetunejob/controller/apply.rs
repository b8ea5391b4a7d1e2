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
    // The storage and the pod do not depend on each other (the pod waits for its volumes),
    // so a new job's children are written concurrently: one round trip instead of two.
    let storage = apply_storage(ctx, &jobs, job, &namespace, plan.storage);
    let pod = change_pod(ctx, &jobs, job, plan.pod, &namespace);
    futures::try_join!(storage, pod)?;

    // Only a changed status can hold a job's first start or first step.
    if let Some(status) = &plan.status {
        record_timings(ctx, job, status, &namespace);
        write_status(&jobs, job, status, &ctx.jobs_written).await?;
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    for pod_name in plan.prune {
        // Its attempt is in the status just written; its logs are no longer the newest.
        tolerate_api_error(pods.delete(&pod_name, &DeleteParams::background()).await)?;
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
        tolerate_api_error(
            jobs.delete(&job.name_any(), &DeleteParams::background())
                .await,
        )?;
        return Ok(Action::await_change());
    }
    Ok(match plan.requeue {
        Requeue::OnChange => Action::await_change(),
        Requeue::After(wait) => Action::requeue(wait),
        Requeue::At { time, at_least } => Action::requeue(time_until(time).max(at_least)),
    })
}

/// A deletion the apiserver refused or found nothing to do for is done; a transport error is
/// retried.
fn tolerate_api_error<T>(result: Result<T, kube::Error>) -> Result<(), Error> {
    match result {
        Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
        Err(error) => Err(error.into()),
    }
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
        PodChange::Create { attempt, pod } => {
            let pod_name = pod.name_any();
            match api::apply(&pods_api, &pod_name, &pod).await {
                Ok(mut created) => {
                    strip_pod(&mut created);
                    ctx.caches.pods_written.record(created);
                }
                Err(error) => {
                    return Err(
                        child_failed(ctx, jobs, job, &format!("pod {pod_name}"), error).await,
                    );
                }
            }
            info!(job = %format!("{namespace}/{}", job.name_any()), attempt, "trainer pod created");
        }
        PodChange::InitAdapterUnavailable(why) => {
            return Err(init_adapter_unavailable(ctx, jobs, job, why).await);
        }
        PodChange::Delete(pod_name) => {
            let grace =
                DeleteParams::default().grace_period(ctx.settings.termination_grace_seconds as u32);
            tolerate_api_error(pods_api.delete(&pod_name, &grace).await)?;
        }
        PodChange::None => {}
    }
    Ok(())
}

/// Server-side applies the stale storage children, recording each for read-your-writes.
async fn apply_storage(
    ctx: &Context,
    jobs: &Api<FinetuneJob>,
    job: &FinetuneJob,
    namespace: &str,
    stale: Vec<StaleStorage>,
) -> Result<(), Error> {
    for child in stale {
        let applied = match &child {
            StaleStorage::Map(map) => {
                let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
                api::apply(&maps, &map.name_any(), map.as_ref())
                    .await
                    .map(|applied| {
                        ctx.caches
                            .maps_written
                            .record(written_meta(applied.metadata));
                    })
            }
            StaleStorage::Claim(claim) => {
                let claims: Api<PersistentVolumeClaim> =
                    Api::namespaced(ctx.client.clone(), namespace);
                api::apply(&claims, &claim.name_any(), claim.as_ref())
                    .await
                    .map(|applied| {
                        ctx.caches
                            .claims_written
                            .record(written_meta(applied.metadata));
                    })
            }
        };
        if let Err(error) = applied {
            let what = match &child {
                StaleStorage::Map(map) => format!("configmap {}", map.name_any()),
                StaleStorage::Claim(claim) => {
                    format!("persistentvolumeclaim {}", claim.name_any())
                }
            };
            return Err(child_failed(ctx, jobs, job, &what, error).await);
        }
    }
    Ok(())
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
    let status = status::child_creation_failed(job, child, message, Timestamp::now());
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
