//! Claude Managed Agents. First the fake control plane (`tests/cma/fake_cp.py`)
//! is proven faithful: the official SDK's `EnvironmentWorker` runs against it
//! through scripted sessions (`tests/cma/fidelity.py`) and the fake must see
//! what the contract says. hands' own connector is tested against the same
//! fake.

use std::process::Command;

use crate::differential::{python, sdk_available};

#[test]
fn the_fake_control_plane_is_faithful_to_the_official_sdk_worker() {
    if !sdk_available() {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cma/fidelity.py");
    let out = Command::new(python()).arg(script).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fidelity check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

// ---- hands against the fake -------------------------------------------------

use std::io::BufRead;
use std::sync::Arc;
use std::time::Duration;

use hands::connectors::cma::config::AnthropicConfig;
use hands::connectors::cma::secret::KeySource;
use hands::gateway::client::ApiClient;
use serde_json::{json, Value};

/// The fake control plane, as a process.
pub(crate) struct Fake {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Fake {
    pub(crate) fn start() -> Fake {
        let mut child = Command::new(python())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cma/fake_cp.py"))
            .args(["--port", "0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs the fake");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("fake said {line:?}"))
            .parse()
            .unwrap();
        Fake { child, addr }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) async fn control(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let mut c = ApiClient::new(self.addr, "");
        let a = c.request(method, path, body.as_ref()).await.unwrap();
        assert!(a.status < 300, "{method} {path}: {} {}", a.status, a.body);
        a.body
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Skips (or fails under CI) without the sandbox, or without Python and the SDK.
macro_rules! needs_fake {
    () => {
        crate::require_sandbox!();
        if !crate::differential::sdk_available() {
            return;
        }
    };
}

fn text_of(ev: &Value) -> String {
    ev["content"]
        .as_array()
        .map(|a| a.iter().filter_map(|b| b["text"].as_str()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn hands_serves_a_full_session_through_the_sandbox() {
    needs_fake!();
    let s = Served::start(2, &[]).await;
    let key = s.env["key"].as_str().unwrap().to_string();
    let tool_use = |id: &str, name: &str, input: Value| json!({"type": "agent.tool_use", "id": id, "name": name, "input": input});
    let (sid, work) = s
        .session(
            json!([tool_use(
                "toolu_w",
                "write",
                json!({"file_path": "notes/a.txt", "content": "alpha\nbeta\n"})
            )]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    let token = s
        .fake
        .control("GET", &format!("/_fake/work/{work}"), None)
        .await["sessions_token"]
        .as_str()
        .unwrap()
        .to_string();
    s.append(
        &sid,
        json!([
            tool_use("toolu_r", "read", json!({"file_path": "notes/a.txt"})),
            tool_use("toolu_e", "edit", json!({"file_path": "notes/a.txt", "old_string": "beta", "new_string": "gamma"})),
            tool_use("toolu_g", "glob", json!({"pattern": "**/*.txt"})),
            tool_use("toolu_s", "grep", json!({"pattern": "gam+a"})),
            tool_use("toolu_b", "bash", json!({"command": "cat notes/a.txt; tr '\\0' '\\n' < /proc/self/environ; tr '\\0' '\\n' < /proc/1/environ; env"})),
            tool_use("toolu_n", "read", json!(null)),
            tool_use("toolu_x", "deploy_to_prod", json!({})),
            {"type": "agent.custom_tool_use", "id": "ctu_1", "name": "lookup", "input": {}},
        ]),
    )
    .await;
    let results = s.results(&sid, 7).await;
    let by_id = |id: &str| {
        results
            .iter()
            .find(|e| e["tool_use_id"] == id)
            .unwrap_or_else(|| panic!("no result for {id}: {results:?}"))
            .clone()
    };
    assert_eq!(results.len(), 7, "one result per owned call: {results:?}");
    assert_eq!(text_of(&by_id("toolu_w")), "wrote 11 bytes to notes/a.txt");
    assert_eq!(text_of(&by_id("toolu_r")), "alpha\nbeta\n");
    assert_eq!(by_id("toolu_e")["is_error"], false);
    assert_eq!(text_of(&by_id("toolu_g")), "/workspace/notes/a.txt");
    assert_eq!(
        text_of(&by_id("toolu_s")),
        "/workspace/notes/a.txt:2:gamma\n"
    );
    let bash = text_of(&by_id("toolu_b"));
    assert!(bash.starts_with("alpha\ngamma\n"), "{bash}");
    for secret in [key.as_str(), token.as_str(), "ANTHROPIC_"] {
        assert!(!bash.contains(secret), "the sandbox saw {secret:?}: {bash}");
    }
    assert_eq!(
        by_id("toolu_n")["is_error"],
        true,
        "a null input is an is_error result"
    );
    // The unowned call is left for its owner.
    let log = s
        .fake
        .control("GET", &format!("/_fake/sessions/{sid}"), None)
        .await;
    assert!(!log["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["tool_use_id"] == "toolu_x" || e["custom_tool_use_id"] == "ctu_1"));

    // End of turn: after max_idle the item ends and is force-stopped.
    s.append(&sid, json!([end_turn()])).await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(w["stops"][0]["force"], true);
    let beats = w["heartbeats"].as_array().unwrap();
    assert_eq!(beats[0]["expected_last_heartbeat"], "NO_HEARTBEAT");
    for pair in beats.windows(2) {
        assert_eq!(
            pair[1]["expected_last_heartbeat"], pair[0]["last_heartbeat"],
            "exact echo"
        );
    }
    // Credentials: the environment key for poll and ack, the token for the rest.
    let reqs = s
        .fake
        .control("GET", &format!("/_fake/requests?work_id={work}"), None)
        .await;
    for r in reqs["requests"].as_array().unwrap() {
        let want = if r["endpoint"] == "E2" {
            "environment_key"
        } else {
            "sessions_token"
        };
        assert_eq!(r["credential"]["kind"], want, "{}", r["path"]);
    }
    s.finish().await.unwrap();
}

/// Contract §11 #24 and #31: at attach, a history whose calls are all
/// answered and which ends in an end-of-turn idle: nothing runs again, and the
/// item ends after max_idle. (With an unanswered call before the idle, the
/// SDK worker runs it and then stays, because the echo of its own result
/// disarms the clock; hands does the same. Checked against the SDK on the fake.)
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_history_at_attach_ends_the_item_after_max_idle() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, work) = s
        .session(
            json!([
                bash_use("toolu_done", "echo must not run"),
                {"type": "user.tool_result", "tool_use_id": "toolu_done", "is_error": false, "content": [{"type": "text", "text": "earlier"}]},
                end_turn(),
            ]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "the idle grace ended the item: {w}");
    assert_eq!(w["stops"][0]["force"], true);
    let log = s
        .fake
        .control("GET", &format!("/_fake/sessions/{sid}"), None)
        .await;
    let posted: Vec<&Value> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["_origin"] == "client")
        .collect();
    assert!(posted.is_empty(), "an answered call ran again: {posted:?}");
    s.finish().await.unwrap();
}

// ---- the contract's fault checklist (§11), hands' behaviour ----------------

/// An environment on the fake and a running hands connector.
struct Served {
    fake: Fake,
    env: Value,
    registry: Arc<hands::session::registry::Registry>,
    stop: tokio::sync::watch::Sender<bool>,
    connector: tokio::task::JoinHandle<Result<(), hands::connectors::cma::worker::ConnectorError>>,
    _dir: tempfile::TempDir,
}

impl Served {
    /// The fake with `faults` installed before the connector starts.
    async fn start(capacity: usize, faults: &[Value]) -> Served {
        Served::start_with(capacity, faults, |_| {}, Vec::new()).await
    }

    /// [`Served::start`] with the connector's configuration adjusted and
    /// extra policies offered.
    async fn start_with(
        capacity: usize,
        faults: &[Value],
        tweak: impl FnOnce(&mut AnthropicConfig),
        extra_policies: Vec<hands::policy::Policy>,
    ) -> Served {
        let fake = Fake::start();
        let env = fake
            .control("POST", "/_fake/environments", Some(json!({})))
            .await;
        for f in faults {
            fake.control("POST", "/_fake/faults", Some(f.clone())).await;
        }
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("environment-key");
        std::fs::write(&key_file, env["key"].as_str().unwrap()).unwrap();
        let cfg = AnthropicConfig {
            environment_id: env["id"].as_str().unwrap().into(),
            key: KeySource::File(key_file),
            environment: "default".into(),
            capacity,
            max_idle: Some(Duration::from_secs(2)),
            base_url: fake.url(),
            memory_sync: Some(Duration::from_secs(5)),
            memory_deletions: hands::connectors::cma::memory::Deletions::Enabled,
            stream_read_timeout: Duration::from_secs(600),
            skill_limits: hands::connectors::cma::skills::SkillLimits {
                archive_bytes: 1 << 20,
                entries: 100,
                unpacked_bytes: 4 << 20,
            },
            workspace_retention: Duration::from_secs(7 * 24 * 3600),
        };
        let mut cfg = cfg;
        tweak(&mut cfg);
        let policies = hands::policy::PolicySet::builtin()
            .iter()
            .cloned()
            .chain(extra_policies)
            .collect::<Vec<_>>();
        // Kept workspaces (one per session) in the test's own data directory,
        // gone with it.
        let mut sandbox = crate::util::config();
        sandbox.data_dir = dir.path().join("data");
        sandbox.workspaces = Arc::new(hands::workspace::Workspaces::new(
            sandbox.state_dir.clone(),
            sandbox.data_dir.clone(),
        ));
        let registry = Arc::new(hands::session::registry::Registry::new(
            sandbox,
            policies,
            capacity + 1,
        ));
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let connector = tokio::spawn(hands::connectors::cma::worker::run(
            cfg,
            "it-worker".into(),
            registry.clone(),
            shutdown,
        ));
        Served {
            fake,
            env,
            registry,
            stop,
            connector,
            _dir: dir,
        }
    }

    /// A session with `events` in its history; returns (session id, work id).
    async fn session(&self, events: Value, work: Value) -> (String, String) {
        let c = self
            .fake
            .control(
                "POST",
                "/_fake/sessions",
                Some(json!({"environment_id": self.env["id"], "events": events, "work": work})),
            )
            .await;
        (
            c["session"]["id"].as_str().unwrap().to_string(),
            c["work"]["id"].as_str().unwrap().to_string(),
        )
    }

    async fn append(&self, sid: &str, events: Value) {
        self.fake
            .control(
                "POST",
                &format!("/_fake/sessions/{sid}/events"),
                Some(json!({"events": events})),
            )
            .await;
    }

    /// The results posted so far (waiting for at least `n`).
    async fn results(&self, sid: &str, n: usize) -> Vec<Value> {
        let r = self
            .fake
            .control(
                "GET",
                &format!("/_fake/sessions/{sid}/events?type=user.tool_result&wait_count={n}&timeout_ms=30000"),
                None,
            )
            .await;
        r["data"].as_array().unwrap().clone()
    }

    async fn work_state(&self, work: &str, state: &str) -> Value {
        self.fake
            .control(
                "GET",
                &format!("/_fake/work/{work}?wait_state={state}&timeout_ms=20000"),
                None,
            )
            .await
    }

    /// Where the workspace kept for session `sid` lives on the host.
    fn kept_image(&self, sid: &str) -> std::path::PathBuf {
        self.registry
            .sandbox()
            .data_dir
            .join("kept")
            .join(format!("kept-{sid}.img"))
    }

    /// Enqueues another work item of session `sid` (the next turn).
    async fn next_item(&self, sid: &str, work: Value) -> String {
        self.fake
            .control("POST", &format!("/_fake/sessions/{sid}/work"), Some(work))
            .await["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn finish(self) -> Result<(), hands::connectors::cma::worker::ConnectorError> {
        self.stop.send_replace(true);
        let r = tokio::time::timeout(Duration::from_secs(15), self.connector)
            .await
            .expect("the connector stops")
            .unwrap();
        assert_eq!(
            self.registry.open_sessions(),
            0,
            "every item's sandbox session closed"
        );
        r
    }
}

pub(crate) fn bash_use(id: &str, command: &str) -> Value {
    json!({"type": "agent.tool_use", "id": id, "name": "bash", "input": {"command": command}})
}

fn end_turn() -> Value {
    json!({"type": "session.status_idle", "stop_reason": {"type": "end_turn"}})
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_4_a_healthcheck_item_is_acked_and_force_stopped_without_heartbeat() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let w = s
        .fake
        .control(
            "POST",
            &format!("/_fake/environments/{}/work", s.env["id"].as_str().unwrap()),
            Some(json!({"data": {"type": "healthcheck"}})),
        )
        .await;
    let w = s.work_state(w["id"].as_str().unwrap(), "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(w["acks"].as_array().unwrap().len(), 1);
    assert!(w["heartbeats"].as_array().unwrap().is_empty());
    assert_eq!(w["stops"][0]["force"], true);
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_2_and_5_poll_and_ack_failures_are_survived() {
    needs_fake!();
    // Two failed polls (each with the client's own retries) and one failed
    // ack (the item is offered again after the reclaim delay).
    let s = Served::start(
        1,
        &[
            json!({"endpoint": "E1", "status": 503, "times": 6}),
            json!({"endpoint": "E2", "status": 500, "times": 3}),
        ],
    )
    .await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_1", "echo survived")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    let r = s.results(&sid, 1).await;
    assert_eq!(text_of(&r[0]), "survived");
    let w = s.work_state(&work, "active").await;
    assert!(
        w["offers"].as_array().unwrap().len() >= 2 && w["reclaims"].as_u64() >= Some(1),
        "the un-acked item was offered again: {w}"
    );
    let polls = s
        .fake
        .control("GET", "/_fake/requests?endpoint=E1", None)
        .await;
    let failed = polls["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == 503)
        .count();
    assert_eq!(failed, 6, "two polls, each with the client's two retries");
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_3_a_refused_environment_key_stops_the_connector() {
    needs_fake!();
    let s = Served::start(
        1,
        &[json!({"endpoint": "E1", "status": 401, "times": null})],
    )
    .await;
    let r = tokio::time::timeout(Duration::from_secs(15), s.connector)
        .await
        .expect("the connector gives up on 401")
        .unwrap();
    let e = r.expect_err("a refused key is an error").to_string();
    assert!(e.contains("401"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_8_a_terminated_session_is_force_stopped_without_events_calls() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let c = s
        .fake
        .control(
            "POST",
            "/_fake/sessions",
            Some(json!({"environment_id": s.env["id"], "status": "terminated", "work": {"ttl_seconds": 4}})),
        )
        .await;
    let work = c["work"]["id"].as_str().unwrap().to_string();
    let sid = c["session"]["id"].as_str().unwrap().to_string();
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["stops"][0]["force"], true);
    let reqs = s
        .fake
        .control("GET", &format!("/_fake/requests?session_id={sid}"), None)
        .await;
    let endpoints: Vec<&str> = reqs["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["endpoint"].as_str())
        .collect();
    assert!(
        !endpoints.iter().any(|e| ["E6", "E7", "E8"].contains(e)),
        "{endpoints:?}"
    );
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_16_after_a_412_the_call_in_flight_is_killed_and_nothing_is_posted() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, work) = s
        .session(
            json!([bash_use(
                "toolu_long",
                "echo started > mark; sleep 31.7; echo done"
            )]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.work_state(&work, "active").await;
    // The call has started: its mark is in the session's workspace on the host,
    // and its sleep is running.
    let mark = s
        .registry
        .sandbox()
        .state_dir
        .join("workspaces")
        .join(format!("kept-{sid}"))
        .join("mark");
    let running = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .any(|c| c == b"sleep\x0031.7\x00")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !(mark.exists() && running()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the call never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another worker takes the lease: the next heartbeat is a 412.
    s.fake
        .control(
            "POST",
            &format!("/_fake/work/{work}/steal"),
            Some(json!({})),
        )
        .await;
    // hands gives up the item: no stop, no result (the SDK worker would
    // still post the result 30 s later), and the call's process is killed.
    s.gave_up(&sid, &work).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while running() {
        assert!(
            std::time::Instant::now() < deadline,
            "the call in flight was not killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_29_a_refused_result_is_re_posted_after_reconnect_never_re_run() {
    needs_fake!();
    // The first result post is refused (400, fatal); the stream then drops,
    // and the reconcile finds the call unanswered.
    let s = Served::start(1, &[json!({"endpoint": "E8", "status": 400, "times": 1})]).await;
    let (sid, _work) = s
        .session(
            json!([bash_use(
                "toolu_once",
                "echo x >> runs.log; wc -l < runs.log"
            )]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    // Wait for the refused post, then drop the stream.
    s.fake
        .control("GET", &format!("/_fake/requests?session_id={sid}&endpoint=E8&wait_count=1&completed=1&timeout_ms=20000"), None)
        .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/sessions/{sid}/streams/close"),
            Some(json!({"mode": "clean"})),
        )
        .await;
    let r = s.results(&sid, 1).await;
    assert_eq!(r.len(), 1);
    assert_eq!(text_of(&r[0]), "1", "the stored result, from the only run");
    // The command ran once: a second run would have made it 2.
    s.append(&sid, json!([bash_use("toolu_count", "wc -l < runs.log")]))
        .await;
    let r = s.results(&sid, 2).await;
    let count = r
        .iter()
        .find(|e| e["tool_use_id"] == "toolu_count")
        .unwrap();
    assert_eq!(text_of(count), "1");
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_25_and_26_stream_loss_reconnects_and_missed_calls_run() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, _work) = s
        .session(
            json!([bash_use("toolu_1", "echo one")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.results(&sid, 1).await;
    // An error frame, then a call appended to history only while the worker
    // is reconnecting: the re-list finds it.
    s.fake
        .control(
            "POST",
            &format!("/_fake/sessions/{sid}/streams/close"),
            Some(json!({"mode": "error"})),
        )
        .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/sessions/{sid}/events"),
            Some(json!({"events": [bash_use("toolu_2", "echo two")], "broadcast": false})),
        )
        .await;
    let r = s.results(&sid, 2).await;
    assert!(
        r.iter()
            .any(|e| e["tool_use_id"] == "toolu_2" && text_of(e) == "two"),
        "{r:?}"
    );
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_33_ask_waits_for_a_confirmation_deny_never_runs() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let ask = |id: &str, cmd: &str, perm: &str| json!({"type": "agent.tool_use", "id": id, "name": "bash", "input": {"command": cmd}, "evaluated_permission": perm});
    let (sid, _work) = s
        .session(
            json!([
                ask("toolu_ask", "echo asked", "ask"),
                ask("toolu_deny", "touch denied-ran", "deny")
            ]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = s
        .fake
        .control("GET", &format!("/_fake/sessions/{sid}"), None)
        .await;
    assert!(
        !log["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["_origin"] == "client"),
        "ran before the verdict"
    );
    s.append(
        &sid,
        json!([{"type": "user.tool_confirmation", "tool_use_id": "toolu_ask", "result": "allow"}]),
    )
    .await;
    let r = s.results(&sid, 1).await;
    assert_eq!(text_of(&r[0]), "asked");
    s.append(
        &sid,
        json!([bash_use("toolu_check", "ls denied-ran 2>&1 || true")]),
    )
    .await;
    let r = s.results(&sid, 2).await;
    let check = r
        .iter()
        .find(|e| e["tool_use_id"] == "toolu_check")
        .unwrap();
    assert!(
        text_of(check).contains("No such file"),
        "the denied call ran: {check}"
    );
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn three_items_are_served_at_once_each_in_its_own_sandbox() {
    needs_fake!();
    let s = Served::start(3, &[]).await;
    let mut sessions = Vec::new();
    for i in 0..3 {
        sessions.push(
            s.session(
                json!([bash_use(
                    "toolu_a",
                    &format!("echo item{i} > mine; sleep 2; cat mine; ls")
                )]),
                json!({"ttl_seconds": 4}),
            )
            .await,
        );
    }
    for (i, (sid, _)) in sessions.iter().enumerate() {
        let r = s.results(sid, 1).await;
        assert_eq!(
            text_of(&r[0]),
            format!("item{i}\nmine"),
            "a workspace of its own"
        );
    }
    // Served at once: every item was acked before any result was posted
    // (with one slot, the next poll waits for the previous item to end).
    let reqs = s.fake.control("GET", "/_fake/requests", None).await;
    let seqs = |endpoint: &str| -> Vec<u64> {
        reqs["requests"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["endpoint"] == endpoint && r["status"] == 200)
            .map(|r| r["seq"].as_u64().unwrap())
            .collect()
    };
    let (acks, posts) = (seqs("E2"), seqs("E8"));
    assert_eq!(acks.len(), 3);
    assert!(
        acks.iter().max() < posts.iter().min(),
        "acks {acks:?}, posts {posts:?}"
    );
    // Each item ends on its own idle, and is force-stopped.
    for (sid, work) in &sessions {
        s.append(sid, json!([end_turn()])).await;
        let w = s.work_state(work, "stopped").await;
        assert_eq!(w["stops"][0]["force"], true, "{w}");
    }
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_17_a_rejected_heartbeat_ends_the_item_with_a_force_stop() {
    needs_fake!();
    // Heartbeats after the first are refused (403).
    let s = Served::start(
        1,
        &[json!({"endpoint": "E3", "status": 403, "skip": 1, "times": null})],
    )
    .await;
    let (_sid, work) = s
        .session(
            json!([bash_use("toolu_1", "sleep 1; echo ok")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(w["stops"][0]["force"], true);
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_20_and_29_a_stop_answered_409_is_tolerated_and_a_503_on_send_is_retried() {
    needs_fake!();
    let s = Served::start(
        1,
        &[
            json!({"endpoint": "E8", "status": 503, "times": 4}),
            json!({"endpoint": "E4", "status": 409, "times": null}),
        ],
    )
    .await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_1", "echo posted at last")]),
            json!({"ttl_seconds": 30}),
        )
        .await;
    let r = s.results(&sid, 1).await;
    assert_eq!(text_of(&r[0]), "posted at last");
    let posts = s
        .fake
        .control(
            "GET",
            &format!("/_fake/requests?session_id={sid}&endpoint=E8"),
            None,
        )
        .await;
    assert_eq!(
        posts["requests"].as_array().unwrap().len(),
        5,
        "4 refusals, then the post"
    );
    s.append(&sid, json!([end_turn()])).await;
    // The stop keeps answering 409: the client's three attempts, then silence.
    let reqs = s
        .fake
        .control(
            "GET",
            &format!("/_fake/requests?work_id={work}&endpoint=E4&wait_count=3&timeout_ms=20000"),
            None,
        )
        .await;
    assert_eq!(reqs["requests"].as_array().unwrap().len(), 3);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = s
        .fake
        .control(
            "GET",
            &format!("/_fake/requests?work_id={work}&endpoint=E4"),
            None,
        )
        .await;
    assert_eq!(
        again["requests"].as_array().unwrap().len(),
        3,
        "no retries beyond the client's"
    );
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_34_calls_of_a_terminated_thread_are_neither_run_nor_answered() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, _work) = s
        .session(
            json!([bash_use("toolu_1", "echo primary")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.results(&sid, 1).await;
    let mut in_thread = bash_use("toolu_t", "touch thread-ran");
    in_thread["session_thread_id"] = json!("sthr_1");
    s.append(
        &sid,
        json!([{"type": "session.thread_status_terminated", "session_thread_id": "sthr_1"}, in_thread]),
    )
    .await;
    s.append(
        &sid,
        json!([bash_use("toolu_check", "ls thread-ran 2>&1 || true")]),
    )
    .await;
    let r = s.results(&sid, 2).await;
    assert!(!r.iter().any(|e| e["tool_use_id"] == "toolu_t"), "{r:?}");
    let check = r
        .iter()
        .find(|e| e["tool_use_id"] == "toolu_check")
        .unwrap();
    assert!(text_of(check).contains("No such file"), "{check}");
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_37_shutting_down_mid_session_tears_down_and_force_stops() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_1", "echo one")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.results(&sid, 1).await;
    s.append(&sid, json!([bash_use("toolu_2", "sleep 60 & sleep 60")]))
        .await;
    s.fake
        .control(
            "GET",
            &format!("/_fake/requests?session_id={sid}&endpoint=E7&wait_count=1&timeout_ms=10000"),
            None,
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SIGTERM, in effect: the item is torn down (its processes killed with
    // its sandbox session) and force-stopped.
    s.stop.send_replace(true);
    let w = s
        .fake
        .control(
            "GET",
            &format!("/_fake/work/{work}?wait_state=stopped&timeout_ms=15000"),
            None,
        )
        .await;
    assert_eq!(w["stops"][0]["force"], true, "{w}");
    s.finish().await.unwrap();
}

// ---- skills and memory stores ---------------------------------------------

impl Served {
    /// A session from a full `/_fake/sessions` spec (events, skills,
    /// resources, work); returns (session id, work id).
    async fn session_spec(&self, mut spec: Value) -> (String, String) {
        spec["environment_id"] = self.env["id"].clone();
        let c = self
            .fake
            .control("POST", "/_fake/sessions", Some(spec))
            .await;
        (
            c["session"]["id"].as_str().unwrap().to_string(),
            c["work"]["id"].as_str().unwrap().to_string(),
        )
    }

    /// Waits until the item's sandbox session is open and the history's
    /// call `id` has been read (the stream and the listing are up).
    async fn running(&self, sid: &str, id: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.registry.open_sessions() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no sandbox session for {id}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let r = self
            .fake
            .control(
                "GET",
                &format!("/_fake/requests?endpoint=E7&session_id={sid}&completed=1&wait_count=1&timeout_ms=20000"),
                None,
            )
            .await;
        assert!(
            !r["requests"].as_array().unwrap().is_empty(),
            "history never read"
        );
        tokio::time::sleep(Duration::from_millis(300)).await; // the call starts
    }

    /// Waits until every item's sandbox session is closed.
    async fn closed(&self) {
        until("the item's sandbox closed", || async {
            self.registry.open_sessions() == 0
        })
        .await;
    }

    /// The item was given up as another worker's (its lease lost): its
    /// sandbox closed, nothing posted to the session (not even a moment
    /// later), no stop sent.
    async fn gave_up(&self, sid: &str, work: &str) {
        self.closed().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let log = self
            .fake
            .control("GET", &format!("/_fake/sessions/{sid}"), None)
            .await;
        let posted: Vec<&Value> = log["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["_origin"] == "client")
            .collect();
        assert!(
            posted.is_empty(),
            "posted after losing the lease: {posted:?}"
        );
        let w = self
            .fake
            .control("GET", &format!("/_fake/work/{work}"), None)
            .await;
        assert!(
            w["stops"].as_array().unwrap().is_empty(),
            "stopped an item it no longer holds: {w}"
        );
    }

    /// Runs one call and returns its result (text, is_error).
    async fn call(&self, sid: &str, event: Value) -> (String, bool) {
        self.fake.call(sid, event).await
    }

    async fn bash(&self, sid: &str, id: &str, command: &str) -> String {
        self.call(sid, bash_use(id, command)).await.0
    }
}

impl Fake {
    /// Appends one call to the session's history and returns its result
    /// (text, is_error) once a worker posted it.
    pub(crate) async fn call(&self, sid: &str, event: Value) -> (String, bool) {
        let id = event["id"].as_str().unwrap().to_string();
        self.control(
            "POST",
            &format!("/_fake/sessions/{sid}/events"),
            Some(json!({"events": [event]})),
        )
        .await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let log = self
                .control("GET", &format!("/_fake/sessions/{sid}"), None)
                .await;
            if let Some(e) = log["events"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["type"] == "user.tool_result" && e["tool_use_id"] == id.as_str())
            {
                return (text_of(e), e["is_error"] == true);
            }
            assert!(std::time::Instant::now() < deadline, "no result for {id}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Archives built by Python's zipfile/tarfile, which write hostile member
/// names as given: name → base64.
fn archives() -> Value {
    let script = r##"
import base64, io, json, tarfile, zipfile
def z(members):
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as f:
        for name, data, mode in members:
            i = zipfile.ZipInfo(name); i.create_system = 3; i.external_attr = mode << 16
            f.writestr(i, data)
    return b.getvalue()
def t(members, compression=""):
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w:" + compression) as f:
        for name, data, kind in members:
            i = tarfile.TarInfo(name)
            if kind == "sym":
                i.type = tarfile.SYMTYPE; i.linkname = data; f.addfile(i)
            elif kind == "hard":
                i.type = tarfile.LNKTYPE; i.linkname = data; f.addfile(i)
            else:
                i.size = len(data); i.mode = 0o644; f.addfile(i, io.BytesIO(data))
    return b.getvalue()
out = {
  "pdf_v1": z([("pdf/SKILL.md", b"old", 0o100644)]),
  "pdf_v2": z([("pdf/SKILL.md", b"# PDF skill v2\n", 0o100644),
               ("pdf/scripts/run.sh", b"#!/bin/sh\necho run\n", 0o104755)]),
  "flat": t([("SKILL.md", b"flat", "file"), ("notes/a.txt", b"a", "file")], "gz"),
  "dotdot": t([("ok.txt", b"fine", "file"), ("../escaped.txt", b"x", "file")], "bz2"),
  "absolute": z([("ok.txt", b"fine", 0o100644), ("/tmp/abs-escape.txt", b"x", 0o100644)]),
  "links": t([("links/ok.txt", b"kept", "file"), ("links/shadow", "/etc/shadow", "sym"),
              ("links/hard", "/etc/shadow", "hard")], "xz"),
  "bomb": t([("big.bin", b"\0" * (8 << 20), "file")], "gz"),
}
print(json.dumps({k: base64.b64encode(v).decode() for k, v in out.items()}))
"##;
    let out = Command::new(crate::differential::python())
        .args(["-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Contract §7 and §11 #11: `latest` resolves through E9, a wrapper
/// directory is stripped, modes follow the archive; archives with `..`,
/// absolute or link members, one too big, and one whose download fails are
/// refused — each a warning, the session proceeds. Skills live in the item's
/// workspace and go with it.
#[tokio::test(flavor = "multi_thread")]
async fn skills_are_staged_and_hostile_archives_refused() {
    needs_fake!();
    let a = archives();
    let s = Served::start(
        1,
        &[json!({"endpoint": "E10", "status": 500, "path": "skill_broken", "times": null})],
    )
    .await;
    let skill = |id: &str, name: &str, versions: &[&str]| {
        json!({"skill_id": id, "versions": versions.iter().enumerate().map(|(i, k)| json!({
            "version": format!("{}", i + 1), "name": name, "archive_b64": a[*k]
        })).collect::<Vec<_>>()})
    };
    for spec in [
        skill("skill_pdf", "anthropic/pdf", &["pdf_v1", "pdf_v2"]),
        skill("skill_flat", " flat ", &["flat"]),
        skill("skill_dotdot", "dotdot", &["dotdot"]),
        skill("skill_abs", "absolute", &["absolute"]),
        skill("skill_links", "links", &["links"]),
        skill("skill_bomb", "bomb", &["bomb"]),
        skill("skill_broken", "broken", &["flat"]),
    ] {
        s.fake.control("POST", "/_fake/skills", Some(spec)).await;
    }
    let uses = |id: &str| json!({"type": "custom", "skill_id": id, "version": "latest"});
    let (sid, work) = s
        .session_spec(json!({
            "skills": [uses("skill_pdf"), uses("skill_flat"), uses("skill_dotdot"), uses("skill_abs"),
                       uses("skill_links"), uses("skill_bomb"), uses("skill_broken")],
            "events": [],
            "work": {"ttl_seconds": 4},
        }))
        .await;
    let listing = s
        .bash(&sid, "toolu_ls", "cd /workspace && find . -printf '%p %m %y\\n' | sort; cat skills/pdf/SKILL.md; ls / /tmp")
        .await;
    for want in [
        "./skills 700 d",
        "./skills/pdf 700 d",
        "./skills/pdf/SKILL.md 644 f",
        "./skills/pdf/scripts/run.sh 755 f",
        "./skills/flat 700 d",
        "./skills/flat/SKILL.md 644 f",
        "./skills/flat/notes/a.txt 644 f",
        "./skills/links/ok.txt 644 f",
        "# PDF skill v2",
    ] {
        assert!(
            listing.lines().any(|l| l == want),
            "missing {want:?} in:\n{listing}"
        );
    }
    for absent in [
        "dotdot", "absolute", "shadow", "hard", "bomb", "broken", ".skill-", "escape",
    ] {
        assert!(
            !listing.contains(absent),
            "{absent:?} must not be there:\n{listing}"
        );
    }
    // E9 with `latest`, then E10 by the concrete version id.
    let reqs = s
        .fake
        .control("GET", "/_fake/requests?skill_id=skill_pdf", None)
        .await;
    let reqs = reqs["requests"].as_array().unwrap();
    assert_eq!(reqs[0]["endpoint"], "E9");
    assert!(reqs[0]["path"]
        .as_str()
        .unwrap()
        .ends_with("/versions/latest"));
    assert_eq!(reqs[1]["endpoint"], "E10");
    assert!(!reqs[1]["path"].as_str().unwrap().contains("latest"));
    assert_eq!(reqs[1]["headers"]["accept"], "application/binary");
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&work, "stopped").await;
    s.finish().await.unwrap();
}

async fn store(s: &Served, memories: Value) -> String {
    let m = s
        .fake
        .control(
            "POST",
            "/_fake/memory_stores",
            Some(json!({"memories": memories})),
        )
        .await;
    m["id"].as_str().unwrap().to_string()
}

/// The memories of a store on the fake: path → content.
async fn remote(s: &Served, id: &str) -> std::collections::BTreeMap<String, String> {
    let m = s
        .fake
        .control("GET", &format!("/_fake/memory_stores/{id}"), None)
        .await;
    m["memories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["path"].as_str().unwrap().to_string(),
                m["content"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

async fn until<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Contract §8: stores are downloaded with their marker, synced both ways
/// after calls (new, edited, server-side new/changed/deleted), deletions wait
/// for the final sync, and a read-only store is read-only to bash as well.
/// The store appears at the server's mount path inside the sandbox only: on
/// the host it lives in the item's workspace.
#[tokio::test(flavor = "multi_thread")]
async fn memory_stores_sync_both_ways_at_their_mount_paths() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let notes = store(
        &s,
        json!([
            {"path": "/a.md", "content": "alpha\n"},
            {"path": "/dir/b.md", "content": "beta\n"},
            {"path": "/gone.md", "content": "gone\n"},
        ]),
    )
    .await;
    let kb = store(&s, json!([{"path": "/k.md", "content": "kb\n"}])).await;
    let mnt = format!("/srv/hands-it-{}/notes", std::process::id());
    let (sid, work) = s
        .session_spec(json!({
            "resources": [
                {"type": "memory_store", "memory_store_id": notes, "mount_path": mnt, "access": "read_write", "name": "notes"},
                {"type": "memory_store", "memory_store_id": kb, "mount_path": "/workspace/kb", "access": "read_only", "name": "kb"},
            ],
            "events": [],
            "work": {"ttl_seconds": 10},
        }))
        .await;
    let out = s
        .bash(&sid, "toolu_1", &format!("cat {mnt}/a.md {mnt}/dir/b.md /workspace/kb/k.md {mnt}/.anthropic-memory-store; echo; echo x > /workspace/kb/x.md"))
        .await;
    assert!(
        out.starts_with(&format!("alpha\nbeta\nkb\nversion 1\n{notes}\n")),
        "{out}"
    );
    assert!(
        out.contains("Read-only file system"),
        "a read-only store is read-only to bash: {out}"
    );
    assert!(
        !std::path::Path::new(&mnt).exists(),
        "the server's mount path exists inside the sandbox only"
    );
    let w = s
        .call(&sid, json!({"type": "agent.tool_use", "id": "toolu_2", "name": "write", "input": {"file_path": format!("{mnt}/c.md"), "content": "gamma\n"}}))
        .await;
    assert!(!w.1, "{w:?}");
    let e = s
        .call(&sid, json!({"type": "agent.tool_use", "id": "toolu_3", "name": "edit", "input": {"file_path": format!("{mnt}/a.md"), "old_string": "alpha", "new_string": "ALPHA"}}))
        .await;
    assert!(!e.1, "{e:?}");
    s.bash(
        &sid,
        "toolu_4",
        &format!("rm {mnt}/dir/b.md; ln -s /etc/passwd {mnt}/passwd.md; ln -s /etc {mnt}/etc"),
    )
    .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/memory_stores/{notes}/memories"),
            Some(json!({"path": "/d.md", "content": "delta\n"})),
        )
        .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/memory_stores/{notes}/memories/delete"),
            Some(json!({"path": "/gone.md"})),
        )
        .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/memory_stores/{kb}/memories"),
            Some(json!({"path": "/k.md", "content": "kb2\n"})),
        )
        .await;
    // The sync interval (5 s) passes; the next call triggers a sync.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    s.bash(&sid, "toolu_5", "true").await;
    until("c.md uploaded", || async {
        remote(&s, &notes).await.contains_key("/c.md")
    })
    .await;
    until("a.md updated", || async {
        remote(&s, &notes).await.get("/a.md").map(String::as_str) == Some("ALPHA\n")
    })
    .await;
    // Syncs run beside the calls: wait for the read-only store's pull.
    let pulled = s
        .fake
        .control("GET", &format!("/_fake/requests?endpoint=E12&memory_store_id={kb}&completed=1&wait_count=1&timeout_ms=20000"), None)
        .await;
    assert_eq!(pulled["requests"].as_array().unwrap().len(), 1, "{pulled}");
    let out = s
        .bash(&sid, "toolu_6", &format!("for i in $(seq 100); do grep -q kb2 /workspace/kb/k.md && break; sleep 0.1; done; cat {mnt}/d.md /workspace/kb/k.md; ls {mnt}"))
        .await;
    assert!(out.starts_with("delta\nkb2\n"), "{out}");
    assert!(
        !out.contains("gone.md"),
        "deleted on the server, unchanged here: {out}"
    );
    let r = remote(&s, &notes).await;
    assert_eq!(r.get("/c.md").map(String::as_str), Some("gamma\n"));
    assert!(
        r.contains_key("/dir/b.md"),
        "a local deletion waits 30 s (or the final sync)"
    );
    assert!(
        !r.keys()
            .any(|k| k.contains("passwd") || k.starts_with("/etc")),
        "symlinks are never followed: {r:?}"
    );
    assert!(!r.contains_key("/.anthropic-memory-store"));
    assert_eq!(
        remote(&s, &kb).await.len(),
        1,
        "nothing is pushed to a read-only store"
    );

    // End of turn: the clean end's final sync sends the deletion.
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&work, "stopped").await;
    until("b.md deleted", || async {
        !remote(&s, &notes).await.contains_key("/dir/b.md")
    })
    .await;
    let reqs = s
        .fake
        .control("GET", "/_fake/requests?endpoint=E15", None)
        .await;
    let del = &reqs["requests"][0];
    assert!(
        del["raw_query"]
            .as_str()
            .unwrap()
            .starts_with("expected_content_sha256="),
        "{del}"
    );
    s.finish().await.unwrap();
}

/// Attack on the host side of memory sync, which runs as root outside the
/// sandbox: the agent plants symlinks whose targets the host would resolve
/// in its own filesystem. The decoys stand for what an agent would aim at —
/// a host file (`a.md` → it; a changed server memory would be written
/// through the link, and the file read and uploaded), a host directory
/// (`sub` → it; a new server memory would land there), and finally the whole
/// folder swapped for a link to a directory holding a valid marker, as
/// another session's folder of the same store would. The worker follows none
/// of them: the decoys are untouched and nothing of theirs is uploaded.
#[tokio::test(flavor = "multi_thread")]
async fn the_host_side_of_memory_sync_follows_none_of_the_agents_symlinks() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let notes = store(
        &s,
        json!([{"path": "/a.md", "content": "alpha\n"}, {"path": "/b.md", "content": "beta\n"}]),
    )
    .await;
    let decoy = tempfile::tempdir().unwrap();
    let (file, dir) = (
        decoy.path().join("host-file"),
        decoy.path().join("host-dir"),
    );
    std::fs::write(&file, "decoy file secret\n").unwrap();
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("secret.md"), "decoy dir secret\n").unwrap();
    std::fs::write(
        dir.join(".anthropic-memory-store"),
        format!("version 1\n{notes}"),
    )
    .unwrap();
    let (sid, work) = s
        .session_spec(json!({
            "resources": [{"type": "memory_store", "memory_store_id": notes, "mount_path": "/mnt/memory/notes", "access": "read_write"}],
            "events": [],
            "work": {"ttl_seconds": 10},
        }))
        .await;
    let (file, dir) = (file.display().to_string(), dir.display().to_string());
    s.bash(
        &sid,
        "toolu_1",
        &format!("F=$(readlink -f /mnt/memory/notes); rm $F/a.md && ln -s {file} $F/a.md && ln -s {dir} $F/sub && echo planted"),
    )
    .await;
    for (path, content) in [
        ("/a.md", "written through a.md\n"),
        ("/sub/owned.md", "owned\n"),
    ] {
        s.fake
            .control(
                "POST",
                &format!("/_fake/memory_stores/{notes}/memories"),
                Some(json!({"path": path, "content": content})),
            )
            .await;
    }
    tokio::time::sleep(Duration::from_millis(5500)).await;
    s.bash(&sid, "toolu_2", "true").await;
    // The sync after that call has listed the store (and, done wrong, would
    // have pulled through the links by now).
    requests(
        &s,
        &format!("endpoint=E11&memory_store_id={notes}&query=view%3Dbasic&completed=1&wait_count=1&timeout_ms=20000"),
    )
    .await;
    // Now the whole folder: a link to a directory with a valid marker.
    s.bash(
        &sid,
        "toolu_3",
        &format!(
            "F=$(readlink -f /mnt/memory/notes); mv $F $F.old && ln -s {dir} $F && echo swapped"
        ),
    )
    .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/memory_stores/{notes}/memories"),
            Some(json!({"path": "/owned2.md", "content": "owned\n"})),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(5500)).await;
    s.bash(&sid, "toolu_4", "true").await;
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&work, "stopped").await;
    s.closed().await;
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "decoy file secret\n"
    );
    let mut in_dir: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    in_dir.sort();
    assert_eq!(
        in_dir,
        [".anthropic-memory-store", "secret.md"],
        "written into the host directory"
    );
    for r in requests(&s, &format!("memory_store_id={notes}")).await {
        assert!(
            !r["body_text"].as_str().unwrap_or("").contains("decoy"),
            "a host file was uploaded: {r}"
        );
    }
    let remote = remote(&s, &notes).await;
    assert!(!remote.contains_key("/secret.md"), "{remote:?}");
    s.finish().await.unwrap();
}

/// §11 #9: the session fetch fails (500 past the client's retries) → the
/// item fails and is force-stopped; polling goes on and the next item is
/// served.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_9_a_failed_session_fetch_fails_only_that_item() {
    needs_fake!();
    let s = Served::start(1, &[json!({"endpoint": "E5", "status": 500, "times": 3})]).await;
    let (_, first) = s.session(json!([]), json!({"ttl_seconds": 4})).await;
    let w = s.work_state(&first, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(w["stops"][0]["force"], true);
    let (sid, _) = s
        .session(
            json!([bash_use("toolu_1", "echo next")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    assert_eq!(text_of(&s.results(&sid, 1).await[0]), "next");
    s.finish().await.unwrap();
}

/// §11 #10: memory stores on an item without a sessions token: the memory
/// endpoints refuse the environment key, so the item fails at once and is
/// force-stopped; no event is read.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_10_memory_stores_without_a_sessions_token_fail_the_item() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let m = store(&s, json!([])).await;
    let (sid, work) = s
        .session_spec(json!({
            "resources": [{"type": "memory_store", "memory_store_id": m, "mount_path": "/mnt/memory/m"}],
            "events": [bash_use("toolu_1", "echo must not run")],
            "work": {"ttl_seconds": 4, "secret": false},
        }))
        .await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(w["stops"][0]["force"], true);
    let reqs = s
        .fake
        .control("GET", &format!("/_fake/requests?session_id={sid}"), None)
        .await;
    let reqs = &reqs["requests"];
    assert!(
        !reqs
            .as_array()
            .unwrap()
            .iter()
            .any(|r| matches!(r["endpoint"].as_str(), Some("E6" | "E7" | "E8" | "E11"))),
        "{reqs}"
    );
    s.finish().await.unwrap();
}

/// §11 #27: the event stream answers 401 → the runner ends, teardown,
/// force-stop.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_27_a_refused_stream_ends_the_item() {
    needs_fake!();
    let s = Served::start(
        1,
        &[json!({"endpoint": "E6", "status": 401, "times": null})],
    )
    .await;
    let (_, work) = s.session(json!([]), json!({"ttl_seconds": 4})).await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(w["stops"][0]["force"], true);
    s.finish().await.unwrap();
}

/// §11 #18/#19: heartbeats that never answer. Past the TTL the lease is
/// assumed lost: hands abandons the call in flight (its processes die with
/// the sandbox), posts nothing and does not stop the item. (The SDK worker
/// lets the call finish and posts its result.)
#[tokio::test(flavor = "multi_thread")]
async fn checklist_19_blackholed_heartbeats_end_in_an_assumed_loss() {
    needs_fake!();
    let s = Served::start(
        1,
        &[json!({"endpoint": "E3", "action": "hang", "skip": 1, "times": null, "delay_ms": 60000})],
    )
    .await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_long", "sleep 30; echo done")]),
            json!({"ttl_seconds": 4, "on_lease_expiry": "ignore"}),
        )
        .await;
    s.work_state(&work, "active").await;
    s.running(&sid, "toolu_long").await;
    s.gave_up(&sid, &work).await;
    s.finish().await.unwrap();
}

async fn requests(s: &Served, query: &str) -> Vec<Value> {
    s.fake
        .control("GET", &format!("/_fake/requests?{query}"), None)
        .await["requests"]
        .as_array()
        .unwrap()
        .clone()
}

/// §11 #1: an empty poll is answered `null`; the next poll follows after
/// U[1,3) s with the same `Anthropic-Worker-ID` and `block_ms=999`.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_1_empty_polls_repeat_with_the_same_worker_id() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let polls = requests(&s, "endpoint=E1&wait_count=3&timeout_ms=20000").await;
    assert!(polls.len() >= 3, "{polls:?}");
    for p in &polls[..3] {
        assert_eq!(p["headers"]["anthropic-worker-id"], "it-worker");
        assert_eq!(p["raw_query"], "block_ms=999");
        assert_eq!(p["credential"]["kind"], "environment_key");
    }
    for w in polls[..3].windows(2) {
        let gap = w[1]["t"].as_f64().unwrap() - w[0]["t_done"].as_f64().unwrap();
        assert!(gap >= 0.95, "polled again after {gap:.2} s, not U[1,3)");
    }
    s.finish().await.unwrap();
}

/// §11 #6: an ack refused with 404 → the item is force-stopped with the
/// environment key, and polling goes on.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_6_a_refused_ack_force_stops_with_the_environment_key() {
    needs_fake!();
    let s = Served::start(1, &[json!({"endpoint": "E2", "status": 404, "times": 1})]).await;
    let (_, first) = s.session(json!([]), json!({"ttl_seconds": 4})).await;
    let stops = requests(
        &s,
        &format!("endpoint=E4&work_id={first}&wait_count=1&timeout_ms=20000"),
    )
    .await;
    assert_eq!(
        stops[0]["credential"]["kind"], "environment_key",
        "{stops:?}"
    );
    assert_eq!(stops[0]["body"]["force"], true);
    let (sid, _) = s
        .session(
            json!([bash_use("toolu_1", "echo next")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    assert_eq!(text_of(&s.results(&sid, 1).await[0]), "next");
    s.finish().await.unwrap();
}

/// §11 #7: without a secret, or with one that does not decode, every call of
/// the item uses the environment key (and the item is still served).
#[tokio::test(flavor = "multi_thread")]
async fn checklist_7_items_without_a_usable_secret_use_the_environment_key() {
    needs_fake!();
    let s = Served::start(2, &[]).await;
    for (n, secret) in [json!(false), json!("not*base64!")].into_iter().enumerate() {
        let (sid, work) = s
            .session(
                json!([bash_use(&format!("toolu_{n}"), "echo served")]),
                json!({"ttl_seconds": 4, "secret": secret}),
            )
            .await;
        assert_eq!(text_of(&s.results(&sid, 1).await[0]), "served");
        for r in requests(&s, &format!("work_id={work}"))
            .await
            .iter()
            .chain(requests(&s, &format!("session_id={sid}")).await.iter())
        {
            assert_eq!(
                r["credential"]["kind"], "environment_key",
                "{} {}",
                r["endpoint"], r["path"]
            );
        }
    }
    s.finish().await.unwrap();
}

/// §11 #12: a skill download slower than the TTL: heartbeats go on
/// meanwhile, and the session is then served.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_12_heartbeats_continue_through_a_slow_skill_download() {
    needs_fake!();
    let a = archives();
    let s = Served::start(
        1,
        &[json!({"endpoint": "E10", "action": "delay", "delay_ms": 6000})],
    )
    .await;
    s.fake
        .control("POST", "/_fake/skills", Some(json!({"skill_id": "skill_slow", "versions": [{"name": "slow", "archive_b64": a["flat"]}]})))
        .await;
    let (sid, work) = s
        .session_spec(json!({
            "skills": [{"type": "custom", "skill_id": "skill_slow", "version": "latest"}],
            "events": [bash_use("toolu_1", "cat skills/slow/SKILL.md")],
            "work": {"ttl_seconds": 4},
        }))
        .await;
    assert_eq!(text_of(&s.results(&sid, 1).await[0]), "flat");
    let download = &requests(&s, "endpoint=E10").await[0];
    let (from, to) = (
        download["t"].as_f64().unwrap(),
        download["t_done"].as_f64().unwrap(),
    );
    let beats = requests(&s, &format!("endpoint=E3&work_id={work}")).await;
    let during = beats
        .iter()
        .filter(|b| (from..to).contains(&b["t"].as_f64().unwrap()))
        .count();
    assert!(
        during >= 2,
        "{during} heartbeats during a {:.1} s download",
        to - from
    );
    s.finish().await.unwrap();
}

/// §11 #15: the server asks for a graceful stop (the heartbeat reports
/// `stopping`): the call in flight finishes and its result is posted, then
/// teardown and force-stop.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_15_a_stopping_heartbeat_lets_the_call_finish_then_force_stops() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_1", "sleep 3; echo finished")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.work_state(&work, "active").await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/work/{work}/stop"),
            Some(json!({"force": false})),
        )
        .await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(text_of(&s.results(&sid, 1).await[0]), "finished");
    let stop = w["stops"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(stop["force"], true, "{w}");
    s.finish().await.unwrap();
}

/// §11 #28: the history listing fails: live calls still run; the history's
/// call runs after the next reconnect re-lists.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_28_a_failed_history_listing_does_not_stop_live_calls() {
    needs_fake!();
    let s = Served::start(1, &[json!({"endpoint": "E7", "status": 500, "times": 3})]).await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_hist", "echo from history")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.work_state(&work, "active").await;
    requests(
        &s,
        &format!("endpoint=E7&session_id={sid}&completed=1&wait_count=3&timeout_ms=20000"),
    )
    .await;
    let (live, _) = s.call(&sid, bash_use("toolu_live", "echo live")).await;
    assert_eq!(live, "live");
    let log = s
        .fake
        .control("GET", &format!("/_fake/sessions/{sid}"), None)
        .await;
    assert!(
        !log["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["tool_use_id"] == "toolu_hist"),
        "the history was read although its listing failed"
    );
    s.fake
        .control(
            "POST",
            &format!("/_fake/sessions/{sid}/streams/close"),
            Some(json!({"mode": "clean"})),
        )
        .await;
    let r = s.results(&sid, 2).await;
    assert!(
        r.iter()
            .any(|e| e["tool_use_id"] == "toolu_hist" && text_of(e) == "from history"),
        "{r:?}"
    );
    s.finish().await.unwrap();
}

/// §11 #30: a `requires_action` idle never ends the item; an event after an
/// `end_turn` idle cancels the countdown; the next `end_turn` ends it.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_30_only_an_undisturbed_end_turn_idle_ends_the_item() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, work) = s.session(json!([]), json!({"ttl_seconds": 4})).await;
    s.work_state(&work, "active").await;
    s.append(&sid, json!([{"type": "session.status_idle", "stop_reason": {"type": "requires_action", "event_ids": []}}]))
        .await;
    s.append(
        &sid,
        json!([end_turn(), {"type": "session.status_running"}]),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await; // past max_idle (2 s) twice
    let w = s
        .fake
        .control("GET", &format!("/_fake/work/{work}"), None)
        .await;
    assert_eq!(
        w["state"], "active",
        "ended without an undisturbed end_turn: {w}"
    );
    s.append(&sid, json!([end_turn()])).await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    s.finish().await.unwrap();
}

/// §11 #32: a live `session.status_terminated` ends the item at once.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_32_a_live_termination_ends_the_item() {
    needs_fake!();
    let s = Served::start_with(1, &[], |c| c.max_idle = None, Vec::new()).await;
    let (sid, work) = s.session(json!([]), json!({"ttl_seconds": 4})).await;
    s.work_state(&work, "active").await;
    requests(
        &s,
        &format!("endpoint=E6&session_id={sid}&wait_count=1&timeout_ms=20000"),
    )
    .await;
    s.append(&sid, json!([{"type": "session.status_terminated"}]))
        .await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(w["stops"][0]["force"], true);
    s.finish().await.unwrap();
}

/// A policy like `default` with short timeouts: bash's own 1 s, the runner's
/// cut-off of any call 2 s.
fn quick_policy() -> hands::policy::Policy {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/policies/default.toml"
    ))
    .unwrap();
    let text = regex::Regex::new(r#"(?m)^bash_timeout = .*$"#)
        .unwrap()
        .replace(&text, r#"bash_timeout = "1s""#);
    let text = regex::Regex::new(r#"(?m)^call_timeout = .*$"#)
        .unwrap()
        .replace(&text, r#"call_timeout = "2s""#);
    hands::policy::Policy::from_toml_str("quick", &text, std::path::Path::new("quick.toml"))
        .unwrap()
}

/// §11 #35: a call that outlives the runner's limit (the policy's
/// `call_timeout`, 150 s by default) → `tool '<name>' timed out`, an error
/// result; the item goes on.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_35_a_call_past_the_runner_limit_times_out() {
    needs_fake!();
    let s = Served::start_with(
        1,
        &[],
        |c| c.environment = "quick".into(),
        vec![quick_policy()],
    )
    .await;
    let (sid, _) = s.session(json!([]), json!({"ttl_seconds": 4})).await;
    let (text, is_error) = s
        .call(&sid, json!({"type": "agent.tool_use", "id": "toolu_1", "name": "bash", "input": {"command": "sleep 30", "timeout_ms": 20000}}))
        .await;
    assert_eq!(text, "tool 'bash' timed out");
    assert!(is_error);
    let (text, _) = s.call(&sid, json!({"type": "agent.tool_use", "id": "toolu_2", "name": "bash", "input": {"command": "echo again", "restart": true}})).await;
    assert!(text.contains("again") || text.contains("restart"), "{text}");
    s.finish().await.unwrap();
}

/// §11 #36: no byte on the stream for the read timeout (600 s; 2 s here)
/// → reconnect and re-list; calls arriving afterwards are served.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_36_a_silent_stream_is_reopened_after_the_read_timeout() {
    needs_fake!();
    let s = Served::start_with(
        1,
        &[],
        |c| c.stream_read_timeout = Duration::from_secs(2),
        Vec::new(),
    )
    .await;
    s.fake
        .control(
            "POST",
            "/_fake/config",
            Some(json!({"ping_interval_ms": 600000})),
        )
        .await;
    let (sid, _) = s.session(json!([]), json!({"ttl_seconds": 4})).await;
    let streams = requests(
        &s,
        &format!("endpoint=E6&session_id={sid}&wait_count=3&timeout_ms=30000"),
    )
    .await;
    assert!(streams.len() >= 3, "{streams:?}");
    let lists = requests(
        &s,
        &format!("endpoint=E7&session_id={sid}&wait_count=3&timeout_ms=30000"),
    )
    .await;
    assert!(lists.len() >= 3, "each reconnect re-lists: {}", lists.len());
    let (text, _) = s.call(&sid, bash_use("toolu_1", "echo still served")).await;
    assert_eq!(text, "still served");
    s.finish().await.unwrap();
}

/// Where hands does better (contract §10): a process the agent detaches
/// (`setsid nohup … &`) dies with its item, and the next item starts in an
/// empty workspace of its own. (The SDK worker's children outlive the item,
/// and all its sessions share one workdir.)
#[tokio::test(flavor = "multi_thread")]
async fn processes_and_files_never_outlive_their_item() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let marker = format!("sleep {}", 7000 + std::process::id() % 1000);
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_1", &format!("setsid nohup {marker} > /dev/null 2>&1 & echo secret > left-behind; echo started"))]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    assert_eq!(text_of(&s.results(&sid, 1).await[0]), "started");
    let running = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim() == marker)
                .unwrap_or(false)
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !running() {
        assert!(
            std::time::Instant::now() < deadline,
            "the detached process never ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&work, "stopped").await;
    s.closed().await;
    assert!(!running(), "{marker:?} outlived its item");
    let (sid, _) = s
        .session(
            json!([bash_use("toolu_2", "ls -A /workspace")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    assert_eq!(
        text_of(&s.results(&sid, 1).await[0]),
        "(no output)",
        "the next item saw the previous one's files"
    );
    s.finish().await.unwrap();
}

/// Contract §12.10: a termination the stream missed (it was down) and that
/// only the history shows. The SDK worker keeps the item until a heartbeat
/// reports the stop; hands ends it at the reconcile.
#[tokio::test(flavor = "multi_thread")]
async fn a_termination_seen_only_in_history_ends_the_item() {
    needs_fake!();
    let s = Served::start_with(1, &[], |c| c.max_idle = None, Vec::new()).await;
    let (sid, work) = s.session(json!([]), json!({"ttl_seconds": 300})).await;
    s.work_state(&work, "active").await;
    requests(
        &s,
        &format!("endpoint=E6&session_id={sid}&wait_count=1&timeout_ms=20000"),
    )
    .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/sessions/{sid}/events"),
            Some(json!({"events": [{"type": "session.status_terminated"}], "broadcast": false})),
        )
        .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/sessions/{sid}/streams/close"),
            Some(json!({"mode": "clean"})),
        )
        .await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(w["stops"][0]["force"], true);
    s.finish().await.unwrap();
}

/// §11 #18: heartbeats answered 503 persistently (each attempt with the
/// client's retries): once more than the TTL has passed since the last
/// success the lease is assumed lost — no stop, nothing posted.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_18_heartbeats_failing_past_the_ttl_end_in_an_assumed_loss() {
    needs_fake!();
    let s = Served::start(
        1,
        &[json!({"endpoint": "E3", "status": 503, "skip": 1, "times": null})],
    )
    .await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_long", "sleep 30; echo done")]),
            json!({"ttl_seconds": 4, "on_lease_expiry": "ignore"}),
        )
        .await;
    s.work_state(&work, "active").await;
    s.running(&sid, "toolu_long").await;
    s.gave_up(&sid, &work).await;
    let beats = requests(&s, &format!("endpoint=E3&work_id={work}")).await;
    assert!(beats.len() >= 2, "attempts went on: {}", beats.len());
    // Once the TTL has passed since the last successful heartbeat the lease is
    // lost: no attempt after that, with a stale last_heartbeat.
    let ok_done = beats
        .iter()
        .filter(|b| b["status"] == 200)
        .filter_map(|b| b["t_done"].as_f64())
        .fold(f64::MIN, f64::max);
    assert!(ok_done > f64::MIN, "no successful heartbeat: {beats:?}");
    let late: Vec<f64> = beats
        .iter()
        .filter_map(|b| b["t"].as_f64())
        .filter(|t| *t > ok_done + 4.0)
        .collect();
    assert!(
        late.is_empty(),
        "heartbeats after the TTL: {:?} (last success done at {ok_done})",
        late
    );
    s.finish().await.unwrap();
}

/// The E13 (create) requests sent for `path` in `store`, completed.
async fn creates(s: &Served, store: &str, path: &str) -> usize {
    requests(
        s,
        &format!("endpoint=E13&memory_store_id={store}&completed=1"),
    )
    .await
    .iter()
    .filter(|r| r["body"]["path"] == path)
    .count()
}

/// Contract §8.5, the harder rules, one sync at a time (interval 5 s, a sync
/// follows the first call after it): both sides changed → the server wins;
/// content the server refuses (413) is not sent again until it changes;
/// every local file gone → a wipe: downloaded again, nothing deleted; a
/// missing marker with files left → that store is not synced, not even by
/// the final flush.
#[tokio::test(flavor = "multi_thread")]
async fn memory_sync_conflicts_refusals_wipes_and_a_lost_marker() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let m = store(
        &s,
        json!([
            {"path": "/a.md", "content": "a\n"},
            {"path": "/b.md", "content": "b\n"},
            {"path": "/c.md", "content": "c\n"},
        ]),
    )
    .await;
    let dir = "/mnt/memory/rules";
    let (sid, work) = s
        .session_spec(json!({
            "resources": [{"type": "memory_store", "memory_store_id": m, "mount_path": dir, "access": "read_write"}],
            "events": [],
            "work": {"ttl_seconds": 10},
        }))
        .await;
    let sync = |n: &str| {
        let (s, sid, id) = (&s, sid.clone(), format!("toolu_sync{n}"));
        async move {
            tokio::time::sleep(Duration::from_millis(5200)).await;
            s.bash(&sid, &id, "true").await;
        }
    };
    // 1: a conflict, and a file over the server's 1 MiB limit.
    s.bash(
        &sid,
        "toolu_1",
        &format!("echo local > {dir}/a.md; head -c 1100000 /dev/zero | tr '\\0' x > {dir}/big.md"),
    )
    .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/memory_stores/{m}/memories"),
            Some(json!({"path": "/a.md", "content": "server\n"})),
        )
        .await;
    sync("1").await;
    until("big.md refused", || async {
        creates(&s, &m, "/big.md").await == 1
    })
    .await;
    let a = s
        .bash(&sid, "toolu_2", &format!("for i in $(seq 100); do grep -q server {dir}/a.md && break; sleep 0.1; done; cat {dir}/a.md"))
        .await;
    assert_eq!(a, "server", "both changed: the server's version wins");
    assert_eq!(remote(&s, &m).await["/a.md"], "server\n");
    // 2: a new file sorts after big.md; once it is sent, big.md was not.
    s.bash(&sid, "toolu_3", &format!("echo zz > {dir}/zz.md"))
        .await;
    sync("2").await;
    until("zz.md created", || async {
        creates(&s, &m, "/zz.md").await == 1
    })
    .await;
    assert_eq!(
        creates(&s, &m, "/big.md").await,
        1,
        "refused content was sent again"
    );
    // 3: every file gone: a wipe, not four deletions.
    s.bash(&sid, "toolu_4", &format!("rm -f {dir}/*.md")).await;
    sync("3").await;
    let listed = requests(
        &s,
        &format!("endpoint=E11&memory_store_id={m}&query=view%3Dfull&completed=1&wait_count=2&timeout_ms=20000"),
    )
    .await;
    assert_eq!(listed.len(), 2, "downloaded again");
    let ls = s
        .bash(
            &sid,
            "toolu_5",
            &format!(
                "for i in $(seq 100); do [ -e {dir}/zz.md ] && break; sleep 0.1; done; ls {dir}"
            ),
        )
        .await;
    assert_eq!(ls, "a.md\nb.md\nc.md\nzz.md", "{ls}");
    // 4: the marker removed while files remain: hands leaves the store alone.
    s.bash(
        &sid,
        "toolu_6",
        &format!("rm {dir}/.anthropic-memory-store; echo new > {dir}/new.md; rm {dir}/b.md"),
    )
    .await;
    sync("4").await;
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&work, "stopped").await;
    s.closed().await;
    assert_eq!(
        creates(&s, &m, "/new.md").await,
        0,
        "a store without its marker was synced"
    );
    assert!(
        requests(&s, &format!("endpoint=E15&memory_store_id={m}"))
            .await
            .is_empty(),
        "deleted on the server"
    );
    let r = remote(&s, &m).await;
    assert_eq!(
        r.keys().cloned().collect::<Vec<_>>(),
        ["/a.md", "/b.md", "/c.md", "/zz.md"]
    );
    s.finish().await.unwrap();
}

// ---- memory sync under a hostile folder (issue #10, finding #5) -------------

/// `hands worker --config` as a process of its own, serving an environment
/// of a fake: its memory is its own to measure, and SIGTERM is a real
/// shutdown.
struct WorkerProcess {
    fake: Fake,
    env: Value,
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl WorkerProcess {
    async fn start() -> WorkerProcess {
        let fake = Fake::start();
        let env = fake
            .control("POST", "/_fake/environments", Some(json!({})))
            .await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), env["key"].as_str().unwrap()).unwrap();
        let config = dir.path().join("worker.toml");
        std::fs::write(
            &config,
            format!(
                "worker_id = \"it-memory-worker\"\ncapacity = 2\n\n[anthropic]\n\
                 environment_id = \"{}\"\nenvironment_key_file = \"key\"\n\
                 environment = \"default\"\nmax_idle_secs = 0\n\
                 memory_sync_interval_secs = 5\nbase_url = \"{}\"\n",
                env["id"].as_str().unwrap(),
                fake.url()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
        let child = Command::new(crate::util::hands_bin())
            .args(["worker", "--config"])
            .arg(&config)
            .env("HANDS_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("hands worker starts");
        WorkerProcess {
            fake,
            env,
            child,
            dir,
        }
    }

    /// A `/proc/<pid>/status` figure in KiB (`VmHWM`: the peak RSS).
    fn status_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {status}"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("worker.log")).unwrap_or_default()
    }

    /// A session with one read-write memory store at `/mnt/memory/notes`, its
    /// item running in the worker; returns (session id, work id, store id).
    async fn session_with_store(&self) -> (String, String, String) {
        let m = self
            .fake
            .control(
                "POST",
                "/_fake/memory_stores",
                Some(json!({"memories": []})),
            )
            .await;
        let store = m["id"].as_str().unwrap().to_string();
        let c = self
            .fake
            .control(
                "POST",
                "/_fake/sessions",
                Some(json!({
                    "environment_id": self.env["id"],
                    "resources": [{"type": "memory_store", "memory_store_id": store, "mount_path": "/mnt/memory/notes", "access": "read_write"}],
                    "events": [],
                    "work": {"ttl_seconds": 10},
                })),
            )
            .await;
        (
            c["session"]["id"].as_str().unwrap().to_string(),
            c["work"]["id"].as_str().unwrap().to_string(),
            store,
        )
    }

    /// SIGTERM; how long the worker took to exit (killed after 120 s).
    fn terminate(&mut self) -> Duration {
        let started = std::time::Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        while self.child.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(120) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        started.elapsed()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 400 hard links to one sparse 8 MiB file: 3.2 GB of logical content on a
/// few kilobytes of disk. The agent plants them in a memory folder from bash.
const HARD_LINK_ATTACK: &str = "F=$(readlink -f /mnt/memory/notes) && printf 'hello ' > $F/big \
     && truncate -s 8M $F/big && for i in $(seq 400); do ln $F/big $F/l$i; done \
     && echo $(ls $F | wc -l) files, $(du -sk $F | cut -f1) KiB on disk";

/// Issue #10, finding #5: the sync after the attack held every file in
/// memory at once (the worker grew from 13 MB to 6.7 GB). Now files are
/// hashed one at a time, the inode once, and uploaded one at a time: the
/// worker's peak RSS stays small, and it keeps serving the item.
#[tokio::test(flavor = "multi_thread")]
async fn memory_sync_of_hard_links_to_a_sparse_file_keeps_the_worker_small() {
    needs_fake!();
    let w = WorkerProcess::start().await;
    let (sid, _work, store) = w.session_with_store().await;
    let (planted, err) = w
        .fake
        .call(&sid, bash_use("toolu_1", HARD_LINK_ATTACK))
        .await;
    assert!(!err && planted.starts_with("401 files"), "{planted}");
    let before = w.status_kib("VmHWM");
    // The next call after the interval starts the sync.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    w.fake.call(&sid, bash_use("toolu_2", "true")).await;
    // The sync has hashed the folder and reached its uploads.
    let uploads = w
        .fake
        .control(
            "GET",
            &format!("/_fake/requests?endpoint=E13&memory_store_id={store}&bodies=0&completed=1&wait_count=1&timeout_ms=120000"),
            None,
        )
        .await;
    assert!(
        !uploads["requests"].as_array().unwrap().is_empty(),
        "the sync never uploaded:\n{}",
        w.log()
    );
    // The worker keeps serving the item meanwhile.
    let (alive, err) = w.fake.call(&sid, bash_use("toolu_3", "echo alive")).await;
    assert_eq!((alive.trim(), err), ("alive", false));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peak = w.status_kib("VmHWM");
    eprintln!(
        "worker peak RSS: {} MiB before the sync, {} MiB after it ({} uploads seen)",
        before / 1024,
        peak / 1024,
        requests_of(
            &w.fake,
            &format!("endpoint=E13&bodies=0&memory_store_id={store}")
        )
        .await
        .len()
    );
    assert!(
        peak < 300 * 1024,
        "the worker's peak RSS reached {} MiB",
        peak / 1024
    );
    // 401 memories of one content the server refuses (413, above its 1 MiB):
    // sent once, the others refused without being sent.
    let sent = requests_of(
        &w.fake,
        &format!("endpoint=E13&bodies=0&memory_store_id={store}"),
    )
    .await;
    assert!(
        sent.len() < 10,
        "{} uploads of one refused content",
        sent.len()
    );
}

/// Issue #10, finding #5: a worker shutting down while a large sync is in
/// progress (here: the sync's first upload held by a slow server) cancels the
/// sync and gives the item only the bounded flush, which reads nothing again
/// (the hash cache) and sends the refused content once. Before, the flush read
/// the whole folder again and re-sent every link until its 30 s bound.
#[tokio::test(flavor = "multi_thread")]
async fn worker_shutdown_during_a_large_memory_sync_is_prompt() {
    needs_fake!();
    let mut w = WorkerProcess::start().await;
    let (sid, work, store) = w.session_with_store().await;
    let (planted, _) = w
        .fake
        .call(&sid, bash_use("toolu_1", HARD_LINK_ATTACK))
        .await;
    assert!(planted.starts_with("401 files"), "{planted}");
    w.fake
        .control(
            "POST",
            "/_fake/faults",
            Some(json!({"endpoint": "E13", "times": 1, "action": "delay", "delay_ms": 60000})),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(5500)).await;
    w.fake.call(&sid, bash_use("toolu_2", "true")).await;
    // The sync is in its uploads, the first one held.
    w.fake
        .control(
            "GET",
            &format!("/_fake/requests?endpoint=E13&memory_store_id={store}&bodies=0&wait_count=1&timeout_ms=120000"),
            None,
        )
        .await;
    let took = w.terminate();
    eprintln!("the worker exited {took:?} after SIGTERM");
    assert!(
        took < Duration::from_secs(20),
        "shutdown took {took:?}:\n{}",
        w.log()
    );
    // The item was torn down properly: force-stopped.
    let item = w
        .fake
        .control("GET", &format!("/_fake/work/{work}"), None)
        .await;
    assert!(!item["stops"].as_array().unwrap().is_empty(), "{item}");
}

/// Issue #10, finding #5: what a sync sends is bounded (64 MiB of content);
/// the rest goes with the next sync, none of it lost. Nine 7.5 MiB text files
/// (67.5 MiB) take two syncs.
#[tokio::test(flavor = "multi_thread")]
async fn a_memory_sync_past_the_send_budget_completes_in_the_next_sync() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    s.fake
        .control(
            "POST",
            "/_fake/config",
            Some(json!({"max_memory_bytes": 16 << 20})),
        )
        .await;
    let m = store(&s, json!([])).await;
    let (sid, work) = s
        .session_spec(json!({
            "resources": [{"type": "memory_store", "memory_store_id": m, "mount_path": "/mnt/memory/big", "access": "read_write"}],
            "events": [],
            "work": {"ttl_seconds": 10},
        }))
        .await;
    // 5898240 random bytes are 7.5 MiB of base64 text.
    let out = s
        .bash(
            &sid,
            "toolu_1",
            "for i in 1 2 3 4 5 6 7 8 9; do head -c 5898240 /dev/urandom | base64 -w0 > /mnt/memory/big/f$i.md; done; \
             cat /mnt/memory/big/f*.md | wc -c",
        )
        .await;
    assert_eq!(out.trim(), (9 * 7_864_320).to_string());
    tokio::time::sleep(Duration::from_millis(5500)).await;
    s.bash(&sid, "toolu_2", "true").await;
    until("the first sync's uploads", || async {
        remote(&s, &m).await.len() >= 8
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        remote(&s, &m).await.len(),
        8,
        "the first sync sends 64 MiB (eight files), not more"
    );
    tokio::time::sleep(Duration::from_millis(5500)).await;
    s.bash(&sid, "toolu_3", "true").await;
    until("the next sync sends the rest", || async {
        remote(&s, &m).await.len() == 9
    })
    .await;
    let local = s
        .bash(&sid, "toolu_4", "cd /mnt/memory/big && sha256sum f*.md")
        .await;
    let r = remote(&s, &m).await;
    for line in local.lines() {
        let (sha, name) = line.split_once("  ").unwrap();
        let content = &r[&format!("/{name}")];
        assert_eq!(sha, hex_sha256(content.as_bytes()), "{name} arrived whole");
    }
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&work, "stopped").await;
    s.finish().await.unwrap();
}

fn hex_sha256(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn requests_of(fake: &Fake, query: &str) -> Vec<Value> {
    fake.control("GET", &format!("/_fake/requests?{query}"), None)
        .await["requests"]
        .as_array()
        .unwrap()
        .clone()
}

// ---- a session's files across its work items (issue 11) ---------------------

/// The text of the result posted for `tool_use_id`.
fn result_text(results: &[Value], tool_use_id: &str) -> String {
    results
        .iter()
        .find(|r| r["tool_use_id"] == tool_use_id)
        .and_then(|r| r["content"][0]["text"].as_str())
        .unwrap_or("")
        .to_string()
}

/// A session spans many work items (each turn after an idle end is a new
/// one): the next item of the same session on this worker finds the files the
/// agent wrote, its memory store downloaded again (the previous item removed
/// its folder, as the contract's dispose says), and the workspace stays on the
/// host between items, unmounted.
#[tokio::test(flavor = "multi_thread")]
async fn a_sessions_next_item_finds_its_files() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let m = s
        .fake
        .control(
            "POST",
            "/_fake/memory_stores",
            Some(json!({"memories": [{"path": "/facts.md", "content": "water is wet\n"}]})),
        )
        .await;
    let spec = |events: Value| {
        json!({
            "resources": [{"type": "memory_store", "memory_store_id": m["id"], "mount_path": "/workspace/mem", "access": "read_write"}],
            "events": events,
            "work": {"ttl_seconds": 4},
        })
    };
    let (sid, w1) = s
        .session_spec(spec(json!([
            bash_use("toolu_1", "echo kept-across-items > notes.txt && mkdir -p src && echo 'fn main() {}' > src/main.rs && cat mem/facts.md"),
        ])))
        .await;
    let r = s.results(&sid, 1).await;
    assert!(result_text(&r, "toolu_1").contains("water is wet"), "{r:?}");
    s.append(&sid, json!([end_turn()])).await;
    // The idle end closes the item; its workspace stays, unmounted.
    s.work_state(&w1, "stopped").await;
    s.closed().await;
    let image = s.kept_image(&sid);
    assert!(image.exists(), "the session's workspace was not kept");
    let mount = s
        .registry
        .sandbox()
        .state_dir
        .join("workspaces")
        .join(format!("kept-{sid}"));
    assert!(
        !mount.join("notes.txt").exists(),
        "still mounted between items"
    );
    // The next turn is a new work item of the same session.
    let w2 = s.next_item(&sid, json!({"ttl_seconds": 4})).await;
    s.append(
        &sid,
        json!([bash_use(
            "toolu_2",
            "cat notes.txt src/main.rs mem/facts.md; ls -a mem"
        )]),
    )
    .await;
    let r = s.results(&sid, 2).await;
    let text = result_text(&r, "toolu_2");
    assert!(text.contains("kept-across-items"), "{text}");
    assert!(text.contains("fn main() {}"), "{text}");
    assert!(
        text.contains("water is wet"),
        "the store was not downloaded again: {text}"
    );
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&w2, "stopped").await;
    s.closed().await;
    assert!(image.exists());
    s.finish().await.unwrap();
}

/// A session seen terminated or archived has no further items: its kept
/// workspace goes at the end of the item that saw it (live termination) or at
/// once (an item whose session is already over when it is fetched).
#[tokio::test(flavor = "multi_thread")]
async fn a_finished_sessions_workspace_is_removed() {
    needs_fake!();
    let s = Served::start(2, &[]).await;
    // Terminated while an item runs.
    let (sid, w) = s
        .session(
            json!([bash_use("toolu_1", "echo x > f")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.results(&sid, 1).await;
    assert!(s.kept_image(&sid).exists());
    s.append(&sid, json!([{"type": "session.status_terminated"}]))
        .await;
    s.work_state(&w, "stopped").await;
    until("the terminated session's workspace removed", || async {
        !s.kept_image(&sid).exists()
    })
    .await;
    // Archived between items: the next item finds the session over.
    let (sid2, w2) = s
        .session(
            json!([bash_use("toolu_2", "echo y > f")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.results(&sid2, 1).await;
    s.append(&sid2, json!([end_turn()])).await;
    s.work_state(&w2, "stopped").await;
    s.closed().await;
    assert!(s.kept_image(&sid2).exists());
    s.fake
        .control(
            "POST",
            &format!("/_fake/sessions/{sid2}/update"),
            Some(json!({"archived_at": "2026-12-01T00:00:00Z"})),
        )
        .await;
    let w3 = s.next_item(&sid2, json!({"ttl_seconds": 4})).await;
    s.work_state(&w3, "stopped").await;
    until("the archived session's workspace removed", || async {
        !s.kept_image(&sid2).exists()
    })
    .await;
    s.finish().await.unwrap();
}

/// A kept workspace that no item has used for the retention time is removed
/// by the sweep at start (and every hour); one in use never is.
#[tokio::test(flavor = "multi_thread")]
async fn kept_workspaces_past_their_retention_are_swept() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, w) = s
        .session(
            json!([bash_use("toolu_1", "echo x > f")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.results(&sid, 1).await;
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&w, "stopped").await;
    s.closed().await;
    let image = s.kept_image(&sid);
    assert!(image.exists());
    let workspaces = s.registry.sandbox().workspaces.clone();
    assert_eq!(
        workspaces.sweep_kept(Duration::from_secs(3600)),
        0,
        "not yet old"
    );
    // In use: never swept, however old.
    let held = workspaces
        .open_kept(
            &sid,
            hands::workspace::Geometry {
                bytes: 1 << 30,
                inodes: 1 << 16,
            },
            false,
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        workspaces.sweep_kept(Duration::from_secs(1)),
        0,
        "swept while in use"
    );
    assert!(held.path().join("f").exists(), "the files came back");
    workspaces.remove(held).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(workspaces.sweep_kept(Duration::from_secs(1)), 1);
    assert!(!image.exists());
    s.finish().await.unwrap();
}

/// The same work item offered again to the worker that still holds a handler
/// for it (its lease expired and the item was re-queued while the old handler
/// had not yet heard): never two handlers at once, never one sandbox between
/// them, and the old handler's teardown never touches the new one's sandbox.
/// The new claim serves the session to its end.
#[tokio::test(flavor = "multi_thread")]
async fn an_item_served_again_waits_for_its_previous_handler() {
    needs_fake!();
    let s = Served::start(2, &[]).await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_long", "sleep 3; echo first-claim")]),
            json!({"ttl_seconds": 6}),
        )
        .await;
    s.running(&sid, "toolu_long").await;
    // The lease expires server-side: the item is queued again and this
    // worker (capacity 2) takes it while its first handler still runs.
    s.fake
        .control("POST", &format!("/_fake/work/{work}/expire"), None)
        .await;
    until("the item acked a second time", || async {
        let w = s
            .fake
            .control("GET", &format!("/_fake/work/{work}"), None)
            .await;
        w["acks"].as_array().map(Vec::len).unwrap_or(0) >= 2
    })
    .await;
    // At no point two sandboxes of this session at once.
    let mut most = 0;
    let watch = async {
        loop {
            most = most.max(s.registry.open_sessions());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let served = async {
        let r = s.results(&sid, 1).await;
        assert!(
            result_text(&r, "toolu_long").contains("first-claim"),
            "{r:?}"
        );
        s.append(&sid, json!([bash_use("toolu_next", "echo second-call")]))
            .await;
        let r = s.results(&sid, 2).await;
        assert_eq!(result_text(&r, "toolu_next"), "second-call", "{r:?}");
    };
    tokio::select! {
        () = served => {}
        () = watch => unreachable!(),
    }
    assert!(most <= 1, "two handlers had sandboxes at once ({most})");
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&work, "stopped").await;
    s.finish().await.unwrap();
}
