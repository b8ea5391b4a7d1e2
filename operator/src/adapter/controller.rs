//! The Adapter controller: verifies Adapters that users register from existing files
//! (`spec.source.uri`) with a short-lived verification pod (see `adapter::build`) and writes the
//! outcome (see `adapter::status`): Ready with the files' sha256, or Failed with a condition whose
//! reason says what is wrong (FileMissing, DigestMismatch, LoraMismatch, BaseModelMismatch, ...).
//!
//! Adapters produced by a FinetuneJob are registered, already verified, by the job controller.
//! Verification pods are read from a watch cache of their own (label
//! `app.kubernetes.io/component=adapter-verification`), owned by their Adapter, and collected
//! with it by the garbage collector.

use std::sync::Arc;
use std::time::Duration;

use finetune_crds::Adapter;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::DeleteParams;
use kube::runtime::controller::{Action as Requeue, Config as ControllerConfig, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use super::build::{COMPONENT, COMPONENT_LABEL, verification_pod};
use super::status::{self, PodAction};
use crate::api::{api, cached_watch, write_status};
use crate::conditions;
use crate::error::Error;
use crate::event_queue::EventQueue;
use crate::filled::Filled;
use crate::last_written::LastWritten;
use crate::metrics::Metrics;
use crate::ours::{self, Refused};
use crate::pods::BuildSettings;

const KIND: &str = "Adapter";

struct Context {
    client: Client,
    /// Publishes Events on Adapters, in the background (see `event_queue`).
    events: EventQueue,
    metrics: Arc<Metrics>,
    settings: BuildSettings,
    /// Verification pods, without their spec.
    pods: Store<Pod>,
    /// Whether `pods` holds its first full list.
    pods_filled: Filled,
    /// Adapters as our last status write returned them, until the cache has caught up: a
    /// reconcile that runs first (the verified pod's deletion triggers one) must not see the
    /// Adapter as still Verifying and verify it again.
    written: Arc<LastWritten<Adapter>>,
}

/// Runs the Adapter controller until SIGTERM/SIGINT, watching `namespace` (all when `None`)
/// with up to `concurrency` reconciles at once; its Events go through `events`, as the job
/// controller's do.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    settings: BuildSettings,
    namespace: Option<String>,
    concurrency: u16,
    events: EventQueue,
) {
    let namespace = &namespace;
    let written = Arc::new(LastWritten::<Adapter>::default());
    let (adapters, _, adapter_events) = cached_watch(
        api::<Adapter>(&client, namespace),
        watcher::Config::default(),
        |adapter| adapter.metadata.managed_fields = None,
        Some(&written),
    );
    let adapter_events = adapter_events
        .applied_objects()
        // Our status writes do not change the generation; a spec edit does (a new verification).
        .predicate_filter(predicates::generation, PredicateConfig::default());
    let (pods, pods_filled, pod_events) = cached_watch(
        api::<Pod>(&client, namespace),
        watcher::Config::default().labels(&format!("{COMPONENT_LABEL}={COMPONENT}")),
        |pod| {
            pod.metadata.managed_fields = None;
            pod.spec = None;
        },
        None,
    );
    let ctx = Arc::new(Context {
        events,
        client,
        metrics,
        settings,
        pods,
        pods_filled,
        written,
    });
    Controller::for_stream(adapter_events, adapters)
        .owns_stream(pod_events.touched_objects())
        .with_config(ControllerConfig::default().concurrency(concurrency))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "adapter reconcile failed");
            }
        })
        .await;
}

fn error_policy(adapter: Arc<Adapter>, error: &Error, ctx: Arc<Context>) -> Requeue {
    ctx.metrics.reconcile_failed(KIND, error.metric_label());
    warn!(adapter = %adapter.name_any(), %error, "adapter reconcile error; retrying");
    Requeue::requeue(Duration::from_secs(10))
}

async fn reconcile(adapter: Arc<Adapter>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    if adapter.metadata.deletion_timestamp.is_some() {
        let key = format!(
            "{}/{}",
            adapter.namespace().unwrap_or_default(),
            adapter.name_any()
        );
        ctx.written.forget(&key);
        return Ok(Requeue::await_change());
    }
    // Before the pod cache is filled, "no pod" would start a second verification.
    if !ctx.pods_filled.is_filled() {
        return Ok(Requeue::requeue(Duration::from_secs(1)));
    }
    let namespace = adapter.namespace().unwrap_or_default();
    let key = format!("{namespace}/{}", adapter.name_any());
    let adapter = ctx.written.freshest(&key, adapter);
    let uid = adapter.uid();
    let pods: Vec<Pod> = ctx
        .pods
        .state_filter(|pod| {
            pod.namespace().as_deref() == Some(namespace.as_str())
                && pod
                    .owner_references()
                    .iter()
                    .any(|owner| Some(&owner.uid) == uid.as_ref())
        })
        .into_iter()
        .map(Arc::unwrap_or_clone)
        .collect();
    let Some(derived) = status::derive(&adapter, &pods, Timestamp::now()) else {
        return Ok(Requeue::await_change());
    };

    let adapters: Api<Adapter> = Api::namespaced(ctx.client.clone(), &namespace);
    if adapter.status.as_ref() != Some(&derived.status) {
        write_status(&adapters, adapter.as_ref(), &derived.status, &ctx.written).await?;
    }
    let reference = adapter.object_ref(&());
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    for action in &derived.actions {
        match action {
            PodAction::Create => {
                let pod = verification_pod(&adapter, &ctx.settings)?;
                let name = pod.name_any();
                let uid = adapter.uid().unwrap_or_default();
                let error = match ours::create(&pods_api, &uid, &pod).await {
                    Ok(_) => None,
                    // Ours already: created by an earlier reconcile the cache has not shown.
                    Err(Refused::Api(error)) if ours::is_already_exists(&error) => None,
                    Err(refused) => Some(refused),
                };
                if let Some(refused) = error {
                    // Refused (admission, quota, a pod of that name that is not ours): say so on
                    // the Adapter, then retry.
                    let refusal = match &refused {
                        Refused::Api(kube::Error::Api(status)) => Some(status.message.clone()),
                        Refused::NameConflict(message) => Some(message.clone()),
                        Refused::Api(_) => None,
                    };
                    if let Some(refusal) = refusal {
                        let message = format!("cannot create verification pod {name}: {refusal}");
                        let mut status = derived.status.clone();
                        status::pod_creation_failed(&mut status, &message, Timestamp::now());
                        if status != derived.status {
                            write_status(&adapters, adapter.as_ref(), &status, &ctx.written)
                                .await?;
                        }
                        let refused =
                            conditions::event(true, "PodCreationFailed", &message, "Verify");
                        ctx.events.publish(reference, vec![refused]);
                    }
                    return Err(match refused {
                        Refused::Api(error) => error.into(),
                        Refused::NameConflict(message) => Error::NameConflict(message),
                    });
                }
                info!(adapter = %key, pod = %name, "verification pod created");
            }
            PodAction::Delete(name) => {
                ours::deleted(pods_api.delete(name, &DeleteParams::background()).await)?;
            }
        }
    }
    let events = derived
        .transitions
        .iter()
        .map(|transition| transition.event("Verify"))
        .collect();
    ctx.events.publish(reference, events);
    // The pod watch brings the result; the requeue only guards against a missed event.
    Ok(match derived.status.phase {
        Some(finetune_crds::adapter::AdapterPhase::Verifying) => {
            Requeue::requeue(Duration::from_secs(30))
        }
        _ => Requeue::await_change(),
    })
}
