//! The MCP face: hands' six tools (bash, read, write, edit, glob, grep) served
//! as a Model Context Protocol server, on the official Rust SDK (`rmcp`).
//!
//! One MCP connection is one hands session ([`Sandbox`]): on the worker, every
//! `tools/call` goes through the one call pipeline (`Session::submit`), so it
//! is confined, journaled and audited as a call from any other face, under the
//! connector name `mcp`; on the gateway, it is a hands.v1 call through the
//! tunnel to a session on a worker (`crate::gateway::mcp`). What this module
//! adds is the protocol's side only:
//!
//! - `tools/list`: the tools' names, descriptions and input schemas, the same
//!   as every other face offers (`tools/definitions.json`), with MCP's hints
//!   (read, glob and grep read only; bash, write and edit may change files);
//! - `tools/call`: the client's arguments passed on as the tool's raw input; the
//!   result's text, images and documents as MCP content, `is_error` as
//!   `isError`. A tool hands does not have is a JSON-RPC error
//!   (`-32602`, naming the six), as MCP asks of an unknown tool;
//! - progress: when the client sent a progress token, each piece of a bash
//!   call's output reaches it as a `notifications/progress` while the call
//!   runs (`progress` counts the bytes so far, `message` carries them);
//! - cancellation: `notifications/cancelled` for a running call cancels it in
//!   the session as hands.v1's `Cancel` does, which kills every process the
//!   call started.
//!
//! The transports are chosen by the caller: stdio for `hands mcp`
//! ([`serve_lines`]), with its session opened before the connection; and
//! streamable HTTP on the worker ([`http`]), where the face opens its session
//! when the client initializes.

pub mod http;
pub mod stdio;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use rmcp::handler::server::ServerHandler;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock as McpContent, ErrorData,
    Implementation, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam,
    ProgressToken, ResourceContents, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::{Peer, RequestContext, RoleServer};

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::session::activity::Snapshot;
use crate::session::call::{finished, CallSpec};
use crate::session::journal::{CallRecord, CallState};
use crate::session::registry::Registry;
use crate::session::Session;
use crate::tools::{ContentBlock, ToolResult};

/// The tools every face offers, in the agent toolset's order.
pub const TOOL_NAMES: [&str; 6] = ["bash", "read", "write", "edit", "glob", "grep"];

/// How much of a bash call's output one progress notification carries at most.
const PROGRESS_CHUNK: usize = 16 * 1024;

/// The calls one session runs at once; one more is refused (an agent runs a
/// few in parallel; thousands would be a client holding the worker's
/// memory).
pub const MAX_CALLS_IN_FLIGHT: usize = 32;

/// The six tools as MCP lists them: name, description and input schema from
/// the definitions every face shares, with MCP's behaviour hints.
pub fn tools() -> Vec<Tool> {
    #[derive(serde::Deserialize)]
    struct Definition {
        name: String,
        description: String,
        input_schema: serde_json::Map<String, serde_json::Value>,
    }
    let defs: Vec<Definition> = serde_json::from_str(include_str!("../../tools/definitions.json"))
        .expect("definitions.json is valid (tested)");
    defs.into_iter()
        .map(|d| {
            let read_only = matches!(d.name.as_str(), "read" | "glob" | "grep");
            let hints = ToolAnnotations::new()
                .read_only(read_only)
                .destructive(!read_only)
                .idempotent(read_only)
                .open_world(false);
            Tool::new_with_raw(d.name, Some(d.description.into()), Arc::new(d.input_schema))
                .with_annotations(hints)
        })
        .collect()
}

/// One tool call as a [`Sandbox`] runs it.
pub struct SandboxCall {
    /// Unique in the session.
    pub call_id: String,
    pub tool: String,
    /// The tool's input, raw JSON.
    pub input: String,
    /// Receives the call's output while it runs, when given; closed once
    /// every byte produced before the call finished went out.
    pub output: Option<mpsc::Sender<Vec<u8>>>,
    /// Cancelled when the client gives up on the call: the call, and every
    /// process it started, is then killed.
    pub cancel: CancellationToken,
}

/// Why a call has no result.
#[derive(Debug)]
pub enum CallError {
    /// The session refused it (its input, its id): the client's to fix.
    Refused(String),
    /// It could not run or finish (the session closed, the worker gone).
    Failed(String),
}

/// The session one MCP connection drives: a session of this process's
/// registry ([`LocalSandbox`]), or one on a worker behind a gateway.
pub trait Sandbox: Send + Sync + 'static {
    /// The session's id (in logs and the audit log).
    fn id(&self) -> &str;
    /// Runs a call to its result.
    fn call(&self, call: SandboxCall) -> BoxFuture<'static, Result<Arc<ToolResult>, CallError>>;
    /// Whether calls run, and how long it has been idle.
    fn activity(&self) -> Snapshot;
    /// Marks the session used (a request named it).
    fn touch(&self);
    /// Ends the session: its processes killed, its workspace removed.
    fn close(&self) -> BoxFuture<'static, ()>;
}

/// A session of this process: calls through `Session::submit`.
pub struct LocalSandbox {
    session: Arc<Session>,
    /// The registry it was opened in, which closes it, and its id there;
    /// none for a session its opener closes itself (`hands mcp`).
    registry: Option<(Arc<Registry>, String)>,
}

impl LocalSandbox {
    pub fn new(session: Arc<Session>, registry: Option<(Arc<Registry>, String)>) -> LocalSandbox {
        LocalSandbox { session, registry }
    }
}

impl Sandbox for LocalSandbox {
    fn id(&self) -> &str {
        match &self.registry {
            Some((_, id)) => id,
            None => self.session.id(),
        }
    }

    fn call(&self, call: SandboxCall) -> BoxFuture<'static, Result<Arc<ToolResult>, CallError>> {
        let session = self.session.clone();
        Box::pin(async move {
            let SandboxCall {
                call_id,
                tool,
                input,
                output,
                cancel,
            } = call;
            let submitted = session
                .submit(CallSpec::new(&call_id, &tool, input))
                .map_err(|e| CallError::Refused(format!("{tool}: {e}")))?;
            let rec = submitted.record;
            let progress = output.map(|tx| tokio::spawn(stream_output(rec.clone(), tx)));
            let outcome = tokio::select! {
                r = finished(&rec) => r,
                () = cancel.cancelled() => {
                    // The client gave up on the call: stop it (and every
                    // process it started) rather than let it run on unseen.
                    rec.cancel();
                    finished(&rec).await
                }
            };
            if let Some(task) = progress {
                // It ends by itself once the call finished and its output is out.
                let _ = task.await;
            }
            let (result, _) =
                outcome.map_err(|e| CallError::Failed(format!("call {call_id}: {e}")))?;
            Ok(result)
        })
    }

    fn activity(&self) -> Snapshot {
        self.session.activity().snapshot()
    }

    fn touch(&self) {
        self.session.activity().touch();
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        let registry = self.registry.clone();
        Box::pin(async move {
            if let Some((registry, id)) = registry {
                // Killing the session's processes may block for a moment.
                let _ = tokio::task::spawn_blocking(move || registry.close(&id)).await;
            }
        })
    }
}

/// One MCP connection's server: its session, and the count that makes each
/// call's id unique within it.
pub struct McpFace {
    session: OnceLock<Arc<dyn Sandbox>>,
    /// Opens the session at `initialize` (streamable HTTP).
    opener: Option<Arc<http::Sessions>>,
    env: String,
    tools: Arc<Vec<Tool>>,
    calls: AtomicU64,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// The calls running, by their number: what cancels each, and whether it
    /// has ended.
    running: Arc<std::sync::Mutex<HashMap<u64, Running>>>,
}

/// A call of the face while it runs.
struct Running {
    cancel: CancellationToken,
    ended: tokio::sync::watch::Receiver<bool>,
}

/// Marks a call ended however its handler ends (finished, or dropped).
struct Ended {
    n: u64,
    tx: tokio::sync::watch::Sender<bool>,
    running: Arc<std::sync::Mutex<HashMap<u64, Running>>>,
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.tx.send_replace(true);
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.n);
    }
}

/// How long a call waits for calls cancelled before it to end.
const CANCELLED_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl McpFace {
    /// The face of `session` (of environment `env`, named in the instructions
    /// the client receives).
    pub fn new(session: Arc<dyn Sandbox>, env: impl Into<String>) -> McpFace {
        let face = McpFace::empty(None, env.into());
        let _ = face.session.set(session);
        face
    }

    /// A face whose session `sessions` opens when the client initializes.
    pub fn lazy(sessions: Arc<http::Sessions>) -> McpFace {
        let env = sessions.env().to_string();
        McpFace::empty(Some(sessions), env)
    }

    fn empty(opener: Option<Arc<http::Sessions>>, env: String) -> McpFace {
        McpFace {
            session: OnceLock::new(),
            opener,
            env,
            tools: Arc::new(tools()),
            calls: AtomicU64::new(0),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_CALLS_IN_FLIGHT)),
            running: Arc::new(std::sync::Mutex::new(HashMap::new())),
        }
    }

    /// The call's number in the face, and its id in the journal and the
    /// audit log: unique in the session
    /// (MCP has no retries by id, so a client reusing a request id must not get
    /// an earlier result back), with the client's request id in it where it is
    /// made of the characters ids allow.
    fn call_id(&self, request: &rmcp::model::RequestId) -> (u64, String) {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let with_request = format!("mcp-{n}-{request}");
        if crate::session::registry::valid_id(&with_request) {
            (n, with_request)
        } else {
            (n, format!("mcp-{n}"))
        }
    }
}

impl ServerHandler for McpFace {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("hands", env!("CARGO_PKG_VERSION")))
            .with_instructions(format!(
                "hands runs each tool call in a confined sandbox session of the {:?} \
                 environment: the workspace is /workspace (the working directory of bash, \
                 where relative paths of the file tools start), the shell's directory and \
                 variables persist between calls, and the environment's policy decides \
                 which paths and hosts the session can reach.",
                self.env
            ))
    }

    async fn initialize(
        &self,
        request: rmcp::model::InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::InitializeResult, ErrorData> {
        if let Some(sessions) = &self.opener {
            let Some(id) = context.extensions.get::<http::McpSessionId>() else {
                return Err(ErrorData::internal_error(
                    "the transport gave this connection no MCP session",
                    None,
                ));
            };
            let session = sessions.open(&id.0).await.map_err(|e| {
                tracing::warn!(error = %e, env = %self.env, "mcp: no session for a client");
                ErrorData::internal_error(format!("no sandbox session: {e}"), None)
            })?;
            let _ = self.session.set(session);
        }
        context.peer.set_peer_info(request.clone());
        self.negotiate_initialize(&request)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.tools.as_ref().clone()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let tool = request.name.as_ref();
        if !TOOL_NAMES.contains(&tool) {
            return Err(ErrorData::invalid_params(
                format!(
                    "unknown tool {tool:?}: hands offers {}",
                    TOOL_NAMES.join(", ")
                ),
                None,
            ));
        }
        let input = serde_json::to_string(&request.arguments.unwrap_or_default())
            .map_err(|e| ErrorData::invalid_params(format!("arguments: {e}"), None))?;
        let Some(session) = self.session.get() else {
            return Err(ErrorData::invalid_request(
                "hands runs tools in a sandbox that lasts from one call to the next: initialize \
                 an MCP session first (protocol 2025-11-25 or earlier) and send its Mcp-Session-Id",
                None,
            ));
        };
        let Ok(_slot) = self.in_flight.clone().try_acquire_owned() else {
            return Err(ErrorData::invalid_request(
                format!(
                    "{MAX_CALLS_IN_FLIGHT} calls are already running in this session; wait for \
                     one to finish"
                ),
                None,
            ));
        };
        // A cancel is a notification: the client may send its next call (a
        // restart, say) before the cancelled call's processes are killed. The
        // calls it cancelled end first, so that a kill never lands after, on
        // the shell the next call started.
        let cancelled: Vec<tokio::sync::watch::Receiver<bool>> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|r| r.cancel.is_cancelled())
            .map(|r| r.ended.clone())
            .collect();
        for mut ended in cancelled {
            let _ = tokio::time::timeout(CANCELLED_WAIT, ended.wait_for(|e| *e)).await;
        }
        let (n, call_id) = self.call_id(&context.id);
        let (tx, ended) = tokio::sync::watch::channel(false);
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                n,
                Running {
                    cancel: context.ct.clone(),
                    ended,
                },
            );
        let _ended = Ended {
            n,
            tx,
            running: self.running.clone(),
        };
        let progress = context
            .meta
            .get_progress_token()
            .filter(|_| tool == "bash")
            .map(|token| {
                let (tx, rx) = mpsc::channel(16);
                let task = tokio::spawn(send_progress(rx, context.peer.clone(), token));
                (tx, task)
            });
        let (output, task) = match progress {
            Some((tx, task)) => (Some(tx), Some(task)),
            None => (None, None),
        };
        let result = session
            .call(SandboxCall {
                call_id,
                tool: tool.to_string(),
                input,
                output,
                cancel: context.ct.clone(),
            })
            .await;
        if let Some(task) = task {
            // It ends once the call's output is out (the sender is gone).
            let _ = task.await;
        }
        let result = result.map_err(|e| match e {
            CallError::Refused(m) => ErrorData::invalid_params(m, None),
            CallError::Failed(m) => ErrorData::internal_error(m, None),
        })?;
        Ok(to_mcp(&result).into())
    }
}

/// Serves `face` on a line-framed byte stream (`input`, `output`: stdin and
/// stdout for `hands mcp`) through the framing layer of [`stdio`]. Returns once
/// the client initialized; the service runs until `input` ends or it is
/// cancelled.
pub async fn serve_lines<R, W>(
    face: McpFace,
    input: R,
    output: W,
) -> Result<rmcp::service::RunningService<RoleServer, McpFace>, rmcp::service::ServerInitializeError>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use rmcp::ServiceExt;
    let (to_sdk, sdk_in) = tokio::io::duplex(1 << 16);
    let (sdk_out, from_sdk) = tokio::io::duplex(1 << 16);
    let (answers_tx, answers_rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(stdio::pump_in(input, to_sdk, answers_tx));
    tokio::spawn(stdio::pump_out(from_sdk, output, answers_rx));
    face.serve((sdk_in, sdk_out)).await
}

/// Sends a call's output to `out` until the call finished and every byte
/// produced before that went out (or `out` is closed).
async fn stream_output(rec: Arc<CallRecord>, out: mpsc::Sender<Vec<u8>>) {
    let mut state = rec.subscribe();
    let mut sent: u64 = 0;
    loop {
        let (end, done) = {
            let s = state.borrow_and_update();
            (s.output_end(), !matches!(*s, CallState::Running { .. }))
        };
        while sent < end {
            let Ok((_, bytes)) = rec.read_output(sent, PROGRESS_CHUNK) else {
                // Older output was dropped (the tail is kept): go on from what is held.
                sent = end;
                break;
            };
            if bytes.is_empty() {
                break;
            }
            sent += bytes.len() as u64;
            if out.send(bytes).await.is_err() {
                return; // nobody listens any more
            }
        }
        if done || state.changed().await.is_err() {
            return;
        }
    }
}

/// Sends each piece of output to the client as a progress notification:
/// `progress` counts the bytes so far, `message` carries the piece.
async fn send_progress(
    mut pieces: mpsc::Receiver<Vec<u8>>,
    peer: Peer<RoleServer>,
    token: ProgressToken,
) {
    let mut sent: u64 = 0;
    while let Some(bytes) = pieces.recv().await {
        for piece in bytes.chunks(PROGRESS_CHUNK) {
            sent += piece.len() as u64;
            let note = ProgressNotificationParam::new(token.clone(), sent as f64)
                .with_message(String::from_utf8_lossy(piece));
            if peer.notify_progress(note).await.is_err() {
                return; // the client is gone
            }
        }
    }
}

/// A hands result as MCP content: text as text, images as images, documents
/// (PDF) as an embedded resource with the bytes.
pub fn to_mcp(result: &ToolResult) -> CallToolResult {
    let content = result
        .content
        .iter()
        .map(|block| match block {
            ContentBlock::Text { text } => McpContent::text(text.clone()),
            ContentBlock::Image { source } => {
                McpContent::image(source.data.clone(), source.media_type.clone())
            }
            ContentBlock::Document { source } => {
                McpContent::resource(ResourceContents::BlobResourceContents {
                    uri: "hands:document".to_string(),
                    mime_type: Some(source.media_type.clone()),
                    blob: source.data.clone(),
                    meta: None,
                })
            }
        })
        .collect();
    let mut out = CallToolResult::success(content);
    out.is_error = Some(result.is_error);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_six_tools_are_listed_with_their_schemas_and_hints() {
        let tools = tools();
        let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
        assert_eq!(names, TOOL_NAMES);
        for t in &tools {
            assert_eq!(
                t.input_schema.get("type"),
                Some(&serde_json::json!("object"))
            );
            assert!(t.description.as_deref().is_some_and(|d| !d.is_empty()));
            let hints = t.annotations.as_ref().expect("hints");
            let read_only = ["read", "glob", "grep"].contains(&t.name.as_ref());
            assert_eq!(hints.read_only_hint, Some(read_only), "{}", t.name);
        }
    }

    #[test]
    fn results_keep_their_blocks_and_error_flag() {
        let r = ToolResult::err("no such file");
        let m = to_mcp(&r);
        assert_eq!(m.is_error, Some(true));
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["content"][0]["type"], "text");
        assert_eq!(json["content"][0]["text"], "no such file");
        assert_eq!(json["isError"], true);
    }
}
