//! What the operator benchmarks share: the bench namespace with one bound storage claim, the
//! job they create, the operator process, and its memory and CPU from /proc.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use finetune_crds::{FinetuneJob, parse_manifest};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;

/// Where the benchmarks create their jobs.
pub const NAMESPACE: &str = "bench";

/// Starts the operator binary watching [`NAMESPACE`]: warnings, plus the controller's "trainer
/// pod created" lines that [`pods_created_at`] reads, as JSON lines into `log`.
pub fn start_operator(operator_bin: &str, log: &Path) -> std::process::Child {
    std::process::Command::new(operator_bin)
        .args([
            "run",
            "--namespace",
            NAMESPACE,
            "--http-addr",
            "127.0.0.1:0",
        ])
        .env(
            "RUST_LOG",
            "warn,finetune_operator::finetunejob::controller=info",
        )
        .stdout(std::fs::File::create(log).expect("operator log"))
        .spawn()
        .expect("operator starts")
}

/// Where the operator's log goes: BENCH_OPERATOR_LOG, else beside the JSON result.
pub fn operator_log_path(out: &str) -> PathBuf {
    match std::env::var_os("BENCH_OPERATOR_LOG") {
        Some(path) => path.into(),
        None => PathBuf::from(format!("{}.operator.log", out.trim_end_matches(".json"))),
    }
}

/// When the operator's create call returned for each trainer pod (`NAME-attempt-N` → time), read
/// from its log. The operator logs after the apiserver answered, so this is an upper bound of
/// the pod's creation time with sub-second precision, on the same clock as the bench (one
/// machine); the pod's creationTimestamp has whole seconds only.
pub fn pods_created_at(log: &Path) -> HashMap<String, Timestamp> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|entry| entry["fields"]["message"] == "trainer pod created")
        .filter_map(|entry| {
            let job = entry["fields"]["job"]
                .as_str()?
                .split_once('/')?
                .1
                .to_string();
            let attempt = entry["fields"]["attempt"].as_i64()?;
            let at: Timestamp = entry["timestamp"].as_str()?.parse().ok()?;
            Some((format!("{job}-attempt-{attempt}"), at))
        })
        .collect()
}

/// CPU seconds used so far by each control-plane process on this machine (by executable name),
/// so a run can say where the cores went.
pub fn control_plane_cpu() -> BTreeMap<String, f64> {
    const NAMES: [&str; 5] = [
        "etcd",
        "kube-apiserver",
        "kube-scheduler",
        "kube-controller",
        "kwok",
    ];
    let mut used = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if let Some(name) = NAMES.iter().find(|name| comm.trim().starts_with(*name)) {
            *used.entry(name.to_string()).or_default() += cpu_seconds(pid);
        }
    }
    used
}

/// The apiserver's request counters (`apiserver_request_total`) summed by verb and resource,
/// e.g. `PATCH pods/status`: which writes the run cost.
pub async fn apiserver_requests(client: &Client) -> BTreeMap<String, f64> {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap_or_default();
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |key: &str| {
            labels
                .split(',')
                .find_map(|pair| pair.strip_prefix(&format!("{key}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let (resource, subresource) = (label("resource"), label("subresource"));
        if resource.is_empty() {
            continue;
        }
        let key = if subresource.is_empty() {
            format!("{} {resource}", label("verb"))
        } else {
            format!("{} {resource}/{subresource}", label("verb"))
        };
        *counts.entry(key).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    counts
}

/// `after − before` for each counter, largest first, without the ones that did not move.
pub fn counter_increase(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> Vec<(String, f64)> {
    let mut increase: Vec<(String, f64)> = after
        .iter()
        .map(|(key, value)| (key.clone(), value - before.get(key).copied().unwrap_or(0.0)))
        .filter(|(_, delta)| *delta > 0.0)
        .collect();
    increase.sort_by(|a, b| b.1.total_cmp(&a.1));
    increase
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
    job.spec.dataset.train.uri = Some("file:///data/chat-train.jsonl".into());
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
