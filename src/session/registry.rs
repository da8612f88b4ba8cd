//! The worker's open sessions, by the ids their clients chose: idempotent open
//! and close, the worker's session capacity, the environments (policies) a
//! session may be opened in, the listing of what is open, and the idle
//! timeout that closes sessions a client abandoned. Connectors (the hands.v1
//! service, the Claude Managed Agents runner) reach sessions only through
//! this, and run calls only through [`Session::submit`].
//!
//! A registry is one worker process's set of sessions: it draws an instance id
//! when it is made, which the worker reports in `Info` so a gateway can tell
//! two processes with one worker id apart.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;

use super::{Connector, Origin, Session, SessionError, SessionOptions};
use crate::audit::Auditor;
use crate::policy::Policy;
use crate::sandbox::SandboxConfig;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid id {0:?}: 1 to 128 characters of [A-Za-z0-9._:-]")]
    InvalidId(String),
    #[error("no environment {0:?} on this worker")]
    UnknownEnvironment(String),
    #[error("session {id:?} is open in environment {existing:?}, not {requested:?}")]
    EnvironmentMismatch {
        id: String,
        existing: String,
        requested: String,
    },
    #[error("the worker holds its capacity of {0} open sessions")]
    AtCapacity(usize),
    #[error("no open session {0:?}")]
    SessionNotFound(String),
    /// Not found either, but the registry remembers why: the idle timeout
    /// closed it.
    #[error(
        "no open session {id:?}: the worker closed it after {idle_secs} s idle (its \
         [sessions] idle_timeout_secs is {timeout_secs}); open a new session"
    )]
    ClosedIdle {
        id: String,
        idle_secs: u64,
        timeout_secs: u64,
    },
    #[error(transparent)]
    Open(#[from] SessionError),
}

impl RegistryError {
    /// Why an open was refused, as the metrics label it.
    pub fn reason(&self) -> &'static str {
        match self {
            RegistryError::InvalidId(_) => "invalid_id",
            RegistryError::UnknownEnvironment(_) => "unknown_environment",
            RegistryError::EnvironmentMismatch { .. } => "environment_mismatch",
            RegistryError::AtCapacity(_) => "at_capacity",
            RegistryError::SessionNotFound(_) | RegistryError::ClosedIdle { .. } => "not_found",
            RegistryError::Open(_) => "open_failed",
        }
    }
}

/// Whether `id` is a valid session or call id.
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Who ends a session, and so whether the idle timeout applies to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// A remote client (hands.v1, through a gateway or not). It may go away
    /// without closing: the idle timeout closes what it abandoned.
    Client,
    /// A connector inside the worker (Claude Managed Agents), which ends its
    /// sessions itself, with lifetimes of its own (a lease, `max_idle_secs`).
    Connector,
}

struct Entry {
    environment: String,
    session: Arc<Session>,
    owner: Owner,
    opened_at: SystemTime,
    /// Counts the session as open in the worker's metrics until the entry
    /// is dropped, however the session is closed.
    _counted: Option<crate::worker::metrics::Held>,
}

/// One open session, as [`Registry::list`] shows it.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub id: String,
    pub environment: String,
    pub owner: Owner,
    pub opened_at: SystemTime,
    pub activity: super::activity::Snapshot,
    /// The idle timeout that applies to it, if any.
    pub idle_timeout: Option<Duration>,
}

/// A session [`Registry::close_idle`] closed.
#[derive(Debug, Clone)]
pub struct IdleClosed {
    pub id: String,
    pub environment: String,
    pub idle: Duration,
    pub age: Duration,
    pub calls: u64,
}

/// The shortest pause between two idle sweeps, so that a session about to
/// expire never makes the sweeper spin.
const MIN_SWEEP_PAUSE: Duration = Duration::from_millis(50);

/// How many sessions closed for idleness are remembered (by id, with how long
/// they were idle), so that a client coming back to one learns why it is gone.
/// Oldest forgotten first; a forgotten one is plain `SESSION_NOT_FOUND`.
const IDLE_CLOSED_MEMORY: usize = 4096;

/// Open sessions of one worker.
pub struct Registry {
    cfg: SandboxConfig,
    /// Replaced whole by a reload; open sessions keep the policy they were
    /// opened with.
    policies: std::sync::RwLock<BTreeMap<String, Arc<Policy>>>,
    capacity: std::sync::atomic::AtomicUsize,
    /// This process's sessions: new at every start (see the module doc).
    instance_id: String,
    /// Client sessions idle this long are closed; `None`: never.
    idle_timeout: Option<Duration>,
    /// Sessions the idle timeout closed, newest last: (id, idle seconds).
    /// Forgotten when their id is opened or closed again.
    idle_closed: std::sync::Mutex<VecDeque<(String, u64)>>,
    /// Held only briefly, never across a session open, so calls keep finding
    /// their sessions while another session is being opened.
    sessions: std::sync::Mutex<HashMap<String, Entry>>,
    /// Serialises opens: two concurrent opens of one id must create one session.
    opening: Mutex<()>,
    /// Every session's call journal, within one budget. A closed session's
    /// journal is released when the session is dropped (the registry keeps no
    /// reference to a closed session).
    journals: Arc<super::journal::JournalStore>,
    /// Where every session's calls are audited.
    audit: Arc<Auditor>,
    /// The worker's metrics, which sessions and their calls count in.
    metrics: Option<Arc<crate::worker::metrics::WorkerMetrics>>,
}

impl Registry {
    pub fn new(
        cfg: SandboxConfig,
        policies: impl IntoIterator<Item = Policy>,
        capacity: usize,
    ) -> Registry {
        Registry {
            cfg,
            policies: std::sync::RwLock::new(
                policies
                    .into_iter()
                    .map(|p| (p.name.clone(), Arc::new(p)))
                    .collect(),
            ),
            capacity: capacity.into(),
            instance_id: new_instance_id(),
            idle_timeout: None,
            idle_closed: Default::default(),
            sessions: Default::default(),
            opening: Mutex::new(()),
            journals: super::journal::JournalStore::new(Default::default()),
            audit: Auditor::log_only(crate::util::hostname()),
            metrics: None,
        }
    }

    /// This registry with its sessions' calls audited by `audit`.
    pub fn with_audit(mut self, audit: Arc<Auditor>) -> Registry {
        self.audit = audit;
        self
    }

    /// Where this registry's sessions audit their calls.
    pub fn audit(&self) -> &Arc<Auditor> {
        &self.audit
    }

    /// This registry with its sessions, their calls and their egress decisions
    /// counted in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::worker::metrics::WorkerMetrics>) -> Registry {
        self.metrics = Some(metrics);
        self
    }

    /// The worker's metrics, if this registry counts in any.
    pub fn metrics(&self) -> Option<&Arc<crate::worker::metrics::WorkerMetrics>> {
        self.metrics.as_ref()
    }

    /// This registry with the call journal's budget set to `limits`.
    pub fn with_journal_limits(mut self, limits: super::journal::Limits) -> Registry {
        self.journals = super::journal::JournalStore::new(limits);
        self
    }

    /// This registry with sessions opened by clients closed once idle for
    /// `timeout` (see [`Registry::close_idle`]); `None`: never.
    pub fn with_idle_timeout(mut self, timeout: Option<Duration>) -> Registry {
        self.idle_timeout = timeout.filter(|t| !t.is_zero());
        self
    }

    /// The idle timeout of sessions opened by clients, if any.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }

    /// This worker process's instance id (random, drawn at start).
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The call journals of every session, and their budget.
    pub fn journals(&self) -> &Arc<super::journal::JournalStore> {
        &self.journals
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        match self.sessions.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The sandbox settings sessions are opened with (their workspaces among
    /// them).
    pub fn sandbox(&self) -> &SandboxConfig {
        &self.cfg
    }

    /// Where this registry's sessions' workspaces come from (connectors keep
    /// and sweep theirs).
    pub fn workspaces(&self) -> Arc<crate::workspace::Workspaces> {
        self.cfg.workspaces.clone()
    }

    /// The environments sessions can be opened in, in name order.
    pub fn environments(&self) -> Vec<Arc<Policy>> {
        self.policies_now().values().cloned().collect()
    }

    pub fn capacity(&self) -> usize {
        self.capacity.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Replaces the environments new sessions are opened in (a reload); open
    /// sessions keep the policy they were opened with.
    pub fn set_environments(&self, policies: impl IntoIterator<Item = Policy>) {
        let map = policies
            .into_iter()
            .map(|p| (p.name.clone(), Arc::new(p)))
            .collect();
        *self.policies.write().unwrap_or_else(|e| e.into_inner()) = map;
    }

    /// Sets the most sessions open at once (a reload); sessions already open
    /// beyond it stay open, and new ones are refused until fewer are.
    pub fn set_capacity(&self, capacity: usize) {
        self.capacity
            .store(capacity, std::sync::atomic::Ordering::Relaxed);
    }

    fn policies_now(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Policy>>> {
        self.policies.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn open_sessions(&self) -> usize {
        self.map().len()
    }

    /// Opens session `id` in `environment` for a remote client (so the idle
    /// timeout applies), or returns the open one (`false`), marking it used.
    pub async fn open(
        &self,
        id: &str,
        environment: &str,
    ) -> Result<(Arc<Session>, bool), RegistryError> {
        let origin = Origin {
            connector: Connector::HandsV1,
            session: id.to_string(),
        };
        self.open_owned(id, environment, Vec::new(), Owner::Client, None, origin)
            .await
    }

    /// Opens a session for a connector of the worker, which closes it itself
    /// (never for idleness), serving `origin`, with extra workspace
    /// directories, in the workspace kept under `kept` (see
    /// [`SessionOptions::kept`]) when one is given.
    pub async fn open_in(
        &self,
        id: &str,
        environment: &str,
        origin: Origin,
        extra_dirs: Vec<crate::workspace::ExtraDir>,
        kept: Option<String>,
    ) -> Result<(Arc<Session>, bool), RegistryError> {
        self.open_owned(id, environment, extra_dirs, Owner::Connector, kept, origin)
            .await
    }

    /// Opens as [`Registry::open_owned_counted`] does, counting a refusal in
    /// the metrics.
    async fn open_owned(
        &self,
        id: &str,
        environment: &str,
        extra_dirs: Vec<crate::workspace::ExtraDir>,
        owner: Owner,
        kept: Option<String>,
        origin: Origin,
    ) -> Result<(Arc<Session>, bool), RegistryError> {
        let r = self
            .open_owned_counted(id, environment, extra_dirs, owner, kept, origin)
            .await;
        if let (Err(e), Some(m)) = (&r, &self.metrics) {
            m.session_refused(e.reason());
        }
        r
    }

    async fn open_owned_counted(
        &self,
        id: &str,
        environment: &str,
        extra_dirs: Vec<crate::workspace::ExtraDir>,
        owner: Owner,
        kept: Option<String>,
        origin: Origin,
    ) -> Result<(Arc<Session>, bool), RegistryError> {
        if !valid_id(id) {
            return Err(RegistryError::InvalidId(id.to_string()));
        }
        let policy = self
            .policies_now()
            .get(environment)
            .cloned()
            .ok_or_else(|| RegistryError::UnknownEnvironment(environment.to_string()))?;
        let _opening = self.opening.lock().await;
        {
            let map = self.map();
            if let Some(e) = map.get(id) {
                if e.environment != environment {
                    return Err(RegistryError::EnvironmentMismatch {
                        id: id.to_string(),
                        existing: e.environment.clone(),
                        requested: environment.to_string(),
                    });
                }
                e.session.activity().touch();
                return Ok((e.session.clone(), false));
            }
            let capacity = self.capacity();
            if map.len() >= capacity {
                return Err(RegistryError::AtCapacity(capacity));
            }
        }
        let connector = origin.connector;
        let started = std::time::Instant::now();
        let session = Session::open(
            &self.cfg,
            SessionOptions {
                policy,
                workspace: None,
                allow_root_workspace: false,
                workspace_owner: None,
                extra_dirs,
                journal: Some(self.journals.clone()),
                kept,
                connector: origin.connector,
                origin: Some(origin),
                audit: Some(self.audit.clone()),
                metrics: self.metrics.clone(),
            },
        )
        .await?;
        let counted = self
            .metrics
            .as_ref()
            .map(|m| m.session_opened(environment, connector, started.elapsed()));
        self.forget_idle_closed(id);
        self.map().insert(
            id.to_string(),
            Entry {
                environment: environment.to_string(),
                session: session.clone(),
                owner,
                opened_at: SystemTime::now(),
                _counted: counted,
            },
        );
        Ok((session, true))
    }

    /// The open session `id`, marked used (under the registry's lock, so the
    /// idle sweep never closes a session a request has just found).
    pub fn get(&self, id: &str) -> Result<Arc<Session>, RegistryError> {
        self.map()
            .get(id)
            .map(|e| {
                e.session.activity().touch();
                e.session.clone()
            })
            .ok_or_else(|| self.not_found(id))
    }

    /// Why `id` is not open: closed for idleness (if still remembered), or
    /// not found.
    fn not_found(&self, id: &str) -> RegistryError {
        let memory = self.idle_closed.lock().unwrap_or_else(|p| p.into_inner());
        match memory.iter().rev().find(|(i, _)| i == id) {
            Some((_, idle_secs)) => RegistryError::ClosedIdle {
                id: id.to_string(),
                idle_secs: *idle_secs,
                timeout_secs: self.idle_timeout.map_or(0, |t| t.as_secs()),
            },
            None => RegistryError::SessionNotFound(id.to_string()),
        }
    }

    fn remember_idle_closed(&self, closed: &[IdleClosed]) {
        if closed.is_empty() {
            return;
        }
        let mut memory = self.idle_closed.lock().unwrap_or_else(|p| p.into_inner());
        for c in closed {
            memory.retain(|(i, _)| *i != c.id);
            if memory.len() >= IDLE_CLOSED_MEMORY {
                memory.pop_front();
            }
            memory.push_back((c.id.clone(), c.idle.as_secs()));
        }
    }

    fn forget_idle_closed(&self, id: &str) {
        self.idle_closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(i, _)| i != id);
    }

    fn idle_timeout_of(&self, owner: Owner) -> Option<Duration> {
        match owner {
            Owner::Client => self.idle_timeout,
            Owner::Connector => None,
        }
    }

    /// Every open session, oldest first.
    pub fn list(&self) -> Vec<SessionView> {
        let mut v: Vec<SessionView> = self
            .map()
            .iter()
            .map(|(id, e)| SessionView {
                id: id.clone(),
                environment: e.environment.clone(),
                owner: e.owner,
                opened_at: e.opened_at,
                activity: e.session.activity().snapshot(),
                idle_timeout: self.idle_timeout_of(e.owner),
            })
            .collect();
        v.sort_by(|a, b| (a.opened_at, &a.id).cmp(&(b.opened_at, &b.id)));
        v
    }

    /// Closes every client session that has been idle for the idle timeout
    /// (none when there is no timeout). Returns what it closed, and how long
    /// until the next session could reach the timeout: the earliest expiry of
    /// an idle session, or the whole timeout (a session busy now, or opened
    /// later, is idle for the timeout at the earliest that long from now).
    /// Blocks while a closed session's sandbox is released if this held the
    /// last reference to it, as [`Registry::close`] does.
    pub fn close_idle(&self) -> (Vec<IdleClosed>, Option<Duration>) {
        let Some(timeout) = self.idle_timeout else {
            return (Vec::new(), None);
        };
        let mut next = timeout;
        let mut closed = Vec::new();
        // Removed under the lock, dropped after it: a drop may block.
        let mut removed = Vec::new();
        {
            let mut map = self.map();
            let idle: Vec<String> = map
                .iter()
                .filter(|(_, e)| e.owner == Owner::Client)
                .filter_map(|(id, e)| {
                    let a = e.session.activity().snapshot();
                    if a.running == 0 && a.idle >= timeout {
                        return Some(id.clone());
                    }
                    if a.running == 0 {
                        next = next.min(timeout - a.idle);
                    }
                    None
                })
                .collect();
            for id in idle {
                let Some(e) = map.remove(&id) else {
                    continue;
                };
                let a = e.session.activity().snapshot();
                // Killed now, under the lock: no request can find it any more.
                e.session.terminate();
                closed.push(IdleClosed {
                    id,
                    environment: e.environment.clone(),
                    idle: a.idle,
                    age: a.age,
                    calls: a.calls,
                });
                removed.push(e);
            }
            // Remembered under the lock that removed them: a request that no
            // longer finds one learns why.
            self.remember_idle_closed(&closed);
        }
        drop(removed);
        (closed, Some(next.max(MIN_SWEEP_PAUSE)))
    }

    /// Closes idle client sessions as they reach the idle timeout, until
    /// `shutdown` turns true; returns at once without a timeout. Each close is
    /// logged with how long the session was idle.
    pub async fn close_idle_until(
        self: Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let Some(timeout) = self.idle_timeout else {
            return;
        };
        let mut next = timeout;
        loop {
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                () = crate::util::stopped(&mut shutdown) => return,
            }
            let reg = self.clone();
            let (closed, after) = match tokio::task::spawn_blocking(move || reg.close_idle()).await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "the idle session sweep failed");
                    (Vec::new(), Some(timeout))
                }
            };
            for c in closed {
                tracing::info!(
                    session_id = %c.id,
                    env = %c.environment,
                    idle_secs = c.idle.as_secs(),
                    age_secs = c.age.as_secs(),
                    calls = c.calls,
                    "closed an idle session (sessions.idle_timeout_secs)"
                );
            }
            next = after.unwrap_or(timeout);
        }
    }

    /// Closes every session (worker shutdown).
    pub fn close_all(&self) {
        let all: Vec<Entry> = self.map().drain().map(|(_, e)| e).collect();
        for e in all {
            e.session.terminate();
        }
    }

    /// Closes session `id`: its processes are killed now; its sandbox is released
    /// when the last call holding it returns. `false` when it was not open.
    pub fn close(&self, id: &str) -> bool {
        self.forget_idle_closed(id);
        let entry = self.map().remove(id);
        match entry {
            Some(e) => {
                e.session.terminate();
                true
            }
            None => false,
        }
    }
}

/// A new instance id: 16 random bytes in hex.
fn new_instance_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // No entropy: the clock and pid still tell two processes apart.
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        b[..8].copy_from_slice(&t.to_le_bytes());
        b[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}
