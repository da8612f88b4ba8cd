//! The worker's configuration file (`hands worker --config FILE`): who the
//! worker is, how many sessions it holds, which environments it offers, and how
//! brains reach it. Parsed into raw serde types, validated once into [`Config`].
//!
//! ```toml
//! worker_id = "build-host-1"        # identity in Info (the tunnel's client certificate later)
//! capacity = 16                     # most sessions open at once
//! policy_dirs = ["policies"]       # searched after --policy-dir and $HANDS_POLICY_DIR,
//!                                   # before /etc/hands/policies and the built-in policies
//! environments = ["default", "strict"]    # offered environments (default: every policy found)
//! listen = "127.0.0.1:7700"         # optional debug listener: loopback addresses only
//! shutdown_grace_secs = 20          # on SIGTERM, how long running calls may still finish
//!
//! [tunnel]                          # the outbound mTLS tunnel to one or more gateways
//! endpoints = ["gw-a.example:7443", "gw-b.example:7443"]
//! server_name = "gateway.hands"     # name the gateway certificate must carry (default: each endpoint's host)
//! ca = "/etc/hands/pki/ca.pem"      # CA the gateway certificate must chain to
//! cert = "/etc/hands/pki/worker.pem"     # this worker's client certificate (its identity = worker_id)
//! key = "/etc/hands/pki/worker-key.pem"
//! connections = 1                   # connections kept per endpoint
//! proxy = "http://proxy.corp:3128"  # HTTP CONNECT proxy; "env" (default) = HTTPS_PROXY/NO_PROXY; "none"
//! keepalive_secs = 15               # HTTP/2 PING interval; a silent peer is dropped within twice this
//!
//! [sessions]                        # sessions opened through hands.v1
//! idle_timeout_secs = 1800          # closed after this long with no call running or request naming them; 0 = never
//!
//! [audit]                           # the tamper-evident audit log: one record per call
//! file = "/var/log/hands/audit.jsonl"   # default: $HANDS_AUDIT_LOG, else audit.jsonl in the data directory
//! max_bytes = "64MiB"               # rotated past this size (0: never); the chain carries over
//! keep = 10                         # rotated files kept (audit.jsonl.1 … .10)
//!
//! [mcp]                             # MCP over streamable HTTP (the six tools for MCP clients)
//! listen = "127.0.0.1:7310"         # loopback; any other address needs tls_* and token_file or client_ca
//! idle_timeout_secs = 1800          # an MCP session with no call running is closed after this; 0 = never
//! token_file = "/etc/hands/mcp-token"   # bearer token every request must carry
//! tls_cert = "/etc/hands/pki/mcp.pem"   # serve HTTPS with this certificate and key
//! tls_key = "/etc/hands/pki/mcp-key.pem"
//! client_ca = "/etc/hands/pki/mcp-clients.pem"  # require client certificates chaining to it
//! [mcp.endpoints]                   # path → environment (default: /mcp/<name> for each environment)
//! "/mcp" = "default"
//!
//! [metrics]                         # Prometheus metrics and health probes
//! listen = "0.0.0.0:9464"           # GET /metrics, /livez, /readyz; any address (no session data)
//!
//! [journal]                         # finished results kept so a resumed call gets them again
//! session_bytes = "256MiB"          # held per session (results, output tails, call ids)
//! worker_bytes = "1GiB"             # held over every session of the worker
//! retention_secs = 900              # a result is dropped this long after its call finished
//! ```
//!
//! A dropped result leaves its call id behind: asking for that call again is
//! refused with `RESULT_EXPIRED`, never a second run (see `session::journal`).
//!
//! The session idle timeout is the worker's, not a policy's: it protects the
//! worker's capacity from clients that go away without closing, whatever the
//! environment, and a call that runs (a build of an hour) keeps its session
//! anyway. Sessions of the `[anthropic]` connector are its own to close.
//!
//! Unknown keys are rejected, so a typo never passes silently. Relative paths
//! (`policy_dirs` included) are relative to the configuration file. The
//! policies are found by `crate::policy::lookup`, the same lookup every command
//! uses; an invalid policy file is an error naming the file and the key. The
//! operator's reference for every key is `docs/worker.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::connectors::hands_v1::tunnel::{Backoff, Endpoint, TunnelConfig};
use crate::net::ProxyChoice;
use crate::policy::lookup::{Lookup, Source};
use crate::policy::Policy;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    worker_id: String,
    #[serde(default = "default_capacity")]
    capacity: usize,
    #[serde(default)]
    policy_dirs: Vec<PathBuf>,
    #[serde(default)]
    environments: Option<Vec<String>>,
    #[serde(default)]
    listen: Option<String>,
    #[serde(default)]
    shutdown_grace_secs: Option<u64>,
    #[serde(default)]
    tunnel: Option<RawTunnel>,
    #[serde(default)]
    anthropic: Option<crate::connectors::cma::config::Raw>,
    #[serde(default)]
    journal: Option<RawJournal>,
    #[serde(default)]
    sessions: Option<RawSessions>,
    #[serde(default)]
    audit: Option<RawAudit>,
    #[serde(default)]
    metrics: Option<RawMetrics>,
    #[serde(default)]
    mcp: Option<crate::connectors::mcp::http::Raw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    #[serde(default)]
    listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    #[serde(default)]
    file: Option<PathBuf>,
    #[serde(default)]
    max_bytes: Option<RawSize>,
    #[serde(default)]
    keep: Option<u32>,
}

/// Where the worker's audit log goes (`[audit]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// `None`: `$HANDS_AUDIT_LOG`, else `audit.jsonl` in the data directory.
    pub file: Option<PathBuf>,
    /// A file is rotated past this size; 0: never.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSessions {
    #[serde(default)]
    idle_timeout_secs: Option<u64>,
}

/// The default session idle timeout: half an hour without a call or a request
/// is an abandoned session for an agent loop, whose turns take seconds to
/// minutes, and still leaves a person time to answer a question the agent
/// asked. A running call is never cut short by it.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(1800);

/// The longest idle timeout: a week, as the journal's retention.
const MAX_IDLE_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJournal {
    #[serde(default)]
    session_bytes: Option<RawSize>,
    #[serde(default)]
    worker_bytes: Option<RawSize>,
    #[serde(default)]
    retention_secs: Option<u64>,
}

/// A size: bytes, or a string with a binary unit ("256MiB").
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

impl RawSize {
    fn bytes(&self) -> Result<u64, String> {
        match self {
            RawSize::Bytes(n) => Ok(*n),
            RawSize::Text(t) => crate::policy::units::parse_size(t),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    endpoints: Vec<String>,
    #[serde(default)]
    server_name: Option<String>,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default = "one")]
    connections: usize,
    #[serde(default)]
    proxy: Option<String>,
    #[serde(default = "default_keepalive")]
    keepalive_secs: u64,
    #[serde(default = "default_connect_timeout")]
    connect_timeout_secs: u64,
    #[serde(default)]
    backoff_base_ms: Option<u64>,
    #[serde(default)]
    backoff_max_ms: Option<u64>,
    #[serde(default)]
    healthy_after_secs: Option<u64>,
}

fn one() -> usize {
    1
}
fn default_keepalive() -> u64 {
    15
}
fn default_connect_timeout() -> u64 {
    10
}

fn default_capacity() -> usize {
    16
}

/// A validated worker configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub worker_id: String,
    pub capacity: usize,
    /// The offered environments, in name order.
    pub policies: Vec<Policy>,
    /// Where each offered environment's policy comes from, by name.
    pub sources: std::collections::BTreeMap<String, Source>,
    pub listen: Option<SocketAddr>,
    /// On SIGTERM, how long running calls may still finish before they are
    /// cut short.
    pub shutdown_grace: Duration,
    pub tunnel: Option<TunnelConfig>,
    /// The Claude Managed Agents connector (`[anthropic]`).
    pub anthropic: Option<crate::connectors::cma::config::AnthropicConfig>,
    /// The call journal's budget (`[journal]`).
    pub journal: crate::session::journal::Limits,
    /// Sessions opened through hands.v1 are closed after this long idle
    /// (`[sessions] idle_timeout_secs`); `None`: never.
    pub session_idle_timeout: Option<Duration>,
    /// The audit log (`[audit]`).
    pub audit: AuditSettings,
    /// The metrics and health listener (`[metrics] listen`): `GET /metrics`,
    /// `/livez`, `/readyz`; any address, as it serves no session data.
    pub metrics_listen: Option<SocketAddr>,
    /// The MCP face over streamable HTTP (`[mcp]`).
    pub mcp: Option<crate::connectors::mcp::http::HttpConfig>,
}

pub use crate::configfile::ConfigError;

/// The default of `shutdown_grace_secs`: under Kubernetes' default
/// termination grace (30 s) and systemd's stop timeout (90 s), so that cut
/// short calls are still reported and sessions closed before a SIGKILL.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

impl Config {
    /// Reads the configuration at `path`; its environments are looked up in
    /// `lookup` (the command line's directories) with the file's `policy_dirs`.
    pub fn load(path: &Path, lookup: &Lookup) -> Result<Config, ConfigError> {
        Config::from_toml_str(&crate::configfile::read(path)?, path, lookup)
    }

    /// The lookup a configuration file adds its `policy_dirs` to, without
    /// validating anything else (`hands policy list --config`).
    pub fn policy_lookup(path: &Path, lookup: &Lookup) -> Result<Lookup, ConfigError> {
        let raw: RawConfig = crate::configfile::parse(&crate::configfile::read(path)?, path)?;
        Ok(lookup.with_config_dirs(path, &raw.policy_dirs))
    }

    pub fn from_toml_str(text: &str, path: &Path, lookup: &Lookup) -> Result<Config, ConfigError> {
        let raw: RawConfig = crate::configfile::parse(text, path)?;
        let invalid = crate::configfile::invalid(path);
        if !crate::session::registry::valid_id(&raw.worker_id) {
            return Err(invalid(
                "worker_id",
                "1 to 128 characters of [A-Za-z0-9._:-]".into(),
            ));
        }
        if raw.capacity == 0 || raw.capacity > 4096 {
            return Err(invalid("capacity", "must be between 1 and 4096".into()));
        }
        let catalog = lookup.with_config_dirs(path, &raw.policy_dirs).load()?;
        let names: Vec<String> = match raw.environments {
            Some(names) => names,
            None => catalog.iter().map(|e| e.policy.name.clone()).collect(),
        };
        if names.is_empty() {
            return Err(invalid("environments", "no environment to offer".into()));
        }
        let mut policies = Vec::new();
        let mut sources = std::collections::BTreeMap::new();
        for name in &names {
            let entry = catalog
                .get(name)
                .map_err(|e| invalid("environments", e.to_string()))?;
            if sources.insert(name.clone(), entry.source.clone()).is_some() {
                return Err(invalid("environments", format!("{name:?} is listed twice")));
            }
            policies.push(entry.policy.clone());
        }
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        let shutdown_grace = match raw.shutdown_grace_secs {
            None => DEFAULT_SHUTDOWN_GRACE,
            Some(s) if s <= 3600 => Duration::from_secs(s),
            Some(_) => {
                return Err(invalid(
                    "shutdown_grace_secs",
                    "must be between 0 and 3600".into(),
                ))
            }
        };
        let listen = match raw.listen {
            None => None,
            Some(a) => {
                let addr: SocketAddr = a
                    .parse()
                    .map_err(|e| invalid("listen", format!("{a:?}: {e}")))?;
                // The debug listener has no authentication: it must never be
                // reachable from another host.
                if !addr.ip().is_loopback() {
                    return Err(invalid(
                        "listen",
                        format!("{addr} is not a loopback address; the debug listener serves loopback only"),
                    ));
                }
                Some(addr)
            }
        };
        let metrics_listen = match raw.metrics.and_then(|m| m.listen) {
            None => None,
            Some(a) => {
                let addr: SocketAddr = a
                    .parse()
                    .map_err(|e| invalid("metrics.listen", format!("{a:?}: {e}")))?;
                if addr.port() != 0 && listen == Some(addr) {
                    return Err(invalid(
                        "metrics.listen",
                        format!("{addr} is the debug listener's address (listen)"),
                    ));
                }
                Some(addr)
            }
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let tunnel = match raw.tunnel {
            None => None,
            Some(t) => Some(tunnel_config(t, base, &raw.worker_id, &invalid)?),
        };
        let anthropic = match raw.anthropic {
            None => None,
            Some(a) => {
                let mut c = a.validate(base, raw.capacity, &invalid)?;
                c.drain_grace = shutdown_grace;
                if !policies.iter().any(|p| p.name == c.environment) {
                    return Err(invalid(
                        "anthropic.environment",
                        format!("{:?} is not among the worker's environments", c.environment),
                    ));
                }
                Some(c)
            }
        };
        let mcp = match raw.mcp {
            None => None,
            Some(m) => Some(m.validate(base, &names, &invalid)?),
        };
        let journal = journal_limits(raw.journal, &invalid)?;
        let session_idle_timeout = match raw.sessions.and_then(|s| s.idle_timeout_secs) {
            None => Some(DEFAULT_IDLE_TIMEOUT),
            Some(0) => None,
            Some(secs) if secs <= MAX_IDLE_TIMEOUT_SECS => Some(Duration::from_secs(secs)),
            Some(_) => {
                return Err(invalid(
                    "sessions.idle_timeout_secs",
                    format!("must be between 0 (never) and {MAX_IDLE_TIMEOUT_SECS} (a week)"),
                ))
            }
        };
        let audit = match raw.audit {
            None => AuditSettings {
                file: None,
                max_bytes: crate::audit::DEFAULT_MAX_BYTES,
                keep: crate::audit::DEFAULT_KEEP,
            },
            Some(a) => AuditSettings {
                file: a.file.map(|f| base.join(f)),
                max_bytes: match &a.max_bytes {
                    None => crate::audit::DEFAULT_MAX_BYTES,
                    Some(v) => match v.bytes() {
                        Ok(0) => 0,
                        Ok(n) if n >= 4096 => n,
                        Ok(n) => {
                            return Err(invalid(
                                "audit.max_bytes",
                                format!("{n} bytes is below the 4 KiB minimum (0: never rotate)"),
                            ))
                        }
                        Err(e) => return Err(invalid("audit.max_bytes", e)),
                    },
                },
                keep: match a.keep {
                    None => crate::audit::DEFAULT_KEEP,
                    Some(k) if (1..=1000).contains(&k) => k,
                    Some(_) => {
                        return Err(invalid("audit.keep", "must be between 1 and 1000".into()))
                    }
                },
            },
        };
        Ok(Config {
            audit,
            worker_id: raw.worker_id,
            capacity: raw.capacity,
            policies,
            sources,
            listen,
            shutdown_grace,
            tunnel,
            anthropic,
            journal,
            session_idle_timeout,
            metrics_listen,
            mcp,
        })
    }
}

fn journal_limits(
    raw: Option<RawJournal>,
    invalid: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<crate::session::journal::Limits, ConfigError> {
    let mut limits = crate::session::journal::Limits::default();
    let Some(raw) = raw else {
        return Ok(limits);
    };
    // At least one maximal message: below that, every result but the newest
    // would be dropped as soon as it finished.
    let min = crate::connectors::hands_v1::MAX_MESSAGE as u64;
    let size = |key, v: &Option<RawSize>, default| match v {
        None => Ok(default),
        Some(v) => match v.bytes() {
            Ok(n) if n >= min => Ok(n),
            Ok(n) => Err(invalid(
                key,
                format!("{n} bytes is below the 64 MiB minimum"),
            )),
            Err(m) => Err(invalid(key, m)),
        },
    };
    limits.session_bytes = size(
        "journal.session_bytes",
        &raw.session_bytes,
        limits.session_bytes,
    )?;
    limits.worker_bytes = size(
        "journal.worker_bytes",
        &raw.worker_bytes,
        limits.worker_bytes.max(limits.session_bytes),
    )?;
    if limits.worker_bytes < limits.session_bytes {
        return Err(invalid(
            "journal.worker_bytes",
            format!(
                "{} bytes is below journal.session_bytes ({})",
                limits.worker_bytes, limits.session_bytes
            ),
        ));
    }
    if let Some(secs) = raw.retention_secs {
        if !(1..=7 * 24 * 3600).contains(&secs) {
            return Err(invalid(
                "journal.retention_secs",
                "must be between 1 and 604800 (a week)".into(),
            ));
        }
        limits.retention = Duration::from_secs(secs);
    }
    Ok(limits)
}

fn tunnel_config(
    t: RawTunnel,
    base: &Path,
    worker_id: &str,
    invalid: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<TunnelConfig, ConfigError> {
    if t.endpoints.is_empty() {
        return Err(invalid(
            "tunnel.endpoints",
            "at least one gateway endpoint".into(),
        ));
    }
    let mut endpoints = Vec::new();
    for e in &t.endpoints {
        let (host, port) = crate::net::proxy::split_host_port(e, 0)
            .filter(|(h, p)| !h.is_empty() && *p != 0)
            .ok_or_else(|| invalid("tunnel.endpoints", format!("{e:?} is not host:port")))?;
        endpoints.push(Endpoint { host, port });
    }
    if let Some(name) = &t.server_name {
        crate::net::tls::server_name(name)
            .map_err(|e| invalid("tunnel.server_name", e.to_string()))?;
    }
    if t.connections == 0 || t.connections > 64 {
        return Err(invalid(
            "tunnel.connections",
            "must be between 1 and 64".into(),
        ));
    }
    if !(1..=3600).contains(&t.keepalive_secs) {
        return Err(invalid(
            "tunnel.keepalive_secs",
            "must be between 1 and 3600".into(),
        ));
    }
    if !(1..=600).contains(&t.connect_timeout_secs) {
        return Err(invalid(
            "tunnel.connect_timeout_secs",
            "must be between 1 and 600".into(),
        ));
    }
    let proxy = match t.proxy.as_deref() {
        None | Some("env") => ProxyChoice::FromEnv,
        Some("none") => ProxyChoice::Direct,
        Some(url) => ProxyChoice::Explicit(
            crate::net::proxy::Proxy::parse(url)
                .map_err(|e| invalid("tunnel.proxy", e.to_string()))?,
        ),
    };
    let tls = crate::net::tls::TlsFiles {
        ca: base.join(&t.ca),
        cert: base.join(&t.cert),
        key: base.join(&t.key),
    };
    // The gateway knows a worker by its certificate: a worker_id that says
    // otherwise would route sessions to the wrong name. Fail at startup.
    let identity = crate::net::tls::worker_identity_of_file(&tls.cert)
        .map_err(|e| invalid("tunnel.cert", e.to_string()))?;
    if identity != worker_id {
        return Err(invalid(
            "tunnel.cert",
            format!(
                "the certificate's worker identity is {identity:?}, but worker_id is {worker_id:?}"
            ),
        ));
    }
    let mut backoff = Backoff::default();
    if let Some(ms) = t.backoff_base_ms {
        backoff.base = Duration::from_millis(ms.max(1));
    }
    if let Some(ms) = t.backoff_max_ms {
        backoff.max = Duration::from_millis(ms.max(1));
    }
    if let Some(s) = t.healthy_after_secs {
        backoff.healthy_after = Duration::from_secs(s);
    }
    Ok(TunnelConfig {
        endpoints,
        server_name: t.server_name,
        tls,
        connections: t.connections,
        proxy,
        keepalive: Duration::from_secs(t.keepalive_secs),
        connect_timeout: Duration::from_secs(t.connect_timeout_secs),
        backoff,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("worker.toml"), &Lookup::builtin_only())
    }

    #[test]
    fn minimal_config_offers_the_builtin_environments() {
        let c = parse("worker_id = \"w1\"\nlisten = \"127.0.0.1:7700\"").unwrap();
        assert_eq!(c.capacity, 16);
        let names: Vec<&str> = c.policies.iter().map(|p| p.name.as_str()).collect();
        assert!(
            names.contains(&"default") && names.contains(&"strict"),
            "{names:?}"
        );
        assert_eq!(c.listen.unwrap().port(), 7700);
        assert_eq!(c.journal, crate::session::journal::Limits::default());
        assert_eq!(c.session_idle_timeout, Some(DEFAULT_IDLE_TIMEOUT));
    }

    #[test]
    fn the_metrics_listener_may_bind_any_address_and_is_off_by_default() {
        let c = parse("worker_id = \"w1\"").unwrap();
        assert_eq!(c.metrics_listen, None);
        let c = parse("worker_id = \"w1\"\n[metrics]\nlisten = \"0.0.0.0:9464\"").unwrap();
        assert_eq!(c.metrics_listen, Some("0.0.0.0:9464".parse().unwrap()));
        let c = parse("worker_id = \"w1\"\n[metrics]\n").unwrap();
        assert_eq!(c.metrics_listen, None);
    }

    #[test]
    fn the_session_idle_timeout_is_configurable_and_zero_means_never() {
        let c = parse("worker_id = \"w1\"\n[sessions]\nidle_timeout_secs = 2").unwrap();
        assert_eq!(c.session_idle_timeout, Some(Duration::from_secs(2)));
        let c = parse("worker_id = \"w1\"\n[sessions]\nidle_timeout_secs = 0").unwrap();
        assert_eq!(c.session_idle_timeout, None);
        let c = parse("worker_id = \"w1\"\n[sessions]\n").unwrap();
        assert_eq!(c.session_idle_timeout, Some(DEFAULT_IDLE_TIMEOUT));
    }

    #[test]
    fn the_journal_budget_is_configurable() {
        let c = parse(
            "worker_id = \"w1\"\n[journal]\nsession_bytes = \"512MiB\"\nworker_bytes = 4294967296\nretention_secs = 60",
        )
        .unwrap();
        assert_eq!(c.journal.session_bytes, 512 << 20);
        assert_eq!(c.journal.worker_bytes, 4 << 30);
        assert_eq!(c.journal.retention, Duration::from_secs(60));
        // A session budget over the default worker budget raises the latter.
        let c = parse("worker_id = \"w1\"\n[journal]\nsession_bytes = \"2GiB\"").unwrap();
        assert_eq!(c.journal.worker_bytes, 2 << 30);
    }

    #[test]
    fn bad_configs_name_the_file_and_key() {
        for (text, key) in [
            ("worker_id = \"w\"\nlisten = \"0.0.0.0:7700\"", "listen"),
            ("worker_id = \"w\"\nlisten = \"nonsense\"", "listen"),
            ("worker_id = \"bad id\"", "worker_id"),
            ("worker_id = \"w\"\ncapacity = 0", "capacity"),
            (
                "worker_id = \"w\"\nenvironments = [\"nope\"]",
                "environments",
            ),
            ("worker_id = \"w\"\nlisen = \"127.0.0.1:1\"", "lisen"),
            (
                "worker_id = \"w\"\n[journal]\nsession_bytes = \"1MiB\"",
                "journal.session_bytes",
            ),
            (
                "worker_id = \"w\"\n[journal]\nsession_bytes = \"1GB\"",
                "journal.session_bytes",
            ),
            (
                "worker_id = \"w\"\n[journal]\nsession_bytes = \"2GiB\"\nworker_bytes = \"1GiB\"",
                "journal.worker_bytes",
            ),
            (
                "worker_id = \"w\"\n[journal]\nretention_secs = 0",
                "journal.retention_secs",
            ),
            ("worker_id = \"w\"\n[journal]\nbytes = 1", "bytes"),
            (
                "worker_id = \"w\"\n[sessions]\nidle_timeout_secs = 604801",
                "sessions.idle_timeout_secs",
            ),
            (
                "worker_id = \"w\"\n[sessions]\nidle_timeout_secs = -1",
                "idle_timeout_secs",
            ),
            ("worker_id = \"w\"\n[sessions]\nidle = 1", "idle"),
            (
                "worker_id = \"w\"\n[metrics]\nlisten = \"nonsense\"",
                "metrics.listen",
            ),
            (
                "worker_id = \"w\"\n[metrics]\nlisten = \"0.0.0.0\"",
                "metrics.listen",
            ),
            (
                "worker_id = \"w\"\nlisten = \"127.0.0.1:7700\"\n[metrics]\nlisten = \"127.0.0.1:7700\"",
                "metrics.listen",
            ),
            ("worker_id = \"w\"\n[metrics]\nlisen = \"0.0.0.0:9464\"", "lisen"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains("worker.toml") && e.contains(key), "{text}: {e}");
        }
    }
}
