//! One module per subcommand. `anyhow` lives here, at the binary's edge.

pub mod audit;
pub mod bench;
pub mod bench_egress;
pub mod bench_mcp;
pub mod bench_tunnel;
pub mod conformance;
pub mod demo;
pub mod doctor;
pub mod exec;
pub mod gateway;
pub mod mcp;
pub mod pki;
pub mod policy;
pub mod tool;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::policy::lookup::Lookup;
use crate::policy::Policy;
use crate::sandbox::SandboxConfig;
use crate::session::{Session, SessionOptions};

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines on stderr; under systemd, records sent to the
    /// journal with their fields (`journalctl -o verbose` shows them).
    #[default]
    Text,
    /// One JSON object per line on stderr (time, level, target, message and
    /// every field), for log shippers.
    Json,
}

/// Logs to stderr, filtered by `HANDS_LOG` (default `warn`; for a daemon,
/// `warn,hands::audit=info`: the audit records are mirrored to its log). In
/// the text format, a process whose stderr is the journal (systemd sets
/// `$JOURNAL_STREAM` to its device and inode) logs to the journal's own
/// socket instead, so each field of a record (`session`, `call_id`, …) is a
/// journal field and its level the entry's priority.
pub fn init_logging(daemon: bool, format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let default = if daemon {
        "warn,hands::audit=info,hands::worker=info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HANDS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => {
            let _ = registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_current_span(true)
                        .with_span_list(false)
                        .with_writer(std::io::stderr),
                )
                .try_init();
        }
        LogFormat::Text => {
            let journal = stderr_is_journal()
                .then(|| tracing_journald::layer().ok())
                .flatten()
                .map(|l| l.with_syslog_identifier("hands".into()));
            if let Some(journal) = journal {
                let _ = registry.with(journal).try_init();
                return;
            }
            let _ = registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
                )
                .try_init();
        }
    }
}

/// Whether stderr is the journal's stream for this process: `$JOURNAL_STREAM`
/// (`DEVICE:INODE`) names stderr's own device and inode (a child whose stderr
/// was redirected keeps the variable but not the stream).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    v.to_str() == Some(&format!("{}:{}", st.st_dev, st.st_ino))
}

/// Where every command looks environments up: `--policy-dir` flags,
/// `$HANDS_POLICY_DIR`, `/etc/hands/policies`, then the built-in policies (a
/// worker adds its configuration's `policy_dirs`; see `crate::policy::lookup`).
pub fn policy_lookup(flags: &[PathBuf]) -> Lookup {
    Lookup::from_command_line(flags)
}

/// Refuses to go on unless this process is root: sessions need namespaces,
/// cgroups, idmapped mounts and loop devices. Checked before anything is
/// created, so that an unprivileged run leaves nothing behind.
pub fn require_root(command: &str) -> anyhow::Result<()> {
    let euid = nix::unistd::geteuid();
    anyhow::ensure!(
        euid.is_root(),
        "{command} must run as root (this process runs as uid {euid}): each session is \
         built from namespaces, cgroups and idmapped mounts, then runs as an unprivileged \
         uid of its own"
    );
    Ok(())
}

/// A runtime for one-shot commands: one thread, since a single caller gains
/// nothing from cross-thread wakeups (the daemon uses a multi-threaded one).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// How long a command waits, before it exits, for the background removal of
/// the workspaces it made (what is left is swept by the next worker or command).
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Set in the environment of a hands that [`enter_delegated_scope`] started.
const IN_SCOPE_VAR: &str = "HANDS_DELEGATED_SCOPE";

/// On cgroup v2 under systemd, a command started where it cannot or may not
/// hold its sessions' groups (a login session's scope, which is not given the cpu
/// controller and is not delegated, or the root) runs itself again in a transient scope of its own
/// with `Delegate=yes` (`systemd-run --scope`, which keeps the terminal, the
/// environment and the exit status). A process of a `.service` unit, or of a
/// group systemd does not manage (a pod's container), is left as it is: moving
/// out of it would escape its limits; it fails with the cgroup error's advice. Returns only when
/// nothing is to be done (or it cannot be done).
pub fn enter_delegated_scope() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os(IN_SCOPE_VAR).is_some()
        || !std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        || !std::path::Path::new("/run/systemd/system").is_dir()
        || !nix::unistd::geteuid().is_root()
    {
        return;
    }
    if let Ok(c) = crate::sandbox::cgroup::Cgroups::detect() {
        // Usable, and ours to use: delegated, or not a systemd unit's.
        if c.undelegated_unit().is_none() {
            return;
        }
    }
    // The unit this process belongs to: its group, or the group above the
    // leaf a previous hands made (`<unit>/supervisor`).
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default()
        .trim_end();
    let own = own
        .strip_suffix(&format!("/{}", crate::sandbox::cgroup::LEAF))
        .unwrap_or(own);
    // Only from the root or a scope (a login session's, or `systemd-run
    // --scope`): a service unit's process, or one in a group systemd does not
    // manage (a Kubernetes pod's container), would escape its limits.
    if !(own.is_empty() || own == "/" || own.ends_with(".scope")) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let unit = format!("hands-{}", std::process::id());
    tracing::debug!(
        unit,
        "re-running in a transient systemd scope with Delegate=yes"
    );
    let err = std::process::Command::new("systemd-run")
        .args([
            "--scope",
            "--quiet",
            "--collect",
            "-p",
            "Delegate=yes",
            "--unit",
            &unit,
            "--",
        ])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(IN_SCOPE_VAR, "1")
        .exec();
    // Not found or not runnable: go on, and let the cgroup error explain.
    tracing::debug!(error = %err, "systemd-run");
}

/// Removes the cgroup v2 group sessions were created in when none is left in it
/// (nothing on v1): what a command created goes with it.
pub fn release_cgroups() {
    if let Ok(c) = crate::sandbox::cgroup::Cgroups::detect() {
        c.release();
    }
}

/// The call id a command's call has in the audit log: `given` (checked as
/// hands.v1 checks ids), else `<prefix>-<pid>`.
pub fn call_id(given: Option<String>, prefix: &str) -> anyhow::Result<String> {
    let id = given.unwrap_or_else(|| format!("{prefix}-{}", std::process::id()));
    anyhow::ensure!(
        crate::session::registry::valid_id(&id),
        "--call-id {id:?}: 1 to 128 characters of [A-Za-z0-9._:-]"
    );
    Ok(id)
}

/// The audit log of commands without a worker configuration:
/// `$HANDS_AUDIT_LOG`, else `audit.jsonl` in the data directory (where a
/// worker with no `[audit] file` writes too).
pub fn default_audit_file(cfg: &SandboxConfig) -> PathBuf {
    std::env::var_os("HANDS_AUDIT_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| cfg.data_dir.join(crate::audit::DEFAULT_FILE))
}

/// Opens a session of environment `env` (looked up in `lookup`) on
/// `workspace` (or a fresh one). A command that is a face of its own
/// (`connector`: `hands tool`, `hands exec`) audits its call in the audit log;
/// an in-process one (`Connector::Local`: doctor, bench) in its log only.
pub async fn open_session(
    env: &str,
    lookup: &Lookup,
    workspace: Option<PathBuf>,
    allow_root_workspace: bool,
    connector: crate::session::Connector,
) -> anyhow::Result<Arc<Session>> {
    open_session_for(
        env,
        lookup,
        workspace,
        allow_root_workspace,
        None,
        connector,
    )
    .await
}

/// [`open_session`], for the user `owner` (whose directory a given workspace
/// must be) when there is one.
pub async fn open_session_for(
    env: &str,
    lookup: &Lookup,
    workspace: Option<PathBuf>,
    allow_root_workspace: bool,
    owner: Option<u32>,
    connector: crate::session::Connector,
) -> anyhow::Result<Arc<Session>> {
    let policy: Policy = lookup.load()?.policy(env)?;
    let cfg = SandboxConfig::from_env().context("sandbox configuration")?;
    crate::session::sweep_orphans(&cfg);
    let worker = crate::util::hostname();
    let audit = match connector {
        crate::session::Connector::Local => crate::audit::Auditor::log_only(worker),
        _ => {
            let file = default_audit_file(&cfg);
            let log = crate::audit::AuditLog::open(
                &file,
                crate::audit::DEFAULT_MAX_BYTES,
                crate::audit::DEFAULT_KEEP,
            )?;
            crate::audit::Auditor::new(log, worker)
        }
    };
    let mut opts = SessionOptions::new(Arc::new(policy));
    opts.workspace = workspace;
    opts.allow_root_workspace = allow_root_workspace;
    opts.workspace_owner = owner;
    opts.audit = Some(audit);
    opts.connector = connector;
    let session = Session::open(&cfg, opts)
        .await
        .with_context(|| format!("opening a session in environment {env:?}"))?;
    Ok(session)
}
