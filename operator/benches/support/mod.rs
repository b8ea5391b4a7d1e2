//! What the operator benchmarks share: the bench namespace with one bound storage claim, the
//! job they create, the operator process, and its memory and CPU from /proc.
#![allow(dead_code)]

use finetune_crds::{FinetuneJob, parse_manifest};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim};
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;

/// Where the benchmarks create their jobs.
pub const NAMESPACE: &str = "bench";

/// Starts the operator binary watching [`NAMESPACE`], quiet.
pub fn start_operator(operator_bin: &str) -> std::process::Child {
    std::process::Command::new(operator_bin)
        .args([
            "run",
            "--namespace",
            NAMESPACE,
            "--http-addr",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        // Its warnings (failed reconciles) go to BENCH_OPERATOR_LOG when set.
        .stdout(match std::env::var_os("BENCH_OPERATOR_LOG") {
            Some(path) => std::fs::File::create(path).expect("operator log").into(),
            None => std::process::Stdio::null(),
        })
        .spawn()
        .expect("operator starts")
}

pub async fn prepare_namespace(client: &Client) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).unwrap();
    let _ = namespaces.create(&PostParams::default(), &ns).await;
    // One shared, bound claim: the bench measures the operator, not volume provisioning.
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let volume = json!({"metadata": {"name": "bench-storage"}, "spec": {
        "capacity": {"storage": "1Ti"}, "accessModes": ["ReadWriteMany"], "hostPath": {"path": "/tmp/bench"},
        "storageClassName": "", "claimRef": {"namespace": NAMESPACE, "name": "bench-storage"}}});
    let _ = volumes
        .create(
            &PostParams::default(),
            &serde_json::from_value(volume).unwrap(),
        )
        .await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NAMESPACE);
    let claim = json!({"metadata": {"name": "bench-storage"}, "spec": {
        "accessModes": ["ReadWriteMany"], "storageClassName": "", "resources": {"requests": {"storage": "1Ti"}}}});
    let _ = claims
        .create(
            &PostParams::default(),
            &serde_json::from_value(claim).unwrap(),
        )
        .await;
}

pub fn job_template() -> FinetuneJob {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sft-lora-smollm2.yaml");
    let mut job: FinetuneJob =
        parse_manifest(&std::fs::read_to_string(path).unwrap(), "example").unwrap();
    job.metadata.namespace = Some(NAMESPACE.into());
    job.spec.base_model.uri = "file:///models/SmolLM2-135M-Instruct.Q4_1.gguf".into();
    job.spec.dataset.train.uri = "file:///data/chat-train.jsonl".into();
    job.spec.dataset.eval = Some(finetune_crds::data::DataSource {
        uri: "file:///data/chat-eval.jsonl".into(),
    });
    job.spec.storage.claim_name = Some("bench-storage".into());
    job.spec.resources.gpus = 1;
    job
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

pub fn peak_rss_from_status(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / 100.0
}
