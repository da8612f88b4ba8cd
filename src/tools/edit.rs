//! The edit tool: exact string replacement in an existing UTF-8 file (contract §6.5).
//!
//! Counting follows Python's `str.count`: non-overlapping, in characters, and an empty
//! `old_string` occurs `len + 1` times (§13.10). Edit never creates a file; through a
//! dangling symlink it reports `no such file or directory` (§13.7). The result is
//! written back with the atomic replace of [`super::write`] (the SDK rewrites in
//! place), keeping the file's permission bits.

use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::sys::stat::Mode;
use serde_json::Value;

use super::fs::{errno_of, os_error, path_error, read_capped, FsContext};
use super::input::{parse_edit, EditInput};
use super::path::{self, is_regular, Raced, Resolved};
use super::write::replace_file;
use super::ToolResult;

pub fn run(input: &Value, ctx: &FsContext) -> ToolResult {
    let input = match parse_edit(input) {
        Ok(input) => input,
        Err(invalid) => return invalid,
    };
    let fp = input.file_path.as_str();
    match path::retry_on_race(&ctx.workdir, fp, |resolved| {
        edit_resolved(ctx, resolved, &input)
    }) {
        Ok(result) => result,
        Err(err) => path_error("edit", fp, err),
    }
}

fn edit_resolved(
    ctx: &FsContext,
    resolved: &Resolved,
    input: &EditInput,
) -> Result<ToolResult, Raced> {
    let fp = input.file_path.as_str();
    let located = match path::locate(&ctx.workdir, resolved) {
        Ok(located) => located,
        Err(Errno::ELOOP) => return Err(Raced),
        Err(errno) => return Ok(os_error("edit", fp, errno)),
    };
    let probe = match path::probe(&located) {
        Ok(probe) => probe,
        Err(Errno::ELOOP) => return Err(Raced),
        Err(errno) => return Ok(os_error("edit", fp, errno)),
    };
    if !is_regular(&probe.stat) {
        return Ok(ToolResult::err(format!("edit: {fp}: not a regular file")));
    }
    let cap = ctx.max_file_bytes;
    let size = u64::try_from(probe.stat.st_size).unwrap_or(0);
    let too_large = |size: u64| {
        ToolResult::err(format!(
            "edit: {fp} is {size} bytes, exceeds {cap}-byte limit. The edit tool loads the \
             whole file and cannot modify a file this large."
        ))
    };
    if size > cap {
        return Ok(too_large(size));
    }
    let mut file = match probe.file {
        Ok(file) => file,
        Err(errno) => return Ok(os_error("edit", fp, errno)),
    };
    let bytes = match read_capped(&mut file, cap, size) {
        Ok(bytes) => bytes,
        Err(err) => return Ok(os_error("edit", fp, errno_of(&err))),
    };
    if bytes.len() as u64 > cap {
        let now = nix::sys::stat::fstat(&file).map_or(bytes.len() as u64, |st| {
            u64::try_from(st.st_size).unwrap_or(0)
        });
        return Ok(too_large(now));
    }
    let Ok(text) = String::from_utf8(bytes) else {
        return Ok(ToolResult::err(format!(
            "edit: {fp}: not valid UTF-8 text (cannot edit binary files)"
        )));
    };

    let (old, new) = (input.old_string.as_str(), input.new_string.as_str());
    let count = if old.is_empty() {
        text.chars().count() + 1
    } else {
        text.matches(old).count()
    };
    if count == 0 {
        return Ok(ToolResult::err(format!(
            "edit: old_string not found in {fp}"
        )));
    }
    let replace_all = input.replace_all.unwrap_or(false);
    if !replace_all && count > 1 {
        return Ok(ToolResult::err(format!(
            "edit: old_string appears {count} times in {fp} (must be unique)"
        )));
    }
    let updated = if replace_all {
        text.replace(old, new)
    } else {
        text.replacen(old, new, 1)
    };
    let mode = Mode::from_bits_truncate(probe.stat.st_mode & super::write::KEPT_MODE);
    if let Err(errno) = replace_file(
        located.dir.as_fd(),
        &located.name,
        updated.as_bytes(),
        Some(mode),
    ) {
        return Ok(os_error("edit", fp, errno));
    }
    let replaced = if replace_all { count } else { 1 };
    Ok(ToolResult::ok(format!(
        "edited {fp} ({replaced} replacement(s))"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::Tool;
    use serde_json::json;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    use crate::tools::fs::testutil::setup;

    fn edit(ctx: &FsContext, input: Value) -> (bool, String) {
        crate::tools::fs::testutil::call(Tool::Edit, ctx, input)
    }

    fn content(ctx: &FsContext, rel: &str) -> String {
        std::fs::read_to_string(ctx.workdir.join(rel)).expect("read")
    }

    #[test]
    fn replaces_unique_and_all() {
        let (_g, ctx) = setup();
        std::fs::write(ctx.workdir.join("a"), "one two two").expect("write");
        assert_eq!(
            edit(
                &ctx,
                json!({"file_path": "a", "old_string": "one", "new_string": "1"})
            ),
            (false, "edited a (1 replacement(s))".into())
        );
        assert_eq!(content(&ctx, "a"), "1 two two");
        assert_eq!(
            edit(
                &ctx,
                json!({"file_path": "a", "old_string": "two", "new_string": "2"})
            ),
            (
                true,
                "edit: old_string appears 2 times in a (must be unique)".into()
            )
        );
        assert_eq!(
            edit(
                &ctx,
                json!({"file_path": "a", "old_string": "two", "new_string": "2",
                "replace_all": true})
            ),
            (false, "edited a (2 replacement(s))".into())
        );
        assert_eq!(content(&ctx, "a"), "1 2 2");
        assert_eq!(
            edit(
                &ctx,
                json!({"file_path": "a", "old_string": "zzz", "new_string": ""})
            ),
            (true, "edit: old_string not found in a".into())
        );
        // Non-overlapping counting, as Python's str.count.
        std::fs::write(ctx.workdir.join("o"), "aaaa").expect("write");
        assert_eq!(
            edit(
                &ctx,
                json!({"file_path": "o", "old_string": "aa", "new_string": "b"})
            ),
            (
                true,
                "edit: old_string appears 2 times in o (must be unique)".into()
            )
        );
    }

    #[test]
    fn empty_old_string_counts_characters_plus_one() {
        let (_g, ctx) = setup();
        std::fs::write(ctx.workdir.join("h"), "héllo").expect("write");
        assert_eq!(
            edit(
                &ctx,
                json!({"file_path": "h", "old_string": "", "new_string": "X"})
            ),
            (
                true,
                "edit: old_string appears 6 times in h (must be unique)".into()
            )
        );
        assert_eq!(
            edit(
                &ctx,
                json!({"file_path": "h", "old_string": "", "new_string": "X",
                "replace_all": "yes"})
            ),
            (false, "edited h (6 replacement(s))".into())
        );
        assert_eq!(content(&ctx, "h"), "XhXéXlXlXoX");
        std::fs::write(ctx.workdir.join("e"), "").expect("write");
        assert_eq!(
            edit(
                &ctx,
                json!({"file_path": "e", "old_string": "", "new_string": "new"})
            ),
            (false, "edited e (1 replacement(s))".into())
        );
        assert_eq!(content(&ctx, "e"), "new");
    }

    #[test]
    fn errors() {
        let (_g, mut ctx) = setup();
        std::fs::create_dir(ctx.workdir.join("dir")).expect("mkdir");
        std::fs::write(ctx.workdir.join("bin"), b"\xff\x00").expect("write");
        std::fs::write(ctx.workdir.join("big"), "0123456789").expect("write");
        symlink("nowhere", ctx.workdir.join("dangling")).expect("symlink");
        symlink("/etc/passwd", ctx.workdir.join("passwd")).expect("symlink");
        let e = |fp: &str| {
            edit(
                &ctx,
                json!({"file_path": fp, "old_string": "a", "new_string": "b"}),
            )
        };
        assert_eq!(e("dir"), (true, "edit: dir: not a regular file".into()));
        assert_eq!(e(""), (true, "edit: : not a regular file".into()));
        assert_eq!(
            e("missing"),
            (true, "edit: missing: no such file or directory".into())
        );
        assert_eq!(
            e("dangling"),
            (true, "edit: dangling: no such file or directory".into())
        );
        assert_eq!(
            e("passwd"),
            (
                true,
                "edit: path 'passwd' is outside the session's working directory".into()
            )
        );
        assert_eq!(
            e("bin"),
            (
                true,
                "edit: bin: not valid UTF-8 text (cannot edit binary files)".into()
            )
        );
        ctx.max_file_bytes = 5;
        assert_eq!(
            edit(&ctx, json!({"file_path": "big", "old_string": "1", "new_string": "x"})),
            (true, "edit: big is 10 bytes, exceeds 5-byte limit. The edit tool loads the whole file and cannot modify a file this large.".into())
        );
        assert!(!ctx.workdir.join("nowhere").exists());
        assert_eq!(
            edit(&ctx, json!({"file_path": "big", "old_string": "1"})).1,
            "ValueError('Invalid arguments for function edit')"
        );
    }

    #[test]
    fn keeps_mode_and_writes_atomically() {
        let (_g, ctx) = setup();
        let p = ctx.workdir.join("run.sh");
        std::fs::write(&p, "echo old").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let before = std::fs::metadata(&p).expect("meta").ino();
        assert!(
            !edit(
                &ctx,
                json!({"file_path": "run.sh", "old_string": "old", "new_string": "new"})
            )
            .0
        );
        let meta = std::fs::metadata(&p).expect("meta");
        assert_eq!(meta.mode() & 0o7777, 0o700);
        // A new inode: the old content was replaced, never rewritten in place.
        assert_ne!(meta.ino(), before);
        assert_eq!(content(&ctx, "run.sh"), "echo new");
    }

    #[test]
    fn edits_through_a_symlink_inside() {
        let (_g, ctx) = setup();
        std::fs::create_dir(ctx.workdir.join("real")).expect("mkdir");
        std::fs::write(ctx.workdir.join("real/f"), "abc").expect("write");
        symlink("real/f", ctx.workdir.join("link")).expect("symlink");
        assert_eq!(
            edit(
                &ctx,
                json!({"file_path": "link", "old_string": "b", "new_string": "B"})
            ),
            (false, "edited link (1 replacement(s))".into())
        );
        assert_eq!(content(&ctx, "real/f"), "aBc");
        assert!(std::fs::symlink_metadata(ctx.workdir.join("link"))
            .expect("lstat")
            .file_type()
            .is_symlink());
    }
}
