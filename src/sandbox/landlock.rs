//! Landlock rules of a session: what the confined helper and everything it starts
//! may touch in the filesystem, on TCP, and across its own domain (signals,
//! abstract unix sockets).
//!
//! The ruleset uses every access right the running kernel knows (ABI 1–7). A right
//! of a newer ABI than the kernel's is *missing*. For each missing right the
//! session needs, [`coverage`] names the other layer of the session that gives the
//! same guarantee; the session runs when every missing right is covered (policy
//! `landlock = "covered"`, the default) or named in `allow_degraded`, and refuses
//! otherwise (`landlock = "full"` counts only `allow_degraded`). Landlock itself
//! is never optional.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use super::sys;

// Filesystem access rights (include/uapi/linux/landlock.h).
pub const FS_EXECUTE: u64 = 1 << 0;
pub const FS_WRITE_FILE: u64 = 1 << 1;
pub const FS_READ_FILE: u64 = 1 << 2;
pub const FS_READ_DIR: u64 = 1 << 3;
pub const FS_REMOVE_DIR: u64 = 1 << 4;
pub const FS_REMOVE_FILE: u64 = 1 << 5;
pub const FS_MAKE_CHAR: u64 = 1 << 6;
pub const FS_MAKE_DIR: u64 = 1 << 7;
pub const FS_MAKE_REG: u64 = 1 << 8;
pub const FS_MAKE_SOCK: u64 = 1 << 9;
pub const FS_MAKE_FIFO: u64 = 1 << 10;
pub const FS_MAKE_BLOCK: u64 = 1 << 11;
pub const FS_MAKE_SYM: u64 = 1 << 12;
/// ABI 2: link or rename across directories.
pub const FS_REFER: u64 = 1 << 13;
/// ABI 3: truncate.
pub const FS_TRUNCATE: u64 = 1 << 14;
/// ABI 5: ioctl on device files.
pub const FS_IOCTL_DEV: u64 = 1 << 15;
// Network (ABI 4).
pub const NET_BIND_TCP: u64 = 1 << 0;
pub const NET_CONNECT_TCP: u64 = 1 << 1;
// Scopes (ABI 6).
pub const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
pub const SCOPE_SIGNAL: u64 = 1 << 1;
// restrict_self flags (ABI 7): audit denials of programs the session execs too.
pub const RESTRICT_SELF_LOG_NEW_EXEC_ON: u32 = 1 << 1;

/// The ABI that enforces everything hands asks of landlock.
pub const FULL_ABI: u32 = 6;

/// All filesystem rights known to `abi`.
pub fn fs_rights(abi: u32) -> u64 {
    let mut r = (1 << 13) - 1; // ABI 1: EXECUTE ..= MAKE_SYM
    if abi >= 2 {
        r |= FS_REFER;
    }
    if abi >= 3 {
        r |= FS_TRUNCATE;
    }
    if abi >= 5 {
        r |= FS_IOCTL_DEV;
    }
    r
}

const READ_ONLY: u64 = FS_READ_FILE | FS_READ_DIR | FS_EXECUTE;

/// A landlock feature that the kernel may lack; the policy can accept its absence
/// by name (`sandbox.allow_degraded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LandlockFeature {
    /// Landlock itself (ABI 1).
    Landlock,
    /// ABI 2: cross-directory link/rename control.
    LandlockRefer,
    /// ABI 3: truncate control.
    LandlockTruncate,
    /// ABI 4: TCP bind/connect control.
    LandlockNet,
    /// ABI 5: device ioctl control.
    LandlockIoctl,
    /// ABI 6: signal and abstract-socket scoping.
    LandlockScope,
}

impl LandlockFeature {
    pub fn name(self) -> &'static str {
        match self {
            LandlockFeature::Landlock => "landlock",
            LandlockFeature::LandlockRefer => "landlock-refer",
            LandlockFeature::LandlockTruncate => "landlock-truncate",
            LandlockFeature::LandlockNet => "landlock-net",
            LandlockFeature::LandlockIoctl => "landlock-ioctl",
            LandlockFeature::LandlockScope => "landlock-scope",
        }
    }

    /// The ABI that brought the feature.
    pub fn abi(self) -> u32 {
        match self {
            LandlockFeature::Landlock => 1,
            LandlockFeature::LandlockRefer => 2,
            LandlockFeature::LandlockTruncate => 3,
            LandlockFeature::LandlockNet => 4,
            LandlockFeature::LandlockIoctl => 5,
            LandlockFeature::LandlockScope => 6,
        }
    }

    pub const ALL: [LandlockFeature; 6] = [
        LandlockFeature::Landlock,
        LandlockFeature::LandlockRefer,
        LandlockFeature::LandlockTruncate,
        LandlockFeature::LandlockNet,
        LandlockFeature::LandlockIoctl,
        LandlockFeature::LandlockScope,
    ];

    /// Features the kernel at `abi` lacks (abi 0: no landlock at all).
    pub fn missing_at(abi: u32) -> Vec<LandlockFeature> {
        LandlockFeature::ALL
            .into_iter()
            .filter(|f| f.abi() > abi)
            .collect()
    }
}

/// The layer of the session that gives the guarantee of `feature` when the kernel
/// lacks it, or `None` when nothing does. `inet_refused`: seccomp refuses every
/// IPv4 and IPv6 socket in this session (`network.mode = "none"`).
///
/// Each answer holds for the sessions hands builds (see [`super::mounts`]):
/// - refer (ABI 1): an ABI 1 ruleset refuses every link and rename across
///   directories (EXDEV; `mv` and friends fall back to copying): stricter, not
///   weaker.
/// - truncate (ABI < 3): outside `/workspace`, `/tmp` and `/dev/shm`, where the
///   session may write anyway, every mount is read-only (EROFS), except the
///   session's own `/proc` and its device nodes, where a truncation changes
///   nothing.
/// - net (ABI < 4), only asked for with `network.mode = "none"`: seccomp refuses
///   every IPv4 and IPv6 socket, so there is no TCP to bind or connect, and the
///   network namespace has no interface at all.
/// - ioctl (ABI < 5): `/dev` holds only null, zero, full, random, urandom and a
///   `tty` that opens nothing (no controlling terminal); every other mount is
///   `nodev`; seccomp refuses the terminal ioctls that reach outside (TIOCSTI,
///   TIOCLINUX) on any descriptor; the session holds no capability, which
///   random's entropy ioctls need.
/// - scope (ABI < 6): the session has its own pid namespace, so it can signal
///   only its own processes, and its own network namespace, which holds the
///   abstract unix socket namespace, so it reaches only its own abstract sockets.
pub fn coverage(feature: LandlockFeature, inet_refused: bool) -> Option<&'static str> {
    match feature {
        LandlockFeature::Landlock => None,
        LandlockFeature::LandlockRefer => {
            Some("an ABI 1 ruleset refuses every link and rename across directories (stricter)")
        }
        LandlockFeature::LandlockTruncate => Some(
            "read-only mounts: outside /workspace, /tmp and /dev/shm nothing can be truncated",
        ),
        LandlockFeature::LandlockNet if inet_refused => Some(
            "seccomp refuses every IPv4 and IPv6 socket, and the network namespace has no interface",
        ),
        LandlockFeature::LandlockNet => None,
        LandlockFeature::LandlockIoctl => Some(
            "a /dev of null, zero, full, random, urandom and tty only, nodev elsewhere, seccomp refusal of TIOCSTI and TIOCLINUX, no capabilities",
        ),
        LandlockFeature::LandlockScope => Some(
            "the session's own pid namespace (signals) and network namespace (abstract unix sockets)",
        ),
    }
}

/// How missing rights are judged for one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acceptance {
    /// Missing rights the policy accepts by name (`allow_degraded`).
    pub allowed: Vec<LandlockFeature>,
    /// Accept a missing right that [`coverage`] covers (`landlock = "covered"`).
    pub covered: bool,
    /// seccomp refuses every IPv4 and IPv6 socket in the session.
    pub inet_refused: bool,
}

/// The rights the session needs that the kernel at `abi` lacks: every missing
/// filesystem and scope right, and TCP only when the rules deny it.
pub fn needed_missing(abi: u32, deny_tcp: bool) -> Vec<LandlockFeature> {
    LandlockFeature::missing_at(abi)
        .into_iter()
        .filter(|f| deny_tcp || *f != LandlockFeature::LandlockNet)
        .collect()
}

/// The missing rights `acceptance` refuses (empty: the session may run).
pub fn refused(abi: u32, deny_tcp: bool, acceptance: &Acceptance) -> Vec<LandlockFeature> {
    needed_missing(abi, deny_tcp)
        .into_iter()
        .filter(|f| {
            let covered = acceptance.covered && coverage(*f, acceptance.inet_refused).is_some();
            !(acceptance.allowed.contains(f) || covered)
        })
        .collect()
}

/// What to allow, in sandbox paths (after pivot_root).
#[derive(Debug, Clone)]
pub struct Rules {
    /// Read, write, create, remove, execute.
    pub read_write: Vec<PathBuf>,
    /// Read and execute.
    pub read_only: Vec<PathBuf>,
    /// Device files: read, write, truncate (for `> /dev/null`).
    pub devices: Vec<PathBuf>,
    /// Directories that may be listed but not read beneath (the root).
    pub list_only: Vec<PathBuf>,
    /// Deny every TCP bind and connect.
    pub deny_tcp: bool,
}

/// What was enforced, for `Ready`, doctor and logs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LandlockReport {
    pub abi: u32,
    /// Rights the session needed that the kernel lacks, each covered by another
    /// layer or accepted by the policy.
    pub missing: Vec<LandlockFeature>,
}

#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("landlock is unavailable ({0}); the session cannot be confined")]
    Unavailable(std::io::Error),
    #[error("kernel landlock ABI {abi} lacks {}, which no other layer of this session covers, and the policy does not allow that degradation (sandbox.allow_degraded)", missing.join(", "))]
    NotCovered {
        abi: u32,
        missing: Vec<&'static str>,
    },
    #[error("kernel landlock ABI {abi} lacks {}, and the policy asks for the full landlock set (sandbox.landlock = \"full\") without allowing that degradation (sandbox.allow_degraded)", missing.join(", "))]
    NotFullyEnforced {
        abi: u32,
        missing: Vec<&'static str>,
    },
    #[error("landlock {op} {path:?}: {cause}")]
    Rule {
        op: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("landlock {op}: {cause}")]
    Syscall {
        op: &'static str,
        cause: std::io::Error,
    },
}

fn open_path(p: &Path) -> Result<OwnedFd, LandlockError> {
    open(p, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).map_err(|e| LandlockError::Rule {
        op: "open",
        path: p.to_path_buf(),
        cause: e.into(),
    })
}

/// Builds and enforces the ruleset on the calling thread, in order:
/// 1. read the kernel ABI; refuse unless every missing right the session needs is
///    covered by another layer or allowed (see [`refused`]);
/// 2. create a ruleset handling every fs right of that ABI, TCP when asked and
///    available, and both scopes when available;
/// 3. add the path rules (each path opened O_PATH; a missing path is skipped,
///    since nothing can be reached through it);
/// 4. restrict_self, asking for audit records of exec'd programs on ABI ≥ 7.
///
/// no_new_privs must already be set.
pub fn enforce_on_current_thread(
    rules: &Rules,
    acceptance: &Acceptance,
) -> Result<LandlockReport, LandlockError> {
    let abi = sys::landlock_abi().map_err(LandlockError::Unavailable)?;
    let missing = needed_missing(abi, rules.deny_tcp);
    let refused: Vec<&'static str> = refused(abi, rules.deny_tcp, acceptance)
        .iter()
        .map(|f| f.name())
        .collect();
    if !refused.is_empty() {
        return Err(if acceptance.covered {
            LandlockError::NotCovered {
                abi,
                missing: refused,
            }
        } else {
            LandlockError::NotFullyEnforced {
                abi,
                missing: refused,
            }
        });
    }

    let handled_fs = fs_rights(abi);
    let handled_net = if rules.deny_tcp && abi >= 4 {
        NET_BIND_TCP | NET_CONNECT_TCP
    } else {
        0
    };
    let scoped = if abi >= 6 {
        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
    } else {
        0
    };
    let ruleset =
        sys::landlock_create_ruleset(handled_fs, handled_net, scoped, abi).map_err(|cause| {
            LandlockError::Syscall {
                op: "create_ruleset",
                cause,
            }
        })?;

    // Device nodes are never created, and ioctls on devices are never needed by
    // the tools; everything else is allowed beneath the writable roots.
    let rw = handled_fs & !(FS_MAKE_CHAR | FS_MAKE_BLOCK | FS_IOCTL_DEV);
    let groups: [(&[PathBuf], u64); 4] = [
        (&rules.read_write, rw),
        (&rules.read_only, READ_ONLY & handled_fs),
        (
            &rules.devices,
            (FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE) & handled_fs,
        ),
        (&rules.list_only, FS_READ_DIR),
    ];
    for (paths, access) in groups {
        for p in paths {
            let fd = match open_path(p) {
                Ok(fd) => fd,
                Err(LandlockError::Rule { cause, .. })
                    if cause.raw_os_error() == Some(libc::ENOENT) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            let mut access = access;
            // Rights that only make sense on directories are refused by the kernel
            // on files (EINVAL); keep the file-applicable subset.
            if !p.is_dir() {
                access &= FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV;
            }
            sys::landlock_add_path_rule(ruleset.as_fd(), fd.as_fd(), access).map_err(|cause| {
                LandlockError::Rule {
                    op: "add_rule",
                    path: p.clone(),
                    cause,
                }
            })?;
        }
    }

    let flags = if abi >= 7 {
        RESTRICT_SELF_LOG_NEW_EXEC_ON
    } else {
        0
    };
    sys::landlock_restrict_self(ruleset.as_fd(), flags).map_err(|cause| {
        LandlockError::Syscall {
            op: "restrict_self",
            cause,
        }
    })?;
    Ok(LandlockReport { abi, missing })
}

/// The ruleset each process the helper starts restricts itself with between fork
/// and exec: signal scoping, so that the process and everything it starts can
/// signal each other but nothing outside their own domain, the helper included.
/// It takes away no file access: a layer that does not handle `REFER` would
/// refuse every rename or link across directories (landlock's rule for ABI 1
/// rulesets), so this one handles it and allows it everywhere, leaving the
/// decision to the session's own ruleset. `None` below ABI 6, where the pid
/// namespace's protection of its init is the only layer. Called after
/// pivot_root: `/` is the sandbox's root.
pub fn child_scope_ruleset() -> Result<Option<OwnedFd>, LandlockError> {
    let abi = sys::landlock_abi().map_err(LandlockError::Unavailable)?;
    if abi < 6 {
        return Ok(None);
    }
    let syscall = |op| move |cause| LandlockError::Syscall { op, cause };
    let ruleset = sys::landlock_create_ruleset(FS_REFER, 0, SCOPE_SIGNAL, abi)
        .map_err(syscall("create_ruleset (child scope)"))?;
    let root = open_path(Path::new("/"))?;
    sys::landlock_add_path_rule(ruleset.as_fd(), root.as_fd(), FS_REFER)
        .map_err(syscall("add_rule (child scope)"))?;
    Ok(Some(ruleset))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acceptance(covered: bool, inet_refused: bool, allowed: &[LandlockFeature]) -> Acceptance {
        Acceptance {
            allowed: allowed.to_vec(),
            covered,
            inet_refused,
        }
    }

    /// Debian 12's 6.1 (ABI 2): every shipped environment runs, the default
    /// (`loopback`, no TCP rules asked) and `strict` (`none`, inet refused) alike.
    #[test]
    fn abi_2_runs_covered_environments() {
        let covered = acceptance(true, true, &[]);
        assert!(refused(2, true, &covered).is_empty());
        assert!(refused(2, false, &acceptance(true, false, &[])).is_empty());
        assert_eq!(
            needed_missing(2, false),
            [
                LandlockFeature::LandlockTruncate,
                LandlockFeature::LandlockIoctl,
                LandlockFeature::LandlockScope
            ]
        );
        // Ubuntu 22.04's 5.15 and RHEL 9's 5.14 (ABI 1) too.
        assert!(refused(1, true, &covered).is_empty());
    }

    /// `none` without seccomp's inet refusal has nothing that covers TCP.
    #[test]
    fn tcp_is_not_covered_without_the_inet_refusal() {
        assert_eq!(
            refused(3, true, &acceptance(true, false, &[])),
            [LandlockFeature::LandlockNet]
        );
        assert!(refused(
            3,
            true,
            &acceptance(true, false, &[LandlockFeature::LandlockNet])
        )
        .is_empty());
    }

    /// `landlock = "full"` refuses each missing right allow_degraded does not name.
    #[test]
    fn full_refuses_what_is_not_allowed() {
        assert_eq!(
            refused(
                4,
                true,
                &acceptance(false, true, &[LandlockFeature::LandlockScope])
            ),
            [LandlockFeature::LandlockIoctl]
        );
        assert!(refused(6, true, &acceptance(false, true, &[])).is_empty());
    }

    /// Landlock itself is never covered.
    #[test]
    fn no_landlock_is_never_covered() {
        assert!(
            refused(0, false, &acceptance(true, true, &[])).contains(&LandlockFeature::Landlock)
        );
        assert_eq!(coverage(LandlockFeature::Landlock, true), None);
    }
}
