//! `hands.v1.Sandbox` (proto/hands/v1/sandbox.proto) over the session registry:
//! the service a brain calls, whichever way it reaches the worker (the outbound
//! tunnel, or the loopback debug listener).
//!
//! Errors are gRPC statuses with a machine-readable reason in the `hands-reason`
//! trailer; tool-level failures are normal results with `is_error`.
//!
//! Calls are submitted through the one call pipeline (`Session::submit`): a
//! call runs on its own task until it finishes, whoever watches it; each
//! stream is a forwarder that follows the journal record, so a repeated `Call`
//! or an `Attach` resumes delivery and never executes again — or, once the
//! journal has dropped the result to stay within its budget, answers
//! `RESULT_EXPIRED`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use crate::proto::v1;
use crate::session::journal::{CallRecord, CallState, JournalError, Outcome};
use crate::session::registry::{valid_id, Registry, RegistryError};
use crate::session::{CallSpec, SubmitError};

/// Largest message either way: a `Finished` of a 20 MiB PDF read is ~27 MiB of
/// base64, and a `write` may carry a large file; the same bound as the channel
/// to the session helper.
pub const MAX_MESSAGE: usize = crate::session::MAX_MESSAGE;

/// The trailer that carries an error's machine-readable reason.
pub const REASON: &str = "hands-reason";

/// A status with its reason in the `hands-reason` trailer.
pub fn status(code: Code, reason: &'static str, message: impl Into<String>) -> Status {
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert(REASON, tonic::metadata::MetadataValue::from_static(reason));
    Status::with_metadata(code, message, md)
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Status {
        let (code, reason) = match &e {
            RegistryError::InvalidId(_) => (Code::InvalidArgument, "INVALID_ID"),
            RegistryError::UnknownEnvironment(_) => (Code::NotFound, "UNKNOWN_ENVIRONMENT"),
            RegistryError::EnvironmentMismatch { .. } => {
                (Code::AlreadyExists, "SESSION_ENVIRONMENT_MISMATCH")
            }
            RegistryError::AtCapacity(_) => (Code::ResourceExhausted, "AT_CAPACITY"),
            RegistryError::SessionNotFound(_) | RegistryError::ClosedIdle { .. } => {
                (Code::NotFound, "SESSION_NOT_FOUND")
            }
            RegistryError::Open(_) => (Code::FailedPrecondition, "SANDBOX_UNAVAILABLE"),
        };
        status(code, reason, e.to_string())
    }
}

/// The confinement this kernel gives every session (for `Info`).
pub fn detect_isolation() -> v1::Isolation {
    let i = crate::session::isolation();
    v1::Isolation {
        landlock_abi: i.landlock_abi,
        seccomp: i.seccomp,
        cgroup_version: i.cgroup_version.to_string(),
        namespaces: i.namespaces.map(String::from).to_vec(),
    }
}

/// The service: one per worker, shared by every connection.
pub struct SandboxService {
    registry: Arc<Registry>,
    worker_id: String,
    isolation: v1::Isolation,
}

impl SandboxService {
    pub fn new(registry: Arc<Registry>, worker_id: String, isolation: v1::Isolation) -> Self {
        SandboxService {
            registry,
            worker_id,
            isolation,
        }
    }

    /// The tonic server for this service, with the protocol's message limits.
    pub fn into_server(self) -> v1::sandbox_server::SandboxServer<SandboxService> {
        v1::sandbox_server::SandboxServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::CallEvent, Status>> + Send>>;

fn event(e: v1::call_event::Event) -> v1::CallEvent {
    v1::CallEvent { event: Some(e) }
}

#[tonic::async_trait]
impl v1::sandbox_server::Sandbox for SandboxService {
    async fn info(
        &self,
        _req: Request<v1::InfoRequest>,
    ) -> Result<Response<v1::InfoResponse>, Status> {
        let environments = self
            .registry
            .environments()
            .iter()
            .map(|p| v1::Environment {
                name: p.name.clone(),
                description: p.description.clone().unwrap_or_default(),
                tools: p.tools.iter().map(|t| t.name().to_string()).collect(),
                network: p.network.mode.name().to_string(),
                memory_bytes: p.limits.memory_bytes,
                pids: p.limits.pids,
                cpu: p.limits.cpu,
                bash_timeout_ms: p.limits.bash_timeout.as_millis() as u64,
                call_timeout_ms: p.limits.call_timeout.as_millis() as u64,
            })
            .collect();
        Ok(Response::new(v1::InfoResponse {
            worker_id: self.worker_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocols: vec!["hands.v1".to_string()],
            environments,
            capacity: self.registry.capacity() as u32,
            open_sessions: self.registry.open_sessions() as u32,
            isolation: Some(self.isolation.clone()),
            instance_id: self.registry.instance_id().to_string(),
            session_idle_timeout_ms: millis(self.registry.idle_timeout()),
        }))
    }

    async fn open_session(
        &self,
        req: Request<v1::OpenSessionRequest>,
    ) -> Result<Response<v1::OpenSessionResponse>, Status> {
        let r = req.into_inner();
        let (_, created) = self.registry.open(&r.session_id, &r.environment).await?;
        Ok(Response::new(v1::OpenSessionResponse {
            session_id: r.session_id,
            created,
            environment: r.environment,
            worker_id: self.worker_id.clone(),
        }))
    }

    async fn close_session(
        &self,
        req: Request<v1::CloseSessionRequest>,
    ) -> Result<Response<v1::CloseSessionResponse>, Status> {
        let r = req.into_inner();
        if !valid_id(&r.session_id) {
            return Err(RegistryError::InvalidId(r.session_id).into());
        }
        Ok(Response::new(v1::CloseSessionResponse {
            closed: self.registry.close(&r.session_id),
        }))
    }

    async fn list_sessions(
        &self,
        _req: Request<v1::ListSessionsRequest>,
    ) -> Result<Response<v1::ListSessionsResponse>, Status> {
        let sessions = self
            .registry
            .list()
            .into_iter()
            .map(|s| v1::SessionInfo {
                session_id: s.id,
                environment: s.environment,
                opened_at_unix_ms: s
                    .opened_at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                // The monotonic clock's age: the wall clock may have stepped.
                age_ms: s.activity.age.as_millis() as u64,
                running_calls: s.activity.running,
                idle_ms: s.activity.idle.as_millis() as u64,
                calls: s.activity.calls,
                idle_timeout_ms: millis(s.idle_timeout),
            })
            .collect();
        Ok(Response::new(v1::ListSessionsResponse { sessions }))
    }

    type CallStream = EventStream;

    async fn call(&self, req: Request<v1::CallRequest>) -> Result<Response<EventStream>, Status> {
        let timeout = grpc_timeout(req.metadata())?;
        let r = req.into_inner();
        if !valid_id(&r.call_id) {
            return Err(RegistryError::InvalidId(r.call_id).into());
        }
        let session = self.registry.get(&r.session_id)?;
        // Checked: a deadline too far to represent is no deadline.
        let deadline = timeout.and_then(|d| tokio::time::Instant::now().checked_add(d));
        // A deadline is a cancel of the call this request started; a resumed
        // call keeps the deadline of the request that started it.
        let spec = CallSpec::new(r.call_id, r.tool, r.input_json).with_deadline(deadline);
        let submitted = session.submit(spec).map_err(|e| match e {
            SubmitError::InvalidInput(_) => {
                status(Code::InvalidArgument, "INVALID_INPUT_JSON", e.to_string())
            }
            SubmitError::Journal(e) => journal_status(e),
        })?;
        let (rec, executed_now) = (submitted.record, submitted.executed_now);
        let ends_at = if executed_now { deadline } else { None };
        Ok(Response::new(forward(
            rec,
            executed_now,
            0,
            r.stream_output,
            ends_at,
        )))
    }

    type AttachStream = EventStream;

    async fn attach(
        &self,
        req: Request<v1::AttachRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let r = req.into_inner();
        let session = self.registry.get(&r.session_id)?;
        let rec = session.journal().get(&r.call_id).map_err(journal_status)?;
        rec.read_output(r.from_offset, 0).map_err(journal_status)?;
        Ok(Response::new(forward(
            rec,
            false,
            r.from_offset,
            true,
            None,
        )))
    }

    async fn cancel(
        &self,
        req: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::CancelResponse>, Status> {
        let r = req.into_inner();
        let session = self.registry.get(&r.session_id)?;
        let cancelled = match session.journal().get(&r.call_id) {
            Ok(rec) => rec.cancel(),
            Err(_) => false,
        };
        Ok(Response::new(v1::CancelResponse { cancelled }))
    }
}

/// A duration for the protocol: milliseconds, 0 for none.
fn millis(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| d.as_millis().max(1) as u64)
}

fn journal_status(e: JournalError) -> Status {
    let (code, reason) = match &e {
        JournalError::InputMismatch(_) => (Code::AlreadyExists, "CALL_INPUT_MISMATCH"),
        JournalError::NotFound(_) => (Code::NotFound, "CALL_NOT_FOUND"),
        JournalError::OffsetExpired { .. } => (Code::OutOfRange, "OUTPUT_OFFSET_EXPIRED"),
        JournalError::Expired { .. } => (Code::FailedPrecondition, "RESULT_EXPIRED"),
        JournalError::Full { .. } => (Code::ResourceExhausted, "JOURNAL_FULL"),
    };
    status(code, reason, e.to_string())
}

/// Largest Output event.
const OUTPUT_CHUNK: usize = 64 * 1024;

/// A stream that follows one journal record: Started, the output from
/// `from_offset` (when `output`), then Finished. A call cancelled by this
/// stream's `deadline` ends it with DEADLINE_EXCEEDED instead (whether or not
/// the client enforces deadlines itself); its Finished stays journaled.
///
/// The stream is polled by the connection's own task: no forwarder task and
/// no channel between the record and the client.
fn forward(
    rec: Arc<CallRecord>,
    executed_now: bool,
    from_offset: u64,
    output: bool,
    deadline: Option<tokio::time::Instant>,
) -> EventStream {
    let started = v1::Started {
        call_id: rec.call_id.clone(),
        executed_now,
    };
    let follow = Follow {
        state: rec.subscribe(),
        rec,
        offset: from_offset,
        output,
        deadline,
        pending: std::collections::VecDeque::from([Ok(event(v1::call_event::Event::Started(
            started,
        )))]),
        done: false,
        fresh: true,
    };
    Box::pin(futures_util::stream::unfold(follow, |mut f| async move {
        let item = f.next().await?;
        Some((item, f))
    }))
}

/// The state of one [`forward`] stream.
struct Follow {
    rec: Arc<CallRecord>,
    state: tokio::sync::watch::Receiver<CallState>,
    offset: u64,
    output: bool,
    deadline: Option<tokio::time::Instant>,
    /// Events ready to go, in order.
    pending: std::collections::VecDeque<Result<v1::CallEvent, Status>>,
    /// The last event is queued: nothing follows it.
    done: bool,
    /// The state has not been looked at yet (no change to wait for first).
    fresh: bool,
}

impl Follow {
    async fn next(&mut self) -> Option<Result<v1::CallEvent, Status>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.done {
                return None;
            }
            if !self.fresh && self.state.changed().await.is_err() {
                return None;
            }
            self.fresh = false;
            self.look();
        }
    }

    /// Queues what the record's state holds beyond what was sent.
    fn look(&mut self) {
        let snapshot = self.state.borrow_and_update().clone();
        if let CallState::Expired { why, .. } = snapshot {
            let e = JournalError::Expired {
                call_id: self.rec.call_id.clone(),
                why,
            };
            self.finish(Err(journal_status(e)));
            return;
        }
        if self.output {
            while self.offset < snapshot.output_end() {
                let (at, data) = match self.rec.read_output(self.offset, OUTPUT_CHUNK) {
                    Ok(v) => v,
                    Err(e) => {
                        self.finish(Err(journal_status(e)));
                        return;
                    }
                };
                if data.is_empty() {
                    break;
                }
                self.offset = at + data.len() as u64;
                let out = v1::Output { offset: at, data };
                self.pending
                    .push_back(Ok(event(v1::call_event::Event::Output(out))));
            }
        }
        if let CallState::Finished {
            result, outcome, ..
        } = &snapshot
        {
            let outcome = match outcome {
                Outcome::Completed => v1::Outcome::Completed,
                Outcome::TimedOut => v1::Outcome::TimedOut,
                Outcome::Cancelled => v1::Outcome::Cancelled,
                Outcome::Shutdown => v1::Outcome::Shutdown,
            };
            if outcome == v1::Outcome::Cancelled
                && self
                    .deadline
                    .is_some_and(|d| tokio::time::Instant::now() >= d)
            {
                self.finish(Err(status(
                    Code::DeadlineExceeded,
                    "DEADLINE_EXCEEDED",
                    "the call's deadline passed: it was cancelled, and its result is kept for Attach",
                )));
                return;
            }
            let fin = crate::proto::finished(result, outcome);
            self.finish(Ok(event(v1::call_event::Event::Finished(fin))));
        }
    }

    fn finish(&mut self, last: Result<v1::CallEvent, Status>) {
        self.pending.push_back(last);
        self.done = true;
    }
}

/// The client's deadline, from `grpc-timeout`: at most 8 digits and a unit
/// (H M S m u n), as the gRPC spec writes it; so at most 99,999,999 hours, and
/// no arithmetic on it can overflow. Anything else is refused rather than
/// ignored: a client that meant a deadline must not get a call without one.
fn grpc_timeout(md: &tonic::metadata::MetadataMap) -> Result<Option<Duration>, Status> {
    let Some(v) = md.get("grpc-timeout") else {
        return Ok(None);
    };
    let bad = || {
        status(
            Code::InvalidArgument,
            "INVALID_TIMEOUT",
            format!(
                "grpc-timeout {:?} is not 1 to 8 digits and a unit (H, M, S, m, u, n)",
                String::from_utf8_lossy(v.as_bytes())
            ),
        )
    };
    parse_grpc_timeout(v.as_bytes()).ok_or_else(bad).map(Some)
}

fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // 8 digits: at most 99,999,999, so the products below fit a u64.
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_the_spec_s_eight_digits_and_a_unit() {
        let p = |s: &str| parse_grpc_timeout(s.as_bytes());
        assert_eq!(p("5S"), Some(Duration::from_secs(5)));
        assert_eq!(p("250m"), Some(Duration::from_millis(250)));
        assert_eq!(p("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
        assert_eq!(p("1n"), Some(Duration::from_nanos(1)));
        for bad in [
            "18446744073709551615S",
            "18446744073709551615H",
            "123456789S",
            "S",
            "",
            "5",
            "5s",
            "-5S",
            "+5S",
            " 5S",
            "5 S",
            "\u{663}S",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
        // The largest valid deadline is still an instant.
        let far = p("99999999H").unwrap();
        assert!(tokio::time::Instant::now().checked_add(far).is_some());
    }
}
