//! The command line as a user meets it: `hands exec`, `hands tool`,
//! `hands doctor`, `hands policy check`.

use std::process::Command;

use crate::require_sandbox;
use crate::util::*;

fn hands(args: &[&str]) -> std::process::Output {
    Command::new(hands_bin())
        .args(args)
        .output()
        .expect("run hands")
}

#[test]
fn exec_streams_output_and_exits_with_the_commands_status() {
    require_sandbox!();
    let out = hands(&[
        "exec",
        "--env",
        "default",
        "--",
        "/bin/sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
}

#[test]
fn exec_relays_stdin() {
    require_sandbox!();
    use std::io::Write;
    let mut child = Command::new(hands_bin())
        .args(["exec", "--", "/usr/bin/tr", "a-z", "A-Z"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO\n");
}

#[test]
fn exec_timeout_kills_the_tree_and_exits_124() {
    require_sandbox!();
    let out = hands(&[
        "exec",
        "--timeout",
        "0.5",
        "--",
        "/bin/sh",
        "-c",
        "sleep 100 & sleep 100",
    ]);
    assert_eq!(out.status.code(), Some(124), "{out:?}");
}

#[test]
fn exec_uses_the_given_workspace() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.txt"), "from host\n").unwrap();
    // An operator's directory, owned by an unprivileged user.
    std::os::unix::fs::chown(dir.path(), Some(4242), Some(4242)).unwrap();
    let ws = dir.path().to_str().unwrap();
    let out = hands(&[
        "exec",
        "--workspace",
        ws,
        "--",
        "/bin/sh",
        "-c",
        "cat in.txt; echo made > out.txt",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from host\n");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out.txt")).unwrap(),
        "made\n"
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir.path().join("out.txt")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (4242, 4242),
        "owned by the workspace's owner"
    );
}

#[test]
fn exec_unknown_environment_is_a_clear_error() {
    let out = hands(&["exec", "--env", "no-such-env", "--", "/bin/true"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-env"), "{err}");
}

#[test]
fn tool_prints_the_result_as_json() {
    require_sandbox!();
    let out = hands(&[
        "tool",
        "--env",
        "default",
        "bash",
        r#"{"command":"echo hi"}"#,
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"content": [{"type": "text", "text": "hi"}], "is_error": false})
    );
    let out = hands(&["tool", "read", r#"{"file_path":"nope.txt"}"#]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["is_error"], true);
    let out = hands(&["tool", "read", "{not json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));
}

#[test]
fn doctor_reports_every_feature_and_passes_here() {
    require_sandbox!();
    let out = hands(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for f in [
        "landlock",
        "seccomp",
        "cgroups",
        "pid namespace",
        "network namespace",
        "session probe",
    ] {
        assert!(text.contains(f), "doctor omits {f}: {text}");
    }
    assert_eq!(out.status.code(), Some(0), "{text}");
}

#[test]
fn policy_check_accepts_shipped_policies_and_rejects_bad_ones() {
    let root = env!("CARGO_MANIFEST_DIR");
    let shipped: Vec<String> = std::fs::read_dir(format!("{root}/policies"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    let mut args = vec!["policy", "check"];
    args.extend(shipped.iter().map(String::as_str));
    let out = hands(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(format!("{root}/policies/default.toml")).unwrap();
    std::fs::write(
        &bad,
        text.replace("[limits]", "[limits]\nmemroy = \"1GiB\""),
    )
    .unwrap();
    let out = hands(&["policy", "check", bad.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("bad.toml") && all.contains("memroy"), "{all}");
}
