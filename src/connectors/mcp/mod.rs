//! The MCP face: hands' six tools (bash, read, write, edit, glob, grep) served
//! as a Model Context Protocol server, on the official Rust SDK (`rmcp`).
//!
//! One MCP connection is one hands session: every `tools/call` goes through the
//! one call pipeline (`Session::submit`), so it is confined, journaled and
//! audited as a call from any other face, under the connector name `mcp`. What
//! this module adds is the protocol's side only:
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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use rmcp::handler::server::ServerHandler;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock as McpContent, ErrorData,
    Implementation, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam,
    ProgressToken, ResourceContents, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::{Peer, RequestContext, RoleServer};

use crate::session::call::{finished, CallSpec};
use crate::session::journal::{CallRecord, CallState};
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

/// One MCP connection's server: its session, and the count that makes each
/// call's id unique within it.
pub struct McpFace {
    session: OnceLock<Arc<Session>>,
    /// Opens the session at `initialize` (streamable HTTP).
    opener: Option<Arc<http::Endpoint>>,
    env: String,
    tools: Arc<Vec<Tool>>,
    calls: AtomicU64,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl McpFace {
    /// The face of `session` (of environment `env`, named in the instructions
    /// the client receives).
    pub fn new(session: Arc<Session>, env: impl Into<String>) -> McpFace {
        let face = McpFace::empty(None, env.into());
        let _ = face.session.set(session);
        face
    }

    /// A face whose session `endpoint` opens when the client initializes.
    pub fn lazy(endpoint: Arc<http::Endpoint>) -> McpFace {
        let env = endpoint.env().to_string();
        McpFace::empty(Some(endpoint), env)
    }

    fn empty(opener: Option<Arc<http::Endpoint>>, env: String) -> McpFace {
        McpFace {
            session: OnceLock::new(),
            opener,
            env,
            tools: Arc::new(tools()),
            calls: AtomicU64::new(0),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_CALLS_IN_FLIGHT)),
        }
    }

    /// The call's id in the journal and the audit log: unique in the session
    /// (MCP has no retries by id, so a client reusing a request id must not get
    /// an earlier result back), with the client's request id in it where it is
    /// made of the characters ids allow.
    fn call_id(&self, request: &rmcp::model::RequestId) -> String {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let with_request = format!("mcp-{n}-{request}");
        if crate::session::registry::valid_id(&with_request) {
            with_request
        } else {
            format!("mcp-{n}")
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
        if let Some(endpoint) = &self.opener {
            let Some(id) = context.extensions.get::<http::McpSessionId>() else {
                return Err(ErrorData::internal_error(
                    "the transport gave this connection no MCP session",
                    None,
                ));
            };
            let session = endpoint.open(&id.0).await.map_err(|e| {
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
        let call_id = self.call_id(&context.id);
        let submitted = session
            .submit(CallSpec::new(&call_id, tool, input))
            .map_err(|e| ErrorData::invalid_params(format!("{tool}: {e}"), None))?;
        let rec = submitted.record;
        let progress = context
            .meta
            .get_progress_token()
            .filter(|_| tool == "bash")
            .map(|token| tokio::spawn(stream_progress(rec.clone(), context.peer.clone(), token)));
        let outcome = tokio::select! {
            r = finished(&rec) => r,
            () = context.ct.cancelled() => {
                // The client gave up on the call: stop it (and every process it
                // started) rather than let it run on unseen.
                rec.cancel();
                finished(&rec).await
            }
        };
        if let Some(task) = progress {
            // It ends by itself once the call finished and its output is out.
            let _ = task.await;
        }
        let (result, _) =
            outcome.map_err(|e| ErrorData::internal_error(format!("call {call_id}: {e}"), None))?;
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

/// Sends the call's output to the client as progress notifications until the
/// call finished and every byte produced before that went out.
async fn stream_progress(rec: Arc<CallRecord>, peer: Peer<RoleServer>, token: ProgressToken) {
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
            let note = ProgressNotificationParam::new(token.clone(), sent as f64)
                .with_message(String::from_utf8_lossy(&bytes));
            if peer.notify_progress(note).await.is_err() {
                return; // the client is gone
            }
        }
        if done || state.changed().await.is_err() {
            return;
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
