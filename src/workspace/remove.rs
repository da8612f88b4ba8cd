//! Removing a directory tree that a session shaped, from the host, as root: no
//! recursion (16,000 nested directories overflow a thread's stack), no path
//! looked up twice (every step is relative to a directory fd opened with
//! `O_NOFOLLOW`, so a symlink swapped in is unlinked, never followed), and a
//! bounded number of open fds: below [`MAX_DEPTH`] levels, a subtree is renamed up
//! to the top of the tree and removed from there.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::dir::{Dir, OwningIter, Type};
use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// Directory fds held at once while descending.
pub const MAX_DEPTH: usize = 32;

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A directory being emptied: its stream (whose position survives between
/// entries), a second fd of it for the `*at` calls, and its name in its parent.
struct Level {
    entries: OwningIter,
    fd: OwnedFd,
    name: OsString,
}

fn open_level(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<Level> {
    let fd = openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| with_name(nix_io(e), name))?;
    let second = fd.try_clone()?;
    let entries = Dir::from_fd(fd).map_err(nix_io)?.into_iter();
    Ok(Level {
        entries,
        fd: second,
        name: name.to_os_string(),
    })
}

fn is_dir(parent: BorrowedFd<'_>, name: &OsStr, hint: Option<Type>) -> io::Result<bool> {
    match hint {
        Some(Type::Directory) => Ok(true),
        Some(_) => Ok(false),
        None => {
            let st = fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nix_io)?;
            Ok(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR)
        }
    }
}

/// The next entry other than `.` and `..`, with its type if the filesystem says.
fn next_entry(it: &mut OwningIter) -> io::Result<Option<(OsString, Option<Type>)>> {
    for entry in it.by_ref() {
        let entry = entry.map_err(nix_io)?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        return Ok(Some((
            OsStr::from_bytes(name).to_os_string(),
            entry.file_type(),
        )));
    }
    Ok(None)
}

fn with_name(e: io::Error, name: &OsStr) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", name.to_string_lossy()))
}

/// Removes everything inside the directory open at `root` (the directory itself
/// stays). Stops at the first error, which names the entry.
pub fn empty_dir(root: BorrowedFd<'_>) -> io::Result<()> {
    let mut moved = 0u64;
    // A subtree renamed up to the top may land behind the top stream's
    // position: pass again until a pass finds nothing.
    loop {
        let mut stack = vec![open_level(root, OsStr::new("."))?];
        let mut found = false;
        loop {
            let depth = stack.len();
            let Some(level) = stack.last_mut() else {
                break;
            };
            match next_entry(&mut level.entries)? {
                Some((name, hint)) => {
                    found = true;
                    let here = level.fd.as_fd();
                    if !is_dir(here, &name, hint).map_err(|e| with_name(e, &name))? {
                        unlinkat(here, name.as_os_str(), UnlinkatFlags::NoRemoveDir)
                            .map_err(|e| with_name(nix_io(e), &name))?;
                    } else if depth > MAX_DEPTH {
                        moved += 1;
                        let to = OsString::from(format!(".hands-rm-{moved}"));
                        renameat(here, name.as_os_str(), root, to.as_os_str())
                            .map_err(|e| with_name(nix_io(e), &name))?;
                    } else {
                        let child = open_level(here, &name)?;
                        stack.push(child);
                    }
                }
                None => {
                    let done = stack.pop().expect("the loop holds a level");
                    drop(done.entries);
                    if let Some(parent) = stack.last() {
                        unlinkat(
                            parent.fd.as_fd(),
                            done.name.as_os_str(),
                            UnlinkatFlags::RemoveDir,
                        )
                        .map_err(|e| with_name(nix_io(e), &done.name))?;
                    }
                }
            }
        }
        if !found {
            return Ok(());
        }
    }
}

/// Removes the directory `name` in `parent` and everything under it.
pub fn remove_tree(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let dir: OwnedFd = openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(nix_io)?;
    empty_dir(dir.as_fd())?;
    drop(dir);
    unlinkat(parent, name, UnlinkatFlags::RemoveDir).map_err(nix_io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(p: &std::path::Path) -> OwnedFd {
        std::fs::File::open(p).unwrap().into()
    }

    #[test]
    fn removes_a_tree_deeper_than_the_fd_budget_without_recursion() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("t");
        std::fs::create_dir(&base).unwrap();
        // Relative mkdir keeps the path short however deep the tree gets.
        let root = open(&base);
        let mut fd = root.try_clone().unwrap();
        for i in 0..3000 {
            nix::sys::stat::mkdirat(fd.as_fd(), "d", Mode::from_bits_truncate(0o755)).unwrap();
            if i % 100 == 0 {
                nix::fcntl::openat(
                    fd.as_fd(),
                    "f",
                    OFlag::O_CREAT | OFlag::O_WRONLY,
                    Mode::from_bits_truncate(0o644),
                )
                .unwrap();
            }
            fd = openat(
                fd.as_fd(),
                "d",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
            .unwrap();
        }
        std::os::unix::fs::symlink("/etc", tmp.path().join("t/link")).unwrap();
        drop(fd);
        // A small stack: recursion over 3000 levels would not fit.
        let parent = open(tmp.path());
        std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || remove_tree(parent.as_fd(), OsStr::new("t")).unwrap())
            .unwrap()
            .join()
            .unwrap();
        assert!(!base.exists());
        assert!(std::path::Path::new("/etc/passwd").exists());
    }

    #[test]
    fn empty_dir_keeps_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a/b/c")).unwrap();
        std::fs::write(tmp.path().join("a/b/c/f"), "x").unwrap();
        std::fs::write(tmp.path().join("g"), "x").unwrap();
        empty_dir(open(tmp.path()).as_fd()).unwrap();
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
