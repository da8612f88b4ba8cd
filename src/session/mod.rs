//! Sessions: a workspace plus a confined execution context (its helper, cgroup,
//! uid slot and shell), and the one entry point every connector uses to run a
//! tool call in it.
//!
//! Lifecycle: [`Session::open`] → any number of [`Session::call`] /
//! [`Session::exec`] → [`Session::close`] (or drop, which kills everything too).
//! Closing kills every process the session started, double-forked daemons
//! included: the helper is the pid namespace's init, and the cgroup is emptied
//! before it is removed.

pub mod activity;
pub mod call;
pub mod journal;
pub mod registry;
pub mod slot;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

pub use crate::sandbox::{isolation, Isolation};
pub use call::{CallSpec, Connector, Origin, SubmitError, Submitted};

/// The largest call input or result a session takes or gives (a 20 MiB PDF
/// read is ~27 MiB of base64): the bound of the channel to its sandbox.
pub const MAX_MESSAGE: usize = crate::sandbox::proto::MAX_FRAME;

use crate::audit::Auditor;
use crate::policy::{Degradation, NetworkMode, Policy};
use crate::sandbox::cgroup::{CgroupLimits, SessionCgroup};
use crate::sandbox::landlock::LandlockFeature;
use crate::sandbox::proto::{ConfinementReport, ExtraDir, NetMode, Setup};
use crate::sandbox::{HelperClient, SandboxConfig, SandboxError};
use crate::tools::bash::BashSession;
use crate::workspace::{Geometry, Workspace, WorkspaceError, Workspaces};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Slot(#[from] slot::SlotError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Cgroup(#[from] crate::sandbox::cgroup::CgroupError),
    #[error("workspace {path}: {cause}")]
    Workspace {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Workspaces(#[from] WorkspaceError),
}

/// How to open a session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub policy: Arc<Policy>,
    /// The host directory to mount at `/workspace`; `None` makes a new one (a
    /// filesystem of its own, bounded by the policy's `limits.disk`), removed at
    /// close.
    pub workspace: Option<PathBuf>,
    /// A given workspace may be owned by root (every file the agent writes is
    /// then root's on the host). Off unless the operator asks for it.
    pub allow_root_workspace: bool,
    /// A given workspace must be owned by this uid (a command run through
    /// sudo works for the user who ran it, and only in their directories).
    pub workspace_owner: Option<u32>,
    /// Workspace subdirectories created before the sandbox starts, shown
    /// elsewhere or read-only inside it (see [`ExtraDir`]).
    pub extra_dirs: Vec<ExtraDir>,
    /// The worker's journals, whose budget this session's call journal shares;
    /// `None` gives the session a journal of its own with the default limits.
    pub journal: Option<Arc<journal::JournalStore>>,
    /// Without `workspace`: keep the workspace under this key when the session
    /// ends, and open the one kept under it when there is one (a Claude Managed
    /// Agents session's id: every work item of the session finds its files).
    pub kept: Option<String>,
    /// Who the session serves (the audit log and tracing name it); `None`:
    /// `connector`, under the session's own id.
    pub origin: Option<Origin>,
    /// The face of a session without an `origin` (a command's own session).
    pub connector: Connector,
    /// Where its calls' audit records go; `None`: the process's log only.
    pub audit: Option<Arc<Auditor>>,
    /// The worker's metrics its calls and egress decisions count in; `None`:
    /// not counted (a command's own session).
    pub metrics: Option<Arc<crate::worker::metrics::WorkerMetrics>>,
}

impl SessionOptions {
    /// A session of `policy` in a workspace hands makes, with no extra
    /// directories and a journal of its own.
    pub fn new(policy: Arc<Policy>) -> SessionOptions {
        SessionOptions {
            policy,
            workspace: None,
            allow_root_workspace: false,
            workspace_owner: None,
            extra_dirs: Vec::new(),
            journal: None,
            kept: None,
            origin: None,
            connector: Connector::Local,
            audit: None,
            metrics: None,
        }
    }

    /// Serving `origin`, with audit records to `audit`.
    pub fn serving(mut self, origin: Origin, audit: Arc<Auditor>) -> SessionOptions {
        self.origin = Some(origin);
        self.audit = Some(audit);
        self
    }

    /// In the directory `workspace`, owned by root only if `allow_root` says so.
    pub fn in_dir(mut self, workspace: PathBuf, allow_root: bool) -> SessionOptions {
        self.workspace = Some(workspace);
        self.allow_root_workspace = allow_root;
        self
    }
}

/// An open session.
pub struct Session {
    id: String,
    policy: Arc<Policy>,
    workspace_path: PathBuf,
    /// Taken by close or drop, which remove it if hands made it.
    workspace: Option<Workspace>,
    workspaces: Arc<Workspaces>,
    helper: HelperClient,
    /// Taken by close or drop, which empty and remove it.
    cgroup: Option<SessionCgroup>,
    _slot: slot::Slot,
    /// One shell per session; bash calls run one at a time, like the SDK's.
    bash: Mutex<BashSession>,
    /// A stopped bash call (cancelled, or past its deadline) left its shell
    /// to be killed: whoever takes the shell next kills it first. Set before
    /// the stopped call lets go of the shell, so a call waiting for the shell
    /// (a restart sent right behind a cancel) can never run first and then
    /// have its fresh shell killed.
    bash_abort: std::sync::atomic::AtomicBool,
    env: Vec<(String, String)>,
    /// Calls by id: at-most-once execution, resumable delivery.
    journal: journal::Journal,
    /// Calls running, calls run, last use: what the registry lists and
    /// closes idle sessions by.
    activity: Arc<activity::Activity>,
    origin: Origin,
    audit: Arc<Auditor>,
    /// The worker's metrics, if it counts this session's calls.
    metrics: Option<Arc<crate::worker::metrics::WorkerMetrics>>,
    /// The session's proxies and resolver (`network.mode = "egress"`).
    egress: Option<crate::egress::proxy::SessionEgress>,
    /// The limit counters as the last call's end saw them.
    limits_seen: std::sync::Mutex<crate::sandbox::cgroup::LimitEvents>,
    closed: bool,
}

/// The landlock rights the policy accepts losing by name.
pub(crate) fn degradations(policy: &Policy) -> Vec<LandlockFeature> {
    policy
        .allow_degraded
        .iter()
        .filter_map(|d| {
            Some(match d {
                Degradation::LandlockTruncate => LandlockFeature::LandlockTruncate,
                Degradation::LandlockNet => LandlockFeature::LandlockNet,
                Degradation::LandlockIoctl => LandlockFeature::LandlockIoctl,
                Degradation::LandlockScope => LandlockFeature::LandlockScope,
                Degradation::WorkspaceDisk => return None,
            })
        })
        .collect()
}

/// The environment of every process in the sandbox: nothing of the worker's.
fn sandbox_env(policy: &Policy) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        (
            "PATH",
            "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
        ),
        ("HOME", "/tmp"),
        ("TMPDIR", "/tmp"),
        ("LANG", "C.UTF-8"),
        ("USER", "agent"),
        ("TERM", "dumb"),
        ("PS1", ""),
        ("PS2", ""),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in &policy.env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    if policy.egress.is_some() {
        env.extend(proxy_env().map(|(k, v)| (k.to_string(), v)));
    }
    env
}

/// The proxy variables of an `egress` session (a policy cannot set them):
/// every client that honours them goes through the worker's explicit proxies;
/// those that do not are captured by the barrier all the same.
pub fn proxy_env() -> impl Iterator<Item = (&'static str, String)> {
    use crate::sandbox::netfilter::{HTTP_PROXY_PORT, SOCKS_PORT};
    let http = format!("http://127.0.0.1:{HTTP_PROXY_PORT}");
    let socks = format!("socks5h://127.0.0.1:{SOCKS_PORT}");
    let none = "localhost,127.0.0.1,::1".to_string();
    [
        ("HTTP_PROXY", http.clone()),
        ("HTTPS_PROXY", http.clone()),
        ("ALL_PROXY", socks.clone()),
        ("NO_PROXY", none.clone()),
        ("http_proxy", http.clone()),
        ("https_proxy", http),
        ("all_proxy", socks),
        ("no_proxy", none),
    ]
    .into_iter()
}

fn new_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    format!(
        "s-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

impl Session {
    /// Opens a session:
    /// 1. take a slot (uid, cgroup name) and clean any group a dead worker left;
    /// 2. resolve the given workspace, or make a new one (see [`crate::workspace`]);
    /// 3. create the cgroup with the policy's limits;
    /// 4. start the helper in it, which confines itself and reports `Ready`.
    pub async fn open(
        cfg: &SandboxConfig,
        opts: SessionOptions,
    ) -> Result<Arc<Session>, SessionError> {
        let id = new_id();
        let started = std::time::Instant::now();
        let slot = slot::acquire(&cfg.state_dir, cfg.slots)?;
        let cg_name = format!("s{}", slot.n);
        let stale = cfg.cgroups.open(&cg_name);
        if !stale.procs().is_empty() || cfg.cgroups.existing().contains(&cg_name) {
            let _ = stale.kill_all(Duration::from_secs(5));
            let _ = stale.delete();
        }

        let policy = opts.policy;
        let limits = &policy.limits;
        let workspaces = cfg.workspaces.clone();
        let workspace = match opts.workspace {
            Some(p) => workspaces.given(&p, opts.allow_root_workspace, opts.workspace_owner)?,
            None => {
                let geometry = Geometry {
                    bytes: limits.disk_bytes,
                    inodes: limits.disk_inodes,
                };
                let degraded = policy.allow_degraded.contains(&Degradation::WorkspaceDisk);
                let w = workspaces.clone();
                let kept = opts.kept.clone();
                tokio::task::spawn_blocking(move || match kept {
                    Some(key) => w.open_kept(&key, geometry, degraded),
                    None => w.create(geometry, degraded),
                })
                .await
                .map_err(|e| SandboxError::HelperDied(format!(": workspace task: {e}")))??
            }
        };
        let workspace_path = workspace.path().to_path_buf();
        let workspace_ready = started.elapsed();
        let cleanup_workspace = |ws: Workspace| {
            if let Err(e) = workspaces.remove(ws) {
                tracing::warn!("removing the workspace of a session that did not open: {e}");
            }
        };
        for d in &opts.extra_dirs {
            let bad = |e: String| SessionError::Workspace {
                path: d.rel.clone(),
                cause: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            };
            if let Err(e) = d.validate() {
                cleanup_workspace(workspace);
                return Err(bad(e));
            }
            let p = workspace_path.join(&d.rel);
            if let Err(cause) = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&p)
            {
                cleanup_workspace(workspace);
                return Err(SessionError::Workspace { path: p, cause });
            }
        }
        let root_dir = cfg.state_dir.join("root");
        if let Err(cause) = std::fs::create_dir_all(&root_dir) {
            cleanup_workspace(workspace);
            return Err(SessionError::Workspace {
                path: root_dir,
                cause,
            });
        }

        let cgroup = match cfg.cgroups.create(
            &cg_name,
            CgroupLimits {
                memory_bytes: limits.memory_bytes,
                pids: limits.pids,
                cpu: limits.cpu,
            },
        ) {
            Ok(cg) => cg,
            Err(e) => {
                cleanup_workspace(workspace);
                return Err(e.into());
            }
        };
        let uid = cfg.uid_base + slot.n;
        let (workspace_uid, workspace_gid) = workspace.owner();
        let setup = Setup {
            session_id: id.clone(),
            root_dir,
            workspace: workspace_path.clone(),
            workspace_uid,
            workspace_gid,
            uid,
            gid: uid,
            read_only: policy.filesystem.read_only.clone(),
            tmp_size: policy.filesystem.tmp_size,
            net: match policy.network.mode {
                NetworkMode::None => NetMode::None,
                NetworkMode::Loopback => NetMode::Loopback,
                NetworkMode::Egress => NetMode::Egress,
            },
            allow_degraded: degradations(&policy),
            landlock_covered: policy.landlock == crate::policy::LandlockMode::Covered,
            max_file_bytes: limits.file_bytes,
            output_limit: limits.output_bytes,
            extra_dirs: opts.extra_dirs.clone(),
            weakened_setid_guard: cfg.weakened.setid_guard,
            weakened_inet_guard: cfg.weakened.inet_guard,
        };
        let cgroup_ready = started.elapsed();
        let helper = match HelperClient::start(cfg, &setup, workspace.dir(), &cgroup).await {
            Ok(h) => h,
            Err(e) => {
                let _ = cgroup.kill_all(Duration::from_secs(5));
                let _ = cgroup.delete();
                cleanup_workspace(workspace);
                return Err(e.into());
            }
        };
        tracing::debug!(
            session_id = %id,
            env = %policy.name,
            uid,
            slot = slot.n,
            workspace = %workspace.mechanism(),
            workspace_ms = workspace_ready.as_secs_f64() * 1e3,
            cgroup_ms = cgroup_ready.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "session open"
        );
        let env = sandbox_env(&policy);
        let origin = opts.origin.unwrap_or_else(|| Origin {
            connector: opts.connector,
            session: id.clone(),
        });
        let audit = opts
            .audit
            .unwrap_or_else(|| Auditor::log_only(crate::util::hostname()));
        // The egress layer serves the listeners the barrier made in the
        // session's namespace; a session whose egress cannot start is not opened.
        let egress = match (&policy.egress, helper.take_egress_listeners()) {
            (Some(rules), Some(listeners)) => {
                let mut ctx = crate::egress::proxy::Context::new(
                    origin.session.clone(),
                    id.clone(),
                    policy.name.clone(),
                    Arc::new(crate::egress::proxy::PolicyGate::new(rules.clone())),
                    audit.clone(),
                );
                ctx.resolvers = rules.resolvers.clone();
                ctx.metrics = opts.metrics.clone();
                match crate::egress::proxy::SessionEgress::start(listeners, ctx) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        helper.shutdown().await;
                        let _ = cgroup.kill_all(Duration::from_secs(5));
                        let _ = cgroup.delete();
                        cleanup_workspace(workspace);
                        return Err(SandboxError::HelperDied(format!(
                            ": serving the egress listeners: {e}"
                        ))
                        .into());
                    }
                }
            }
            _ => None,
        };
        Ok(Arc::new(Session {
            id,
            policy,
            workspace_path,
            workspace: Some(workspace),
            workspaces,
            helper,
            cgroup: Some(cgroup),
            _slot: slot,
            bash: Mutex::new(BashSession::default()),
            bash_abort: std::sync::atomic::AtomicBool::new(false),
            env,
            journal: match &opts.journal {
                Some(store) => store.journal(),
                None => journal::Journal::standalone(journal::Limits::default()),
            },
            activity: Arc::new(activity::Activity::new()),
            origin,
            limits_seen: Default::default(),
            audit,
            metrics: opts.metrics,
            egress,
            closed: false,
        }))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Host path of the workspace.
    pub fn workspace(&self) -> &Path {
        &self.workspace_path
    }

    /// The workspaces this session's came from (a short-lived process drains
    /// their background removals before it exits).
    pub fn workspaces(&self) -> Arc<Workspaces> {
        self.workspaces.clone()
    }

    /// What the helper enforced.
    pub fn confinement(&self) -> &ConfinementReport {
        self.helper.report()
    }

    /// The session's cgroup (for metrics and tests).
    pub fn cgroup(&self) -> Option<&SessionCgroup> {
        self.cgroup.as_ref()
    }

    /// Host pid of the session's helper.
    pub fn helper_pid(&self) -> i32 {
        self.helper.pid()
    }

    /// The destinations the session's egress denied during its last `bash`
    /// or `exec` call (empty outside `network.mode = "egress"`).
    pub fn egress_denied(&self) -> Vec<String> {
        self.egress
            .as_ref()
            .map(|e| e.context().last_denied())
            .unwrap_or_default()
    }

    /// The worker's metrics this session counts in, if any.
    pub fn metrics(&self) -> Option<&Arc<crate::worker::metrics::WorkerMetrics>> {
        self.metrics.as_ref()
    }

    /// The session's call journal.
    pub fn journal(&self) -> &journal::Journal {
        &self.journal
    }

    /// How busy the session is (every call through [`Session::submit`],
    /// whichever face made it, counts).
    pub fn activity(&self) -> &Arc<activity::Activity> {
        &self.activity
    }

    /// The limits set above the session's group (none when it has no cgroup
    /// any more).
    pub fn outer_limits(&self) -> crate::sandbox::cgroup::OuterLimits {
        self.cgroup
            .as_ref()
            .map(SessionCgroup::outer_limits)
            .unwrap_or_default()
    }

    /// The session's limit counters (zero when it has no cgroup any more).
    pub fn limit_events(&self) -> crate::sandbox::cgroup::LimitEvents {
        self.cgroup
            .as_ref()
            .map(SessionCgroup::limit_events)
            .unwrap_or_default()
    }

    /// Kills every process of the session but its helper, and waits until
    /// they are gone; the session stays open (its files can still be read).
    pub async fn kill_processes(&self) -> bool {
        self.helper.kill_all().await.unwrap_or(false)
    }

    /// Kills every process of the session now, from a shared reference; the
    /// sandbox is released when the session is dropped.
    pub fn terminate(&self) {
        self.helper.kill_now();
    }

    /// Closes the session: kills the helper (and so every process of the
    /// session), empties and removes the cgroup, removes a workspace it made.
    /// While a call's task still holds the session, its processes are killed
    /// now and the rest is released when that task lets go (as on drop).
    pub async fn close(self: Arc<Self>) -> Result<(), SessionError> {
        let mut this = match Arc::try_unwrap(self) {
            Ok(s) => s,
            Err(shared) => {
                shared.terminate();
                return Ok(());
            }
        };
        this.close_owned().await
    }

    async fn close_owned(&mut self) -> Result<(), SessionError> {
        self.closed = true;
        self.helper.shutdown().await;
        let cg = self.cgroup.take();
        let ws = self.workspace.take();
        let workspaces = self.workspaces.clone();
        tokio::task::spawn_blocking(move || cleanup(cg, ws, &workspaces))
            .await
            .map_err(|e| SandboxError::HelperDied(format!(": cleanup task: {e}")))??;
        Ok(())
    }
}

/// What the session's limits did between two readings of its counters, in
/// words for the model and the operator: processes killed for want of memory,
/// forks refused at a pids limit. Each names the limit that was met: the
/// session's own, or one set above the worker (its unit's or pod's, shared by
/// all its sessions), or both where the kernel cannot tell which.
pub fn limit_notes(
    before: crate::sandbox::cgroup::LimitEvents,
    after: crate::sandbox::cgroup::LimitEvents,
    limits: &crate::policy::Limits,
    outer: impl FnOnce() -> crate::sandbox::cgroup::OuterLimits,
) -> Vec<String> {
    use crate::policy::units::format_size;
    let mut notes = Vec::new();
    let killed = after.oom_kills > before.oom_kills;
    let refused = after.pids_refused > before.pids_refused;
    if !killed && !refused {
        return notes;
    }
    let outer = outer();
    let own_memory = format_size(limits.memory_bytes);
    if killed {
        // A first reading has nothing before it: the kernel's counter started
        // at zero.
        let own_hit = after
            .own_limit_ooms
            .map(|a| a > before.own_limit_ooms.unwrap_or(0));
        notes.push(match (own_hit, outer.memory_bytes) {
            (Some(true), _) | (None, None) => {
                format!("killed: the session's memory limit ({own_memory}) was reached")
            }
            (Some(false), Some(o)) => format!(
                "killed: the worker's memory limit ({}, shared by all its sessions) was reached; \
                 the session's own ({own_memory}) was not",
                format_size(o)
            ),
            (Some(false), None) => format!(
                "killed: the host ran out of memory; the session's limit ({own_memory}) was not reached"
            ),
            (None, Some(o)) => format!(
                "killed: the session's memory limit ({own_memory}) or the worker's ({}, shared by \
                 all its sessions) was reached",
                format_size(o)
            ),
        });
    }
    if refused {
        notes.push(match outer.pids {
            None => format!(
                "processes refused: the session's pids limit ({}) was reached",
                limits.pids
            ),
            Some(o) => format!(
                "processes refused: the session's pids limit ({}) or the worker's ({o}, shared by \
                 all its sessions) was reached",
                limits.pids
            ),
        });
    }
    notes
}

/// Removes what dead workers left behind: every session group and every
/// workspace hands made whose slot no live worker holds. Returns how many were
/// removed. Workers call it at start; slots are also reclaimed one by one as
/// they are taken.
pub fn sweep_orphans(cfg: &SandboxConfig) -> usize {
    let mut swept = 0;
    let slot_of = |name: &str| name.strip_prefix('s').and_then(|n| n.parse::<u32>().ok());
    for name in cfg.cgroups.existing() {
        let Some(n) = slot_of(&name) else {
            continue;
        };
        let Some(_slot) = slot::try_acquire(&cfg.state_dir, n) else {
            continue; // held: a live session
        };
        let cg = cfg.cgroups.open(&name);
        match cleanup(Some(cg), None, &cfg.workspaces) {
            Ok(()) => swept += 1,
            Err(e) => tracing::warn!(group = %name, "removing an orphaned session group: {e}"),
        }
    }
    swept += cfg.workspaces.sweep();
    swept
}

fn cleanup(
    cg: Option<SessionCgroup>,
    workspace: Option<Workspace>,
    workspaces: &Workspaces,
) -> Result<(), SessionError> {
    let mut result = Ok(());
    if let Some(cg) = cg {
        result = cg
            .kill_all(Duration::from_secs(10))
            .and_then(|()| cg.delete())
            .map_err(SessionError::from);
    }
    // Removed even when the cgroup was not: the helper, and so every process
    // that could use it, is dead already.
    if let Some(ws) = workspace {
        workspaces.remove(ws)?;
    }
    result
}

impl Drop for Session {
    /// Not closed: kill everything and clean up now. This blocks for the few
    /// milliseconds the kernel takes to tear the session down; done on a thread
    /// instead, it would be lost when the process exits right after the drop.
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        self.helper.kill_now();
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.helper.pid()), None);
        let ws = self.workspace.take();
        if let Err(e) = cleanup(self.cgroup.take(), ws, &self.workspaces) {
            tracing::warn!(session_id = %self.id, "cleanup after drop: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::cgroup::{LimitEvents, OuterLimits};

    fn notes(before: LimitEvents, after: LimitEvents, outer: OuterLimits) -> Vec<String> {
        let limits = crate::policy::PolicySet::builtin()
            .get("default")
            .expect("default policy")
            .limits
            .clone();
        limit_notes(before, after, &limits, || outer)
    }

    const V2: LimitEvents = LimitEvents {
        oom_kills: 0,
        own_limit_ooms: Some(0),
        pids_refused: 0,
    };
    const V1: LimitEvents = LimitEvents {
        own_limit_ooms: None,
        ..V2
    };
    const POD: OuterLimits = OuterLimits {
        memory_bytes: Some(512 << 20),
        pids: Some(200),
    };

    #[test]
    fn nothing_happened_reads_no_outer_limit() {
        let limits = crate::policy::PolicySet::builtin()
            .get("default")
            .unwrap()
            .limits
            .clone();
        let notes = limit_notes(V2, V2, &limits, || panic!("read the outer limits"));
        assert!(notes.is_empty());
    }

    #[test]
    fn a_kill_at_the_sessions_own_limit_names_it() {
        let after = LimitEvents {
            oom_kills: 1,
            own_limit_ooms: Some(1),
            ..V2
        };
        assert_eq!(
            notes(V2, after, POD),
            ["killed: the session's memory limit (1 GiB) was reached"]
        );
        let after = LimitEvents { oom_kills: 1, ..V1 };
        assert_eq!(
            notes(V1, after, OuterLimits::default()),
            ["killed: the session's memory limit (1 GiB) was reached"]
        );
    }

    #[test]
    fn a_kill_forced_from_above_names_the_workers_limit_or_the_host() {
        let after = LimitEvents { oom_kills: 2, ..V2 };
        assert_eq!(
            notes(V2, after, POD),
            [
                "killed: the worker's memory limit (512 MiB, shared by all its sessions) was \
              reached; the session's own (1 GiB) was not"
            ]
        );
        assert_eq!(
            notes(V2, after, OuterLimits::default()),
            ["killed: the host ran out of memory; the session's limit (1 GiB) was not reached"]
        );
        // A session's first call compares with no reading at all (the worker
        // keeps the last one it saw, empty at first): still cgroup v2.
        assert_eq!(
            notes(LimitEvents::default(), after, POD),
            [
                "killed: the worker's memory limit (512 MiB, shared by all its sessions) was \
              reached; the session's own (1 GiB) was not"
            ]
        );
        let own = LimitEvents {
            oom_kills: 1,
            own_limit_ooms: Some(1),
            ..V2
        };
        assert_eq!(
            notes(LimitEvents::default(), own, POD),
            ["killed: the session's memory limit (1 GiB) was reached"]
        );
        // v1 cannot tell: both are named.
        let after = LimitEvents { oom_kills: 1, ..V1 };
        assert_eq!(
            notes(V1, after, POD),
            [
                "killed: the session's memory limit (1 GiB) or the worker's (512 MiB, shared by \
              all its sessions) was reached"
            ]
        );
    }

    #[test]
    fn refused_forks_name_every_pids_limit_that_could_have_refused_them() {
        let after = LimitEvents {
            pids_refused: 3,
            ..V2
        };
        assert_eq!(
            notes(V2, after, OuterLimits::default()),
            ["processes refused: the session's pids limit (512) was reached"]
        );
        assert_eq!(
            notes(V2, after, POD),
            [
                "processes refused: the session's pids limit (512) or the worker's (200, shared \
              by all its sessions) was reached"
            ]
        );
    }
}
