//! The FinetuneJob controller: validate → build (pure) → apply → derive status (pure) → write
//! status and events. Only this file and `crate::api` talk to the apiserver.
//!
//! Reads come from watch caches, never from per-reconcile LISTs: the watches that trigger
//! reconciles on children also keep them in stores, so a reconcile that finds nothing to change
//! makes no API call at all. Writes are kept to what changed: children are applied only when the
//! cached copy differs (a content hash in an annotation), the status only when it differs, and
//! Events only on transitions.

use std::sync::Arc;
use std::time::Duration;

use finetune_crds::contract::{DEFAULT_STATUS_PORT, TerminationMessage};
use finetune_crds::{Adapter, FinetuneJob, FinetuneJobStatus, JobPhase, validate_object};
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, PartialObjectMeta};
use kube::runtime::controller::{Action as Requeue, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::{
    self, APPLIED_HASH_ANNOTATION, api, applied_hash, apply, cached_watch, stamp_hash,
    write_status, written_meta,
};
use crate::error::Error;
use crate::event_queue::EventQueue;
use crate::finetunejob::build;
use crate::finetunejob::names;
use crate::finetunejob::status::{self, Action, Derived, Outcome};
use crate::finetunejob::{init_adapter, produced};
use crate::gate::{Gate, Priority};
use crate::last_written::LastWritten;
use crate::metrics::Metrics;
use crate::pods::BuildSettings;
use crate::progress::ProgressPoller;
use crate::valid_specs::ValidSpecs;

/// Reconciles in flight per write slot: those that find nothing to write finish without one,
/// so they need not queue behind writers.
pub const READERS_PER_WRITER: u16 = 256;

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Watch only this namespace (all namespaces when `None`).
    pub namespace: Option<String>,
    /// Most reconciles writing to the apiserver at once (see `gate`). Each holds one HTTP/1
    /// connection while it waits, so this also bounds the operator's connections. Reconciles
    /// that only read caches run beside them, up to [`READERS_PER_WRITER`] times as many.
    pub concurrency: u16,
    /// Failed trainer pods kept per job for their logs (the newest); older ones are deleted
    /// once their attempt is recorded in the job's status.
    pub failed_pods_to_keep: usize,
}

/// The children a reconcile reads, cached by the watches that trigger reconciles, each with our
/// writes the watch has not delivered yet.
struct Caches {
    /// Trainer pods, without their spec (status derivation reads metadata and status only).
    pods: Store<Pod>,
    pods_written: Arc<LastWritten<Pod>>,
    /// Manifest ConfigMaps, metadata only.
    maps: Store<PartialObjectMeta<ConfigMap>>,
    maps_written: Arc<LastWritten<PartialObjectMeta<ConfigMap>>>,
    /// Storage claims, metadata only.
    claims: Store<PartialObjectMeta<PersistentVolumeClaim>>,
    claims_written: Arc<LastWritten<PartialObjectMeta<PersistentVolumeClaim>>>,
}

impl Caches {
    /// Whether every child cache holds its first full list. Checked without waiting: the
    /// caches fill from streams the controller polls between reconciles, so a reconcile that
    /// awaited them could hold the slot they need.
    fn ready(&self) -> bool {
        use futures::FutureExt;
        let filled = futures::future::try_join3(
            self.pods.wait_until_ready(),
            self.maps.wait_until_ready(),
            self.claims.wait_until_ready(),
        );
        matches!(filled.now_or_never(), Some(Ok(_)))
    }
}

/// What every reconcile shares.
pub struct Context {
    /// The apiserver client.
    pub client: Client,
    /// Publishes Events on FinetuneJobs, in the background.
    events: EventQueue,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// Image and defaults for children.
    pub settings: BuildSettings,
    /// Rate-limited `/status` polling of running trainers.
    pub progress: ProgressPoller,
    /// Failed trainer pods kept per job.
    pub failed_pods_to_keep: usize,
    caches: Caches,
    /// Jobs as returned by our last status write, kept until the job cache has caught up: a
    /// reconcile that runs before the watch delivers our own write must not derive the same
    /// transition again (a second Event and a redundant write).
    jobs_written: Arc<LastWritten<FinetuneJob>>,
    /// Bounds the reconciles writing at once, new jobs' pods first.
    gate: Arc<Gate>,
    /// Spec generations that passed validation.
    valid_specs: ValidSpecs,
}

/// Runs the FinetuneJob controller until SIGTERM/SIGINT, its writes in slots of the gate that
/// `events` publishes behind; `on_synced` is called once every FinetuneJob cache has its initial list.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    settings: BuildSettings,
    progress: ProgressPoller,
    options: Options,
    events: EventQueue,
    on_synced: impl FnOnce() + Send + 'static,
) {
    let namespace = &options.namespace;
    let children =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=finetune-operator");

    // managedFields and the last-applied annotation are most of an object's size and nothing
    // here reads them; dropping them before the store keeps the caches small. Each watch also
    // tells its LastWritten which of our writes it has delivered.
    let jobs_written = Arc::new(LastWritten::<FinetuneJob>::default());
    let (jobs, job_events) = cached_watch(
        api::<FinetuneJob>(&client, namespace),
        watcher::Config::default(),
        |job| job.metadata.managed_fields = None,
        Some(&jobs_written),
    );
    let job_events = job_events
        .applied_objects()
        // Our own status writes do not change the generation: reconciling on them would only
        // re-derive what was just written. Children's changes and requeues still trigger.
        .predicate_filter(predicates::generation, PredicateConfig::default());
    let pods_written = Arc::new(LastWritten::<Pod>::default());
    let (pods, pod_events) = cached_watch(
        api::<Pod>(&client, namespace),
        children.clone(),
        strip_pod,
        Some(&pods_written),
    );
    let maps_written = Arc::new(LastWritten::default());
    let (maps, map_events) = cached_watch(
        api::<PartialObjectMeta<ConfigMap>>(&client, namespace),
        children.clone(),
        |map| map.metadata.managed_fields = None,
        Some(&maps_written),
    );
    let claims_written = Arc::new(LastWritten::default());
    let (claims, claim_events) = cached_watch(
        api::<PartialObjectMeta<PersistentVolumeClaim>>(&client, namespace),
        children,
        |claim| claim.metadata.managed_fields = None,
        Some(&claims_written),
    );

    {
        let stores = (jobs.clone(), pods.clone(), maps.clone(), claims.clone());
        tokio::spawn(async move {
            let synced = futures::try_join!(
                stores.0.wait_until_ready(),
                stores.1.wait_until_ready(),
                stores.2.wait_until_ready(),
                stores.3.wait_until_ready(),
            );
            if synced.is_ok() {
                on_synced();
            }
        });
    }

    // A trainer's new progress is written by reconciling its job as soon as the poll returns.
    let progressed = progress
        .take_updates()
        .expect("the controller runs once per poller")
        .filter_map(|key| async move {
            let (namespace, name) = key.split_once('/')?;
            Some(ObjectRef::<FinetuneJob>::new(name).within(namespace))
        });
    let caches = Caches {
        pods,
        pods_written,
        maps,
        maps_written,
        claims,
        claims_written,
    };
    let ctx = Arc::new(Context {
        client,
        gate: events.gate().clone(),
        events,
        metrics,
        settings,
        progress,
        failed_pods_to_keep: options.failed_pods_to_keep,
        caches,
        jobs_written,
        valid_specs: ValidSpecs::default(),
    });
    Controller::for_stream(job_events, jobs)
        .owns_stream(pod_events.touched_objects())
        .owns_stream(storage_changes(map_events))
        .owns_stream(storage_changes(claim_events))
        .reconcile_on(progressed)
        .with_config(
            ControllerConfig::default()
                .concurrency(options.concurrency.saturating_mul(READERS_PER_WRITER)),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "reconcile failed");
            }
        })
        .await;
}

/// What the pod cache keeps of a trainer pod: status derivation reads metadata and status only.
fn strip_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.spec = None;
}

/// The ConfigMap and claim events worth a reconcile: a deletion, or a copy that lost our
/// applied-hash annotation (someone replaced it). Their creation and our own applies are not:
/// the reconcile that applied them already holds the result, and reconciling again on each of
/// them (two per new job) would queue new jobs behind work that finds nothing to do.
fn storage_changes<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Send + 'static,
{
    events.try_filter_map(|event| async move {
        Ok(match event {
            watcher::Event::Delete(gone) => Some(gone),
            watcher::Event::Apply(changed)
                if !changed.annotations().contains_key(APPLIED_HASH_ANNOTATION) =>
            {
                Some(changed)
            }
            _ => None,
        })
    })
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
        ctx.jobs_written.forget(&key);
        ctx.valid_specs.forget(&key);
        return Ok(Requeue::await_change());
    }
    // Until the child caches are filled, a missing pod means "not listed yet", not "gone":
    // deriving from that (after a restart or a failover) would start attempt 0 again and drop
    // the attempt history.
    if !ctx.caches.ready() {
        return Ok(Requeue::requeue(Duration::from_secs(1)));
    }
    let job = ctx.jobs_written.freshest(&key, job);
    let jobs: Api<FinetuneJob> = Api::namespaced(ctx.client.clone(), &namespace);
    ctx.metrics.namespace_seen(&namespace);
    let phase_before = job.status.as_ref().and_then(|s| s.phase);

    // Validated once per spec generation: the CEL rules cost more than the rest of a
    // reconcile.
    if !ctx.valid_specs.passed(&key, job.as_ref()) {
        if let Err(invalid) = validate_object(job.as_ref()) {
            let derived = status::invalid_spec(&job, &invalid.to_string(), Timestamp::now());
            if job.status.as_ref() != Some(&derived.status) {
                write_status(&jobs, job.as_ref(), &derived.status, &ctx.jobs_written).await?;
            }
            count_outcome(&ctx, &key, &namespace, phase_before, &derived);
            publish(&ctx, &job, &derived);
            ctx.metrics.set_phase(&key, derived.status.phase);
            return Ok(Requeue::await_change());
        }
        ctx.valid_specs.remember(&key, job.as_ref());
    }

    let uid = job.uid();
    let of_this_job = |pod: &Pod| {
        pod.namespace().as_deref() == Some(namespace.as_str())
            && pod.labels().get(names::JOB_LABEL) == Some(&name)
            && pod
                .owner_references()
                .iter()
                .any(|owner| Some(&owner.uid) == uid.as_ref())
    };
    let mut pods: Vec<Pod> = ctx
        .caches
        .pods
        .state_filter(of_this_job)
        .into_iter()
        .map(Arc::unwrap_or_clone)
        .collect();
    // Pods we created that the watch has not delivered yet.
    for created in ctx.caches.pods_written.matching(of_this_job) {
        if !pods.iter().any(|pod| pod.name_any() == created.name_any()) {
            pods.push(Arc::unwrap_or_clone(created));
        }
    }
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    for record in status::unended_attempts_without_pods(&job, &pods) {
        // Not in the cache: just created and not yet watched, or really gone. Ask.
        if let Some(pod) = pods_api.get_opt(&record.pod_name).await?
            && pod
                .owner_references()
                .iter()
                .any(|owner| Some(&owner.uid) == uid.as_ref())
        {
            pods.push(pod);
        }
    }
    let report = match running_trainer_address(&pods) {
        Some(address) => ctx.progress.report(&key, &address),
        None => None,
    };
    let derived = status::derive(&job, &pods, report.as_ref(), Timestamp::now());

    let finished = matches!(
        job.status.as_ref().and_then(|s| s.phase),
        Some(JobPhase::Succeeded | JobPhase::Failed)
    );
    let stale = if finished {
        Vec::new()
    } else {
        stale_storage(&ctx, &job)?
    };
    let status_changed = job.status.as_ref() != Some(&derived.status);
    let to_prune = status::failed_pods_to_prune(&pods, &derived.status, ctx.failed_pods_to_keep);
    let ttl_expiry = status::ttl_expiry(&job, &derived.status);
    // Most reconciles write nothing; those that do wait for a slot, a job's first pod first.
    let writes = !stale.is_empty()
        || !matches!(derived.action, Action::Wait | Action::PollProgress(_))
        || status_changed
        || !to_prune.is_empty()
        || derived.status.phase == Some(JobPhase::Succeeded)
        || ttl_expiry.is_some_and(|at| time_until(at).is_zero());
    let _slot = if writes {
        let priority = match derived.action {
            Action::CreatePod(_) => Priority::Urgent,
            _ => Priority::Routine,
        };
        Some(ctx.gate.acquire(priority).await)
    } else {
        None
    };

    // The storage and the pod do not depend on each other (the pod waits for its volumes),
    // so a new job's children are written concurrently: one round trip instead of two.
    let storage = apply_storage(&ctx, &jobs, &job, &namespace, stale);
    let action = act(&ctx, &jobs, &job, &derived.action, &namespace);
    futures::try_join!(storage, action)?;

    record_timings(&ctx, &job, &derived.status, &namespace);
    if status_changed {
        write_status(&jobs, job.as_ref(), &derived.status, &ctx.jobs_written).await?;
    }
    for pod_name in to_prune {
        // Its attempt is in the status just written; its logs are no longer the newest.
        match Api::<Pod>::namespaced(ctx.client.clone(), &namespace)
            .delete(&pod_name, &DeleteParams::background())
            .await
        {
            Ok(_) | Err(kube::Error::Api(_)) => {}
            Err(error) => return Err(error.into()),
        }
    }
    if derived.status.phase == Some(JobPhase::Succeeded)
        && let Some(termination) = status::succeeded_termination(&pods)
    {
        register_adapter(&ctx, &job, &termination, &namespace).await?;
    }
    // Counted once the pod and the status are written: a failed write derives it again.
    count_outcome(&ctx, &key, &namespace, phase_before, &derived);
    publish(&ctx, &job, &derived);
    ctx.metrics.set_phase(&key, derived.status.phase);
    if matches!(
        derived.status.phase,
        Some(JobPhase::Succeeded | JobPhase::Failed)
    ) {
        ctx.progress.forget(&key);
    }
    if let Some(expiry) = ttl_expiry {
        let left = time_until(expiry);
        if left.is_zero() {
            // ttlSecondsAfterFinished: the job goes; its children follow by owner reference.
            info!(job = %key, "ttlSecondsAfterFinished passed; deleting the job");
            match jobs.delete(&name, &DeleteParams::background()).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(error) => return Err(error.into()),
            }
            return Ok(Requeue::await_change());
        }
        return Ok(Requeue::requeue(left));
    }
    if let Some(at) = &derived.status.next_retry_time {
        // Backing off: come back when the next attempt is due.
        return Ok(Requeue::requeue(
            time_until(at.0).max(Duration::from_millis(100)),
        ));
    }
    Ok(match derived.status.phase {
        Some(JobPhase::Running) => Requeue::requeue(Duration::from_secs(10)),
        Some(JobPhase::Pending | JobPhase::Queued) => Requeue::requeue(Duration::from_secs(30)),
        _ => Requeue::await_change(),
    })
}

/// How long until `at` (zero once it has passed).
fn time_until(at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(Timestamp::now())).unwrap_or_default()
}

/// Carries out the derived action on the trainer pods.
async fn act(
    ctx: &Context,
    jobs: &Api<FinetuneJob>,
    job: &FinetuneJob,
    action: &Action,
    namespace: &str,
) -> Result<(), Error> {
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    match action {
        Action::CreatePod(attempt) => {
            let name = job.name_any();
            let init_adapter = match &job.spec.adapter.init_adapter {
                Some(adapter) => match init_adapter_uri(ctx, namespace, adapter).await? {
                    Ok(uri) => Some(uri),
                    Err(why) => return Err(init_adapter_unavailable(ctx, jobs, job, why).await),
                },
                None => None,
            };
            let pod = build::trainer_pod(job, *attempt, &ctx.settings, init_adapter.as_deref())?;
            let pod_name = names::trainer_pod(&name, *attempt);
            match apply(&pods_api, &pod_name, &pod).await {
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
            info!(job = %format!("{namespace}/{name}"), attempt, "trainer pod created");
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
    Ok(())
}

/// A storage child whose cached copy is missing or was applied from other content.
enum StaleStorage {
    Map(Box<ConfigMap>),
    Claim(Box<PersistentVolumeClaim>),
}

/// The manifest ConfigMap and the storage claim that need applying: those whose cached copy
/// (or our last apply, until the watch delivers it) is missing or was applied from different
/// content. Applying them is self-healing, never duplicates, and nothing when nothing changed.
fn stale_storage(ctx: &Context, job: &FinetuneJob) -> Result<Vec<StaleStorage>, Error> {
    let namespace = job.namespace().unwrap_or_default();
    let mut stale = Vec::new();
    let mut map = build::manifest_config_map(job)?;
    let map_hash = stamp_hash(&mut map);
    let caches = &ctx.caches;
    if applied_hash(
        &caches.maps,
        &caches.maps_written,
        &map.name_any(),
        &namespace,
    ) != Some(map_hash)
    {
        stale.push(StaleStorage::Map(Box::new(map)));
    }
    if let Some(mut claim) = build::storage_claim(job, &ctx.settings)? {
        let claim_hash = stamp_hash(&mut claim);
        let claimed = applied_hash(
            &caches.claims,
            &caches.claims_written,
            &claim.name_any(),
            &namespace,
        );
        if claimed != Some(claim_hash) {
            stale.push(StaleStorage::Claim(Box::new(claim)));
        }
    }
    Ok(stale)
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
                apply(&maps, &map.name_any(), map.as_ref())
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
                apply(&claims, &claim.name_any(), claim.as_ref())
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
    apply(&adapters, &name, &desired).await?;
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

/// The storage URI of the Adapter a job starts from, or why there is none yet.
async fn init_adapter_uri(
    ctx: &Context,
    namespace: &str,
    adapter: &str,
) -> Result<Result<String, String>, Error> {
    let adapters: Api<Adapter> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(found) = adapters.get_opt(adapter).await? else {
        return Ok(Err(format!(
            "Adapter {adapter} does not exist in namespace {namespace}"
        )));
    };
    let producer = match &found.spec.source.from_job {
        Some(job) => {
            let jobs: Api<FinetuneJob> = Api::namespaced(ctx.client.clone(), namespace);
            jobs.get_opt(job).await?
        }
        None => None,
    };
    Ok(init_adapter::adapter_uri(&found, producer.as_ref()))
}

/// Records on the job why its starting adapter cannot be used yet (condition + Warning event);
/// the returned error retries with backoff, so the pod follows once the Adapter is there.
async fn init_adapter_unavailable(
    ctx: &Context,
    jobs: &Api<FinetuneJob>,
    job: &FinetuneJob,
    why: String,
) -> Error {
    let status = status::child_creation_failed(job, "the trainer pod", &why, Timestamp::now());
    if let Err(status_error) = write_status(jobs, job, &status, &ctx.jobs_written).await {
        warn!(%status_error, "cannot record the initAdapter problem in status");
    }
    let event = Event {
        type_: EventType::Warning,
        reason: "InitAdapterUnavailable".into(),
        note: Some(format!("spec.adapter.initAdapter: {why}")),
        action: "Create".into(),
        secondary: None,
    };
    publish_detached(ctx, job, vec![event]);
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
    let status = status::child_creation_failed(job, child, &message, Timestamp::now());
    if let Err(status_error) = write_status(jobs, job, &status, &ctx.jobs_written).await {
        warn!(%status_error, "cannot record the child creation failure in status");
    }
    let event = Event {
        type_: EventType::Warning,
        reason: "ChildCreationFailed".into(),
        note: Some(format!("cannot create {child}: {message}")),
        action: "Create".into(),
        secondary: None,
    };
    publish_detached(ctx, job, vec![event]);
    Error::Kube(error)
}

/// Counts a job's transition into Failed, or the retry it starts, in the metrics.
fn count_outcome(
    ctx: &Context,
    key: &str,
    namespace: &str,
    phase_before: Option<JobPhase>,
    derived: &Derived,
) {
    match status::outcome(phase_before, derived) {
        Some(Outcome::Failed { reason }) => ctx.metrics.job_failed(namespace, &reason),
        Some(Outcome::Retried { attempt, reason }) => {
            ctx.metrics.job_retried(key, attempt, &reason);
        }
        None => {}
    }
}

/// Publishes an Event for each of the derivation's transitions.
fn publish(ctx: &Context, job: &FinetuneJob, derived: &Derived) {
    let events = derived
        .transitions
        .iter()
        .map(|transition| Event {
            type_: if transition.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: transition.reason.clone(),
            note: Some(transition.message.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        })
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
