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
//!
//! [api]                               # the agent loop's HTTP API
//! listen = "127.0.0.1:7780"
//! token_file = "/etc/hands/gateway-token"  # bearer token; else $HANDS_GATEWAY_TOKEN
//! reconnect_wait_secs = 30            # how long a call waits for its worker to come back
//! ```
//!
//! Unknown keys are rejected. Relative paths are relative to the file. The
//! token is read once at startup and never logged; an API without a token is
//! refused, there is no unauthenticated mode.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::tls::TlsFiles;

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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: String,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default = "default_reconnect_wait")]
    reconnect_wait_secs: u64,
}

fn default_keepalive() -> u64 {
    15
}
fn default_reconnect_wait() -> u64 {
    30
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
        })
    }
}
