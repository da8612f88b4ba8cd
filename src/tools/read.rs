//! The read tool: a file's text, a line range of it, or an image/PDF as a base64 block
//! (contract §6.3).
//!
//! The order of checks is the SDK's: resolve the path, validate `view_range` (before
//! touching the file, §13.13), stat, refuse non-regular files, pick image/PDF handling
//! by extension alone, then apply the size cap. hands stats through the opened
//! descriptor rather than by name; the open never blocks (`O_NONBLOCK`), so a FIFO is
//! refused as "not a regular file" instead of hanging the call.

use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use base64::Engine;
use nix::errno::Errno;
use serde_json::Value;

use super::fs::{errno_of, os_error, path_error, read_capped, FsContext};
use super::input::parse_read;
use super::path::{self, is_regular, Raced, Resolved};
use super::{Base64Source, ContentBlock, ToolResult};

/// Chunk size of the streaming range read, as in the SDK.
const STREAM_CHUNK_BYTES: usize = 64 * 1024;

/// The SDK's default text cap. An explicitly configured cap also binds image/PDF
/// reads; hands' policy always carries a value, so only a value other than the
/// default counts as explicit (an explicit 262144 is the one case that differs).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 256 * 1024;

pub fn run(input: &Value, ctx: &FsContext) -> ToolResult {
    let input = match parse_read(input) {
        Ok(input) => input,
        Err(invalid) => return invalid,
    };
    let fp = input.file_path.as_str();
    // An empty list means "the whole file".
    let view_range = input.view_range.as_deref().filter(|v| !v.is_empty());
    match path::retry_on_race(&ctx.workdir, fp, |resolved| {
        read_resolved(ctx, fp, resolved, view_range)
    }) {
        Ok(result) => result,
        Err(err) => path_error("read", fp, err),
    }
}

fn read_resolved(
    ctx: &FsContext,
    fp: &str,
    resolved: &Resolved,
    view_range: Option<&[i64]>,
) -> Result<ToolResult, Raced> {
    let range = match view_range {
        None => None,
        Some(&[start, end]) => Some((start, end)),
        Some(_) => {
            return Ok(ToolResult::err(
                "read: view_range must be [start_line, end_line]",
            ))
        }
    };
    let located = match path::locate(&ctx.workdir, resolved) {
        Ok(located) => located,
        Err(Errno::ELOOP) => return Err(Raced),
        Err(errno) => return Ok(os_error("read", fp, errno)),
    };
    let probe = match path::probe(&located) {
        Ok(probe) => probe,
        Err(Errno::ELOOP) => return Err(Raced),
        Err(errno) => return Ok(os_error("read", fp, errno)),
    };
    if !is_regular(&probe.stat) {
        return Ok(ToolResult::err(format!("read: {fp}: not a regular file")));
    }
    let size = u64::try_from(probe.stat.st_size).unwrap_or(0);

    if let Some(media_type) = media_type(&resolved.path) {
        if range.is_some() {
            return Ok(ToolResult::err(
                "read: view_range is not supported for image/PDF files",
            ));
        }
        return Ok(read_binary(ctx, fp, probe.file, size, media_type));
    }

    let cap = ctx.max_file_bytes;
    if size > cap {
        let Some((start_line, end_line)) = range else {
            return Ok(ToolResult::err(format!(
                "read: {fp} is {size} bytes, exceeds {cap}-byte limit. Use the view_range \
                 parameter to read specific line ranges, e.g. view_range: [1, 500]."
            )));
        };
        let mut collector = LineRange::new(fp, start_line, end_line, cap);
        // The SDK answers an empty range before it opens the file.
        if collector.is_empty() {
            return Ok(ToolResult::ok(""));
        }
        let mut file = match probe.file {
            Ok(file) => file,
            Err(errno) => return Ok(os_error("read", fp, errno)),
        };
        return Ok(match collector.collect_file(&mut file, ctx) {
            Ok(text) => ToolResult::ok(text),
            Err(RangeError::Result(result)) => result,
            Err(RangeError::Io(errno)) => os_error("read", fp, errno),
        });
    }

    let mut file = match probe.file {
        Ok(file) => file,
        Err(errno) => return Ok(os_error("read", fp, errno)),
    };
    let bytes = match read_capped(&mut file, cap, size) {
        Ok(bytes) => bytes,
        Err(err) => return Ok(os_error("read", fp, errno_of(&err))),
    };
    if bytes.len() as u64 > cap {
        // The file grew past the cap after the stat; report it like the stat would.
        let now = current_size(&file, bytes.len());
        return Ok(ToolResult::err(format!(
            "read: {fp} is {now} bytes, exceeds {cap}-byte limit. Use the view_range \
             parameter to read specific line ranges, e.g. view_range: [1, 500]."
        )));
    }
    let Ok(text) = String::from_utf8(bytes) else {
        return Ok(not_utf8(fp));
    };
    let Some((start_line, end_line)) = range else {
        return Ok(ToolResult::ok(text));
    };
    Ok(ToolResult::ok(slice_lines(&text, start_line, end_line)))
}

/// The size of an open file now, for a file that grew while it was read.
fn current_size(file: &File, read: usize) -> u64 {
    nix::sys::stat::fstat(file).map_or(read as u64, |st| u64::try_from(st.st_size).unwrap_or(0))
}

fn not_utf8(fp: &str) -> ToolResult {
    ToolResult::err(format!(
        "read: {fp}: not valid UTF-8 text (binary files are only supported for image/PDF \
         extensions)"
    ))
}

/// Python's `"\n".join(text.split("\n")[start:end])` with the SDK's bounds.
fn slice_lines(text: &str, start_line: i64, end_line: i64) -> String {
    let lines: Vec<&str> = text.split('\n').collect();
    let start = usize::try_from(start_line.saturating_sub(1).max(0)).unwrap_or(usize::MAX);
    let end = if end_line > 0 {
        usize::try_from(end_line).unwrap_or(usize::MAX)
    } else {
        lines.len()
    };
    let end = end.min(lines.len());
    if start >= end {
        return String::new();
    }
    lines[start..end].join("\n")
}

/// The media type the SDK picks by (case-insensitive) extension; the content is never
/// sniffed.
fn media_type(path: &Path) -> Option<&'static str> {
    let name = path::py_fsdecode(path.file_name()?.as_bytes());
    // Python's `Path.suffix`: from the last dot, unless the name starts with it or
    // ends with it.
    let dot = name.rfind('.')?;
    if dot == 0 || dot + 1 == name.len() {
        return None;
    }
    match name[dot..].to_lowercase().as_str() {
        ".png" => Some("image/png"),
        ".jpg" | ".jpeg" => Some("image/jpeg"),
        ".gif" => Some("image/gif"),
        ".webp" => Some("image/webp"),
        ".pdf" => Some("application/pdf"),
        _ => None,
    }
}

fn read_binary(
    ctx: &FsContext,
    fp: &str,
    file: Result<File, Errno>,
    size: u64,
    media_type: &str,
) -> ToolResult {
    let is_pdf = media_type == "application/pdf";
    let mut limit = if is_pdf {
        ctx.max_pdf_bytes
    } else {
        // The image cap is on the base64 form: 4 characters per 3 bytes.
        ctx.max_image_base64_bytes / 4 * 3
    };
    if ctx.max_file_bytes != DEFAULT_MAX_FILE_BYTES {
        limit = limit.min(ctx.max_file_bytes);
    }
    if size > limit {
        return ToolResult::err(format!(
            "read: {fp} is {size} bytes, exceeds {limit}-byte limit for image/PDF files."
        ));
    }
    let mut file = match file {
        Ok(file) => file,
        Err(errno) => return os_error("read", fp, errno),
    };
    let bytes = match read_capped(&mut file, limit, size) {
        Ok(bytes) => bytes,
        Err(err) => return os_error("read", fp, errno_of(&err)),
    };
    if bytes.len() as u64 > limit {
        let now = current_size(&file, bytes.len());
        return ToolResult::err(format!(
            "read: {fp} is {now} bytes, exceeds {limit}-byte limit for image/PDF files."
        ));
    }
    let source = Base64Source {
        kind: "base64".into(),
        media_type: media_type.into(),
        data: base64::engine::general_purpose::STANDARD.encode(&bytes),
    };
    ToolResult::block(if is_pdf {
        ContentBlock::Document { source }
    } else {
        ContentBlock::Image { source }
    })
}

enum RangeError {
    Result(ToolResult),
    Io(Errno),
}

/// The SDK's `LineRangeCollector`: gathers lines `[start_line, end_line]` from a
/// stream, failing as soon as the gathered bytes pass the cap.
struct LineRange<'a> {
    fp: &'a str,
    start_line: i64,
    end_line: i64,
    /// 0-based first line, and one past the last (Python's `sys.maxsize` for "to the
    /// end", which matters for the one-line test below).
    start: u64,
    end: u64,
    limit: u64,
    line: u64,
    collected: Vec<u8>,
}

impl<'a> LineRange<'a> {
    fn new(fp: &'a str, start_line: i64, end_line: i64, limit: u64) -> LineRange<'a> {
        let start = u64::try_from(start_line.saturating_sub(1).max(0)).unwrap_or(0);
        let end = if end_line > 0 {
            u64::try_from(end_line).unwrap_or(0)
        } else {
            i64::MAX as u64
        };
        LineRange {
            fp,
            start_line,
            end_line,
            start,
            end,
            limit,
            line: 0,
            collected: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    fn is_collected(&self) -> bool {
        self.line >= self.end
    }

    fn collect_file(&mut self, file: &mut File, ctx: &FsContext) -> Result<String, RangeError> {
        let mut chunk = vec![0u8; STREAM_CHUNK_BYTES];
        loop {
            // A range near the end of a huge file reads all of it; stay cancellable.
            if ctx.cancelled() {
                return Err(RangeError::Result(super::timed_out("read")));
            }
            let n = match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(RangeError::Io(errno_of(&err))),
            };
            self.collect_from(&chunk[..n])?;
            if self.is_collected() {
                break;
            }
        }
        String::from_utf8(std::mem::take(&mut self.collected))
            .map_err(|_| RangeError::Result(not_utf8(self.fp)))
    }

    fn collect_from(&mut self, chunk: &[u8]) -> Result<(), RangeError> {
        let mut line_start = 0;
        while line_start < chunk.len() && !self.is_collected() {
            let newline = chunk[line_start..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| line_start + i);
            let line_end = newline.unwrap_or(chunk.len());
            if self.line >= self.start {
                self.collect(&chunk[line_start..line_end], newline.is_some())?;
            }
            let Some(newline) = newline else { break };
            self.line += 1;
            line_start = newline + 1;
        }
        Ok(())
    }

    fn collect(&mut self, bytes: &[u8], newline_terminated: bool) -> Result<(), RangeError> {
        self.collected.extend_from_slice(bytes);
        if newline_terminated && self.line + 1 < self.end {
            self.collected.push(b'\n');
        }
        if self.collected.len() as u64 > self.limit {
            return Err(RangeError::Result(self.over_limit()));
        }
        Ok(())
    }

    fn over_limit(&self) -> ToolResult {
        let (fp, limit) = (self.fp, self.limit);
        if self.end - self.start == 1 {
            ToolResult::err(format!(
                "read: line {} of {fp} alone exceeds {limit}-byte limit. The read tool cannot \
                 return part of a line, so view_range cannot narrow this further.",
                self.start + 1
            ))
        } else {
            ToolResult::err(format!(
                "read: view_range [{}, {}] of {fp} exceeds {limit}-byte limit. Narrow the \
                 view_range to read a smaller portion.",
                self.start_line, self.end_line
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::{fs, Tool};
    use serde_json::json;
    use std::os::unix::fs::symlink;

    use crate::tools::fs::testutil::setup;

    fn read(ctx: &FsContext, input: Value) -> (bool, String) {
        crate::tools::fs::testutil::call(Tool::Read, ctx, input)
    }

    fn put(ctx: &FsContext, rel: &str, data: impl AsRef<[u8]>) {
        let p = ctx.workdir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(p, data).expect("write");
    }

    #[test]
    fn whole_file_and_ranges() {
        let (_g, ctx) = setup();
        put(&ctx, "a.txt", "hello\nworld\nfoo\nfoo\n");
        let r = |v: Value| read(&ctx, json!({"file_path": "a.txt", "view_range": v}));
        assert_eq!(
            read(&ctx, json!({"file_path": "a.txt"})),
            (false, "hello\nworld\nfoo\nfoo\n".into())
        );
        assert_eq!(r(json!([2, 3])), (false, "world\nfoo".into()));
        assert_eq!(r(json!([2, 0])), (false, "world\nfoo\nfoo\n".into()));
        assert_eq!(r(json!(["2", "3"])), (false, "world\nfoo".into()));
        assert_eq!(r(json!([-5, 1])), (false, "hello".into()));
        assert_eq!(r(json!([3, 2])), (false, "(no output)".into()));
        assert_eq!(r(json!([9, 12])), (false, "(no output)".into()));
        assert_eq!(r(json!([4, 99])), (false, "foo\n".into()));
        assert_eq!(r(json!([])), (false, "hello\nworld\nfoo\nfoo\n".into()));
        assert_eq!(r(json!(null)), (false, "hello\nworld\nfoo\nfoo\n".into()));
        for bad in [json!([1]), json!([1, 2, 3])] {
            assert_eq!(
                r(bad),
                (
                    true,
                    "read: view_range must be [start_line, end_line]".into()
                )
            );
        }
        // Validated before the file is touched.
        assert_eq!(
            read(&ctx, json!({"file_path": "missing", "view_range": [1]})),
            (
                true,
                "read: view_range must be [start_line, end_line]".into()
            )
        );
        put(&ctx, "empty", "");
        assert_eq!(
            read(&ctx, json!({"file_path": "empty"})),
            (false, "(no output)".into())
        );
    }

    #[test]
    fn errors() {
        let (_g, ctx) = setup();
        put(&ctx, "f.txt", "x");
        std::fs::create_dir(ctx.workdir.join("sub")).expect("mkdir");
        symlink("/etc", ctx.workdir.join("etclink")).expect("symlink");
        symlink("nowhere", ctx.workdir.join("dangling")).expect("symlink");
        symlink("loop2", ctx.workdir.join("loop1")).expect("symlink");
        symlink("loop1", ctx.workdir.join("loop2")).expect("symlink");
        nix::unistd::mkfifo(
            &ctx.workdir.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .expect("mkfifo");
        let cases = [
            ("sub", "read: sub: not a regular file"),
            ("", "read: : not a regular file"),
            ("fifo", "read: fifo: not a regular file"),
            ("f.txt/x", "read: f.txt/x: not a directory"),
            ("dangling", "read: dangling: no such file or directory"),
            ("nope", "read: nope: no such file or directory"),
            (
                "etclink/passwd",
                "read: path 'etclink/passwd' is outside the session's working directory",
            ),
            (
                "/etc/passwd",
                "read: path '/etc/passwd' is outside the session's working directory",
            ),
            (
                "../x'y",
                "read: path \"../x'y\" is outside the session's working directory",
            ),
            (
                "loop1",
                "read: path 'loop1': too many levels of symbolic links",
            ),
            ("a\u{0}b", "read: embedded null byte"),
        ];
        for (fp, want) in cases {
            assert_eq!(
                read(&ctx, json!({"file_path": fp})),
                (true, want.into()),
                "{fp:?}"
            );
        }
        let abs = ctx.workdir.join("f.txt");
        assert_eq!(read(&ctx, json!({"file_path": abs})), (false, "x".into()));
        assert_eq!(
            read(&ctx, json!({"file_path": "f.txt", "x": 1})),
            (
                true,
                "ValueError('Invalid arguments for function read')".into()
            )
        );
    }

    #[test]
    fn binary_text_is_refused() {
        let (_g, ctx) = setup();
        put(&ctx, "bin", b"\xff\xfe\x00");
        assert_eq!(
            read(&ctx, json!({"file_path": "bin"})),
            (true, "read: bin: not valid UTF-8 text (binary files are only supported for image/PDF extensions)".into())
        );
    }

    #[test]
    fn caps_and_streamed_ranges() {
        let (_g, mut ctx) = setup();
        ctx.max_file_bytes = 16;
        put(&ctx, "big", "line1\nline2\nline3\nline4\nline5\n");
        let r = |v: Value| read(&ctx, json!({"file_path": "big", "view_range": v}));
        assert_eq!(
            read(&ctx, json!({"file_path": "big"})),
            (true, "read: big is 30 bytes, exceeds 16-byte limit. Use the view_range parameter to read specific line ranges, e.g. view_range: [1, 500].".into())
        );
        assert_eq!(r(json!([2, 3])), (false, "line2\nline3".into()));
        assert_eq!(r(json!([4, 0])), (false, "line4\nline5\n".into()));
        assert_eq!(r(json!([5, 2])), (false, "(no output)".into()));
        assert_eq!(
            r(json!([1, 4])),
            (true, "read: view_range [1, 4] of big exceeds 16-byte limit. Narrow the view_range to read a smaller portion.".into())
        );
        assert_eq!(
            r(json!([0, -1])),
            (true, "read: view_range [0, -1] of big exceeds 16-byte limit. Narrow the view_range to read a smaller portion.".into())
        );
        put(&ctx, "long", format!("a\n{}\nb\n", "x".repeat(40)));
        assert_eq!(
            read(&ctx, json!({"file_path": "long", "view_range": [2, 2]})),
            (true, "read: line 2 of long alone exceeds 16-byte limit. The read tool cannot return part of a line, so view_range cannot narrow this further.".into())
        );
        assert_eq!(
            read(&ctx, json!({"file_path": "long", "view_range": [3, 3]})),
            (false, "b".into())
        );
        put(
            &ctx,
            "badutf",
            b"ok\n\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\n",
        );
        assert_eq!(
            read(&ctx, json!({"file_path": "badutf", "view_range": [1, 1]})),
            (false, "ok".into())
        );
        assert!(
            read(&ctx, json!({"file_path": "badutf", "view_range": [2, 2]}))
                .1
                .contains("not valid UTF-8")
        );
    }

    #[test]
    fn range_reads_across_chunk_boundaries() {
        let (_g, mut ctx) = setup();
        ctx.max_file_bytes = 1000;
        // Lines straddle the 64 KiB chunk edges.
        let mut text = String::new();
        for i in 0..20_000 {
            text.push_str(&format!("line {i}\n"));
        }
        put(&ctx, "many", &text);
        let want = slice_lines(&text, 10_000, 10_050);
        assert_eq!(
            read(
                &ctx,
                json!({"file_path": "many", "view_range": [10_000, 10_050]})
            ),
            (false, want)
        );
    }

    #[test]
    fn images_and_pdfs_by_extension() {
        let (_g, mut ctx) = setup();
        put(&ctx, "photo.JPG", "not really a jpeg");
        let r = fs::run(Tool::Read, &json!({"file_path": "photo.JPG"}), &ctx);
        assert!(!r.is_error);
        assert_eq!(
            r.content,
            vec![ContentBlock::Image {
                source: Base64Source {
                    kind: "base64".into(),
                    media_type: "image/jpeg".into(),
                    data: "bm90IHJlYWxseSBhIGpwZWc=".into(),
                }
            }]
        );
        put(&ctx, "doc.pdf", "%PDF");
        let r = fs::run(Tool::Read, &json!({"file_path": "doc.pdf"}), &ctx);
        assert!(
            matches!(&r.content[..], [ContentBlock::Document { source }] if source.media_type == "application/pdf")
        );
        assert_eq!(
            read(&ctx, json!({"file_path": "doc.pdf", "view_range": [1, 2]})),
            (
                true,
                "read: view_range is not supported for image/PDF files".into()
            )
        );
        // A hidden file named `.png` has no suffix, so it is text.
        put(&ctx, ".png", "text");
        assert_eq!(
            read(&ctx, json!({"file_path": ".png"})),
            (false, "text".into())
        );

        ctx.max_image_base64_bytes = 8; // 6 raw bytes
        put(&ctx, "a.png", "1234567");
        assert_eq!(
            read(&ctx, json!({"file_path": "a.png"})),
            (
                true,
                "read: a.png is 7 bytes, exceeds 6-byte limit for image/PDF files.".into()
            )
        );
        ctx.max_pdf_bytes = 3;
        assert_eq!(
            read(&ctx, json!({"file_path": "doc.pdf"})),
            (
                true,
                "read: doc.pdf is 4 bytes, exceeds 3-byte limit for image/PDF files.".into()
            )
        );
        // The default text cap does not bind images; an explicit one does.
        ctx.max_image_base64_bytes = 5 * 1024 * 1024;
        put(&ctx, "big.gif", vec![0u8; 300_000]);
        assert!(!fs::run(Tool::Read, &json!({"file_path": "big.gif"}), &ctx).is_error);
        ctx.max_file_bytes = 1000;
        assert_eq!(
            read(&ctx, json!({"file_path": "big.gif"})),
            (
                true,
                "read: big.gif is 300000 bytes, exceeds 1000-byte limit for image/PDF files."
                    .into()
            )
        );
    }

    #[test]
    fn symlinks_inside_are_followed() {
        let (_g, ctx) = setup();
        put(&ctx, "sub/t.txt", "through");
        symlink("sub", ctx.workdir.join("sublink")).expect("symlink");
        assert_eq!(
            read(&ctx, json!({"file_path": "sublink/t.txt"})),
            (false, "through".into())
        );
        assert_eq!(
            read(&ctx, json!({"file_path": "sub/../sub/./t.txt"})),
            (false, "through".into())
        );
    }
}
