//! The operations endpoint: `/metrics` (Prometheus text format), `/healthz` (the process is
//! alive) and `/readyz` (the model is loaded and healthy, and the broker consumer connected; 503
//! with the reason otherwise). "Healthy": the last batch did not fail in the model (out of
//! memory, a device error, a panic) — or it did, but longer than [`HttpState::unhealthy_hold`]
//! ago, so that a worker left idle after one failed job becomes ready again instead of staying
//! unready (and alerting) until the next job.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use retouch_core::queue::QueueCounters;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::backend::ModelState;
use crate::metrics::Metrics;

/// What the endpoints read.
#[derive(Clone)]
pub struct HttpState {
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// The model thread's state.
    pub model: watch::Receiver<ModelState>,
    /// Broker connection state.
    pub queue: Arc<QueueCounters>,
    /// How long a failure in the model keeps `/readyz` at 503 when no batch succeeds after it
    /// ([`UNHEALTHY_HOLD`] in the worker).
    pub unhealthy_hold: Duration,
}

/// The worker's [`HttpState::unhealthy_hold`].
pub const UNHEALTHY_HOLD: Duration = Duration::from_secs(300);

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], state.metrics.render())
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, String) {
    let model = state.model.borrow().clone();
    let connected = state.queue.connected.load(Ordering::Relaxed);
    match (model, connected) {
        (ModelState::Ready(_), true) => (StatusCode::OK, "ready\n".into()),
        (ModelState::Ready(_), false) => (StatusCode::SERVICE_UNAVAILABLE, "broker not connected\n".into()),
        (ModelState::Unhealthy { error, since, .. }, _) if since.elapsed() < state.unhealthy_hold => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("model unhealthy (its last batch failed): {error}\n"))
        }
        (ModelState::Unhealthy { .. }, true) => (StatusCode::OK, "ready\n".into()),
        (ModelState::Unhealthy { .. }, false) => (StatusCode::SERVICE_UNAVAILABLE, "broker not connected\n".into()),
        (ModelState::Loading, _) => (StatusCode::SERVICE_UNAVAILABLE, "model loading\n".into()),
        (ModelState::Failed(e), _) => (StatusCode::SERVICE_UNAVAILABLE, format!("model failed: {e}\n")),
    }
}

/// The router (exposed for tests).
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves the endpoints on `listener` until `shutdown` resolves.
///
/// # Errors
/// I/O errors of the server.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}
