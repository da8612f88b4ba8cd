//! The `[anthropic]` table of the worker configuration: the connector that
//! serves a Claude Managed Agents `self_hosted` environment.
//!
//! ```toml
//! [anthropic]
//! environment_id = "env_01..."
//! environment_key_file = "/etc/hands/environment-key"   # or:
//! # environment_key_credential = "hands-environment-key" # $CREDENTIALS_DIRECTORY/<name> (systemd)
//! # environment_key_env = "HANDS_ENVIRONMENT_KEY"        # an environment variable
//! environment = "default"      # the local policy every session runs in
//! capacity = 4                 # work items served at once (default: the worker's capacity)
//! max_idle_secs = 60           # after a turn-ending idle, end the item (0: never)
//! base_url = "https://api.anthropic.com"   # default: $ANTHROPIC_BASE_URL, else this
//! memory_sync_interval_secs = 15   # memory stores: >= 5; 0 disables memory handling
//! memory_sync_deletions = "enabled"   # "enabled" | "log_only" | "disabled"
//! stream_read_timeout_secs = 600   # no byte on the event stream this long: reconnect
//! workspace_retention_secs = 604800   # a session's kept workspace, unused this long, goes
//! ```
//!
//! Each session's workspace is kept on this host between its work items and
//! removed when the session is seen terminated, archived or deleted, or when no
//! item of it has run for `workspace_retention_secs` (7 days by default; swept
//! at start and every hour).
//!
//! The key is never in argv or the configuration file itself, and is never logged.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::secret::KeySource;

pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    environment_id: String,
    #[serde(default)]
    environment_key_file: Option<std::path::PathBuf>,
    #[serde(default)]
    environment_key_credential: Option<String>,
    #[serde(default)]
    environment_key_env: Option<String>,
    #[serde(default = "default_env")]
    environment: String,
    #[serde(default)]
    capacity: Option<usize>,
    #[serde(default = "default_idle")]
    max_idle_secs: u64,
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default = "default_sync")]
    memory_sync_interval_secs: u64,
    #[serde(default = "default_deletions")]
    memory_sync_deletions: super::memory::Deletions,
    #[serde(default = "default_read_timeout")]
    stream_read_timeout_secs: u64,
    #[serde(default = "default_retention")]
    workspace_retention_secs: u64,
}

fn default_retention() -> u64 {
    7 * 24 * 3600
}

fn default_read_timeout() -> u64 {
    600
}

fn default_sync() -> u64 {
    15
}
fn default_deletions() -> super::memory::Deletions {
    super::memory::Deletions::Enabled
}

fn default_env() -> String {
    "default".into()
}
fn default_idle() -> u64 {
    60
}

/// A validated connector configuration.
#[derive(Debug, Clone)]
pub struct AnthropicConfig {
    pub environment_id: String,
    pub key: KeySource,
    pub environment: String,
    pub capacity: usize,
    pub max_idle: Option<Duration>,
    pub base_url: String,
    /// `None`: memory stores are not handled (a session with one runs without).
    pub memory_sync: Option<Duration>,
    pub memory_deletions: super::memory::Deletions,
    /// No byte on the event stream this long: reconnect and reconcile.
    pub stream_read_timeout: Duration,
    /// Bounds on skill archives (not in the file: the defaults of
    /// [`super::skills::SkillLimits`]).
    pub skill_limits: super::skills::SkillLimits,
    /// A session's kept workspace unused this long is removed.
    pub workspace_retention: Duration,
    /// On a worker's stop, how long an item's call in flight may finish (not
    /// in the table: the worker's `shutdown_grace_secs`).
    pub drain_grace: Duration,
}

impl Raw {
    /// Validates; `invalid(key, message)` builds the caller's error.
    pub fn validate<E>(
        self,
        base: &Path,
        worker_capacity: usize,
        invalid: &dyn Fn(&'static str, String) -> E,
    ) -> Result<AnthropicConfig, E> {
        if self.environment_id.is_empty()
            || !self
                .environment_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                "anthropic.environment_id",
                "letters, digits, '_' and '-' (e.g. env_01...)".into(),
            ));
        }
        let sources = [
            self.environment_key_file
                .map(|p| KeySource::File(base.join(p))),
            self.environment_key_credential.map(KeySource::Credential),
            self.environment_key_env.map(KeySource::Env),
        ];
        let mut given = sources.into_iter().flatten();
        let key = given.next().ok_or_else(|| {
            invalid(
                "anthropic.environment_key_file",
                "one of environment_key_file, environment_key_credential, environment_key_env is required".into(),
            )
        })?;
        if given.next().is_some() {
            return Err(invalid(
                "anthropic.environment_key_file",
                "give exactly one of environment_key_file, environment_key_credential, environment_key_env".into(),
            ));
        }
        let capacity = self.capacity.unwrap_or(worker_capacity);
        if capacity == 0 || capacity > worker_capacity {
            return Err(invalid(
                "anthropic.capacity",
                format!("between 1 and the worker's capacity ({worker_capacity})"),
            ));
        }
        let base_url = self
            .base_url
            .or_else(|| {
                std::env::var("ANTHROPIC_BASE_URL")
                    .ok()
                    .filter(|v| !v.is_empty())
            })
            .unwrap_or_else(|| DEFAULT_BASE_URL.into());
        super::http::Api::new(&base_url)
            .map_err(|e| invalid("anthropic.base_url", e.to_string()))?;
        if self.memory_sync_interval_secs != 0 && self.memory_sync_interval_secs < 5 {
            return Err(invalid(
                "anthropic.memory_sync_interval_secs",
                "at least 5 (or 0 to disable memory stores)".into(),
            ));
        }
        Ok(AnthropicConfig {
            environment_id: self.environment_id,
            key,
            environment: self.environment,
            capacity,
            max_idle: (self.max_idle_secs > 0).then(|| Duration::from_secs(self.max_idle_secs)),
            base_url,
            memory_sync: (self.memory_sync_interval_secs > 0)
                .then(|| Duration::from_secs(self.memory_sync_interval_secs)),
            memory_deletions: self.memory_sync_deletions,
            stream_read_timeout: Duration::from_secs(self.stream_read_timeout_secs.max(1)),
            skill_limits: Default::default(),
            workspace_retention: Duration::from_secs(self.workspace_retention_secs.max(1)),
            drain_grace: crate::worker::config::DEFAULT_SHUTDOWN_GRACE,
        })
    }
}
