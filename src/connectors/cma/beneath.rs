//! File access, from the host, under a directory the agent can change: the
//! item's workspace. Bash in the sandbox can replace any directory there with a
//! symlink to `/etc` at any moment, and the worker runs as root, so nothing here
//! opens a path by name. Every open is `openat2` from the workspace's directory
//! fd with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
//! RESOLVE_NO_XDEV`: the kernel refuses a path that leaves the workspace or
//! crosses a symlink, whatever was swapped in between two calls. Writes go to a
//! fresh temporary file in the target's own directory and are renamed into
//! place, so a hard link planted at the target is replaced, never written
//! through. Listings return each file's stat, never its content: what to read,
//! and how much, is the caller's decision.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode, SFlag};

/// The workspace, held open.
pub struct Beneath {
    root: OwnedFd,
}

fn resolve() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
        | ResolveFlag::RESOLVE_NO_XDEV
}

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// `rel` has normal components only (no `/` prefix, `.` or `..`).
pub fn is_clean(rel: &Path) -> bool {
    !rel.as_os_str().is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)))
}

fn clean(rel: &Path) -> io::Result<()> {
    if is_clean(rel) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{rel:?} is not a clean relative path"),
        ))
    }
}

/// What a directory entry is, without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Other,
}

impl Beneath {
    pub fn open(workspace: &Path) -> io::Result<Beneath> {
        let root = nix::fcntl::open(
            workspace,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(nix_io)?;
        Ok(Beneath { root })
    }

    fn open_at(&self, rel: &Path, flags: OFlag, mode: Mode) -> io::Result<OwnedFd> {
        clean(rel)?;
        openat2(
            self.root.as_fd(),
            rel,
            OpenHow::new()
                .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
                .mode(mode)
                .resolve(resolve()),
        )
        .map_err(nix_io)
    }

    fn dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        if rel.as_os_str().is_empty() {
            return self.root.try_clone();
        }
        self.open_at(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty())
    }

    /// What `rel` is (not following a final symlink); `None` if absent.
    pub fn kind(&self, rel: &Path) -> io::Result<Option<Kind>> {
        clean(rel)?;
        let (parent, name) = split(rel)?;
        let dir = match self.dir(parent) {
            Ok(d) => d,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        match fstatat(dir.as_fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(kind_of(st.st_mode))),
            Err(nix::Error::ENOENT) => Ok(None),
            Err(e) => Err(nix_io(e)),
        }
    }

    /// Creates `rel` and its missing parents (mode 0700).
    pub fn mkdir_all(&self, rel: &Path) -> io::Result<()> {
        clean(rel)?;
        let mut at = PathBuf::new();
        for c in rel.components() {
            let parent = self.dir(&at)?;
            at.push(c);
            match mkdirat(
                parent.as_fd(),
                c.as_os_str(),
                Mode::from_bits_truncate(0o700),
            ) {
                Ok(()) | Err(nix::Error::EEXIST) => {}
                Err(e) => return Err(nix_io(e)),
            }
        }
        // A symlink or file in the way shows up here.
        self.dir(rel).map(drop)
    }

    /// Reads a regular file of at most `max` bytes.
    pub fn read(&self, rel: &Path, max: u64) -> io::Result<Vec<u8>> {
        let fd = self.open_at(rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK, Mode::empty())?;
        let f = std::fs::File::from(fd);
        let meta = f.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        if meta.len() > max {
            return Err(io::Error::other(format!("larger than {max} bytes")));
        }
        let mut out = Vec::with_capacity(meta.len() as usize);
        f.take(max + 1).read_to_end(&mut out)?;
        if out.len() as u64 > max {
            return Err(io::Error::other(format!("larger than {max} bytes")));
        }
        Ok(out)
    }

    /// Replaces `rel` with `data` atomically (a `.fs-<16 hex>.tmp` sibling,
    /// mode 0600, renamed over it). Parents are created (0700).
    pub fn write_atomic(&self, rel: &Path, data: &[u8]) -> io::Result<()> {
        let (parent, name) = split(rel)?;
        if !parent.as_os_str().is_empty() {
            self.mkdir_all(parent)?;
        }
        let dir = self.dir(parent)?;
        let tmp = format!(".fs-{:016x}.tmp", random_u64());
        let fd = openat2(
            dir.as_fd(),
            tmp.as_str(),
            OpenHow::new()
                .flags(
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_CLOEXEC
                        | OFlag::O_NOFOLLOW,
                )
                .mode(Mode::from_bits_truncate(0o600))
                .resolve(resolve()),
        )
        .map_err(nix_io)?;
        let mut f = std::fs::File::from(fd);
        let written = f.write_all(data).and_then(|()| f.sync_data());
        drop(f);
        let renamed = written.and_then(|()| {
            nix::fcntl::renameat(dir.as_fd(), tmp.as_str(), dir.as_fd(), name).map_err(nix_io)
        });
        if renamed.is_err() {
            let _ = nix::unistd::unlinkat(
                dir.as_fd(),
                tmp.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
        renamed
    }

    /// Removes the file `rel` (absent is fine).
    pub fn remove_file(&self, rel: &Path) -> io::Result<()> {
        let (parent, name) = split(rel)?;
        let dir = match self.dir(parent) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        match nix::unistd::unlinkat(dir.as_fd(), name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(nix::Error::ENOENT) => Ok(()),
            Err(e) => Err(nix_io(e)),
        }
    }

    /// Removes the directory `rel` and everything under it (absent is fine),
    /// without recursion and without following a symlink anywhere: a symlink
    /// inside is unlinked, not followed.
    pub fn remove_tree(&self, rel: &Path) -> io::Result<()> {
        let (parent, name) = split(rel)?;
        let dir = match self.dir(parent) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        match crate::workspace::remove::remove_tree(dir.as_fd(), name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            // A file (or symlink) where the directory was: removed as such.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOTDIR)
                    || e.raw_os_error() == Some(libc::ELOOP) =>
            {
                self.remove_file(rel)
            }
            other => other,
        }
    }

    /// Opens the regular file `rel` for reading (a symlink anywhere on the way,
    /// or at the end, is refused; a FIFO never blocks) with its stat, taken
    /// through the descriptor.
    pub fn open_file(&self, rel: &Path) -> io::Result<(std::fs::File, nix::sys::stat::FileStat)> {
        let fd = self.open_at(
            rel,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
            Mode::empty(),
        )?;
        let st = nix::sys::stat::fstat(&fd).map_err(nix_io)?;
        if kind_of(st.st_mode) != Kind::File {
            return Err(io::Error::other("not a regular file"));
        }
        Ok((std::fs::File::from(fd), st))
    }

    /// Every regular file under the directory `rel`, as paths relative to it
    /// (`/`-separated, sorted), with its stat (not its content): at most
    /// `max_files`, else an error. Symlinks and special files are ignored;
    /// subdirectories are entered; names that are not UTF-8 are skipped (a
    /// memory path is UTF-8).
    pub fn entries(&self, rel: &Path, max_files: usize) -> io::Result<Vec<(String, FileMeta)>> {
        let mut out = Vec::new();
        let mut stack = vec![String::new()];
        while let Some(sub) = stack.pop() {
            let dir_rel = if sub.is_empty() {
                rel.to_path_buf()
            } else {
                rel.join(&sub)
            };
            let fd = self.dir(&dir_rel)?;
            let mut d = nix::dir::Dir::from_fd(fd).map_err(nix_io)?;
            let mut names = Vec::new();
            for e in d.iter() {
                let e = e.map_err(nix_io)?;
                let n = e.file_name().to_bytes();
                if n == b"." || n == b".." {
                    continue;
                }
                let Ok(n) = std::str::from_utf8(n) else {
                    continue;
                };
                names.push(n.to_string());
            }
            for n in names {
                // Through the directory's own descriptor: the entry as it is now,
                // not following it.
                let st = match fstatat(
                    d.as_fd(),
                    n.as_str(),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                ) {
                    Ok(st) => st,
                    Err(nix::Error::ENOENT) => continue,
                    Err(e) => return Err(nix_io(e)),
                };
                let child = if sub.is_empty() {
                    n
                } else {
                    format!("{sub}/{n}")
                };
                match kind_of(st.st_mode) {
                    Kind::Dir => stack.push(child),
                    Kind::File => {
                        if out.len() >= max_files {
                            return Err(io::Error::other(format!("more than {max_files} files")));
                        }
                        out.push((child, FileMeta::of(&st)));
                    }
                    Kind::Other => {}
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// What the sync needs to know of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    pub dev: u64,
    pub ino: u64,
    /// The logical size: what reading the file yields, holes included.
    pub size: u64,
    /// Bytes allocated on disk (`st_blocks * 512`); far below `size` for a sparse file.
    pub on_disk: u64,
    pub nlink: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileMeta {
    pub fn of(st: &nix::sys::stat::FileStat) -> FileMeta {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        FileMeta {
            dev: st.st_dev,
            ino: st.st_ino,
            size: u64::try_from(st.st_size).unwrap_or(0),
            on_disk: u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512),
            nlink: st.st_nlink,
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec),
        }
    }
}

fn split(rel: &Path) -> io::Result<(&Path, &std::ffi::OsStr)> {
    clean(rel)?;
    let name = rel
        .file_name()
        .ok_or_else(|| io::Error::other("no file name"))?;
    Ok((rel.parent().unwrap_or(Path::new("")), name))
}

fn kind_of(mode: u32) -> Kind {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => Kind::File,
        SFlag::S_IFDIR => Kind::Dir,
        _ => Kind::Other,
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the kernel's random source");
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_anywhere_on_the_path_is_refused() {
        let ws = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(outside.path(), ws.path().join("mem")).unwrap();
        let b = Beneath::open(ws.path()).unwrap();
        assert!(b.read(Path::new("mem/secret"), 100).is_err());
        assert!(b.write_atomic(Path::new("mem/new"), b"x").is_err());
        assert!(!outside.path().join("new").exists());
        assert!(b.remove_file(Path::new("mem/secret")).is_err());
        assert!(outside.path().join("secret").exists());
        assert!(b.entries(Path::new("mem"), 10).is_err());
        assert!(b.open_file(Path::new("mem/secret")).is_err());
        // A final-component symlink is not followed either.
        std::fs::create_dir(ws.path().join("d")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), ws.path().join("d/f")).unwrap();
        assert!(b.read(Path::new("d/f"), 100).is_err());
        assert_eq!(b.entries(Path::new("d"), 10).unwrap().len(), 0);
        assert!(b.open_file(Path::new("d/f")).is_err());
        assert!(b.read(Path::new("../x"), 100).is_err());
    }

    #[test]
    fn writes_replace_hard_links_rather_than_write_through_them() {
        let ws = tempfile::tempdir().unwrap();
        std::fs::create_dir(ws.path().join("m")).unwrap();
        std::fs::write(ws.path().join("victim"), "keep").unwrap();
        std::fs::hard_link(ws.path().join("victim"), ws.path().join("m/a")).unwrap();
        let b = Beneath::open(ws.path()).unwrap();
        b.write_atomic(Path::new("m/a"), b"new").unwrap();
        assert_eq!(
            std::fs::read_to_string(ws.path().join("victim")).unwrap(),
            "keep"
        );
        assert_eq!(b.read(Path::new("m/a"), 10).unwrap(), b"new");
        b.write_atomic(Path::new("m/x/y/z.md"), b"deep").unwrap();
        let files = b.entries(Path::new("m"), 10).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(names, ["a", "x/y/z.md"]);
        assert_eq!(files[0].1.size, 3);
        assert!(b.entries(Path::new("m"), 1).is_err(), "file cap");
        assert!(b.read(Path::new("m/a"), 2).is_err(), "size cap");
    }
}
