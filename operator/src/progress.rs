//! Polls running trainers' `/status` for `status.progress`, at a bounded rate per job, the way
//! the Flink operator polls its jobs' REST API.
//!
//! A trainer that does not answer (still loading, or its port closed to the operator by a
//! network policy) is polled less and less often, up to [`MAX_BACKOFF`], and at most
//! [`MAX_IN_FLIGHT`] polls run at once: a thousand unreachable pods must not become a thousand
//! half-open connections in the operator.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use finetune_crds::contract::StatusReport;
use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Largest `/status` body accepted.
const MAX_BODY: usize = 64 * 1024;

/// Longest wait between polls of a trainer that keeps failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Most polls in flight at once; a poll that would exceed it waits for the next reconcile.
pub const MAX_IN_FLIGHT: usize = 32;

/// The last poll of one job's trainer.
struct Polled {
    /// When the last poll ended (`None`: never polled).
    at: Option<Instant>,
    in_flight: bool,
    /// Polls that failed in a row, for the backoff.
    failures: u32,
    report: Option<StatusReport>,
}

impl Polled {
    /// How long after the last poll the next one is due: the interval, doubled per failure in
    /// a row, up to [`MAX_BACKOFF`].
    fn wait(&self, min_interval: Duration) -> Duration {
        let factor = 1u32 << self.failures.min(16);
        min_interval
            .saturating_mul(factor)
            .min(MAX_BACKOFF.max(min_interval))
    }
}

/// A rate-limited `/status` client. Polls run in the background: a reconcile never waits on a
/// trainer (an unreachable pod IP would hold it, and a reconcile slot, for the whole timeout).
pub struct ProgressPoller {
    min_interval: Duration,
    timeout: Duration,
    last: Arc<Mutex<HashMap<String, Polled>>>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    updated_tx: UnboundedSender<String>,
    updated_rx: Mutex<Option<UnboundedReceiver<String>>>,
}

impl ProgressPoller {
    /// Polls each job at most once per `min_interval`, giving up on a trainer after `timeout`.
    pub fn new(min_interval: Duration, timeout: Duration) -> Self {
        let (updated_tx, updated_rx) = unbounded();
        Self {
            min_interval,
            timeout,
            last: Arc::default(),
            in_flight: Arc::default(),
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
    /// a failed poll keeps the previous report and backs off.
    pub fn report(&self, job: &str, address: &str) -> Option<StatusReport> {
        let mut last = self.last.lock().expect("poller lock");
        let entry = last.entry(job.to_string()).or_insert(Polled {
            at: None,
            in_flight: false,
            failures: 0,
            report: None,
        });
        let due = entry
            .at
            .is_none_or(|at| at.elapsed() >= entry.wait(self.min_interval));
        let room = self.in_flight.load(Ordering::SeqCst) < MAX_IN_FLIGHT;
        if !entry.in_flight && due && room {
            entry.in_flight = true;
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            let (timeout, address) = (self.timeout, address.to_string());
            let (polls, updated, job) =
                (self.last.clone(), self.updated_tx.clone(), job.to_string());
            let in_flight = self.in_flight.clone();
            tokio::spawn(async move {
                let fetched = tokio::time::timeout(timeout, fetch(&address))
                    .await
                    .ok()
                    .flatten();
                in_flight.fetch_sub(1, Ordering::SeqCst);
                let changed = {
                    let mut polls = polls.lock().expect("poller lock");
                    // Forgotten meanwhile: the job finished or was deleted.
                    let Some(entry) = polls.get_mut(&job) else {
                        return;
                    };
                    entry.in_flight = false;
                    entry.at = Some(Instant::now());
                    entry.failures = if fetched.is_some() {
                        0
                    } else {
                        entry.failures.saturating_add(1)
                    };
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

/// One `GET /status` on a connection of its own. The connection is driven inside this future,
/// not by a task of its own, so when the poll's timeout drops it the socket closes with it: a
/// trainer that accepts and never answers must not keep a connection open in the operator.
async fn fetch(address: &str) -> Option<StatusReport> {
    let stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    let request = hyper::Request::get("/status")
        .header(hyper::header::HOST, address)
        .body(Empty::<Bytes>::new())
        .ok()?;
    let exchange = async move {
        let response = sender.send_request(request).await.ok()?;
        // Dropping the sender lets the connection finish once the body is read.
        drop(sender);
        if !response.status().is_success() {
            return None;
        }
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .ok()?
            .to_bytes();
        serde_json::from_slice(&body).ok()
    };
    let (report, _) = futures::join!(exchange, connection);
    report
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

    #[test]
    fn a_failing_trainer_is_polled_less_often() {
        let polled = |failures| Polled {
            at: None,
            in_flight: false,
            failures,
            report: None,
        };
        let interval = Duration::from_secs(5);
        assert_eq!(polled(0).wait(interval), interval);
        assert_eq!(polled(2).wait(interval), Duration::from_secs(20));
        assert_eq!(polled(30).wait(interval), MAX_BACKOFF);
    }

    #[tokio::test]
    async fn polls_in_flight_are_bounded() {
        // A port that accepts nothing within the timeout: 10.255.255.1 is not routed here.
        let poller = ProgressPoller::new(Duration::ZERO, Duration::from_secs(2));
        for i in 0..(MAX_IN_FLIGHT + 10) {
            poller.report(&format!("ns/job-{i}"), "10.255.255.1:8081");
        }
        assert_eq!(poller.in_flight.load(Ordering::SeqCst), MAX_IN_FLIGHT);
    }

    #[tokio::test]
    async fn a_trainer_that_never_answers_gets_its_connection_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let poller = ProgressPoller::new(Duration::from_secs(60), Duration::from_millis(300));
        assert_eq!(poller.report("ns/job", &address), None);
        let (mut socket, _) = listener.accept().await.unwrap();
        // The request arrives; no answer is sent. Once the poll times out the operator's end
        // closes: the read below sees the end of the stream instead of waiting forever.
        let mut request = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut request)).await;
        assert!(
            matches!(closed, Ok(Ok(_))),
            "the connection stayed open after the poll timed out"
        );
        assert!(String::from_utf8_lossy(&request).starts_with("GET /status HTTP/1.1"));
    }

    #[tokio::test]
    async fn an_unreachable_trainer_gives_no_report() {
        let poller = ProgressPoller::new(Duration::ZERO, Duration::from_millis(500));
        assert_eq!(poller.report("ns/job", "127.0.0.1:1"), None);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(poller.report("ns/job", "127.0.0.1:1"), None);
    }
}
