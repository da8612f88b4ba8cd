//! Path resolution of the file tools: the SDK's canonicalisation and containment check
//! with its exact error texts, and the symlink-proof opens hands adds after it.
//!
//! Resolution reproduces the SDK (contract §6.1, §13.6–13.8): the path is joined to
//! the workspace, `.`/`..` collapse lexically, then every symlink is followed by hand
//! (dangling ones too, a missing tail kept as spelled, 40 hops at most), and the result
//! must lie under the workspace, compared component by component.
//!
//! What hands adds: the SDK then reopens the canonical path by name, so a concurrent
//! process that swaps a directory for a symlink between the check and the use escapes
//! the check. Here every later open starts from a descriptor of the workspace and goes
//! through `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`: the canonical path has
//! no symlinks, so meeting one means the tree changed, and the open fails with `ELOOP`
//! instead of following it. Callers then resolve once more ([`retry_on_race`]).

mod printable;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{self, FileStat, Mode, SFlag};

/// Symlinks followed by hand through dangling links before the SDK calls it a loop.
const MAX_SYMLINK_HOPS: u32 = 40;

/// Depth of nested symlink targets `realpath` follows before giving up with `ELOOP`.
/// CPython would hit its recursion limit around 1000 instead; a bound keeps a crafted
/// chain of links from exhausting a tool thread's stack.
const MAX_LINK_NESTING: u32 = 256;

// ---------------------------------------------------------------------------------
// Texts
// ---------------------------------------------------------------------------------

/// A string quoted the way Python's `repr(str)` does, as the SDK's path errors show it
/// (contract §13.8): single quotes unless the text holds a `'` and no `"`; `\\`, the
/// quote, `\n`, `\r`, `\t` escaped; other non-printable code points as `\xNN`, `\uNNNN`
/// or `\UNNNNNNNN` with Python 3.11's notion of printable.
pub fn py_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !is_printable(c) => {
                let v = u32::from(c);
                if v < 0x100 {
                    out.push_str(&format!("\\x{v:02x}"));
                } else if v < 0x10000 {
                    out.push_str(&format!("\\u{v:04x}"));
                } else {
                    out.push_str(&format!("\\U{v:08x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Python 3.11's `str.isprintable` for one code point.
fn is_printable(c: char) -> bool {
    let v = u32::from(c);
    printable::NON_PRINTABLE
        .binary_search_by(|&(lo, hi)| {
            if hi < v {
                std::cmp::Ordering::Less
            } else if lo > v {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_err()
}

/// The C library's message for `errno` (what Python's `OSError.strerror` holds).
pub fn strerror(errno: Errno) -> String {
    let text = std::io::Error::from_raw_os_error(errno as i32).to_string();
    match text.rfind(" (os error ") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// The SDK's `_fs_reason`: a fixed phrase for the common failures (Python maps both
/// `EACCES` and `EPERM` to `PermissionError`), else the lower-cased OS message.
pub fn fs_reason(errno: Errno) -> String {
    match errno {
        Errno::ENOENT => "no such file or directory".into(),
        Errno::ENOTDIR => "not a directory".into(),
        Errno::EISDIR => "is a directory".into(),
        Errno::EACCES | Errno::EPERM => "permission denied".into(),
        Errno::EEXIST => "file already exists".into(),
        Errno::ELOOP => "too many levels of symbolic links".into(),
        other => {
            let text = strerror(other).to_lowercase();
            if text.is_empty() {
                "i/o error".into()
            } else {
                text
            }
        }
    }
}

/// Python's `str(OSError)` for an error that carries a file name:
/// `[Errno 36] File name too long: '/w/x'`.
pub fn py_oserror(errno: Errno, path: &Path) -> String {
    format!(
        "[Errno {}] {}: {}",
        errno as i32,
        strerror(errno),
        py_repr(&py_fsdecode(path.as_os_str().as_bytes()))
    )
}

/// File-system bytes as the SDK's text shows them: Python decodes names with
/// `surrogateescape` (one surrogate per undecodable byte) and the runner folds each
/// surrogate to U+FFFD, so every invalid byte becomes one replacement character.
pub fn py_fsdecode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for _ in chunk.invalid() {
            out.push(char::REPLACEMENT_CHARACTER);
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// Resolution
// ---------------------------------------------------------------------------------

/// Why a tool path was refused; [`PathError::message`] renders the SDK's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// The canonical path is not under the workspace.
    Outside,
    /// Canonicalisation failed with this error.
    Os(Errno),
    /// The path holds a NUL byte, which Python refuses before any system call.
    NulByte,
}

impl PathError {
    /// The text after `<tool>: `, with `p` as the model sent it.
    pub fn message(&self, p: &str) -> String {
        match self {
            PathError::Outside => format!(
                "path {} is outside the session's working directory",
                py_repr(p)
            ),
            PathError::Os(errno) => format!("path {}: {}", py_repr(p), fs_reason(*errno)),
            PathError::NulByte => "embedded null byte".into(),
        }
    }
}

/// A tool path after resolution: canonical, inside the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The absolute canonical path (what the SDK operates on and prints).
    pub path: PathBuf,
    /// The same path relative to the workspace; empty for the workspace itself.
    pub rel: PathBuf,
}

/// Resolve a tool's path argument like the SDK's `resolve_path`.
/// [`resolve`] for a tool's optional `path` input: none (or empty) is the
/// working directory itself.
pub fn resolve_or_workdir(workdir: &Path, given: Option<&str>) -> Result<Resolved, PathError> {
    match given {
        Some(p) => resolve(workdir, p),
        None => Ok(Resolved {
            path: workdir.to_path_buf(),
            rel: PathBuf::new(),
        }),
    }
}

pub fn resolve(workdir: &Path, p: &str) -> Result<Resolved, PathError> {
    let joined = if p.starts_with('/') {
        PathBuf::from(p)
    } else {
        workdir.join(p)
    };
    let normal = normpath(joined.as_os_str().as_bytes());
    if normal.contains(&0) {
        return Err(PathError::NulByte);
    }
    let canonical = canonicalize(Path::new(OsStr::from_bytes(&normal))).map_err(PathError::Os)?;
    match canonical.strip_prefix(workdir) {
        Ok(rel) => Ok(Resolved {
            rel: rel.to_path_buf(),
            path: canonical,
        }),
        Err(_) => Err(PathError::Outside),
    }
}

/// `posixpath.normpath` of an absolute path: empty and `.` components dropped, `..`
/// collapsed lexically (never above `/`). Python keeps exactly two leading slashes, but
/// `realpath` treats them as one right after, so this folds them here.
pub fn normpath(path: &[u8]) -> Vec<u8> {
    let mut comps: Vec<&[u8]> = Vec::new();
    for comp in path.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                comps.pop();
            }
            other => comps.push(other),
        }
    }
    let mut out = Vec::with_capacity(path.len());
    for comp in &comps {
        out.push(b'/');
        out.extend_from_slice(comp);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

fn is_missing(errno: Errno) -> bool {
    matches!(errno, Errno::ENOENT | Errno::ENOTDIR)
}

fn is_link(st: &FileStat) -> bool {
    file_type(st) == SFlag::S_IFLNK
}

/// The file-type bits of a stat.
pub fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// The SDK's `_canonicalize` of an absolute, NUL-free path: `.`/`..` collapsed
/// lexically, then every symlink followed, including the last component and dangling
/// links (read and followed by hand); components that do not exist yet are kept as
/// spelled; more than 40 hand-followed hops count as a loop.
pub fn canonicalize(path: &Path) -> Result<PathBuf, Errno> {
    let mut prefix = PathBuf::from(OsString::from_vec(normpath(path.as_os_str().as_bytes())));
    let mut missing_tail: Vec<OsString> = Vec::new();
    let mut hops = 0;
    loop {
        let unresolved = match realpath(&prefix) {
            Ok(mut real) => {
                for name in missing_tail.iter().rev() {
                    real.push(name);
                }
                return Ok(real);
            }
            Err(errno) if is_missing(errno) => errno,
            Err(errno) => return Err(errno),
        };
        let link = match stat::lstat(&prefix) {
            Ok(st) => is_link(&st),
            Err(errno) => {
                let (Some(parent), Some(name)) = (prefix.parent(), prefix.file_name()) else {
                    return Err(errno);
                };
                if !is_missing(errno) {
                    return Err(errno);
                }
                missing_tail.push(name.to_os_string());
                prefix = parent.to_path_buf();
                continue;
            }
        };
        if !link {
            return Err(unresolved);
        }
        hops += 1;
        if hops > MAX_SYMLINK_HOPS {
            return Err(Errno::ELOOP);
        }
        let parent = realpath(prefix.parent().unwrap_or(Path::new("/")))?;
        let target = fcntl::readlink(&prefix)?;
        let mut joined = parent;
        joined.push(target);
        for name in missing_tail.drain(..).rev() {
            joined.push(name);
        }
        prefix = PathBuf::from(OsString::from_vec(normpath(joined.as_os_str().as_bytes())));
    }
}

/// `os.path.realpath(path, strict=True)` of an absolute path: each component is
/// `lstat`ed (a missing one is an error), symlinks are expanded in place with `..` in
/// their targets applied physically, and a link met again while it is being expanded
/// is a loop.
fn realpath(path: &Path) -> Result<PathBuf, Errno> {
    let mut seen: HashMap<PathBuf, Option<PathBuf>> = HashMap::new();
    join_realpath(
        PathBuf::from("/"),
        path.as_os_str().as_bytes(),
        &mut seen,
        0,
    )
}

fn join_realpath(
    mut path: PathBuf,
    rest: &[u8],
    seen: &mut HashMap<PathBuf, Option<PathBuf>>,
    depth: u32,
) -> Result<PathBuf, Errno> {
    if depth > MAX_LINK_NESTING {
        return Err(Errno::ELOOP);
    }
    if rest.starts_with(b"/") {
        path = PathBuf::from("/");
    }
    for name in rest.split(|&b| b == b'/') {
        match name {
            b"" | b"." => continue,
            b".." => {
                if let Some(parent) = path.parent() {
                    path = parent.to_path_buf();
                }
                continue;
            }
            _ => {}
        }
        let newpath = path.join(OsStr::from_bytes(name));
        let st = stat::lstat(&newpath)?;
        if !is_link(&st) {
            path = newpath;
            continue;
        }
        match seen.get(&newpath) {
            Some(Some(done)) => {
                path = done.clone();
                continue;
            }
            // Met again while still expanding it: Python stats it to raise ELOOP.
            Some(None) => return Err(stat::stat(&newpath).err().unwrap_or(Errno::ELOOP)),
            None => {}
        }
        seen.insert(newpath.clone(), None);
        let target = fcntl::readlink(&newpath)?;
        path = join_realpath(path, target.as_bytes(), seen, depth + 1)?;
        seen.insert(newpath, Some(path.clone()));
    }
    Ok(path)
}

/// Marker: an anchored open met a symlink where resolution found none, so the tree
/// changed between resolution and use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raced;

/// Resolve `p` and run `op` on the result; when `op` reports a race, resolve again and
/// retry once, then give up with the loop text the SDK would give for a path it
/// cannot settle.
pub fn retry_on_race<T>(
    workdir: &Path,
    p: &str,
    mut op: impl FnMut(&Resolved) -> Result<T, Raced>,
) -> Result<T, PathError> {
    for _ in 0..2 {
        let resolved = resolve(workdir, p)?;
        if let Ok(done) = op(&resolved) {
            return Ok(done);
        }
    }
    Err(PathError::Os(Errno::ELOOP))
}

// ---------------------------------------------------------------------------------
// Anchored opens
// ---------------------------------------------------------------------------------

/// Set once `openat2` reported `ENOSYS` (old kernel or a filter that hides it); the
/// component-by-component fallback then takes over for the process.
static OPENAT2_MISSING: AtomicBool = AtomicBool::new(false);

/// Open the workspace root itself (trusted: the sandbox mounted it there).
pub fn open_root(workdir: &Path) -> Result<OwnedFd, Errno> {
    fcntl::open(
        workdir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Open `rel` below `dir` without following any symlink and without leaving `dir`.
/// `ELOOP` means a symlink was met (see [`Raced`]). An empty `rel` opens `dir` again.
pub fn open_beneath(
    dir: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    if !OPENAT2_MISSING.load(Ordering::Relaxed) {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .mode(mode)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
        let mut attempts = 0;
        loop {
            match fcntl::openat2(dir, rel, how) {
                // A concurrent rename raced the kernel's containment check; it asks
                // the caller to try again.
                Err(Errno::EAGAIN) if attempts < 8 => attempts += 1,
                Err(Errno::ENOSYS) => {
                    OPENAT2_MISSING.store(true, Ordering::Relaxed);
                    break;
                }
                other => return other,
            }
        }
    }
    open_beneath_by_components(dir, rel, flags, mode)
}

/// The plain names of a path (what `..`-free canonical relative paths consist of).
pub(crate) fn normal_components(rel: &Path) -> Vec<&OsStr> {
    rel.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name),
            _ => None,
        })
        .collect()
}

/// The fallback of [`open_beneath`]: one `openat(O_NOFOLLOW)` per component. The
/// canonical relative path has no `..`, so staying beneath `dir` follows from never
/// following a link.
fn open_beneath_by_components(
    dir: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    let names = normal_components(rel);
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(Errno::EXDEV);
    }
    let Some((last, parents)) = names.split_last() else {
        return open_nofollow(dir, OsStr::new("."), flags, mode);
    };
    let mut current: Option<OwnedFd> = None;
    for name in parents {
        let base = current.as_ref().map_or(dir, |fd| fd.as_fd());
        let next = open_nofollow(
            base,
            name,
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Mode::empty(),
        )?;
        current = Some(next);
    }
    let base = current.as_ref().map_or(dir, |fd| fd.as_fd());
    open_nofollow(base, last, flags, mode)
}

/// `openat(dir, name, flags | O_NOFOLLOW)` for one component, reporting any symlink
/// as `ELOOP` (with `O_DIRECTORY` or `O_PATH` the kernel would say `ENOTDIR` or hand
/// back the link itself).
fn open_nofollow(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    match fcntl::openat(
        dir,
        name,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        mode,
    ) {
        Ok(fd) => {
            if flags.contains(OFlag::O_PATH) && is_link(&stat::fstat(&fd)?) {
                return Err(Errno::ELOOP);
            }
            Ok(fd)
        }
        Err(errno @ (Errno::ENOTDIR | Errno::ELOOP)) => {
            match stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if is_link(&st) => Err(Errno::ELOOP),
                _ => Err(errno),
            }
        }
        Err(errno) => Err(errno),
    }
}

/// A resolved target located for use: its parent directory opened beneath the
/// workspace and its last name (`.` for the workspace itself).
#[derive(Debug)]
pub struct Located {
    pub dir: OwnedFd,
    pub name: OsString,
}

/// Open the parent directory of `resolved` beneath the workspace.
pub fn locate(workdir: &Path, resolved: &Resolved) -> Result<Located, Errno> {
    let root = open_root(workdir)?;
    let (parent, name) = match (resolved.rel.parent(), resolved.rel.file_name()) {
        (Some(parent), Some(name)) => (parent, name.to_os_string()),
        _ => (Path::new(""), OsString::from(".")),
    };
    let dir = open_beneath(
        root.as_fd(),
        parent,
        OFlag::O_PATH | OFlag::O_DIRECTORY,
        Mode::empty(),
    )?;
    Ok(Located { dir, name })
}

/// An existing entry opened for reading: its stat, and the open file when the open
/// succeeded (it can fail while a stat by name works, e.g. an unreadable file or a
/// socket; the tools then report the SDK's stat-based texts first).
#[derive(Debug)]
pub struct Probe {
    pub stat: FileStat,
    pub file: Result<File, Errno>,
}

/// Open `located` for reading without blocking (a FIFO must not hang the tool) and
/// stat it through the descriptor. `ELOOP` means the entry is now a symlink.
pub fn probe(located: &Located) -> Result<Probe, Errno> {
    let flags = OFlag::O_RDONLY
        | OFlag::O_NONBLOCK
        | OFlag::O_NOCTTY
        | OFlag::O_NOFOLLOW
        | OFlag::O_CLOEXEC;
    match fcntl::openat(&located.dir, located.name.as_os_str(), flags, Mode::empty()) {
        Ok(fd) => {
            let st = stat::fstat(&fd)?;
            Ok(Probe {
                stat: st,
                file: Ok(File::from(fd)),
            })
        }
        Err(Errno::ELOOP) => Err(Errno::ELOOP),
        Err(open_errno) => {
            let st = stat::fstatat(
                &located.dir,
                located.name.as_os_str(),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
            if is_link(&st) {
                return Err(Errno::ELOOP);
            }
            Ok(Probe {
                stat: st,
                file: Err(open_errno),
            })
        }
    }
}

/// `stat` without following of `located`, for write's look at what it replaces.
pub fn lstat_at(located: &Located) -> Result<FileStat, Errno> {
    stat::fstatat(
        &located.dir,
        located.name.as_os_str(),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
}

/// True when a stat describes a regular file.
pub fn is_regular(st: &FileStat) -> bool {
    file_type(st) == SFlag::S_IFREG
}

/// True when a stat describes a directory.
pub fn is_dir(st: &FileStat) -> bool {
    file_type(st) == SFlag::S_IFDIR
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn workdir() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical tempdir");
        (dir, root)
    }

    #[test]
    fn repr_matches_python() {
        // Expected values produced by Python 3.11's repr().
        let cases = [
            ("abc", "'abc'"),
            ("it's", "\"it's\""),
            ("it's\"x", "'it\\'s\"x'"),
            ("a\"b", "'a\"b'"),
            ("a\\b\n\r\t", "'a\\\\b\\n\\r\\t'"),
            (
                "\u{1}\u{7f}\u{80}\u{a0}\u{ad}",
                "'\\x01\\x7f\\x80\\xa0\\xad'",
            ),
            (
                "\u{378}\u{200b}\u{2028}\u{3000}",
                "'\\u0378\\u200b\\u2028\\u3000'",
            ),
            (
                "é😀\u{e0001}\u{ffff}\u{e000}",
                "'é😀\\U000e0001\\uffff\\ue000'",
            ),
            ("", "''"),
            (" ", "' '"),
        ];
        for (input, want) in cases {
            assert_eq!(py_repr(input), want, "repr of {input:?}");
        }
    }

    #[test]
    fn reasons_match_the_sdk() {
        assert_eq!(fs_reason(Errno::ENOENT), "no such file or directory");
        assert_eq!(fs_reason(Errno::ENOTDIR), "not a directory");
        assert_eq!(fs_reason(Errno::EISDIR), "is a directory");
        assert_eq!(fs_reason(Errno::EACCES), "permission denied");
        assert_eq!(fs_reason(Errno::EPERM), "permission denied");
        assert_eq!(fs_reason(Errno::EEXIST), "file already exists");
        assert_eq!(fs_reason(Errno::ELOOP), "too many levels of symbolic links");
        assert_eq!(fs_reason(Errno::ENAMETOOLONG), "file name too long");
        assert_eq!(fs_reason(Errno::EROFS), "read-only file system");
        assert_eq!(
            py_oserror(Errno::ENAMETOOLONG, Path::new("/w/x")),
            "[Errno 36] File name too long: '/w/x'"
        );
    }

    #[test]
    fn fsdecode_replaces_each_bad_byte() {
        assert_eq!(py_fsdecode(b"a\xe2\x82b"), "a\u{fffd}\u{fffd}b");
        assert_eq!(py_fsdecode("é".as_bytes()), "é");
    }

    #[test]
    fn normpath_is_lexical() {
        let n = |p: &str| String::from_utf8(normpath(p.as_bytes())).expect("utf8");
        assert_eq!(n("/a/./b//c/"), "/a/b/c");
        assert_eq!(n("/a/../../b"), "/b");
        assert_eq!(n("//x"), "/x");
        assert_eq!(n("/"), "/");
        assert_eq!(n("/a/.."), "/");
    }

    #[test]
    fn resolution_follows_links_and_keeps_missing_tails() {
        let (_guard, root) = workdir();
        std::fs::create_dir_all(root.join("sub/deep")).expect("mkdir");
        std::fs::write(root.join("f.txt"), "x").expect("write");
        symlink("sub", root.join("sublink")).expect("symlink");
        symlink("nowhere/x", root.join("dangling")).expect("symlink");
        symlink("/etc", root.join("etclink")).expect("symlink");
        symlink("loop2", root.join("loop1")).expect("symlink");
        symlink("loop1", root.join("loop2")).expect("symlink");

        let r = resolve(&root, "sublink/deep/new/file").expect("resolves");
        assert_eq!(r.path, root.join("sub/deep/new/file"));
        assert_eq!(r.rel, Path::new("sub/deep/new/file"));
        assert_eq!(resolve(&root, "").expect("root").rel, Path::new(""));
        assert_eq!(
            resolve(&root, "dangling").expect("dangling").path,
            root.join("nowhere/x")
        );
        // `..` collapses before links are followed (contract §13.6).
        assert_eq!(
            resolve(&root, "sublink/../f.txt").expect("lexical").path,
            root.join("f.txt")
        );
        let abs = root.join("f.txt");
        assert_eq!(
            resolve(&root, abs.to_str().expect("utf8"))
                .expect("abs")
                .path,
            abs
        );
        // A path under a regular file still canonicalises; the tool reports ENOTDIR.
        assert_eq!(
            resolve(&root, "f.txt/x").expect("under file").path,
            root.join("f.txt/x")
        );
        assert_eq!(resolve(&root, "etclink/passwd"), Err(PathError::Outside));
        assert_eq!(resolve(&root, "../x"), Err(PathError::Outside));
        assert_eq!(resolve(&root, "/etc/passwd"), Err(PathError::Outside));
        assert_eq!(resolve(&root, "loop1"), Err(PathError::Os(Errno::ELOOP)));
        assert_eq!(resolve(&root, "a\0b"), Err(PathError::NulByte));
        assert_eq!(
            PathError::Os(Errno::ELOOP).message("loop1"),
            "path 'loop1': too many levels of symbolic links"
        );
        assert_eq!(
            PathError::Outside.message("../x'y"),
            "path \"../x'y\" is outside the session's working directory"
        );
    }

    #[test]
    fn a_dangling_chain_longer_than_forty_hops_is_a_loop() {
        let (_guard, root) = workdir();
        // l0 -> l1 -> ... -> l41 -> missing: each hop is followed by hand.
        for i in 0..42 {
            symlink(format!("l{}", i + 1), root.join(format!("l{i}"))).expect("symlink");
        }
        assert_eq!(resolve(&root, "l0"), Err(PathError::Os(Errno::ELOOP)));
        assert_eq!(
            resolve(&root, "l3").expect("38 hops").path,
            root.join("l42")
        );
    }

    #[test]
    fn anchored_open_refuses_a_symlink_swapped_in_after_resolution() {
        let (_guard, root) = workdir();
        let outside = tempfile::tempdir().expect("outside");
        std::fs::write(outside.path().join("secret"), "s").expect("write");
        std::fs::create_dir(root.join("d")).expect("mkdir");
        std::fs::write(root.join("d/secret"), "inside").expect("write");
        let resolved = resolve(&root, "d/secret").expect("resolves");

        // The race: the directory component becomes a symlink to the outside.
        std::fs::remove_dir_all(root.join("d")).expect("rm");
        symlink(outside.path(), root.join("d")).expect("symlink");

        let fd = open_root(&root).expect("root");
        let opened = open_beneath(fd.as_fd(), &resolved.rel, OFlag::O_RDONLY, Mode::empty());
        assert_eq!(opened.err(), Some(Errno::ELOOP));
        let fallback =
            open_beneath_by_components(fd.as_fd(), &resolved.rel, OFlag::O_RDONLY, Mode::empty());
        assert_eq!(fallback.err(), Some(Errno::ELOOP));
        assert_eq!(locate(&root, &resolved).err(), Some(Errno::ELOOP));

        // A leaf swapped for a symlink is caught by the probe too.
        std::fs::remove_file(root.join("d")).expect("rm link");
        std::fs::create_dir(root.join("d")).expect("mkdir");
        symlink(outside.path().join("secret"), root.join("d/secret")).expect("symlink");
        let located = locate(&root, &resolved).expect("parent is real");
        assert_eq!(probe(&located).err(), Some(Errno::ELOOP));

        // And retry_on_race re-resolves, which now refuses the path as outside.
        let res = retry_on_race(&root, "d/secret", |r| {
            let located = locate(&root, r).map_err(|_| Raced)?;
            probe(&located).map(|_| ()).map_err(|_| Raced)
        });
        assert_eq!(res, Err(PathError::Outside));
    }

    #[test]
    fn fallback_opens_plain_paths() {
        let (_guard, root) = workdir();
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::fs::write(root.join("a/b/c"), "hi").expect("write");
        let fd = open_root(&root).expect("root");
        let file = open_beneath_by_components(
            fd.as_fd(),
            Path::new("a/b/c"),
            OFlag::O_RDONLY,
            Mode::empty(),
        )
        .expect("opens");
        assert!(is_regular(&stat::fstat(&file).expect("fstat")));
        let dir =
            open_beneath_by_components(fd.as_fd(), Path::new(""), OFlag::O_PATH, Mode::empty())
                .expect("root again");
        assert!(is_dir(&stat::fstat(&dir).expect("fstat")));
    }
}
