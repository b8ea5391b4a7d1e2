//! Reconciling a FinetuneJob: pure builders of the desired child objects (this module's
//! `build`), and the names and labels that tie children to their job. The job's status is derived
//! in two steps: `attempts` brings each trainer pod's attempt on record (its state, why it failed,
//! the counters charged to `backoffLimit`), then `status` chooses the phase and the next action.

pub mod attempts;
pub mod build;
pub mod init_adapter;
pub mod names;
pub mod produced;
pub mod status;
