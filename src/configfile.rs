//! Reading a daemon's TOML configuration file (`hands worker`, `hands
//! gateway`): parsed into raw serde types that reject unknown keys, then
//! validated by their owner. Every error names the file, and an invalid value
//! its dotted key.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

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

/// The text of the file at `path`.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// `text` (from `path`) as the raw type `T`.
pub fn parse<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source: Box::new(source),
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
