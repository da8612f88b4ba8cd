//! `hands conformance --mcp`: every MCP case passes against the worker's MCP
//! endpoint and the gateway's, and fails against a double that breaks the
//! rule it checks (the real face with one misbehaviour in its sandbox, its
//! backend or its HTTP layer).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use hands::conformance::{self, mcp::McpTarget, Status};
use hands::connectors::mcp::http::{endpoint_service, Backend, LocalBackend};
use hands::connectors::mcp::{CallError, Sandbox, SandboxCall};
use hands::session::activity::Snapshot;
use hands::session::registry::Registry;
use hands::tools::ToolResult;

use crate::require_sandbox;
use crate::util::*;

/// One rule a double breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Answers `initialize` without an `Mcp-Session-Id`.
    NoSessionId,
    /// Lists `grep` under another name.
    RenamesATool,
    /// Restarts the shell before every bash call.
    FreshShellEachCall,
    /// Reports every result as a success.
    FailuresAreSuccesses,
    /// Answers edit without editing.
    EditDoesNothing,
    /// Reads absolute paths from the host.
    ReadsHostFiles,
    /// Sends no progress.
    NoProgress,
    /// Lets a cancelled call run on.
    IgnoresCancel,
    /// Runs an unknown tool as bash.
    UnknownToolRuns,
    /// Answers a body that is not JSON with 200.
    AcceptsGarbage,
    /// Gives every MCP session the same sandbox.
    SharedSandbox,
    /// Answers DELETE without ending the session.
    DeleteIgnored,
}

const TABLE: &[(Mode, &str)] = &[
    (Mode::NoSessionId, "mcp_initialize_opens_a_session"),
    (
        Mode::RenamesATool,
        "mcp_tools_are_the_six_with_their_schemas",
    ),
    (Mode::FreshShellEachCall, "mcp_bash_shell_persists"),
    (Mode::FailuresAreSuccesses, "mcp_tool_failure_is_a_result"),
    (Mode::EditDoesNothing, "mcp_file_tools_round_trip"),
    (Mode::ReadsHostFiles, "mcp_host_files_stay_out_of_reach"),
    (Mode::NoProgress, "mcp_bash_output_streams_as_progress"),
    (Mode::IgnoresCancel, "mcp_cancelled_call_is_killed"),
    (
        Mode::UnknownToolRuns,
        "mcp_unknown_tool_is_a_protocol_error",
    ),
    (Mode::AcceptsGarbage, "mcp_malformed_requests_get_errors"),
    (Mode::SharedSandbox, "mcp_sessions_are_isolated"),
    (Mode::DeleteIgnored, "mcp_delete_ends_the_session"),
];

struct DoubleBackend {
    inner: LocalBackend,
    mode: Mode,
    shared: tokio::sync::OnceCell<Arc<dyn Sandbox>>,
}

impl Backend for DoubleBackend {
    fn env(&self) -> &str {
        self.inner.env()
    }

    fn open<'a>(&'a self, mcp: &'a str) -> BoxFuture<'a, Result<Arc<dyn Sandbox>, String>> {
        Box::pin(async move {
            if self.mode == Mode::SharedSandbox {
                let s = self.shared.get_or_try_init(|| self.inner.open(mcp)).await?;
                return Ok(s.clone());
            }
            let inner = self.inner.open(mcp).await?;
            let double: Arc<dyn Sandbox> = Arc::new(DoubleSandbox {
                inner,
                mode: self.mode,
            });
            Ok(double)
        })
    }
}

struct DoubleSandbox {
    inner: Arc<dyn Sandbox>,
    mode: Mode,
}

fn restart(call_id: &str) -> SandboxCall {
    SandboxCall {
        call_id: format!("{call_id}-restart"),
        tool: "bash".into(),
        input: r#"{"restart": true}"#.into(),
        output: None,
        cancel: Default::default(),
    }
}

impl Sandbox for DoubleSandbox {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn call(
        &self,
        mut call: SandboxCall,
    ) -> BoxFuture<'static, Result<Arc<ToolResult>, CallError>> {
        let inner = self.inner.clone();
        let mode = self.mode;
        Box::pin(async move {
            match mode {
                Mode::FreshShellEachCall if call.tool == "bash" => {
                    inner.call(restart(&call.call_id)).await?;
                }
                Mode::EditDoesNothing if call.tool == "edit" => {
                    return Ok(Arc::new(ToolResult::ok("edited")));
                }
                Mode::ReadsHostFiles if call.tool == "read" => {
                    let input: serde_json::Value = serde_json::from_str(&call.input).unwrap();
                    let path = input["file_path"].as_str().unwrap_or_default();
                    if path.starts_with('/') {
                        let text = std::fs::read_to_string(path).unwrap_or_default();
                        return Ok(Arc::new(ToolResult::ok(text)));
                    }
                }
                Mode::NoProgress => call.output = None,
                Mode::IgnoresCancel => call.cancel = Default::default(),
                _ => {}
            }
            let result = inner.call(call).await?;
            if mode == Mode::FailuresAreSuccesses {
                let mut r = (*result).clone();
                r.is_error = false;
                return Ok(Arc::new(r));
            }
            Ok(result)
        })
    }

    fn activity(&self) -> Snapshot {
        self.inner.activity()
    }

    fn touch(&self) {
        self.inner.touch()
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        self.inner.close()
    }
}

/// The HTTP layer's misbehaviours.
async fn misbehave(
    axum::extract::State(mode): axum::extract::State<Mode>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use http_body_util::BodyExt;
    if mode == Mode::DeleteIgnored && req.method() == http::Method::DELETE {
        return http::StatusCode::NO_CONTENT.into_response_double();
    }
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    if mode == Mode::AcceptsGarbage && serde_json::from_slice::<serde_json::Value>(&bytes).is_err()
    {
        return http::StatusCode::OK.into_response_double();
    }
    let mut text = String::from_utf8_lossy(&bytes).to_string();
    if mode == Mode::UnknownToolRuns {
        text = text.replace("\"launch_missiles\"", "\"bash\"");
    }
    let lists_tools = text.contains("\"tools/list\"");
    let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(text));
    let mut resp = next.run(req).await;
    if mode == Mode::NoSessionId {
        resp.headers_mut().remove("mcp-session-id");
    }
    if mode == Mode::RenamesATool && lists_tools {
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let text =
            String::from_utf8_lossy(&bytes).replace("\"name\":\"grep\"", "\"name\":\"search\"");
        return axum::response::Response::from_parts(parts, axum::body::Body::from(text));
    }
    resp
}

trait IntoResponseDouble {
    fn into_response_double(self) -> axum::response::Response;
}

impl IntoResponseDouble for http::StatusCode {
    fn into_response_double(self) -> axum::response::Response {
        let mut r = axum::response::Response::new(axum::body::Body::empty());
        *r.status_mut() = self;
        r
    }
}

/// Serves a double of `mode` on loopback: its endpoint's URL.
async fn serve_double(mode: Mode, registry: Arc<Registry>) -> String {
    let backend = Arc::new(DoubleBackend {
        inner: LocalBackend::new(registry, "default"),
        mode,
        shared: tokio::sync::OnceCell::new(),
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let (service, _sessions) = endpoint_service(backend, Vec::new(), &stop);
    let router = axum::Router::new()
        .route_service("/mcp", service)
        .layer(axum::middleware::from_fn_with_state(mode, misbehave));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _stop = stop;
        axum::serve(listener, router).await.unwrap();
    });
    format!("http://{addr}/mcp")
}

fn options(only: &[&str]) -> conformance::Options {
    conformance::Options {
        env: "default".into(),
        egress: None,
        only: only.iter().map(|c| c.to_string()).collect(),
        expected_failures: BTreeSet::new(),
        case_timeout: Duration::from_secs(60),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_mcp_case_fails_against_a_double_that_breaks_its_rule() {
    require_sandbox!();
    let covered: BTreeSet<&str> = TABLE.iter().map(|(_, c)| *c).collect();
    for case in conformance::mcp::all() {
        assert!(
            covered.contains(case.name),
            "no misbehaviour shows case {} can fail",
            case.name
        );
    }
    let policies = hands::policy::PolicySet::builtin()
        .iter()
        .cloned()
        .collect::<Vec<_>>();
    let registry = Arc::new(Registry::new(config(), policies, 32));
    for (mode, case) in TABLE {
        let url = serve_double(*mode, registry.clone()).await;
        let target = McpTarget::new(&url, None).unwrap();
        let report = conformance::mcp::run(&target, &format!("{mode:?}"), &options(&[case])).await;
        assert_eq!(report.cases.len(), 1);
        let c = &report.cases[0];
        assert_eq!(
            c.status,
            Status::Fail,
            "{mode:?} breaks the rule of {} but the case passed",
            c.name
        );
    }
    registry.close_all();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_mcp_case_passes_against_the_faces_of_hands() {
    require_sandbox!();
    // The real face, in process, without a double's misbehaviour: the same
    // endpoint the worker's [mcp] listener serves.
    let policies = hands::policy::PolicySet::builtin()
        .iter()
        .cloned()
        .collect::<Vec<_>>();
    let registry = Arc::new(Registry::new(config(), policies, 32));
    let stop = tokio_util::sync::CancellationToken::new();
    let backend = Arc::new(LocalBackend::new(registry.clone(), "default"));
    let (service, _sessions) = endpoint_service(backend, Vec::new(), &stop);
    let router = axum::Router::new().route_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let target = McpTarget::new(&format!("http://{addr}/mcp"), None).unwrap();
    let report = conformance::mcp::run(&target, "in process", &options(&[])).await;
    assert!(report.ok(), "{}", report.human());
    assert_eq!(report.count(Status::Pass), conformance::mcp::all().len());
    // Through a gateway, to a worker that only dials out.
    let (gw, wk, url) = crate::mcp::through_gateway().await;
    let target = McpTarget::new(
        &url.replace("{env}", "default"),
        Some(crate::tunnel::TOKEN.to_string()),
    )
    .unwrap();
    let report = conformance::mcp::run(&target, "gateway", &options(&[])).await;
    assert!(report.ok(), "{}", report.human());
    assert_eq!(report.count(Status::Pass), conformance::mcp::all().len());
    wk.stop().await;
    gw.stop().await;
    stop.cancel();
    registry.close_all();
}

/// `hands conformance --mcp` as a user runs it, against a worker's [mcp]
/// listener: exit 0, every case passed.
#[test]
fn the_conformance_command_passes_against_a_workers_mcp_listener() {
    require_sandbox!();
    let w = crate::mcp::HttpWorker::start("");
    let out = std::process::Command::new(hands_bin())
        .args(["conformance", "--mcp"])
        .arg(format!("{}/default", w.base("http")))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "{} passed, 0 failed",
            conformance::mcp::all().len()
        )),
        "{text}"
    );
}

/// `hands conformance --mcp https://…` against a worker's [mcp] listener that
/// takes TLS, client certificates of its CA and a bearer token: with the CA,
/// the client's certificate and the token every case passes; without the
/// certificate nothing does.
#[test]
fn the_conformance_command_speaks_https_with_a_client_certificate_and_a_token() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    crate::mcp::write_tls_files(dir.path());
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("token"), "conformance-token-0123456789").unwrap();
    let (ca_pem, cert, key, token) = (
        p("ca.pem"),
        p("client.pem"),
        p("client-key.pem"),
        p("token"),
    );
    let w = crate::mcp::HttpWorker::start_in(
        dir,
        "tls_cert = \"server.pem\"\ntls_key = \"server-key.pem\"\nclient_ca = \"ca.pem\"\n\
         token_file = \"token\"",
    );
    let url = format!("{}/default", w.base("https"));
    let run = |extra: &[&std::path::Path]| {
        let mut cmd = std::process::Command::new(hands_bin());
        cmd.args([
            "conformance",
            "--case-timeout-secs",
            "30",
            "--mcp",
            &url,
            "--ca",
        ])
        .arg(&ca_pem)
        .arg("--token-file")
        .arg(&token);
        if let [c, k] = extra {
            cmd.arg("--cert").arg(c).arg("--key").arg(k);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let n = conformance::mcp::all().len();
    let (code, text) = run(&[&cert, &key]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&format!("{n} passed, 0 failed")), "{text}");
    // Without the client certificate the handshake is refused: no case passes.
    let (code, text) = run(&[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains(&format!("0 passed, {n} failed")), "{text}");
}
