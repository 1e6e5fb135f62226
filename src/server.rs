//! The controller's HTTP endpoints: `/healthz`, `/readyz` and `/metrics`.

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};
use tokio_util::sync::CancellationToken;

use crate::{Error, Result, metrics::Metrics};

/// What the endpoints report on.
#[derive(Clone)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    /// Set once the controller's caches are in sync: only then is it ready.
    pub ready: Arc<AtomicBool>,
}

/// Binds `addr` and serves until `shutdown` is cancelled. Returns the bound address first (so
/// `127.0.0.1:0` can be used), and the serving future.
pub async fn bind(
    addr: &str,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(
    std::net::SocketAddr,
    impl Future<Output = Result<()>> + Send + use<>,
)> {
    let serve_err = |source| Error::Serve {
        addr: addr.to_string(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(serve_err)?;
    let local = listener.local_addr().map_err(serve_err)?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    let addr = addr.to_string();
    let serve = async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(|source| Error::Serve { addr, source })
    };
    Ok((local, serve))
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    if health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
    }
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.render(),
    )
}
