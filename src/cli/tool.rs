//! `hands tool --env NAME [--workspace DIR] TOOL 'JSON'`: one tool call in a fresh
//! session, the result printed as JSON (`{"content": [...], "is_error": bool}`).
//! Exit status: 0 for a successful result, 1 for a result with `is_error`, 2 when
//! the call could not be made at all.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

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
    /// The call's id in the audit log (default: `tool-<pid>`).
    #[arg(long)]
    call_id: Option<String>,
    /// bash, read, write, edit, glob or grep.
    tool: String,
    /// The tool's input, as the JSON object of a `tool_use` block.
    input: String,
}

pub fn run(mut args: Args, lookup: &crate::policy::lookup::Lookup) -> anyhow::Result<ExitCode> {
    super::require_root("hands tool")?;
    let input: serde_json::Value =
        serde_json::from_str(&args.input).context("the tool input is not valid JSON")?;
    let call_id = super::call_id(args.call_id.take(), "tool")?;
    let rt = super::runtime()?;
    rt.block_on(async {
        let session = super::open_session(
            &args.env,
            lookup,
            args.workspace,
            args.allow_root_workspace,
            crate::session::Connector::Tool,
        )
        .await?;
        let result = session.call_as(&call_id, &args.tool, &input).await;
        let workspaces = session.workspaces();
        session.close().await.context("closing the session")?;
        workspaces.drain(super::DRAIN);
        super::release_cgroups();
        println!("{}", serde_json::to_string_pretty(&result)?);
        Ok(if result.is_error {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        })
    })
}
