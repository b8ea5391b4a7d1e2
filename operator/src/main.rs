//! `finetune-operator`: the FinetuneJob and Adapter operator.
//!
//! - `run`: the controller, with `/metrics`, `/healthz` and `/readyz` on one port.
//! - `crd`: print the CustomResourceDefinitions (pipe into `kubectl apply -f -`).
//! - `check FILE...`: validate manifests offline with the same schema and CEL rules the
//!   apiserver applies, e.g. in a GitOps pipeline before a merge.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use finetune_operator::controller::{self, Context};
use finetune_operator::finetunejob::build::BuildSettings;
use finetune_operator::http::{self, HttpState};
use finetune_operator::metrics::Metrics;
use finetune_operator::progress::ProgressPoller;
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "finetune-operator",
    version,
    about = "Fine-tuning jobs on Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (uses the in-cluster config or $KUBECONFIG).
    Run(RunArgs),
    /// Print the CRDs as a multi-document YAML stream.
    Crd,
    /// Validate manifests (FinetuneJob or Adapter) as the apiserver would; exit 2 when any is invalid.
    Check {
        /// Manifest files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Trainer image for jobs that name none.
    #[arg(
        long,
        env = "FINETUNE_TRAINER_IMAGE",
        default_value = "ghcr.io/finetune-operator/trainer:latest"
    )]
    trainer_image: String,
    /// Address of the metrics and health endpoints.
    #[arg(long, env = "FINETUNE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Watch only this namespace (all namespaces when omitted).
    #[arg(long, env = "FINETUNE_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Poll each running trainer's /status at most this often, in seconds.
    #[arg(long, default_value_t = 5)]
    progress_interval: u64,
    /// Seconds a trainer gets after SIGTERM to checkpoint.
    #[arg(long, default_value_t = 120)]
    termination_grace: i64,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crd => {
            for (_name, yaml) in finetune_crds::crd_files() {
                print!("---\n{yaml}");
            }
            ExitCode::SUCCESS
        }
        Command::Check { files } => finetune_operator::check::run(&files),
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(runtime) => runtime.block_on(run(args)),
                Err(error) => {
                    eprintln!("finetune-operator: cannot start the async runtime: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(args: RunArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(error) => {
            error!(%error, "no Kubernetes configuration (in-cluster or KUBECONFIG)");
            return ExitCode::FAILURE;
        }
    };
    if let Err(hint) = controller::ensure_crds_installed(&client).await {
        error!("{hint}");
        eprintln!("finetune-operator: {hint}");
        return ExitCode::FAILURE;
    }
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let state = HttpState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let http_addr = args.http_addr;
    tokio::spawn(async move {
        if let Err(error) = http::serve(http_addr, state).await {
            error!(%error, %http_addr, "metrics endpoint failed");
        }
    });
    let settings = BuildSettings {
        trainer_image: args.trainer_image,
        termination_grace_seconds: args.termination_grace,
        ..BuildSettings::default()
    };
    let poller = ProgressPoller::new(
        Duration::from_secs(args.progress_interval),
        Duration::from_secs(3),
    );
    let ctx = Arc::new(Context::new(client, metrics, settings, poller));
    info!(namespace = ?args.namespace, %http_addr, "finetune-operator starting");
    controller::run(ctx, args.namespace, || ready.store(true, Ordering::Relaxed)).await;
    info!("finetune-operator stopped");
    ExitCode::SUCCESS
}
