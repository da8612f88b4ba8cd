//! The session's filesystem view, built inside its own mount namespace: a fresh
//! tmpfs root holding only the policy's read-only paths, the workspace at
//! `/workspace` (idmapped so the session uid owns it), a private `/tmp`, a minimal
//! `/dev`, and a `/proc` of the session's own pid namespace. Nothing else of the
//! host exists inside.

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::proto::Setup;
use super::sys;

/// Where the workspace appears inside the sandbox.
pub const WORKSPACE: &str = crate::workspace::MOUNT_POINT;

/// Device nodes bound from the host's /dev. `tty` opens nothing: the helper starts
/// a session of its own, so no process in the sandbox has a controlling terminal
/// (ENXIO), but programs that probe it get the usual answer.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Files of the session's `/proc` that describe the host rather than the session,
/// shown empty (`/dev/null` bound over them, as container runtimes do): the
/// kernel's command line (boot parameters, sometimes a root device or a secret),
/// keyring usage of every uid, timers and scheduler state of every host process.
const PROC_MASKED: [&str; 5] = ["cmdline", "keys", "key-users", "timer_list", "sched_debug"];

#[derive(Debug, thiserror::Error)]
#[error("{step} {path:?}: {cause}")]
pub struct MountError {
    pub step: &'static str,
    pub path: PathBuf,
    pub cause: std::io::Error,
}

fn err<E: Into<std::io::Error>>(step: &'static str, path: &Path) -> impl FnOnce(E) -> MountError {
    let path = path.to_path_buf();
    move |e| MountError {
        step,
        path,
        cause: e.into(),
    }
}

fn cstr(p: &Path) -> CString {
    // Paths come from validated policy and config: no interior NUL.
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// `root` joined with the absolute `p` ("/usr" → "<root>/usr").
fn under(root: &Path, p: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for c in p.components() {
        if let Component::Normal(n) = c {
            out.push(n);
        }
    }
    out
}

fn bind_read_only(src: &Path, dst: &Path) -> Result<(), MountError> {
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err("bind", src))?;
    // A bind mount ignores MS_RDONLY on creation; the remount applies it.
    mount(
        None::<&str>,
        dst,
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(err("remount read-only", dst))
}

/// What the session's `/etc/resolv.conf` says in `egress` mode: the session
/// resolver the worker serves on the session's loopback.
pub const RESOLV_CONF: &str = "# hands: the session resolver; it answers the names this environment allows\nnameserver 127.0.0.1\noptions edns0\n";

/// Puts [`RESOLV_CONF`] where `/etc/resolv.conf` leads in the new root (the
/// host's file bound read-only, or the target of its symlink, as systemd-resolved
/// hosts have it), bound read-only over whatever the host has there.
fn resolver_conf(root: &Path) -> Result<(), MountError> {
    let src = root.join(".hands-resolv.conf");
    std::fs::write(&src, RESOLV_CONF).map_err(err("write", &src))?;
    // Follow the link as the session would see it: relative to its directory,
    // absolute ones from the new root.
    let mut at = under(root, Path::new("/etc/resolv.conf"));
    for _ in 0..8 {
        match std::fs::read_link(&at) {
            Ok(target) if target.is_absolute() => at = under(root, &target),
            Ok(target) => {
                let dir = at.parent().unwrap_or(root).to_path_buf();
                at = dir.join(target);
            }
            Err(_) => break,
        }
    }
    if !at.starts_with(root) || at.components().any(|c| c == Component::ParentDir) {
        // `..` in a link: resolve it lexically inside the root.
        let mut clean = PathBuf::new();
        for c in at.strip_prefix(root).unwrap_or(&at).components() {
            match c {
                Component::ParentDir => {
                    clean.pop();
                }
                Component::Normal(n) => clean.push(n),
                _ => {}
            }
        }
        at = under(root, &clean);
    }
    if std::fs::symlink_metadata(&at).is_err() {
        // Not there (no /etc in the policy, or a link into a directory the
        // sandbox does not show): made on the root's own tmpfs.
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent).map_err(err("mkdir", parent))?;
        }
        std::fs::write(&at, b"").map_err(err("create", &at))?;
    }
    bind_read_only(&src, &at)
}

fn tmpfs(dst: &Path, opts: &str, flags: MsFlags) -> Result<(), MountError> {
    std::fs::create_dir_all(dst).map_err(err("mkdir", dst))?;
    mount(Some("tmpfs"), dst, Some("tmpfs"), flags, Some(opts)).map_err(err("mount tmpfs", dst))
}

/// The name of the filesystem `fd` lies on, for messages.
pub fn fs_name(fd: std::os::fd::BorrowedFd<'_>) -> String {
    match nix::sys::statfs::fstatfs(fd) {
        Ok(st) => {
            let magic = st.filesystem_type().0 as u64;
            match magic {
                0x0102_1994 => "tmpfs".into(),
                0xef53 => "ext4".into(),
                0x5846_5342 => "xfs".into(),
                0x9123_683e => "btrfs".into(),
                0x794c_7630 => "overlayfs".into(),
                0x6969 => "nfs".into(),
                0x6573_5546 => "fuse".into(),
                0x2fc1_2fc1 => "zfs".into(),
                other => format!("filesystem magic {other:#x}"),
            }
        }
        Err(e) => format!("unknown: {e}"),
    }
}

/// Builds the view and pivots into it, in order:
/// 1. make every mount private, so nothing propagates back to the host;
/// 2. mount a small tmpfs on `setup.root_dir` as the new root;
/// 3. bind each read-only path (parents first; host symlinks such as Debian's
///    `/bin -> usr/bin` are recreated as symlinks), remounted ro,nosuid,nodev;
/// 4. attach an idmapped clone of the workspace at `/workspace` (host owner ↔
///    session uid), nosuid,nodev: `ws_tree` is the detached clone the worker
///    took from the directory fd it resolved, so no path is looked up here;
/// 5. private `/tmp` and `/dev/shm` tmpfs, a `/dev` tmpfs with the usual device
///    nodes bound in, `/proc` of the session's pid namespace with the host's
///    files of `PROC_MASKED` shown empty;
/// 6. pivot_root into the new root, detach the old one, remount `/` read-only.
///
/// Returns whether the workspace is idmapped.
pub fn build(setup: &Setup, ws_tree: OwnedFd) -> Result<bool, MountError> {
    let root = setup.root_dir.as_path();
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(err("make private", Path::new("/")))?;

    tmpfs(
        root,
        "mode=0755,size=2m",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )?;

    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let mut ro = setup.read_only.clone();
    ro.sort_by_key(|p| p.components().count());
    for p in &ro {
        let meta = match std::fs::symlink_metadata(p) {
            Ok(m) => m,
            // Nothing to show; nothing can be reached through it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(err("stat", p)(e)),
        };
        let dst = under(root, p);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(err("mkdir", parent))?;
        }
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(p).map_err(err("readlink", p))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(err("symlink", &dst))?;
        } else if meta.is_dir() {
            std::fs::create_dir_all(&dst).map_err(err("mkdir", &dst))?;
            bind_read_only(p, &dst)?;
        } else {
            std::fs::write(&dst, b"").map_err(err("create", &dst))?;
            bind_read_only(p, &dst)?;
        }
    }

    if setup.net == super::proto::NetMode::Egress {
        resolver_conf(root)?;
    }

    // The session's own procfs comes first: the idmap below forks a child whose
    // pid only means something in this pid namespace.
    let proc_dir = under(root, Path::new("/proc"));
    std::fs::create_dir_all(&proc_dir).map_err(err("mkdir", &proc_dir))?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        nosuid_nodev | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(err("mount proc", &proc_dir))?;
    for name in PROC_MASKED {
        let dst = proc_dir.join(name);
        if !dst.exists() {
            continue;
        }
        mount(
            Some("/dev/null"),
            &dst,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err("mask", &dst))?;
    }

    // Workspace: on-disk owner ↔ session uid.
    let ws = under(root, Path::new(WORKSPACE));
    std::fs::create_dir_all(&ws).map_err(err("mkdir", &ws))?;
    let userns = sys::userns_with_maps(
        &proc_dir,
        &format!("{} {} 1\n", setup.workspace_uid, setup.uid),
        &format!("{} {} 1\n", setup.workspace_gid, setup.gid),
    )
    .map_err(err("user namespace for idmap", &setup.workspace))?;
    sys::mount_setattr(
        ws_tree.as_fd(),
        sys::MOUNT_ATTR_IDMAP | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV,
        Some(userns.as_fd()),
    )
    .map_err(|e| {
        let cause = if e.raw_os_error() == Some(libc::EINVAL) {
            std::io::Error::other(format!(
                "{e}: its filesystem ({}) does not support idmapped mounts on this kernel (tmpfs has them from Linux 6.3; ext4, xfs and btrfs from 5.12 to 5.15); give a workspace on such a filesystem",
                fs_name(ws_tree.as_fd())
            ))
        } else {
            e
        };
        MountError {
            step: "idmap workspace",
            path: setup.workspace.clone(),
            cause,
        }
    })?;
    sys::move_mount(ws_tree.as_fd(), &cstr(&ws)).map_err(err("attach workspace", &ws))?;

    tmpfs(
        &under(root, Path::new("/tmp")),
        &format!("mode=1777,size={}", setup.tmp_size),
        nosuid_nodev,
    )?;

    let dev = under(root, Path::new("/dev"));
    tmpfs(
        &dev,
        "mode=0755,size=64k",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
    )?;
    for name in DEVICES {
        let src = Path::new("/dev").join(name);
        if !src.exists() {
            continue;
        }
        let dst = dev.join(name);
        std::fs::write(&dst, b"").map_err(err("create", &dst))?;
        mount(
            Some(&src),
            &dst,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err("bind device", &src))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let l = dev.join(link);
        std::os::unix::fs::symlink(target, &l).map_err(err("symlink", &l))?;
    }
    tmpfs(
        &dev.join("shm"),
        "mode=1777,size=64m",
        nosuid_nodev | MsFlags::MS_NOEXEC,
    )?;

    // The extra directories of the workspace: read-only remounts, then the
    // symlinks elsewhere in the root (validated: never over a mount of ours;
    // a clash with a read-only path fails here, with the path named).
    for d in &setup.extra_dirs {
        let inside = ws.join(&d.rel);
        if d.read_only {
            bind_read_only(&inside, &inside)?;
        }
        if let Some(at) = &d.link_at {
            let dst = under(root, at);
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent).map_err(err("mkdir", parent))?;
            }
            std::os::unix::fs::symlink(Path::new(WORKSPACE).join(&d.rel), &dst)
                .map_err(err("symlink", at))?;
        }
    }

    nix::unistd::chdir(root).map_err(err("chdir", root))?;
    // pivot_root(".", ".") stacks the old root under the new one; detaching it
    // leaves only the new root (no directory needed for the old root).
    nix::unistd::pivot_root(".", ".").map_err(err("pivot_root", root))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(err("detach old root", root))?;
    nix::unistd::chdir("/").map_err(err("chdir", Path::new("/")))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | nosuid_nodev,
        None::<&str>,
    )
    .map_err(err("remount / read-only", Path::new("/")))?;
    Ok(true)
}

/// The landlock rules matching this view.
pub fn landlock_rules(setup: &Setup) -> super::landlock::Rules {
    super::landlock::Rules {
        read_write: vec![
            PathBuf::from(WORKSPACE),
            PathBuf::from("/tmp"),
            PathBuf::from("/dev/shm"),
        ],
        read_only: setup
            .read_only
            .iter()
            .cloned()
            .chain([PathBuf::from("/proc")])
            .collect(),
        devices: DEVICES.iter().map(|d| Path::new("/dev").join(d)).collect(),
        list_only: vec![PathBuf::from("/"), PathBuf::from("/dev")],
        // Egress, like Loopback, leaves TCP to the network namespace (and its
        // barrier, installed by the worker before setup).
        deny_tcp: setup.net == super::proto::NetMode::None,
    }
}
