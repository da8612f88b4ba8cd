//! `hands worker` as a service: the first SIGTERM drains (a running call
//! finishes with its own result), a second cuts running calls short at once;
//! the service manager's notifications (`READY=1` only once every configured
//! way in is up, `STATUS=`, the watchdog, `STOPPING=1`) on a socket the test
//! holds, as systemd's would be; SIGHUP re-reads policies and the
//! configuration, applying what it can and naming what needs a restart; and
//! `--log-format json`.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use hands::proto::v1;
use nix::sys::signal::Signal;

use super::worker::{Daemon, LISTEN};
use crate::require_sandbox;

/// Starts a long call in a new session `sid` and returns its event stream
/// once the call has started.
async fn start_call(
    w: &Daemon,
    sid: &str,
    call_id: &str,
    command: &str,
) -> tonic::Streaming<v1::CallEvent> {
    let mut c = w.client().await;
    c.open_session(v1::OpenSessionRequest {
        session_id: sid.into(),
        environment: "default".into(),
    })
    .await
    .unwrap();
    let mut events = c
        .call(v1::CallRequest {
            session_id: sid.into(),
            call_id: call_id.into(),
            tool: "bash".into(),
            input_json: serde_json::json!({ "command": command }).to_string(),
            stream_output: true,
        })
        .await
        .unwrap()
        .into_inner();
    let first = events.message().await.unwrap().expect("Started");
    assert!(matches!(
        first.event,
        Some(v1::call_event::Event::Started(_))
    ));
    events
}

/// The call's result, or `None` when the stream ended without one. Bounded
/// (30 s) only so that a broken worker cannot hang the test.
pub(crate) async fn finished(events: &mut tonic::Streaming<v1::CallEvent>) -> Option<v1::Finished> {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.message().await {
                Ok(Some(v1::CallEvent {
                    event: Some(v1::call_event::Event::Finished(f)),
                })) => return Some(f),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("no result within 30 s")
}

/// The worker's exit status (`None`: still running 30 s on) and its log.
async fn exit(mut w: Daemon) -> (Option<std::process::ExitStatus>, String) {
    tokio::task::spawn_blocking(move || (w.wait(Duration::from_secs(30)), w.stderr()))
        .await
        .unwrap()
}

/// Waits until the worker's log contains `text` (bounded by 30 s).
fn log_says(w: &Daemon, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !w.stderr().contains(text) {
        assert!(
            Instant::now() < deadline,
            "the log never said {text:?}:\n{}",
            w.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_sigterm_drains_a_running_call_to_its_own_result() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    let w = Daemon::start(
        dir.path(),
        &format!("{LISTEN}shutdown_grace_secs = 60\n"),
        &[],
        &[],
    );
    let mut events = start_call(&w, "s1", "toolu_drain", "sleep 2; echo finished").await;
    w.terminate();
    log_says(&w, "draining: no new session or call is taken");
    // While it drains, no new session is opened: the listener takes no new
    // connection (or, if one slips in, no new call).
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", w.addr())).unwrap();
    if let Ok(channel) = endpoint.connect().await {
        let refused = v1::sandbox_client::SandboxClient::new(channel)
            .open_session(v1::OpenSessionRequest {
                session_id: "s2".into(),
                environment: "default".into(),
            })
            .await;
        assert!(refused.is_err(), "a session opened while draining");
    }
    let f = finished(&mut events)
        .await
        .expect("the drained call's result");
    let result = hands::proto::result_of(&f).unwrap();
    assert_eq!(
        f.outcome(),
        v1::Outcome::Completed,
        "{}",
        result.text_content()
    );
    assert_eq!(result.text_content().trim(), "finished");
    let status = exit(w).await;
    assert!(
        status.0.is_some_and(|s| s.success()),
        "the worker did not exit 0 after draining: {:?}\n{}",
        status.0,
        status.1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_sigterm_cuts_running_calls_short_at_once() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    // A grace far longer than the test's bounds: only the second signal can
    // end the call in time.
    let w = Daemon::start(
        dir.path(),
        &format!("{LISTEN}shutdown_grace_secs = 600\n"),
        &[],
        &[],
    );
    let mut events = start_call(&w, "s1", "toolu_cut", "sleep 600; echo finished").await;
    w.terminate();
    log_says(&w, "draining: no new session or call is taken");
    w.signal(Signal::SIGTERM);
    let f = finished(&mut events)
        .await
        .expect("the cut-short call's result");
    let result = hands::proto::result_of(&f).unwrap();
    let text = result.text_content();
    assert_eq!(f.outcome(), v1::Outcome::Shutdown, "{text}");
    assert!(result.is_error);
    assert!(text.contains("told to stop a second time"), "{text}");
    let status = exit(w).await;
    assert!(
        status.0.is_some_and(|s| s.success()),
        "{:?}\n{}",
        status.0,
        status.1
    );
    assert!(
        status
            .1
            .contains("stopped again while draining: cutting short 1 running call"),
        "{}",
        status.1
    );
}

/// The service manager's end of `$NOTIFY_SOCKET`.
struct Manager {
    sock: UnixDatagram,
    path: std::path::PathBuf,
    got: Vec<String>,
}

impl Manager {
    fn new(dir: &Path) -> Manager {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Manager {
            sock,
            path,
            got: Vec::new(),
        }
    }

    /// Receives until a message satisfies `want` (bounded by 30 s); returns it.
    fn until(&mut self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(m) = self.got.iter().find(|m| want(m)) {
                return m.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within 30 s; received: {:?}",
                self.got
            );
            self.receive();
        }
    }

    /// Receives for `d`, keeping what came.
    fn listen_for(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            self.receive();
        }
    }

    fn receive(&mut self) {
        let mut buf = [0u8; 4096];
        if let Ok(n) = self.sock.recv(&mut buf) {
            self.got
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_manager_hears_ready_status_watchdog_and_stopping() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    let mut m = Manager::new(dir.path());
    let mut w = Daemon::start(
        dir.path(),
        LISTEN,
        &[],
        &[
            ("NOTIFY_SOCKET", &m.path),
            ("WATCHDOG_USEC", Path::new("400000")),
        ],
    );
    let ready = m.until("READY=1", |s| s.contains("READY=1"));
    assert!(
        ready.contains("STATUS=0 session(s) open of 2, 0 call(s) running; ready"),
        "{ready}"
    );
    // The watchdog is pinged at half its interval: several within 1 s.
    m.listen_for(Duration::from_secs(1));
    let pings = m.got.iter().filter(|s| *s == "WATCHDOG=1").count();
    assert!(pings >= 2, "{pings} watchdog pings in 1 s: {:?}", m.got);
    // The variables do not reach what the worker starts: a session sees
    // none of them.
    let mut events = start_call(&w, "s1", "toolu_env", "env; echo end").await;
    let f = finished(&mut events).await.unwrap();
    let env = hands::proto::result_of(&f).unwrap().text_content();
    assert!(
        env.contains("end") && !env.contains("NOTIFY_SOCKET"),
        "{env}"
    );
    // The status follows the sessions open.
    m.until("a status naming the open session", |s| {
        s.contains("STATUS=1 session(s) open of 2")
    });
    w.terminate();
    let stopping = m.until("STOPPING=1", |s| s.starts_with("STOPPING=1"));
    assert!(stopping.contains("draining"), "{stopping}");
    tokio::task::spawn_blocking(move || {
        assert!(w.wait(Duration::from_secs(30)).is_some_and(|s| s.success()));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_is_not_sent_until_a_tunnel_is_up() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let out = std::process::Command::new(crate::util::hands_bin())
        .args(["pki", "init"])
        .arg(&pki)
        .args(["--worker-id", "w"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // A port nothing listens on: the tunnel can never come up.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut m = Manager::new(dir.path());
    let _w = Daemon::start(
        dir.path(),
        &format!(
            "{LISTEN}[tunnel]\nendpoints = [\"127.0.0.1:{port}\"]\nserver_name = \"gateway.hands\"\n\
             ca = \"pki/ca.pem\"\ncert = \"pki/worker.pem\"\nkey = \"pki/worker-key.pem\"\n\
             proxy = \"none\"\nbackoff_base_ms = 100\nbackoff_max_ms = 200\n"
        ),
        &[],
        &[("NOTIFY_SOCKET", &m.path)],
    );
    // The listener comes up; the tunnel never does.
    m.until("a status waiting for the tunnel alone", |s| {
        s.contains("STATUS=") && s.ends_with("waiting for: tunnel")
    });
    m.listen_for(Duration::from_secs(2));
    assert!(
        !m.got.iter().any(|s| s.contains("READY=1")),
        "READY=1 without a tunnel: {:?}",
        m.got
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_new_environments_and_capacity_and_names_what_needs_a_restart() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policies");
    std::fs::create_dir(&pol).unwrap();
    // The environment's name is its file's.
    let policy = |pids: u64| {
        crate::util::policy_text("default", &[("pids = 512", &format!("pids = {pids}"))])
    };
    std::fs::write(pol.join("alpha.toml"), policy(100)).unwrap();
    let config = |extra: &str| {
        format!(
            "worker_id = \"w\"\nlisten = \"127.0.0.1:0\"\npolicy_dirs = [\"policies\"]\n{extra}"
        )
    };
    let w = Daemon::start(dir.path(), &config("capacity = 2\n"), &[], &[]);
    let before = w.environments().await;
    assert!(before.contains(&("alpha".to_string(), 100)), "{before:?}");
    assert!(!before.iter().any(|(n, _)| n == "beta"), "{before:?}");
    // A new environment, a changed one, a new capacity, and a key that only
    // a restart applies.
    std::fs::write(pol.join("alpha.toml"), policy(200)).unwrap();
    std::fs::write(pol.join("beta.toml"), policy(300)).unwrap();
    std::fs::write(
        dir.path().join("worker.toml"),
        config("capacity = 3\nshutdown_grace_secs = 7\n"),
    )
    .unwrap();
    w.signal(Signal::SIGHUP);
    log_says(&w, "reloaded: ");
    let log = w.stderr();
    assert!(log.contains("environments added: beta"), "{log}");
    assert!(log.contains("environments changed: alpha"), "{log}");
    assert!(log.contains("capacity now 3"), "{log}");
    assert!(
        log.contains("changed but needing a restart: shutdown_grace_secs"),
        "{log}"
    );
    let after = w.environments().await;
    assert!(after.contains(&("alpha".to_string(), 200)), "{after:?}");
    assert!(after.contains(&("beta".to_string(), 300)), "{after:?}");
    let info = w
        .client()
        .await
        .info(v1::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.capacity, 3);
    // A broken policy: the reload is refused whole, and the worker serves
    // on with what it had.
    std::fs::write(pol.join("gamma.toml"), "[limits]\nmemory = \"lots\"\n").unwrap();
    std::fs::remove_file(pol.join("beta.toml")).unwrap();
    w.signal(Signal::SIGHUP);
    log_says(&w, "reload refused, nothing changed");
    let log = w.stderr();
    assert!(
        log.contains("gamma.toml"),
        "the refusal names the file: {log}"
    );
    let still = w.environments().await;
    assert_eq!(still, after, "a refused reload changed the environments");
}

#[tokio::test(flavor = "multi_thread")]
async fn log_format_json_writes_one_object_per_line() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Daemon::start(dir.path(), LISTEN, &["--log-format", "json"], &[]);
    let mut events = start_call(&w, "s1", "toolu_json", "echo hi").await;
    finished(&mut events).await.unwrap();
    w.terminate();
    tokio::task::spawn_blocking(move || {
        assert!(w.wait(Duration::from_secs(30)).is_some());
        let log = w.stderr();
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 3, "{log}");
        let records: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect();
        for r in &records {
            assert!(r["timestamp"].is_string() && r["level"].is_string(), "{r}");
        }
        // The audit record carries its call's span, with the client's ids.
        assert!(
            records.iter().any(|r| r["target"] == "hands::audit"
                && r["span"]["call_id"] == "toolu_json"
                && r["span"]["tool"] == "bash"),
            "no audit record with its fields: {log}"
        );
        assert!(
            records.iter().any(|r| r["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("draining"))),
            "{log}"
        );
    })
    .await
    .unwrap();
}
