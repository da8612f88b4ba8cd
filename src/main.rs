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
    /// Directory of environment policies (<name>.toml); repeatable. Also
    /// $HANDS_POLICY_DIR, then /etc/hands/policies, then the built-in policies.
    #[arg(long, global = true)]
    policy_dir: Vec<PathBuf>,
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
}

fn main() -> ExitCode {
    // The session helper stage is selected before any parsing: it must start
    // fast and must not depend on argv beyond this marker.
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new(hands::sandbox::helper::ARG)) {
        hands::sandbox::helper::main();
    }
    hands::cli::init_logging();
    let cli = Cli::parse();
    let dirs = hands::cli::policy_dirs(&cli.policy_dir);
    let result = match cli.command {
        Command::Demo(args) => hands::cli::demo::run(args),
        Command::Conformance(args) => hands::cli::conformance::run(args),
        Command::Worker(args) => hands::cli::worker::run(args),
        Command::Gateway(args) => hands::cli::gateway::run(args),
        Command::Exec(args) => hands::cli::exec::run(args, &dirs),
        Command::Tool(args) => hands::cli::tool::run(args, &dirs),
        Command::Doctor(args) => hands::cli::doctor::run(args),
        Command::Bench(args) => hands::cli::bench::run(args, &dirs),
        Command::Pki(PkiCommand::Init(args)) => hands::cli::pki::init(args),
        Command::Policy(PolicyCommand::Check { files }) => {
            hands::cli::policy::check(&files).map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hands: {e:#}");
            ExitCode::from(2)
        }
    }
}
