//! Reconciling a FinetuneJob: pure builders of the desired child objects (this module's
//! `build`), and the names and labels that tie children to their job.

pub mod attempts;
pub mod build;
pub mod init_adapter;
pub mod names;
pub mod produced;
pub mod status;
