//! The finetune-operator library: everything the `finetune-operator` binary runs, split so the
//! pure parts (validation, building child objects) are tested without an apiserver.

pub mod check;
pub mod finetunejob;
