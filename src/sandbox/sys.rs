//! The crate's only `unsafe`: thin wrappers over the Linux system calls that the
//! confinement needs and that `nix` does not wrap (clone into namespaces, landlock,
//! the new mount API for idmapped mounts, the capability bounding set, securebits,
//! pidfds, SCM_RIGHTS reception, bringing `lo` up, loop devices, signal
//! dispositions, and the last confinement step of a child between fork and exec),
//! and one allocator setting (`mallopt`) the daemons make so that freed tool
//! results leave their RSS.
//!
//! Every wrapper is small, returns `io::Result`, and states its invariant in a
//! `// SAFETY:` line. Policy (which rules, which order) lives in the callers.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_int(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Clones the calling process into new namespaces (`flags`, CLONE_NEW*) and execs
/// `exe` with `argv` and an empty environment in the child, with `requests` as
/// fd 3 and `answers` as fd 4, stdin and stdout on /dev/null, stderr kept (the helper's diagnostics), and
/// every other fd closed: nothing the worker holds, or inherited without
/// close-on-exec, reaches the session. The child starts a new session (setsid),
/// so the worker's controlling terminal, if any, is not the sandbox's: `/dev/tty`
/// inside opens nothing. Returns the child's pid as seen from the caller.
///
/// The child runs only async-signal-safe calls (dup2, fcntl, execve, _exit) between
/// clone and exec: the caller may be multi-threaded and another thread may hold the
/// allocator lock, so everything is prepared before the clone.
pub fn clone_exec_helper(
    flags: libc::c_int,
    exe: &CStr,
    argv: &[CString],
    requests: BorrowedFd<'_>,
    answers: BorrowedFd<'_>,
) -> io::Result<libc::pid_t> {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let exe_ptr = exe.as_ptr();
    let (requests_fd, answers_fd) = (requests.as_raw_fd(), answers.as_raw_fd());
    let argv_ptr = argv_ptrs.as_ptr();
    let env_ptr = envp.as_ptr();
    let devnull_ptr = c"/dev/null".as_ptr();

    let cb = Box::new(move || -> isize {
        // SAFETY: runs in the freshly cloned child, which has its own copy of the
        // address space; only async-signal-safe libc calls follow, on pointers that
        // were built before the clone and stay valid in the copy.
        unsafe {
            // Both above 4 first, so placing one at 3 or 4 cannot close the
            // other; dup2 to another number clears close-on-exec on the copy.
            let requests = libc::fcntl(requests_fd, libc::F_DUPFD, 5);
            let answers = libc::fcntl(answers_fd, libc::F_DUPFD, 5);
            if requests < 0
                || answers < 0
                || libc::dup2(requests, 3) < 0
                || libc::dup2(answers, 4) < 0
            {
                libc::_exit(126);
            }
            let null = libc::open(devnull_ptr, libc::O_RDWR);
            if null < 0 || libc::dup2(null, 0) < 0 || libc::dup2(null, 1) < 0 {
                libc::_exit(126);
            }
            if libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0u32) < 0 {
                libc::_exit(126);
            }
            if libc::setsid() < 0 {
                libc::_exit(126);
            }
            libc::execve(exe_ptr, argv_ptr, env_ptr);
            libc::_exit(127)
        }
    });
    let mut stack = vec![0u8; 256 * 1024];
    let clone_flags = nix::sched::CloneFlags::from_bits_retain(flags);
    // SAFETY: the callback only execs (see above); the stack outlives the call
    // because the child gets its own copy of it (no CLONE_VM), and SIGCHLD makes
    // the child reapable by waitpid like a forked child.
    let pid = unsafe { nix::sched::clone(cb, &mut stack, clone_flags, Some(libc::SIGCHLD)) }
        .map_err(io::Error::from)?;
    Ok(pid.as_raw())
}

// ---------------------------------------------------------------------------
// landlock

pub const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1 << 0;
pub const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;
pub const LANDLOCK_RULE_NET_PORT: libc::c_int = 2;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

#[repr(C)]
struct NetPortAttr {
    allowed_access: u64,
    port: u64,
}

/// The landlock ABI version of the running kernel, or an error (ENOSYS: not built
/// in; EOPNOTSUPP: built in but disabled at boot).
pub fn landlock_abi() -> io::Result<u32> {
    // SAFETY: with the VERSION flag the kernel ignores attr and size (NULL, 0).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    cvt(ret).map(|v| v as u32)
}

/// Creates a landlock ruleset handling the given access rights. `abi` decides
/// which struct size is passed: kernels before ABI 4 know only the fs field and
/// before ABI 6 no `scoped` field.
pub fn landlock_create_ruleset(fs: u64, net: u64, scoped: u64, abi: u32) -> io::Result<OwnedFd> {
    let attr = RulesetAttr {
        handled_access_fs: fs,
        handled_access_net: net,
        scoped,
    };
    let size = if abi >= 6 {
        std::mem::size_of::<RulesetAttr>()
    } else if abi >= 4 {
        16
    } else {
        8
    };
    // SAFETY: attr is a live, properly laid out landlock_ruleset_attr of at least
    // `size` bytes; the kernel only reads it.
    let fd = cvt(unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            size,
            0u32,
        )
    })?;
    // SAFETY: on success the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Allows `access` beneath the directory (or on the file) open at `parent`.
pub fn landlock_add_path_rule(
    ruleset: BorrowedFd<'_>,
    parent: BorrowedFd<'_>,
    access: u64,
) -> io::Result<()> {
    let attr = PathBeneathAttr {
        allowed_access: access,
        parent_fd: parent.as_raw_fd(),
    };
    // SAFETY: attr is a live landlock_path_beneath_attr; both fds are borrowed and
    // open for the duration of the call.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            LANDLOCK_RULE_PATH_BENEATH,
            &attr as *const PathBeneathAttr,
            0u32,
        )
    })?;
    Ok(())
}

/// Allows `access` (bind/connect) on TCP `port`.
pub fn landlock_add_net_rule(ruleset: BorrowedFd<'_>, port: u16, access: u64) -> io::Result<()> {
    let attr = NetPortAttr {
        allowed_access: access,
        port: u64::from(port),
    };
    // SAFETY: attr is a live landlock_net_port_attr; ruleset is open.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            LANDLOCK_RULE_NET_PORT,
            &attr as *const NetPortAttr,
            0u32,
        )
    })?;
    Ok(())
}

/// Enforces the ruleset on the calling thread (and its future children). Requires
/// no_new_privs (or CAP_SYS_ADMIN).
pub fn landlock_restrict_self(ruleset: BorrowedFd<'_>, flags: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed, open ruleset fd.
    cvt(unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), flags) })?;
    Ok(())
}

// ---------------------------------------------------------------------------
// mount API (idmapped mounts)

const OPEN_TREE_CLONE: libc::c_uint = 1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x0000_0004;
pub const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
pub const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
pub const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
pub const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A detached clone of the mount at `path` (not recursive), as an fd.
pub fn open_tree_clone(path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: path is a valid NUL-terminated string; flags are constants.
    let fd = cvt(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC,
        )
    })?;
    // SAFETY: the syscall returned a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A detached clone of the mount at the directory open at `dir` (an `O_PATH` fd
/// is enough): the path the fd was opened by is not looked up again.
pub fn open_tree_clone_fd(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let empty = c"";
    // SAFETY: dir is an open fd; the empty path with AT_EMPTY_PATH makes the
    // kernel use it; flags are constants.
    let fd = cvt(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dir.as_raw_fd(),
            empty.as_ptr(),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | libc::AT_EMPTY_PATH as libc::c_uint,
        )
    })?;
    // SAFETY: the syscall returned a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sets attributes on a detached mount; with `MOUNT_ATTR_IDMAP` the mount's ids
/// are mapped through the user namespace open at `userns`.
pub fn mount_setattr(
    mnt: BorrowedFd<'_>,
    attr_set: u64,
    userns: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.map(|f| f.as_raw_fd() as u64).unwrap_or(0),
    };
    let empty = c"";
    // SAFETY: attr is a live mount_attr whose size we pass; mnt is an open mount fd
    // and AT_EMPTY_PATH makes the kernel operate on it.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mnt.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    Ok(())
}

/// Attaches the detached mount `mnt` at `target`.
pub fn move_mount(mnt: BorrowedFd<'_>, target: &CStr) -> io::Result<()> {
    let empty = c"";
    // SAFETY: both strings are valid; mnt is an open detached mount.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })?;
    Ok(())
}

// ---------------------------------------------------------------------------
// capabilities

/// Highest capability number the kernel knows (`/proc/sys/kernel/cap_last_cap`).
fn cap_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Empties the capability bounding set, so no later exec (setuid binary or file
/// capabilities) can ever bring a capability back. Needs CAP_SETPCAP.
pub fn drop_bounding_set() -> io::Result<()> {
    for cap in 0..=cap_last_cap() {
        // SAFETY: PR_CAPBSET_DROP takes an integer capability number.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            // EINVAL: the kernel does not know this capability number.
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(err);
            }
        }
    }
    Ok(())
}

/// Clears the ambient capability set.
pub fn clear_ambient_caps() -> io::Result<()> {
    // SAFETY: integer-only prctl.
    cvt_int(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    })?;
    Ok(())
}

pub const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
pub const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
pub const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
pub const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
pub const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
pub const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
pub const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;

/// Sets the securebits. Needs CAP_SETPCAP.
pub fn set_securebits(bits: libc::c_ulong) -> io::Result<()> {
    // SAFETY: integer-only prctl.
    cvt_int(unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0) })?;
    Ok(())
}

/// Returns the effective capability set of the calling thread as a bitmask.
pub fn effective_caps() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .ok_or_else(|| io::Error::other("no CapEff in /proc/self/status"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).map_err(io::Error::other)
}

// ---------------------------------------------------------------------------
// network

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> io::Result<()> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags of the named interface into ifr, which
    // lives for the call.
    cvt_int(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) })?;
    // SAFETY: the union member written by SIOCGIFFLAGS is ifru_flags.
    unsafe {
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above, SIOCSIFFLAGS reads ifr.
    cvt_int(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) })?;
    Ok(())
}

// ---------------------------------------------------------------------------
// processes and fds

/// Whether `path` carries the extended attribute `name` (the cgroupfs's
/// `trusted.delegate`, which systemd ≥ 251 sets on the groups it delegates).
pub fn has_xattr(path: &CStr, name: &CStr) -> bool {
    // SAFETY: both strings are NUL-terminated; a NULL buffer of size 0 asks only
    // for the value's size, nothing is written.
    let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    n >= 0
}

/// A pidfd for `pid`: becomes readable when the process exits and can signal it
/// without pid-reuse races.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: integer-only syscall.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) })?;
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `sig` through a pidfd.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: the info pointer may be NULL; pidfd is open.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    })?;
    Ok(())
}

/// Receives bytes and any SCM_RIGHTS fds from a unix socket (blocking).
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 8]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel just installed these fds in our table for us;
                // nothing else refers to them.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((msg.bytes, fds))
}

/// Sends `data` with `fds` attached (SCM_RIGHTS). Returns bytes sent.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [io::IoSlice::new(data)];
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        if raw.is_empty() { &[] } else { &cmsgs },
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)
}

/// Takes ownership of an fd inherited across exec (the helper's sockets, fds 3
/// and 4) and marks it close-on-exec. Fails unless `fd` is open.
pub fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only queries the fd table.
    cvt_int(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // The fd had to survive the exec that started us; nothing we start may
    // inherit it.
    // SAFETY: F_SETFD on an fd that is open (checked above).
    cvt_int(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) })?;
    // SAFETY: the fd is open (checked above) and, by the helper's calling
    // convention, handed to this process for it alone; it is taken exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A user namespace whose uid and gid maps are `uid_map`/`gid_map` (lines of
/// "inside outside count"), returned as an fd of `/proc/<pid>/ns/user`; used only
/// to describe an idmapped mount, no process stays in it.
///
/// `proc_root` must be a procfs of the caller's pid namespace (the fork returns
/// a pid of that namespace). The caller must be single-threaded (it forks); the
/// child only calls unshare, write, read and _exit, and is SIGKILLed at the end.
pub fn userns_with_maps(
    proc_root: &std::path::Path,
    uid_map: &str,
    gid_map: &str,
) -> io::Result<OwnedFd> {
    let (ready_r, ready_w) = nix::unistd::pipe().map_err(io::Error::from)?;
    let (done_r, done_w) = nix::unistd::pipe().map_err(io::Error::from)?;
    // SAFETY: the child runs only async-signal-safe calls on fds it inherited and
    // exits with _exit; the caller is single-threaded, so no lock is held across
    // the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above; all fds are valid in the child.
        unsafe {
            let ok: u8 = if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                1
            } else {
                0
            };
            libc::write(
                ready_w.as_raw_fd(),
                &ok as *const u8 as *const libc::c_void,
                1,
            );
            let mut b = 0u8;
            libc::read(
                done_r.as_raw_fd(),
                &mut b as *mut u8 as *mut libc::c_void,
                1,
            );
            libc::_exit(0);
        }
    }
    drop(ready_w);
    drop(done_r);
    let result = (|| {
        let mut ok = [0u8; 1];
        let n = nix::unistd::read(&ready_r, &mut ok).map_err(io::Error::from)?;
        if n != 1 || ok[0] != 1 {
            return Err(io::Error::other(
                "unshare(CLONE_NEWUSER) failed in the mapping child",
            ));
        }
        let dir = proc_root.join(pid.to_string());
        std::fs::write(dir.join("uid_map"), uid_map)?;
        std::fs::write(dir.join("gid_map"), gid_map)?;
        let f = std::fs::File::open(dir.join("ns/user"))?;
        Ok(OwnedFd::from(f))
    })();
    drop(done_w);
    // The child holds copies of both pipes, so EOF would never reach it.
    let child = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(child, None);
    result
}

/// RLIMIT_CORE = 1 (soft and hard): no core dump at all. A limit of 0 stops
/// core *files*, but the kernel ignores it when `core_pattern` is a pipe
/// (systemd-coredump, apport) and hands the crashing process's memory to a root
/// process on the host; 1 is the value it honours for pipes ("RLIMIT_CORE of 1
/// aborts the dump"), and one byte is less than any core file.
pub fn disable_core_dumps() -> io::Result<()> {
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 1, 1)
        .map_err(io::Error::from)
}

/// The session's descriptor limit: what a systemd host gives its services,
/// 1024 soft (programs built on `select(2)` break above it) and 524288 hard,
/// never raising what the worker was given. Without it a session inherits the
/// worker's own limit, which its unit sets to 1048576 for relayed connections.
pub fn session_nofile_limit() -> io::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    const SOFT: u64 = 1024;
    const HARD: u64 = 524_288;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    let hard = hard.min(HARD);
    setrlimit(Resource::RLIMIT_NOFILE, soft.min(SOFT).min(hard), hard).map_err(io::Error::from)
}

/// Restores the default disposition of the signals the Rust runtime handles
/// (SIGSEGV and SIGBUS, for its stack-overflow message). The helper is the init
/// of its pid namespace, and the kernel drops every signal sent to init from
/// inside the namespace unless init handles it: with no handler left, `kill
/// -SEGV 1` from the session does nothing, while a real fault still kills.
pub fn default_fault_signals() -> io::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGSEGV, Signal::SIGBUS] {
        // SAFETY: installing SIG_DFL runs no code of ours in signal context.
        unsafe { sigaction(sig, &dfl) }.map_err(io::Error::from)?;
    }
    Ok(())
}

/// The signal handlers installed for `pid` (a bit per signal, bit n-1 for
/// signal n), from `/proc/<pid>/status`.
pub fn caught_signals(pid: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("SigCgt:"))
        .ok_or_else(|| io::Error::other("no SigCgt in status"))?;
    u64::from_str_radix(line["SigCgt:".len()..].trim(), 16).map_err(io::Error::other)
}

// ---------------------------------------------------------------------------
// the last step of a child's confinement

/// Confinement that a process the helper starts takes on between fork and exec,
/// on top of what it inherits: an extra seccomp program and, when given, a
/// landlock domain of its own (a ruleset that only scopes signals and abstract
/// sockets, so the helper, in the parent domain, is out of its reach).
pub struct ChildConfinement {
    filter: Vec<libc::sock_filter>,
    landlock: Option<OwnedFd>,
}

impl ChildConfinement {
    /// `filter` is a compiled classic BPF program (seccompiler's `BpfProgram`).
    pub fn new(filter: Vec<libc::sock_filter>, landlock: Option<OwnedFd>) -> ChildConfinement {
        ChildConfinement { filter, landlock }
    }

    /// Makes `cmd` apply this confinement in the child before it execs. The
    /// closure runs after fork in a copy of a multi-threaded process, so it only
    /// makes system calls on data prepared here: no allocation, no lock.
    pub fn apply_to(self: &std::sync::Arc<Self>, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        let me = self.clone();
        let hook = move || -> io::Result<()> {
            if let Some(ruleset) = &me.landlock {
                // SAFETY: plain syscall on an fd the parent keeps open.
                cvt(unsafe {
                    libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32)
                })?;
            }
            let prog = libc::sock_fprog {
                len: me.filter.len() as libc::c_ushort,
                filter: me.filter.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: prog points at the filter vector, alive for the call (held
            // by the Arc in this closure); no_new_privs is already set.
            cvt(unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0u32,
                    &prog as *const libc::sock_fprog,
                )
            })?;
            Ok(())
        };
        // SAFETY: the hook only makes async-signal-safe system calls (see above).
        unsafe { cmd.pre_exec(hook) };
    }
}

// ---------------------------------------------------------------------------
// loop devices

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Attaches the file open at `backing` to a free loop device with autoclear (the
/// device detaches itself when its last user, the mount, goes) and returns the
/// device's path and an open fd of it. Needs CAP_SYS_ADMIN and `/dev/loop-control`.
pub fn loop_attach(backing: BorrowedFd<'_>) -> io::Result<(std::path::PathBuf, OwnedFd)> {
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // Another attacher may take the device between GET_FREE and CONFIGURE
    // (EBUSY): ask again.
    for _ in 0..64 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let n = cvt_int(unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) })?;
        let path = std::path::PathBuf::from(format!("/dev/loop{n}"));
        let dev = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // SAFETY: LoopConfig is plain data; zeroed is a valid value.
        let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
        cfg.fd = backing.as_raw_fd() as u32;
        cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        // SAFETY: cfg is a live loop_config the kernel only reads; dev is open.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if r == 0 {
            return Ok((path, OwnedFd::from(dev)));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
    }
    Err(io::Error::other("no free loop device after 64 tries"))
}

/// Makes glibc's malloc serve every allocation of `bytes` or more with an mmap
/// of its own, unmapped when freed (`mallopt(M_MMAP_THRESHOLD)`). By default
/// the threshold is dynamic: it climbs to the size of the first large buffer
/// freed (up to 32 MiB), after which buffers of a tool result's size come from
/// the heap, and freed ones stay in the process's RSS instead of returning to
/// the kernel. A no-op on other C libraries.
pub fn set_malloc_mmap_threshold(bytes: usize) -> io::Result<()> {
    #[cfg(target_env = "gnu")]
    {
        let value = libc::c_int::try_from(bytes)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: mallopt sets one allocator parameter under the allocator's
        // own lock; no pointer crosses, and any value is defined behaviour
        // (an out-of-range one is refused with 0).
        if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, value) } != 1 {
            return Err(io::Error::other("mallopt(M_MMAP_THRESHOLD) refused"));
        }
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = bytes;
    Ok(())
}
