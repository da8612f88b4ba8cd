//! The worker daemon: one session registry, and the ways brains reach it. For
//! now that is the loopback debug listener, which serves `hands.v1.Sandbox` with
//! gRPC health and reflection (so `grpcurl` works); the outbound mTLS tunnel is
//! the next connector and serves the same service.

pub mod config;

use std::future::Future;
use std::sync::Arc;

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
}

/// The registry a worker serves from.
pub fn registry(config: &Config, sandbox: SandboxConfig) -> Arc<Registry> {
    Arc::new(Registry::new(
        sandbox,
        config.policies.iter().cloned(),
        config.capacity,
    ))
}

/// Serves the debug listener until `shutdown` resolves. `on_bound` learns the
/// bound address (the configured port may be 0).
pub async fn serve_debug(
    config: &Config,
    registry: Arc<Registry>,
    on_bound: impl FnOnce(std::net::SocketAddr),
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    let Some(addr) = config.listen else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| WorkerError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| WorkerError::Bind { addr, source })?;
    let service = SandboxService::new(registry, config.worker_id.clone(), detect_isolation());
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SandboxServer<SandboxService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::DESCRIPTOR_SET)
        .build_v1()?;
    on_bound(bound);
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
}
