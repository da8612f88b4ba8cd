//! An HTTP/1.1 client connector for hyper's pooled client: `http://` over
//! TCP, `https://` over TLS with a given client configuration (the system's
//! roots for public APIs, a private CA and a client certificate for a
//! sandbox's own endpoints), through an HTTP CONNECT proxy when the
//! environment names one. Used by the Claude Managed Agents client and by
//! `hands conformance --mcp`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;

/// A connection: plain TCP or TLS over it.
pub enum Conn {
    Plain(TokioIo<tokio::net::TcpStream>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>),
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    // Vectored writes let hyper queue a large body as it is rather than copy
    // it into its write buffer (a memory upload is up to tens of MiB).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// Dials `http://` and `https://` URIs, through a CONNECT proxy when the
/// environment names one for an `https://` host (plain `http://`, a local
/// endpoint or test double, is never proxied).
#[derive(Clone)]
pub struct Connector {
    /// None: `http://` only.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// For the TCP connection, and again for the TLS handshake.
    timeout: Duration,
}

impl Connector {
    /// `https://` with the client configuration `tls` (without one, an
    /// `https://` URI is refused).
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>, timeout: Duration) -> Connector {
        Connector { tls, timeout }
    }

    /// `https://` with TLS 1.2+ and the system's root certificates.
    pub fn system_roots(timeout: Duration) -> Result<Connector, super::tls::TlsError> {
        Ok(Connector::new(
            Some(super::tls::https_client_config(None, None)?),
            timeout,
        ))
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = Conn;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let io_err = |m: String| std::io::Error::other(m);
            let https = uri.scheme_str() == Some("https");
            let host = uri
                .host()
                .ok_or_else(|| io_err(format!("no host in {uri}")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            // Plain http:// (a local test double) is never proxied.
            let choice = if https {
                super::ProxyChoice::FromEnv
            } else {
                super::ProxyChoice::Direct
            };
            let tcp = super::dial(&host, port, &choice, timeout)
                .await
                .map_err(|e| io_err(e.to_string()))?;
            if !https {
                return Ok(Conn::Plain(TokioIo::new(tcp)));
            }
            let tls = tls.ok_or_else(|| io_err(format!("{uri}: no TLS configuration")))?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| io_err(format!("{host:?} is not a TLS server name")))?;
            let tls = tokio::time::timeout(
                timeout,
                tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
            )
            .await
            .map_err(|_| io_err(format!("TLS handshake with {host}: timed out")))??;
            Ok(Conn::Tls(Box::new(TokioIo::new(tls))))
        })
    }
}
