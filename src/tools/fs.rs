//! Dispatch of the five file tools inside the session helper.
//!
//! [`FsContext`] is what a file tool knows about its session: the canonical
//! workspace root as the sandbox sees it (`/workspace`), the caps from the policy,
//! and a cancellation flag the worker can raise. Every function here runs in the
//! confined helper; it never runs in the worker.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::errno::Errno;
use serde_json::Value;

use super::path::{fs_reason, PathError};
use super::{Tool, ToolResult};

/// Limits and roots of one session's file tools.
#[derive(Debug, Clone)]
pub struct FsContext {
    /// Canonical workspace root inside the sandbox (normally `/workspace`).
    pub workdir: PathBuf,
    /// Text cap for read (whole file) and edit; contract default 262144.
    pub max_file_bytes: u64,
    /// Cap on the base64 size of an image read; contract default 5 MiB.
    pub max_image_base64_bytes: u64,
    /// Cap on the raw size of a PDF read; contract default 20 MiB.
    pub max_pdf_bytes: u64,
    /// Output cap of grep, in characters; contract default 102400.
    pub output_limit: usize,
    /// Raised by the worker when the call is cancelled or timed out; long walks
    /// (glob, grep) check it and stop early.
    pub cancel: Arc<AtomicBool>,
}

impl FsContext {
    pub fn new(workdir: PathBuf) -> FsContext {
        FsContext {
            workdir,
            max_file_bytes: 262_144,
            max_image_base64_bytes: 5 * 1024 * 1024,
            max_pdf_bytes: 20 * 1024 * 1024,
            output_limit: 102_400,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// Run one file tool call. `input` is the raw `tool_use.input` JSON; validation
/// failures become the contract's `ValueError('Invalid arguments for function <name>')`.
///
/// A panic anywhere in a tool becomes an error result: the caller always gets a
/// result to send back (the helper's `ToolDone`), never a call that hangs.
pub fn run(tool: Tool, input: &Value, ctx: &FsContext) -> ToolResult {
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match tool {
        Tool::Read => super::read::run(input, ctx),
        Tool::Write => super::write::run(input, ctx),
        Tool::Edit => super::edit::run(input, ctx),
        Tool::Glob => super::glob::run(input, ctx),
        Tool::Grep => super::grep::run(input, ctx),
        Tool::Bash => ToolResult::err("bash is not a file tool"),
    }));
    ran.unwrap_or_else(|panic| {
        ToolResult::err(format!(
            "{}: internal error: {}",
            tool.name(),
            super::panic_text(&*panic)
        ))
    })
}

/// `<tool>: <fp>: <reason>`, the SDK's text for a failed file operation.
pub(crate) fn os_error(tool: &str, fp: &str, errno: Errno) -> ToolResult {
    ToolResult::err(format!("{tool}: {fp}: {}", fs_reason(errno)))
}

/// `<tool>: <path error>`, the SDK's text for a refused or unresolvable path.
pub(crate) fn path_error(tool: &str, fp: &str, err: PathError) -> ToolResult {
    ToolResult::err(format!("{tool}: {}", err.message(fp)))
}

/// The errno behind an I/O error (`EIO` when there is none).
pub(crate) fn errno_of(err: &std::io::Error) -> Errno {
    Errno::from_raw(err.raw_os_error().unwrap_or(libc::EIO))
}

/// Read at most `cap + 1` bytes: enough to see that a file grew past a cap checked on
/// its stat without ever holding more than the cap allows. `size` is the size
/// the stat gave: the buffer starts that large, so a file read whole takes two
/// reads (its bytes, then the end), not one per doubling from 32 bytes.
pub(crate) fn read_capped(
    file: &mut std::fs::File,
    cap: u64,
    size: u64,
) -> std::io::Result<Vec<u8>> {
    let hint = usize::try_from(size.min(cap).saturating_add(1)).unwrap_or(0);
    let mut data = Vec::with_capacity(hint);
    file.take(cap.saturating_add(1)).read_to_end(&mut data)?;
    Ok(data)
}

/// Shared helpers of the tools' unit tests (they run unconfined, on a temp dir).
#[cfg(test)]
pub(crate) mod testutil {
    use super::FsContext;
    use crate::tools::Tool;
    use serde_json::Value;

    /// A fresh canonical workspace and a context rooted in it.
    pub fn setup() -> (tempfile::TempDir, FsContext) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        (dir, FsContext::new(root))
    }

    /// One call, as (is_error, text).
    pub fn call(tool: Tool, ctx: &FsContext, input: Value) -> (bool, String) {
        let r = super::run(tool, &input, ctx);
        (r.is_error, r.text_content())
    }
}

#[cfg(test)]
mod tests {
    use super::read_capped;
    use std::io::Write;

    /// The stat's size is only where the buffer starts: a file that grew or
    /// shrank since is read as it is now, and never past the cap plus one.
    #[test]
    fn read_capped_reads_the_file_as_it_is_whatever_the_stat_said() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        for size in [0, 1, 4096, 10_000, 1 << 40] {
            let mut r = f.try_clone().unwrap();
            std::io::Seek::rewind(&mut r).unwrap();
            assert_eq!(
                read_capped(&mut r, 1 << 20, size).unwrap(),
                data,
                "size {size}"
            );
            std::io::Seek::rewind(&mut r).unwrap();
            let capped = read_capped(&mut r, 100, size).unwrap();
            assert_eq!(capped, data[..101], "size {size}");
        }
    }
}
