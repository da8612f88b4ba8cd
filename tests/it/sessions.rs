//! A worker's sessions over hands.v1, as a worker serves them (its debug
//! listener, in this process): ListSessions, closing a listed session, and
//! the idle timeout (`[sessions] idle_timeout_secs`): abandoned sessions are
//! closed and free their slot, a running call keeps its session, a client
//! coming back learns why its session is gone, and sessions of a connector of
//! the worker are never closed for idleness. (Through the gateway: the
//! `tunnel` module.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hands::proto::v1;
use hands::proto::v1::sandbox_client::SandboxClient;
use hands::session::registry::{Owner, Registry};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::Code;

use crate::require_sandbox;
use crate::util::reason;

/// A worker serving hands.v1 on a loopback debug listener.
struct Worker {
    client: SandboxClient<Channel>,
    registry: Arc<Registry>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Worker {
    /// A worker whose worker.toml has these top-level keys and then these
    /// tables.
    async fn start(top: &str, tables: &str) -> Worker {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.toml");
        std::fs::write(
            &path,
            format!(
                "worker_id = \"w-sessions\"\nlisten = \"127.0.0.1:0\"\nenvironments = [\"default\"]\n{top}\n{tables}\n"
            ),
        )
        .unwrap();
        let config =
            hands::worker::Config::load(&path, &hands::policy::lookup::Lookup::builtin_only())
                .unwrap();
        let registry = hands::worker::registry(&config, crate::util::config()).unwrap();
        let (stop, shutdown) = watch::channel(false);
        let (bound_tx, bound) = tokio::sync::oneshot::channel::<SocketAddr>();
        let reg = registry.clone();
        let task = tokio::spawn(async move {
            hands::worker::serve(
                &config,
                reg,
                move |a| {
                    let _ = bound_tx.send(a);
                },
                |_| {},
                None,
                Default::default(),
                shutdown,
            )
            .await
            .expect("worker serves");
        });
        let addr = bound.await.expect("the debug listener is bound");
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Worker {
            client: SandboxClient::new(channel),
            registry,
            stop,
            task,
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        self.registry.close_all();
    }

    async fn open(&mut self, id: &str) -> Result<bool, tonic::Status> {
        Ok(self
            .client
            .open_session(v1::OpenSessionRequest {
                session_id: id.into(),
                environment: "default".into(),
            })
            .await?
            .into_inner()
            .created)
    }

    async fn close(&mut self, id: &str) -> bool {
        self.client
            .close_session(v1::CloseSessionRequest {
                session_id: id.into(),
            })
            .await
            .expect("CloseSession")
            .into_inner()
            .closed
    }

    async fn list(&mut self) -> Vec<v1::SessionInfo> {
        list_sessions(&mut self.client).await
    }

    async fn listed(&mut self, id: &str) -> Option<v1::SessionInfo> {
        self.list().await.into_iter().find(|s| s.session_id == id)
    }

    /// A call's events to its end.
    async fn call(
        &mut self,
        session: &str,
        id: &str,
        command: &str,
    ) -> Result<Vec<v1::CallEvent>, tonic::Status> {
        self.send(req(session, id, command)).await
    }

    async fn send(&mut self, r: v1::CallRequest) -> Result<Vec<v1::CallEvent>, tonic::Status> {
        let mut s = self.client.call(r).await?.into_inner();
        let mut events = Vec::new();
        while let Some(e) = s.message().await? {
            events.push(e);
        }
        Ok(events)
    }

    /// A bash call's text, which must succeed.
    async fn bash(&mut self, session: &str, id: &str, command: &str) -> String {
        let events = self
            .call(session, id, command)
            .await
            .expect("call accepted");
        let r = result(&events);
        assert!(!r.is_error, "{command}: {}", r.text_content());
        r.text_content().trim_end().to_string()
    }

    /// Starts a call and leaves it running (its stream is dropped after
    /// Started, as a client that went away).
    async fn start_and_leave(&mut self, session: &str, id: &str, command: &str) {
        let mut s = self
            .client
            .call(req(session, id, command))
            .await
            .expect("call accepted")
            .into_inner();
        match s.message().await.unwrap().and_then(|e| e.event) {
            Some(v1::call_event::Event::Started(st)) => assert!(st.executed_now),
            other => panic!("expected Started, got {other:?}"),
        }
    }

    /// Cancels a running call and waits for its result.
    async fn cancel_and_wait(&mut self, session: &str, id: &str) {
        let c = self
            .client
            .cancel(v1::CancelRequest {
                session_id: session.into(),
                call_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(c.cancelled, "the call {id} was running");
        let mut s = self
            .client
            .attach(v1::AttachRequest {
                session_id: session.into(),
                call_id: id.into(),
                from_offset: 0,
            })
            .await
            .unwrap()
            .into_inner();
        while s.message().await.unwrap().is_some() {}
    }
}

fn req(session: &str, id: &str, command: &str) -> v1::CallRequest {
    v1::CallRequest {
        session_id: session.into(),
        call_id: id.into(),
        tool: "bash".into(),
        input_json: serde_json::json!({ "command": command }).to_string(),
        stream_output: false,
    }
}

fn result(events: &[v1::CallEvent]) -> hands::tools::ToolResult {
    match events.last().and_then(|e| e.event.as_ref()) {
        Some(v1::call_event::Event::Finished(f)) => hands::proto::result_of(f).unwrap(),
        other => panic!("last event is not Finished: {other:?}"),
    }
}

/// Every open session, as ListSessions answers.
async fn list_sessions(client: &mut SandboxClient<Channel>) -> Vec<v1::SessionInfo> {
    client
        .list_sessions(v1::ListSessionsRequest {})
        .await
        .expect("ListSessions")
        .into_inner()
        .sessions
}

/// The ids of every open session (for `until` conditions, which own their
/// client).
async fn listed_ids(mut client: SandboxClient<Channel>) -> Vec<String> {
    list_sessions(&mut client)
        .await
        .into_iter()
        .map(|s| s.session_id)
        .collect()
}

/// Waits, up to a generous deadline, for `done` to hold.
async fn until<F: std::future::Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// ListSessions shows every open session, oldest first, with its environment,
/// its calls and how long it has been idle, and the timeout that applies to
/// it (the worker's default, half an hour; none for a session a connector of
/// the worker opened); Info names the process and the timeout. A listed
/// session closed with CloseSession is gone from the list, and a call to it is
/// `SESSION_NOT_FOUND`.
#[tokio::test(flavor = "multi_thread")]
async fn list_sessions_shows_each_open_session_and_a_listed_session_can_be_closed() {
    require_sandbox!();
    let mut w = Worker::start("", "").await;
    let info = w
        .client
        .info(v1::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.session_idle_timeout_ms, 1_800_000);
    assert_eq!(info.instance_id, w.registry.instance_id());
    assert_eq!(info.instance_id.len(), 32, "{}", info.instance_id);
    assert!(w.list().await.is_empty());

    assert!(w.open("first").await.unwrap());
    assert_eq!(w.bash("first", "c1", "echo one").await, "one");
    assert_eq!(w.bash("first", "c2", "echo two").await, "two");
    assert!(w.open("second").await.unwrap());
    w.registry
        .open_in(
            "connector",
            "default",
            hands::session::Origin {
                connector: hands::session::Connector::ClaudeManagedAgents,
                session: "sesn_connector".into(),
            },
            Vec::new(),
            None,
        )
        .await
        .unwrap();

    let all = w.list().await;
    let ids: Vec<&str> = all.iter().map(|s| s.session_id.as_str()).collect();
    assert_eq!(ids, ["first", "second", "connector"], "oldest first");
    let first = &all[0];
    assert_eq!(first.environment, "default");
    assert_eq!((first.calls, first.running_calls), (2, 0));
    assert!(first.idle_ms <= first.age_ms, "{first:?}");
    assert!(first.opened_at_unix_ms > 0, "{first:?}");
    assert_eq!(first.idle_timeout_ms, 1_800_000);
    assert_eq!((all[1].calls, all[1].idle_timeout_ms), (0, 1_800_000));
    assert_eq!(
        all[2].idle_timeout_ms, 0,
        "a connector's session: {:?}",
        all[2]
    );

    let listed = all[0].session_id.clone();
    assert!(w.close(&listed).await);
    let ids: Vec<String> = w.list().await.into_iter().map(|s| s.session_id).collect();
    assert_eq!(ids, ["second", "connector"]);
    let e = w.call(&listed, "c3", "echo again").await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::NotFound, "SESSION_NOT_FOUND".into())
    );
    assert!(
        !e.message().contains("idle"),
        "closed by its client: {}",
        e.message()
    );
    w.stop().await;
}

/// The capacity scenario of the issue: a worker with room for two sessions,
/// both taken by clients (busy, so a third is refused `AT_CAPACITY`), who then
/// go away without closing. The idle timeout closes both (logged), a new
/// session opens, and a client that comes back to an abandoned session is told
/// it was closed for idleness.
#[tokio::test(flavor = "multi_thread")]
async fn abandoned_sessions_are_closed_after_the_idle_timeout_and_free_their_slots() {
    require_sandbox!();
    let mut w = Worker::start("capacity = 2", "[sessions]\nidle_timeout_secs = 1").await;
    let info = w
        .client
        .info(v1::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.session_idle_timeout_ms, 1000);
    for s in ["a", "b"] {
        assert!(w.open(s).await.unwrap());
        w.start_and_leave(s, "long", "sleep 600").await;
    }
    let e = w.open("c").await.unwrap_err();
    assert_eq!(reason(&e), "AT_CAPACITY", "{e:?}");
    // The clients end their calls and go away.
    for s in ["a", "b"] {
        w.cancel_and_wait(s, "long").await;
    }

    // Each abandoned session is closed once it has been idle for the timeout,
    // counted from its own cancel: the two slots free one after the other.
    for id in ["c", "d"] {
        let c = w.client.clone();
        until(&format!("new session {id} opens"), || {
            let mut c = c.clone();
            async move {
                match c
                    .open_session(v1::OpenSessionRequest {
                        session_id: id.into(),
                        environment: "default".into(),
                    })
                    .await
                {
                    Ok(_) => true,
                    Err(e) if reason(&e) == "AT_CAPACITY" => false,
                    Err(e) => panic!("{e:?}"),
                }
            }
        })
        .await;
    }
    let ids: Vec<String> = w.list().await.into_iter().map(|s| s.session_id).collect();
    assert_eq!(ids, ["c", "d"]);

    let e = w.call("a", "again", "echo back").await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::NotFound, "SESSION_NOT_FOUND".into())
    );
    assert!(
        e.message().contains("closed it after") && e.message().contains("idle"),
        "{}",
        e.message()
    );
    // Opened again, the id is a new session, and closing it is an ordinary
    // close.
    for id in ["c", "d"] {
        w.close(id).await;
    }
    assert!(w.open("a").await.unwrap());
    w.close("a").await;
    let e = w.call("a", "again2", "echo back").await.unwrap_err();
    assert!(!e.message().contains("idle"), "{}", e.message());
    w.stop().await;
}

/// A call that runs far longer than the idle timeout, with no client watching
/// it, keeps its session: the sweep that closes an abandoned session beside it
/// (so sweeps run) leaves it open, listed as running and not idle. Once the
/// call ends, its end counts as use, and the session is closed only after the
/// timeout from then.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_with_a_running_call_is_never_closed_for_idleness() {
    require_sandbox!();
    let mut w = Worker::start("", "[sessions]\nidle_timeout_secs = 1").await;
    assert!(w.open("busy").await.unwrap());
    assert!(w.open("abandoned").await.unwrap());
    w.start_and_leave("busy", "long", "sleep 600").await;

    // Sweeps run: the abandoned session goes. The busy one stays, until it
    // has been open several timeouts (it would have been closed a second
    // after its call started).
    let c = w.client.clone();
    until("the abandoned session is closed", || {
        let c = c.clone();
        async move { !listed_ids(c).await.iter().any(|id| id == "abandoned") }
    })
    .await;
    loop {
        let s = w.listed("busy").await.expect("the busy session is open");
        assert_eq!((s.running_calls, s.idle_ms), (1, 0), "{s:?}");
        if s.age_ms >= 4000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    w.cancel_and_wait("busy", "long").await;
    // A cancelled bash call leaves the shell to restart.
    let restart = v1::CallRequest {
        input_json: r#"{"restart": true}"#.into(),
        ..req("busy", "restart", "")
    };
    let r = result(&w.send(restart).await.expect("call accepted"));
    assert!(!r.is_error, "{}", r.text_content());
    assert_eq!(
        w.bash("busy", "after", "echo still open").await,
        "still open"
    );
    let s = w.listed("busy").await.expect("open after its call");
    assert_eq!((s.running_calls, s.calls), (0, 3), "{s:?}");

    // Idle now, it is closed like any other.
    until("the session, idle, is closed", || {
        let c = c.clone();
        async move { listed_ids(c).await.is_empty() }
    })
    .await;
    let e = w.call("busy", "late", "true").await.unwrap_err();
    assert_eq!(reason(&e), "SESSION_NOT_FOUND");
    assert!(e.message().contains("idle"), "{}", e.message());
    w.stop().await;
}

/// Sessions of a connector of the worker (Claude Managed Agents) are that
/// connector's to end: the idle timeout leaves them open, however long idle,
/// while it closes a client's session that has been idle for less time.
#[tokio::test(flavor = "multi_thread")]
async fn a_connectors_sessions_are_not_closed_for_idleness() {
    require_sandbox!();
    let mut w = Worker::start("", "[sessions]\nidle_timeout_secs = 1").await;
    // The connector's session first: idle longer than the client's.
    let (connector, _) = w
        .registry
        .open_in(
            "cma-session",
            "default",
            hands::session::Origin {
                connector: hands::session::Connector::ClaudeManagedAgents,
                session: "sesn_cma-session".into(),
            },
            Vec::new(),
            None,
        )
        .await
        .unwrap();
    assert!(w.open("client").await.unwrap());
    let views = w.registry.list();
    assert_eq!(
        views
            .iter()
            .map(|v| (v.id.as_str(), v.owner))
            .collect::<Vec<_>>(),
        [("cma-session", Owner::Connector), ("client", Owner::Client)]
    );
    let c = w.client.clone();
    until("the client's session is closed", || {
        let c = c.clone();
        async move { !listed_ids(c).await.iter().any(|id| id == "client") }
    })
    .await;
    let s = w
        .listed("cma-session")
        .await
        .expect("the connector's session is open");
    assert_eq!(s.idle_timeout_ms, 0);
    assert!(s.idle_ms >= 1000, "idle past the timeout: {s:?}");
    let r = connector
        .call("bash", &serde_json::json!({"command": "echo mine"}))
        .await;
    assert_eq!(r.text_content().trim_end(), "mine");
    assert!(w.registry.close("cma-session"));
    w.stop().await;
}

/// A restart already waiting for the shell when the call before it is
/// cancelled (a client sends its restart right behind its cancel) runs after
/// the cancelled call's kill, never before: its fresh shell is not killed.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_waiting_behind_a_cancelled_call_is_not_overtaken_by_its_kill() {
    require_sandbox!();
    use hands::session::call::{finished, CallSpec};
    let s = crate::util::open(None).await;
    for round in 0..5 {
        let long = s
            .submit(CallSpec::new(
                format!("long-{round}"),
                "bash",
                r#"{"command": "sleep 600"}"#,
            ))
            .unwrap()
            .record;
        // The restart waits for the shell the long call holds.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let restart = s
            .submit(CallSpec::new(
                format!("restart-{round}"),
                "bash",
                r#"{"restart": true}"#,
            ))
            .unwrap()
            .record;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(long.cancel(), "the long call was running");
        let (r, _) = finished(&restart).await.unwrap();
        assert!(!r.is_error, "round {round}: {}", r.text_content());
        let (r, _) = finished(&long).await.unwrap();
        assert!(r.is_error, "round {round}: the long call was cancelled");
        let next = crate::util::sh(&s, "echo alive").await;
        assert_eq!(next.trim(), "alive", "round {round}");
    }
    crate::util::close_and_drain(s).await;
}

/// A shell that exits makes the helper kill what it left behind. When a
/// restart kills a live shell, that exit's kill must be over before the fresh
/// shell exists, or it lands on the fresh shell (seen as "restart required"
/// right after a successful restart).
#[tokio::test]
async fn a_restart_of_a_live_shell_keeps_its_fresh_shell() {
    require_sandbox!();
    let s = crate::util::open(None).await;
    for round in 0..100 {
        let r = crate::util::sh(&s, "sleep 0.001 & echo up").await;
        assert_eq!(r.trim(), "up", "round {round}");
        let r = crate::util::tool(&s, "bash", serde_json::json!({"restart": true})).await;
        assert!(!r.is_error, "round {round}: {}", r.text_content());
        let next = crate::util::sh(&s, "echo alive").await;
        assert_eq!(next.trim(), "alive", "round {round}");
    }
    crate::util::close_and_drain(s).await;
}

/// Frames to the helper are written by their callers when the channel is
/// free and by the writer task otherwise (a frame too large for one send, or
/// one queued behind it). Large writes racing small reads, and calls dropped
/// midway, must leave every frame whole and in order.
#[tokio::test]
async fn large_and_small_calls_racing_on_the_helper_channel_keep_their_frames_whole() {
    require_sandbox!();
    use hands::session::call::{finished, CallSpec};
    let s = crate::util::open(None).await;
    crate::util::tool(
        &s,
        "write",
        serde_json::json!({"file_path": "small.txt", "content": "small\n"}),
    )
    .await;
    let big: String = "0123456789abcdef".repeat(512 * 1024); // 8 MiB
    let mut calls = Vec::new();
    for round in 0..4 {
        let input = serde_json::json!({"file_path": format!("big{round}.txt"), "content": big});
        calls.push((
            "big",
            s.submit(CallSpec::new(
                format!("big-{round}"),
                "write",
                input.to_string(),
            ))
            .unwrap()
            .record,
        ));
        for i in 0..50 {
            calls.push((
                "small",
                s.submit(CallSpec::new(
                    format!("small-{round}-{i}"),
                    "read",
                    r#"{"file_path": "small.txt"}"#,
                ))
                .unwrap()
                .record,
            ));
        }
        // A read given up at once: its cancel frame races the others.
        let dropped = crate::util::tool(&s, "read", serde_json::json!({"file_path": "small.txt"}));
        drop(tokio::time::timeout(Duration::from_micros(1), dropped).await);
    }
    for (kind, rec) in calls {
        let (r, _) = finished(&rec).await.unwrap();
        assert!(!r.is_error, "{kind}: {}", r.text_content());
        if kind == "small" {
            assert!(r.text_content().contains("small"), "{}", r.text_content());
        }
    }
    for round in 0..4 {
        let n = crate::util::sh(&s, &format!("wc -c < big{round}.txt")).await;
        assert_eq!(n.trim(), (8 * 1024 * 1024).to_string());
    }
    crate::util::close_and_drain(s).await;
}

/// A session that keeps forking (a loop of background sleeps, up to its pids
/// limit) when it is restarted: the restart kills every one of them, waits
/// for their exits to be dealt with, and its fresh shell is the only process
/// left and serves.
#[tokio::test]
async fn attack_a_fork_loop_cannot_keep_a_restart_from_its_fresh_shell() {
    require_sandbox!();
    let s = crate::util::open(None).await;
    for round in 0..3 {
        crate::util::sh(
            &s,
            "( while :; do sleep 600 & done ) >/dev/null 2>&1 & sleep 0.3; echo started",
        )
        .await;
        let r = crate::util::tool(&s, "bash", serde_json::json!({"restart": true})).await;
        assert!(!r.is_error, "round {round}: {}", r.text_content());
        let ps = crate::util::sh(&s, "ls /proc | grep -c '^[0-9]'").await;
        // The helper, the shell, and the shell's own subshell for this command
        // and its `ls` and `grep`: nothing of the loop survives.
        let n: usize = ps.trim().parse().unwrap();
        assert!(n <= 5, "round {round}: {n} processes left");
    }
    crate::util::close_and_drain(s).await;
}

/// The `key:` counter of a thread's `/proc/.../status` text.
fn status_count(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {status}"))
}

/// Context switches of every thread of process `pid` so far (a thread that
/// ended meanwhile counts for nothing).
fn context_switches(pid: i32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("status")).ok())
        .map(|st| {
            status_count(&st, "voluntary_ctxt_switches")
                + status_count(&st, "nonvoluntary_ctxt_switches")
        })
        .sum()
}

/// Voluntary context switches of thread `tid` of process `pid` so far: how often
/// it went to sleep.
fn sleeps(pid: i32, tid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    status_count(&status, "voluntary_ctxt_switches")
}

/// A session that has written `a.txt` (its helper has served a file call).
async fn session_with_a_file() -> Arc<hands::session::Session> {
    let s = crate::util::open(None).await;
    let r = s
        .call(
            "write",
            &serde_json::json!({"file_path": "a.txt", "content": "a\n"}),
        )
        .await;
    assert!(!r.is_error, "{r:?}");
    s
}

/// An idle session costs the host nothing: with no process of its own, every
/// thread of its helper sleeps until the next call. (The reaper used to wake
/// five times a second to look for children it could not have: for a worker
/// holding its full capacity of idle sessions, hundreds of wakeups a second.)
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_session_helper_sleeps_until_its_next_call() {
    require_sandbox!();
    // It has served a file call, and a process that has ended.
    let s = session_with_a_file().await;
    let null = || std::os::fd::OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    let status = s
        .exec(
            "idle-1",
            vec!["/bin/true".into()],
            [null(), null(), null()],
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, Some(0));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = context_switches(s.helper_pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let woke = context_switches(s.helper_pid()) - before;
    assert!(woke <= 1, "the idle helper woke {woke} times in 2 s");
    // And it still answers.
    let r = s
        .call("read", &serde_json::json!({"file_path": "a.txt"}))
        .await;
    assert!(!r.is_error, "{r:?}");
    crate::util::close_and_drain(s).await;
}

/// The helper's reading thread (its main thread) sleeps once per file call:
/// requests and answers travel on two sockets, so the worker reading an answer
/// (which frees room on the answer's socket) does not wake the thread waiting
/// for the next request. On one socket it woke for nothing after every call.
#[tokio::test(flavor = "multi_thread")]
async fn the_helper_sleeps_once_per_file_call() {
    require_sandbox!();
    let s = session_with_a_file().await;
    let helper = s.helper_pid();
    let calls = 200;
    let before = sleeps(helper, helper);
    for _ in 0..calls {
        let r = s
            .call("read", &serde_json::json!({"file_path": "a.txt"}))
            .await;
        assert!(!r.is_error, "{r:?}");
    }
    let slept = sleeps(helper, helper) - before;
    assert!(
        slept <= calls + calls / 10,
        "the helper's reading thread slept {slept} times for {calls} calls"
    );
    crate::util::close_and_drain(s).await;
}
