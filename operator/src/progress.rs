//! Polls running trainers' `/status` for `status.progress`, at a bounded rate per job, the way
//! the Flink operator polls its jobs' REST API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use finetune_crds::contract::StatusReport;
use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Largest `/status` body accepted.
const MAX_BODY: usize = 64 * 1024;

/// The last poll of one job's trainer.
struct Polled {
    /// When the last poll ended (`None`: never polled).
    at: Option<Instant>,
    in_flight: bool,
    report: Option<StatusReport>,
}

/// A rate-limited `/status` client. Polls run in the background: a reconcile never waits on a
/// trainer (an unreachable pod IP would hold it, and a reconcile slot, for the whole timeout).
pub struct ProgressPoller {
    client: Client<HttpConnector, Empty<Bytes>>,
    min_interval: Duration,
    timeout: Duration,
    last: Arc<Mutex<HashMap<String, Polled>>>,
    updated_tx: UnboundedSender<String>,
    updated_rx: Mutex<Option<UnboundedReceiver<String>>>,
}

impl ProgressPoller {
    /// Polls each job at most once per `min_interval`, giving up on a trainer after `timeout`.
    pub fn new(min_interval: Duration, timeout: Duration) -> Self {
        let (updated_tx, updated_rx) = unbounded();
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            min_interval,
            timeout,
            last: Arc::default(),
            updated_tx,
            updated_rx: Mutex::new(Some(updated_rx)),
        }
    }

    /// The keys of jobs whose report changed, as each poll completes, so the caller can
    /// reconcile them; only the first call gets the stream.
    pub fn take_updates(&self) -> Option<UnboundedReceiver<String>> {
        self.updated_rx.lock().expect("poller lock").take()
    }

    /// The latest report of `job`'s trainer at `address` (`ip:port`), without waiting: when the
    /// last poll is older than the interval a new one starts in the background and announces
    /// a changed report on [`Self::take_updates`]. `None` until the trainer has answered once;
    /// a failed poll keeps the previous report.
    pub fn report(&self, job: &str, address: &str) -> Option<StatusReport> {
        let mut last = self.last.lock().expect("poller lock");
        let entry = last.entry(job.to_string()).or_insert(Polled {
            at: None,
            in_flight: false,
            report: None,
        });
        let due = entry.at.is_none_or(|at| at.elapsed() >= self.min_interval);
        if !entry.in_flight && due {
            entry.in_flight = true;
            let (client, timeout, uri) = (self.client.clone(), self.timeout, status_uri(address));
            let (polls, updated, job) =
                (self.last.clone(), self.updated_tx.clone(), job.to_string());
            tokio::spawn(async move {
                let fetched = match uri {
                    Some(uri) => tokio::time::timeout(timeout, fetch(client, uri))
                        .await
                        .ok()
                        .flatten(),
                    None => None,
                };
                let changed = {
                    let mut polls = polls.lock().expect("poller lock");
                    // Forgotten meanwhile: the job finished or was deleted.
                    let Some(entry) = polls.get_mut(&job) else {
                        return;
                    };
                    entry.in_flight = false;
                    entry.at = Some(Instant::now());
                    match fetched {
                        Some(report) if entry.report.as_ref() != Some(&report) => {
                            entry.report = Some(report);
                            true
                        }
                        _ => false,
                    }
                };
                if changed {
                    let _ = updated.unbounded_send(job);
                }
            });
        }
        entry.report.clone()
    }

    /// Forgets a job (deleted or finished).
    pub fn forget(&self, job: &str) {
        self.last.lock().expect("poller lock").remove(job);
    }
}

fn status_uri(address: &str) -> Option<hyper::Uri> {
    format!("http://{address}/status").parse().ok()
}

async fn fetch(
    client: Client<HttpConnector, Empty<Bytes>>,
    uri: hyper::Uri,
) -> Option<StatusReport> {
    let response = client.get(uri).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .ok()?
        .to_bytes();
    serde_json::from_slice(&body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-route HTTP server that counts requests.
    async fn serve_status(
        body: &'static str,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut request = [0u8; 1024];
                let _ = socket.read(&mut request).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(response.as_bytes()).await.unwrap();
            }
        });
        (address, hits)
    }

    #[tokio::test]
    async fn polls_in_the_background_at_a_bounded_rate_and_keeps_the_last_report() {
        use futures::StreamExt;
        let (address, hits) =
            serve_status(r#"{"phase":"training","step":7,"totalSteps":20,"epoch":0.35}"#).await;
        let poller = ProgressPoller::new(Duration::from_secs(60), Duration::from_secs(2));
        let mut updates = poller.take_updates().unwrap();
        assert_eq!(
            poller.report("ns/job", &address),
            None,
            "nothing polled yet"
        );
        assert_eq!(updates.next().await.as_deref(), Some("ns/job"));
        let first = poller.report("ns/job", &address).unwrap();
        assert_eq!((first.step, first.total_steps), (7, 20));
        let second = poller.report("ns/job", &address).unwrap();
        assert_eq!(second, first);
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "calls within the interval must use the cache"
        );
    }

    #[tokio::test]
    async fn an_unreachable_trainer_gives_no_report() {
        let poller = ProgressPoller::new(Duration::ZERO, Duration::from_millis(500));
        assert_eq!(poller.report("ns/job", "127.0.0.1:1"), None);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(poller.report("ns/job", "127.0.0.1:1"), None);
    }
}
