//! The write tool, and the atomic replace that write and edit share (contract §6.4).
//!
//! Texts are the SDK's: `wrote <N> bytes to <fp>` where N counts characters (§13.10);
//! missing parent directories are created; a parent that is a file gives `file already
//! exists`, a deeper one `not a directory`; the workspace itself gives `is a
//! directory` (§13.6).
//!
//! Where hands differs on purpose: the SDK truncates and rewrites the file in place, so
//! a reader can see it half-written and a crash leaves it cut short. hands writes a
//! temporary file `.hands-<random>.tmp` next to the target and renames it over the
//! target; an existing file's permission bits are copied to it first, a new file gets
//! `0666` minus the umask as with `open()`. Consequences: hard links to the old file
//! keep the old content, and an existing FIFO, socket or device is refused (`not a
//! regular file`) instead of being written into (the SDK would block on a FIFO).
//! Every step is anchored on directory descriptors opened beneath the workspace
//! without following symlinks (see [`super::path`]).

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{self, OFlag};
use nix::sys::stat::{self, Mode};
use nix::unistd::{self, UnlinkatFlags};
use serde_json::Value;

use super::fs::{errno_of, os_error, path_error, FsContext};
use super::input::parse_write;
use super::path::{self, Raced, Resolved};
use super::ToolResult;

/// How often a directory component is re-tried when it vanishes or appears between
/// our `open` and `mkdir` (someone else is creating or removing it concurrently).
const MKDIR_ATTEMPTS: u32 = 8;

pub fn run(input: &Value, ctx: &FsContext) -> ToolResult {
    let input = match parse_write(input) {
        Ok(input) => input,
        Err(invalid) => return invalid,
    };
    let fp = input.file_path.as_str();
    let data = input.content.as_bytes();
    match path::retry_on_race(&ctx.workdir, fp, |resolved| {
        write_resolved(&ctx.workdir, resolved, data)
    }) {
        Ok(Ok(())) => ToolResult::ok(format!(
            "wrote {} bytes to {fp}",
            input.content.chars().count()
        )),
        Ok(Err(Failure::Errno(errno))) => os_error("write", fp, errno),
        Ok(Err(Failure::NotRegular)) => ToolResult::err(format!("write: {fp}: not a regular file")),
        Err(err) => path_error("write", fp, err),
    }
}

enum Failure {
    Errno(Errno),
    NotRegular,
}

fn write_resolved(
    workdir: &Path,
    resolved: &Resolved,
    data: &[u8],
) -> Result<Result<(), Failure>, Raced> {
    let Some(name) = resolved.rel.file_name() else {
        // The workspace itself: Python's open() of a directory.
        return Ok(Err(Failure::Errno(Errno::EISDIR)));
    };
    let parent = resolved.rel.parent().unwrap_or(Path::new(""));
    let root = match path::open_root(workdir) {
        Ok(root) => root,
        Err(errno) => return Ok(Err(Failure::Errno(errno))),
    };
    let dir = match ensure_dir(root.as_fd(), parent) {
        Ok(dir) => dir,
        Err(Errno::ELOOP) => return Err(Raced),
        Err(errno) => return Ok(Err(Failure::Errno(errno))),
    };
    let located = path::Located {
        dir,
        name: name.to_os_string(),
    };
    let keep_mode = match path::lstat_at(&located) {
        Ok(st) => match path::file_type(&st) {
            stat::SFlag::S_IFREG => Some(Mode::from_bits_truncate(st.st_mode & KEPT_MODE)),
            stat::SFlag::S_IFDIR => return Ok(Err(Failure::Errno(Errno::EISDIR))),
            stat::SFlag::S_IFLNK => return Err(Raced),
            _ => return Ok(Err(Failure::NotRegular)),
        },
        Err(Errno::ENOENT) => None,
        Err(errno) => return Ok(Err(Failure::Errno(errno))),
    };
    Ok(replace_file(located.dir.as_fd(), &located.name, data, keep_mode).map_err(Failure::Errno))
}

/// The mode bits a rewrite keeps: permissions and the sticky bit. Set-user-ID
/// and set-group-ID are dropped, as the kernel drops them when an unprivileged
/// process writes a file in place, and as the session's seccomp filter refuses
/// to set them.
pub const KEPT_MODE: u32 = 0o1777;

/// `mkdir -p` of `rel` beneath `root`, one anchored component at a time; returns the
/// directory opened. Errors follow Python's `Path.mkdir(parents=True, exist_ok=True)`:
/// the last component existing as a non-directory is `EEXIST`, an earlier one
/// `ENOTDIR`. `ELOOP` means a symlink appeared (a race).
pub(crate) fn ensure_dir(root: BorrowedFd<'_>, rel: &Path) -> Result<OwnedFd, Errno> {
    let dir_flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
    let mut current = path::open_beneath(root, Path::new(""), dir_flags, Mode::empty())?;
    let names = path::normal_components(rel);
    for (i, name) in names.iter().enumerate() {
        let last = i + 1 == names.len();
        let mut attempts = 0;
        current = loop {
            match path::open_beneath(current.as_fd(), Path::new(name), dir_flags, Mode::empty()) {
                Ok(fd) => break fd,
                Err(Errno::ENOENT) if attempts < MKDIR_ATTEMPTS => {
                    attempts += 1;
                    match stat::mkdirat(current.as_fd(), *name, Mode::from_bits_truncate(0o777)) {
                        Ok(()) | Err(Errno::EEXIST) => continue,
                        Err(errno) => return Err(errno),
                    }
                }
                Err(Errno::ENOTDIR) => {
                    return Err(if last { Errno::EEXIST } else { Errno::ENOTDIR })
                }
                Err(errno) => return Err(errno),
            }
        };
    }
    Ok(current)
}

/// Replace `dir/name` with `data` atomically: a new temporary file in the same
/// directory, `mode` copied onto it when given, then renamed over the name.
pub(crate) fn replace_file(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    data: &[u8],
    mode: Option<Mode>,
) -> Result<(), Errno> {
    let (tmp_name, fd) = create_temp(dir)?;
    let written =
        fill(fd, data, mode).and_then(|()| fcntl::renameat(dir, tmp_name.as_os_str(), dir, name));
    if written.is_err() {
        // Best effort: the rename did not happen, so the temporary name is ours.
        let _ = unistd::unlinkat(dir, tmp_name.as_os_str(), UnlinkatFlags::NoRemoveDir);
    }
    written
}

fn fill(fd: OwnedFd, data: &[u8], mode: Option<Mode>) -> Result<(), Errno> {
    let mut file = std::fs::File::from(fd);
    file.write_all(data).map_err(|err| errno_of(&err))?;
    if let Some(mode) = mode {
        stat::fchmod(&file, mode)?;
    }
    Ok(())
}

/// Create `.hands-<random>.tmp` exclusively in `dir`; mode 0666, so the umask gives a
/// new file the same bits `open()` would.
fn create_temp(dir: BorrowedFd<'_>) -> Result<(OsString, OwnedFd), Errno> {
    let flags =
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut last = Errno::EEXIST;
    for _ in 0..16 {
        let name = OsString::from(format!(".hands-{:016x}.tmp", temp_token()));
        match fcntl::openat(
            dir,
            name.as_os_str(),
            flags,
            Mode::from_bits_truncate(0o666),
        ) {
            Ok(fd) => return Ok((name, fd)),
            Err(Errno::EEXIST) => last = Errno::EEXIST,
            Err(errno) => return Err(errno),
        }
    }
    Err(last)
}

/// A name token: random when the kernel gives randomness, else unique per process
/// (the exclusive create is what makes it safe either way).
fn temp_token() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_ok() {
        return u64::from_ne_bytes(bytes);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32) ^ COUNTER.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::{fs, Tool};
    use serde_json::json;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    use crate::tools::fs::testutil::setup;

    fn write(ctx: &FsContext, fp: &str, content: &str) -> (bool, String) {
        let r = fs::run(
            Tool::Write,
            &json!({"file_path": fp, "content": content}),
            ctx,
        );
        (r.is_error, r.text_content())
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .expect("read_dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".hands-"))
            .collect()
    }

    #[test]
    fn writes_and_counts_characters() {
        let (_g, ctx) = setup();
        assert_eq!(
            write(&ctx, "a.txt", "héllo"),
            (false, "wrote 5 bytes to a.txt".into())
        );
        assert_eq!(
            std::fs::read(ctx.workdir.join("a.txt")).expect("read"),
            "héllo".as_bytes()
        );
        assert_eq!(
            write(&ctx, "a.txt", ""),
            (false, "wrote 0 bytes to a.txt".into())
        );
        assert_eq!(std::fs::read(ctx.workdir.join("a.txt")).expect("read"), b"");
        // No newline translation.
        assert_eq!(
            write(&ctx, "crlf", "a\r\nb"),
            (false, "wrote 4 bytes to crlf".into())
        );
        assert_eq!(
            std::fs::read(ctx.workdir.join("crlf")).expect("read"),
            b"a\r\nb"
        );
        assert!(leftovers(&ctx.workdir).is_empty());
    }

    #[test]
    fn creates_parents_and_drops_a_trailing_slash() {
        let (_g, ctx) = setup();
        assert_eq!(
            write(&ctx, "docs/new/", "x"),
            (false, "wrote 1 bytes to docs/new/".into())
        );
        assert!(ctx.workdir.join("docs/new").is_file());
        assert_eq!(
            write(&ctx, "a/b/c/d.txt", "y"),
            (false, "wrote 1 bytes to a/b/c/d.txt".into())
        );
        let mode = std::fs::metadata(ctx.workdir.join("a/b"))
            .expect("meta")
            .mode()
            & 0o777;
        let umask = current_umask();
        assert_eq!(mode, 0o777 & !umask);
        let fmode = std::fs::metadata(ctx.workdir.join("a/b/c/d.txt"))
            .expect("meta")
            .mode()
            & 0o777;
        assert_eq!(fmode, 0o666 & !umask);
    }

    /// The process umask, read without setting it (tests run in parallel threads).
    fn current_umask() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .expect("Umask line");
        u32::from_str_radix(line.trim(), 8).expect("octal umask")
    }

    #[test]
    fn keeps_the_mode_of_an_existing_file() {
        let (_g, ctx) = setup();
        let p = ctx.workdir.join("script.sh");
        std::fs::write(&p, "old").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o751)).expect("chmod");
        assert!(!write(&ctx, "script.sh", "new").0);
        assert_eq!(std::fs::metadata(&p).expect("meta").mode() & 0o7777, 0o751);
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "new");
    }

    #[test]
    fn errors() {
        let (_g, ctx) = setup();
        std::fs::write(ctx.workdir.join("f.txt"), "x").expect("write");
        std::fs::create_dir(ctx.workdir.join("dir")).expect("mkdir");
        symlink("/etc", ctx.workdir.join("etclink")).expect("symlink");
        nix::unistd::mkfifo(&ctx.workdir.join("fifo"), Mode::from_bits_truncate(0o644))
            .expect("mkfifo");
        let cases = [
            ("f.txt/x", "write: f.txt/x: file already exists"),
            ("f.txt/x/y", "write: f.txt/x/y: not a directory"),
            ("", "write: : is a directory"),
            ("dir", "write: dir: is a directory"),
            ("fifo", "write: fifo: not a regular file"),
            (
                "etclink/x",
                "write: path 'etclink/x' is outside the session's working directory",
            ),
            (
                "../x",
                "write: path '../x' is outside the session's working directory",
            ),
        ];
        for (fp, want) in cases {
            assert_eq!(write(&ctx, fp, "q"), (true, want.into()), "{fp:?}");
        }
        assert_eq!(
            std::fs::read_to_string(ctx.workdir.join("f.txt")).expect("read"),
            "x"
        );
        assert!(leftovers(&ctx.workdir).is_empty());
        assert_eq!(
            fs::run(Tool::Write, &json!({"file_path": "a"}), &ctx).text_content(),
            "ValueError('Invalid arguments for function write')"
        );
    }

    #[test]
    fn a_dangling_link_gets_its_target_created() {
        let (_g, ctx) = setup();
        symlink("made/here.txt", ctx.workdir.join("dangling")).expect("symlink");
        assert_eq!(
            write(&ctx, "dangling", "made"),
            (false, "wrote 4 bytes to dangling".into())
        );
        assert_eq!(
            std::fs::read_to_string(ctx.workdir.join("made/here.txt")).expect("read"),
            "made"
        );
        // The link itself is untouched.
        assert!(std::fs::symlink_metadata(ctx.workdir.join("dangling"))
            .expect("lstat")
            .file_type()
            .is_symlink());
    }

    #[test]
    fn ensure_dir_refuses_a_symlinked_component() {
        let (_g, ctx) = setup();
        let outside = tempfile::tempdir().expect("outside");
        symlink(outside.path(), ctx.workdir.join("esc")).expect("symlink");
        let root = path::open_root(&ctx.workdir).expect("root");
        assert_eq!(
            ensure_dir(root.as_fd(), Path::new("esc/sub")).err(),
            Some(Errno::ELOOP)
        );
        assert!(!outside.path().join("sub").exists());
    }
}
