//! The MCP face as MCP clients meet it: `hands mcp` over stdio driven by the
//! official MCP Python SDK (`tests/mcp/client.py`, an independent client), and
//! by raw JSON-RPC lines for what a well-behaved client never sends.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::require_sandbox;
use crate::util::*;

fn python_mcp_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import mcp, anyio"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the MCP Python SDK (pip install mcp) is required under CI=true");
        }
        eprintln!("SKIP: the MCP Python SDK is not installed");
    }
    ok
}

/// Runs a scenario of `tests/mcp/client.py` against `hands mcp` over stdio
/// and returns its report.
fn scenario(name: &str, args: &[&str]) -> Value {
    scenario_at(hands_bin(), &[], name, args)
}

/// Runs a scenario of `tests/mcp/client.py` against `target` (the hands
/// binary, or a base URL of MCP endpoints) with `env` (`MCP_TOKEN`, …).
fn scenario_at(target: &str, env: &[(&str, &str)], name: &str, args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/client.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(name)
        .arg(target)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run the MCP client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client.py {name}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// A marker no other test's processes carry: a number of seconds to sleep,
/// five digits, distinct per test (`which`) and per run of the suite. Tests
/// run in parallel and count the host's processes by it, so no two may share
/// one (nor may one be a prefix of another's: all are five digits).
fn marker(which: u32) -> String {
    (40_000 + (std::process::id() % 10_000) * 4 + which).to_string()
}

fn text(r: &Value) -> &str {
    r["text"].as_str().unwrap_or_default()
}

fn ok(r: &Value) -> bool {
    r["is_error"] == false
}

#[test]
fn mcp_sdk_lists_the_six_tools_with_the_toolsets_schemas() {
    require_sandbox!();
    if !python_mcp_available() {
        return;
    }
    let r = scenario("tools", &[]);
    assert_eq!(r["server"], "hands");
    assert!(
        r["instructions"]
            .as_str()
            .is_some_and(|i| i.contains("\"default\" environment")),
        "{r}"
    );
    let defs: Vec<Value> =
        serde_json::from_str(include_str!("../../src/tools/definitions.json")).unwrap();
    let tools = r["tools"].as_array().unwrap();
    assert_eq!(tools.len(), 6, "{r}");
    for (t, d) in tools.iter().zip(&defs) {
        assert_eq!(t["name"], d["name"]);
        assert_eq!(t["description"], d["description"]);
        assert_eq!(t["input_schema"], d["input_schema"], "{}", t["name"]);
        let read_only = ["read", "glob", "grep"].contains(&t["name"].as_str().unwrap());
        assert_eq!(t["read_only"], read_only, "{}", t["name"]);
    }
}

#[test]
fn mcp_sdk_calls_every_tool_confined() {
    require_sandbox!();
    if !python_mcp_available() {
        return;
    }
    let r = scenario("every_tool", &[]);
    assert!(ok(&r["bash"]), "{r}");
    assert!(text(&r["bash"]).starts_with("uid=21"), "{r}");
    assert!(text(&r["bash"]).ends_with("/workspace"), "{r}");
    assert_eq!(r["bash_fails"], json!({"text": "no", "is_error": true}));
    assert!(
        ok(&r["write"]) && text(&r["write"]).contains("notes/a.txt"),
        "{r}"
    );
    assert!(ok(&r["read"]) && text(&r["read"]).contains("beta"), "{r}");
    assert!(ok(&r["edit"]), "{r}");
    assert!(
        text(&r["read_after_edit"]).contains("gamma")
            && !text(&r["read_after_edit"]).contains("beta"),
        "{r}"
    );
    assert_eq!(text(&r["glob"]), "/workspace/notes/a.txt", "{r}");
    assert!(text(&r["grep"]).contains("a.txt:2:gamma"), "{r}");
    // Confined: the file tools stay in the workspace, bash cannot read what
    // the host keeps from other users.
    assert!(!ok(&r["read_outside"]), "{r}");
    assert!(text(&r["read_outside"]).contains("outside"), "{r}");
    assert!(!ok(&r["bash_shadow"]), "{r}");
    assert!(text(&r["bash_shadow"]).contains("Permission denied"), "{r}");
    // An unknown tool is a protocol error naming the six; the server serves on.
    let err = r["unknown_tool"]["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("unknown tool \"launch_missiles\"") && err.contains("bash, read, write"),
        "{r}"
    );
    assert_eq!(
        r["still_serving"],
        json!({"text": "still here", "is_error": false})
    );
}

#[test]
fn mcp_bash_output_reaches_the_client_as_progress_while_it_runs() {
    require_sandbox!();
    if !python_mcp_available() {
        return;
    }
    let r = scenario("progress", &[]);
    assert_eq!(
        r["result"],
        json!({"text": "line1\nline2\nline3\nline4\ndone", "is_error": false})
    );
    let notes = r["notes"].as_array().unwrap();
    // The lines come 0.4 s apart: more than one notification, each further
    // on than the last, and together every byte of the output.
    assert!(notes.len() >= 3, "{r}");
    let progress: Vec<f64> = notes
        .iter()
        .map(|n| n["progress"].as_f64().unwrap())
        .collect();
    assert!(progress.windows(2).all(|w| w[0] < w[1]), "{progress:?}");
    let streamed: String = notes
        .iter()
        .map(|n| n["message"].as_str().unwrap())
        .collect();
    assert_eq!(streamed.trim_end(), "line1\nline2\nline3\nline4\ndone");
    assert_eq!(*progress.last().unwrap() as usize, streamed.len());
}

#[test]
fn mcp_cancelled_call_is_killed_with_every_process_it_started() {
    require_sandbox!();
    if !python_mcp_available() {
        return;
    }
    let m = marker(1);
    let r = scenario("cancel", &[&m]);
    // Both sleeps ran (seen from the host); after notifications/cancelled,
    // none is left anywhere on the host.
    assert_eq!(r["running_before"], 2, "{r}");
    assert_eq!(r["running_after"], 0, "{r}");
    assert!(r.get("long_call_returned").is_none(), "{r}");
    // As hands.v1's Cancel: the shell went with the call; a restart brings a
    // fresh one, with no sleep left in the session either.
    assert!(text(&r["after_cancel"]).contains("restart required"), "{r}");
    assert!(ok(&r["restart"]), "{r}");
    assert_eq!(r["next"], json!({"text": "next\n0", "is_error": false}));
}

#[test]
fn mcp_two_connections_are_two_isolated_sessions() {
    require_sandbox!();
    if !python_mcp_available() {
        return;
    }
    let m = marker(2);
    let r = scenario("isolation", &[&m]);
    assert_ne!(text(&r["a_id"]), text(&r["b_id"]), "{r}");
    assert!(ok(&r["a_write"]) && ok(&r["a_bg"]), "{r}");
    // B sees neither A's files nor A's processes, and cannot signal them.
    assert_eq!(text(&r["b_ls"]), ".\n..", "{r}");
    assert!(!ok(&r["b_read"]), "{r}");
    assert!(!text(&r["b_ps"]).contains(&format!("sleep {m}")), "{r}");
    assert_eq!(text(&r["b_kill"]), "1", "{r}");
    assert_eq!(r["a_still_running"], 1, "{r}");
    // Closing the connections closed both sessions: A's background sleep too.
    assert_eq!(r["left_after_close"], 0, "{r}");
}

/// `hands mcp` driven by raw JSON-RPC lines.
pub(crate) struct Raw {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Raw {
    pub(crate) fn start(extra_env: &[(&str, &Path)]) -> Raw {
        Raw::start_with(&[], extra_env)
    }

    fn start_with(args: &[&str], extra_env: &[(&str, &Path)]) -> Raw {
        let mut cmd = Command::new(hands_bin());
        cmd.args(["mcp", "--env", "default"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if extra_env.iter().any(|(k, _)| *k == "SUDO_UID") {
            // As sudo starts it (its records go to the default audit log).
            as_sudo_would(&mut cmd);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start hands mcp");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut raw = Raw { child, lines };
        raw.send_line(
            &json!({"jsonrpc": "2.0", "id": "init", "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": "raw", "version": "1"}}})
            .to_string(),
        );
        let init = raw.response(&json!("init"));
        assert_eq!(init["result"]["serverInfo"]["name"], "hands", "{init}");
        raw.send_line(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        raw
    }

    fn send_line(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin open");
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// The next message with this id (`null` for errors the server could not
    /// attach to a request).
    fn response(&mut self, id: &Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("no response with id {id} in 60 s"),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let mut err = String::new();
                    let _ = std::io::Read::read_to_string(
                        self.child.stderr.as_mut().unwrap(),
                        &mut err,
                    );
                    panic!("hands mcp closed its stdout before answering {id}: {err}")
                }
            };
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            if &v["id"] == id {
                return v;
            }
        }
    }

    pub(crate) fn call(&mut self, id: &str, tool: &str, arguments: Value) -> Value {
        self.send_line(
            &json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                    "params": {"name": tool, "arguments": arguments}})
            .to_string(),
        );
        self.response(&json!(id))
    }

    /// Closes stdin (the client hangs up) and waits for the exit.
    pub(crate) fn hang_up(mut self) -> (std::process::ExitStatus, String) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                let _ =
                    std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err);
                return (status, err);
            }
            assert!(
                Instant::now() < deadline,
                "hands mcp still runs 30 s after its client hung up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn result_text(v: &Value) -> String {
    v["result"]["content"]
        .as_array()
        .map(|c| c.iter().filter_map(|b| b["text"].as_str()).collect())
        .unwrap_or_default()
}

/// Processes on the host whose command line contains `pattern`.
fn host_pids(pattern: &str) -> Vec<i32> {
    let out = Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The directories of a session process's groups on the host (`.../hands/sN`,
/// one per v1 hierarchy or the one v2 group).
fn session_groups(pid: i32) -> Vec<std::path::PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            if !path.contains("/hands/s") {
                return None;
            }
            let mount = match controllers {
                "" => "/sys/fs/cgroup".to_string(),
                c => format!("/sys/fs/cgroup/{c}"),
            };
            Some(std::path::PathBuf::from(format!("{mount}{path}")))
        })
        .filter(|p| p.is_dir())
        .collect()
}

#[test]
fn mcp_malformed_messages_get_clear_errors_and_the_server_serves_on() {
    require_sandbox!();
    let mut raw = Raw::start(&[]);
    let expect_error = |raw: &mut Raw, line: &[u8], id: Value, code: i64, says: &str| {
        let stdin = raw.child.stdin.as_mut().unwrap();
        stdin.write_all(line).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
        let r = raw.response(&id);
        assert_eq!(r["error"]["code"], code, "{r}");
        let message = r["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{message:?} should say {says:?}");
    };
    expect_error(
        &mut raw,
        b"this is not json",
        Value::Null,
        -32700,
        "not JSON",
    );
    expect_error(&mut raw, b"[1,2,3]", Value::Null, -32600, "JSON object");
    expect_error(
        &mut raw,
        br#"{"jsonrpc":"2.0","id":"a1","method":"tools/call","params":{"name":"bash","arguments":"echo hi"}}"#,
        json!("a1"),
        -32602,
        "params.arguments must be an object",
    );
    expect_error(
        &mut raw,
        br#"{"jsonrpc":"2.0","id":"a2","method":"tools/call","params":{"arguments":{}}}"#,
        json!("a2"),
        -32602,
        "params.name",
    );
    expect_error(
        &mut raw,
        br#"{"jsonrpc":"2.0","id":"a3","method":"tools/call","params":{"name":"rm_rf","arguments":{}}}"#,
        json!("a3"),
        -32602,
        "unknown tool \"rm_rf\"",
    );
    expect_error(
        &mut raw,
        br#"{"jsonrpc":"2.0","id":"a4","method":"no/such/method"}"#,
        json!("a4"),
        -32601,
        "no/such/method",
    );
    // A message over the limit (the largest call input, 64 MiB, plus 1 MiB
    // for the envelope) is read past, never held, and answered; the next one
    // is served.
    let huge = format!(
        r#"{{"jsonrpc":"2.0","id":"big","method":"tools/call","params":{{"name":"write","arguments":{{"file_path":"x","content":"{}"}}}}}}"#,
        "x".repeat(66 << 20)
    );
    expect_error(
        &mut raw,
        huge.as_bytes(),
        Value::Null,
        -32600,
        "over the limit",
    );
    let r = raw.call("after", "bash", json!({"command": "echo serving"}));
    assert_eq!(result_text(&r), "serving", "{r}");
    assert_eq!(r["result"]["isError"], false, "{r}");
    let (status, stderr) = raw.hang_up();
    assert!(status.success(), "{status}: {stderr}");
}

#[test]
fn mcp_a_client_that_hangs_up_closes_its_session_and_everything_in_it() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let m = marker(3);
    let mut raw = Raw::start(&[("HANDS_AUDIT_LOG", &log)]);
    let r = raw.call(
        "bg",
        "bash",
        json!({"command": format!("(sleep {m} >/dev/null 2>&1 &); echo started")}),
    );
    assert_eq!(result_text(&r), "started", "{r}");
    let pids = host_pids(&format!("sleep {m}"));
    assert_eq!(pids.len(), 1, "{r}");
    // The session's groups, as the host sees them.
    let groups = session_groups(pids[0]);
    assert!(!groups.is_empty(), "no session group for pid {}", pids[0]);
    // A call still running when the client hangs up is cut short too.
    raw.send_line(
        &json!({"jsonrpc": "2.0", "id": "long", "method": "tools/call",
                "params": {"name": "bash", "arguments": {"command": format!("sleep {m}1")}}})
        .to_string(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while host_pids(&format!("sleep {m}1")).is_empty() {
        assert!(Instant::now() < deadline, "the long call never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, stderr) = raw.hang_up();
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(
        host_pids(&format!("sleep {m}")),
        Vec::<i32>::new(),
        "processes left after the hang-up"
    );
    assert_eq!(
        host_pids(&format!("sleep {m}1")),
        Vec::<i32>::new(),
        "processes left after the hang-up"
    );
    for g in &groups {
        assert!(
            !g.exists(),
            "session group {} left after the hang-up",
            g.display()
        );
    }
    // Every call is in the audit log as the MCP face's, with the client's id.
    let records: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let bg = records
        .iter()
        .find(|r| r["call_id"] == "mcp-1-bg")
        .unwrap_or_else(|| panic!("no record of mcp-1-bg: {records:?}"));
    assert_eq!(bg["connector"], "mcp", "{bg}");
    assert_eq!(bg["tool"], "bash", "{bg}");
    assert_eq!(bg["outcome"], "completed", "{bg}");
    let long = records
        .iter()
        .find(|r| r["call_id"] == "mcp-2-long")
        .unwrap_or_else(|| panic!("no record of mcp-2-long: {records:?}"));
    assert_ne!(long["outcome"], "completed", "{long}");
}

/// Without the `HANDS_*` variables of this process (the suite's own, and
/// what `.ci/run` exports), as sudo's `env_reset` starts a command.
fn as_sudo_would(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("HANDS_")) {
            cmd.env_remove(k);
        }
    }
}

/// `hands mcp` started through sudo (`SUDO_UID`) works for that user only:
/// their own directory as workspace, the operator's policies, none of hands'
/// own paths or programs chosen by them. Each way past it is refused before
/// anything is made.
#[test]
fn attack_mcp_through_sudo_reaches_no_more_than_the_users_own_files() {
    require_sandbox!();
    let theirs = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(theirs.path(), Some(4242), Some(4242)).unwrap();
    let bobs = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(bobs.path(), Some(4343), Some(4343)).unwrap();
    let refused = |extra: &[&str], env: &[(&str, &str)], says: &str| {
        let mut cmd = Command::new(hands_bin());
        cmd.args(["mcp", "--env", "default"])
            .args(extra)
            .env("SUDO_UID", "4242")
            .stdin(Stdio::null());
        as_sudo_would(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?} {env:?}: {stderr}");
        assert!(
            stderr.contains(says),
            "{extra:?} {env:?}: {stderr:?} should say {says:?}"
        );
        assert!(
            out.stdout.is_empty(),
            "{extra:?}: no protocol output on a refusal"
        );
    };
    let bob = bobs.path().to_str().unwrap();
    refused(
        &["--workspace", bob],
        &[],
        "owned by uid 4343, not by uid 4242",
    );
    refused(
        &["--workspace", "/etc", "--allow-root-workspace"],
        &[],
        "--allow-root-workspace is refused",
    );
    refused(
        &["--workspace", "/etc"],
        &[],
        "owned by uid 0, not by uid 4242",
    );
    refused(&["--policy-dir", bob], &[], "only the operator's policies");
    refused(
        &[],
        &[("HANDS_POLICY_DIR", bob)],
        "HANDS_POLICY_DIR must not be set",
    );
    refused(
        &[],
        &[("HANDS_HELPER_EXE", "/tmp/evil")],
        "HANDS_HELPER_EXE must not be set",
    );
    refused(
        &[],
        &[("HANDS_AUDIT_LOG", "/etc/passwd")],
        "HANDS_AUDIT_LOG must not be set",
    );

    // Their own directory is served, and what the agent writes there is theirs.
    let dir = theirs.path().to_path_buf();
    let mut cmd_env: Vec<(&str, &Path)> = Vec::new();
    let uid = Path::new("4242");
    cmd_env.push(("SUDO_UID", uid));
    let mut raw = Raw::start_with(&["--workspace", dir.to_str().unwrap()], &cmd_env);
    let r = raw.call(
        "w",
        "write",
        json!({"file_path": "made.txt", "content": "hi\n"}),
    );
    assert_eq!(r["result"]["isError"], false, "{r}");
    let (status, stderr) = raw.hang_up();
    assert!(status.success(), "{status}: {stderr}");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir.join("made.txt")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (4242, 4242));
}

/// The MCP Inspector (npm `@modelcontextprotocol/inspector`, CLI mode, with
/// the Node 22 it asks for), installed by `.ci/run` into
/// `$HANDS_TEST_MCP_INSPECTOR` (default `~/.cache/hands-npm/inspector-1.0.3`).
fn inspector() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("HANDS_TEST_MCP_INSPECTOR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/hands-npm/inspector-1.0.3"))
        })?;
    if dir.join("node_modules/.bin/mcp-inspector").exists() {
        return Some(dir);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "the MCP Inspector is required under CI=true (.ci/run installs it): none in {}",
            dir.display()
        );
    }
    eprintln!(
        "SKIP: the MCP Inspector is not installed in {}",
        dir.display()
    );
    None
}

/// One `mcp-inspector --cli` run against `hands mcp`; its JSON answer.
fn inspect(dir: &Path, args: &[&str]) -> Value {
    inspect_target(dir, &[hands_bin(), "mcp", "--env", "default"], args)
}

/// One `mcp-inspector --cli` run against `target` (a command, or a URL and
/// `--transport http`); its JSON answer.
fn inspect_target(dir: &Path, target: &[&str], args: &[&str]) -> Value {
    let bin = dir.join("node_modules/.bin");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(bin.join("mcp-inspector"))
        .arg("--cli")
        .args(target)
        .args(args)
        .env("PATH", path)
        .output()
        .expect("run the MCP Inspector");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mcp-inspector {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn mcp_inspector_cli_lists_and_calls_the_tools() {
    require_sandbox!();
    let Some(dir) = inspector() else { return };
    let listed = inspect(&dir, &["--method", "tools/list"]);
    let names: Vec<&str> = listed["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"))
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["bash", "read", "write", "edit", "glob", "grep"],
        "{listed}"
    );
    let called = inspect(
        &dir,
        &[
            "--method",
            "tools/call",
            "--tool-name",
            "bash",
            "--tool-arg",
            "command=echo from-inspector; id -u",
        ],
    );
    assert_eq!(called["isError"], false, "{called}");
    let text = called["content"][0]["text"].as_str().unwrap_or_default();
    assert!(text.starts_with("from-inspector\n21"), "{called}");
    let refused = inspect(
        &dir,
        &[
            "--method",
            "tools/call",
            "--tool-name",
            "read",
            "--tool-arg",
            "file_path=/etc/shadow",
        ],
    );
    assert_eq!(refused["isError"], true, "{refused}");
    assert!(
        refused["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("outside"),
        "{refused}"
    );
}

// ---- over streamable HTTP: the worker's [mcp] listener ----

/// A worker serving MCP over streamable HTTP on a port of its own (port 0: the
/// worker announces the one it bound on stdout, `mcp listening on ADDR`), with
/// `mcp` (more keys of `[mcp]`) and `default` and `strict` offered.
pub(crate) struct HttpWorker {
    daemon: crate::worker::Daemon,
    port: u16,
    _dir: tempfile::TempDir,
}

impl HttpWorker {
    pub(crate) fn start(mcp: &str) -> HttpWorker {
        let dir = tempfile::tempdir().unwrap();
        HttpWorker::start_in(dir, mcp)
    }

    pub(crate) fn start_in(dir: tempfile::TempDir, mcp: &str) -> HttpWorker {
        let config = format!(
            "{}environments = [\"default\", \"strict\"]\n[mcp]\nlisten = \"127.0.0.1:0\"\n{mcp}\n",
            crate::worker::LISTEN
        );
        let daemon = crate::worker::Daemon::start(dir.path(), &config, &[], &[]);
        let addr = daemon
            .announced("mcp listening on ", Duration::from_secs(30))
            .unwrap_or_else(|| panic!("the MCP listener did not start:\n{}", daemon.stderr()));
        let port = addr
            .parse::<std::net::SocketAddr>()
            .unwrap_or_else(|e| panic!("mcp listening on {addr:?}: {e}"))
            .port();
        HttpWorker {
            daemon,
            port,
            _dir: dir,
        }
    }

    pub(crate) fn base(&self, scheme: &str) -> String {
        let host = if scheme == "https" {
            "localhost"
        } else {
            "127.0.0.1"
        };
        format!("{scheme}://{host}:{}/mcp", self.port)
    }
}

/// One HTTP request with curl (an independent client): status and body.
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time", "30"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

const JSON_RPC: [&str; 4] = [
    "-H",
    "content-type: application/json",
    "-H",
    "accept: application/json, text/event-stream",
];

fn init_body() -> String {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "curl", "version": "1"}}})
    .to_string()
}

#[test]
fn mcp_http_sdk_lists_tools_and_calls_every_tool_confined() {
    require_sandbox!();
    if !python_mcp_available() {
        return;
    }
    let w = HttpWorker::start("");
    let base = w.base("http");
    let r = scenario_at(&base, &[], "tools", &[]);
    let names: Vec<&str> = r["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["bash", "read", "write", "edit", "glob", "grep"],
        "{r}"
    );
    assert!(
        r["instructions"].as_str().unwrap().contains("\"default\""),
        "{r}"
    );
    // The path chose the environment; nothing the client sends can.
    let strict = scenario_at(&base, &[], "tools", &["strict"]);
    assert!(
        strict["instructions"]
            .as_str()
            .unwrap()
            .contains("\"strict\""),
        "{strict}"
    );
    let r = scenario_at(&base, &[], "every_tool", &[]);
    assert!(
        ok(&r["bash"]) && text(&r["bash"]).contains("/workspace"),
        "{r}"
    );
    assert!(!text(&r["bash"]).contains("uid=0\n"), "{r}");
    assert!(!ok(&r["bash_fails"]), "{r}");
    assert_eq!(text(&r["read_after_edit"]), "alpha\ngamma\n", "{r}");
    assert!(!ok(&r["read_outside"]), "{r}");
    assert!(!ok(&r["bash_shadow"]), "{r}");
    assert!(
        r["unknown_tool"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("unknown tool")),
        "{r}"
    );
    assert!(ok(&r["still_serving"]), "{r}");
    // Each call is in the worker's audit log under the connector `mcp`.
    let audit = w.daemon.stderr();
    assert!(audit.contains(r#""connector":"mcp""#), "{audit}");
}

#[test]
fn mcp_http_bash_output_streams_as_progress() {
    require_sandbox!();
    if !python_mcp_available() {
        return;
    }
    let w = HttpWorker::start("");
    let r = scenario_at(&w.base("http"), &[], "progress", &[]);
    let notes = r["notes"].as_array().unwrap();
    assert!(notes.len() >= 3, "{r}");
    let streamed: String = notes
        .iter()
        .map(|n| n["message"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        streamed.trim_end(),
        "line1\nline2\nline3\nline4\ndone",
        "{r}"
    );
}

#[test]
fn mcp_http_cancelled_call_is_killed_with_every_process_it_started() {
    require_sandbox!();
    if !python_mcp_available() {
        return;
    }
    let w = HttpWorker::start("");
    let m = marker(5);
    let r = scenario_at(&w.base("http"), &[], "cancel", &[&m]);
    assert_eq!(r["running_before"], 2, "{r}");
    assert_eq!(r["running_after"], 0, "{r}");
    assert!(text(&r["after_cancel"]).contains("restart required"), "{r}");
    assert_eq!(r["next"], json!({"text": "next\n0", "is_error": false}));
}

#[test]
fn mcp_http_two_sessions_are_isolated_and_end_with_their_clients() {
    require_sandbox!();
    if !python_mcp_available() {
        return;
    }
    let w = HttpWorker::start("");
    let m = marker(6);
    let r = scenario_at(&w.base("http"), &[], "isolation", &[&m]);
    assert_ne!(text(&r["a_id"]), text(&r["b_id"]), "{r}");
    assert_eq!(text(&r["b_ls"]), ".\n..", "{r}");
    assert!(!ok(&r["b_read"]), "{r}");
    assert_eq!(text(&r["b_kill"]), "1", "{r}");
    assert_eq!(r["a_still_running"], 1, "{r}");
    // The clients' DELETEs closed both sessions, A's background sleep too.
    assert_eq!(r["left_after_close"], 0, "{r}");
    assert!(w.daemon.stderr().contains("mcp: session closed"));
}

/// Opens an MCP session with curl: its `Mcp-Session-Id`.
fn curl_session(url: &str, extra: &[&str]) -> String {
    let body = init_body();
    let out = Command::new("curl")
        .args([
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--max-time",
            "30",
            "-X",
            "POST",
        ])
        .args(JSON_RPC)
        .args(extra)
        .args(["--data", &body, url])
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_string();
    head.lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("mcp-session-id:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no session id: {head}"))
}

fn curl_call(url: &str, session: &str, extra: &[&str], command: &str) -> (u16, String) {
    let sid = format!("mcp-session-id: {session}");
    let body = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "bash", "arguments": {"command": command}}})
    .to_string();
    let mut args: Vec<&str> = vec!["-X", "POST"];
    args.extend(JSON_RPC);
    args.extend(["-H", "mcp-protocol-version: 2025-11-25", "-H", &sid]);
    args.extend(extra);
    args.extend(["--data", &body, url]);
    curl(&args)
}

#[test]
fn mcp_http_an_abandoned_session_is_closed_after_the_idle_timeout() {
    require_sandbox!();
    let w = HttpWorker::start("idle_timeout_secs = 2");
    let url = format!("{}/default", w.base("http"));
    let m = marker(7);
    let sid = curl_session(&url, &[]);
    let (code, body) = curl_call(
        &url,
        &sid,
        &[],
        &format!("(sleep {m} >/dev/null 2>&1 &); echo up"),
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("up"), "{body}");
    assert_eq!(host_pids(&format!("sleep {m}")).len(), 1);
    // A call running past the timeout keeps its session…
    let (code, body) = curl_call(&url, &sid, &[], "sleep 3; echo kept");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("kept"), "{body}");
    // …and with nothing running and no request, it is closed: its processes go.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !host_pids(&format!("sleep {m}")).is_empty() {
        assert!(Instant::now() < deadline, "{}", w.daemon.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(w.daemon.stderr().contains("closing an idle session"));
    // The client learns the session is gone (404, as MCP asks).
    let (code, _) = curl_call(&url, &sid, &[], "echo again");
    assert_eq!(code, 404);
}

#[test]
fn mcp_http_delete_closes_the_session_and_everything_in_it() {
    require_sandbox!();
    let w = HttpWorker::start("");
    let url = format!("{}/default", w.base("http"));
    let m = marker(8);
    let sid = curl_session(&url, &[]);
    let (code, body) = curl_call(
        &url,
        &sid,
        &[],
        &format!("(sleep {m} >/dev/null 2>&1 &); echo up"),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(host_pids(&format!("sleep {m}")).len(), 1);
    let (code, body) = curl(&[
        "-X",
        "DELETE",
        "-H",
        &format!("mcp-session-id: {sid}"),
        &url,
    ]);
    assert_eq!(code, 204, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !host_pids(&format!("sleep {m}")).is_empty() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, _) = curl_call(&url, &sid, &[], "echo again");
    assert_eq!(code, 404);
}

#[test]
fn mcp_http_bad_requests_get_clear_errors_and_the_listener_serves_on() {
    require_sandbox!();
    let w = HttpWorker::start("");
    let url = format!("{}/default", w.base("http"));
    let post = |extra: &[&str], body: &str| {
        let mut args: Vec<&str> = vec!["-X", "POST"];
        args.extend(JSON_RPC);
        args.extend(extra);
        args.extend(["--data-binary", body, &url]);
        curl(&args)
    };
    // Not JSON.
    let (code, body) = post(&[], "{not json");
    assert!((400..500).contains(&code), "{code} {body}");
    // A call without a session.
    let (code, body) = post(
        &[],
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"bash","arguments":{"command":"id"}}}"#,
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.to_lowercase().contains("session"), "{body}");
    // An unknown path: the paths served are named.
    let (code, body) = curl(&[&format!("http://127.0.0.1:{}/elsewhere", w.port)]);
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("/mcp/default"), "{body}");
    // A Host that is not loopback (DNS rebinding from a browser).
    let (code, _) = post(&["-H", "host: attacker.example"], &init_body());
    assert_eq!(code, 403);
    // A request a web page made (it carries an Origin), even to 127.0.0.1.
    let (code, _) = post(&["-H", "origin: http://attacker.example"], &init_body());
    assert_eq!(code, 403);
    // A body a page could send without asking (text/plain) is not taken.
    let (code, _) = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: text/plain",
        "-H",
        "accept: application/json, text/event-stream",
        "--data",
        &init_body(),
        &url,
    ]);
    assert_eq!(code, 415);
    // A body over the limit is refused unread past the limit.
    let big = tempfile::NamedTempFile::new().unwrap();
    big.as_file().set_len(70 << 20).unwrap();
    let at = format!("@{}", big.path().display());
    let (code, _) = post(&[], &at);
    assert_eq!(code, 413);
    // An unknown tool in a session: a JSON-RPC error naming the six.
    let sid = curl_session(&url, &[]);
    let sid_h = format!("mcp-session-id: {sid}");
    let (code, body) = post(
        &["-H", &sid_h, "-H", "mcp-protocol-version: 2025-11-25"],
        r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"launch","arguments":{}}}"#,
    );
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("-32602") && body.contains("bash, read"),
        "{body}"
    );
    // And the session serves on.
    let (code, body) = curl_call(&url, &sid, &[], "echo still");
    assert_eq!(code, 200);
    assert!(body.contains("still"), "{body}");
    // Its id means nothing at another endpoint (another environment).
    let strict = format!("{}/strict", w.base("http"));
    let (code, _) = curl_call(&strict, &sid, &[], "echo elsewhere");
    assert_eq!(code, 404);
    // At the worker's capacity (2 here), one more session is refused with
    // the reason, and nothing is held for it: after a DELETE there is room.
    let second = curl_session(&url, &[]);
    let body = init_body();
    let mut args: Vec<&str> = vec!["-X", "POST"];
    args.extend(JSON_RPC);
    args.extend(["--data", &body, &url]);
    for _ in 0..5 {
        let (_, text) = curl(&args);
        assert!(text.contains("capacity"), "{text}");
    }
    let (code, _) = curl(&[
        "-X",
        "DELETE",
        "-H",
        &format!("mcp-session-id: {second}"),
        &url,
    ]);
    assert_eq!(code, 204);
    let third = curl_session(&url, &[]);
    let (code, body) = curl_call(&url, &third, &[], "echo room");
    assert_eq!(code, 200, "{body}");
}

#[test]
fn attack_mcp_http_without_the_bearer_token_reaches_nothing() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    let token = "t0ken-of-the-operator-0123456789";
    std::fs::write(dir.path().join("mcp-token"), format!("{token}\n")).unwrap();
    let w = HttpWorker::start_in(dir, "token_file = \"mcp-token\"");
    let url = format!("{}/default", w.base("http"));
    let body = init_body();
    for auth in [
        None,
        Some("Bearer wrong-token-wrong-token-00".to_string()),
        Some(format!("Bearer {token}x")),
        Some(format!("Basic {token}")),
    ] {
        let header = auth.as_ref().map(|a| format!("authorization: {a}"));
        let mut args: Vec<&str> = vec!["-X", "POST"];
        args.extend(JSON_RPC);
        if let Some(h) = &header {
            args.extend(["-H", h.as_str()]);
        }
        args.extend(["--data", &body, &url]);
        let (code, text) = curl(&args);
        assert_eq!(code, 401, "{auth:?}: {text}");
        assert!(text.contains("bearer token"), "{text}");
    }
    // No session was opened for any of them; the right token works.
    assert!(!w.daemon.stderr().contains("mcp: session opened"));
    let auth = format!("authorization: Bearer {token}");
    let sid = curl_session(&url, &["-H", &auth]);
    let (code, text) = curl_call(&url, &sid, &["-H", &auth], "echo in");
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("in"), "{text}");
    // A session id without the token is refused too.
    let (code, _) = curl_call(&url, &sid, &[], "echo stolen id");
    assert_eq!(code, 401);
    if python_mcp_available() {
        let r = scenario_at(&w.base("http"), &[("MCP_TOKEN", token)], "tools", &[]);
        assert_eq!(r["tools"].as_array().unwrap().len(), 6, "{r}");
    }
}

/// Writes, in `dir`, a fresh CA (`ca.pem`), a server certificate for
/// `localhost` of it (`server.pem`, `server-key.pem`) and a client certificate
/// of it (`client.pem`, `client-key.pem`).
pub(crate) fn write_tls_files(dir: &Path) {
    let ca = hands::pki::Ca::new(1).unwrap();
    let server = ca.gateway(&["localhost".into()], 1).unwrap();
    let client = ca.worker("agent", 1).unwrap();
    for (name, pem) in [
        ("ca.pem", &ca.issued.cert_pem),
        ("server.pem", &server.cert_pem),
        ("server-key.pem", &server.key_pem),
        ("client.pem", &client.cert_pem),
        ("client-key.pem", &client.key_pem),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
}

#[test]
fn attack_mcp_https_without_a_client_certificate_of_the_ca_reaches_nothing() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    write_tls_files(dir.path());
    let foreign = hands::pki::Ca::new(1).unwrap();
    let stranger = foreign.worker("agent", 1).unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("stranger.pem"), &stranger.cert_pem).unwrap();
    std::fs::write(p("stranger-key.pem"), &stranger.key_pem).unwrap();
    let paths: Vec<String> = [
        "ca.pem",
        "client.pem",
        "client-key.pem",
        "stranger.pem",
        "stranger-key.pem",
    ]
    .iter()
    .map(|n| p(n).display().to_string())
    .collect();
    let w = HttpWorker::start_in(
        dir,
        "tls_cert = \"server.pem\"\ntls_key = \"server-key.pem\"\nclient_ca = \"ca.pem\"",
    );
    let url = format!("{}/default", w.base("https"));
    let body = init_body();
    let attempt = |cert: Option<(&str, &str)>| {
        let mut args: Vec<&str> = vec!["--cacert", &paths[0], "-X", "POST"];
        args.extend(JSON_RPC);
        if let Some((c, k)) = cert {
            args.extend(["--cert", c, "--key", k]);
        }
        args.extend(["--data", &body, &url]);
        curl(&args)
    };
    // No certificate, or one of another CA: the handshake fails, nothing is served.
    assert_eq!(attempt(None).0, 0);
    assert_eq!(attempt(Some((&paths[3], &paths[4]))).0, 0);
    // Plain HTTP to the TLS port gets nothing either.
    let (code, _) = curl(&[
        "-X",
        "POST",
        "--data",
        &body,
        &format!("{}/default", w.base("http")),
    ]);
    assert_ne!(code, 200);
    assert!(!w.daemon.stderr().contains("mcp: session opened"));
    // The CA's client certificate is served.
    let (code, text) = attempt(Some((&paths[1], &paths[2])));
    assert_eq!(code, 200, "{text}");
    if python_mcp_available() {
        let env = [
            ("MCP_CA", paths[0].as_str()),
            ("MCP_CLIENT_CERT", paths[1].as_str()),
            ("MCP_CLIENT_KEY", paths[2].as_str()),
        ];
        let r = scenario_at(&w.base("https"), &env, "every_tool", &[]);
        assert!(ok(&r["bash"]), "{r}");
    }
}

// ---- through the gateway: /v1/environments/{env}/mcp, the worker dialing out ----

/// A gateway and one worker connected to it (in this process), and the
/// template URL of the gateway's MCP endpoints.
pub(crate) async fn through_gateway() -> (crate::tunnel::Gw, crate::tunnel::Wk, String) {
    let pki = crate::tunnel::Pki::new();
    let gw = crate::tunnel::api_gateway(&pki, "mcp_idle_timeout_secs = 3").await;
    let (wk, _) = crate::tunnel::one_worker(&pki, &gw, "mcp-worker").await;
    let url = format!("http://{}/v1/environments/{{env}}/mcp", gw.bound.api);
    (gw, wk, url)
}

/// [`scenario_at`] off the runtime's threads (the gateway and worker run on
/// them).
async fn scenario_async(url: &str, env: &[(&str, &str)], name: &str, args: &[&str]) -> Value {
    let url = url.to_string();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let name = name.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        scenario_at(&url, &env, &name, &args)
    })
    .await
    .unwrap()
}

const GATEWAY_TOKEN: [(&str, &str); 1] = [("MCP_TOKEN", crate::tunnel::TOKEN)];

#[tokio::test(flavor = "multi_thread")]
async fn mcp_gateway_sdk_lists_and_calls_every_tool_on_a_worker_that_only_dials_out() {
    require_sandbox!();
    if !python_mcp_available() {
        return;
    }
    let (gw, wk, url) = through_gateway().await;
    let r = scenario_async(&url, &GATEWAY_TOKEN, "tools", &[]).await;
    assert_eq!(r["tools"].as_array().unwrap().len(), 6, "{r}");
    let r = scenario_async(&url, &GATEWAY_TOKEN, "every_tool", &[]).await;
    assert!(
        ok(&r["bash"]) && text(&r["bash"]).contains("/workspace"),
        "{r}"
    );
    assert_eq!(text(&r["read_after_edit"]), "alpha\ngamma\n", "{r}");
    assert!(!ok(&r["read_outside"]), "{r}");
    assert!(!ok(&r["bash_shadow"]), "{r}");
    assert!(
        r["unknown_tool"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("unknown tool")),
        "{r}"
    );
    assert!(ok(&r["still_serving"]), "{r}");
    // The client's DELETE closed the session on the worker.
    let deadline = Instant::now() + Duration::from_secs(10);
    while wk_sessions(&wk) > 0 {
        assert!(
            Instant::now() < deadline,
            "the worker still holds the session"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wk.stop().await;
    gw.stop().await;
}

fn wk_sessions(wk: &crate::tunnel::Wk) -> usize {
    wk.registry().open_sessions()
}

#[tokio::test(flavor = "multi_thread")]
async fn mcp_gateway_streams_progress_and_cancels_through_the_tunnel() {
    require_sandbox!();
    if !python_mcp_available() {
        return;
    }
    let (gw, wk, url) = through_gateway().await;
    let r = scenario_async(&url, &GATEWAY_TOKEN, "progress", &[]).await;
    let streamed: String = r["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["message"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        streamed.trim_end(),
        "line1\nline2\nline3\nline4\ndone",
        "{r}"
    );
    assert!(r["notes"].as_array().unwrap().len() >= 3, "{r}");
    let m = marker(9);
    let r = scenario_async(&url, &GATEWAY_TOKEN, "cancel", &[&m]).await;
    assert_eq!(r["running_before"], 2, "{r}");
    assert_eq!(r["running_after"], 0, "{r}");
    assert!(text(&r["after_cancel"]).contains("restart required"), "{r}");
    assert_eq!(r["next"], json!({"text": "next\n0", "is_error": false}));
    wk.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mcp_gateway_sessions_are_isolated_and_an_abandoned_one_is_closed() {
    require_sandbox!();
    if !python_mcp_available() {
        return;
    }
    let (gw, wk, url) = through_gateway().await;
    let m = marker(10);
    let r = scenario_async(&url, &GATEWAY_TOKEN, "isolation", &[&m]).await;
    assert_ne!(text(&r["a_id"]), text(&r["b_id"]), "{r}");
    assert_eq!(text(&r["b_ls"]), ".\n..", "{r}");
    assert!(!ok(&r["b_read"]), "{r}");
    assert_eq!(text(&r["b_kill"]), "1", "{r}");
    assert_eq!(r["left_after_close"], 0, "{r}");
    // A client that drops without DELETE: closed after the gateway's idle
    // timeout (3 s here), on the worker too.
    let api = gw.bound.api.to_string();
    let m = marker(11);
    let sid = tokio::task::spawn_blocking(move || {
        let url = format!("http://{api}/v1/environments/default/mcp");
        let auth = format!("authorization: Bearer {}", crate::tunnel::TOKEN);
        let sid = curl_session(&url, &["-H", &auth]);
        let (code, body) = curl_call(
            &url,
            &sid,
            &["-H", &auth],
            &format!("(sleep {m} >/dev/null 2>&1 &); echo up"),
        );
        assert_eq!(code, 200, "{body}");
        sid
    })
    .await
    .unwrap();
    assert!(!sid.is_empty());
    assert_eq!(host_pids(&format!("sleep {}", marker(11))).len(), 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !host_pids(&format!("sleep {}", marker(11))).is_empty() || wk_sessions(&wk) > 0 {
        assert!(
            Instant::now() < deadline,
            "the abandoned session was not closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wk.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn attack_mcp_gateway_without_the_token_or_for_an_unserved_environment_reaches_nothing() {
    require_sandbox!();
    let (gw, wk, _) = through_gateway().await;
    let api = gw.bound.api.to_string();
    tokio::task::spawn_blocking(move || {
        let url = format!("http://{api}/v1/environments/default/mcp");
        let body = init_body();
        for auth in [
            None,
            Some("authorization: Bearer not-the-gateway-token-at-all"),
        ] {
            let mut args: Vec<&str> = vec!["-X", "POST"];
            args.extend(JSON_RPC);
            if let Some(a) = auth {
                args.extend(["-H", a]);
            }
            args.extend(["--data", &body, &url]);
            let (code, text) = curl(&args);
            assert_eq!(code, 401, "{auth:?}: {text}");
        }
        // An environment no worker offers: nothing is made for it.
        let auth = format!("authorization: Bearer {}", crate::tunnel::TOKEN);
        let mut args: Vec<&str> = vec!["-X", "POST", "-H", &auth];
        args.extend(JSON_RPC);
        let elsewhere = format!("http://{api}/v1/environments/strict/mcp");
        args.extend(["--data", &body, &elsewhere]);
        let (code, text) = curl(&args);
        assert_eq!(code, 404, "{text}");
        assert!(text.contains("NO_WORKER"), "{text}");
        // The right token still works, and DELETE ends the session (204).
        let sid = curl_session(&url, &["-H", &auth]);
        let (code, text) = curl_call(&url, &sid, &["-H", &auth], "echo served");
        assert_eq!(code, 200, "{text}");
        assert!(text.contains("served"), "{text}");
        let sid_h = format!("mcp-session-id: {sid}");
        let (code, _) = curl(&["-X", "DELETE", "-H", &auth, "-H", &sid_h, &url]);
        assert_eq!(code, 204);
        let (code, _) = curl_call(&url, &sid, &["-H", &auth], "echo gone");
        assert_eq!(code, 404);
    })
    .await
    .unwrap();
    wk.stop().await;
    gw.stop().await;
}

#[test]
fn mcp_inspector_cli_lists_and_calls_the_tools_over_http() {
    require_sandbox!();
    let Some(dir) = inspector() else { return };
    let w = HttpWorker::start("");
    let url = format!("{}/default", w.base("http"));
    let target = [url.as_str(), "--transport", "http"];
    let listed = inspect_target(&dir, &target, &["--method", "tools/list"]);
    let names: Vec<&str> = listed["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"))
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["bash", "read", "write", "edit", "glob", "grep"],
        "{listed}"
    );
    let called = inspect_target(
        &dir,
        &target,
        &[
            "--method",
            "tools/call",
            "--tool-name",
            "bash",
            "--tool-arg",
            "command=echo over-http; id -u",
        ],
    );
    assert_eq!(called["isError"], false, "{called}");
    let text = called["content"][0]["text"].as_str().unwrap_or_default();
    assert!(text.starts_with("over-http\n"), "{called}");
    assert_ne!(text.lines().nth(1), Some("0"), "{called}");
}

/// A cancel is a notification, so a client may send its restart right behind
/// it, before the cancelled call's processes are killed. The kill must not
/// land on the shell the restart started (over HTTP the two requests race).
#[tokio::test(flavor = "multi_thread")]
async fn mcp_a_restart_sent_right_after_a_cancel_is_not_overtaken_by_the_kill() {
    require_sandbox!();
    let policies = hands::policy::PolicySet::builtin()
        .iter()
        .cloned()
        .collect::<Vec<_>>();
    let registry = std::sync::Arc::new(hands::session::registry::Registry::new(
        config(),
        policies,
        4,
    ));
    let stop = tokio_util::sync::CancellationToken::new();
    let backend = std::sync::Arc::new(hands::connectors::mcp::http::LocalBackend::new(
        registry.clone(),
        "default",
    ));
    let (service, _sessions) =
        hands::connectors::mcp::http::endpoint_service(backend, Vec::new(), &stop);
    let router = axum::Router::new().route_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let target =
        hands::conformance::mcp::McpTarget::new(&format!("http://{addr}/mcp"), None).unwrap();
    let s = target.session().await.unwrap();
    for round in 0..10u64 {
        let id = 100 + round;
        let (tx, mut started) = tokio::sync::mpsc::channel::<()>(1);
        let runner = s.clone();
        let long = tokio::spawn(async move {
            runner
                .call_as(
                    id,
                    "bash",
                    json!({"command": "echo up; sleep 600"}),
                    true,
                    move |_| {
                        let _ = tx.try_send(());
                    },
                )
                .await
        });
        started.recv().await.expect("the long call started");
        // The cancel, and at once the restart and the next call: no wait for
        // the cancelled call's answer.
        s.notify(
            "notifications/cancelled",
            json!({"requestId": id, "reason": "test"}),
        )
        .await
        .unwrap();
        let restarted = s.call("bash", json!({"restart": true})).await.unwrap();
        assert!(!restarted.is_error, "round {round}: {restarted:?}");
        let next = s.text("bash", json!({"command": "echo alive"})).await;
        assert_eq!(next.as_deref(), Ok("alive"), "round {round}");
        let _ = tokio::time::timeout(Duration::from_secs(10), long).await;
    }
    let _ = s.delete().await;
    stop.cancel();
    registry.close_all();
}
