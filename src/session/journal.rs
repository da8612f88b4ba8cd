//! The call journal of a session: at-most-once execution, at-least-once
//! delivery. Each call id maps to one record: the tool and input it was started
//! with, its live state, a bounded tail of its output, and a cancel signal. A
//! call runs on its own task and keeps running when every stream watching it
//! goes away; a later stream resumes from the journal instead of executing
//! again. Finished records are kept for a retention window, and at most
//! `max_finished` of them.

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
        result: ToolResult,
        outcome: Outcome,
    },
}

impl CallState {
    pub fn output_end(&self) -> u64 {
        match self {
            CallState::Running { output_end } | CallState::Finished { output_end, .. } => {
                *output_end
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JournalError {
    #[error("call {0:?} was started with other input")]
    InputMismatch(String),
    #[error("no call {0:?} in the journal")]
    NotFound(String),
    #[error("output before offset {kept_from} is no longer journaled (asked for {asked})")]
    OffsetExpired { asked: u64, kept_from: u64 },
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
    input_json: String,
    state: watch::Sender<CallState>,
    output: Mutex<OutputLog>,
    output_cap: usize,
    cancel: Notify,
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
        self.state.send_if_modified(|s| match s {
            CallState::Running { output_end } => {
                *s = CallState::Finished {
                    output_end: *output_end,
                    result,
                    outcome,
                };
                true
            }
            CallState::Finished { .. } => false,
        });
    }

    pub fn is_finished(&self) -> bool {
        matches!(*self.state.borrow(), CallState::Finished { .. })
    }

    pub fn subscribe(&self) -> watch::Receiver<CallState> {
        self.state.subscribe()
    }

    /// Asks the running call to stop; false when it already finished.
    pub fn cancel(&self) -> bool {
        if self.is_finished() {
            return false;
        }
        self.cancel.notify_one();
        true
    }

    /// Resolves when `cancel` was called (a permit is kept if it came first).
    pub async fn cancelled(&self) {
        self.cancel.notified().await
    }
}

/// What `begin` found.
pub enum Begin {
    /// A new call: the caller must execute it.
    New(Arc<CallRecord>),
    /// The same call, started earlier: resume, do not execute.
    Existing(Arc<CallRecord>),
}

struct Inner {
    calls: HashMap<String, Arc<CallRecord>>,
    /// Finished calls, oldest first, for eviction.
    finished: VecDeque<(String, Instant)>,
}

/// A session's journal.
pub struct Journal {
    inner: Mutex<Inner>,
    retention: Duration,
    max_finished: usize,
    output_cap: usize,
}

impl Journal {
    pub fn new(retention: Duration, max_finished: usize, output_cap: usize) -> Journal {
        Journal {
            inner: Mutex::new(Inner {
                calls: HashMap::new(),
                finished: VecDeque::new(),
            }),
            retention,
            max_finished,
            output_cap,
        }
    }

    fn evict(&self, inner: &mut Inner) {
        let now = Instant::now();
        while let Some((id, at)) = inner.finished.front() {
            let expired = now.duration_since(*at) > self.retention;
            if !expired && inner.finished.len() <= self.max_finished {
                break;
            }
            let id = id.clone();
            inner.finished.pop_front();
            inner.calls.remove(&id);
        }
    }

    /// Starts call `call_id`, or finds it: the same tool and input resume it;
    /// other input is refused.
    pub fn begin(
        &self,
        call_id: &str,
        tool: &str,
        input_json: &str,
    ) -> Result<Begin, JournalError> {
        let mut inner = lock(&self.inner);
        self.evict(&mut inner);
        if let Some(rec) = inner.calls.get(call_id) {
            if rec.tool != tool || rec.input_json != input_json {
                return Err(JournalError::InputMismatch(call_id.to_string()));
            }
            return Ok(Begin::Existing(rec.clone()));
        }
        let (state, _) = watch::channel(CallState::Running { output_end: 0 });
        let rec = Arc::new(CallRecord {
            call_id: call_id.to_string(),
            tool: tool.to_string(),
            input_json: input_json.to_string(),
            state,
            output: Mutex::new(OutputLog {
                start: 0,
                data: VecDeque::new(),
            }),
            output_cap: self.output_cap,
            cancel: Notify::new(),
        });
        inner.calls.insert(call_id.to_string(), rec.clone());
        Ok(Begin::New(rec))
    }

    /// Marks `call_id` finished for retention accounting (its record already
    /// holds the result).
    pub fn retire(&self, call_id: &str) {
        let mut inner = lock(&self.inner);
        inner
            .finished
            .push_back((call_id.to_string(), Instant::now()));
        self.evict(&mut inner);
    }

    pub fn get(&self, call_id: &str) -> Result<Arc<CallRecord>, JournalError> {
        let mut inner = lock(&self.inner);
        self.evict(&mut inner);
        inner
            .calls
            .get(call_id)
            .cloned()
            .ok_or_else(|| JournalError::NotFound(call_id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_input_resumes_other_input_is_refused() {
        let j = Journal::new(Duration::from_secs(60), 8, 1024);
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
        let j = Journal::new(Duration::from_secs(60), 8, 10);
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
        let j = Journal::new(Duration::from_secs(60), 8, 10);
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
    fn finished_calls_are_evicted_beyond_the_limit() {
        let j = Journal::new(Duration::from_secs(60), 2, 10);
        for id in ["a", "b", "c"] {
            let Ok(Begin::New(rec)) = j.begin(id, "bash", "{}") else {
                panic!()
            };
            rec.finish(ToolResult::ok(""), Outcome::Completed);
            j.retire(id);
        }
        assert_eq!(j.get("a").err(), Some(JournalError::NotFound("a".into())));
        assert!(j.get("b").is_ok() && j.get("c").is_ok());
        // A running call is never evicted.
        let Ok(Begin::New(_)) = j.begin("r", "bash", "{}") else {
            panic!()
        };
        assert!(j.get("r").is_ok());
    }
}
