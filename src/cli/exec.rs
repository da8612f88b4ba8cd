//! `hands exec --env NAME [--workspace DIR] -- CMD…`: run a command (no shell) in
//! a fresh session, relay its stdin, stdout and stderr, and exit with its status.
//! Output is relayed through pipes, never by handing the sandbox our terminal.
//!
//! Exit status, as a shell's: the command's own; 124 when it timed out; 127
//! when there is no such command in the sandbox, 126 when it cannot be
//! executed; 2 when the session could not be made. A command killed at the
//! session's memory limit, or refused forks at its pids limit, is told on
//! stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::policy::lookup::Lookup;
use crate::sandbox::SandboxError;
use crate::session::SessionError;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;

#[derive(clap::Args)]
pub struct Args {
    /// Environment (policy) to run in.
    #[arg(long, default_value = "default")]
    env: String,
    /// Host directory mounted at /workspace, resolved without following symlinks
    /// (default: a new one, a filesystem of its own bounded by the policy's
    /// limits.disk, removed at the end).
    #[arg(long)]
    workspace: Option<PathBuf>,
    /// Accept a --workspace owned by root: every file the command writes there
    /// will belong to root on the host.
    #[arg(long)]
    allow_root_workspace: bool,
    /// Kill the command and everything it started after this many seconds
    /// (exit status 124). Default: the environment's call timeout.
    #[arg(long)]
    timeout: Option<f64>,
    /// The call's id in the audit log (default: `exec-<pid>`).
    #[arg(long)]
    call_id: Option<String>,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

fn pipe_pair() -> anyhow::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")
}

/// The shell's exit status and words for a command that could not start:
/// 127 when there is no such program, 126 when it cannot be executed.
fn not_started(program: &str, errno: Option<i32>, message: &str) -> Option<(i32, String)> {
    match errno? {
        libc::ENOENT if !program.contains('/') => Some((
            127,
            format!("{program}: command not found in the sandbox (not on its PATH)"),
        )),
        libc::ENOENT => Some((127, format!("{program}: no such file in the sandbox"))),
        libc::EACCES | libc::ENOEXEC | libc::EISDIR | libc::EPERM => {
            Some((126, format!("{program}: cannot execute: {message}")))
        }
        _ => None,
    }
}

pub fn run(mut args: Args, lookup: &Lookup) -> anyhow::Result<ExitCode> {
    super::require_root("hands exec")?;
    let call_id = super::call_id(args.call_id.take(), "exec")?;
    let rt = super::runtime()?;
    let code = rt.block_on(async {
        let session = super::open_session(
            &args.env,
            lookup,
            args.workspace,
            args.allow_root_workspace,
            crate::session::Connector::Exec,
        )
        .await?;
        let before = session.limit_events();
        let timeout = match args.timeout {
            Some(s) if s > 0.0 => Duration::from_secs_f64(s),
            _ => session.policy().limits.call_timeout,
        };
        let (in_r, in_w) = pipe_pair()?;
        let (out_r, out_w) = pipe_pair()?;
        let (err_r, err_w) = pipe_pair()?;
        let run = session.exec(
            &call_id,
            args.command.clone(),
            [in_r, out_w, err_w],
            Some(timeout),
        );
        let mut out = pipe::Receiver::from_owned_fd(out_r)?;
        let mut err = pipe::Receiver::from_owned_fd(err_r)?;
        let mut stdin_w = pipe::Sender::from_owned_fd(in_w)?;
        let relay_out = async {
            let mut o = tokio::io::stdout();
            let _ = tokio::io::copy(&mut out, &mut o).await;
            let _ = o.flush().await;
        };
        let relay_err = async {
            let mut e = tokio::io::stderr();
            let _ = tokio::io::copy(&mut err, &mut e).await;
            let _ = e.flush().await;
        };
        // stdin is relayed on a detached task: a command that never reads it must
        // not keep us waiting.
        tokio::spawn(async move {
            let mut i = tokio::io::stdin();
            let _ = tokio::io::copy(&mut i, &mut stdin_w).await;
        });
        let (status, (), ()) = tokio::join!(run, relay_out, relay_err);
        let mut notes = crate::session::limit_notes(
            before,
            session.limit_events(),
            &session.policy().limits,
            || session.outer_limits(),
        );
        let env = session.policy().name.clone();
        notes.extend(
            session
                .egress_denied()
                .into_iter()
                .map(|d| format!("egress denied in environment {env}: {d}")),
        );
        let workspaces = session.workspaces();
        session.close().await.context("closing the session")?;
        workspaces.drain(super::DRAIN);
        super::release_cgroups();
        for note in notes {
            eprintln!("hands: {note}");
        }
        let status = match status {
            Ok(status) => status,
            Err(SessionError::Sandbox(SandboxError::Spawn {
                program,
                message,
                errno,
            })) => match not_started(&program, errno, &message) {
                Some((code, words)) => {
                    eprintln!("hands: {words}");
                    return Ok(code);
                }
                None => anyhow::bail!("{program}: {message}"),
            },
            Err(e) => return Err(e.into()),
        };
        Ok::<_, anyhow::Error>(match status {
            Some(code) => code,
            None => {
                eprintln!(
                    "hands: command timed out after {:?}; killed it and everything it started",
                    timeout
                );
                124
            }
        })
    })?;
    // Exit now: the stdin relay may still block on a terminal read.
    std::process::exit(code.clamp(0, 255));
}
