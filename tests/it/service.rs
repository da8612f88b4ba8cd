//! hands.v1.Sandbox end to end over a real gRPC server on loopback: the
//! session lifecycle, calls as event streams, and every error with its status
//! code and `hands-reason`.

use std::sync::Arc;

use hands::connectors::hands_v1::{detect_isolation, SandboxService};
use hands::proto::v1;
use hands::proto::v1::sandbox_client::SandboxClient;
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
    serve_registry(Arc::new(Registry::new(config(), policies, capacity))).await
}

async fn call(
    c: &mut SandboxClient<Channel>,
    session: &str,
    id: &str,
    tool: &str,
    input: &str,
) -> Result<Vec<v1::CallEvent>, tonic::Status> {
    let mut stream = c
        .call(req(session, id, tool, input, false))
        .await?
        .into_inner();
    let mut events = Vec::new();
    while let Some(e) = stream.message().await? {
        events.push(e);
    }
    Ok(events)
}

/// The result of a call that must be accepted (a tool failure is still a
/// result).
async fn run(
    c: &mut SandboxClient<Channel>,
    session: &str,
    id: &str,
    tool: &str,
    input: &str,
) -> hands::tools::ToolResult {
    let events = call(c, session, id, tool, input)
        .await
        .expect("call accepted");
    hands::proto::result_of(last_finished(&events)).expect("a well-formed result")
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

fn req(session: &str, id: &str, tool: &str, input: &str, stream_output: bool) -> v1::CallRequest {
    v1::CallRequest {
        session_id: session.into(),
        call_id: id.into(),
        tool: tool.into(),
        input_json: input.into(),
        stream_output,
    }
}

async fn opened(c: &mut SandboxClient<Channel>, id: &str) {
    c.open_session(v1::OpenSessionRequest {
        session_id: id.into(),
        environment: "default".into(),
    })
    .await
    .unwrap();
}

async fn close(c: &mut SandboxClient<Channel>, id: &str) {
    c.close_session(v1::CloseSessionRequest {
        session_id: id.into(),
    })
    .await
    .expect("close session");
}

async fn collect(mut s: tonic::Streaming<v1::CallEvent>) -> Vec<v1::CallEvent> {
    let mut out = Vec::new();
    while let Some(e) = s.message().await.unwrap() {
        out.push(e);
    }
    out
}

fn last_finished(events: &[v1::CallEvent]) -> &v1::Finished {
    match events.last().and_then(|e| e.event.as_ref()) {
        Some(v1::call_event::Event::Finished(f)) => f,
        other => panic!("not Finished: {other:?}"),
    }
}

fn outputs(events: &[v1::CallEvent]) -> Vec<(u64, Vec<u8>)> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(v1::call_event::Event::Output(o)) => Some((o.offset, o.data.clone())),
            _ => None,
        })
        .collect()
}

/// The stream is dropped right after Started (a lost connection); the call runs
/// on, and the repeated Call delivers its result without executing it again.
#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_call_resumes_and_never_re_executes() {
    require_sandbox!();
    let mut c = serve(4).await;
    opened(&mut c, "j1").await;
    let cmd = r#"{"command":"sleep 0.5; echo run >> runs.txt; wc -l < runs.txt"}"#;
    let mut s = c
        .call(req("j1", "once", "bash", cmd, false))
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(v1::call_event::Event::Started(ref st)) if st.executed_now));
    drop(s);
    let events = collect(
        c.call(req("j1", "once", "bash", cmd, false))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert!(
        matches!(events[0].event, Some(v1::call_event::Event::Started(ref st)) if !st.executed_now)
    );
    let f = last_finished(&events);
    assert_eq!(hands::proto::result_of(f).unwrap().text_content(), "1");
    // And once more, after it finished: the same result, still one run.
    assert_eq!(
        run(&mut c, "j1", "once", "bash", cmd).await.text_content(),
        "1"
    );
    let check = run(
        &mut c,
        "j1",
        "check",
        "bash",
        r#"{"command":"wc -l < runs.txt"}"#,
    )
    .await;
    assert_eq!(check.text_content(), "1");
    // The same id with other input is refused.
    let e = c
        .call(req("j1", "once", "bash", r#"{"command":"true"}"#, false))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::AlreadyExists, "CALL_INPUT_MISMATCH")
    );
    close(&mut c, "j1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bash_output_streams_as_produced_and_attach_replays_from_an_offset() {
    require_sandbox!();
    let mut c = serve(4).await;
    opened(&mut c, "j2").await;
    let cmd = r#"{"command":"for i in 1 2 3; do echo line$i; sleep 0.3; done"}"#;
    let events = collect(
        c.call(req("j2", "s1", "bash", cmd, true))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let outs = outputs(&events);
    assert!(
        outs.len() >= 2,
        "output arrived in one piece, not as produced: {outs:?}"
    );
    let mut next = 0;
    for (off, data) in &outs {
        assert_eq!(*off, next, "offsets must be contiguous");
        next += data.len() as u64;
    }
    let all: Vec<u8> = outs.iter().flat_map(|(_, d)| d.clone()).collect();
    assert_eq!(String::from_utf8_lossy(&all), "line1\nline2\nline3\n");
    assert_eq!(
        hands::proto::result_of(last_finished(&events))
            .unwrap()
            .text_content(),
        "line1\nline2\nline3"
    );

    let replay = collect(
        c.attach(v1::AttachRequest {
            session_id: "j2".into(),
            call_id: "s1".into(),
            from_offset: 6,
        })
        .await
        .unwrap()
        .into_inner(),
    )
    .await;
    let tail: Vec<u8> = outputs(&replay)
        .iter()
        .flat_map(|(_, d)| d.clone())
        .collect();
    assert_eq!(outputs(&replay)[0].0, 6);
    assert_eq!(String::from_utf8_lossy(&tail), "line2\nline3\n");
    assert_eq!(last_finished(&replay).outcome(), v1::Outcome::Completed);
    let e = c
        .attach(v1::AttachRequest {
            session_id: "j2".into(),
            call_id: "nope".into(),
            from_offset: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::NotFound, "CALL_NOT_FOUND")
    );
    close(&mut c, "j2").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_kills_the_call_and_everything_it_started() {
    require_sandbox!();
    let mut c = serve(4).await;
    opened(&mut c, "j3").await;
    let mut s = c
        .call(req(
            "j3",
            "long",
            "bash",
            r#"{"command":"sleep 100 & sleep 100"}"#,
            false,
        ))
        .await
        .unwrap()
        .into_inner();
    s.message().await.unwrap().unwrap(); // Started
    let r = c
        .cancel(v1::CancelRequest {
            session_id: "j3".into(),
            call_id: "long".into(),
        })
        .await
        .unwrap();
    assert!(r.into_inner().cancelled);
    let rest = collect(s).await;
    let f = last_finished(&rest);
    assert_eq!(f.outcome(), v1::Outcome::Cancelled);
    let res = hands::proto::result_of(f).unwrap();
    assert!(res.is_error);
    assert_eq!(res.text_content(), "tool 'bash' cancelled");
    // The shell is gone with everything it started; a restart brings a clean one.
    let after = run(&mut c, "j3", "after", "bash", r#"{"command":"true"}"#).await;
    assert_eq!(
        after.text_content(),
        "bash: bash session terminated; restart required"
    );
    run(&mut c, "j3", "restart", "bash", r#"{"restart":true}"#).await;
    let ps = run(
        &mut c,
        "j3",
        "ps",
        "bash",
        r#"{"command":"pgrep -c sleep || true"}"#,
    )
    .await;
    assert_eq!(ps.text_content(), "0");
    let r = c
        .cancel(v1::CancelRequest {
            session_id: "j3".into(),
            call_id: "long".into(),
        })
        .await
        .unwrap();
    assert!(
        !r.into_inner().cancelled,
        "a finished call cannot be cancelled"
    );
    close(&mut c, "j3").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deadline_kills_the_call() {
    require_sandbox!();
    let mut c = serve(4).await;
    opened(&mut c, "j4").await;
    let mut r = tonic::Request::new(req(
        "j4",
        "slow",
        "bash",
        r#"{"command":"sleep 100"}"#,
        false,
    ));
    r.set_timeout(std::time::Duration::from_millis(400));
    let outcome = match c.call(r).await {
        Ok(s) => {
            let mut s = s.into_inner();
            loop {
                match s.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            }
        }
        Err(e) => Err(e),
    };
    // The server kills the call at the deadline and ends the stream with
    // DEADLINE_EXCEEDED, even for a client (tonic, on a stream) that does not
    // enforce its deadline itself.
    let e = outcome.expect_err("the stream ends with DEADLINE_EXCEEDED");
    assert_eq!(e.code(), Code::DeadlineExceeded);
    assert_eq!(reason(&e), "DEADLINE_EXCEEDED");
    let ev = collect(
        c.attach(v1::AttachRequest {
            session_id: "j4".into(),
            call_id: "slow".into(),
            from_offset: 0,
        })
        .await
        .unwrap()
        .into_inner(),
    )
    .await;
    assert_eq!(last_finished(&ev).outcome(), v1::Outcome::Cancelled);
    close(&mut c, "j4").await;
}

/// 100 calls at once across 10 sessions: every one completes with its own
/// result.
#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_concurrent_calls_across_ten_sessions() {
    require_sandbox!();
    let c = serve(16).await;
    let mut cc = c.clone();
    for s in 0..10 {
        opened(&mut cc, &format!("m{s}")).await;
    }
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let session = format!("m{}", i % 10);
            let (tool, input, want) = if i % 2 == 0 {
                (
                    "bash",
                    format!(r#"{{"command":"echo call-{i}"}}"#),
                    format!("call-{i}"),
                )
            } else {
                (
                    "glob",
                    r#"{"pattern":"*.none"}"#.to_string(),
                    "no matches".to_string(),
                )
            };
            let r = run(&mut c, &session, &format!("k{i}"), tool, &input).await;
            assert_eq!(r.text_content(), want, "call {i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for s in 0..10 {
        close(&mut cc, &format!("m{s}")).await;
    }
}

/// A consumer that stops reading a call streaming a lot of output holds back only
/// its own stream: other calls, in its session and in others, go on.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_consumer_does_not_delay_other_calls() {
    require_sandbox!();
    let mut c = serve(4).await;
    opened(&mut c, "slow").await;
    opened(&mut c, "fast").await;
    // 200 MiB of output, streamed to a client that never reads it.
    let stalled = c
        .call(req(
            "slow",
            "flood",
            "bash",
            r#"{"command":"head -c 209715200 /dev/zero | tr '\\0' x"}"#,
            true,
        ))
        .await
        .unwrap()
        .into_inner();
    let work = async {
        for i in 0..20 {
            let session = if i % 2 == 0 { "fast" } else { "slow" };
            let tool_input = if session == "slow" {
                // The slow session's shell is busy flooding: use a file tool there.
                (
                    "write",
                    format!(r#"{{"file_path":"f{i}.txt","content":"x"}}"#),
                )
            } else {
                ("bash", format!(r#"{{"command":"echo {i}"}}"#))
            };
            let r = run(
                &mut c,
                session,
                &format!("w{i}"),
                tool_input.0,
                &tool_input.1,
            )
            .await;
            assert!(!r.is_error, "{r:?}");
        }
    };
    // Generous: a stalled stream would hold these forever, not for seconds.
    tokio::time::timeout(std::time::Duration::from_secs(60), work)
        .await
        .expect("other calls were held up by a stalled consumer");
    drop(stalled);
    close(&mut c, "slow").await;
    close(&mut c, "fast").await;
}

/// A message over the protocol's 64 MiB limit is refused with a clear status
/// (by the transport, at the call or in its stream), and the worker serves on.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_message_is_refused_and_the_worker_serves_on() {
    require_sandbox!();
    let mut c = serve(4).await;
    opened(&mut c, "big").await;
    // Under the limit: a 5 MiB write is a normal call.
    let big = format!(
        r#"{{"file_path":"big.txt","content":"{}"}}"#,
        "x".repeat(5 << 20)
    );
    let r = run(&mut c, "big", "five", "write", &big).await;
    assert!(!r.is_error, "{r:?}");
    // Over it.
    let huge = format!(
        r#"{{"file_path":"huge.txt","content":"{}"}}"#,
        "x".repeat(65 << 20)
    );
    let refused = match c.call(req("big", "huge", "write", &huge, false)).await {
        Err(e) => e,
        Ok(resp) => {
            let mut stream = resp.into_inner();
            loop {
                match stream.message().await {
                    Err(e) => break e,
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("a 65 MiB request was accepted"),
                }
            }
        }
    };
    assert!(
        matches!(
            refused.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::Internal
        ) && refused.message().contains("too large"),
        "{refused}"
    );
    let after = run(
        &mut c,
        "big",
        "after",
        "bash",
        r#"{"command":"echo still serving"}"#,
    )
    .await;
    assert_eq!(after.text_content(), "still serving");
    close(&mut c, "big").await;
}

/// A service over `registry` on loopback, with message limits raised for
/// large results.
async fn serve_registry(registry: Arc<Registry>) -> SandboxClient<Channel> {
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
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20)
}

/// Issue #13: a `grpc-timeout` past what an Instant can hold panicked the
/// task serving the call (after the call had started). The spec allows at
/// most 8 digits; anything else is refused before anything runs, and the
/// worker serves on.
#[tokio::test(flavor = "multi_thread")]
async fn an_out_of_range_grpc_timeout_is_refused_and_the_worker_serves_on() {
    require_sandbox!();
    let mut c = serve(4).await;
    opened(&mut c, "t1").await;
    for (id, timeout) in [
        ("huge-s", "18446744073709551615S"),
        ("huge-h", "18446744073709551615H"),
        ("nine", "123456789n"),
        ("unit", "5x"),
    ] {
        let mut r = tonic::Request::new(req(
            "t1",
            id,
            "bash",
            r#"{"command":"echo ran >> ran.txt"}"#,
            false,
        ));
        r.metadata_mut()
            .insert("grpc-timeout", timeout.parse().unwrap());
        let e = match c.call(r).await {
            Err(e) => e,
            Ok(s) => collect_result(s.into_inner())
                .await
                .expect_err("an invalid grpc-timeout is refused"),
        };
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (Code::InvalidArgument, "INVALID_TIMEOUT"),
            "{timeout}: {e}"
        );
    }
    // The largest valid one is a deadline like any other.
    let mut r = tonic::Request::new(req("t1", "max", "bash", r#"{"command":"echo ok"}"#, false));
    r.metadata_mut()
        .insert("grpc-timeout", "99999999H".parse().unwrap());
    let events = collect(c.call(r).await.unwrap().into_inner()).await;
    assert_eq!(finished(&events).text_content(), "ok");
    let check = run(
        &mut c,
        "t1",
        "check",
        "bash",
        r#"{"command":"cat ran.txt 2>/dev/null | wc -l"}"#,
    )
    .await;
    assert_eq!(check.text_content(), "0", "a refused call never runs");
    close(&mut c, "t1").await;
}

async fn collect_result(
    mut s: tonic::Streaming<v1::CallEvent>,
) -> Result<Vec<v1::CallEvent>, tonic::Status> {
    let mut out = Vec::new();
    while let Some(e) = s.message().await? {
        out.push(e);
    }
    Ok(out)
}

/// Issue #6: at-most-once holds after a result leaves the journal. The
/// journal keeps 1024 results per session; the call pushed out leaves a
/// tombstone, and asking for it again is `RESULT_EXPIRED`, never a second run.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_whose_result_expired_is_never_run_again() {
    require_sandbox!();
    let mut c = serve(4).await;
    opened(&mut c, "x1").await;
    let once = r#"{"command":"echo run >> runs.txt; wc -l < runs.txt"}"#;
    assert_eq!(
        run(&mut c, "x1", "c0", "bash", once).await.text_content(),
        "1"
    );
    for i in 0..1030 {
        run(
            &mut c,
            "x1",
            &format!("g{i}"),
            "glob",
            r#"{"pattern":"*.none"}"#,
        )
        .await;
    }
    let e = call(&mut c, "x1", "c0", "bash", once).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "RESULT_EXPIRED"),
        "{e}"
    );
    assert!(e.message().contains("will not run again"), "{e}");
    let e = c
        .attach(v1::AttachRequest {
            session_id: "x1".into(),
            call_id: "c0".into(),
            from_offset: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "RESULT_EXPIRED");
    // Other input under the expired id is still a mismatch.
    let e = call(&mut c, "x1", "c0", "bash", r#"{"command":"true"}"#)
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "CALL_INPUT_MISMATCH");
    let check = run(
        &mut c,
        "x1",
        "check",
        "bash",
        r#"{"command":"wc -l < runs.txt"}"#,
    )
    .await;
    assert_eq!(check.text_content(), "1", "the expired call ran again");
    close(&mut c, "x1").await;
}

/// Issue #6: 60 reads of a 20 MB PDF grew the worker by 1.6 GB, still held
/// after the session closed. Large results now stay within the journal's
/// byte budget (per session and per worker, oldest dropped first), the
/// dropped ones answer `RESULT_EXPIRED`, and closing the sessions releases
/// every byte. The worker's RSS is printed, not asserted.
#[tokio::test(flavor = "multi_thread")]
async fn large_results_stay_within_the_journal_budget_and_are_released_at_close() {
    require_sandbox!();
    // Freed buffers go back to the kernel, as `hands worker` sets it up.
    hands::util::return_large_buffers_to_the_kernel();
    let limits = hands::session::journal::Limits {
        session_bytes: 24 << 20,
        worker_bytes: 40 << 20,
        ..Default::default()
    };
    let policies = hands::policy::PolicySet::builtin()
        .iter()
        .cloned()
        .collect::<Vec<_>>();
    let registry = Arc::new(Registry::new(config(), policies, 4).with_journal_limits(limits));
    let mut c = serve_registry(registry.clone()).await;
    for s in ["big1", "big2"] {
        opened(&mut c, s).await;
        run(
            &mut c,
            s,
            "mk",
            "bash",
            r#"{"command":"head -c 4000000 /dev/urandom > doc.pdf"}"#,
        )
        .await;
    }
    let rss_before = rss_kib();
    let journals = registry.journals().clone();
    for i in 0..24 {
        let s = if i % 2 == 0 { "big1" } else { "big2" };
        let r = run(
            &mut c,
            s,
            &format!("r{i}"),
            "read",
            r#"{"file_path":"doc.pdf"}"#,
        )
        .await;
        assert!(!r.is_error, "{}", r.text_content());
        let session_bytes = registry.get(s).unwrap().journal().bytes();
        assert!(
            session_bytes <= limits.session_bytes,
            "{s}: {session_bytes} bytes over the session budget"
        );
        assert!(
            journals.bytes() <= limits.worker_bytes,
            "{} bytes over the worker budget",
            journals.bytes()
        );
    }
    // Each result is ~5.3 MB of base64: the worker holds 7 of the 24.
    let held = journals.results_held();
    assert!((4..=8).contains(&held), "{held} results held");
    let rss_full = rss_kib();
    // The oldest ones answer with a reason, never a second run.
    let e = call(&mut c, "big1", "r0", "read", r#"{"file_path":"doc.pdf"}"#)
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "RESULT_EXPIRED")
    );
    // The newest is still delivered on a repeated Call.
    let events = call(&mut c, "big2", "r23", "read", r#"{"file_path":"doc.pdf"}"#)
        .await
        .unwrap();
    assert!(matches!(
        events[0].event,
        Some(v1::call_event::Event::Started(ref s)) if !s.executed_now
    ));
    assert!(matches!(
        events.last().and_then(|e| e.event.as_ref()),
        Some(v1::call_event::Event::Finished(_))
    ));
    close(&mut c, "big1").await;
    close(&mut c, "big2").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while journals.bytes() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} bytes still journaled after both sessions closed",
            journals.bytes()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(journals.results_held(), 0);
    let rss_closed = rss_kib();
    eprintln!(
        "worker RSS: {} MiB before, {} MiB with the journal full ({} results held), {} MiB after close",
        rss_before / 1024,
        rss_full / 1024,
        held,
        rss_closed / 1024
    );
}
