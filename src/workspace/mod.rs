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
//! Directories (root-owned, 0700 where they are hands' own):
//! `<state_dir>/workspaces/<name>` the mount points (and plain directories),
//! `<data_dir>/disks/<name>.img` the images, `<data_dir>/disks/pool/` images
//! formatted ahead of time, `<data_dir>/quarantine/` what could not be removed.

pub mod disk;
pub mod remove;

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
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
    #[error("workspace {name}: this host cannot give it a filesystem of its own ({reason}), and the policy does not allow the `workspace-disk` degradation")]
    NoDisk { name: String, reason: String },
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
    /// A filesystem of its own, mounted at `path` from the image `image`.
    Filesystem { image: PathBuf },
    /// A plain directory hands made (the `workspace-disk` degradation).
    Directory,
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
            Kind::Filesystem { .. } => "a filesystem of its own (loop-mounted ext4 image)",
            Kind::Directory => "a plain directory (degraded: not bounded by limits.disk)",
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

impl Workspaces {
    /// `state_dir` holds the mount points, `data_dir` the images; the mechanism
    /// for hands' own workspaces is detected here.
    pub fn new(state_dir: PathBuf, data_dir: PathBuf) -> Workspaces {
        let disks = disk::Disks::detect(data_dir.join("disks"));
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
    pub fn given(&self, path: &Path, allow_root_owned: bool) -> Result<Workspace, WorkspaceError> {
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
                "a component of the path is a symbolic link; give the directory's real path"
                    .into(),
            ),
            Some(libc::ENOTDIR) if abs.is_symlink() => refuse(
                "it is a symbolic link; give the directory's real path".into(),
            ),
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

    /// Makes a new, empty workspace called `name` (a session slot's name). A
    /// workspace of that name left behind (by a worker that died) is removed or
    /// quarantined first; the new one never shares a file with it.
    pub fn create(
        &self,
        name: &str,
        geometry: Geometry,
        allow_directory: bool,
    ) -> Result<Workspace, WorkspaceError> {
        let mounts = self.mount_dir();
        private_dir(&self.state_dir)?;
        private_dir(&mounts)?;
        let at = mounts.join(name);
        self.clear(name);
        match self.disks.mechanism() {
            Mechanism::LoopExt4 { .. } => {
                private_dir(&self.data_dir)?;
                let image = self
                    .disks
                    .mount_new(name, geometry, &at)
                    .map_err(io_err(&at, "making its filesystem"))?;
                match self.finish(&at, Kind::Filesystem { image }) {
                    Ok(ws) => Ok(ws),
                    Err(e) => {
                        self.clear(name);
                        Err(e)
                    }
                }
            }
            Mechanism::Unavailable(reason) if !allow_directory => Err(WorkspaceError::NoDisk {
                name: name.to_string(),
                reason: reason.clone(),
            }),
            Mechanism::Unavailable(_) => {
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&at)
                    .map_err(io_err(&at, "creating"))?;
                self.finish(&at, Kind::Directory)
            }
        }
    }

    /// Opens a just-made workspace and checks that it is empty: a fresh
    /// workspace that holds anything is refused, never handed out.
    fn finish(&self, at: &Path, kind: Kind) -> Result<Workspace, WorkspaceError> {
        let dir = open_no_symlinks(at).map_err(io_err(at, "opening"))?;
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
        let st = fstat(dir.as_fd()).map_err(|e| io_err(at, "stat")(nix_io(e)))?;
        Ok(Workspace {
            path: at.to_path_buf(),
            dir,
            uid: st.st_uid,
            gid: st.st_gid,
            kind,
        })
    }

    /// Removes a workspace hands made (a given one is left alone). What cannot
    /// be removed is quarantined; the error says where it went.
    pub fn remove(&self, ws: Workspace) -> Result<(), WorkspaceError> {
        let Workspace {
            path, dir, kind, ..
        } = ws;
        drop(dir);
        let Some(name) = path.file_name().map(OsStr::to_os_string) else {
            return Ok(());
        };
        match kind {
            Kind::Given => Ok(()),
            Kind::Filesystem { image } => {
                disk::unmount(&path);
                let mut result = Ok(());
                if let Err(e) = std::fs::remove_file(&image) {
                    if e.kind() != io::ErrorKind::NotFound {
                        result = Err(self.quarantine(&image, e));
                    }
                }
                if let Err(e) = std::fs::remove_dir(&path) {
                    if e.kind() != io::ErrorKind::NotFound && result.is_ok() {
                        result = Err(self.quarantine(&path, e));
                    }
                }
                result
            }
            Kind::Directory => {
                let parent = self.mount_dir();
                let removed = std::fs::File::open(&parent)
                    .and_then(|p| remove::remove_tree(p.as_fd(), &name));
                match removed {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(self.quarantine(&path, e)),
                }
            }
        }
    }

    /// Moves `path` out of the way, into the quarantine directory, so that it is
    /// never found again under its old name. Returns the error to report.
    fn quarantine(&self, path: &Path, cause: io::Error) -> WorkspaceError {
        let q = self.quarantine_dir();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let to = q.join(format!("{name}.{stamp}"));
        let moved = private_dir(&q)
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|()| std::fs::rename(path, &to));
        let reason = match moved {
            Ok(()) => format!(
                "could not be removed ({cause}); moved to {} for an operator to inspect",
                to.display()
            ),
            Err(e) => format!(
                "could not be removed ({cause}) nor quarantined ({e}); it stays where it is and \
                 is never handed out again"
            ),
        };
        tracing::error!(path = %path.display(), "{reason}");
        WorkspaceError::Refused {
            path: path.to_path_buf(),
            reason,
        }
    }

    /// Clears whatever a previous holder of `name` left: a mount is detached,
    /// an image deleted, a directory removed or quarantined. Best effort; what
    /// is left makes [`Workspaces::finish`] refuse the new workspace.
    fn clear(&self, name: &str) {
        let at = self.mount_dir().join(name);
        disk::unmount(&at);
        let image = self.disks.image_path(name);
        match std::fs::remove_file(&image) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                let _ = self.quarantine(&image, e);
            }
        }
        match std::fs::symlink_metadata(&at) {
            Err(_) => {}
            Ok(m) if !m.is_dir() => {
                if let Err(e) = std::fs::remove_file(&at) {
                    let _ = self.quarantine(&at, e);
                }
            }
            Ok(_) => {
                let removed = std::fs::File::open(self.mount_dir())
                    .and_then(|p| remove::remove_tree(p.as_fd(), OsStr::new(name)));
                if let Err(e) = removed {
                    let _ = self.quarantine(&at, e);
                }
            }
        }
    }

    /// Removes the workspaces hands made whose names `claim` can claim (it
    /// returns a guard, such as the name's slot lock, held while the workspace is
    /// cleared; `None` when a live session holds the name). Returns how many were
    /// removed.
    pub fn sweep<G>(&self, claim: impl Fn(&str) -> Option<G>) -> usize {
        let mut names: Vec<String> = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.mount_dir()) {
            names.extend(rd.flatten().filter_map(|e| e.file_name().into_string().ok()));
        }
        names.extend(self.disks.image_names());
        names.sort();
        names.dedup();
        let mut swept = 0;
        for name in names {
            if let Some(_held) = claim(&name) {
                self.clear(&name);
                swept += 1;
            }
        }
        swept
    }

    /// Keeps `count` formatted images of `geometry` ready, on a background
    /// thread, so that opening a session does not wait for `mke2fs`.
    pub fn keep_ready(&self, geometry: Geometry, count: usize) {
        if private_dir(&self.data_dir).is_ok() {
            self.disks.keep_ready(geometry, count);
        }
    }
}
