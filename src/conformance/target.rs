//! What the conformance cases drive: a worker's `hands.v1.Sandbox` over gRPC
//! (its debug listener, or any implementation of the protocol), or a gateway's
//! HTTP API. Both are seen through [`Target`], so one case runs against either.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::gateway::client::ApiClient;
use crate::proto::v1;
use crate::proto::v1::sandbox_client::SandboxClient;
use crate::tools::ToolResult;

/// What kind of target a case runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Grpc,
    Gateway,
}

/// Everything a call's stream showed.
#[derive(Debug, Clone)]
pub struct Events {
    /// Started.executed_now (gateway: the `started` event, or true when not streamed).
    pub executed_now: bool,
    /// Output events: (offset, bytes).
    pub output: Vec<(u64, Vec<u8>)>,
    pub result: ToolResult,
    /// "completed", "timed_out" or "cancelled".
    pub outcome: String,
}

impl Events {
    pub fn text(&self) -> String {
        self.result.text_content()
    }
}

/// A request the target refused: a gRPC code name (`NOT_FOUND`) or `HTTP 404`,
/// and the machine-readable reason.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub code: String,
    pub reason: String,
    pub message: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} / {}: {}", self.code, self.reason, self.message)
    }
}

fn transport(e: impl std::fmt::Display) -> Rejection {
    Rejection {
        code: "TRANSPORT".into(),
        reason: String::new(),
        message: e.to_string(),
    }
}

pub type R<T> = Result<T, Rejection>;

#[tonic::async_trait]
pub trait Target: Send {
    fn kind(&self) -> Kind;
    /// Identity and offer: `{worker_id, instance_id, protocols,
    /// environments:[{name, tools}]}` (`instance_id` over gRPC only).
    async fn info(&mut self) -> R<Value>;
    /// The open sessions: `[{session_id, environment, age_ms, idle_ms,
    /// running_calls, calls}]` (a gateway's: of every worker it reaches).
    async fn list(&mut self) -> R<Vec<Value>>;
    /// Opens a session (`id` is honoured by gRPC targets; a gateway picks its
    /// own). Returns (session id, created).
    async fn open(&mut self, id: &str, env: &str) -> R<(String, bool)>;
    async fn close(&mut self, session: &str) -> R<bool>;
    /// A call to its end; `stream` asks for output events.
    async fn call(
        &mut self,
        session: &str,
        id: &str,
        tool: &str,
        input_json: &str,
        stream: bool,
    ) -> R<Events>;
    /// Starts a call, waits for Started, and goes away.
    async fn start_and_leave(
        &mut self,
        session: &str,
        id: &str,
        tool: &str,
        input_json: &str,
    ) -> R<bool>;
    async fn attach(&mut self, session: &str, id: &str, from: u64) -> R<Events>;
    async fn cancel(&mut self, session: &str, id: &str) -> R<bool>;
    /// A call with a deadline; None where the target has no deadlines (gateway).
    async fn call_with_deadline(
        &mut self,
        session: &str,
        id: &str,
        tool: &str,
        input_json: &str,
        deadline: Duration,
    ) -> Option<R<Events>>;
}

// ---- gRPC -----------------------------------------------------------------

pub struct Grpc {
    client: SandboxClient<Channel>,
}

impl Grpc {
    pub async fn connect(addr: SocketAddr) -> Result<Grpc, tonic::transport::Error> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        Ok(Grpc::new(channel))
    }

    pub fn new(channel: Channel) -> Grpc {
        // The client sends whatever a case asks (the target's limit is what
        // is tested) and accepts large answers.
        let client = SandboxClient::new(channel)
            .max_encoding_message_size(256 << 20)
            .max_decoding_message_size(256 << 20);
        Grpc { client }
    }
}

fn rejection(s: tonic::Status) -> Rejection {
    let code = format!("{:?}", s.code());
    // "NotFound" -> "NOT_FOUND"
    let mut name = String::new();
    for (i, c) in code.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    Rejection {
        code: name,
        reason: s
            .metadata()
            .get(crate::connectors::hands_v1::REASON)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        message: s.message().to_string(),
    }
}

fn outcome_name(o: i32) -> String {
    match v1::Outcome::try_from(o) {
        Ok(v1::Outcome::Completed) => "completed",
        Ok(v1::Outcome::TimedOut) => "timed_out",
        Ok(v1::Outcome::Cancelled) => "cancelled",
        _ => "unspecified",
    }
    .to_string()
}

async fn collect(mut stream: tonic::Streaming<v1::CallEvent>) -> R<Events> {
    let mut executed_now = None;
    let mut output = Vec::new();
    while let Some(ev) = stream.message().await.map_err(rejection)? {
        match ev.event {
            Some(v1::call_event::Event::Started(s)) => executed_now = Some(s.executed_now),
            Some(v1::call_event::Event::Output(o)) => output.push((o.offset, o.data)),
            Some(v1::call_event::Event::Finished(f)) => {
                let result = crate::proto::result_of(&f).map_err(|e| Rejection {
                    code: "MALFORMED".into(),
                    reason: String::new(),
                    message: e.to_string(),
                })?;
                return Ok(Events {
                    executed_now: executed_now.ok_or_else(|| Rejection {
                        code: "MALFORMED".into(),
                        reason: String::new(),
                        message: "Finished without Started".into(),
                    })?,
                    output,
                    result,
                    outcome: outcome_name(f.outcome),
                });
            }
            None => {}
        }
    }
    Err(Rejection {
        code: "MALFORMED".into(),
        reason: String::new(),
        message: "the stream ended without Finished".into(),
    })
}

fn call_req(
    session: &str,
    id: &str,
    tool: &str,
    input_json: &str,
    stream: bool,
) -> v1::CallRequest {
    v1::CallRequest {
        session_id: session.into(),
        call_id: id.into(),
        tool: tool.into(),
        input_json: input_json.into(),
        stream_output: stream,
    }
}

#[tonic::async_trait]
impl Target for Grpc {
    fn kind(&self) -> Kind {
        Kind::Grpc
    }

    async fn info(&mut self) -> R<Value> {
        let i = self
            .client
            .info(v1::InfoRequest {})
            .await
            .map_err(rejection)?
            .into_inner();
        Ok(json!({
            "worker_id": i.worker_id,
            "instance_id": i.instance_id,
            "protocols": i.protocols,
            "environments": i.environments.iter().map(|e| json!({"name": e.name, "tools": e.tools})).collect::<Vec<_>>(),
        }))
    }

    async fn list(&mut self) -> R<Vec<Value>> {
        let r = self
            .client
            .list_sessions(v1::ListSessionsRequest {})
            .await
            .map_err(rejection)?
            .into_inner();
        Ok(r.sessions
            .into_iter()
            .map(|s| {
                json!({
                    "session_id": s.session_id,
                    "environment": s.environment,
                    "age_ms": s.age_ms,
                    "idle_ms": s.idle_ms,
                    "running_calls": s.running_calls,
                    "calls": s.calls,
                })
            })
            .collect())
    }

    async fn open(&mut self, id: &str, env: &str) -> R<(String, bool)> {
        let r = self
            .client
            .open_session(v1::OpenSessionRequest {
                session_id: id.into(),
                environment: env.into(),
            })
            .await
            .map_err(rejection)?
            .into_inner();
        Ok((r.session_id, r.created))
    }

    async fn close(&mut self, session: &str) -> R<bool> {
        Ok(self
            .client
            .close_session(v1::CloseSessionRequest {
                session_id: session.into(),
            })
            .await
            .map_err(rejection)?
            .into_inner()
            .closed)
    }

    async fn call(
        &mut self,
        session: &str,
        id: &str,
        tool: &str,
        input_json: &str,
        stream: bool,
    ) -> R<Events> {
        let s = self
            .client
            .call(call_req(session, id, tool, input_json, stream))
            .await
            .map_err(rejection)?
            .into_inner();
        collect(s).await
    }

    async fn start_and_leave(
        &mut self,
        session: &str,
        id: &str,
        tool: &str,
        input_json: &str,
    ) -> R<bool> {
        let mut s = self
            .client
            .call(call_req(session, id, tool, input_json, true))
            .await
            .map_err(rejection)?
            .into_inner();
        match s.message().await.map_err(rejection)? {
            Some(v1::CallEvent {
                event: Some(v1::call_event::Event::Started(st)),
            }) => Ok(st.executed_now),
            other => Err(transport(format!("expected Started, got {other:?}"))),
        }
    }

    async fn attach(&mut self, session: &str, id: &str, from: u64) -> R<Events> {
        let s = self
            .client
            .attach(v1::AttachRequest {
                session_id: session.into(),
                call_id: id.into(),
                from_offset: from,
            })
            .await
            .map_err(rejection)?
            .into_inner();
        collect(s).await
    }

    async fn cancel(&mut self, session: &str, id: &str) -> R<bool> {
        Ok(self
            .client
            .cancel(v1::CancelRequest {
                session_id: session.into(),
                call_id: id.into(),
            })
            .await
            .map_err(rejection)?
            .into_inner()
            .cancelled)
    }

    async fn call_with_deadline(
        &mut self,
        session: &str,
        id: &str,
        tool: &str,
        input_json: &str,
        deadline: Duration,
    ) -> Option<R<Events>> {
        let mut req = tonic::Request::new(call_req(session, id, tool, input_json, false));
        req.set_timeout(deadline);
        let r = async {
            let s = self.client.call(req).await.map_err(rejection)?.into_inner();
            collect(s).await
        }
        .await;
        Some(r)
    }
}

// ---- gateway ---------------------------------------------------------------

pub struct Gateway {
    api: ApiClient,
    addr: SocketAddr,
    token: String,
}

impl Gateway {
    pub fn new(addr: SocketAddr, token: &str) -> Gateway {
        Gateway {
            api: ApiClient::new(addr, token),
            addr,
            token: token.to_string(),
        }
    }

    /// A request that must be answered with `want`; any other status is the
    /// gateway's refusal.
    async fn expect(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        want: u16,
    ) -> R<crate::gateway::client::Answer> {
        let a = self
            .api
            .request(method, path, body)
            .await
            .map_err(transport)?;
        if a.status != want {
            return Err(Gateway::http_rejection(a.status, &a.body));
        }
        Ok(a)
    }

    fn http_rejection(status: u16, body: &Value) -> Rejection {
        Rejection {
            code: format!("HTTP {status}"),
            reason: body["error"]["type"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            message: body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        }
    }

    fn body(id: &str, tool: &str, input_json: &str) -> R<Value> {
        let input: Value = serde_json::from_str(input_json).map_err(|e| Rejection {
            code: "CLIENT".into(),
            reason: "INVALID_INPUT_JSON".into(),
            message: e.to_string(),
        })?;
        Ok(json!({"type": "tool_use", "id": id, "name": tool, "input": input}))
    }

    fn result_of(
        block: &Value,
        outcome: &str,
        executed_now: bool,
        output: Vec<(u64, Vec<u8>)>,
    ) -> R<Events> {
        let result: ToolResult = serde_json::from_value(json!({
            "content": block["content"],
            "is_error": block["is_error"],
        }))
        .map_err(|e| Rejection {
            code: "MALFORMED".into(),
            reason: String::new(),
            message: format!("not a tool_result block: {e}: {block}"),
        })?;
        Ok(Events {
            executed_now,
            output,
            result,
            outcome: outcome.to_string(),
        })
    }

    async fn sse(&mut self, method: &str, path: &str, body: Option<&Value>) -> R<Events> {
        let (status, events) = self
            .api
            .stream(method, path, body, |_| {})
            .await
            .map_err(transport)?;
        if status != 200 {
            // An error answer is JSON, not a stream.
            let data = events
                .first()
                .map(|e| e.data.clone())
                .unwrap_or(Value::Null);
            return Err(Gateway::http_rejection(status, &data));
        }
        let mut executed_now = true;
        let mut output = Vec::new();
        for e in &events {
            match e.event.as_str() {
                "started" => executed_now = e.data["executed_now"] == true,
                "output" => {
                    use base64::Engine;
                    let data = base64::engine::general_purpose::STANDARD
                        .decode(e.data["data"].as_str().unwrap_or_default())
                        .map_err(transport)?;
                    output.push((e.data["offset"].as_u64().unwrap_or(0), data));
                }
                "tool_result" => {
                    let outcome = e.data["outcome"]
                        .as_str()
                        .unwrap_or("unspecified")
                        .to_string();
                    return Gateway::result_of(&e.data, &outcome, executed_now, output);
                }
                "error" => {
                    let kind = e.data["error"]["type"].as_str().unwrap_or_default();
                    return Err(Rejection {
                        code: "SSE error".into(),
                        reason: kind.to_string(),
                        message: e.data["error"]["message"]
                            .as_str()
                            .unwrap_or_default()
                            .into(),
                    });
                }
                _ => {}
            }
        }
        Err(transport("the event stream ended without a tool_result"))
    }
}

#[tonic::async_trait]
impl Target for Gateway {
    fn kind(&self) -> Kind {
        Kind::Gateway
    }

    async fn info(&mut self) -> R<Value> {
        let w = self.expect("GET", "/v1/workers", None, 200).await?;
        let t = self.expect("GET", "/v1/tools", None, 200).await?;
        let first = &w.body["workers"][0];
        let tools: Vec<Value> = t.body["tools"]
            .as_array()
            .map(|a| a.iter().map(|t| t["name"].clone()).collect())
            .unwrap_or_default();
        Ok(json!({
            "worker_id": first["worker_id"],
            "protocols": ["hands.v1"],
            "environments": first["environments"].as_array().map(|envs| envs.iter().map(|e| json!({"name": e, "tools": tools})).collect::<Vec<_>>()).unwrap_or_default(),
        }))
    }

    async fn list(&mut self) -> R<Vec<Value>> {
        let a = self.expect("GET", "/v1/sessions", None, 200).await?;
        Ok(a.body["sessions"].as_array().cloned().unwrap_or_default())
    }

    async fn open(&mut self, _id: &str, env: &str) -> R<(String, bool)> {
        let a = self
            .expect(
                "POST",
                "/v1/sessions",
                Some(&json!({"environment": env})),
                201,
            )
            .await?;
        Ok((
            a.body["session_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            true,
        ))
    }

    async fn close(&mut self, session: &str) -> R<bool> {
        let a = self
            .expect("DELETE", &format!("/v1/sessions/{session}"), None, 200)
            .await?;
        Ok(a.body["closed"] == true)
    }

    async fn call(
        &mut self,
        session: &str,
        id: &str,
        tool: &str,
        input_json: &str,
        stream: bool,
    ) -> R<Events> {
        let body = Gateway::body(id, tool, input_json)?;
        let path = format!("/v1/sessions/{session}/tool_use");
        if stream {
            return self.sse("POST", &path, Some(&body)).await;
        }
        let a = self.expect("POST", &path, Some(&body), 200).await?;
        let outcome = a.outcome.clone().unwrap_or_else(|| "unspecified".into());
        Gateway::result_of(&a.body, &outcome, true, Vec::new())
    }

    async fn start_and_leave(
        &mut self,
        session: &str,
        id: &str,
        tool: &str,
        input_json: &str,
    ) -> R<bool> {
        let body = Gateway::body(id, tool, input_json)?;
        // A client of its own, so leaving drops only that connection.
        let mut api = ApiClient::new(self.addr, &self.token);
        let (status, events) = api
            .stream_until(
                "POST",
                &format!("/v1/sessions/{session}/tool_use"),
                Some(&body),
                |e| e.event == "started",
            )
            .await
            .map_err(transport)?;
        match events.first() {
            Some(e) if status == 200 && e.event == "started" => Ok(e.data["executed_now"] == true),
            Some(e) => Err(Gateway::http_rejection(status, &e.data)),
            None => Err(transport("no started event")),
        }
    }

    async fn attach(&mut self, session: &str, id: &str, from: u64) -> R<Events> {
        self.sse(
            "GET",
            &format!("/v1/sessions/{session}/calls/{id}?from_offset={from}"),
            None,
        )
        .await
    }

    async fn cancel(&mut self, session: &str, id: &str) -> R<bool> {
        let a = self
            .expect(
                "POST",
                &format!("/v1/sessions/{session}/calls/{id}/cancel"),
                None,
                200,
            )
            .await?;
        Ok(a.body["cancelled"] == true)
    }

    async fn call_with_deadline(
        &mut self,
        _session: &str,
        _id: &str,
        _tool: &str,
        _input_json: &str,
        _deadline: Duration,
    ) -> Option<R<Events>> {
        None
    }
}
