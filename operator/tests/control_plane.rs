//! The operator against a real control plane (kube-apiserver, controller-manager, scheduler and
//! kwok GPU nodes from tests/cluster). Ignored by plain `cargo test`; `make test-cluster` starts
//! the cluster and runs them with `--ignored`, KUBECONFIG pointing at it.
//!
//! Each test gets its own namespace and its own operator process watching only that namespace.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use finetune_crds::adapter::AdapterPhase;
use finetune_crds::{Adapter, FinetuneJob, FinetuneJobStatus, JobPhase, parse_manifest};
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, PersistentVolume, PersistentVolumeClaim, Pod, ResourceQuota,
};
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde_json::json;

/// An operator process that is killed when the test ends, however it ends.
struct Operator {
    child: Child,
    metrics_port: u16,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn client() -> Client {
    Client::try_default()
        .await
        .expect("KUBECONFIG must point at the test cluster (tests/cluster/up.sh)")
}

/// What every test starts from: a client, the CRDs installed, a fresh namespace (with a PV for
/// the job's storage claim) and the job and pod APIs in it: `Bed(client, ns, jobs, pods)`.
struct Bed(Client, String, Api<FinetuneJob>, Api<Pod>);

impl Bed {
    async fn new(namespace_prefix: &str) -> Self {
        let client = client().await;
        install_crds(&client).await;
        let ns = namespace(&client, namespace_prefix).await;
        let jobs = Api::namespaced(client.clone(), &ns);
        let pods = Api::namespaced(client.clone(), &ns);
        Bed(client, ns, jobs, pods)
    }
}

async fn create_job(jobs: &Api<FinetuneJob>, job: &FinetuneJob) {
    jobs.create(&PostParams::default(), job)
        .await
        .expect("job accepted");
}

async fn install_crds(client: &Client) {
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    for crd in [FinetuneJob::crd(), finetune_crds::Adapter::crd()] {
        crds.patch(
            &crd.name_any(),
            &PatchParams::apply("control-plane-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("CRD applies");
    }
    // Established within a few seconds on an idle apiserver.
    let jobs: Api<FinetuneJob> = Api::all(client.clone());
    wait_for(
        "the FinetuneJob CRD to serve",
        Duration::from_secs(30),
        || async {
            jobs.list(&ListParams::default().limit(1))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
}

/// A fresh namespace named after the test, plus a hostPath PV for the job's storage claim. The
/// namespace enforces Pod Security `restricted`, so the apiserver's own admission plugin checks
/// every pod the operator builds (trainer and verification pods alike) in every test.
async fn namespace(client: &Client, name: &str) -> String {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let suffix = std::process::id();
    let ns = format!("{name}-{suffix}");
    let labels = json!({
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest"
    });
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns, "labels": labels}})).unwrap(),
        )
        .await
        .expect("namespace created");
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let volume = json!({
        "metadata": {"name": format!("{ns}-pv")},
        "spec": {
            "capacity": {"storage": "100Gi"},
            // ReadWriteMany too: a gang's claim (resources.nodes > 1) asks for it.
            "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
            "hostPath": {"path": format!("/tmp/{ns}")},
            "storageClassName": "",
            "claimRef": {"namespace": ns, "name": "kubectl-sft-storage"}
        }
    });
    volumes
        .create(
            &PostParams::default(),
            &serde_json::from_value(volume).unwrap(),
        )
        .await
        .expect("PV created");
    ns
}

fn start_operator(namespace: &str) -> Operator {
    start_operator_with(namespace, &[], &[])
}

fn start_operator_with(namespace: &str, args: &[&str], env: &[(&str, &str)]) -> Operator {
    let metrics_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_finetune-operator"))
        .args([
            "run",
            "--namespace",
            namespace,
            "--http-addr",
            &format!("127.0.0.1:{metrics_port}"),
        ])
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info,kube=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("operator starts");
    Operator {
        child,
        metrics_port,
    }
}

/// The SFT example, made to run in `namespace` without the example's model PVC.
fn example_job(namespace: &str, gpus: i32) -> FinetuneJob {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sft-lora-smollm2.yaml");
    let mut job: FinetuneJob =
        parse_manifest(&std::fs::read_to_string(path).unwrap(), "example").unwrap();
    job.metadata.name = Some("kubectl-sft".into());
    job.metadata.namespace = Some(namespace.into());
    job.spec.base_model.uri = "file:///models/SmolLM2-135M-Instruct.Q4_1.gguf".into();
    job.spec.resources.gpus = gpus;
    job
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = probe().await {
            eprintln!("  ok: {what} ({:.1}s)", start.elapsed().as_secs_f64());
            return value;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn job_phase(jobs: &Api<FinetuneJob>, name: &str) -> Option<JobPhase> {
    jobs.get(name).await.ok()?.status?.phase
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn a_job_becomes_a_gpu_pod_and_its_status_follows() {
    let Bed(client, ns, jobs, pods) = Bed::new("it-place").await;
    let _operator = start_operator(&ns);
    create_job(&jobs, &example_job(&ns, 1)).await;

    let pod = wait_for(
        "the attempt-0 pod to be scheduled",
        Duration::from_secs(60),
        || async {
            let pod = pods.get("kubectl-sft-attempt-0").await.ok()?;
            pod.spec.as_ref()?.node_name.as_ref()?;
            Some(pod)
        },
    )
    .await;
    let spec = pod.spec.unwrap();
    assert!(
        spec.node_name.as_deref().unwrap().starts_with("kwok-gpu-"),
        "{:?}",
        spec.node_name
    );
    let limits = spec.containers[0]
        .resources
        .as_ref()
        .unwrap()
        .limits
        .clone()
        .unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    assert_eq!(limits["memory"].0, "8Gi");

    // kwok reports the pod Running; the job follows.
    wait_for("phase Running", Duration::from_secs(60), || async {
        (job_phase(&jobs, "kubectl-sft").await == Some(JobPhase::Running)).then_some(())
    })
    .await;
    let job = jobs.get("kubectl-sft").await.unwrap();
    let status = job.status.unwrap();
    assert!(status.start_time.is_some());
    assert_eq!(status.observed_generation, job.metadata.generation);
    let running = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Running")
        .unwrap();
    assert_eq!(running.status, "True");

    // The manifest ConfigMap holds a job the trainer accepts; the storage claim is bound.
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let map = maps.get("kubectl-sft-manifest").await.unwrap();
    let manifest = &map.data.unwrap()["job.yaml"];
    parse_manifest::<FinetuneJob>(manifest, "configmap").expect("the mounted manifest validates");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let claim = claims.get("kubectl-sft-storage").await.unwrap();
    assert_eq!(claim.owner_references()[0].kind, "FinetuneJob");

    // Events tell the story.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> = wait_for("events for the job", Duration::from_secs(20), || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let reasons: Vec<String> = list.items.into_iter().filter_map(|e| e.reason).collect();
        reasons.iter().any(|r| r == "Running").then_some(reasons)
    })
    .await;
    assert!(reasons.iter().any(|r| r == "Created"), "{reasons:?}");

    // An eviction through the API deletes the pod under the trainer: the job starts attempt 1
    // without touching backoffLimit, and attempt 0's record says why it ended.
    pods.evict("kubectl-sft-attempt-0", &EvictParams::default())
        .await
        .expect("eviction accepted");
    let status = wait_for(
        "attempt 1 after the eviction",
        Duration::from_secs(60),
        || async {
            let status = jobs.get("kubectl-sft").await.ok()?.status?;
            pods.get_opt("kubectl-sft-attempt-1").await.ok()??;
            (status.preemptions == 1).then_some(status)
        },
    )
    .await;
    assert_eq!(status.failed_attempts, 0);
    let evicted = status.attempts.iter().find(|a| a.index == 0).unwrap();
    assert_eq!(evicted.reason.as_deref(), Some("Preempted"), "{evicted:?}");
    cleanup(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn too_few_gpus_queue_the_job_with_the_schedulers_message() {
    let Bed(client, ns, jobs, _) = Bed::new("it-queue").await;
    let operator = start_operator(&ns);
    create_job(&jobs, &example_job(&ns, 16)).await;

    // The pod and its storage claim are created together, so the scheduler's first verdict can
    // be about the claim it has not seen yet; its retry once the claim exists names the GPUs.
    let condition = wait_for(
        "phase Queued with the scheduler's GPU message",
        Duration::from_secs(90),
        || async {
            let status = jobs.get("kubectl-sft").await.ok()?.status?;
            if status.phase != Some(JobPhase::Queued) {
                return None;
            }
            let queued = status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Queued")?;
            queued
                .message
                .contains("Insufficient nvidia.com/gpu")
                .then_some(queued)
        },
    )
    .await;
    assert_eq!(condition.reason, "Unschedulable");

    // The operator's own metrics count it.
    let url = format!("127.0.0.1:{}", operator.metrics_port);
    let text = wait_for(
        "metrics with the queued job",
        Duration::from_secs(20),
        || async {
            let text = http_get(&url, "/metrics").await?;
            text.contains("finetune_operator_jobs{phase=\"Queued\"} 1")
                .then_some(text)
        },
    )
    .await;
    assert!(
        text.contains("finetune_operator_reconcile_duration_seconds_count"),
        "{text}"
    );
    cleanup(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn a_refused_pod_is_reported_in_status() {
    let Bed(client, ns, jobs, _) = Bed::new("it-quota").await;
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), &ns);
    let quota = json!({"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}});
    quotas
        .create(
            &PostParams::default(),
            &serde_json::from_value(quota).unwrap(),
        )
        .await
        .unwrap();
    // The quota controller must have computed usage before admission enforces it.
    wait_for(
        "the quota to be computed",
        Duration::from_secs(30),
        || async { quotas.get("no-pods").await.ok()?.status?.used.map(|_| ()) },
    )
    .await;
    let _operator = start_operator(&ns);
    create_job(&jobs, &example_job(&ns, 1)).await;
    let condition = wait_for(
        "Created=False with the quota message",
        Duration::from_secs(60),
        || async {
            let status = jobs.get("kubectl-sft").await.ok()?.status?;
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Created" && c.status == "False")
        },
    )
    .await;
    assert_eq!(condition.reason, "ChildCreationFailed");
    assert!(
        condition.message.contains("exceeded quota"),
        "{}",
        condition.message
    );
    cleanup(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn a_job_starting_from_an_adapter_waits_for_it_then_mounts_it() {
    let Bed(client, ns, jobs, pods) = Bed::new("it-init-adapter").await;
    let _operator = start_operator(&ns);
    let mut job = example_job(&ns, 1);
    job.spec.adapter.init_adapter = Some("sft-start".into());
    create_job(&jobs, &job).await;

    // No such Adapter yet: no pod, and the job says why.
    let condition = wait_for(
        "Created=False naming the missing Adapter",
        Duration::from_secs(60),
        || async {
            let status = jobs.get("kubectl-sft").await.ok()?.status?;
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Created" && c.status == "False")
        },
    )
    .await;
    assert!(
        condition
            .message
            .contains("Adapter sft-start does not exist in namespace"),
        "{}",
        condition.message
    );
    assert!(
        pods.get_opt("kubectl-sft-attempt-0")
            .await
            .unwrap()
            .is_none()
    );

    // Once the Adapter exists it must also be verified: Pending is not enough.
    create_adapter(&client, &ns, "sft-start", "pvc://adapters/team/sft-start").await;
    wait_for(
        "Created=False saying the Adapter is not Ready",
        Duration::from_secs(60),
        || async {
            let status = jobs.get("kubectl-sft").await.ok()?.status?;
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Created" && c.message.contains("not Ready"))
        },
    )
    .await;
    assert!(
        pods.get_opt("kubectl-sft-attempt-0")
            .await
            .unwrap()
            .is_none()
    );
    // Verified (here by hand: kwok nodes run no verification pod), the pod is created with its
    // files mounted read-only. The mark is repeated until it holds: a status write of the
    // operator's own verification can land after it.
    let pod = wait_for(
        "the pod once the Adapter is Ready",
        Duration::from_secs(120),
        || async {
            mark_adapter_verified(&client, &ns, "sft-start").await;
            pods.get_opt("kubectl-sft-attempt-0").await.ok()?
        },
    )
    .await;
    let spec = pod.spec.unwrap();
    let container = &spec.containers[0];
    let env = container.env.as_ref().unwrap();
    let dir = env
        .iter()
        .find(|e| e.name == "FINETUNE_INIT_ADAPTER_DIR")
        .and_then(|e| e.value.clone());
    assert_eq!(dir.as_deref(), Some("/mnt/pvc/adapters/team/sft-start"));
    let mount = container
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == "/mnt/pvc/adapters")
        .expect("the adapters claim is mounted");
    assert_eq!(mount.read_only, Some(true));
    let claim = spec
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.persistent_volume_claim)
        .unwrap();
    assert_eq!(claim.claim_name, "adapters");
    cleanup(&client, &ns).await;
}

/// Deletes the job `kubectl-sft` in the foreground, waits until it is gone, then gives the
/// garbage collector a moment to act on what it owned.
async fn delete_job_and_wait(jobs: &Api<FinetuneJob>) {
    jobs.delete("kubectl-sft", &DeleteParams::foreground())
        .await
        .unwrap();
    wait_for("the job gone", Duration::from_secs(60), || async {
        jobs.get_opt("kubectl-sft")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// Waits for the job's `Created` condition to say `NameConflict` and returns its message.
async fn name_conflict(jobs: &Api<FinetuneJob>) -> String {
    let condition = wait_for(
        "Created=False with reason NameConflict",
        Duration::from_secs(60),
        || async {
            let status = jobs.get("kubectl-sft").await.ok()?.status?;
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Created" && c.reason == "NameConflict")
        },
    )
    .await;
    condition.message
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn a_users_configmap_with_a_childs_name_is_never_adopted() {
    let Bed(client, ns, jobs, pods) = Bed::new("it-name-map").await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let theirs = json!({"metadata": {"name": "kubectl-sft-manifest"}, "data": {"notes": "mine"}});
    maps.create(
        &PostParams::default(),
        &serde_json::from_value(theirs).unwrap(),
    )
    .await
    .unwrap();
    let _operator = start_operator(&ns);
    create_job(&jobs, &example_job(&ns, 1)).await;
    let message = name_conflict(&jobs).await;
    assert!(
        message.contains("configmap kubectl-sft-manifest already exists"),
        "{message}"
    );
    // Untouched: no owner reference, no key of ours merged in, and no pod without its manifest.
    let map = maps.get("kubectl-sft-manifest").await.unwrap();
    assert!(map.metadata.owner_references.unwrap_or_default().is_empty());
    let data = map.data.unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["notes"]);
    assert!(
        pods.get_opt("kubectl-sft-attempt-0")
            .await
            .unwrap()
            .is_none()
    );
    // Deleting the job leaves the user's ConfigMap in place.
    delete_job_and_wait(&jobs).await;
    assert!(
        maps.get_opt("kubectl-sft-manifest")
            .await
            .unwrap()
            .is_some()
    );

    // Once the user renames theirs away, a job of that name proceeds.
    maps.delete("kubectl-sft-manifest", &DeleteParams::default())
        .await
        .unwrap();
    create_job(&jobs, &example_job(&ns, 1)).await;
    wait_for(
        "the pod once the name is free",
        Duration::from_secs(120),
        || async { pods.get_opt("kubectl-sft-attempt-0").await.ok()? },
    )
    .await;
    cleanup(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn a_users_claim_with_a_childs_name_is_never_adopted() {
    let Bed(client, ns, jobs, pods) = Bed::new("it-name-claim").await;
    // A claim whose spec is exactly the one the operator would apply.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let theirs = json!({"metadata": {"name": "kubectl-sft-storage", "labels": {"owner": "team-data"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}}}});
    claims
        .create(
            &PostParams::default(),
            &serde_json::from_value(theirs).unwrap(),
        )
        .await
        .unwrap();
    let _operator = start_operator(&ns);
    create_job(&jobs, &example_job(&ns, 1)).await;
    let message = name_conflict(&jobs).await;
    assert!(
        message.contains("persistentvolumeclaim kubectl-sft-storage already exists"),
        "{message}"
    );
    let claim = claims.get("kubectl-sft-storage").await.unwrap();
    assert!(
        claim
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );
    assert_eq!(
        claim.metadata.labels.unwrap_or_default().len(),
        1,
        "no label of ours merged in"
    );
    assert!(
        pods.get_opt("kubectl-sft-attempt-0")
            .await
            .unwrap()
            .is_none()
    );
    delete_job_and_wait(&jobs).await;
    let claim = claims.get_opt("kubectl-sft-storage").await.unwrap();
    assert!(
        claim.is_some_and(|c| c.metadata.deletion_timestamp.is_none()),
        "the user's claim survives the job"
    );
    cleanup(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn a_hand_edited_status_at_its_limits_stops_only_that_job() {
    let Bed(client, ns, jobs, pods) = Bed::new("it-limits").await;
    let mut operator = start_operator(&ns);
    create_job(&jobs, &example_job(&ns, 1)).await;
    wait_for("the first pod", Duration::from_secs(60), || async {
        pods.get_opt("kubectl-sft-attempt-0").await.ok()?
    })
    .await;
    // Counters at the int32 limit, steps at the int64 limit, percentages at f64's.
    let edited = json!({"status": {
        "failedAttempts": i32::MAX, "preemptions": i32::MAX,
        "progress": {"step": i64::MAX, "totalSteps": i64::MAX, "epoch": 1e308, "percent": 1e308}}});
    jobs.patch_status(
        "kubectl-sft",
        &PatchParams::default(),
        &Patch::Merge(edited),
    )
    .await
    .unwrap();
    // Its pod vanishes: the attempt must be judged with those counters, without overflow.
    pods.delete(
        "kubectl-sft-attempt-0",
        &DeleteParams::default().grace_period(0),
    )
    .await
    .unwrap();
    let phase = wait_for(
        "the edited job to settle",
        Duration::from_secs(60),
        || async {
            let phase = job_phase(&jobs, "kubectl-sft").await?;
            matches!(
                phase,
                JobPhase::Failed | JobPhase::Pending | JobPhase::Running
            )
            .then_some(phase)
        },
    )
    .await;
    eprintln!("  the edited job is {phase:?}");
    assert!(
        operator.child.try_wait().unwrap().is_none(),
        "the operator is still running"
    );

    // Another job is reconciled as usual, before and after an operator restart.
    let mut other = example_job(&ns, 1);
    other.metadata.name = Some("other-sft".into());
    create_job(&jobs, &other).await;
    wait_for("the other job's pod", Duration::from_secs(60), || async {
        pods.get_opt("other-sft-attempt-0").await.ok()?
    })
    .await;
    drop(operator);
    let operator = start_operator(&ns);
    let mut third = example_job(&ns, 1);
    third.metadata.name = Some("third-sft".into());
    create_job(&jobs, &third).await;
    wait_for(
        "a third job's pod after a restart",
        Duration::from_secs(60),
        || async { pods.get_opt("third-sft-attempt-0").await.ok()? },
    )
    .await;
    let mut operator = operator;
    assert!(operator.child.try_wait().unwrap().is_none());
    cleanup(&client, &ns).await;
}

/// Sets the value at a JSON pointer of `object`, creating objects on the way.
fn set_at(object: &mut serde_json::Value, pointer: &str, value: serde_json::Value) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let mut target = object;
    for part in parent.split('/').skip(1) {
        target = target
            .as_object_mut()
            .unwrap()
            .entry(part)
            .or_insert_with(|| json!({}));
    }
    target.as_object_mut().unwrap().insert(key.into(), value);
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn check_and_the_apiserver_agree_on_bad_and_good_manifests() {
    use kube::api::{ApiResource, DynamicObject};
    let Bed(client, ns, _, _) = Bed::new("it-verdicts").await;
    let example = serde_json::to_value(example_job(&ns, 1)).unwrap();
    let adapter = json!({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "Adapter",
        "metadata": {"name": "verdict", "namespace": ns},
        "spec": {"baseModel": {"uri": "pvc://models/m.gguf"}, "source": {"uri": "pvc://adapters/a"}}
    });
    // (what, base object, pointer, value, accepted?)
    let cases = [
        (
            "cpu: banana",
            &example,
            "/spec/resources/cpu",
            json!("banana"),
            false,
        ),
        (
            "memory with a space",
            &example,
            "/spec/resources/memory",
            json!("16 Gi"),
            false,
        ),
        (
            "storage size in GB",
            &example,
            "/spec/storage/size",
            json!("20GB"),
            false,
        ),
        (
            "cpu 500m",
            &example,
            "/spec/resources/cpu",
            json!("500m"),
            true,
        ),
        (
            "cpu as a number",
            &example,
            "/spec/resources/cpu",
            json!(4),
            true,
        ),
        (
            "model path with ..",
            &example,
            "/spec/baseModel/uri",
            json!("pvc://models/../x.gguf"),
            false,
        ),
        (
            "model path with an empty segment",
            &example,
            "/spec/baseModel/uri",
            json!("pvc://models//x"),
            false,
        ),
        (
            "data key ..",
            &example,
            "/spec/dataset/train/uri",
            json!("configmap://data/.."),
            false,
        ),
        (
            "dotted ConfigMap name",
            &example,
            "/spec/dataset/train/uri",
            json!("configmap://team.data/train.jsonl"),
            true,
        ),
        (
            "60-character claim",
            &example,
            "/spec/baseModel/uri",
            json!(format!("pvc://{}/m.gguf", "c".repeat(60))),
            true,
        ),
        (
            "adapter from s3",
            &adapter,
            "/spec/source/uri",
            json!("s3://bucket/adapter"),
            true,
        ),
        (
            "adapter from an s3 bucket with capitals",
            &adapter,
            "/spec/source/uri",
            json!("s3://Bucket/adapter"),
            false,
        ),
        (
            "adapter from http",
            &adapter,
            "/spec/source/uri",
            json!("https://example.com/a"),
            false,
        ),
        (
            "adapter path with ..",
            &adapter,
            "/spec/source/uri",
            json!("pvc://adapters/../x"),
            false,
        ),
        (
            "adapter on a claim",
            &adapter,
            "/spec/source/uri",
            json!("pvc://adapters/team/a"),
            true,
        ),
    ];
    let mut disagreements = Vec::new();
    for (what, base, pointer, value, accepted) in cases {
        let mut object = base.clone();
        set_at(&mut object, pointer, value);
        let yaml = serde_yaml::to_string(&object).unwrap();
        let offline = if object["kind"] == "Adapter" {
            parse_manifest::<Adapter>(&yaml, what)
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            parse_manifest::<FinetuneJob>(&yaml, what)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let resource = if object["kind"] == "Adapter" {
            ApiResource::erase::<Adapter>(&())
        } else {
            ApiResource::erase::<FinetuneJob>(&())
        };
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
        let dry_run = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        let server = api
            .create(&dry_run, &serde_json::from_value(object).unwrap())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        eprintln!(
            "  {what}: check {}, apiserver {}",
            offline.is_ok(),
            server.is_ok()
        );
        if offline.is_ok() != server.is_ok() || offline.is_ok() != accepted {
            disagreements.push(format!(
                "{what}: expected {accepted}, check {offline:?}, apiserver {server:?}"
            ));
        }
    }
    assert!(disagreements.is_empty(), "{disagreements:#?}");
    cleanup(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn a_job_outside_the_clusters_policy_fails_not_allowed() {
    let Bed(client, ns, jobs, pods) = Bed::new("it-policy").await;
    let _operator = start_operator_with(&ns, &["--allowed-priority-class=training-low"], &[]);
    let mut foreign = example_job(&ns, 1);
    foreign.spec.image = Some("docker.io/someone/miner:latest".into());
    create_job(&jobs, &foreign).await;
    let mut greedy = example_job(&ns, 1);
    greedy.metadata.name = Some("greedy-sft".into());
    greedy.spec.resources.priority_class_name = Some("system-cluster-critical".into());
    create_job(&jobs, &greedy).await;
    for (name, field) in [
        ("kubectl-sft", "spec.image"),
        ("greedy-sft", "spec.resources.priorityClassName"),
    ] {
        let condition = wait_for(
            &format!("{name} Failed NotAllowed"),
            Duration::from_secs(60),
            || async {
                let status = jobs.get(name).await.ok()?.status?;
                (status.phase == Some(JobPhase::Failed))
                    .then(|| {
                        status
                            .conditions
                            .into_iter()
                            .find(|c| c.reason == "NotAllowed")
                    })
                    .flatten()
            },
        )
        .await;
        assert!(condition.message.contains(field), "{}", condition.message);
        assert!(
            pods.get_opt(&format!("{name}-attempt-0"))
                .await
                .unwrap()
                .is_none()
        );
    }
    cleanup(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn a_job_too_big_for_its_gpu_fails_will_not_fit_with_the_numbers_and_no_pod() {
    let Bed(client, ns, jobs, pods) = Bed::new("it-fit").await;
    let _operator = start_operator(&ns);
    let job = |name: &str, adapter: &str| -> FinetuneJob {
        let yaml = format!(
            "apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {{name: {name}, namespace: {ns}}}
spec:
  baseModel: {{uri: \"hf://meta-llama/Llama-3.1-70B-Instruct\"}}
  dataset: {{train: {{uri: \"configmap://finetune-examples-data/chat-train.jsonl\"}}, format: chat}}
  adapter: {adapter}
  hyperparameters: {{maxSteps: 10, batchSize: 4, maxSeqLength: 2048}}
  forgettingGuard: {{disabled: true}}
  resources: {{gpus: 1, gpuMemory: 80Gi}}
"
        );
        parse_manifest(&yaml, name).unwrap()
    };
    // Full fine-tuning of 70B (bf16 weights, gradients and fp32 AdamW moments) on one 80 GiB GPU.
    create_job(&jobs, &job("full-70b", "{type: full}")).await;
    // An 8B LoRA fits the same GPU, so it gets its pod as usual.
    let mut lora = job("lora-8b", "{type: lora}");
    lora.spec.base_model.uri = "hf://meta-llama/Llama-3.1-8B".into();
    create_job(&jobs, &lora).await;
    let condition = wait_for(
        "full-70b Failed WillNotFit",
        Duration::from_secs(60),
        || async {
            let status = jobs.get("full-70b").await.ok()?.status?;
            (status.phase == Some(JobPhase::Failed))
                .then(|| {
                    status
                        .conditions
                        .into_iter()
                        .find(|c| c.reason == "WillNotFit")
                })
                .flatten()
        },
    )
    .await;
    let message = &condition.message;
    eprintln!("  {message}");
    for number in ["80.0 GiB", "weights 131.4 GiB", "optimizer", "activations"] {
        assert!(message.contains(number), "{number} not in: {message}");
    }
    let pod = wait_for("the 8B LoRA job's pod", Duration::from_secs(60), || async {
        pods.get_opt("lora-8b-attempt-0").await.ok()?
    })
    .await;
    assert!(pod.metadata.name.is_some());
    assert!(pods.get_opt("full-70b-attempt-0").await.unwrap().is_none());
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let warned = wait_for("a WillNotFit Event", Duration::from_secs(30), || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("WillNotFit"))
    })
    .await;
    assert_eq!(warned.type_.as_deref(), Some("Warning"));
    cleanup(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn deleting_a_job_collects_its_children() {
    let Bed(client, ns, jobs, pods) = Bed::new("it-gc").await;
    let _operator = start_operator(&ns);
    create_job(&jobs, &example_job(&ns, 1)).await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    wait_for("the pod", Duration::from_secs(60), || async {
        pods.get("kubectl-sft-attempt-0").await.ok()
    })
    .await;

    jobs.delete("kubectl-sft", &DeleteParams::foreground())
        .await
        .unwrap();
    wait_for(
        "pods and ConfigMap collected",
        Duration::from_secs(90),
        || async {
            let selector = ListParams::default().labels("finetune.dev/job=kubectl-sft");
            let pods_left = pods.list(&selector).await.ok()?.items.len();
            let maps_left = maps.list(&selector).await.ok()?.items.len();
            (pods_left + maps_left == 0).then_some(())
        },
    )
    .await;
    cleanup(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn one_of_two_replicas_leads_and_a_standby_takes_over() {
    let Bed(client, ns, jobs, pods) = Bed::new("it-leader").await;
    let elect = [
        "--leader-elect",
        "--leader-election-namespace",
        ns.as_str(),
        "--leader-election-lease-name",
        "finetune-operator-test",
    ];
    let mut replicas: Vec<Option<Operator>> = ["replica-a", "replica-b"]
        .iter()
        .map(|identity| Some(start_operator_with(&ns, &elect, &[("POD_NAME", identity)])))
        .collect();
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &ns);
    let holder = || async {
        let lease = leases.get("finetune-operator-test").await.ok()?;
        lease.spec?.holder_identity.filter(|h| !h.is_empty())
    };
    let leader = wait_for("a leader", Duration::from_secs(30), holder).await;
    let (leading, standing_by) = if leader == "replica-a" {
        (0, 1)
    } else {
        (1, 0)
    };

    let mut first = example_job(&ns, 1);
    first.metadata.name = Some("first".into());
    jobs.create(&PostParams::default(), &first).await.unwrap();
    wait_for(
        "the leader to create the first pod",
        Duration::from_secs(60),
        || async { pods.get("first-attempt-0").await.ok() },
    )
    .await;
    // The standby has reconciled nothing: it never started its controller.
    let standby = replicas[standing_by].as_ref().unwrap();
    let text = wait_for("the standby's metrics", Duration::from_secs(10), || async {
        http_get(&format!("127.0.0.1:{}", standby.metrics_port), "/metrics").await
    })
    .await;
    assert!(text.contains("finetune_operator_leader 0"), "{text}");
    assert!(
        !text.contains("finetune_operator_reconciliations_total{"),
        "{text}"
    );

    // SIGKILL: no release, so the standby waits out the lease (15 s) and takes over.
    drop(replicas[leading].take());
    let mut second = example_job(&ns, 1);
    second.metadata.name = Some("second".into());
    jobs.create(&PostParams::default(), &second).await.unwrap();
    let new_leader = wait_for(
        "the standby to take the lease",
        Duration::from_secs(40),
        || async { holder().await.filter(|h| *h != leader) },
    )
    .await;
    assert_ne!(new_leader, leader);
    wait_for(
        "the new leader to create the second pod",
        Duration::from_secs(30),
        || async { pods.get("second-attempt-0").await.ok() },
    )
    .await;
    let all = pods.list(&ListParams::default()).await.unwrap();
    let mut names: Vec<String> = all.items.iter().map(|p| p.name_any()).collect();
    names.sort();
    assert_eq!(
        names,
        ["first-attempt-0", "second-attempt-0"],
        "no duplicate pods"
    );

    // SIGTERM: the leader releases the lease on its way out, so it is free at once.
    let survivor = replicas[standing_by].take().unwrap();
    let pid = survivor.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait_for(
        "the lease to be released",
        Duration::from_secs(15),
        || async { holder().await.is_none().then_some(()) },
    )
    .await;
    drop(survivor);
    cleanup(&client, &ns).await;
}

/// A user-registered Adapter for the SmolLM2 base whose files are at `source_uri`.
/// Marks an Adapter verified for its current generation, as its verification pod would (kwok
/// nodes run none); the Adapter controller then treats it as settled.
async fn mark_adapter_verified(client: &Client, ns: &str, name: &str) {
    let adapters: Api<Adapter> = Api::namespaced(client.clone(), ns);
    let adapter = adapters.get(name).await.unwrap();
    if adapter.status.as_ref().and_then(|s| s.phase) == Some(AdapterPhase::Ready) {
        return;
    }
    let status =
        json!({"status": {"phase": "Ready", "observedGeneration": adapter.metadata.generation}});
    adapters
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
}

async fn create_adapter(client: &Client, ns: &str, name: &str, source_uri: &str) {
    let adapters: Api<Adapter> = Api::namespaced(client.clone(), ns);
    let adapter = json!({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "Adapter",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "pvc://models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
            "source": {"uri": source_uri}
        }
    });
    adapters
        .create(
            &PostParams::default(),
            &serde_json::from_value(adapter).unwrap(),
        )
        .await
        .expect("adapter accepted");
}

/// A claim and a PersistentVolume pre-bound to it (no provisioner here), unless they exist.
/// A volume reserved for the claim `claim` of `ns`, which the PV controller binds once the
/// claim exists (the operator creates it, with the size it asks for).
/// Secret `name` in `ns` holding `string_data` (key to value).
async fn create_secret(client: &Client, ns: &str, name: &str, string_data: serde_json::Value) {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    let secret = json!({"metadata": {"name": name}, "stringData": string_data});
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(secret).unwrap(),
        )
        .await
        .unwrap();
}

/// The PriorityClass `examples/full-finetune.yaml` names (cluster-wide: an earlier test may
/// have made it already).
async fn create_example_priority_class(client: &Client) {
    let classes: Api<k8s_openapi::api::scheduling::v1::PriorityClass> = Api::all(client.clone());
    let class = json!({"metadata": {"name": "training-low"}, "value": 100});
    let _ = classes
        .create(
            &PostParams::default(),
            &serde_json::from_value(class).unwrap(),
        )
        .await;
}

async fn volume_for_claim(client: &Client, ns: &str, claim: &str) {
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let pv = json!({"metadata": {"name": format!("{ns}-{claim}")}, "spec": {
        "capacity": {"storage": "1Ti"}, "accessModes": ["ReadWriteOnce"],
        "hostPath": {"path": format!("/tmp/{ns}-{claim}")}, "storageClassName": "",
        "claimRef": {"namespace": ns, "name": claim}}});
    volumes
        .create(&PostParams::default(), &serde_json::from_value(pv).unwrap())
        .await
        .expect("PV created");
}

async fn bind_claim(client: &Client, ns: &str, claim: &str) {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    if claims.get_opt(claim).await.unwrap().is_none() {
        let pvc = json!({"metadata": {"name": claim}, "spec": {
            "accessModes": ["ReadWriteOnce"], "storageClassName": "",
            "resources": {"requests": {"storage": "1Gi"}}}});
        let _ = claims
            .create(
                &PostParams::default(),
                &serde_json::from_value(pvc).unwrap(),
            )
            .await;
    }
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let name = format!("{ns}-{claim}");
    if volumes.get_opt(&name).await.unwrap().is_none() {
        let pv = json!({"metadata": {"name": name}, "spec": {
            "capacity": {"storage": "1Ti"},
            "accessModes": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany"],
            "hostPath": {"path": format!("/tmp/{name}")}, "storageClassName": "",
            "claimRef": {"namespace": ns, "name": claim}}});
        let _ = volumes
            .create(&PostParams::default(), &serde_json::from_value(pv).unwrap())
            .await;
    }
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn every_example_becomes_a_pod_on_a_gpu_node_with_its_resources() {
    let _h100 = ONE_H100_NODE_AT_A_TIME.lock().await;
    let Bed(client, ns, jobs, pods) = Bed::new("it-examples").await;
    let h100 = format!("kwok-gpu-h100-{}", std::process::id());
    offer_only_this_h100_node(&client, &h100).await;
    create_kwok_h100_node(&client, &h100).await;
    // What the examples assume the cluster has: the full fine-tuning example's priority class,
    // and the Adapter the DPO example starts from (the SFT example registers it on success).
    create_example_priority_class(&client).await;
    create_adapter(
        &client,
        &ns,
        "smollm2-kubectl",
        "pvc://adapters/smollm2-kubectl",
    )
    .await;
    // Verified before the operator starts (kwok nodes run no verification pod).
    mark_adapter_verified(&client, &ns, "smollm2-kubectl").await;
    let _operator = start_operator(&ns);

    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut paths: Vec<_> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    let mut applied = Vec::new();
    for path in &paths {
        let text = std::fs::read_to_string(path).unwrap();
        if !text.lines().any(|l| l.trim() == "kind: FinetuneJob") {
            continue;
        }
        let mut job: FinetuneJob =
            parse_manifest(&text, &path.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
        job.metadata.namespace = Some(ns.clone());
        jobs.create(&PostParams::default(), &job)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        applied.push((path.file_name().unwrap().to_owned(), job));
    }
    assert!(
        applied.len() >= 4,
        "examples found: {applied:?}",
        applied = applied.len()
    );

    for (file, job) in &applied {
        let name = job.name_any();
        if job.spec.run_policy.suspend {
            // Created suspended for a queue controller (Kueue) to admit: no pod until then.
            wait_for(
                &format!("{file:?}: phase Suspended"),
                Duration::from_secs(60),
                || async {
                    (job_phase(&jobs, &name).await == Some(JobPhase::Suspended)).then_some(())
                },
            )
            .await;
            assert!(
                pods.get_opt(&format!("{name}-attempt-0"))
                    .await
                    .unwrap()
                    .is_none()
            );
            let admit = json!({"spec": {"runPolicy": {"suspend": false}}});
            jobs.patch(&name, &PatchParams::default(), &Patch::Merge(&admit))
                .await
                .expect("admitted");
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        let pod = loop {
            if let Ok(Some(pod)) = pods.get_opt(&format!("{name}-attempt-0")).await {
                break pod;
            }
            if Instant::now() > deadline {
                let status = jobs.get(&name).await.ok().and_then(|j| j.status);
                panic!("{file:?}: no pod {name}-attempt-0 after 90 s; job status: {status:#?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        // Bind every claim the pod mounts (the job's own storage, the model and adapter claims).
        for volume in pod.spec.as_ref().unwrap().volumes.iter().flatten() {
            if let Some(claim) = &volume.persistent_volume_claim {
                bind_claim(&client, &ns, &claim.claim_name).await;
            }
        }
        let what = format!("{file:?}: pod {name}-attempt-0 bound to a node");
        let pod = wait_for(&what, Duration::from_secs(120), || async {
            let pod = pods.get(&format!("{name}-attempt-0")).await.ok()?;
            pod.spec.as_ref()?.node_name.as_ref()?;
            Some(pod)
        })
        .await;
        let spec = pod.spec.unwrap();
        let node = spec.node_name.clone().unwrap();
        assert!(node.starts_with("kwok-gpu-"), "{file:?}: on {node}");
        let container = &spec.containers[0];
        let resources = container.resources.clone().unwrap();
        let gpus = |list: &Option<
            std::collections::BTreeMap<
                String,
                k8s_openapi::apimachinery::pkg::api::resource::Quantity,
            >,
        >| {
            list.as_ref()
                .and_then(|l| l.get("nvidia.com/gpu"))
                .map(|q| q.0.clone())
        };
        let wanted = job.spec.resources.gpus;
        let expected = (wanted > 0).then(|| wanted.to_string());
        assert_eq!(gpus(&resources.limits), expected, "{file:?}: GPU limit");
        assert_eq!(gpus(&resources.requests), expected, "{file:?}: GPU request");
        if let Some(memory) = &job.spec.resources.memory {
            let limit = resources.limits.as_ref().and_then(|l| l.get("memory"));
            assert_eq!(
                limit.map(|q| &q.0),
                Some(&memory.0),
                "{file:?}: memory limit"
            );
        }
        for (key, value) in &job.spec.resources.node_selector {
            let selector = spec.node_selector.as_ref().and_then(|s| s.get(key));
            assert_eq!(selector, Some(value), "{file:?}: nodeSelector {key}");
        }
        if let Some(class) = &job.spec.resources.priority_class_name {
            assert_eq!(spec.priority_class_name.as_ref(), Some(class), "{file:?}");
        }
        let security = container.security_context.clone().unwrap();
        assert_eq!(security.run_as_non_root, Some(true), "{file:?}");
        assert_eq!(security.read_only_root_filesystem, Some(true), "{file:?}");
        assert_eq!(security.allow_privilege_escalation, Some(false), "{file:?}");
    }
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    for pv in volumes.list(&ListParams::default()).await.unwrap() {
        if pv.name_any().starts_with(&format!("{ns}-")) {
            let _ = volumes
                .delete(&pv.name_any(), &DeleteParams::background())
                .await;
        }
    }
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let _ = nodes.delete(&h100, &DeleteParams::default()).await;
    cleanup(&client, &ns).await;
}

async fn cleanup(client: &Client, ns: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(ns, &DeleteParams::background()).await;
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let _ = volumes
        .delete(&format!("{ns}-pv"), &DeleteParams::background())
        .await;
}

/// A minimal HTTP GET, enough for the operator's text endpoints.
async fn http_get(address: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// A test-only node (tests/executor) that runs pods as local processes; killed with the test.
struct Executor {
    child: Child,
}

impl Drop for Executor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn required_path(variable: &str) -> String {
    let value = std::env::var(variable)
        .unwrap_or_else(|_| panic!("set {variable} (make test-cluster does)"));
    assert!(
        std::path::Path::new(&value).exists(),
        "{variable}={value} does not exist"
    );
    value
}

/// The example datasets as the ConfigMap the example URIs name.
async fn create_example_data(client: &Client, ns: &str) {
    let data_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data");
    // Every file `kubectl apply -k examples/data` puts in the ConfigMap.
    let kustomization: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(data_dir.join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let names = kustomization["configMapGenerator"][0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string());
    let files: serde_json::Map<String, serde_json::Value> = names
        .map(|f| {
            let text = std::fs::read_to_string(data_dir.join(&f)).unwrap();
            (f, json!(text))
        })
        .collect();
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let map = json!({"metadata": {"name": "finetune-examples-data"}, "data": files});
    maps.create(
        &PostParams::default(),
        &serde_json::from_value(map).unwrap(),
    )
    .await
    .unwrap();
}

/// The SFT example as a short real run (8 steps, checkpoints and evaluation every 4) of the real
/// SmolLM2 on the executor node `node`.
fn short_real_job(ns: &str, model: &str, node: &str) -> FinetuneJob {
    let mut job = example_job(ns, 0);
    job.spec.base_model.uri = format!("file://{model}");
    job.spec.resources.memory = None;
    job.spec.resources.node_selector =
        [("kubernetes.io/hostname".to_string(), node.to_string())].into();
    let hp = &mut job.spec.hyperparameters;
    (
        hp.epochs,
        hp.max_steps,
        hp.batch_size,
        hp.gradient_accumulation_steps,
        hp.max_seq_length,
    ) = (None, Some(8), 2, 1, 128);
    hp.warmup_ratio = None;
    job.spec.evaluation = Some(finetune_crds::training::Evaluation {
        every_steps: Some(4),
        ..Default::default()
    });
    // The default guard would spend the short run scoring general answers: not what this tests.
    job.spec.forgetting_guard = Some(finetune_crds::training::ForgettingGuard {
        disabled: true,
        ..Default::default()
    });
    job.spec.checkpoint.every_steps = 4;
    job
}

/// Waits for `name` to succeed, showing each status to `on_status`; fails the test at once if the
/// job fails.
async fn wait_for_success(
    jobs: &Api<FinetuneJob>,
    name: &str,
    mut on_status: impl FnMut(&FinetuneJobStatus),
) -> FinetuneJobStatus {
    let (start, timeout) = (Instant::now(), Duration::from_secs(600));
    loop {
        if let Some(status) = jobs.get(name).await.ok().and_then(|job| job.status) {
            on_status(&status);
            assert_ne!(
                status.phase,
                Some(JobPhase::Failed),
                "the job failed: {:?}",
                status.conditions
            );
            if status.phase == Some(JobPhase::Succeeded) {
                eprintln!(
                    "  ok: phase Succeeded ({:.1}s)",
                    start.elapsed().as_secs_f64()
                );
                return status;
            }
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {name} to succeed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The sha256 the job's Adapter records for its weights, once it is registered.
async fn adapter_weights_digest(client: &Client, ns: &str) -> (Adapter, String) {
    let adapters: Api<Adapter> = Api::namespaced(client.clone(), ns);
    let adapter = wait_for(
        "the Adapter registered with its lineage",
        Duration::from_secs(60),
        || async {
            let adapter = adapters.get_opt("smollm2-kubectl").await.ok()??;
            adapter.status.as_ref()?.lineage.as_ref()?;
            Some(adapter)
        },
    )
    .await;
    let digest = adapter
        .status
        .as_ref()
        .unwrap()
        .files
        .iter()
        .find(|f| f.name == "adapter_model.safetensors")
        .expect("the weights' digest")
        .sha256
        .clone();
    (adapter, digest)
}

/// Real trainers share the test machine's cores: two at once each run several times slower, so
/// the tests that run one take turns.
static ONE_REAL_TRAINER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a test running the real trainer needs: a namespace with the example data, an executor
/// node that runs pods as local processes under `work`, and an operator for the namespace.
struct RealTrainerBed {
    client: Client,
    ns: String,
    model: String,
    node: String,
    work: tempfile::TempDir,
    _executor: Executor,
    _operator: Operator,
}

impl Drop for RealTrainerBed {
    /// A failed test shows the end of what each of its trainers printed: their logs live under
    /// `work`, which goes with the bed. And no trainer outlives its bed: killing the executor
    /// leaves its pods' processes running, and one left running keeps its cores and its ports
    /// (a gang's rank 0 holds the rendezvous port) from the tests after it.
    fn drop(&mut self) {
        let pods = pod_dirs(self.work.path());
        if std::thread::panicking() {
            for dir in &pods {
                print_log_tail(dir, 40);
            }
        }
        for dir in &pods {
            kill_if_still_running(dir);
        }
    }
}

/// The executor's directory of every pod it started under `work` (`pods/NAMESPACE/NAME`).
fn pod_dirs(work: &std::path::Path) -> Vec<std::path::PathBuf> {
    let entries = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
    };
    entries(&work.join("pods"))
        .flat_map(|namespace| entries(&namespace).collect::<Vec<_>>())
        .collect()
}

fn print_log_tail(pod_dir: &std::path::Path, lines: usize) {
    let log = std::fs::read_to_string(pod_dir.join("stdout.log")).unwrap_or_default();
    let all: Vec<&str> = log.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    eprintln!(
        "---- {} (last {lines} lines of its output) ----\n{tail}",
        pod_dir.display()
    );
}

/// Kills the pod's process if it still runs. The pid is only trusted while the process it names
/// still works in the pod's directory: a pid of a process that ended may have been reused.
fn kill_if_still_running(pod_dir: &std::path::Path) {
    let Some(pid) = std::fs::read_to_string(pod_dir.join("pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return;
    };
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
    if cwd.is_some() && cwd == std::fs::canonicalize(pod_dir).ok() {
        eprintln!("  killing {} (pid {pid}), still running", pod_dir.display());
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

async fn real_trainer_bed(namespace_prefix: &str, node_prefix: &str) -> RealTrainerBed {
    real_trainer_bed_with(namespace_prefix, node_prefix, |_| Vec::new()).await
}

/// [`real_trainer_bed`] with extra operator flags, chosen knowing the executor node's name.
async fn real_trainer_bed_with(
    namespace_prefix: &str,
    node_prefix: &str,
    operator_args: impl FnOnce(&str) -> Vec<String>,
) -> RealTrainerBed {
    real_trainer_bed_on(namespace_prefix, node_prefix, operator_args, &[]).await
}

/// [`real_trainer_bed_with`] on an executor node started with `executor_args` (labels, taints,
/// GPUs).
async fn real_trainer_bed_on(
    namespace_prefix: &str,
    node_prefix: &str,
    operator_args: impl FnOnce(&str) -> Vec<String>,
    executor_args: &[String],
) -> RealTrainerBed {
    let trainer = required_path("FINETUNE_TRAINER_BIN");
    let executor_bin = required_path("FINETUNE_EXECUTOR_BIN");
    let model = required_path("FINETUNE_SMOLLM2_GGUF");
    let Bed(client, ns, _, _) = Bed::new(namespace_prefix).await;
    create_example_data(&client, &ns).await;
    let work = tempfile::tempdir().unwrap();
    let node = format!("{node_prefix}-{}", std::process::id());
    let executor = start_executor(&executor_bin, &trainer, &node, work.path(), executor_args);
    let args = operator_args(&node);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let operator = start_operator_with(&ns, &args, &[]);
    RealTrainerBed {
        client,
        ns,
        model,
        node,
        work,
        _executor: executor,
        _operator: operator,
    }
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn a_real_trainer_succeeds_and_a_killed_one_resumes_to_the_same_adapter() {
    let _turn = ONE_REAL_TRAINER_AT_A_TIME.lock().await;
    let bed = real_trainer_bed("it-e2e", "executor").await;
    let (client, ns, model, node) = (bed.client.clone(), bed.ns.clone(), &bed.model, &bed.node);
    let work = &bed.work;

    let jobs: Api<FinetuneJob> = Api::namespaced(client.clone(), &ns);
    create_job(&jobs, &short_real_job(&ns, model, node)).await;

    // Progress advances while it runs, then it succeeds.
    let mut steps_seen = std::collections::BTreeSet::new();
    let status = wait_for_success(&jobs, "kubectl-sft", |status| {
        if let Some(progress) = &status.progress {
            steps_seen.insert(progress.step);
        }
    })
    .await;
    eprintln!("  progress steps observed while running: {steps_seen:?}");
    assert!(
        steps_seen.len() >= 2,
        "progress should advance while the trainer runs: {steps_seen:?}"
    );
    let metrics = status
        .metrics
        .expect("final metrics from the termination message");
    assert!(
        metrics.train_loss.is_some_and(f64::is_finite),
        "{metrics:?}"
    );
    assert_eq!(status.adapter_ref.unwrap().name, "smollm2-kubectl");
    assert!(status.latest_checkpoint.is_some_and(|c| c.step == 8));

    // The job registered its Adapter, with lineage and the trainer's file digests.
    let (adapter, weights) = adapter_weights_digest(&client, &ns).await;
    assert_eq!(adapter.spec.source.from_job.as_deref(), Some("kubectl-sft"));
    assert!(adapter.metadata.owner_references.is_none());
    let adapter_status = adapter.status.unwrap();
    assert_eq!(adapter_status.phase, Some(AdapterPhase::Ready));
    let lineage = adapter_status.lineage.unwrap();
    assert_eq!(lineage.job.as_deref(), Some("kubectl-sft"));
    assert!(lineage.dataset_digest.is_some() && lineage.metrics.is_some());
    assert_eq!(lineage.checkpoint_step, Some(8));
    assert_eq!(
        adapter
            .spec
            .expected_sha256
            .get("adapter_model.safetensors"),
        Some(&weights)
    );
    let claim_dir = work
        .path()
        .join("pvc")
        .join(&ns)
        .join("kubectl-sft-storage");
    let adapter = walk(&claim_dir)
        .into_iter()
        .find(|p| p.ends_with("adapter_model.safetensors"));
    assert!(
        adapter.is_some(),
        "no adapter_model.safetensors under {}",
        claim_dir.display()
    );
    cleanup(&client, &ns).await;

    // Chaos: the same job again, its trainer SIGKILLed once the step-4 checkpoint is written.
    // The failure is charged to backoffLimit, so the retry waits out its backoff (visible in
    // status), then resumes from that checkpoint and ends with the very same adapter.
    let ns = namespace(&client, "it-chaos").await;
    create_example_data(&client, &ns).await;
    let _operator = start_operator(&ns);
    let jobs: Api<FinetuneJob> = Api::namespaced(client.clone(), &ns);
    create_job(&jobs, &short_real_job(&ns, model, node)).await;
    wait_for_step_4_checkpoint(work.path(), &ns).await;
    let pid_file = work
        .path()
        .join("pods")
        .join(&ns)
        .join("kubectl-sft-attempt-0")
        .join("pid");
    let pid = std::fs::read_to_string(&pid_file).expect("the executor records the trainer's pid");
    let killed = Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success(), "kill -KILL {pid}");
    eprintln!(
        "  SIGKILLed the trainer (pid {}) after its step-4 checkpoint",
        pid.trim()
    );

    let backing_off = wait_for(
        "BackingOff with the next attempt's time",
        Duration::from_secs(60),
        || async {
            let status = jobs.get("kubectl-sft").await.ok()?.status?;
            status.next_retry_time.as_ref()?;
            status
                .conditions
                .iter()
                .any(|c| c.status == "True" && c.reason == "BackingOff")
                .then_some(status)
        },
    )
    .await;
    assert_eq!(backing_off.failed_attempts, 1);
    let status = wait_for_success(&jobs, "kubectl-sft", |_| {}).await;
    assert_eq!((status.failed_attempts, status.preemptions), (1, 0));
    let first = status.attempts.iter().find(|a| a.index == 0).unwrap();
    assert_eq!(first.exit_code, Some(137), "{first:?}");
    let retry = status.attempts.iter().find(|a| a.index == 1).unwrap();
    assert_eq!(retry.resumed_from_step, Some(4), "{retry:?}");
    let (_, resumed_weights) = adapter_weights_digest(&client, &ns).await;
    assert_eq!(
        resumed_weights, weights,
        "the resumed run's adapter differs from the undisturbed run's"
    );
    cleanup(&client, &ns).await;

    // Bad input: a dataset file that does not exist. The trainer exits 2 naming it, and the job
    // fails at once: no second attempt, nothing charged.
    let ns = namespace(&client, "it-invalid").await;
    create_example_data(&client, &ns).await;
    let _operator = start_operator(&ns);
    let jobs: Api<FinetuneJob> = Api::namespaced(client.clone(), &ns);
    let mut job = short_real_job(&ns, model, node);
    job.spec.dataset.train.uri = Some("configmap://finetune-examples-data/missing.jsonl".into());
    create_job(&jobs, &job).await;
    let status = wait_for("phase Failed", Duration::from_secs(120), || async {
        let status = jobs.get("kubectl-sft").await.ok()?.status?;
        (status.phase == Some(JobPhase::Failed)).then_some(status)
    })
    .await;
    let failed = status
        .conditions
        .iter()
        .find(|c| c.status == "True")
        .unwrap();
    assert_eq!(failed.reason, "InvalidInput", "{failed:?}");
    assert!(failed.message.contains("missing.jsonl"), "{failed:?}");
    assert_eq!(status.attempts.len(), 1);
    assert_eq!((status.failed_attempts, status.preemptions), (0, 0));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    assert!(
        pods.get_opt("kubectl-sft-attempt-1")
            .await
            .unwrap()
            .is_none()
    );
    cleanup(&client, &ns).await;
}

fn start_executor(
    executor_bin: &str,
    trainer: &str,
    node: &str,
    work: &std::path::Path,
    extra: &[String],
) -> Executor {
    Executor {
        child: Command::new(executor_bin)
            .args(["--node-name", node, "--default-binary", trainer])
            .arg("--work-dir")
            .arg(work)
            .args(extra)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("executor starts"),
    }
}

/// Waits until the step-4 checkpoint of `kubectl-sft` in `ns` is on its executor storage.
async fn wait_for_step_4_checkpoint(work: &std::path::Path, ns: &str) {
    let claim_dir = work.join("pvc").join(ns).join("kubectl-sft-storage");
    let deadline = Instant::now() + Duration::from_secs(600);
    while !walk(&claim_dir)
        .iter()
        .any(|p| p.ends_with("step-4/manifest.json"))
    {
        assert!(
            Instant::now() < deadline,
            "no step-4 checkpoint under {}",
            claim_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// Stands in for the kubelet of the kwok nodes, whose pods never end by themselves: every trainer
/// pod that has been Running for `after` is marked Succeeded (exit 0).
async fn complete_running_pods(pods: Api<Pod>, after: Duration) {
    loop {
        if let Ok(list) = pods.list(&ListParams::default()).await {
            for pod in list.items {
                let status = pod.status.clone().unwrap_or_default();
                let started = status.start_time.as_ref().map(|t| t.0);
                let running_long_enough = status.phase.as_deref() == Some("Running")
                    && started.is_some_and(|t| {
                        k8s_openapi::jiff::Timestamp::now()
                            .duration_since(t)
                            .as_secs_f64()
                            >= after.as_secs_f64()
                    });
                if !running_long_enough {
                    continue;
                }
                let now = k8s_openapi::jiff::Timestamp::now()
                    .strftime("%Y-%m-%dT%H:%M:%SZ")
                    .to_string();
                let done = json!({"status": {"phase": "Succeeded", "containerStatuses": [{
                    "name": "trainer", "image": "trainer", "imageID": "", "ready": false,
                    "restartCount": 0, "state": {"terminated": {
                        "exitCode": 0, "reason": "Completed",
                        "startedAt": now, "finishedAt": now}}}]}});
                let _ = pods
                    .patch_status(
                        &pod.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(done),
                    )
                    .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn the_leader_sigkilled_twenty_times_loses_no_job_and_duplicates_no_pod() {
    const JOBS: usize = 50;
    const KILLS: usize = 20;
    let Bed(client, ns, jobs, pods) = Bed::new("it-failover").await;
    let lease = "finetune-operator-failover";
    // A 3 s lease so that twenty failovers fit in a test run; each one waits it out.
    let elect = [
        "--leader-elect",
        "--leader-election-namespace",
        ns.as_str(),
        "--leader-election-lease-name",
        lease,
        "--leader-election-lease-seconds",
        "3",
        "--leader-election-renew-deadline-seconds",
        "2",
        "--leader-election-retry-seconds",
        "1",
    ];
    let mut started = 0usize;
    let mut replicas: std::collections::BTreeMap<String, Operator> = Default::default();
    let mut keep_two = |replicas: &mut std::collections::BTreeMap<String, Operator>| {
        // A replica that stepped down on its own (a missed renewal) has exited: replace it.
        replicas.retain(|_, op| matches!(op.child.try_wait(), Ok(None)));
        while replicas.len() < 2 {
            let id = format!("replica-{started}");
            started += 1;
            let op = start_operator_with(&ns, &elect, &[("POD_NAME", id.as_str())]);
            replicas.insert(id, op);
        }
    };
    keep_two(&mut replicas);

    for i in 0..JOBS {
        let name = format!("chaos-{i:02}");
        volume_for_claim(&client, &ns, &format!("{name}-storage")).await;
        let mut job = example_job(&ns, 0);
        job.metadata.name = Some(name);
        // On the kwok nodes only: a test running the real trainer may have an executor node up,
        // which would try to run these pods.
        job.spec.resources.node_selector = [("type".to_string(), "kwok".to_string())].into();
        jobs.create(&PostParams::default(), &job).await.unwrap();
    }
    let kubelet = tokio::spawn(complete_running_pods(pods.clone(), Duration::from_secs(4)));

    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &ns);
    let mut random = std::process::id() as u64 | 1;
    let mut leaders = Vec::new();
    for kill in 0..KILLS {
        // The live replica holding the lease (after a kill, the standby once it takes over).
        let deadline = Instant::now() + Duration::from_secs(60);
        let leader = loop {
            keep_two(&mut replicas);
            let holder = leases
                .get_opt(lease)
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec?.holder_identity);
            if let Some(holder) = holder.filter(|h| replicas.contains_key(h)) {
                break holder;
            }
            assert!(
                Instant::now() < deadline,
                "no live leader after kill {kill}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // A random moment of its work: 0.2 to 2.7 s after it is seen leading.
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        tokio::time::sleep(Duration::from_millis(200 + random % 2500)).await;
        drop(replicas.remove(&leader)); // SIGKILL: the lease is not released
        leaders.push(leader);
    }
    eprintln!("  SIGKILLed {KILLS} leaders in turn: {leaders:?}");
    keep_two(&mut replicas);

    // Every job ends, each with exactly the one pod of its single attempt.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let list = jobs.list(&ListParams::default()).await.unwrap();
        let done = list
            .items
            .iter()
            .filter(|j| j.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Succeeded))
            .count();
        if done == JOBS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {JOBS} jobs succeeded after the kills"
        );
        keep_two(&mut replicas);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    kubelet.abort();
    let mut names: Vec<String> = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    names.sort();
    let expected: Vec<String> = (0..JOBS)
        .map(|i| format!("chaos-{i:02}-attempt-0"))
        .collect();
    assert_eq!(names, expected, "one pod per job, none duplicated or lost");
    for job in jobs.list(&ListParams::default()).await.unwrap().items {
        let name = job.name_any();
        let attempts = job.status.unwrap().attempts;
        assert_eq!(attempts.len(), 1, "{name}: {attempts:?}");
    }
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    for i in 0..JOBS {
        let _ = volumes
            .delete(
                &format!("{ns}-chaos-{i:02}-storage"),
                &DeleteParams::background(),
            )
            .await;
    }
    cleanup(&client, &ns).await;
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn suspending_a_running_job_checkpoints_it_and_resuming_continues_from_there() {
    let _turn = ONE_REAL_TRAINER_AT_A_TIME.lock().await;
    let bed = real_trainer_bed("it-suspend", "executor-suspend").await;
    let (client, ns, model, node) = (bed.client.clone(), bed.ns.clone(), &bed.model, &bed.node);
    let work = &bed.work;

    // 12 steps and no periodic checkpoint: the only checkpoint before the end is SIGTERM's.
    let mut job = short_real_job(&ns, model, node);
    job.spec.hyperparameters.max_steps = Some(12);
    job.spec.evaluation = None;
    job.spec.checkpoint.every_steps = 1000;
    let jobs: Api<FinetuneJob> = Api::namespaced(client.clone(), &ns);
    create_job(&jobs, &job).await;
    let log = work
        .path()
        .join("pods")
        .join(&ns)
        .join("kubectl-sft-attempt-0")
        .join("stdout.log");
    wait_for(
        "the trainer at step 3",
        Duration::from_secs(300),
        || async {
            let text = std::fs::read_to_string(&log).ok()?;
            text.contains("step 3/12").then_some(())
        },
    )
    .await;

    let suspend = |on: bool| json!({"spec": {"runPolicy": {"suspend": on}}});
    jobs.patch(
        "kubectl-sft",
        &PatchParams::default(),
        &Patch::Merge(suspend(true)),
    )
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    wait_for(
        "Suspended with the trainer pod gone",
        Duration::from_secs(120),
        || async {
            let phase = job_phase(&jobs, "kubectl-sft").await;
            let pod = pods.get_opt("kubectl-sft-attempt-0").await.ok()?;
            (phase == Some(JobPhase::Suspended) && pod.is_none()).then_some(())
        },
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("SIGTERM: checkpoint"), "{text}");
    let claim_dir = work
        .path()
        .join("pvc")
        .join(&ns)
        .join("kubectl-sft-storage");
    let suspended_at: i64 = walk(&claim_dir)
        .iter()
        .filter(|p| p.ends_with("manifest.json"))
        .filter_map(|p| {
            let dir = p.parent()?.file_name()?.to_str()?;
            dir.strip_prefix("step-")?.parse().ok()
        })
        .max()
        .expect("the checkpoint written on SIGTERM");
    assert!(
        (3..12).contains(&suspended_at),
        "checkpointed at step {suspended_at}"
    );
    // Suspended stays suspended: no new attempt starts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        pods.get_opt("kubectl-sft-attempt-1")
            .await
            .unwrap()
            .is_none()
    );

    jobs.patch(
        "kubectl-sft",
        &PatchParams::default(),
        &Patch::Merge(suspend(false)),
    )
    .await
    .unwrap();
    let status = wait_for_success(&jobs, "kubectl-sft", |_| {}).await;
    let resumed = status.attempts.iter().find(|a| a.index == 1).unwrap();
    assert_eq!(resumed.resumed_from_step, Some(suspended_at), "{resumed:?}");
    assert_eq!((status.failed_attempts, status.preemptions), (0, 1));
    // Attempt 1 trained the remaining steps only.
    let resumed_log = std::fs::read_to_string(
        work.path()
            .join("pods")
            .join(&ns)
            .join("kubectl-sft-attempt-1")
            .join("stdout.log"),
    )
    .unwrap();
    let first_step = resumed_log.lines().find_map(|l| {
        l.strip_prefix("step ")?
            .split('/')
            .next()?
            .parse::<i64>()
            .ok()
    });
    assert_eq!(first_step, Some(suspended_at + 1), "{resumed_log}");
    assert!(resumed_log.contains("step 12/12"), "{resumed_log}");
    cleanup(&client, &ns).await;
}

/// A PEFT LoRA adapter directory with zero-valued `lora_A`/`lora_B` for `q_proj` of layer 0, as
/// `[rank, inputs]` / `[outputs, rank]`; `weights: false` leaves the safetensors file out.
fn write_peft_adapter(dir: &std::path::Path, inputs: usize, outputs: usize, weights: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let config = json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    if !weights {
        return;
    }
    // safetensors: an 8-byte header length, the JSON header, then the raw little-endian data.
    let prefix = "base_model.model.model.layers.0.self_attn.q_proj";
    let (a_bytes, b_bytes) = (4 * inputs * 4, outputs * 4 * 4);
    let header = json!({
        format!("{prefix}.lora_A.weight"):
            {"dtype": "F32", "shape": [4, inputs], "data_offsets": [0, a_bytes]},
        format!("{prefix}.lora_B.weight"):
            {"dtype": "F32", "shape": [outputs, 4], "data_offsets": [a_bytes, a_bytes + b_bytes]},
    })
    .to_string();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header.as_bytes());
    file.extend(std::iter::repeat_n(0u8, a_bytes + b_bytes));
    std::fs::write(dir.join("adapter_model.safetensors"), file).unwrap();
}

fn sha256_hex(path: &std::path::Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(std::fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn registered_adapters_are_verified_by_a_pod_or_say_why_not() {
    let bed = real_trainer_bed_with("it-adapters", "verifier", |node| {
        vec![format!(
            "--verification-node-selector=kubernetes.io/hostname={node}"
        )]
    })
    .await;
    let (client, ns) = (bed.client.clone(), bed.ns.clone());
    // Not under /tmp: a pod's /tmp is its scratch volume, which hides the host's.
    let files = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let work = files.path();
    // SmolLM2-135M: hidden size 576, q_proj 576 → 576. "other" was made for a 64-wide model.
    write_peft_adapter(&work.join("good"), 576, 576, true);
    write_peft_adapter(&work.join("no-weights"), 576, 576, false);
    write_peft_adapter(&work.join("other"), 64, 64, true);
    let weights_sha = sha256_hex(&work.join("good/adapter_model.safetensors"));

    let adapters: Api<Adapter> = Api::namespaced(client.clone(), &ns);
    let register = |name: &str, dir: &str, expected: serde_json::Value| {
        let adapter = json!({
            "apiVersion": "finetune.dev/v1alpha1", "kind": "Adapter",
            "metadata": {"name": name},
            "spec": {
                "baseModel": {"uri": format!("file://{}", bed.model)},
                "source": {"uri": format!("file://{}", work.join(dir).display())},
                "lora": {"rank": 4, "alpha": 8.0, "targetModules": ["q_proj"]},
                "expectedSha256": expected,
            }
        });
        serde_json::from_value::<Adapter>(adapter).unwrap()
    };
    for adapter in [
        register(
            "good",
            "good",
            json!({"adapter_model.safetensors": weights_sha}),
        ),
        register("no-weights", "no-weights", json!({})),
        register("other-base", "other", json!({})),
        register(
            "tampered",
            "good",
            json!({"adapter_model.safetensors": "0".repeat(64)}),
        ),
    ] {
        adapters
            .create(&PostParams::default(), &adapter)
            .await
            .expect("adapter accepted");
    }
    let started = Instant::now();
    let settled = |name: &'static str| {
        let adapters = adapters.clone();
        async move {
            wait_for(
                &format!("Adapter {name} to be Ready or Failed"),
                Duration::from_secs(120),
                || async {
                    let adapter = adapters.get(name).await.ok()?;
                    let status = adapter.status?;
                    matches!(
                        status.phase,
                        Some(AdapterPhase::Ready | AdapterPhase::Failed)
                    )
                    .then_some(status)
                },
            )
            .await
        }
    };
    let verified_condition = |status: &finetune_crds::AdapterStatus| {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Verified")
            .expect("a Verified condition")
            .clone();
        (c.status, c.reason, c.message)
    };

    let good = settled("good").await;
    eprintln!(
        "  good: {:?} in {:.1}s, {:?}",
        good.phase,
        started.elapsed().as_secs_f64(),
        verified_condition(&good)
    );
    assert_eq!(good.phase, Some(AdapterPhase::Ready));
    let (status, reason, message) = verified_condition(&good);
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Verified"));
    assert!(
        message.contains("fit the base model (30 layers, hidden size 576)"),
        "{message}"
    );
    let weights = good
        .files
        .iter()
        .find(|f| f.name == "adapter_model.safetensors")
        .expect("the weights are listed");
    assert_eq!(weights.sha256, weights_sha);
    assert!(
        good.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );

    let expectations = [
        (
            "no-weights",
            "FileMissing",
            "adapter_model.safetensors is missing",
        ),
        (
            "other-base",
            "BaseModelMismatch",
            "adapter for another base model",
        ),
        (
            "tampered",
            "DigestMismatch",
            "but spec.expectedSha256 says 0000",
        ),
    ];
    for (name, want_reason, want_message) in expectations {
        let status = settled(name).await;
        let (condition, reason, message) = verified_condition(&status);
        eprintln!("  {name}: {:?} {reason}: {message}", status.phase);
        assert_eq!(status.phase, Some(AdapterPhase::Failed), "{name}");
        assert_eq!(
            (condition.as_str(), reason.as_str()),
            ("False", want_reason),
            "{name}"
        );
        assert!(message.contains(want_message), "{name}: {message}");
        let source = format!("file://{}/", work.display());
        assert!(
            message.starts_with(&source),
            "the message names the URI: {message}"
        );
    }

    // The verified adapter's pod goes; a failed one stays for its logs, with a Warning Event.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    wait_for(
        "the verified pod to be deleted",
        Duration::from_secs(30),
        || async {
            pods.get_opt("good-verify-1")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
    let kept = pods
        .get("other-base-verify-1")
        .await
        .expect("the failed pod is kept");
    assert_eq!(kept.status.unwrap().phase.as_deref(), Some("Failed"));
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let warning = wait_for(
        "a VerificationFailed event",
        Duration::from_secs(30),
        || async {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("VerificationFailed")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some("no-weights")
                })
        },
    )
    .await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert!(
        warning
            .note
            .unwrap_or_default()
            .starts_with("FileMissing: ")
    );

    // Fixing the files and editing the spec verifies the new generation.
    write_peft_adapter(&work.join("no-weights"), 576, 576, true);
    adapters
        .patch(
            "no-weights",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"lora": {"alpha": 8.5}}})),
        )
        .await
        .unwrap();
    let mismatch = wait_for(
        "generation 2 to be verified",
        Duration::from_secs(120),
        || async {
            let status = adapters.get("no-weights").await.ok()?.status?;
            (status.observed_generation == Some(2)
                && matches!(
                    status.phase,
                    Some(AdapterPhase::Ready | AdapterPhase::Failed)
                ))
            .then_some(status)
        },
    )
    .await;
    let (_, reason, message) = verified_condition(&mismatch);
    assert_eq!(reason, "LoraMismatch", "{message}");
    assert!(
        message.contains("lora_alpha = 8 but spec.lora.alpha is 8.5"),
        "{message}"
    );
    assert!(
        pods.get_opt("no-weights-verify-1").await.unwrap().is_none(),
        "the first generation's pod is replaced"
    );
    cleanup(&client, &ns).await;
}

/// The local Hub of tests/hub/server.py (olah behind an nginx that wants `token`), run as a
/// child process for one test.
struct LocalHub {
    child: Child,
    endpoint: String,
    access_log: std::path::PathBuf,
    repo: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl LocalHub {
    fn start(token: &str) -> LocalHub {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready.json");
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/hub/server.py");
        let child = Command::new("python")
            .arg(script)
            .args(["serve", "--token", token, "--ready-file"])
            .arg(&ready)
            .spawn()
            .expect("python runs tests/hub/server.py (the venv is on PATH under make)");
        let deadline = Instant::now() + Duration::from_secs(600);
        let info: serde_json::Value = loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                break serde_json::from_str(&text).unwrap();
            }
            assert!(Instant::now() < deadline, "the local Hub did not start");
            std::thread::sleep(Duration::from_millis(200));
        };
        let field = |k: &str| info[k].as_str().unwrap().to_string();
        LocalHub {
            child,
            endpoint: field("endpoint"),
            access_log: field("access_log").into(),
            repo: field("repo").into(),
            _dir: dir,
        }
    }

    /// The paths of the file downloads (`resolve`) the gateway let through so far.
    fn downloads(&self) -> Vec<String> {
        let log = std::fs::read_to_string(&self.access_log).unwrap_or_default();
        log.lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                let ok = fields.get(2).is_some_and(|s| s.starts_with('2'));
                (ok && fields[1].contains("/resolve/")).then(|| fields[1].to_string())
            })
            .collect()
    }

    fn head_commit(&self) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(&self.repo)
            .args(["rev-parse", "HEAD"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

impl Drop for LocalHub {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// `examples/full-finetune.yaml` selects an H100 node. The shared kwok nodes are A100s
/// (tests/cluster/nodes.sh), so each test that runs the example offers one H100 node of its own
/// (a kwok node, or the executor that really runs it), and those tests take turns, with the Kueue
/// test, whose executors offer GPUs too.
static ONE_H100_NODE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const H100: &str = "NVIDIA-H100-80GB-HBM3";

/// Deletes every H100-labelled node but `keep`, and every executor node that offers GPUs (the
/// Kueue test's): ones an earlier test or run left behind (an executor's stays NotReady, yet
/// schedulable for a while) would catch an example's pod. The tests that start such executors take
/// [`ONE_H100_NODE_AT_A_TIME`] too, so none is deleted while in use.
async fn offer_only_this_h100_node(client: &Client, keep: &str) {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    for node in nodes.list(&ListParams::default()).await.unwrap() {
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let h100 = labels.get("nvidia.com/gpu.product").map(String::as_str) == Some(H100);
        // Every executor advertises `nvidia.com/gpu`, most of them "0".
        let offers_gpus = node
            .status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .and_then(|a| a.get("nvidia.com/gpu"))
            .is_some_and(|q| q.0 != "0");
        let shared = labels.get("type").map(String::as_str) == Some("kwok");
        if node.name_any() != keep && (h100 || (offers_gpus && !shared)) {
            let _ = nodes
                .delete(&node.name_any(), &DeleteParams::default())
                .await;
        }
    }
}

/// A kwok-managed fake node with 8 H100s, as tests/cluster/nodes.sh makes the A100 ones.
async fn create_kwok_h100_node(client: &Client, name: &str) {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let capacity = json!({"cpu": "64", "memory": "512Gi", "pods": "110",
        "ephemeral-storage": "1Ti", "nvidia.com/gpu": "8"});
    let node = json!({
        "metadata": {"name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"type": "kwok", "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": H100}},
        // Tainted for GPU work, as the example's H100 is: only a pod that tolerates it (the
        // example's) lands here, so another test's pods never sit on a node a later test deletes.
        "spec": {"taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]},
        "status": {"capacity": capacity, "allocatable": capacity},
    });
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(node).unwrap(),
        )
        .await
        .expect("H100 node created");
    wait_for(
        "the kwok H100 node to be Ready",
        Duration::from_secs(60),
        || async {
            let node = nodes.get(name).await.ok()?;
            let conditions = node.status?.conditions?;
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn the_full_finetune_example_runs_as_written_against_the_hub_mirror() {
    let _turn = ONE_REAL_TRAINER_AT_A_TIME.lock().await;
    let _h100 = ONE_H100_NODE_AT_A_TIME.lock().await;
    let token = "hf_cluster_test_token_full";
    let hub = LocalHub::start(token);
    let endpoint = hub.endpoint.clone();
    // The node the example asks for: an H100 (by label), tainted for GPU work, one GPU. The
    // trainer runs on its CPU (no CUDA here), as `device: auto` does.
    let node_args = [
        format!("--label=nvidia.com/gpu.product={H100}"),
        "--taint=nvidia.com/gpu:NoSchedule".into(),
        "--gpus=1".into(),
    ];
    let bed = real_trainer_bed_on(
        "it-full",
        "executor-h100",
        |_| vec![format!("--hf-endpoint={endpoint}")],
        &node_args,
    )
    .await;
    let (client, ns) = (bed.client.clone(), bed.ns.clone());
    // What the example expects to exist: its token Secret, its PriorityClass, the example data
    // (the bed's ConfigMap), a volume for its storage claim.
    create_secret(&client, &ns, "hf-token", json!({"token": token})).await;
    create_example_priority_class(&client).await;
    volume_for_claim(&client, &ns, "smollm2-full-instruct-storage").await;
    offer_only_this_h100_node(&client, &bed.node).await;

    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/full-finetune.yaml");
    let job: FinetuneJob = parse_manifest(
        &std::fs::read_to_string(path).unwrap(),
        "full-finetune.yaml",
    )
    .unwrap();
    let jobs: Api<FinetuneJob> = Api::namespaced(client.clone(), &ns);
    create_job(&jobs, &job).await;
    let name = "smollm2-full-instruct";
    wait_for(
        "the suspended example to say so",
        Duration::from_secs(60),
        || async {
            let status = jobs.get(name).await.ok()?.status?;
            (status.phase == Some(JobPhase::Suspended)).then_some(())
        },
    )
    .await;
    // Admission: what Kueue does to a job it admits from `gpu-queue` (it unsuspends it).
    let admit = json!({"spec": {"runPolicy": {"suspend": false}}});
    jobs.patch(name, &PatchParams::default(), &Patch::Merge(&admit))
        .await
        .unwrap();
    let status = wait_for_success(&jobs, name, |_| {}).await;
    assert_eq!(
        status.base_model_commit.as_deref(),
        Some(hub.head_commit().as_str())
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = pods.get(&format!("{name}-attempt-0")).await.unwrap();
    assert_eq!(
        pod.spec.unwrap().node_name.as_deref(),
        Some(bed.node.as_str()),
        "the example ran on the node it selects"
    );
    let adapters: Api<Adapter> = Api::namespaced(client.clone(), &ns);
    let adapter = wait_for("the example's Adapter", Duration::from_secs(60), || async {
        adapters.get_opt(name).await.ok()??.status
    })
    .await;
    let files: Vec<&str> = adapter.files.iter().map(|f| f.name.as_str()).collect();
    eprintln!("  files: {files:?}");
    for wanted in ["model.safetensors", "model-q8_0.gguf"] {
        assert!(files.contains(&wanted), "{wanted} not in {files:?}");
    }
    cleanup(&client, &ns).await;
}

/// The short real job on an `hf://` base read through the token in Secret `secret`.
fn hub_job(bed: &RealTrainerBed, name: &str, secret: &str) -> FinetuneJob {
    let mut job = short_real_job(&bed.ns, &bed.model, &bed.node);
    job.metadata.name = Some(name.into());
    job.spec.output.adapter_name = Some(format!("{name}-adapter"));
    job.spec.base_model.uri = "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main".into();
    job.spec.base_model.format = finetune_crds::model::ModelFormat::Safetensors;
    job.spec.base_model.token_secret_ref = Some(finetune_crds::model::SecretKeyRef {
        name: secret.into(),
        key: "token".into(),
    });
    job.spec.hyperparameters.max_steps = Some(2);
    job.spec.checkpoint.every_steps = 2;
    job.spec.evaluation = None;
    job
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn an_hf_base_is_downloaded_once_through_the_mirror_and_its_commit_kept() {
    let _turn = ONE_REAL_TRAINER_AT_A_TIME.lock().await;
    let token = "hf_cluster_test_token_1";
    let hub = LocalHub::start(token);
    let endpoint = hub.endpoint.clone();
    let bed = real_trainer_bed_with("it-hub", "executor-hub", |_| {
        vec![
            format!("--hf-endpoint={endpoint}"),
            "--model-cache-claim=model-cache".into(),
        ]
    })
    .await;
    let (client, ns) = (bed.client.clone(), bed.ns.clone());
    for (name, value) in [("hf-token", token), ("hf-wrong", "hf_not_the_token")] {
        create_secret(&client, &ns, name, json!({"token": value})).await;
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let claim = json!({"metadata": {"name": "model-cache"}, "spec": {
        "accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "10Gi"}}}});
    let claim = serde_json::from_value(claim).unwrap();
    claims.create(&PostParams::default(), &claim).await.unwrap();
    bind_claim(&client, &ns, "model-cache").await;
    for job in ["hub-first", "hub-second", "hub-wrong"] {
        volume_for_claim(&client, &ns, &format!("{job}-storage")).await;
    }
    let jobs: Api<FinetuneJob> = Api::namespaced(client.clone(), &ns);

    // The first job downloads through the mirror, showing the bytes while it does.
    create_job(&jobs, &hub_job(&bed, "hub-first", "hf-token")).await;
    let mut downloading = None;
    let status = wait_for_success(&jobs, "hub-first", |status| {
        let running = status.conditions.iter().find(|c| c.type_ == "Running");
        if let Some(c) = running.filter(|c| c.reason == "Downloading") {
            downloading = Some(c.message.clone());
        }
    })
    .await;
    eprintln!("  Downloading condition seen: {downloading:?}");
    assert!(
        downloading.is_some_and(|m| m.contains(" of ") && m.contains("MiB")),
        "status never said Downloading with the bytes"
    );
    let commit = hub.head_commit();
    assert_eq!(status.base_model_commit.as_deref(), Some(commit.as_str()));
    let weights = |d: &Vec<String>| {
        d.iter()
            .filter(|p| p.ends_with("/model.safetensors"))
            .count()
    };
    let after_first = hub.downloads();
    assert_eq!(weights(&after_first), 1, "{after_first:?}");
    let adapters: Api<Adapter> = Api::namespaced(client.clone(), &ns);
    let lineage = wait_for("the Adapter's lineage", Duration::from_secs(60), || async {
        adapters
            .get_opt("hub-first-adapter")
            .await
            .ok()??
            .status?
            .lineage
    })
    .await;
    assert_eq!(lineage.base_model_commit.as_deref(), Some(commit.as_str()));

    // A second job on the same base finds it in the shared cache: no file is downloaded again.
    create_job(&jobs, &hub_job(&bed, "hub-second", "hf-token")).await;
    let status = wait_for_success(&jobs, "hub-second", |_| {}).await;
    assert_eq!(status.base_model_commit.as_deref(), Some(commit.as_str()));
    assert_eq!(
        hub.downloads(),
        after_first,
        "the second job downloaded again"
    );

    // A wrong token: refused at once, naming the Secret, and not retried.
    create_job(&jobs, &hub_job(&bed, "hub-wrong", "hf-wrong")).await;
    assert_refused_naming_the_secret(&jobs, "hub-wrong", "hf-wrong", "hf_not_the_token").await;
    cleanup(&client, &ns).await;
}

/// versitygw (an S3-compatible server built by tests/cluster/build.sh) on a free local port,
/// serving the directories under a temporary root as buckets.
struct LocalS3 {
    child: Child,
    endpoint: String,
    root: tempfile::TempDir,
}

impl LocalS3 {
    const ACCESS_KEY: &'static str = "finetune-cluster-test";
    const SECRET_KEY: &'static str = "finetune-cluster-test-secret";

    fn start() -> LocalS3 {
        let bin = std::env::var_os("FINETUNE_VERSITYGW_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                let cache = std::env::var_os("FINETUNE_CACHE")
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(|| {
                        std::path::PathBuf::from(std::env::var_os("HOME").unwrap())
                            .join(".cache/finetune-operator")
                    });
                cache.join("cluster/bin/versitygw")
            });
        assert!(
            bin.is_file(),
            "{} is missing: run tests/cluster/build.sh versitygw",
            bin.display()
        );
        // Not under /tmp: pods see their own scratch /tmp.
        let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args(["--port", &format!("127.0.0.1:{port}"), "posix"])
            .arg(root.path())
            .env("ROOT_ACCESS_KEY", Self::ACCESS_KEY)
            .env("ROOT_SECRET_KEY", Self::SECRET_KEY)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("versitygw starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "versitygw did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        LocalS3 {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            root,
        }
    }

    /// The bucket's directory (created).
    fn bucket(&self, name: &str) -> std::path::PathBuf {
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `spec.s3` for this store with the keys in Secret `secret`.
    fn access(&self, secret: &str) -> finetune_crds::s3::S3Access {
        finetune_crds::s3::S3Access {
            endpoint: Some(self.endpoint.clone()),
            region: None,
            credentials_secret_ref: Some(finetune_crds::s3::SecretName {
                name: secret.into(),
            }),
        }
    }
}

impl Drop for LocalS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn an_s3_dataset_and_output_round_trip_and_the_adapter_registered_from_it_verifies() {
    let _turn = ONE_REAL_TRAINER_AT_A_TIME.lock().await;
    let store = LocalS3::start();
    let data = store.bucket("team-data").join("chat");
    std::fs::create_dir_all(&data).unwrap();
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data");
    std::fs::copy(examples.join("chat-train.jsonl"), data.join("train.jsonl")).unwrap();
    let results = store.bucket("team-results");
    let bed = real_trainer_bed_with("it-s3", "executor-s3", |node| {
        vec![format!(
            "--verification-node-selector=kubernetes.io/hostname={node}"
        )]
    })
    .await;
    let (client, ns) = (bed.client.clone(), bed.ns.clone());
    for (name, key) in [
        ("s3-credentials", LocalS3::SECRET_KEY),
        ("s3-wrong", "not-the-key"),
    ] {
        let keys = json!({"AWS_ACCESS_KEY_ID": LocalS3::ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": key});
        create_secret(&client, &ns, name, keys).await;
    }
    for job in ["s3-sft", "s3-wrong"] {
        volume_for_claim(&client, &ns, &format!("{job}-storage")).await;
    }
    let s3_job = |name: &str, secret: &str| {
        let mut job = short_real_job(&ns, &bed.model, &bed.node);
        job.metadata.name = Some(name.into());
        job.spec.output.adapter_name = Some(format!("{name}-adapter"));
        job.spec.dataset.train.uri = Some("s3://team-data/chat/train.jsonl".into());
        job.spec.dataset.eval = None;
        job.spec.dataset.eval_split = Some(0.2);
        job.spec.output.uri = Some(format!("s3://team-results/runs/{name}"));
        job.spec.s3 = Some(store.access(secret));
        job.spec.hyperparameters.max_steps = Some(4);
        job.spec.evaluation = None;
        job
    };
    let jobs: Api<FinetuneJob> = Api::namespaced(client.clone(), &ns);

    // The job reads its data from the bucket and uploads its results, manifest last.
    create_job(&jobs, &s3_job("s3-sft", "s3-credentials")).await;
    wait_for_success(&jobs, "s3-sft", |_| {}).await;
    let uploaded = results.join("runs/s3-sft");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(uploaded.join("finetune-manifest.json")).unwrap())
            .unwrap();
    let listed: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    eprintln!("  uploaded: {listed:?}");
    assert!(listed.contains(&"adapter_model.safetensors"), "{listed:?}");
    let adapters: Api<Adapter> = Api::namespaced(client.clone(), &ns);
    let produced = wait_for("the job's Adapter", Duration::from_secs(60), || async {
        adapters.get_opt("s3-sft-adapter").await.ok()??.status
    })
    .await;
    let expected: serde_json::Map<String, serde_json::Value> = produced
        .files
        .iter()
        .map(|f| (f.name.clone(), json!(f.sha256)))
        .collect();
    assert!(expected.contains_key("adapter_model.safetensors"));

    // An Adapter registered from the uploaded prefix: its pod downloads and verifies it.
    let adapter = json!({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "Adapter",
        "metadata": {"name": "from-s3"},
        "spec": {
            "baseModel": {"uri": format!("file://{}", bed.model)},
            "source": {"uri": "s3://team-results/runs/s3-sft"},
            "s3": serde_json::to_value(store.access("s3-credentials")).unwrap(),
            "expectedSha256": expected,
        }
    });
    adapters
        .create(
            &PostParams::default(),
            &serde_json::from_value(adapter).unwrap(),
        )
        .await
        .expect("adapter accepted");
    let verified = wait_for(
        "Adapter from-s3 to settle",
        Duration::from_secs(180),
        || async {
            let status = adapters.get("from-s3").await.ok()?.status?;
            matches!(
                status.phase,
                Some(AdapterPhase::Ready | AdapterPhase::Failed)
            )
            .then_some(status)
        },
    )
    .await;
    let condition = verified
        .conditions
        .iter()
        .find(|c| c.type_ == "Verified")
        .unwrap();
    eprintln!("  from-s3: {:?}: {}", verified.phase, condition.message);
    assert_eq!(
        verified.phase,
        Some(AdapterPhase::Ready),
        "{}",
        condition.message
    );
    assert!(
        condition.message.contains("fit the base model"),
        "{}",
        condition.message
    );

    // Wrong keys: refused at once naming the Secret, not retried.
    create_job(&jobs, &s3_job("s3-wrong", "s3-wrong")).await;
    assert_refused_naming_the_secret(&jobs, "s3-wrong", "s3-wrong", "not-the-key").await;
    cleanup(&client, &ns).await;
}

/// Waits for job `name` to fail with `InvalidInput` naming Secret `secret`, after one attempt
/// (a refusal is not retried) and without `value`, the Secret's content, in the message.
async fn assert_refused_naming_the_secret(
    jobs: &Api<FinetuneJob>,
    name: &str,
    secret: &str,
    value: &str,
) {
    let failed = wait_for(
        &format!("{name} to be refused"),
        Duration::from_secs(120),
        || async {
            let status = jobs.get(name).await.ok()?.status?;
            (status.phase == Some(JobPhase::Failed)).then_some(status)
        },
    )
    .await;
    let reason = failed
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap();
    assert_eq!(reason.reason, "InvalidInput", "{}", reason.message);
    assert!(
        reason.message.contains(&format!("Secret `{secret}`")),
        "{}",
        reason.message
    );
    assert!(!reason.message.contains(value), "{}", reason.message);
    assert_eq!(failed.attempts.len(), 1, "{:?}", failed.attempts);
}

/// A `nodes: 2` job on two executor nodes: rank 0 starts first, rank 1 meets it at its loopback
/// pod IP on the other node, and the gang trains. Deleting rank 1's pod mid-run is a preemption
/// of the whole gang (no charge): rank 0 checkpoints and stops, the next attempt starts both
/// members again from that checkpoint, and the job succeeds with its adapter.
#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn a_two_node_gang_trains_on_two_nodes_and_a_deleted_member_preempts_it_whole() {
    let _turn = ONE_REAL_TRAINER_AT_A_TIME.lock().await;
    let gang_label = format!("finetune.dev/gang-test={}", std::process::id());
    let (bed, _second) = two_node_bed("it-gang", "executor-gang", &gang_label, &[]).await;
    let (client, ns, model) = (bed.client.clone(), bed.ns.clone(), &bed.model);

    let mut job = short_real_job(&ns, model, &bed.node);
    let (key, value) = gang_label.split_once('=').unwrap();
    job.spec.resources.node_selector = [(key.to_string(), value.to_string())].into();
    job.spec.resources.nodes = 2;
    let jobs: Api<FinetuneJob> = Api::namespaced(client.clone(), &ns);
    create_job(&jobs, &job).await;

    // Both members run, on two nodes, at two addresses.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let members = [
        "kubectl-sft-attempt-0-rank-0",
        "kubectl-sft-attempt-0-rank-1",
    ];
    let deadline = Instant::now() + Duration::from_secs(300);
    let running = loop {
        let mut found = Vec::new();
        for name in members {
            if let Some(pod) = pods.get_opt(name).await.unwrap() {
                let status = pod.status.clone().unwrap_or_default();
                if status.phase.as_deref() == Some("Running") {
                    found.push(pod);
                }
            }
        }
        if found.len() == 2 {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "the gang's members never both ran"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let nodes: std::collections::BTreeSet<_> = running
        .iter()
        .map(|p| p.spec.as_ref().unwrap().node_name.clone().unwrap())
        .collect();
    assert_eq!(nodes.len(), 2, "members share a node: {nodes:?}");
    let rank_zero_ip = running[0].status.as_ref().unwrap().pod_ip.clone().unwrap();
    let rank_one_env = &running[1].spec.as_ref().unwrap().containers[0].env;
    let master = rank_one_env
        .iter()
        .flatten()
        .find(|e| e.name == "MASTER_ADDR")
        .and_then(|e| e.value.clone());
    assert_eq!(master, Some(rank_zero_ip.clone()));
    assert!(rank_zero_ip.starts_with("127."), "{rank_zero_ip}");

    // Once the step-4 checkpoint is written, rank 1's pod is deleted (a drain, say).
    wait_for_step_4_checkpoint(bed.work.path(), &ns).await;
    pods.delete(members[1], &DeleteParams::default())
        .await
        .unwrap();
    eprintln!("  deleted {} after the step-4 checkpoint", members[1]);

    let status = wait_for_success(&jobs, "kubectl-sft", |_| {}).await;
    assert_eq!(
        (status.preemptions, status.failed_attempts),
        (1, 0),
        "{:?}",
        status.attempts
    );
    let first = &status.attempts[0];
    assert_eq!(first.reason.as_deref(), Some("Preempted"), "{first:?}");
    let first_nodes: std::collections::BTreeSet<_> = first
        .members
        .iter()
        .filter_map(|m| m.node_name.clone())
        .collect();
    assert_eq!(first_nodes.len(), 2, "{first:?}");
    let second_attempt = status.attempts.last().unwrap();
    assert_eq!(second_attempt.index, 1);
    assert_eq!(second_attempt.members.len(), 2, "{second_attempt:?}");
    assert!(
        second_attempt.resumed_from_step.is_some_and(|s| s >= 4),
        "{second_attempt:?}"
    );
    assert!(status.latest_checkpoint.is_some_and(|c| c.step == 8));
    let (adapter, _) = adapter_weights_digest(&client, &ns).await;
    assert_eq!(adapter.spec.source.from_job.as_deref(), Some("kubectl-sft"));
    cleanup(&client, &ns).await;
}

/// [`real_trainer_bed_on`] with a second executor node: both labelled `label` (`KEY=VALUE`) and
/// started with `executor_args`, sharing one work directory (their "storage") with distinct
/// loopback pod IPs.
async fn two_node_bed(
    namespace_prefix: &str,
    node_prefix: &str,
    label: &str,
    executor_args: &[String],
) -> (RealTrainerBed, Executor) {
    let mut args = vec!["--label".to_string(), label.to_string()];
    args.extend_from_slice(executor_args);
    let first = format!("{node_prefix}-a");
    let bed = real_trainer_bed_on(namespace_prefix, &first, |_| Vec::new(), &args).await;
    let second = format!("{node_prefix}-b-{}", std::process::id());
    args.extend(["--pod-ip-prefix".to_string(), "127.0.1".to_string()]);
    let executor = start_executor(
        &required_path("FINETUNE_EXECUTOR_BIN"),
        &required_path("FINETUNE_TRAINER_BIN"),
        &second,
        bed.work.path(),
        &args,
    );
    (bed, executor)
}

/// Kueue (v0.19, built from its module, run by `make test-cluster`) admits a gang whole: with a
/// ClusterQueue whose GPU quota holds one member, a `nodes: 2` job stays Queued with Kueue's
/// reason in its status and no member runs; once the quota holds both, the gang runs and
/// succeeds.
#[tokio::test]
#[ignore = "needs the control plane: run `make test-cluster`"]
async fn kueue_admits_a_gang_whole_or_not_at_all() {
    let _turn = ONE_REAL_TRAINER_AT_A_TIME.lock().await;
    // Its executors offer GPUs, which the examples' pods could take (and which
    // offer_only_this_h100_node deletes): they take turns.
    let _gpu_nodes = ONE_H100_NODE_AT_A_TIME.lock().await;
    let pid = std::process::id();
    let label = format!("finetune.dev/kueue-test={pid}");
    let gpus = ["--gpus=1".to_string()];
    let (bed, _second) = two_node_bed("it-kueue", "executor-kueue", &label, &gpus).await;
    let (client, ns, model) = (bed.client.clone(), bed.ns.clone(), &bed.model);
    // The namespaces Kueue manages here are labelled so (tests/cluster/kueue.sh).
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let managed = json!({"metadata": {"labels": {"finetune.dev/kueue": "enabled"}}});
    namespaces
        .patch(&ns, &PatchParams::default(), &Patch::Merge(managed))
        .await
        .unwrap();
    let (flavor, queue) = (format!("gang-flavor-{pid}"), format!("gang-cq-{pid}"));
    let kueue = |kind: &str, plural: &str| {
        let gvk = kube::api::GroupVersionKind::gvk("kueue.x-k8s.io", "v1beta2", kind);
        kube::api::ApiResource::from_gvk_with_plural(&gvk, plural)
    };
    let flavors: Api<kube::api::DynamicObject> =
        Api::all_with(client.clone(), &kueue("ResourceFlavor", "resourceflavors"));
    let cluster_queues: Api<kube::api::DynamicObject> =
        Api::all_with(client.clone(), &kueue("ClusterQueue", "clusterqueues"));
    let local_queues: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &kueue("LocalQueue", "localqueues"));
    let apply = PatchParams::apply("kueue-test").force();
    let cluster_queue = |gpus: i32| {
        json!({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue",
               "metadata": {"name": queue},
               "spec": {"namespaceSelector": {}, "resourceGroups": [{
                   "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                   "flavors": [{"name": flavor, "resources": [
                       {"name": "cpu", "nominalQuota": 64},
                       {"name": "memory", "nominalQuota": "512Gi"},
                       {"name": "nvidia.com/gpu", "nominalQuota": gpus}]}]}]}})
    };
    flavors
        .patch(
            &flavor,
            &apply,
            &Patch::Apply(json!({"apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "ResourceFlavor", "metadata": {"name": flavor}})),
        )
        .await
        .expect("Kueue's CRDs are installed (tests/cluster/kueue.sh)");
    cluster_queues
        .patch(&queue, &apply, &Patch::Apply(cluster_queue(1)))
        .await
        .unwrap();
    local_queues
        .patch(
            "gang-queue",
            &apply,
            &Patch::Apply(
                json!({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
                "metadata": {"name": "gang-queue", "namespace": ns},
                "spec": {"clusterQueue": queue}}),
            ),
        )
        .await
        .unwrap();

    let mut job = short_real_job(&ns, model, &bed.node);
    let (key, value) = label.split_once('=').unwrap();
    job.spec.resources.node_selector = [(key.to_string(), value.to_string())].into();
    (job.spec.resources.nodes, job.spec.resources.gpus) = (2, 1);
    // Admission is what this tests; the gang test above covers training and resume.
    job.spec.hyperparameters.max_steps = Some(2);
    job.spec.evaluation = None;
    job.metadata.labels = Some(
        [(
            "kueue.x-k8s.io/queue-name".to_string(),
            "gang-queue".to_string(),
        )]
        .into(),
    );
    let jobs: Api<FinetuneJob> = Api::namespaced(client.clone(), &ns);
    create_job(&jobs, &job).await;

    // Queued, in Kueue's words, and nothing of the gang runs.
    let queued = wait_for(
        "the gang to be Queued with Kueue's reason",
        Duration::from_secs(120),
        || async {
            let status = jobs.get("kubectl-sft").await.ok()?.status?;
            let condition = status.conditions.iter().find(|c| c.type_ == "Queued")?;
            (condition.status == "True" && condition.message.contains("insufficient"))
                .then(|| condition.message.clone())
        },
    )
    .await;
    eprintln!("  queued: {queued}");
    assert!(queued.contains("nvidia.com/gpu"), "{queued}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for _ in 0..10 {
        let listed = pods.list(&ListParams::default()).await.unwrap();
        let trainers: Vec<_> = listed
            .items
            .iter()
            .filter(|p| p.name_any().starts_with("kubectl-sft-attempt-0"))
            .collect();
        assert_eq!(trainers.len(), 1, "only rank 0 exists while queued");
        let phase = trainers[0].status.as_ref().and_then(|s| s.phase.clone());
        assert_eq!(
            phase.as_deref(),
            Some("Pending"),
            "a member ran while queued"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The quota holds both members: Kueue admits the gang, which runs whole and succeeds.
    cluster_queues
        .patch(&queue, &apply, &Patch::Apply(cluster_queue(2)))
        .await
        .unwrap();
    let status = wait_for_success(&jobs, "kubectl-sft", |_| {}).await;
    let attempt = &status.attempts[0];
    assert_eq!(status.attempts.len(), 1, "{:?}", status.attempts);
    let nodes: std::collections::BTreeSet<_> = attempt
        .members
        .iter()
        .filter_map(|m| m.node_name.clone())
        .collect();
    assert_eq!(nodes.len(), 2, "{attempt:?}");
    cleanup(&client, &ns).await;
    let _ = cluster_queues
        .delete(&queue, &DeleteParams::default())
        .await;
    let _ = flavors.delete(&flavor, &DeleteParams::default()).await;
}
