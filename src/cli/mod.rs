//! One module per subcommand. `anyhow` lives here, at the binary's edge.

pub mod bench;
pub mod bench_tunnel;
pub mod conformance;
pub mod demo;
pub mod doctor;
pub mod exec;
pub mod gateway;
pub mod pki;
pub mod policy;
pub mod tool;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::policy::Policy;
use crate::sandbox::SandboxConfig;
use crate::session::{Session, SessionOptions};

/// Logs to stderr, filtered by `HANDS_LOG` (default `warn`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HANDS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Where policies are looked up: flags, `$HANDS_POLICY_DIR`, `/etc/hands/policies`
/// (the built-in policies come last, inside `policy::find`).
pub fn policy_dirs(flags: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs = flags.to_vec();
    if let Some(d) = std::env::var_os("HANDS_POLICY_DIR") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("/etc/hands/policies"));
    dirs
}

/// A runtime for one-shot commands: one thread, since a single caller gains
/// nothing from cross-thread wakeups (the daemon uses a multi-threaded one).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Opens a session of environment `env` on `workspace` (or a fresh one).
/// How long a command waits, before it exits, for the background removal of
/// the workspaces it made (what is left is swept by the next worker or command).
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn open_session(
    env: &str,
    dirs: &[PathBuf],
    workspace: Option<PathBuf>,
    allow_root_workspace: bool,
) -> anyhow::Result<Session> {
    let policy: Policy =
        crate::policy::find(env, dirs).with_context(|| format!("environment {env:?}"))?;
    let cfg = SandboxConfig::from_env().context("sandbox configuration")?;
    crate::session::sweep_orphans(&cfg);
    Session::open(
        &cfg,
        SessionOptions {
            policy: Arc::new(policy),
            workspace,
            allow_root_workspace,
            extra_dirs: Vec::new(),
            journal: None,
            kept: None,
        },
    )
    .await
    .with_context(|| format!("opening a session in environment {env:?}"))
}
