//! The call journal: at-most-once execution and at-least-once delivery of a
//! session's calls, within a memory budget per session and per worker.
//!
//! Each call id maps to one record: a digest of the tool and input it was
//! started with, its live state, a bounded tail of its output, and a cancel
//! signal. A call runs on its own task and keeps running when every stream
//! watching it goes away; a later stream resumes from the journal instead of
//! executing again.
//!
//! Finished results are held so that a resumed call (a repeated `Call`, an
//! `Attach`) gets them again, but not forever: a result is dropped when it is
//! older than [`Limits::retention`], when its session holds more than
//! [`Limits::max_results`] results or [`Limits::session_bytes`] bytes, or when
//! every session of the worker together holds more than
//! [`Limits::worker_bytes`] — oldest first, never the result that just
//! finished. What stays of a dropped result is a tombstone (the call id, the
//! digest of its input, why it went): the same call asked for again gets
//! [`JournalError::Expired`] and is never executed a second time. Tombstones
//! live as long as their session and are counted in its bytes; a session whose
//! call ids alone fill its budget refuses new ones ([`JournalError::Full`]).
//! Closing a session (dropping its [`Journal`]) releases every record it held.
//!
//! Accounting counts what a finished call keeps: its result's texts and base64
//! data, its output tail, and a fixed [`ENTRY_BYTES`] plus the id's length per
//! call id. Streams delivering a result hold their own reference while they
//! send it; that transient copy is not counted.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use crate::tools::ToolResult;

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    TimedOut,
    Cancelled,
    /// Cut short because the worker shut down (see [`JournalStore::cut_short`]).
    Shutdown,
}

/// Why a running call was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelCause {
    /// `Cancel`, or the deadline of the request that started it.
    Requested,
    /// The worker is shutting down and its grace period for running calls,
    /// this long, is over.
    Shutdown { grace: Duration },
    /// The worker, draining, was told to stop a second time: running calls
    /// are not given the rest of the grace.
    StoppedAgain,
}

/// Why a finished call's result is no longer held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// It finished longer ago than the retention window.
    Retention,
    /// Newer results needed the room: the session's or the worker's journal
    /// budget (bytes, or results per session) was reached.
    Budget,
    /// Its session was closed.
    SessionClosed,
}

impl std::fmt::Display for Expiry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expiry::Retention => "it finished longer ago than the journal's retention",
            Expiry::Budget => "newer results needed the journal's memory budget",
            Expiry::SessionClosed => "its session was closed",
        })
    }
}

/// The live state of a call, as watchers see it.
#[derive(Debug, Clone)]
pub enum CallState {
    Running {
        /// Bytes of output produced so far.
        output_end: u64,
    },
    Finished {
        output_end: u64,
        result: Arc<ToolResult>,
        outcome: Outcome,
    },
    /// Finished, and its result dropped (see the module doc).
    Expired { output_end: u64, why: Expiry },
}

impl CallState {
    pub fn output_end(&self) -> u64 {
        match self {
            CallState::Running { output_end }
            | CallState::Finished { output_end, .. }
            | CallState::Expired { output_end, .. } => *output_end,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum JournalError {
    #[error("call {0:?} was started with other input")]
    InputMismatch(String),
    #[error("no call {0:?} in the journal")]
    NotFound(String),
    #[error("output before offset {kept_from} is no longer journaled (asked for {asked})")]
    OffsetExpired { asked: u64, kept_from: u64 },
    #[error(
        "the result of call {call_id:?} is no longer held: {why}; \
         the call ran once and will not run again"
    )]
    Expired { call_id: String, why: Expiry },
    #[error(
        "the {scope}'s call journal is full ({limit} bytes) with the ids of past calls; \
         call {call_id:?} was not started: close this session and open another"
    )]
    Full {
        call_id: String,
        scope: &'static str,
        limit: u64,
    },
}

/// The journal's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes one session's journal holds (results, output tails, call ids).
    pub session_bytes: u64,
    /// Bytes every session of the worker holds together.
    pub worker_bytes: u64,
    /// How long a finished result is held at most.
    pub retention: Duration,
    /// Finished results held per session at most.
    pub max_results: usize,
    /// The tail of each call's output that is kept for `Attach`.
    pub output_bytes: usize,
}

impl Default for Limits {
    /// 256 MiB per session (about nine results of a 20 MiB PDF), 1 GiB per
    /// worker, 15 minutes, 1024 results, a 1 MiB output tail.
    fn default() -> Limits {
        Limits {
            session_bytes: 256 << 20,
            worker_bytes: 1 << 30,
            retention: Duration::from_secs(15 * 60),
            max_results: 1024,
            output_bytes: 1 << 20,
        }
    }
}

/// What one call id costs in the accounting besides its result: the map
/// entries, the record or tombstone, the digest (the id's own length is added).
pub const ENTRY_BYTES: u64 = 256;

type Digest = [u8; 32];

/// The call's identity beyond its id: a repeated call must carry the same tool
/// and input. A digest rather than the input itself, which can be a 64 MiB
/// `write`.
fn digest(tool: &str, input_json: &str) -> Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&(tool.len() as u64).to_le_bytes());
    ctx.update(tool.as_bytes());
    ctx.update(input_json.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The tail of a call's output that is kept.
struct OutputLog {
    /// Offset of `data[0]` in the call's output stream.
    start: u64,
    data: VecDeque<u8>,
}

/// One call.
pub struct CallRecord {
    pub call_id: String,
    pub tool: String,
    digest: Digest,
    state: watch::Sender<CallState>,
    output: Mutex<OutputLog>,
    output_cap: usize,
    cancel: Notify,
    /// Set by the first cancel; read once the call has stopped.
    cause: Mutex<Option<CancelCause>>,
    /// When the call started (shutdown logs how long calls have run).
    pub started: Instant,
    /// Its result is counted among the held ones (see [`Journal::retire`]).
    held: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl CallRecord {
    /// Appends produced output; only the last `output_cap` bytes are kept.
    pub fn append_output(&self, bytes: &[u8]) {
        let end = {
            let mut log = lock(&self.output);
            log.data.extend(bytes);
            let excess = log.data.len().saturating_sub(self.output_cap);
            if excess > 0 {
                log.data.drain(..excess);
                log.start += excess as u64;
            }
            log.start + log.data.len() as u64
        };
        self.state.send_modify(|s| {
            if let CallState::Running { output_end } = s {
                *output_end = end;
            }
        });
    }

    /// Output from `from` on, up to `max` bytes, as (offset, bytes).
    pub fn read_output(&self, from: u64, max: usize) -> Result<(u64, Vec<u8>), JournalError> {
        let log = lock(&self.output);
        if from < log.start {
            return Err(JournalError::OffsetExpired {
                asked: from,
                kept_from: log.start,
            });
        }
        let skip = (from - log.start) as usize;
        let bytes: Vec<u8> = log.data.iter().skip(skip).take(max).copied().collect();
        Ok((from, bytes))
    }

    /// Records the result; later calls to `finish` are ignored.
    pub fn finish(&self, result: ToolResult, outcome: Outcome) {
        let mut result = Some(result);
        self.state.send_if_modified(|s| match s {
            CallState::Running { output_end } => {
                *s = CallState::Finished {
                    output_end: *output_end,
                    result: Arc::new(result.take().expect("taken once")),
                    outcome,
                };
                true
            }
            CallState::Finished { .. } | CallState::Expired { .. } => false,
        });
    }

    pub fn is_finished(&self) -> bool {
        !matches!(*self.state.borrow(), CallState::Running { .. })
    }

    pub fn subscribe(&self) -> watch::Receiver<CallState> {
        self.state.subscribe()
    }

    /// Asks the running call to stop; false when it already finished.
    pub fn cancel(&self) -> bool {
        self.cancel_for(CancelCause::Requested)
    }

    /// Asks the running call to stop, for `cause` (the first cause given is
    /// the one reported); false when it already finished.
    pub fn cancel_for(&self, cause: CancelCause) -> bool {
        if self.is_finished() {
            return false;
        }
        lock(&self.cause).get_or_insert(cause);
        self.cancel.notify_one();
        true
    }

    /// Why the call was asked to stop, if it was.
    pub fn cancel_cause(&self) -> Option<CancelCause> {
        *lock(&self.cause)
    }

    /// Resolves when `cancel` was called (a permit is kept if it came first).
    pub async fn cancelled(&self) {
        self.cancel.notified().await
    }

    /// What holding this finished record costs: its result and output tail.
    fn held_bytes(&self) -> u64 {
        let result = match &*self.state.borrow() {
            CallState::Finished { result, .. } => result.heap_bytes(),
            _ => 0,
        };
        (result + lock(&self.output).data.len()) as u64
    }

    /// Drops the result and the output tail; watchers see `Expired`.
    fn expire(&self, why: Expiry) {
        self.state.send_if_modified(|s| {
            if matches!(s, CallState::Expired { .. }) {
                return false;
            }
            *s = CallState::Expired {
                output_end: s.output_end(),
                why,
            };
            true
        });
        let mut log = lock(&self.output);
        log.start += log.data.len() as u64;
        log.data = VecDeque::new();
    }
}

/// What `begin` found.
pub enum Begin {
    /// A new call: the caller must execute it.
    New(Arc<CallRecord>),
    /// The same call, started earlier: resume, do not execute.
    Existing(Arc<CallRecord>),
}

enum Entry {
    Live(Arc<CallRecord>),
    /// The result was dropped; the id stays so the call never runs again.
    Tombstone {
        digest: Digest,
        why: Expiry,
    },
}

/// A finished result being held.
struct Held {
    /// Worker-wide finishing order (the worker's budget drops the oldest).
    seq: u64,
    call_id: String,
    at: Instant,
    bytes: u64,
}

/// One session's calls.
#[derive(Default)]
struct SessionCalls {
    calls: HashMap<String, Entry>,
    /// Results held, oldest first.
    held: VecDeque<Held>,
    /// Results and ids.
    bytes: u64,
    /// Ids alone.
    id_bytes: u64,
}

#[derive(Default)]
struct Store {
    sessions: HashMap<u64, SessionCalls>,
    next_session: u64,
    next_seq: u64,
    /// Every session's bytes together, and their ids' alone.
    bytes: u64,
    id_bytes: u64,
}

impl Store {
    /// Drops the oldest result of session `key`.
    fn expire_oldest(&mut self, key: u64, why: Expiry) {
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(h) = s.held.pop_front() else {
            return;
        };
        s.bytes -= h.bytes;
        self.bytes -= h.bytes;
        if let Some(e) = s.calls.get_mut(&h.call_id) {
            if let Entry::Live(rec) = e {
                rec.expire(why);
                *e = Entry::Tombstone {
                    digest: rec.digest,
                    why,
                };
            }
        }
    }

    /// The session holding the worker's oldest result, never the worker's
    /// newest one.
    fn oldest_anywhere(&self) -> Option<u64> {
        let newest = self
            .sessions
            .values()
            .filter_map(|s| s.held.back())
            .map(|h| h.seq)
            .max();
        self.sessions
            .iter()
            .filter_map(|(k, s)| Some((s.held.front()?.seq, *k)))
            .filter(|(seq, _)| Some(*seq) != newest)
            .min()
            .map(|(_, k)| k)
    }

    /// Brings the journal within `limits`: results past their retention, then
    /// session `key`'s budget, then the worker's; oldest first, and never the
    /// newest result (of the session, of the worker), so the call that just
    /// finished is always delivered. Ids are not dropped here (see
    /// [`Journal::begin`]).
    fn enforce(&mut self, limits: &Limits, key: u64) {
        let now = Instant::now();
        let keys: Vec<u64> = self.sessions.keys().copied().collect();
        for k in keys {
            while self.sessions[&k]
                .held
                .front()
                .is_some_and(|h| now.duration_since(h.at) > limits.retention)
            {
                self.expire_oldest(k, Expiry::Retention);
            }
        }
        while let Some(s) = self.sessions.get(&key) {
            let over = s.held.len() > limits.max_results || s.bytes > limits.session_bytes;
            if !over || s.held.len() <= 1 {
                break;
            }
            self.expire_oldest(key, Expiry::Budget);
        }
        while self.bytes > limits.worker_bytes {
            let Some(k) = self.oldest_anywhere() else {
                break;
            };
            self.expire_oldest(k, Expiry::Budget);
        }
    }
}

/// The journals of one worker's sessions, with the budget they share.
pub struct JournalStore {
    limits: Limits,
    /// Every session's calls under one lock, so that the worker's budget can be
    /// enforced across sessions. Held for map updates only, never across an
    /// await or while a tool runs.
    inner: Mutex<Store>,
}

impl std::fmt::Debug for JournalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalStore")
            .field("limits", &self.limits)
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl JournalStore {
    pub fn new(limits: Limits) -> Arc<JournalStore> {
        Arc::new(JournalStore {
            limits,
            inner: Mutex::new(Store::default()),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A journal for a new session.
    pub fn journal(self: &Arc<Self>) -> Journal {
        let mut st = lock(&self.inner);
        let key = st.next_session;
        st.next_session += 1;
        st.sessions.insert(key, SessionCalls::default());
        Journal {
            store: self.clone(),
            key,
        }
    }

    /// Bytes held by every session's journal.
    pub fn bytes(&self) -> u64 {
        lock(&self.inner).bytes
    }

    /// Finished results held, over every session.
    pub fn results_held(&self) -> usize {
        lock(&self.inner)
            .sessions
            .values()
            .map(|s| s.held.len())
            .sum()
    }

    /// The calls still running, over every session, oldest first.
    pub fn running(&self) -> Vec<Arc<CallRecord>> {
        let mut calls: Vec<Arc<CallRecord>> = lock(&self.inner)
            .sessions
            .values()
            .flat_map(|s| s.calls.values())
            .filter_map(|e| match e {
                Entry::Live(rec) if !rec.is_finished() => Some(rec.clone()),
                _ => None,
            })
            .collect();
        calls.sort_by_key(|r| r.started);
        calls
    }

    /// Stops every running call because the worker shuts down after giving
    /// them `grace`: each ends with [`Outcome::Shutdown`] and a result saying
    /// so. Returns the calls it stopped.
    pub fn cut_short(&self, grace: Duration) -> Vec<Arc<CallRecord>> {
        self.cut_short_for(CancelCause::Shutdown { grace })
    }

    /// Stops every running call at once: the worker was told to stop while
    /// it drained. Returns the calls it stopped.
    pub fn cut_short_now(&self) -> Vec<Arc<CallRecord>> {
        self.cut_short_for(CancelCause::StoppedAgain)
    }

    fn cut_short_for(&self, cause: CancelCause) -> Vec<Arc<CallRecord>> {
        let calls = self.running();
        for rec in &calls {
            rec.cancel_for(cause);
        }
        calls
    }
}

/// A session's journal: its calls in the worker's [`JournalStore`]. Dropping
/// it (the session closed) releases them.
pub struct Journal {
    store: Arc<JournalStore>,
    key: u64,
}

impl Journal {
    /// A journal with a store of its own (a session outside any registry).
    pub fn standalone(limits: Limits) -> Journal {
        JournalStore::new(limits).journal()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Store, &Limits) -> T) -> T {
        let mut st = lock(&self.store.inner);
        f(&mut st, &self.store.limits)
    }

    /// Starts call `call_id`, or finds it: the same tool and input resume it;
    /// other input is refused; a call whose result was dropped is
    /// [`JournalError::Expired`], never started again.
    pub fn begin(
        &self,
        call_id: &str,
        tool: &str,
        input_json: &str,
    ) -> Result<Begin, JournalError> {
        let digest = digest(tool, input_json);
        let key = self.key;
        self.with(|st, limits| {
            st.enforce(limits, key);
            let s = st.sessions.entry(key).or_default();
            match s.calls.get(call_id) {
                Some(Entry::Live(rec)) if rec.digest == digest => {
                    return Ok(Begin::Existing(rec.clone()))
                }
                Some(Entry::Tombstone { digest: d, why }) if *d == digest => {
                    return Err(JournalError::Expired {
                        call_id: call_id.to_string(),
                        why: *why,
                    })
                }
                Some(_) => return Err(JournalError::InputMismatch(call_id.to_string())),
                None => {}
            }
            // Results make room for ids, not the other way round: a call is
            // refused only when the ids of past calls alone fill the budget.
            let cost = ENTRY_BYTES + call_id.len() as u64;
            let full = |scope, limit| JournalError::Full {
                call_id: call_id.to_string(),
                scope,
                limit,
            };
            if s.id_bytes + cost > limits.session_bytes {
                return Err(full("session", limits.session_bytes));
            }
            if st.id_bytes + cost > limits.worker_bytes {
                return Err(full("worker", limits.worker_bytes));
            }
            let (state, _) = watch::channel(CallState::Running { output_end: 0 });
            let rec = Arc::new(CallRecord {
                call_id: call_id.to_string(),
                tool: tool.to_string(),
                digest,
                state,
                output: Mutex::new(OutputLog {
                    start: 0,
                    data: VecDeque::new(),
                }),
                output_cap: limits.output_bytes,
                cancel: Notify::new(),
                cause: Mutex::new(None),
                started: Instant::now(),
                held: std::sync::atomic::AtomicBool::new(false),
            });
            let s = st.sessions.get_mut(&key).expect("created above");
            s.calls
                .insert(call_id.to_string(), Entry::Live(rec.clone()));
            s.bytes += cost;
            s.id_bytes += cost;
            st.bytes += cost;
            st.id_bytes += cost;
            st.enforce(limits, key);
            Ok(Begin::New(rec))
        })
    }

    /// Starts holding the result of `call_id`, which just finished, and drops
    /// older results beyond the budget.
    pub fn retire(&self, call_id: &str) {
        let key = self.key;
        self.with(|st, limits| {
            let seq = st.next_seq;
            st.next_seq += 1;
            let Some(s) = st.sessions.get_mut(&key) else {
                return;
            };
            let bytes = match s.calls.get(call_id) {
                Some(Entry::Live(rec)) if rec.is_finished() => {
                    // Once: a result is held at most once.
                    if rec.held.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    rec.held_bytes()
                }
                _ => return,
            };
            s.held.push_back(Held {
                seq,
                call_id: call_id.to_string(),
                at: Instant::now(),
                bytes,
            });
            s.bytes += bytes;
            st.bytes += bytes;
            st.enforce(limits, key);
        })
    }

    /// The record of call `call_id`.
    pub fn get(&self, call_id: &str) -> Result<Arc<CallRecord>, JournalError> {
        let key = self.key;
        self.with(|st, limits| {
            st.enforce(limits, key);
            match st.sessions.get(&key).and_then(|s| s.calls.get(call_id)) {
                Some(Entry::Live(rec)) => Ok(rec.clone()),
                Some(Entry::Tombstone { why, .. }) => Err(JournalError::Expired {
                    call_id: call_id.to_string(),
                    why: *why,
                }),
                None => Err(JournalError::NotFound(call_id.to_string())),
            }
        })
    }

    /// Bytes this session's journal holds.
    pub fn bytes(&self) -> u64 {
        self.with(|st, _| st.sessions.get(&self.key).map_or(0, |s| s.bytes))
    }

    /// Finished results this session's journal holds.
    pub fn results_held(&self) -> usize {
        self.with(|st, _| st.sessions.get(&self.key).map_or(0, |s| s.held.len()))
    }

    /// The worker-wide store this journal belongs to.
    pub fn store(&self) -> &Arc<JournalStore> {
        &self.store
    }
}

impl Drop for Journal {
    /// The session closed: its records go, and a stream still holding one sees
    /// it expired rather than keeping its result alive.
    fn drop(&mut self) {
        let removed = self.with(|st, _| {
            let s = st.sessions.remove(&self.key)?;
            st.bytes -= s.bytes;
            st.id_bytes -= s.id_bytes;
            Some(s)
        });
        for e in removed.into_iter().flat_map(|s| s.calls.into_values()) {
            if let Entry::Live(rec) = e {
                rec.expire(Expiry::SessionClosed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::{Base64Source, ContentBlock};

    fn limits(session_bytes: u64, worker_bytes: u64, max_results: usize) -> Limits {
        Limits {
            session_bytes,
            worker_bytes,
            retention: Duration::from_secs(60),
            max_results,
            output_bytes: 1024,
        }
    }

    fn small() -> Journal {
        Journal::standalone(limits(1 << 20, 1 << 20, 8))
    }

    /// Runs call `id` to its end with `result`.
    fn done(j: &Journal, id: &str, result: ToolResult) -> Arc<CallRecord> {
        let Ok(Begin::New(rec)) = j.begin(id, "read", "{}") else {
            panic!("{id} is not new")
        };
        rec.finish(result, Outcome::Completed);
        j.retire(id);
        rec
    }

    fn pdf(bytes: usize) -> ToolResult {
        ToolResult::block(ContentBlock::Document {
            source: Base64Source {
                kind: "base64".into(),
                media_type: "application/pdf".into(),
                data: "A".repeat(bytes),
            },
        })
    }

    #[test]
    fn same_input_resumes_other_input_is_refused() {
        let j = small();
        assert!(matches!(j.begin("c1", "bash", "{}"), Ok(Begin::New(_))));
        assert!(matches!(
            j.begin("c1", "bash", "{}"),
            Ok(Begin::Existing(_))
        ));
        assert_eq!(
            j.begin("c1", "bash", r#"{"command":"x"}"#).err(),
            Some(JournalError::InputMismatch("c1".into()))
        );
        assert_eq!(
            j.begin("c1", "read", "{}").err(),
            Some(JournalError::InputMismatch("c1".into()))
        );
    }

    #[test]
    fn output_tail_is_bounded_and_offsets_are_stable() {
        let j = Journal::standalone(Limits {
            output_bytes: 10,
            ..Limits::default()
        });
        let Ok(Begin::New(rec)) = j.begin("c", "bash", "{}") else {
            panic!()
        };
        rec.append_output(b"0123456789");
        rec.append_output(b"abcde");
        assert_eq!(rec.subscribe().borrow().output_end(), 15);
        assert_eq!(
            rec.read_output(5, 100).unwrap(),
            (5, b"56789abcde".to_vec())
        );
        assert_eq!(rec.read_output(12, 2).unwrap(), (12, b"cd".to_vec()));
        assert_eq!(
            rec.read_output(2, 10).unwrap_err(),
            JournalError::OffsetExpired {
                asked: 2,
                kept_from: 5
            }
        );
    }

    #[test]
    fn finish_once_cancel_only_while_running() {
        let j = small();
        let Ok(Begin::New(rec)) = j.begin("c", "bash", "{}") else {
            panic!()
        };
        assert!(rec.cancel());
        rec.finish(ToolResult::ok("first"), Outcome::Cancelled);
        rec.finish(ToolResult::ok("second"), Outcome::Completed);
        match &*rec.subscribe().borrow() {
            CallState::Finished {
                result, outcome, ..
            } => {
                assert_eq!(result.text_content(), "first");
                assert_eq!(*outcome, Outcome::Cancelled);
            }
            other => panic!("{other:?}"),
        }
        assert!(!rec.cancel());
    }

    #[test]
    fn results_beyond_the_count_become_tombstones_and_never_run_again() {
        let j = Journal::standalone(limits(1 << 20, 1 << 20, 2));
        for id in ["a", "b", "c"] {
            done(&j, id, ToolResult::ok("x"));
        }
        let expired = JournalError::Expired {
            call_id: "a".into(),
            why: Expiry::Budget,
        };
        assert_eq!(j.get("a").err(), Some(expired.clone()));
        assert_eq!(j.begin("a", "read", "{}").err(), Some(expired));
        assert_eq!(
            j.begin("a", "read", "{\"other\":1}").err(),
            Some(JournalError::InputMismatch("a".into()))
        );
        assert!(j.get("b").is_ok() && j.get("c").is_ok());
        assert_eq!(j.results_held(), 2);
        // A running call is never dropped.
        let Ok(Begin::New(_)) = j.begin("r", "bash", "{}") else {
            panic!()
        };
        assert!(j.get("r").is_ok());
    }

    #[test]
    fn a_session_holds_at_most_its_bytes_oldest_dropped_first() {
        let j = Journal::standalone(limits(100_000, 1 << 30, 1024));
        let mut recs = Vec::new();
        for i in 0..10 {
            recs.push(done(&j, &format!("p{i}"), pdf(30_000)));
            assert!(j.bytes() <= 100_000, "{} after p{i}", j.bytes());
        }
        // Three fit: the last three are held, the rest are tombstones.
        assert_eq!(j.results_held(), 3);
        assert!(matches!(
            j.get("p6"),
            Err(JournalError::Expired {
                why: Expiry::Budget,
                ..
            })
        ));
        assert!(j.get("p7").is_ok());
        // A stream still holding an old record sees it expired.
        assert!(matches!(
            &*recs[0].subscribe().borrow(),
            CallState::Expired {
                why: Expiry::Budget,
                ..
            }
        ));
    }

    #[test]
    fn the_newest_result_is_held_even_when_it_alone_is_over_budget() {
        let j = Journal::standalone(limits(10_000, 1 << 30, 1024));
        done(&j, "small", ToolResult::ok("x"));
        done(&j, "huge", pdf(50_000));
        assert!(j.get("huge").is_ok());
        assert!(j.get("small").is_err());
        done(&j, "next", ToolResult::ok("y"));
        assert!(j.get("huge").is_err(), "dropped once no longer the newest");
        assert!(j.bytes() <= 10_000);
    }

    #[test]
    fn the_worker_budget_spans_sessions_and_closing_releases_everything() {
        let store = JournalStore::new(limits(1 << 30, 100_000, 1024));
        let a = store.journal();
        let b = store.journal();
        done(&a, "a0", pdf(30_000));
        done(&b, "b0", pdf(30_000));
        done(&a, "a1", pdf(30_000));
        done(&b, "b1", pdf(30_000));
        assert!(store.bytes() <= 100_000, "{}", store.bytes());
        // The worker's oldest went first, whichever session held it.
        assert!(a.get("a0").is_err());
        assert!(b.get("b0").is_ok() && a.get("a1").is_ok() && b.get("b1").is_ok());
        let held = b.get("b1").unwrap();
        drop(b);
        assert_eq!(store.bytes(), a.bytes());
        assert_eq!(store.results_held(), 1);
        assert!(matches!(
            &*held.subscribe().borrow(),
            CallState::Expired {
                why: Expiry::SessionClosed,
                ..
            }
        ));
        drop(a);
        assert_eq!(store.bytes(), 0);
    }

    #[test]
    fn results_expire_after_the_retention() {
        let j = Journal::standalone(Limits {
            retention: Duration::from_millis(50),
            ..Limits::default()
        });
        done(&j, "old", ToolResult::ok("x"));
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(
            j.get("old").err(),
            Some(JournalError::Expired {
                call_id: "old".into(),
                why: Expiry::Retention
            })
        );
    }

    #[test]
    fn ids_alone_over_the_budget_refuse_new_calls() {
        let j = Journal::standalone(limits(4 * (ENTRY_BYTES + 2), 1 << 30, 1));
        for i in 0..4 {
            done(&j, &format!("c{i}"), ToolResult::ok("x"));
        }
        assert!(matches!(
            j.begin("c4", "read", "{}"),
            Err(JournalError::Full {
                scope: "session",
                ..
            })
        ));
        // Known ids still answer.
        assert!(matches!(
            j.begin("c0", "read", "{}"),
            Err(JournalError::Expired { .. })
        ));
    }
}
