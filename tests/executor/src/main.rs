//! `finetune-executor`: a test-only Kubernetes node. It registers a Node, keeps its Lease and
//! Ready heartbeat, and runs every pod scheduled to it as a local process: command, args and
//! environment from the pod spec, ConfigMap/Secret/PVC/emptyDir/projected volumes mapped to
//! local directories, a distinct loopback pod IP (127.0.0.x unless `--pod-ip-prefix` says
//! otherwise), and pod status (phase, container state, exit code, termination message) reported
//! like a kubelet. It stands in for kubelet + container runtime,
//! which cannot run on the test machines, so the real trainer runs under the real operator.
//!
//! Images are mapped to local binaries with `--image NAME=PATH` (or `--default-binary`).

mod node;
mod pod;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

#[derive(Parser, Clone, Debug)]
#[command(
    name = "finetune-executor",
    about = "Test-only node that runs pods as local processes"
)]
pub struct Args {
    /// Name of the Node to register.
    #[arg(long, default_value = "executor-0")]
    pub node_name: String,
    /// Directory for pod roots and PVC contents.
    #[arg(long)]
    pub work_dir: PathBuf,
    /// Map an image to a local binary, e.g. `--image ghcr.io/x/trainer:latest=/path/finetune-trainer`.
    #[arg(long = "image", value_parser = parse_image_mapping)]
    pub images: Vec<(String, PathBuf)>,
    /// Binary for images not mapped with --image.
    #[arg(long)]
    pub default_binary: Option<PathBuf>,
    /// An extra node label, `KEY=VALUE` (repeatable), e.g. the GPU product a manifest selects.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// A node taint, `KEY[=VALUE]:EFFECT` (repeatable), e.g. `nvidia.com/gpu:NoSchedule`.
    #[arg(long = "taint", value_parser = parse_taint)]
    pub taints: Vec<Taint>,
    /// `nvidia.com/gpu` capacity the node advertises.
    #[arg(long, default_value_t = 0)]
    pub gpus: u32,
    /// CPU capacity the node advertises.
    #[arg(long, default_value = "16")]
    pub cpu: String,
    /// Memory capacity the node advertises.
    #[arg(long, default_value = "64Gi")]
    pub memory: String,
    /// First three octets of the pod IPs (`<prefix>.2`, `<prefix>.3`, ...): executors sharing a
    /// host use distinct prefixes so their pods' ports do not collide.
    #[arg(long, default_value = "127.0.0")]
    pub pod_ip_prefix: String,
    /// The apiserver URL as pods see it (in-cluster config); set from the executor's own config.
    #[arg(skip)]
    pub api_server: Option<String>,
}

/// A node taint as the Node object spells it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Taint {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    pub effect: String,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or("expected KEY=VALUE")?;
    Ok((key.to_string(), value.to_string()))
}

fn parse_taint(text: &str) -> Result<Taint, String> {
    let (pair, effect) = text.rsplit_once(':').ok_or("expected KEY[=VALUE]:EFFECT")?;
    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(format!(
            "{effect}: expected NoSchedule, PreferNoSchedule or NoExecute"
        ));
    }
    let (key, value) = match pair.split_once('=') {
        Some((key, value)) => (key, Some(value.to_string())),
        None => (pair, None),
    };
    Ok(Taint {
        key: key.to_string(),
        value,
        effect: effect.to_string(),
    })
}

fn parse_image_mapping(text: &str) -> Result<(String, PathBuf), String> {
    let (image, path) = text.split_once('=').ok_or("expected IMAGE=PATH")?;
    Ok((image.to_string(), PathBuf::from(path)))
}

impl Args {
    /// The local binary that stands in for `image`.
    pub fn binary_for(&self, image: &str) -> Option<PathBuf> {
        let mapped: HashMap<&str, &PathBuf> =
            self.images.iter().map(|(i, p)| (i.as_str(), p)).collect();
        mapped
            .get(image)
            .map(|p| (*p).clone())
            .or_else(|| self.default_binary.clone())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse();
    let client = match kube::Config::infer().await {
        Ok(config) => {
            args.api_server = Some(config.cluster_url.to_string());
            kube::Client::try_from(config)
        }
        Err(error) => {
            eprintln!("executor: no Kubernetes configuration: {error}");
            return ExitCode::FAILURE;
        }
    };
    let client = match client {
        Ok(client) => client,
        Err(error) => {
            eprintln!("executor: cannot build a Kubernetes client: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(error) = std::fs::create_dir_all(&args.work_dir) {
        eprintln!(
            "executor: cannot create {}: {error}",
            args.work_dir.display()
        );
        return ExitCode::FAILURE;
    }
    if let Err(error) = node::register(&client, &args).await {
        eprintln!("executor: cannot register node {}: {error}", args.node_name);
        return ExitCode::FAILURE;
    }
    eprintln!(
        "executor: node {} registered; running its pods",
        args.node_name
    );
    tokio::spawn(node::heartbeat(client.clone(), args.node_name.clone()));
    let args = Arc::new(args);
    tokio::select! {
        result = pod::run_pods(client, args) => {
            if let Err(error) = result {
                eprintln!("executor: pod watch ended: {error}");
                return ExitCode::FAILURE;
            }
        }
        _ = tokio::signal::ctrl_c() => eprintln!("executor: interrupted"),
    }
    ExitCode::SUCCESS
}
