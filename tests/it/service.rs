//! hands.v1.Sandbox end to end over a real gRPC server on loopback: the
//! session lifecycle, calls as event streams, and every error with its status
//! code and `hands-reason`.

use std::sync::Arc;

use hands::proto::v1;
use hands::proto::v1::sandbox_client::SandboxClient;
use hands::service::{detect_isolation, SandboxService, REASON};
use hands::session::registry::Registry;
use tonic::transport::Channel;
use tonic::Code;

use crate::require_sandbox;
use crate::util::*;

async fn serve(capacity: usize) -> SandboxClient<Channel> {
    let policies = hands::policy::PolicySet::builtin()
        .iter()
        .cloned()
        .collect::<Vec<_>>();
    let registry = Arc::new(Registry::new(config(), policies, capacity));
    let svc = SandboxService::new(registry, "worker-test".into(), detect_isolation());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc.into_server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    SandboxClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn reason(s: &tonic::Status) -> String {
    s.metadata()
        .get(REASON)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn call(
    c: &mut SandboxClient<Channel>,
    session: &str,
    id: &str,
    tool: &str,
    input: &str,
) -> Result<Vec<v1::CallEvent>, tonic::Status> {
    let mut stream = c
        .call(v1::CallRequest {
            session_id: session.into(),
            call_id: id.into(),
            tool: tool.into(),
            input_json: input.into(),
            stream_output: false,
        })
        .await?
        .into_inner();
    let mut events = Vec::new();
    while let Some(e) = stream.message().await? {
        events.push(e);
    }
    Ok(events)
}

fn finished(events: &[v1::CallEvent]) -> hands::tools::ToolResult {
    assert!(
        matches!(events.first().and_then(|e| e.event.as_ref()), Some(v1::call_event::Event::Started(s)) if s.executed_now)
    );
    match events.last().and_then(|e| e.event.as_ref()) {
        Some(v1::call_event::Event::Finished(f)) => hands::proto::result_of(f).unwrap(),
        other => panic!("last event is not Finished: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn session_lifecycle_and_calls_over_grpc() {
    require_sandbox!();
    let mut c = serve(8).await;
    let info = c.info(v1::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.worker_id, "worker-test");
    assert_eq!(info.protocols, ["hands.v1"]);
    let envs: Vec<&str> = info.environments.iter().map(|e| e.name.as_str()).collect();
    assert!(
        envs.contains(&"default") && envs.contains(&"strict"),
        "{envs:?}"
    );
    assert!(info.isolation.unwrap().landlock_abi >= 1);

    let open = |id: &str, env: &str| v1::OpenSessionRequest {
        session_id: id.into(),
        environment: env.into(),
    };
    let r = c
        .open_session(open("w1:s1", "default"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.created);
    let r = c
        .open_session(open("w1:s1", "default"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !r.created,
        "a retried OpenSession must find the open session"
    );
    let e = c.open_session(open("w1:s1", "strict")).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::AlreadyExists, "SESSION_ENVIRONMENT_MISMATCH")
    );

    let ev = call(
        &mut c,
        "w1:s1",
        "c1",
        "bash",
        r#"{"command":"echo hi; pwd"}"#,
    )
    .await
    .unwrap();
    assert_eq!(finished(&ev).text_content(), "hi\n/workspace");
    let ev = call(&mut c, "w1:s1", "c2", "read", r#"{"file_path":"nope.txt"}"#)
        .await
        .unwrap();
    let r = finished(&ev);
    assert!(r.is_error, "a tool failure is a normal result");
    assert_eq!(
        r.text_content(),
        "read: nope.txt: no such file or directory"
    );

    let e = call(&mut c, "w1:s1", "c3", "bash", "{not json")
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::InvalidArgument, "INVALID_INPUT_JSON")
    );
    let e = call(&mut c, "w1:nope", "c4", "bash", "{}")
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::NotFound, "SESSION_NOT_FOUND")
    );
    let e = call(&mut c, "w1:s1", "bad id!", "bash", "{}")
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::InvalidArgument, "INVALID_ID")
    );
    let e = c
        .open_session(open("w1:s2", "no-such-env"))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::NotFound, "UNKNOWN_ENVIRONMENT")
    );

    let closed = c
        .close_session(v1::CloseSessionRequest {
            session_id: "w1:s1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(closed.closed);
    let closed = c
        .close_session(v1::CloseSessionRequest {
            session_id: "w1:s1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !closed.closed,
        "closing twice succeeds, reporting nothing was open"
    );
    let e = call(&mut c, "w1:s1", "c5", "bash", r#"{"command":"true"}"#)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn capacity_is_enforced_and_freed_by_close() {
    require_sandbox!();
    let mut c = serve(2).await;
    let open = |id: &str| v1::OpenSessionRequest {
        session_id: id.into(),
        environment: "default".into(),
    };
    c.open_session(open("a")).await.unwrap();
    c.open_session(open("b")).await.unwrap();
    let e = c.open_session(open("c")).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::ResourceExhausted, "AT_CAPACITY")
    );
    c.close_session(v1::CloseSessionRequest {
        session_id: "a".into(),
    })
    .await
    .unwrap();
    assert!(
        c.open_session(open("c"))
            .await
            .unwrap()
            .into_inner()
            .created
    );
    for id in ["b", "c"] {
        c.close_session(v1::CloseSessionRequest {
            session_id: id.into(),
        })
        .await
        .unwrap();
    }
}
