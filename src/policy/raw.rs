//! The policy file exactly as TOML spells it: serde types that accept only the keys of
//! the schema (`deny_unknown_fields` everywhere) and check nothing else. The parent
//! module turns them into [`super::Policy`]; nothing else may use these types.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::NetworkMode;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub description: Option<String>,
    pub filesystem: RawFilesystem,
    pub network: RawNetwork,
    pub limits: RawLimits,
    pub tools: RawTools,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub sandbox: RawSandbox,
    pub egress: Option<RawEgress>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFilesystem {
    pub read_only: Vec<String>,
    pub tmp_size: RawSize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNetwork {
    pub mode: NetworkMode,
}

/// Rules as strings, so a bad one is reported by [`crate::egress`] with its index.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEgress {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    #[serde(default)]
    pub resolvers: Vec<String>,
    #[serde(default)]
    pub allow_broad: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub memory: RawSize,
    pub pids: u64,
    pub cpu: f64,
    pub output_bytes: RawSize,
    pub file_bytes: RawSize,
    pub bash_timeout: RawDuration,
    pub call_timeout: RawDuration,
    pub disk: RawSize,
    pub disk_inodes: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTools {
    /// Names, not [`crate::tools::Tool`]s, so an unknown name is reported with the
    /// list of known tools and its index rather than as a serde variant error.
    pub enabled: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSandbox {
    #[serde(default)]
    pub allow_degraded: Vec<String>,
    #[serde(default)]
    pub landlock: super::LandlockMode,
}

/// A size as written: a TOML integer (bytes) or a string with a unit. Checked later,
/// so the error names the key in the module's own words.
#[derive(Debug)]
pub(super) enum RawSize {
    Bytes(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = RawSize;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a size: a number of bytes or a string such as "256MiB""#)
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_owned()))
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A duration as written (`"120s"`); a custom visitor only so that a bare integer is
/// refused with a message that shows the expected spelling.
#[derive(Debug)]
pub(super) struct RawDuration(pub String);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;

        impl Visitor<'_> for DurationVisitor {
            type Value = RawDuration;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a duration string such as "120s", "500ms" or "5m""#)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration(v.to_owned()))
            }
        }

        deserializer.deserialize_any(DurationVisitor)
    }
}
