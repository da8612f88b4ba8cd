//! The session tool runner of one work item (contract §4): it follows the
//! session's event stream, executes each owned `agent.tool_use` /
//! `agent.custom_tool_use` in the item's sandbox session, one at a time in
//! arrival order, and posts the paired result.
//!
//! On every (re)connection the stream is opened first, then the history is
//! listed (all pages) and reconciled, so nothing emitted in between is missed;
//! duplicates are removed by event id. Where hands differs from the SDK:
//!
//! - a result whose post failed is re-posted at the next reconcile from the
//!   session's call journal, never executed again (the SDK re-runs the tool):
//!   calls go through the one call pipeline (`Session::submit`) under their
//!   `tool_use_id`, which also audits them;
//! - when the lease is lost, the call in flight is abandoned (its processes
//!   are killed by the session's close) and nothing more is posted;
//! - a non-object input reaches the tool, which answers `is_error`, instead
//!   of failing the whole item.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::{mpsc, watch, Notify};

use super::http::{Api, ApiError, Request};
use super::lease::EndReason;
use super::secret::Secret;
use super::sse::{Frame, Parser};
use crate::session::{CallSpec, Session};
use crate::tools::ToolResult;

/// The tools the runner owns.
pub const OWNED: [&str; 6] = ["bash", "read", "write", "edit", "glob", "grep"];

/// One tool call from the event log.
#[derive(Debug, Clone)]
pub struct Call {
    pub id: String,
    pub name: String,
    pub input: Value,
    pub custom: bool,
    pub permission: Option<String>,
    pub thread: Option<String>,
}

impl Call {
    fn from_event(ev: &Value) -> Option<Call> {
        let custom = match ev["type"].as_str()? {
            "agent.tool_use" => false,
            "agent.custom_tool_use" => true,
            _ => return None,
        };
        Some(Call {
            id: ev["id"].as_str()?.to_string(),
            name: ev["name"].as_str().unwrap_or("").to_string(),
            input: ev.get("input").cloned().unwrap_or(Value::Null),
            custom,
            permission: ev["evaluated_permission"].as_str().map(str::to_string),
            thread: ev["session_thread_id"].as_str().map(str::to_string),
        })
    }
}

#[derive(Default)]
struct State {
    seen: HashSet<String>,
    answered: HashSet<String>,
    confirmations: HashMap<String, String>,
    held: HashMap<String, Call>,
    terminated_threads: HashSet<String>,
    /// Calls queued or executing.
    outstanding: usize,
    /// A turn-ending idle waits for outstanding calls.
    idle_deferred: bool,
    idle_since: Option<Instant>,
    stop: bool,
    /// `session.status_terminated` or `session.deleted` was seen.
    session_ended: bool,
}

pub struct Runner {
    api: Api,
    cred: Secret,
    session_id: String,
    sandbox: Arc<Session>,
    max_idle: Option<Duration>,
    /// No byte on the stream for this long: reconnect (§11 #36).
    read_timeout: Duration,
    ttl: watch::Receiver<Option<Duration>>,
    lease: watch::Receiver<Option<EndReason>>,
    st: Mutex<State>,
    wake: Notify,
    /// Counts the calls the runner has yielded (memory syncs follow them).
    yielded: watch::Sender<u64>,
}

/// Neutral event types: they neither arm nor disarm the idle clock.
fn neutral(t: &str) -> bool {
    matches!(
        t,
        "user.tool_confirmation" | "session.thread_status_terminated"
    )
}

fn ends_turn(ev: &Value) -> bool {
    ev["type"] == "session.status_idle" && ev["stop_reason"]["type"] != "requires_action"
}

/// `{"type":"user.tool_result","tool_use_id":…,"is_error":…,"content":[…]}`,
/// fields in the order the official worker sends them.
pub fn result_event(call: &Call, result: &crate::tools::ToolResult) -> String {
    let content = serde_json::to_string(&result.content).unwrap_or_else(|_| "[]".into());
    let id = serde_json::to_string(&call.id).unwrap_or_default();
    if call.custom {
        format!(
            r#"{{"type":"user.custom_tool_result","custom_tool_use_id":{id},"is_error":{},"content":{content}}}"#,
            result.is_error
        )
    } else {
        format!(
            r#"{{"type":"user.tool_result","tool_use_id":{id},"is_error":{},"content":{content}}}"#,
            result.is_error
        )
    }
}

impl Runner {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        api: Api,
        cred: Secret,
        session_id: String,
        sandbox: Arc<Session>,
        max_idle: Option<Duration>,
        read_timeout: Duration,
        ttl: watch::Receiver<Option<Duration>>,
        lease: watch::Receiver<Option<EndReason>>,
    ) -> Arc<Runner> {
        Arc::new(Runner {
            api,
            cred,
            session_id,
            sandbox,
            max_idle,
            read_timeout,
            ttl,
            lease,
            st: Mutex::new(State::default()),
            wake: Notify::new(),
            yielded: watch::channel(0).0,
        })
    }

    /// Ticks once per call executed (memory stores sync after calls, §8.4).
    /// Whether the session was seen terminated or deleted (its workspace need
    /// not be kept for a later item).
    pub fn session_ended(&self) -> bool {
        self.st().session_ended
    }

    pub fn yielded(&self) -> watch::Receiver<u64> {
        self.yielded.subscribe()
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lease_ended(&self) -> Option<EndReason> {
        *self.lease.borrow()
    }

    /// Runs until the session ends, the idle grace passes, a fatal answer on
    /// the stream, or the lease ends. Queued calls are finished first when the
    /// runner stops by itself.
    pub async fn run(self: &Arc<Self>) {
        let (tx, rx) = mpsc::channel::<Call>(100);
        let dispatcher = tokio::spawn(self.clone().dispatch(rx));
        self.read_loop(&tx).await;
        drop(tx);
        if let Some(reason) = self.lease_ended() {
            // The worker ended the lease: queued calls are dropped and only
            // the call in flight completes; when the lease was lost, not even
            // that (its processes die with the item's sandbox session).
            self.st().stop = true;
            if !reason.may_post() {
                dispatcher.abort();
            }
        }
        let _ = dispatcher.await;
    }

    fn route(&self, call: Call, tx: &mpsc::Sender<Call>) {
        let mut st = self.st();
        if !OWNED.contains(&call.name.as_str()) {
            return; // another client's tool: left unanswered
        }
        if st.answered.contains(&call.id) {
            return;
        }
        if call
            .thread
            .as_ref()
            .is_some_and(|t| st.terminated_threads.contains(t))
        {
            return;
        }
        if call.permission.as_deref() == Some("deny") {
            self.sandbox
                .audit_refused(&call.id, &call.name, "denied by the permission policy");
            st.answered.insert(call.id);
            return;
        }
        let verdict = st.confirmations.get(&call.id).cloned();
        let run = match (verdict.as_deref(), call.permission.as_deref()) {
            (Some("allow"), _) => true,
            (Some(_), _) => {
                self.sandbox.audit_refused(
                    &call.id,
                    &call.name,
                    "denied by the user's confirmation",
                );
                st.answered.insert(call.id);
                self.settle_deferred(&mut st);
                return;
            }
            (None, None | Some("allow")) => true,
            (None, _) => false,
        };
        if run {
            st.outstanding += 1;
            drop(st);
            if tx.try_send(call).is_err() {
                // The queue is full (100 waiting) or closed: it will be
                // re-routed from history at the next reconcile.
                self.st().outstanding -= 1;
            }
        } else {
            st.held.entry(call.id.clone()).or_insert(call);
        }
    }

    fn arm_idle(&self, st: &mut State) {
        if st.outstanding > 0 || !st.held.is_empty() {
            st.idle_deferred = true;
        } else {
            st.idle_since = Some(Instant::now());
            self.wake.notify_one();
        }
    }

    /// A turn-ending idle that arrived while calls were running or held
    /// starts its countdown once none is left.
    fn settle_deferred(&self, st: &mut State) {
        if st.outstanding == 0 && st.held.is_empty() && st.idle_deferred {
            st.idle_deferred = false;
            st.idle_since = Some(Instant::now());
            self.wake.notify_one();
        }
    }

    fn disarm_idle(st: &mut State) {
        st.idle_since = None;
        st.idle_deferred = false;
    }

    fn on_live(&self, ev: &Value, tx: &mpsc::Sender<Call>) {
        let t = ev["type"].as_str().unwrap_or("");
        if let Some(call) = Call::from_event(ev) {
            let fresh = self.st().seen.insert(call.id.clone());
            Self::disarm_idle(&mut self.st());
            if fresh {
                self.route(call, tx);
            }
            return;
        }
        let mut st = self.st();
        match t {
            "user.tool_result" => {
                if let Some(id) = ev["tool_use_id"].as_str() {
                    st.answered.insert(id.to_string());
                }
            }
            "user.custom_tool_result" => {
                if let Some(id) = ev["custom_tool_use_id"].as_str() {
                    st.answered.insert(id.to_string());
                }
            }
            "user.tool_confirmation" => {
                let (Some(id), verdict) = (
                    ev["tool_use_id"].as_str(),
                    ev["result"].as_str().unwrap_or("deny"),
                ) else {
                    return;
                };
                st.confirmations.insert(id.to_string(), verdict.to_string());
                if let Some(call) = st.held.remove(id) {
                    drop(st);
                    self.route(call, tx);
                    return;
                }
            }
            "session.thread_status_terminated" => {
                if let Some(th) = ev["session_thread_id"].as_str() {
                    st.terminated_threads.insert(th.to_string());
                    st.held.retain(|_, c| c.thread.as_deref() != Some(th));
                    self.settle_deferred(&mut st);
                }
            }
            "session.status_terminated" | "session.deleted" => {
                st.stop = true;
                st.session_ended = true;
                self.wake.notify_one();
            }
            _ => {}
        }
        if ends_turn(ev) {
            self.arm_idle(&mut st);
        } else if !neutral(t) {
            Self::disarm_idle(&mut st);
        }
    }

    /// Lists the whole history and routes what is unanswered (§4.4, two passes).
    async fn reconcile(&self, tx: &mpsc::Sender<Call>) {
        let mut events = Vec::new();
        let mut page: Option<String> = None;
        let listed = loop {
            let mut path = format!("/v1/sessions/{}/events?limit=1000", self.session_id);
            if let Some(p) = &page {
                path.push_str(&format!("&page={}", super::worker::urlencode(p)));
            }
            let req = Request::new(http::Method::GET, path, &self.cred);
            match self.api.send(&req).await.and_then(|a| {
                a.json().map_err(|e| ApiError::Transport {
                    method: "GET".into(),
                    path: "events".into(),
                    message: e.to_string(),
                })
            }) {
                Ok(v) => {
                    if let Some(data) = v["data"].as_array() {
                        events.extend(data.iter().cloned());
                    }
                    match v["next_page"].as_str().filter(|s| !s.is_empty()) {
                        Some(next) => page = Some(next.to_string()),
                        None => break true,
                    }
                }
                Err(e) => {
                    tracing::warn!(session = %self.session_id, error = %e, "listing the session's events failed; retried at the next reconnect");
                    break false;
                }
            }
        };
        let mut calls = Vec::new();
        {
            let mut st = self.st();
            Self::disarm_idle(&mut st);
            for ev in &events {
                if let Some(c) = Call::from_event(ev) {
                    if listed {
                        st.seen.insert(c.id.clone());
                    }
                    calls.push(c);
                }
                match ev["type"].as_str().unwrap_or("") {
                    "user.tool_result" => {
                        if let Some(id) = ev["tool_use_id"].as_str() {
                            st.answered.insert(id.to_string());
                        }
                    }
                    "user.custom_tool_result" => {
                        if let Some(id) = ev["custom_tool_use_id"].as_str() {
                            st.answered.insert(id.to_string());
                        }
                    }
                    "user.tool_confirmation" => {
                        if let (Some(id), Some(v)) =
                            (ev["tool_use_id"].as_str(), ev["result"].as_str())
                        {
                            if !st.answered.contains(id) {
                                st.confirmations.insert(id.to_string(), v.to_string());
                            }
                        }
                    }
                    "session.thread_status_terminated" => {
                        if let Some(th) = ev["session_thread_id"].as_str() {
                            st.terminated_threads.insert(th.to_string());
                        }
                    }
                    // Seen only in history (the stream was down when it
                    // came): the SDK worker keeps running until a heartbeat
                    // says so (contract §12.10); a terminated session is
                    // never revived, so hands ends the item now.
                    "session.status_terminated" | "session.deleted" => {
                        st.stop = true;
                        st.session_ended = true;
                        self.wake.notify_one();
                    }
                    _ => {}
                }
            }
        }
        if !listed {
            return;
        }
        // Another client's unanswered call keeps the idle clock off; an owned
        // one is routed now and only defers the arm until it is done.
        let mut outstanding_from_history = false;
        for c in calls {
            {
                let st = self.st();
                let in_dead_thread = c
                    .thread
                    .as_ref()
                    .is_some_and(|t| st.terminated_threads.contains(t));
                let owned = OWNED.contains(&c.name.as_str());
                if !st.answered.contains(&c.id) && !in_dead_thread && !owned {
                    outstanding_from_history = true;
                }
            }
            self.route(c, tx);
        }
        // Verdicts in history release calls held from an earlier window.
        let release: Vec<Call> = {
            let mut st = self.st();
            let ids: Vec<String> = st
                .held
                .keys()
                .filter(|id| st.confirmations.contains_key(*id))
                .cloned()
                .collect();
            ids.iter().filter_map(|id| st.held.remove(id)).collect()
        };
        for c in release {
            self.route(c, tx);
        }
        let last = events
            .iter()
            .rev()
            .find(|e| !neutral(e["type"].as_str().unwrap_or("")));
        if let Some(last) = last {
            if ends_turn(last) && !outstanding_from_history {
                let mut st = self.st();
                self.arm_idle(&mut st);
            }
        }
    }

    async fn read_loop(&self, tx: &mpsc::Sender<Call>) {
        let mut backoff = Duration::from_millis(500);
        let mut lease = self.lease.clone();
        loop {
            if self.st().stop || self.lease_ended().is_some() {
                return;
            }
            let mut req = Request::new(
                http::Method::GET,
                format!("/v1/sessions/{}/events/stream", self.session_id),
                &self.cred,
            );
            req.accept = "application/json";
            let opened = tokio::select! {
                r = self.api.open_stream(&req) => r,
                _ = lease.wait_for(|l| l.is_some()) => return,
            };
            match opened {
                Err(e) if e.is_fatal_4xx() => {
                    tracing::warn!(session = %self.session_id, error = %e, "the event stream was refused; ending the item");
                    return;
                }
                Err(e) => {
                    tracing::info!(session = %self.session_id, error = %e, "opening the event stream failed");
                }
                Ok(resp) => {
                    self.reconcile(tx).await;
                    let mut body = resp.into_body();
                    let mut parser = Parser::new();
                    loop {
                        let idle_deadline = {
                            let st = self.st();
                            if st.stop {
                                return;
                            }
                            st.idle_since.zip(self.max_idle).map(|(t, d)| t + d)
                        };
                        let frame = tokio::select! {
                            f = tokio::time::timeout(self.read_timeout, body.frame()) => f,
                            _ = async {
                                match idle_deadline {
                                    Some(d) => tokio::time::sleep_until(d.into()).await,
                                    None => std::future::pending().await,
                                }
                            } => {
                                tracing::info!(session = %self.session_id, "idle grace passed; ending the item");
                                self.st().stop = true;
                                return;
                            }
                            _ = self.wake.notified() => continue,
                            _ = lease.wait_for(|l| l.is_some()) => return,
                        };
                        let bytes = match frame {
                            Ok(Some(Ok(f))) => match f.into_data() {
                                Ok(b) => b,
                                Err(_) => continue,
                            },
                            Ok(Some(Err(e))) => {
                                tracing::info!(session = %self.session_id, error = %e, "event stream broke");
                                break;
                            }
                            Ok(None) => break,
                            Err(_) => {
                                tracing::info!(session = %self.session_id, read_timeout = ?self.read_timeout, "no bytes on the event stream; reconnecting");
                                break;
                            }
                        };
                        let frames = match parser.push(&bytes) {
                            Ok(f) => f,
                            Err(e) => {
                                tracing::error!(session = %self.session_id, error = %e, "unusable event stream; ending the item");
                                return;
                            }
                        };
                        let mut reconnect = false;
                        for f in frames {
                            match f {
                                Frame::Event(ev) => {
                                    backoff = Duration::from_millis(500);
                                    self.on_live(&ev, tx);
                                }
                                Frame::Ping => {}
                                Frame::Error(e) => {
                                    tracing::info!(session = %self.session_id, error = %e, "error frame on the event stream");
                                    reconnect = true;
                                    break;
                                }
                            }
                        }
                        if reconnect {
                            break;
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = lease.wait_for(|l| l.is_some()) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn dispatch(self: Arc<Self>, mut rx: mpsc::Receiver<Call>) {
        while let Some(call) = rx.recv().await {
            let skip = {
                let st = self.st();
                st.answered.contains(&call.id)
                    || call
                        .thread
                        .as_ref()
                        .is_some_and(|t| st.terminated_threads.contains(t))
                    || (st.stop && self.lease_ended().is_some())
            };
            if !skip {
                self.execute_and_post(&call).await;
                self.yielded.send_modify(|n| *n += 1);
            }
            let mut st = self.st();
            st.outstanding = st.outstanding.saturating_sub(1);
            self.settle_deferred(&mut st);
        }
    }

    async fn execute_and_post(&self, call: &Call) {
        // Through the one call pipeline, under the call's own id: a call whose
        // result was computed before (its post failed) is found in the
        // session's journal and re-posted, never run again.
        let spec = CallSpec::new(call.id.clone(), call.name.clone(), call.input.to_string());
        let result = match self.sandbox.submit(spec) {
            Ok(submitted) => match submitted.result().await {
                Ok((result, _)) => result,
                Err(e) => Arc::new(ToolResult::err(e.to_string())),
            },
            Err(e) => Arc::new(ToolResult::err(e.to_string())),
        };
        let event = result_event(call, &result);
        {
            let st = self.st();
            if call
                .thread
                .as_ref()
                .is_some_and(|t| st.terminated_threads.contains(t))
            {
                return;
            }
        }
        if self.lease_ended().is_some_and(|r| !r.may_post()) {
            return;
        }
        if self.post(&event).await {
            self.st().answered.insert(call.id.clone());
        }
    }

    /// E8 with the contract's send retries, within the lease TTL window.
    async fn post(&self, event: &str) -> bool {
        let t0 = Instant::now();
        let body = format!(r#"{{"events":[{event}]}}"#);
        let mut k = 0u32;
        loop {
            let mut req = Request::new(
                http::Method::POST,
                format!("/v1/sessions/{}/events", self.session_id),
                &self.cred,
            );
            req.body = Some(body.clone().into());
            match self.api.send(&req).await {
                Ok(_) => return true,
                Err(e) if e.is_fatal_4xx() => {
                    tracing::error!(session = %self.session_id, error = %e, "the result was refused; kept to re-post at the next reconcile");
                    return false;
                }
                Err(e) => {
                    k += 1;
                    let window = self.ttl.borrow().unwrap_or(Duration::from_secs(300));
                    let d = 2f64.powi(k as i32 - 1).min(30.0);
                    let wait = Duration::from_secs_f64(d / 2.0 + d / 2.0 * super::http::unit());
                    let left = window.saturating_sub(t0.elapsed());
                    if left.is_zero() || self.lease_ended().is_some_and(|r| !r.may_post()) {
                        tracing::error!(session = %self.session_id, error = %e, "posting the result failed within the lease window; kept to re-post");
                        return false;
                    }
                    tracing::warn!(session = %self.session_id, error = %e, "posting the result failed; retrying");
                    if let Some(m) = self.sandbox.metrics() {
                        m.cma_result_post_retried();
                    }
                    tokio::time::sleep(wait.min(left)).await;
                }
            }
        }
    }
}

/// What a session fetch tells the item flow.
pub fn session_status(session: &Value) -> &str {
    session["status"].as_str().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn result_events_pair_with_their_call() {
        let call = Call {
            id: "toolu_1".into(),
            name: "read".into(),
            input: json!({}),
            custom: false,
            permission: None,
            thread: None,
        };
        let r = crate::tools::ToolResult::err("boom");
        assert_eq!(
            result_event(&call, &r),
            r#"{"type":"user.tool_result","tool_use_id":"toolu_1","is_error":true,"content":[{"type":"text","text":"boom"}]}"#
        );
        let custom = Call {
            custom: true,
            ..call
        };
        assert!(result_event(&custom, &r)
            .starts_with(r#"{"type":"user.custom_tool_result","custom_tool_use_id":"toolu_1","#));
    }

    #[test]
    fn turn_ending_idles() {
        assert!(ends_turn(
            &json!({"type": "session.status_idle", "stop_reason": {"type": "end_turn"}})
        ));
        assert!(ends_turn(&json!({"type": "session.status_idle"})));
        assert!(!ends_turn(
            &json!({"type": "session.status_idle", "stop_reason": {"type": "requires_action"}})
        ));
        assert!(!ends_turn(&json!({"type": "session.thread_status_idle"})));
    }
}
