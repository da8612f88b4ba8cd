//! The reference gateway (`hands gateway --config FILE`): where workers' tunnels
//! end and agent loops come in. It accepts worker connections with mTLS (a
//! client certificate is required; its identity becomes the worker id), keeps
//! a registry of connected workers ([`workers::Workers`]), and serves the HTTP
//! API of [`api`] with Prometheus metrics. Each listener has its own
//! connection budget, and API connections their timers ([`listen`]), so that
//! what anyone can open on the API never starves the tunnels.
//!
//! A gateway keeps no session state: a session id carries its worker id and a
//! tag of the worker process that opened it, so replicas behind one load
//! balancer route any request to the right process as long as the worker
//! keeps a tunnel to each replica (its `tunnel.endpoints`).

pub mod api;
pub mod client;
pub mod config;
pub mod listen;
pub mod mcp;
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
    /// The MCP endpoints, one per environment asked for.
    pub mcp: mcp::McpEndpoints,
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
    Tls(crate::net::tls::TlsError),
    #[error("connection budgets: {0}")]
    Budgets(listen::BudgetError),
}

impl From<crate::net::tls::TlsError> for GatewayError {
    fn from(e: crate::net::tls::TlsError) -> Self {
        GatewayError::Tls(e)
    }
}

impl From<listen::BudgetError> for GatewayError {
    fn from(e: listen::BudgetError) -> Self {
        GatewayError::Budgets(e)
    }
}

/// The tag of a worker process in session ids: 8 hex digits of the SHA-256 of
/// its instance id (any string the protocol allows maps to a valid id).
pub fn instance_tag(instance_id: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, instance_id.as_bytes());
    d.as_ref()[..4].iter().map(|x| format!("{x:02x}")).collect()
}

/// `WORKER_ID:TAG-RANDOM`: the worker, the tag of the process that holds the
/// session ([`instance_tag`]), 24 random hex digits. None when the worker id
/// is too long for the result to be a valid id (over 94 characters).
pub fn new_session_id(worker_id: &str, instance_tag: &str) -> Option<String> {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).ok()?;
    let suffix: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let id = format!("{worker_id}:{instance_tag}-{suffix}");
    crate::session::registry::valid_id(&id).then_some(id)
}

/// Where a gateway session id routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRoute<'a> {
    pub worker: &'a str,
    /// The tag of the process that holds it; `None` for an id without one
    /// (from an older gateway, or made up by a client): such an id goes to
    /// the worker's newest process.
    pub instance: Option<&'a str>,
}

/// The worker and process parts of a gateway session id (worker ids may
/// contain `:`, the suffix never does).
pub fn route_of_session(session_id: &str) -> Option<SessionRoute<'_>> {
    let (worker, suffix) = session_id.rsplit_once(':')?;
    if worker.is_empty() || suffix.is_empty() {
        return None;
    }
    let hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let instance = match suffix.split_once('-') {
        Some((tag, rest)) if tag.len() == 8 && hex(tag) && rest.len() == 24 && hex(rest) => {
            Some(tag)
        }
        _ => None,
    };
    Some(SessionRoute { worker, instance })
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
    let tls = Arc::new(crate::net::tls::ServerTls::server(config.tls.clone())?);
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
        mcp: mcp::McpEndpoints::default(),
    });
    on_bound(bound, gw.clone());
    let shutdown_mcp = shutdown.clone();

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
                    let r =
                        workers::serve_tunnel(tcp, peer, tls, &cfg, &gw.workers, |id, instance| {
                            registered_gw.metrics.tunnel_accepted();
                            tracing::info!(worker = id, instance, %peer, "worker connected");
                        })
                        .await;
                    match r {
                        Ok(id) => tracing::info!(worker = id, %peer, "worker tunnel closed"),
                        Err(e) => {
                            gw.metrics.tunnel_rejected(e.label());
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
            drain: crate::net::httpd::DRAIN,
        },
        gw.clone(),
        shutdown,
    );
    let mcp_idle = async {
        if let Some(timeout) = config.mcp_idle_timeout {
            let gw = gw.clone();
            crate::connectors::mcp::http::close_idle(
                move || gw.mcp.sessions(),
                timeout,
                "api.mcp_idle_timeout_secs",
                shutdown_mcp.clone(),
            )
            .await;
        }
    };
    let mcp_close = async {
        let mut stop = shutdown_mcp.clone();
        crate::util::stopped(&mut stop).await;
        // While the tunnels may still carry the closes (best effort).
        gw.mcp.close_all().await;
    };
    tokio::join!(accept, api, mcp_idle, mcp_close);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_carry_their_worker_and_process() {
        let tag = instance_tag("0123456789abcdef0123456789abcdef");
        assert_eq!(tag.len(), 8);
        assert_ne!(tag, instance_tag("another process"));
        assert_eq!(instance_tag(""), instance_tag(""));
        let id = new_session_id("build:host-1", &tag).unwrap();
        assert!(id.starts_with(&format!("build:host-1:{tag}-")), "{id}");
        assert_eq!(
            route_of_session(&id),
            Some(SessionRoute {
                worker: "build:host-1",
                instance: Some(&tag)
            })
        );
        // Ids of an older gateway, or of a client's making: the worker only.
        let old = "w1:s0123456789abcdef01234567";
        assert_eq!(
            route_of_session(old),
            Some(SessionRoute {
                worker: "w1",
                instance: None
            })
        );
        assert_eq!(
            route_of_session("w1:ABCDEF01-0123456789abcdef01234567")
                .unwrap()
                .instance,
            None
        );
        assert_eq!(route_of_session("nocolon"), None);
        assert_eq!(route_of_session(":x"), None);
        assert_eq!(route_of_session("x:"), None);
        assert!(new_session_id(&"w".repeat(94), &tag).is_some());
        assert!(new_session_id(&"w".repeat(95), &tag).is_none());
        assert_ne!(new_session_id("w", &tag), new_session_id("w", &tag));
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
