//! The finetune-operator library: everything the `finetune-operator` binary runs, split so the
//! pure parts (validation, building children, deriving status) are tested without an apiserver.
//!
//! Each kind has a folder with its controller, its pure builders and its status derivation
//! (`finetunejob`, `adapter`); what both controllers share sits beside them:
//! - `finetunejob::controller`: the FinetuneJob controller, a pipeline of `dereference` (every
//!   read), `plan` (pure: the writes and the requeue, unit-tested with observed states) and
//!   `apply` (every write, in a slot of the write gate), over a shared `context`.
//! - `adapter::controller`: the Adapter controller, verifying user-registered Adapters with a
//!   short-lived pod.
//! - `api`: the API plumbing both controllers use: the field manager, server-side apply and
//!   status writes, the applied-hash of children, cached watches and the start-up CRD check.
//! - `filled`: whether a cache holds its first full list, told to every task that asks (kube's
//!   own store readiness wakes only one).
//! - `conditions`: status conditions written one way for both kinds (`set`, the job's exclusive
//!   `set_phase`, `put`) and the `Transition` Event that goes with a condition change.
//! - `pods`: what every pod the operator builds shares: build settings, security contexts and
//!   read-only mounts of storage URIs.

pub mod adapter;
pub mod api;
pub mod check;
pub mod conditions;
pub mod error;
pub mod event_queue;
pub mod filled;
pub mod finetunejob;
pub mod fit;
pub mod gate;
pub mod http;
pub mod last_written;
pub mod leader;
pub mod metrics;
pub mod ours;
pub mod pods;
pub mod policy;
pub mod progress;
pub mod valid_specs;
