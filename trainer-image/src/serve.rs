//! The trainer's one HTTP port: Prometheus text on `/metrics`, the operator's
//! [`StatusReport`] JSON on `/status`, `ok` on `/healthz`. A std thread with `tiny_http`; the
//! training loop writes into a shared [`Live`] and never waits for the server.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use finetune_crds::contract::StatusReport;
use prometheus::{Encoder, Gauge, Registry, TextEncoder};

/// Live training state shared with the server.
pub struct Live {
    pub status: Mutex<StatusReport>,
    /// When the newest checkpoint was written.
    pub last_checkpoint: Mutex<Option<Instant>>,
    registry: Registry,
    pub step: Gauge,
    pub total_steps: Gauge,
    pub epoch: Gauge,
    pub train_loss: Gauge,
    pub eval_loss: Gauge,
    /// Share of the base model's general answers still given (see `train::probe`).
    pub retention_score: Gauge,
    /// Exact-match accuracy of generated answers to eval prompts.
    pub eval_exact_match: Gauge,
    /// DPO: share of eval pairs whose chosen reply has the higher implicit reward.
    pub preference_accuracy: Gauge,
    /// DPO: mean implicit reward margin chosen − rejected on the eval pairs.
    pub reward_margin: Gauge,
    pub learning_rate: Gauge,
    pub grad_norm: Gauge,
    pub tokens_per_second: Gauge,
    pub samples_per_second: Gauge,
    pub supervised_token_fraction: Gauge,
    pub checkpoint_age_seconds: Gauge,
    pub checkpoint_duration_seconds: Gauge,
    pub eta_seconds: Gauge,
    pub resident_memory_bytes: Gauge,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

impl Live {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let g = |name: &str, help: &str| {
            let g = Gauge::new(format!("finetune_trainer_{name}"), help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        Arc::new(Live {
            status: Mutex::new(StatusReport::default()),
            last_checkpoint: Mutex::new(None),
            step: g("step", "Optimizer steps done"),
            total_steps: g("total_steps", "Optimizer steps planned"),
            epoch: g("epoch", "Epochs done, fractional"),
            train_loss: g("train_loss", "Mean token loss of the last optimizer step"),
            eval_loss: g(
                "eval_loss",
                "Mean token loss on the eval set at the last evaluation",
            ),
            retention_score: g(
                "retention_score",
                "Share of the base model's greedy answers to general prompts the tuned model still gives (0-1)",
            ),
            eval_exact_match: g(
                "eval_exact_match",
                "Exact-match accuracy of greedy answers to eval prompts (0-1)",
            ),
            preference_accuracy: g(
                "preference_accuracy",
                "DPO: share of eval pairs whose chosen reply has the higher implicit reward (0-1)",
            ),
            reward_margin: g(
                "reward_margin",
                "DPO: mean implicit reward margin chosen - rejected on the eval pairs",
            ),
            learning_rate: g("learning_rate", "Learning rate of the last step"),
            grad_norm: g(
                "grad_norm",
                "Global gradient norm of the last step, before clipping",
            ),
            tokens_per_second: g(
                "tokens_per_second",
                "Training tokens per second (last step)",
            ),
            samples_per_second: g(
                "samples_per_second",
                "Training samples per second (last step)",
            ),
            supervised_token_fraction: g(
                "supervised_token_fraction",
                "Share of the last step's tokens that are loss targets",
            ),
            checkpoint_age_seconds: g(
                "checkpoint_age_seconds",
                "Seconds since the newest checkpoint",
            ),
            checkpoint_duration_seconds: g(
                "checkpoint_duration_seconds",
                "Seconds the last checkpoint took to write",
            ),
            eta_seconds: g("eta_seconds", "Estimated seconds until training ends"),
            resident_memory_bytes: g(
                "process_resident_memory_bytes",
                "Resident set size of the trainer",
            ),
            registry,
        })
    }

    pub fn update(&self, f: impl FnOnce(&mut StatusReport)) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
    }

    pub fn status(&self) -> StatusReport {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn render_metrics(&self) -> String {
        if let Some(t) = *self
            .last_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            self.checkpoint_age_seconds.set(t.elapsed().as_secs_f64());
        }
        if let Some(rss) = rss_bytes() {
            self.resident_memory_bytes.set(rss as f64);
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Starts the server on `addr` (`host:port`) in a background thread; returns the bound address.
pub fn serve(live: Arc<Live>, addr: &str) -> std::io::Result<SocketAddr> {
    let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| std::io::Error::other("not an IP listener"))?;
    std::thread::Builder::new()
        .name("status-server".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let path = req.url().split('?').next().unwrap_or("").to_string();
                let (body, ctype, code) = match path.as_str() {
                    "/metrics" => (live.render_metrics(), "text/plain; version=0.0.4", 200),
                    "/status" => (
                        serde_json::to_string(&live.status()).unwrap_or_default(),
                        "application/json",
                        200,
                    ),
                    "/healthz" => ("ok".to_string(), "text/plain", 200),
                    _ => ("not found".to_string(), "text/plain", 404),
                };
                let header = tiny_http::Header::from_bytes("Content-Type", ctype)
                    .expect("static header is valid");
                let resp = tiny_http::Response::from_string(body)
                    .with_status_code(code)
                    .with_header(header);
                let _ = req.respond(resp);
            }
        })?;
    Ok(bound)
}

fn proc_status_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Current resident set size (Linux).
pub fn rss_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

/// Peak resident set size (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

/// Peak virtual memory (Linux): what an address-space limit (`RLIMIT_AS`) is checked against.
pub fn peak_virtual_bytes() -> Option<u64> {
    proc_status_kib("VmPeak:").map(|k| k * 1024)
}

/// Starts a new peak: afterwards [`peak_rss_bytes`] is the peak since this call (Linux's
/// `clear_refs` 5). False where the kernel refuses it; the peak then still covers the whole run.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
