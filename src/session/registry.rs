//! The worker's open sessions, by the ids their clients chose: idempotent open
//! and close, the worker's session capacity, and the environments (policies) a
//! session may be opened in. Connectors (the hands.v1 service, later the Claude
//! Managed Agents loop) reach sessions only through this.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::Mutex;

use super::{Session, SessionError, SessionOptions};
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
    #[error(transparent)]
    Open(#[from] SessionError),
}

/// Whether `id` is a valid session or call id.
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

struct Entry {
    environment: String,
    session: Arc<Session>,
}

/// Open sessions of one worker.
pub struct Registry {
    cfg: SandboxConfig,
    policies: BTreeMap<String, Arc<Policy>>,
    capacity: usize,
    /// Held only briefly, never across a session open, so calls keep finding
    /// their sessions while another session is being opened.
    sessions: std::sync::Mutex<HashMap<String, Entry>>,
    /// Serialises opens: two concurrent opens of one id must create one session.
    opening: Mutex<()>,
    /// Every session's call journal, within one budget. A closed session's
    /// journal is released when the session is dropped (the registry keeps no
    /// reference to a closed session).
    journals: Arc<super::journal::JournalStore>,
}

impl Registry {
    pub fn new(
        cfg: SandboxConfig,
        policies: impl IntoIterator<Item = Policy>,
        capacity: usize,
    ) -> Registry {
        Registry {
            cfg,
            policies: policies
                .into_iter()
                .map(|p| (p.name.clone(), Arc::new(p)))
                .collect(),
            capacity,
            sessions: Default::default(),
            opening: Mutex::new(()),
            journals: super::journal::JournalStore::new(Default::default()),
        }
    }

    /// This registry with the call journal's budget set to `limits`.
    pub fn with_journal_limits(mut self, limits: super::journal::Limits) -> Registry {
        self.journals = super::journal::JournalStore::new(limits);
        self
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

    /// The environments sessions can be opened in.
    pub fn environments(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values().map(|p| p.as_ref())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn open_sessions(&self) -> usize {
        self.map().len()
    }

    /// Opens session `id` in `environment`, or returns the open one (`false`).
    pub async fn open(
        &self,
        id: &str,
        environment: &str,
    ) -> Result<(Arc<Session>, bool), RegistryError> {
        self.open_with(id, environment, Vec::new()).await
    }

    /// [`Registry::open`] with extra workspace directories for a new session.
    pub async fn open_with(
        &self,
        id: &str,
        environment: &str,
        extra_dirs: Vec<crate::sandbox::proto::ExtraDir>,
    ) -> Result<(Arc<Session>, bool), RegistryError> {
        self.open_in(id, environment, extra_dirs, None).await
    }

    /// [`Registry::open_with`], in the workspace kept under `kept` (see
    /// [`SessionOptions::kept`]) when one is given.
    pub async fn open_in(
        &self,
        id: &str,
        environment: &str,
        extra_dirs: Vec<crate::sandbox::proto::ExtraDir>,
        kept: Option<String>,
    ) -> Result<(Arc<Session>, bool), RegistryError> {
        if !valid_id(id) {
            return Err(RegistryError::InvalidId(id.to_string()));
        }
        let policy = self
            .policies
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
                return Ok((e.session.clone(), false));
            }
            if map.len() >= self.capacity {
                return Err(RegistryError::AtCapacity(self.capacity));
            }
        }
        let session = Arc::new(
            Session::open(
                &self.cfg,
                SessionOptions {
                    policy,
                    workspace: None,
                    allow_root_workspace: false,
                    extra_dirs,
                    journal: Some(self.journals.clone()),
                    kept,
                },
            )
            .await?,
        );
        self.map().insert(
            id.to_string(),
            Entry {
                environment: environment.to_string(),
                session: session.clone(),
            },
        );
        Ok((session, true))
    }

    /// The open session `id`.
    pub fn get(&self, id: &str) -> Result<Arc<Session>, RegistryError> {
        self.map()
            .get(id)
            .map(|e| e.session.clone())
            .ok_or_else(|| RegistryError::SessionNotFound(id.to_string()))
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
