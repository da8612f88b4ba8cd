//! Confinement of a session: namespaces, cgroup, idmapped workspace, uid switch,
//! no_new_privs, landlock and seccomp, applied by the session helper (a hidden
//! stage of the `hands` binary), and the worker-side client that talks to it.
//!
//! Namespaces and cgroups belong to the session, not the call: they are made once
//! at session open, and every tool call runs inside them.

pub mod cgroup;
pub mod client;
pub mod helper;
pub mod landlock;
pub mod mounts;
pub mod netfilter;
pub mod proto;
pub mod seccomp;
pub mod sys;

use std::path::PathBuf;
use std::sync::Arc;

pub use client::{HelperClient, SandboxError};

use crate::workspace::Workspaces;

/// Confinement layers switched off, so that the escape suite can show that each
/// remaining layer holds on its own. Nothing but a test sets these: no command,
/// configuration file or environment variable reaches them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Weakened {
    /// The seccomp refusal of set-user-ID and set-group-ID modes.
    pub setid_guard: bool,
    /// The seccomp refusal of IPv4 and IPv6 sockets under `network.mode = "none"`.
    pub inet_guard: bool,
}

/// Host-side settings of the sandbox (not per environment).
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Runtime state: slot locks, the mount point of session roots, workspace
    /// mount points. Lost at reboot (`/run/hands`).
    pub state_dir: PathBuf,
    /// Data that outlives a worker: workspace images (`/var/lib/hands`).
    pub data_dir: PathBuf,
    /// Where workspaces go and how hands makes its own.
    pub workspaces: Arc<Workspaces>,
    /// Layers switched off (tests only; see [`Weakened`]).
    pub weakened: Weakened,
    /// The executable re-run as the session helper (the `hands` binary).
    pub helper_exe: PathBuf,
    /// Session slot n runs as uid/gid `uid_base + n`.
    pub uid_base: u32,
    /// Number of slots: the most sessions that can be open on this host at once.
    pub slots: u32,
    pub cgroups: cgroup::Cgroups,
}

/// Default first session uid: far above any distribution's user ranges and the
/// usual subuid ranges of rootless containers (100000–165535).
pub const DEFAULT_UID_BASE: u32 = 2_100_000_000;

impl SandboxConfig {
    /// Defaults, overridable by `HANDS_STATE_DIR`, `HANDS_DATA_DIR` and
    /// `HANDS_HELPER_EXE`.
    /// The state and data directories: `$HANDS_STATE_DIR` (default `/run/hands`)
    /// and `$HANDS_DATA_DIR` (default `/var/lib/hands`).
    pub fn dirs_from_env() -> (PathBuf, PathBuf) {
        let state_dir = std::env::var_os("HANDS_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/hands"));
        let data_dir = std::env::var_os("HANDS_DATA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/hands"));
        (state_dir, data_dir)
    }

    pub fn from_env() -> Result<SandboxConfig, SandboxError> {
        let (state_dir, data_dir) = Self::dirs_from_env();
        let helper_exe = match std::env::var_os("HANDS_HELPER_EXE") {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe().map_err(|e| SandboxError::Host {
                what: "locating the hands executable",
                cause: e,
            })?,
        };
        let cgroups = cgroup::Cgroups::detect()?;
        let workspaces = Arc::new(Workspaces::new(state_dir.clone(), data_dir.clone()));
        Ok(SandboxConfig {
            state_dir,
            data_dir,
            workspaces,
            weakened: Weakened::default(),
            helper_exe,
            uid_base: DEFAULT_UID_BASE,
            slots: 4096,
            cgroups,
        })
    }
}

/// What confinement this kernel gives every session (reported to clients).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// The landlock ABI (0: none).
    pub landlock_abi: u32,
    pub seccomp: bool,
    /// `v1`, `v2`, or empty when no usable hierarchy was found.
    pub cgroup_version: &'static str,
    pub namespaces: [&'static str; 5],
}

/// Detects [`Isolation`] on this host.
pub fn isolation() -> Isolation {
    Isolation {
        landlock_abi: sys::landlock_abi().unwrap_or(0),
        seccomp: seccomp::programs(seccomp::Profile::default()).is_ok(),
        cgroup_version: match cgroup::Cgroups::detect().map(|c| c.version()) {
            Ok(cgroup::CgroupVersion::V1) => "v1",
            Ok(cgroup::CgroupVersion::V2) => "v2",
            Err(_) => "",
        },
        namespaces: ["mnt", "pid", "net", "ipc", "uts"],
    }
}
