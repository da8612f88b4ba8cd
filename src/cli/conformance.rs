//! `hands conformance`: the named protocol cases against a worker's gRPC
//! service (`--grpc ADDR`, e.g. a debug listener) or a gateway's HTTP API
//! (`--gateway URL`); or the MCP cases against an MCP endpoint over
//! streamable HTTP (`--mcp URL`). Exit 0 when every case passed or failed as expected, 1
//! otherwise (including a listed expected failure that passed).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::conformance::{self, target};

#[derive(clap::Args)]
pub struct Args {
    /// A hands.v1.Sandbox gRPC endpoint (host:port, plaintext: a debug listener).
    #[arg(long, conflicts_with_all = ["gateway", "mcp"], required_unless_present_any = ["gateway", "mcp", "list"])]
    grpc: Option<String>,
    /// A gateway's HTTP API (http://host:port).
    #[arg(long, conflicts_with = "mcp")]
    gateway: Option<String>,
    /// An MCP endpoint over streamable HTTP (http:// or https://host:port/path):
    /// a worker's [mcp] endpoint, a gateway's /v1/environments/ENV/mcp, or any
    /// other sandbox's. Runs the MCP cases.
    #[arg(long)]
    mcp: Option<String>,
    /// For an https:// --mcp endpoint: the CA certificates (PEM) to trust
    /// instead of the system's.
    #[arg(long, requires = "mcp")]
    ca: Option<PathBuf>,
    /// For an https:// --mcp endpoint that asks for one: the client
    /// certificate (PEM, with its chain) to present; with --key.
    #[arg(long, requires_all = ["mcp", "key"])]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// The bearer token: the gateway's (else $HANDS_GATEWAY_TOKEN), or the MCP
    /// endpoint's (else $HANDS_MCP_TOKEN, else none).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The environment sessions are opened in.
    #[arg(long, default_value = "default")]
    env: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Cases expected to fail (one name per line, # comments). A listed case
    /// that passes fails the run: the baseline is stale.
    #[arg(long)]
    expected_failures: Option<PathBuf>,
    /// Run only this case (repeatable).
    #[arg(long = "case")]
    cases: Vec<String>,
    /// Time limit of each case, in seconds.
    #[arg(long, default_value_t = 120)]
    case_timeout_secs: u64,
    /// List the cases and exit.
    #[arg(long)]
    list: bool,
    /// An environment in network.mode = "egress" for the egress cases (with
    /// --egress-url; without them those cases are skipped).
    #[arg(long, requires = "egress_url")]
    egress_env: Option<String>,
    /// An http:// URL the egress environment allows, answering a GET with 2xx
    /// or 3xx.
    #[arg(long, requires = "egress_env")]
    egress_url: Option<String>,
}

fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    let hostport = addr
        .trim_start_matches("http://")
        .trim_start_matches("grpc://")
        .trim_end_matches('/');
    hostport
        .to_socket_addrs()
        .with_context(|| format!("resolving {addr:?}"))?
        .next()
        .with_context(|| format!("{addr:?} resolves to no address"))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.list {
        for c in conformance::cases::all() {
            println!(
                "{}{}",
                c.name,
                if c.grpc_only { "  (gRPC only)" } else { "" }
            );
        }
        for c in conformance::mcp::all() {
            println!("{}  (MCP)", c.name);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let known: Vec<&str> = if args.mcp.is_some() {
        conformance::mcp::all().iter().map(|c| c.name).collect()
    } else {
        conformance::cases::all().iter().map(|c| c.name).collect()
    };
    if let Some(bad) = args.cases.iter().find(|c| !known.contains(&c.as_str())) {
        bail!("--case {bad:?}: no such case (see --list)");
    }
    let expected_failures = match &args.expected_failures {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?;
            conformance::parse_expected_failures(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        }
        None => Default::default(),
    };
    let egress = match (&args.egress_env, &args.egress_url) {
        (Some(env), Some(url)) => {
            if !url.starts_with("http://") {
                bail!("--egress-url {url:?}: an http:// URL");
            }
            Some(conformance::Egress {
                env: env.clone(),
                url: url.clone(),
            })
        }
        _ => None,
    };
    let opts = conformance::Options {
        env: args.env.clone(),
        egress,
        only: args.cases.clone(),
        expected_failures,
        case_timeout: Duration::from_secs(args.case_timeout_secs),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = rt.block_on(async {
        if let Some(url) = &args.mcp {
            let token = match &args.token_file {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("{}", p.display()))?
                        .trim()
                        .to_string(),
                ),
                None => std::env::var("HANDS_MCP_TOKEN").ok(),
            };
            let tls = if url.starts_with("https://") {
                let identity = args.cert.as_deref().zip(args.key.as_deref());
                Some(crate::net::tls::https_client_config(
                    args.ca.as_deref(),
                    identity,
                )?)
            } else {
                if args.ca.is_some() || args.cert.is_some() {
                    bail!("--ca and --cert are for an https:// --mcp endpoint");
                }
                None
            };
            let t = conformance::mcp::McpTarget::with_tls(url, token, tls)
                .map_err(anyhow::Error::msg)?;
            let uri: http::Uri = url.parse().with_context(|| format!("{url:?}"))?;
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme_str() == Some("https") {
                    443
                } else {
                    80
                });
            let addr = resolve(&format!("{}:{port}", uri.host().unwrap_or_default()))?;
            // Fail fast (exit 2) when nothing answers.
            tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            return Ok(conformance::mcp::run(&t, &format!("mcp {url}"), &opts).await);
        }
        if let Some(g) = &args.grpc {
            let addr = resolve(g)?;
            let mut t = target::Grpc::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            Ok::<_, anyhow::Error>(conformance::run(&mut t, &format!("grpc {addr}"), &opts).await)
        } else {
            let g = args.gateway.as_deref().expect("clap requires one");
            let addr = resolve(g)?;
            let token = match &args.token_file {
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| format!("{}", p.display()))?
                    .trim()
                    .to_string(),
                None => std::env::var(crate::gateway::config::TOKEN_ENV)
                    .context("--token-file or $HANDS_GATEWAY_TOKEN is required for a gateway")?,
            };
            // Fail fast (exit 2) when nothing answers, as for gRPC.
            tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            let mut t = target::Gateway::new(addr, &token);
            Ok(conformance::run(&mut t, &format!("gateway http://{addr}"), &opts).await)
        }
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
