//! The gateway's configuration file (`hands gateway --config FILE`).
//!
//! ```toml
//! [tunnel]                            # where workers dial in (mTLS)
//! listen = "0.0.0.0:7443"
//! ca = "/etc/hands/pki/ca.pem"        # CA worker certificates must chain to
//! cert = "/etc/hands/pki/gateway.pem" # the gateway's server certificate
//! key = "/etc/hands/pki/gateway-key.pem"
//! allowed_workers = ["build-host-1"]  # optional: only these worker identities
//! keepalive_secs = 15                 # HTTP/2 PING interval towards workers
//! max_connections = 1024              # tunnel connections at once (default: see below)
//!
//! [api]                               # the agent loop's HTTP API
//! listen = "127.0.0.1:7780"
//! token_file = "/etc/hands/gateway-token"  # bearer token; else $HANDS_GATEWAY_TOKEN
//! reconnect_wait_secs = 30            # how long a call waits for its worker to come back
//! max_connections = 1024              # API connections at once; more are answered 503 and closed
//! header_read_timeout_secs = 10       # a request's head must arrive within this
//! idle_timeout_secs = 60              # a kept-alive connection may wait this long for its next request
//! mcp_idle_timeout_secs = 1800        # an MCP session (/v1/environments/ENV/mcp) idle this long is closed; 0 = never
//! ```
//!
//! Unknown keys are rejected. Relative paths are relative to the file. The
//! token is read once at startup and never logged; an API without a token is
//! refused, there is no unauthenticated mode.
//!
//! The two listeners have separate connection budgets, so that connections to
//! the API (which anyone who reaches its port can open) can never take the
//! descriptors worker tunnels need. Both budgets must fit the process's
//! descriptor limit, which the gateway raises to its hard limit at start;
//! without `max_connections`, each listener gets 1024 or, when the limit is
//! lower, half of what it leaves (see [`super::listen::Budgets`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::net::tls::TlsFiles;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    tunnel: RawTunnel,
    api: RawApi,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    listen: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    allowed_workers: Option<Vec<String>>,
    #[serde(default = "default_keepalive")]
    keepalive_secs: u64,
    #[serde(default)]
    max_connections: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: String,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default = "default_reconnect_wait")]
    reconnect_wait_secs: u64,
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default = "default_header_read_timeout")]
    header_read_timeout_secs: u64,
    #[serde(default = "default_idle_timeout")]
    idle_timeout_secs: u64,
    #[serde(default)]
    mcp_idle_timeout_secs: Option<u64>,
}

fn default_keepalive() -> u64 {
    15
}
fn default_reconnect_wait() -> u64 {
    30
}
fn default_header_read_timeout() -> u64 {
    10
}
fn default_idle_timeout() -> u64 {
    60
}

/// A validated gateway configuration.
#[derive(Clone)]
pub struct Config {
    pub tunnel_listen: SocketAddr,
    pub tls: TlsFiles,
    pub allowed_workers: Option<Vec<String>>,
    pub keepalive: Duration,
    pub api_listen: SocketAddr,
    pub token: String,
    pub reconnect_wait: Duration,
    /// Tunnel connections at once; `None`: derived from the descriptor limit.
    pub tunnel_max_connections: Option<usize>,
    /// API connections at once; `None`: derived from the descriptor limit.
    pub api_max_connections: Option<usize>,
    /// How long a request's head may take to arrive: from the connection's
    /// start for its first request, from the first byte for later ones.
    pub header_read_timeout: Duration,
    /// How long a connection may sit between requests, and how long a client
    /// may leave a response unread or a request body unsent.
    pub idle_timeout: Duration,
    /// An MCP session with no call running and no request is closed after
    /// this (`api.mcp_idle_timeout_secs`); `None`: never.
    pub mcp_idle_timeout: Option<Duration>,
}

impl std::fmt::Debug for Config {
    // The token never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("tunnel_listen", &self.tunnel_listen)
            .field("tls", &self.tls)
            .field("allowed_workers", &self.allowed_workers)
            .field("api_listen", &self.api_listen)
            .field("token", &"<redacted>")
            .field("tunnel_max_connections", &self.tunnel_max_connections)
            .field("api_max_connections", &self.api_max_connections)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("mcp_idle_timeout", &self.mcp_idle_timeout)
            .finish()
    }
}

pub use crate::configfile::ConfigError;

/// The environment variable a token may come from.
pub const TOKEN_ENV: &str = "HANDS_GATEWAY_TOKEN";

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::from_toml_str(&crate::configfile::read(path)?, path)
    }

    pub fn from_toml_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: Raw = crate::configfile::parse(text, path)?;
        let invalid = crate::configfile::invalid(path);
        let base = path.parent().unwrap_or(Path::new("."));
        let addr = |key, s: &str| {
            s.parse::<SocketAddr>()
                .map_err(|e| invalid(key, format!("{s:?}: {e}")))
        };
        let tunnel_listen = addr("tunnel.listen", &raw.tunnel.listen)?;
        let api_listen = addr("api.listen", &raw.api.listen)?;
        if let Some(ids) = &raw.tunnel.allowed_workers {
            if let Some(bad) = ids
                .iter()
                .find(|id| !crate::session::registry::valid_id(id))
            {
                return Err(invalid(
                    "tunnel.allowed_workers",
                    format!("{bad:?} is not a valid worker id"),
                ));
            }
        }
        if !(1..=3600).contains(&raw.tunnel.keepalive_secs) {
            return Err(invalid(
                "tunnel.keepalive_secs",
                "must be between 1 and 3600".into(),
            ));
        }
        for (key, v) in [
            ("tunnel.max_connections", raw.tunnel.max_connections),
            ("api.max_connections", raw.api.max_connections),
        ] {
            if v.is_some_and(|n| !(1..=1_000_000).contains(&n)) {
                return Err(invalid(key, "must be between 1 and 1000000".into()));
            }
        }
        for (key, v) in [
            (
                "api.header_read_timeout_secs",
                raw.api.header_read_timeout_secs,
            ),
            ("api.idle_timeout_secs", raw.api.idle_timeout_secs),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(invalid(key, "must be between 1 and 3600".into()));
            }
        }
        let token = match &raw.api.token_file {
            Some(f) => {
                let p = base.join(f);
                std::fs::read_to_string(&p)
                    .map_err(|e| invalid("api.token_file", format!("{}: {e}", p.display())))?
                    .trim()
                    .to_string()
            }
            None => std::env::var(TOKEN_ENV)
                .unwrap_or_default()
                .trim()
                .to_string(),
        };
        if token.len() < 16 {
            return Err(invalid(
                "api.token_file",
                format!("a bearer token of at least 16 characters is required (token_file, or ${TOKEN_ENV})"),
            ));
        }
        let mcp_idle_timeout = match raw.api.mcp_idle_timeout_secs {
            None => Some(crate::worker::config::DEFAULT_IDLE_TIMEOUT),
            Some(0) => None,
            Some(s) if s <= 7 * 24 * 3600 => Some(Duration::from_secs(s)),
            Some(_) => {
                return Err(invalid(
                    "api.mcp_idle_timeout_secs",
                    "must be between 0 (never) and 604800 (a week)".into(),
                ))
            }
        };
        Ok(Config {
            tunnel_listen,
            tls: TlsFiles {
                ca: base.join(&raw.tunnel.ca),
                cert: base.join(&raw.tunnel.cert),
                key: base.join(&raw.tunnel.key),
            },
            allowed_workers: raw.tunnel.allowed_workers,
            keepalive: Duration::from_secs(raw.tunnel.keepalive_secs),
            api_listen,
            token,
            reconnect_wait: Duration::from_secs(raw.api.reconnect_wait_secs),
            tunnel_max_connections: raw.tunnel.max_connections,
            api_max_connections: raw.api.max_connections,
            header_read_timeout: Duration::from_secs(raw.api.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(raw.api.idle_timeout_secs),
            mcp_idle_timeout,
        })
    }
}
