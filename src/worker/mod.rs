//! The worker daemon: one session registry, and the ways brains reach it: the
//! outbound mTLS tunnel (`crate::tunnel`) and the loopback debug listener, which
//! serve the same routes (`hands.v1.Sandbox` with gRPC health and reflection,
//! so `grpcurl` works); the MCP listener (`[mcp]`, streamable HTTP); and the
//! Claude Managed Agents connector. While it serves, sessions left idle by their clients
//! are closed (`[sessions] idle_timeout_secs`).
//!
//! Stopping ([`serve`] once `shutdown` turns true: the first SIGTERM, a
//! drain): the tunnels end with GOAWAY, the debug and MCP listeners stop
//! accepting and the connector stops polling, so no session or call starts; the calls
//! still running (the connector's calls in flight too) get `shutdown_grace`
//! to finish, and the worker logs which ones it waits for. Those still
//! running then are cut short: killed with every process they started, their
//! result saying so (outcome `SHUTDOWN`, never a normal result). The results
//! get [`DELIVERY`] to reach their callers, then the servers are dropped
//! whatever they still hold.
//!
//! Around it: readiness ([`health`]), the service manager's notifications
//! ([`notify`]) and SIGHUP ([`reload`]).

pub mod config;
pub mod health;
pub mod metrics;
pub mod notify;
pub mod probes;
pub mod reload;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::connectors::hands_v1::{detect_isolation, SandboxService};
use crate::proto::v1::sandbox_server::SandboxServer;
use crate::sandbox::SandboxConfig;
use crate::session::registry::Registry;

pub use config::Config;

/// Causes are part of each message (with their own causes, for libraries
/// whose messages leave them out) and not also a `source()`, so that a printer
/// of error chains shows them once.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Listen(#[from] crate::connectors::hands_v1::listener::ListenError),
    #[error("gRPC reflection: {}", crate::util::error_chain(.0))]
    Reflection(tonic_reflection::server::Error),
    #[error("tunnel TLS: {0}")]
    Tls(crate::net::tls::TlsError),
    #[error("Claude Managed Agents connector: {}", crate::util::error_chain(.0))]
    Connector(crate::connectors::cma::worker::ConnectorError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Mcp(#[from] crate::connectors::mcp::http::HttpError),
    #[error("metrics listener {addr}: {cause}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
}

/// How long cut-short results (and finished ones) have to reach their callers
/// once every call has ended, before the servers are dropped.
pub const DELIVERY: Duration = Duration::from_secs(5);

/// Formatted and mounted workspace filesystems kept ready per environment.
const WORKSPACES_READY: usize = 2;

/// Prepares the host for this worker's sessions: keeps workspace filesystems
/// of each environment's size formatted and mounted ahead of time (so opening a
/// session only takes one), and warns when sessions that fill their workspaces
/// could fill the data directory.
pub fn prepare_workspaces(config: &Config, sandbox: &SandboxConfig) {
    // Workspace filesystems formatted ahead of time, so that opening a session
    // only mounts one.
    for p in &config.policies {
        sandbox.workspaces.keep_ready(
            crate::workspace::Geometry {
                bytes: p.limits.disk_bytes,
                inodes: p.limits.disk_inodes,
            },
            WORKSPACES_READY,
        );
    }
    // Workspace images are sparse: the data directory's filesystem is only
    // spent as sessions write. Say so when full sessions could not all fit.
    let largest = config
        .policies
        .iter()
        .map(|p| p.limits.disk_bytes)
        .max()
        .unwrap_or(0);
    if let Ok(vfs) = nix::sys::statvfs::statvfs(&sandbox.data_dir) {
        let free = vfs.blocks_available().saturating_mul(vfs.fragment_size());
        let worst = largest.saturating_mul(config.capacity as u64);
        if worst > free {
            tracing::warn!(
                data_dir = %sandbox.data_dir.display(),
                free_bytes = free,
                worst_case_bytes = worst,
                "capacity × limits.disk exceeds the free space of the data directory: \
                 sessions that fill their workspaces could fill it"
            );
        }
    }
}

/// The audit log a worker writes: `[audit] file`, else `$HANDS_AUDIT_LOG`,
/// else `audit.jsonl` in the data directory.
pub fn audit_file(config: &Config, sandbox: &SandboxConfig) -> std::path::PathBuf {
    config
        .audit
        .file
        .clone()
        .unwrap_or_else(|| crate::cli::default_audit_file(sandbox))
}

/// The registry a worker serves from, auditing to the configured log and
/// counting in the worker's metrics.
pub fn registry(config: &Config, sandbox: SandboxConfig) -> Result<Arc<Registry>, WorkerError> {
    let file = audit_file(config, &sandbox);
    let log = crate::audit::AuditLog::open(&file, config.audit.max_bytes, config.audit.keep)?;
    let audit = crate::audit::Auditor::new(log, config.worker_id.clone());
    let metrics = metrics::WorkerMetrics::new(
        config.policies.iter().map(|p| p.name.as_str()),
        config.capacity,
    );
    Ok(Arc::new(
        Registry::new(sandbox, config.policies.iter().cloned(), config.capacity)
            .with_journal_limits(config.journal)
            .with_idle_timeout(config.session_idle_timeout)
            .with_audit(audit)
            .with_metrics(Arc::new(metrics)),
    ))
}

/// The routes a worker serves on every connection, tunnelled or not:
/// `hands.v1.Sandbox`, gRPC health and reflection.
pub async fn routes(
    config: &Config,
    registry: Arc<Registry>,
) -> Result<tonic::service::Routes, WorkerError> {
    let service = SandboxService::new(registry, config.worker_id.clone(), detect_isolation());
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SandboxServer<SandboxService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::DESCRIPTOR_SET)
        .build_v1()
        .map_err(WorkerError::Reflection)?;
    let mut routes = tonic::service::RoutesBuilder::default();
    routes
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service.into_server());
    Ok(routes.routes())
}

/// Serves every configured way in (the tunnel's connections, the debug
/// listener and the Claude Managed Agents connector) until `stop` turns true,
/// or until the connector gives up (its environment key refused): then the
/// rest stops too, so that a worker never runs on half-dead, and the
/// connector's error is returned. `on_bound` learns the debug listener's
/// bound address and `on_mcp_bound` the MCP listener's (the configured port
/// may be 0).
pub async fn serve(
    config: &Config,
    registry: Arc<Registry>,
    on_bound: impl FnOnce(std::net::SocketAddr),
    on_mcp_bound: impl FnOnce(std::net::SocketAddr),
    tunnel_states: Option<watch::Sender<Vec<crate::connectors::hands_v1::tunnel::SlotState>>>,
    health: Arc<health::Health>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    use health::Part;
    // What every part below stops on: the caller's `stop`, or the connector's end.
    let (stop_all, shutdown) = watch::channel(false);
    let forward = async {
        crate::util::stopped(&mut stop).await;
        stop_all.send_replace(true);
        std::future::pending::<()>().await
    };
    let cma_registry = registry.clone();
    let journals = registry.journals().clone();
    // The instance id tells this process apart from another with the same
    // worker_id (the gateway's log names it when both connect).
    tracing::info!(
        worker_id = %config.worker_id,
        instance_id = %registry.instance_id(),
        session_idle_timeout_secs = registry.idle_timeout().map_or(0, |t| t.as_secs()),
        "worker serving"
    );
    let idle = registry.clone().close_idle_until(shutdown.clone());
    let metrics = registry.metrics().cloned();
    let mcp_registry = registry.clone();
    let routes = routes(config, registry).await?;
    let tunnel = match &config.tunnel {
        Some(t) => {
            // Up while any of the tunnel's connections is.
            health.expect(Part::Tunnel);
            let states = tunnel_states.unwrap_or_else(|| watch::channel(Vec::new()).0);
            let mut seen = states.subscribe();
            let h = health.clone();
            tokio::spawn(async move {
                while seen.changed().await.is_ok() {
                    let up = seen.borrow_and_update().iter().any(|s| {
                        matches!(s, crate::connectors::hands_v1::tunnel::SlotState::Connected)
                    });
                    h.set(Part::Tunnel, up);
                }
            });
            let tls = Arc::new(
                crate::net::tls::ClientTls::client(t.tls.clone()).map_err(WorkerError::Tls)?,
            );
            Some(crate::connectors::hands_v1::tunnel::run(
                Arc::new(t.clone()),
                tls,
                routes.clone(),
                shutdown.clone(),
                Some(states),
                metrics,
            ))
        }
        None => None,
    };
    if config.listen.is_some() {
        health.expect(Part::Listener);
    }
    let on_bound = {
        let h = health.clone();
        move |addr| {
            h.set(Part::Listener, true);
            on_bound(addr)
        }
    };
    if config.anthropic.is_some() {
        health.expect(Part::Queue);
    }
    if config.mcp.is_some() {
        health.expect(Part::Mcp);
    }
    let debug = async {
        match config.listen {
            Some(addr) => {
                crate::connectors::hands_v1::listener::serve(
                    addr,
                    routes.clone(),
                    on_bound,
                    shutdown.clone(),
                )
                .await
            }
            None => Ok(()),
        }
        .map_err(WorkerError::from)
    };
    let tunnel = async {
        if let Some(t) = tunnel {
            t.await
        }
    };
    let mcp = async {
        match &config.mcp {
            Some(m) => crate::connectors::mcp::http::serve(
                m.clone(),
                mcp_registry,
                config.shutdown_grace,
                {
                    let h = health.clone();
                    move |addr| {
                        h.set(Part::Mcp, true);
                        on_mcp_bound(addr)
                    }
                },
                shutdown.clone(),
            )
            .await
            .map_err(WorkerError::from),
            None => Ok(()),
        }
    };
    let anthropic = async {
        match &config.anthropic {
            Some(a) => crate::connectors::cma::worker::run(
                a.clone(),
                config.worker_id.clone(),
                cma_registry,
                health.clone(),
                shutdown.clone(),
            )
            .await
            .map_err(WorkerError::Connector)
            .inspect_err(|_| {
                // The error itself is the caller's to report, once.
                tracing::info!("the connector stopped; stopping the worker");
                stop_all.send_replace(true);
            }),
            None => Ok(()),
        }
    };
    // The hands.v1 servers wait for their running calls when they stop; that
    // wait is bounded here. The connector's items have their own, bounded
    // teardown (memory flush), which this does not cut.
    let hands_v1 = async {
        let servers = async {
            let (debug, (), mcp) = tokio::join!(debug, tunnel, mcp);
            debug.and(mcp)
        };
        tokio::select! {
            r = servers => r,
            () = drain(&journals, config.shutdown_grace, shutdown.clone()) => {
                tracing::warn!(
                    delivery_secs = DELIVERY.as_secs(),
                    "stopping: connections still open after every call ended; closing them"
                );
                Ok(())
            }
        }
    };
    let both = async {
        let (hands_v1, anthropic) = tokio::join!(hands_v1, anthropic);
        hands_v1.and(anthropic)
    };
    // The idle sweep runs beside the ways in, and must not hold serve() open
    // once they have ended (a failed bind returns at once).
    let idle = async {
        idle.await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        r = both => r,
        () = forward => unreachable!("never resolves"),
        () = idle => unreachable!("pending never resolves"),
    }
}

/// One line per call: its id, tool and how long it has run.
fn describe(calls: &[Arc<crate::session::journal::CallRecord>]) -> String {
    calls
        .iter()
        .map(|c| {
            format!(
                "{} ({}, running {:.1}s)",
                c.call_id,
                c.tool,
                c.started.elapsed().as_secs_f64()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Once `shutdown` turns true: waits up to `grace` for the running calls
/// (saying which), cuts short those still running, then gives the results
/// [`DELIVERY`] to reach their callers. Resolves only after all of that; the
/// servers normally finish first.
async fn drain(
    journals: &crate::session::journal::JournalStore,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    crate::util::stopped(&mut shutdown).await;
    let deadline = tokio::time::Instant::now() + grace;
    let running = journals.running();
    if running.is_empty() {
        tracing::info!("stopping: no call is running");
    } else {
        tracing::warn!(
            calls = running.len(),
            grace_secs = grace.as_secs(),
            "stopping: waiting up to {}s for {} running call(s) to finish: {}",
            grace.as_secs(),
            running.len(),
            describe(&running)
        );
    }
    loop {
        let running = journals.running();
        if running.is_empty() {
            break;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            let cut = journals.cut_short(grace);
            tracing::warn!(
                calls = cut.len(),
                "stopping: cutting short {} call(s) still running after {}s: {}",
                cut.len(),
                grace.as_secs(),
                describe(&cut)
            );
            // A cut-short call ends as soon as its processes are killed; the
            // wait for that is bounded all the same.
            let killed = tokio::time::Instant::now() + DELIVERY;
            while !journals.running().is_empty() {
                if tokio::time::Instant::now() >= killed {
                    let left = journals.running();
                    tracing::error!(
                        calls = left.len(),
                        "stopping: {} call(s) did not end when cut short: {}",
                        left.len(),
                        describe(&left)
                    );
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            break;
        }
        tokio::time::sleep((deadline - now).min(Duration::from_millis(100))).await;
    }
    tokio::time::sleep(DELIVERY).await;
}
