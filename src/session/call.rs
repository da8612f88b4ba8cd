//! The one call pipeline. Every face a brain reaches sessions through — the
//! hands.v1 service (tunnel and debug listener), the Claude Managed Agents
//! runner, `hands tool`, `hands exec`, and every later connector — submits a
//! call with [`Session::submit`]: the client's call id, the tool, its raw JSON
//! input. What a call is owed lives here and nowhere else:
//!
//! - **at-most-once**: the call id goes through the session's journal first; the
//!   same id and input again resumes the record, other input is refused, a
//!   dropped result is `Expired` — never a second run;
//! - **the journal record** is what the face gets back: it follows the output
//!   and the result from there, and a call keeps running when every face
//!   watching it goes away;
//! - **the tracing span** `call` carries the connector, the client's session id
//!   and call id, the tool and the sandbox session's own id;
//! - **timeouts**: the client's deadline and cancel stop the call here (for
//!   bash and exec, with every process of the session); the policy's call
//!   timeout is enforced by the tools below;
//! - **the audit record**: one per call, written before the result is
//!   published, so no client sees a result the audit log does not hold;
//! - **the worker's metrics**: the call counted by tool and outcome, and its
//!   duration, beside its audit record (`crate::worker::metrics`).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::oneshot;
use tracing::Instrument;

use super::journal::{self, Begin, CallRecord, CallState, JournalError, Outcome};
use super::{activity, Session, SessionError};
use crate::sandbox::SandboxError;
use crate::tools::bash::BashLimits;
use crate::tools::{timed_out, Tool, ToolResult};

/// The face a call came through: its name is what the audit log and the
/// tracing span record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connector {
    /// The hands.v1 gRPC service, through the tunnel or the debug listener.
    HandsV1,
    /// The Claude Managed Agents work-queue connector.
    ClaudeManagedAgents,
    /// `hands tool`.
    Tool,
    /// `hands exec`.
    Exec,
    /// The MCP server (`hands mcp`).
    Mcp,
    /// In-process callers: `hands bench`, `hands doctor`, tests.
    Local,
}

impl Connector {
    pub fn name(self) -> &'static str {
        match self {
            Connector::HandsV1 => "hands.v1",
            Connector::ClaudeManagedAgents => "claude-managed-agents",
            Connector::Tool => "hands-tool",
            Connector::Exec => "hands-exec",
            Connector::Mcp => "mcp",
            Connector::Local => "local",
        }
    }
}

/// Who a session serves: the connector that opened it and the client's own id
/// for it (a hands.v1 session id, a Claude Managed Agents `sesn_…`).
#[derive(Debug, Clone)]
pub struct Origin {
    pub connector: Connector,
    pub session: String,
}

/// A process's stdio attached to an `exec` call (which, unlike a tool call, a
/// remote face cannot make: its descriptors are local).
pub struct Attach {
    argv: Vec<String>,
    stdio: [OwnedFd; 3],
    timeout: Option<Duration>,
    status: oneshot::Sender<Result<Option<i32>, SessionError>>,
}

/// One call, as a face submits it.
pub struct CallSpec {
    /// The client's call id (a hands.v1 call id, a `toolu_…`).
    pub call_id: String,
    pub tool: String,
    /// The input, raw JSON as the client sent it.
    pub input: String,
    /// The client's deadline: past it the call is cancelled.
    pub deadline: Option<tokio::time::Instant>,
    attach: Option<Attach>,
}

impl CallSpec {
    pub fn new(
        call_id: impl Into<String>,
        tool: impl Into<String>,
        input: impl Into<String>,
    ) -> Self {
        CallSpec {
            call_id: call_id.into(),
            tool: tool.into(),
            input: input.into(),
            deadline: None,
            attach: None,
        }
    }

    pub fn with_deadline(mut self, deadline: Option<tokio::time::Instant>) -> Self {
        self.deadline = deadline;
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("input_json is not JSON: {0}")]
    InvalidInput(serde_json::Error),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// What [`Session::submit`] returns.
pub struct Submitted {
    pub record: Arc<CallRecord>,
    /// True when this submission started the call; false when it resumed one.
    pub executed_now: bool,
    /// The task running the call, when this submission started it (a
    /// short-lived command waits for it before it closes the session).
    pub task: Option<tokio::task::JoinHandle<()>>,
}

impl Submitted {
    /// Waits for the call's result (once it is finished, it is in the audit
    /// log too).
    pub async fn result(&self) -> Result<(Arc<ToolResult>, Outcome), JournalError> {
        finished(&self.record).await
    }
}

/// Waits until `rec` is finished: its result and outcome, or why it is gone.
pub async fn finished(rec: &CallRecord) -> Result<(Arc<ToolResult>, Outcome), JournalError> {
    let mut state = rec.subscribe();
    loop {
        match &*state.borrow_and_update() {
            CallState::Finished {
                result, outcome, ..
            } => return Ok((result.clone(), *outcome)),
            CallState::Expired { why, .. } => {
                return Err(JournalError::Expired {
                    call_id: rec.call_id.clone(),
                    why: *why,
                })
            }
            CallState::Running { .. } => {}
        }
        if state.changed().await.is_err() {
            return Err(JournalError::NotFound(rec.call_id.clone()));
        }
    }
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::TimedOut => "timed_out",
            Outcome::Cancelled => "cancelled",
            Outcome::Shutdown => "shutdown",
        }
    }
}

/// Bytes of a result's content: its texts and its base64 data.
fn content_bytes(r: &ToolResult) -> usize {
    r.content
        .iter()
        .map(|b| match b {
            crate::tools::ContentBlock::Text { text } => text.len(),
            crate::tools::ContentBlock::Image { source }
            | crate::tools::ContentBlock::Document { source } => source.data.len(),
        })
        .sum()
}

/// What [`Session::begin`] found.
enum Begun {
    Existing(Arc<CallRecord>),
    New(Arc<CallRecord>, Start),
}

/// What running a new call takes.
struct Start {
    input: String,
    deadline: Option<tokio::time::Instant>,
    attach: Option<Attach>,
    running: activity::Running,
    span: tracing::Span,
}

/// Ends a call whose execution was dropped before it finished: cancelled,
/// audited, its result held like any other.
struct FinishOnDrop<'a>(&'a Session, &'a CallRecord);

impl Drop for FinishOnDrop<'_> {
    fn drop(&mut self) {
        let (session, rec) = (self.0, self.1);
        let mut f = session.audit_fields(&rec.call_id, &rec.tool);
        f.insert("outcome".into(), Outcome::Cancelled.name().into());
        f.insert("is_error".into(), true.into());
        f.insert("reason".into(), "its caller went away".into());
        session.audit.record("call", f);
        if let Some(m) = &session.metrics {
            let took = rec.started.elapsed();
            m.call_ended(
                session.origin.connector,
                &rec.tool,
                Outcome::Cancelled,
                took,
            );
        }
        let tool = crate::tools::path::py_repr(&rec.tool);
        rec.finish(
            ToolResult::err(format!("tool {tool} cancelled")),
            Outcome::Cancelled,
        );
        session.journal.retire(&rec.call_id);
    }
}

/// Call ids of in-process callers that have none of their own.
static LOCAL_IDS: AtomicU64 = AtomicU64::new(1);

impl Session {
    /// Submits a call: the one entry point (see the module doc). A new call id
    /// starts the call on a task of its own; a known one resumes its record.
    pub fn submit(self: &Arc<Self>, spec: CallSpec) -> Result<Submitted, SubmitError> {
        let (rec, start) = match self.begin(spec)? {
            Begun::Existing(rec) => {
                return Ok(Submitted {
                    record: rec,
                    executed_now: false,
                    task: None,
                })
            }
            Begun::New(rec, start) => (rec, start),
        };
        let (s, r) = (self.clone(), rec.clone());
        let task = tokio::spawn(async move { s.execute(&r, start).await });
        Ok(Submitted {
            record: rec,
            executed_now: true,
            task: Some(task),
        })
    }

    /// [`Session::submit`], run in the caller's task rather than a task of its
    /// own, for a caller that waits for the result anyway (no task hop). A
    /// caller that gives up midway ends the call as cancelled.
    pub async fn submit_and_wait(
        &self,
        spec: CallSpec,
    ) -> Result<(Arc<ToolResult>, Outcome), SubmitError> {
        let rec = match self.begin(spec)? {
            Begun::Existing(rec) => rec,
            Begun::New(rec, start) => {
                self.execute(&rec, start).await;
                rec
            }
        };
        Ok(finished(&rec).await?)
    }

    /// The journal's verdict on a call, and what running it takes.
    fn begin(&self, spec: CallSpec) -> Result<Begun, SubmitError> {
        // Checked, not parsed: the input travels as the client's text to the
        // tool that reads it (file tools parse it in the sandbox's helper).
        serde_json::from_str::<&serde_json::value::RawValue>(&spec.input)
            .map_err(SubmitError::InvalidInput)?;
        let rec = match self.journal.begin(&spec.call_id, &spec.tool, &spec.input)? {
            Begin::Existing(rec) => return Ok(Begun::Existing(rec)),
            Begin::New(rec) => rec,
        };
        // Running from now: before the face tells its client the call started.
        let running = self.activity.start();
        let span = tracing::info_span!(
            "call",
            connector = self.origin.connector.name(),
            session = %self.origin.session,
            call_id = %rec.call_id,
            tool = %rec.tool,
            sandbox = %self.id,
        );
        Ok(Begun::New(
            rec,
            Start {
                input: spec.input,
                deadline: spec.deadline,
                attach: spec.attach,
                running,
                span,
            },
        ))
    }

    /// Runs a call [`Session::begin`] started, in its span; if this future is
    /// dropped midway, the call ends as cancelled (never left running).
    async fn execute(&self, rec: &CallRecord, start: Start) {
        let Start {
            input,
            deadline,
            attach,
            running,
            span,
        } = start;
        let guard = FinishOnDrop(self, rec);
        self.run_journaled(rec, input, deadline, attach, running)
            .instrument(span)
            .await;
        std::mem::forget(guard);
    }

    /// Runs one tool call through the pipeline ([`Session::submit_and_wait`])
    /// under a call id of its own (in-process callers). Never fails: every
    /// problem is a result with `is_error`.
    pub async fn call(&self, name: &str, input: &Value) -> ToolResult {
        let id = format!("local-{}", LOCAL_IDS.fetch_add(1, Ordering::Relaxed));
        self.call_as(&id, name, input).await
    }

    /// [`Session::call`] under the caller's call id.
    pub async fn call_as(&self, call_id: &str, name: &str, input: &Value) -> ToolResult {
        let spec = CallSpec::new(call_id, name, input.to_string());
        match self.submit_and_wait(spec).await {
            Ok((result, _)) => Arc::unwrap_or_clone(result),
            Err(e) => ToolResult::err(e.to_string()),
        }
    }

    /// Runs `argv` directly (no shell) in the session with the given stdio fds
    /// (consumed: closed once the child has them), as call `call_id` of tool
    /// `exec` through [`Session::submit`]; returns its exit status (128 +
    /// signal when killed). With a timeout, the command and everything it
    /// started are killed when it expires (`Ok(None)`).
    pub async fn exec(
        self: &Arc<Self>,
        call_id: &str,
        argv: Vec<String>,
        stdio: [OwnedFd; 3],
        timeout: Option<Duration>,
    ) -> Result<Option<i32>, SessionError> {
        let (tx, rx) = oneshot::channel();
        let input = serde_json::json!({
            "argv": &argv,
            "timeout_ms": timeout.map(|t| t.as_millis() as u64),
        });
        let mut spec = CallSpec::new(call_id, "exec", input.to_string());
        spec.attach = Some(Attach {
            argv,
            stdio,
            timeout,
            status: tx,
        });
        let submitted = self.submit(spec).map_err(|e| {
            SessionError::Sandbox(SandboxError::HelperDied(format!(": exec not started: {e}")))
        })?;
        let status = rx.await;
        if let Some(task) = submitted.task {
            let _ = task.await;
        }
        status.map_err(|_| {
            SandboxError::HelperDied(": the exec call ended without a status".into())
        })?
    }

    /// Writes the audit record of a call a connector refused without running
    /// it (a Claude Managed Agents permission or confirmation that denied it).
    pub fn audit_refused(&self, call_id: &str, tool: &str, why: &str) {
        let mut f = self.audit_fields(call_id, tool);
        f.insert("outcome".into(), "denied".into());
        f.insert("is_error".into(), true.into());
        f.insert("reason".into(), why.into());
        self.audit.record("call", f);
        if let Some(m) = &self.metrics {
            m.call_denied(self.origin.connector, tool);
        }
    }

    fn audit_fields(&self, call_id: &str, tool: &str) -> Map<String, Value> {
        let mut f = Map::new();
        f.insert("connector".into(), self.origin.connector.name().into());
        f.insert("session".into(), self.origin.session.clone().into());
        f.insert("sandbox".into(), self.id.clone().into());
        f.insert("call_id".into(), call_id.into());
        f.insert("tool".into(), tool.into());
        f
    }

    /// Executes a journaled call to its end: its output goes to the record as
    /// it is produced, a cancel or the `deadline` stops it (for bash: the shell
    /// and every process of the session are killed, and the shell needs a
    /// restart), the audit record is written, and the result is recorded
    /// whoever is watching. `running` counts the call; it ends before the
    /// result is recorded.
    async fn run_journaled(
        &self,
        rec: &CallRecord,
        input: String,
        deadline: Option<tokio::time::Instant>,
        attach: Option<Attach>,
        running: activity::Running,
    ) {
        let t0 = Instant::now();
        let sink = |bytes: &[u8]| rec.append_output(bytes);
        // Connections the call's processes open are its own: bash and exec
        // run the agent's programs (file tools open none).
        let egress = self
            .egress
            .as_ref()
            .filter(|_| matches!(rec.tool.as_str(), "bash" | "exec"))
            .map(|e| e.context().clone());
        if let Some(ctx) = &egress {
            ctx.begin_call(&rec.call_id);
        }
        let run = async {
            match attach {
                Some(a) => self.run_exec(a).await,
                None => {
                    self.call_inner(&rec.tool, &input, &rec.call_id, Some(&sink))
                        .await
                }
            }
        };
        let stop = async {
            match deadline {
                Some(d) => tokio::select! {
                    () = rec.cancelled() => {}
                    () = tokio::time::sleep_until(d) => {}
                },
                None => rec.cancelled().await,
            }
            if rec.tool == "bash" {
                // Before `run` is dropped and lets go of the shell.
                self.bash_abort
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        };
        let (result, outcome) = tokio::select! {
            r = run => r,
            () = stop => {
                match rec.tool.as_str() {
                    "bash" => {
                        let mut bash = self.bash.lock().await;
                        if self.bash_abort.swap(false, std::sync::atomic::Ordering::SeqCst) {
                            bash.abort(&self.helper).await;
                        }
                    }
                    "exec" => { let _ = self.helper.kill_all().await; }
                    _ => {}
                }
                let tool = crate::tools::path::py_repr(&rec.tool);
                match rec.cancel_cause() {
                    Some(journal::CancelCause::Shutdown { grace }) => (
                        ToolResult::err(format!(
                            "tool {tool} cut short: the worker is shutting down (calls still \
                             running {}s after it was told to stop are killed, with every \
                             process they started)",
                            grace.as_secs()
                        )),
                        Outcome::Shutdown,
                    ),
                    Some(journal::CancelCause::StoppedAgain) => (
                        ToolResult::err(format!(
                            "tool {tool} cut short: the worker is shutting down (it was told \
                             to stop a second time, so running calls are killed at once, with \
                             every process they started)"
                        )),
                        Outcome::Shutdown,
                    ),
                    Some(journal::CancelCause::Requested) | None => (
                        ToolResult::err(format!("tool {tool} cancelled")),
                        Outcome::Cancelled,
                    ),
                }
            }
        };
        drop(running);
        let mut result = result;
        if let Some(ctx) = &egress {
            let denied = ctx.end_call();
            if let Some(note) = ctx.note(&denied) {
                result.append_note(&note);
            }
        }
        let mut f = self.audit_fields(&rec.call_id, &rec.tool);
        f.insert("outcome".into(), outcome.name().into());
        f.insert("is_error".into(), result.is_error.into());
        let took = t0.elapsed();
        let ms = (took.as_secs_f64() * 1e6).round() / 1e3;
        f.insert("duration_ms".into(), ms.into());
        f.insert("output_bytes".into(), content_bytes(&result).into());
        self.audit.record("call", f);
        if let Some(m) = &self.metrics {
            m.call_ended(self.origin.connector, &rec.tool, outcome, took);
        }
        rec.finish(result, outcome);
        self.journal.retire(&rec.call_id);
    }

    /// The `exec` call: `argv` with attached stdio; its typed status goes to
    /// the attacher, its result to the journal.
    async fn run_exec(&self, a: Attach) -> (ToolResult, Outcome) {
        let Attach {
            argv,
            stdio,
            timeout,
            status,
        } = a;
        let r = self.spawn_attached(argv, stdio, timeout).await;
        let out = match &r {
            Ok(Some(code)) => {
                let text = format!("exit status {code}");
                if *code == 0 {
                    (ToolResult::ok(text), Outcome::Completed)
                } else {
                    (ToolResult::err(text), Outcome::Completed)
                }
            }
            Ok(None) => (timed_out("exec"), Outcome::TimedOut),
            Err(e) => (ToolResult::err(format!("exec: {e}")), Outcome::Completed),
        };
        let _ = status.send(r);
        out
    }

    async fn spawn_attached(
        &self,
        argv: Vec<String>,
        stdio: [OwnedFd; 3],
        timeout: Option<Duration>,
    ) -> Result<Option<i32>, SessionError> {
        let [i, o, e] = &stdio;
        let (_pid, exit) = self
            .helper
            .spawn(
                argv,
                self.env.clone(),
                crate::sandbox::mounts::WORKSPACE.into(),
                [i, o, e],
                true,
            )
            .await?;
        // The child has its own copies; ours must close so the reader sees EOF.
        drop(stdio);
        let wait = async {
            exit.await
                .map_err(|_| SandboxError::HelperDied(String::new()))
        };
        match timeout {
            None => Ok(Some(wait.await?)),
            Some(t) => match tokio::time::timeout(t, wait).await {
                Ok(r) => Ok(Some(r?)),
                Err(_) => {
                    let _ = self.helper.kill_all().await;
                    Ok(None)
                }
            },
        }
    }

    /// Runs the call; when the session hit its memory or pids limit since the
    /// counters were last read (at the end of the previous call), the result
    /// says so (the kernel's own trace is a bare `Killed`, or a `fork:
    /// Resource temporarily unavailable`). The counters are the session's: a
    /// limit hit by another call running at the same time, or by a background
    /// process between calls, is reported too — once. One reading per call.
    async fn call_inner(
        &self,
        name: &str,
        input: &str,
        call_id: &str,
        sink: Option<crate::tools::bash::OutputSink<'_>>,
    ) -> (ToolResult, Outcome) {
        let (mut result, outcome) = self.call_tool(name, input, call_id, sink).await;
        let now = self.limit_events();
        let before = {
            let mut seen = self.limits_seen.lock().unwrap_or_else(|p| p.into_inner());
            let before = *seen;
            seen.oom_kills = seen.oom_kills.max(now.oom_kills);
            seen.pids_refused = seen.pids_refused.max(now.pids_refused);
            seen.own_limit_ooms = seen.own_limit_ooms.max(now.own_limit_ooms);
            before
        };
        let limits = &self.policy.limits;
        for note in super::limit_notes(before, now, limits, || self.outer_limits()) {
            result.append_note(&note);
        }
        (result, outcome)
    }

    async fn call_tool(
        &self,
        name: &str,
        input: &str,
        call_id: &str,
        sink: Option<crate::tools::bash::OutputSink<'_>>,
    ) -> (ToolResult, Outcome) {
        use Outcome::{Completed, TimedOut};
        let Some(tool) = Tool::from_name(name) else {
            let text = format!("unknown tool {}", crate::tools::path::py_repr(name));
            return (ToolResult::err(text), Completed);
        };
        if !self.policy.tools.contains(&tool) {
            let text = format!(
                "{name}: tool is not enabled in environment {}",
                self.policy.name
            );
            return (ToolResult::err(text), Completed);
        }
        tracing::debug!(call_id, "call");
        let limits = &self.policy.limits;
        match tool {
            Tool::Bash => {
                let bash_limits = BashLimits {
                    output_bytes: limits.output_bytes,
                    default_timeout: limits.bash_timeout,
                    call_timeout: limits.call_timeout,
                };
                let input: Value = serde_json::from_str(input).unwrap_or(Value::Null);
                let mut bash = self.bash.lock().await;
                if self
                    .bash_abort
                    .swap(false, std::sync::atomic::Ordering::SeqCst)
                {
                    // A stopped call's kill, not yet done: first.
                    bash.abort(&self.helper).await;
                }
                let r = bash
                    .call(&self.helper, &input, &bash_limits, &self.env, sink)
                    .await;
                let outcome = if bash.last_timed_out() {
                    TimedOut
                } else {
                    Completed
                };
                (r, outcome)
            }
            file_tool => {
                // `[]` is the SDK's `{}`; other non-objects are refused by the
                // tool's own validation with the contract's text.
                let empty_array = input.trim_start().starts_with('[')
                    && serde_json::from_str::<Vec<serde::de::IgnoredAny>>(input)
                        .is_ok_and(|a| a.is_empty());
                // Checked as JSON by `begin`: passed through as it is.
                let input = if empty_array { "{}" } else { input };
                match tokio::time::timeout(limits.call_timeout, self.helper.tool(file_tool, input))
                    .await
                {
                    Ok(Ok(result)) => (result, Completed),
                    Ok(Err(e)) => (
                        ToolResult::err(format!("{name}: sandbox error: {e}")),
                        Completed,
                    ),
                    Err(_) => (timed_out(name), TimedOut),
                }
            }
        }
    }
}
