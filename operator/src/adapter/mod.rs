//! Verifying user-registered Adapters (`spec.source.uri`): the controller (`controller`), a pure
//! builder of the short-lived verification pod that runs `finetune-trainer verify-adapter`
//! (`build`), and the pure derivation of the Adapter's status from that pod (`status`). Adapters
//! a FinetuneJob produced (`spec.source.fromJob`) get their status from the job controller
//! instead (`produced`).

pub mod build;
pub mod controller;
pub mod status;
