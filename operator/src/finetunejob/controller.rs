//! The FinetuneJob controller, a pipeline in the Stackable shape: validate the spec (once per
//! generation) → `dereference` (every read) → `plan` (pure: what to create, patch and delete, and
//! when to look again) → `apply` (every write). Only `dereference`, `apply` and the recording of
//! an invalid spec talk to the apiserver, so every decision is unit-tested in `plan` without one.
//!
//! Reads come from watch caches, never from per-reconcile LISTs: the watches that trigger
//! reconciles on children also keep them in stores, so a reconcile that finds nothing to change
//! makes no API call at all. Writes are kept to what changed: children are applied only when the
//! cached copy differs (a content hash in an annotation), the status only when it differs, and
//! Events only on transitions.

mod apply;
mod context;
mod dereference;
mod plan;

use std::sync::Arc;
use std::time::Duration;

use finetune_crds::{FinetuneJob, validate_object};
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::PartialObjectMeta;
use kube::runtime::controller::{Action as Requeue, Config as ControllerConfig, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::warn;

use self::apply::{apply, count_outcome, publish};
use self::context::{Caches, Context, strip_pod};
use self::dereference::dereference;
use crate::api::{APPLIED_HASH_ANNOTATION, api, cached_watch, cached_watch_lenient, write_status};
use crate::error::Error;
use crate::event_queue::EventQueue;
use crate::filled::Filled;
use crate::finetunejob::status;
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
    let undecodable_metrics = metrics.clone();
    let (jobs, jobs_filled, job_events) = cached_watch_lenient(
        &client,
        namespace,
        watcher::Config::default(),
        |job: &mut FinetuneJob| job.metadata.managed_fields = None,
        Some(&jobs_written),
        move |object, error| {
            // Reported and left out; the other jobs keep reconciling.
            let key = format!(
                "{}/{}",
                object.namespace().unwrap_or_default(),
                object.name_any()
            );
            warn!(job = %key, %error, "cannot decode this FinetuneJob; skipping it until it changes");
            undecodable_metrics.reconcile_failed("FinetuneJob", "undecodable");
        },
    );
    let job_events = job_events
        .applied_objects()
        // Our own status writes do not change the generation: reconciling on them would only
        // re-derive what was just written. Children's changes and requeues still trigger.
        .predicate_filter(predicates::generation, PredicateConfig::default());
    let pods_written = Arc::new(LastWritten::<Pod>::default());
    let (pods, pods_filled, pod_events) = cached_watch(
        api::<Pod>(&client, namespace),
        children.clone(),
        strip_pod,
        Some(&pods_written),
    );
    let maps_written = Arc::new(LastWritten::default());
    let (maps, maps_filled, map_events) = cached_watch(
        api::<PartialObjectMeta<ConfigMap>>(&client, namespace),
        children.clone(),
        |map| map.metadata.managed_fields = None,
        Some(&maps_written),
    );
    let claims_written = Arc::new(LastWritten::default());
    let (claims, claims_filled, claim_events) = cached_watch(
        api::<PartialObjectMeta<PersistentVolumeClaim>>(&client, namespace),
        children,
        |claim| claim.metadata.managed_fields = None,
        Some(&claims_written),
    );

    let children_filled = [pods_filled, maps_filled, claims_filled];
    {
        let all = [[jobs_filled].as_slice(), &children_filled].concat();
        tokio::spawn(async move {
            let filled = futures::future::join_all(all.iter().map(Filled::wait)).await;
            if filled.into_iter().all(|filled| filled) {
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
        filled: children_filled,
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

/// One pass of the pipeline: `dereference` reads, `plan` decides without a server, `apply`
/// writes. Deleted jobs are only forgotten, and an invalid spec is recorded before anything is
/// read.
async fn reconcile(job: Arc<FinetuneJob>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let _timer = ctx.metrics.reconcile_started("FinetuneJob");
    let namespace = job.namespace().unwrap_or_default();
    let key = format!("{namespace}/{}", job.name_any());
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
    ctx.metrics.namespace_seen(&namespace);
    // Validated once per spec generation: the CEL rules cost more than the rest of a
    // reconcile.
    if !ctx.valid_specs.passed(&key, job.as_ref()) {
        if let Err(invalid) = validate_object(job.as_ref()) {
            return reject_spec(&ctx, &job, "InvalidSpec", &invalid.to_string()).await;
        }
        let settings = &ctx.settings;
        if let Some(why) = settings.policy.refusal(&job, &settings.trainer_image) {
            return reject_spec(&ctx, &job, "NotAllowed", &why).await;
        }
        if let Some(why) = crate::fit::refusal(&job) {
            return reject_spec(&ctx, &job, "WillNotFit", &why).await;
        }
        ctx.valid_specs.remember(&key, job.as_ref());
    }
    let observed = dereference(&ctx, job).await?;
    let plan = plan::plan(&observed, &ctx.settings, ctx.failed_pods_to_keep)?;
    apply(&ctx, &observed.job, plan).await
}

/// Records a spec that fails validation (`InvalidSpec`), the cluster's policy (`NotAllowed`) or
/// the memory of its GPU (`WillNotFit`): phase Failed with every problem named, once.
async fn reject_spec(
    ctx: &Context,
    job: &FinetuneJob,
    reason: &str,
    problems: &str,
) -> Result<Requeue, Error> {
    let namespace = job.namespace().unwrap_or_default();
    let key = format!("{namespace}/{}", job.name_any());
    let phase_before = job.status.as_ref().and_then(|s| s.phase);
    let derived = status::rejected_spec(job, reason, problems, Timestamp::now());
    if job.status.as_ref() != Some(&derived.status) {
        let jobs: Api<FinetuneJob> = Api::namespaced(ctx.client.clone(), &namespace);
        write_status(&jobs, job, &derived.status, &ctx.jobs_written).await?;
    }
    count_outcome(
        ctx,
        &key,
        &namespace,
        status::outcome(phase_before, &derived),
    );
    publish(ctx, job, &derived.transitions);
    ctx.metrics.set_phase(&key, derived.status.phase);
    Ok(Requeue::await_change())
}
