//! Networking shared by the connectors and the daemons: TLS configurations
//! (the tunnel's mTLS both ends, the system roots of HTTPS APIs), the dial
//! through an HTTP CONNECT proxy (used by both the hands.v1 tunnel and the
//! Claude Managed Agents client), the HTTP client connector over it
//! ([`client`]), and the bounded HTTP/1.1 server of the gateway's API and the
//! worker's metrics listener ([`httpd`]).

pub mod client;
pub mod httpd;
pub mod proxy;
pub mod tls;

use std::time::Duration;

use tokio::net::TcpStream;

use proxy::{Proxy, ProxyError};

/// How the proxy for a dial is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyChoice {
    /// `HTTPS_PROXY` / `NO_PROXY` from the environment.
    FromEnv,
    /// Never use a proxy.
    Direct,
    /// Always this proxy.
    Explicit(Proxy),
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connecting to {endpoint}: {cause}")]
    Tcp {
        endpoint: String,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("TLS handshake with {endpoint}: {cause}")]
    Handshake {
        endpoint: String,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{endpoint}: timed out after {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
}

/// Opens a TCP connection to `host:port`, directly or through the CONNECT
/// proxy `choice` picks, within `timeout`, with Nagle off (every caller speaks
/// small request/response frames over it).
pub async fn dial(
    host: &str,
    port: u16,
    choice: &ProxyChoice,
    timeout: Duration,
) -> Result<TcpStream, DialError> {
    let proxy = match choice {
        ProxyChoice::Direct => None,
        ProxyChoice::Explicit(p) => Some(p.clone()),
        ProxyChoice::FromEnv => Proxy::from_env(host, port)?,
    };
    let endpoint = || {
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    };
    let tcp = match proxy {
        Some(p) => p.connect(host, port, timeout).await?,
        None => match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
            Ok(r) => r.map_err(|cause| DialError::Tcp {
                endpoint: endpoint(),
                cause,
            })?,
            Err(_) => {
                return Err(DialError::Timeout {
                    endpoint: endpoint(),
                    timeout,
                })
            }
        },
    };
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}
