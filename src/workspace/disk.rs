//! A filesystem per workspace: a sparse ext4 image formatted with `mke2fs`,
//! attached to a loop device and mounted `nosuid,nodev` on the host. The kernel
//! then enforces what a session may leave on the host: no more bytes and inodes
//! than the image has (`No space left on device` inside, the host's own
//! filesystems untouched), no set-user-ID program and no device node that the
//! host would honour, and a removal that is an unmount, however the session
//! shaped its tree.
//!
//! Images are formatted ahead of time, a few per geometry, in `pool/`, so that a
//! session open only attaches and mounts (≈ 1–2 ms). Freed blocks are discarded
//! (`discard`), which punches holes in the sparse image: the host's disk gives
//! back what the session deletes.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};

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

impl Geometry {
    fn tag(&self) -> String {
        format!("{}-{}", self.bytes, self.inodes)
    }
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

#[derive(Debug, Default)]
struct Pool {
    /// Geometries to keep ready, and how many of each.
    wanted: HashMap<Geometry, usize>,
    /// A filler thread is running.
    filling: bool,
}

#[derive(Debug)]
pub struct Disks {
    dir: PathBuf,
    mechanism: Mechanism,
    pool: Arc<(Mutex<Pool>, Condvar)>,
}

fn find_mke2fs() -> Option<PathBuf> {
    ["/usr/sbin/mke2fs", "/sbin/mke2fs", "/usr/bin/mke2fs"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn detect() -> Mechanism {
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.lines().any(|l| l.trim_end().ends_with("\text4")) {
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

/// Unmounts whatever is mounted at `at` (lazily: a mount still referenced by a
/// dying session's namespace goes once that namespace is gone, and the loop
/// device detaches itself then). Nothing mounted is not an error.
pub fn unmount(at: &Path) {
    loop {
        match umount2(at, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => continue, // stacked mounts: take them all
            Err(_) => return,
        }
    }
}

impl Disks {
    pub fn detect(dir: PathBuf) -> Disks {
        Disks {
            dir,
            mechanism: detect(),
            pool: Arc::default(),
        }
    }

    pub fn mechanism(&self) -> &Mechanism {
        &self.mechanism
    }

    pub fn image_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.img"))
    }

    fn pool_dir(&self) -> PathBuf {
        self.dir.join("pool")
    }

    /// Names of the images in use (not the pool's).
    pub fn image_names(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".img").map(str::to_string))
            .collect()
    }

    /// Formats a new image at `path` (created exclusively).
    fn format(&self, path: &Path, g: Geometry) -> io::Result<()> {
        let Mechanism::LoopExt4 { mke2fs } = &self.mechanism else {
            return Err(io::Error::other("no mechanism"));
        };
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.set_len(g.bytes)?;
        drop(f);
        // -m 0: no blocks reserved for root (root is who the workspace's owner
        // maps from); lazy init and `noinit_itable` at mount keep the image
        // sparse; `root_owner` makes the root directory the host's root, seen as
        // the session's uid through the idmap.
        let out = Command::new(mke2fs)
            .args(["-q", "-F", "-t", "ext4", "-m", "0", "-b", "4096", "-L", "hands"])
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
            .output()?;
        if !out.status.success() {
            let _ = std::fs::remove_file(path);
            return Err(io::Error::other(format!(
                "mke2fs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// A formatted image of `g` at `to`: taken from the pool (a rename, so two
    /// workers never take the same one), or formatted now.
    fn take(&self, g: Geometry, to: &Path) -> io::Result<()> {
        let prefix = format!("{}.", g.tag());
        if let Ok(rd) = std::fs::read_dir(self.pool_dir()) {
            for e in rd.flatten() {
                let name = e.file_name();
                let Some(n) = name.to_str() else { continue };
                if n.starts_with(&prefix) && n.ends_with(".img") {
                    match std::fs::rename(e.path(), to) {
                        Ok(()) => {
                            self.refill();
                            return Ok(());
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        self.format(to, g)
    }

    /// Makes a new filesystem for workspace `name` and mounts it at `at`;
    /// returns the image's path.
    pub fn mount_new(&self, name: &str, g: Geometry, at: &Path) -> io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let image = self.image_path(name);
        self.take(g, &image)?;
        let result = (|| {
            match std::fs::create_dir(at) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            let backing = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&image)?;
            let (dev, _loop_fd) = sys::loop_attach(backing.as_fd())?;
            drop(backing);
            // The loop fd stays open until the mount holds the device, so
            // autoclear cannot detach it in between.
            mount(
                Some(&dev),
                at,
                Some("ext4"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
                Some("discard,noinit_itable,errors=remount-ro"),
            )
            .map_err(|e| io::Error::other(format!("mounting {}: {e}", dev.display())))?;
            // mke2fs always makes lost+found; a fresh workspace is empty.
            match std::fs::remove_dir(at.join("lost+found")) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(image),
            Err(e) => {
                unmount(at);
                let _ = std::fs::remove_file(&image);
                Err(e)
            }
        }
    }

    /// Asks for `count` ready images of `g` and starts the filler if needed.
    pub fn keep_ready(&self, g: Geometry, count: usize) {
        if !matches!(self.mechanism, Mechanism::LoopExt4 { .. }) {
            return;
        }
        {
            let mut pool = lock(&self.pool.0);
            let want = pool.wanted.entry(g).or_insert(0);
            *want = (*want).max(count);
        }
        self.refill();
    }

    /// Wakes the filler thread (starting it once).
    fn refill(&self) {
        let (lock_, cv) = &*self.pool;
        let mut pool = lock(lock_);
        if pool.wanted.is_empty() {
            return;
        }
        if pool.filling {
            cv.notify_all();
            return;
        }
        pool.filling = true;
        drop(pool);
        let me = Disks {
            dir: self.dir.clone(),
            mechanism: self.mechanism.clone(),
            pool: self.pool.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("disk-pool".into())
            .spawn(move || me.fill_forever());
        if spawned.is_err() {
            lock(lock_).filling = false;
        }
    }

    fn ready(&self, g: Geometry) -> usize {
        let prefix = format!("{}.", g.tag());
        std::fs::read_dir(self.pool_dir())
            .map(|rd| {
                rd.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".img"))
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// Formats into `pool/` until every wanted geometry has its count, then
    /// waits to be woken. Images are formatted under a temporary name and
    /// renamed into place, so a taker never finds half an image.
    fn fill_forever(&self) {
        let (lock_, cv) = &*self.pool;
        loop {
            let wanted: Vec<(Geometry, usize)> =
                lock(lock_).wanted.iter().map(|(g, n)| (*g, *n)).collect();
            let mut made = false;
            for (g, n) in wanted {
                if self.ready(g) >= n {
                    continue;
                }
                if std::fs::create_dir_all(self.pool_dir()).is_err() {
                    continue;
                }
                let id = random_id();
                let tmp = self.pool_dir().join(format!(".{}.{id}.tmp", g.tag()));
                let done = self.pool_dir().join(format!("{}.{id}.img", g.tag()));
                match self
                    .format(&tmp, g)
                    .and_then(|()| std::fs::rename(&tmp, &done))
                {
                    Ok(()) => made = true,
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        tracing::warn!("formatting a workspace image ahead of time: {e}");
                    }
                }
            }
            if !made {
                let guard = lock(lock_);
                let _ = cv.wait_timeout(guard, std::time::Duration::from_secs(30));
            }
        }
    }
}

fn random_id() -> String {
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
