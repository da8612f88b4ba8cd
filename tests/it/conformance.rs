//! The conformance suite itself under test: the project's worker and gateway
//! pass it (as separate processes, through the CLI, with --json), an
//! expected-failures baseline that has gone stale fails the run, and every
//! case fails against a test double that breaks the rule the case checks.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hands::conformance::{self, target::Grpc, Status};
use hands::connectors::hands_v1::{detect_isolation, SandboxService};
use hands::proto::v1;
use hands::proto::v1::sandbox_server::{Sandbox, SandboxServer};
use hands::session::registry::Registry;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response};

use crate::require_sandbox;
use crate::util::*;

// ---- the project's own worker and gateway, through the CLI ----------------

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SIGTERM, so the worker closes its sessions.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn conformance(args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(hands_bin())
        .arg("conformance")
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "no JSON report: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

fn statuses(report: &serde_json::Value) -> Vec<(String, String, String)> {
    report["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
                c["detail"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn the_project_worker_and_gateway_pass_the_conformance_suite() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let st = Command::new(hands_bin())
        .args(["pki", "init"])
        .arg(d.join("pki"))
        .args(["--worker-id", "conf-worker"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(d.join("token"), "conformance-token-0123456789").unwrap();
    let (tunnel, api, debug) = (free_port(), free_port(), free_port());
    std::fs::write(
        d.join("gateway.toml"),
        format!("[tunnel]\nlisten = \"127.0.0.1:{tunnel}\"\nca = \"pki/ca.pem\"\ncert = \"pki/gateway.pem\"\nkey = \"pki/gateway-key.pem\"\n[api]\nlisten = \"127.0.0.1:{api}\"\ntoken_file = \"token\"\n"),
    )
    .unwrap();
    let web = web_server();
    std::fs::create_dir(d.join("policies")).unwrap();
    std::fs::write(
        d.join("policies").join(format!("{EGRESS_ENV}.toml")),
        egress_policy_text(web),
    )
    .unwrap();
    std::fs::write(
        d.join("worker.toml"),
        format!("worker_id = \"conf-worker\"\nlisten = \"127.0.0.1:{debug}\"\npolicy_dirs = [\"policies\"]\n[tunnel]\nendpoints = [\"127.0.0.1:{tunnel}\"]\nserver_name = \"localhost\"\nca = \"pki/ca.pem\"\ncert = \"pki/worker.pem\"\nkey = \"pki/worker-key.pem\"\nproxy = \"none\"\n"),
    )
    .unwrap();
    let spawn = |what: &str| {
        Command::new(hands_bin())
            .arg(what)
            .arg("--config")
            .arg(d.join(format!("{what}.toml")))
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let _procs = Procs(vec![spawn("gateway"), spawn("worker")]);
    wait_port(api);
    wait_port(debug);

    let url = egress_target(web).url;
    let egress = ["--egress-env", EGRESS_ENV, "--egress-url", url.as_str()];
    let (code, report) =
        conformance(&[&["--grpc", &format!("127.0.0.1:{debug}")][..], &egress[..]].concat());
    let all = statuses(&report);
    let bad: Vec<_> = all.iter().filter(|(_, s, _)| s != "pass").collect();
    assert!(bad.is_empty() && code == 0, "over gRPC: {bad:?}");
    assert_eq!(all.len(), conformance::cases::all().len());

    // The gateway: wait for the worker's tunnel first (`info` needs it).
    let token = d.join("token");
    let token = token.to_str().unwrap();
    let url = format!("http://127.0.0.1:{api}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, _) = conformance(&["--gateway", &url, "--token-file", token, "--case", "info"]);
        if code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the worker never registered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, report) =
        conformance(&[&["--gateway", &url, "--token-file", token][..], &egress[..]].concat());
    let all = statuses(&report);
    let bad: Vec<_> = all
        .iter()
        .filter(|(_, s, _)| s != "pass" && s != "skip")
        .collect();
    assert!(bad.is_empty() && code == 0, "through the gateway: {bad:?}");
    let skipped: Vec<_> = all
        .iter()
        .filter(|(_, s, _)| s == "skip")
        .map(|(n, _, _)| n.as_str())
        .collect();
    assert_eq!(
        skipped,
        [
            "info_identifies_the_process",
            "open_session_is_idempotent",
            "deadline_cancels_the_call",
            "error_invalid_input_json"
        ]
    );

    // A stale baseline: a listed case that passes fails the run.
    std::fs::write(d.join("xfail"), "# known failures\ninfo\n").unwrap();
    let (code, report) = conformance(&[
        "--grpc",
        &format!("127.0.0.1:{debug}"),
        "--case",
        "info",
        "--expected-failures",
        d.join("xfail").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert_eq!(statuses(&report)[0].1, "xpass");
    // An unknown name in the baseline is an error, not a silent pass.
    std::fs::write(d.join("typo"), "inf0\n").unwrap();
    let out = Command::new(hands_bin())
        .args([
            "conformance",
            "--grpc",
            &format!("127.0.0.1:{debug}"),
            "--expected-failures",
        ])
        .arg(d.join("typo"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no case named \"inf0\""));
}

// ---- the misbehaving double --------------------------------------------------

/// One rule the double breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    NoIdentity,
    OpenNotIdempotent,
    CloseNotIdempotent,
    MangledText,
    NoOutputEvents,
    ToolErrorsAsStatus,
    ReexecutesRepeatedCalls,
    KillsOnDisconnect,
    AttachFromZero,
    NoReasons,
    CancelIsNoop,
    IgnoresDeadline,
    NoMessageLimit,
    TinyMessageLimit,
    Unconfined,
    ListsNothing,
    ListsNoActivity,
    /// Every egress request goes nowhere (a proxy that refuses all).
    EgressDeniesAll,
    /// Egress sessions get a plain loopback environment: no proxy, no 403.
    EgressUnpoliced,
    /// The session resolver answers any name.
    EgressResolvesAll,
    /// Results do not say what egress denied.
    EgressSilent,
}

/// Which cases each broken rule must make fail.
const TABLE: &[(Mode, &[&str])] = &[
    (Mode::NoIdentity, &["info", "info_identifies_the_process"]),
    (Mode::OpenNotIdempotent, &["open_session_is_idempotent"]),
    (Mode::CloseNotIdempotent, &["close_session_is_idempotent"]),
    (
        Mode::MangledText,
        &[
            "write_then_read",
            "edit_requires_a_unique_match",
            "glob_lists_matches",
            "grep_finds_lines",
            "bash_shell_persists",
        ],
    ),
    (Mode::NoOutputEvents, &["bash_output_streams"]),
    (
        Mode::ToolErrorsAsStatus,
        &[
            "tool_failure_is_a_result",
            "unknown_tool_is_a_result",
            "non_object_input_is_a_result",
            "bash_timeout_is_a_result",
        ],
    ),
    (
        Mode::ReexecutesRepeatedCalls,
        &[
            "repeated_call_id_does_not_rerun",
            "call_id_with_other_input_is_refused",
        ],
    ),
    (Mode::KillsOnDisconnect, &["attach_after_disconnect"]),
    (Mode::AttachFromZero, &["attach_resumes_from_offset"]),
    (
        Mode::NoReasons,
        &[
            "attach_to_unknown_call",
            "error_session_not_found",
            "error_invalid_call_id",
            "error_invalid_input_json",
            "error_unknown_environment",
        ],
    ),
    (Mode::CancelIsNoop, &["cancel_kills_the_process_tree"]),
    (Mode::IgnoresDeadline, &["deadline_cancels_the_call"]),
    (Mode::NoMessageLimit, &["payload_over_limit_is_refused"]),
    (Mode::TinyMessageLimit, &["large_payload_round_trips"]),
    (
        Mode::ListsNothing,
        &[
            "list_sessions_shows_open_sessions",
            "list_sessions_counts_running_calls",
        ],
    ),
    (
        Mode::ListsNoActivity,
        &[
            "list_sessions_shows_open_sessions",
            "list_sessions_counts_running_calls",
        ],
    ),
    (Mode::EgressDeniesAll, &["egress_allowed_host_is_reached"]),
    (
        Mode::EgressUnpoliced,
        &[
            "egress_denied_host_is_refused_with_a_403_naming_it",
            "egress_metadata_address_is_refused",
        ],
    ),
    (
        Mode::EgressResolvesAll,
        &["egress_resolver_refuses_an_unlisted_name"],
    ),
    (
        Mode::EgressSilent,
        &["egress_bash_result_names_each_denial"],
    ),
    (
        Mode::Unconfined,
        &[
            "escape_host_secrets_unreadable",
            "escape_runs_unprivileged",
            "escape_no_user_namespaces",
            "escape_network_is_isolated",
            "escape_host_processes_invisible",
            "escape_system_is_read_only",
        ],
    ),
];

type Events = Pin<Box<dyn Stream<Item = Result<v1::CallEvent, tonic::Status>> + Send>>;

struct Double {
    inner: Arc<SandboxService>,
    mode: Mode,
    seen: Mutex<HashMap<String, usize>>,
}

impl Double {
    fn status(&self, s: tonic::Status) -> tonic::Status {
        if self.mode == Mode::NoReasons {
            tonic::Status::unknown(s.message().to_string())
        } else {
            s
        }
    }
}

fn finished_text(text: String, is_error: bool) -> v1::CallEvent {
    v1::CallEvent {
        event: Some(v1::call_event::Event::Finished(hands::proto::finished(
            &if is_error {
                hands::tools::ToolResult::err(text)
            } else {
                hands::tools::ToolResult::ok(text)
            },
            v1::Outcome::Completed,
        ))),
    }
}

/// A stream that cancels its call when dropped before Finished.
struct CancelOnDrop {
    inner: Events,
    svc: Arc<SandboxService>,
    ids: (String, String),
    done: bool,
}

impl Stream for CancelOnDrop {
    type Item = Result<v1::CallEvent, tonic::Status>;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let p = self.inner.as_mut().poll_next(cx);
        if let std::task::Poll::Ready(None) = p {
            self.done = true;
        }
        p
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.done {
            let (svc, (session_id, call_id)) = (self.svc.clone(), self.ids.clone());
            tokio::spawn(async move {
                let _ = svc
                    .cancel(Request::new(v1::CancelRequest {
                        session_id,
                        call_id,
                    }))
                    .await;
            });
        }
    }
}

#[tonic::async_trait]
impl Sandbox for Double {
    async fn info(
        &self,
        req: Request<v1::InfoRequest>,
    ) -> Result<Response<v1::InfoResponse>, tonic::Status> {
        let mut r = self.inner.info(req).await?.into_inner();
        if self.mode == Mode::NoIdentity {
            r.worker_id.clear();
            r.protocols.clear();
            r.instance_id.clear();
        }
        Ok(Response::new(r))
    }

    async fn open_session(
        &self,
        req: Request<v1::OpenSessionRequest>,
    ) -> Result<Response<v1::OpenSessionResponse>, tonic::Status> {
        let mut req = req;
        if self.mode == Mode::EgressUnpoliced && req.get_ref().environment == EGRESS_ENV {
            req.get_mut().environment = "default".into();
        }
        let r = self
            .inner
            .open_session(req)
            .await
            .map_err(|s| self.status(s))?;
        if self.mode == Mode::OpenNotIdempotent && !r.get_ref().created {
            return Err(tonic::Status::already_exists("session exists"));
        }
        Ok(r)
    }

    async fn close_session(
        &self,
        req: Request<v1::CloseSessionRequest>,
    ) -> Result<Response<v1::CloseSessionResponse>, tonic::Status> {
        let r = self
            .inner
            .close_session(req)
            .await
            .map_err(|s| self.status(s))?;
        if self.mode == Mode::CloseNotIdempotent && !r.get_ref().closed {
            return Err(tonic::Status::not_found("no such session"));
        }
        Ok(r)
    }

    async fn list_sessions(
        &self,
        req: Request<v1::ListSessionsRequest>,
    ) -> Result<Response<v1::ListSessionsResponse>, tonic::Status> {
        let mut r = self.inner.list_sessions(req).await?.into_inner();
        match self.mode {
            Mode::ListsNothing => r.sessions.clear(),
            Mode::ListsNoActivity => {
                for s in &mut r.sessions {
                    (s.running_calls, s.idle_ms, s.calls) = (0, 0, 0);
                }
            }
            _ => {}
        }
        Ok(Response::new(r))
    }

    type CallStream = Events;

    async fn call(&self, req: Request<v1::CallRequest>) -> Result<Response<Events>, tonic::Status> {
        let mode = self.mode;
        let req = if mode == Mode::IgnoresDeadline {
            Request::new(req.into_inner())
        } else {
            req
        };
        let mut req = req;
        if mode == Mode::ReexecutesRepeatedCalls {
            let id = req.get_ref().call_id.clone();
            let mut seen = self.seen.lock().unwrap();
            let n = seen.entry(id.clone()).or_default();
            if *n > 0 {
                req.get_mut().call_id = format!("{id}-again{n}");
            }
            *n += 1;
        }
        if req.get_ref().tool == "bash" {
            let rewrite = |command: &str| match mode {
                Mode::EgressDeniesAll => Some(format!("HTTP_PROXY=http://127.0.0.1:9; {command}")),
                Mode::EgressResolvesAll if command.starts_with("getent hosts ") => {
                    Some(command.replacen("getent hosts ", "getent hosts localhost #", 1))
                }
                _ => None,
            };
            let input: serde_json::Value =
                serde_json::from_str(&req.get_ref().input_json).unwrap_or_default();
            if let Some(c) = input["command"].as_str().and_then(rewrite) {
                req.get_mut().input_json = serde_json::json!({ "command": c }).to_string();
            }
        }
        if mode == Mode::Unconfined && req.get_ref().tool == "bash" {
            // What the SDK worker does: bash on the host.
            let input: serde_json::Value =
                serde_json::from_str(&req.get_ref().input_json).unwrap_or_default();
            let command = input["command"].as_str().unwrap_or("true").to_string();
            let out = tokio::process::Command::new("bash")
                .arg("-c")
                .arg(command)
                .output()
                .await
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
            let mut text = String::from_utf8_lossy(&out.stdout).to_string();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let started = v1::CallEvent {
                event: Some(v1::call_event::Event::Started(v1::Started {
                    call_id: req.get_ref().call_id.clone(),
                    executed_now: true,
                })),
            };
            let events = vec![
                Ok(started),
                Ok(finished_text(text.trim_end().to_string(), false)),
            ];
            return Ok(Response::new(Box::pin(tokio_stream::iter(events))));
        }
        let ids = (
            req.get_ref().session_id.clone(),
            req.get_ref().call_id.clone(),
        );
        let stream = self
            .inner
            .call(req)
            .await
            .map_err(|s| self.status(s))?
            .into_inner();
        let stream = stream.filter_map(move |ev| {
            let ev = match ev {
                Ok(ev) => ev,
                Err(s) => return Some(Err(s)),
            };
            match &ev.event {
                Some(v1::call_event::Event::Output(_)) if mode == Mode::NoOutputEvents => None,
                Some(v1::call_event::Event::Finished(f)) if mode == Mode::MangledText => {
                    let r = hands::proto::result_of(f).unwrap();
                    Some(Ok(finished_text(
                        format!("{}~", r.text_content().trim_end()),
                        r.is_error,
                    )))
                }
                Some(v1::call_event::Event::Finished(f)) if mode == Mode::EgressSilent => {
                    let r = hands::proto::result_of(f).unwrap();
                    let full = r.text_content();
                    let text: Vec<&str> = full
                        .lines()
                        .filter(|l| !l.starts_with("[egress]"))
                        .collect();
                    Some(Ok(finished_text(text.join("\n"), r.is_error)))
                }
                Some(v1::call_event::Event::Finished(f))
                    if mode == Mode::ToolErrorsAsStatus && f.is_error =>
                {
                    Some(Err(tonic::Status::internal("the tool failed")))
                }
                _ => Some(Ok(ev)),
            }
        });
        let stream: Events = Box::pin(stream);
        if mode == Mode::KillsOnDisconnect {
            return Ok(Response::new(Box::pin(CancelOnDrop {
                inner: stream,
                svc: self.inner.clone(),
                ids,
                done: false,
            })));
        }
        Ok(Response::new(stream))
    }

    type AttachStream = Events;

    async fn attach(
        &self,
        mut req: Request<v1::AttachRequest>,
    ) -> Result<Response<Events>, tonic::Status> {
        if self.mode == Mode::AttachFromZero {
            req.get_mut().from_offset = 0;
        }
        self.inner.attach(req).await.map_err(|s| self.status(s))
    }

    async fn cancel(
        &self,
        req: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::CancelResponse>, tonic::Status> {
        if self.mode == Mode::CancelIsNoop {
            return Ok(Response::new(v1::CancelResponse { cancelled: true }));
        }
        self.inner.cancel(req).await.map_err(|s| self.status(s))
    }
}

/// The egress environment of these tests: the default policy in
/// `network.mode = "egress"`, allowing exactly `127.0.0.1:port` (a web server
/// of the test's on the host's loopback).
const EGRESS_ENV: &str = "confegress";

fn egress_policy_text(port: u16) -> String {
    hands::policy::builtin_text("default").unwrap().replace(
        "mode = \"loopback\"",
        &format!("mode = \"egress\"\n[egress]\nallow = [\"127.0.0.1/32:{port}\"]"),
    )
}

/// A web server on the host's loopback answering every request with 200.
fn web_server() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut b = [0u8; 4096];
                let _ = c.read(&mut b);
                let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
            });
        }
    });
    port
}

fn egress_target(port: u16) -> conformance::Egress {
    conformance::Egress {
        env: EGRESS_ENV.into(),
        url: format!("http://127.0.0.1:{port}/"),
    }
}

async fn serve_double(mode: Mode, web: u16) -> (SocketAddr, Arc<Registry>) {
    let mut policies = hands::policy::PolicySet::builtin()
        .iter()
        .cloned()
        .collect::<Vec<_>>();
    policies.push(
        hands::policy::Policy::from_toml_str(
            EGRESS_ENV,
            &egress_policy_text(web),
            std::path::Path::new("confegress.toml"),
        )
        .unwrap(),
    );
    let registry = Arc::new(Registry::new(config(), policies, 32));
    let inner = Arc::new(SandboxService::new(
        registry.clone(),
        "double".into(),
        detect_isolation(),
    ));
    let limit = match mode {
        Mode::NoMessageLimit => 256 << 20,
        Mode::TinyMessageLimit => 4 << 20,
        _ => hands::connectors::hands_v1::MAX_MESSAGE,
    };
    let server = SandboxServer::new(Double {
        inner,
        mode,
        seen: Mutex::default(),
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, registry)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_case_fails_against_a_double_that_breaks_its_rule() {
    require_sandbox!();
    let covered: BTreeSet<&str> = TABLE
        .iter()
        .flat_map(|(_, cases)| cases.iter().copied())
        .collect();
    for case in conformance::cases::all() {
        assert!(
            covered.contains(case.name),
            "no misbehaviour shows case {} can fail",
            case.name
        );
    }
    let web = web_server();
    for (mode, cases) in TABLE {
        let (addr, registry) = serve_double(*mode, web).await;
        let mut target = Grpc::connect(addr).await.unwrap();
        let opts = conformance::Options {
            env: "default".into(),
            egress: Some(egress_target(web)),
            only: cases.iter().map(|c| c.to_string()).collect(),
            expected_failures: BTreeSet::new(),
            case_timeout: Duration::from_secs(60),
        };
        let report = conformance::run(&mut target, &format!("{mode:?}"), &opts).await;
        assert_eq!(report.cases.len(), cases.len());
        for c in &report.cases {
            assert_eq!(
                c.status,
                Status::Fail,
                "{mode:?} breaks the rule of {} but the case passed",
                c.name
            );
        }
        registry.close_all();
    }
}
