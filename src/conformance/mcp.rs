//! `hands conformance --mcp URL`: named cases against any MCP face of a
//! sandbox over streamable HTTP (a worker's `[mcp]` endpoint, a gateway's
//! `/v1/environments/{env}/mcp`, or another sandbox's). Procedures and
//! assertions: `tests/conformance/README.md`, section *MCP*.
//!
//! The client here is the project's own, small and strict (JSON-RPC over
//! `POST`, answers as JSON or an SSE stream, `Mcp-Session-Id`), so that it
//! states exactly what each case sends; interoperability with the official
//! SDKs is what the integration tests show.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::net::client::Connector;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use serde_json::{json, Value};

use super::Report;

/// The protocol revision the client speaks.
const PROTOCOL: &str = "2025-11-25";

/// The six tools and their input schemas, as every face of hands offers them.
fn definitions() -> Vec<Value> {
    serde_json::from_str(include_str!("../tools/definitions.json"))
        .expect("definitions.json is valid (tested)")
}

/// An MCP endpoint: its URL and bearer token.
pub struct McpTarget {
    http: Client<Connector, Full<Bytes>>,
    uri: http::Uri,
    token: Option<String>,
    /// Sessions a case opened, ended after it.
    opened: Mutex<Vec<McpSession>>,
}

/// One MCP session (after `initialize`).
#[derive(Clone)]
pub struct McpSession {
    http: Client<Connector, Full<Bytes>>,
    uri: http::Uri,
    token: Option<String>,
    id: Option<String>,
    next: Arc<AtomicU64>,
}

/// What the server answered.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The JSON-RPC message that answers the request, if any.
    pub message: Option<Value>,
    /// Notifications that came before it on the request's stream.
    pub notes: Vec<Value>,
    pub session: Option<String>,
    pub text: String,
}

impl McpTarget {
    /// `url`: `http://host:port/path`.
    pub fn new(url: &str, token: Option<String>) -> Result<McpTarget, String> {
        McpTarget::with_tls(url, token, None)
    }

    /// `url`: `http://host:port/path`, or `https://` with `tls` (the CA to
    /// trust, a client certificate: [`crate::net::tls::https_client_config`]).
    pub fn with_tls(
        url: &str,
        token: Option<String>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<McpTarget, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        match (uri.scheme_str(), &tls) {
            (Some("http"), _) | (Some("https"), Some(_)) => {}
            (Some("https"), None) => {
                return Err(format!("{url:?}: https:// needs a TLS configuration"))
            }
            _ => return Err(format!("{url:?}: an http:// or https:// URL")),
        }
        // Requests are small and answered in pieces (SSE): the dial turns
        // Nagle off.
        let connector = Connector::new(tls, Duration::from_secs(10));
        let http = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        Ok(McpTarget {
            http,
            uri,
            token,
            opened: Mutex::new(Vec::new()),
        })
    }

    fn unopened(&self) -> McpSession {
        McpSession {
            http: self.http.clone(),
            uri: self.uri.clone(),
            token: self.token.clone(),
            id: None,
            next: Arc::new(AtomicU64::new(1)),
        }
    }

    /// A new, initialized session (ended after the case).
    pub async fn session(&self) -> Result<McpSession, String> {
        let mut s = self.unopened();
        let a = s
            .request(
                "initialize",
                json!({"protocolVersion": PROTOCOL, "capabilities": {},
                    "clientInfo": {"name": "hands-conformance", "version": env!("CARGO_PKG_VERSION")}}),
            )
            .await?;
        let Some(m) = &a.message else {
            return Err(format!(
                "initialize: HTTP {} without an answer: {}",
                a.status, a.text
            ));
        };
        if m.get("error").is_some() {
            return Err(format!("initialize refused: {m}"));
        }
        s.id = a.session.clone();
        s.notify("notifications/initialized", json!({})).await?;
        self.opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(s.clone());
        Ok(s)
    }

    async fn close_opened(&self) {
        let all = std::mem::take(&mut *self.opened.lock().unwrap_or_else(|p| p.into_inner()));
        for s in all {
            let _ = tokio::time::timeout(Duration::from_secs(10), s.delete()).await;
        }
    }
}

impl McpSession {
    fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn post(&self, body: Bytes) -> http::Request<Full<Bytes>> {
        let mut b = http::Request::post(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json, text/event-stream");
        if let Some(t) = &self.token {
            b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(id) = &self.id {
            b = b
                .header("mcp-session-id", id)
                .header("mcp-protocol-version", PROTOCOL);
        }
        b.body(Full::new(body)).expect("a valid request")
    }

    /// Posts `body` (any bytes) and reads the answer to request `id` (none
    /// for a notification).
    pub async fn send(&self, body: Bytes, id: Option<&Value>) -> Result<Answer, String> {
        self.send_watching(body, id, |_| {}).await
    }

    async fn send_watching(
        &self,
        body: Bytes,
        id: Option<&Value>,
        mut on_note: impl FnMut(&Value),
    ) -> Result<Answer, String> {
        let resp = self
            .http
            .request(self.post(body))
            .await
            .map_err(|e| format!("POST {}: {}", self.uri, crate::util::error_chain(&e)))?;
        let status = resp.status().as_u16();
        let session = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let sse = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let mut body = resp.into_body();
        let mut answer = Answer {
            status,
            message: None,
            notes: Vec::new(),
            session,
            text: String::new(),
        };
        if !sse {
            let bytes = body
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            answer.text = String::from_utf8_lossy(&bytes).to_string();
            answer.message = serde_json::from_slice(&bytes).ok();
            return Ok(answer);
        }
        // An SSE stream: events until the one answering `id`.
        let mut buf = String::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("reading the stream: {e}"))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.push_str(&String::from_utf8_lossy(&data));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue;
                }
                let Ok(msg) = serde_json::from_str::<Value>(&data.join("\n")) else {
                    continue;
                };
                if id.is_some_and(|id| msg.get("id") == Some(id))
                    && (msg.get("result").is_some() || msg.get("error").is_some())
                {
                    answer.message = Some(msg);
                    return Ok(answer);
                }
                if msg.get("method").is_some() {
                    on_note(&msg);
                    answer.notes.push(msg);
                }
            }
        }
        Ok(answer)
    }

    /// A request; its answer (`result` or `error`).
    pub async fn request(&self, method: &str, params: Value) -> Result<Answer, String> {
        let id = json!(self.next_id());
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.send(Bytes::from(body.to_string()), Some(&id)).await
    }

    pub async fn notify(&self, method: &str, params: Value) -> Result<Answer, String> {
        let body = json!({"jsonrpc": "2.0", "method": method, "params": params});
        self.send(Bytes::from(body.to_string()), None).await
    }

    /// `tools/call` with request id `id`, a progress token when `progress`,
    /// and `on_note` told of each notification as it comes.
    pub async fn call_as(
        &self,
        id: u64,
        tool: &str,
        args: Value,
        progress: bool,
        on_note: impl FnMut(&Value),
    ) -> Result<Answer, String> {
        let mut params = json!({"name": tool, "arguments": args});
        if progress {
            params["_meta"] = json!({"progressToken": format!("p{id}")});
        }
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params});
        self.send_watching(Bytes::from(body.to_string()), Some(&json!(id)), on_note)
            .await
    }

    /// `tools/call`: the tool result (`result`), or why there is none.
    pub async fn call(&self, tool: &str, args: Value) -> Result<ToolAnswer, String> {
        let a = self
            .call_as(self.next_id(), tool, args, false, |_| {})
            .await?;
        tool_answer(tool, &a)
    }

    /// `tools/call` that must succeed: its text.
    pub async fn text(&self, tool: &str, args: Value) -> Result<String, String> {
        let r = self.call(tool, args.clone()).await?;
        if r.is_error {
            return Err(format!("{tool} {args}: unexpected isError: {:?}", r.text));
        }
        Ok(r.text)
    }

    pub async fn delete(&self) -> Result<u16, String> {
        let mut b = http::Request::delete(self.uri.clone());
        if let Some(t) = &self.token {
            b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(id) = &self.id {
            b = b.header("mcp-session-id", id);
        }
        let resp = self
            .http
            .request(b.body(Full::new(Bytes::new())).expect("a valid request"))
            .await
            .map_err(|e| format!("DELETE: {}", crate::util::error_chain(&e)))?;
        Ok(resp.status().as_u16())
    }
}

/// A tool result.
#[derive(Debug)]
pub struct ToolAnswer {
    pub text: String,
    pub is_error: bool,
}

fn tool_answer(tool: &str, a: &Answer) -> Result<ToolAnswer, String> {
    let Some(m) = &a.message else {
        return Err(format!(
            "{tool}: HTTP {} without an answer: {}",
            a.status, a.text
        ));
    };
    let Some(result) = m.get("result") else {
        return Err(format!("{tool}: an error, not a result: {m}"));
    };
    let text = result["content"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default();
    Ok(ToolAnswer {
        text,
        is_error: result["isError"] == true,
    })
}

macro_rules! need {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

type CaseFut<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
type CaseFn = for<'a> fn(&'a McpTarget) -> CaseFut<'a>;

/// An MCP case: its name and procedure.
pub struct McpCase {
    pub name: &'static str,
    pub run: CaseFn,
}

macro_rules! case {
    ($name:ident, |$t:ident| $body:block) => {
        fn $name<'a>($t: &'a McpTarget) -> CaseFut<'a> {
            Box::pin(async move { $body })
        }
    };
}

/// A number no other run's processes carry (the cancel case looks for it).
fn marker() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    70_000 + u32::from_le_bytes(b) % 20_000
}

case!(mcp_initialize_opens_a_session, |t| {
    let s = t.unopened();
    let a = s
        .request(
            "initialize",
            json!({"protocolVersion": PROTOCOL, "capabilities": {},
                "clientInfo": {"name": "hands-conformance", "version": "1"}}),
        )
        .await?;
    need!(a.status == 200, "initialize: HTTP {}: {}", a.status, a.text);
    let m = a.message.ok_or("initialize: no answer")?;
    let r = &m["result"];
    need!(
        r["protocolVersion"].as_str().is_some(),
        "no protocolVersion: {m}"
    );
    need!(
        r["capabilities"]["tools"].is_object(),
        "the tools capability is missing: {m}"
    );
    need!(
        r["serverInfo"]["name"].as_str().is_some(),
        "no serverInfo.name: {m}"
    );
    need!(
        a.session
            .as_deref()
            .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b))),
        "no Mcp-Session-Id of visible ASCII: {:?}",
        a.session
    );
    let opened = McpSession { id: a.session, ..s };
    t.opened
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(opened);
    Ok(())
});

case!(mcp_tools_are_the_six_with_their_schemas, |t| {
    let s = t.session().await?;
    let a = s.request("tools/list", json!({})).await?;
    let m = a.message.ok_or("tools/list: no answer")?;
    let tools = m["result"]["tools"]
        .as_array()
        .ok_or(format!("tools/list: no tools: {m}"))?;
    let names: Vec<&str> = tools.iter().filter_map(|x| x["name"].as_str()).collect();
    let want: Vec<Value> = definitions();
    let want_names: Vec<&str> = want.iter().filter_map(|d| d["name"].as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    let mut want_sorted = want_names.clone();
    want_sorted.sort_unstable();
    need!(
        sorted == want_sorted,
        "tools {names:?}, expected {want_names:?}"
    );
    for d in &want {
        let got = tools
            .iter()
            .find(|x| x["name"] == d["name"])
            .expect("listed");
        need!(
            got["inputSchema"] == d["input_schema"],
            "{}: inputSchema {} differs from the toolset's {}",
            d["name"],
            got["inputSchema"],
            d["input_schema"]
        );
        need!(
            got["description"].as_str().is_some_and(|x| !x.is_empty()),
            "{}: no description",
            d["name"]
        );
    }
    Ok(())
});

case!(mcp_bash_shell_persists, |t| {
    let s = t.session().await?;
    s.text(
        "bash",
        json!({"command": "mkdir -p /tmp/conf && cd /tmp/conf && export CONF_X=42"}),
    )
    .await?;
    let out = s
        .text("bash", json!({"command": "pwd; echo $CONF_X"}))
        .await?;
    need!(
        out.trim() == "/tmp/conf\n42",
        "the shell did not keep its directory and variable: {out:?}"
    );
    Ok(())
});

case!(mcp_tool_failure_is_a_result, |t| {
    let s = t.session().await?;
    let r = s
        .call("bash", json!({"command": "echo failing >&2; exit 3"}))
        .await?;
    need!(r.is_error, "a failing command is not isError: {r:?}");
    need!(r.text.contains("failing"), "its output is lost: {r:?}");
    let r = s
        .call("read", json!({"file_path": "no/such/file.txt"}))
        .await?;
    need!(r.is_error, "reading a missing file is not isError: {r:?}");
    Ok(())
});

case!(mcp_file_tools_round_trip, |t| {
    let s = t.session().await?;
    s.text(
        "write",
        json!({"file_path": "conf/a.txt", "content": "alpha\nbeta\n"}),
    )
    .await?;
    let read = s.text("read", json!({"file_path": "conf/a.txt"})).await?;
    need!(
        read.contains("alpha") && read.contains("beta"),
        "read does not return what was written: {read:?}"
    );
    s.text(
        "edit",
        json!({"file_path": "conf/a.txt", "old_string": "beta", "new_string": "gamma"}),
    )
    .await?;
    let read = s.text("read", json!({"file_path": "conf/a.txt"})).await?;
    need!(
        read.contains("gamma") && !read.contains("beta"),
        "edit did not replace: {read:?}"
    );
    let glob = s.text("glob", json!({"pattern": "**/*.txt"})).await?;
    need!(
        glob.contains("conf/a.txt"),
        "glob misses the file: {glob:?}"
    );
    let grep = s
        .text("grep", json!({"pattern": "gam+a", "path": "conf"}))
        .await?;
    need!(grep.contains("a.txt"), "grep misses the file: {grep:?}");
    Ok(())
});

case!(mcp_host_files_stay_out_of_reach, |t| {
    let s = t.session().await?;
    let r = s.call("read", json!({"file_path": "/etc/shadow"})).await?;
    need!(
        r.is_error && !r.text.contains("root:"),
        "read reached the host's /etc/shadow: {r:?}"
    );
    let r = s
        .call("bash", json!({"command": "cat /etc/shadow"}))
        .await?;
    need!(
        r.is_error && !r.text.contains("root:"),
        "bash read /etc/shadow: {r:?}"
    );
    Ok(())
});

case!(mcp_bash_output_streams_as_progress, |t| {
    let s = t.session().await?;
    let a = s
        .call_as(
            9001,
            "bash",
            json!({"command": "for i in 1 2 3; do echo p$i; sleep 0.4; done"}),
            true,
            |_| {},
        )
        .await?;
    let r = tool_answer("bash", &a)?;
    need!(!r.is_error, "the call failed: {r:?}");
    let notes: Vec<&Value> = a
        .notes
        .iter()
        .filter(|n| n["method"] == "notifications/progress")
        .collect();
    need!(
        notes.len() >= 2,
        "expected progress while the call ran, got {} notification(s): {:?}",
        notes.len(),
        a.notes
    );
    let mut last = -1.0;
    let mut streamed = String::new();
    for n in &notes {
        let p = &n["params"];
        need!(
            p["progressToken"] == "p9001",
            "progress for another token: {n}"
        );
        let v = p["progress"].as_f64().unwrap_or(-1.0);
        let increases = v.partial_cmp(&last) == Some(std::cmp::Ordering::Greater);
        need!(increases, "progress does not increase: {last} then {v}");
        last = v;
        streamed.push_str(p["message"].as_str().unwrap_or_default());
    }
    need!(
        streamed.trim() == "p1\np2\np3",
        "the progress messages are not the output: {streamed:?}"
    );
    Ok(())
});

case!(mcp_cancelled_call_is_killed, |t| {
    let s = t.session().await?;
    let m = marker();
    let (started_tx, mut started) = tokio::sync::mpsc::channel::<()>(4);
    let runner = s.clone();
    let long = tokio::spawn(async move {
        runner
            .call_as(
                9002,
                "bash",
                json!({"command": format!("echo started; sleep {m}; echo finished")}),
                true,
                move |_| {
                    let _ = started_tx.try_send(());
                },
            )
            .await
    });
    let began = tokio::time::timeout(Duration::from_secs(30), started.recv()).await;
    need!(
        matches!(began, Ok(Some(()))),
        "the long call showed no progress within 30 s"
    );
    s.notify(
        "notifications/cancelled",
        json!({"requestId": 9002, "reason": "conformance"}),
    )
    .await?;
    let ended = tokio::time::timeout(Duration::from_secs(15), long).await;
    let Ok(Ok(ended)) = ended else {
        return Err("the cancelled call did not end within 15 s".into());
    };
    if let Ok(a) = &ended {
        if let Ok(r) = tool_answer("bash", a) {
            need!(
                !r.text.contains("finished"),
                "the cancelled call ran to its end: {r:?}"
            );
        }
    }
    // A shell killed with its call may need a restart (the agent toolset's
    // contract); then nothing of the call may be left.
    let restarted = s.call("bash", json!({"restart": true})).await?;
    need!(
        !restarted.is_error,
        "the restart after the cancel failed: {restarted:?}"
    );
    let left = s
        .text(
            "bash",
            json!({"command": format!(
                "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^sleep {m} ' || true"
            )}),
        )
        .await?;
    need!(
        left.trim() == "0",
        "the cancelled call's sleep is still running ({} left)",
        left.trim()
    );
    Ok(())
});

case!(mcp_unknown_tool_is_a_protocol_error, |t| {
    let s = t.session().await?;
    let a = s
        .call_as(9003, "launch_missiles", json!({}), false, |_| {})
        .await?;
    let m = a
        .message
        .ok_or(format!("no answer (HTTP {}): {}", a.status, a.text))?;
    need!(
        m["error"]["code"] == -32602,
        "an unknown tool must be JSON-RPC error -32602, got {m}"
    );
    let still = s.text("bash", json!({"command": "echo serving"})).await?;
    need!(still.trim() == "serving", "the session stopped serving");
    Ok(())
});

case!(mcp_malformed_requests_get_errors, |t| {
    let s = t.session().await?;
    let a = s.send(Bytes::from_static(b"{not json"), None).await?;
    let parse_error = a
        .message
        .as_ref()
        .is_some_and(|m| m["error"]["code"] == -32700);
    need!(
        (400..500).contains(&a.status) || parse_error,
        "a body that is not JSON got HTTP {} {:?}",
        a.status,
        a.text
    );
    let a = s
        .call_as(9004, "bash", json!({"command": 5}), false, |_| {})
        .await?;
    let refused = match &a.message {
        Some(m) if m.get("error").is_some() => true,
        Some(m) => m["result"]["isError"] == true,
        None => (400..500).contains(&a.status),
    };
    need!(
        refused,
        "bash with a non-string command was not refused: HTTP {} {:?}",
        a.status,
        a.text
    );
    let still = s.text("bash", json!({"command": "echo serving"})).await?;
    need!(still.trim() == "serving", "the session stopped serving");
    Ok(())
});

case!(mcp_sessions_are_isolated, |t| {
    let a = t.session().await?;
    let b = t.session().await?;
    a.text(
        "write",
        json!({"file_path": "only-a.txt", "content": "a's\n"}),
    )
    .await?;
    let r = b.call("read", json!({"file_path": "only-a.txt"})).await?;
    need!(r.is_error, "session B read session A's file: {r:?}");
    let ls = b
        .text("bash", json!({"command": "ls -a; echo end"}))
        .await?;
    need!(
        !ls.contains("only-a.txt"),
        "session B sees session A's file: {ls:?}"
    );
    Ok(())
});

case!(mcp_delete_ends_the_session, |t| {
    let s = t.session().await?;
    s.text("bash", json!({"command": "echo up"})).await?;
    let status = s.delete().await?;
    need!(
        (200..300).contains(&status),
        "DELETE answered HTTP {status}"
    );
    let a = s.request("tools/list", json!({})).await?;
    need!(
        a.status == 404,
        "a request in the deleted session got HTTP {} (404 expected): {}",
        a.status,
        a.text
    );
    Ok(())
});

/// Every MCP case, in order.
pub fn all() -> Vec<McpCase> {
    macro_rules! list {
        ($($name:ident),* $(,)?) => {
            vec![$(McpCase { name: stringify!($name), run: $name }),*]
        };
    }
    list![
        mcp_initialize_opens_a_session,
        mcp_tools_are_the_six_with_their_schemas,
        mcp_bash_shell_persists,
        mcp_tool_failure_is_a_result,
        mcp_file_tools_round_trip,
        mcp_host_files_stay_out_of_reach,
        mcp_bash_output_streams_as_progress,
        mcp_cancelled_call_is_killed,
        mcp_unknown_tool_is_a_protocol_error,
        mcp_malformed_requests_get_errors,
        mcp_sessions_are_isolated,
        mcp_delete_ends_the_session,
    ]
}

/// Runs the MCP cases against `target`.
pub async fn run(target: &McpTarget, name: &str, opts: &super::Options) -> Report {
    let mut reports = Vec::new();
    for case in all() {
        if !opts.only.is_empty() && !opts.only.iter().any(|o| o == case.name) {
            continue;
        }
        let t0 = Instant::now();
        let result = match tokio::time::timeout(opts.case_timeout, (case.run)(target)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", opts.case_timeout)),
        };
        target.close_opened().await;
        reports.push(super::case_report(case.name, result, opts, t0));
    }
    Report {
        target: name.to_string(),
        cases: reports,
    }
}
