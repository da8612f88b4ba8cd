//! A filesystem per workspace: a sparse ext4 image formatted with `mke2fs`,
//! attached to a loop device and mounted `nosuid,nodev` on the host. The kernel
//! then enforces what a session may leave on the host: no more bytes and inodes
//! than the image has (`No space left on device` inside, the host's own
//! filesystems untouched), no set-user-ID program and no device node that the
//! host would honour, and a removal that is an unmount, however the session
//! shaped its tree.
//!
//! Each filesystem has a random id: its image is `<images>/<id>.img`, its mount
//! point `<mounts>/<id>`. The process using one (a session, or the pool) holds an
//! exclusive `flock` on the image, so a worker that starts can tell a workspace
//! left by a dead worker (lockable) from a live one, and an id is never used
//! twice.
//!
//! A *kept* filesystem has a name instead (a Claude Managed Agents session's
//! id) and an image under `<kept>/`: released, it is unmounted and its image
//! stays, so the next item of the same session mounts the same files again.
//!
//! A worker keeps a few filesystems per geometry formatted and mounted ahead of
//! time ([`Disks::keep_ready`]), so that opening a session takes one off a list.
//! Removal happens on a background reaper (the kernel's teardown of a filesystem
//! and the deletion of a large sparse file take milliseconds that a session's
//! close need not wait for); [`Disks::drain`] waits for it. Freed blocks are discarded (`discard`), which punches holes in
//! the sparse image: the host's disk gives back what a session deletes.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::sandbox::sys;

/// The size of a workspace's filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Bytes of the image (the filesystem's size; a little of it is metadata).
    pub bytes: u64,
    /// Inodes: files, directories and symlinks together.
    pub inodes: u64,
}

/// How hands makes its workspaces on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mechanism {
    /// An ext4 image per workspace on a loop device.
    LoopExt4 { mke2fs: PathBuf },
    /// Not possible here, and why.
    Unavailable(String),
}

impl Mechanism {
    pub fn describe(&self) -> String {
        match self {
            Mechanism::LoopExt4 { mke2fs } => format!(
                "a filesystem per workspace: ext4 images ({}) on loop devices, mounted nosuid,nodev",
                mke2fs.display()
            ),
            Mechanism::Unavailable(why) => format!("none ({why})"),
        }
    }
}

/// A mounted filesystem, held: the lock on its image marks it in use.
#[derive(Debug)]
pub struct Mounted {
    pub id: String,
    pub at: PathBuf,
    pub image: PathBuf,
    _lock: Flock<File>,
}

#[derive(Debug, Default)]
struct Pool {
    /// How many ready filesystems to keep, per geometry.
    wanted: HashMap<Geometry, usize>,
    ready: HashMap<Geometry, Vec<Mounted>>,
    /// A filler thread is running.
    filling: bool,
}

#[derive(Debug)]
struct Inner {
    images: PathBuf,
    /// Images of kept workspaces (see [`Disks::open_kept`]).
    kept: PathBuf,
    mounts: PathBuf,
    mechanism: Mechanism,
    pool: Mutex<Pool>,
    wake: Condvar,
    reaper: Mutex<Option<mpsc::Sender<Mounted>>>,
    /// Removals queued and not yet done (for [`Disks::drain`]).
    pending: Mutex<usize>,
    drained: Condvar,
}

#[derive(Debug, Clone)]
pub struct Disks {
    inner: Arc<Inner>,
}

fn find_mke2fs() -> Option<PathBuf> {
    ["/usr/sbin/mke2fs", "/sbin/mke2fs", "/usr/bin/mke2fs"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn detect() -> Mechanism {
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems
        .lines()
        .any(|l| l.trim_end().ends_with("\text4"))
    {
        return Mechanism::Unavailable("the kernel has no ext4".into());
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
    {
        return Mechanism::Unavailable(format!("/dev/loop-control: {e}"));
    }
    match find_mke2fs() {
        Some(mke2fs) => Mechanism::LoopExt4 { mke2fs },
        None => Mechanism::Unavailable("mke2fs not found (Debian: e2fsprogs)".into()),
    }
}

/// Attaches `image` to a loop device and mounts it at `at` (created if
/// missing), `nosuid,nodev`. A `fresh` filesystem loses mke2fs's `lost+found`:
/// a new workspace is empty.
fn attach_and_mount(image: &Path, at: &Path, fresh: bool) -> io::Result<()> {
    let mounted = (|| {
        match std::fs::create_dir(at) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let backing = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(image)?;
        // The loop fd stays open until the mount holds the device, so
        // autoclear cannot detach it in between.
        let (dev, _loop_fd) = sys::loop_attach(backing.as_fd())?;
        drop(backing);
        mount(
            Some(&dev),
            at,
            Some("ext4"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
            Some("discard,noinit_itable,errors=remount-ro"),
        )
        .map_err(|e| io::Error::other(format!("mounting {}: {e}", dev.display())))?;
        if fresh {
            std::fs::remove_dir(at.join("lost+found"))?;
        }
        Ok(())
    })();
    if mounted.is_err() {
        unmount(at);
        let _ = std::fs::remove_dir(at);
    }
    mounted
}

/// Whether some loop device is still backed by `image` (its filesystem not yet
/// torn down).
fn backs_a_loop_device(image: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return false;
    };
    let want = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
        .any(|b| Path::new(b.trim_end()) == want)
}

/// Detaches whatever is mounted at `at` (every stacked mount). A mount still
/// referenced by a session's namespace goes with that namespace, and its loop
/// device detaches itself then. Nothing mounted is not an error.
pub fn unmount(at: &Path) {
    while umount2(at, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW).is_ok() {}
}

pub fn random_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Takes the exclusive lock of the image at `path`, without waiting.
pub fn try_lock(path: &Path) -> Option<Flock<File>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).ok()
}

impl Disks {
    /// Images go to `images`, kept ones to `kept`, mount points to `mounts`
    /// (all created on use).
    pub fn detect(images: PathBuf, kept: PathBuf, mounts: PathBuf) -> Disks {
        Disks::with(images, kept, mounts, detect())
    }

    /// No filesystems, for `why`.
    pub fn unavailable(images: PathBuf, kept: PathBuf, mounts: PathBuf, why: String) -> Disks {
        Disks::with(images, kept, mounts, Mechanism::Unavailable(why))
    }

    fn with(images: PathBuf, kept: PathBuf, mounts: PathBuf, mechanism: Mechanism) -> Disks {
        Disks {
            inner: Arc::new(Inner {
                images,
                kept,
                mounts,
                mechanism,
                pool: Mutex::default(),
                wake: Condvar::new(),
                reaper: Mutex::default(),
                pending: Mutex::new(0),
                drained: Condvar::new(),
            }),
        }
    }

    pub fn mechanism(&self) -> &Mechanism {
        &self.inner.mechanism
    }

    fn image_path(&self, id: &str) -> PathBuf {
        self.inner.images.join(format!("{id}.img"))
    }

    /// Ids of the images on disk, in use or not.
    pub fn image_ids(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.inner.images) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".img").map(str::to_string))
            .collect()
    }

    /// Formats a new image at `path` (created exclusively) and locks it.
    fn format(&self, path: &Path, g: Geometry) -> io::Result<Flock<File>> {
        let Mechanism::LoopExt4 { mke2fs } = &self.inner.mechanism else {
            return Err(io::Error::other("no loop devices or mke2fs on this host"));
        };
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        let locked = Flock::lock(f, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| io::Error::from_raw_os_error(e as i32))?;
        locked.set_len(g.bytes)?;
        // -m 0: no blocks reserved for root (root is who the workspace's owner
        // maps from); lazy init, and `noinit_itable` at mount, keep the image
        // sparse; the root directory is the host's root, seen as the session's
        // uid through the idmap.
        let out = Command::new(mke2fs)
            .args([
                "-q", "-F", "-t", "ext4", "-m", "0", "-b", "4096", "-L", "hands",
            ])
            .arg("-N")
            .arg(g.inodes.to_string())
            .args([
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0",
            ])
            .arg(path)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        let failed = match out {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(format!(
                "mke2fs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Some(format!("running mke2fs: {e}")),
        };
        if let Some(why) = failed {
            let _ = std::fs::remove_file(path);
            return Err(io::Error::other(why));
        }
        Ok(locked)
    }

    /// A new filesystem of `g`, formatted and mounted now.
    fn make(&self, g: Geometry) -> io::Result<Mounted> {
        for dir in [&self.inner.images, &self.inner.mounts] {
            std::fs::create_dir_all(dir)?;
        }
        let id = random_id();
        let image = self.image_path(&id);
        let lock = self.format(&image, g)?;
        let at = self.inner.mounts.join(&id);
        if let Err(e) = attach_and_mount(&image, &at, true) {
            let _ = std::fs::remove_file(&image);
            return Err(e);
        }
        Ok(Mounted {
            id,
            at,
            image,
            _lock: lock,
        })
    }

    /// The kept filesystem `name` (see [`Disks::open_kept`]), mounted: the same
    /// files as when it was last released, or a new, empty one the first time.
    /// `None` when another process holds it.
    pub fn open_kept(&self, name: &str, g: Geometry) -> io::Result<Option<Mounted>> {
        for dir in [&self.inner.kept, &self.inner.mounts] {
            std::fs::create_dir_all(dir)?;
        }
        let image = self.inner.kept.join(format!("{name}.img"));
        let at = self.inner.mounts.join(name);
        let (lock, fresh) = match try_lock(&image) {
            Some(l) => (l, false),
            None if image.exists() => return Ok(None),
            None => (self.format(&image, g)?, true),
        };
        // Whatever a dead worker left mounted here goes first, and the image
        // must not still back a loop device: one filesystem mounted twice is
        // corrupted. A release that detached lazily ends within moments.
        unmount(&at);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while backs_a_loop_device(&image) {
            if std::time::Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "{} is still attached to a loop device; not mounting it twice",
                    image.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Err(e) = attach_and_mount(&image, &at, fresh) {
            if fresh {
                let _ = std::fs::remove_file(&image);
            }
            return Err(e);
        }
        Ok(Some(Mounted {
            id: name.to_string(),
            at,
            image,
            _lock: lock,
        }))
    }

    /// Unmounts a kept filesystem and keeps its image, stamped with the time of
    /// its last use (what retention counts from).
    pub fn release_kept(&self, m: Mounted) {
        // A plain unmount first: the session's namespace is gone by now, so
        // this is the last reference, and when it returns the filesystem is
        // clean on disk. A lazy detach only if something still holds it.
        if umount2(&m.at, MntFlags::UMOUNT_NOFOLLOW).is_err() {
            unmount(&m.at);
        }
        let _ = std::fs::remove_dir(&m.at);
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&m.image) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        drop(m);
    }

    /// Unmounts the kept filesystem `name` when no process holds it (a dead
    /// worker left it mounted); its image stays. Whether it was unmounted.
    pub fn unmount_stale_kept(&self, name: &str) -> bool {
        let image = self.inner.kept.join(format!("{name}.img"));
        let Some(lock) = try_lock(&image) else {
            return false;
        };
        let at = self.inner.mounts.join(name);
        unmount(&at);
        let _ = std::fs::remove_dir(&at);
        drop(lock);
        true
    }

    /// Deletes the kept filesystem `name` unless a process holds it; `false`
    /// when one does.
    pub fn delete_kept(&self, name: &str) -> bool {
        let image = self.inner.kept.join(format!("{name}.img"));
        let Some(lock) = try_lock(&image) else {
            return !image.exists();
        };
        let at = self.inner.mounts.join(name);
        unmount(&at);
        let _ = std::fs::remove_dir(&at);
        if let Err(e) = std::fs::remove_file(&image) {
            tracing::error!(image = %image.display(), "deleting a kept workspace: {e}");
        }
        drop(lock);
        true
    }

    /// Names of the kept filesystems, with the time each was last used.
    pub fn kept(&self) -> Vec<(String, std::time::SystemTime)> {
        let Ok(rd) = std::fs::read_dir(&self.inner.kept) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let name = name.strip_suffix(".img")?.to_string();
                let used = e.metadata().ok()?.modified().ok()?;
                Some((name, used))
            })
            .collect()
    }

    /// A mounted, empty filesystem of `g`: from the pool, or made now.
    pub fn take(&self, g: Geometry) -> io::Result<Mounted> {
        let ready = lock(&self.inner.pool).ready.get_mut(&g).and_then(Vec::pop);
        match ready {
            Some(m) => {
                self.inner.wake.notify_all();
                Ok(m)
            }
            None => self.make(g),
        }
    }

    /// Filesystems of `g` ready to be taken.
    pub fn ready(&self, g: Geometry) -> usize {
        lock(&self.inner.pool).ready.get(&g).map_or(0, Vec::len)
    }

    /// Detaches the filesystem and deletes its image, in the background: the
    /// last reference to a filesystem takes the kernel milliseconds to tear
    /// down (journal, loop device), and deleting a large sparse file takes the
    /// host's filesystem tens of them. The mount point is root-only meanwhile.
    pub fn release(&self, m: Mounted) {
        let sender = {
            let mut reaper = lock(&self.inner.reaper);
            if reaper.is_none() {
                let (tx, rx) = mpsc::channel::<Mounted>();
                let me = self.clone();
                let spawned = std::thread::Builder::new()
                    .name("disk-reaper".into())
                    .spawn(move || {
                        for m in rx {
                            me.delete(m);
                        }
                    });
                if spawned.is_ok() {
                    *reaper = Some(tx);
                }
            }
            reaper.clone()
        };
        *lock(&self.inner.pending) += 1;
        match sender {
            Some(tx) => {
                if let Err(mpsc::SendError(m)) = tx.send(m) {
                    self.delete(m);
                }
            }
            None => self.delete(m),
        }
    }

    /// Detaches a filesystem and deletes its image and mount point.
    fn delete(&self, m: Mounted) {
        unmount(&m.at);
        if let Err(e) = std::fs::remove_file(&m.image) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::error!(image = %m.image.display(), "deleting a workspace image: {e}");
            }
        }
        if let Err(e) = std::fs::remove_dir(&m.at) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::error!(at = %m.at.display(), "removing a workspace mount point: {e}");
            }
        }
        drop(m);
        let mut pending = lock(&self.inner.pending);
        *pending = pending.saturating_sub(1);
        self.inner.drained.notify_all();
    }

    /// Waits (at most `limit`) until every released image is deleted: before a
    /// short-lived process (`hands exec`) exits.
    pub fn drain(&self, limit: Duration) {
        let start = std::time::Instant::now();
        let mut pending = lock(&self.inner.pending);
        while *pending > 0 && start.elapsed() < limit {
            pending = match self
                .inner
                .drained
                .wait_timeout(pending, Duration::from_millis(50))
            {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Removes an image (and its mount) that no process holds: left by a worker
    /// that died. Returns whether it was removed.
    pub fn sweep_one(&self, id: &str) -> bool {
        let image = self.image_path(id);
        let Some(lock) = try_lock(&image) else {
            return false;
        };
        let at = self.inner.mounts.join(id);
        unmount(&at);
        self.delete(Mounted {
            id: id.to_string(),
            at,
            image,
            _lock: lock,
        });
        true
    }

    /// Stops keeping filesystems ready and releases the ready ones (a worker
    /// that stops leaves nothing mounted behind).
    pub fn empty_pool(&self) {
        let ready: Vec<Mounted> = {
            let mut pool = lock(&self.inner.pool);
            pool.wanted.clear();
            pool.ready.drain().flat_map(|(_, v)| v).collect()
        };
        for m in ready {
            self.release(m);
        }
    }

    /// Asks for `count` ready filesystems of `g` and starts the filler.
    pub fn keep_ready(&self, g: Geometry, count: usize) {
        if !matches!(self.inner.mechanism, Mechanism::LoopExt4 { .. }) {
            return;
        }
        let mut pool = lock(&self.inner.pool);
        let want = pool.wanted.entry(g).or_insert(0);
        *want = (*want).max(count);
        if pool.filling {
            self.inner.wake.notify_all();
            return;
        }
        pool.filling = true;
        drop(pool);
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("disk-pool".into())
            .spawn(move || me.fill_forever());
        if spawned.is_err() {
            lock(&self.inner.pool).filling = false;
        }
    }

    /// Makes filesystems until every wanted geometry has its count, then waits
    /// to be woken by a taker.
    fn fill_forever(&self) {
        loop {
            let short: Option<Geometry> = {
                let pool = lock(&self.inner.pool);
                pool.wanted
                    .iter()
                    .find(|(g, n)| pool.ready.get(g).map_or(0, Vec::len) < **n)
                    .map(|(g, _)| *g)
            };
            let Some(g) = short else {
                let pool = lock(&self.inner.pool);
                let _ = self.inner.wake.wait_timeout(pool, Duration::from_secs(30));
                continue;
            };
            match self.make(g) {
                Ok(m) => {
                    let mut pool = lock(&self.inner.pool);
                    if pool.wanted.contains_key(&g) {
                        pool.ready.entry(g).or_default().push(m);
                    } else {
                        drop(pool);
                        self.release(m);
                    }
                }
                Err(e) => {
                    tracing::warn!("preparing a workspace filesystem ahead of time: {e}");
                    let pool = lock(&self.inner.pool);
                    let _ = self.inner.wake.wait_timeout(pool, Duration::from_secs(30));
                }
            }
        }
    }
}
