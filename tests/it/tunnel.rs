//! The tunnel end to end over real mTLS on loopback: a gateway and workers in
//! this process (each worker's sessions are real sandboxes), agent-side
//! requests through the gateway's HTTP API (with curl where a real client
//! matters), and the failures a tunnel must survive: refused certificates in
//! both directions, a TCP cut mid-call, a gateway restart, a CONNECT proxy,
//! load, a stalled consumer, malformed and oversized requests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hands::connectors::hands_v1::tunnel::SlotState;
use hands::gateway::client::ApiClient;
use hands::gateway::{Bound, Gateway};
use hands::pki::{Ca, Issued};
use hands::session::registry::Registry;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::require_sandbox;

pub(crate) const TOKEN: &str = "tunnel-test-token-0123456789";

/// Writes a certificate and key as NAME.pem and NAME-key.pem.
fn put(dir: &Path, name: &str, issued: &Issued) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, &issued.key_pem).unwrap();
    (cert, key)
}

/// One CA with a gateway and a worker certificate, in a temporary directory.
pub(crate) struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
    pub(crate) ca_pem: PathBuf,
}

impl Pki {
    pub(crate) fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(30).unwrap();
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, &ca.issued.cert_pem).unwrap();
        Pki { dir, ca, ca_pem }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    pub(crate) fn gateway(&self, name: &str, days: i64) -> (PathBuf, PathBuf) {
        let issued = self
            .ca
            .gateway(&["localhost".into(), "127.0.0.1".into()], days)
            .unwrap();
        put(self.path(), name, &issued)
    }
    pub(crate) fn worker(&self, id: &str, days: i64) -> (PathBuf, PathBuf) {
        put(self.path(), id, &self.ca.worker(id, days).unwrap())
    }
}

pub(crate) struct Gw {
    pub(crate) bound: Bound,
    gw: Arc<Gateway>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), hands::gateway::GatewayError>>,
}

impl Gw {
    pub(crate) fn api(&self) -> ApiClient {
        ApiClient::new(self.bound.api, TOKEN)
    }
    pub(crate) async fn stop(self) {
        self.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
    fn metric(&self, line_prefix: &str) -> u64 {
        let (w, t) = self.gw.workers.counts();
        self.gw
            .metrics
            .render(w, t)
            .lines()
            .find_map(|l| l.strip_prefix(line_prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

pub(crate) async fn gateway(pki: &Pki, cert: &(PathBuf, PathBuf), listen: &str, extra: &str) -> Gw {
    gateway_with(pki, cert, listen, extra, "").await
}

/// A gateway on loopback with these `[api]` settings.
pub(crate) async fn api_gateway(pki: &Pki, api_extra: &str) -> Gw {
    gateway_with(
        pki,
        &pki.gateway("gateway", 30),
        "127.0.0.1:0",
        "",
        api_extra,
    )
    .await
}

/// A worker `id` connected to `gw`, and an API client that has seen it.
pub(crate) async fn one_worker(pki: &Pki, gw: &Gw, id: &str) -> (Wk, ApiClient) {
    let wk = worker(&pki.ca_pem, id, &pki.worker(id, 30), &[gw.bound.tunnel], "").await;
    let mut api = gw.api();
    wait_workers(&mut api, 1).await;
    (wk, api)
}

/// [`gateway`] with extra keys in `[api]` too.
async fn gateway_with(
    pki: &Pki,
    cert: &(PathBuf, PathBuf),
    listen: &str,
    extra: &str,
    api_extra: &str,
) -> Gw {
    let dir = tempfile::tempdir().unwrap().keep();
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let toml = format!(
        "[tunnel]\nlisten = \"{listen}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\nkeepalive_secs = 5\n{extra}\n\n[api]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"token\"\nreconnect_wait_secs = 20\n{api_extra}\n",
        pki.ca_pem, cert.0, cert.1
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, toml).unwrap();
    let config = hands::gateway::Config::load(&path).unwrap();
    let (stop, shutdown) = watch::channel(false);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(hands::gateway::run(
        config,
        move |b, gw| {
            let _ = tx.send((b, gw));
        },
        shutdown,
    ));
    let (bound, gw) = rx.await.expect("gateway started");
    Gw {
        bound,
        gw,
        stop,
        task,
    }
}

pub(crate) struct Wk {
    states: watch::Receiver<Vec<SlotState>>,
    stop: watch::Sender<bool>,
    registry: Arc<Registry>,
    task: tokio::task::JoinHandle<()>,
}

impl Wk {
    /// Why the first failed attempt failed.
    async fn first_error(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(e) = self.states.borrow().iter().find_map(|s| match s {
                SlotState::Waiting { error, .. } => Some(error.clone()),
                _ => None,
            }) {
                return e;
            }
            assert!(Instant::now() < deadline, "the worker never failed a dial");
            let _ = tokio::time::timeout(Duration::from_millis(200), self.states.changed()).await;
        }
    }
    /// Waits for a failed attempt whose error satisfies `pred`.
    async fn error_where(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(e) = self.states.borrow().iter().find_map(|s| match s {
                SlotState::Waiting { error, .. } if pred(error) => Some(error.clone()),
                _ => None,
            }) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no such failure: {:?}",
                self.states.borrow()
            );
            let _ = tokio::time::timeout(Duration::from_millis(200), self.states.changed()).await;
        }
    }
    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }
    pub(crate) async fn stop(self) {
        self.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        self.registry.close_all();
    }
}

async fn worker(
    pki_ca: &Path,
    id: &str,
    cert: &(PathBuf, PathBuf),
    endpoints: &[SocketAddr],
    extra: &str,
) -> Wk {
    worker_with(pki_ca, id, cert, endpoints, "capacity = 32", extra).await
}

/// [`worker`] with these top-level keys (`capacity` among them); `extra` ends
/// the file, so it may open tables of its own after the `[tunnel]` keys.
async fn worker_with(
    pki_ca: &Path,
    id: &str,
    cert: &(PathBuf, PathBuf),
    endpoints: &[SocketAddr],
    top: &str,
    extra: &str,
) -> Wk {
    let dir = tempfile::tempdir().unwrap().keep();
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let proxy = if extra.contains("proxy") {
        ""
    } else {
        "proxy = \"none\"\n"
    };
    let keepalive = if extra.contains("keepalive_secs") {
        ""
    } else {
        "keepalive_secs = 5\n"
    };
    let server_name = if extra.contains("server_name") {
        ""
    } else {
        "server_name = \"localhost\"\n"
    };
    let toml = format!(
        "worker_id = \"{id}\"\n{top}\nenvironments = [\"default\"]\n\n[tunnel]\nendpoints = [{}]\n{server_name}ca = {pki_ca:?}\ncert = {:?}\nkey = {:?}\n{proxy}{keepalive}backoff_base_ms = 20\nbackoff_max_ms = 300\nhealthy_after_secs = 2\n{extra}\n",
        eps.join(", "),
        cert.0,
        cert.1
    );
    let path = dir.join("worker.toml");
    std::fs::write(&path, toml).unwrap();
    let config =
        hands::worker::Config::load(&path, &hands::policy::lookup::Lookup::builtin_only()).unwrap();
    let registry = hands::worker::registry(&config, crate::util::config()).unwrap();
    let (stop, shutdown) = watch::channel(false);
    let (states_tx, states) = watch::channel(Vec::new());
    let reg = registry.clone();
    let task = tokio::spawn(async move {
        hands::worker::serve(
            &config,
            reg,
            |_| {},
            |_| {},
            Some(states_tx),
            Default::default(),
            shutdown,
        )
        .await
        .expect("worker serves");
    });
    Wk {
        states,
        stop,
        registry,
        task,
    }
}

/// Waits until the gateway lists `n` workers.
pub(crate) async fn wait_workers(api: &mut ApiClient, n: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = api.request("GET", "/v1/workers", None).await.unwrap();
        if a.body["workers"].as_array().map(Vec::len) == Some(n) {
            return a.body;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} workers, have {}",
            a.body
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub(crate) async fn open(api: &mut ApiClient) -> String {
    let a = api
        .request(
            "POST",
            "/v1/sessions",
            Some(&json!({"environment": "default"})),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 201, "{}", a.body);
    a.body["session_id"].as_str().unwrap().to_string()
}

pub(crate) async fn tool(
    api: &mut ApiClient,
    session: &str,
    id: &str,
    name: &str,
    input: Value,
) -> Value {
    let a = api
        .request(
            "POST",
            &format!("/v1/sessions/{session}/tool_use"),
            Some(&json!({"type": "tool_use", "id": id, "name": name, "input": input})),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{name}: {}", a.body);
    a.body
}

pub(crate) fn text(result: &Value) -> String {
    result["content"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["text"].as_str())
        .collect()
}

/// A gateway and one worker with good certificates.
async fn stack(id: &str) -> (Pki, Gw, Wk) {
    let pki = Pki::new();
    let gcert = pki.gateway("gateway", 30);
    let wcert = pki.worker(id, 30);
    let gw = gateway(&pki, &gcert, "127.0.0.1:0", "").await;
    let wk = worker(&pki.ca_pem, id, &wcert, &[gw.bound.tunnel], "").await;
    wait_workers(&mut gw.api(), 1).await;
    (pki, gw, wk)
}

/// `curl` against the gateway's API: (HTTP status, JSON body).
fn curl(bound: &Bound, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-X", method, "-w", "\n%{http_code}"])
        .arg("-H")
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .args(["-H", "Content-Type: application/json"]);
    if let Some(b) = body {
        cmd.arg("--data-binary").arg(b.to_string());
    }
    let out = cmd
        .arg(format!("http://{}{path}", bound.api))
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (
        code.parse().unwrap(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn every_tool_through_gateway_and_tunnel_with_curl() {
    require_sandbox!();
    let (_pki, gw, wk) = stack("w-tools").await;
    let b = gw.bound;
    let (code, tools) = tokio::task::spawn_blocking(move || curl(&b, "GET", "/v1/tools", None))
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert_eq!(tools["tools"].as_array().unwrap().len(), 6);
    let steps = move || {
        let (code, s) = curl(
            &b,
            "POST",
            "/v1/sessions",
            Some(&json!({"environment": "default"})),
        );
        assert_eq!(code, 201, "{s}");
        let sid = s["session_id"].as_str().unwrap().to_string();
        assert!(sid.starts_with("w-tools:"), "{sid}");
        let path = format!("/v1/sessions/{sid}/tool_use");
        let call = |id: &str, name: &str, input: Value| {
            let (code, r) = curl(
                &b,
                "POST",
                &path,
                Some(&json!({"id": id, "name": name, "input": input})),
            );
            assert_eq!(code, 200, "{r}");
            assert_eq!(r["type"], "tool_result");
            assert_eq!(r["tool_use_id"], id);
            r
        };
        let r = call(
            "t1",
            "write",
            json!({"file_path": "a/b.txt", "content": "alpha\nbeta\n"}),
        );
        assert_eq!(r["is_error"], false, "{r}");
        let r = call("t2", "read", json!({"file_path": "a/b.txt"}));
        assert_eq!(text(&r), "alpha\nbeta\n");
        let r = call(
            "t3",
            "edit",
            json!({"file_path": "a/b.txt", "old_string": "beta", "new_string": "gamma"}),
        );
        assert_eq!(r["is_error"], false, "{r}");
        let r = call("t4", "glob", json!({"pattern": "**/*.txt"}));
        assert_eq!(text(&r), "/workspace/a/b.txt");
        let r = call("t5", "grep", json!({"pattern": "gam+a"}));
        assert_eq!(text(&r), "/workspace/a/b.txt:2:gamma\n");
        let r = call("t6", "bash", json!({"command": "cat a/b.txt; id -u"}));
        let t = text(&r);
        assert!(t.starts_with("alpha\ngamma\n2"), "{t}");
        let r = call("t7", "bash", json!({"command": "ls /nonexistent"}));
        assert!(text(&r).contains("No such file or directory"), "{r}");
        let r = call("t8", "nosuchtool", json!({}));
        assert_eq!(r["is_error"], true, "{r}");
        let r = call("t9", "read", json!(null));
        assert_eq!(r["is_error"], true, "a null input is a tool error: {r}");
        // The same tool_use again: the same result, not a second run.
        let again = call("t6", "bash", json!({"command": "cat a/b.txt; id -u"}));
        assert_eq!(text(&again), t);
        let (code, e) = curl(
            &b,
            "POST",
            &path,
            Some(&json!({"id": "t6", "name": "bash", "input": {"command": "other"}})),
        );
        assert_eq!(
            (code, e["error"]["type"].as_str()),
            (409, Some("CALL_INPUT_MISMATCH"))
        );
        let (code, c) = curl(&b, "DELETE", &format!("/v1/sessions/{sid}"), None);
        assert_eq!((code, c["closed"].as_bool()), (200, Some(true)));
        let (code, c) = curl(&b, "DELETE", &format!("/v1/sessions/{sid}"), None);
        assert_eq!(
            (code, c["closed"].as_bool()),
            (200, Some(false)),
            "closing is idempotent"
        );
        let (code, e) = curl(
            &b,
            "POST",
            &path,
            Some(&json!({"id": "t10", "name": "bash", "input": {"command": "true"}})),
        );
        assert_eq!(
            (code, e["error"]["type"].as_str()),
            (404, Some("SESSION_NOT_FOUND"))
        );
    };
    tokio::task::spawn_blocking(steps).await.unwrap();
    assert!(gw.metric("hands_gateway_tool_calls_total{tool=\"read\",result=\"ok\"}") >= 1);
    wk.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_timeout_restart_and_cancel_through_the_gateway() {
    require_sandbox!();
    let (_pki, gw, wk) = stack("w-stream").await;
    let mut api = gw.api();
    let sid = open(&mut api).await;
    let (status, events) = api
        .stream(
            "POST",
            &format!("/v1/sessions/{sid}/tool_use"),
            Some(&json!({"id": "s1", "name": "bash", "input": {"command": "for i in 1 2 3; do echo n$i; sleep 0.1; done"}})),
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(events[0].event, "started");
    assert_eq!(events[0].data["executed_now"], true);
    let out: String = events
        .iter()
        .filter(|e| e.event == "output")
        .map(|e| e.data["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(out, "n1\nn2\nn3\n");
    let last = events.last().unwrap();
    assert_eq!(last.event, "tool_result");
    assert_eq!(text(&last.data), "n1\nn2\nn3");

    let a = api
        .request(
            "POST",
            &format!("/v1/sessions/{sid}/tool_use"),
            Some(&json!({"id": "s2", "name": "bash", "input": {"command": "sleep 30", "timeout_ms": 500}})),
        )
        .await
        .unwrap();
    assert_eq!(a.outcome.as_deref(), Some("timed_out"));
    assert_eq!(a.body["is_error"], true);
    let a = api
        .request(
            "POST",
            &format!("/v1/sessions/{sid}/tool_use"),
            Some(&json!({"id": "s3", "name": "bash", "input": {"restart": true}})),
        )
        .await
        .unwrap();
    assert_eq!(a.outcome.as_deref(), Some("completed"), "{}", a.body);

    // Cancel from another client while the call runs.
    let mut api2 = gw.api();
    let sid2 = sid.clone();
    let running = tokio::spawn(async move {
        api2.request(
            "POST",
            &format!("/v1/sessions/{sid2}/tool_use"),
            Some(&json!({"id": "s4", "name": "bash", "input": {"command": "sleep 60"}})),
        )
        .await
        .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let c = api
        .request("POST", &format!("/v1/sessions/{sid}/calls/s4/cancel"), None)
        .await
        .unwrap();
    assert_eq!(c.body["cancelled"], true, "{}", c.body);
    let r = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("cancel ends the call")
        .unwrap();
    assert_eq!(r.outcome.as_deref(), Some("cancelled"));
    assert_eq!(text(&r.body), "tool 'bash' cancelled");
    // Attach to a finished call: its result again.
    let a = api
        .request("GET", &format!("/v1/sessions/{sid}/calls/s1"), None)
        .await
        .unwrap();
    assert_eq!(text(&a.body), "n1\nn2\nn3");
    wk.stop().await;
    gw.stop().await;
}

// ---- certificates, both directions -------------------------------------

/// A worker that must not get in: the gateway counts a rejection and lists
/// no worker; returns the worker's own error.
async fn refused(gw: &Gw, mut wk: Wk) -> String {
    let e = wk.first_error().await;
    let listed = gw.api().request("GET", "/v1/workers", None).await.unwrap();
    assert_eq!(listed.body["workers"], json!([]), "{}", listed.body);
    wk.stop().await;
    e
}

async fn wait_rejected(gw: &Gw, reason: &str) {
    let key = format!("hands_gateway_tunnels_rejected_total{{reason=\"{reason}\"}}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metric(&key) == 0 {
        assert!(Instant::now() < deadline, "no {reason} rejection counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_refuses_a_worker_certificate_from_another_ca() {
    let pki = Pki::new();
    let other = Pki::new();
    let gw = gateway(&pki, &pki.gateway("gateway", 30), "127.0.0.1:0", "").await;
    let wk = worker(
        &pki.ca_pem,
        "w1",
        &other.worker("w1", 30),
        &[gw.bound.tunnel],
        "",
    )
    .await;
    let e = refused(&gw, wk).await;
    wait_rejected(&gw, "tls").await;
    assert!(
        e.contains("alert") || e.contains("reset") || e.contains("closed"),
        "{e}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_refuses_a_client_without_certificate() {
    let pki = Pki::new();
    let gw = gateway(&pki, &pki.gateway("gateway", 30), "127.0.0.1:0", "").await;
    let url = format!("https://localhost:{}/", gw.bound.tunnel.port());
    let ca = pki.ca_pem.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "--http2", "--max-time", "10", "--cacert"])
            .arg(ca)
            .arg(url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        !out.status.success(),
        "curl without a client certificate got in"
    );
    // curl may see the alert or just the close, depending on timing; the
    // gateway's count says why.
    eprintln!("curl: {}", String::from_utf8_lossy(&out.stderr));
    wait_rejected(&gw, "tls").await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_refuses_an_expired_worker_certificate() {
    let pki = Pki::new();
    let gw = gateway(&pki, &pki.gateway("gateway", 30), "127.0.0.1:0", "").await;
    let wk = worker(
        &pki.ca_pem,
        "w1",
        &pki.worker("w1", -1),
        &[gw.bound.tunnel],
        "",
    )
    .await;
    refused(&gw, wk).await;
    wait_rejected(&gw, "tls").await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_refuses_a_worker_name_it_does_not_allow() {
    let pki = Pki::new();
    let gw = gateway(
        &pki,
        &pki.gateway("gateway", 30),
        "127.0.0.1:0",
        "allowed_workers = [\"w-allowed\"]",
    )
    .await;
    let wk = worker(
        &pki.ca_pem,
        "w-intruder",
        &pki.worker("w-intruder", 30),
        &[gw.bound.tunnel],
        "",
    )
    .await;
    refused(&gw, wk).await;
    wait_rejected(&gw, "identity").await;
    // The allowed one gets in through the same gateway.
    let ok = worker(
        &pki.ca_pem,
        "w-allowed",
        &pki.worker("w-allowed", 30),
        &[gw.bound.tunnel],
        "",
    )
    .await;
    wait_workers(&mut gw.api(), 1).await;
    ok.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_refuses_a_gateway_certificate_from_another_ca() {
    let pki = Pki::new();
    let other = Pki::new();
    let gw = gateway(&pki, &pki.gateway("gateway", 30), "127.0.0.1:0", "").await;
    // The worker trusts only `other`'s CA.
    let wk = worker(
        &other.ca_pem,
        "w1",
        &pki.worker("w1", 30),
        &[gw.bound.tunnel],
        "",
    )
    .await;
    let e = refused(&gw, wk).await;
    // Both dev CAs share a name, so webpki reports the signature.
    assert!(e.contains("invalid peer certificate"), "{e}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_refuses_an_expired_gateway_certificate() {
    let pki = Pki::new();
    let gw = gateway(&pki, &pki.gateway("gateway", -1), "127.0.0.1:0", "").await;
    let wk = worker(
        &pki.ca_pem,
        "w1",
        &pki.worker("w1", 30),
        &[gw.bound.tunnel],
        "",
    )
    .await;
    let e = refused(&gw, wk).await;
    assert!(e.contains("certificate expired"), "{e}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_refuses_a_gateway_with_the_wrong_name() {
    let pki = Pki::new();
    let gw = gateway(&pki, &pki.gateway("gateway", 30), "127.0.0.1:0", "").await;
    let wk = worker(
        &pki.ca_pem,
        "w1",
        &pki.worker("w1", 30),
        &[gw.bound.tunnel],
        "server_name = \"gateway.other.example\"",
    )
    .await;
    let e = refused(&gw, wk).await;
    assert!(e.contains("not valid for name"), "{e}");
    gw.stop().await;
}

// ---- connection loss ------------------------------------------------------

/// A TCP relay whose connections the test can cut.
struct Relay {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accepted: Arc<AtomicUsize>,
}

impl Relay {
    async fn new(target: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (c, a) = (conns.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let h = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                c.lock().unwrap().push(h);
            }
        });
        Relay {
            addr,
            conns,
            accepted,
        }
    }

    /// Drops every relayed connection, both sides.
    fn cut(&self) {
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tcp_cut_mid_call_delivers_the_result_once_and_never_reruns() {
    require_sandbox!();
    let pki = Pki::new();
    let gw = gateway(&pki, &pki.gateway("gateway", 30), "127.0.0.1:0", "").await;
    let relay = Relay::new(gw.bound.tunnel).await;
    let wk = worker(
        &pki.ca_pem,
        "w-cut",
        &pki.worker("w-cut", 30),
        &[relay.addr],
        "",
    )
    .await;
    let mut api = gw.api();
    wait_workers(&mut api, 1).await;
    let sid = open(&mut api).await;

    // A blocking call, cut while it runs.
    let mut api2 = gw.api();
    let sid2 = sid.clone();
    let running = tokio::spawn(async move {
        tool(
            &mut api2,
            &sid2,
            "cut-1",
            "bash",
            json!({"command": "echo run >> runs.log; sleep 1.5; echo finished"}),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.cut();
    let r = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the result arrives after reconnect")
        .unwrap();
    assert_eq!(text(&r), "finished", "{r}");
    assert!(
        relay.accepted.load(Ordering::SeqCst) >= 2,
        "the worker redialled"
    );

    // A streamed call, cut twice: the output arrives whole, nothing twice.
    let sid3 = sid.clone();
    let mut api3 = gw.api();
    let streamed = tokio::spawn(async move {
        api3.stream(
            "POST",
            &format!("/v1/sessions/{sid3}/tool_use"),
            Some(&json!({"id": "cut-2", "name": "bash", "input": {"command": "echo run >> runs.log; for i in $(seq 1 20); do echo line $i; sleep 0.1; done"}})),
            |_| {},
        )
        .await
        .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    relay.cut();
    tokio::time::sleep(Duration::from_millis(700)).await;
    relay.cut();
    let (_, events) = tokio::time::timeout(Duration::from_secs(30), streamed)
        .await
        .expect("the stream resumes")
        .unwrap();
    let mut expected_offset = 0u64;
    let mut out = String::new();
    for e in events.iter().filter(|e| e.event == "output") {
        assert_eq!(
            e.data["offset"].as_u64(),
            Some(expected_offset),
            "no gap, no repeat"
        );
        let t = e.data["text"].as_str().unwrap();
        expected_offset += t.len() as u64;
        out.push_str(t);
    }
    let want: String = (1..=20).map(|i| format!("line {i}\n")).collect();
    assert_eq!(out, want);
    assert_eq!(events.iter().filter(|e| e.event == "started").count(), 1);
    assert_eq!(events.last().unwrap().event, "tool_result");

    // Each command ran exactly once.
    let log = tool(
        &mut api,
        &sid,
        "count",
        "read",
        json!({"file_path": "runs.log"}),
    )
    .await;
    assert_eq!(text(&log), "run\nrun\n");
    assert!(gw.metric("hands_gateway_call_resumes_total") >= 2);
    wk.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_gateway_restart_the_worker_reconnects_and_sessions_live_on() {
    require_sandbox!();
    let pki = Pki::new();
    let gcert = pki.gateway("gateway", 30);
    let gw = gateway(&pki, &gcert, "127.0.0.1:0", "").await;
    let tunnel = gw.bound.tunnel;
    let wk = worker(
        &pki.ca_pem,
        "w-restart",
        &pki.worker("w-restart", 30),
        &[tunnel],
        "",
    )
    .await;
    let mut api = gw.api();
    wait_workers(&mut api, 1).await;
    let sid = open(&mut api).await;
    tool(
        &mut api,
        &sid,
        "r1",
        "write",
        json!({"file_path": "kept.txt", "content": "still here"}),
    )
    .await;
    tool(
        &mut api,
        &sid,
        "r2",
        "bash",
        json!({"command": "export MARK=42"}),
    )
    .await;
    gw.stop().await;

    let gw = gateway(&pki, &gcert, &tunnel.to_string(), "").await;
    let mut api = gw.api();
    wait_workers(&mut api, 1).await;
    let r = tool(
        &mut api,
        &sid,
        "r3",
        "read",
        json!({"file_path": "kept.txt"}),
    )
    .await;
    assert_eq!(text(&r), "still here");
    let r = tool(
        &mut api,
        &sid,
        "r4",
        "bash",
        json!({"command": "echo $MARK"}),
    )
    .await;
    assert_eq!(text(&r), "42", "the same shell, through the new gateway");
    wk.stop().await;
    gw.stop().await;
}

/// A minimal HTTP CONNECT proxy; records each request line.
async fn connect_proxy() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    match down.read_u8().await {
                        Ok(b) => head.push(b),
                        Err(_) => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let line = head.lines().next().unwrap_or("").to_string();
                s.lock().unwrap().push(line.clone());
                let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
                match tokio::net::TcpStream::connect(&target).await {
                    Ok(mut up) => {
                        let _ = down
                            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                            .await;
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                    Err(_) => {
                        let _ = down.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_behind_an_http_connect_proxy_connects() {
    require_sandbox!();
    let pki = Pki::new();
    let gw = gateway(&pki, &pki.gateway("gateway", 30), "127.0.0.1:0", "").await;
    let (proxy, seen) = connect_proxy().await;
    let wk = worker(
        &pki.ca_pem,
        "w-proxied",
        &pki.worker("w-proxied", 30),
        &[gw.bound.tunnel],
        &format!("proxy = \"http://{proxy}\""),
    )
    .await;
    let mut api = gw.api();
    wait_workers(&mut api, 1).await;
    let sid = open(&mut api).await;
    let r = tool(
        &mut api,
        &sid,
        "p1",
        "bash",
        json!({"command": "echo through the proxy"}),
    )
    .await;
    assert_eq!(text(&r), "through the proxy");
    let lines = seen.lock().unwrap().clone();
    assert_eq!(
        lines.first().map(String::as_str),
        Some(format!("CONNECT {} HTTP/1.1", gw.bound.tunnel).as_str())
    );
    wk.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_keeps_one_tunnel_per_endpoint_and_survives_losing_one() {
    require_sandbox!();
    let pki = Pki::new();
    let gcert = pki.gateway("gateway", 30);
    let a = gateway(&pki, &gcert, "127.0.0.1:0", "").await;
    let b = gateway(&pki, &gcert, "127.0.0.1:0", "").await;
    let wk = worker(
        &pki.ca_pem,
        "w-two",
        &pki.worker("w-two", 30),
        &[a.bound.tunnel, b.bound.tunnel],
        "connections = 2",
    )
    .await;
    let mut api_a = a.api();
    let mut api_b = b.api();
    let listed = wait_workers(&mut api_a, 1).await;
    wait_workers(&mut api_b, 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.gw.workers.counts().1 < 2 {
        assert!(
            Instant::now() < deadline,
            "two connections to each gateway: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A session opened through A is reachable through B: the id routes.
    let sid = open(&mut api_a).await;
    tool(
        &mut api_a,
        &sid,
        "m1",
        "write",
        json!({"file_path": "x", "content": "shared"}),
    )
    .await;
    a.stop().await;
    let r = tool(&mut api_b, &sid, "m2", "read", json!({"file_path": "x"})).await;
    assert_eq!(text(&r), "shared");
    wk.stop().await;
    b.stop().await;
}

// ---- two processes, one identity (issue #11, item 5) ------------------------

/// Waits until the gateway holds `n` tunnel connections in all.
async fn wait_connections(gw: &Gw, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.gw.workers.counts().1 != n {
        assert!(
            Instant::now() < deadline,
            "expected {n} connections, have {:?}",
            gw.gw.workers.counts()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two worker processes that share one identity (one certificate copied to two
/// hosts, or a restart whose old process still runs; here two workers with
/// registries of their own), each with two connections: every session reaches
/// the process that holds it, so no call meets `SESSION_NOT_FOUND` (on one
/// merged entry, calls alternated between the four connections), every close
/// closes, and nothing is left open in either process. New sessions go to the
/// newest process while it has room.
#[tokio::test(flavor = "multi_thread")]
async fn two_worker_processes_with_one_identity_each_serve_their_own_sessions() {
    require_sandbox!();
    let pki = Pki::new();
    let gw = api_gateway(&pki, "").await;
    let cert = pki.worker("w-twin", 30);
    let one = worker(
        &pki.ca_pem,
        "w-twin",
        &cert,
        &[gw.bound.tunnel],
        "connections = 2",
    )
    .await;
    wait_connections(&gw, 2).await;
    let mut api = gw.api();
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(open(&mut api).await);
    }
    let two = worker(
        &pki.ca_pem,
        "w-twin",
        &cert,
        &[gw.bound.tunnel],
        "connections = 2",
    )
    .await;
    wait_connections(&gw, 4).await;
    for _ in 0..3 {
        sessions.push(open(&mut api).await);
    }
    for (i, sid) in sessions.iter().enumerate() {
        tool(
            &mut api,
            sid,
            "w",
            "write",
            json!({"file_path": "who", "content": format!("session {i}")}),
        )
        .await;
        for k in 0..4 {
            let r = tool(
                &mut api,
                sid,
                &format!("r{k}"),
                "read",
                json!({"file_path": "who"}),
            )
            .await;
            assert_eq!(text(&r), format!("session {i}"), "{sid}");
        }
    }
    assert_eq!(
        (one.registry.open_sessions(), two.registry.open_sessions()),
        (3, 3),
        "three sessions in each process: the first, then the newest"
    );

    // The gateway lists the worker once, with both processes, and every
    // session of both.
    let w = api.request("GET", "/v1/workers", None).await.unwrap().body;
    assert_eq!(w["workers"].as_array().unwrap().len(), 1, "{w}");
    let instances = w["workers"][0]["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 2, "{w}");
    assert!(instances.iter().all(|i| i["connections"] == 2), "{w}");
    let listed = api.request("GET", "/v1/sessions", None).await.unwrap();
    assert_eq!(listed.status, 200, "{}", listed.body);
    let mut ids: Vec<&str> = listed.body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut want: Vec<&str> = sessions.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(ids, want, "{}", listed.body);
    let per_instance: std::collections::BTreeSet<&str> = listed.body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["instance_id"].as_str().unwrap())
        .collect();
    assert_eq!(per_instance.len(), 2, "{}", listed.body);

    for sid in &sessions {
        let a = api
            .request("DELETE", &format!("/v1/sessions/{sid}"), None)
            .await
            .unwrap();
        assert_eq!(
            (a.status, &a.body["closed"]),
            (200, &json!(true)),
            "{sid}: {}",
            a.body
        );
    }
    assert_eq!(
        (one.registry.open_sessions(), two.registry.open_sessions()),
        (0, 0),
        "no session leaked"
    );
    one.stop().await;
    two.stop().await;
    gw.stop().await;
}

/// A relay that can freeze: from then on it forwards nothing and closes
/// nothing, as a host that hung would (the gateway only learns of it from its
/// keepalive).
struct FreezingRelay {
    addr: SocketAddr,
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl FreezingRelay {
    async fn new(target: SocketAddr) -> FreezingRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = frozen.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(FreezingRelay::pipe(dr, uw, f.clone()));
                tokio::spawn(FreezingRelay::pipe(ur, dw, f.clone()));
            }
        });
        FreezingRelay { addr, frozen }
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        frozen: Arc<std::sync::atomic::AtomicBool>,
    ) {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            if frozen.load(Ordering::SeqCst) {
                // Hold both sockets open, forward nothing, forever.
                let _keep = (from, to);
                std::future::pending::<()>().await;
                return;
            }
            if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

/// A worker that restarts while the gateway still holds its old process's
/// connections (the host hung, then came back with a new process): the new
/// process is neither refused nor starved. New sessions go to it, never to the
/// hung connection (where an open would fail once keepalive finds it dead),
/// and a session of the old process is answered `SESSION_NOT_FOUND` once the
/// old connection is found dead, not `WORKER_UNAVAILABLE` after the reconnect
/// wait.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_worker_is_served_at_once_while_its_old_connection_lingers() {
    require_sandbox!();
    let pki = Pki::new();
    // reconnect_wait_secs is 20, keepalive 5 s: a dead connection is dropped
    // within 10 s.
    let gw = gateway(&pki, &pki.gateway("gateway", 30), "127.0.0.1:0", "").await;
    let relay = FreezingRelay::new(gw.bound.tunnel).await;
    let cert = pki.worker("w-restart", 30);
    let old = worker(&pki.ca_pem, "w-restart", &cert, &[relay.addr], "").await;
    let mut api = gw.api();
    wait_connections(&gw, 1).await;
    let old_sid = open(&mut api).await;
    tool(
        &mut api,
        &old_sid,
        "o1",
        "bash",
        json!({"command": "echo old"}),
    )
    .await;

    // The old process hangs and is replaced; the gateway does not know yet.
    relay.freeze();
    old.task.abort();
    old.registry.close_all();
    let new = worker(&pki.ca_pem, "w-restart", &cert, &[gw.bound.tunnel], "").await;
    wait_connections(&gw, 2).await;

    for i in 0..3 {
        let sid = open(&mut api).await;
        let r = tool(
            &mut api,
            &sid,
            "n",
            "bash",
            json!({"command": format!("echo new {i}")}),
        )
        .await;
        assert_eq!(text(&r), format!("new {i}"));
    }
    assert_eq!(new.registry.open_sessions(), 3);

    let a = api
        .request(
            "POST",
            &format!("/v1/sessions/{old_sid}/tool_use"),
            Some(&json!({"id": "o2", "name": "bash", "input": {"command": "echo again"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        (a.status, a.body["error"]["type"].as_str()),
        (404, Some("SESSION_NOT_FOUND")),
        "{}",
        a.body
    );
    new.stop().await;
    gw.stop().await;
}

// ---- sessions: listing, closing, the idle timeout (issue #11, item 6) --------

/// Starts a call through the gateway and leaves it running (the client reads
/// `started` and goes away).
async fn start_and_leave(gw: &Gw, session: &str, id: &str, command: &str) {
    let (status, events) = gw
        .api()
        .stream_until(
            "POST",
            &format!("/v1/sessions/{session}/tool_use"),
            Some(&json!({"id": id, "name": "bash", "input": {"command": command}})),
            |e| e.event == "started",
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{events:?}");
    assert_eq!(events.last().map(|e| e.event.as_str()), Some("started"));
}

/// Cancels a call through the gateway and waits for its result.
async fn cancel_and_wait(api: &mut ApiClient, session: &str, id: &str) {
    let a = api
        .request(
            "POST",
            &format!("/v1/sessions/{session}/calls/{id}/cancel"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        (a.status, &a.body["cancelled"]),
        (200, &json!(true)),
        "{}",
        a.body
    );
    let a = api
        .request("GET", &format!("/v1/sessions/{session}/calls/{id}"), None)
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
}

/// The session ids `GET /v1/sessions` lists (with `query`), in its order.
async fn listed_ids(api: &mut ApiClient, query: &str) -> Vec<String> {
    let a = api
        .request("GET", &format!("/v1/sessions{query}"), None)
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["unreachable"], json!([]), "{}", a.body);
    a.body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap().to_string())
        .collect()
}

/// `GET /v1/sessions` lists the sessions of every connected worker (those
/// opened through the gateway, and one opened on the worker itself), each with
/// its worker, process and activity; `?worker_id=` narrows it to one worker. A
/// listed session is closed with `DELETE`: by its id when the gateway made it,
/// with `?worker_id=` when it did not.
#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_lists_every_workers_sessions_and_closes_a_listed_one() {
    require_sandbox!();
    let pki = Pki::new();
    let gw = api_gateway(&pki, "").await;
    let a = worker(
        &pki.ca_pem,
        "w-a",
        &pki.worker("w-a", 30),
        &[gw.bound.tunnel],
        "",
    )
    .await;
    let b = worker(
        &pki.ca_pem,
        "w-b",
        &pki.worker("w-b", 30),
        &[gw.bound.tunnel],
        "",
    )
    .await;
    let mut api = gw.api();
    wait_workers(&mut api, 2).await;
    let on = |w: &'static str| {
        let mut api = gw.api();
        async move {
            let r = api
                .request(
                    "POST",
                    "/v1/sessions",
                    Some(&json!({"environment": "default", "worker_id": w})),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 201, "{}", r.body);
            r.body["session_id"].as_str().unwrap().to_string()
        }
    };
    let sa = on("w-a").await;
    let sb = on("w-b").await;
    tool(&mut api, &sa, "c1", "bash", json!({"command": "echo hi"})).await;
    b.registry.open("direct-1", "default").await.unwrap();

    let all = api.request("GET", "/v1/sessions", None).await.unwrap();
    assert_eq!(all.status, 200, "{}", all.body);
    let sessions = all.body["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 3, "{}", all.body);
    let s = sessions
        .iter()
        .find(|s| s["session_id"] == sa.as_str())
        .unwrap();
    assert_eq!(s["worker_id"], "w-a");
    assert_eq!(s["instance_id"], a.registry.instance_id());
    assert_eq!(s["environment"], "default");
    assert_eq!((&s["calls"], &s["running_calls"]), (&json!(1), &json!(0)));
    assert_eq!(s["idle_timeout_ms"], 1_800_000);
    assert!(s["idle_ms"].as_u64().unwrap() <= s["age_ms"].as_u64().unwrap());
    let d = sessions
        .iter()
        .find(|s| s["session_id"] == "direct-1")
        .unwrap();
    assert_eq!(
        (&d["worker_id"], &d["instance_id"]),
        (&json!("w-b"), &json!(b.registry.instance_id()))
    );
    let mut on_b = listed_ids(&mut api, "?worker_id=w-b").await;
    on_b.sort();
    let mut want = vec![sb.clone(), "direct-1".to_string()];
    want.sort();
    assert_eq!(on_b, want);
    assert_eq!(listed_ids(&mut api, "?worker_id=w-a").await, [sa.as_str()]);
    let none = api
        .request("GET", "/v1/sessions?worker_id=w-none", None)
        .await
        .unwrap();
    assert_eq!(
        (none.status, none.body["error"]["type"].as_str()),
        (503, Some("WORKER_UNAVAILABLE")),
        "{}",
        none.body
    );

    let r = api
        .request("DELETE", &format!("/v1/sessions/{sa}"), None)
        .await
        .unwrap();
    assert_eq!(
        (r.status, &r.body["closed"]),
        (200, &json!(true)),
        "{}",
        r.body
    );
    let r = api
        .request("DELETE", "/v1/sessions/direct-1?worker_id=w-b", None)
        .await
        .unwrap();
    assert_eq!(
        (r.status, &r.body["closed"]),
        (200, &json!(true)),
        "{}",
        r.body
    );
    assert_eq!(listed_ids(&mut api, "").await, [sb.as_str()]);
    assert_eq!(
        (a.registry.open_sessions(), b.registry.open_sessions()),
        (0, 1)
    );
    a.stop().await;
    b.stop().await;
    gw.stop().await;
}

/// The capacity scenario through the gateway: a worker with room for
/// two sessions, both opened through the gateway and busy (a third is `429
/// AT_CAPACITY`), then abandoned by their clients. The worker's idle timeout
/// closes them, new sessions open again, the listing shows only those, and a
/// client coming back to an abandoned session gets `404 SESSION_NOT_FOUND`
/// saying it was closed for idleness.
#[tokio::test(flavor = "multi_thread")]
async fn abandoned_sessions_opened_through_the_gateway_are_closed_and_free_the_workers_capacity() {
    require_sandbox!();
    let pki = Pki::new();
    let gw = api_gateway(&pki, "").await;
    let wk = worker_with(
        &pki.ca_pem,
        "w-idle",
        &pki.worker("w-idle", 30),
        &[gw.bound.tunnel],
        "capacity = 2",
        "\n[sessions]\nidle_timeout_secs = 1",
    )
    .await;
    let mut api = gw.api();
    wait_workers(&mut api, 1).await;
    let abandoned = [open(&mut api).await, open(&mut api).await];
    for sid in &abandoned {
        start_and_leave(&gw, sid, "long", "sleep 600").await;
    }
    let full = api
        .request(
            "POST",
            "/v1/sessions",
            Some(&json!({"environment": "default"})),
        )
        .await
        .unwrap();
    assert_eq!(
        (full.status, full.body["error"]["type"].as_str()),
        (429, Some("AT_CAPACITY")),
        "{}",
        full.body
    );
    for sid in &abandoned {
        cancel_and_wait(&mut api, sid, "long").await;
    }

    // Nothing closes them but the idle timeout.
    let deadline = Instant::now() + Duration::from_secs(60);
    let fresh = loop {
        let a = api
            .request(
                "POST",
                "/v1/sessions",
                Some(&json!({"environment": "default"})),
            )
            .await
            .unwrap();
        match a.status {
            201 => break a.body["session_id"].as_str().unwrap().to_string(),
            429 => assert!(Instant::now() < deadline, "still full: {}", a.body),
            _ => panic!("{}", a.body),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let second = open(&mut api).await;
    let mut ids = listed_ids(&mut api, "").await;
    ids.sort();
    let mut want = vec![fresh.clone(), second.clone()];
    want.sort();
    assert_eq!(ids, want, "only the new sessions are open");

    let a = api
        .request(
            "POST",
            &format!("/v1/sessions/{}/tool_use", abandoned[0]),
            Some(&json!({"id": "back", "name": "bash", "input": {"command": "echo back"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        (a.status, a.body["error"]["type"].as_str()),
        (404, Some("SESSION_NOT_FOUND")),
        "{}",
        a.body
    );
    let message = a.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("idle"), "{message}");
    for sid in [&fresh, &second] {
        let r = api
            .request("DELETE", &format!("/v1/sessions/{sid}"), None)
            .await
            .unwrap();
        assert_eq!(r.body["closed"], json!(true), "{}", r.body);
    }
    wk.stop().await;
    gw.stop().await;
}

// ---- load, stalls, bad input ---------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_concurrent_calls_across_ten_sessions_through_the_tunnel() {
    require_sandbox!();
    let (_pki, gw, wk) = stack("w-load").await;
    let mut api = gw.api();
    let mut sessions = Vec::new();
    for _ in 0..10 {
        sessions.push(open(&mut api).await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let sid = sessions[i % 10].clone();
        let mut api = gw.api();
        tasks.spawn(async move {
            let (name, input, want) = if i % 2 == 0 {
                (
                    "bash",
                    json!({"command": format!("echo call-{i}")}),
                    format!("call-{i}"),
                )
            } else {
                (
                    "write",
                    json!({"file_path": format!("f{i}"), "content": "x"}),
                    format!("wrote 1 bytes to f{i}"),
                )
            };
            let r = tool(&mut api, &sid, &format!("c{i}"), name, input).await;
            assert_eq!(text(&r), want);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    wk.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_that_stops_reading_delays_no_other_call() {
    require_sandbox!();
    let (_pki, gw, wk) = stack("w-stall").await;
    let mut api = gw.api();
    let stalled_session = open(&mut api).await;
    let other = open(&mut api).await;
    // A streamed call with 40 MB of output whose client never reads.
    let body = json!({"id": "big", "name": "bash", "input": {"command": "head -c 40000000 /dev/zero | tr '\\0' x; echo"}}).to_string();
    let mut raw = tokio::net::TcpStream::connect(gw.bound.api).await.unwrap();
    let req = format!(
        "POST /v1/sessions/{stalled_session}/tool_use HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Meanwhile, on the same tunnel: other calls go through.
    for i in 0..20 {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            tool(
                &mut api,
                &other,
                &format!("o{i}"),
                "bash",
                json!({"command": format!("echo {i}")}),
            ),
        )
        .await
        .expect("a call behind a stalled consumer must not wait for it");
        assert_eq!(text(&r), i.to_string());
    }
    drop(raw);
    wk.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_oversized_requests_get_clear_errors_and_the_gateway_serves_on() {
    require_sandbox!();
    let (_pki, gw, wk) = stack("w-bad").await;
    let mut api = gw.api();
    let sid = open(&mut api).await;
    let path = format!("/v1/sessions/{sid}/tool_use");
    let expect = |a: hands::gateway::client::Answer, status: u16, kind: &str| {
        assert_eq!(a.status, status, "{}", a.body);
        assert_eq!(a.body["error"]["type"], kind, "{}", a.body);
        assert!(a.body["error"]["message"].as_str().unwrap().len() > 10);
    };
    // Not JSON: the raw client sends it as is.
    let mut raw = tokio::net::TcpStream::connect(gw.bound.api).await.unwrap();
    let req = format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 9\r\nConnection: close\r\n\r\n{{not json");
    raw.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    raw.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(
        resp.contains("INVALID_REQUEST") && resp.contains("not JSON"),
        "{resp}"
    );
    expect(
        api.request("POST", &path, Some(&json!([1, 2])))
            .await
            .unwrap(),
        400,
        "INVALID_REQUEST",
    );
    expect(
        api.request("POST", &path, Some(&json!({"id": "x", "name": "bash"})))
            .await
            .unwrap(),
        400,
        "INVALID_REQUEST",
    );
    expect(
        api.request(
            "POST",
            &path,
            Some(&json!({"id": "bad id!", "name": "bash", "input": {}})),
        )
        .await
        .unwrap(),
        400,
        "INVALID_ID",
    );
    expect(
        api.request(
            "POST",
            &path,
            Some(&json!({"type": "text", "id": "x", "name": "bash", "input": {}})),
        )
        .await
        .unwrap(),
        400,
        "INVALID_REQUEST",
    );
    expect(
        api.request(
            "POST",
            "/v1/sessions/nocolon/tool_use",
            Some(&json!({"id": "x", "name": "bash", "input": {}})),
        )
        .await
        .unwrap(),
        404,
        "SESSION_NOT_FOUND",
    );
    expect(
        api.request(
            "POST",
            "/v1/sessions/ghost:s1/tool_use",
            Some(&json!({"id": "x", "name": "bash", "input": {}})),
        )
        .await
        .unwrap(),
        503,
        "WORKER_UNAVAILABLE",
    );
    expect(
        api.request(
            "POST",
            "/v1/sessions",
            Some(&json!({"environment": "nope"})),
        )
        .await
        .unwrap(),
        503,
        "NO_WORKER",
    );
    let mut wrong = ApiClient::new(gw.bound.api, "wrong-token-0123456789");
    expect(
        wrong.request("GET", "/v1/workers", None).await.unwrap(),
        401,
        "UNAUTHENTICATED",
    );
    // Over the 64 MiB message limit.
    let huge = "x".repeat(65 << 20);
    let a = api
        .request("POST", &path, Some(&json!({"id": "huge", "name": "write", "input": {"file_path": "h", "content": huge}})))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a.status, 413, "{}", a.body);
    // A large but allowed write goes through the tunnel whole.
    let big = "y".repeat(8 << 20);
    let r = tool(
        &mut api,
        &sid,
        "big",
        "write",
        json!({"file_path": "big", "content": big}),
    )
    .await;
    assert_eq!(text(&r), "wrote 8388608 bytes to big");
    let r = tool(
        &mut api,
        &sid,
        "after",
        "bash",
        json!({"command": "wc -c < big"}),
    )
    .await;
    assert_eq!(text(&r), "8388608");
    wk.stop().await;
    gw.stop().await;
}

// ---- keepalive, rotation, the demo -----------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_gateway_is_detected_by_keepalive_and_the_worker_redials() {
    let pki = Pki::new();
    let gw = gateway(&pki, &pki.gateway("gateway", 30), "127.0.0.1:0", "").await;
    // A relay that can go silent: it stops forwarding but keeps both sockets open.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = listener.local_addr().unwrap();
    let (freeze, frozen) = watch::channel(false);
    let accepted = Arc::new(AtomicUsize::new(0));
    let acc = accepted.clone();
    let target = gw.bound.tunnel;
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            acc.fetch_add(1, Ordering::SeqCst);
            let mut frozen = frozen.clone();
            tokio::spawn(async move {
                let Ok(mut up) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let already = *frozen.borrow();
                if already {
                    // Connections made while frozen are forwarded normally.
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    return;
                }
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                    () = hands::util::stopped(&mut frozen) => {
                        // Silent: hold the sockets, forward nothing.
                        tokio::time::sleep(Duration::from_secs(120)).await;
                    }
                }
            });
        }
    });
    let mut wk = worker(
        &pki.ca_pem,
        "w-silent",
        &pki.worker("w-silent", 30),
        &[relay],
        "keepalive_secs = 1",
    )
    .await;
    wait_workers(&mut gw.api(), 1).await;
    let t0 = Instant::now();
    freeze.send_replace(true);
    let e = wk.first_error().await;
    let detected = t0.elapsed();
    assert!(
        detected < Duration::from_secs(10),
        "a silent peer went unnoticed for {detected:?} (keepalive 1 s)"
    );
    eprintln!("silent peer detected after {detected:?}: {e}");
    // The worker redials (through the relay, which forwards new connections).
    let deadline = Instant::now() + Duration::from_secs(20);
    while accepted.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "the worker did not redial");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wk.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rotated_certificates_are_used_by_new_connections_without_a_restart() {
    let pki = Pki::new();
    // The gateway starts with an expired certificate: the worker refuses it.
    let gcert = pki.gateway("gateway", -1);
    let gw = gateway(&pki, &gcert, "127.0.0.1:0", "").await;
    // The worker starts with an expired certificate too.
    let wcert = pki.worker("w-rot", -1);
    let mut wk = worker(&pki.ca_pem, "w-rot", &wcert, &[gw.bound.tunnel], "").await;
    let e = wk.first_error().await;
    assert!(e.contains("certificate expired"), "{e}");
    // Rotate the gateway's files in place (write + rename, as cert-manager does).
    let fresh = pki.ca.gateway(&["localhost".into()], 30).unwrap();
    for (path, text) in [(&gcert.0, &fresh.cert_pem), (&gcert.1, &fresh.key_pem)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    // The worker now accepts the gateway; the gateway refuses the worker's
    // expired certificate.
    let e = wk
        .error_where(|e| !e.contains("invalid peer certificate"))
        .await;
    eprintln!("after the gateway's rotation: {e}");
    assert_eq!(
        gw.api()
            .request("GET", "/v1/workers", None)
            .await
            .unwrap()
            .body["workers"],
        json!([])
    );
    // Rotate the worker's: it gets in, with neither process restarted.
    let fresh = pki.ca.worker("w-rot", 30).unwrap();
    for (path, text) in [(&wcert.0, &fresh.cert_pem), (&wcert.1, &fresh.key_pem)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    wait_workers(&mut gw.api(), 1).await;
    wk.stop().await;
    gw.stop().await;
}

#[test]
fn the_readme_demo_runs_and_exits_zero() {
    require_sandbox!();
    let out = Command::new(crate::util::hands_bin())
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "-> write",
        "-> read",
        "-> edit",
        "-> glob",
        "-> grep",
        "-> bash",
        "Permission denied",
        "timed out",
        "demo finished",
    ] {
        assert!(
            stdout.contains(step),
            "the transcript lacks {step:?}:\n{stdout}"
        );
    }
}

// ---- the API's connection budget and timers ----------------------------------

/// Waits until the peer closes `tcp` (EOF or reset) and returns how long that
/// took, or `Err` when it is still open after `within`. With `trickle`, one
/// more byte of a header is sent every 500 ms meanwhile, as slowloris does.
async fn closed_within(
    tcp: &mut tokio::net::TcpStream,
    within: Duration,
    trickle: bool,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let left = within
            .checked_sub(t0.elapsed())
            .ok_or_else(|| format!("still open after {within:?}"))?;
        tokio::select! {
            r = tcp.read(&mut buf) => match r {
                Ok(0) | Err(_) => return Ok(t0.elapsed()),
                Ok(_) => {} // an answer (a 408, say) before the close
            },
            _ = tick.tick(), if trickle => {
                if tcp.write_all(b"x").await.is_err() {
                    return Ok(t0.elapsed());
                }
            }
            () = tokio::time::sleep(left) => return Err(format!("still open after {within:?}")),
        }
    }
}

/// `GET path` on a new connection: (status, body); `Err` says whether the
/// connection was closed without an answer or gave none within 5 s.
async fn try_get(api: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(api)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let _ = tcp.write_all(req.as_bytes()).await;
        let mut resp = Vec::new();
        let _ = tcp.read_to_end(&mut resp).await;
        let text = String::from_utf8_lossy(&resp).to_string();
        let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok());
        match (status, text.split_once("\r\n\r\n")) {
            (Some(status), Some((_, body))) => Ok((status, body.to_string())),
            _ => Err(format!("closed without an answer: {text:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| Err("no answer within 5 s".into()))
}

async fn raw_get(api: SocketAddr, path: &str) -> Option<(u16, String)> {
    try_get(api, path).await.ok()
}

/// Reads one response's head and body (`Content-Length` framed) from a
/// kept-alive connection.
async fn read_response(tcp: &mut tokio::net::TcpStream) -> String {
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed before answering");
        resp.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&resp).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
    }
}

async fn wait_metric(gw: &Gw, line_prefix: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = gw.metric(line_prefix);
        if v > 0 {
            return v;
        }
        assert!(Instant::now() < deadline, "{line_prefix} never counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue #9: connections that send half a header, or nothing, no longer stay
/// open forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_slowloris_connection_is_closed_within_the_header_read_timeout() {
    let pki = Pki::new();
    let gw = api_gateway(&pki, "header_read_timeout_secs = 2\nidle_timeout_secs = 60").await;
    // Half a header, then one byte every 500 ms: never a complete head.
    let mut slow = tokio::net::TcpStream::connect(gw.bound.api).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let mut silent = tokio::net::TcpStream::connect(gw.bound.api).await.unwrap();
    let (slow, silent) = tokio::join!(
        closed_within(&mut slow, Duration::from_secs(15), true),
        closed_within(&mut silent, Duration::from_secs(15), false),
    );
    let slow = slow.expect("a slowloris connection is closed");
    let silent = silent.expect("a connection that sends nothing is closed");
    eprintln!("closed after {slow:?} (slowloris) and {silent:?} (silent); timeout 2 s");
    assert!(
        wait_metric(
            &gw,
            "hands_gateway_api_connections_timed_out_total{reason=\"header_read\"}"
        )
        .await
            >= 2
    );
    assert_eq!(
        raw_get(gw.bound.api, "/healthz").await,
        Some((200, "ok\n".into()))
    );
    gw.stop().await;
}

/// A kept-alive connection waiting for its next request is closed after the
/// idle timeout; a call that runs longer than both timers, plain or streamed,
/// is not cut.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_api_connection_is_closed_but_a_long_call_is_not() {
    require_sandbox!();
    let pki = Pki::new();
    let gw = api_gateway(&pki, "header_read_timeout_secs = 2\nidle_timeout_secs = 2").await;
    let (wk, mut api) = one_worker(&pki, &gw, "w-idle").await;

    let mut idle = tokio::net::TcpStream::connect(gw.bound.api).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let first = read_response(&mut idle).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let took = closed_within(&mut idle, Duration::from_secs(15), false)
        .await
        .expect("an idle kept-alive connection is closed");
    eprintln!("idle connection closed after {took:?}; timeout 2 s");
    wait_metric(
        &gw,
        "hands_gateway_api_connections_timed_out_total{reason=\"idle\"}",
    )
    .await;

    let sid = open(&mut api).await;
    let r = tool(
        &mut api,
        &sid,
        "long",
        "bash",
        json!({"command": "sleep 5; echo done"}),
    )
    .await;
    assert_eq!(text(&r), "done");
    let (status, events) = api
        .stream(
            "POST",
            &format!("/v1/sessions/{sid}/tool_use"),
            Some(&json!({"id": "quiet", "name": "bash", "input": {"command": "sleep 5; echo streamed"}})),
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    let last = events.last().unwrap();
    assert_eq!(last.event, "tool_result", "{events:?}");
    assert_eq!(text(&last.data), "streamed");
    wk.stop().await;
    gw.stop().await;
}

/// With `api.max_connections` open, another API connection is answered 503
/// `TOO_MANY_CONNECTIONS` and closed, connections already accepted keep
/// working, and the slots come back when connections close.
#[tokio::test(flavor = "multi_thread")]
async fn api_connections_past_max_connections_get_a_503_and_accepted_ones_keep_working() {
    let pki = Pki::new();
    let gw = api_gateway(
        &pki,
        "max_connections = 4\nheader_read_timeout_secs = 60\nidle_timeout_secs = 60",
    )
    .await;
    let mut api = gw.api();
    let a = api.request("GET", "/v1/workers", None).await.unwrap();
    assert_eq!(a.status, 200);
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(gw.bound.api).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metric("hands_gateway_api_connections ") < 4 {
        assert!(
            Instant::now() < deadline,
            "the idle connections were not accepted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = raw_get(gw.bound.api, "/healthz")
        .await
        .expect("a connection past the limit is answered");
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["type"], "TOO_MANY_CONNECTIONS", "{body}");
    assert!(gw.metric("hands_gateway_api_connections_refused_total") >= 1);
    // The connection accepted before the limit was reached serves on.
    let a = api.request("GET", "/v1/tools", None).await.unwrap();
    assert_eq!(a.status, 200);
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if raw_get(gw.bound.api, "/healthz").await.map(|r| r.0) == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "the slots never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await;
}

/// A client that stops reading its response (here the 11 MB answer of a
/// `read` of an 8 MB PDF) is dropped once the connection's writes have been
/// blocked for the idle timeout; the call's result stays in the worker's
/// journal, and posting the same `tool_use` again gets it.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_dropped_after_the_idle_timeout() {
    require_sandbox!();
    let pki = Pki::new();
    let gw = api_gateway(&pki, "idle_timeout_secs = 2").await;
    let (wk, mut api) = one_worker(&pki, &gw, "w-stalled").await;
    let sid = open(&mut api).await;
    tool(
        &mut api,
        &sid,
        "mk",
        "bash",
        json!({"command": "head -c 8000000 /dev/urandom > big.pdf"}),
    )
    .await;
    let body = json!({"id": "big", "name": "read", "input": {"file_path": "big.pdf"}}).to_string();
    // A small receive buffer, or loopback autotuning would let this client
    // take in 32 MiB before the gateway's writes block.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 << 10).unwrap();
    let mut raw = socket.connect(gw.bound.api).await.unwrap();
    let req = format!(
        "POST /v1/sessions/{sid}/tool_use HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw.write_all(req.as_bytes()).await.unwrap();
    wait_metric(
        &gw,
        "hands_gateway_api_connections_timed_out_total{reason=\"stalled_reader\"}",
    )
    .await;
    let r = tool(
        &mut api,
        &sid,
        "big",
        "read",
        json!({"file_path": "big.pdf"}),
    )
    .await;
    assert_eq!(
        r["content"][0]["type"], "document",
        "{}",
        r["content"][0]["type"]
    );
    drop(raw);
    wk.stop().await;
    gw.stop().await;
}

/// `hands gateway` in its own process with a descriptor limit of `nofile`:
/// the child and the addresses it printed.
async fn gateway_process(
    pki: &Pki,
    cert: &(PathBuf, PathBuf),
    nofile: u32,
) -> (tokio::process::Child, SocketAddr, SocketAddr) {
    let dir = tempfile::tempdir().unwrap().keep();
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let toml = format!(
        "[tunnel]\nlisten = \"127.0.0.1:0\"\nca = {:?}\ncert = {:?}\nkey = {:?}\nkeepalive_secs = 5\n\n[api]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"token\"\n",
        pki.ca_pem, cert.0, cert.1
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, toml).unwrap();
    let mut child = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -n {nofile} && exec \"$0\" gateway --config \"$1\""
        ))
        .arg(crate::util::hands_bin())
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let (mut tunnel, mut api) = (None, None);
    while tunnel.is_none() || api.is_none() {
        let mut line = String::new();
        let n = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line),
        )
        .await
        .expect("the gateway starts")
        .unwrap();
        assert!(n > 0, "the gateway exited");
        if let Some(a) = line.trim().strip_prefix("tunnel listening on ") {
            tunnel = Some(a.parse().unwrap());
        } else if let Some(a) = line.trim().strip_prefix("api listening on ") {
            api = Some(a.parse().unwrap());
        }
    }
    (child, tunnel.unwrap(), api.unwrap())
}

/// Issue #9, the attack as reported: a flood of API connections that send
/// nothing, more than the gateway has descriptors. Tunnels have their own
/// budget, so a worker still connects; the connection an agent had before the
/// flood still works; new API connections get a 503 until the flood ends.
#[tokio::test(flavor = "multi_thread")]
async fn an_api_connection_flood_cannot_starve_tunnels_or_accepted_connections() {
    require_sandbox!();
    let pki = Pki::new();
    let gcert = pki.gateway("gateway", 30);
    let (mut child, tunnel, api_addr) = gateway_process(&pki, &gcert, 256).await;
    let mut api = ApiClient::new(api_addr, TOKEN);
    let a = api.request("GET", "/v1/workers", None).await.unwrap();
    assert_eq!(a.status, 200);
    // 600 connections that send nothing: more than the gateway's 256
    // descriptors. Without a token, as the attack needs none.
    // A connect that is not even answered (the listen backlog full because
    // nothing accepts) ends the flood: the gateway is already down.
    let mut flood = Vec::new();
    for _ in 0..600 {
        let c = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(api_addr),
        );
        match c.await {
            Ok(Ok(c)) => flood.push(c),
            Ok(Err(_)) => {}
            Err(_) => {
                eprintln!(
                    "the API stopped accepting after {} connections",
                    flood.len()
                );
                break;
            }
        }
    }
    let wk = worker(
        &pki.ca_pem,
        "w-flood",
        &pki.worker("w-flood", 30),
        &[tunnel],
        "",
    )
    .await;
    wait_workers(&mut api, 1).await;
    let sid = open(&mut api).await;
    let r = tool(
        &mut api,
        &sid,
        "f1",
        "bash",
        json!({"command": "echo through the flood"}),
    )
    .await;
    assert_eq!(text(&r), "through the flood");
    // A new API connection is answered 503 (or, when the gateway is already
    // answering 32 of them, closed at once): never left hanging.
    let answer = try_get(api_addr, "/healthz").await;
    eprintln!("a new API connection during the flood: {answer:?}");
    match &answer {
        Ok((503, body)) => assert!(body.contains("TOO_MANY_CONNECTIONS"), "{body}"),
        Err(e) if e.starts_with("closed") => {}
        other => panic!("a new API connection during the flood: {other:?}"),
    }
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if raw_get(api_addr, "/healthz").await.map(|r| r.0) == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "the API never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = raw_get(api_addr, "/metrics").await.unwrap();
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hands_gateway_api_connections_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(refused > 0, "{metrics}");
    wk.stop().await;
    let _ = child.kill().await;
}
