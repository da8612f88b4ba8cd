//! The audit log: the same call through each face — hands.v1 on the debug
//! listener and through the tunnel, Claude Managed Agents, `hands tool`,
//! `hands exec` — appears in it once, with the client's ids and its
//! connector, never its content; it is written at the default log level and
//! mirrored to the worker's log; `hands audit verify` finds an edited, a
//! deleted, an inserted and a reordered record, and accepts a rotated chain.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hands::proto::v1;
use serde_json::{json, Value};

use crate::util::hands_bin;
use crate::worker::Daemon;

/// Makes call `call_id` in hands.v1 session `session` and returns its
/// Started's `executed_now` and its result's text.
async fn grpc_call(
    client: &mut v1::sandbox_client::SandboxClient<tonic::transport::Channel>,
    session: &str,
    call_id: &str,
    input: Value,
) -> (bool, String) {
    let mut stream = client
        .call(v1::CallRequest {
            session_id: session.into(),
            call_id: call_id.into(),
            tool: "bash".into(),
            input_json: input.to_string(),
            stream_output: false,
        })
        .await
        .expect("Call")
        .into_inner();
    let mut executed_now = None;
    while let Some(ev) = stream.message().await.expect("a call event") {
        match ev.event {
            Some(v1::call_event::Event::Started(s)) => executed_now = Some(s.executed_now),
            Some(v1::call_event::Event::Finished(f)) => {
                let r = hands::proto::result_of(&f).unwrap();
                return (executed_now.expect("Started first"), r.text_content());
            }
            _ => {}
        }
    }
    panic!("no Finished for {call_id}");
}

/// The records of an audit log file.
fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// The one record of call `call_id`; fails when there is none or several.
fn only_record<'a>(records: &'a [Value], call_id: &str) -> &'a Value {
    let found: Vec<&Value> = records.iter().filter(|r| r["call_id"] == call_id).collect();
    assert_eq!(
        found.len(),
        1,
        "call {call_id} must appear once in the audit log: {records:#?}"
    );
    found[0]
}

/// `hands audit verify FILES…`: (exit status, stdout).
fn verify(files: &[PathBuf]) -> (i32, String) {
    let out = Command::new(hands_bin())
        .args(["audit", "verify"])
        .args(files)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// One worker with three faces (the debug listener, a tunnel to a gateway,
/// Claude Managed Agents) and the two commands beside it, all writing one
/// audit log: each call appears once, with its connector, the client's
/// session id and call id, and nothing of what the call printed.
#[tokio::test(flavor = "multi_thread")]
async fn each_face_s_call_appears_once_with_the_client_s_ids() {
    crate::require_sandbox!();
    if !crate::differential::sdk_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    // The reference gateway, in process.
    let pki = crate::tunnel::Pki::new();
    let gw = crate::tunnel::gateway(&pki, &pki.gateway("gateway", 30), "127.0.0.1:0", "").await;
    let (cert, key) = pki.worker("audit-worker", 30);
    // The fake Claude Managed Agents control plane.
    let fake = crate::cma::Fake::start();
    let env = fake
        .control("POST", "/_fake/environments", Some(json!({})))
        .await;
    std::fs::write(dir.path().join("key"), env["key"].as_str().unwrap()).unwrap();
    let config = format!(
        "worker_id = \"audit-worker\"\ncapacity = 4\nlisten = \"127.0.0.1:0\"\n\
         environments = [\"default\"]\n\n\
         [tunnel]\nendpoints = [\"{}\"]\nserver_name = \"localhost\"\nca = {:?}\ncert = {cert:?}\n\
         key = {key:?}\nproxy = \"none\"\n\n\
         [anthropic]\nenvironment_id = \"{}\"\nenvironment_key_file = \"key\"\n\
         environment = \"default\"\nmax_idle_secs = 0\nbase_url = \"{}\"\n\n\
         [audit]\nfile = \"audit.jsonl\"\n",
        gw.bound.tunnel,
        pki.ca_pem,
        env["id"].as_str().unwrap(),
        fake.url(),
    );
    let worker = Daemon::start_by_default(dir.path(), &config, &[]);

    // hands.v1 on the debug listener; the same call again resumes it.
    let mut client = worker.client().await;
    client
        .open_session(v1::OpenSessionRequest {
            session_id: "audit-direct".into(),
            environment: "default".into(),
        })
        .await
        .unwrap();
    let input = json!({"command": "echo direct-secret-output"});
    let (first, text) = grpc_call(&mut client, "audit-direct", "call-direct", input.clone()).await;
    assert!(first && text.contains("direct-secret-output"), "{text}");
    let (again, _) = grpc_call(&mut client, "audit-direct", "call-direct", input).await;
    assert!(!again, "the repeated call was resumed, not run again");

    // hands.v1 through the gateway and the tunnel.
    let mut api = gw.api();
    crate::tunnel::wait_workers(&mut api, 1).await;
    let gw_session = crate::tunnel::open(&mut api).await;
    let r = crate::tunnel::tool(
        &mut api,
        &gw_session,
        "call-gw",
        "bash",
        json!({"command": "echo gw-secret-output"}),
    )
    .await;
    assert!(crate::tunnel::text(&r).contains("gw-secret-output"), "{r}");

    // Claude Managed Agents.
    let c = fake
        .control(
            "POST",
            "/_fake/sessions",
            Some(json!({"environment_id": env["id"], "events": [], "work": {}})),
        )
        .await;
    let cma_session = c["session"]["id"].as_str().unwrap().to_string();
    let (text, is_error) = fake
        .call(
            &cma_session,
            crate::cma::bash_use("toolu_audit01", "echo cma-secret-output"),
        )
        .await;
    assert!(!is_error && text.contains("cma-secret-output"), "{text}");

    // hands tool and hands exec, beside the worker, into the same log.
    let out = Command::new(hands_bin())
        .args(["tool", "--call-id", "call-tool", "bash"])
        .arg(json!({"command": "echo tool-secret-output"}).to_string())
        .env("HANDS_AUDIT_LOG", &log)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = Command::new(hands_bin())
        .args([
            "exec",
            "--call-id",
            "call-exec",
            "--",
            "/bin/echo",
            "exec-secret-output",
        ])
        .env("HANDS_AUDIT_LOG", &log)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("exec-secret-output"));
    // hands mcp: an MCP client's tools/call, request id "audit1".
    let mut mcp = crate::mcp::Raw::start(&[("HANDS_AUDIT_LOG", &log)]);
    let r = mcp.call(
        "audit1",
        "bash",
        json!({"command": "echo mcp-secret-output"}),
    );
    assert!(r.to_string().contains("mcp-secret-output"), "{r}");
    let (status, stderr) = mcp.hang_up();
    assert!(status.success(), "{status}: {stderr}");

    let all = records(&log);
    let host = hands::util::hostname();
    for (call_id, connector, session, tool, worker_id) in [
        (
            "call-direct",
            "hands.v1",
            "audit-direct",
            "bash",
            "audit-worker",
        ),
        (
            "call-gw",
            "hands.v1",
            gw_session.as_str(),
            "bash",
            "audit-worker",
        ),
        (
            "toolu_audit01",
            "claude-managed-agents",
            cma_session.as_str(),
            "bash",
            "audit-worker",
        ),
        ("call-tool", "hands-tool", "", "bash", host.as_str()),
        ("call-exec", "hands-exec", "", "exec", host.as_str()),
        ("mcp-1-audit1", "mcp", "", "bash", host.as_str()),
    ] {
        let r = only_record(&all, call_id);
        assert_eq!(r["kind"], "call", "{r}");
        assert_eq!(r["connector"], connector, "{r}");
        if !session.is_empty() {
            assert_eq!(r["session"], session, "{r}");
        } else {
            // A command's session is its own: the sandbox session's id.
            assert_eq!(r["session"], r["sandbox"], "{r}");
        }
        assert_eq!(r["tool"], tool, "{r}");
        assert_eq!(r["worker"], worker_id, "{r}");
        assert_eq!(r["outcome"], "completed", "{r}");
        assert_eq!(r["is_error"], false, "{r}");
        assert!(r["duration_ms"].as_f64().is_some_and(|d| d > 0.0), "{r}");
        assert!(r["output_bytes"].as_u64().is_some_and(|n| n > 0), "{r}");
        assert!(
            time::OffsetDateTime::parse(
                r["time"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339
            )
            .is_ok(),
            "{r}"
        );
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("secret-output"),
        "the audit log holds a call's content: {text}"
    );
    // The file is the worker's alone to read.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    let (code, out) = verify(std::slice::from_ref(&log));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("{} records", all.len())), "{out}");
    // Mirrored to the worker's log at the default level, with the chain.
    let stderr = worker.stderr();
    let mirrored = stderr
        .lines()
        .filter(|l| l.contains("hands::audit") && l.contains("seq=") && l.contains("hash="))
        .count();
    assert!(mirrored >= 3, "{stderr}");
    assert!(
        stderr.contains("call-direct") && stderr.contains("toolu_audit01"),
        "{stderr}"
    );
    drop(worker);
    gw.stop().await;
}

/// The worker writes its audit log whatever the log level, and with no
/// `[audit]` table into `$HANDS_DATA_DIR`'s `audit.jsonl`; a call refused by
/// the tool's own validation is audited as an error.
#[tokio::test(flavor = "multi_thread")]
async fn the_audit_log_is_written_at_the_default_log_level() {
    crate::require_sandbox!();
    // A disk filesystem, as a data directory must be.
    let dir = tempfile::Builder::new().tempdir_in("/var/tmp").unwrap();
    let data = dir.path().join("data");
    let w = Daemon::start_by_default(
        dir.path(),
        "worker_id = \"quiet\"\ncapacity = 1\nlisten = \"127.0.0.1:0\"\n",
        &[("HANDS_DATA_DIR", &data)],
    );
    let mut client = w.client().await;
    client
        .open_session(v1::OpenSessionRequest {
            session_id: "q".into(),
            environment: "default".into(),
        })
        .await
        .unwrap();
    let (_, text) = grpc_call(&mut client, "q", "bad", json!({"timeout_ms": 5})).await;
    assert!(!text.is_empty());
    let log = data.join("audit.jsonl");
    let r = only_record(&records(&log), "bad").clone();
    assert_eq!(r["is_error"], true, "{r}");
    assert_eq!(r["worker"], "quiet", "{r}");
    assert_eq!(r["seq"], 1, "{r}");
    assert_eq!(r["prev"], hands::audit::GENESIS, "{r}");
}

/// A log of `n` records written by the audit writer itself, rotated past
/// `max_bytes` (0: never); returns its files, oldest first.
fn write_log(dir: &Path, n: usize, max_bytes: u64) -> Vec<PathBuf> {
    let path = dir.join("audit.jsonl");
    let audit = hands::audit::Auditor::new(
        hands::audit::AuditLog::open(&path, max_bytes, 50).unwrap(),
        "w",
    );
    for i in 0..n {
        let mut f = serde_json::Map::new();
        f.insert("call_id".into(), format!("c{i}").into());
        f.insert("tool".into(), "bash".into());
        audit.record("call", f);
    }
    let mut files: Vec<PathBuf> = (1..=50)
        .rev()
        .map(|k| dir.join(format!("audit.jsonl.{k}")))
        .filter(|f| f.exists())
        .collect();
    files.push(path);
    files
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn put(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// `hands audit verify` on a tampered copy: exit status 1 and the line named.
fn broken(dir: &Path, tamper: impl FnOnce(&mut Vec<String>)) -> String {
    let files = write_log(dir, 6, 0);
    let mut l = lines(&files[0]);
    tamper(&mut l);
    put(&files[0], &l);
    let (code, out) = verify(&files);
    assert_eq!(code, 1, "{out}");
    out
}

#[test]
fn audit_verify_finds_an_edited_record() {
    let dir = tempfile::tempdir().unwrap();
    let out = broken(dir.path(), |l| l[2] = l[2].replace("\"c2\"", "\"c9\""));
    assert!(out.contains("line 4") && out.contains("edited"), "{out}");
}

#[test]
fn audit_verify_finds_a_deleted_record() {
    let dir = tempfile::tempdir().unwrap();
    let out = broken(dir.path(), |l| {
        l.remove(3);
    });
    assert!(out.contains("line 4") && out.contains("deleted"), "{out}");
}

#[test]
fn audit_verify_finds_an_inserted_record() {
    let dir = tempfile::tempdir().unwrap();
    let out = broken(dir.path(), |l| {
        // A forgery that continues the chain where it is put: the record
        // after it no longer does.
        let prev = hands::audit::hash_line(l[1].as_bytes());
        l.insert(
            2,
            json!({"seq": 3, "prev": prev, "kind": "call", "call_id": "forged"}).to_string(),
        );
    });
    assert!(out.contains("line 4") && out.contains("inserted"), "{out}");
}

#[test]
fn audit_verify_finds_reordered_records() {
    let dir = tempfile::tempdir().unwrap();
    let out = broken(dir.path(), |l| l.swap(2, 3));
    assert!(out.contains("line 3") && out.contains("reordered"), "{out}");
}

#[test]
fn audit_verify_accepts_a_rotated_chain_and_refuses_its_files_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_log(dir.path(), 100, 4096);
    assert!(files.len() >= 3, "{files:?}");
    let (code, out) = verify(&files);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("100 records, sequence 1 to 100"), "{out}");
    // The newest file alone: its first record continues the older chain.
    let (code, out) = verify(&files[files.len() - 1..]);
    assert_eq!(code, 0, "{out}");
    // A middle file left out, or the files out of order, break it.
    let mut gap = files.clone();
    gap.remove(1);
    assert_eq!(verify(&gap).0, 1);
    let mut swapped = files.clone();
    swapped.swap(0, 1);
    assert_eq!(verify(&swapped).0, 1);
    // Unreadable: 2.
    let (code, out) = verify(&[dir.path().join("missing")]);
    assert_eq!(code, 2, "{out}");
}

/// A command's `--call-id` is checked as hands.v1 checks ids, before anything
/// is made: an id that could break a log line never reaches one.
#[test]
fn a_command_s_call_id_is_checked_before_anything_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    for cmd in [
        vec!["tool", "--call-id", "evil\n{\"seq\":1}", "bash", "{}"],
        vec!["exec", "--call-id", "a b", "--", "/bin/true"],
    ] {
        let out = Command::new(hands_bin())
            .args(&cmd)
            .env("HANDS_AUDIT_LOG", &log)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("--call-id"), "{err}");
    }
    assert!(!log.exists(), "nothing was audited");
}
