//! The gateway's HTTP API for agent loops. JSON in and out, errors as
//! `{"type":"error","error":{"type":REASON,"message":…}}`, every `/v1` route
//! behind `Authorization: Bearer TOKEN`.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /v1/tools` | the tool definitions, ready for the Messages API `tools` parameter |
//! | `GET /v1/workers` | connected workers, their environments and capacity, and their processes |
//! | `POST /v1/sessions` `{environment, worker_id?}` | opens a session on a worker offering the environment |
//! | `GET /v1/sessions?worker_id=W` | the open sessions of every connected worker process (or of W's) |
//! | `DELETE /v1/sessions/{id}` | closes it (idempotent); `?worker_id=W` for an id the gateway did not make |
//! | `POST /v1/sessions/{id}/tool_use` `{id, name, input}` | runs a `tool_use` block, answers its `tool_result` block; with `Accept: text/event-stream`, an SSE stream of `started`, `output`, then `tool_result` |
//! | `GET /v1/sessions/{id}/calls/{call_id}?from_offset=N` | re-attaches to a call (same answers as above) |
//! | `POST /v1/sessions/{id}/calls/{call_id}/cancel` | cancels a running call |
//! | `POST`/`GET`/`DELETE /v1/environments/{env}/mcp` | the six tools as an MCP server (streamable HTTP), one session on a worker per MCP session (`super::mcp`) |
//! | `GET /metrics`, `GET /healthz` | Prometheus metrics and liveness, no token |
//!
//! A session id is `WORKER_ID:TAG-RANDOM`, so any gateway replica routes it to
//! its worker without shared state, and to the worker process that holds it
//! (`TAG`) when two processes share one worker identity. When that process is
//! gone and another process of the worker is connected (a restart), the
//! session ended with it: `404 SESSION_NOT_FOUND` at once. A `tool_use` id is the call id: posting the
//! same block again (say, after a timeout on the agent's side) resumes the
//! call and never runs it twice. When the tunnel to the worker drops mid-call,
//! the gateway waits for the worker to reconnect (`api.reconnect_wait_secs`)
//! and resumes the call from the output offset it had reached; if the worker
//! does not come back, the answer says so (503 `WORKER_UNAVAILABLE`) and the
//! call may still be running, so the same block can be posted again later. A
//! block posted again after the worker's journal dropped its result is 410
//! `RESULT_EXPIRED`: it ran once and does not run again.
//!
//! Connections are served by [`super::listen`] (its budget and timers); a
//! request body that pauses longer than `api.idle_timeout_secs` is 408
//! `BODY_TIMEOUT`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::workers::{Conn, RouteError};
use super::{Gateway, SessionRoute};
use crate::connectors::hands_v1::REASON;
use crate::proto::v1;

/// An API error: an HTTP status, a machine-readable type and a message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind: kind.to_string(),
            message: message.into(),
        }
    }

    fn body(&self) -> Value {
        json!({"type": "error", "error": {"type": self.kind, "message": self.message}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// The worker's reason, or the gRPC code's name when it gave none.
fn reason_of(s: &tonic::Status) -> String {
    s.metadata()
        .get(REASON)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:?}", s.code()).to_uppercase())
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let status = match s.code() {
            Code::InvalidArgument => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            // The call ran; its result is gone and it will not run again.
            Code::FailedPrecondition if reason_of(&s) == "RESULT_EXPIRED" => StatusCode::GONE,
            Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
            Code::OutOfRange => StatusCode::RANGE_NOT_SATISFIABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiError::new(status, &reason_of(&s), s.message())
    }
}

/// A status the worker did not produce (no reason trailer): the tunnel broke.
fn is_transport(s: &tonic::Status) -> bool {
    use tonic::Code;
    s.metadata().get(REASON).is_none()
        && matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal | Code::Aborted
        )
}

pub fn router(gw: Arc<Gateway>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/tools", get(tools))
        .route("/v1/workers", get(workers))
        .route("/v1/sessions", post(open_session).get(list_sessions))
        .route("/v1/sessions/{session_id}", delete(close_session))
        .route("/v1/sessions/{session_id}/tool_use", post(tool_use))
        .route(
            "/v1/environments/{environment}/mcp",
            axum::routing::any(super::mcp::endpoint),
        )
        .route("/v1/sessions/{session_id}/calls/{call_id}", get(attach))
        .route(
            "/v1/sessions/{session_id}/calls/{call_id}/cancel",
            post(cancel),
        )
        // Bodies are read by `read_body`, with the protocol's limit.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(gw)
}

pub(super) fn authorize(gw: &Gateway, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if crate::util::constant_time_eq(given.as_bytes(), gw.token.as_bytes()) {
        Ok(())
    } else {
        gw.metrics.unauthorized();
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "missing or wrong bearer token (Authorization: Bearer TOKEN)",
        ))
    }
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> impl IntoResponse {
    let (workers, tunnels) = gw.workers.counts();
    gw.metrics.set_worker_processes(gw.workers.process_count());
    (
        [(http::header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)],
        gw.metrics.render(workers, tunnels),
    )
}

/// The tool definitions, as the Messages API's `tools` parameter takes them.
pub fn tool_definitions() -> Value {
    serde_json::from_str(include_str!("../tools/definitions.json"))
        .expect("definitions.json is valid JSON (tested)")
}

async fn tools(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&gw, &headers)?;
    Ok(Json(json!({ "tools": tool_definitions() })))
}

async fn workers(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&gw, &headers)?;
    Ok(Json(json!({ "workers": gw.workers.list() })))
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
}

/// The request body, at most [`crate::connectors::hands_v1::MAX_MESSAGE`] bytes, with at
/// most `api.idle_timeout_secs` between two of its chunks (a client that
/// stops sending mid-body does not hold its connection forever).
async fn read_body(gw: &Gateway, body: axum::body::Body) -> Result<axum::body::Bytes, ApiError> {
    use http_body_util::BodyExt;
    let mut body = http_body_util::Limited::new(body, crate::connectors::hands_v1::MAX_MESSAGE);
    let mut buf = bytes::BytesMut::new();
    loop {
        let frame = tokio::time::timeout(gw.body_idle_timeout, body.frame())
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "BODY_TIMEOUT",
                    format!(
                        "no part of the request body arrived for {} s",
                        gw.body_idle_timeout.as_secs()
                    ),
                )
            })?;
        match frame {
            None => return Ok(buf.freeze()),
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => return Err(body_error(&*e)),
        }
    }
}

fn body_error(e: &(dyn std::error::Error + 'static)) -> ApiError {
    let mut too_large = false;
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(inner) = src {
        too_large |= inner.is::<http_body_util::LengthLimitError>();
        src = inner.source();
    }
    if too_large {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!(
                "the request body is over the {} MiB message limit",
                crate::connectors::hands_v1::MAX_MESSAGE >> 20
            ),
        )
    } else {
        bad_request(format!("reading the request body: {e}"))
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("the body is not JSON: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenBody {
    #[serde(default = "default_env")]
    environment: String,
    #[serde(default)]
    worker_id: Option<String>,
}

fn default_env() -> String {
    "default".into()
}

async fn open_session(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    authorize(&gw, &headers)?;
    let body = read_body(&gw, body).await?;
    let body: OpenBody = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::from_str("{}").expect("static")
    } else {
        serde_json::from_value(parse_json(&body)?).map_err(|e| bad_request(e.to_string()))?
    };
    let opened = open_on_worker(&gw, &body.environment, body.worker_id.as_deref()).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "session_id": opened.session_id,
            "worker_id": opened.worker_id,
            "environment": opened.environment,
        })),
    ))
}

/// A session a worker opened.
pub(super) struct Opened {
    pub(super) session_id: String,
    pub(super) worker_id: String,
    pub(super) environment: String,
}

/// Opens a session in `environment` on `worker` (any connected one offering
/// it when `None`: the least loaded).
pub(super) async fn open_on_worker(
    gw: &Gateway,
    environment: &str,
    worker: Option<&str>,
) -> Result<Opened, ApiError> {
    let conn = gw.workers.choose(environment, worker).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "NO_WORKER",
            match worker {
                Some(w) => format!(
                    "worker {w:?} is not connected or does not offer environment {environment:?}"
                ),
                None => format!("no connected worker offers environment {environment:?}"),
            },
        )
    })?;
    let worker_id = conn.worker_id.clone();
    let session_id = super::new_session_id(&worker_id, &conn.instance)
        .ok_or_else(|| bad_request(format!("worker id {worker_id:?} is too long to route")))?;
    let mut client = conn.client.clone();
    let opened = client
        .open_session(v1::OpenSessionRequest {
            session_id: session_id.clone(),
            environment: environment.to_string(),
        })
        .await;
    // Fresher counts for the next choice, after an open and after an
    // `AT_CAPACITY` too: the worker's own count moves without the gateway
    // (idle sessions closed, sessions opened and closed on the worker).
    let refresh = match &opened {
        Ok(_) => true,
        Err(s) => reason_of(s) == "AT_CAPACITY",
    };
    if refresh {
        if let Ok(info) = client.info(v1::InfoRequest {}).await {
            gw.workers.update_info(&conn, info.into_inner());
        }
    }
    let r = opened?.into_inner();
    gw.metrics.session_opened();
    Ok(Opened {
        session_id: r.session_id,
        worker_id: r.worker_id,
        environment: r.environment,
    })
}

fn unavailable(worker_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "WORKER_UNAVAILABLE",
        format!("worker {worker_id:?} is not connected to this gateway"),
    )
}

fn route_of(session_id: &str) -> Result<SessionRoute<'_>, ApiError> {
    super::route_of_session(session_id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "SESSION_NOT_FOUND",
            format!("{session_id:?} is not a gateway session id (WORKER_ID:SUFFIX)"),
        )
    })
}

/// A connection to the process that holds `session_id`, waiting up to
/// `wait` for it.
async fn session_conn(gw: &Gateway, session_id: &str, wait: Duration) -> Result<Conn, ApiError> {
    let route = route_of(session_id)?;
    gw.workers
        .route(route.worker, route.instance, wait)
        .await
        .map_err(|e| route_error(session_id, e))
}

fn route_error(session_id: &str, e: RouteError) -> ApiError {
    match e {
        RouteError::Unavailable { worker } => unavailable(&worker),
        e @ RouteError::Replaced { .. } => ApiError::new(
            StatusCode::NOT_FOUND,
            "SESSION_NOT_FOUND",
            format!("no open session {session_id:?}: {e}"),
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerQuery {
    #[serde(default)]
    worker_id: Option<String>,
}

async fn close_session(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(session_id): Path<String>,
    Query(q): Query<WorkerQuery>,
) -> Result<Json<Value>, ApiError> {
    authorize(&gw, &headers)?;
    if let Some(worker) = &q.worker_id {
        return close_on_worker(&gw, worker, session_id).await;
    }
    let closed = close_routed(&gw, &session_id).await?;
    Ok(Json(json!({ "session_id": session_id, "closed": closed })))
}

/// Closes a session the gateway made, on the process its id routes to.
/// Whether it was open there.
pub(super) async fn close_routed(gw: &Gateway, session_id: &str) -> Result<bool, ApiError> {
    let route = route_of(session_id)?;
    let conn = match gw
        .workers
        .route(route.worker, route.instance, gw.reconnect_wait)
        .await
    {
        Ok(c) => c,
        // The process that held it is gone, and the session with it.
        Err(RouteError::Replaced { .. }) => return Ok(false),
        Err(e) => return Err(route_error(session_id, e)),
    };
    close_on(gw, &conn, session_id).await
}

/// Closes `session_id` on one worker process, then refreshes what the registry
/// knows of that process (its open sessions). Whether the session was open there.
async fn close_on(gw: &Gateway, conn: &Conn, session_id: &str) -> Result<bool, ApiError> {
    let r = conn
        .client
        .clone()
        .close_session(v1::CloseSessionRequest {
            session_id: session_id.to_string(),
        })
        .await?
        .into_inner();
    if let Ok(info) = conn.client.clone().info(v1::InfoRequest {}).await {
        gw.workers.update_info(conn, info.into_inner());
    }
    Ok(r.closed)
}

/// Closes `session_id` on every connected process of `worker`: for ids the
/// gateway did not make (a session opened on the worker's debug listener, or
/// by a connector of the worker), which carry no route.
async fn close_on_worker(
    gw: &Gateway,
    worker: &str,
    session_id: String,
) -> Result<Json<Value>, ApiError> {
    let processes = gw.workers.processes(Some(worker));
    if processes.is_empty() {
        return Err(unavailable(worker));
    }
    let mut closed = false;
    for (conn, _) in processes {
        closed |= close_on(gw, &conn, &session_id).await?;
    }
    Ok(Json(json!({ "session_id": session_id, "closed": closed })))
}

/// How long one worker process may take to list its sessions.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /v1/sessions[?worker_id=W]`: every connected process asked at once;
/// one that does not answer is named under `unreachable`, the others listed.
async fn list_sessions(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(q): Query<WorkerQuery>,
) -> Result<Json<Value>, ApiError> {
    authorize(&gw, &headers)?;
    let processes = gw.workers.processes(q.worker_id.as_deref());
    if let (true, Some(w)) = (processes.is_empty(), &q.worker_id) {
        return Err(unavailable(w));
    }
    let mut asks = tokio::task::JoinSet::new();
    for (conn, instance_id) in processes {
        asks.spawn(async move {
            let r = tokio::time::timeout(
                LIST_TIMEOUT,
                conn.client
                    .clone()
                    .list_sessions(v1::ListSessionsRequest {}),
            )
            .await;
            (conn.worker_id, instance_id, r)
        });
    }
    let mut sessions = Vec::new();
    let mut unreachable = Vec::new();
    while let Some(done) = asks.join_next().await {
        let Ok((worker_id, instance_id, r)) = done else {
            continue;
        };
        let error = match r {
            Ok(Ok(list)) => {
                for s in list.into_inner().sessions {
                    sessions.push(json!({
                        "session_id": s.session_id,
                        "worker_id": worker_id,
                        "instance_id": instance_id,
                        "environment": s.environment,
                        "opened_at_unix_ms": s.opened_at_unix_ms,
                        "age_ms": s.age_ms,
                        "idle_ms": s.idle_ms,
                        "running_calls": s.running_calls,
                        "calls": s.calls,
                        "idle_timeout_ms": s.idle_timeout_ms,
                    }));
                }
                continue;
            }
            Ok(Err(s)) => format!("{}: {}", reason_of(&s), s.message()),
            Err(_) => format!("no answer within {} s", LIST_TIMEOUT.as_secs()),
        };
        unreachable.push(json!({
            "worker_id": worker_id,
            "instance_id": instance_id,
            "error": error,
        }));
    }
    let key = |v: &Value| {
        (
            v["worker_id"].as_str().unwrap_or_default().to_string(),
            v["opened_at_unix_ms"].as_u64().unwrap_or(0),
            v["session_id"].as_str().unwrap_or_default().to_string(),
        )
    };
    sessions.sort_by_key(key);
    Ok(Json(
        json!({ "sessions": sessions, "unreachable": unreachable }),
    ))
}

async fn cancel(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path((session_id, call_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    authorize(&gw, &headers)?;
    let cancelled = cancel_call(&gw, &session_id, &call_id).await?;
    Ok(Json(json!({ "cancelled": cancelled })))
}

/// Cancels a running call: whether it was running.
pub(super) async fn cancel_call(
    gw: &Gateway,
    session_id: &str,
    call_id: &str,
) -> Result<bool, ApiError> {
    let conn = session_conn(gw, session_id, gw.reconnect_wait).await?;
    let r = conn
        .client
        .clone()
        .cancel(v1::CancelRequest {
            session_id: session_id.to_string(),
            call_id: call_id.to_string(),
        })
        .await?
        .into_inner();
    Ok(r.cancelled)
}

/// An event for an SSE consumer.
pub(super) enum Progress {
    Started { executed_now: bool },
    Output { offset: u64, data: Vec<u8> },
}

pub(super) struct CallSpec {
    pub(super) session_id: String,
    pub(super) call_id: String,
    pub(super) tool: String,
    pub(super) input_json: String,
}

/// Runs (or resumes) a call to its `Finished`, surviving tunnel loss for up
/// to `reconnect_wait` at a time. With `sink`, output is streamed and a
/// resume continues from the last offset delivered, so nothing is sent twice.
pub(super) async fn drive(
    gw: &Gateway,
    spec: &CallSpec,
    attach_from: Option<u64>,
    sink: Option<&mpsc::Sender<Progress>>,
) -> Result<v1::Finished, ApiError> {
    let route = route_of(&spec.session_id)?;
    // `started`: the worker knows the call (so Attach can resume it);
    // `announced`: the consumer has had its one Started.
    let mut started = attach_from.is_some();
    let mut announced = false;
    let mut offset = attach_from.unwrap_or(0);
    let mut outage: Option<Instant> = None;
    loop {
        let waited = outage.map(|t| t.elapsed()).unwrap_or_default();
        let budget = gw.reconnect_wait.saturating_sub(waited);
        let conn = match gw.workers.route(route.worker, route.instance, budget).await {
            Ok(c) => c,
            Err(RouteError::Unavailable { .. }) => {
                return Err(lost(route.worker, outage.is_some()))
            }
            Err(e) => return Err(route_error(&spec.session_id, e)),
        };
        let mut client = conn.client.clone();
        // Without a sink, a repeated Call resumes to its Finished; with one,
        // Attach resumes the output where it stopped.
        let opened = if started && (sink.is_some() || attach_from.is_some()) {
            client
                .attach(v1::AttachRequest {
                    session_id: spec.session_id.clone(),
                    call_id: spec.call_id.clone(),
                    from_offset: offset,
                })
                .await
        } else {
            client
                .call(v1::CallRequest {
                    session_id: spec.session_id.clone(),
                    call_id: spec.call_id.clone(),
                    tool: spec.tool.clone(),
                    input_json: spec.input_json.clone(),
                    stream_output: sink.is_some(),
                })
                .await
        };
        let mut stream = match opened {
            Ok(r) => r.into_inner(),
            Err(s) if is_transport(&s) => {
                outage.get_or_insert_with(Instant::now);
                pause_before_retry(&outage, gw.reconnect_wait).await;
                continue;
            }
            Err(s) => return Err(s.into()),
        };
        loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    outage = None;
                    match ev.event {
                        Some(v1::call_event::Event::Started(s)) if !announced => {
                            started = true;
                            announced = true;
                            if let Some(tx) = sink {
                                let _ = tx
                                    .send(Progress::Started {
                                        executed_now: s.executed_now,
                                    })
                                    .await;
                            }
                        }
                        Some(v1::call_event::Event::Output(o)) => {
                            let end = o.offset + o.data.len() as u64;
                            if end <= offset {
                                continue;
                            }
                            let skip = offset.saturating_sub(o.offset) as usize;
                            let data = o.data[skip..].to_vec();
                            let at = o.offset + skip as u64;
                            offset = end;
                            if let Some(tx) = sink {
                                if tx
                                    .send(Progress::Output { offset: at, data })
                                    .await
                                    .is_err()
                                {
                                    // The consumer left; the call runs on and
                                    // can be re-attached.
                                    return Err(ApiError::new(
                                        StatusCode::BAD_REQUEST,
                                        "CONSUMER_GONE",
                                        "the client stopped listening",
                                    ));
                                }
                            }
                        }
                        Some(v1::call_event::Event::Finished(f)) => return Ok(f),
                        Some(v1::call_event::Event::Started(_)) | None => {}
                    }
                }
                Ok(None) => break,
                Err(s) if is_transport(&s) => break,
                Err(s) => return Err(s.into()),
            }
        }
        gw.metrics.call_resumed();
        tracing::info!(session = %spec.session_id, call = %spec.call_id, "tunnel lost mid-call; resuming");
        outage.get_or_insert_with(Instant::now);
        pause_before_retry(&outage, gw.reconnect_wait).await;
    }
}

async fn pause_before_retry(outage: &Option<Instant>, _budget: Duration) {
    // A dead connection may still be registered for a moment; don't spin.
    if outage.is_some() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lost(worker: &str, mid_call: bool) -> ApiError {
    if mid_call {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "WORKER_UNAVAILABLE",
            format!(
                "lost the tunnel to worker {worker:?} and it did not come back in time; \
                 the call may still be running: post the same tool_use again to resume it"
            ),
        )
    } else {
        unavailable(worker)
    }
}

fn outcome_name(o: i32) -> &'static str {
    match v1::Outcome::try_from(o) {
        Ok(v1::Outcome::Completed) => "completed",
        Ok(v1::Outcome::TimedOut) => "timed_out",
        Ok(v1::Outcome::Cancelled) => "cancelled",
        Ok(v1::Outcome::Shutdown) => "shutdown",
        _ => "unspecified",
    }
}

/// The `tool_result` block of a finished call.
fn tool_result(call_id: &str, f: &v1::Finished) -> Result<Value, ApiError> {
    let r = crate::proto::result_of(f).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "BAD_WORKER_RESULT",
            format!("the worker sent an unusable result: {e}"),
        )
    })?;
    Ok(json!({
        "type": "tool_result",
        "tool_use_id": call_id,
        "content": r.content,
        "is_error": r.is_error,
    }))
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

async fn tool_use(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(session_id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    authorize(&gw, &headers)?;
    let block = parse_json(&read_body(&gw, body).await?)?;
    let obj = block
        .as_object()
        .ok_or_else(|| bad_request("a tool_use block is a JSON object {id, name, input}"))?;
    if let Some(t) = obj.get("type") {
        if t != "tool_use" {
            return Err(bad_request(format!("type is {t}, expected \"tool_use\"")));
        }
    }
    let id = obj
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_request("tool_use.id must be a string"))?;
    if !crate::session::registry::valid_id(id) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_ID",
            format!("tool_use.id {id:?} is not 1 to 128 characters of [A-Za-z0-9._:-]"),
        ));
    }
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_request("tool_use.name must be a string"))?;
    let input = obj
        .get("input")
        .ok_or_else(|| bad_request("tool_use.input is missing"))?;
    route_of(&session_id)?;
    let spec = CallSpec {
        session_id,
        call_id: id.to_string(),
        tool: name.to_string(),
        input_json: input.to_string(),
    };
    respond(gw, spec, None, wants_sse(&headers)).await
}

#[derive(Deserialize)]
struct AttachQuery {
    #[serde(default)]
    from_offset: u64,
}

async fn attach(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path((session_id, call_id)): Path<(String, String)>,
    Query(q): Query<AttachQuery>,
) -> Result<Response, ApiError> {
    authorize(&gw, &headers)?;
    route_of(&session_id)?;
    let spec = CallSpec {
        session_id,
        call_id,
        tool: String::new(),
        input_json: String::new(),
    };
    respond(gw, spec, Some(q.from_offset), wants_sse(&headers)).await
}

async fn respond(
    gw: Arc<Gateway>,
    spec: CallSpec,
    attach_from: Option<u64>,
    sse: bool,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    if !sse {
        let result = drive(&gw, &spec, attach_from, None).await;
        let result = result.and_then(|f| Ok((tool_result(&spec.call_id, &f)?, f.outcome)));
        record(&gw, &spec.tool, t0, &result);
        let (block, outcome) = result?;
        return Ok(([("hands-outcome", outcome_name(outcome))], Json(block)).into_response());
    }
    // SSE: a bounded channel, so a consumer that stops reading holds back
    // only its own call's stream (HTTP/2 flow control does the rest).
    let (tx, mut rx) = mpsc::channel::<Progress>(16);
    let (done_tx, mut done_rx) = mpsc::channel::<Result<Value, ApiError>>(1);
    tokio::spawn(async move {
        let result = drive(&gw, &spec, attach_from, Some(&tx)).await;
        let result = result.and_then(|f| {
            let mut block = tool_result(&spec.call_id, &f)?;
            block["outcome"] = json!(outcome_name(f.outcome));
            Ok(block)
        });
        record(&gw, &spec.tool, t0, &result);
        drop(tx);
        let _ = done_tx.send(result).await;
    });
    let events = async_stream(move |emit| async move {
        while let Some(p) = rx.recv().await {
            let ev = match p {
                Progress::Started { executed_now } => Event::default()
                    .event("started")
                    .data(json!({ "executed_now": executed_now }).to_string()),
                Progress::Output { offset, data } => {
                    use base64::Engine;
                    Event::default().event("output").data(
                        json!({
                            "offset": offset,
                            "text": String::from_utf8_lossy(&data),
                            "data": base64::engine::general_purpose::STANDARD.encode(&data),
                        })
                        .to_string(),
                    )
                }
            };
            if emit.send(ev).await.is_err() {
                return;
            }
        }
        let last = match done_rx.recv().await {
            Some(Ok(block)) => Event::default()
                .event("tool_result")
                .data(block.to_string()),
            Some(Err(e)) => Event::default().event("error").data(e.body().to_string()),
            None => return,
        };
        let _ = emit.send(last).await;
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn record<T>(gw: &Gateway, tool: &str, t0: Instant, result: &Result<T, ApiError>)
where
    T: ResultShape,
{
    let label = match result {
        Ok(v) if v.is_error() => "is_error",
        Ok(_) => "ok",
        Err(_) => "error",
    };
    gw.metrics.call_answered(tool, label, t0.elapsed());
}

trait ResultShape {
    fn is_error(&self) -> bool;
}

impl ResultShape for Value {
    fn is_error(&self) -> bool {
        self["is_error"] == json!(true)
    }
}

impl ResultShape for (Value, i32) {
    fn is_error(&self) -> bool {
        self.0.is_error()
    }
}

/// A stream of SSE events fed by a producer task through a small channel.
fn async_stream<F, Fut>(
    producer: F,
) -> impl tokio_stream::Stream<Item = Result<Event, std::convert::Infallible>>
where
    F: FnOnce(mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(producer(tx));
    tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}
