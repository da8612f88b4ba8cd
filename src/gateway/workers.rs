//! The gateway's side of the tunnel: it accepts a worker's TLS connection,
//! learns the worker's identity from its client certificate, and becomes the
//! HTTP/2 *client* on that connection, calling the `hands.v1.Sandbox` the
//! worker serves. [`Workers`] is the registry of connected workers; a worker
//! with several connections (one per gateway replica, or N to this one) is
//! reachable while any of them lives.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::proto::v1;
use crate::proto::v1::sandbox_client::SandboxClient;

/// The HTTP/2 client half of one tunnel connection, as a tower service tonic
/// can call through.
#[derive(Clone)]
pub struct TunnelChannel(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower::Service<http::Request<tonic::body::Body>> for TunnelChannel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

pub type Client = SandboxClient<TunnelChannel>;

/// One live tunnel connection.
#[derive(Clone)]
pub struct Conn {
    pub id: u64,
    pub client: Client,
    pub peer: SocketAddr,
    pub since: Instant,
}

struct Entry {
    conns: Vec<Conn>,
    info: v1::InfoResponse,
    next: usize,
}

/// What `GET /v1/workers` shows of a worker.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerView {
    pub worker_id: String,
    pub version: String,
    pub connections: usize,
    pub capacity: u32,
    pub environments: Vec<String>,
}

/// Connected workers by id.
#[derive(Default)]
pub struct Workers {
    inner: Mutex<HashMap<String, Entry>>,
    next_id: AtomicU64,
    changed: tokio::sync::Notify,
}

impl Workers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(
        &self,
        worker_id: &str,
        client: Client,
        peer: SocketAddr,
        info: v1::InfoResponse,
    ) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            id,
            client,
            peer,
            since: Instant::now(),
        };
        let mut map = self.lock();
        let e = map.entry(worker_id.to_string()).or_insert_with(|| Entry {
            conns: Vec::new(),
            info: info.clone(),
            next: 0,
        });
        e.info = info;
        e.conns.push(conn);
        drop(map);
        self.changed.notify_waiters();
        id
    }

    fn remove(&self, worker_id: &str, conn: u64) {
        let mut map = self.lock();
        if let Some(e) = map.get_mut(worker_id) {
            e.conns.retain(|c| c.id != conn);
            if e.conns.is_empty() {
                map.remove(worker_id);
            }
        }
        drop(map);
        self.changed.notify_waiters();
    }

    /// A connection to `worker_id`, round robin, if one is up.
    pub fn pick(&self, worker_id: &str) -> Option<Conn> {
        let mut map = self.lock();
        let e = map.get_mut(worker_id)?;
        if e.conns.is_empty() {
            return None;
        }
        e.next = (e.next + 1) % e.conns.len();
        Some(e.conns[e.next].clone())
    }

    /// Like [`Workers::pick`], waiting up to `wait` for the worker to (re)connect.
    pub async fn wait_for(&self, worker_id: &str, wait: Duration) -> Option<Conn> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(c) = self.pick(worker_id) {
                return Some(c);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// A connected worker offering `environment` (the one with most spare
    /// capacity, as last reported), or the named one.
    pub fn choose(&self, environment: &str, worker_id: Option<&str>) -> Option<String> {
        let map = self.lock();
        map.iter()
            .filter(|(id, e)| {
                worker_id.is_none_or(|w| w == id.as_str())
                    && !e.conns.is_empty()
                    && e.info
                        .environments
                        .iter()
                        .any(|env| env.name == environment)
            })
            .max_by_key(|(id, e)| {
                (
                    e.info.capacity.saturating_sub(e.info.open_sessions),
                    std::cmp::Reverse((*id).clone()),
                )
            })
            .map(|(id, _)| id.clone())
    }

    /// Records a worker's fresher Info (open sessions, environments).
    pub fn update_info(&self, worker_id: &str, info: v1::InfoResponse) {
        if let Some(e) = self.lock().get_mut(worker_id) {
            e.info = info;
        }
    }

    pub fn list(&self) -> Vec<WorkerView> {
        let map = self.lock();
        let mut v: Vec<WorkerView> = map
            .iter()
            .map(|(id, e)| WorkerView {
                worker_id: id.clone(),
                version: e.info.version.clone(),
                connections: e.conns.len(),
                capacity: e.info.capacity,
                environments: e.info.environments.iter().map(|x| x.name.clone()).collect(),
            })
            .collect();
        v.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        v
    }

    /// (workers, connections) connected now.
    pub fn counts(&self) -> (usize, usize) {
        let map = self.lock();
        (map.len(), map.values().map(|e| e.conns.len()).sum())
    }
}

/// Why an accepted connection did not become a registered tunnel.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("TLS handshake timed out")]
    Timeout,
    #[error("{0}")]
    Identity(String),
    #[error("worker {0:?} is not in tunnel.allowed_workers")]
    NotAllowed(String),
    #[error("HTTP/2 handshake: {0}")]
    Http2(hyper::Error),
    #[error("Info: {0}")]
    Info(String),
}

impl AcceptError {
    /// The metric label of this failure.
    pub fn label(&self) -> &'static str {
        match self {
            AcceptError::Handshake(_) | AcceptError::Timeout => "tls",
            AcceptError::Identity(_) | AcceptError::NotAllowed(_) => "identity",
            AcceptError::Http2(_) => "http2",
            AcceptError::Info(_) => "info",
        }
    }
}

/// Unregisters a connection however its serving future ends (closed, or
/// dropped with the gateway).
struct Registration<'a> {
    workers: &'a Workers,
    worker_id: &'a str,
    conn: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.workers.remove(self.worker_id, self.conn);
    }
}

/// Settings of the accepting side.
pub struct AcceptConfig {
    pub allowed: Option<Vec<String>>,
    pub keepalive: Duration,
}

/// Handshakes one accepted TCP connection, registers the worker, and serves
/// until the connection ends (then unregisters it). Returns the worker id.
pub async fn serve_tunnel(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    cfg: &AcceptConfig,
    workers: &Workers,
    on_registered: impl FnOnce(&str),
) -> Result<String, AcceptError> {
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(AcceptError::Handshake(e)),
        Err(_) => return Err(AcceptError::Timeout),
    };
    let cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| AcceptError::Identity("no client certificate".into()))?;
    let worker_id =
        crate::tls::worker_identity(cert).map_err(|e| AcceptError::Identity(e.to_string()))?;
    if let Some(allowed) = &cfg.allowed {
        if !allowed.contains(&worker_id) {
            return Err(AcceptError::NotAllowed(worker_id));
        }
    }
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(cfg.keepalive)
        .keep_alive_timeout(cfg.keepalive)
        .keep_alive_while_idle(true)
        // Fixed windows, not adaptive ones: BDP estimation can grow a stream's
        // window to the connection's, and then one consumer that stops
        // reading would stall every call on the tunnel. A stalled stream can
        // hold at most 1 MiB of the connection's 64 MiB.
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(64 << 20)
        .max_concurrent_reset_streams(1024);
    let (send, conn) = builder
        .handshake(TokioIo::new(stream))
        .await
        .map_err(AcceptError::Http2)?;
    // The connection is driven here, not on a task of its own: when this
    // future is dropped (the gateway stops), the connection goes with it.
    tokio::pin!(conn);
    let origin: http::Uri = "http://worker.hands".parse().expect("static URI");
    let mut client = SandboxClient::with_origin(TunnelChannel(send), origin)
        .max_decoding_message_size(crate::service::MAX_MESSAGE)
        .max_encoding_message_size(crate::service::MAX_MESSAGE);
    let info = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(10), client.info(v1::InfoRequest {})) => match r {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => return Err(AcceptError::Info(s.message().to_string())),
            Err(_) => return Err(AcceptError::Info("no answer within 10s".into())),
        },
        _ = &mut conn => return Err(AcceptError::Info("connection closed".into())),
    };
    if info.worker_id != worker_id {
        return Err(AcceptError::Identity(format!(
            "the worker calls itself {:?} but its certificate says {worker_id:?}",
            info.worker_id
        )));
    }
    let registration = Registration {
        workers,
        worker_id: &worker_id,
        conn: workers.add(&worker_id, client, peer, info),
    };
    on_registered(&worker_id);
    let _ = conn.await;
    drop(registration);
    Ok(worker_id)
}
