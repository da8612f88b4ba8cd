//! The contract's fault checklist (§11), one named test per scenario
//! (`checklist_<n>_…`): hands' behaviour on poll, ack, heartbeat, stop, stream
//! and send failures, on lease loss, on permissions, threads, idles and
//! timeouts, stated where it deliberately differs from the SDK worker.

use std::time::Duration;

use serde_json::json;

use super::skills::archives;
use super::{bash_use, end_turn, needs_fake, processes, requests, store, text_of, until, Served};

#[tokio::test(flavor = "multi_thread")]
async fn checklist_4_a_healthcheck_item_is_acked_and_force_stopped_without_heartbeat() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let w = s
        .fake
        .control(
            "POST",
            &format!("/_fake/environments/{}/work", s.env["id"].as_str().unwrap()),
            Some(json!({"data": {"type": "healthcheck"}})),
        )
        .await;
    let w = s.work_state(w["id"].as_str().unwrap(), "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(w["acks"].as_array().unwrap().len(), 1);
    assert!(w["heartbeats"].as_array().unwrap().is_empty());
    assert_eq!(w["stops"][0]["force"], true);
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_2_and_5_poll_and_ack_failures_are_survived() {
    needs_fake!();
    // Two failed polls (each with the client's own retries) and one failed
    // ack (the item is offered again after the reclaim delay).
    let s = Served::start(
        1,
        &[
            json!({"endpoint": "E1", "status": 503, "times": 6}),
            json!({"endpoint": "E2", "status": 500, "times": 3}),
        ],
    )
    .await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_1", "echo survived")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    let r = s.results(&sid, 1).await;
    assert_eq!(text_of(&r[0]), "survived");
    let w = s.work_state(&work, "active").await;
    assert!(
        w["offers"].as_array().unwrap().len() >= 2 && w["reclaims"].as_u64() >= Some(1),
        "the un-acked item was offered again: {w}"
    );
    let polls = s
        .fake
        .control("GET", "/_fake/requests?endpoint=E1", None)
        .await;
    let failed = polls["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == 503)
        .count();
    assert_eq!(failed, 6, "two polls, each with the client's two retries");
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_3_a_refused_environment_key_stops_the_connector() {
    needs_fake!();
    let s = Served::start(
        1,
        &[json!({"endpoint": "E1", "status": 401, "times": null})],
    )
    .await;
    let r = tokio::time::timeout(Duration::from_secs(15), s.connector)
        .await
        .expect("the connector gives up on 401")
        .unwrap();
    let e = r.expect_err("a refused key is an error").to_string();
    assert!(e.contains("401"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_8_a_terminated_session_is_force_stopped_without_events_calls() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let c = s
        .fake
        .control(
            "POST",
            "/_fake/sessions",
            Some(json!({"environment_id": s.env["id"], "status": "terminated", "work": {"ttl_seconds": 4}})),
        )
        .await;
    let work = c["work"]["id"].as_str().unwrap().to_string();
    let sid = c["session"]["id"].as_str().unwrap().to_string();
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["stops"][0]["force"], true);
    let reqs = s
        .fake
        .control("GET", &format!("/_fake/requests?session_id={sid}"), None)
        .await;
    let endpoints: Vec<&str> = reqs["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["endpoint"].as_str())
        .collect();
    assert!(
        !endpoints.iter().any(|e| ["E6", "E7", "E8"].contains(e)),
        "{endpoints:?}"
    );
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_16_after_a_412_the_call_in_flight_is_killed_and_nothing_is_posted() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, work) = s
        .session(
            json!([bash_use(
                "toolu_long",
                "echo started > mark; sleep 31.7; echo done"
            )]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.work_state(&work, "active").await;
    // The call has started: its mark is in the session's workspace on the host,
    // and its sleep is running.
    let mark = s
        .registry
        .sandbox()
        .state_dir
        .join("workspaces")
        .join(format!("kept-{sid}"))
        .join("mark");
    let running = || processes(&["sleep", "31.7"]) > 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !(mark.exists() && running()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the call never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another worker takes the lease: the next heartbeat is a 412.
    s.fake
        .control(
            "POST",
            &format!("/_fake/work/{work}/steal"),
            Some(json!({})),
        )
        .await;
    // hands gives up the item: no stop, no result (the SDK worker would
    // still post the result 30 s later), and the call's process is killed.
    s.gave_up(&sid, &work).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while running() {
        assert!(
            std::time::Instant::now() < deadline,
            "the call in flight was not killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let registry = s.registry.clone();
    s.finish().await.unwrap();
    // The worker's metrics name why the item ended.
    assert_eq!(
        super::metric(
            &registry,
            "hands_worker_cma_items_total{reason=\"lease_lost\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_29_a_refused_result_is_re_posted_after_reconnect_never_re_run() {
    needs_fake!();
    // The first result post is refused (400, fatal); the stream then drops,
    // and the reconcile finds the call unanswered.
    let s = Served::start(1, &[json!({"endpoint": "E8", "status": 400, "times": 1})]).await;
    let (sid, _work) = s
        .session(
            json!([bash_use(
                "toolu_once",
                "echo x >> runs.log; wc -l < runs.log"
            )]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    // Wait for the refused post, then drop the stream.
    s.fake
        .await_requests(
            &format!("session_id={sid}&endpoint=E8&completed=1"),
            1,
            "the refused result post",
        )
        .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/sessions/{sid}/streams/close"),
            Some(json!({"mode": "clean"})),
        )
        .await;
    let r = s.results(&sid, 1).await;
    assert_eq!(r.len(), 1);
    assert_eq!(text_of(&r[0]), "1", "the stored result, from the only run");
    // The command ran once: a second run would have made it 2.
    s.append(&sid, json!([bash_use("toolu_count", "wc -l < runs.log")]))
        .await;
    let r = s.results(&sid, 2).await;
    let count = r
        .iter()
        .find(|e| e["tool_use_id"] == "toolu_count")
        .unwrap();
    assert_eq!(text_of(count), "1");
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_25_and_26_stream_loss_reconnects_and_missed_calls_run() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, _work) = s
        .session(
            json!([bash_use("toolu_1", "echo one")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.results(&sid, 1).await;
    // An error frame, then a call appended to history only while the worker
    // is reconnecting: the re-list finds it.
    s.fake
        .control(
            "POST",
            &format!("/_fake/sessions/{sid}/streams/close"),
            Some(json!({"mode": "error"})),
        )
        .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/sessions/{sid}/events"),
            Some(json!({"events": [bash_use("toolu_2", "echo two")], "broadcast": false})),
        )
        .await;
    let r = s.results(&sid, 2).await;
    assert!(
        r.iter()
            .any(|e| e["tool_use_id"] == "toolu_2" && text_of(e) == "two"),
        "{r:?}"
    );
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_33_ask_waits_for_a_confirmation_deny_never_runs() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let ask = |id: &str, cmd: &str, perm: &str| json!({"type": "agent.tool_use", "id": id, "name": "bash", "input": {"command": cmd}, "evaluated_permission": perm});
    // After the two, a call that needs no verdict: calls run one at a time in
    // arrival order, so once its result is posted, the asked and the denied
    // call would have run (and been posted) already if they were going to.
    let (sid, _work) = s
        .session(
            json!([
                ask("toolu_ask", "echo asked", "ask"),
                ask("toolu_deny", "touch denied-ran", "deny"),
                bash_use("toolu_probe", "echo probe"),
            ]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    let r = s.results(&sid, 1).await;
    assert_eq!(
        r.iter()
            .map(|e| e["tool_use_id"].clone())
            .collect::<Vec<_>>(),
        ["toolu_probe"],
        "ran before the verdict: {r:?}"
    );
    s.append(
        &sid,
        json!([{"type": "user.tool_confirmation", "tool_use_id": "toolu_ask", "result": "allow"}]),
    )
    .await;
    let r = s.results(&sid, 2).await;
    let asked = r.iter().find(|e| e["tool_use_id"] == "toolu_ask").unwrap();
    assert_eq!(text_of(asked), "asked");
    s.append(
        &sid,
        json!([bash_use("toolu_check", "ls denied-ran 2>&1 || true")]),
    )
    .await;
    let r = s.results(&sid, 3).await;
    let check = r
        .iter()
        .find(|e| e["tool_use_id"] == "toolu_check")
        .unwrap();
    assert!(
        text_of(check).contains("No such file"),
        "the denied call ran: {check}"
    );
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_17_a_rejected_heartbeat_ends_the_item_with_a_force_stop() {
    needs_fake!();
    // Heartbeats after the first are refused (403).
    let s = Served::start(
        1,
        &[json!({"endpoint": "E3", "status": 403, "skip": 1, "times": null})],
    )
    .await;
    let (_sid, work) = s
        .session(
            json!([bash_use("toolu_1", "sleep 1; echo ok")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(w["stops"][0]["force"], true);
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_20_and_29_a_stop_answered_409_is_tolerated_and_a_503_on_send_is_retried() {
    needs_fake!();
    let s = Served::start(
        1,
        &[
            json!({"endpoint": "E8", "status": 503, "times": 4}),
            json!({"endpoint": "E4", "status": 409, "times": null}),
        ],
    )
    .await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_1", "echo posted at last")]),
            json!({"ttl_seconds": 30}),
        )
        .await;
    let r = s.results(&sid, 1).await;
    assert_eq!(text_of(&r[0]), "posted at last");
    let posts = s
        .fake
        .control(
            "GET",
            &format!("/_fake/requests?session_id={sid}&endpoint=E8"),
            None,
        )
        .await;
    assert_eq!(
        posts["requests"].as_array().unwrap().len(),
        5,
        "4 refusals, then the post"
    );
    // The client's own retries absorb some refusals; the runner posted again
    // after each that reached it.
    assert!(s.metric("hands_worker_cma_result_post_retries_total") >= 1.0);
    s.append(&sid, json!([end_turn()])).await;
    // The stop keeps answering 409: the client's three attempts, then silence.
    let reqs = s
        .fake
        .await_requests(
            &format!("work_id={work}&endpoint=E4&completed=1"),
            3,
            "the client's three stop attempts",
        )
        .await;
    assert_eq!(reqs.len(), 3);
    // With one slot, the worker polls again only once the item's handler has
    // returned: after that poll no stop of this item can follow.
    let last = reqs[2]["seq"].as_u64().unwrap();
    s.fake
        .await_requests(
            &format!("endpoint=E1&since={last}"),
            1,
            "a poll after the item's last stop attempt",
        )
        .await;
    let again = s
        .fake
        .control(
            "GET",
            &format!("/_fake/requests?work_id={work}&endpoint=E4"),
            None,
        )
        .await;
    assert_eq!(
        again["requests"].as_array().unwrap().len(),
        3,
        "no retries beyond the client's"
    );
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_34_calls_of_a_terminated_thread_are_neither_run_nor_answered() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, _work) = s
        .session(
            json!([bash_use("toolu_1", "echo primary")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.results(&sid, 1).await;
    let mut in_thread = bash_use("toolu_t", "touch thread-ran");
    in_thread["session_thread_id"] = json!("sthr_1");
    s.append(
        &sid,
        json!([{"type": "session.thread_status_terminated", "session_thread_id": "sthr_1"}, in_thread]),
    )
    .await;
    s.append(
        &sid,
        json!([bash_use("toolu_check", "ls thread-ran 2>&1 || true")]),
    )
    .await;
    let r = s.results(&sid, 2).await;
    assert!(!r.iter().any(|e| e["tool_use_id"] == "toolu_t"), "{r:?}");
    let check = r
        .iter()
        .find(|e| e["tool_use_id"] == "toolu_check")
        .unwrap();
    assert!(text_of(check).contains("No such file"), "{check}");
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checklist_37_shutting_down_mid_session_tears_down_and_force_stops() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_1", "echo one")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.results(&sid, 1).await;
    // A duration no other test uses: its processes are found in /proc.
    let secs = format!("60.{}", std::process::id());
    s.append(
        &sid,
        json!([bash_use("toolu_2", &format!("sleep {secs} & sleep {secs}"))]),
    )
    .await;
    until("both of the call's processes running", || async {
        processes(&["sleep", &secs]) == 2
    })
    .await;
    // SIGTERM, in effect: the item drains, and once the grace (2 s here) is
    // over with the call still running, it is torn down (its processes
    // killed with its sandbox session) and force-stopped.
    s.stop.send_replace(true);
    let w = s
        .fake
        .control(
            "GET",
            &format!("/_fake/work/{work}?wait_state=stopped&timeout_ms=15000"),
            None,
        )
        .await;
    assert_eq!(w["stops"][0]["force"], true, "{w}");
    s.finish().await.unwrap();
    until("the call's processes killed", || async {
        processes(&["sleep", &secs]) == 0
    })
    .await;
}

/// Issue 15: the worker's stop drains an item: no further call is taken,
/// the call in flight finishes within the grace and its result is posted
/// (the lease still heartbeated), then teardown and force-stop, as for a
/// graceful stop asked by the server (#15).
#[tokio::test(flavor = "multi_thread")]
async fn checklist_37_a_draining_worker_posts_the_call_in_flight_then_force_stops() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_1", "sleep 1; echo finished")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.work_state(&work, "active").await;
    s.running("toolu_1").await;
    s.stop.send_replace(true);
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(text_of(&s.results(&sid, 1).await[0]), "finished");
    let stop = w["stops"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(stop["force"], true, "{w}");
    s.finish().await.unwrap();
}

/// §11 #9: the session fetch fails (500 past the client's retries) → the
/// item fails and is force-stopped; polling goes on and the next item is
/// served.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_9_a_failed_session_fetch_fails_only_that_item() {
    needs_fake!();
    let s = Served::start(1, &[json!({"endpoint": "E5", "status": 500, "times": 3})]).await;
    let (_, first) = s.session(json!([]), json!({"ttl_seconds": 4})).await;
    let w = s.work_state(&first, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(w["stops"][0]["force"], true);
    let (sid, _) = s
        .session(
            json!([bash_use("toolu_1", "echo next")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    assert_eq!(text_of(&s.results(&sid, 1).await[0]), "next");
    s.finish().await.unwrap();
}

/// §11 #10: memory stores on an item without a sessions token: the memory
/// endpoints refuse the environment key, so the item fails at once and is
/// force-stopped; no event is read.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_10_memory_stores_without_a_sessions_token_fail_the_item() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let m = store(&s, json!([])).await;
    let (sid, work) = s
        .session_spec(json!({
            "resources": [{"type": "memory_store", "memory_store_id": m, "mount_path": "/mnt/memory/m"}],
            "events": [bash_use("toolu_1", "echo must not run")],
            "work": {"ttl_seconds": 4, "secret": false},
        }))
        .await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(w["stops"][0]["force"], true);
    let reqs = s
        .fake
        .control("GET", &format!("/_fake/requests?session_id={sid}"), None)
        .await;
    let reqs = &reqs["requests"];
    assert!(
        !reqs
            .as_array()
            .unwrap()
            .iter()
            .any(|r| matches!(r["endpoint"].as_str(), Some("E6" | "E7" | "E8" | "E11"))),
        "{reqs}"
    );
    s.finish().await.unwrap();
}

/// §11 #27: the event stream answers 401 → the runner ends, teardown,
/// force-stop.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_27_a_refused_stream_ends_the_item() {
    needs_fake!();
    let s = Served::start(
        1,
        &[json!({"endpoint": "E6", "status": 401, "times": null})],
    )
    .await;
    let (_, work) = s.session(json!([]), json!({"ttl_seconds": 4})).await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(w["stops"][0]["force"], true);
    s.finish().await.unwrap();
}

/// §11 #18/#19: heartbeats that never answer. Past the TTL the lease is
/// assumed lost: hands abandons the call in flight (its processes die with
/// the sandbox), posts nothing and does not stop the item. (The SDK worker
/// lets the call finish and posts its result.)
#[tokio::test(flavor = "multi_thread")]
async fn checklist_19_blackholed_heartbeats_end_in_an_assumed_loss() {
    needs_fake!();
    let s = Served::start(
        1,
        &[json!({"endpoint": "E3", "action": "hang", "skip": 1, "times": null, "delay_ms": 60000})],
    )
    .await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_long", "sleep 30; echo done")]),
            json!({"ttl_seconds": 4, "on_lease_expiry": "ignore"}),
        )
        .await;
    s.work_state(&work, "active").await;
    s.running("toolu_long").await;
    s.gave_up(&sid, &work).await;
    s.finish().await.unwrap();
}

/// §11 #1: an empty poll is answered `null`; the next poll follows after
/// U[1,3) s with the same `Anthropic-Worker-ID` and `block_ms=999`.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_1_empty_polls_repeat_with_the_same_worker_id() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let polls = requests(&s, "endpoint=E1&wait_count=3&timeout_ms=20000").await;
    assert!(polls.len() >= 3, "{polls:?}");
    for p in &polls[..3] {
        assert_eq!(p["headers"]["anthropic-worker-id"], "it-worker");
        assert_eq!(p["raw_query"], "block_ms=999");
        assert_eq!(p["credential"]["kind"], "environment_key");
    }
    for w in polls[..3].windows(2) {
        let gap = w[1]["t"].as_f64().unwrap() - w[0]["t_done"].as_f64().unwrap();
        assert!(gap >= 0.95, "polled again after {gap:.2} s, not U[1,3)");
    }
    s.finish().await.unwrap();
}

/// §11 #6: an ack refused with 404 → the item is force-stopped with the
/// environment key, and polling goes on.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_6_a_refused_ack_force_stops_with_the_environment_key() {
    needs_fake!();
    let s = Served::start(1, &[json!({"endpoint": "E2", "status": 404, "times": 1})]).await;
    let (_, first) = s.session(json!([]), json!({"ttl_seconds": 4})).await;
    let stops = s
        .fake
        .await_requests(
            &format!("endpoint=E4&work_id={first}"),
            1,
            "the force-stop of the refused item",
        )
        .await;
    assert_eq!(
        stops[0]["credential"]["kind"], "environment_key",
        "{stops:?}"
    );
    assert_eq!(stops[0]["body"]["force"], true);
    let (sid, _) = s
        .session(
            json!([bash_use("toolu_1", "echo next")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    assert_eq!(text_of(&s.results(&sid, 1).await[0]), "next");
    s.finish().await.unwrap();
}

/// §11 #7: without a secret, or with one that does not decode, every call of
/// the item uses the environment key (and the item is still served).
#[tokio::test(flavor = "multi_thread")]
async fn checklist_7_items_without_a_usable_secret_use_the_environment_key() {
    needs_fake!();
    let s = Served::start(2, &[]).await;
    for (n, secret) in [json!(false), json!("not*base64!")].into_iter().enumerate() {
        let (sid, work) = s
            .session(
                json!([bash_use(&format!("toolu_{n}"), "echo served")]),
                json!({"ttl_seconds": 4, "secret": secret}),
            )
            .await;
        assert_eq!(text_of(&s.results(&sid, 1).await[0]), "served");
        for r in requests(&s, &format!("work_id={work}"))
            .await
            .iter()
            .chain(requests(&s, &format!("session_id={sid}")).await.iter())
        {
            assert_eq!(
                r["credential"]["kind"], "environment_key",
                "{} {}",
                r["endpoint"], r["path"]
            );
        }
    }
    s.finish().await.unwrap();
}

/// §11 #12: a skill download slower than the TTL: heartbeats go on
/// meanwhile, and the session is then served.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_12_heartbeats_continue_through_a_slow_skill_download() {
    needs_fake!();
    let a = archives();
    let s = Served::start(
        1,
        &[json!({"endpoint": "E10", "action": "delay", "delay_ms": 6000})],
    )
    .await;
    s.fake
        .control("POST", "/_fake/skills", Some(json!({"skill_id": "skill_slow", "versions": [{"name": "slow", "archive_b64": a["flat"]}]})))
        .await;
    let (sid, work) = s
        .session_spec(json!({
            "skills": [{"type": "custom", "skill_id": "skill_slow", "version": "latest"}],
            "events": [bash_use("toolu_1", "cat skills/slow/SKILL.md")],
            "work": {"ttl_seconds": 4},
        }))
        .await;
    assert_eq!(text_of(&s.results(&sid, 1).await[0]), "flat");
    let download = &requests(&s, "endpoint=E10").await[0];
    let (from, to) = (
        download["t"].as_f64().unwrap(),
        download["t_done"].as_f64().unwrap(),
    );
    let beats = requests(&s, &format!("endpoint=E3&work_id={work}")).await;
    let during = beats
        .iter()
        .filter(|b| (from..to).contains(&b["t"].as_f64().unwrap()))
        .count();
    assert!(
        during >= 2,
        "{during} heartbeats during a {:.1} s download",
        to - from
    );
    s.finish().await.unwrap();
}

/// §11 #15: the server asks for a graceful stop (the heartbeat reports
/// `stopping`): the call in flight finishes and its result is posted, then
/// teardown and force-stop.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_15_a_stopping_heartbeat_lets_the_call_finish_then_force_stops() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_1", "sleep 3; echo finished")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.work_state(&work, "active").await;
    s.running("toolu_1").await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/work/{work}/stop"),
            Some(json!({"force": false})),
        )
        .await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(text_of(&s.results(&sid, 1).await[0]), "finished");
    let stop = w["stops"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(stop["force"], true, "{w}");
    s.finish().await.unwrap();
}

/// §11 #28: the history listing fails: live calls still run; the history's
/// call runs after the next reconnect re-lists.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_28_a_failed_history_listing_does_not_stop_live_calls() {
    needs_fake!();
    let s = Served::start(1, &[json!({"endpoint": "E7", "status": 500, "times": 3})]).await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_hist", "echo from history")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.work_state(&work, "active").await;
    s.fake
        .await_requests(
            &format!("endpoint=E7&session_id={sid}&completed=1"),
            3,
            "the three failed history listings",
        )
        .await;
    let (live, _) = s.call(&sid, bash_use("toolu_live", "echo live")).await;
    assert_eq!(live, "live");
    let log = s
        .fake
        .control("GET", &format!("/_fake/sessions/{sid}"), None)
        .await;
    assert!(
        !log["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["tool_use_id"] == "toolu_hist"),
        "the history was read although its listing failed"
    );
    s.fake
        .control(
            "POST",
            &format!("/_fake/sessions/{sid}/streams/close"),
            Some(json!({"mode": "clean"})),
        )
        .await;
    let r = s.results(&sid, 2).await;
    assert!(
        r.iter()
            .any(|e| e["tool_use_id"] == "toolu_hist" && text_of(e) == "from history"),
        "{r:?}"
    );
    s.finish().await.unwrap();
}

/// §11 #30: a `requires_action` idle never ends the item; an event after an
/// `end_turn` idle cancels the countdown; the next `end_turn` ends it.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_30_only_an_undisturbed_end_turn_idle_ends_the_item() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, work) = s.session(json!([]), json!({"ttl_seconds": 4})).await;
    s.work_state(&work, "active").await;
    s.fake.stream_open(&sid).await;
    s.append(&sid, json!([{"type": "session.status_idle", "stop_reason": {"type": "requires_action", "event_ids": []}}]))
        .await;
    s.append(
        &sid,
        json!([end_turn(), {"type": "session.status_running"}]),
    )
    .await;
    // The scenario: max_idle (2 s) passes twice over, and the item must still
    // be there. There is nothing to wait for instead: ending is what must not
    // happen.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let w = s
        .fake
        .control("GET", &format!("/_fake/work/{work}"), None)
        .await;
    assert_eq!(
        w["state"], "active",
        "ended without an undisturbed end_turn: {w}"
    );
    s.append(&sid, json!([end_turn()])).await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    s.finish().await.unwrap();
}

/// §11 #32: a live `session.status_terminated` ends the item at once.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_32_a_live_termination_ends_the_item() {
    needs_fake!();
    let s = Served::start_with(1, &[], |c| c.max_idle = None, Vec::new()).await;
    let (sid, work) = s.session(json!([]), json!({"ttl_seconds": 4})).await;
    s.work_state(&work, "active").await;
    s.fake.stream_open(&sid).await;
    s.append(&sid, json!([{"type": "session.status_terminated"}]))
        .await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(w["stops"][0]["force"], true);
    s.finish().await.unwrap();
}

/// A policy like `default` with short timeouts: bash's own 1 s, the runner's
/// cut-off of any call 2 s.
fn quick_policy() -> hands::policy::Policy {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/policies/default.toml"
    ))
    .unwrap();
    let text = regex::Regex::new(r#"(?m)^bash_timeout = .*$"#)
        .unwrap()
        .replace(&text, r#"bash_timeout = "1s""#);
    let text = regex::Regex::new(r#"(?m)^call_timeout = .*$"#)
        .unwrap()
        .replace(&text, r#"call_timeout = "2s""#);
    hands::policy::Policy::from_toml_str("quick", &text, std::path::Path::new("quick.toml"))
        .unwrap()
}

/// §11 #35: a call that outlives the runner's limit (the policy's
/// `call_timeout`, 150 s by default) → `tool '<name>' timed out`, an error
/// result; the item goes on.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_35_a_call_past_the_runner_limit_times_out() {
    needs_fake!();
    let s = Served::start_with(
        1,
        &[],
        |c| c.environment = "quick".into(),
        vec![quick_policy()],
    )
    .await;
    let (sid, _) = s.session(json!([]), json!({"ttl_seconds": 4})).await;
    let (text, is_error) = s
        .call(&sid, json!({"type": "agent.tool_use", "id": "toolu_1", "name": "bash", "input": {"command": "sleep 30", "timeout_ms": 20000}}))
        .await;
    assert_eq!(text, "tool 'bash' timed out");
    assert!(is_error);
    let (text, _) = s.call(&sid, json!({"type": "agent.tool_use", "id": "toolu_2", "name": "bash", "input": {"command": "echo again", "restart": true}})).await;
    assert!(text.contains("again") || text.contains("restart"), "{text}");
    s.finish().await.unwrap();
}

/// §11 #36: no byte on the stream for the read timeout (600 s; 2 s here)
/// → reconnect and re-list; calls arriving afterwards are served.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_36_a_silent_stream_is_reopened_after_the_read_timeout() {
    needs_fake!();
    let s = Served::start_with(
        1,
        &[],
        |c| c.stream_read_timeout = Duration::from_secs(2),
        Vec::new(),
    )
    .await;
    s.fake
        .control(
            "POST",
            "/_fake/config",
            Some(json!({"ping_interval_ms": 600000})),
        )
        .await;
    let (sid, _) = s.session(json!([]), json!({"ttl_seconds": 4})).await;
    let streams = requests(
        &s,
        &format!("endpoint=E6&session_id={sid}&wait_count=3&timeout_ms=30000"),
    )
    .await;
    assert!(streams.len() >= 3, "{streams:?}");
    let lists = requests(
        &s,
        &format!("endpoint=E7&session_id={sid}&wait_count=3&timeout_ms=30000"),
    )
    .await;
    assert!(lists.len() >= 3, "each reconnect re-lists: {}", lists.len());
    let (text, _) = s.call(&sid, bash_use("toolu_1", "echo still served")).await;
    assert_eq!(text, "still served");
    s.finish().await.unwrap();
}

/// §11 #18: heartbeats answered 503 persistently (each attempt with the
/// client's retries): once more than the TTL has passed since the last
/// success the lease is assumed lost — no stop, nothing posted.
#[tokio::test(flavor = "multi_thread")]
async fn checklist_18_heartbeats_failing_past_the_ttl_end_in_an_assumed_loss() {
    needs_fake!();
    let s = Served::start(
        1,
        &[json!({"endpoint": "E3", "status": 503, "skip": 1, "times": null})],
    )
    .await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_long", "sleep 30; echo done")]),
            json!({"ttl_seconds": 4, "on_lease_expiry": "ignore"}),
        )
        .await;
    s.work_state(&work, "active").await;
    s.running("toolu_long").await;
    s.gave_up(&sid, &work).await;
    let beats = requests(&s, &format!("endpoint=E3&work_id={work}")).await;
    assert!(beats.len() >= 2, "attempts went on: {}", beats.len());
    // Once the TTL has passed since the last successful heartbeat the lease is
    // lost: no attempt after that, with a stale last_heartbeat.
    let ok_done = beats
        .iter()
        .filter(|b| b["status"] == 200)
        .filter_map(|b| b["t_done"].as_f64())
        .fold(f64::MIN, f64::max);
    assert!(ok_done > f64::MIN, "no successful heartbeat: {beats:?}");
    let late: Vec<f64> = beats
        .iter()
        .filter_map(|b| b["t"].as_f64())
        .filter(|t| *t > ok_done + 4.0)
        .collect();
    assert!(
        late.is_empty(),
        "heartbeats after the TTL: {:?} (last success done at {ok_done})",
        late
    );
    assert!(s.metric("hands_worker_cma_heartbeat_failures_total") >= 1.0);
    let registry = s.registry.clone();
    s.finish().await.unwrap();
    assert_eq!(
        super::metric(
            &registry,
            "hands_worker_cma_items_total{reason=\"assumed_lost\"}"
        ),
        1.0
    );
}
