//! The seccomp deny list of a session: system calls the tools never need, refused
//! with EPERM (a clear error for the program, never a kill), kept as data with
//! the reason for each entry.
//!
//! Two filters are installed: the deny list (EPERM), and `clone3` → ENOSYS so that
//! libc falls back to `clone`, whose flags a classic BPF filter can inspect
//! (clone3 passes them in memory, out of seccomp's reach).

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
        "`ip` and glibc's getaddrinfo query their own namespace",
    ),
];

/// ioctl requests refused on any fd.
const DENIED_IOCTLS: &[(u64, &str)] = &[
    (libc::TIOCSTI, "inject input into a terminal"),
    (libc::TIOCLINUX, "virtual console control"),
];

fn cond(arg: u8, op: SeccompCmpOp, val: u64) -> Result<SeccompCondition, SeccompError> {
    Ok(SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        op,
        val,
    )?)
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::Error),
    #[error("building the seccomp filter: {0}")]
    Backend(#[from] seccompiler::BackendError),
    #[error("installing the seccomp filter: {0}")]
    Install(seccompiler::Error),
}

/// The two compiled programs: the EPERM deny list and the clone3 → ENOSYS filter.
pub fn programs() -> Result<[BpfProgram; 2], SeccompError> {
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
    // with SOCK_RAW; netlink is SOCK_RAW by design and stays allowed), and the
    // obsolete SOCK_PACKET type (10, by number since libc deprecates the name).
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
        rules.insert(nr, socket_rules);
    }
    let mut ioctl_rules = Vec::new();
    for (req, _why) in DENIED_IOCTLS {
        ioctl_rules.push(SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, *req)?])?);
    }
    rules.insert(libc::SYS_ioctl, ioctl_rules);

    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        ARCH,
    )?;
    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, vec![]);
    let clone3 = SeccompFilter::new(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        ARCH,
    )?;
    Ok([deny.try_into()?, clone3.try_into()?])
}

/// Installs both filters on the calling thread (threads started later inherit
/// them). no_new_privs must already be set.
pub fn install_on_current_thread() -> Result<(), SeccompError> {
    for prog in programs()? {
        seccompiler::apply_filter(&prog).map_err(SeccompError::Install)?;
    }
    Ok(())
}

/// Number of syscalls in the deny list (for doctor and docs).
pub fn denied_count() -> usize {
    DENIED.len() + 1 /* clone ns flags */ + 2 /* socket families */ + 1 /* ioctl */
}
