//! Events of both controllers, published in the background, behind new jobs' pods.
//!
//! An Event is best effort: a reconcile queues it and goes on, never waiting on a slow
//! apiserver for it. One dispatcher task takes the queued batches in order and publishes each
//! in a routine slot of the write [`Gate`], so Events never compete with a job's first pod and
//! at most as many are in flight as the gate has slots. Queued batches are small (the Event and
//! the object it is about); waiting tasks would each hold a whole HTTP request future.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::warn;

use crate::gate::{Gate, Priority};

/// The Events of one reconcile, about one object, published in order.
struct Batch {
    regarding: ObjectReference,
    events: Vec<Event>,
}

/// Queues Events for the background dispatcher.
#[derive(Clone)]
pub struct EventQueue {
    queued: mpsc::UnboundedSender<Batch>,
    /// The gate the Events wait for; the job controller's writes share it.
    gate: Arc<Gate>,
}

impl EventQueue {
    /// Starts the dispatcher; it runs until every `EventQueue` clone is dropped.
    pub fn start(recorder: Recorder, gate: Arc<Gate>) -> Self {
        let (queued, mut batches) = mpsc::unbounded_channel::<Batch>();
        let slots = gate.clone();
        tokio::spawn(async move {
            while let Some(batch) = batches.recv().await {
                let slot = slots.acquire(Priority::Routine).await;
                let recorder = recorder.clone();
                tokio::spawn(async move {
                    for event in &batch.events {
                        if let Err(error) = recorder.publish(event, &batch.regarding).await {
                            warn!(%error, reason = %event.reason, "cannot publish event");
                        }
                    }
                    drop(slot);
                });
            }
        });
        Self { queued, gate }
    }

    /// The write gate the Events are published behind.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// Queues `events` about `regarding`.
    pub fn publish(&self, regarding: ObjectReference, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        // Fails only once the dispatcher has stopped, at shutdown.
        let _ = self.queued.send(Batch { regarding, events });
    }
}
