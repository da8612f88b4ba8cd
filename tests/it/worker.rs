//! `hands worker` as a process: its debug listener driven by an independent
//! client (Python grpcio, stubs generated from proto/ at test time), gRPC
//! health, the policies it loads, a bounded stop on SIGTERM, and its exit
//! status when the Claude Managed Agents control plane refuses its key.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hands::proto::v1;

use crate::require_sandbox;
use crate::util::*;

struct Worker {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

fn start_worker() -> Worker {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("worker.toml");
    std::fs::write(
        &cfg,
        "worker_id = \"it-worker\"\ncapacity = 4\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let mut child = Command::new(hands_bin())
        .args(["worker", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start hands worker");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    Worker {
        child,
        addr,
        _dir: dir,
    }
}

async fn connect(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the debug listener")
}

fn python_grpc_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("python grpcio and grpcio-tools are required under CI=true");
        }
        eprintln!("SKIP: python grpcio/grpcio-tools not installed");
    }
    ok
}

#[test]
fn an_independent_python_grpc_client_drives_every_tool() {
    require_sandbox!();
    if !python_grpc_available() {
        return;
    }
    let mut w = start_worker();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc/client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&w.addr)
        .output()
        .unwrap();
    let stop = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(w.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = w.child.wait().unwrap();
    assert!(
        out.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    stop.unwrap();
    assert!(
        status.success(),
        "worker did not stop cleanly on SIGTERM: {status}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_debug_listener_reports_health() {
    require_sandbox!();
    let mut w = start_worker();
    let channel = connect(&w.addr).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "hands.v1.Sandbox".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let _ = w.child.kill();
    let _ = w.child.wait();
}

#[test]
fn a_non_loopback_debug_listener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("worker.toml");
    std::fs::write(&cfg, "worker_id = \"w\"\nlisten = \"0.0.0.0:7700\"\n").unwrap();
    let out = Command::new(hands_bin())
        .args(["worker", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("worker.toml") && err.contains("listen") && err.contains("loopback"),
        "{err}"
    );
}

/// gRPC reflection lists hands.v1.Sandbox, so grpcurl and other generic clients
/// need no proto file.
#[tokio::test(flavor = "multi_thread")]
async fn the_debug_listener_serves_reflection() {
    require_sandbox!();
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut w = start_worker();
    let channel = connect(&w.addr).await;
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = responses
        .message()
        .await
        .unwrap()
        .expect("a reflection response");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response: {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == "hands.v1.Sandbox"), "{names:?}");
    let _ = w.child.kill();
    let _ = w.child.wait();
}

/// A `hands worker` process of a test's own: its configuration `config` in
/// `dir`, the global `args` (`--policy-dir`) before `worker`, extra
/// environment, and its stderr collected.
pub(crate) struct Daemon {
    child: std::process::Child,
    addr: String,
    stderr: Arc<Mutex<String>>,
    /// Every line of its stdout so far (its listeners' addresses).
    stdout: Arc<Mutex<String>>,
}

impl Daemon {
    pub(crate) fn start(dir: &Path, config: &str, args: &[&str], env: &[(&str, &Path)]) -> Daemon {
        Daemon::start_logging(dir, config, args, env, Some("info"))
    }

    /// [`Daemon::start`] with no `HANDS_LOG` and no `HANDS_AUDIT_LOG` from the
    /// test's environment: the worker's default log level and audit log.
    pub(crate) fn start_by_default(dir: &Path, config: &str, env: &[(&str, &Path)]) -> Daemon {
        Daemon::start_logging(dir, config, &[], env, None)
    }

    fn start_logging(
        dir: &Path,
        config: &str,
        args: &[&str],
        env: &[(&str, &Path)],
        log: Option<&str>,
    ) -> Daemon {
        let path = dir.join("worker.toml");
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new(hands_bin());
        cmd.args(args)
            .args(["worker", "--config"])
            .arg(&path)
            .current_dir("/")
            .env_remove("HANDS_AUDIT_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match log {
            Some(filter) => cmd.env("HANDS_LOG", filter),
            None => cmd.env_remove("HANDS_LOG"),
        };
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start hands worker");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        // Its listeners announce themselves in the order they are bound (the
        // MCP listener's line may come first); the rest is kept as it comes.
        let stdout = Arc::new(Mutex::new(String::new()));
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            stdout.lock().unwrap().push_str(&line);
            if line.starts_with("listening on ") {
                break;
            }
        }
        {
            let sink = stdout.clone();
            std::thread::spawn(move || {
                let mut rest = String::new();
                while out.read_line(&mut rest).unwrap_or(0) > 0 {
                    sink.lock().unwrap().push_str(&rest);
                    rest.clear();
                }
            });
        }
        let addr = match line.trim().strip_prefix("listening on ") {
            Some(a) => a.to_string(),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "the worker did not start: {line:?}\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        Daemon {
            child,
            addr,
            stderr,
            stdout,
        }
    }

    /// The address a listener announced on stdout as `PREFIX ADDR`, once it has.
    pub(crate) fn announced(&self, prefix: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            let found = self
                .stdout
                .lock()
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix(prefix).map(|a| a.trim().to_string()));
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) async fn client(
        &self,
    ) -> v1::sandbox_client::SandboxClient<tonic::transport::Channel> {
        v1::sandbox_client::SandboxClient::new(connect(&self.addr).await)
    }

    /// The worker's environments, by name: (pids, memory) of each.
    pub(crate) async fn environments(&self) -> Vec<(String, u64)> {
        let info = self
            .client()
            .await
            .info(v1::InfoRequest {})
            .await
            .unwrap()
            .into_inner();
        info.environments
            .into_iter()
            .map(|e| (e.name, e.pids))
            .collect()
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends `sig` to the worker process.
    pub(crate) fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits up to `within` for the worker to exit.
    pub(crate) fn wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn terminate(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }
}

impl Drop for Daemon {
    /// A clean stop (its workspaces released), or a kill after 10 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) const LISTEN: &str = "worker_id = \"w\"\ncapacity = 2\nlisten = \"127.0.0.1:0\"\n";

/// A hardened policy of the operator's (here: `default` with another pids
/// limit) is what the worker offers, from `$HANDS_POLICY_DIR` and from
/// `--policy-dir`, the flag first; not the built-in policy.
#[tokio::test(flavor = "multi_thread")]
async fn the_worker_offers_the_policies_the_operator_wrote() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    let from_env = dir.path().join("env");
    let from_flag = dir.path().join("flag");
    for (d, pids) in [(&from_env, "77"), (&from_flag, "66")] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(
            d.join("default.toml"),
            policy_text("default", &[("pids = 512", &format!("pids = {pids}"))]),
        )
        .unwrap();
    }
    let pids_of_default = |envs: Vec<(String, u64)>| {
        envs.into_iter()
            .find(|(n, _)| n == "default")
            .map(|(_, p)| p)
    };
    let w = Daemon::start(dir.path(), LISTEN, &[], &[("HANDS_POLICY_DIR", &from_env)]);
    assert_eq!(pids_of_default(w.environments().await), Some(77));
    assert!(
        w.stderr()
            .contains(from_env.join("default.toml").to_str().unwrap()),
        "the worker does not say where default comes from: {}",
        w.stderr()
    );
    drop(w);
    let w = Daemon::start(
        dir.path(),
        LISTEN,
        &["--policy-dir", from_flag.to_str().unwrap()],
        &[("HANDS_POLICY_DIR", &from_env)],
    );
    assert_eq!(pids_of_default(w.environments().await), Some(66));
}

/// `policy_dirs` relative to the configuration file, wherever the worker is
/// started from.
#[tokio::test(flavor = "multi_thread")]
async fn relative_policy_dirs_resolve_against_the_configuration_file() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pol")).unwrap();
    std::fs::write(
        dir.path().join("pol/custom.toml"),
        policy_text("strict", &[]),
    )
    .unwrap();
    let w = Daemon::start(
        dir.path(),
        &format!("{LISTEN}policy_dirs = [\"pol\"]\n"),
        &[],
        &[],
    );
    let names: Vec<String> = w.environments().await.into_iter().map(|e| e.0).collect();
    assert!(names.contains(&"custom".to_string()), "{names:?}");
}

/// One invalid file in a policy directory stops the worker at start, naming
/// the file and the key; the other environments of that directory are not
/// silently dropped while it starts anyway.
#[test]
fn an_invalid_policy_file_stops_the_worker_naming_file_and_key() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("pol");
    std::fs::create_dir(&pol).unwrap();
    std::fs::write(pol.join("good.toml"), policy_text("default", &[])).unwrap();
    std::fs::write(
        pol.join("bad.toml"),
        policy_text("default", &[("memory = \"1GiB\"", "memory = \"1GB\"")]),
    )
    .unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(&config, LISTEN).unwrap();
    let mut child = Command::new(hands_bin())
        .args(["worker", "--config"])
        .arg(&config)
        .env("HANDS_POLICY_DIR", &pol)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "the worker started with an invalid policy file: {err}"
    );
    let bad = pol.join("bad.toml");
    assert!(
        err.contains(&format!("{}: limits.memory: ", bad.display())),
        "{err}"
    );
}

/// SIGTERM with a call running: the worker says what it waits for, waits
/// `shutdown_grace_secs`, then cuts the call short, and the caller gets a
/// result saying so (outcome SHUTDOWN), not a normal one; the worker exits
/// cleanly instead of waiting for the command's end (`sleep 60`; the test's
/// own bounds, 30 s for the result and 15 s for the exit, only keep a broken
/// worker from hanging it).
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_waits_a_bounded_grace_then_cuts_calls_short_and_says_so() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Daemon::start(
        dir.path(),
        &format!("{LISTEN}shutdown_grace_secs = 1\n"),
        &[],
        &[],
    );
    let mut c = w.client().await;
    c.open_session(v1::OpenSessionRequest {
        session_id: "s1".into(),
        environment: "default".into(),
    })
    .await
    .unwrap();
    let mut events = c
        .call(v1::CallRequest {
            session_id: "s1".into(),
            call_id: "toolu_long".into(),
            tool: "bash".into(),
            input_json: r#"{"command": "sleep 60; echo finished"}"#.into(),
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.terminate();
    let finished = super::daemon::finished(&mut events)
        .await
        .expect("the stream ended without a result");
    let result = hands::proto::result_of(&finished).unwrap();
    let text = result.text_content();
    assert_eq!(finished.outcome(), v1::Outcome::Shutdown, "{text}");
    assert!(result.is_error);
    assert!(
        text.contains("cut short") && text.contains("shutting down"),
        "{text}"
    );
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = w.child.try_wait().unwrap() {
                return (Some(s), w.stderr());
            }
            if Instant::now() > deadline {
                return (None, w.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    let (status, log) = status;
    assert!(
        status.is_some_and(|s| s.success()),
        "the worker did not exit cleanly within 15 s of SIGTERM: {status:?}\n{log}"
    );
    assert!(
        log.contains("waiting up to 1s for 1 running call") && log.contains("toolu_long"),
        "the worker does not say what it waits for: {log}"
    );
    assert!(log.contains("cutting short 1 call"), "{log}");
}

/// A control plane that answers every request 401, as for a revoked key.
async fn refusing_control_plane() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let _ = conn.read(&mut buf).await;
                let body = r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#;
                let resp = format!(
                    "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

/// A refused environment key ends the connector with status 78 (EX_CONFIG),
/// which a unit's `RestartPreventExitStatus=78` names, instead of the generic
/// 2 of a restart loop; and the whole worker stops with it (its debug
/// listener too), rather than running on without its connector. A key that
/// cannot be read at all is the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_environment_key_exits_with_a_status_of_its_own() {
    require_sandbox!();
    let cp = refusing_control_plane().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "{LISTEN}[anthropic]\nenvironment_id = \"env_test\"\n\
             environment_key_env = \"HANDS_TEST_KEY\"\nbase_url = \"http://{cp}\"\n"
        ),
    )
    .unwrap();
    for key in [Some("sk-revoked"), None] {
        let mut cmd = tokio::process::Command::new(hands_bin());
        cmd.args(["worker", "--config"])
            .arg(&config)
            .env_remove("HANDS_TEST_KEY")
            .stdout(Stdio::null())
            .kill_on_drop(true);
        if let Some(key) = key {
            cmd.env("HANDS_TEST_KEY", key);
        }
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .expect("the worker keeps going without its connector")
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{err}");
        assert!(err.contains("RestartPreventExitStatus=78"), "{err}");
        match key {
            Some(key) => {
                assert_eq!(err.matches("HTTP 401").count(), 1, "said once: {err}");
                assert!(!err.contains(key), "the key was printed: {err}");
            }
            None => assert!(err.contains("HANDS_TEST_KEY is not set"), "{err}"),
        }
    }
}
