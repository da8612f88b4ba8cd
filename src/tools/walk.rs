//! grep's directory walk: ripgrep's filters, on a walk that never opens a path by
//! name.
//!
//! The filters are the `ignore` crate's, as its `WalkBuilder` applies them for rg
//! (hidden entries skipped; `.rgignore`, `.ignore`, `.gitignore` and
//! `.git/info/exclude` with their precedence, the git ones only inside a
//! repository; the `glob` override and the `type` selection; entries sorted by
//! name; symlinks never followed). `ignore`'s own walker opens every directory
//! and ignore file by its path, so a directory the agent swaps for a symlink
//! between two steps of the walk is followed, and its target listed and
//! searched. Here the walk is anchored instead:
//!
//! - the search root was opened beneath the workspace with
//!   `RESOLVE_NO_SYMLINKS` ([`super::path::open_beneath`]);
//! - every directory is opened from the root's descriptor with `openat2`
//!   (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`) and listed through that
//!   descriptor; every file the caller searches is opened the same way;
//! - ignore files are read through the descriptor of their directory, with the
//!   same flags.
//!
//! A component swapped for a symlink mid-walk therefore fails that entry
//! (`ELOOP`), which the walk treats as what the entry now is, a symlink: skipped,
//! as rg skips symlinks. Nothing is ever read through it.
//!
//! Where this differs from `ignore` 0.4 (all of it outside the normal cases):
//! ignore files that are symlinks are not read; a `.git` symlink marks a
//! repository but its `info/exclude` is not read; a worktree's `info/exclude` is
//! read only when its git directory lies inside the workspace; ignore files in
//! directories above the workspace are not consulted (inside the sandbox that is
//! the sandbox's own root, which has none).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use ignore::overrides::Override;
use ignore::types::Types;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{self, Mode, SFlag};

use super::path;

/// rg's own ignore file name, read with the highest precedence.
const RG_IGNORE: &str = ".rgignore";

/// What the walk yields, in walk order.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    /// A regular file, as a path relative to the walk's root.
    File(PathBuf),
    /// rg's stderr line for something that could not be read.
    Error(String),
}

/// The filters that do not depend on the directory: grep's `glob` and `type`.
pub struct Filters {
    pub overrides: Override,
    pub types: Types,
}

/// One anchored walk.
pub struct Walk<'a> {
    /// The workspace, for the ignore files of the root's parents inside it.
    pub workspace: BorrowedFd<'a>,
    /// The workspace's path (where the sandbox mounted it).
    pub workdir: &'a Path,
    /// The search root, opened beneath the workspace.
    pub root: BorrowedFd<'a>,
    /// The search root relative to the workspace (empty: the workspace).
    pub root_rel: &'a Path,
    /// The search root as printed (absolute).
    pub display: &'a Path,
    pub filters: &'a Filters,
}

/// What a directory entry is, from `getdents` (or `fstatat` when it does not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    /// Symlinks, FIFOs, sockets, devices: never searched, never entered.
    Other,
    /// The type could not be learnt.
    Unknown(Errno),
}

/// The ignore rules of one directory.
struct Rules {
    custom: Gitignore,
    ignore: Gitignore,
    git: Gitignore,
    exclude: Gitignore,
    /// The directory holds `.git` or `.jj` (a repository root).
    has_git: bool,
}

/// A directory being walked: its path below the root and the entries left.
struct Frame {
    rel: PathBuf,
    entries: std::vec::IntoIter<(OsString, Kind)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    None,
    Ignore,
    Whitelist,
}

fn verdict<T>(m: ignore::Match<T>) -> Verdict {
    if m.is_ignore() {
        Verdict::Ignore
    } else if m.is_whitelist() {
        Verdict::Whitelist
    } else {
        Verdict::None
    }
}

fn or(a: Verdict, b: Verdict) -> Verdict {
    if a == Verdict::None {
        b
    } else {
        a
    }
}

impl Walk<'_> {
    /// Walks, handing each item to `emit` (which returns false to stop) and
    /// checking `stopped` between entries.
    pub fn run(&self, stopped: &dyn Fn() -> bool, emit: &mut dyn FnMut(Item) -> bool) {
        let mut chain: Vec<Rules> = Vec::new();
        // The root's parents inside the workspace: their rules apply, and their
        // errors are reported, as `ignore`'s `add_parents` does.
        let mut errors = Vec::new();
        let mut parent = PathBuf::new();
        for name in path::normal_components(self.root_rel) {
            let shown = self.workdir.join(&parent);
            if let Ok(listed) = self.list(self.workspace, &parent, &shown, &mut errors) {
                chain.push(listed.1);
            }
            parent.push(name);
        }
        if !errors.is_empty() {
            let err = if errors.len() == 1 {
                errors.remove(0)
            } else {
                ignore::Error::Partial(errors)
            };
            if !emit(Item::Error(error_text(&err))) {
                return;
            }
        }
        // The root itself: never filtered; errors in its ignore files (and its
        // descendants') are dropped, as the walker drops them.
        let mut stack = match self.list(self.root, Path::new(""), self.display, &mut Vec::new()) {
            Ok((entries, rules)) => {
                chain.push(rules);
                vec![Frame {
                    rel: PathBuf::new(),
                    entries: entries.into_iter(),
                }]
            }
            Err(errno) => {
                emit(Item::Error(os_error_text(self.display, errno)));
                return;
            }
        };
        while let Some(frame) = stack.last_mut() {
            if stopped() {
                return;
            }
            let Some((name, kind)) = frame.entries.next() else {
                stack.pop();
                chain.pop();
                continue;
            };
            let rel = frame.rel.join(&name);
            let shown = self.display.join(&rel);
            let item = match kind {
                Kind::Other => continue,
                Kind::Unknown(errno) => Item::Error(os_error_text(&shown, errno)),
                Kind::File if self.skipped(&chain, &shown, &name, false) => continue,
                Kind::File => Item::File(rel),
                Kind::Dir if self.skipped(&chain, &shown, &name, true) => continue,
                Kind::Dir => match self.list(self.root, &rel, &shown, &mut Vec::new()) {
                    Ok((entries, rules)) => {
                        chain.push(rules);
                        stack.push(Frame {
                            rel,
                            entries: entries.into_iter(),
                        });
                        continue;
                    }
                    // Swapped for a symlink since it was listed: skipped, as a
                    // symlink is.
                    Err(Errno::ELOOP) => continue,
                    Err(errno) => Item::Error(os_error_text(&shown, errno)),
                },
            };
            if !emit(item) {
                return;
            }
        }
    }

    /// Whether an entry of the innermost directory of `chain` is filtered out
    /// (`ignore`'s `matched_dir_entry`).
    fn skipped(&self, chain: &[Rules], shown: &Path, name: &OsStr, is_dir: bool) -> bool {
        match self.matched(chain, shown, is_dir) {
            Verdict::Ignore => true,
            Verdict::Whitelist => false,
            Verdict::None => name.as_bytes().starts_with(b"."),
        }
    }

    /// `ignore`'s `Ignore::matched`: overrides win outright; then the ignore
    /// files; then the file types.
    fn matched(&self, chain: &[Rules], shown: &Path, is_dir: bool) -> Verdict {
        let overrides = &self.filters.overrides;
        if !overrides.is_empty() {
            let m = verdict(overrides.matched(shown, is_dir));
            if m != Verdict::None {
                return m;
            }
        }
        let mut whitelisted = Verdict::None;
        match matched_ignore(chain, shown, is_dir) {
            Verdict::Ignore => return Verdict::Ignore,
            Verdict::Whitelist => whitelisted = Verdict::Whitelist,
            Verdict::None => {}
        }
        let types = &self.filters.types;
        if !types.is_empty() {
            match verdict(types.matched(shown, is_dir)) {
                Verdict::Ignore => return Verdict::Ignore,
                Verdict::Whitelist => whitelisted = Verdict::Whitelist,
                Verdict::None => {}
            }
        }
        whitelisted
    }

    /// Opens the directory `rel` beneath `base`, lists it (sorted by name) and
    /// loads its ignore rules; errors in those go to `errors`.
    fn list(
        &self,
        base: BorrowedFd<'_>,
        rel: &Path,
        shown: &Path,
        errors: &mut Vec<ignore::Error>,
    ) -> Result<(Vec<(OsString, Kind)>, Rules), Errno> {
        let fd = path::open_beneath(
            base,
            rel,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )?;
        let mut dir = nix::dir::Dir::from_fd(fd)?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            names.push((OsStr::from_bytes(name).to_os_string(), entry.file_type()));
        }
        let dirfd = dir.as_fd();
        let mut entries: Vec<(OsString, Kind)> = names
            .into_iter()
            .map(|(name, known)| {
                let kind = match known {
                    Some(nix::dir::Type::Directory) => Kind::Dir,
                    Some(nix::dir::Type::File) => Kind::File,
                    Some(_) => Kind::Other,
                    None => {
                        match stat::fstatat(dirfd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                            Ok(st) => match path::file_type(&st) {
                                SFlag::S_IFDIR => Kind::Dir,
                                SFlag::S_IFREG => Kind::File,
                                _ => Kind::Other,
                            },
                            Err(errno) => Kind::Unknown(errno),
                        }
                    }
                };
                (name, kind)
            })
            .collect();
        entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let rules = self.rules(dirfd, shown, &entries, errors);
        Ok((entries, rules))
    }

    /// The rules of one directory, from the ignore files its listing shows.
    fn rules(
        &self,
        dir: BorrowedFd<'_>,
        shown: &Path,
        entries: &[(OsString, Kind)],
        errors: &mut Vec<ignore::Error>,
    ) -> Rules {
        let kind_of = |name: &str| {
            entries
                .binary_search_by(|e| e.0.as_bytes().cmp(name.as_bytes()))
                .ok()
                .map(|i| entries[i].1)
        };
        let load = |errors: &mut Vec<ignore::Error>, name: &str| -> Gitignore {
            if kind_of(name).is_none() {
                return Gitignore::empty();
            }
            let file = open_regular(dir, Path::new(name)).map(|f| (f, shown.join(name)));
            build_gitignore(shown, file, errors)
        };
        let custom = load(errors, RG_IGNORE);
        let ignore = load(errors, ".ignore");
        let git = load(errors, ".gitignore");
        let dot_git = kind_of(".git");
        let exclude = match dot_git {
            Some(Kind::Dir) => {
                let file = open_regular(dir, Path::new(".git/info/exclude"))
                    .map(|f| (f, shown.join(".git/info/exclude")));
                build_gitignore(shown, file, errors)
            }
            Some(Kind::File) => build_gitignore(shown, self.worktree_exclude(dir, shown), errors),
            _ => Gitignore::empty(),
        };
        Rules {
            custom,
            ignore,
            git,
            exclude,
            has_git: dot_git.is_some() || kind_of(".jj").is_some(),
        }
    }

    /// A worktree's `.git` file names its git directory, whose `commondir`
    /// holds `info/exclude`; both are read only inside the workspace.
    /// A relative `gitdir` is taken from the `.git` file's directory, as git does.
    fn worktree_exclude(&self, dir: BorrowedFd<'_>, shown: &Path) -> Option<(File, PathBuf)> {
        let first_line = |file: File| -> Option<String> {
            let mut line = String::new();
            BufReader::new(file).read_line(&mut line).ok()?;
            Some(line.trim_end_matches(['\n', '\r']).to_string())
        };
        let gitdir = first_line(open_regular(dir, Path::new(".git"))?)?;
        let gitdir = shown.join(gitdir.strip_prefix("gitdir: ")?);
        let inside = |p: &Path| -> Option<PathBuf> {
            let normal =
                PathBuf::from(OsStr::from_bytes(&path::normpath(p.as_os_str().as_bytes())));
            normal
                .strip_prefix(self.workdir)
                .ok()
                .map(Path::to_path_buf)
        };
        let common = first_line(open_regular(
            self.workspace,
            &inside(&gitdir.join("commondir"))?,
        )?)?;
        let common = if common.starts_with('.') {
            gitdir.join(common)
        } else {
            PathBuf::from(common)
        };
        let exclude = common.join("info/exclude");
        Some((open_regular(self.workspace, &inside(&exclude)?)?, exclude))
    }
}

/// `ignore`'s `matched_ignore` for rg's options (`require_git`, no global or
/// explicit ignores): the innermost directory first; `.rgignore` over `.ignore`
/// over `.gitignore` over `info/exclude`; the git rules only in a repository,
/// and not above its root.
fn matched_ignore(chain: &[Rules], shown: &Path, is_dir: bool) -> Verdict {
    let any_git = chain.iter().any(|r| r.has_git);
    let (mut custom, mut ignore, mut git, mut exclude) =
        (Verdict::None, Verdict::None, Verdict::None, Verdict::None);
    let mut saw_git = false;
    for rules in chain.iter().rev() {
        if custom == Verdict::None {
            custom = verdict(rules.custom.matched(shown, is_dir));
        }
        if ignore == Verdict::None {
            ignore = verdict(rules.ignore.matched(shown, is_dir));
        }
        if any_git && !saw_git && git == Verdict::None {
            git = verdict(rules.git.matched(shown, is_dir));
        }
        if any_git && !saw_git && exclude == Verdict::None {
            exclude = verdict(rules.exclude.matched(shown, is_dir));
        }
        saw_git = saw_git || rules.has_git;
    }
    or(or(or(custom, ignore), git), exclude)
}

/// Opens `rel` beneath `base` for reading if it is a regular file; a symlink, a
/// FIFO or anything missing is `None`.
fn open_regular(base: BorrowedFd<'_>, rel: &Path) -> Option<File> {
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let fd = path::open_beneath(base, rel, flags, Mode::empty()).ok()?;
    let st = stat::fstat(&fd).ok()?;
    path::is_regular(&st).then(|| File::from(fd))
}

/// A gitignore matcher rooted at `dir` from one ignore file, as `ignore`'s
/// `GitignoreBuilder::add` reads it: line by line, a UTF-8 BOM dropped, a line
/// that is not UTF-8 ending the file. Glob errors are collected; I/O errors are
/// not (as `ignore` drops them).
fn build_gitignore(
    dir: &Path,
    file: Option<(File, PathBuf)>,
    errors: &mut Vec<ignore::Error>,
) -> Gitignore {
    let Some((file, at)) = file else {
        return Gitignore::empty();
    };
    let mut builder = GitignoreBuilder::new(dir);
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let Ok(line) = line else { break };
        let line = if i == 0 {
            line.trim_start_matches('\u{feff}')
        } else {
            &line
        };
        if let Err(err) = builder.add_line(Some(at.clone()), line) {
            errors.push(ignore::Error::WithPath {
                path: at.clone(),
                err: Box::new(ignore::Error::WithLineNumber {
                    line: i as u64 + 1,
                    err: Box::new(err),
                }),
            });
        }
    }
    match builder.build() {
        Ok(gitignore) => gitignore,
        Err(err) => {
            errors.push(err);
            Gitignore::empty()
        }
    }
}

/// rg's stderr line for an OS error on `path`.
pub fn os_error_text(path: &Path, errno: Errno) -> String {
    format!(
        "{}: {}\n",
        path.display(),
        io::Error::from_raw_os_error(errno as i32)
    )
}

/// rg's stderr line for a walk error: `<path>: <OS error>`. `ignore` wraps the OS
/// error in its own text (which names the path again); rg 13 printed only the OS part.
pub fn error_text(err: &ignore::Error) -> String {
    match err {
        ignore::Error::WithDepth { err, .. } => error_text(err),
        ignore::Error::WithPath { path, err } => match err.io_error().and_then(os_code) {
            Some(code) => format!(
                "{}: {}\n",
                path.display(),
                io::Error::from_raw_os_error(code)
            ),
            None => format!("{}: {err}\n", path.display()),
        },
        other => format!("{other}\n"),
    }
}

/// The OS error code at the bottom of a chain of wrapped errors.
fn os_code(err: &io::Error) -> Option<i32> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(code) = e
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return Some(code);
        }
        current = match e.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
            Some(inner) => Some(inner),
            None => e.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use ignore::overrides::OverrideBuilder;
    use ignore::types::TypesBuilder;
    use std::os::fd::AsFd;

    /// What `ignore`'s own walker, set up as grep set it up before, yields.
    fn reference(root: &Path, glob: Option<&str>, ty: Option<&str>) -> Vec<String> {
        let mut builder = ignore::WalkBuilder::new(root);
        builder
            .hidden(true)
            .parents(true)
            .ignore(true)
            .git_ignore(true)
            .git_exclude(true)
            .git_global(false)
            .require_git(true)
            .follow_links(false)
            .sort_by_file_name(|a, b| a.cmp(b));
        builder.add_custom_ignore_filename(".rgignore");
        let filters = filters(root, glob, ty);
        builder.overrides(filters.overrides).types(filters.types);
        builder
            .build()
            .filter_map(|e| match e {
                Err(err) => Some(format!("ERROR {}", error_text(&err))),
                Ok(e) => e
                    .file_type()?
                    .is_file()
                    .then(|| e.path().strip_prefix(root).unwrap().display().to_string()),
            })
            .collect()
    }

    fn filters(root: &Path, glob: Option<&str>, ty: Option<&str>) -> Filters {
        let overrides = match glob {
            Some(g) => {
                let mut b = OverrideBuilder::new(root);
                b.add(g).unwrap();
                b.build().unwrap()
            }
            None => Override::empty(),
        };
        let types = match ty {
            Some(t) => {
                let mut b = TypesBuilder::new();
                b.add_defaults();
                b.select(t);
                b.build().unwrap()
            }
            None => Types::empty(),
        };
        Filters { overrides, types }
    }

    /// What the anchored walk yields for `sub` below the workspace `ws`.
    fn anchored(ws: &Path, sub: &str, glob: Option<&str>, ty: Option<&str>) -> Vec<String> {
        let root_path = if sub.is_empty() {
            ws.to_path_buf()
        } else {
            ws.join(sub)
        };
        let filters = filters(&root_path, glob, ty);
        let workspace = path::open_root(ws).unwrap();
        let root = path::open_beneath(
            workspace.as_fd(),
            Path::new(sub),
            OFlag::O_PATH,
            Mode::empty(),
        )
        .unwrap();
        let walk = Walk {
            workspace: workspace.as_fd(),
            workdir: ws,
            root: root.as_fd(),
            root_rel: Path::new(sub),
            display: &root_path,
            filters: &filters,
        };
        let mut out = Vec::new();
        walk.run(&|| false, &mut |item| {
            match item {
                Item::File(rel) => out.push(rel.display().to_string()),
                Item::Error(e) => out.push(format!("ERROR {e}")),
            }
            true
        });
        out
    }

    fn put(root: &Path, rel: &str, data: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    #[test]
    fn the_anchored_walk_filters_exactly_as_ignores_walker() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().canonicalize().unwrap();
        for f in [
            "a.txt",
            "b.rs",
            "z.py",
            ".hidden",
            ".hdir/x.txt",
            "plain/c.txt",
            "plain/d.txt",
            "plain/e.txt",
            "plain/gi.txt",
            "plain/deep/f.log",
            "plain/deep/g.txt",
            "repo/.git/HEAD",
            "repo/a.txt",
            "repo/ig.txt",
            "repo/build/out.txt",
            "repo/keep.log",
            "repo/x.log",
            "repo/sub/y.log",
            "repo/sub/ok.txt",
            "repo/sub/.gitignore",
            "repo/nested/.git/HEAD",
            "repo/nested/n.log",
            "repo/nested/m.txt",
            "repo/excl.txt",
            "repo/.env",
            "jj/.jj/x",
            "jj/j.tmp",
            "jj/k.txt",
            "only-rg/r.txt",
            "only-rg/s.txt",
            "Cargo.toml",
            "src/main.rs",
            "src/lib.py",
        ] {
            put(&ws, f, "x\n");
        }
        put(&ws, "plain/.ignore", "d.txt\n");
        put(&ws, "plain/.rgignore", "e.txt\n!d.txt\n");
        put(&ws, "plain/.gitignore", "gi.txt\n");
        put(&ws, "plain/deep/.ignore", "*.log\n");
        put(
            &ws,
            "repo/.gitignore",
            "\u{feff}ig.txt\nbuild/\n*.log\n!keep.log\n!.env\n",
        );
        put(&ws, "repo/sub/.gitignore", "!y.log\n");
        put(&ws, "repo/nested/.gitignore", "m.txt\n");
        put(&ws, "repo/.git/info/exclude", "excl.txt\n");
        put(&ws, "jj/.gitignore", "*.tmp\n");
        put(&ws, "only-rg/.rgignore", "r.txt\n");
        put(&ws, ".ignore", "z.py\n");
        put(&ws, "bad/.ignore", "a[z-a]b\nq.txt\n");
        put(&ws, "bad/child/q.txt", "x\n");
        put(&ws, "bad/child/r.txt", "x\n");
        put(&ws, "bad/child/.gitignore", "{\n");
        let cases: &[(&str, Option<&str>, Option<&str>)] = &[
            ("", None, None),
            ("repo", None, None),
            ("repo/sub", None, None),
            ("plain/deep", None, None),
            ("", Some("*.txt"), None),
            ("", Some("!*.txt"), None),
            ("", Some(".*"), None),
            ("", None, Some("rust")),
            ("", None, Some("py")),
            ("repo", Some("*.log"), None),
            ("bad", None, None),
            ("bad/child", None, None),
        ];
        for (sub, glob, ty) in cases {
            let root = if sub.is_empty() {
                ws.clone()
            } else {
                ws.join(sub)
            };
            let want = reference(&root, *glob, *ty);
            assert!(!want.is_empty(), "{sub} {glob:?} {ty:?}");
            assert_eq!(
                anchored(&ws, sub, *glob, *ty),
                want,
                "{sub} {glob:?} {ty:?}"
            );
        }
        // A bad glob in a parent's ignore file is reported; in the root's, not.
        let below_bad = anchored(&ws, "bad/child", None, None);
        assert!(
            below_bad[0].starts_with("ERROR ") && below_bad[0].contains("bad/.ignore"),
            "{below_bad:?}"
        );
        assert!(!anchored(&ws, "bad", None, None)[0].starts_with("ERROR "));
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_is_skipped_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().canonicalize().unwrap();
        let outside = tempfile::tempdir().unwrap();
        put(outside.path(), "secret.txt", "s\n");
        put(&ws, "d/inside.txt", "x\n");
        put(&ws, "e.txt", "x\n");
        let filters = filters(&ws, None, None);
        let workspace = path::open_root(&ws).unwrap();
        let root = path::open_beneath(
            workspace.as_fd(),
            Path::new(""),
            OFlag::O_PATH,
            Mode::empty(),
        )
        .unwrap();
        let walk = Walk {
            workspace: workspace.as_fd(),
            workdir: &ws,
            root: root.as_fd(),
            root_rel: Path::new(""),
            display: &ws,
            filters: &filters,
        };
        let mut out = Vec::new();
        let swapped = std::cell::Cell::new(false);
        // The root is listed; `d` becomes a symlink before it is entered.
        let swap = || {
            if !swapped.replace(true) {
                std::fs::rename(ws.join("d"), ws.join("d.real")).unwrap();
                std::os::unix::fs::symlink(outside.path(), ws.join("d")).unwrap();
            }
            false
        };
        walk.run(&swap, &mut |item| {
            out.push(item);
            true
        });
        assert_eq!(out, [Item::File("e.txt".into())], "{out:?}");
        // A file swapped for a symlink is refused by the open the searchers use.
        let rel = Path::new("e.txt");
        std::fs::remove_file(ws.join(rel)).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.txt"), ws.join(rel)).unwrap();
        let opened = path::open_beneath(root.as_fd(), rel, OFlag::O_RDONLY, Mode::empty());
        assert_eq!(opened.err(), Some(Errno::ELOOP));
    }
}
