//! The operator's errors, each with a stable label for the errors metric.

use crate::pods::BuildError;

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The apiserver refused or failed a request.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Desired objects could not be built from the spec.
    #[error("building children: {0}")]
    Build(#[from] BuildError),
    /// `spec.adapter.initAdapter` cannot be used (yet): missing Adapter, producer not done, ...
    #[error("spec.adapter.initAdapter: {0}")]
    InitAdapter(String),
    /// A child's name is held by an object that is not this job's (never adopted).
    #[error("name conflict: {0}")]
    NameConflict(String),
}

impl Error {
    /// Low-cardinality label for `finetune_operator_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(status)) if status.code == 409 => "conflict",
            Self::Kube(kube::Error::Api(status)) if status.code == 403 => "forbidden",
            Self::Kube(kube::Error::Api(status)) if status.code == 422 => "invalid",
            Self::Kube(_) => "kube",
            Self::Build(_) => "build",
            Self::InitAdapter(_) => "init_adapter",
            Self::NameConflict(_) => "name_conflict",
        }
    }
}
