//! Reading a daemon's TOML configuration file (`hands worker`, `hands
//! gateway`): parsed into raw serde types that reject unknown keys, then
//! validated by their owner. Every error names the file, and an invalid value
//! its dotted key.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Causes are part of each message and not also a `source()`, so that a
/// printer of error chains shows them once.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {}", cause.to_string().trim_end())]
    Parse {
        path: PathBuf,
        cause: Box<toml::de::Error>,
    },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
    /// A policy file the configuration's environments are looked up in; the
    /// error names that file and its key.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
}

/// The text of the file at `path`.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
        path: path.to_path_buf(),
        cause,
    })
}

/// `text` (from `path`) as the raw type `T`.
pub fn parse<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|cause| ConfigError::Parse {
        path: path.to_path_buf(),
        cause: Box::new(cause),
    })
}

/// Builds the error of an invalid value at `key` in `path`.
pub fn invalid(path: &Path) -> impl Fn(&'static str, String) -> ConfigError + '_ {
    move |key, message| ConfigError::Invalid {
        path: path.to_path_buf(),
        key,
        message,
    }
}
