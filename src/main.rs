//! The `hands` binary: command-line parsing and dispatch only.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hands",
    version,
    about = "The self-hosted hands of an AI agent: every tool call confined"
)]
struct Cli {
    /// Directory of environment policies (<name>.toml); repeatable. Searched
    /// first, then $HANDS_POLICY_DIR, a worker configuration's policy_dirs,
    /// /etc/hands/policies, and the built-in policies; the first file of a name
    /// wins. `hands policy list` shows the result.
    #[arg(long, global = true, value_name = "DIR")]
    policy_dir: Vec<PathBuf>,
    /// How log lines are written: `text` (under systemd, to the journal with
    /// each record's fields) or `json` (one object per line on stderr).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "HANDS_LOG_FORMAT",
        value_name = "FORMAT"
    )]
    log_format: hands::cli::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a gateway and a worker on loopback with a temporary PKI and run a
    /// scripted session through the HTTP API: every tool, an escape, a timeout.
    Demo(hands::cli::demo::Args),
    /// The daemon: serve sessions to brains through its outbound tunnel (and
    /// an optional loopback debug listener).
    Worker(hands::cli::worker::Args),
    /// The reference gateway: accepts worker tunnels (mTLS), serves the HTTP
    /// API agent loops call.
    Gateway(hands::cli::gateway::Args),
    /// Run a command in a fresh session of an environment, stream its output,
    /// exit with its status.
    Exec(hands::cli::exec::Args),
    /// Run one tool call in a fresh session and print the result as JSON.
    Tool(hands::cli::tool::Args),
    /// Serve the six tools to an MCP client on stdin and stdout, every call
    /// confined in one session that lives as long as the connection.
    Mcp(hands::cli::mcp::Args),
    /// Show the kernel features hands relies on and what it does about each.
    Doctor(hands::cli::doctor::Args),
    /// Measure sandboxed calls against baselines in one run (ratios).
    Bench(hands::cli::bench::Args),
    /// Run the named protocol conformance cases against a worker (gRPC) or a
    /// gateway (HTTP API).
    Conformance(hands::cli::conformance::Args),
    /// Environment policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Development certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check an audit log's hash chain (files oldest first: audit.jsonl.2
    /// audit.jsonl.1 audit.jsonl); exits 0 when it holds, 1 at the first
    /// edited, deleted, inserted or reordered record, 2 when unreadable.
    Verify(hands::cli::audit::VerifyArgs),
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a development CA and gateway/worker certificates in DIR.
    Init(hands::cli::pki::InitArgs),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files; exits non-zero if any is invalid.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show every environment the lookup finds (with --config: the ones that
    /// worker would offer) and the file each comes from.
    List(hands::cli::policy::ListArgs),
    /// Print the policy file of an environment as the lookup finds it (a
    /// starting point for a policy of your own).
    Show(hands::cli::policy::ShowArgs),
}

fn main() -> ExitCode {
    // The session helper stage is selected before any parsing: it must start
    // fast and must not depend on argv beyond this marker.
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new(hands::sandbox::helper::ARG)) {
        hands::sandbox::helper::main();
    }
    if std::env::args_os().nth(1).as_deref()
        == Some(OsStr::new(hands::cli::bench_tunnel::FLOOR_ARG))
    {
        return hands::cli::bench_tunnel::floor_main();
    }
    let cli = Cli::parse();
    // The daemons mirror every audit record to their log (journald under
    // systemd) by default; one-shot commands keep stderr for their output.
    hands::cli::init_logging(matches!(cli.command, Command::Worker(_)), cli.log_format);
    let lookup = hands::cli::policy_lookup(&cli.policy_dir);
    if matches!(
        cli.command,
        Command::Demo(_)
            | Command::Worker(_)
            | Command::Exec(_)
            | Command::Tool(_)
            | Command::Mcp(_)
            | Command::Doctor(_)
            | Command::Bench(_)
    ) {
        hands::cli::enter_delegated_scope();
    }
    let result = match cli.command {
        Command::Demo(args) => hands::cli::demo::run(args, &lookup),
        Command::Conformance(args) => hands::cli::conformance::run(args),
        Command::Worker(args) => hands::cli::worker::run(args, &lookup),
        Command::Gateway(args) => hands::cli::gateway::run(args),
        Command::Exec(args) => hands::cli::exec::run(args, &lookup),
        Command::Tool(args) => hands::cli::tool::run(args, &lookup),
        Command::Mcp(args) => hands::cli::mcp::run(args, &lookup),
        Command::Doctor(args) => hands::cli::doctor::run(args, &lookup),
        Command::Bench(args) => hands::cli::bench::run(args, &lookup),
        Command::Pki(PkiCommand::Init(args)) => hands::cli::pki::init(args),
        Command::Audit(AuditCommand::Verify(args)) => hands::cli::audit::verify_cmd(args),
        Command::Policy(PolicyCommand::Check { files }) => {
            hands::cli::policy::check(&files).map(|()| ExitCode::SUCCESS)
        }
        Command::Policy(PolicyCommand::List(args)) => hands::cli::policy::list(args, &lookup),
        Command::Policy(PolicyCommand::Show(args)) => hands::cli::policy::show(args, &lookup),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Each cause once: a layer whose message already carries the next
            // one's (some libraries' do) is not followed by it again.
            eprintln!("hands: {}", hands::util::error_chain(e.as_ref()));
            ExitCode::from(2)
        }
    }
}
