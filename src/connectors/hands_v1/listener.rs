//! The debug listener: hands.v1 served on a loopback address with no
//! authentication (the worker configuration refuses any other address), for
//! local clients and tests.

use std::net::SocketAddr;

use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("binding the debug listener {addr}: {cause}")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("serving: {}", crate::util::error_chain(.0))]
    Serve(tonic::transport::Error),
}

/// Serves `routes` on `addr` until `shutdown` turns true (running calls'
/// streams are waited for); `on_bound` learns the bound address (the port may
/// be 0).
pub async fn serve(
    addr: SocketAddr,
    routes: tonic::service::Routes,
    on_bound: impl FnOnce(SocketAddr),
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ListenError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|cause| ListenError::Bind { addr, cause })?;
    let bound = listener
        .local_addr()
        .map_err(|cause| ListenError::Bind { addr, cause })?;
    on_bound(bound);
    tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            // No Nagle: Started and Finished are separate small writes, and
            // delayed ACKs would hold the second for 40 ms.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = shutdown.wait_for(|s| *s).await;
            },
        )
        .await
        .map_err(ListenError::Serve)
}
