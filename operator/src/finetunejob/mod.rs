//! Reconciling a FinetuneJob: the controller (`controller`), pure builders of the desired child
//! objects (`build`), the status derivation (`status`), and the names and labels that tie
//! children to their job.

pub mod attempts;
pub mod build;
pub mod controller;
pub mod init_adapter;
pub mod names;
pub mod produced;
pub mod status;
