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
use finetune_operator::adapter;
use finetune_operator::api;
use finetune_operator::event_queue::EventQueue;
use finetune_operator::finetunejob::controller::{self as jobs, Options};
use finetune_operator::gate::Gate;
use finetune_operator::http::{self, HttpState};
use finetune_operator::leader::{self, LeaderElector, Timings};
use finetune_operator::metrics::Metrics;
use finetune_operator::pods::{BuildSettings, parse_quantity};
use finetune_operator::policy::Policy;
use finetune_operator::progress::ProgressPoller;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::runtime::events::Recorder;
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
    Run(Box<RunArgs>),
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
        default_value = finetune_operator::pods::DEFAULT_TRAINER_IMAGE
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
    /// Most reconciles in flight at once.
    #[arg(long, env = "FINETUNE_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// Run as one of several replicas: only the holder of a Lease reconciles; the others stand
    /// by and take over when it stops renewing.
    #[arg(long, env = "FINETUNE_LEADER_ELECT")]
    leader_elect: bool,
    /// CPU requested and limited for trainers whose job sets no `spec.resources.cpu`
    /// (a Kubernetes quantity, e.g. `4` or `500m`); none when omitted.
    #[arg(long, env = "FINETUNE_TRAINER_DEFAULT_CPU", value_parser = parse_quantity)]
    trainer_default_cpu: Option<Quantity>,
    /// Memory requested and limited for trainers whose job sets no `spec.resources.memory`
    /// (a Kubernetes quantity, e.g. `16Gi`); none when omitted.
    #[arg(long, env = "FINETUNE_TRAINER_DEFAULT_MEMORY", value_parser = parse_quantity)]
    trainer_default_memory: Option<Quantity>,
    /// Node selector of Adapter verification pods, as KEY=VALUE (repeat for more labels; comma
    /// separated in the environment variable). Verification needs no GPU: point it at a CPU pool.
    #[arg(long = "verification-node-selector", env = "FINETUNE_VERIFICATION_NODE_SELECTOR", value_delimiter = ',', value_parser = parse_label)]
    verification_node_selector: Vec<(String, String)>,
    /// Trainer images a FinetuneJob's spec.image may name (repeat; comma separated in the
    /// environment variable); a trailing `*` matches a prefix, e.g. `registry.corp/ml/*`. Only
    /// --trainer-image when none is given: a tenant cannot run an arbitrary image.
    #[arg(
        long = "allowed-trainer-image",
        env = "FINETUNE_ALLOWED_TRAINER_IMAGES",
        value_delimiter = ','
    )]
    allowed_trainer_images: Vec<String>,
    /// PriorityClasses a FinetuneJob may name (repeat; comma separated in the environment
    /// variable). Any when none is given.
    #[arg(
        long = "allowed-priority-class",
        env = "FINETUNE_ALLOWED_PRIORITY_CLASSES",
        value_delimiter = ','
    )]
    allowed_priority_classes: Vec<String>,
    /// The Hugging Face Hub API base trainers download `hf://` models from: an enterprise
    /// mirror such as olah, or the Hub itself (the default).
    #[arg(long, env = "FINETUNE_HF_ENDPOINT")]
    hf_endpoint: Option<String>,
    /// A ReadWriteMany PersistentVolumeClaim, present under this name in every namespace that
    /// runs `hf://` jobs, that holds the shared model cache: each base commit is downloaded once
    /// and reused. Without it each job downloads onto its own storage.
    #[arg(long, env = "FINETUNE_MODEL_CACHE_CLAIM")]
    model_cache_claim: Option<String>,
    /// Failed trainer pods kept per job for their logs (the newest ones); older ones are deleted
    /// once their attempt is recorded in the job's status. The current attempt's pod is always
    /// kept.
    #[arg(long, env = "FINETUNE_FAILED_PODS_TO_KEEP", default_value_t = 1)]
    failed_pods_to_keep: usize,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_election_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "finetune-operator")]
    leader_election_lease_name: String,
    /// How long a standby waits, after the lease last changed, before taking it (seconds;
    /// client-go's default). Failover takes up to this long after a leader dies without
    /// releasing the lease.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    leader_election_lease_seconds: u64,
    /// How long the leader keeps trying to renew before it steps down (seconds); below the
    /// lease duration.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    leader_election_renew_deadline_seconds: u64,
    /// Pause between tries to acquire or renew the lease (seconds).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    leader_election_retry_seconds: u64,
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
            one_malloc_arena();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(runtime) => runtime.block_on(run(*args)),
                Err(error) => {
                    eprintln!("finetune-operator: cannot start the async runtime: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Runs the operator with one glibc malloc arena (`MALLOC_ARENA_MAX=1`) unless the environment
/// already chooses: the process re-executes itself with the variable set, before any thread
/// starts (glibc reads it once, at start-up). glibc gives each thread that allocates
/// concurrently an arena of its own and rarely returns their free space; the operator's tasks
/// move between the runtime's threads, so its caches and requests end up spread over several
/// arenas. Measured by `make bench-operator` (1000 jobs): peak RSS 72 MiB with glibc's default,
/// 55 MiB with one arena, and no slower (the threads wait on the apiserver, not on the
/// allocator).
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        use std::os::unix::process::CommandExt;
        if let Ok(executable) = std::env::current_exe() {
            let error = std::process::Command::new(executable)
                .args(std::env::args_os().skip(1))
                .env("MALLOC_ARENA_MAX", "1")
                .exec();
            eprintln!(
                "finetune-operator: cannot re-execute with MALLOC_ARENA_MAX=1 ({error}); \
                 going on with glibc's default arenas"
            );
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
    if args.leader_election_renew_deadline_seconds >= args.leader_election_lease_seconds {
        // A leader still renewing when a standby may take the lease would make two leaders.
        return fatal(&format!(
            "--leader-election-renew-deadline-seconds ({}) must be below --leader-election-lease-seconds ({})",
            args.leader_election_renew_deadline_seconds, args.leader_election_lease_seconds
        ));
    }
    // The endpoints are bound first: without them the probes fail and nothing is scraped, so a
    // port that cannot be bound ends the operator at once, saying why.
    let http_addr = args.http_addr;
    let listener = match http::bind(http_addr).await {
        Ok(listener) => listener,
        Err(message) => return fatal(&message),
    };
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let state = HttpState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let mut server = tokio::spawn(http::serve(listener, state));
    tokio::select! {
        code = operate(args, metrics, ready) => code,
        served = &mut server => {
            let why = match served {
                Ok(Ok(())) => "stopped".to_string(),
                Ok(Err(error)) => error.to_string(),
                Err(error) => error.to_string(),
            };
            fatal(&format!("the metrics and health endpoints on {http_addr} failed: {why}"))
        }
    }
}

/// Logs `message` (JSON log and plain stderr, for `kubectl logs` and terminals alike) and
/// returns the failure exit status.
fn fatal(message: &str) -> ExitCode {
    error!("{message}");
    eprintln!("finetune-operator: {message}");
    ExitCode::FAILURE
}

/// Everything after the endpoints are up: the CRD check, the election and the controller.
async fn operate(args: RunArgs, metrics: Arc<Metrics>, ready: Arc<AtomicBool>) -> ExitCode {
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(error) => {
            return fatal(&format!(
                "no Kubernetes configuration (in-cluster or KUBECONFIG): {error}"
            ));
        }
    };
    if let Err(hint) = api::ensure_crds_installed(&client, args.namespace.as_deref()).await {
        return fatal(&hint);
    }
    let settings = BuildSettings {
        trainer_image: args.trainer_image,
        termination_grace_seconds: args.termination_grace,
        default_cpu: args.trainer_default_cpu,
        default_memory: args.trainer_default_memory,
        verifier_node_selector: args.verification_node_selector.into_iter().collect(),
        policy: Policy {
            images: args.allowed_trainer_images,
            priority_classes: args.allowed_priority_classes,
        },
        hf_endpoint: args.hf_endpoint,
        model_cache_claim: args.model_cache_claim,
        ..BuildSettings::default()
    };
    let poller = ProgressPoller::new(
        Duration::from_secs(args.progress_interval),
        Duration::from_secs(3),
    );
    let options = Options {
        namespace: args.namespace,
        concurrency: args.concurrency,
        failed_pods_to_keep: args.failed_pods_to_keep,
    };
    info!(namespace = ?options.namespace, http_addr = %args.http_addr, leader_elect = args.leader_elect, "finetune-operator starting");

    let elector = args.leader_elect.then(|| {
        LeaderElector::new(
            client.clone(),
            &args.leader_election_namespace,
            &args.leader_election_lease_name,
            leader::default_identity(),
            Timings {
                lease_duration: Duration::from_secs(args.leader_election_lease_seconds),
                renew_deadline: Duration::from_secs(args.leader_election_renew_deadline_seconds),
                retry_period: Duration::from_secs(args.leader_election_retry_seconds),
            },
        )
    });
    if let Some(elector) = &elector {
        // A standby is ready in its role: reporting it unready would stall a rolling update
        // of the Deployment behind a replica that cannot lead until the old one goes.
        ready.store(true, Ordering::Relaxed);
        metrics.set_leader(false);
        info!(identity = %elector.identity(), "waiting for the leader lease");
        tokio::select! {
            () = elector.acquire() => {}
            () = shutdown_signal() => {
                info!("stopped while standing by");
                return ExitCode::SUCCESS;
            }
        }
        ready.store(false, Ordering::Relaxed);
    }
    metrics.set_leader(true);
    let synced = ready.clone();
    let controller = run_controllers(
        client,
        metrics.clone(),
        settings,
        poller,
        options,
        move || synced.store(true, Ordering::Relaxed),
    );
    match &elector {
        None => controller.await,
        Some(elector) => {
            tokio::select! {
                () = controller => elector.release().await,
                () = elector.hold() => {
                    // Another replica may be reconciling already: stop at once, mid-reconcile
                    // if need be (every write is idempotent), and let the Deployment restart us
                    // as a standby.
                    metrics.set_leader(false);
                    error!("lost the leader lease; exiting");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    info!("finetune-operator stopped");
    ExitCode::SUCCESS
}

/// The FinetuneJob and Adapter controllers side by side, until SIGTERM/SIGINT; `on_synced` is
/// called once the FinetuneJob caches have their initial lists.
async fn run_controllers(
    client: kube::Client,
    metrics: Arc<Metrics>,
    settings: BuildSettings,
    poller: ProgressPoller,
    options: Options,
    on_synced: impl FnOnce() + Send + 'static,
) {
    // One queue for both kinds' Events, behind the slots that new jobs' pods are served first in.
    let gate = Gate::new(options.concurrency.into());
    let events = EventQueue::start(Recorder::new(client.clone(), api::reporter()), gate);
    let adapters = adapter::controller::run(
        client.clone(),
        metrics.clone(),
        settings.clone(),
        options.namespace.clone(),
        options.concurrency,
        events.clone(),
    );
    let jobs = jobs::run(
        client, metrics, settings, poller, options, events, on_synced,
    );
    futures::join!(jobs, adapters);
}

/// `KEY=VALUE` of a node label.
fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
