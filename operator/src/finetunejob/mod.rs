//! Reconciling a FinetuneJob, one module per concept:
//! - `controller`: the watches and the reconcile, a pipeline of `dereference` (every read),
//!   `plan` (pure: the writes and the requeue) and `apply` (every write).
//! - `build`: pure builders of the desired ConfigMap, PVC and trainer pod.
//! - `attempts`: each trainer pod read as an attempt: its state, the failure's classification,
//!   the attempt records and counters, and which failed pods to prune.
//! - `gang`: an attempt of several pods (`resources.nodes`): its members, rank 0's address,
//!   which members to stop.
//! - `gang_pod`: what makes a trainer pod a gang member (variables, Kueue's group, spread).
//! - `status`: the phase and next action chosen from those records (`derive` =
//!   `record_attempts` + `next_phase`).
//! - `init_adapter`: `adapter.initAdapter` resolved to the Adapter's files.
//! - `produced`: the Adapter a successful job registers, with its lineage.
//! - `names`: the names and labels that tie children to their job.

pub mod attempts;
pub mod build;
pub mod controller;
pub mod gang;
pub mod gang_pod;
pub mod init_adapter;
pub mod names;
pub mod produced;
pub mod status;
