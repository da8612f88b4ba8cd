//! The gateway's side of the tunnel: it accepts a worker's TLS connection,
//! learns the worker's identity from its client certificate, and becomes the
//! HTTP/2 *client* on that connection, calling the `hands.v1.Sandbox` the
//! worker serves. [`Workers`] is the registry of connected workers; a worker
//! with several connections (one per gateway replica, or N to this one) is
//! reachable while any of them lives.
//!
//! Connections are grouped by worker id, then by the worker *process* they
//! reach (the `instance_id` of its Info): two processes with one identity are
//! two instances of one worker, never merged. A session's id names its
//! process ([`super::new_session_id`]), so each request about it goes to a
//! connection of that process, whichever of the worker's connections is up.

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
    pub worker_id: String,
    /// The tag of the worker process it reaches ([`super::instance_tag`]).
    pub instance: String,
}

/// One worker process, as its connections' Info names it.
struct Instance {
    /// As the worker reported it; empty from one that does not.
    id: String,
    tag: String,
    conns: Vec<Conn>,
    info: v1::InfoResponse,
    next: usize,
    /// When its first connection (still open) registered.
    since: Instant,
}

impl Instance {
    /// One of its connections, round robin.
    fn pick(&mut self) -> Option<Conn> {
        if self.conns.is_empty() {
            return None;
        }
        self.next = (self.next + 1) % self.conns.len();
        Some(self.conns[self.next].clone())
    }

    fn view(&self) -> InstanceView {
        InstanceView {
            instance_id: self.id.clone(),
            version: self.info.version.clone(),
            connections: self.conns.len(),
            capacity: self.info.capacity,
            open_sessions: self.info.open_sessions,
            connected_secs: self.since.elapsed().as_secs(),
        }
    }
}

/// The processes connected under one worker id, oldest first. Normally one;
/// two when a certificate is shared between hosts, or for a moment when a
/// worker restarted before its old connections were found dead.
#[derive(Default)]
struct Entry {
    instances: Vec<Instance>,
}

/// What `GET /v1/workers` shows of a worker. `version`, `capacity` and
/// `environments` are its newest process's.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerView {
    pub worker_id: String,
    pub version: String,
    pub connections: usize,
    pub capacity: u32,
    pub environments: Vec<String>,
    pub instances: Vec<InstanceView>,
}

/// One process of a worker, in [`WorkerView`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceView {
    pub instance_id: String,
    pub version: String,
    pub connections: usize,
    pub capacity: u32,
    /// As last reported (at connect, and after each open and close).
    pub open_sessions: u32,
    pub connected_secs: u64,
}

/// Where a session's requests go.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("worker {worker:?} is not connected to this gateway")]
    Unavailable { worker: String },
    /// The process that held the session is gone and another process of the
    /// worker is connected: the worker restarted, and its sessions ended with
    /// the old process.
    #[error(
        "the worker process that held the session is no longer connected, and worker {worker:?} \
         now runs as another process (instance {current}): a restarted worker's sessions end \
         with it"
    )]
    Replaced { worker: String, current: String },
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
        let tag = super::instance_tag(&info.instance_id);
        let conn = Conn {
            id,
            client,
            peer,
            since: Instant::now(),
            worker_id: worker_id.to_string(),
            instance: tag.clone(),
        };
        let mut map = self.lock();
        let e = map.entry(worker_id.to_string()).or_default();
        match e.instances.iter_mut().find(|i| i.tag == tag) {
            Some(i) => {
                i.info = info;
                i.conns.push(conn);
            }
            None => {
                if !e.instances.is_empty() {
                    let others: Vec<String> = e
                        .instances
                        .iter()
                        .map(|i| {
                            format!(
                                "{} ({} connection(s) from {})",
                                display_instance(&i.id),
                                i.conns.len(),
                                i.conns[0].peer
                            )
                        })
                        .collect();
                    tracing::warn!(
                        worker = worker_id,
                        instance = %display_instance(&info.instance_id),
                        %peer,
                        others = %others.join(", "),
                        "a second process connected with this worker identity: a restart whose \
                         old connections are not closed yet, or one certificate on two hosts; each \
                         session goes to the process that opened it, new sessions to the newest \
                         process with room"
                    );
                }
                e.instances.push(Instance {
                    id: info.instance_id.clone(),
                    tag,
                    conns: vec![conn],
                    info,
                    next: 0,
                    since: Instant::now(),
                });
            }
        }
        drop(map);
        self.changed.notify_waiters();
        id
    }

    fn remove(&self, worker_id: &str, conn: u64) {
        let mut map = self.lock();
        if let Some(e) = map.get_mut(worker_id) {
            for i in &mut e.instances {
                i.conns.retain(|c| c.id != conn);
            }
            e.instances.retain(|i| {
                if i.conns.is_empty() {
                    tracing::info!(
                        worker = worker_id,
                        instance = %display_instance(&i.id),
                        "worker process has no connection left"
                    );
                }
                !i.conns.is_empty()
            });
            if e.instances.is_empty() {
                map.remove(worker_id);
            }
        }
        drop(map);
        self.changed.notify_waiters();
    }

    /// Where a request for a session of `worker_id` goes now: a connection of
    /// the process `instance` (a tag; `None` for an id without one: the
    /// newest process).
    fn lookup(&self, worker_id: &str, instance: Option<&str>) -> Result<Option<Conn>, RouteError> {
        let mut map = self.lock();
        let Some(e) = map.get_mut(worker_id) else {
            return Ok(None);
        };
        let at = match instance {
            None => e.instances.len().checked_sub(1),
            Some(tag) => e.instances.iter().position(|i| i.tag == tag),
        };
        match (at, instance) {
            (Some(n), _) => Ok(e.instances[n].pick()),
            (None, Some(_)) if !e.instances.is_empty() => Err(RouteError::Replaced {
                worker: worker_id.to_string(),
                current: e
                    .instances
                    .iter()
                    .map(|i| display_instance(&i.id))
                    .collect::<Vec<_>>()
                    .join(" and "),
            }),
            (None, _) => Ok(None),
        }
    }

    /// A connection to the process of `worker_id` that holds a session (see
    /// [`super::SessionRoute`]), waiting up to `wait` for it to (re)connect.
    /// When another process of the worker is connected instead, the one that
    /// held the session is taken for gone (a restart) and the answer is
    /// [`RouteError::Replaced`] at once.
    pub async fn route(
        &self,
        worker_id: &str,
        instance: Option<&str>,
        wait: Duration,
    ) -> Result<Conn, RouteError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(c) = self.lookup(worker_id, instance)? {
                return Ok(c);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(RouteError::Unavailable {
                    worker: worker_id.to_string(),
                });
            }
        }
    }

    /// A connection to a process offering `environment` for a new session.
    /// Within one worker: its newest process with room (as last reported),
    /// else its newest (which answers `AT_CAPACITY`). After a restart the old
    /// process may be dead and not yet known to be, so it gets no new session
    /// while the new one has room; with one certificate on two hosts, the
    /// older host takes new sessions once the newer one is full. Between
    /// workers (of any id, or only the named one): the one whose chosen
    /// process has most room, then the lowest id.
    pub fn choose(&self, environment: &str, worker_id: Option<&str>) -> Option<Conn> {
        let mut map = self.lock();
        let (id, n) = map
            .iter()
            .filter(|(id, _)| worker_id.is_none_or(|w| w == id.as_str()))
            .filter_map(|(id, e)| {
                let offers = |i: &Instance| {
                    !i.conns.is_empty()
                        && i.info
                            .environments
                            .iter()
                            .any(|env| env.name == environment)
                };
                let room = |i: &Instance| i.info.capacity.saturating_sub(i.info.open_sessions);
                let n = e
                    .instances
                    .iter()
                    .rposition(|i| offers(i) && room(i) > 0)
                    .or_else(|| e.instances.iter().rposition(offers))?;
                Some((id, n, room(&e.instances[n])))
            })
            .max_by_key(|(id, _, room)| (*room, std::cmp::Reverse((*id).clone())))
            .map(|(id, n, _)| (id.clone(), n))?;
        map.get_mut(&id)?.instances.get_mut(n)?.pick()
    }

    /// Records fresher Info (open sessions, environments) of the process
    /// behind `conn`.
    pub fn update_info(&self, conn: &Conn, info: v1::InfoResponse) {
        if let Some(e) = self.lock().get_mut(&conn.worker_id) {
            if let Some(i) = e.instances.iter_mut().find(|i| i.tag == conn.instance) {
                i.info = info;
            }
        }
    }

    /// One connection to each connected process (of `worker_id`, or of every
    /// worker), with the process's instance id.
    pub fn processes(&self, worker_id: Option<&str>) -> Vec<(Conn, String)> {
        let mut map = self.lock();
        let mut v: Vec<(Conn, String)> = map
            .iter_mut()
            .filter(|(id, _)| worker_id.is_none_or(|w| w == id.as_str()))
            .flat_map(|(_, e)| e.instances.iter_mut())
            .filter_map(|i| Some((i.pick()?, i.id.clone())))
            .collect();
        v.sort_by(|a, b| (&a.0.worker_id, &a.1).cmp(&(&b.0.worker_id, &b.1)));
        v
    }

    pub fn list(&self) -> Vec<WorkerView> {
        let map = self.lock();
        let mut v: Vec<WorkerView> = map
            .iter()
            .filter_map(|(id, e)| {
                let newest = e.instances.last()?;
                Some(WorkerView {
                    worker_id: id.clone(),
                    version: newest.info.version.clone(),
                    connections: e.instances.iter().map(|i| i.conns.len()).sum(),
                    capacity: newest.info.capacity,
                    environments: newest
                        .info
                        .environments
                        .iter()
                        .map(|x| x.name.clone())
                        .collect(),
                    instances: e.instances.iter().map(Instance::view).collect(),
                })
            })
            .collect();
        v.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        v
    }

    /// (workers, connections) connected now.
    pub fn counts(&self) -> (usize, usize) {
        let map = self.lock();
        (
            map.len(),
            map.values()
                .flat_map(|e| &e.instances)
                .map(|i| i.conns.len())
                .sum(),
        )
    }

    /// Worker processes connected (at least one per worker id).
    pub fn process_count(&self) -> usize {
        self.lock().values().map(|e| e.instances.len()).sum()
    }
}

/// An instance id for logs and messages.
fn display_instance(id: &str) -> String {
    if id.is_empty() {
        "(no instance id)".to_string()
    } else {
        id.to_string()
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

/// Whether `id` is an instance id the protocol allows: empty, or 1 to 64
/// characters of [A-Za-z0-9._-].
pub fn valid_instance_id(id: &str) -> bool {
    id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
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
    on_registered: impl FnOnce(&str, &str),
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
        crate::net::tls::worker_identity(cert).map_err(|e| AcceptError::Identity(e.to_string()))?;
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
        .max_decoding_message_size(crate::connectors::hands_v1::MAX_MESSAGE)
        .max_encoding_message_size(crate::connectors::hands_v1::MAX_MESSAGE);
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
    if !valid_instance_id(&info.instance_id) {
        return Err(AcceptError::Info(format!(
            "instance_id {:?} is not up to 64 characters of [A-Za-z0-9._-]",
            info.instance_id.chars().take(80).collect::<String>()
        )));
    }
    let instance_id = info.instance_id.clone();
    let registration = Registration {
        workers,
        worker_id: &worker_id,
        conn: workers.add(&worker_id, client, peer, info),
    };
    on_registered(&worker_id, &instance_id);
    let _ = conn.await;
    drop(registration);
    Ok(worker_id)
}
