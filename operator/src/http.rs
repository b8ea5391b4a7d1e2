//! The operator's HTTP endpoints: `/metrics` for Prometheus, `/healthz` and `/readyz` for probes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What the endpoints read.
#[derive(Clone)]
pub struct HttpState {
    /// The metrics to render.
    pub metrics: Arc<Metrics>,
    /// Set once the controller watches its resources.
    pub ready: Arc<AtomicBool>,
}

/// Binds the endpoints' address. Done before anything else starts so that a port in use (or
/// an address the pod does not have) stops the operator at once with a clear message, instead
/// of a controller running without metrics or probes.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(address).await.map_err(|error| {
        format!("cannot serve /metrics, /healthz and /readyz on {address}: {error}")
    })
}

/// Serves on `listener` until the process ends; an error ends the operator.
pub async fn serve(listener: TcpListener, state: HttpState) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    axum::serve(listener, router).await
}

async fn metrics(State(state): State<HttpState>) -> String {
    state.metrics.render()
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_port_is_an_error_naming_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = taken.local_addr().unwrap();
        let error = bind(address).await.unwrap_err();
        assert!(error.contains(&address.to_string()), "{error}");
        assert!(error.contains("/metrics"), "{error}");
    }
}
