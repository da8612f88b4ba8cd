//! Workspaces on the host: the directory a session sees at `/workspace`. This
//! module owns where they are and what can reach the host through them:
//!
//! - a directory the worker is **given** (`--workspace`) is resolved once,
//!   without following a symlink in any component, and then only used through
//!   the directory fd it was opened as; `/`, pseudo-filesystems, a directory
//!   above or inside hands' own directories, and (without an explicit opt-in) a
//!   directory owned by root are refused;
//! - a workspace hands **makes** is a filesystem of its own ([`disk`]): an ext4
//!   image on a loop device, bounded by the policy's `limits.disk` and
//!   `limits.disk_inodes`, mounted `nosuid,nodev` on the host, new for every
//!   session, removed by unmounting it. Where loop devices or `mke2fs` are
//!   missing, a policy that names the `workspace-disk` degradation gets a plain
//!   directory instead (unbounded), removed without recursion ([`remove`]);
//! - whatever cannot be removed is moved to a quarantine directory, never reused.
//!
//! Directories (root-owned, 0700): `<state_dir>/workspaces/<id>` the mount
//! points (and plain directories), `<data_dir>/disks/<id>.img` the images,
//! `<data_dir>/quarantine/` what could not be removed. Every workspace hands
//! makes has a new random id, and is locked (`flock`) by the process using it:
//! a worker that starts removes whatever no one holds.

pub mod disk;
pub mod remove;

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{openat2, Flock, FlockArg, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::fstat;

pub use disk::{Geometry, Mechanism};

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("workspace {path}: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("workspace {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("this host cannot give a workspace a filesystem of its own ({reason}), and the policy does not allow the `workspace-disk` degradation")]
    NoDisk { reason: String },
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> WorkspaceError {
    let path = path.to_path_buf();
    move |source| WorkspaceError::Io { path, what, source }
}

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// How a workspace came to be, which decides how it goes.
#[derive(Debug)]
enum Kind {
    /// The operator's directory: never removed.
    Given,
    /// A filesystem of its own.
    Filesystem(disk::Mounted),
    /// A plain directory hands made (the `workspace-disk` degradation), locked
    /// while in use.
    Directory(#[allow(dead_code)] Flock<std::fs::File>),
    /// A kept filesystem: unmounted at the end, its files kept for the next
    /// session of the same key.
    Kept(disk::Mounted),
    /// A kept plain directory (the `workspace-disk` degradation).
    KeptDirectory(#[allow(dead_code)] Flock<std::fs::File>),
}

/// A session's workspace, held open.
#[derive(Debug)]
pub struct Workspace {
    path: PathBuf,
    dir: OwnedFd,
    uid: u32,
    gid: u32,
    kind: Kind,
}

impl Workspace {
    /// Host path (for messages, and for host-side code that opens it again
    /// itself with `O_NOFOLLOW`; it lies under hands' own directories or was
    /// resolved without symlinks).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The workspace directory, as opened when it was resolved or made.
    pub fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// Owner on the host (shown as the session's uid inside).
    pub fn owner(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }

    /// True when hands made it (and removes it at close).
    pub fn is_owned(&self) -> bool {
        !matches!(self.kind, Kind::Given)
    }

    /// How this workspace is bounded, for logs and doctor.
    pub fn mechanism(&self) -> &'static str {
        match self.kind {
            Kind::Given => "the operator's directory (not bounded by limits.disk)",
            Kind::Filesystem(_) => "a filesystem of its own (loop-mounted ext4 image)",
            Kind::Directory(_) => "a plain directory (degraded: not bounded by limits.disk)",
            Kind::Kept(_) => "a kept filesystem of its own (loop-mounted ext4 image)",
            Kind::KeptDirectory(_) => {
                "a kept plain directory (degraded: not bounded by limits.disk)"
            }
        }
    }
}

/// The workspaces of one host: where they go, and how hands makes them.
#[derive(Debug)]
pub struct Workspaces {
    state_dir: PathBuf,
    data_dir: PathBuf,
    disks: disk::Disks,
}

/// Opens `path` as a directory without following a symlink anywhere in it.
fn open_no_symlinks(path: &Path) -> io::Result<OwnedFd> {
    openat2(
        nix::fcntl::AT_FDCWD,
        path,
        OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS),
    )
    .map_err(nix_io)
}

/// The kernel's own name for an open fd: its path with every symlink and `..`
/// resolved.
fn real_path(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Creates `dir` (and parents) and makes it root-only: nothing of a session's
/// files can be listed or read by another user of the host through it.
fn private_dir(dir: &Path) -> Result<(), WorkspaceError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir, "creating"))?;
    let meta = std::fs::symlink_metadata(dir).map_err(io_err(dir, "stat"))?;
    if !meta.is_dir() {
        return Err(WorkspaceError::Refused {
            path: dir.to_path_buf(),
            reason: "not a directory".into(),
        });
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(dir, "chmod 0700"))?;
    }
    Ok(())
}

/// A plain directory's lock, without waiting.
fn try_lock_dir(path: &Path) -> Option<Flock<std::fs::File>> {
    let f = std::fs::File::open(path).ok()?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).ok()
}

/// A plain directory left unlocked this long is a dead worker's (a new one is
/// locked right after it is made).
const DIRECTORY_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

impl Workspaces {
    /// `state_dir` holds the mount points, `data_dir` the images; the mechanism
    /// for hands' own workspaces is detected here.
    pub fn new(state_dir: PathBuf, data_dir: PathBuf) -> Workspaces {
        let disks = disk::Disks::detect(
            data_dir.join("disks"),
            data_dir.join("kept"),
            state_dir.join("workspaces"),
        );
        Workspaces {
            state_dir,
            data_dir,
            disks,
        }
    }

    /// As on a host without loop devices or `mke2fs`, whatever this one has:
    /// every workspace hands makes is a plain directory (when the policy allows
    /// the `workspace-disk` degradation).
    pub fn without_filesystems(state_dir: PathBuf, data_dir: PathBuf) -> Workspaces {
        let disks = disk::Disks::unavailable(
            data_dir.join("disks"),
            data_dir.join("kept"),
            state_dir.join("workspaces"),
            "filesystems switched off".into(),
        );
        Workspaces {
            state_dir,
            data_dir,
            disks,
        }
    }

    /// How hands makes workspaces on this host.
    pub fn mechanism(&self) -> &Mechanism {
        self.disks.mechanism()
    }

    fn mount_dir(&self) -> PathBuf {
        self.state_dir.join("workspaces")
    }

    /// Plain directories (the `workspace-disk` degradation) live on the data
    /// directory's disk filesystem, not beside the mount points on the state
    /// directory: a `/run` tmpfs supports idmapped mounts only from Linux 6.3.
    fn plain_dir(&self) -> PathBuf {
        self.data_dir.join("dirs")
    }

    fn quarantine_dir(&self) -> PathBuf {
        self.data_dir.join("quarantine")
    }

    /// Directories a given workspace must be neither above nor inside.
    fn own_dirs(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in [&self.state_dir, &self.data_dir] {
            out.push(d.clone());
            if let Ok(real) = std::fs::canonicalize(d) {
                out.push(real);
            }
        }
        out
    }

    /// Resolves a directory the operator gave (see the module doc). Relative
    /// paths are taken from the current directory, whose name the kernel gives
    /// without symlinks.
    /// With `owner`, the directory must belong to that uid (checked on the
    /// opened directory, so a path swapped meanwhile cannot slip through).
    pub fn given(
        &self,
        path: &Path,
        allow_root_owned: bool,
        owner: Option<u32>,
    ) -> Result<Workspace, WorkspaceError> {
        let refuse = |reason: String| WorkspaceError::Refused {
            path: path.to_path_buf(),
            reason,
        };
        let abs = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(io_err(path, "reading the current directory"))?
                .join(path)
        };
        let dir = open_no_symlinks(&abs).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refuse(
                "a component of the path is a symbolic link; give the directory's real path".into(),
            ),
            Some(libc::ENOTDIR) if abs.is_symlink() => {
                refuse("it is a symbolic link; give the directory's real path".into())
            }
            Some(libc::ENOTDIR) => refuse("not a directory".into()),
            _ => WorkspaceError::Io {
                path: path.to_path_buf(),
                what: "opening",
                source: e,
            },
        })?;
        let real = real_path(dir.as_fd()).map_err(io_err(path, "reading its real path"))?;
        if real == Path::new("/") {
            return Err(refuse("the host's root cannot be a workspace".into()));
        }
        for pseudo in ["/proc", "/sys", "/dev"] {
            if real.starts_with(pseudo) {
                return Err(refuse(format!("{pseudo} cannot be a workspace")));
            }
        }
        for own in self.own_dirs() {
            if own.starts_with(&real) {
                return Err(refuse(format!(
                    "it contains {}, which hands itself uses",
                    own.display()
                )));
            }
            if real.starts_with(&own) {
                return Err(refuse(format!(
                    "it lies inside {}, which hands itself uses",
                    own.display()
                )));
            }
        }
        let st = fstat(dir.as_fd()).map_err(|e| io_err(path, "stat")(nix_io(e)))?;
        if let Some(owner) = owner.filter(|&o| o != st.st_uid) {
            return Err(refuse(format!(
                "it is owned by uid {}, not by uid {owner}, for whom this session works; every \
                 file the agent writes there would be uid {}'s",
                st.st_uid, st.st_uid
            )));
        }
        if st.st_uid == 0 && !allow_root_owned {
            return Err(refuse(
                "it is owned by root, so every file the agent writes would be root's on the host; \
                 use a directory owned by an unprivileged user, or allow it explicitly \
                 (--allow-root-workspace)"
                    .into(),
            ));
        }
        Ok(Workspace {
            path: real,
            dir,
            uid: st.st_uid,
            gid: st.st_gid,
            kind: Kind::Given,
        })
    }

    /// Makes a new, empty workspace: a filesystem of `geometry`, or (only when
    /// `allow_directory` and this host cannot make filesystems) a plain
    /// directory. Its name is new; nothing of an earlier workspace is in it.
    pub fn create(
        &self,
        geometry: Geometry,
        allow_directory: bool,
    ) -> Result<Workspace, WorkspaceError> {
        private_dir(&self.state_dir)?;
        private_dir(&self.mount_dir())?;
        private_dir(&self.data_dir)?;
        match self.disks.mechanism() {
            Mechanism::LoopExt4 { .. } => {
                let mounted = self
                    .disks
                    .take(geometry)
                    .map_err(io_err(&self.mount_dir(), "making a workspace filesystem"))?;
                let at = mounted.at.clone();
                match open_empty(&at) {
                    Ok((dir, uid, gid)) => Ok(Workspace {
                        path: at,
                        dir,
                        uid,
                        gid,
                        kind: Kind::Filesystem(mounted),
                    }),
                    Err(e) => {
                        self.disks.release(mounted);
                        Err(e)
                    }
                }
            }
            Mechanism::Unavailable(reason) if !allow_directory => Err(WorkspaceError::NoDisk {
                reason: reason.clone(),
            }),
            Mechanism::Unavailable(_) => {
                private_dir(&self.plain_dir())?;
                let at = self.plain_dir().join(disk::random_id());
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&at)
                    .map_err(io_err(&at, "creating"))?;
                let locked = try_lock_dir(&at).ok_or_else(|| WorkspaceError::Refused {
                    path: at.clone(),
                    reason: "a new workspace directory is locked by someone else".into(),
                })?;
                let (dir, uid, gid) = open_empty(&at)?;
                Ok(Workspace {
                    path: at,
                    dir,
                    uid,
                    gid,
                    kind: Kind::Directory(locked),
                })
            }
        }
    }

    /// Removes a workspace hands made (a given one is left alone). A
    /// filesystem is detached and its image deleted in the background
    /// ([`Workspaces::drain`] waits for that); a plain directory is removed now,
    /// without recursion. What cannot be removed is
    /// quarantined; the error says where it went.
    pub fn remove(&self, ws: Workspace) -> Result<(), WorkspaceError> {
        let Workspace {
            path, dir, kind, ..
        } = ws;
        drop(dir);
        match kind {
            Kind::Given => Ok(()),
            Kind::Filesystem(mounted) => {
                self.disks.release(mounted);
                Ok(())
            }
            Kind::Directory(lock) => {
                let removed = self.remove_directory(&path);
                drop(lock);
                removed
            }
            Kind::Kept(mounted) => {
                self.disks.release_kept(mounted);
                Ok(())
            }
            Kind::KeptDirectory(lock) => {
                if let Ok(f) = std::fs::File::open(&path) {
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
                drop(lock);
                Ok(())
            }
        }
    }

    fn kept_dirs(&self) -> PathBuf {
        self.data_dir.join("kept")
    }

    /// A workspace that outlives its sessions, found again by `key` (a Claude
    /// Managed Agents session id): the files its last session left, or a new,
    /// empty one the first time. Bounded and mounted like any workspace hands
    /// makes; removed only by [`Workspaces::delete_kept`] or the retention sweep
    /// ([`Workspaces::sweep_kept`]), never while a session holds it.
    pub fn open_kept(
        &self,
        key: &str,
        geometry: Geometry,
        allow_directory: bool,
    ) -> Result<Workspace, WorkspaceError> {
        private_dir(&self.state_dir)?;
        private_dir(&self.mount_dir())?;
        private_dir(&self.data_dir)?;
        private_dir(&self.kept_dirs())?;
        let name = kept_name(key);
        let busy = || WorkspaceError::Refused {
            path: self.kept_dirs().join(&name),
            reason: "the kept workspace is in use by another process".into(),
        };
        match self.disks.mechanism() {
            Mechanism::LoopExt4 { .. } => {
                let mounted = self
                    .disks
                    .open_kept(&name, geometry)
                    .map_err(io_err(&self.kept_dirs(), "mounting a kept workspace"))?
                    .ok_or_else(busy)?;
                let at = mounted.at.clone();
                match open_owned(&at) {
                    Ok((dir, uid, gid)) => Ok(Workspace {
                        path: at,
                        dir,
                        uid,
                        gid,
                        kind: Kind::Kept(mounted),
                    }),
                    Err(e) => {
                        self.disks.release_kept(mounted);
                        Err(e)
                    }
                }
            }
            Mechanism::Unavailable(reason) if !allow_directory => Err(WorkspaceError::NoDisk {
                reason: reason.clone(),
            }),
            Mechanism::Unavailable(_) => {
                let at = self.kept_dirs().join(format!("{name}.dir"));
                match std::fs::DirBuilder::new().mode(0o755).create(&at) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_err(&at, "creating")(e)),
                }
                let locked = try_lock_dir(&at).ok_or_else(busy)?;
                let (dir, uid, gid) = open_owned(&at)?;
                Ok(Workspace {
                    path: at,
                    dir,
                    uid,
                    gid,
                    kind: Kind::KeptDirectory(locked),
                })
            }
        }
    }

    /// Deletes the kept workspace of `key`. `Ok(false)` when a session holds
    /// it (it stays); `Ok(true)` when it is gone (or never was).
    pub fn delete_kept(&self, key: &str) -> Result<bool, WorkspaceError> {
        let name = kept_name(key);
        let dir = self.kept_dirs().join(format!("{name}.dir"));
        if dir.exists() {
            let Some(lock) = try_lock_dir(&dir) else {
                return Ok(false);
            };
            let removed = std::fs::File::open(self.kept_dirs())
                .and_then(|p| remove::remove_tree(p.as_fd(), OsStr::new(&format!("{name}.dir"))));
            drop(lock);
            if let Err(e) = removed {
                return Err(self.quarantine(&dir, e));
            }
        }
        Ok(self.disks.delete_kept(&name))
    }

    /// Deletes every kept workspace unused for longer than `retention` that
    /// no session holds. Returns how many went.
    pub fn sweep_kept(&self, retention: std::time::Duration) -> usize {
        let old = |t: std::time::SystemTime| t.elapsed().is_ok_and(|age| age > retention);
        let mut swept = 0;
        for (name, used) in self.disks.kept() {
            if old(used) && self.disks.delete_kept(&name) {
                tracing::info!(workspace = %name, "kept workspace past its retention removed");
                swept += 1;
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.kept_dirs()) {
            for e in rd.flatten() {
                let Some(name) = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".dir"))
                    .map(str::to_string)
                else {
                    continue;
                };
                let used = e.metadata().ok().and_then(|m| m.modified().ok());
                if used.is_some_and(old) {
                    let Some(lock) = try_lock_dir(&e.path()) else {
                        continue;
                    };
                    let removed = std::fs::File::open(self.kept_dirs()).and_then(|p| {
                        remove::remove_tree(p.as_fd(), OsStr::new(&format!("{name}.dir")))
                    });
                    drop(lock);
                    match removed {
                        Ok(()) => swept += 1,
                        Err(e2) => {
                            let _ = self.quarantine(&e.path(), e2);
                        }
                    }
                }
            }
        }
        swept
    }

    fn remove_directory(&self, path: &Path) -> Result<(), WorkspaceError> {
        let Some(name) = path.file_name().map(OsStr::to_os_string) else {
            return Ok(());
        };
        let parent = path.parent().unwrap_or(Path::new("/"));
        let removed =
            std::fs::File::open(parent).and_then(|p| remove::remove_tree(p.as_fd(), &name));
        match removed {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.quarantine(path, e)),
        }
    }

    /// Waits (at most `limit`) for the background deletion of released
    /// workspaces: a short-lived process calls it before it exits.
    pub fn drain(&self, limit: std::time::Duration) {
        self.disks.drain(limit);
    }

    /// Releases the filesystems kept ready and waits (at most `limit`) until
    /// every released workspace is gone: a worker that stops leaves nothing
    /// mounted. What is still in use by a session is left to that session.
    pub fn shutdown(&self, limit: std::time::Duration) {
        self.disks.empty_pool();
        self.disks.drain(limit);
    }

    /// Moves `path` out of the way, into the quarantine directory, so that it is
    /// never found again under its old name. Returns the error to report.
    fn quarantine(&self, path: &Path, cause: io::Error) -> WorkspaceError {
        let q = self.quarantine_dir();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let to = q.join(format!("{name}.{}", disk::random_id()));
        let moved = private_dir(&q)
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|()| std::fs::rename(path, &to));
        let reason = match moved {
            Ok(()) => format!(
                "could not be removed ({cause}); moved to {} for an operator to inspect",
                to.display()
            ),
            Err(e) => format!(
                "could not be removed ({cause}) nor quarantined ({e}); its name is never \
                 handed out again"
            ),
        };
        tracing::error!(path = %path.display(), "{reason}");
        WorkspaceError::Refused {
            path: path.to_path_buf(),
            reason,
        }
    }

    /// Removes what dead workers left: every image no process holds (with its
    /// mount), and every plain directory unlocked for a while. Returns how many
    /// were removed. Live workspaces (locked) are never touched.
    pub fn sweep(&self) -> usize {
        let mut swept = 0;
        let images = self.disks.image_ids();
        for id in &images {
            if self.disks.sweep_one(id) {
                swept += 1;
            }
        }
        let plain = std::fs::read_dir(self.plain_dir())
            .into_iter()
            .flatten()
            .flatten();
        let mounts = std::fs::read_dir(self.mount_dir())
            .into_iter()
            .flatten()
            .flatten();
        for e in mounts.chain(plain) {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if images.contains(&name) {
                continue;
            }
            if self.kept_dirs().join(format!("{name}.img")).exists() {
                // A kept workspace a dead worker left mounted: unmounted, its
                // files kept for the session's next item.
                if self.disks.unmount_stale_kept(&name) {
                    swept += 1;
                }
                continue;
            }
            let path = e.path();
            let old = e
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > DIRECTORY_GRACE);
            if !old {
                continue;
            }
            let Some(lock) = try_lock_dir(&path) else {
                continue;
            };
            disk::unmount(&path);
            let _ = self.remove_directory(&path);
            drop(lock);
            swept += 1;
        }
        swept
    }

    /// Keeps `count` filesystems of `geometry` formatted and mounted, on a
    /// background thread, so that opening a session does not wait for them.
    pub fn keep_ready(&self, geometry: Geometry, count: usize) {
        if private_dir(&self.state_dir).is_ok()
            && private_dir(&self.mount_dir()).is_ok()
            && private_dir(&self.data_dir).is_ok()
        {
            self.disks.keep_ready(geometry, count);
        }
    }

    /// Filesystems of `geometry` ready to be taken.
    pub fn ready(&self, geometry: Geometry) -> usize {
        self.disks.ready(geometry)
    }
}

/// Opens a just-made workspace and checks that it is empty: a fresh workspace
/// that holds anything is refused, never handed out.
fn open_empty(at: &Path) -> Result<(OwnedFd, u32, u32), WorkspaceError> {
    let opened = open_owned(at)?;
    let mut entries = std::fs::read_dir(at).map_err(io_err(at, "listing"))?;
    if let Some(first) = entries.next() {
        let what = first
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .unwrap_or_else(|e| e.to_string());
        return Err(WorkspaceError::Refused {
            path: at.to_path_buf(),
            reason: format!("a fresh workspace is not empty ({what})"),
        });
    }
    Ok(opened)
}

/// Opens a workspace directory without following a symlink, with its owner.
fn open_owned(at: &Path) -> Result<(OwnedFd, u32, u32), WorkspaceError> {
    let dir = open_no_symlinks(at).map_err(io_err(at, "opening"))?;
    let st = fstat(dir.as_fd()).map_err(|e| io_err(at, "stat")(nix_io(e)))?;
    Ok((dir, st.st_uid, st.st_gid))
}

/// The file name of the kept workspace of `key`: the key itself when it is a
/// plain identifier (operators find a session's workspace by its id), else a
/// digest of it.
fn kept_name(key: &str) -> String {
    let plain = !key.is_empty()
        && key.len() <= 100
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        format!("kept-{key}")
    } else {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let hex: String = digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("kept-h{hex}")
    }
}

/// Where the workspace appears inside the sandbox.
pub const MOUNT_POINT: &str = "/workspace";

/// A subdirectory of the workspace that the sandbox also shows at another
/// absolute path and/or mounts read-only. The directory itself always lives in
/// the workspace, so the host side never touches a path the sandbox chose.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExtraDir {
    /// Relative to the workspace; normal components only.
    pub rel: PathBuf,
    /// An absolute sandbox path made a symlink to `/workspace/<rel>`; normal
    /// components only, and outside every path the sandbox mounts itself.
    pub link_at: Option<PathBuf>,
    /// Mounted read-only inside the sandbox (bash included).
    pub read_only: bool,
}

impl ExtraDir {
    /// Checks the shape (the mounts trust it afterwards).
    pub fn validate(&self) -> Result<(), String> {
        use std::path::Component;
        let normal =
            |p: &std::path::Path| p.components().all(|c| matches!(c, Component::Normal(_)));
        if self.rel.as_os_str().is_empty() || !normal(&self.rel) {
            return Err(format!("{:?}: not a clean relative path", self.rel));
        }
        if let Some(at) = &self.link_at {
            let mut c = at.components();
            if c.next() != Some(Component::RootDir)
                || !normal(c.as_path())
                || c.as_path().as_os_str().is_empty()
            {
                return Err(format!("{at:?}: not a clean absolute path"));
            }
            for reserved in ["/proc", "/sys", "/dev", "/tmp", "/workspace"] {
                if at.starts_with(reserved) || std::path::Path::new(reserved).starts_with(at) {
                    return Err(format!(
                        "{at:?}: overlaps {reserved}, which the sandbox mounts itself"
                    ));
                }
            }
        }
        Ok(())
    }
}
