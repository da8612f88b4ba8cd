//! A session served end to end and how its items end: all six tools from
//! history and live with an unowned and a custom tool left alone, an answered
//! history that only idles, three items at once each in a sandbox of its own,
//! and a termination the stream missed.

use serde_json::{json, Value};

use super::{bash_use, end_turn, needs_fake, text_of, Served};

#[tokio::test(flavor = "multi_thread")]
async fn hands_serves_a_full_session_through_the_sandbox() {
    needs_fake!();
    let s = Served::start(2, &[]).await;
    let key = s.env["key"].as_str().unwrap().to_string();
    let tool_use = |id: &str, name: &str, input: Value| json!({"type": "agent.tool_use", "id": id, "name": name, "input": input});
    let (sid, work) = s
        .session(
            json!([tool_use(
                "toolu_w",
                "write",
                json!({"file_path": "notes/a.txt", "content": "alpha\nbeta\n"})
            )]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    let token = s
        .fake
        .control("GET", &format!("/_fake/work/{work}"), None)
        .await["sessions_token"]
        .as_str()
        .unwrap()
        .to_string();
    s.append(
        &sid,
        json!([
            tool_use("toolu_r", "read", json!({"file_path": "notes/a.txt"})),
            tool_use("toolu_e", "edit", json!({"file_path": "notes/a.txt", "old_string": "beta", "new_string": "gamma"})),
            tool_use("toolu_g", "glob", json!({"pattern": "**/*.txt"})),
            tool_use("toolu_s", "grep", json!({"pattern": "gam+a"})),
            tool_use("toolu_b", "bash", json!({"command": "cat notes/a.txt; tr '\\0' '\\n' < /proc/self/environ; tr '\\0' '\\n' < /proc/1/environ; env"})),
            tool_use("toolu_n", "read", json!(null)),
            tool_use("toolu_x", "deploy_to_prod", json!({})),
            {"type": "agent.custom_tool_use", "id": "ctu_1", "name": "lookup", "input": {}},
        ]),
    )
    .await;
    let results = s.results(&sid, 7).await;
    let by_id = |id: &str| {
        results
            .iter()
            .find(|e| e["tool_use_id"] == id)
            .unwrap_or_else(|| panic!("no result for {id}: {results:?}"))
            .clone()
    };
    assert_eq!(results.len(), 7, "one result per owned call: {results:?}");
    assert_eq!(text_of(&by_id("toolu_w")), "wrote 11 bytes to notes/a.txt");
    assert_eq!(text_of(&by_id("toolu_r")), "alpha\nbeta\n");
    assert_eq!(by_id("toolu_e")["is_error"], false);
    assert_eq!(text_of(&by_id("toolu_g")), "/workspace/notes/a.txt");
    assert_eq!(
        text_of(&by_id("toolu_s")),
        "/workspace/notes/a.txt:2:gamma\n"
    );
    let bash = text_of(&by_id("toolu_b"));
    assert!(bash.starts_with("alpha\ngamma\n"), "{bash}");
    for secret in [key.as_str(), token.as_str(), "ANTHROPIC_"] {
        assert!(!bash.contains(secret), "the sandbox saw {secret:?}: {bash}");
    }
    assert_eq!(
        by_id("toolu_n")["is_error"],
        true,
        "a null input is an is_error result"
    );
    // The unowned call is left for its owner.
    let log = s
        .fake
        .control("GET", &format!("/_fake/sessions/{sid}"), None)
        .await;
    assert!(!log["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["tool_use_id"] == "toolu_x" || e["custom_tool_use_id"] == "ctu_1"));

    // End of turn: after max_idle the item ends and is force-stopped.
    s.append(&sid, json!([end_turn()])).await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(w["stops"][0]["force"], true);
    let beats = w["heartbeats"].as_array().unwrap();
    assert_eq!(beats[0]["expected_last_heartbeat"], "NO_HEARTBEAT");
    for pair in beats.windows(2) {
        assert_eq!(
            pair[1]["expected_last_heartbeat"], pair[0]["last_heartbeat"],
            "exact echo"
        );
    }
    // Credentials: the environment key for poll and ack, the token for the rest.
    let reqs = s
        .fake
        .control("GET", &format!("/_fake/requests?work_id={work}"), None)
        .await;
    for r in reqs["requests"].as_array().unwrap() {
        let want = if r["endpoint"] == "E2" {
            "environment_key"
        } else {
            "sessions_token"
        };
        assert_eq!(r["credential"]["kind"], want, "{}", r["path"]);
    }
    s.finish().await.unwrap();
}

/// Contract §11 #24 and #31: at attach, a history whose calls are all
/// answered and which ends in an end-of-turn idle: nothing runs again, and the
/// item ends after max_idle. (With an unanswered call before the idle, the
/// SDK worker runs it and then stays, because the echo of its own result
/// disarms the clock; hands does the same. Checked against the SDK on the fake.)
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_history_at_attach_ends_the_item_after_max_idle() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, work) = s
        .session(
            json!([
                bash_use("toolu_done", "echo must not run"),
                {"type": "user.tool_result", "tool_use_id": "toolu_done", "is_error": false, "content": [{"type": "text", "text": "earlier"}]},
                end_turn(),
            ]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "the idle grace ended the item: {w}");
    assert_eq!(w["stops"][0]["force"], true);
    let log = s
        .fake
        .control("GET", &format!("/_fake/sessions/{sid}"), None)
        .await;
    let posted: Vec<&Value> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["_origin"] == "client")
        .collect();
    assert!(posted.is_empty(), "an answered call ran again: {posted:?}");
    s.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn three_items_are_served_at_once_each_in_its_own_sandbox() {
    needs_fake!();
    let s = Served::start(3, &[]).await;
    let mut sessions = Vec::new();
    for i in 0..3 {
        sessions.push(
            s.session(
                json!([bash_use(
                    "toolu_a",
                    &format!("echo item{i} > mine; sleep 2; cat mine; ls")
                )]),
                json!({"ttl_seconds": 4}),
            )
            .await,
        );
    }
    for (i, (sid, _)) in sessions.iter().enumerate() {
        let r = s.results(sid, 1).await;
        assert_eq!(
            text_of(&r[0]),
            format!("item{i}\nmine"),
            "a workspace of its own"
        );
    }
    // Served at once: every item was acked before any result was posted
    // (with one slot, the next poll waits for the previous item to end).
    let reqs = s.fake.control("GET", "/_fake/requests", None).await;
    let seqs = |endpoint: &str| -> Vec<u64> {
        reqs["requests"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["endpoint"] == endpoint && r["status"] == 200)
            .map(|r| r["seq"].as_u64().unwrap())
            .collect()
    };
    let (acks, posts) = (seqs("E2"), seqs("E8"));
    assert_eq!(acks.len(), 3);
    assert!(
        acks.iter().max() < posts.iter().min(),
        "acks {acks:?}, posts {posts:?}"
    );
    // Each item ends on its own idle, and is force-stopped.
    for (sid, work) in &sessions {
        s.append(sid, json!([end_turn()])).await;
        let w = s.work_state(work, "stopped").await;
        assert_eq!(w["stops"][0]["force"], true, "{w}");
    }
    s.finish().await.unwrap();
}

/// Contract §12.10: a termination the stream missed (it was down) and that
/// only the history shows. The SDK worker keeps the item until a heartbeat
/// reports the stop; hands ends it at the reconcile.
#[tokio::test(flavor = "multi_thread")]
async fn a_termination_seen_only_in_history_ends_the_item() {
    needs_fake!();
    let s = Served::start_with(1, &[], |c| c.max_idle = None, Vec::new()).await;
    let (sid, work) = s.session(json!([]), json!({"ttl_seconds": 300})).await;
    s.work_state(&work, "active").await;
    s.fake.stream_open(&sid).await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/sessions/{sid}/events"),
            Some(json!({"events": [{"type": "session.status_terminated"}], "broadcast": false})),
        )
        .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/sessions/{sid}/streams/close"),
            Some(json!({"mode": "clean"})),
        )
        .await;
    let w = s.work_state(&work, "stopped").await;
    assert_eq!(w["state"], "stopped", "{w}");
    assert_eq!(w["stops"][0]["force"], true);
    s.finish().await.unwrap();
}
