//! The `finetune.dev/v1alpha1` API shared by the operator and the trainer.
//!
//! - [`FinetuneJob`]: a fine-tuning run (base model, data, method, adapter, hyperparameters,
//!   evaluation, checkpoints, resources, retries) and its observed status.
//! - [`Adapter`]: a fine-tuned adapter with verified files and lineage.
//! - [`validate`]: one validation path (schema + CEL rules from the generated CRD) so the
//!   apiserver, the operator and the trainer reject a bad manifest with the same words.
//! - [`contract`]: environment, exit codes, termination message and `/status` JSON between the
//!   operator and the trainer.
//!
//! The CRD YAML in `crds/` is generated from these types by `cargo run -p finetune-crds --bin
//! crdgen`; a test fails when the committed files differ.

pub mod adapter;
pub mod contract;
pub mod data;
mod defaults;
mod errors;
pub mod finetunejob;
pub mod memory;
pub mod model;
pub mod runtime;
pub mod s3;
mod schema_check;
pub mod training;
pub mod uri;
pub mod validate;

pub use adapter::{Adapter, AdapterSpec, AdapterStatus};
pub use errors::{FieldError, InvalidManifest};
pub use finetunejob::{FinetuneJob, FinetuneJobSpec, FinetuneJobStatus, JobPhase};
pub use validate::{
    MAX_MANIFEST_BYTES, parse_manifest, read_manifest, read_manifest_text, validate_object,
};

use kube::CustomResourceExt;

/// The file name and YAML of every CRD this crate defines, as `crdgen` writes them.
pub fn crd_files() -> Vec<(&'static str, String)> {
    let yaml = |crd| serde_yaml::to_string(&crd).expect("CRDs serialize to YAML");
    vec![
        ("finetune.dev_finetunejobs.yaml", yaml(FinetuneJob::crd())),
        ("finetune.dev_adapters.yaml", yaml(Adapter::crd())),
    ]
}
