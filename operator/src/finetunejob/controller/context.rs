//! What every reconcile of a job shares: the apiserver client, the child caches with the writes
//! they have not delivered yet, the write gate, the Event queue and the operator's settings.

use std::sync::Arc;

use finetune_crds::FinetuneJob;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, PodSpec};
use kube::Client;
use kube::api::PartialObjectMeta;
use kube::runtime::reflector::Store;

use crate::event_queue::EventQueue;
use crate::filled::Filled;
use crate::gate::Gate;
use crate::last_written::LastWritten;
use crate::metrics::Metrics;
use crate::pods::BuildSettings;
use crate::progress::ProgressPoller;
use crate::valid_specs::ValidSpecs;

/// The children a reconcile reads, cached by the watches that trigger reconciles, each with our
/// writes the watch has not delivered yet.
pub(super) struct Caches {
    /// Whether the pod, ConfigMap and claim caches hold their first full lists.
    pub(super) filled: [Filled; 3],
    /// Trainer pods, without their spec (status derivation reads metadata and status only).
    pub(super) pods: Store<Pod>,
    pub(super) pods_written: Arc<LastWritten<Pod>>,
    /// Manifest ConfigMaps, metadata only.
    pub(super) maps: Store<PartialObjectMeta<ConfigMap>>,
    pub(super) maps_written: Arc<LastWritten<PartialObjectMeta<ConfigMap>>>,
    /// Storage claims, metadata only.
    pub(super) claims: Store<PartialObjectMeta<PersistentVolumeClaim>>,
    pub(super) claims_written: Arc<LastWritten<PartialObjectMeta<PersistentVolumeClaim>>>,
}

impl Caches {
    /// Whether every child cache holds its first full list. Checked without waiting: the
    /// caches fill from streams the controller polls between reconciles, so a reconcile that
    /// awaited them could hold the slot they need.
    pub(super) fn ready(&self) -> bool {
        self.filled.iter().all(Filled::is_filled)
    }
}

/// What every reconcile shares.
pub(super) struct Context {
    /// The apiserver client.
    pub(super) client: Client,
    /// Publishes Events on FinetuneJobs, in the background.
    pub(super) events: EventQueue,
    /// The operator's metrics.
    pub(super) metrics: Arc<Metrics>,
    /// Image and defaults for children.
    pub(super) settings: BuildSettings,
    /// Rate-limited `/status` polling of running trainers.
    pub(super) progress: ProgressPoller,
    /// Failed trainer pods kept per job.
    pub(super) failed_pods_to_keep: usize,
    pub(super) caches: Caches,
    /// Jobs as returned by our last status write, kept until the job cache has caught up: a
    /// reconcile that runs before the watch delivers our own write must not derive the same
    /// transition again (a second Event and a redundant write).
    pub(super) jobs_written: Arc<LastWritten<FinetuneJob>>,
    /// Bounds the reconciles writing at once, new jobs' pods first.
    pub(super) gate: Arc<Gate>,
    /// Spec generations that passed validation.
    pub(super) valid_specs: ValidSpecs,
}

/// What the pod cache keeps of a trainer pod: status derivation reads metadata and status, and
/// of the spec only the node (a gang's members are listed with theirs).
pub(super) fn strip_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        node_name: spec.node_name,
        ..PodSpec::default()
    });
}
