//! What every pod the operator builds shares, whatever its kind: the operator-wide build
//! settings, the locked-down security contexts of the trainer image, and read-only mounts of the
//! storage URIs a spec names, where the trainer looks for them.

use std::collections::BTreeMap;

use finetune_crds::contract::env;
use finetune_crds::s3::{self, S3Access};
use finetune_crds::uri::{CONFIGMAP_MOUNT_ROOT, PVC_MOUNT_ROOT, StorageUri};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, SeccompProfile, SecretKeySelector,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Operator-wide settings the builders need.
#[derive(Clone, Debug)]
pub struct BuildSettings {
    /// Trainer image used when the job names none.
    pub trainer_image: String,
    /// Size of the storage claim when the job names none.
    pub default_storage_size: String,
    /// Seconds the trainer gets after SIGTERM to finish its step and checkpoint.
    pub termination_grace_seconds: i64,
    /// CPU requested and limited when the job sets no `spec.resources.cpu`.
    pub default_cpu: Option<Quantity>,
    /// Memory requested and limited when the job sets no `spec.resources.memory`.
    pub default_memory: Option<Quantity>,
    /// Node selector of Adapter verification pods (none: any node).
    pub verifier_node_selector: BTreeMap<String, String>,
    /// Which images and PriorityClasses jobs may ask for.
    pub policy: crate::policy::Policy,
    /// `HF_ENDPOINT` for trainers: the Hub or an (enterprise) mirror of its API; the trainer's
    /// default, the Hugging Face Hub, when none.
    pub hf_endpoint: Option<String>,
    /// A claim, in each namespace that runs `hf://` jobs, on one ReadWriteMany share: the
    /// model cache every such job mounts, so one base is downloaded once. Each job caches on
    /// its own storage when none.
    pub model_cache_claim: Option<String>,
}

/// The trainer image released with this operator: the same version, never a moving `latest` tag
/// (which kubelets pull on every start and which drifts from the operator).
pub const DEFAULT_TRAINER_IMAGE: &str = concat!(
    "ghcr.io/finetune-operator/trainer:",
    env!("CARGO_PKG_VERSION")
);

impl Default for BuildSettings {
    fn default() -> Self {
        Self {
            trainer_image: DEFAULT_TRAINER_IMAGE.into(),
            default_storage_size: "20Gi".into(),
            termination_grace_seconds: 120,
            default_cpu: None,
            default_memory: None,
            verifier_node_selector: BTreeMap::new(),
            policy: crate::policy::Policy::default(),
            hf_endpoint: None,
            model_cache_claim: None,
        }
    }
}

/// Why desired objects cannot be built for a job.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    /// The job has no name or namespace yet (it was never stored by the apiserver).
    #[error("the FinetuneJob has no {0}")]
    MissingMetadata(&'static str),
    /// A URI that validation should have refused.
    #[error("{field}: cannot use URI {uri:?}")]
    BadUri { field: &'static str, uri: String },
}

/// The UID of the trainer's non-root user in the image.
pub(crate) const TRAINER_UID: i64 = 65532;

/// The trainer image's non-root user, the runtime's default seccomp profile; shared by every pod
/// that runs the trainer image.
pub(crate) fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(TRAINER_UID),
        run_as_group: Some(TRAINER_UID),
        fs_group: Some(TRAINER_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// No privilege escalation, a read-only root filesystem, every capability dropped.
pub(crate) fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// Parses a non-negative Kubernetes resource quantity (`4`, `500m`, `16Gi`, `1.5`, `2e3`), for
/// the operator's default-resource flags: a typo fails at startup instead of in the creation of
/// every trainer pod.
pub fn parse_quantity(text: &str) -> Result<Quantity, String> {
    let number_end = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let number_ok = number.chars().any(|c| c.is_ascii_digit()) && number.matches('.').count() <= 1;
    let suffix_ok = matches!(
        suffix,
        "" | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
            | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|exponent| exponent.strip_prefix(['+', '-']).unwrap_or(exponent))
        .is_some_and(|digits| !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()));
    if number_ok && suffix_ok {
        Ok(Quantity(text.to_string()))
    } else {
        Err(format!(
            "{text:?} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi, 1.5)"
        ))
    }
}

/// A pod's volumes and its container's mounts.
pub(crate) struct Mounts {
    pub(crate) volumes: Vec<Volume>,
    pub(crate) mounts: Vec<VolumeMount>,
}

impl Mounts {
    /// No volumes yet.
    pub(crate) fn empty() -> Self {
        Self {
            volumes: Vec::new(),
            mounts: Vec::new(),
        }
    }

    /// A scratch `/tmp` (an emptyDir): the root filesystem is read-only.
    pub(crate) fn add_scratch(&mut self) {
        self.add(
            Volume {
                name: "tmp".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
            "/tmp",
            false,
        );
    }

    /// Just a scratch `/tmp`.
    pub(crate) fn scratch_only() -> Self {
        let mut this = Self::empty();
        this.add_scratch();
        this
    }

    /// Mounts, read-only, the PVC or ConfigMap `uri` names where `StorageUri::local_path` looks
    /// for it (once per claim or map; `mounted_claim` is already mounted elsewhere). `file://`
    /// `hf://` and `s3://` need no volume.
    pub(crate) fn add_uri(
        &mut self,
        field: &'static str,
        uri: &str,
        mounted_claim: Option<&str>,
    ) -> Result<(), BuildError> {
        match StorageUri::parse(uri) {
            Some(StorageUri::Pvc { claim, .. }) => {
                let volume = volume_name("pvc", &claim);
                if Some(claim.as_str()) != mounted_claim && !self.has(&volume) {
                    self.add(
                        pvc_volume(&volume, &claim, true),
                        &format!("{PVC_MOUNT_ROOT}/{claim}"),
                        true,
                    );
                }
            }
            Some(StorageUri::ConfigMap { name: map, .. }) => {
                let volume = volume_name("configmap", &map);
                if !self.has(&volume) {
                    let source = ConfigMapVolumeSource {
                        name: map.clone(),
                        ..ConfigMapVolumeSource::default()
                    };
                    let volume_def = Volume {
                        name: volume,
                        config_map: Some(source),
                        ..Volume::default()
                    };
                    self.add(volume_def, &format!("{CONFIGMAP_MOUNT_ROOT}/{map}"), true);
                }
            }
            Some(
                StorageUri::File { .. }
                | StorageUri::HuggingFace { .. }
                | StorageUri::HuggingFaceFile { .. }
                | StorageUri::S3 { .. },
            ) => {}
            None => {
                return Err(BuildError::BadUri {
                    field,
                    uri: uri.to_string(),
                });
            }
        }
        Ok(())
    }

    pub(crate) fn has(&self, volume: &str) -> bool {
        self.volumes.iter().any(|v| v.name == volume)
    }

    pub(crate) fn add(&mut self, volume: Volume, mount_path: &str, read_only: bool) {
        self.mounts.push(VolumeMount {
            name: volume.name.clone(),
            mount_path: mount_path.into(),
            read_only: Some(read_only),
            ..VolumeMount::default()
        });
        self.volumes.push(volume);
    }
}

pub(crate) fn pvc_volume(volume: &str, claim: &str, read_only: bool) -> Volume {
    Volume {
        name: volume.into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.into(),
            read_only: Some(read_only),
        }),
        ..Volume::default()
    }
}

pub(crate) fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// `key` of Secret `name` as the variable of the same name; `optional` keys may be absent.
pub(crate) fn secret_env(name: &str, key: &str, optional: bool) -> EnvVar {
    EnvVar {
        name: key.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: name.into(),
                key: key.into(),
                optional: Some(optional),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The variables the trainer reads its `s3:` settings from: endpoint and region as values, the
/// credentials by reference to their Secret (the kubelet resolves them; their values never
/// appear in the pod spec), and the Secret's name for refusals to name.
pub(crate) fn s3_env(access: Option<&S3Access>) -> Vec<EnvVar> {
    let Some(access) = access else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(endpoint) = &access.endpoint {
        out.push(plain_env(env::S3_ENDPOINT, endpoint));
    }
    if let Some(region) = &access.region {
        out.push(plain_env(env::S3_REGION, region));
    }
    if let Some(secret) = &access.credentials_secret_ref {
        out.extend([
            secret_env(&secret.name, s3::keys::ACCESS_KEY_ID, false),
            secret_env(&secret.name, s3::keys::SECRET_ACCESS_KEY, false),
            secret_env(&secret.name, s3::keys::SESSION_TOKEN, true),
            plain_env(env::S3_CREDENTIALS_SECRET, &secret.name),
        ]);
    }
    out
}

/// The name of the pod volume for object `name`: `PREFIX-NAME` when that is a valid volume name
/// (a DNS-1123 label), else a readable prefix of it plus a hash. Claim and ConfigMap names may be
/// 253 characters with dots; volume names may not, and an invalid one makes the kubelet (or the
/// apiserver) refuse a pod that `check` accepted.
pub fn volume_name(prefix: &str, name: &str) -> String {
    let plain = format!("{prefix}-{name}");
    let is_label = plain.len() <= 63
        && plain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !plain.ends_with('-');
    if is_label {
        return plain;
    }
    let readable: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63 - prefix.len() - 18)
        .collect();
    let hash = crate::api::fnv1a(name.as_bytes());
    format!("{prefix}-{}-{hash:016x}", readable.trim_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_volume_name(name: &str) -> bool {
        name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-')
    }

    #[test]
    fn volume_names_are_valid_for_any_claim_or_map_name() {
        assert_eq!(volume_name("pvc", "models"), "pvc-models");
        let long = "a".repeat(60);
        for name in [long.as_str(), "team.data.models", "x.y", &"b.".repeat(126)] {
            for prefix in ["pvc", "configmap"] {
                let v = volume_name(prefix, name);
                assert!(is_volume_name(&v), "{prefix} {name} -> {v}");
            }
        }
        assert_ne!(
            volume_name("pvc", "a.b"),
            volume_name("pvc", "a-b"),
            "distinct names stay distinct"
        );
    }

    #[test]
    fn default_resource_flags_take_kubernetes_quantities_only() {
        for good in [
            "4",
            "500m",
            "16Gi",
            "1.5",
            "0.5",
            "2e3",
            "1E-2",
            "128974848",
            "1k",
        ] {
            assert_eq!(parse_quantity(good), Ok(Quantity(good.into())), "{good}");
        }
        for bad in [
            "", "16GB", "-1", "four", "1.2.3", "Gi", ".", "4 ", "1e", "16gi",
        ] {
            let error = parse_quantity(bad).unwrap_err();
            assert!(
                error.contains("not a Kubernetes quantity"),
                "{bad}: {error}"
            );
        }
    }
}
