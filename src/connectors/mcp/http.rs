//! The MCP face over streamable HTTP: the worker's `[mcp]` listener.
//!
//! Each configured path is one endpoint bound to one environment (by default
//! `/mcp/<name>` for every environment the worker offers); a client chooses
//! among them by URL and can choose nothing else. An MCP session
//! (`initialize`, then `Mcp-Session-Id` on every request) is one hands session
//! in the worker's registry, named `mcp-<Mcp-Session-Id>` in the audit log. It
//! ends on `DELETE`, when it has been idle (no call running, no request naming
//! it) for `idle_timeout_secs`, or when the worker stops; its processes are
//! then killed and its workspace removed.
//!
//! The MCP revision of 2026-07-28 has no protocol sessions: such requests are
//! answered one at a time (`tools/list` works), but a `tools/call` outside an
//! MCP session is refused with a message saying to initialize one, because a
//! sandbox whose shell and files last from one call to the next needs a
//! session to live in.
//!
//! What the listener holds for anyone who reaches it is bounded: connections
//! (`max_connections`, with the timers of [`crate::net::httpd`]), a request
//! body ([`MAX_BODY`]), sessions (the worker's `capacity`, shared with every
//! face), and calls running at once in one session
//! ([`super::MAX_CALLS_IN_FLIGHT`]).
//!
//! Only loopback is served without more: a non-loopback address needs TLS and
//! client authentication (a bearer token, client certificates, or both).
//! On loopback, `Host` must name loopback too (no DNS rebinding from a
//! browser), and a request carrying an `Origin` (one a web page made) is
//! refused everywhere.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::model::{ClientJsonRpcMessage, GetExtensions};
use rmcp::transport::streamable_http_server::session::local::{
    LocalSessionManager, LocalSessionManagerError, SessionConfig,
};
use rmcp::transport::streamable_http_server::session::{SessionId, SessionManager};
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde::Deserialize;
use tokio::sync::watch;

use crate::configfile::ConfigError;
use futures_util::future::BoxFuture;

use crate::session::call::{Connector, Origin};
use crate::session::registry::Registry;

use super::{LocalSandbox, McpFace, Sandbox};

/// The largest request body: the largest tool input a session takes, and
/// room for the JSON-RPC around it (the same bound as a stdio line).
pub const MAX_BODY: usize = super::stdio::MAX_LINE;

/// The connections served at once by default.
const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// The idle timeout of an MCP session by default: as a hands.v1 session's.
const DEFAULT_IDLE_TIMEOUT: Duration = crate::worker::config::DEFAULT_IDLE_TIMEOUT;

/// The longest idle timeout: a week.
const MAX_IDLE_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// The hosts a loopback listener accepts in `Host`.
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The id the transport gave an MCP session, handed to the face's
/// `initialize` (in the request's extensions) by [`Sessions`].
#[derive(Debug, Clone)]
pub struct McpSessionId(pub String);

/// The hands session an MCP session is: its id in the registry and the audit
/// log.
pub fn hands_session_id(mcp: &str) -> String {
    format!("mcp-{mcp}")
}

/// `[mcp]` as written in the worker's configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    listen: String,
    #[serde(default)]
    endpoints: Option<BTreeMap<String, String>>,
    #[serde(default)]
    idle_timeout_secs: Option<u64>,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default)]
    tls_cert: Option<PathBuf>,
    #[serde(default)]
    tls_key: Option<PathBuf>,
    #[serde(default)]
    client_ca: Option<PathBuf>,
    #[serde(default)]
    allowed_hosts: Option<Vec<String>>,
    #[serde(default)]
    max_connections: Option<usize>,
}

/// The files of an HTTPS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates must chain to this CA (mTLS), when given.
    pub client_ca: Option<PathBuf>,
}

/// A validated `[mcp]`.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Endpoint path → environment.
    pub endpoints: BTreeMap<String, String>,
    /// `None`: sessions are never closed for idleness.
    pub idle_timeout: Option<Duration>,
    /// The bearer token every request must carry, when set.
    token: Option<String>,
    pub tls: Option<ServerTls>,
    /// `Host` values accepted; empty: any.
    pub allowed_hosts: Vec<String>,
    pub max_connections: usize,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("endpoints", &self.endpoints)
            .field("idle_timeout", &self.idle_timeout)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

fn valid_path(p: &str) -> bool {
    p.len() <= 256
        && p.starts_with('/')
        && p.len() > 1
        && !p.ends_with('/')
        && !p.contains("//")
        && !p.split('/').any(|seg| seg == "." || seg == "..")
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'))
}

impl Raw {
    /// Validates `[mcp]`: `base` is the configuration file's directory (for
    /// relative paths), `environments` the worker's offered environments.
    pub fn validate(
        self,
        base: &Path,
        environments: &[String],
        invalid: &dyn Fn(&'static str, String) -> ConfigError,
    ) -> Result<HttpConfig, ConfigError> {
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|e| invalid("mcp.listen", format!("{:?}: {e}", self.listen)))?;
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(ServerTls {
                cert: base.join(cert),
                key: base.join(key),
                client_ca: self.client_ca.map(|c| base.join(c)),
            }),
            (None, None) => {
                if self.client_ca.is_some() {
                    return Err(invalid(
                        "mcp.client_ca",
                        "client certificates need TLS: set tls_cert and tls_key".into(),
                    ));
                }
                None
            }
            _ => {
                return Err(invalid(
                    "mcp.tls_cert",
                    "tls_cert and tls_key are set together".into(),
                ))
            }
        };
        let token = match &self.token_file {
            None => None,
            Some(f) => {
                let p = base.join(f);
                let t = std::fs::read_to_string(&p)
                    .map_err(|e| invalid("mcp.token_file", format!("{}: {e}", p.display())))?
                    .trim()
                    .to_string();
                if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(invalid(
                        "mcp.token_file",
                        format!(
                            "{}: the bearer token must be at least 16 printable characters",
                            p.display()
                        ),
                    ));
                }
                Some(t)
            }
        };
        let authenticated = token.is_some() || tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        let served_beyond_safely = tls.is_some() && authenticated;
        if !listen.ip().is_loopback() && !served_beyond_safely {
            return Err(invalid(
                "mcp.listen",
                format!(
                    "{listen} is not a loopback address: serving MCP beyond this host needs TLS \
                     (tls_cert, tls_key) and client authentication (token_file, client_ca or both)"
                ),
            ));
        }
        let endpoints = match self.endpoints {
            None => environments
                .iter()
                .map(|e| (format!("/mcp/{e}"), e.clone()))
                .collect(),
            Some(map) => map,
        };
        if endpoints.is_empty() {
            return Err(invalid("mcp.endpoints", "no endpoint to serve".into()));
        }
        for (path, env) in &endpoints {
            if !valid_path(path) {
                return Err(invalid(
                    "mcp.endpoints",
                    format!(
                        "{path:?} is not an endpoint path (/ and then [A-Za-z0-9._-] segments, at \
                         most 256 bytes, no trailing /)"
                    ),
                ));
            }
            if !environments.contains(env) {
                return Err(invalid(
                    "mcp.endpoints",
                    format!("{path}: {env:?} is not among the worker's environments"),
                ));
            }
        }
        let idle_timeout = match self.idle_timeout_secs {
            None => Some(DEFAULT_IDLE_TIMEOUT),
            Some(0) => None,
            Some(s) if s <= MAX_IDLE_TIMEOUT_SECS => Some(Duration::from_secs(s)),
            Some(_) => {
                return Err(invalid(
                    "mcp.idle_timeout_secs",
                    format!("must be between 0 (never) and {MAX_IDLE_TIMEOUT_SECS} (a week)"),
                ))
            }
        };
        let allowed_hosts = match self.allowed_hosts {
            Some(h) => h,
            // Loopback: only loopback names, against DNS rebinding. Beyond:
            // every request is authenticated; the names are the operator's.
            None if listen.ip().is_loopback() => {
                LOOPBACK_HOSTS.iter().map(|h| h.to_string()).collect()
            }
            None => Vec::new(),
        };
        let max_connections = match self.max_connections {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(n) if (1..=65536).contains(&n) => n,
            Some(_) => {
                return Err(invalid(
                    "mcp.max_connections",
                    "must be between 1 and 65536".into(),
                ))
            }
        };
        Ok(HttpConfig {
            listen,
            endpoints,
            idle_timeout,
            token,
            tls,
            allowed_hosts,
            max_connections,
        })
    }
}

/// Where an endpoint's sessions come from: this worker's registry
/// ([`LocalBackend`]), or a gateway's workers.
pub trait Backend: Send + Sync + 'static {
    /// The environment the endpoint's sessions run in.
    fn env(&self) -> &str;
    /// Opens the session of MCP session `mcp`.
    fn open<'a>(&'a self, mcp: &'a str) -> BoxFuture<'a, Result<Arc<dyn Sandbox>, String>>;
}

/// Sessions of this worker's registry, one environment.
pub struct LocalBackend {
    registry: Arc<Registry>,
    env: String,
}

impl LocalBackend {
    pub fn new(registry: Arc<Registry>, env: impl Into<String>) -> LocalBackend {
        LocalBackend {
            registry,
            env: env.into(),
        }
    }
}

impl Backend for LocalBackend {
    fn env(&self) -> &str {
        &self.env
    }

    fn open<'a>(&'a self, mcp: &'a str) -> BoxFuture<'a, Result<Arc<dyn Sandbox>, String>> {
        Box::pin(async move {
            let id = hands_session_id(mcp);
            let origin = Origin {
                connector: Connector::Mcp,
                session: id.clone(),
            };
            let (session, opened) = self
                .registry
                .open_in(&id, &self.env, origin, Vec::new(), None)
                .await
                .map_err(|e| e.to_string())?;
            if !opened {
                return Err(format!("session {id} is already open"));
            }
            let sandbox: Arc<dyn Sandbox> = Arc::new(LocalSandbox::new(
                session,
                Some((self.registry.clone(), id)),
            ));
            Ok(sandbox)
        })
    }
}

/// The MCP sessions of one endpoint: the SDK's in-memory session manager,
/// with the sandbox session of each, opened by the face's `initialize` (which
/// learns the MCP session's id from here) and closed with it.
pub struct Sessions {
    inner: LocalSessionManager,
    backend: Arc<dyn Backend>,
    open: std::sync::Mutex<HashMap<String, Arc<dyn Sandbox>>>,
}

impl Sessions {
    pub fn new(backend: Arc<dyn Backend>) -> Sessions {
        let mut inner = LocalSessionManager::default();
        // Idleness is judged here, by the sandbox session (a call running for
        // an hour keeps it), not by the SDK's timer of protocol events.
        inner.session_config = {
            let mut c = SessionConfig::default();
            c.keep_alive = None;
            c
        };
        Sessions {
            inner,
            backend,
            open: std::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn env(&self) -> &str {
        self.backend.env()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<dyn Sandbox>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the sandbox session of MCP session `mcp`.
    pub async fn open(&self, mcp: &str) -> Result<Arc<dyn Sandbox>, String> {
        let sandbox = self.backend.open(mcp).await?;
        tracing::info!(session_id = %sandbox.id(), env = %self.env(), "mcp: session opened");
        self.map().insert(mcp.to_string(), sandbox.clone());
        Ok(sandbox)
    }

    fn touch(&self, id: &SessionId) {
        if let Some(s) = self.map().get(id.as_ref()) {
            s.touch();
        }
    }

    /// The MCP sessions open now, with their sandboxes.
    fn sessions(&self) -> Vec<(SessionId, Arc<dyn Sandbox>)> {
        self.map()
            .iter()
            .map(|(id, s)| (SessionId::from(id.as_str()), s.clone()))
            .collect()
    }

    /// Closes every session (the listener stops).
    pub async fn close_all(&self) {
        let ids: Vec<SessionId> = self.inner.sessions.read().await.keys().cloned().collect();
        for id in ids {
            let _ = self.close_session(&id).await;
        }
        let left: Vec<Arc<dyn Sandbox>> = self.map().drain().map(|(_, s)| s).collect();
        for s in left {
            s.close().await;
        }
    }
}

impl SessionManager for Sessions {
    type Error = LocalSessionManagerError;
    type Transport = <LocalSessionManager as SessionManager>::Transport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        self.inner.create_session().await
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        mut message: ClientJsonRpcMessage,
    ) -> Result<rmcp::model::ServerJsonRpcMessage, Self::Error> {
        if let ClientJsonRpcMessage::Request(req) = &mut message {
            req.request
                .extensions_mut()
                .insert(McpSessionId(id.to_string()));
        }
        self.inner.initialize_session(id, message).await
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        self.inner.has_session(id).await
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        let r = self.inner.close_session(id).await;
        let sandbox = self.map().remove(id.as_ref());
        if let Some(s) = sandbox {
            s.close().await;
            tracing::info!(session_id = %s.id(), "mcp: session closed");
        }
        r
    }
    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<
        impl futures_util::Stream<Item = rmcp::transport::common::server_side_http::ServerSseMessage>
            + Send
            + Sync
            + 'static,
        Self::Error,
    > {
        self.touch(id);
        self.inner.create_stream(id, message).await
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        self.touch(id);
        self.inner.accept_message(id, message).await
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<
        impl futures_util::Stream<Item = rmcp::transport::common::server_side_http::ServerSseMessage>
            + Send
            + Sync
            + 'static,
        Self::Error,
    > {
        self.inner.create_standalone_stream(id).await
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<
        impl futures_util::Stream<Item = rmcp::transport::common::server_side_http::ServerSseMessage>
            + Send
            + Sync
            + 'static,
        Self::Error,
    > {
        self.inner.resume(id, last_event_id).await
    }
}

/// What every request passes before it reaches an endpoint.
struct Guard {
    token: Option<String>,
}

/// A JSON-RPC error as an HTTP response (MCP clients show its message).
fn refusal(status: http::StatusCode, message: &str) -> Response {
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": {"code": -32600, "message": message},
    });
    (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn guard(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    if let Some(token) = &g.token {
        let given = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !crate::util::constant_time_eq(given.as_bytes(), token.as_bytes()) {
            let mut r = refusal(
                http::StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (Authorization: Bearer TOKEN)",
            );
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    let delete = req.method() == http::Method::DELETE;
    let response = next.run(req).await;
    deleted_is_no_content(delete, response)
}

/// The SDK answers a closed session's `DELETE` with 202 and no body; MCP
/// clients (the Python SDK's among them) take 200 or 204 as success: 204.
pub fn deleted_is_no_content(delete: bool, mut response: Response) -> Response {
    if delete && response.status() == http::StatusCode::ACCEPTED {
        *response.status_mut() = http::StatusCode::NO_CONTENT;
        *response.body_mut() = axum::body::Body::empty();
    }
    response
}

/// The listener's routes: one MCP endpoint per configured path, behind the
/// guard; and the session managers, for the idle sweep.
fn router(
    cfg: &HttpConfig,
    registry: &Arc<Registry>,
    stop: &tokio_util::sync::CancellationToken,
) -> (axum::Router, Vec<Arc<Sessions>>) {
    let mut router = axum::Router::new();
    let mut managers = Vec::new();
    for (path, env) in &cfg.endpoints {
        let backend = Arc::new(LocalBackend::new(registry.clone(), env.clone()));
        let (service, sessions) = endpoint_service(backend, cfg.allowed_hosts.clone(), stop);
        managers.push(sessions);
        router = router.route_service(path, service);
    }
    let paths: Vec<String> = cfg.endpoints.keys().cloned().collect();
    let router = router
        .fallback(move |uri: http::Uri| {
            let paths = paths.clone();
            async move {
                refusal(
                    http::StatusCode::NOT_FOUND,
                    &format!(
                        "no MCP endpoint at {}; this worker serves {}",
                        uri.path(),
                        paths.join(", ")
                    ),
                )
            }
        })
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(Guard {
                token: cfg.token.clone(),
            }),
            guard,
        ));
    (router, managers)
}

/// One MCP endpoint over `backend`'s sessions: the SDK's streamable HTTP
/// service (`Host` checked against `allowed_hosts`, empty: any; bodies up to
/// [`MAX_BODY`]; every session ended when `stop` is cancelled), and its
/// sessions.
pub fn endpoint_service(
    backend: Arc<dyn Backend>,
    allowed_hosts: Vec<String>,
    stop: &tokio_util::sync::CancellationToken,
) -> (StreamableHttpService<McpFace, Sessions>, Arc<Sessions>) {
    let sessions = Arc::new(Sessions::new(backend));
    // Clients of a sandbox are programs, not web pages: a request a browser
    // sent for a page (it carries an Origin) is refused.
    let config = StreamableHttpServerConfig::default()
        .enforce_origin_validation()
        .with_allowed_hosts(allowed_hosts)
        .with_max_request_body_bytes(MAX_BODY)
        .with_sse_keep_alive(Some(Duration::from_secs(15)))
        .with_cancellation_token(stop.child_token());
    let opener = sessions.clone();
    let service = StreamableHttpService::new(
        move || Ok(McpFace::lazy(opener.clone())),
        sessions.clone(),
        config,
    );
    (service, sessions)
}

/// Closes the MCP sessions whose sandbox sessions have been idle (no call
/// running, no request naming them) for `timeout`, in the endpoints `managers`
/// yields, until `stop`. `key` names the setting in the log.
pub async fn close_idle(
    managers: impl Fn() -> Vec<Arc<Sessions>>,
    timeout: Duration,
    key: &'static str,
    mut stop: watch::Receiver<bool>,
) {
    let pause = (timeout / 10).clamp(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = crate::util::stopped(&mut stop) => return,
        }
        for m in managers() {
            for (id, sandbox) in m.sessions() {
                let a = sandbox.activity();
                if a.running == 0 && a.idle >= timeout {
                    tracing::info!(
                        session_id = %sandbox.id(),
                        idle_secs = a.idle.as_secs(),
                        calls = a.calls,
                        setting = key,
                        "mcp: closing an idle session"
                    );
                    let _ = m.close_session(&id).await;
                }
            }
        }
    }
}

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("MCP listener {addr}: {cause}")]
    Listen {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("MCP listener TLS: {0}")]
    Tls(crate::net::tls::TlsError),
}

/// Serves `[mcp]` until `stop`: then stops accepting, lets requests in
/// flight run for `grace` (the worker's drain cuts the calls still running
/// after its own grace), and closes every MCP session. `on_bound` learns the
/// bound address (the configured port may be 0).
pub async fn serve(
    cfg: HttpConfig,
    registry: Arc<Registry>,
    grace: Duration,
    on_bound: impl FnOnce(SocketAddr),
    stop: watch::Receiver<bool>,
) -> Result<(), HttpError> {
    let tls = match &cfg.tls {
        Some(t) => Some(tokio_rustls::TlsAcceptor::from(
            crate::net::tls::https_server_config(&t.cert, &t.key, t.client_ca.as_deref())
                .map_err(HttpError::Tls)?,
        )),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|cause| HttpError::Listen {
            addr: cfg.listen,
            cause,
        })?;
    let addr = listener.local_addr().map_err(|cause| HttpError::Listen {
        addr: cfg.listen,
        cause,
    })?;
    tracing::info!(
        %addr,
        tls = cfg.tls.is_some(),
        client_certificates = cfg.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        bearer_token = cfg.token.is_some(),
        endpoints = %cfg.endpoints.iter().map(|(p, e)| format!("{p}={e}")).collect::<Vec<_>>().join(","),
        "mcp: listening (streamable HTTP)"
    );
    on_bound(addr);
    let sessions_stop = tokio_util::sync::CancellationToken::new();
    let (router, managers) = router(&cfg, &registry, &sessions_stop);
    let sweep = cfg.idle_timeout.map(|t| {
        let managers = managers.clone();
        tokio::spawn(close_idle(
            move || managers.clone(),
            t,
            "mcp.idle_timeout_secs",
            stop.clone(),
        ))
    });
    let limits = crate::net::httpd::Limits {
        max_connections: cfg.max_connections,
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(120),
        drain: grace + crate::worker::DELIVERY,
    };
    let refusal = crate::net::httpd::Refusal {
        content_type: "application/json",
        body: serde_json::json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32600,
            "message": format!("the MCP listener holds its limit of {} connections (mcp.max_connections); retry shortly", cfg.max_connections)}})
        .to_string(),
    };
    crate::net::httpd::serve_with(
        listener,
        "mcp",
        router,
        limits,
        refusal,
        tls,
        Arc::new(crate::net::httpd::Unobserved),
        stop,
    )
    .await;
    if let Some(s) = sweep {
        s.abort();
    }
    // Every MCP session ends with the listener, and its hands session with it.
    sessions_stop.cancel();
    for m in &managers {
        m.close_all().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HttpConfig, ConfigError> {
        let raw: Raw = toml::from_str(text).unwrap();
        let invalid = crate::configfile::invalid(Path::new("worker.toml"));
        raw.validate(
            Path::new("/etc/hands"),
            &["default".to_string(), "strict".to_string()],
            &invalid,
        )
    }

    #[test]
    fn loopback_needs_nothing_more_and_every_environment_gets_a_path() {
        let c = parse(r#"listen = "127.0.0.1:7310""#).unwrap();
        assert_eq!(
            c.endpoints.into_iter().collect::<Vec<_>>(),
            [
                ("/mcp/default".to_string(), "default".to_string()),
                ("/mcp/strict".to_string(), "strict".to_string())
            ]
        );
        assert_eq!(c.idle_timeout, Some(DEFAULT_IDLE_TIMEOUT));
        assert_eq!(c.allowed_hosts, LOOPBACK_HOSTS);
    }

    #[test]
    fn beyond_loopback_needs_tls_and_client_authentication() {
        let e = parse(r#"listen = "0.0.0.0:7310""#).unwrap_err().to_string();
        assert!(e.contains("needs TLS"), "{e}");
        let e = parse(
            r#"listen = "0.0.0.0:7310"
               tls_cert = "c.pem"
               tls_key = "k.pem""#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("client authentication"), "{e}");
        let c = parse(
            r#"listen = "0.0.0.0:7310"
               tls_cert = "c.pem"
               tls_key = "k.pem"
               client_ca = "ca.pem""#,
        )
        .unwrap();
        assert_eq!(
            c.tls.unwrap().client_ca,
            Some(PathBuf::from("/etc/hands/ca.pem"))
        );
        assert!(c.allowed_hosts.is_empty());
    }

    #[test]
    fn endpoints_name_offered_environments_by_clean_paths() {
        for (bad, why) in [
            (r#""/mcp/x" = "nope""#, "not among"),
            (r#""mcp" = "default""#, "not an endpoint path"),
            (r#""/mcp/../x" = "default""#, "not an endpoint path"),
            (r#""/mcp/" = "default""#, "not an endpoint path"),
            (r#""/a b" = "default""#, "not an endpoint path"),
        ] {
            let e = parse(&format!("listen = \"127.0.0.1:1\"\n[endpoints]\n{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let c = parse("listen = \"127.0.0.1:1\"\n[endpoints]\n\"/agent\" = \"strict\"").unwrap();
        assert_eq!(c.endpoints.len(), 1);
    }

    #[test]
    fn client_ca_without_tls_and_half_a_key_pair_are_refused() {
        let e = parse("listen = \"127.0.0.1:1\"\nclient_ca = \"ca.pem\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("need TLS"), "{e}");
        let e = parse("listen = \"127.0.0.1:1\"\ntls_cert = \"c.pem\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("together"), "{e}");
    }
}
