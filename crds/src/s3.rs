//! How the trainer reaches `s3://` URIs: AWS S3 or any store that speaks its API (MinIO,
//! SeaweedFS, versitygw, Ceph RGW, R2, ...).

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Endpoint, region and credentials for the job's (or Adapter's) `s3://` URIs. Omitted: AWS's
/// regional endpoint for `us-east-1`, and unsigned requests (a public bucket).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.endpoint) || self.endpoint.matches('^https?://[^/?#@ ]+(/[^?#@ ]*)?$')")
    .message("s3.endpoint must be an http:// or https:// URL without credentials, query or fragment, such as https://minio.storage:9000")
    .field_path(".endpoint"))]
pub struct S3Access {
    /// The store's URL, e.g. `https://minio.storage.svc:9000`; AWS's regional endpoint when
    /// omitted. Buckets are addressed path-style (`ENDPOINT/BUCKET/KEY`), which every
    /// S3-compatible store serves. `http://` is allowed for in-cluster stores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub endpoint: Option<String>,
    /// The region requests are signed for (and, without `endpoint`, AWS's endpoint of that
    /// region); `us-east-1` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub region: Option<String>,
    /// A Secret in the same namespace with keys `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN` for temporary credentials). They reach
    /// the trainer as environment variables and are never logged. Without it, requests are
    /// unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretName>,
}

/// A Secret in the same namespace, by name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretName {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The keys read from `credentialsSecretRef`, named as the AWS SDKs name the variables.
pub mod keys {
    pub const ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
    pub const SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
    /// Optional: only temporary credentials have one.
    pub const SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";
}
