//! The worker's outbound tunnel: it dials each gateway endpoint over TLS 1.3
//! with its client certificate, then *serves* `hands.v1.Sandbox` as the HTTP/2
//! server on the connection it dialed, while the gateway is the HTTP/2 client
//! (the roles cloudflared and grpctunnel use). Each call is its own HTTP/2
//! stream, so flow control and cancellation are per call and a slow consumer
//! stalls only its own stream.
//!
//! The worker keeps `connections` connections per endpoint, each in its own
//! loop: dial (directly or through an HTTP CONNECT proxy), handshake, serve
//! until the connection ends, then wait a full-jitter exponential backoff. The
//! backoff resets only after a connection has stayed up for `healthy_after`,
//! so a gateway that accepts and drops at once is not hammered. HTTP/2 PINGs
//! every `keepalive` detect a silent peer within twice that.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;

use crate::net::tls::ClientTls;
pub use crate::net::{DialError, ProxyChoice};

/// One gateway address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::net::proxy::authority(&self.host, self.port))
    }
}

/// Reconnect timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    /// A connection that lived this long resets the backoff.
    pub healthy_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// Full jitter: uniform in [0, min(max, base·2^attempt)].
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.max);
        let mut b = [0u8; 8];
        let r = match getrandom::fill(&mut b) {
            Ok(()) => u64::from_le_bytes(b),
            Err(_) => 0,
        };
        let nanos = ceiling.as_nanos() as u64;
        Duration::from_nanos(if nanos == 0 { 0 } else { r % (nanos + 1) })
    }
}

/// The tunnel settings of a worker.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    pub endpoints: Vec<Endpoint>,
    /// The name the gateway's certificate must carry; default each endpoint's host.
    pub server_name: Option<String>,
    pub tls: crate::net::tls::TlsFiles,
    /// Connections kept per endpoint.
    pub connections: usize,
    pub proxy: ProxyChoice,
    /// HTTP/2 PING interval; a PING unanswered for as long again ends the connection.
    pub keepalive: Duration,
    pub connect_timeout: Duration,
    pub backoff: Backoff,
}

/// What the worker logs and tests observe about one connection slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    Connecting,
    Connected,
    /// Between attempts; `error` is why the last connection failed or ended.
    Waiting {
        attempt: u32,
        error: String,
    },
}

/// Runs every connection slot until `shutdown` turns true. `routes` is the
/// service to serve on each dialed connection; `metrics` counts the
/// connections up and re-established per endpoint.
pub async fn run(
    config: Arc<TunnelConfig>,
    tls: Arc<ClientTls>,
    routes: tonic::service::Routes,
    shutdown: watch::Receiver<bool>,
    states: Option<watch::Sender<Vec<SlotState>>>,
    metrics: Option<Arc<crate::worker::metrics::WorkerMetrics>>,
) {
    if let Some(m) = &metrics {
        let names: Vec<String> = config.endpoints.iter().map(|e| e.to_string()).collect();
        m.tunnel_endpoints(names.iter().map(String::as_str));
    }
    let slots: Vec<Endpoint> = config
        .endpoints
        .iter()
        .flat_map(|e| std::iter::repeat_n(e.clone(), config.connections))
        .collect();
    let states = states.map(Arc::new);
    if let Some(s) = &states {
        s.send_replace(vec![SlotState::Connecting; slots.len()]);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, endpoint) in slots.into_iter().enumerate() {
        let slot = Slot {
            index: i,
            label: Arc::from(endpoint.to_string()),
            metrics: metrics.clone(),
            endpoint,
            config: config.clone(),
            tls: tls.clone(),
            routes: routes.clone(),
            shutdown: shutdown.clone(),
            states: states.clone(),
        };
        tasks.spawn(slot.run());
    }
    while tasks.join_next().await.is_some() {}
}

struct Slot {
    index: usize,
    endpoint: Endpoint,
    /// The endpoint as the metrics label it (configured, so bounded).
    label: Arc<str>,
    metrics: Option<Arc<crate::worker::metrics::WorkerMetrics>>,
    config: Arc<TunnelConfig>,
    tls: Arc<ClientTls>,
    routes: tonic::service::Routes,
    shutdown: watch::Receiver<bool>,
    states: Option<Arc<watch::Sender<Vec<SlotState>>>>,
}

impl Slot {
    fn set(&self, state: SlotState) {
        if let Some(s) = &self.states {
            s.send_modify(|v| v[self.index] = state);
        }
    }

    async fn run(mut self) {
        let mut attempt = 0u32;
        let mut connected_before = false;
        loop {
            if *self.shutdown.borrow() {
                return;
            }
            self.set(SlotState::Connecting);
            let started = Instant::now();
            let error = match self.dial().await {
                Ok(tls) => {
                    tracing::info!(endpoint = %self.endpoint, slot = self.index, "tunnel connected");
                    self.set(SlotState::Connected);
                    let up = self.metrics.as_ref().map(|m| {
                        if connected_before {
                            m.tunnel_reconnected(&self.label);
                        }
                        m.tunnel_up(&self.label)
                    });
                    connected_before = true;
                    let served = self.serve(tls).await;
                    drop(up);
                    match served {
                        Ok(()) => {
                            tracing::info!(endpoint = %self.endpoint, slot = self.index, "tunnel closed");
                            "closed by the gateway".to_string()
                        }
                        Err(e) => {
                            let e = crate::util::error_chain(&e);
                            tracing::warn!(endpoint = %self.endpoint, slot = self.index, error = %e, "tunnel lost");
                            e
                        }
                    }
                }
                Err(e) => {
                    let e = crate::util::error_chain(&e);
                    tracing::warn!(endpoint = %self.endpoint, slot = self.index, error = %e, "tunnel dial failed");
                    e
                }
            };
            if *self.shutdown.borrow() {
                return;
            }
            if started.elapsed() >= self.config.backoff.healthy_after {
                attempt = 0;
            }
            let delay = self.config.backoff.delay(attempt);
            attempt = attempt.saturating_add(1);
            self.set(SlotState::Waiting { attempt, error });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.changed() => {}
            }
        }
    }

    async fn dial(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, DialError> {
        let e = &self.endpoint;
        let timeout = self.config.connect_timeout;
        let tcp = crate::net::dial(&e.host, e.port, &self.config.proxy, timeout).await?;
        let name = self.config.server_name.as_deref().unwrap_or(&e.host);
        let name = crate::net::tls::server_name(name)?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.get());
        match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
            Ok(r) => r.map_err(|cause| DialError::Handshake {
                endpoint: e.to_string(),
                cause,
            }),
            Err(_) => Err(DialError::Timeout {
                endpoint: e.to_string(),
                timeout,
            }),
        }
    }

    async fn serve(
        &mut self,
        tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    ) -> Result<(), hyper::Error> {
        let service = hyper_util::service::TowerToHyperService::new(self.routes.clone());
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .keep_alive_interval(Some(self.config.keepalive))
            .keep_alive_timeout(self.config.keepalive)
            .max_concurrent_streams(1024)
            // Fixed windows (see the gateway's side): one stalled request
            // body cannot take the whole connection's window.
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(64 << 20)
            .timer(hyper_util::rt::TokioTimer::new());
        let conn = builder.serve_connection(TokioIo::new(tls), service);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = self.shutdown.changed() => {
                // GOAWAY: running calls finish streaming, new ones go elsewhere.
                conn.as_mut().graceful_shutdown();
                if let Err(e) = conn.await {
                    // The gateway may drop the connection on GOAWAY without
                    // a TLS close_notify; nothing is lost at this point.
                    tracing::debug!(error = %e, "tunnel ended during shutdown");
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_stays_under_the_ceiling() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
            healthy_after: Duration::from_secs(1),
        };
        for attempt in 0..40 {
            let ceiling = Duration::from_millis(100 * (1u64 << attempt.min(20))).min(b.max);
            for _ in 0..50 {
                assert!(b.delay(attempt) <= ceiling);
            }
        }
        // Jitter: delays are spread, not constant.
        let distinct: std::collections::HashSet<_> = (0..50).map(|_| b.delay(10)).collect();
        assert!(distinct.len() > 10);
    }
}
