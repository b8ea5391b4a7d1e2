//! The verification pod of an Adapter: the trainer image running `verify-adapter` on the
//! adapter's directory and the base model, both mounted read-only, without GPUs, API access or
//! write access to anything but a scratch `/tmp`.

use std::collections::BTreeMap;

use finetune_crds::Adapter;
use finetune_crds::contract::{AdapterExpectations, env, paths};
use finetune_crds::uri::{MountRoots, StorageUri};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::pods::{
    BuildError, BuildSettings, Mounts, container_security_context, plain_env, pod_security_context,
    s3_env,
};

/// Label selecting verification pods (the operator's watch on them).
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Its value on verification pods.
pub const COMPONENT: &str = "adapter-verification";
/// Name of the verifier container.
pub const VERIFIER_CONTAINER: &str = "verifier";
/// A verification that runs longer than this is stopped (hashing a large full model included).
pub const DEADLINE_SECONDS: i64 = 900;

/// The verification pod of `adapter`'s current generation: a new spec gets a new pod.
pub fn verification_pod_name(adapter: &Adapter) -> String {
    let suffix = format!("-verify-{}", adapter.metadata.generation.unwrap_or(0));
    let mut base = adapter.name_any();
    // Pod names are DNS subdomains of at most 253 characters.
    base.truncate(253 - suffix.len());
    format!("{}{suffix}", base.trim_end_matches(['-', '.']))
}

/// Where the adapter's directory and its base model are inside the pod (`None` for a base the
/// trainer cannot read locally, `hf://` or `s3://`), or why the spec cannot be verified.
pub fn in_pod_paths(adapter: &Adapter) -> Result<(String, Option<String>), String> {
    let roots = MountRoots::in_pod();
    let uri = adapter
        .spec
        .source
        .uri
        .as_deref()
        .ok_or("spec.source.uri is not set (an Adapter from a job is verified by its job)")?;
    let adapter_dir = match StorageUri::parse(uri) {
        Some(parsed @ (StorageUri::Pvc { .. } | StorageUri::File { .. })) => {
            parsed.local_path(&roots).map(|p| p.display().to_string())
        }
        // The verifier downloads it into its scratch `/tmp` itself.
        Some(StorageUri::S3 { .. }) => Some(uri.to_string()),
        _ => None,
    }
    .ok_or_else(|| {
        format!(
            "spec.source.uri: {uri:?} is not pvc://CLAIM/PATH, file:///PATH or s3://BUCKET/PREFIX"
        )
    })?;
    let base = &adapter.spec.base_model.uri;
    let model = match StorageUri::parse(base) {
        Some(StorageUri::HuggingFace { .. } | StorageUri::S3 { .. }) => None,
        Some(parsed @ (StorageUri::Pvc { .. } | StorageUri::File { .. })) => {
            parsed.local_path(&roots).map(|p| p.display().to_string())
        }
        _ => return Err(format!("spec.baseModel.uri: {base:?} cannot be read")),
    };
    Ok((adapter_dir, model))
}

/// The pod that verifies `adapter`.
pub fn verification_pod(adapter: &Adapter, settings: &BuildSettings) -> Result<Pod, BuildError> {
    let uri = adapter.spec.source.uri.clone().unwrap_or_default();
    let (adapter_dir, model) = in_pod_paths(adapter).map_err(|_| BuildError::BadUri {
        field: "spec.source.uri",
        uri: uri.clone(),
    })?;
    let owner = adapter
        .controller_owner_ref(&())
        .ok_or(BuildError::MissingMetadata("uid"))?;
    let mut mounts = Mounts::scratch_only();
    mounts.add_uri("spec.source.uri", &uri, None)?;
    mounts.add_uri("spec.baseModel.uri", &adapter.spec.base_model.uri, None)?;
    let expectations = AdapterExpectations {
        lora: adapter.spec.lora.clone(),
        expected_sha256: adapter.spec.expected_sha256.clone(),
    };
    let mut args = vec![
        "verify-adapter".to_string(),
        "--adapter".into(),
        adapter_dir,
        "--shown-as".into(),
        uri,
        "--expect".into(),
        serde_json::to_string(&expectations).expect("expectations serialize"),
    ];
    if let Some(model) = model {
        args.extend(["--model".into(), model]);
    }
    // Hashing streams files; reading the adapter loads its LoRA tensors (hundreds of MB for a
    // high rank on a large model), so the limit leaves room for that.
    let amounts = |cpu: &str, memory: &str| {
        BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(memory.into())),
        ])
    };
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(verification_pod_name(adapter)),
            namespace: Some(
                adapter
                    .namespace()
                    .ok_or(BuildError::MissingMetadata("namespace"))?,
            ),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/name".to_string(),
                    "finetune-trainer".to_string(),
                ),
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    "finetune-operator".to_string(),
                ),
                (COMPONENT_LABEL.to_string(), COMPONENT.to_string()),
            ])),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            active_deadline_seconds: Some(DEADLINE_SECONDS),
            node_selector: (!settings.verifier_node_selector.is_empty())
                .then(|| settings.verifier_node_selector.clone()),
            security_context: Some(pod_security_context()),
            containers: vec![Container {
                name: VERIFIER_CONTAINER.into(),
                image: Some(settings.trainer_image.clone()),
                args: Some(args),
                env: Some(
                    [plain_env(env::TERMINATION_LOG, paths::TERMINATION_LOG)]
                        .into_iter()
                        .chain(s3_env(adapter.spec.s3.as_ref()))
                        .collect(),
                ),
                resources: Some(ResourceRequirements {
                    requests: Some(amounts("100m", "256Mi")),
                    limits: Some(amounts("1", "2Gi")),
                    ..ResourceRequirements::default()
                }),
                termination_message_path: Some(paths::TERMINATION_LOG.into()),
                termination_message_policy: Some("FallbackToLogsOnError".into()),
                volume_mounts: Some(mounts.mounts),
                security_context: Some(container_security_context()),
                ..Container::default()
            }],
            volumes: Some(mounts.volumes),
            ..PodSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use finetune_crds::adapter::{AdapterLora, AdapterSource, AdapterSpec};
    use finetune_crds::model::BaseModel;

    pub(crate) fn adapter(uri: &str, base: &str) -> Adapter {
        let mut adapter = Adapter::new(
            "support-bot",
            AdapterSpec {
                base_model: BaseModel {
                    uri: base.into(),
                    format: Default::default(),
                    token_secret_ref: None,
                    rope_scaling: None,
                },
                source: AdapterSource {
                    uri: Some(uri.into()),
                    from_job: None,
                },
                lora: Some(AdapterLora {
                    rank: 16,
                    alpha: 32.0,
                    target_modules: vec!["q_proj".into()],
                    rslora: false,
                }),
                s3: None,
                expected_sha256: [("adapter_model.safetensors".to_string(), "ab".repeat(32))]
                    .into(),
            },
        );
        adapter.metadata.namespace = Some("team".into());
        adapter.metadata.uid = Some("uid-1".into());
        adapter.metadata.generation = Some(3);
        adapter
    }

    fn container(pod: &Pod) -> &Container {
        &pod.spec.as_ref().unwrap().containers[0]
    }

    #[test]
    fn an_s3_adapter_is_passed_as_its_uri_with_the_stores_settings() {
        let mut adapter = adapter("s3://results/runs/one", "pvc://models/smollm2/m.gguf");
        adapter.spec.s3 = Some(finetune_crds::s3::S3Access {
            endpoint: Some("http://127.0.0.1:9000".into()),
            region: None,
            credentials_secret_ref: Some(finetune_crds::s3::SecretName {
                name: "s3-credentials".into(),
            }),
        });
        let pod = verification_pod(&adapter, &BuildSettings::default()).unwrap();
        let args = container(&pod).args.clone().unwrap();
        let i = args.iter().position(|a| a == "--adapter").unwrap();
        assert_eq!(args[i + 1], "s3://results/runs/one");
        let env = container(&pod).env.clone().unwrap();
        let named = |name: &str| env.iter().find(|e| e.name == name).cloned();
        assert_eq!(
            named("AWS_ENDPOINT_URL").and_then(|e| e.value).as_deref(),
            Some("http://127.0.0.1:9000")
        );
        let key = named("AWS_SECRET_ACCESS_KEY").unwrap();
        assert_eq!(key.value, None);
        assert_eq!(
            key.value_from.unwrap().secret_key_ref.unwrap().name,
            "s3-credentials"
        );
        // No volume for the adapter: only the base model's claim and the scratch space.
        let mounts: Vec<String> = container(&pod)
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.clone())
            .collect();
        assert!(!mounts.iter().any(|m| m.contains("results")), "{mounts:?}");
    }

    #[test]
    fn the_pod_reads_both_volumes_read_only_and_passes_the_expectations() {
        let adapter = adapter("pvc://adapters/team/sft", "pvc://models/smollm2/m.gguf");
        let settings = BuildSettings {
            verifier_node_selector: [("pool".to_string(), "cpu".to_string())].into(),
            ..BuildSettings::default()
        };
        let pod = verification_pod(&adapter, &settings).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("support-bot-verify-3"));
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("Adapter", Some(true))
        );
        let args = container(&pod).args.clone().unwrap();
        let after = |flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].clone()
        };
        assert_eq!(args[0], "verify-adapter");
        assert_eq!(after("--adapter"), "/mnt/pvc/adapters/team/sft");
        assert_eq!(after("--model"), "/mnt/pvc/models/smollm2/m.gguf");
        assert_eq!(after("--shown-as"), "pvc://adapters/team/sft");
        let expect: AdapterExpectations = serde_json::from_str(&after("--expect")).unwrap();
        assert_eq!(expect.lora.unwrap().rank, 16);
        assert_eq!(expect.expected_sha256.len(), 1);
        let mounts: Vec<(String, bool)> = container(&pod)
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.mount_path.clone(), m.read_only.unwrap()))
            .collect();
        assert_eq!(
            mounts,
            [
                ("/tmp".to_string(), false),
                ("/mnt/pvc/adapters".to_string(), true),
                ("/mnt/pvc/models".to_string(), true)
            ]
        );
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_selector.as_ref().unwrap()["pool"], "cpu");
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.active_deadline_seconds, Some(DEADLINE_SECONDS));
        let security = container(&pod).security_context.as_ref().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(
            spec.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
    }

    #[test]
    fn a_shared_claim_is_mounted_once_and_an_hf_base_is_not_read() {
        let adapter = adapter("pvc://store/adapters/a", "hf://HuggingFaceTB/SmolLM2-135M");
        let pod = verification_pod(&adapter, &BuildSettings::default()).unwrap();
        let args = container(&pod).args.clone().unwrap();
        assert!(!args.contains(&"--model".to_string()), "{args:?}");
        let same = self::adapter("pvc://store/adapters/a", "pvc://store/models/m.gguf");
        let pod = verification_pod(&same, &BuildSettings::default()).unwrap();
        assert_eq!(
            pod.spec.unwrap().volumes.unwrap().len(),
            2,
            "tmp and one claim"
        );
    }

    #[test]
    fn names_stay_within_the_limit_and_follow_the_generation() {
        let mut long = adapter("file:///a", "file:///m");
        long.metadata.name = Some(format!("{}-", "a".repeat(250)));
        long.metadata.generation = Some(12);
        let name = verification_pod_name(&long);
        assert!(name.len() <= 253 && name.ends_with("a-verify-12"), "{name}");
        assert!(
            in_pod_paths(&adapter("s3://b/k", "file:///m"))
                .unwrap_err()
                .contains("spec.source.uri")
        );
    }
}
