//! The gateway's MCP endpoints: `/v1/environments/{env}/mcp`, streamable
//! HTTP behind the API's bearer token, one per environment a connected worker
//! offers. This is the URL a hosted agent platform is given: the brain
//! reaches the six tools through the gateway, and the worker, which only
//! dials out, serves them over its tunnel.
//!
//! An MCP session is a hands session on a worker, opened as
//! `POST /v1/sessions` opens one (the least loaded worker offering the
//! environment) and driven as `tool_use` is: each `tools/call` is a hands.v1
//! call that survives a tunnel reconnect, its output streamed as progress,
//! `notifications/cancelled` sent on as `Cancel`. The session is closed on
//! `DELETE`, after `api.mcp_idle_timeout_secs` with no call running and no
//! request naming it, and (best effort) when the gateway stops; a worker
//! closes sessions abandoned longer than its own idle timeout in any case.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use rmcp::transport::streamable_http_server::StreamableHttpService;
use tokio::sync::mpsc;

use super::api::{self, ApiError, Progress};
use super::Gateway;
use crate::connectors::mcp::http::{deleted_is_no_content, endpoint_service, Backend, Sessions};
use crate::connectors::mcp::{CallError, McpFace, Sandbox, SandboxCall};
use crate::session::activity::{Activity, Snapshot};
use crate::tools::ToolResult;

/// The most environments served at once (each holds a little state): names
/// come from clients, so they are bounded, and only offered ones are served.
const MAX_ENDPOINTS: usize = 256;

type Service = StreamableHttpService<McpFace, Sessions>;

/// The endpoints served, by environment.
type Served = HashMap<String, (Arc<Service>, Arc<Sessions>)>;

/// The gateway's MCP endpoints, made as environments are first asked for.
pub struct McpEndpoints {
    stop: tokio_util::sync::CancellationToken,
    served: Mutex<Served>,
}

impl Default for McpEndpoints {
    fn default() -> Self {
        McpEndpoints {
            stop: tokio_util::sync::CancellationToken::new(),
            served: Mutex::new(HashMap::new()),
        }
    }
}

impl McpEndpoints {
    fn map(&self) -> std::sync::MutexGuard<'_, Served> {
        self.served.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The endpoint of `env`, made if a connected worker offers it.
    fn service(&self, gw: &Arc<Gateway>, env: &str) -> Result<Arc<Service>, ApiError> {
        if let Some((s, _)) = self.map().get(env) {
            return Ok(s.clone());
        }
        if !crate::session::registry::valid_id(env) || gw.workers.choose(env, None).is_none() {
            return Err(ApiError::new(
                http::StatusCode::NOT_FOUND,
                "NO_WORKER",
                format!("no connected worker offers environment {env:?}"),
            ));
        }
        let mut map = self.map();
        if let Some((s, _)) = map.get(env) {
            return Ok(s.clone());
        }
        if map.len() >= MAX_ENDPOINTS {
            return Err(ApiError::new(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "TOO_MANY_ENVIRONMENTS",
                format!("the gateway serves MCP for at most {MAX_ENDPOINTS} environments"),
            ));
        }
        let backend = Arc::new(GatewayBackend {
            gw: Arc::downgrade(gw),
            env: env.to_string(),
        });
        // Every request carries the API's token: no Host check on top.
        let (service, sessions) = endpoint_service(backend, Vec::new(), &self.stop);
        let service = Arc::new(service);
        map.insert(env.to_string(), (service.clone(), sessions));
        Ok(service)
    }

    /// Every endpoint's sessions (for the idle sweep).
    pub fn sessions(&self) -> Vec<Arc<Sessions>> {
        self.map().values().map(|(_, s)| s.clone()).collect()
    }

    /// Ends every MCP session, each closed on its worker (best effort: the
    /// worker's own idle timeout closes what this cannot reach).
    pub async fn close_all(&self) {
        self.stop.cancel();
        for s in self.sessions() {
            s.close_all().await;
        }
    }
}

/// `ANY /v1/environments/{env}/mcp`.
pub async fn endpoint(
    State(gw): State<Arc<Gateway>>,
    Path(env): Path<String>,
    request: Request,
) -> Response {
    if let Err(e) = api::authorize(&gw, request.headers()) {
        return e.into_response();
    }
    let delete = request.method() == http::Method::DELETE;
    match gw.mcp.service(&gw, &env) {
        Ok(service) => deleted_is_no_content(delete, service.handle(request).await.into_response()),
        Err(e) => e.into_response(),
    }
}

/// Sessions on the gateway's workers, one environment.
struct GatewayBackend {
    gw: Weak<Gateway>,
    env: String,
}

fn gone() -> String {
    "the gateway is stopping".to_string()
}

impl Backend for GatewayBackend {
    fn env(&self) -> &str {
        &self.env
    }

    fn open<'a>(&'a self, _mcp: &'a str) -> BoxFuture<'a, Result<Arc<dyn Sandbox>, String>> {
        Box::pin(async move {
            let gw = self.gw.upgrade().ok_or_else(gone)?;
            let opened = api::open_on_worker(&gw, &self.env, None)
                .await
                .map_err(|e| format!("{}: {}", e.kind, e.message))?;
            let sandbox: Arc<dyn Sandbox> = Arc::new(GatewaySandbox {
                gw: self.gw.clone(),
                session_id: opened.session_id,
                activity: Arc::new(Activity::new()),
            });
            Ok(sandbox)
        })
    }
}

/// A hands session on a worker, driven through the tunnel.
struct GatewaySandbox {
    gw: Weak<Gateway>,
    session_id: String,
    activity: Arc<Activity>,
}

fn failed(e: ApiError) -> CallError {
    let m = format!("{}: {}", e.kind, e.message);
    if e.status.is_client_error() && e.status != http::StatusCode::NOT_FOUND {
        CallError::Refused(m)
    } else {
        CallError::Failed(m)
    }
}

impl Sandbox for GatewaySandbox {
    fn id(&self) -> &str {
        &self.session_id
    }

    fn call(&self, call: SandboxCall) -> BoxFuture<'static, Result<Arc<ToolResult>, CallError>> {
        let gw = self.gw.clone();
        let session_id = self.session_id.clone();
        let running = self.activity.start();
        Box::pin(async move {
            let _running = running;
            let gw = gw.upgrade().ok_or_else(|| CallError::Failed(gone()))?;
            let SandboxCall {
                call_id,
                tool,
                input,
                output,
                cancel,
            } = call;
            let spec = api::CallSpec {
                session_id: session_id.clone(),
                call_id: call_id.clone(),
                tool,
                input_json: input,
            };
            // With a listener, the call streams its output; the pieces go
            // on as they come.
            let (sink, forward) = match output {
                Some(out) => {
                    let (tx, mut rx) = mpsc::channel::<Progress>(16);
                    let forward = tokio::spawn(async move {
                        while let Some(p) = rx.recv().await {
                            if let Progress::Output { data, .. } = p {
                                if out.send(data).await.is_err() {
                                    break;
                                }
                            }
                        }
                    });
                    (Some(tx), Some(forward))
                }
                None => (None, None),
            };
            let finished = {
                let driving = api::drive(&gw, &spec, None, sink.as_ref());
                tokio::pin!(driving);
                tokio::select! {
                    r = &mut driving => r,
                    () = cancel.cancelled() => {
                        // As hands.v1's Cancel: the call and its processes
                        // are killed; its result (cancelled) still comes.
                        if let Err(e) = api::cancel_call(&gw, &session_id, &call_id).await {
                            tracing::warn!(session = %session_id, call = %call_id,
                                error = %e.message, "mcp: cancelling the call failed");
                        }
                        driving.await
                    }
                }
            };
            drop(sink);
            if let Some(f) = forward {
                let _ = f.await;
            }
            let finished = finished.map_err(failed)?;
            crate::proto::result_of(&finished)
                .map(Arc::new)
                .map_err(|e| CallError::Failed(format!("the worker sent an unusable result: {e}")))
        })
    }

    fn activity(&self) -> Snapshot {
        self.activity.snapshot()
    }

    fn touch(&self) {
        self.activity.touch();
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        let gw = self.gw.clone();
        let id = self.session_id.clone();
        Box::pin(async move {
            let Some(gw) = gw.upgrade() else { return };
            let closing = api::close_routed(&gw, &id);
            match tokio::time::timeout(CLOSE_WAIT, closing).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(session = %id, error = %e.message, "mcp: closing the session failed")
                }
                Err(_) => tracing::warn!(session = %id, "mcp: closing the session timed out"),
            }
        })
    }
}

/// How long closing a session on its worker may take.
const CLOSE_WAIT: Duration = Duration::from_secs(10);
