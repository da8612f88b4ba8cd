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

use hands::cma::config::AnthropicConfig;
use hands::cma::secret::KeySource;
use hands::gateway::client::ApiClient;
use serde_json::{json, Value};

/// The fake control plane, as a process.
struct Fake {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Fake {
    fn start() -> Fake {
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

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn control(&self, method: &str, path: &str, body: Option<Value>) -> Value {
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

fn text_of(ev: &Value) -> String {
    ev["content"]
        .as_array()
        .map(|a| a.iter().filter_map(|b| b["text"].as_str()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn hands_serves_a_full_session_through_the_sandbox() {
    crate::require_sandbox!();
    if !crate::differential::sdk_available() {
        return; // python3 is what runs the fake; the SDK check covers its presence under CI
    }
    let fake = Fake::start();
    let env = fake
        .control("POST", "/_fake/environments", Some(json!({})))
        .await;
    let env_id = env["id"].as_str().unwrap().to_string();
    let key = env["key"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("environment-key");
    std::fs::write(&key_file, &key).unwrap();
    let created = fake
        .control(
            "POST",
            "/_fake/sessions",
            Some(json!({
                "environment_id": env_id,
                "events": [{"type": "agent.tool_use", "id": "toolu_w", "name": "write",
                            "input": {"file_path": "notes/a.txt", "content": "alpha\nbeta\n"}}],
                "work": {"ttl_seconds": 4},
            })),
        )
        .await;
    let sid = created["session"]["id"].as_str().unwrap().to_string();
    let work = created["work"]["id"].as_str().unwrap().to_string();
    let token = created["work"]["sessions_token"]
        .as_str()
        .unwrap()
        .to_string();

    let cfg = AnthropicConfig {
        environment_id: env_id.clone(),
        key: KeySource::File(key_file),
        environment: "default".into(),
        capacity: 2,
        max_idle: Some(Duration::from_secs(2)),
        base_url: fake.url(),
    };
    let policies = hands::policy::PolicySet::builtin()
        .iter()
        .cloned()
        .collect::<Vec<_>>();
    let registry = Arc::new(hands::session::registry::Registry::new(
        crate::util::config(),
        policies,
        4,
    ));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let connector = tokio::spawn(hands::cma::worker::run(
        cfg,
        "it-worker".into(),
        registry.clone(),
        shutdown,
    ));

    let tool_use = |id: &str, name: &str, input: Value| json!({"type": "agent.tool_use", "id": id, "name": name, "input": input});
    fake.control(
        "POST",
        &format!("/_fake/sessions/{sid}/events"),
        Some(json!({"events": [
            tool_use("toolu_r", "read", json!({"file_path": "notes/a.txt"})),
            tool_use("toolu_e", "edit", json!({"file_path": "notes/a.txt", "old_string": "beta", "new_string": "gamma"})),
            tool_use("toolu_g", "glob", json!({"pattern": "**/*.txt"})),
            tool_use("toolu_s", "grep", json!({"pattern": "gam+a"})),
            tool_use("toolu_b", "bash", json!({"command": "cat notes/a.txt; tr '\\0' '\\n' < /proc/self/environ; tr '\\0' '\\n' < /proc/1/environ; env"})),
            tool_use("toolu_n", "read", json!(null)),
            tool_use("toolu_x", "deploy_to_prod", json!({})),
        ]})),
    )
    .await;
    let results = fake
        .control(
            "GET",
            &format!(
                "/_fake/sessions/{sid}/events?type=user.tool_result&wait_count=7&timeout_ms=30000"
            ),
            None,
        )
        .await;
    let results = results["data"].as_array().unwrap().clone();
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
    let events = fake
        .control("GET", &format!("/_fake/sessions/{sid}"), None)
        .await;
    assert!(!events["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["tool_use_id"] == "toolu_x"));

    // End of turn: after max_idle the item ends and is force-stopped.
    fake.control(
        "POST",
        &format!("/_fake/sessions/{sid}/events"),
        Some(json!({"events": [{"type": "session.status_idle", "stop_reason": {"type": "end_turn"}}]})),
    )
    .await;
    let w = fake
        .control(
            "GET",
            &format!("/_fake/work/{work}?wait_state=stopped&timeout_ms=20000"),
            None,
        )
        .await;
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
    let reqs = fake
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
    stop.send_replace(true);
    tokio::time::timeout(Duration::from_secs(10), connector)
        .await
        .expect("the connector stops")
        .unwrap()
        .unwrap();
    assert_eq!(
        registry.open_sessions(),
        0,
        "the item's sandbox session was closed"
    );
}

/// Contract §11 #24 and #31: at attach, a history whose calls are all
/// answered and which ends in an end-of-turn idle: nothing runs again, and the
/// item ends after max_idle. (With an unanswered call before the idle, the
/// SDK worker runs it and then stays, because the echo of its own result
/// disarms the clock; hands does the same. Checked against the SDK on the fake.)
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_history_at_attach_ends_the_item_after_max_idle() {
    crate::require_sandbox!();
    if !crate::differential::sdk_available() {
        return;
    }
    let fake = Fake::start();
    let env = fake
        .control("POST", "/_fake/environments", Some(json!({})))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("environment-key");
    std::fs::write(&key_file, env["key"].as_str().unwrap()).unwrap();
    let created = fake
        .control(
            "POST",
            "/_fake/sessions",
            Some(json!({
                "environment_id": env["id"],
                "events": [
                    {"type": "agent.tool_use", "id": "toolu_done", "name": "bash", "input": {"command": "echo must not run"}},
                    {"type": "user.tool_result", "tool_use_id": "toolu_done", "is_error": false, "content": [{"type": "text", "text": "earlier"}]},
                    {"type": "session.status_idle", "stop_reason": {"type": "end_turn"}},
                ],
                "work": {"ttl_seconds": 4},
            })),
        )
        .await;
    let sid = created["session"]["id"].as_str().unwrap().to_string();
    let work = created["work"]["id"].as_str().unwrap().to_string();
    let cfg = AnthropicConfig {
        environment_id: env["id"].as_str().unwrap().into(),
        key: KeySource::File(key_file),
        environment: "default".into(),
        capacity: 1,
        max_idle: Some(Duration::from_secs(2)),
        base_url: fake.url(),
    };
    let policies = hands::policy::PolicySet::builtin()
        .iter()
        .cloned()
        .collect::<Vec<_>>();
    let registry = Arc::new(hands::session::registry::Registry::new(
        crate::util::config(),
        policies,
        2,
    ));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let connector = tokio::spawn(hands::cma::worker::run(
        cfg,
        "it-worker".into(),
        registry,
        shutdown,
    ));
    let w = fake
        .control(
            "GET",
            &format!("/_fake/work/{work}?wait_state=stopped&timeout_ms=20000"),
            None,
        )
        .await;
    assert_eq!(w["state"], "stopped", "the idle grace ended the item: {w}");
    let log = fake
        .control("GET", &format!("/_fake/sessions/{sid}"), None)
        .await;
    let posted: Vec<&Value> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["_origin"] == "client")
        .collect();
    assert!(posted.is_empty(), "an answered call ran again: {posted:?}");
    assert_eq!(w["stops"][0]["force"], true);
    stop.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), connector).await;
}
