//! Polls running trainers' `/status` for `status.progress`, at a bounded rate per job, the way
//! the Flink operator polls its jobs' REST API.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use finetune_crds::contract::StatusReport;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Largest `/status` body accepted.
const MAX_BODY: usize = 64 * 1024;

/// A rate-limited `/status` client.
pub struct ProgressPoller {
    client: Client<HttpConnector, Empty<Bytes>>,
    min_interval: Duration,
    timeout: Duration,
    last: Mutex<HashMap<String, (Instant, Option<StatusReport>)>>,
}

impl ProgressPoller {
    /// Polls each job at most once per `min_interval`, giving up on a trainer after `timeout`.
    pub fn new(min_interval: Duration, timeout: Duration) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            min_interval,
            timeout,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// The latest report of `job`'s trainer at `address` (`ip:port`): fetched when the last poll
    /// is older than the interval, otherwise the cached one. `None` when the trainer has not
    /// answered yet; a failed poll keeps the previous report.
    pub async fn report(&self, job: &str, address: &str) -> Option<StatusReport> {
        if let Some((at, report)) = self.last.lock().expect("poller lock").get(job)
            && at.elapsed() < self.min_interval
        {
            return report.clone();
        }
        let fetched = tokio::time::timeout(self.timeout, self.fetch(address))
            .await
            .ok()
            .flatten();
        let mut last = self.last.lock().expect("poller lock");
        let previous = last.get(job).and_then(|(_, report)| report.clone());
        let report = fetched.or(previous);
        last.insert(job.to_string(), (Instant::now(), report.clone()));
        report
    }

    /// Forgets a job (deleted or finished).
    pub fn forget(&self, job: &str) {
        self.last.lock().expect("poller lock").remove(job);
    }

    async fn fetch(&self, address: &str) -> Option<StatusReport> {
        let uri = format!("http://{address}/status").parse().ok()?;
        let response = self.client.get(uri).await.ok()?;
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
    async fn polls_at_a_bounded_rate_and_keeps_the_last_report() {
        let (address, hits) =
            serve_status(r#"{"phase":"training","step":7,"totalSteps":20,"epoch":0.35}"#).await;
        let poller = ProgressPoller::new(Duration::from_secs(60), Duration::from_secs(2));
        let first = poller.report("ns/job", &address).await.unwrap();
        assert_eq!((first.step, first.total_steps), (7, 20));
        let second = poller.report("ns/job", &address).await.unwrap();
        assert_eq!(second, first);
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the second call must use the cache"
        );
    }

    #[tokio::test]
    async fn an_unreachable_trainer_gives_no_report() {
        let poller = ProgressPoller::new(Duration::ZERO, Duration::from_millis(500));
        assert_eq!(poller.report("ns/job", "127.0.0.1:1").await, None);
    }
}
