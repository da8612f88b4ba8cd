//! `hands mcp --env NAME [--workspace DIR]`: an MCP server on stdin and stdout
//! for an agent that speaks the Model Context Protocol (Claude Code, Claude
//! Desktop, the Agent SDKs): the six tools, every call confined in one session
//! that lives as long as the connection.
//!
//! The session is opened before the first message is read, so a bad
//! environment or workspace fails at once with the reason on stderr (which MCP
//! clients keep in their server log) and exit status 2. The server ends when the
//! client closes stdin, or on SIGTERM or SIGINT; the session is then closed: its
//! processes killed, its workspace removed unless `--workspace` gave one.
//! Stdout carries the protocol only; logs go to stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::connectors::mcp::McpFace;
use crate::policy::lookup::Lookup;

#[derive(clap::Args)]
pub struct Args {
    /// Environment (policy) the session runs in.
    #[arg(long, default_value = "default")]
    env: String,
    /// Host directory mounted at /workspace, resolved without following symlinks
    /// (for an agent working on a project: `--workspace "$PWD"`). Default: a new
    /// one, a filesystem of its own bounded by the policy's limits.disk, removed
    /// when the connection ends.
    #[arg(long)]
    workspace: Option<PathBuf>,
    /// Accept a --workspace owned by root: every file the agent writes there
    /// will belong to root on the host.
    #[arg(long)]
    allow_root_workspace: bool,
}

/// Who `hands mcp` works for when sudo started it: the invoking user
/// (`SUDO_UID`), whose rule in sudoers may let them start it but must not let
/// them reach more than their own files. Under sudo a given workspace must be
/// theirs, `--allow-root-workspace` is refused, and only the operator's
/// policies (`/etc/hands/policies` and the built-in ones) are looked up.
fn sudo_user(args: &Args, lookup: &Lookup) -> anyhow::Result<Option<u32>> {
    let Some(uid) = std::env::var("SUDO_UID").ok() else {
        return Ok(None);
    };
    let uid: u32 = uid
        .parse()
        .with_context(|| format!("SUDO_UID={uid:?} is not a uid"))?;
    if uid == 0 {
        return Ok(None);
    }
    // sudo clears the environment by default; a rule that keeps it must not
    // let the user choose hands' own paths or programs (the helper it runs as
    // root, where it writes the audit log).
    let harmless = ["HANDS_LOG", "HANDS_LOG_FORMAT", "HANDS_DELEGATED_SCOPE"];
    if let Some((name, _)) = std::env::vars_os().find(|(k, _)| {
        k.to_str()
            .is_some_and(|k| k.starts_with("HANDS_") && !harmless.contains(&k))
    }) {
        anyhow::bail!(
            "through sudo, hands mcp works for uid {uid} only: {} must not be set (only HANDS_LOG \
             and HANDS_LOG_FORMAT may be)",
            name.to_string_lossy()
        );
    }
    anyhow::ensure!(
        !args.allow_root_workspace,
        "through sudo, hands mcp works for uid {uid} only: --allow-root-workspace is refused"
    );
    let own = lookup
        .dirs()
        .iter()
        .find(|d| d.origin != crate::policy::lookup::Origin::System);
    if let Some(dir) = own {
        anyhow::bail!(
            "through sudo, hands mcp works for uid {uid} only: only the operator's policies are \
             used, not {} ({})",
            dir.path.display(),
            dir.origin
        );
    }
    Ok(Some(uid))
}

pub fn run(args: Args, lookup: &Lookup) -> anyhow::Result<ExitCode> {
    super::require_root("hands mcp")?;
    let owner = sudo_user(&args, lookup)?;
    let rt = super::runtime()?;
    let result = rt.block_on(async {
        let session = super::open_session_for(
            &args.env,
            lookup,
            args.workspace,
            args.allow_root_workspace,
            owner,
            crate::session::Connector::Mcp,
        )
        .await?;
        let sandbox = crate::connectors::mcp::LocalSandbox::new(session.clone(), None);
        let face = McpFace::new(Arc::new(sandbox), &args.env);
        let served = serve(face).await;
        let workspaces = session.workspaces();
        session.close().await.context("closing the session")?;
        workspaces.drain(super::DRAIN);
        super::release_cgroups();
        served?;
        Ok(ExitCode::SUCCESS)
    });
    // Reading stdin blocks a thread that a signal cannot wake: do not wait
    // for it.
    rt.shutdown_background();
    result
}

/// Serves MCP on stdin and stdout until the client hangs up or a stop signal
/// comes.
async fn serve(face: McpFace) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let starting =
        crate::connectors::mcp::serve_lines(face, tokio::io::stdin(), tokio::io::stdout());
    let running = tokio::select! {
        r = starting => match r {
            Ok(running) => running,
            // The client went away (or never spoke MCP) before initializing.
            Err(e) => {
                tracing::warn!("mcp: the client did not initialize: {e}");
                return Ok(());
            }
        },
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };
    let stop = running.cancellation_token();
    tokio::select! {
        r = running.waiting() => {
            r.context("the MCP service")?;
        }
        _ = term.recv() => stop.cancel(),
        _ = int.recv() => stop.cancel(),
    }
    Ok(())
}
