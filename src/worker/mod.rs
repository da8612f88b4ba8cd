//! The worker daemon: one session registry, and the ways brains reach it: the
//! outbound mTLS tunnel (`crate::tunnel`) and the loopback debug listener. Both
//! serve the same routes: `hands.v1.Sandbox` with gRPC health and reflection
//! (so `grpcurl` works). While it serves, sessions left idle by their clients
//! are closed (`[sessions] idle_timeout_secs`).

pub mod config;

use std::sync::Arc;

use tokio::sync::watch;

use crate::proto::v1::sandbox_server::SandboxServer;
use crate::sandbox::SandboxConfig;
use crate::service::{detect_isolation, SandboxService};
use crate::session::registry::Registry;

pub use config::Config;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("binding the debug listener {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("tunnel TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("Claude Managed Agents connector: {0}")]
    Connector(crate::cma::worker::ConnectorError),
}

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

/// The registry a worker serves from.
pub fn registry(config: &Config, sandbox: SandboxConfig) -> Arc<Registry> {
    Arc::new(
        Registry::new(sandbox, config.policies.iter().cloned(), config.capacity)
            .with_journal_limits(config.journal)
            .with_idle_timeout(config.session_idle_timeout),
    )
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
        .build_v1()?;
    let mut routes = tonic::service::RoutesBuilder::default();
    routes
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service.into_server());
    Ok(routes.routes())
}

/// Serves every configured way in (the tunnel's connections and the debug
/// listener) until `shutdown` turns true. `on_bound` learns the debug
/// listener's bound address (the configured port may be 0).
pub async fn serve(
    config: &Config,
    registry: Arc<Registry>,
    on_bound: impl FnOnce(std::net::SocketAddr),
    tunnel_states: Option<watch::Sender<Vec<crate::tunnel::SlotState>>>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    let cma_registry = registry.clone();
    // The instance id tells this process apart from another with the same
    // worker_id (the gateway's log names it when both connect).
    tracing::info!(
        worker_id = %config.worker_id,
        instance_id = %registry.instance_id(),
        session_idle_timeout_secs = registry.idle_timeout().map_or(0, |t| t.as_secs()),
        "worker serving"
    );
    let idle = registry.clone().close_idle_until(shutdown.clone());
    let routes = routes(config, registry).await?;
    let tunnel = match &config.tunnel {
        Some(t) => {
            let tls = Arc::new(crate::tls::ClientTls::client(t.tls.clone())?);
            Some(crate::tunnel::run(
                Arc::new(t.clone()),
                tls,
                routes.clone(),
                shutdown.clone(),
                tunnel_states,
            ))
        }
        None => None,
    };
    let debug = async {
        let Some(addr) = config.listen else {
            return Ok(());
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| WorkerError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| WorkerError::Bind { addr, source })?;
        on_bound(bound);
        let mut stop = shutdown.clone();
        tonic::transport::Server::builder()
            .add_routes(routes.clone())
            .serve_with_incoming_shutdown(
                // No Nagle: Started and Finished are separate small writes,
                // and delayed ACKs would hold the second for 40 ms.
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            )
            .await?;
        Ok::<_, WorkerError>(())
    };
    let tunnel = async {
        if let Some(t) = tunnel {
            t.await
        }
    };
    let anthropic = async {
        match &config.anthropic {
            Some(a) => crate::cma::worker::run(
                a.clone(),
                config.worker_id.clone(),
                cma_registry,
                shutdown.clone(),
            )
            .await
            .map_err(WorkerError::Connector),
            None => Ok(()),
        }
    };
    // The sweep runs beside the ways in, and must not hold serve() open once
    // they have ended (a failed bind returns at once).
    let idle = async {
        idle.await;
        std::future::pending::<()>().await
    };
    let (debug, (), anthropic) = tokio::select! {
        r = async { tokio::join!(debug, tunnel, anthropic) } => r,
        () = idle => unreachable!("pending never resolves"),
    };
    debug.and(anthropic)
}
