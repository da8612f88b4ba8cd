//! The grep tool: a regex search over a file or a tree, with the texts the SDK gives
//! when it runs `rg --no-config -n --no-heading -e PATTERN -- TARGET` (contract §6.7,
//! §13.12).
//!
//! hands has one engine, ripgrep's own crates in-process (`ignore`'s matchers for
//! the walk's filters, `grep-regex` for the matcher, `grep-searcher` for the
//! search), set up the way ripgrep 13 sets them up:
//!
//! - a directory target prints `<path>:<line>:<text>`, a file target `<line>:<text>`,
//!   each line ending with a newline as rg prints it;
//! - hidden files and directories are skipped; `.gitignore` applies inside a git
//!   repository, `.ignore` and `.rgignore` everywhere, parent directories' files too;
//!   symlinks are not followed while walking;
//! - a walked file stops at the first NUL byte (after a match rg adds its `WARNING:
//!   stopped searching binary file` line); a file target is searched as rg 13 does
//!   through its memory map (NUL looked for in the first 64 KiB and in matched
//!   lines) and prints `binary file matches (...)` once a match meets one;
//! - rg's failures become `grep: rg failed: <stderr>` with rg's stderr text: a regex
//!   error, a missing target, and any file or directory that could not be read (rg
//!   then exits 2 and the SDK drops the matches it printed);
//! - nothing found is `no matches`; output past the cap is cut to the cap and gets
//!   `\n[output truncated at <cap> bytes]`.
//!
//! Where hands differs: rg prints in whatever order its threads finish; hands prints
//! files in walk order (names sorted per directory). It stops searching once the cap
//! is passed, so memory stays bounded and errors in files after that point are not
//! seen. The user's global git excludes file is not read (the sandbox has no home).
//! A FIFO or device given as the target is not read ("no matches"), where rg would
//! block on it.
//!
//! Nothing is opened by name: the target is opened beneath the workspace through
//! no symlink, the walk ([`super::walk`]) lists each directory and reads each
//! ignore file through descriptors opened the same way, and each file is opened
//! beneath the walk's root with `RESOLVE_NO_SYMLINKS`. A directory or file swapped
//! for a symlink mid-walk is skipped, as rg skips symlinks, never followed. A panic
//! in the walker or a searcher becomes an error line (the call fails with it),
//! never a call that hangs.
//!
//! Speed: one thread walks in sorted order and hands batches of files to a few
//! searcher threads; the calling thread puts their results back in walk order.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};

use grep_regex::{RegexMatcher, RegexMatcherBuilder};
use grep_searcher::{
    BinaryDetection, MmapChoice, Searcher, SearcherBuilder, Sink, SinkContext, SinkMatch,
};
use ignore::overrides::{Override, OverrideBuilder};
use ignore::types::{Types, TypesBuilder};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use serde_json::Value;

use super::fs::{path_error, FsContext};
use super::input::{parse_grep, GrepInput, OutputMode};
use super::walk::{self, Item};
use super::{path, timed_out, ToolResult};

/// grep-regex's (and ripgrep's) compiled-size cap.
const REGEX_SIZE_LIMIT: usize = 100 * (1 << 20);
/// Files per unit of work handed to a searcher thread: the first batches are small
/// so that a small tree still spreads over all searchers, later ones large so that
/// a big tree costs few hand-overs (each one can wake a thread).
const FIRST_BATCH_FILES: usize = 8;
const MAX_BATCH_FILES: usize = 256;
/// Batches the walker may run ahead of the searchers. Generous, so that the walker
/// (a third of the work on a big tree) finishes early and never starves them; a
/// batch is a few KiB of paths.
const QUEUED_BATCHES: usize = 1024;
/// Most searcher threads used (ripgrep uses up to 12 on big machines).
const MAX_THREADS: usize = 8;
/// Largest file target searched from memory. rg 13 memory-maps a single file given
/// as the target, which changes binary detection: only the first 64 KiB and the
/// matched lines are checked for NUL, and a NUL stays a NUL (`\x00` can match).
/// Searching the bytes as one slice reproduces that; a larger target is streamed
/// (NUL then found wherever it is) to keep memory bounded without `mmap`.
const SLICE_MAX_BYTES: u64 = 32 * 1024 * 1024;

pub fn run(input: &Value, ctx: &FsContext) -> ToolResult {
    let input = match parse_grep(input) {
        Ok(input) => input,
        Err(invalid) => return invalid,
    };
    let given = input.path.as_deref().filter(|p| !p.is_empty());
    let resolve = || path::resolve_or_workdir(&ctx.workdir, given);
    let mut resolved = match resolve() {
        Ok(resolved) => resolved,
        Err(err) => return path_error("grep", given.unwrap_or_default(), err),
    };
    // The SDK passes the pattern as a process argument, which Python refuses.
    if input.pattern.contains('\0') {
        return ToolResult::err("ValueError('embedded null byte')");
    }
    let matcher = match build_matcher(&input) {
        Ok(matcher) => matcher,
        Err(message) => return rg_failed(&message),
    };
    let options = Options::new(&input, ctx);
    // Like rg, flag errors (an unknown type, a bad glob) before looking at the target.
    let filters = match filters(&input, &resolved.path) {
        Ok(filters) => filters,
        Err(message) => return rg_failed(&message),
    };
    let workspace = match path::open_root(&ctx.workdir) {
        Ok(fd) => fd,
        Err(errno) => {
            return rg_failed(walk::os_error_text(&ctx.workdir, errno).trim_end_matches('\n'))
        }
    };
    // The target, opened beneath the workspace through no symlink: the resolved
    // path has none, so meeting one means the tree changed since. Resolve once
    // more, then give the SDK's text for a path that cannot be settled.
    let mut raced = false;
    let target = loop {
        match open_target(workspace.as_fd(), &resolved.rel) {
            Ok(target) => break target,
            Err(Errno::ELOOP) if !raced => {
                raced = true;
                resolved = match resolve() {
                    Ok(resolved) => resolved,
                    Err(err) => return path_error("grep", given.unwrap_or_default(), err),
                };
            }
            Err(Errno::ELOOP) => {
                let err = path::PathError::Os(Errno::ELOOP);
                return path_error("grep", given.unwrap_or_default(), err);
            }
            Err(errno) => {
                return rg_failed(walk::os_error_text(&resolved.path, errno).trim_end_matches('\n'))
            }
        }
    };
    let outcome = match target {
        Target::Dir(root) => {
            let walk = walk::Walk {
                workspace: workspace.as_fd(),
                workdir: &ctx.workdir,
                root: root.as_fd(),
                root_rel: &resolved.rel,
                display: &resolved.path,
                filters: &filters,
            };
            search_tree(ctx, &options, &matcher, &walk)
        }
        Target::File => {
            let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
            match path::open_beneath(workspace.as_fd(), &resolved.rel, flags, Mode::empty()) {
                Ok(fd) => search_single(&options, &matcher, &resolved.path, File::from(fd)),
                Err(errno) => Outcome {
                    output: String::new(),
                    errors: vec![walk::os_error_text(&resolved.path, errno)],
                },
            }
        }
        Target::Other => Outcome::default(),
    };
    if ctx.cancelled() {
        return timed_out("grep");
    }
    finish(outcome, &options)
}

/// What the target is.
enum Target {
    /// A directory, held open (`O_PATH`) as the walk's root.
    Dir(OwnedFd),
    File,
    /// A FIFO, socket or device: not read ("no matches"), where rg would block.
    Other,
}

/// Looks at the target beneath the workspace, through no symlink (`ELOOP` if one
/// is met).
fn open_target(workspace: BorrowedFd<'_>, rel: &Path) -> Result<Target, Errno> {
    let fd = path::open_beneath(workspace, rel, OFlag::O_PATH, Mode::empty())?;
    let st = nix::sys::stat::fstat(&fd)?;
    Ok(if path::is_dir(&st) {
        Target::Dir(fd)
    } else if path::is_regular(&st) {
        Target::File
    } else {
        Target::Other
    })
}

fn rg_failed(stderr: &str) -> ToolResult {
    ToolResult::err(format!("grep: rg failed: {stderr}\n"))
}

/// Everything a search produced, in print order.
#[derive(Default)]
struct Outcome {
    output: String,
    /// rg's stderr lines for files and directories it could not read.
    errors: Vec<String>,
}

fn finish(outcome: Outcome, options: &Options) -> ToolResult {
    if !outcome.errors.is_empty() {
        return ToolResult::err(format!("grep: rg failed: {}", outcome.errors.concat()));
    }
    if outcome.output.is_empty() {
        return ToolResult::ok("no matches");
    }
    let mut out = outcome.output;
    if let Some(head) = options.head_limit {
        let keep: usize = out.split_inclusive('\n').take(head).map(str::len).sum();
        out.truncate(keep);
    }
    let limit = options.output_limit;
    if let Some((cut, _)) = out.char_indices().nth(limit) {
        out.truncate(cut);
        out.push_str(&format!("\n[output truncated at {limit} bytes]"));
    }
    ToolResult::ok(out)
}

/// The matcher as ripgrep 13 builds it; errors are rg's stderr text.
fn build_matcher(input: &GrepInput) -> Result<RegexMatcher, String> {
    let mut builder = RegexMatcherBuilder::new();
    builder
        .case_insensitive(input.case_insensitive)
        .multi_line(true)
        .unicode(true)
        .octal(false)
        .size_limit(REGEX_SIZE_LIMIT);
    if input.multiline {
        builder.dot_matches_new_line(true);
    } else {
        builder.line_terminator(Some(b'\n'));
    }
    builder.build(&input.pattern).map_err(|err| {
        if let grep_regex::ErrorKind::NotAllowed(literal) = err.kind() {
            return format!(
                "the literal '{literal:?}' is not allowed in a regex\n\nConsider enabling \
                 multiline mode with the --multiline flag (or -U for short).\nWhen multiline \
                 mode is enabled, new line characters can be matched."
            );
        }
        // grep-regex reports syntax errors against the pattern wrapped in `(?:…)`;
        // the regex crate reports them against the pattern as given, as rg 13 did.
        match regex::bytes::RegexBuilder::new(&input.pattern)
            .case_insensitive(input.case_insensitive)
            .multi_line(true)
            .dot_matches_new_line(input.multiline)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
        {
            Err(plain) => plain.to_string(),
            Ok(_) => err.to_string(),
        }
    })
}

/// The resolved search options.
struct Options {
    line_numbers: bool,
    before: usize,
    after: usize,
    multiline: bool,
    mode: OutputMode,
    head_limit: Option<usize>,
    output_limit: usize,
}

impl Options {
    fn new(input: &GrepInput, ctx: &FsContext) -> Options {
        let context = input.context.unwrap_or(0);
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Options {
            line_numbers: input.line_numbers,
            before: size(input.before.unwrap_or(context)),
            after: size(input.after.unwrap_or(context)),
            multiline: input.multiline,
            mode: input.output_mode,
            head_limit: input.head_limit.filter(|&n| n > 0).map(size),
            output_limit: ctx.output_limit,
        }
    }

    fn has_context(&self) -> bool {
        self.mode == OutputMode::Content && (self.before > 0 || self.after > 0)
    }

    /// A searcher for walked files (`explicit == false`: stop at the first NUL) or
    /// for the one file given as the target (keep going, report binary matches).
    fn searcher(&self, explicit: bool) -> Searcher {
        let binary = if explicit {
            BinaryDetection::convert(b'\0')
        } else {
            BinaryDetection::quit(b'\0')
        };
        let (before, after) = if self.mode == OutputMode::Content {
            (self.before, self.after)
        } else {
            (0, 0)
        };
        SearcherBuilder::new()
            .line_number(self.line_numbers)
            .multi_line(self.multiline)
            .before_context(before)
            .after_context(after)
            .binary_detection(binary)
            .memory_map(MmapChoice::never())
            .build()
    }
}

/// How much more output is still useful, read from what has been printed so far.
#[derive(Clone, Copy)]
struct Budget {
    chars: usize,
    lines: Option<usize>,
}

/// The output of one file, already decoded the way the SDK decodes rg's stdout.
struct FileOutput {
    text: String,
    error: Option<String>,
}

/// A `Sink` that prints one file's results in rg's standard format.
struct Printer<'a> {
    /// `<path>` before each line for a directory search; `None` for a file target.
    path: Option<&'a [u8]>,
    options: &'a Options,
    explicit: bool,
    budget: Budget,
    out: Vec<u8>,
    chars: usize,
    lines: usize,
    match_count: u64,
    binary_offset: Option<u64>,
}

impl<'a> Printer<'a> {
    fn new(path: Option<&'a [u8]>, options: &'a Options, explicit: bool, budget: Budget) -> Self {
        Printer {
            path,
            options,
            explicit,
            budget,
            out: Vec::new(),
            chars: 0,
            lines: 0,
            match_count: 0,
            binary_offset: None,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
        self.chars += lossy_char_count(bytes);
        self.lines += bytes.iter().filter(|&&b| b == b'\n').count();
    }

    /// True while more output from this file could still be shown.
    fn wants_more(&self) -> bool {
        self.chars <= self.budget.chars && self.budget.lines.is_none_or(|max| self.lines < max)
    }

    /// One printed line: `[path<sep>][number<sep>]text\n`.
    fn line(&mut self, sep: u8, number: Option<u64>, text: &[u8]) {
        let mut prelude = Vec::with_capacity(32);
        if let Some(path) = self.path {
            prelude.extend_from_slice(path);
            prelude.push(sep);
        }
        if let Some(n) = number.filter(|_| self.options.line_numbers) {
            prelude.extend_from_slice(n.to_string().as_bytes());
            prelude.push(sep);
        }
        self.push(&prelude);
        self.push(text);
        if !text.ends_with(b"\n") {
            self.push(b"\n");
        }
    }

    /// Summary modes print once per file, after the search.
    fn summary(&mut self) {
        // rg's summary printer drops a walked file once it turned out binary.
        if self.match_count == 0 || (!self.explicit && self.binary_offset.is_some()) {
            return;
        }
        match self.options.mode {
            OutputMode::Content => {}
            OutputMode::FilesWithMatches => {
                let path = self.path.unwrap_or_default().to_vec();
                self.push(&path);
                self.push(b"\n");
            }
            OutputMode::Count => {
                let mut line = Vec::new();
                if let Some(path) = self.path {
                    line.extend_from_slice(path);
                    line.push(b':');
                }
                line.extend_from_slice(self.match_count.to_string().as_bytes());
                line.push(b'\n');
                self.push(&line);
            }
        }
    }

    fn binary_message(&mut self) {
        let Some(offset) = self.binary_offset else {
            return;
        };
        if self.match_count == 0 || self.options.mode != OutputMode::Content {
            return;
        }
        let mut line = Vec::new();
        if let Some(path) = self.path {
            line.extend_from_slice(path);
            line.extend_from_slice(b": ");
        }
        let text = if self.explicit {
            format!("binary file matches (found \"\\0\" byte around offset {offset})\n")
        } else {
            format!(
                "WARNING: stopped searching binary file after match (found \"\\0\" byte \
                 around offset {offset})\n"
            )
        };
        line.extend_from_slice(text.as_bytes());
        self.push(&line);
    }
}

impl Sink for Printer<'_> {
    type Error = io::Error;

    fn matched(&mut self, _searcher: &Searcher, mat: &SinkMatch<'_>) -> Result<bool, io::Error> {
        self.match_count += 1;
        // Like rg: once an explicit file showed binary data, a match ends the search
        // and only the binary notice is printed.
        if self.explicit && self.binary_offset.is_some() {
            return Ok(false);
        }
        match self.options.mode {
            OutputMode::FilesWithMatches => return Ok(false),
            OutputMode::Count => return Ok(true),
            OutputMode::Content => {}
        }
        let first = mat.line_number();
        for (i, line) in mat.lines().enumerate() {
            self.line(b':', first.map(|n| n + i as u64), line);
        }
        Ok(self.wants_more())
    }

    fn context(&mut self, _searcher: &Searcher, ctx: &SinkContext<'_>) -> Result<bool, io::Error> {
        if self.explicit && self.binary_offset.is_some() {
            return Ok(false);
        }
        self.line(b'-', ctx.line_number(), ctx.bytes());
        Ok(self.wants_more())
    }

    fn context_break(&mut self, _searcher: &Searcher) -> Result<bool, io::Error> {
        self.push(b"--\n");
        Ok(self.wants_more())
    }

    fn binary_data(&mut self, _searcher: &Searcher, offset: u64) -> Result<bool, io::Error> {
        self.binary_offset.get_or_insert(offset);
        Ok(true)
    }
}

/// Characters of `bytes` once decoded with replacement (one U+FFFD per bad run, as
/// Python's `errors="replace"` and Rust's lossy decoding agree on).
fn lossy_char_count(bytes: &[u8]) -> usize {
    bytes
        .utf8_chunks()
        .map(|c| c.valid().chars().count() + usize::from(!c.invalid().is_empty()))
        .sum()
}

/// Search one open file; `display` is the path printed before each line (walks only).
fn search_file(
    searcher: &mut Searcher,
    matcher: &RegexMatcher,
    options: &Options,
    mut file: File,
    shown: &Path,
    display: Option<&[u8]>,
    budget: Budget,
) -> FileOutput {
    let explicit = display.is_none();
    let failed = |err: io::Error| FileOutput {
        text: String::new(),
        error: Some(format!("{}: {err}\n", shown.display())),
    };
    let mut printer = Printer::new(display, options, explicit, budget);
    let len = file.metadata().map_or(u64::MAX, |m| m.len());
    let small = explicit && len <= SLICE_MAX_BYTES;
    let searched = if small {
        match super::fs::read_capped(&mut file, SLICE_MAX_BYTES, len) {
            Ok(bytes) => searcher.search_slice(matcher, &bytes, &mut printer),
            Err(err) => Err(err),
        }
    } else {
        searcher.search_file(matcher, &file, &mut printer)
    };
    if let Err(err) = searched {
        return failed(err);
    }
    // The searcher calls `finish` only on success; the notices follow the lines.
    printer.binary_message();
    printer.summary();
    FileOutput {
        text: String::from_utf8_lossy(&printer.out).into_owned(),
        error: None,
    }
}

fn search_single(options: &Options, matcher: &RegexMatcher, target: &Path, file: File) -> Outcome {
    let mut searcher = options.searcher(true);
    let budget = Budget {
        chars: options.output_limit,
        lines: options.head_limit,
    };
    // A file target prints no path, except as the whole line of `-l`.
    let mut result = search_file(&mut searcher, matcher, options, file, target, None, budget);
    if options.mode == OutputMode::FilesWithMatches && !result.text.is_empty() {
        result.text = format!(
            "{}\n",
            String::from_utf8_lossy(target.as_os_str().as_bytes())
        );
    }
    Outcome {
        output: result.text,
        errors: result.error.into_iter().collect(),
    }
}

struct Batch {
    seq: usize,
    items: Vec<Item>,
}

/// The state the printing thread shares with the walker and searchers.
struct Shared<'a> {
    ctx: &'a FsContext,
    options: &'a Options,
    matcher: &'a RegexMatcher,
    /// The walk's root (files are opened beneath it) and its printed path.
    root: BorrowedFd<'a>,
    display: &'a Path,
    /// Raised when no more output is useful (cap reached) or the call is cancelled.
    stop: AtomicBool,
    /// Characters and lines already printed: each file's budget derives from them.
    printed_chars: AtomicUsize,
    printed_lines: AtomicUsize,
}

impl Shared<'_> {
    fn stopped(&self) -> bool {
        if self.ctx.cancelled() {
            self.stop.store(true, Ordering::Relaxed);
        }
        self.stop.load(Ordering::Relaxed)
    }

    fn budget(&self) -> Budget {
        let printed = self.printed_chars.load(Ordering::Relaxed);
        let lines = self.printed_lines.load(Ordering::Relaxed);
        Budget {
            chars: self.options.output_limit.saturating_sub(printed),
            lines: self.options.head_limit.map(|max| max.saturating_sub(lines)),
        }
    }
}

/// grep's `glob` and `type` inputs, built as rg builds them.
fn filters(input: &GrepInput, root: &Path) -> Result<walk::Filters, String> {
    let overrides = match input.glob.as_deref() {
        Some(glob) => {
            let mut overrides = OverrideBuilder::new(root);
            overrides.add(glob).map_err(|err| err.to_string())?;
            overrides.build().map_err(|err| err.to_string())?
        }
        None => Override::empty(),
    };
    let types = match input.file_type.as_deref() {
        Some(name) => {
            let mut types = TypesBuilder::new();
            types.add_defaults();
            types.select(name);
            types.build().map_err(|err| err.to_string())?
        }
        None => Types::empty(),
    };
    Ok(walk::Filters { overrides, types })
}

fn search_tree(
    ctx: &FsContext,
    options: &Options,
    matcher: &RegexMatcher,
    walk: &walk::Walk<'_>,
) -> Outcome {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_THREADS);
    let shared = Shared {
        ctx,
        options,
        matcher,
        root: walk.root,
        display: walk.display,
        stop: AtomicBool::new(false),
        printed_chars: AtomicUsize::new(0),
        printed_lines: AtomicUsize::new(0),
    };
    let (batch_tx, batch_rx) = mpsc::sync_channel::<Batch>(QUEUED_BATCHES);
    let batch_rx = Mutex::new(batch_rx);
    let (done_tx, done_rx) = mpsc::channel::<(usize, Vec<FileOutput>)>();

    std::thread::scope(|scope| {
        let shared = &shared;
        scope.spawn(move || walk_in_batches(shared, walk, &batch_tx));
        for _ in 0..threads {
            let done_tx = done_tx.clone();
            let batch_rx = &batch_rx;
            scope.spawn(move || search_batches(shared, batch_rx, &done_tx));
        }
        drop(done_tx);
        collect(shared, &done_rx)
    })
}

/// The walker thread: sorted walk, files and errors in batches. A panic in the
/// walk ends it with an error line (the call then fails), never a hung call.
fn walk_in_batches(shared: &Shared<'_>, walk: &walk::Walk<'_>, batches: &mpsc::SyncSender<Batch>) {
    let mut seq = 0;
    let mut batch_size = FIRST_BATCH_FILES;
    let mut items = Vec::with_capacity(batch_size);
    let walked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        walk.run(&|| shared.stopped(), &mut |item| {
            #[cfg(test)]
            tests::maybe_panic(&item);
            items.push(item);
            if items.len() >= batch_size {
                batch_size = (batch_size * 2).min(MAX_BATCH_FILES);
                let batch = Batch {
                    seq,
                    items: std::mem::replace(&mut items, Vec::with_capacity(batch_size)),
                };
                if batches.send(batch).is_err() {
                    return false;
                }
                seq += 1;
            }
            true
        });
    }));
    if let Err(panic) = walked {
        items.push(Item::Error(format!(
            "{}: internal error while walking: {}\n",
            walk.display.display(),
            super::panic_text(&*panic)
        )));
    }
    if !items.is_empty() {
        let _ = batches.send(Batch { seq, items });
    }
}

/// A searcher thread: takes batches until the walker is done, discarding them once
/// the search stopped (so a walker blocked on a full queue can always finish).
fn search_batches(
    shared: &Shared<'_>,
    batches: &Mutex<mpsc::Receiver<Batch>>,
    done: &mpsc::Sender<(usize, Vec<FileOutput>)>,
) {
    let mut searcher = shared.options.searcher(false);
    loop {
        // A searcher that panicked must not stop the others from draining the
        // queue, or the walker would block on it forever.
        let next = batches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .recv();
        let Ok(batch) = next else { return };
        let mut outputs = Vec::with_capacity(batch.items.len());
        for item in batch.items {
            if shared.stopped() {
                break;
            }
            outputs.push(match item {
                Item::Error(message) => FileOutput {
                    text: String::new(),
                    error: Some(message),
                },
                Item::File(rel) => match search_walked(shared, &mut searcher, &rel) {
                    Some(output) => output,
                    None => continue,
                },
            });
        }
        if done.send((batch.seq, outputs)).is_err() {
            return;
        }
    }
}

/// Opens and searches one walked file beneath the walk's root, through no
/// symlink. `None`: the file became a symlink since it was listed, and is
/// skipped as one. A panic becomes this file's error line.
fn search_walked(shared: &Shared<'_>, searcher: &mut Searcher, rel: &Path) -> Option<FileOutput> {
    let shown = shared.display.join(rel);
    let searched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
        let file = match path::open_beneath(shared.root, rel, flags, Mode::empty()) {
            Ok(fd) => File::from(fd),
            Err(Errno::ELOOP) => return None,
            Err(errno) => {
                return Some(FileOutput {
                    text: String::new(),
                    error: Some(walk::os_error_text(&shown, errno)),
                })
            }
        };
        let display = shown.as_os_str().as_bytes();
        Some(search_file(
            searcher,
            shared.matcher,
            shared.options,
            file,
            &shown,
            Some(display),
            shared.budget(),
        ))
    }));
    searched.unwrap_or_else(|panic| {
        Some(FileOutput {
            text: String::new(),
            error: Some(format!(
                "{}: internal error while searching: {}\n",
                shown.display(),
                super::panic_text(&*panic)
            )),
        })
    })
}

/// The calling thread: puts batches back in walk order and stops everything once
/// the output cap or the line limit is reached.
fn collect(shared: &Shared<'_>, done: &mpsc::Receiver<(usize, Vec<FileOutput>)>) -> Outcome {
    let options = shared.options;
    let mut outcome = Outcome::default();
    let mut pending: BTreeMap<usize, Vec<FileOutput>> = BTreeMap::new();
    let mut next = 0;
    let (mut chars, mut lines) = (0usize, 0usize);
    for (seq, outputs) in done.iter() {
        pending.insert(seq, outputs);
        while let Some(outputs) = pending.remove(&next) {
            next += 1;
            if shared.stopped() {
                continue;
            }
            for file in outputs {
                if let Some(error) = file.error {
                    outcome.errors.push(error);
                }
                if file.text.is_empty() {
                    continue;
                }
                // rg separates the context groups of different files as well.
                if options.has_context() && !outcome.output.is_empty() {
                    outcome.output.push_str("--\n");
                    chars += 3;
                    lines += 1;
                }
                chars += file.text.chars().count();
                lines += file.text.matches('\n').count();
                outcome.output.push_str(&file.text);
                shared.printed_chars.store(chars, Ordering::Relaxed);
                shared.printed_lines.store(lines, Ordering::Relaxed);
                let full = chars > options.output_limit
                    || options.head_limit.is_some_and(|max| lines >= max);
                if full {
                    shared.stop.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::Tool;
    use serde_json::json;
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;

    use crate::tools::fs::testutil::setup;

    fn put(ctx: &FsContext, rel: &str, data: impl AsRef<[u8]>) {
        let p = ctx.workdir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(p, data).expect("write");
    }

    fn grep(ctx: &FsContext, input: Value) -> (bool, String) {
        crate::tools::fs::testutil::call(Tool::Grep, ctx, input)
    }

    /// The output with the workspace path replaced by `W`.
    fn grep_w(ctx: &FsContext, input: Value) -> (bool, String) {
        let (e, t) = grep(ctx, input);
        (e, t.replace(&*ctx.workdir.to_string_lossy(), "W"))
    }

    #[test]
    fn directory_and_single_file_shapes() {
        let (_g, ctx) = setup();
        put(&ctx, "a.txt", "hello\nworld\nfoo\nfoo\n");
        put(&ctx, "sub/b.txt", "foo bar");
        put(&ctx, "crlf.txt", "foo\r\nx\r\n");
        assert_eq!(
            grep_w(&ctx, json!({"pattern": "foo"})),
            (
                false,
                "W/a.txt:3:foo\nW/a.txt:4:foo\nW/crlf.txt:1:foo\r\nW/sub/b.txt:1:foo bar\n".into()
            )
        );
        assert_eq!(
            grep(&ctx, json!({"pattern": "foo", "path": "a.txt"})),
            (false, "3:foo\n4:foo\n".into())
        );
        assert_eq!(
            grep_w(&ctx, json!({"pattern": "bar", "path": "sub"})),
            (false, "W/sub/b.txt:1:foo bar\n".into())
        );
        assert_eq!(
            grep(&ctx, json!({"pattern": "nothing"})),
            (false, "no matches".into())
        );
        assert!(!grep(&ctx, json!({"pattern": "foo", "path": ""})).0);
        assert!(!grep(&ctx, json!({"pattern": "foo", "path": null})).0);
        assert_eq!(
            grep(&ctx, json!({"pattern": "^$", "path": "a.txt"})),
            (false, "no matches".into())
        );
    }

    #[test]
    fn hidden_ignored_binary_and_links_are_skipped() {
        let (_g, ctx) = setup();
        put(&ctx, ".hidden", "foo");
        put(&ctx, ".hid/x.txt", "foo");
        put(&ctx, "plain/c.txt", "foo");
        put(&ctx, "plain/d.txt", "foo");
        put(&ctx, "plain/.ignore", "d.txt\n");
        put(&ctx, "plain/e.txt", "foo");
        put(&ctx, "plain/.rgignore", "e.txt\n");
        put(&ctx, "plain/gi.txt", "foo");
        put(&ctx, "plain/.gitignore", "gi.txt\n");
        put(&ctx, "repo/.git/HEAD", "ref: x");
        put(&ctx, "repo/a.txt", "foo");
        put(&ctx, "repo/ig.txt", "foo");
        put(&ctx, "repo/.gitignore", "ig.txt\n");
        put(&ctx, "bin.dat", b"foo\n\0bar foo\n");
        put(&ctx, "bom.txt", b"\xef\xbb\xbffoo bom\n");
        symlink(
            ctx.workdir.join("plain/c.txt"),
            ctx.workdir.join("link.txt"),
        )
        .expect("symlink");
        symlink(ctx.workdir.join("plain"), ctx.workdir.join("linkdir")).expect("symlink");
        let (err, text) = grep_w(&ctx, json!({"pattern": "foo"}));
        assert!(!err);
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort();
        assert_eq!(
            lines,
            [
                "W/bom.txt:1:foo bom",
                "W/plain/c.txt:1:foo",
                "W/plain/gi.txt:1:foo",
                "W/repo/a.txt:1:foo"
            ]
        );
        // Explicit targets are searched regardless of the filters.
        assert_eq!(
            grep(&ctx, json!({"pattern": "foo", "path": ".hidden"})),
            (false, "1:foo\n".into())
        );
        assert_eq!(
            grep(&ctx, json!({"pattern": "foo", "path": "repo/ig.txt"})),
            (false, "1:foo\n".into())
        );
        assert_eq!(
            grep(&ctx, json!({"pattern": "foo", "path": "bin.dat"})),
            (
                false,
                "binary file matches (found \"\\0\" byte around offset 4)\n".into()
            )
        );
        assert_eq!(
            grep_w(&ctx, json!({"pattern": "foo", "path": ".hid"})),
            (false, "W/.hid/x.txt:1:foo\n".into())
        );
    }

    #[test]
    fn binary_after_a_match_in_a_later_buffer() {
        let (_g, ctx) = setup();
        let mut data = b"foo first\n".to_vec();
        data.extend(std::iter::repeat_n(b'x', 200_000));
        data.extend_from_slice(b"\n\0 foo after\n");
        put(&ctx, "d/big.dat", &data);
        assert_eq!(
            grep_w(&ctx, json!({"pattern": "foo", "path": "d"})),
            (false, "W/d/big.dat:1:foo first\nW/d/big.dat: WARNING: stopped searching binary file after match (found \"\\0\" byte around offset 200011)\n".into())
        );
        assert_eq!(
            grep(&ctx, json!({"pattern": "foo", "path": "d/big.dat"})),
            (
                false,
                "1:foo first\nbinary file matches (found \"\\0\" byte around offset 200011)\n"
                    .into()
            )
        );
    }

    #[test]
    fn errors_are_rg_failures() {
        let (_g, ctx) = setup();
        put(&ctx, "f.txt", "x");
        symlink("/etc", ctx.workdir.join("etclink")).expect("symlink");
        let w = ctx.workdir.display().to_string();
        assert_eq!(
            grep(&ctx, json!({"pattern": "x", "path": "nonexist"})),
            (
                true,
                format!("grep: rg failed: {w}/nonexist: No such file or directory (os error 2)\n")
            )
        );
        assert_eq!(
            grep(&ctx, json!({"pattern": "(", "path": "f.txt"})),
            (
                true,
                "grep: rg failed: regex parse error:\n    (\n    ^\nerror: unclosed group\n".into()
            )
        );
        assert_eq!(
            grep(&ctx, json!({"pattern": "["})),
            (true, "grep: rg failed: regex parse error:\n    [\n    ^\nerror: unclosed character class\n".into())
        );
        assert_eq!(
            grep(&ctx, json!({"pattern": "a\\nb"})),
            (true, "grep: rg failed: the literal '\"\\n\"' is not allowed in a regex\n\nConsider enabling multiline mode with the --multiline flag (or -U for short).\nWhen multiline mode is enabled, new line characters can be matched.\n".into())
        );
        assert_eq!(
            grep(&ctx, json!({"pattern": "a{1000}{1000}{1000}"})),
            (
                true,
                "grep: rg failed: Compiled regex exceeds size limit of 104857600 bytes.\n".into()
            )
        );
        assert_eq!(
            grep(&ctx, json!({"pattern": "a\u{0}b"})),
            (true, "ValueError('embedded null byte')".into())
        );
        assert_eq!(
            grep(&ctx, json!({"pattern": "x", "path": "etclink"})),
            (
                true,
                "grep: path 'etclink' is outside the session's working directory".into()
            )
        );
        assert_eq!(
            grep(&ctx, json!({"pattern": "x", "type": "nosuchtype"})),
            (
                true,
                "grep: rg failed: unrecognized file type: nosuchtype\n".into()
            )
        );
    }

    #[test]
    fn truncation_at_the_cap() {
        let (_g, mut ctx) = setup();
        ctx.output_limit = 100;
        let mut text = String::new();
        for i in 0..50 {
            text.push_str(&format!("match line {i}\n"));
        }
        put(&ctx, "many.txt", &text);
        let (err, out) = grep(&ctx, json!({"pattern": "match", "path": "many.txt"}));
        assert!(!err);
        let full: String = text
            .lines()
            .enumerate()
            .map(|(i, l)| format!("{}:{l}\n", i + 1))
            .collect();
        let want: String =
            full.chars().take(100).collect::<String>() + "\n[output truncated at 100 bytes]";
        assert_eq!(out, want);
        // Across many files in a tree the cut is the same shape.
        for i in 0..40 {
            put(&ctx, &format!("t/f{i:02}.txt"), "match\n");
        }
        let (_, out) = grep(&ctx, json!({"pattern": "match", "path": "t"}));
        assert!(out.ends_with("\n[output truncated at 100 bytes]"));
        assert_eq!(
            out.chars().count(),
            100 + "\n[output truncated at 100 bytes]".len()
        );
    }

    #[test]
    fn extensions() {
        let (_g, ctx) = setup();
        put(&ctx, "src/a.rs", "fn Foo() {}\nlet x = 1;\n");
        put(&ctx, "src/b.py", "foo = 1\n");
        put(&ctx, "ctx.txt", "1\nfoo\n3\n4\n5\n6\nfoo\n8\n");
        let g = |v: Value| grep_w(&ctx, v);
        assert_eq!(
            g(json!({"pattern": "foo", "-i": true, "type": "rust"})),
            (false, "W/src/a.rs:1:fn Foo() {}\n".into())
        );
        assert_eq!(
            g(json!({"pattern": "foo", "glob": "*.py"})),
            (false, "W/src/b.py:1:foo = 1\n".into())
        );
        assert_eq!(
            g(json!({"pattern": "foo", "path": "ctx.txt", "-C": 1})),
            (false, "1-1\n2:foo\n3-3\n--\n6-6\n7:foo\n8-8\n".into())
        );
        assert_eq!(
            g(json!({"pattern": "foo", "path": "ctx.txt", "-A": 1, "-n": false})),
            (false, "foo\n3\n--\nfoo\n8\n".into())
        );
        assert_eq!(
            g(json!({"pattern": "foo", "output_mode": "count"})),
            (false, "W/ctx.txt:2\nW/src/b.py:1\n".into())
        );
        assert_eq!(
            g(json!({"pattern": "foo", "path": "ctx.txt", "output_mode": "count"})),
            (false, "2\n".into())
        );
        assert_eq!(
            g(json!({"pattern": "foo", "output_mode": "files_with_matches"})),
            (false, "W/ctx.txt\nW/src/b.py\n".into())
        );
        assert_eq!(
            g(json!({"pattern": "foo", "path": "ctx.txt", "output_mode": "files_with_matches"})),
            (false, "W/ctx.txt\n".into())
        );
        assert_eq!(
            g(json!({"pattern": "foo", "head_limit": 1})),
            (false, "W/ctx.txt:2:foo\n".into())
        );
        assert_eq!(
            g(json!({"pattern": "foo\\n3", "path": "ctx.txt", "multiline": true})),
            (false, "2:foo\n3:3\n".into())
        );
        assert_eq!(
            g(json!({"pattern": "x", "-o": true})).1,
            "ValueError('Invalid arguments for function grep')"
        );
    }

    #[test]
    fn walk_errors_read_like_rg() {
        // The walker's I/O error wraps the OS error in a text naming the path again.
        let wrapped = io::Error::other(io::Error::from_raw_os_error(13));
        let err = ignore::Error::WithDepth {
            depth: 1,
            err: Box::new(ignore::Error::WithPath {
                path: PathBuf::from("/w/locked"),
                err: Box::new(ignore::Error::Io(wrapped)),
            }),
        };
        assert_eq!(
            walk::error_text(&err),
            "/w/locked: Permission denied (os error 13)\n"
        );
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let (_g, ctx) = setup();
        put(&ctx, "inv.txt", b"foo\xff\xfe bad\n");
        assert_eq!(
            grep(&ctx, json!({"pattern": "foo", "path": "inv.txt"})),
            (false, "1:foo\u{fffd}\u{fffd} bad\n".into())
        );
    }

    static PANIC_NAME: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

    /// The walker's test hook: panics on the item named in [`PANIC_NAME`].
    pub(super) fn maybe_panic(item: &Item) {
        let name = PANIC_NAME.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let (Some(name), Item::File(rel)) = (name, item) {
            if rel.ends_with(&name) {
                panic!("test panic at {name}");
            }
        }
    }

    #[test]
    fn a_panic_in_the_walker_is_an_error_result_not_a_hang() {
        let (_g, ctx) = setup();
        put(&ctx, "a.txt", "foo\n");
        put(&ctx, "walker-panics-here.txt", "foo\n");
        *PANIC_NAME.lock().unwrap() = Some("walker-panics-here.txt".into());
        let (err, text) = grep_w(&ctx, json!({"pattern": "foo"}));
        *PANIC_NAME.lock().unwrap() = None;
        assert!(err, "{text}");
        assert!(
            text.starts_with("grep: rg failed: W: internal error while walking: test panic at walker-panics-here.txt"),
            "{text}"
        );
    }

    #[test]
    fn cancellation_returns_the_timeout_text() {
        let (_g, ctx) = setup();
        put(&ctx, "a.txt", "foo\n");
        ctx.cancel.store(true, Ordering::Relaxed);
        assert_eq!(
            grep(&ctx, json!({"pattern": "foo"})),
            (true, "tool 'grep' timed out".into())
        );
    }
}
