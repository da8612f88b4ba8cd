//! Claude Managed Agents. First the fake control plane (`tests/cma/fake_cp.py`)
//! is proven faithful: the official SDK's `EnvironmentWorker` runs against it
//! through scripted sessions (`tests/cma/fidelity.py`) and the fake must see
//! what the contract says. hands' own connector is tested against the same
//! fake.
//!
//! This module owns the harness the tests share (and other modules of the
//! suite may use): the fake as a process ([`Fake`]), an environment on it
//! served by an in-process connector ([`Served`]) or by `hands worker` as a
//! process of its own ([`WorkerProcess`]), and helpers that build events and
//! wait on real happenings — the fake's request log, a call in the journal, a
//! file, a process — never on a fixed sleep for readiness (a sleep left in a
//! test is part of its scenario, and says so). The tests are in the
//! submodules, by concern.

use std::io::BufRead;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hands::connectors::cma::config::AnthropicConfig;
use hands::connectors::cma::secret::KeySource;
use hands::gateway::client::ApiClient;
use serde_json::{json, Value};

use crate::differential::python;

/// How long the harness's waits for an event (`until`, `Fake::await_requests`,
/// `Fake::call`, …) may take before the test fails.
pub(crate) const DEADLINE: Duration = Duration::from_secs(60);

mod checklist;
mod fidelity;
mod lifecycle;
mod memory;
mod skills;
mod workspaces;

/// Skips (or fails under CI) without the sandbox, or without Python and the SDK.
macro_rules! needs_fake {
    () => {
        crate::require_sandbox!();
        if !crate::differential::sdk_available() {
            return;
        }
    };
}
pub(crate) use needs_fake;

// ---- the fake control plane --------------------------------------------------

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

    /// One call of the fake's test-control API (`/_fake/…`); panics unless
    /// it succeeds.
    pub(crate) async fn control(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let mut c = ApiClient::new(self.addr, "");
        let a = c.request(method, path, body.as_ref()).await.unwrap();
        assert!(a.status < 300, "{method} {path}: {} {}", a.status, a.body);
        a.body
    }

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
        let deadline = Instant::now() + DEADLINE;
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
            assert!(Instant::now() < deadline, "no result for {id}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The fake's request log filtered by `query` (the filters of
    /// `GET /_fake/requests`), as it is now.
    pub(crate) async fn requests(&self, query: &str) -> Vec<Value> {
        self.control("GET", &format!("/_fake/requests?{query}"), None)
            .await["requests"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Waits until the fake has received at least `n` requests matching
    /// `query` and returns them; fails the test, naming `what`, after
    /// [`DEADLINE`].
    pub(crate) async fn await_requests(&self, query: &str, n: usize, what: &str) -> Vec<Value> {
        let r = self
            .control(
                "GET",
                &format!(
                    "/_fake/requests?{query}&wait_count={n}&timeout_ms={}",
                    DEADLINE.as_millis()
                ),
                None,
            )
            .await;
        let got = r["requests"].as_array().unwrap().clone();
        assert!(
            r["timed_out"] != true && got.len() >= n,
            "timed out waiting for {what} ({n} requests matching {query:?}; got {})",
            got.len()
        );
        got
    }

    /// The sequence number of the last request the fake has received: pass it
    /// as `since=` to see only what comes after now.
    pub(crate) async fn last_seq(&self) -> u64 {
        // No request has the endpoint "-": the answer is only the log's length.
        self.control("GET", "/_fake/requests?endpoint=-", None)
            .await["last_seq"]
            .as_u64()
            .unwrap()
    }

    /// Waits until a worker has the event stream of session `sid` open (live
    /// events reach it from now on).
    pub(crate) async fn stream_open(&self, sid: &str) {
        until(&format!("an event stream of {sid} open"), || async {
            self.control("GET", &format!("/_fake/sessions/{sid}"), None)
                .await["open_streams"]
                .as_u64()
                >= Some(1)
        })
        .await;
    }

    /// Makes the item serving session `sid` sync its memory stores and waits
    /// until that sync has listed `store` (E11 `view=basic`, answered).
    /// A sync follows the first call once the sync interval (5 s here) has
    /// passed since the previous one (contract §8.4), so this runs `true`
    /// calls (ids `{tag}_1`, `{tag}_2`, …) until the fake has seen the listing.
    /// Returns the listing's request record.
    pub(crate) async fn sync_memory(&self, sid: &str, store: &str, tag: &str) -> Value {
        let since = self.last_seq().await;
        let deadline = Instant::now() + DEADLINE;
        let mut n = 0;
        loop {
            n += 1;
            self.call(sid, bash_use(&format!("{tag}_{n}"), "true"))
                .await;
            // The short wait here is the pause between two calls.
            let listed = self
                .control(
                    "GET",
                    &format!(
                        "/_fake/requests?endpoint=E11&memory_store_id={store}&query=view%3Dbasic\
                         &since={since}&completed=1&bodies=0&wait_count=1&timeout_ms=500"
                    ),
                    None,
                )
                .await;
            if let Some(r) = listed["requests"].as_array().and_then(|a| a.first()) {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no memory sync listed {store} after {n} calls"
            );
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// [`Fake::requests`]: the fake's request log filtered by `query`, as it is now.
pub(crate) async fn requests_of(fake: &Fake, query: &str) -> Vec<Value> {
    fake.requests(query).await
}

/// [`Fake::requests`] of the fake `s` runs on.
pub(crate) async fn requests(s: &Served, query: &str) -> Vec<Value> {
    s.fake.requests(query).await
}

// ---- events and results ------------------------------------------------------

/// The text of a result event (its text blocks, concatenated).
pub(crate) fn text_of(ev: &Value) -> String {
    ev["content"]
        .as_array()
        .map(|a| a.iter().filter_map(|b| b["text"].as_str()).collect())
        .unwrap_or_default()
}

/// The text of the result posted for `tool_use_id`.
pub(crate) fn result_text(results: &[Value], tool_use_id: &str) -> String {
    results
        .iter()
        .find(|r| r["tool_use_id"] == tool_use_id)
        .and_then(|r| r["content"][0]["text"].as_str())
        .unwrap_or("")
        .to_string()
}

/// An `agent.tool_use` of bash.
pub(crate) fn bash_use(id: &str, command: &str) -> Value {
    json!({"type": "agent.tool_use", "id": id, "name": "bash", "input": {"command": command}})
}

/// A turn-ending idle.
pub(crate) fn end_turn() -> Value {
    json!({"type": "session.status_idle", "stop_reason": {"type": "end_turn"}})
}

// ---- waiting -----------------------------------------------------------------

/// Polls `f` until it holds; fails the test, naming `what`, after [`DEADLINE`].
pub(crate) async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    mut f: impl FnMut() -> F,
) {
    let deadline = Instant::now() + DEADLINE;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many processes on the host run with exactly the command line `argv`
/// (`/proc/<pid>/cmdline`). Tests pick arguments no other test uses: the
/// suite runs in parallel.
pub(crate) fn processes(argv: &[&str]) -> usize {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
        .count()
}

// ---- memory stores on the fake -----------------------------------------------

/// A memory store on the fake holding `memories`; returns its id.
pub(crate) async fn store(s: &Served, memories: Value) -> String {
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
pub(crate) async fn remote(s: &Served, id: &str) -> std::collections::BTreeMap<String, String> {
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

// ---- hands' connector, in process --------------------------------------------

/// An environment on the fake and a running hands connector.
pub(crate) struct Served {
    pub(crate) fake: Fake,
    pub(crate) env: Value,
    pub(crate) registry: Arc<hands::session::registry::Registry>,
    pub(crate) stop: tokio::sync::watch::Sender<bool>,
    pub(crate) connector:
        tokio::task::JoinHandle<Result<(), hands::connectors::cma::worker::ConnectorError>>,
    _dir: tempfile::TempDir,
}

impl Served {
    /// The fake with `faults` installed before the connector starts.
    pub(crate) async fn start(capacity: usize, faults: &[Value]) -> Served {
        Served::start_with(capacity, faults, |_| {}, Vec::new()).await
    }

    /// [`Served::start`] with the connector's configuration adjusted and
    /// extra policies offered.
    pub(crate) async fn start_with(
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
            drain_grace: Duration::from_secs(2),
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
        let metrics = hands::worker::metrics::WorkerMetrics::new(
            policies.iter().map(|p| p.name.as_str()),
            capacity + 1,
        );
        let registry = Arc::new(
            hands::session::registry::Registry::new(sandbox, policies, capacity + 1)
                .with_metrics(Arc::new(metrics)),
        );
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let connector = tokio::spawn(hands::connectors::cma::worker::run(
            cfg,
            "it-worker".into(),
            registry.clone(),
            Default::default(),
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
    pub(crate) async fn session(&self, events: Value, work: Value) -> (String, String) {
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

    /// A session from a full `/_fake/sessions` spec (events, skills,
    /// resources, work); returns (session id, work id).
    pub(crate) async fn session_spec(&self, mut spec: Value) -> (String, String) {
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

    /// Appends server-side events to the session's history (and its streams).
    pub(crate) async fn append(&self, sid: &str, events: Value) {
        self.fake
            .control(
                "POST",
                &format!("/_fake/sessions/{sid}/events"),
                Some(json!({"events": events})),
            )
            .await;
    }

    /// The results posted so far (waiting for at least `n`).
    pub(crate) async fn results(&self, sid: &str, n: usize) -> Vec<Value> {
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

    /// The work item's view on the fake once it reached `state` (or after 20 s).
    pub(crate) async fn work_state(&self, work: &str, state: &str) -> Value {
        self.fake
            .control(
                "GET",
                &format!("/_fake/work/{work}?wait_state={state}&timeout_ms=20000"),
                None,
            )
            .await
    }

    /// Where the workspace kept for session `sid` lives on the host.
    pub(crate) fn kept_image(&self, sid: &str) -> std::path::PathBuf {
        self.registry
            .sandbox()
            .data_dir
            .join("kept")
            .join(format!("kept-{sid}.img"))
    }

    /// Enqueues another work item of session `sid` (the next turn).
    pub(crate) async fn next_item(&self, sid: &str, work: Value) -> String {
        self.fake
            .control("POST", &format!("/_fake/sessions/{sid}/work"), Some(work))
            .await["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Waits until the history's call `id` runs in the item's sandbox session
    /// (its record is in the session's call journal, not yet finished).
    pub(crate) async fn running(&self, id: &str) {
        until(&format!("the call {id} to run"), || async {
            self.registry
                .journals()
                .running()
                .iter()
                .any(|c| c.call_id == id)
        })
        .await;
    }

    /// Waits until every item's sandbox session is closed.
    pub(crate) async fn closed(&self) {
        until("the item's sandbox closed", || async {
            self.registry.open_sessions() == 0
        })
        .await;
    }

    /// The item was given up as another worker's (its lease lost): its
    /// sandbox closed, nothing posted to the session (not even a moment
    /// later), no stop sent. For a connector with one slot, which polls
    /// again only once the item's handler has returned: that poll shows the
    /// worker is past the point where it could still post or stop.
    pub(crate) async fn gave_up(&self, sid: &str, work: &str) {
        self.closed().await;
        let since = self.fake.last_seq().await;
        self.fake
            .await_requests(
                &format!("endpoint=E1&since={since}"),
                1,
                "a poll after the item was given up",
            )
            .await;
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
    pub(crate) async fn call(&self, sid: &str, event: Value) -> (String, bool) {
        self.fake.call(sid, event).await
    }

    /// Runs one bash call and returns its text.
    pub(crate) async fn bash(&self, sid: &str, id: &str, command: &str) -> String {
        self.call(sid, bash_use(id, command)).await.0
    }

    /// Stops the connector (as SIGTERM would) and returns how it ended; every
    /// item's sandbox session must be closed by then.
    /// The value of the worker metric `series` (name and labels as exposed),
    /// 0 when it has not counted yet.
    pub(crate) fn metric(&self, series: &str) -> f64 {
        metric(&self.registry, series)
    }

    pub(crate) async fn finish(self) -> Result<(), hands::connectors::cma::worker::ConnectorError> {
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

/// The value of the worker metric `series` of `registry`'s metrics, 0 when it
/// has not counted yet.
pub(crate) fn metric(registry: &hands::session::registry::Registry, series: &str) -> f64 {
    let text = registry
        .metrics()
        .expect("the registry counts")
        .render(true);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

// ---- hands worker, as a process ----------------------------------------------

/// `hands worker --config` as a process of its own, serving an environment
/// of a fake: its memory is its own to measure, and SIGTERM is a real
/// shutdown.
pub(crate) struct WorkerProcess {
    pub(crate) fake: Fake,
    pub(crate) env: Value,
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl WorkerProcess {
    pub(crate) async fn start() -> WorkerProcess {
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
    pub(crate) fn status_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {status}"))
    }

    /// What the worker logged so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("worker.log")).unwrap_or_default()
    }

    /// A session with one read-write memory store at `/mnt/memory/notes`, its
    /// item running in the worker; returns (session id, work id, store id).
    pub(crate) async fn session_with_store(&self) -> (String, String, String) {
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
    pub(crate) fn terminate(&mut self) -> Duration {
        let started = Instant::now();
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
