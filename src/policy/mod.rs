//! Environment policies: `policies/<name>.toml` parsed, validated once, and trusted.
//!
//! An *environment* is what a brain chooses when it opens a session; its policy is the
//! local authority on what a session in it may see and use, and a brain can never
//! widen it. Each environment is one file, `<name>.toml`, and the file stem is the
//! environment name (`[a-z0-9][a-z0-9_-]*`, at most 64 characters, because it ends
//! up in cgroup and directory names). Nothing but this module reads policy TOML: a file
//! goes into the serde types of `raw` (unknown keys rejected at every level), then
//! [`Policy::from_toml_str`] checks every value once and the rest of the crate trusts
//! the resulting [`Policy`].
//!
//! Lookup ([`lookup`]): the command line's directories, `$HANDS_POLICY_DIR`, a worker
//! configuration's `policy_dirs`, `/etc/hands/policies`, then the policies compiled
//! into the binary (`default`, `strict`, `build`, `packages`, the files of `policies/`), so
//! `hands exec --env default` works on a fresh machine. Every file found is
//! validated: an invalid one is an error, never a silent fall-back to the built-in.
//!
//! The operator's reference for every key is `docs/policy.md`.
//!
//! # Schema
//!
//! Every key is required unless marked optional. Sizes are a TOML integer (bytes) or a
//! string with a binary unit: `"512KiB"`, `"256MiB"`, `"1GiB"`, `"1TiB"`; decimal
//! units (`KB`, `MB`, `GB`) are rejected as ambiguous (see [`units`]). Durations are
//! strings with `ms`, `s` or `m`: `"500ms"`, `"120s"`, `"5m"`.
//!
//! ```toml
//! description = "..."        # optional, free text shown by `hands policy check`
//!
//! [filesystem]
//! read_only = ["/usr", "/etc"]  # host paths visible read-only (and executable)
//! tmp_size = "256MiB"           # size of the session's private tmpfs at /tmp, >= 1 MiB
//!
//! [network]
//! mode = "loopback"          # "none" | "loopback" | "egress"
//!
//! [limits]
//! memory = "1GiB"            # cgroup memory limit of the whole session, >= 16 MiB
//! pids = 512                 # cgroup pids limit of the whole session, >= 16
//! cpu = 1.0                  # CPU cores as a CFS quota, > 0 and <= 1024
//! output_bytes = 102400      # bash output kept per call, and grep output; 1 KiB..=64 MiB
//! file_bytes = 262144        # read/edit text cap (the SDK's max_file_bytes); 1 KiB..=64 MiB
//! bash_timeout = "120s"      # bash timeout when the call gives no timeout_ms, > 0
//! call_timeout = "150s"      # hard cap of any tool call, > bash_timeout
//! disk = "8GiB"              # bytes of the workspace hands makes, 16 MiB..=16 TiB
//! disk_inodes = 1000000      # files, directories and links in it, 1024..=2^32-1
//!
//! [tools]
//! enabled = ["bash", "read", "write", "edit", "glob", "grep"]  # non-empty, no duplicates
//!
//! [env]                      # optional: NAME = "value" for processes in the sandbox
//! LANG = "C.UTF-8"
//!
//! [sandbox]                  # optional
//! landlock = "covered"       # or "full": what a landlock right the kernel lacks means
//! allow_degraded = []        # kernel features the operator accepts running without
//!
//! [egress]                   # required with mode = "egress", refused with any other
//! allow = ["pypi.org:443", "*.pythonhosted.org:443"]  # non-empty: what may be reached
//! deny = []                  # optional: refused even when allowed
//! resolvers = []             # optional: DNS servers; empty = the host's resolv.conf
//! allow_broad = false        # optional: accept too-broad allow rules (`*`, `*.com`)
//! ```
//!
//! Rules that are not obvious from the table:
//!
//! - `filesystem.read_only`: absolute, written in normal form (no `.`, `..`, `//` or
//!   trailing `/`; the error shows the normal form), no duplicates, not `/`, and not
//!   equal to, inside or above a path the sandbox mounts itself: `/proc`, `/sys`,
//!   `/dev`, `/tmp` and the workspace mount point `/workspace`. Validation is lexical:
//!   policies are checked on machines other than the one that runs them, so a path
//!   need not exist (`/lib64` is absent on arm64). Host symlinks such as Debian's
//!   `/bin -> usr/bin` are listed as-is; the sandbox recreates them.
//! - `network.mode`: both give the session a network namespace of its own. `"none"`:
//!   no interface up, not even `lo`, and landlock denies every TCP bind and connect as
//!   a second wall. `"loopback"`: only `lo` up, so a process may serve and reach
//!   itself, nothing else. `"egress"`: `lo` up, and the hosts of the `[egress]`
//!   table reachable through the worker's egress layer (a proxy in the worker and
//!   an nftables barrier in the session's namespace), nothing else.
//! - `[egress]` (see [`crate::egress`] for the rule syntax, the address classes and
//!   the decision): present exactly when `network.mode = "egress"`, and then
//!   `allow` is non-empty; `Policy::egress` is `Some` exactly then. Each rule
//!   of `allow` and `deny` is checked (an error names it: `egress.allow[2]`), a
//!   rule listed twice (in normal form) is refused, and so is a too-broad allow
//!   rule unless `allow_broad = true`. `resolvers` are `address` or
//!   `address:port` (port 53 by default, IPv6 bracketed with a port).
//! - `limits.call_timeout` must be strictly greater than `limits.bash_timeout`: with
//!   equal deadlines the two race and the model sees either bash's own
//!   `bash command timed out` or the runner's `tool 'bash' timed out` (the SDK keeps
//!   the same 30 s margin, 120 s vs 150 s, for the same reason).
//! - `limits.output_bytes` and `limits.file_bytes` have an upper bound because the
//!   worker buffers that much per call; without one a policy could defeat the
//!   worker's flat memory use.
//! - `env`: names match `[A-Za-z_][A-Za-z0-9_]*`; values contain no NUL. Reserved (the
//!   worker sets them and a policy must not override them): `PS1`, `PS2`, `TERM` (the
//!   bash tool's output framing depends on them), the proxy variables `HTTP_PROXY`,
//!   `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY` in either case (owned by the egress layer),
//!   and every `ANTHROPIC_*` name (the SDK worker never lets those reach a tool
//!   process; credentials belong in the vault, not in a policy). `PATH` and `HOME`
//!   are allowed and replace the sandbox's defaults.
//! - `limits.disk` and `limits.disk_inodes` bound a workspace hands makes itself (no
//!   `--workspace`): it is a filesystem of its own of that size, so the kernel answers
//!   `No space left on device` inside the session and the host's disks are untouched.
//!   A little of it is the filesystem's own metadata. A directory the operator gives
//!   is not bounded by them.
//! - `sandbox.landlock`: on a kernel older than landlock ABI 6 some rights do not
//!   exist. `"covered"` (the default) runs when another layer of the session gives
//!   the same guarantee for each missing right, and says which (see
//!   [`crate::sandbox::landlock::coverage`]); `"full"` refuses every missing right
//!   that `allow_degraded` does not name.
//! - `sandbox.allow_degraded`: `landlock-truncate`, `landlock-net`, `landlock-ioctl`,
//!   `landlock-scope`, `workspace-disk` (see [`Degradation`] for what each gives up);
//!   anything else is rejected. Empty (the default) means fail closed: a workspace
//!   hands cannot make as a filesystem of its own, or (with `landlock = "full"`) a
//!   landlock right the kernel lacks, is refused.

pub mod lookup;
mod raw;
pub mod units;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::egress::EgressPolicy;
use crate::sandbox::mounts;
use crate::tools::Tool;
use raw::{RawDuration, RawEgress, RawLimits, RawPolicy, RawSize};

/// A validated environment policy. Every field has passed the checks of the module
/// doc; consumers use the values as they are.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The environment name (the file stem).
    pub name: String,
    pub description: Option<String>,
    pub filesystem: Filesystem,
    pub network: Network,
    pub limits: Limits,
    pub tools: BTreeSet<Tool>,
    /// Extra variables for processes in the sandbox, applied over the defaults.
    pub env: BTreeMap<String, String>,
    pub allow_degraded: BTreeSet<Degradation>,
    /// What a landlock right the kernel lacks means for this environment.
    pub landlock: LandlockMode,
    /// The `[egress]` table: `Some` exactly when `network.mode` is `"egress"`
    /// (with at least one allow rule), `None` otherwise.
    pub egress: Option<EgressPolicy>,
}

/// What a session does about a landlock right its kernel lacks (a kernel older
/// than landlock ABI 6). Deserialised directly: serde's "unknown variant, expected
/// `covered` or `full`" says everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LandlockMode {
    /// Run when another layer of the session gives the same guarantee for each
    /// missing right (read-only mounts, the session's own namespaces, seccomp),
    /// and say which; refuse a right nothing covers.
    #[default]
    Covered,
    /// Refuse every missing right unless `allow_degraded` names it (fail closed
    /// on older kernels).
    Full,
}

impl LandlockMode {
    pub fn name(self) -> &'static str {
        match self {
            LandlockMode::Covered => "covered",
            LandlockMode::Full => "full",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filesystem {
    /// Absolute, normalised host paths exposed read-only and executable, in file order.
    pub read_only: Vec<PathBuf>,
    /// Size of the private tmpfs at `/tmp`, in bytes.
    pub tmp_size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    pub mode: NetworkMode,
}

/// How much network a session has. Deserialised directly: serde's "unknown variant,
/// expected one of `none`, `loopback`, `egress`" already says everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A network namespace with no interface up, and no TCP bind or connect (landlock).
    None,
    /// A private network namespace with only `lo` up.
    Loopback,
    /// A private network namespace with `lo` up, from which the hosts of the
    /// policy's `[egress]` table are reachable through the worker, and nothing else.
    Egress,
}

impl NetworkMode {
    pub fn name(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Loopback => "loopback",
            NetworkMode::Egress => "egress",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// cgroup memory limit of the whole session (tmpfs pages included: they are charged
    /// to the cgroup of the process that writes them).
    pub memory_bytes: u64,
    /// cgroup pids limit of the whole session.
    pub pids: u64,
    /// CPU cores, as a CFS quota over the period.
    pub cpu: f64,
    /// bash output kept per call (the tail) and grep output.
    pub output_bytes: usize,
    /// Text cap of read and edit.
    pub file_bytes: u64,
    /// bash timeout when a call gives no `timeout_ms`.
    pub bash_timeout: Duration,
    /// Hard cap of any tool call; always greater than `bash_timeout`.
    pub call_timeout: Duration,
    /// Size of a workspace hands makes (its own filesystem).
    pub disk_bytes: u64,
    /// Inodes of that filesystem.
    pub disk_inodes: u64,
}

/// A confinement feature the operator accepts losing when the host lacks it. Each
/// names one landlock ABI step or the workspace filesystem; what still holds
/// without it is on the variant. The landlock steps only matter with
/// `sandbox.landlock = "full"`: by default a missing step that another layer
/// covers is accepted anyway. The vocabulary is deliberately small: a missing
/// namespace, cgroup controller or landlock itself cannot be waived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Degradation {
    /// Landlock ABI < 3: truncation is not a separate right, so a file the session
    /// can open for writing by DAC but not by landlock could still be truncated.
    LandlockTruncate,
    /// Landlock ABI < 4: no TCP bind/connect rules. The network namespace still
    /// confines: with `mode = "none"` or `"loopback"` nothing outside is routable.
    LandlockNet,
    /// Landlock ABI < 5: ioctls on device files are not restricted. Only `/dev`
    /// nodes the sandbox itself creates are reachable.
    LandlockIoctl,
    /// Landlock ABI < 6: no scoping of abstract unix sockets and signals. The pid
    /// namespace and distinct uids still keep sessions from signalling each other.
    LandlockScope,
    /// No loop devices or no `mke2fs`: a workspace hands makes is a plain directory
    /// under the state directory instead of a filesystem of its own, so
    /// `limits.disk` does not bound it, and set-user-ID files are refused by seccomp
    /// alone (the host mount is not `nosuid`). It stays private and is removed
    /// without recursion at close.
    WorkspaceDisk,
}

impl Degradation {
    pub const ALL: [Degradation; 5] = [
        Degradation::LandlockTruncate,
        Degradation::LandlockNet,
        Degradation::LandlockIoctl,
        Degradation::LandlockScope,
        Degradation::WorkspaceDisk,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Degradation::LandlockTruncate => "landlock-truncate",
            Degradation::LandlockNet => "landlock-net",
            Degradation::LandlockIoctl => "landlock-ioctl",
            Degradation::LandlockScope => "landlock-scope",
            Degradation::WorkspaceDisk => "workspace-disk",
        }
    }

    pub fn from_name(name: &str) -> Option<Degradation> {
        Degradation::ALL.into_iter().find(|d| d.name() == name)
    }
}

impl fmt::Display for Degradation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a policy could not be loaded. Every variant about a file carries its path; a
/// bad value also carries the dotted key (`limits.memory`, `filesystem.read_only[2]`).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    // Causes are part of the message and not also a `source()`, so that a
    // printer of error chains shows them once.
    #[error("{}: cannot read: {cause}", path.display())]
    Read { path: PathBuf, cause: io::Error },
    /// A directory of the lookup that cannot be listed (or, named explicitly,
    /// does not exist).
    #[error("policy directory {} (from {origin}): {cause}", path.display())]
    Dir {
        path: PathBuf,
        origin: lookup::Origin,
        cause: io::Error,
    },
    /// TOML syntax, a missing or unknown key, or a value of the wrong type; toml's
    /// message carries the line, column and key.
    #[error("{}: {}", path.display(), cause.to_string().trim_end())]
    Parse {
        path: PathBuf,
        cause: Box<toml::de::Error>,
    },
    #[error("{}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{}environment name `{name}` is invalid: {NAME_RULE}", path_prefix(.path.as_deref()))]
    Name { path: Option<PathBuf>, name: String },
    #[error("{}: a policy file must be named <environment>.toml", path.display())]
    FileName { path: PathBuf },
    #[error("no policy for environment `{name}`: {}", not_found(name, searched))]
    NotFound {
        name: String,
        searched: Vec<PathBuf>,
    },
}

fn path_prefix(path: Option<&Path>) -> String {
    path.map(|p| format!("{}: ", p.display()))
        .unwrap_or_default()
}

fn not_found(name: &str, searched: &[PathBuf]) -> String {
    let dirs = if searched.is_empty() {
        "(no policy directories)".to_string()
    } else {
        let dirs: Vec<_> = searched.iter().map(|d| d.display().to_string()).collect();
        dirs.join(", ")
    };
    let builtin: Vec<_> = BUILTIN.iter().map(|(n, _)| *n).collect();
    format!(
        "no {name}.toml in {dirs}, and no built-in policy of that name (built in: {})",
        builtin.join(", ")
    )
}

type Result<T, E = PolicyError> = std::result::Result<T, E>;

const MAX_NAME_LEN: usize = 64;
// Spells out MAX_NAME_LEN: a const string cannot be formatted.
const NAME_RULE: &str = "it must match [a-z0-9][a-z0-9_-]* and be at most 64 characters";

/// The policies compiled into the binary, so a fresh machine has working environments.
const BUILTIN: [(&str, &str); 4] = [
    ("default", include_str!("../../policies/default.toml")),
    ("strict", include_str!("../../policies/strict.toml")),
    ("build", include_str!("../../policies/build.toml")),
    ("packages", include_str!("../../policies/packages.toml")),
];

/// Paths the sandbox mounts itself; a read-only host path on, in or above one of them
/// would shadow or expose what the sandbox puts there.
const RESERVED_PATHS: [&str; 5] = ["/proc", "/sys", "/dev", "/tmp", mounts::WORKSPACE];

const MIN_MEMORY: u64 = 16 << 20;
/// ext4 needs a few MiB of its own; below this a workspace is all metadata.
const MIN_DISK: u64 = 16 << 20;
/// ext4 with 4 KiB blocks.
const MAX_DISK: u64 = 16 << 40;
const MIN_INODES: u64 = 1024;
const MAX_INODES: u64 = u32::MAX as u64;
const MIN_TMP: u64 = 1 << 20;
const MIN_PIDS: u64 = 16;
const MAX_CPU: f64 = 1024.0;
const MIN_BUFFER: u64 = 1 << 10;
const MAX_BUFFER: u64 = 64 << 20;

/// Names the worker sets itself (see the module doc for why each is reserved).
const RESERVED_ENV: [&str; 11] = [
    "PS1",
    "PS2",
    "TERM",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
];

/// True when `name` is a valid environment name; path separators, dots and upper case
/// are excluded so a name can never walk out of a policy directory.
pub fn is_valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'0'..=b'9'))
        && name.len() <= MAX_NAME_LEN
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
}

impl Policy {
    /// Parses and validates the policy of environment `name` from `text`; `path` is
    /// only used in error messages.
    pub fn from_toml_str(name: &str, text: &str, path: &Path) -> Result<Policy> {
        if !is_valid_name(name) {
            return Err(PolicyError::Name {
                path: Some(path.to_path_buf()),
                name: name.to_string(),
            });
        }
        let raw: RawPolicy = toml::from_str(text).map_err(|cause| PolicyError::Parse {
            path: path.to_path_buf(),
            cause: Box::new(cause),
        })?;
        Validator { path }.policy(name, raw)
    }

    /// Loads a policy file, `<name>.toml`; the environment name is the file stem.
    pub fn load(path: &Path) -> Result<Policy> {
        let name = match (path.file_stem(), path.extension()) {
            (Some(stem), Some(ext)) if ext == "toml" => stem.to_string_lossy(),
            _ => {
                return Err(PolicyError::FileName {
                    path: path.to_path_buf(),
                })
            }
        };
        let text = std::fs::read_to_string(path).map_err(|cause| PolicyError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        Policy::from_toml_str(&name, &text, path)
    }
}

/// The built-in environments, by name.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    policies: BTreeMap<String, Policy>,
}

impl PolicySet {
    /// The policies compiled into the binary.
    pub fn builtin() -> PolicySet {
        let policies = BUILTIN
            .iter()
            .map(|(name, _)| {
                // Every built-in policy is parsed by the unit tests, so this cannot fail
                // in a tested build.
                let policy = builtin(name)
                    .and_then(Result::ok)
                    .expect("built-in policy is valid");
                (policy.name.clone(), policy)
            })
            .collect();
        PolicySet { policies }
    }

    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.policies.get(name)
    }

    /// The policies in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values()
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }
}

/// The text of the built-in policy `name`, if there is one.
pub fn builtin_text(name: &str) -> Option<&'static str> {
    BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// The built-in policy `name`, if there is one.
fn builtin(name: &str) -> Option<Result<Policy>> {
    let (_, text) = BUILTIN.iter().find(|(n, _)| *n == name)?;
    let path = PathBuf::from(format!("(built in) policies/{name}.toml"));
    Some(Policy::from_toml_str(name, text, &path))
}

/// Turns raw values into validated ones; carries the file path for every error.
struct Validator<'a> {
    path: &'a Path,
}

impl Validator<'_> {
    fn error(&self, key: impl Into<String>, message: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            path: self.path.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// Validates in the order the keys appear in a file, so the first error reported
    /// is the first one a reader meets.
    fn policy(&self, name: &str, raw: RawPolicy) -> Result<Policy> {
        let filesystem = Filesystem {
            read_only: self.read_only(&raw.filesystem.read_only)?,
            tmp_size: self.size(
                "filesystem.tmp_size",
                &raw.filesystem.tmp_size,
                MIN_TMP,
                u64::MAX,
            )?,
        };
        Ok(Policy {
            name: name.to_string(),
            description: raw.description,
            filesystem,
            network: Network {
                mode: raw.network.mode,
            },
            limits: self.limits(&raw.limits)?,
            tools: self.tools(&raw.tools.enabled)?,
            env: self.env(raw.env)?,
            allow_degraded: self.degradations(&raw.sandbox.allow_degraded)?,
            landlock: raw.sandbox.landlock,
            egress: self.egress(raw.network.mode, raw.egress.as_ref())?,
        })
    }

    /// The `[egress]` table, required with `mode = "egress"` and refused with
    /// any other mode (a table that does nothing would mislead its reader).
    fn egress(&self, mode: NetworkMode, raw: Option<&RawEgress>) -> Result<Option<EgressPolicy>> {
        let raw = match (mode, raw) {
            (NetworkMode::Egress, Some(raw)) => raw,
            (NetworkMode::Egress, None) => {
                return Err(self.error(
                    "egress",
                    "network.mode = \"egress\" needs an [egress] table with an allow list",
                ))
            }
            (_, None) => return Ok(None),
            (other, Some(_)) => {
                return Err(self.error(
                    "egress",
                    format!(
                        "[egress] applies only to network.mode = \"egress\" (this policy's mode is \"{}\")",
                        other.name()
                    ),
                ))
            }
        };
        if raw.allow.is_empty() {
            return Err(self.error(
                "egress.allow",
                "must allow at least one destination (use network.mode = \"loopback\" for none)",
            ));
        }
        EgressPolicy::parse(&raw.allow, &raw.deny, &raw.resolvers, raw.allow_broad)
            .map(Some)
            .map_err(|e| self.error(format!("egress.{}", e.key), e.message))
    }

    fn limits(&self, raw: &RawLimits) -> Result<Limits> {
        let memory_bytes = self.size("limits.memory", &raw.memory, MIN_MEMORY, u64::MAX)?;
        if raw.pids < MIN_PIDS {
            return Err(self.error("limits.pids", format!("must be at least {MIN_PIDS}")));
        }
        // Written so that NaN fails too (every comparison with NaN is false).
        if !(raw.cpu > 0.0 && raw.cpu <= MAX_CPU) {
            return Err(self.error(
                "limits.cpu",
                format!("must be greater than 0 and at most {MAX_CPU}"),
            ));
        }
        let output_bytes = self.size(
            "limits.output_bytes",
            &raw.output_bytes,
            MIN_BUFFER,
            MAX_BUFFER,
        )?;
        let file_bytes = self.size("limits.file_bytes", &raw.file_bytes, MIN_BUFFER, MAX_BUFFER)?;
        let bash_timeout = self.duration("limits.bash_timeout", &raw.bash_timeout)?;
        let call_timeout = self.duration("limits.call_timeout", &raw.call_timeout)?;
        if call_timeout <= bash_timeout {
            return Err(self.error(
                "limits.call_timeout",
                format!(
                    "must be greater than limits.bash_timeout ({}), or the two deadlines race",
                    raw.bash_timeout.0.trim()
                ),
            ));
        }
        let disk_bytes = self.size("limits.disk", &raw.disk, MIN_DISK, MAX_DISK)?;
        if !(MIN_INODES..=MAX_INODES).contains(&raw.disk_inodes) {
            return Err(self.error(
                "limits.disk_inodes",
                format!("must be between {MIN_INODES} and {MAX_INODES}"),
            ));
        }
        Ok(Limits {
            memory_bytes,
            pids: raw.pids,
            cpu: raw.cpu,
            disk_bytes,
            disk_inodes: raw.disk_inodes,
            // MAX_BUFFER (64 MiB) fits the usize of every target hands builds for.
            output_bytes: usize::try_from(output_bytes).expect("bounded by MAX_BUFFER"),
            file_bytes,
            bash_timeout,
            call_timeout,
        })
    }

    fn size(&self, key: &str, raw: &RawSize, min: u64, max: u64) -> Result<u64> {
        let bytes = match raw {
            RawSize::Bytes(n) => {
                u64::try_from(*n).map_err(|_| self.error(key, "must not be negative"))?
            }
            RawSize::Text(text) => units::parse_size(text).map_err(|m| self.error(key, m))?,
        };
        if bytes < min {
            return Err(self.error(key, format!("must be at least {}", units::format_size(min))));
        }
        if bytes > max {
            return Err(self.error(key, format!("must be at most {}", units::format_size(max))));
        }
        Ok(bytes)
    }

    fn duration(&self, key: &str, raw: &RawDuration) -> Result<Duration> {
        let duration = units::parse_duration(&raw.0).map_err(|m| self.error(key, m))?;
        if duration.is_zero() {
            return Err(self.error(key, "must be greater than zero"));
        }
        Ok(duration)
    }

    fn read_only(&self, raw: &[String]) -> Result<Vec<PathBuf>> {
        let mut paths: Vec<PathBuf> = Vec::with_capacity(raw.len());
        for (i, text) in raw.iter().enumerate() {
            let key = format!("filesystem.read_only[{i}]");
            let path = read_only_path(text).map_err(|m| self.error(&key, m))?;
            if paths.contains(&path) {
                return Err(self.error(&key, format!("`{text}` is listed twice")));
            }
            paths.push(path);
        }
        Ok(paths)
    }

    fn tools(&self, raw: &[String]) -> Result<BTreeSet<Tool>> {
        if raw.is_empty() {
            return Err(self.error("tools.enabled", "must enable at least one tool"));
        }
        let mut tools = BTreeSet::new();
        for (i, name) in raw.iter().enumerate() {
            let key = format!("tools.enabled[{i}]");
            let tool = Tool::from_name(name).ok_or_else(|| {
                let known: Vec<_> = Tool::ALL.iter().map(|t| t.name()).collect();
                self.error(
                    &key,
                    format!("unknown tool `{name}` (known: {})", known.join(", ")),
                )
            })?;
            if !tools.insert(tool) {
                return Err(self.error(&key, format!("`{name}` is listed twice")));
            }
        }
        Ok(tools)
    }

    fn env(&self, raw: BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
        for (name, value) in &raw {
            let key = format!("env.{name}");
            let mut bytes = name.bytes();
            let well_formed = matches!(bytes.next(), Some(b'A'..=b'Z' | b'a'..=b'z' | b'_'))
                && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !well_formed {
                return Err(self.error(&key, "names must match [A-Za-z_][A-Za-z0-9_]*"));
            }
            if RESERVED_ENV.contains(&name.as_str()) || name.starts_with("ANTHROPIC_") {
                return Err(self.error(&key, "is reserved: the worker sets it itself"));
            }
            if value.contains('\0') {
                return Err(self.error(&key, "values must not contain NUL"));
            }
        }
        Ok(raw)
    }

    fn degradations(&self, raw: &[String]) -> Result<BTreeSet<Degradation>> {
        let mut set = BTreeSet::new();
        for (i, name) in raw.iter().enumerate() {
            let key = format!("sandbox.allow_degraded[{i}]");
            let degradation = Degradation::from_name(name).ok_or_else(|| {
                let known: Vec<_> = Degradation::ALL.iter().map(|d| d.name()).collect();
                self.error(
                    &key,
                    format!("unknown degradation `{name}` (known: {})", known.join(", ")),
                )
            })?;
            if !set.insert(degradation) {
                return Err(self.error(&key, format!("`{name}` is listed twice")));
            }
        }
        Ok(set)
    }
}

/// Checks one `filesystem.read_only` entry; the message is for the caller to wrap.
fn read_only_path(text: &str) -> Result<PathBuf, String> {
    if text.contains('\0') {
        return Err("must not contain NUL".to_string());
    }
    let path = Path::new(text);
    if !path.is_absolute() {
        return Err(format!("`{text}` is not an absolute path"));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("`{text}` must not contain `..`"));
    }
    // `components()` drops `.`, repeated and trailing slashes: what it yields is the
    // normal form. Requiring the file to spell it means every reader of the policy
    // sees the same path the sandbox uses.
    let normal: PathBuf = path.components().collect();
    if normal.as_os_str() != path.as_os_str() {
        return Err(format!(
            "`{text}` is not in normal form; write it as `{}`",
            normal.display()
        ));
    }
    if normal == Path::new("/") {
        return Err("must not be `/`: that would expose the whole host".to_string());
    }
    if let Some(reserved) = RESERVED_PATHS
        .iter()
        .map(Path::new)
        .find(|r| normal.starts_with(r) || r.starts_with(&normal))
    {
        return Err(format!(
            "`{text}` overlaps `{}`, which the sandbox mounts itself",
            reserved.display()
        ));
    }
    Ok(normal)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid policy; tests replace one line of it to break exactly one thing.
    const VALID: &str = r#"
description = "test"
[filesystem]
read_only = ["/usr", "/etc"]
tmp_size = "256MiB"
[network]
mode = "loopback"
[limits]
memory = "1GiB"
pids = 512
cpu = 1.0
output_bytes = 102400
file_bytes = 262144
bash_timeout = "120s"
call_timeout = "150s"
disk = "1GiB"
disk_inodes = 65536
[tools]
enabled = ["bash", "read", "write", "edit", "glob", "grep"]
"#;

    const PATH: &str = "policies/x.toml";

    fn parse(text: &str) -> Result<Policy> {
        Policy::from_toml_str("x", text, Path::new(PATH))
    }

    /// `VALID` with the line starting with `prefix` replaced by `line`.
    fn with_line(prefix: &str, line: &str) -> String {
        let mut replaced = false;
        let text = VALID
            .lines()
            .map(|l| {
                if l.starts_with(prefix) && !replaced {
                    replaced = true;
                    line
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(replaced, "no line starts with {prefix:?}");
        text
    }

    /// Asserts that `text` fails on `key` and that the message names file and key.
    fn rejected(text: &str, key: &str, needle: &str) {
        let error = parse(text).expect_err("policy should be rejected");
        match &error {
            PolicyError::Invalid { path, key: k, .. } => {
                assert_eq!(path, Path::new(PATH));
                assert_eq!(k, key, "{error}");
            }
            other => panic!("expected an Invalid error on {key}, got {other:?}"),
        }
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("{PATH}: {key}: ")),
            "{message}"
        );
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }

    /// Asserts a toml-level (syntax, unknown key, type) error naming the file and
    /// containing `needle`.
    fn parse_error(text: &str, needle: &str) {
        let error = parse(text).expect_err("policy should be rejected");
        assert!(matches!(error, PolicyError::Parse { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.starts_with(&format!("{PATH}: ")), "{message}");
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }

    #[test]
    fn valid_policy() {
        let policy = parse(VALID).unwrap();
        assert_eq!(policy.name, "x");
        assert_eq!(policy.description.as_deref(), Some("test"));
        assert_eq!(
            policy.filesystem.read_only,
            [PathBuf::from("/usr"), PathBuf::from("/etc")]
        );
        assert_eq!(policy.filesystem.tmp_size, 256 << 20);
        assert_eq!(policy.network.mode, NetworkMode::Loopback);
        assert_eq!(
            policy.limits,
            Limits {
                memory_bytes: 1 << 30,
                pids: 512,
                cpu: 1.0,
                output_bytes: 102400,
                file_bytes: 262144,
                bash_timeout: Duration::from_secs(120),
                call_timeout: Duration::from_secs(150),
                disk_bytes: 1 << 30,
                disk_inodes: 65536,
            }
        );
        assert_eq!(policy.tools, Tool::ALL.into_iter().collect());
        assert!(policy.env.is_empty());
        assert!(policy.allow_degraded.is_empty());
        assert_eq!(policy.egress, None);
    }

    /// `VALID` in egress mode with `table` as its `[egress]` table.
    fn egress(table: &str) -> String {
        format!(
            "{}\n[egress]\n{table}\n",
            with_line("mode", "mode = \"egress\"")
        )
    }

    #[test]
    fn egress_table() {
        let policy = parse(&egress(
            r#"allow = ["pypi.org:443", "*.pythonhosted.org", "10.20.0.0/16:5432"]
deny = ["evil.pythonhosted.org"]
resolvers = ["1.1.1.1", "[2606:4700::1111]:53"]"#,
        ))
        .unwrap();
        assert_eq!(policy.network.mode, NetworkMode::Egress);
        let table = policy.egress.unwrap();
        let allow: Vec<&str> = table.allow.iter().map(|r| r.text()).collect();
        assert_eq!(
            allow,
            ["pypi.org:443", "*.pythonhosted.org", "10.20.0.0/16:5432"]
        );
        assert_eq!(table.deny[0].text(), "evil.pythonhosted.org");
        assert_eq!(table.resolvers.len(), 2);
        assert!(!table.allow_broad);
        let d = table.decide(
            Some("evil.pythonhosted.org"),
            443,
            &["151.101.0.223".parse().unwrap()],
            &[],
        );
        assert!(!d.is_allowed(), "{d}");

        // Resolvers and deny are optional.
        let policy = parse(&egress(r#"allow = ["pypi.org"]"#)).unwrap();
        assert!(policy.egress.unwrap().resolvers.is_empty());
        let policy = parse(&egress("allow = [\"*.com\"]\nallow_broad = true")).unwrap();
        assert!(policy.egress.unwrap().allow_broad);
    }

    #[test]
    fn bad_egress() {
        rejected(
            &with_line("mode", "mode = \"egress\""),
            "egress",
            "needs an [egress] table",
        );
        rejected(
            &format!("{VALID}\n[egress]\nallow = [\"pypi.org\"]\n"),
            "egress",
            "applies only to network.mode = \"egress\" (this policy's mode is \"loopback\")",
        );
        rejected(&egress("allow = []"), "egress.allow", "at least one");
        rejected(
            &egress("deny = [\"x.test\"]"),
            "egress.allow",
            "at least one",
        );
        rejected(
            &egress(r#"allow = ["pypi.org", "github.com", "10.0.0.1/8"]"#),
            "egress.allow[2]",
            "write the network as `10.0.0.0/8`",
        );
        rejected(
            &egress(r#"allow = ["pypi.org", "*.co.uk"]"#),
            "egress.allow[1]",
            "too broad: `*.co.uk` allows every site under `co.uk`, a public suffix (anyone can register a name there); set allow_broad = true in [egress] to allow it anyway",
        );
        rejected(
            &egress(r#"allow = ["*"]"#),
            "egress.allow[0]",
            "allow_broad = true",
        );
        rejected(
            &egress("allow = [\"pypi.org\"]\ndeny = [\"a.*.b\"]"),
            "egress.deny[0]",
            "whole first label",
        );
        rejected(
            &egress("allow = [\"pypi.org\"]\nresolvers = [\"dns.google\"]"),
            "egress.resolvers[0]",
            "not an IP address",
        );
        rejected(
            &egress(r#"allow = ["pypi.org:0"]"#),
            "egress.allow[0]",
            "out of range",
        );
        parse_error(
            &egress("allow = [\"pypi.org\"]\nports = [443]"),
            "unknown field `ports`",
        );
        parse_error(&egress("allow = \"pypi.org\""), "invalid type");
    }

    #[test]
    fn optional_tables() {
        let text = format!(
            r#"{VALID}
[env]
LANG = "C.UTF-8"
_x1 = ""
[sandbox]
allow_degraded = ["landlock-net", "landlock-scope"]
landlock = "full"
"#
        );
        let policy = parse(&text).unwrap();
        assert_eq!(policy.landlock, LandlockMode::Full);
        assert_eq!(parse(VALID).unwrap().landlock, LandlockMode::Covered);
        let err = parse(&format!("{VALID}\n[sandbox]\nlandlock = \"partial\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("covered") && err.contains("full"), "{err}");
        assert_eq!(policy.env["LANG"], "C.UTF-8");
        assert_eq!(policy.env["_x1"], "");
        assert_eq!(
            policy.allow_degraded,
            [Degradation::LandlockNet, Degradation::LandlockScope].into()
        );
        // An integer cpu and integer sizes are fine.
        let policy = parse(&with_line("cpu", "cpu = 2")).unwrap();
        assert_eq!(policy.limits.cpu, 2.0);
    }

    #[test]
    fn shipped_policies_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let set = lookup::Lookup::new(&[dir], None, None).load().unwrap();
        let set = PolicySet {
            policies: set
                .iter()
                .filter(|e| matches!(e.source, lookup::Source::File(_)))
                .map(|e| (e.policy.name.clone(), e.policy.clone()))
                .collect(),
        };
        for (name, _) in BUILTIN {
            assert!(set.get(name).is_some(), "policies/{name}.toml is missing");
        }
        let builtin = PolicySet::builtin();
        assert_eq!(builtin.len(), BUILTIN.len());
        for policy in builtin.iter() {
            assert_eq!(Some(policy), set.get(&policy.name));
        }
        let strict = set.get("strict").unwrap();
        assert_eq!(strict.network.mode, NetworkMode::None);
        // `build` stays offline; `packages` is build with egress to registries.
        let build = set.get("build").unwrap();
        assert_eq!(build.network.mode, NetworkMode::Loopback);
        let packages = set.get("packages").unwrap();
        assert_eq!(packages.network.mode, NetworkMode::Egress);
        assert_eq!(packages.limits, build.limits);
        let egress = packages.egress.as_ref().unwrap();
        assert!(egress.allow.iter().all(|r| r.port() == Some(443)));
        assert!(egress.name_allowed("files.pythonhosted.org", Some(443)));
        assert!(!egress.name_allowed("example.com", None));
        assert!(strict.limits.memory_bytes < set.get("default").unwrap().limits.memory_bytes);
    }

    #[test]
    fn unknown_keys() {
        parse_error(
            &format!("colour = \"red\"\n{VALID}"),
            "unknown field `colour`",
        );
        parse_error(&with_line("pids", "pid = 512"), "unknown field `pid`");
        parse_error(
            &format!("{VALID}\n[sandbox]\nallow_degraded = []\nstrict = true\n"),
            "unknown field `strict`",
        );
        parse_error(&with_line("memory", "memory = 1GiB"), "line 9");
        parse_error(&with_line("pids", ""), "missing field `pids`");
        parse_error(
            &with_line("mode", "mode = \"host\""),
            "unknown variant `host`",
        );
        parse_error(
            &with_line("bash_timeout", "bash_timeout = 120"),
            r#"expected a duration string such as "120s""#,
        );
        parse_error(&with_line("memory", "memory = true"), "expected a size");
    }

    #[test]
    fn bad_sizes() {
        rejected(
            &with_line("memory", "memory = \"1GB\""),
            "limits.memory",
            "ambiguous",
        );
        rejected(
            &with_line("memory", "memory = \"8MiB\""),
            "limits.memory",
            "at least 16 MiB",
        );
        rejected(
            &with_line("memory", "memory = -1"),
            "limits.memory",
            "negative",
        );
        rejected(
            &with_line("tmp_size", "tmp_size = \"lots\""),
            "filesystem.tmp_size",
            "whole number",
        );
        rejected(
            &with_line("output_bytes", "output_bytes = 100"),
            "limits.output_bytes",
            "at least 1 KiB",
        );
        rejected(
            &with_line("file_bytes", "file_bytes = \"1GiB\""),
            "limits.file_bytes",
            "at most 64 MiB",
        );
        rejected(&with_line("pids", "pids = 4"), "limits.pids", "at least 16");
        rejected(
            &with_line("cpu", "cpu = 0.0"),
            "limits.cpu",
            "greater than 0",
        );
        rejected(
            &with_line("cpu", "cpu = nan"),
            "limits.cpu",
            "greater than 0",
        );
        rejected(
            &with_line("cpu", "cpu = 2000.0"),
            "limits.cpu",
            "at most 1024",
        );
        rejected(
            &with_line("disk =", "disk = \"1MiB\""),
            "limits.disk",
            "at least 16 MiB",
        );
        rejected(
            &with_line("disk_inodes", "disk_inodes = 10"),
            "limits.disk_inodes",
            "between 1024 and",
        );
    }

    #[test]
    fn bad_durations() {
        rejected(
            &with_line("bash_timeout", "bash_timeout = \"2h\""),
            "limits.bash_timeout",
            "unknown duration unit",
        );
        rejected(
            &with_line("bash_timeout", "bash_timeout = \"0s\""),
            "limits.bash_timeout",
            "greater than zero",
        );
        rejected(
            &with_line("call_timeout", "call_timeout = \"100s\""),
            "limits.call_timeout",
            "greater than limits.bash_timeout (120s)",
        );
        rejected(
            &with_line("call_timeout", "call_timeout = \"2m\""),
            "limits.call_timeout",
            "race",
        );
    }

    #[test]
    fn bad_paths() {
        let cases = [
            // TOML string literals, as they appear in the file.
            (r#""usr""#, "not an absolute path"),
            (r#""""#, "not an absolute path"),
            (r#""/usr/../etc""#, "must not contain `..`"),
            (r#""/usr/""#, "write it as `/usr`"),
            (r#""/usr//lib""#, "write it as `/usr/lib`"),
            (r#""/usr/./lib""#, "write it as `/usr/lib`"),
            (r#""/""#, "whole host"),
            (r#""/proc""#, "overlaps `/proc`"),
            (r#""/proc/self""#, "overlaps `/proc`"),
            (r#""/sys/fs/cgroup""#, "overlaps `/sys`"),
            (r#""/dev""#, "overlaps `/dev`"),
            (r#""/tmp""#, "overlaps `/tmp`"),
            (r#""/workspace/src""#, "overlaps `/workspace`"),
            (r#""/usr\u0000""#, "NUL"),
        ];
        for (path, needle) in cases {
            let line = format!("read_only = [\"/etc\", {path}]");
            rejected(
                &with_line("read_only", &line),
                "filesystem.read_only[1]",
                needle,
            );
        }
        rejected(
            &with_line("read_only", "read_only = [\"/usr\", \"/usr\"]"),
            "filesystem.read_only[1]",
            "listed twice",
        );
        // Lexical prefixes are not overlaps: /tmpfiles is not under /tmp.
        let policy = parse(&with_line(
            "read_only",
            "read_only = [\"/tmpfiles\", \"/devtools\"]",
        ));
        assert!(policy.is_ok(), "{policy:?}");
    }

    #[test]
    fn bad_tools() {
        rejected(
            &with_line("enabled", "enabled = [\"bash\", \"python\"]"),
            "tools.enabled[1]",
            "unknown tool `python` (known: bash, read, write, edit, glob, grep)",
        );
        rejected(
            &with_line("enabled", "enabled = [\"read\", \"read\"]"),
            "tools.enabled[1]",
            "listed twice",
        );
        rejected(
            &with_line("enabled", "enabled = []"),
            "tools.enabled",
            "at least one",
        );
        let policy = parse(&with_line("enabled", "enabled = [\"read\", \"grep\"]")).unwrap();
        assert_eq!(policy.tools, [Tool::Read, Tool::Grep].into());
    }

    #[test]
    fn bad_env() {
        for (name, needle) in [
            ("\"1X\"", "must match"),
            ("\"A-B\"", "must match"),
            ("\"\"", "must match"),
            ("PS1", "reserved"),
            ("https_proxy", "reserved"),
            ("ANTHROPIC_API_KEY", "reserved"),
        ] {
            let text = format!("{VALID}\n[env]\n{name} = \"v\"\n");
            let key = format!("env.{}", name.trim_matches('"'));
            rejected(&text, &key, needle);
        }
        rejected(
            &format!("{VALID}\n[env]\nX = \"a\\u0000b\"\n"),
            "env.X",
            "NUL",
        );
        parse_error(&format!("{VALID}\n[env]\nX = 1\n"), "invalid type");
    }

    #[test]
    fn bad_degradation() {
        rejected(
            &format!("{VALID}\n[sandbox]\nallow_degraded = [\"seccomp\"]\n"),
            "sandbox.allow_degraded[0]",
            "unknown degradation `seccomp` (known: landlock-truncate, landlock-net",
        );
    }

    #[test]
    fn names() {
        for good in ["default", "a", "0", "build-2", "ci_fast"] {
            assert!(is_valid_name(good), "{good}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in [
            "",
            "Default",
            "-x",
            "_x",
            "../x",
            "a/b",
            "a.b",
            "x.toml",
            long.as_str(),
        ] {
            assert!(!is_valid_name(bad), "{bad}");
            let catalog = lookup::Lookup::builtin_only().load().unwrap();
            let error = catalog.get(bad).unwrap_err();
            assert!(
                matches!(error, PolicyError::Name { path: None, .. }),
                "{error:?}"
            );
        }
        let error = Policy::from_toml_str("Bad", VALID, Path::new("p/Bad.toml")).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("p/Bad.toml: environment name `Bad` is invalid"),
            "{error}"
        );
    }

    #[test]
    fn load_and_find() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("default.toml");
        std::fs::write(&local, with_line("pids", "pids = 64")).unwrap();
        std::fs::write(dir.path().join("other.toml"), VALID).unwrap();
        let empty = tempfile::tempdir().unwrap();
        let lookup = lookup::Lookup::new(
            &[empty.path().to_path_buf(), dir.path().to_path_buf()],
            None,
            None,
        );
        let catalog = lookup.load().unwrap();

        // A local file wins over the built-in of the same name.
        assert_eq!(catalog.policy("default").unwrap().limits.pids, 64);
        // Names with no local file fall back to the built-ins.
        assert_eq!(
            catalog.policy("strict").unwrap().network.mode,
            NetworkMode::None
        );
        assert_eq!(catalog.policy("other").unwrap().name, "other");
        let error = catalog.get("nope").unwrap_err();
        assert!(matches!(error, PolicyError::NotFound { .. }), "{error:?}");
        assert!(
            error
                .to_string()
                .contains("built in: default, strict, build"),
            "{error}"
        );

        // A broken local file is an error, never a silent fall-back to the built-in.
        std::fs::write(&local, "[filesystem]\n").unwrap();
        let error = lookup.load().unwrap_err();
        assert!(
            matches!(error, PolicyError::Parse { ref path, .. } if *path == local),
            "{error:?}"
        );

        std::fs::write(dir.path().join("notes.txt"), "garbage").unwrap();
        let error = Policy::load(&dir.path().join("notes.txt")).unwrap_err();
        assert!(matches!(error, PolicyError::FileName { .. }), "{error:?}");
        let error = Policy::load(&dir.path().join("missing.toml")).unwrap_err();
        assert!(matches!(error, PolicyError::Read { .. }), "{error:?}");
    }
}
