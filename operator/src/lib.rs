//! The finetune-operator library: everything the `finetune-operator` binary runs, split so the
//! pure parts (validation, building children, deriving status) are tested without an apiserver.

pub mod adapter;
pub mod adapter_controller;
pub mod check;
pub mod conditions;
pub mod controller;
pub mod error;
pub mod event_queue;
pub mod finetunejob;
pub mod gate;
pub mod http;
pub mod last_written;
pub mod leader;
pub mod metrics;
pub mod progress;
pub mod valid_specs;
