//! `hands worker` as a process: its debug listener driven by an independent
//! client (Python grpcio, stubs generated from proto/ at test time), gRPC
//! health, and a clean stop on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

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
