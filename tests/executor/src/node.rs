//! The Node object, its Ready heartbeat and its Lease, as a kubelet keeps them.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::Args;

/// Seconds between heartbeats; the node controller waits 40 s before marking a node unknown.
const HEARTBEAT_SECONDS: u64 = 10;

/// Creates (or takes over) the Node and reports it Ready.
pub async fn register(client: &Client, args: &Args) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let capacity = json!({
        "cpu": args.cpu, "memory": args.memory, "pods": "32",
        "nvidia.com/gpu": args.gpus.to_string(),
    });
    let mut labels = json!({
        "kubernetes.io/hostname": args.node_name,
        "kubernetes.io/os": "linux",
        "finetune.dev/executor": "true",
    });
    for (key, value) in &args.labels {
        labels[key] = json!(value);
    }
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": args.node_name, "labels": labels},
        "spec": {"taints": args.taints},
    });
    let node: Node = serde_json::from_value(node).expect("valid node");
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => return Err(error),
    }
    let status = json!({"status": {
        "capacity": capacity, "allocatable": capacity,
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": args.node_name}],
        "nodeInfo": {
            "kubeletVersion": "v1.36.3-finetune-executor", "operatingSystem": "linux", "architecture": "amd64",
            "containerRuntimeVersion": "local-process://1", "kernelVersion": "", "osImage": "",
            "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": ""
        },
        "conditions": conditions(),
    }});
    nodes
        .patch_status(
            &args.node_name,
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await?;
    Ok(())
}

/// Renews the Lease and the Ready condition until the process ends.
pub async fn heartbeat(client: Client, node_name: String) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    loop {
        // Lease times are MicroTime: exactly six fractional digits.
        let now = Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string();
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": node_name},
            "spec": {"holderIdentity": node_name, "leaseDurationSeconds": 40, "renewTime": now},
        });
        let apply = PatchParams::apply("finetune-executor").force();
        if let Err(error) = leases.patch(&node_name, &apply, &Patch::Apply(lease)).await {
            eprintln!("executor: lease renewal failed: {error}");
        }
        let status = json!({"status": {"conditions": conditions()}});
        if let Err(error) = nodes
            .patch_status(&node_name, &PatchParams::default(), &Patch::Merge(status))
            .await
        {
            eprintln!("executor: node heartbeat failed: {error}");
        }
        tokio::time::sleep(std::time::Duration::from_secs(HEARTBEAT_SECONDS)).await;
    }
}

fn conditions() -> serde_json::Value {
    let now = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let condition = |type_: &str, status: &str, reason: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": "finetune-executor",
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    json!([
        condition("Ready", "True", "KubeletReady"),
        condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
        condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
        condition("PIDPressure", "False", "KubeletHasSufficientPID"),
    ])
}
