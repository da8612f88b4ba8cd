//! The worker's metrics and health listener (`[metrics] listen`), for
//! Prometheus and for a supervisor's probes:
//!
//! - `GET /metrics`: the worker's metrics ([`super::metrics`]) in the
//!   OpenMetrics text format;
//! - `GET /livez`: `200 ok` while the process serves;
//! - `GET /readyz`: `200` with [`Health::describe`] (`ready`) when the worker
//!   is ready, else `503` with it (`waiting for: tunnel`, `draining`);
//! - anything else: `404`.
//!
//! It serves no session data, so unlike the debug listener it may bind any
//! address (a Kubernetes probe reaches the pod's IP). What anyone who reaches
//! it can hold is bounded as for the gateway's API ([`crate::net::httpd`]):
//! [`MAX_CONNECTIONS`] at once, a request's head within 10 s, an idle
//! connection 30 s. It starts before the ways in (a startup probe is answered
//! during a long tunnel dial) and is stopped last, after the sessions closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use super::health::Health;
use super::metrics::WorkerMetrics;
use super::{Config, WorkerError};
use crate::session::registry::Registry;

/// Connections served at once; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;

const LIMITS: crate::net::httpd::Limits = crate::net::httpd::Limits {
    max_connections: MAX_CONNECTIONS,
    header_read_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(30),
    drain: crate::net::httpd::DRAIN,
};

/// A running metrics and health listener.
pub struct Probes {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Probed {
    metrics: Arc<WorkerMetrics>,
    health: Arc<Health>,
}

impl Probes {
    /// Binds `[metrics] listen` and serves it; `None` when the worker has
    /// none. The metrics are the registry's (a registry without any gets
    /// its own). The ways in `config` configures are marked expected in
    /// `health` first, so that a probe answered before they start is not
    /// told `ready`.
    pub async fn start(
        config: &Config,
        registry: &Registry,
        health: Arc<Health>,
    ) -> Result<Option<Probes>, WorkerError> {
        let Some(addr) = config.metrics_listen else {
            return Ok(None);
        };
        health.expect_configured(config);
        let metrics = match registry.metrics() {
            Some(m) => m.clone(),
            None => Arc::new(WorkerMetrics::new(
                config.policies.iter().map(|p| p.name.as_str()),
                config.capacity,
            )),
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|cause| WorkerError::MetricsListen { addr, cause })?;
        let addr = listener
            .local_addr()
            .map_err(|cause| WorkerError::MetricsListen { addr, cause })?;
        let (stop, stopped) = watch::channel(false);
        let refusal = crate::net::httpd::Refusal {
            content_type: "text/plain; charset=utf-8",
            body: format!(
                "the metrics listener holds its limit of {MAX_CONNECTIONS} connections; retry shortly\n"
            ),
        };
        let task = tokio::spawn(crate::net::httpd::serve(
            listener,
            "metrics",
            router(metrics, health),
            LIMITS,
            refusal,
            Arc::new(crate::net::httpd::Unobserved),
            stopped,
        ));
        Ok(Some(Probes { addr, stop, task }))
    }

    /// The bound address (the configured port may be 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and lets requests in flight finish (bounded).
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

fn router(metrics: Arc<WorkerMetrics>, health: Arc<Health>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(scrape))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(Probed { metrics, health })
}

async fn scrape(State(p): State<Probed>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)],
        p.metrics.render(p.health.ready()),
    )
}

async fn readyz(State(p): State<Probed>) -> impl IntoResponse {
    // One reading: the description says `ready` exactly when the worker is.
    let described = p.health.describe();
    let status = if described == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, format!("{described}\n"))
}
