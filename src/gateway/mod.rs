//! The reference gateway (`hands gateway --config FILE`): where workers' tunnels
//! end and agent loops come in. It accepts worker connections with mTLS (a
//! client certificate is required; its identity becomes the worker id), keeps
//! a registry of connected workers ([`workers::Workers`]), and serves the HTTP
//! API of [`api`] with Prometheus metrics. Each listener has its own
//! connection budget, and API connections their timers ([`listen`]), so that
//! what anyone can open on the API never starves the tunnels.
//!
//! A gateway keeps no session state: a session id carries its worker id, so
//! replicas behind one load balancer route any request to the right worker as
//! long as the worker keeps a tunnel to each replica (its `tunnel.endpoints`).

pub mod api;
pub mod client;
pub mod config;
pub mod listen;
pub mod metrics;
pub mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use config::Config;

/// The shared state of one gateway process.
pub struct Gateway {
    pub workers: workers::Workers,
    pub metrics: metrics::Metrics,
    token: String,
    reconnect_wait: Duration,
    /// The longest pause in a request body being received.
    body_idle_timeout: Duration,
}

/// Where a running gateway listens.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub tunnel: SocketAddr,
    pub api: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("binding {what} {addr}: {cause}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        cause: std::io::Error,
    },
    // Causes are part of each message and not also a `source()`, so that a
    // printer of error chains shows them once.
    #[error("tunnel TLS: {0}")]
    Tls(crate::tls::TlsError),
    #[error("connection budgets: {0}")]
    Budgets(listen::BudgetError),
}

impl From<crate::tls::TlsError> for GatewayError {
    fn from(e: crate::tls::TlsError) -> Self {
        GatewayError::Tls(e)
    }
}

impl From<listen::BudgetError> for GatewayError {
    fn from(e: listen::BudgetError) -> Self {
        GatewayError::Budgets(e)
    }
}

/// `WORKER_ID:SUFFIX`, with a random suffix. None when the worker id is too
/// long for the result to be a valid id.
pub fn new_session_id(worker_id: &str) -> Option<String> {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).ok()?;
    let suffix: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let id = format!("{worker_id}:s{suffix}");
    crate::session::registry::valid_id(&id).then_some(id)
}

/// The worker part of a gateway session id (worker ids may contain `:`, the
/// suffix never does).
pub fn worker_of_session(session_id: &str) -> Option<&str> {
    let (worker, suffix) = session_id.rsplit_once(':')?;
    (!worker.is_empty() && !suffix.is_empty()).then_some(worker)
}

async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, GatewayError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|cause| GatewayError::Bind { what, addr, cause })
}

/// Runs the gateway until `shutdown` turns true.
pub async fn run(
    config: Config,
    on_bound: impl FnOnce(Bound, Arc<Gateway>),
    shutdown: watch::Receiver<bool>,
) -> Result<(), GatewayError> {
    let budgets =
        listen::Budgets::resolve(config.tunnel_max_connections, config.api_max_connections)?;
    let tls = Arc::new(crate::tls::ServerTls::server(config.tls.clone())?);
    let tunnel_listener = bind("the tunnel listener", config.tunnel_listen).await?;
    let api_listener = bind("the API listener", config.api_listen).await?;
    let local = |l: &tokio::net::TcpListener, what, addr| {
        l.local_addr()
            .map_err(|cause| GatewayError::Bind { what, addr, cause })
    };
    let bound = Bound {
        tunnel: local(
            &tunnel_listener,
            "the tunnel listener",
            config.tunnel_listen,
        )?,
        api: local(&api_listener, "the API listener", config.api_listen)?,
    };
    tracing::info!(
        tunnel = budgets.tunnel,
        api = budgets.api,
        nofile = budgets.nofile,
        "connection budgets"
    );
    let gw = Arc::new(Gateway {
        workers: workers::Workers::default(),
        metrics: metrics::Metrics::default(),
        token: config.token.clone(),
        reconnect_wait: config.reconnect_wait,
        body_idle_timeout: config.idle_timeout,
    });
    on_bound(bound, gw.clone());

    let accept_cfg = Arc::new(workers::AcceptConfig {
        allowed: config.allowed_workers.clone(),
        keepalive: config.keepalive,
    });
    let accept = {
        let gw = gw.clone();
        let mut stop = shutdown.clone();
        async move {
            let mut tunnels = tokio::task::JoinSet::new();
            let mut gate = listen::TunnelGate::new(budgets.tunnel);
            let mut acceptor = listen::Acceptor::new(tunnel_listener, "tunnel", gw.clone());
            while let Some((tcp, peer)) = acceptor.accept(&mut stop).await {
                let Some(permit) = gate.admit(&gw, peer) else {
                    continue;
                };
                let gw = gw.clone();
                let tls = tls.get();
                let cfg = accept_cfg.clone();
                tunnels.spawn(async move {
                    let _permit = permit;
                    let registered_gw = gw.clone();
                    let r = workers::serve_tunnel(tcp, peer, tls, &cfg, &gw.workers, |id| {
                        registered_gw
                            .metrics
                            .inc("hands_gateway_tunnels_accepted_total", &[]);
                        tracing::info!(worker = id, %peer, "worker connected");
                    })
                    .await;
                    match r {
                        Ok(id) => tracing::info!(worker = id, %peer, "worker tunnel closed"),
                        Err(e) => {
                            gw.metrics.inc(
                                "hands_gateway_tunnels_rejected_total",
                                &[("reason", e.label())],
                            );
                            tracing::warn!(%peer, error = %e, "worker tunnel refused");
                        }
                    }
                });
                while tunnels.try_join_next().is_some() {}
            }
            // Dropping the set ends every tunnel: workers see the connection
            // close and redial (another replica, or this one after restart).
            tunnels.shutdown().await;
        }
    };
    let api = listen::serve_api(
        api_listener,
        api::router(gw.clone()),
        listen::ApiLimits {
            max_connections: budgets.api,
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
        },
        gw.clone(),
        shutdown,
    );
    tokio::join!(accept, api);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_carry_their_worker() {
        let id = new_session_id("build:host-1").unwrap();
        assert!(id.starts_with("build:host-1:s"), "{id}");
        assert_eq!(worker_of_session(&id), Some("build:host-1"));
        assert_eq!(worker_of_session("nocolon"), None);
        assert_eq!(worker_of_session(":x"), None);
        assert!(new_session_id(&"w".repeat(120)).is_none());
        assert_ne!(new_session_id("w"), new_session_id("w"));
    }

    #[test]
    fn tool_definitions_name_the_six_tools() {
        let defs = api::tool_definitions();
        let names: Vec<&str> = defs
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["bash", "read", "write", "edit", "glob", "grep"]);
        for t in defs.as_array().unwrap() {
            assert_eq!(t["input_schema"]["type"], "object");
            assert!(t["description"].as_str().unwrap().len() > 20);
        }
    }
}
