//! The seccomp filters of a session: system calls the tools never need, refused
//! with an errno (a clear error for the program, never a kill), kept as data with
//! the reason for each entry.
//!
//! Filters installed on the helper (and so inherited by everything it starts):
//! - the deny list (EPERM), with argument rules: namespace flags of `clone`,
//!   socket families and types, set-user-ID and set-group-ID modes in every call
//!   that sets a mode, other processes' limits and scheduling, netlink families
//!   but routing, terminal ioctls;
//! - `clone3` → ENOSYS, so that libc falls back to `clone`, whose flags a classic
//!   BPF filter can inspect (clone3 passes them in memory, out of seccomp's
//!   reach);
//! - protocols a kernel may simply lack, refused as such so that programs fall
//!   back (MPTCP → EPROTONOSUPPORT; with `network.mode = "none"`, IPv4 and IPv6
//!   → EAFNOSUPPORT).
//!
//! And one more on every process the helper starts, between fork and exec
//! ([`child_program`]): `openat2` → ENOSYS. Its mode is in memory, out of the
//! filter's sight, so it could create a set-user-ID file; libc and language
//! runtimes fall back to `openat` on ENOSYS. The helper's own file tools, trusted
//! code that never asks for such a mode, keep `openat2` for
//! `RESOLVE_NO_SYMLINKS`.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// System calls denied outright, each with why.
const DENIED: &[(i64, &str)] = &[
    (libc::SYS_ptrace, "inspect or control another process"),
    (libc::SYS_process_vm_readv, "read another process's memory"),
    (
        libc::SYS_process_vm_writev,
        "write another process's memory",
    ),
    (
        libc::SYS_pidfd_getfd,
        "steal a file descriptor from another process",
    ),
    (libc::SYS_kcmp, "probe another process's kernel objects"),
    (libc::SYS_mount, "change the mount table"),
    (
        libc::SYS_umount2,
        "unmount the sandbox's view (revealing what is under it)",
    ),
    (libc::SYS_pivot_root, "change the root"),
    (libc::SYS_chroot, "change the root"),
    (libc::SYS_fsopen, "new mount API"),
    (libc::SYS_fsconfig, "new mount API"),
    (libc::SYS_fsmount, "new mount API"),
    (libc::SYS_fspick, "new mount API"),
    (libc::SYS_open_tree, "new mount API"),
    (libc::SYS_move_mount, "new mount API"),
    (libc::SYS_mount_setattr, "new mount API"),
    (
        libc::SYS_unshare,
        "create namespaces (user namespaces regain capabilities)",
    ),
    (libc::SYS_setns, "enter another namespace"),
    (libc::SYS_bpf, "load eBPF programs (kernel attack surface)"),
    (libc::SYS_keyctl, "kernel keyrings are not namespaced"),
    (libc::SYS_add_key, "kernel keyrings are not namespaced"),
    (libc::SYS_request_key, "kernel keyrings are not namespaced"),
    (
        libc::SYS_perf_event_open,
        "performance counters leak host activity",
    ),
    (libc::SYS_kexec_load, "replace the kernel"),
    (libc::SYS_kexec_file_load, "replace the kernel"),
    (libc::SYS_init_module, "load kernel modules"),
    (libc::SYS_finit_module, "load kernel modules"),
    (libc::SYS_delete_module, "unload kernel modules"),
    (
        libc::SYS_io_uring_setup,
        "io_uring bypasses seccomp for its operations",
    ),
    (
        libc::SYS_io_uring_enter,
        "io_uring bypasses seccomp for its operations",
    ),
    (
        libc::SYS_io_uring_register,
        "io_uring bypasses seccomp for its operations",
    ),
    (
        libc::SYS_userfaultfd,
        "stalls kernel paths, a classic exploit primitive",
    ),
    (
        libc::SYS_open_by_handle_at,
        "open files by handle, bypassing paths (shocker)",
    ),
    (
        libc::SYS_name_to_handle_at,
        "companion of open_by_handle_at",
    ),
    (libc::SYS_swapon, "host swap configuration"),
    (libc::SYS_swapoff, "host swap configuration"),
    (libc::SYS_reboot, "host power state"),
    (libc::SYS_acct, "host process accounting"),
    (libc::SYS_settimeofday, "host clock"),
    (libc::SYS_clock_settime, "host clock"),
    (libc::SYS_clock_adjtime, "host clock"),
    (libc::SYS_adjtimex, "host clock"),
    (libc::SYS_syslog, "kernel log may leak addresses"),
    (libc::SYS_quotactl, "filesystem quotas"),
    (libc::SYS_lookup_dcookie, "kernel profiling interface"),
    (libc::SYS_vhangup, "terminal control"),
    (
        libc::SYS_personality,
        "READ_IMPLIES_EXEC and address-space layout tricks",
    ),
    (libc::SYS_fanotify_init, "watch the whole filesystem"),
    (libc::SYS_mbind, "NUMA policy of host memory"),
    (libc::SYS_move_pages, "move another process's pages"),
    (libc::SYS_migrate_pages, "move another process's pages"),
    (libc::SYS_set_mempolicy, "NUMA policy"),
    (
        libc::SYS_process_madvise,
        "advise on another process's memory",
    ),
    (
        libc::SYS_landlock_create_ruleset,
        "nesting is harmless, but tools never need it",
    ),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_iopl, "raw I/O port access"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_ioperm, "raw I/O port access"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_uselib, "obsolete library loading"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_ustat, "obsolete"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_sysfs, "obsolete"),
];

/// Namespace flags refused in `clone` (arg 0 on x86_64 and aarch64).
const CLONE_NS_FLAGS: &[(u64, &str)] = &[
    (
        libc::CLONE_NEWUSER as u64,
        "user namespaces regain capabilities",
    ),
    (libc::CLONE_NEWNS as u64, "new mount namespace"),
    (libc::CLONE_NEWPID as u64, "new pid namespace"),
    (libc::CLONE_NEWNET as u64, "new network namespace"),
    (libc::CLONE_NEWIPC as u64, "new ipc namespace"),
    (libc::CLONE_NEWUTS as u64, "new uts namespace"),
    (libc::CLONE_NEWCGROUP as u64, "new cgroup namespace"),
    (0x0000_0080, "new time namespace (CLONE_NEWTIME)"),
];

/// Socket families allowed; every other family is refused (AF_PACKET, AF_VSOCK,
/// AF_ALG, AF_KEY, bluetooth, …).
const ALLOWED_FAMILIES: &[(u64, &str)] = &[
    (libc::AF_UNIX as u64, "local IPC"),
    (
        libc::AF_INET as u64,
        "TCP/UDP (the network namespace decides what is reachable)",
    ),
    (libc::AF_INET6 as u64, "TCP/UDP over IPv6"),
    (
        libc::AF_NETLINK as u64,
        "`ip` and glibc's getaddrinfo query their own namespace (routing family only)",
    ),
];

/// ioctl requests refused on any fd.
const DENIED_IOCTLS: &[(u64, &str)] = &[
    (libc::TIOCSTI, "inject input into a terminal"),
    (libc::TIOCLINUX, "virtual console control"),
];

/// The mode bits no process of a session may give a file: on the host, a
/// set-user-ID or set-group-ID file in a workspace runs as its owner (root for
/// the workspaces hands creates) for anyone who can reach it.
const SETID_BITS: &[(u64, &str)] = &[
    (libc::S_ISUID as u64, "set-user-ID"),
    (libc::S_ISGID as u64, "set-group-ID"),
];

/// `__O_TMPFILE`: `O_TMPFILE` without `O_DIRECTORY`; creates a file with a mode.
const O_TMPFILE_BIT: u64 = 0o20_000_000;

/// Where each mode-setting call carries its mode, by argument index, and for the
/// open family the argument whose O_CREAT or O_TMPFILE makes the mode count.
type ModeArg = (i64, u8, Option<u8>, &'static str);

const MODE_ARGS: &[ModeArg] = &[
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_chmod, 1, None, "chmod"),
    (libc::SYS_fchmod, 1, None, "fchmod"),
    (libc::SYS_fchmodat, 2, None, "fchmodat"),
    (SYS_FCHMODAT2, 2, None, "fchmodat2 (Linux 6.6)"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_open, 2, Some(1), "open with O_CREAT/O_TMPFILE"),
    (
        libc::SYS_openat,
        3,
        Some(2),
        "openat with O_CREAT/O_TMPFILE",
    ),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_creat, 1, None, "creat"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_mknod, 1, None, "mknod makes regular files too"),
    (
        libc::SYS_mknodat,
        2,
        None,
        "mknodat makes regular files too",
    ),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_mkdir, 1, None, "mkdir"),
    (libc::SYS_mkdirat, 2, None, "mkdirat"),
];

/// `fchmodat2`, by number: the same on every architecture (new system calls
/// share one table).
const SYS_FCHMODAT2: i64 = 452;

/// Calls that act on another process by pid when their pid argument is not 0
/// (0 = the caller): the session's helper runs as the session's uid, and the
/// kernel lets a process of the same uid change its limits and scheduling.
/// Signals and ptrace need no rule here: the helper is the pid namespace's init
/// with no signal handlers (the kernel drops such signals from inside the
/// namespace) and not dumpable (ptrace refused, and ptrace is denied anyway).
const OTHER_PROCESS: &[(i64, u8, &str)] = &[
    (
        libc::SYS_prlimit64,
        0,
        "set or read another process's limits",
    ),
    (libc::SYS_sched_setaffinity, 0, "pin another process"),
    (
        libc::SYS_sched_setscheduler,
        0,
        "another process's scheduling policy",
    ),
    (libc::SYS_sched_setparam, 0, "another process's priority"),
    (libc::SYS_sched_setattr, 0, "another process's scheduling"),
];

/// `setpriority(which, who, prio)` and `ioprio_set(which, who, prio)`: only
/// for the calling process itself (`which` = process, `who` = 0); a process
/// group or every process of the uid would include the helper.
const PRIORITY: &[(i64, u64, &str)] = &[
    (
        libc::SYS_setpriority,
        libc::PRIO_PROCESS as u64,
        "renice other processes",
    ),
    (
        libc::SYS_ioprio_set,
        1, /* IOPRIO_WHO_PROCESS */
        "I/O priority of other processes",
    ),
];

/// Netlink protocols allowed: routing only (`ip`, getaddrinfo). Every other
/// family is refused: kobject uevents carry the host's device events, audit,
/// connector, netfilter and generic netlink reach host subsystems.
const NETLINK_ALLOWED: u64 = libc::NETLINK_ROUTE as u64;

fn cond(arg: u8, op: SeccompCmpOp, val: u64) -> Result<SeccompCondition, SeccompError> {
    Ok(SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        op,
        val,
    )?)
}

fn bit_set(arg: u8, bit: u64) -> Result<SeccompCondition, SeccompError> {
    cond(arg, SeccompCmpOp::MaskedEq(bit), bit)
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    // Causes are part of each message and not also a `source()`, so that a
    // printer of error chains shows them once.
    #[error("building the seccomp filter: {0}")]
    Build(seccompiler::Error),
    #[error("building the seccomp filter: {0}")]
    Backend(seccompiler::BackendError),
    #[error("installing the seccomp filter: {0}")]
    Install(seccompiler::Error),
}

impl From<seccompiler::Error> for SeccompError {
    fn from(e: seccompiler::Error) -> Self {
        SeccompError::Build(e)
    }
}

impl From<seccompiler::BackendError> for SeccompError {
    fn from(e: seccompiler::BackendError) -> Self {
        SeccompError::Backend(e)
    }
}

/// What varies between sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    /// `network.mode = "none"`: IPv4 and IPv6 sockets refused outright.
    pub no_inet: bool,
    /// Refuse set-user-ID and set-group-ID modes. Always true in service; the
    /// escape suite turns it off to prove the host-side layer on its own.
    pub setid_guard: bool,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            no_inet: false,
            setid_guard: true,
        }
    }
}

fn filter(rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32) -> Result<BpfProgram, SeccompError> {
    Ok(SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        ARCH,
    )?
    .try_into()?)
}

/// The compiled programs of a session, in installation order.
pub fn programs(profile: Profile) -> Result<Vec<BpfProgram>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, _why) in DENIED {
        rules.insert(*nr, vec![]);
    }
    let mut clone_rules = Vec::new();
    for (flag, _why) in CLONE_NS_FLAGS {
        clone_rules.push(SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(*flag),
            *flag,
        )?])?);
    }
    rules.insert(libc::SYS_clone, clone_rules);

    // socket(domain, type, protocol) / socketpair(domain, type, protocol, sv):
    // refuse a family outside the allowed list, raw IP sockets (inet and inet6
    // with SOCK_RAW; netlink is SOCK_RAW by design and stays allowed), the
    // obsolete SOCK_PACKET type (10, by number since libc deprecates the name),
    // and netlink protocols but routing.
    for nr in [libc::SYS_socket, libc::SYS_socketpair] {
        let not_allowed: Vec<SeccompCondition> = ALLOWED_FAMILIES
            .iter()
            .map(|(fam, _)| cond(0, SeccompCmpOp::Ne, *fam))
            .collect::<Result<_, _>>()?;
        let mut socket_rules = vec![SeccompRule::new(not_allowed)?];
        for fam in [libc::AF_INET as u64, libc::AF_INET6 as u64] {
            socket_rules.push(SeccompRule::new(vec![
                cond(0, SeccompCmpOp::Eq, fam)?,
                cond(1, SeccompCmpOp::MaskedEq(0xf), libc::SOCK_RAW as u64)?,
            ])?);
        }
        socket_rules.push(SeccompRule::new(vec![cond(
            1,
            SeccompCmpOp::MaskedEq(0xf),
            10,
        )?])?);
        socket_rules.push(SeccompRule::new(vec![
            cond(0, SeccompCmpOp::Eq, libc::AF_NETLINK as u64)?,
            cond(2, SeccompCmpOp::Ne, NETLINK_ALLOWED)?,
        ])?);
        rules.insert(nr, socket_rules);
    }
    let mut ioctl_rules = Vec::new();
    for (req, _why) in DENIED_IOCTLS {
        ioctl_rules.push(SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, *req)?])?);
    }
    rules.insert(libc::SYS_ioctl, ioctl_rules);

    if profile.setid_guard {
        for (nr, mode, flags, _why) in MODE_ARGS {
            let mut mode_rules = Vec::new();
            for (bit, _what) in SETID_BITS {
                match flags {
                    None => mode_rules.push(SeccompRule::new(vec![bit_set(*mode, *bit)?])?),
                    Some(f) => {
                        for creates in [libc::O_CREAT as u64, O_TMPFILE_BIT] {
                            mode_rules.push(SeccompRule::new(vec![
                                bit_set(*f, creates)?,
                                bit_set(*mode, *bit)?,
                            ])?);
                        }
                    }
                }
            }
            rules.insert(*nr, mode_rules);
        }
    }
    for (nr, pid_arg, _why) in OTHER_PROCESS {
        rules.insert(
            *nr,
            vec![SeccompRule::new(vec![cond(
                *pid_arg,
                SeccompCmpOp::Ne,
                0,
            )?])?],
        );
    }
    for (nr, which_self, _why) in PRIORITY {
        rules.insert(
            *nr,
            vec![
                SeccompRule::new(vec![cond(0, SeccompCmpOp::Ne, *which_self)?])?,
                SeccompRule::new(vec![cond(1, SeccompCmpOp::Ne, 0)?])?,
            ],
        );
    }
    let mut out = vec![filter(rules, libc::EPERM)?];

    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, vec![]);
    out.push(filter(clone3, libc::ENOSYS)?);
    #[cfg(target_arch = "x86_64")]
    out.push(x32_program());

    // MPTCP escapes landlock's TCP rules on some kernels; a kernel built without
    // it answers EPROTONOSUPPORT, and programs that try it fall back to TCP.
    let mut mptcp = BTreeMap::new();
    for nr in [libc::SYS_socket, libc::SYS_socketpair] {
        mptcp.insert(
            nr,
            vec![SeccompRule::new(vec![cond(
                2,
                SeccompCmpOp::Eq,
                libc::IPPROTO_MPTCP as u64,
            )?])?],
        );
    }
    out.push(filter(mptcp, libc::EPROTONOSUPPORT)?);

    if profile.no_inet {
        // "No network" means no IP at all: no TCP, UDP, SCTP, MPTCP or ICMP
        // socket, as on a kernel without IPv4 and IPv6.
        let mut inet = BTreeMap::new();
        for nr in [libc::SYS_socket, libc::SYS_socketpair] {
            inet.insert(
                nr,
                vec![
                    SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, libc::AF_INET as u64)?])?,
                    SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, libc::AF_INET6 as u64)?])?,
                ],
            );
        }
        out.push(filter(inet, libc::EAFNOSUPPORT)?);
    }
    Ok(out)
}

/// The x32 ABI: on x86_64 the same system calls exist again with bit 30 set in
/// their number, under the same audit architecture, so a deny list keyed by
/// number would not see them. Kernels built with x32 and booted with it enabled
/// would run them. Refused outright with EPERM (a kernel without x32 says
/// ENOSYS, so the escape suite can tell this filter answered).
#[cfg(target_arch = "x86_64")]
fn x32_program() -> BpfProgram {
    use seccompiler::sock_filter;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let ins = |code: u16, jt: u8, jf: u8, k: u32| sock_filter { code, jt, jf, k };
    let (ld_w_abs, jge_k, ret_k) = (0x20, 0x35, 0x06);
    vec![
        // A = seccomp_data.nr
        ins(ld_w_abs, 0, 0, 0),
        // if A >= X32_SYSCALL_BIT: errno, else allow
        ins(jge_k, 0, 1, X32_SYSCALL_BIT),
        ins(ret_k, 0, 0, 0x0005_0000 | libc::EPERM as u32),
        ins(ret_k, 0, 0, 0x7fff_0000),
    ]
}

/// The filter added to every process the helper starts: `openat2` → ENOSYS
/// (see the module doc), as the kernel's own instruction type.
pub fn child_program() -> Result<Vec<libc::sock_filter>, SeccompError> {
    let mut rules = BTreeMap::new();
    rules.insert(libc::SYS_openat2, vec![]);
    Ok(filter(rules, libc::ENOSYS)?
        .into_iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect())
}

/// Installs the session's filters on the calling thread (threads started later
/// inherit them). no_new_privs must already be set.
pub fn install_on_current_thread(profile: Profile) -> Result<(), SeccompError> {
    for prog in programs(profile)? {
        seccompiler::apply_filter(&prog).map_err(SeccompError::Install)?;
    }
    Ok(())
}

/// Number of syscalls in the deny list (for doctor and docs).
pub fn denied_count() -> usize {
    DENIED.len()
        + 1 /* clone ns flags */
        + 2 /* socket families */
        + 1 /* ioctl */
        + MODE_ARGS.len()
        + OTHER_PROCESS.len()
        + PRIORITY.len()
        + 1 /* openat2 in children */
}
