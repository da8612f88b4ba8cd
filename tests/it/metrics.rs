//! The worker's metrics and health listener (`[metrics] listen`), scraped by a
//! real client (curl): sessions and calls made through the debug listener move
//! their counters and histograms, hostile names add no label values, /readyz
//! follows the worker's readiness (a tunnel to a gateway that is not up yet,
//! then up, lost and back), /livez answers, other paths are 404, and `hands
//! worker` as a process announces the listener and stops cleanly. (The
//! gateway's own metrics are checked in the `tunnel` module.)

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hands::proto::v1;
use hands::proto::v1::sandbox_client::SandboxClient;
use hands::session::registry::Registry;
use hands::worker::health::Health;
use hands::worker::probes::Probes;
use tokio::sync::watch;

use crate::require_sandbox;

/// What curl got: status, content type, body.
struct Got {
    status: u16,
    content_type: String,
    body: String,
}

/// `GET http://ADDR/PATH` with curl, off the runtime's threads.
async fn get(addr: SocketAddr, path: &str) -> Got {
    let url = format!("http://{addr}{path}");
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-o", "-", "-w"])
            .arg("\n%{http_code} %{content_type}")
            .arg(&url)
            .output()
            .expect("curl runs");
        assert!(out.status.success(), "curl {url}: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, trailer) = text.rsplit_once('\n').unwrap();
        let (status, content_type) = trailer.split_once(' ').unwrap_or((trailer, ""));
        Got {
            status: status.parse().unwrap(),
            content_type: content_type.to_string(),
            body: body.strip_suffix('\n').unwrap_or(body).to_string(),
        }
    })
    .await
    .unwrap()
}

/// The value of the sample line `series` (name and labels as exposed), if
/// the scrape has it.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// Every (label, value) of every sample line.
fn label_values(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((_, rest)) = line.split_once('{') else {
            continue;
        };
        let labels = &rest[..rest.rfind('}').unwrap()];
        for pair in labels.split("\",") {
            let (k, v) = pair.split_once("=\"").unwrap();
            out.push((k.to_string(), v.trim_end_matches('"').to_string()));
        }
    }
    out
}

/// Polls `path` until `done` holds for what it answers (10 s at most).
async fn until(addr: SocketAddr, path: &str, what: &str, done: impl Fn(&Got) -> bool) -> Got {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = get(addr, path).await;
        if done(&got) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {path} answers {} {:?}",
            got.status,
            got.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn config(dir: &std::path::Path, text: &str) -> hands::worker::Config {
    let path = dir.join("worker.toml");
    std::fs::write(&path, text).unwrap();
    hands::worker::Config::load(&path, &hands::policy::lookup::Lookup::builtin_only()).unwrap()
}

/// A worker serving in this process, its metrics listener started first.
struct Worker {
    probes: Probes,
    registry: Arc<Registry>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    /// Starts the metrics listener, then hands `started` its address before
    /// the worker serves (`on_bound` learns the debug listener's).
    async fn start(
        config: hands::worker::Config,
        states: Option<watch::Sender<Vec<hands::connectors::hands_v1::tunnel::SlotState>>>,
        before_serving: impl AsyncFnOnce(SocketAddr),
        on_bound: impl FnOnce(SocketAddr) + Send + 'static,
    ) -> Worker {
        let registry = hands::worker::registry(&config, crate::util::config()).unwrap();
        let health = Arc::new(Health::default());
        let probes = Probes::start(&config, &registry, health.clone())
            .await
            .unwrap()
            .expect("[metrics] listen is configured");
        before_serving(probes.local_addr()).await;
        let (stop, shutdown) = watch::channel(false);
        let reg = registry.clone();
        let task = tokio::spawn(async move {
            hands::worker::serve(&config, reg, on_bound, |_| {}, states, health, shutdown)
                .await
                .expect("worker serves");
        });
        Worker {
            probes,
            registry,
            stop,
            task,
        }
    }

    fn metrics(&self) -> SocketAddr {
        self.probes.local_addr()
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        self.registry.close_all();
        self.probes.stop().await;
    }
}

async fn call(
    client: &mut SandboxClient<tonic::transport::Channel>,
    session: &str,
    id: &str,
    tool: &str,
    input: serde_json::Value,
) -> hands::tools::ToolResult {
    let mut s = client
        .call(v1::CallRequest {
            session_id: session.into(),
            call_id: id.into(),
            tool: tool.into(),
            input_json: input.to_string(),
            stream_output: false,
        })
        .await
        .expect("call accepted")
        .into_inner();
    let mut last = None;
    while let Some(e) = s.message().await.unwrap() {
        last = e.event;
    }
    match last {
        Some(v1::call_event::Event::Finished(f)) => hands::proto::result_of(&f).unwrap(),
        other => panic!("last event is not Finished: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_calls_through_the_debug_listener_move_the_worker_s_metrics() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        "worker_id = \"w-metrics\"\nlisten = \"127.0.0.1:0\"\nenvironments = [\"default\"]\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let (bound_tx, bound) = tokio::sync::oneshot::channel::<SocketAddr>();
    let worker = Worker::start(
        config,
        None,
        async |metrics| {
            // Up before the debug listener: alive, not ready.
            let got = get(metrics, "/readyz").await;
            assert_eq!(got.status, 503, "{}", got.body);
            assert_eq!(got.body, "waiting for: listener");
            let got = get(metrics, "/livez").await;
            assert_eq!((got.status, got.body.as_str()), (200, "ok"));
        },
        move |a| {
            let _ = bound_tx.send(a);
        },
    )
    .await;
    let m = worker.metrics();
    let debug = bound.await.unwrap();
    let got = until(m, "/readyz", "a listener-only worker", |g| g.status == 200).await;
    assert_eq!(got.body, "ready");
    for path in ["/", "/metrics/x", "/healthz", "/v1/sessions"] {
        assert_eq!(get(m, path).await.status, 404, "{path}");
    }

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{debug}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = SandboxClient::new(channel);
    let before = get(m, "/metrics").await;
    assert_eq!(before.status, 200);
    assert!(
        before
            .content_type
            .starts_with("application/openmetrics-text"),
        "{}",
        before.content_type
    );
    assert!(before.body.ends_with("# EOF"), "{}", before.body);
    assert_eq!(sample(&before.body, "hands_worker_ready"), Some(1.0));
    assert_eq!(
        sample(
            &before.body,
            &format!(
                "hands_worker_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0)
    );
    let opened =
        "hands_worker_sessions_opened_total{environment=\"default\",connector=\"hands.v1\"}";
    let open = "hands_worker_sessions_open{environment=\"default\",connector=\"hands.v1\"}";
    assert_eq!(sample(&before.body, opened), None);

    client
        .open_session(v1::OpenSessionRequest {
            session_id: "m1".into(),
            environment: "default".into(),
        })
        .await
        .unwrap();
    let r = call(
        &mut client,
        "m1",
        "c1",
        "bash",
        serde_json::json!({"command": "echo hi"}),
    )
    .await;
    assert!(!r.is_error, "{}", r.text_content());
    // Hostile names: a tool no one has, an environment that does not exist.
    let hostile = "bash\"} 1\nhands_worker_ready{x=\"y\"} 9";
    let r = call(&mut client, "m1", "c2", hostile, serde_json::json!({})).await;
    assert!(r.is_error);
    let refused = client
        .open_session(v1::OpenSessionRequest {
            session_id: "m2".into(),
            environment: "no-such-environment".into(),
        })
        .await;
    assert!(refused.is_err());

    let after = get(m, "/metrics").await.body;
    assert_eq!(sample(&after, opened), Some(1.0), "{after}");
    assert_eq!(sample(&after, open), Some(1.0), "{after}");
    assert_eq!(
        sample(
            &after,
            "hands_worker_calls_total{connector=\"hands.v1\",tool=\"bash\",outcome=\"completed\"}"
        ),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "hands_worker_call_duration_seconds_count{tool=\"bash\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &after,
            "hands_worker_call_duration_seconds_bucket{le=\"+Inf\",tool=\"bash\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &after,
            "hands_worker_calls_total{connector=\"hands.v1\",tool=\"other\",outcome=\"completed\"}"
        ),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "hands_worker_sessions_refused_total{reason=\"unknown_environment\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &after,
            "hands_worker_session_open_duration_seconds_count{environment=\"default\"}"
        ),
        Some(1.0)
    );
    assert_eq!(sample(&after, "hands_worker_ready"), Some(1.0));
    let allowed = [
        "default",
        "hands.v1",
        "bash",
        "other",
        "completed",
        "unknown_environment",
        env!("CARGO_PKG_VERSION"),
    ];
    for (k, v) in label_values(&after) {
        assert!(
            k == "le" || allowed.contains(&v.as_str()),
            "label {k}={v:?} in\n{after}"
        );
    }

    client
        .close_session(v1::CloseSessionRequest {
            session_id: "m1".into(),
        })
        .await
        .unwrap();
    let closed = get(m, "/metrics").await.body;
    assert_eq!(sample(&closed, open), Some(0.0), "{closed}");
    assert_eq!(sample(&closed, opened), Some(1.0));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_mcp_listener() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        "worker_id = \"w-metrics-mcp\"\nenvironments = [\"default\"]\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n[mcp]\nlisten = \"127.0.0.1:0\"\n",
    );
    let worker = Worker::start(
        config,
        None,
        async |metrics| {
            // Up before the MCP listener: alive, not ready.
            let got = get(metrics, "/readyz").await;
            assert_eq!(
                (got.status, got.body.as_str()),
                (503, "waiting for: mcp listener")
            );
        },
        |_| {},
    )
    .await;
    let m = worker.metrics();
    let got = until(m, "/readyz", "an MCP-only worker", |g| g.status == 200).await;
    assert_eq!(got.body, "ready");
    let text = get(m, "/metrics").await.body;
    assert_eq!(sample(&text, "hands_worker_ready"), Some(1.0), "{text}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_tunnel_and_follows_it() {
    let pki = crate::tunnel::Pki::new();
    let wcert = pki.worker("w-metrics-tunnel", 30);
    let gcert = pki.gateway("gateway", 30);
    // A gateway that is not up yet: a port nothing listens on.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &format!(
            "worker_id = \"w-metrics-tunnel\"\nenvironments = [\"default\"]\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\
             [tunnel]\nendpoints = [\"{addr}\"]\nserver_name = \"localhost\"\nca = {:?}\n\
             cert = {:?}\nkey = {:?}\nproxy = \"none\"\nkeepalive_secs = 5\n\
             backoff_base_ms = 20\nbackoff_max_ms = 200\nhealthy_after_secs = 1\n",
            pki.ca_pem, wcert.0, wcert.1
        ),
    );
    let (states_tx, mut states) = watch::channel(Vec::new());
    let worker = Worker::start(config, Some(states_tx), async |_| {}, |_| {}).await;
    let m = worker.metrics();
    let connected = format!("hands_worker_tunnel_connected{{endpoint=\"{addr}\"}}");
    let reconnects = format!("hands_worker_tunnel_reconnects_total{{endpoint=\"{addr}\"}}");
    // Dials fail: not ready, and the endpoint shows as down.
    let failing = async {
        states
            .wait_for(|s| {
                s.iter().any(|s| {
                    matches!(
                        s,
                        hands::connectors::hands_v1::tunnel::SlotState::Waiting { .. }
                    )
                })
            })
            .await
            .map(|_| ())
    };
    tokio::time::timeout(Duration::from_secs(10), failing)
        .await
        .expect("a dial fails")
        .unwrap();
    let got = get(m, "/readyz").await;
    assert_eq!(
        (got.status, got.body.as_str()),
        (503, "waiting for: tunnel")
    );
    assert_eq!(get(m, "/livez").await.status, 200);
    let text = get(m, "/metrics").await.body;
    assert_eq!(sample(&text, &connected), Some(0.0), "{text}");
    assert_eq!(sample(&text, "hands_worker_ready"), Some(0.0));

    let gw = crate::tunnel::gateway(&pki, &gcert, &addr.to_string(), "").await;
    let got = until(m, "/readyz", "the tunnel comes up", |g| g.status == 200).await;
    assert_eq!(got.body, "ready");
    let text = get(m, "/metrics").await.body;
    assert_eq!(sample(&text, &connected), Some(1.0), "{text}");
    assert_eq!(sample(&text, &reconnects), Some(0.0), "{text}");
    assert_eq!(sample(&text, "hands_worker_ready"), Some(1.0));

    // Lost: not ready; back: ready again, counted as a reconnect.
    gw.stop().await;
    let got = until(m, "/readyz", "the tunnel is lost", |g| g.status == 503).await;
    assert_eq!(got.body, "waiting for: tunnel");
    let gw = crate::tunnel::gateway(&pki, &gcert, &addr.to_string(), "").await;
    until(m, "/readyz", "the tunnel is back", |g| g.status == 200).await;
    let text = get(m, "/metrics").await.body;
    assert_eq!(sample(&text, &connected), Some(1.0), "{text}");
    assert_eq!(sample(&text, &reconnects), Some(1.0), "{text}");
    worker.stop().await;
    gw.stop().await;
}

/// A child process killed when the test ends, passed or not (a failed
/// assertion must not leave a worker running that holds the test's output).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn hands_worker_announces_the_metrics_listener_first_and_stops_cleanly() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("worker.toml");
    std::fs::write(
        &cfg,
        "worker_id = \"it-metrics\"\ncapacity = 2\nlisten = \"127.0.0.1:0\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let mut child = Killed(
        Command::new(crate::util::hands_bin())
            .args(["worker", "--config"])
            .arg(&cfg)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start hands worker"),
    );
    let child = &mut child.0;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let metrics: SocketAddr = line
        .trim()
        .strip_prefix("metrics listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .parse()
        .unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("listening on "), "{line:?}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let got = until(metrics, "/readyz", "the worker", |g| g.status == 200).await;
        assert_eq!(got.body, "ready");
        let text = get(metrics, "/metrics").await.body;
        assert_eq!(sample(&text, "hands_worker_sessions_capacity"), Some(2.0));
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the worker did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    // Stopped last, but stopped: nothing listens any more.
    assert!(std::net::TcpStream::connect(metrics).is_err());
}
