//! The worker's configuration file (`hands worker --config FILE`): who the
//! worker is, how many sessions it holds, which environments it offers, and how
//! brains reach it. Parsed into raw serde types, validated once into [`Config`].
//!
//! ```toml
//! worker_id = "build-host-1"        # identity in Info (the tunnel's client certificate later)
//! capacity = 16                     # most sessions open at once
//! policy_dirs = ["/etc/hands/policies"]   # searched before the built-in policies
//! environments = ["default", "strict"]    # offered environments (default: every policy found)
//! listen = "127.0.0.1:7700"         # optional debug listener: loopback addresses only
//! ```
//!
//! Connectors (the outbound tunnel, Claude Managed Agents) add their own tables
//! in later versions; unknown keys are rejected, so a typo never passes silently.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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
}

fn default_capacity() -> usize {
    16
}

/// A validated worker configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub worker_id: String,
    pub capacity: usize,
    pub policies: Vec<Policy>,
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml_str(&text, path)
    }

    pub fn from_toml_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        if !crate::session::registry::valid_id(&raw.worker_id) {
            return Err(invalid(
                "worker_id",
                "1 to 128 characters of [A-Za-z0-9._:-]".into(),
            ));
        }
        if raw.capacity == 0 || raw.capacity > 4096 {
            return Err(invalid("capacity", "must be between 1 and 4096".into()));
        }
        let names: Vec<String> = match raw.environments {
            Some(names) => names,
            None => {
                let mut names: Vec<String> = crate::policy::PolicySet::builtin()
                    .iter()
                    .map(|p| p.name.clone())
                    .collect();
                for dir in &raw.policy_dirs {
                    if let Ok(set) = crate::policy::PolicySet::load_dir(dir) {
                        names.extend(set.iter().map(|p| p.name.clone()));
                    }
                }
                names.sort();
                names.dedup();
                names
            }
        };
        if names.is_empty() {
            return Err(invalid("environments", "no environment to offer".into()));
        }
        let mut policies = Vec::new();
        for name in &names {
            let p = crate::policy::find(name, &raw.policy_dirs)
                .map_err(|e| invalid("environments", e.to_string()))?;
            policies.push(p);
        }
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
        Ok(Config {
            worker_id: raw.worker_id,
            capacity: raw.capacity,
            policies,
            listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("worker.toml"))
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
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains("worker.toml") && e.contains(key), "{text}: {e}");
        }
    }
}
