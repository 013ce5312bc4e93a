//! The operations endpoint of every role: `/healthz` (the process runs), `/readyz` (it can do its
//! work) and `/metrics` (Prometheus text).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

/// Answers whether the role is ready, and if not, why.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct OpsState {
    ready: ReadyCheck,
    metrics: PrometheusHandle,
}

/// The router of the operations endpoint.
pub fn router(ready: ReadyCheck, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state(OpsState { ready, metrics })
}

async fn readyz(State(ops): State<OpsState>) -> impl IntoResponse {
    match (ops.ready)() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn render(State(ops): State<OpsState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ops.metrics.render(),
    )
}

/// The running operations endpoint; [`Ops::stop`] ends it once the role has drained.
pub struct Ops {
    stop: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

/// Binds `listen` and serves the operations endpoint until stopped.
pub async fn serve(
    listen: SocketAddr,
    ready: ReadyCheck,
    metrics: PrometheusHandle,
) -> anyhow::Result<Ops> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            axum::serve(listener, router(ready, metrics))
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        }
    });
    Ok(Ops { stop, task })
}

impl Ops {
    pub async fn stop(self) {
        self.stop.cancel();
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "Operations endpoint failed."),
            Err(e) => tracing::warn!(error = %e, "Operations endpoint task failed."),
        }
    }
}
