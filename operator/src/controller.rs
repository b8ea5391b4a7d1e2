//! The FinetuneJob controller: validate → build (pure) → apply → derive status (pure) → write
//! status and events. Only this file and `apply` talk to the apiserver.

use std::sync::Arc;
use std::time::Duration;

use finetune_crds::contract::DEFAULT_STATUS_PORT;
use finetune_crds::{FinetuneJob, FinetuneJobStatus, JobPhase, validate_object};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;
use tracing::{info, warn};

use crate::error::Error;
use crate::finetunejob::build::{self, BuildSettings};
use crate::finetunejob::names;
use crate::finetunejob::status::{self, Action, Derived};
use crate::metrics::Metrics;
use crate::progress::ProgressPoller;

/// Field manager for server-side apply.
pub const MANAGER: &str = "finetune-operator";

/// What every reconcile shares.
pub struct Context {
    /// The apiserver client.
    pub client: Client,
    /// Publishes Events on FinetuneJobs.
    pub recorder: Recorder,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// Image and defaults for children.
    pub settings: BuildSettings,
    /// Rate-limited `/status` polling of running trainers.
    pub progress: ProgressPoller,
}

impl Context {
    /// A context whose Events name this operator instance.
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        settings: BuildSettings,
        progress: ProgressPoller,
    ) -> Self {
        let instance = std::env::var("POD_NAME").ok();
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            settings,
            progress,
        }
    }
}

/// Fails with an install hint when the CRDs are not installed.
pub async fn ensure_crds_installed(client: &Client) -> Result<(), String> {
    match Api::<FinetuneJob>::all(client.clone()).list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(
            "the FinetuneJob CRD is not installed: run `finetune-operator crd | kubectl apply -f -` \
             (or install the Helm chart with crds.enabled=true)"
                .into(),
        ),
        Err(error) => Err(format!("cannot reach the apiserver: {error}")),
    }
}

/// Runs the controller until SIGTERM/SIGINT. `namespace` limits it to one namespace.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, on_ready: impl FnOnce()) {
    let client = ctx.client.clone();
    let (jobs, pods, maps, claims) = match &namespace {
        Some(ns) => (
            Api::<FinetuneJob>::namespaced(client.clone(), ns),
            Api::<Pod>::namespaced(client.clone(), ns),
            Api::<ConfigMap>::namespaced(client.clone(), ns),
            Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client),
        ),
    };
    let children =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=finetune-operator");
    let controller = Controller::new(jobs, watcher::Config::default())
        .owns(pods, children.clone())
        .owns(maps, children.clone())
        .owns(claims, children)
        .shutdown_on_signal();
    on_ready();
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "reconcile failed");
            }
        })
        .await;
}

fn error_policy(job: Arc<FinetuneJob>, error: &Error, ctx: Arc<Context>) -> Requeue {
    ctx.metrics
        .reconcile_failed("FinetuneJob", error.metric_label());
    warn!(job = %job.name_any(), %error, "reconcile error; retrying");
    Requeue::requeue(Duration::from_secs(10))
}

async fn reconcile(job: Arc<FinetuneJob>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let _timer = ctx.metrics.reconcile_started("FinetuneJob");
    let namespace = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let key = format!("{namespace}/{name}");
    if job.metadata.deletion_timestamp.is_some() {
        ctx.metrics.set_phase(&key, None);
        ctx.progress.forget(&key);
        return Ok(Requeue::await_change());
    }
    let jobs: Api<FinetuneJob> = Api::namespaced(ctx.client.clone(), &namespace);

    if let Err(invalid) = validate_object(job.as_ref()) {
        let derived = status::invalid_spec(&job, &invalid.to_string(), Timestamp::now());
        write_status(&jobs, &job, &derived.status).await?;
        publish(&ctx, &job, &derived).await;
        ctx.metrics.set_phase(&key, derived.status.phase);
        return Ok(Requeue::await_change());
    }

    let finished = matches!(
        job.status.as_ref().and_then(|s| s.phase),
        Some(JobPhase::Succeeded | JobPhase::Failed)
    );
    if !finished {
        apply_storage(&ctx, &jobs, &job, &namespace).await?;
    }

    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    // From the apiserver's watch cache (resourceVersion 0), not a quorum read from etcd: a
    // slightly stale list is harmless because pod changes trigger another reconcile and pod
    // creation is an idempotent server-side apply of a deterministic name.
    let selector = ListParams::default()
        .labels(&format!("{}={name}", names::JOB_LABEL))
        .match_any();
    let listed = pods_api.list(&selector).await?;
    let uid = job.uid();
    let pods: Vec<Pod> = listed
        .items
        .into_iter()
        .filter(|pod| {
            pod.owner_references()
                .iter()
                .any(|owner| Some(&owner.uid) == uid.as_ref())
        })
        .collect();
    let report = match running_trainer_address(&pods) {
        Some(address) => ctx.progress.report(&key, &address).await,
        None => None,
    };
    let derived = status::derive(&job, &pods, report.as_ref(), Timestamp::now());

    match &derived.action {
        Action::CreatePod(attempt) => {
            let pod = build::trainer_pod(&job, *attempt, &ctx.settings)?;
            let pod_name = names::trainer_pod(&name, *attempt);
            if let Err(error) = apply(&pods_api, &pod_name, &pod).await {
                return Err(
                    child_failed(&ctx, &jobs, &job, &format!("pod {pod_name}"), error).await,
                );
            }
            info!(job = %key, attempt, "trainer pod created");
        }
        Action::DeletePod(pod_name) => {
            let grace =
                DeleteParams::default().grace_period(ctx.settings.termination_grace_seconds as u32);
            match pods_api.delete(pod_name, &grace).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Action::PollProgress(_) | Action::Wait => {}
    }

    record_timings(&ctx, &job, &derived.status, &namespace);
    if job.status.as_ref() != Some(&derived.status) {
        write_status(&jobs, &job, &derived.status).await?;
    }
    publish(&ctx, &job, &derived).await;
    ctx.metrics.set_phase(&key, derived.status.phase);
    if matches!(
        derived.status.phase,
        Some(JobPhase::Succeeded | JobPhase::Failed)
    ) {
        ctx.progress.forget(&key);
    }
    Ok(match derived.status.phase {
        Some(JobPhase::Running) => Requeue::requeue(Duration::from_secs(10)),
        Some(JobPhase::Pending | JobPhase::Queued) => Requeue::requeue(Duration::from_secs(30)),
        _ => Requeue::await_change(),
    })
}

/// The manifest ConfigMap and the storage claim; both are server-side applied on every
/// reconcile, which makes them self-healing and never duplicated.
async fn apply_storage(
    ctx: &Context,
    jobs: &Api<FinetuneJob>,
    job: &FinetuneJob,
    namespace: &str,
) -> Result<(), Error> {
    let map = build::manifest_config_map(job)?;
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let map_name = map.name_any();
    if let Err(error) = apply(&maps, &map_name, &map).await {
        return Err(child_failed(ctx, jobs, job, &format!("configmap {map_name}"), error).await);
    }
    if let Some(claim) = build::storage_claim(job, &ctx.settings)? {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
        let claim_name = claim.name_any();
        if let Err(error) = apply(&claims, &claim_name, &claim).await {
            return Err(child_failed(
                ctx,
                jobs,
                job,
                &format!("persistentvolumeclaim {claim_name}"),
                error,
            )
            .await);
        }
    }
    Ok(())
}

async fn apply<K>(api: &Api<K>, name: &str, object: &K) -> Result<K, kube::Error>
where
    K: Resource + Clone + Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
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
    let status = status::child_creation_failed(job, child, &message, Timestamp::now());
    if let Err(status_error) = write_status(jobs, job, &status).await {
        warn!(%status_error, "cannot record the child creation failure in status");
    }
    let event = Event {
        type_: EventType::Warning,
        reason: "ChildCreationFailed".into(),
        note: Some(format!("cannot create {child}: {message}")),
        action: "Create".into(),
        secondary: None,
    };
    if let Err(event_error) = ctx.recorder.publish(&event, &job.object_ref(&())).await {
        warn!(%event_error, "cannot publish event");
    }
    Error::Kube(error)
}

async fn write_status(
    jobs: &Api<FinetuneJob>,
    job: &FinetuneJob,
    status: &FinetuneJobStatus,
) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": FinetuneJob::api_version(&()),
        "kind": FinetuneJob::kind(&()),
        "status": status,
    });
    jobs.patch_status(
        &job.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

async fn publish(ctx: &Context, job: &FinetuneJob, derived: &Derived) {
    for transition in &derived.transitions {
        let event = Event {
            type_: if transition.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: transition.reason.clone(),
            note: Some(transition.message.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &job.object_ref(&())).await {
            warn!(%error, "cannot publish event");
        }
    }
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

/// `ip:port` of the newest trainer pod when it is running.
fn running_trainer_address(pods: &[Pod]) -> Option<String> {
    let newest = pods.iter().max_by_key(|pod| {
        pod.labels()
            .get(names::ATTEMPT_LABEL)
            .and_then(|a| a.parse::<i32>().ok())
            .unwrap_or(-1)
    })?;
    let status = newest.status.as_ref()?;
    (status.phase.as_deref() == Some("Running")).then_some(())?;
    Some(format!("{}:{DEFAULT_STATUS_PORT}", status.pod_ip.as_ref()?))
}
