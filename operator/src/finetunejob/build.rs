//! Pure builders: a FinetuneJob in, the objects it needs out. Nothing here talks to the
//! apiserver, so every choice (names, mounts, resources, security) is unit-tested.

use std::collections::BTreeMap;

use finetune_crds::FinetuneJob;
use finetune_crds::contract::{DEFAULT_STATUS_PORT, env, paths};
use finetune_crds::uri::{PVC_MOUNT_ROOT, StorageUri};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod, PodSpec, Probe,
    ResourceRequirements, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use super::{gang_pod, names};
use crate::pods::{
    BuildError, BuildSettings, Mounts, container_security_context, plain_env, pod_security_context,
    pvc_volume, s3_env, secret_env,
};

/// Name of the trainer container.
pub const TRAINER_CONTAINER: &str = "trainer";

/// The ConfigMap holding the job manifest the trainer reads: only apiVersion, kind, name,
/// namespace and spec, so status updates do not change it.
pub fn manifest_config_map(job: &FinetuneJob) -> Result<ConfigMap, BuildError> {
    let name = job_name(job)?;
    let manifest = FinetuneJob {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: job.namespace(),
            ..ObjectMeta::default()
        },
        spec: job.spec.clone(),
        status: None,
    };
    let yaml = serde_yaml::to_string(&manifest).expect("FinetuneJobs serialize to YAML");
    Ok(ConfigMap {
        metadata: child_meta(job, names::manifest_config_map(name))?,
        data: Some(BTreeMap::from([(paths::JOB_FILE_NAME.to_string(), yaml)])),
        ..ConfigMap::default()
    })
}

/// The claim for checkpoints and outputs, unless the job uses an existing one.
pub fn storage_claim(
    job: &FinetuneJob,
    settings: &BuildSettings,
) -> Result<Option<PersistentVolumeClaim>, BuildError> {
    let storage = &job.spec.storage;
    if storage.claim_name.is_some() {
        return Ok(None);
    }
    let size = storage
        .size
        .clone()
        .unwrap_or_else(|| Quantity(settings.default_storage_size.clone()));
    Ok(Some(PersistentVolumeClaim {
        metadata: child_meta(job, names::storage_claim(job_name(job)?))?,
        spec: Some(PersistentVolumeClaimSpec {
            // A gang's members on several nodes all mount it: rank 0 writes checkpoints and
            // outputs, and every member reads the checkpoint it resumes from.
            access_modes: Some(vec![
                if job.spec.resources.nodes > 1 {
                    "ReadWriteMany"
                } else {
                    "ReadWriteOnce"
                }
                .into(),
            ]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), size)])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }))
}

/// The trainer pod of one attempt. `init_adapter` is the storage URI of the Adapter the job
/// starts from (`spec.adapter.initAdapter`, resolved by the controller, see `init_adapter`): it is
/// mounted read-only like every other URI the trainer reads, and named to the trainer in
/// `FINETUNE_INIT_ADAPTER_DIR`.
pub fn trainer_pod(
    job: &FinetuneJob,
    attempt: i32,
    settings: &BuildSettings,
    init_adapter: Option<&str>,
) -> Result<Pod, BuildError> {
    let member = Member {
        attempt,
        rank: 0,
        master_addr: None,
    };
    member_pod(job, &member, settings, init_adapter)
}

/// Which pod of an attempt to build: a one-pod attempt is rank 0 of a gang of one.
#[derive(Clone, Debug, PartialEq)]
pub struct Member<'a> {
    /// The attempt's index.
    pub attempt: i32,
    /// The pod's rank among the attempt's `resources.nodes` pods.
    pub rank: i32,
    /// Rank 0's pod IP, for ranks 1..; rank 0 meets at its own.
    pub master_addr: Option<&'a str>,
}

/// One pod of an attempt, see [`trainer_pod`]. A gang member (`resources.nodes` > 1) also
/// carries its rank, the torch.distributed variables, Kueue's pod-group metadata when the job
/// is queued, and a preference to run apart from its fellow members.
pub fn member_pod(
    job: &FinetuneJob,
    member: &Member,
    settings: &BuildSettings,
    init_adapter: Option<&str>,
) -> Result<Pod, BuildError> {
    let name = job_name(job)?;
    let nodes = job.spec.resources.nodes;
    let attempt = member.attempt;
    let pod_name = names::member_pod(name, attempt, member.rank, nodes);
    let mut metadata = child_meta(job, pod_name)?;
    let labels = metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(names::ATTEMPT_LABEL.into(), attempt.to_string());
    // Kueue reads its queue and workload priority from labels on what it admits.
    for key in [names::KUEUE_QUEUE_LABEL, names::KUEUE_PRIORITY_LABEL] {
        if let Some(value) = job.labels().get(key) {
            labels.insert(key.into(), value.clone());
        }
    }
    if nodes > 1 {
        labels.insert(names::RANK_LABEL.into(), member.rank.to_string());
        if job.labels().contains_key(names::KUEUE_QUEUE_LABEL) {
            gang_pod::kueue_group(&mut metadata, name, member, nodes);
        }
    }
    let (mounts, init_adapter_dir) = job_mounts(job, init_adapter, settings)?;
    let spec = &job.spec;
    let resources = &spec.resources;
    let mut container = trainer_container(
        job,
        attempt,
        settings,
        &mounts.mounts,
        init_adapter_dir.as_deref(),
    )?;
    if nodes > 1 {
        gang_pod::distributed(&mut container, member, nodes, resources.gpus);
    }
    Ok(Pod {
        metadata,
        spec: Some(PodSpec {
            affinity: (nodes > 1).then(|| gang_pod::spread(name, attempt)),
            restart_policy: Some("Never".into()),
            // Trainer pods never call the Kubernetes API.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(settings.termination_grace_seconds),
            node_selector: (!resources.node_selector.is_empty())
                .then(|| resources.node_selector.clone()),
            tolerations: (!resources.tolerations.is_empty()).then(|| resources.tolerations.clone()),
            priority_class_name: resources.priority_class_name.clone(),
            security_context: Some(pod_security_context()),
            containers: vec![container],
            volumes: Some(mounts.volumes),
            ..PodSpec::default()
        }),
        status: None,
    })
}

fn trainer_container(
    job: &FinetuneJob,
    attempt: i32,
    settings: &BuildSettings,
    mounts: &[VolumeMount],
    init_adapter_dir: Option<&str>,
) -> Result<Container, BuildError> {
    let name = job_name(job)?;
    let port = i32::from(DEFAULT_STATUS_PORT);
    let storage = format!("{}/{}", paths::STORAGE_DIR, name);
    let mut environment = vec![
        plain_env(
            env::JOB_FILE,
            &format!("{}/{}", paths::JOB_DIR, paths::JOB_FILE_NAME),
        ),
        plain_env(env::CHECKPOINT_DIR, &format!("{storage}/checkpoints")),
        plain_env(env::OUTPUT_DIR, &format!("{storage}/output")),
        plain_env(env::ATTEMPT, &attempt.to_string()),
        plain_env(env::STATUS_PORT, &port.to_string()),
        plain_env(env::TERMINATION_LOG, paths::TERMINATION_LOG),
        EnvVar {
            name: env::POD_IP.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                    field_path: "status.podIP".into(),
                    ..Default::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
    ];
    if let Some(secret) = &job.spec.base_model.token_secret_ref {
        // The token travels by reference; its value never appears in the pod spec or logs.
        let mut token = secret_env(&secret.name, &secret.key, false);
        token.name = env::HF_TOKEN.into();
        environment.push(token);
    }
    if let Some(secret) = &job.spec.dataset.token_secret_ref {
        let mut token = secret_env(&secret.name, &secret.key, false);
        token.name = env::HF_DATASET_TOKEN.into();
        environment.push(token);
    }
    environment.extend(s3_env(job.spec.s3.as_ref()));
    if let Some(dir) = init_adapter_dir {
        environment.push(plain_env(env::INIT_ADAPTER_DIR, dir));
    }
    let model_cache = match model_cache_claim(job, settings) {
        Some(_) => paths::MODEL_CACHE_DIR.to_string(),
        None => format!("{storage}/model-cache"),
    };
    environment.push(plain_env(env::MODEL_CACHE_DIR, &model_cache));
    if let Some(endpoint) = &settings.hf_endpoint {
        environment.push(plain_env(env::HF_ENDPOINT, endpoint));
    }
    // The kubelet probes `/healthz`, which says only that the server answers; `/status` (the
    // run's progress and metrics) is for the operator, and the chart's NetworkPolicy lets only
    // the operator and Prometheus reach the port.
    let health_probe = |initial_delay| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz".into()),
            port: IntOrString::String("status".into()),
            ..HTTPGetAction::default()
        }),
        initial_delay_seconds: Some(initial_delay),
        period_seconds: Some(10),
        failure_threshold: Some(6),
        ..Probe::default()
    };
    Ok(Container {
        name: TRAINER_CONTAINER.into(),
        image: Some(
            job.spec
                .image
                .clone()
                .unwrap_or_else(|| settings.trainer_image.clone()),
        ),
        args: Some(trainer_args(job.spec.resources.gpus)),
        env: Some(environment),
        ports: Some(vec![ContainerPort {
            name: Some("status".into()),
            container_port: port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: Some(resource_requirements(job, settings)),
        readiness_probe: Some(health_probe(5)),
        liveness_probe: Some(health_probe(60)),
        termination_message_path: Some(paths::TERMINATION_LOG.into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(mounts.to_vec()),
        security_context: Some(container_security_context()),
        ..Container::default()
    })
}

/// `run JOB`; with several GPUs, the trainer's launcher in front of it: one data-parallel rank per
/// GPU inside the pod (as torchrun would), rendezvous on the pod's loopback.
fn trainer_args(gpus: i32) -> Vec<String> {
    let run = [
        "run".to_string(),
        format!("{}/{}", paths::JOB_DIR, paths::JOB_FILE_NAME),
    ];
    if gpus <= 1 {
        return run.to_vec();
    }
    let launch = ["launch", "--nproc-per-node", &gpus.to_string(), "--"];
    launch.iter().map(|s| s.to_string()).chain(run).collect()
}

/// GPUs go in both requests and limits (extended resources must match); CPU and memory are
/// requested and limited alike so a trainer is never the first to be OOM-killed for bursting.
/// CPU and memory the job does not set come from the operator's defaults, when it has any.
fn resource_requirements(job: &FinetuneJob, settings: &BuildSettings) -> ResourceRequirements {
    let resources = &job.spec.resources;
    let mut amounts = BTreeMap::new();
    if resources.gpus > 0 {
        amounts.insert(
            resources.gpu_resource_name.clone(),
            Quantity(resources.gpus.to_string()),
        );
    }
    if let Some(cpu) = resources.cpu.as_ref().or(settings.default_cpu.as_ref()) {
        amounts.insert("cpu".to_string(), cpu.clone());
    }
    if let Some(memory) = resources
        .memory
        .as_ref()
        .or(settings.default_memory.as_ref())
    {
        amounts.insert("memory".to_string(), memory.clone());
    }
    ResourceRequirements {
        requests: (!amounts.is_empty()).then(|| amounts.clone()),
        limits: (!amounts.is_empty()).then_some(amounts),
        ..ResourceRequirements::default()
    }
}

/// The trainer's volumes and mounts: the manifest, the job's storage, a scratch `/tmp` (the
/// root filesystem is read-only), and every PVC or ConfigMap a URI names, the starting adapter's
/// last; with the directory where the trainer finds the starting adapter.
fn job_mounts(
    job: &FinetuneJob,
    init_adapter: Option<&str>,
    settings: &BuildSettings,
) -> Result<(Mounts, Option<String>), BuildError> {
    let name = job_name(job)?;
    let mut this = Mounts::empty();
    this.add(
        Volume {
            name: "manifest".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::manifest_config_map(name),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        paths::JOB_DIR,
        true,
    );
    let storage_claim = job
        .spec
        .storage
        .claim_name
        .clone()
        .unwrap_or_else(|| names::storage_claim(name));
    this.add(
        pvc_volume("storage", &storage_claim, false),
        paths::STORAGE_DIR,
        false,
    );
    this.add_scratch();
    if let Some(claim) = model_cache_claim(job, settings) {
        // Written by the trainer under a per-commit lock; see the trainer's `fetch::cache`.
        this.add(
            pvc_volume("model-cache", claim, false),
            paths::MODEL_CACHE_DIR,
            false,
        );
    }
    for (field, uri) in data_uris(job) {
        this.add_uri(field, uri, Some(&storage_claim))?;
    }
    let init_adapter_dir = match init_adapter {
        Some(uri) => {
            let dir = init_adapter_dir(uri, &storage_claim)?;
            this.add_uri(INIT_ADAPTER_FIELD, uri, Some(&storage_claim))?;
            Some(dir)
        }
        None => None,
    };
    Ok((this, init_adapter_dir))
}

const INIT_ADAPTER_FIELD: &str = "spec.adapter.initAdapter";

/// The shared model cache's claim, for a job whose base is downloaded (from the Hub or `s3://`).
fn model_cache_claim<'a>(job: &FinetuneJob, settings: &'a BuildSettings) -> Option<&'a str> {
    let downloaded = matches!(
        StorageUri::parse(&job.spec.base_model.uri),
        Some(StorageUri::HuggingFace { .. } | StorageUri::S3 { .. })
    );
    settings.model_cache_claim.as_deref().filter(|_| downloaded)
}

/// Where the trainer finds the starting adapter at `uri`: an adapter's files are a directory on
/// a claim or on the node, never a ConfigMap or a Hub repository.
fn init_adapter_dir(uri: &str, storage_claim: &str) -> Result<String, BuildError> {
    match StorageUri::parse(uri) {
        // The job's own claim is already mounted (read-write) at the storage root.
        Some(StorageUri::Pvc { claim, path }) if claim == storage_claim => {
            Ok(format!("{}/{path}", paths::STORAGE_DIR))
        }
        Some(StorageUri::Pvc { claim, path }) => Ok(format!("{PVC_MOUNT_ROOT}/{claim}/{path}")),
        Some(StorageUri::File { path }) => Ok(path),
        _ => Err(BuildError::BadUri {
            field: INIT_ADAPTER_FIELD,
            uri: uri.to_string(),
        }),
    }
}

/// Every URI in the spec the trainer reads, with the field it comes from.
fn data_uris(job: &FinetuneJob) -> Vec<(&'static str, &str)> {
    let spec = &job.spec;
    let mut uris = vec![("spec.baseModel.uri", spec.base_model.uri.as_str())];
    uris.extend(spec.dataset.train.uris());
    if let Some(eval) = &spec.dataset.eval {
        uris.push(("spec.dataset.eval.uri", eval.uri.as_str()));
    }
    let evaluation = spec.evaluation.as_ref();
    if let Some(data) = evaluation
        .and_then(|e| e.retention.as_ref())
        .and_then(|r| r.data.as_ref())
    {
        uris.push(("spec.evaluation.retention.data.uri", data.uri.as_str()));
    }
    if let Some(tokenizer) = spec.vocabulary.as_ref().and_then(|v| v.tokenizer.as_ref()) {
        uris.push(("spec.vocabulary.tokenizer.uri", tokenizer.uri.as_str()));
    }
    uris
}

fn job_name(job: &FinetuneJob) -> Result<&str, BuildError> {
    job.metadata
        .name
        .as_deref()
        .ok_or(BuildError::MissingMetadata("name"))
}

/// Metadata of a child: same namespace, the job's labels, and a controller owner reference so
/// the garbage collector deletes children with their job.
fn child_meta(job: &FinetuneJob, name: String) -> Result<ObjectMeta, BuildError> {
    let owner = job
        .controller_owner_ref(&())
        .ok_or(BuildError::MissingMetadata("uid"))?;
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(
            job.namespace()
                .ok_or(BuildError::MissingMetadata("namespace"))?,
        ),
        labels: Some(names::child_labels(job_name(job)?)),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use finetune_crds::parse_manifest;

    fn example(name: &str) -> FinetuneJob {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(name);
        let mut job: FinetuneJob =
            parse_manifest(&std::fs::read_to_string(&path).unwrap(), name).unwrap();
        job.metadata.namespace = Some("team-a".into());
        job.metadata.uid = Some("0b5c7a4e-1111-2222-3333-444455556666".into());
        job
    }

    fn container(pod: &Pod) -> &Container {
        &pod.spec.as_ref().unwrap().containers[0]
    }

    fn env_value<'a>(pod: &'a Pod, name: &str) -> Option<&'a EnvVar> {
        container(pod)
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == name)
    }

    #[test]
    fn pod_is_named_per_attempt_and_owned_by_the_job() {
        let job = example("sft-lora-smollm2.yaml");
        let pod = trainer_pod(&job, 2, &BuildSettings::default(), None).unwrap();
        assert_eq!(
            pod.metadata.name.as_deref(),
            Some("smollm2-kubectl-sft-attempt-2")
        );
        assert_eq!(pod.metadata.namespace.as_deref(), Some("team-a"));
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("FinetuneJob", Some(true))
        );
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[names::ATTEMPT_LABEL], "2");
        assert_eq!(labels[names::JOB_LABEL], "smollm2-kubectl-sft");
        assert_eq!(
            env_value(&pod, env::ATTEMPT).unwrap().value.as_deref(),
            Some("2")
        );
    }

    #[test]
    fn several_gpus_run_one_rank_per_gpu_through_the_launcher() {
        let mut job = example("sft-lora-smollm2.yaml");
        let args = |job: &FinetuneJob| {
            let pod = trainer_pod(job, 0, &BuildSettings::default(), None).unwrap();
            container(&pod).args.clone().unwrap()
        };
        job.spec.resources.gpus = 1;
        assert_eq!(args(&job), ["run", "/etc/finetune/job.yaml"]);
        job.spec.resources.gpus = 8;
        assert_eq!(
            args(&job),
            [
                "launch",
                "--nproc-per-node",
                "8",
                "--",
                "run",
                "/etc/finetune/job.yaml"
            ]
        );
    }

    #[test]
    fn gang_members_carry_their_rank_the_meeting_point_and_kueues_group() {
        let mut job = example("sft-lora-smollm2.yaml");
        job.spec.resources.nodes = 2;
        job.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(names::KUEUE_QUEUE_LABEL.into(), "gpu-queue".into());
        let settings = BuildSettings::default();
        let rank = |job: &FinetuneJob, rank, master_addr| {
            let member = Member {
                attempt: 3,
                rank,
                master_addr,
            };
            member_pod(job, &member, &settings, None).unwrap()
        };
        let (zero, one) = (rank(&job, 0, None), rank(&job, 1, Some("10.1.2.3")));
        assert_eq!(
            zero.metadata.name.as_deref(),
            Some("smollm2-kubectl-sft-attempt-3-rank-0")
        );
        assert_eq!(
            one.metadata.name.as_deref(),
            Some("smollm2-kubectl-sft-attempt-3-rank-1")
        );
        let value = |pod: &Pod, name| env_value(pod, name).unwrap().value.clone();
        // Rank 0 meets at its own pod IP; the others are given it.
        let own_ip = env_value(&zero, "MASTER_ADDR").unwrap().value_from.as_ref();
        assert_eq!(
            own_ip
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("status.podIP")
        );
        assert_eq!(value(&one, "MASTER_ADDR").as_deref(), Some("10.1.2.3"));
        for (pod, r) in [(&zero, "0"), (&one, "1")] {
            assert_eq!(value(pod, "RANK").as_deref(), Some(r));
            assert_eq!(value(pod, "WORLD_SIZE").as_deref(), Some("2"));
            assert_eq!(value(pod, "LOCAL_RANK").as_deref(), Some("0"));
            let labels = pod.metadata.labels.as_ref().unwrap();
            assert_eq!(labels[names::RANK_LABEL], r);
            // One Kueue group per attempt, admitted whole from rank 0.
            assert_eq!(
                labels[gang_pod::KUEUE_GROUP_LABEL],
                "smollm2-kubectl-sft-attempt-3"
            );
            let annotations = pod.metadata.annotations.as_ref().unwrap();
            assert_eq!(annotations[gang_pod::KUEUE_TOTAL_COUNT], "2");
            assert_eq!(annotations[gang_pod::KUEUE_FAST_ADMISSION], "true");
            let spread = pod.spec.as_ref().unwrap().affinity.as_ref().unwrap();
            assert!(spread.pod_anti_affinity.is_some());
        }
        // Several GPUs per member: the launcher gets the node's place in the gang.
        job.spec.resources.gpus = 4;
        let four = rank(&job, 1, Some("10.1.2.3"));
        let args = container(&four).args.clone().unwrap();
        assert_eq!(
            args[..11],
            [
                "launch",
                "--nnodes",
                "2",
                "--node-rank",
                "1",
                "--master-addr",
                "$(MASTER_ADDR)",
                "--master-port",
                "29500",
                "--nproc-per-node",
                "4"
            ]
        );
        assert!(env_value(&four, "RANK").is_none());
        // Every member mounts the storage.
        let claim = storage_claim(&job, &settings).unwrap().unwrap();
        assert_eq!(claim.spec.unwrap().access_modes.unwrap(), ["ReadWriteMany"]);
        // A one-pod job has none of it.
        job.spec.resources.nodes = 1;
        let single = trainer_pod(&job, 0, &settings, None).unwrap();
        assert!(env_value(&single, "MASTER_ADDR").is_none());
        assert!(single.metadata.annotations.is_none());
        let claim = storage_claim(&job, &settings).unwrap().unwrap();
        assert_eq!(claim.spec.unwrap().access_modes.unwrap(), ["ReadWriteOnce"]);
    }

    #[test]
    fn gpus_cpu_and_memory_are_requested_and_limited() {
        let job = example("sft-lora-smollm2.yaml");
        let pod = trainer_pod(&job, 0, &BuildSettings::default(), None).unwrap();
        let resources = container(&pod).resources.as_ref().unwrap();
        let limits = resources.limits.as_ref().unwrap();
        assert_eq!(limits["nvidia.com/gpu"], Quantity("1".into()));
        assert_eq!(limits["memory"], Quantity("8Gi".into()));
        assert_eq!(resources.requests, resources.limits);

        let cpu_job = example("text-domain-adaptation.yaml");
        let pod = trainer_pod(&cpu_job, 0, &BuildSettings::default(), None).unwrap();
        let limits = container(&pod)
            .resources
            .as_ref()
            .unwrap()
            .limits
            .clone()
            .unwrap();
        assert!(
            !limits.contains_key("nvidia.com/gpu"),
            "gpus: 0 requests no GPU: {limits:?}"
        );
        assert_eq!(limits["cpu"], Quantity("2".into()));
    }

    #[test]
    fn operator_defaults_fill_in_cpu_and_memory_the_job_leaves_out() {
        let settings = BuildSettings {
            default_cpu: Some(Quantity("4".into())),
            default_memory: Some(Quantity("16Gi".into())),
            ..BuildSettings::default()
        };
        // The SFT example sets memory (8Gi) and no CPU: memory stays, CPU comes from the default.
        let job = example("sft-lora-smollm2.yaml");
        assert!(job.spec.resources.cpu.is_none() && job.spec.resources.memory.is_some());
        let pod = trainer_pod(&job, 0, &settings, None).unwrap();
        let resources = container(&pod).resources.clone().unwrap();
        let limits = resources.limits.clone().unwrap();
        assert_eq!(limits["cpu"], Quantity("4".into()));
        assert_eq!(limits["memory"], Quantity("8Gi".into()));
        assert_eq!(limits["nvidia.com/gpu"], Quantity("1".into()));
        assert_eq!(resources.requests, resources.limits);

        // A job with neither gets both; without operator defaults it gets neither.
        let mut bare = example("sft-lora-smollm2.yaml");
        bare.spec.resources.memory = None;
        bare.spec.resources.gpus = 0;
        let pod = trainer_pod(&bare, 0, &settings, None).unwrap();
        let requests = container(&pod).resources.clone().unwrap().requests.unwrap();
        assert_eq!(
            (&requests["cpu"], &requests["memory"]),
            (&Quantity("4".into()), &Quantity("16Gi".into()))
        );
        let pod = trainer_pod(&bare, 0, &BuildSettings::default(), None).unwrap();
        assert_eq!(
            container(&pod).resources,
            Some(ResourceRequirements::default())
        );
    }

    #[test]
    fn placement_and_queue_settings_pass_through() {
        let mut job = example("full-finetune.yaml");
        job.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(names::KUEUE_PRIORITY_LABEL.into(), "batch-low".into());
        let pod = trainer_pod(&job, 0, &BuildSettings::default(), None).unwrap();
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.priority_class_name.as_deref(), Some("training-low"));
        assert_eq!(
            spec.node_selector.as_ref().unwrap()["nvidia.com/gpu.product"],
            "NVIDIA-H100-80GB-HBM3"
        );
        assert_eq!(
            spec.tolerations.as_ref().unwrap()[0].key.as_deref(),
            Some("nvidia.com/gpu")
        );
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[names::KUEUE_QUEUE_LABEL], "gpu-queue");
        assert_eq!(labels[names::KUEUE_PRIORITY_LABEL], "batch-low");
    }

    #[test]
    fn pods_are_locked_down() {
        let job = example("sft-lora-smollm2.yaml");
        let pod = trainer_pod(&job, 0, &BuildSettings::default(), None).unwrap();
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let pod_security = spec.security_context.as_ref().unwrap();
        assert_eq!(pod_security.run_as_non_root, Some(true));
        assert_eq!(
            pod_security.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let security = container(&pod).security_context.as_ref().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            security.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
    }

    #[test]
    fn every_uri_is_mounted_where_the_trainer_looks() {
        let job = example("sft-lora-smollm2.yaml");
        let pod = trainer_pod(&job, 0, &BuildSettings::default(), None).unwrap();
        let mounts: BTreeMap<String, (String, Option<bool>)> = container(&pod)
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| (m.mount_path.clone(), (m.name.clone(), m.read_only)))
            .collect();
        assert_eq!(
            mounts["/mnt/pvc/models"],
            ("pvc-models".to_string(), Some(true))
        );
        assert_eq!(
            mounts["/mnt/configmap/finetune-examples-data"].1,
            Some(true)
        );
        assert_eq!(mounts[paths::JOB_DIR].0, "manifest");
        assert_eq!(
            mounts[paths::STORAGE_DIR],
            ("storage".to_string(), Some(false))
        );
        assert!(mounts.contains_key("/tmp"));
        // train and eval share one ConfigMap: mounted once.
        assert_eq!(
            pod.spec.as_ref().unwrap().volumes.as_ref().unwrap().len(),
            5
        );
    }

    #[test]
    fn the_init_adapter_is_mounted_read_only_and_named_in_the_env() {
        let job = example("dpo-smollm2.yaml");
        let settings = BuildSettings::default();
        let pod = trainer_pod(&job, 0, &settings, Some("pvc://adapters/team/sft")).unwrap();
        assert_eq!(
            env_value(&pod, env::INIT_ADAPTER_DIR).and_then(|e| e.value.as_deref()),
            Some("/mnt/pvc/adapters/team/sft")
        );
        let mount = container(&pod)
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.mount_path == "/mnt/pvc/adapters")
            .expect("the adapter claim is mounted");
        assert_eq!(mount.read_only, Some(true));

        // An adapter on the job's own claim is read where that claim is already mounted.
        let own = format!(
            "pvc://{}/earlier/output",
            names::storage_claim("smollm2-kubectl-dpo")
        );
        let pod = trainer_pod(&job, 0, &settings, Some(&own)).unwrap();
        assert_eq!(
            env_value(&pod, env::INIT_ADAPTER_DIR).and_then(|e| e.value.as_deref()),
            Some("/var/lib/finetune/earlier/output")
        );
        let bad = trainer_pod(&job, 0, &settings, Some("configmap://x/y")).unwrap_err();
        assert!(
            bad.to_string().contains("spec.adapter.initAdapter"),
            "{bad}"
        );
    }

    #[test]
    fn hub_token_comes_from_the_secret_by_reference() {
        let job = example("full-finetune.yaml");
        let pod = trainer_pod(&job, 0, &BuildSettings::default(), None).unwrap();
        let token = env_value(&pod, env::HF_TOKEN).unwrap();
        assert_eq!(token.value, None);
        let selector = token
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (selector.name.as_str(), selector.key.as_str()),
            ("hf-token", "token")
        );
        // A dataset's token is another variable, from its own Secret.
        let mut job = example("sft-lora-smollm2.yaml");
        job.spec.dataset.token_secret_ref = Some(finetune_crds::model::SecretKeyRef {
            name: "hf-data".into(),
            key: "token".into(),
        });
        let pod = trainer_pod(&job, 0, &BuildSettings::default(), None).unwrap();
        assert!(env_value(&pod, env::HF_TOKEN).is_none());
        let token = env_value(&pod, env::HF_DATASET_TOKEN).unwrap();
        assert_eq!(token.value, None);
        let selector = token.value_from.as_ref().unwrap().secret_key_ref.as_ref();
        assert_eq!(selector.unwrap().name, "hf-data");
    }

    #[test]
    fn s3_credentials_come_from_the_secret_by_reference_and_the_endpoint_by_value() {
        let mut job = example("sft-mixture.yaml");
        job.spec.s3 = Some(finetune_crds::s3::S3Access {
            endpoint: Some("http://minio.storage:9000".into()),
            region: Some("eu-west-1".into()),
            credentials_secret_ref: Some(finetune_crds::s3::SecretName {
                name: "s3-credentials".into(),
            }),
        });
        let pod = trainer_pod(&job, 0, &BuildSettings::default(), None).unwrap();
        let value = |name| env_value(&pod, name).and_then(|e| e.value.clone());
        assert_eq!(
            value(env::S3_ENDPOINT).as_deref(),
            Some("http://minio.storage:9000")
        );
        assert_eq!(value(env::S3_REGION).as_deref(), Some("eu-west-1"));
        assert_eq!(
            value(env::S3_CREDENTIALS_SECRET).as_deref(),
            Some("s3-credentials")
        );
        for (key, optional) in [
            ("AWS_ACCESS_KEY_ID", false),
            ("AWS_SECRET_ACCESS_KEY", false),
            ("AWS_SESSION_TOKEN", true),
        ] {
            let var = env_value(&pod, key).unwrap();
            assert_eq!(var.value, None, "{key} is passed by reference");
            let selector = var.value_from.as_ref().unwrap().secret_key_ref.as_ref();
            let selector = selector.unwrap();
            assert_eq!(
                (
                    selector.name.as_str(),
                    selector.key.as_str(),
                    selector.optional
                ),
                ("s3-credentials", key, Some(optional))
            );
        }
        // Without s3 settings the pod names none of it.
        let plain = trainer_pod(
            &example("sft-mixture.yaml"),
            0,
            &BuildSettings::default(),
            None,
        );
        assert!(env_value(&plain.unwrap(), "AWS_ACCESS_KEY_ID").is_none());
    }

    #[test]
    fn hub_jobs_share_the_model_cache_and_others_do_not_mount_it() {
        let settings = BuildSettings {
            hf_endpoint: Some("http://hub-mirror.ml:8090".into()),
            model_cache_claim: Some("model-cache".into()),
            ..BuildSettings::default()
        };
        let hub = trainer_pod(&example("full-finetune.yaml"), 0, &settings, None).unwrap();
        let value = |pod: &Pod, name| env_value(pod, name).and_then(|e| e.value.clone());
        assert_eq!(
            value(&hub, env::MODEL_CACHE_DIR).as_deref(),
            Some(paths::MODEL_CACHE_DIR)
        );
        assert_eq!(
            value(&hub, env::HF_ENDPOINT).as_deref(),
            Some("http://hub-mirror.ml:8090")
        );
        let spec = hub.spec.as_ref().unwrap();
        let volume = spec.volumes.as_ref().unwrap();
        let cache = volume.iter().find(|v| v.name == "model-cache").unwrap();
        assert_eq!(
            cache.persistent_volume_claim.as_ref().unwrap().claim_name,
            "model-cache"
        );
        let mounts = spec.containers[0].volume_mounts.as_ref().unwrap();
        let mount = mounts.iter().find(|m| m.name == "model-cache").unwrap();
        assert_eq!(mount.mount_path, paths::MODEL_CACHE_DIR);
        let local = trainer_pod(&example("sft-lora-smollm2.yaml"), 0, &settings, None).unwrap();
        let volumes = local.spec.as_ref().unwrap().volumes.as_ref().unwrap();
        assert!(volumes.iter().all(|v| v.name != "model-cache"));
        // A base in object storage is downloaded too, so it shares the cache.
        let mut s3 = example("sft-lora-smollm2.yaml");
        s3.spec.base_model.uri = "s3://team-models/smollm2".into();
        let s3 = trainer_pod(&s3, 0, &settings, None).unwrap();
        let volumes = s3.spec.as_ref().unwrap().volumes.as_ref().unwrap();
        assert!(volumes.iter().any(|v| v.name == "model-cache"));
        // Without a shared cache, a job keeps what it downloads on its own storage.
        let own = trainer_pod(
            &example("full-finetune.yaml"),
            0,
            &BuildSettings::default(),
            None,
        );
        assert_eq!(
            value(&own.unwrap(), env::MODEL_CACHE_DIR).as_deref(),
            Some("/var/lib/finetune/smollm2-full-instruct/model-cache")
        );
    }

    #[test]
    fn manifest_config_map_holds_the_spec_only() {
        let mut job = example("sft-lora-smollm2.yaml");
        job.status = Some(Default::default());
        let map = manifest_config_map(&job).unwrap();
        let yaml = &map.data.as_ref().unwrap()[paths::JOB_FILE_NAME];
        let back: FinetuneJob = parse_manifest(yaml, "configmap").unwrap();
        assert_eq!(back.spec, job.spec);
        assert!(back.status.is_none() && back.metadata.uid.is_none());
    }

    #[test]
    fn storage_claim_unless_one_is_given() {
        let job = example("full-finetune.yaml");
        let claim = storage_claim(&job, &BuildSettings::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            claim.metadata.name.as_deref(),
            Some("smollm2-full-instruct-storage")
        );
        let requests = claim.spec.unwrap().resources.unwrap().requests.unwrap();
        assert_eq!(requests["storage"], Quantity("10Gi".into()));

        let mut job = example("sft-lora-smollm2.yaml");
        job.spec.storage.claim_name = Some("shared".into());
        assert_eq!(
            storage_claim(&job, &BuildSettings::default()).unwrap(),
            None
        );
        let pod = trainer_pod(&job, 0, &BuildSettings::default(), None).unwrap();
        let volumes = pod.spec.unwrap().volumes.unwrap();
        let storage = volumes.iter().find(|v| v.name == "storage").unwrap();
        assert_eq!(
            storage.persistent_volume_claim.as_ref().unwrap().claim_name,
            "shared"
        );
    }

    #[test]
    fn jobs_never_stored_cannot_be_built() {
        let mut job = example("sft-lora-smollm2.yaml");
        job.metadata.uid = None;
        assert_eq!(
            trainer_pod(&job, 0, &BuildSettings::default(), None),
            Err(BuildError::MissingMetadata("uid"))
        );
    }
}
