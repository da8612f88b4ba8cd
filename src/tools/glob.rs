//! The glob tool: Python 3.11's `pathlib.Path.glob` below a search root, newest first
//! (contract §6.6, §13.11).
//!
//! The pattern is split on `/` (empty and `.` parts dropped; a trailing `/` keeps only
//! directories). Each part selects children of the directories selected so far:
//!
//! - `**` — the directory itself and every directory below it, without descending
//!   into symlinked directories; a path reached twice is reported once;
//! - a part with `*`, `?` or `[` — the entries whose name matches it with `fnmatch`
//!   (case-sensitive; `*` matches dotfiles; no braces);
//! - any other part — that name, if it exists (`stat`, so following symlinks).
//!
//! Parts before the last select only directories, following symlinks. At most 50000
//! paths are collected; each is canonicalised and dropped unless it lies under the
//! search root; the rest are sorted by modification time, newest first, ties in walk
//! order (the order the directory lists them), and the first 200 are printed.
//!
//! Listings and stats go through descriptors opened beneath the workspace with
//! `RESOLVE_NO_SYMLINKS` at each entry's real location; a symlink the pattern
//! follows is resolved with the SDK's rules and followed only to a real location
//! inside the workspace. A directory swapped for a symlink mid-walk therefore
//! never lists anything outside the workspace (`pathlib` would list it, and print
//! what it found there whenever the swap raced its final check).
//!
//! Python's odd failures are kept verbatim: `.` raises `IndexError`, `./` an
//! `AttributeError`, more than 196 parts a `RecursionError`, and an OS error other
//! than a missing file is printed as Python's `OSError` text. A pattern such as
//! `**/**/**/…` is as slow as in Python (each `**` walks the tree again); the walk
//! checks for cancellation throughout.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::ops::ControlFlow;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{self, Mode};
use serde_json::Value;

use super::fs::{path_error, FsContext};
use super::input::parse_glob;
use super::path::{self, py_oserror};
use super::{timed_out, ToolResult};

/// Matches collected before confinement and sorting, as the SDK's `islice`.
const WALK_MAX_ENTRIES: usize = 50_000;
/// Paths printed.
const RESULT_LIMIT: usize = 200;
/// Pattern parts beyond which CPython's recursive selector construction overflows
/// its recursion limit (measured on a fresh SDK process: 196 parts work, 197 fail;
/// a warm selector cache can go further, so the SDK itself is not consistent). The
/// bound also keeps hands' own selector recursion shallow.
const MAX_PATTERN_PARTS: usize = 196;

pub fn run(input: &Value, ctx: &FsContext) -> ToolResult {
    let input = match parse_glob(input) {
        Ok(input) => input,
        Err(invalid) => return invalid,
    };
    let pattern = input.pattern.as_str();
    if pattern.starts_with('/') {
        return ToolResult::err(
            "glob: absolute pattern not permitted; pass a relative pattern (and optionally path)",
        );
    }
    // `..` would walk out of the root before any confinement check could run.
    if pattern.split('/').any(|part| part == "..") {
        return ToolResult::err("glob: '..' is not permitted in the pattern");
    }
    let given = input.path.as_deref().filter(|p| !p.is_empty());
    let resolve = || path::resolve_or_workdir(&ctx.workdir, given);
    let mut resolved = match resolve() {
        Ok(resolved) => resolved,
        Err(err) => return path_error("glob", given.unwrap_or_default(), err),
    };
    let selectors = match compile(pattern) {
        Ok(selectors) => selectors,
        Err(result) => return result,
    };
    let Ok(workspace) = path::open_root(&ctx.workdir) else {
        return ToolResult::ok("no matches");
    };
    let mut walk = Walk {
        selectors: &selectors,
        found: Vec::new(),
        dedup: Vec::new(),
        ctx,
        workspace: workspace.as_fd(),
    };
    // The root must be a directory (`Path.is_dir()`); it has no symlink, so
    // meeting one means the tree changed since it was resolved: resolve once more.
    let mut root_is_dir = walk.is_dir_at(&resolved.rel);
    if root_is_dir == Err(Errno::ELOOP) {
        resolved = match resolve() {
            Ok(resolved) => resolved,
            Err(err) => return path_error("glob", given.unwrap_or_default(), err),
        };
        root_is_dir = walk.is_dir_at(&resolved.rel);
    }
    if root_is_dir == Ok(true) {
        let root = Located {
            shown: resolved.path.clone(),
            real: Some(resolved.rel.clone()),
        };
        match walk.select(0, &root) {
            ControlFlow::Continue(()) | ControlFlow::Break(Stop::Full) => {}
            ControlFlow::Break(Stop::Cancelled) => return timed_out("glob"),
            ControlFlow::Break(Stop::Os(errno, at)) => {
                return ToolResult::err(format!("glob: {}", py_oserror(errno, &at)))
            }
        }
    }
    let mut kept: Vec<(f64, PathBuf)> = Vec::new();
    for found in walk.found {
        if ctx.cancelled() {
            return timed_out("glob");
        }
        // Kept when the entry itself lies under the search root, as the SDK's
        // canonicalisation decides; its real location was settled anchored.
        let Some(real) = found.real else { continue };
        if !real.starts_with(&resolved.rel) {
            continue;
        }
        kept.push((walk_mtime(workspace.as_fd(), &real), found.shown));
    }
    if kept.is_empty() {
        return ToolResult::ok("no matches");
    }
    // Stable: equal times keep the walk order, as Python's sort(reverse=True).
    kept.sort_by(|a, b| b.0.total_cmp(&a.0));
    let lines: Vec<String> = kept
        .iter()
        .take(RESULT_LIMIT)
        .map(|(_, p)| path::py_fsdecode(p.as_os_str().as_bytes()))
        .collect();
    ToolResult::ok(lines.join("\n"))
}

/// `st_mtime` as Python computes the float (`sec + nsec * 1e-9`) of the entry at
/// `real` (relative to the workspace, no symlink), 0 when it cannot be stat'ed.
fn walk_mtime(workspace: BorrowedFd<'_>, real: &Path) -> f64 {
    let st = path::open_beneath(workspace, real, OFlag::O_PATH, Mode::empty())
        .and_then(|fd| stat::fstat(&fd));
    match st {
        Ok(st) => st.st_mtime as f64 + st.st_mtime_nsec as f64 * 1e-9,
        Err(_) => 0.0,
    }
}

/// One pattern part.
#[derive(Debug, Clone, PartialEq)]
enum Selector {
    /// A literal name.
    Precise(String),
    /// An `fnmatch` pattern.
    Wildcard(Pattern),
    /// `**`.
    Recursive,
    /// The end after a trailing `/`.
    Terminating,
}

fn compile(pattern: &str) -> Result<Vec<Selector>, ToolResult> {
    if pattern.is_empty() {
        return Err(ToolResult::err("glob: Unacceptable pattern: ''"));
    }
    let mut parts: Vec<&str> = pattern
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .collect();
    if pattern.ends_with('/') {
        parts.push("");
    }
    // Python indexes the first part of an empty tuple, or calls a method the
    // terminating selector lacks; these are the texts the model then sees.
    match parts.first() {
        None => return Err(ToolResult::err("IndexError('tuple index out of range')")),
        Some(&"") => {
            return Err(ToolResult::err(
                "AttributeError(\"'_TerminatingSelector' object has no attribute 'select_from'\")",
            ))
        }
        Some(_) => {}
    }
    if parts.len() > MAX_PATTERN_PARTS {
        return Err(ToolResult::err(
            "RecursionError('maximum recursion depth exceeded')",
        ));
    }
    let mut selectors = Vec::with_capacity(parts.len());
    for part in parts {
        let selector = if part.is_empty() {
            Selector::Terminating
        } else if part == "**" {
            Selector::Recursive
        } else if part.contains("**") {
            return Err(ToolResult::err(
                "glob: Invalid pattern: '**' can only be an entire path component",
            ));
        } else if part.contains(['*', '?', '[']) {
            Selector::Wildcard(Pattern::new(part))
        } else {
            Selector::Precise(part.to_string())
        };
        let last = selector == Selector::Terminating;
        selectors.push(selector);
        if last {
            break;
        }
    }
    Ok(selectors)
}

/// A path of the walk: as it is printed (the way the pattern reached it, through
/// followed symlinks too) and where it really is.
#[derive(Debug, Clone)]
struct Located {
    shown: PathBuf,
    /// Its location relative to the workspace, without any symlink, as
    /// resolved when it was reached; `None` when it resolves outside the
    /// workspace or not at all.
    real: Option<PathBuf>,
}

impl Located {
    fn child(&self, name: &OsStr) -> Located {
        Located {
            shown: self.shown.join(name),
            real: self.real.as_ref().map(|r| r.join(name)),
        }
    }
}

enum Stop {
    Full,
    Cancelled,
    /// An OS error Python does not swallow, with the path it concerned.
    Os(Errno, PathBuf),
}

type Flow = ControlFlow<Stop>;

/// What a listed entry is, not following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    Link,
    Other,
}

/// The walk. Python's `pathlib` lists and stats by path, following symlinks, so a
/// directory swapped for a symlink mid-walk is listed through it. Here every
/// listing and stat goes through a descriptor opened beneath the workspace with
/// `RESOLVE_NO_SYMLINKS` at the entry's real location; a symlink the pattern
/// follows (as `pathlib` does) is resolved explicitly with the SDK's rules and
/// followed only to a real location inside the workspace. Nothing outside the
/// workspace is ever listed, so no name from outside can be printed.
struct Walk<'a> {
    selectors: &'a [Selector],
    found: Vec<Located>,
    /// The paths already yielded by each `**` selector currently running, innermost
    /// last: a yield passes each of them from the inside out, as nested generators.
    dedup: Vec<HashSet<PathBuf>>,
    ctx: &'a FsContext,
    workspace: BorrowedFd<'a>,
}

/// The errors `pathlib` treats as "does not exist". (An `ELOOP` from an anchored
/// open means the tree changed under the walk: the entry is gone for it.)
fn ignored(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::ENOENT | Errno::ENOTDIR | Errno::EBADF | Errno::ELOOP
    )
}

fn is_permission(errno: Errno) -> bool {
    matches!(errno, Errno::EACCES | Errno::EPERM)
}

impl Walk<'_> {
    /// Whether the symlink-free `real` is a directory (`Err(ELOOP)`: it is no
    /// longer symlink-free).
    fn is_dir_at(&self, real: &Path) -> Result<bool, Errno> {
        let fd = path::open_beneath(self.workspace, real, OFlag::O_PATH, Mode::empty())?;
        Ok(path::is_dir(&stat::fstat(&fd)?))
    }

    /// What the entry at `real` is, not following a final symlink.
    fn kind_at(&self, real: &Path) -> Result<Kind, Errno> {
        let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW;
        let fd = path::open_beneath(self.workspace, real, flags, Mode::empty())?;
        let st = stat::fstat(&fd)?;
        Ok(match path::file_type(&st) {
            stat::SFlag::S_IFDIR => Kind::Dir,
            stat::SFlag::S_IFLNK => Kind::Link,
            _ => Kind::Other,
        })
    }

    /// Resolves the symlink at `at` with the SDK's rules: its real location when
    /// that lies inside the workspace, `None` when outside (nothing there is ever
    /// looked at; results below it would be dropped as outside the root anyway).
    fn follow(&self, at: &Located) -> Result<Option<PathBuf>, Errno> {
        let Some(real) = &at.real else {
            return Ok(None);
        };
        let canonical = path::canonicalize(&self.ctx.workdir.join(real))?;
        Ok(canonical
            .strip_prefix(&self.ctx.workdir)
            .ok()
            .map(Path::to_path_buf))
    }

    /// `Path.is_dir()` of a symlink: follows it (inside the workspace only).
    fn link_is_dir(&self, link: &Located) -> Result<Option<Located>, Errno> {
        let Some(real) = self.follow(link)? else {
            return Ok(None);
        };
        match self.is_dir_at(&real) {
            Ok(true) => Ok(Some(Located {
                shown: link.shown.clone(),
                real: Some(real),
            })),
            Ok(false) => Ok(None),
            Err(errno) if ignored(errno) => Ok(None),
            Err(errno) => Err(errno),
        }
    }

    /// Run selector `idx` on `parent` (a directory when `idx` is not the end).
    fn select(&mut self, idx: usize, parent: &Located) -> Flow {
        if self.ctx.cancelled() {
            return ControlFlow::Break(Stop::Cancelled);
        }
        let Some(selector) = self.selectors.get(idx) else {
            return self.emit(parent);
        };
        // Parts before the end select directories only.
        let dir_only = idx + 1 < self.selectors.len();
        match selector {
            Selector::Terminating => self.emit(parent),
            Selector::Precise(name) => self.precise(idx, parent, name, dir_only),
            Selector::Wildcard(pattern) => self.wildcard(idx, parent, pattern, dir_only),
            Selector::Recursive => {
                self.dedup.push(HashSet::new());
                let flow = self.recursive(idx, parent);
                self.dedup.pop();
                flow
            }
        }
    }

    fn emit(&mut self, p: &Located) -> Flow {
        for seen in self.dedup.iter_mut().rev() {
            if !seen.insert(p.shown.clone()) {
                return ControlFlow::Continue(());
            }
        }
        self.found.push(p.clone());
        if self.found.len() >= WALK_MAX_ENTRIES {
            return ControlFlow::Break(Stop::Full);
        }
        ControlFlow::Continue(())
    }

    /// An emitted symlink is kept or dropped on where it resolves to.
    fn emit_entry(&mut self, entry: &Located, kind: Kind) -> Flow {
        if kind != Kind::Link {
            return self.emit(entry);
        }
        let real = self.follow(entry).ok().flatten();
        self.emit(&Located {
            shown: entry.shown.clone(),
            real,
        })
    }

    fn precise(&mut self, idx: usize, parent: &Located, name: &str, dir_only: bool) -> Flow {
        // Python's `exists()`/`is_dir()` answer false for a name with a NUL byte.
        if name.contains('\0') {
            return ControlFlow::Continue(());
        }
        let child = parent.child(OsStr::new(name));
        let Some(real) = &child.real else {
            return ControlFlow::Continue(());
        };
        let next = match self.kind_at(real) {
            Ok(Kind::Link) => {
                // `exists()`/`is_dir()` follow the link; a dangling one is absent.
                let Ok(Some(target)) = self.follow(&child) else {
                    return ControlFlow::Continue(());
                };
                let is_dir = match self.is_dir_at(&target) {
                    Ok(is_dir) => is_dir,
                    Err(errno) if ignored(errno) || is_permission(errno) => {
                        return ControlFlow::Continue(())
                    }
                    Err(errno) => return ControlFlow::Break(Stop::Os(errno, child.shown)),
                };
                if dir_only && !is_dir {
                    return ControlFlow::Continue(());
                }
                Located {
                    shown: child.shown,
                    real: Some(target),
                }
            }
            Ok(kind) => {
                if dir_only && kind != Kind::Dir {
                    return ControlFlow::Continue(());
                }
                child
            }
            Err(errno) if ignored(errno) || is_permission(errno) => {
                return ControlFlow::Continue(())
            }
            Err(errno) => return ControlFlow::Break(Stop::Os(errno, child.shown)),
        };
        self.select(idx + 1, &next)
    }

    /// The entries of `dir` in directory order, or `None` when Python's selector
    /// gives up on it silently (permission denied). The listing is read through a
    /// descriptor of the directory's real location; if that is a symlink by now,
    /// the symlink is followed as `scandir` would, inside the workspace only.
    fn list(&self, dir: &Located) -> Result<Option<Vec<(OsString, Kind)>>, Stop> {
        let Some(real) = &dir.real else {
            return Ok(Some(Vec::new()));
        };
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
        let opened = match path::open_beneath(self.workspace, real, flags, Mode::empty()) {
            Err(Errno::ELOOP) => match self.follow(dir) {
                Ok(Some(target)) => {
                    path::open_beneath(self.workspace, &target, flags, Mode::empty())
                }
                Ok(None) => return Ok(Some(Vec::new())),
                Err(errno) => Err(errno),
            },
            other => other,
        };
        let fd = match opened {
            Ok(fd) => fd,
            Err(Errno::ELOOP) => return Ok(Some(Vec::new())),
            Err(errno) if is_permission(errno) => return Ok(None),
            Err(errno) => return Err(Stop::Os(errno, dir.shown.clone())),
        };
        let failed = |errno: Errno| {
            if is_permission(errno) {
                Ok(None)
            } else {
                Err(Stop::Os(errno, dir.shown.clone()))
            }
        };
        let mut listing = match nix::dir::Dir::from_fd(fd) {
            Ok(listing) => listing,
            Err(errno) => return failed(errno),
        };
        let mut entries = Vec::new();
        let mut unknown = Vec::new();
        for entry in listing.iter() {
            let entry = match entry {
                Ok(entry) => entry,
                Err(errno) => return failed(errno),
            };
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let kind = match entry.file_type() {
                Some(nix::dir::Type::Directory) => Kind::Dir,
                Some(nix::dir::Type::Symlink) => Kind::Link,
                Some(_) => Kind::Other,
                None => {
                    unknown.push(entries.len());
                    Kind::Other
                }
            };
            entries.push((OsStr::from_bytes(name).to_os_string(), kind));
        }
        for i in unknown {
            let st = stat::fstatat(
                listing.as_fd(),
                entries[i].0.as_os_str(),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            );
            entries[i].1 = match st.map(|st| path::file_type(&st)) {
                Ok(stat::SFlag::S_IFDIR) => Kind::Dir,
                Ok(stat::SFlag::S_IFLNK) => Kind::Link,
                _ => Kind::Other,
            };
        }
        Ok(Some(entries))
    }

    fn wildcard(
        &mut self,
        idx: usize,
        parent: &Located,
        pattern: &Pattern,
        dir_only: bool,
    ) -> Flow {
        let entries = match self.list(parent) {
            Ok(Some(entries)) => entries,
            Ok(None) => return ControlFlow::Continue(()),
            Err(stop) => return ControlFlow::Break(stop),
        };
        for (name, kind) in entries {
            let child = parent.child(&name);
            if dir_only {
                let next = match kind {
                    Kind::Dir => child,
                    Kind::Other => continue,
                    Kind::Link => match self.link_is_dir(&child) {
                        Ok(Some(next)) => next,
                        Ok(None) => continue,
                        Err(errno) if ignored(errno) => continue,
                        // Python lets a permission error end this whole listing.
                        Err(errno) if is_permission(errno) => return ControlFlow::Continue(()),
                        Err(errno) => return ControlFlow::Break(Stop::Os(errno, child.shown)),
                    },
                };
                if pattern.matches(&name) {
                    self.select(idx + 1, &next)?;
                }
            } else if pattern.matches(&name) {
                self.emit_entry(&child, kind)?;
            }
        }
        ControlFlow::Continue(())
    }

    /// `**`: the successor runs on `dir`, then on each real subdirectory, depth first
    /// in directory order (pre-order, as Python's generator). Iterative, so a deep
    /// tree cannot exhaust the tool thread's stack.
    fn recursive(&mut self, idx: usize, dir: &Located) -> Flow {
        self.select(idx + 1, dir)?;
        let mut stack = vec![self.subdirs(dir)?.into_iter()];
        while let Some(level) = stack.last_mut() {
            match level.next() {
                Some(child) => {
                    self.select(idx + 1, &child)?;
                    let below = self.subdirs(&child)?;
                    stack.push(below.into_iter());
                }
                None => {
                    stack.pop();
                }
            }
        }
        ControlFlow::Continue(())
    }

    /// The real (non-symlink) subdirectories of `dir`, in directory order; none when
    /// Python would give up on it silently.
    fn subdirs(&self, dir: &Located) -> ControlFlow<Stop, Vec<Located>> {
        match self.list(dir) {
            Ok(Some(entries)) => ControlFlow::Continue(
                entries
                    .into_iter()
                    .filter(|(_, kind)| *kind == Kind::Dir)
                    .map(|(name, _)| dir.child(&name))
                    .collect(),
            ),
            Ok(None) => ControlFlow::Continue(Vec::new()),
            Err(stop) => ControlFlow::Break(stop),
        }
    }
}

/// A compiled `fnmatch` pattern (Python 3.11 `fnmatch.translate` semantics).
#[derive(Debug, Clone, PartialEq)]
struct Pattern {
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Char(u32),
    /// `?`, or the negated empty class `[!]`-like forms: any one character.
    Any,
    Star,
    /// `[...]`: inclusive ranges, possibly negated.
    Class {
        negated: bool,
        ranges: Vec<(u32, u32)>,
    },
    /// A class that can never match (Python emits `(?!)`).
    Never,
}

impl Token {
    fn matches(&self, c: u32) -> bool {
        match self {
            Token::Char(want) => *want == c,
            Token::Any => true,
            Token::Star => false,
            Token::Class { negated, ranges } => {
                ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }
            Token::Never => false,
        }
    }
}

impl Pattern {
    fn new(pattern: &str) -> Pattern {
        let pat: Vec<char> = pattern.chars().collect();
        let n = pat.len();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < n {
            let c = pat[i];
            i += 1;
            match c {
                '*' => {
                    if tokens.last() != Some(&Token::Star) {
                        tokens.push(Token::Star);
                    }
                }
                '?' => tokens.push(Token::Any),
                '[' => match parse_class(&pat, i) {
                    Some((token, next)) => {
                        tokens.push(token);
                        i = next;
                    }
                    None => tokens.push(Token::Char(u32::from('['))),
                },
                c => tokens.push(Token::Char(u32::from(c))),
            }
        }
        Pattern { tokens }
    }

    /// Match a file name; undecodable bytes are matched as Python's surrogate escapes.
    fn matches(&self, name: &OsStr) -> bool {
        let mut chars: Vec<u32> = Vec::with_capacity(name.len());
        for chunk in name.as_bytes().utf8_chunks() {
            chars.extend(chunk.valid().chars().map(u32::from));
            chars.extend(chunk.invalid().iter().map(|&b| 0xDC00 + u32::from(b)));
        }
        self.matches_chars(&chars)
    }

    /// Glob matching with single-star backtracking; every token but `*` consumes
    /// exactly one character, so the earliest fit after a star is always right.
    fn matches_chars(&self, s: &[u32]) -> bool {
        let t = &self.tokens;
        let (mut ti, mut si) = (0, 0);
        let mut resume: Option<(usize, usize)> = None;
        while si < s.len() {
            if ti < t.len() && t[ti] == Token::Star {
                resume = Some((ti, si));
                ti += 1;
            } else if ti < t.len() && t[ti].matches(s[si]) {
                ti += 1;
                si += 1;
            } else if let Some((star, start)) = resume {
                ti = star + 1;
                si = start + 1;
                resume = Some((star, start + 1));
            } else {
                return false;
            }
        }
        while ti < t.len() && t[ti] == Token::Star {
            ti += 1;
        }
        ti == t.len()
    }
}

/// Parse a `[...]` starting after the `[` at `start`, the way `fnmatch.translate`
/// does; `None` when there is no closing `]` (the `[` is then literal).
fn parse_class(pat: &[char], start: usize) -> Option<(Token, usize)> {
    let n = pat.len();
    let mut j = start;
    if j < n && pat[j] == '!' {
        j += 1;
    }
    if j < n && pat[j] == ']' {
        j += 1;
    }
    while j < n && pat[j] != ']' {
        j += 1;
    }
    if j >= n {
        return None;
    }
    let stuff = &pat[start..j];
    let chunks: Vec<Vec<char>> = if !stuff.contains(&'-') {
        vec![stuff.to_vec()]
    } else {
        // Split at the hyphens that make ranges; a hyphen right after the opening
        // (or after `!`) and the character after a range's hyphen are literal.
        let mut chunks: Vec<Vec<char>> = Vec::new();
        let mut i = start;
        let mut k = if pat[start] == '!' {
            start + 2
        } else {
            start + 1
        };
        while let Some(found) = (k..j).find(|&x| pat[x] == '-') {
            chunks.push(pat[i..found].to_vec());
            i = found + 1;
            k = found + 3;
        }
        let tail = pat[i..j].to_vec();
        if tail.is_empty() {
            if let Some(last) = chunks.last_mut() {
                last.push('-');
            }
        } else {
            chunks.push(tail);
        }
        // Drop empty ranges (start after end), merging their neighbours.
        let mut k = chunks.len();
        while k > 1 {
            k -= 1;
            let (prev_last, first) = (chunks[k - 1].last().copied(), chunks[k].first().copied());
            if let (Some(a), Some(b)) = (prev_last, first) {
                if a > b {
                    let tail: Vec<char> = chunks[k][1..].to_vec();
                    chunks[k - 1].pop();
                    chunks[k - 1].extend(tail);
                    chunks.remove(k);
                }
            }
        }
        chunks
    };
    let next = j + 1;
    let joined_len: usize = chunks.iter().map(Vec::len).sum::<usize>() + chunks.len() - 1;
    if joined_len == 0 {
        return Some((Token::Never, next));
    }
    let negated = chunks[0].first() == Some(&'!');
    if negated && joined_len == 1 {
        return Some((Token::Any, next));
    }
    let mut ranges = Vec::new();
    let count = chunks.len();
    for (idx, chunk) in chunks.iter().enumerate() {
        let body: &[char] = if idx == 0 && negated {
            &chunk[1..]
        } else {
            chunk
        };
        // The first character of a later chunk ends the previous range; the last
        // character of a non-final chunk starts the next one.
        let lo_i = usize::from(idx > 0);
        let hi_i = if idx + 1 < count {
            body.len().saturating_sub(1)
        } else {
            body.len()
        };
        if idx > 0 {
            let prev = &chunks[idx - 1];
            if let (Some(&a), Some(&b)) = (prev.last(), chunk.first()) {
                ranges.push((u32::from(a), u32::from(b)));
            }
        }
        for &c in body.get(lo_i..hi_i.max(lo_i)).unwrap_or(&[]) {
            ranges.push((u32::from(c), u32::from(c)));
        }
    }
    Some((Token::Class { negated, ranges }, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::Tool;
    use serde_json::json;
    use std::os::unix::fs::symlink;
    use std::time::{Duration, SystemTime};

    use crate::tools::fs::testutil::setup;

    fn glob(ctx: &FsContext, input: Value) -> (bool, String) {
        crate::tools::fs::testutil::call(Tool::Glob, ctx, input)
    }

    /// Set mtimes so that the order is known: later in `paths` = older.
    fn age(ctx: &FsContext, paths: &[&str]) {
        let base = SystemTime::now();
        for (i, p) in paths.iter().enumerate() {
            let f = std::fs::File::options()
                .read(true)
                .open(ctx.workdir.join(p))
                .or_else(|_| std::fs::File::open(ctx.workdir.join(p)))
                .expect("open");
            f.set_modified(base - Duration::from_secs(100 * (i as u64 + 1)))
                .expect("set mtime");
        }
    }

    fn lines(ctx: &FsContext, text: &str) -> Vec<String> {
        let root = ctx.workdir.to_string_lossy().into_owned();
        text.split('\n')
            .map(|l| l.strip_prefix(&root).unwrap_or(l).to_string())
            .collect()
    }

    fn fixture(ctx: &FsContext) {
        let w = &ctx.workdir;
        std::fs::create_dir_all(w.join("sub/deep")).expect("mkdir");
        std::fs::create_dir_all(w.join(".hid")).expect("mkdir");
        std::fs::write(w.join("f.txt"), "x").expect("write");
        std::fs::write(w.join(".dot"), "d").expect("write");
        std::fs::write(w.join("sub/g.txt"), "y").expect("write");
        std::fs::write(w.join("sub/deep/h.py"), "z").expect("write");
        std::fs::write(w.join(".hid/i.txt"), "h").expect("write");
        symlink("/etc", w.join("etclink")).expect("symlink");
        symlink("nowhere", w.join("dangling")).expect("symlink");
        symlink("sub", w.join("sublink")).expect("symlink");
        age(
            ctx,
            &[
                "sub/deep/h.py",
                "sub/g.txt",
                "f.txt",
                ".dot",
                ".hid/i.txt",
                "sub/deep",
                "sub",
                ".hid",
                "",
            ],
        );
    }

    #[test]
    fn patterns() {
        let (_g, ctx) = setup();
        fixture(&ctx);
        let g = |p: &str| {
            let (err, text) = glob(&ctx, json!({"pattern": p}));
            assert!(!err, "{p}: {text}");
            lines(&ctx, &text)
        };
        assert_eq!(g("**/*.py"), ["/sub/deep/h.py"]);
        assert_eq!(g("*.txt"), ["/f.txt"]);
        // `*` matches dotfiles; a dangling link is kept and sorts last.
        let star = g("*");
        assert_eq!(star.last().map(String::as_str), Some("/dangling"));
        assert!(star.contains(&"/.dot".to_string()));
        assert!(star.contains(&"/sublink".to_string()));
        assert!(!star.iter().any(|l| l.contains("etclink")));
        assert_eq!(star.len(), 6);
        assert_eq!(&star[..2], ["/f.txt", "/.dot"]);
        // `**` yields the root and real directories only, newest first.
        assert_eq!(g("**"), ["/sub/deep", "/sub", "/.hid", ""]);
        assert_eq!(g("**/"), ["/sub/deep", "/sub", "/.hid", ""]);
        assert_eq!(g("sub/"), ["/sub"]);
        assert_eq!(g("sub//deep"), ["/sub/deep"]);
        assert_eq!(g("./sub/./g.txt"), ["/sub/g.txt"]);
        // Through a symlinked directory explicitly: kept under the link's name.
        assert_eq!(g("sublink/*"), ["/sublink/g.txt", "/sublink/deep"]);
        assert_eq!(g("sublink/**/*.py"), ["/sublink/deep/h.py"]);
        // Out of the root through a link: dropped.
        assert_eq!(g("etclink/passwd"), ["no matches"]);
        assert_eq!(g("etclink/*"), ["no matches"]);
        assert_eq!(g("dangling"), ["no matches"]);
        assert_eq!(g("{f,g}.txt"), ["no matches"]);
        assert_eq!(g("[fg].txt"), ["/f.txt"]);
        assert_eq!(g("[!f].txt"), ["no matches"]);
        assert_eq!(g("?.txt"), ["/f.txt"]);
        assert_eq!(g("F.TXT"), ["no matches"]);
        assert_eq!(g("**/**/h.py"), ["/sub/deep/h.py"]);
        // Same mtime through the link: the tie keeps directory order, so compare sorted.
        let mut both = g("*/deep");
        both.sort();
        assert_eq!(both, ["/sub/deep", "/sublink/deep"]);
    }

    #[test]
    fn path_argument() {
        let (_g, ctx) = setup();
        fixture(&ctx);
        let g = |p: Value| {
            let (err, text) = glob(&ctx, json!({"pattern": "*", "path": p}));
            (err, lines(&ctx, &text))
        };
        assert_eq!(
            g(json!("sub")),
            (false, vec!["/sub/g.txt".into(), "/sub/deep".into()])
        );
        assert_eq!(
            g(json!("sublink")),
            (false, vec!["/sub/g.txt".into(), "/sub/deep".into()])
        );
        assert_eq!(g(json!("nonexist")), (false, vec!["no matches".into()]));
        assert_eq!(g(json!("f.txt")), (false, vec!["no matches".into()]));
        assert_eq!(
            g(json!("etclink")),
            (
                true,
                vec!["glob: path 'etclink' is outside the session's working directory".into()]
            )
        );
        assert_eq!(g(json!("")).1.len(), 6);
        assert_eq!(g(json!(null)).1.len(), 6);
    }

    #[test]
    fn error_texts() {
        let (_g, ctx) = setup();
        let g = |p: &str| glob(&ctx, json!({"pattern": p}));
        let abs =
            "glob: absolute pattern not permitted; pass a relative pattern (and optionally path)";
        assert_eq!(g("/etc"), (true, abs.into()));
        assert_eq!(g("//etc"), (true, abs.into()));
        assert_eq!(
            g("x/../y"),
            (true, "glob: '..' is not permitted in the pattern".into())
        );
        assert_eq!(
            g(".."),
            (true, "glob: '..' is not permitted in the pattern".into())
        );
        assert_eq!(g(""), (true, "glob: Unacceptable pattern: ''".into()));
        assert_eq!(
            g("a**b"),
            (
                true,
                "glob: Invalid pattern: '**' can only be an entire path component".into()
            )
        );
        assert_eq!(
            g("x/**y/"),
            (
                true,
                "glob: Invalid pattern: '**' can only be an entire path component".into()
            )
        );
        assert_eq!(
            g("."),
            (true, "IndexError('tuple index out of range')".into())
        );
        assert_eq!(
            g("./."),
            (true, "IndexError('tuple index out of range')".into())
        );
        assert_eq!(
            g("./"),
            (
                true,
                "AttributeError(\"'_TerminatingSelector' object has no attribute 'select_from'\")"
                    .into()
            )
        );
        assert_eq!(g("a\u{0}b/*"), (false, "no matches".into()));
        assert_eq!(g(&["x"; 196].join("/")), (false, "no matches".into()));
        assert_eq!(
            g(&["x*"; 197].join("/")),
            (
                true,
                "RecursionError('maximum recursion depth exceeded')".into()
            )
        );
        assert_eq!(g("nothing*"), (false, "no matches".into()));
        let long = "x".repeat(300);
        let (err, text) = g(&long);
        assert!(err);
        assert_eq!(
            text,
            format!(
                "glob: [Errno 36] File name too long: '{}/{long}'",
                ctx.workdir.display()
            )
        );
    }

    #[test]
    fn limits_and_ties() {
        let (_g, ctx) = setup();
        for i in 0..250 {
            std::fs::write(ctx.workdir.join(format!("f{i:03}")), "").expect("write");
        }
        let (err, text) = glob(&ctx, json!({"pattern": "f*"}));
        assert!(!err);
        assert_eq!(text.split('\n').count(), 200);
        // Equal times keep the order the directory lists them in.
        let t = SystemTime::now();
        for i in 0..250 {
            std::fs::File::open(ctx.workdir.join(format!("f{i:03}")))
                .expect("open")
                .set_modified(t)
                .expect("mtime");
        }
        let listed: Vec<String> = std::fs::read_dir(&ctx.workdir)
            .expect("ls")
            .map(|e| e.expect("entry").path().to_string_lossy().into_owned())
            .take(200)
            .collect();
        let (_, text) = glob(&ctx, json!({"pattern": "f*"}));
        assert_eq!(
            text.split('\n').map(String::from).collect::<Vec<_>>(),
            listed
        );
    }

    #[test]
    fn deep_trees_do_not_recurse_on_the_stack() {
        let (_g, ctx) = setup();
        let mut rel = PathBuf::new();
        for _ in 0..1500 {
            rel.push("d");
        }
        std::fs::create_dir_all(ctx.workdir.join(&rel)).expect("deep mkdir");
        std::fs::write(ctx.workdir.join(&rel).join("leaf.txt"), "x").expect("write");
        // A small stack, like a helper thread's, must be enough.
        let ctx2 = ctx.clone();
        let out = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || glob(&ctx2, json!({"pattern": "**/leaf.txt"})))
            .expect("spawn")
            .join()
            .expect("no stack overflow");
        assert!(!out.0);
        assert!(
            out.1.ends_with("/d/leaf.txt"),
            "{}",
            &out.1[out.1.len() - 40..]
        );
    }

    fn m(pattern: &str, name: &str) -> bool {
        Pattern::new(pattern).matches(OsStr::new(name))
    }

    #[test]
    fn fnmatch_semantics() {
        assert!(m("*", ".hidden"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "axxbyy"));
        assert!(m("*.tar.gz", "x.tar.gz"));
        assert!(m("?", "\n"));
        assert!(m("[]]", "]"));
        assert!(m("[!]]", "a"));
        assert!(!m("[!]]", "]"));
        assert!(m("[a-c]", "b"));
        assert!(!m("[a-c]", "d"));
        assert!(m("[!a-c]", "d"));
        assert!(m("[-a]", "-"));
        assert!(m("[a-]", "-"));
        assert!(m("[!-a]", "b"));
        assert!(!m("[!-a]", "-"));
        assert!(!m("[z-a]", "z"));
        assert!(!m("[z-a]", "-"));
        assert!(m("[!z-a]", "q"));
        assert!(m("[a-cx-z]", "y"));
        assert!(m("[ab-de]", "c"));
        assert!(m("[ab-de]", "e"));
        assert!(!m("[ab-de]", "f"));
        assert!(!m("[a--]", "-"));
        assert!(m("[--0]", "/"));
        assert!(m("[a-b-c]", "-"));
        assert!(!m("[]-a]", "b"));
        assert!(m("[\\]", "\\"));
        assert!(m("[", "["));
        assert!(m("[ab", "[ab"));
        assert!(m("a[", "a["));
        assert!(m("[^a]", "^"));
        assert!(!m("[^a]", "b"));
        assert!(m("[&&x]", "&"));
        assert!(m("é*", "été"));
        assert!(!m("*.py", "a.pyc"));
        assert!(Pattern::new("*").matches(OsStr::from_bytes(b"\xff\xfe")));
    }
}
