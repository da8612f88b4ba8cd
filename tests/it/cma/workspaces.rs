//! A session's workspace across its work items (issue 11), and what must not
//! outlive an item: the next item finds the session's files (its memory store
//! downloaded again), a finished session's workspace is removed, kept
//! workspaces past their retention are swept (never one in use), an item
//! served again waits for its previous handler, and an item's processes and
//! files never outlive it.

use std::time::Duration;

use serde_json::{json, Value};

use super::{bash_use, end_turn, needs_fake, processes, result_text, text_of, until, Served};

/// Where hands does better (contract §10): a process the agent detaches
/// (`setsid nohup … &`) dies with its item, and the next item starts in an
/// empty workspace of its own. (The SDK worker's children outlive the item,
/// and all its sessions share one workdir.)
#[tokio::test(flavor = "multi_thread")]
async fn processes_and_files_never_outlive_their_item() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    // A duration no other test uses: the process is found in /proc.
    let secs = (7000 + std::process::id() % 1000).to_string();
    let marker = format!("sleep {secs}");
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_1", &format!("setsid nohup {marker} > /dev/null 2>&1 & echo secret > left-behind; echo started"))]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    assert_eq!(text_of(&s.results(&sid, 1).await[0]), "started");
    let running = || processes(&["sleep", &secs]) > 0;
    until("the detached process running", || async { running() }).await;
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&work, "stopped").await;
    s.closed().await;
    assert!(!running(), "{marker:?} outlived its item");
    let (sid, _) = s
        .session(
            json!([bash_use("toolu_2", "ls -A /workspace")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    assert_eq!(
        text_of(&s.results(&sid, 1).await[0]),
        "(no output)",
        "the next item saw the previous one's files"
    );
    s.finish().await.unwrap();
}

/// A session spans many work items (each turn after an idle end is a new
/// one): the next item of the same session on this worker finds the files the
/// agent wrote, its memory store downloaded again (the previous item removed
/// its folder, as the contract's dispose says), and the workspace stays on the
/// host between items, unmounted.
#[tokio::test(flavor = "multi_thread")]
async fn a_sessions_next_item_finds_its_files() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let m = s
        .fake
        .control(
            "POST",
            "/_fake/memory_stores",
            Some(json!({"memories": [{"path": "/facts.md", "content": "water is wet\n"}]})),
        )
        .await;
    let spec = |events: Value| {
        json!({
            "resources": [{"type": "memory_store", "memory_store_id": m["id"], "mount_path": "/workspace/mem", "access": "read_write"}],
            "events": events,
            "work": {"ttl_seconds": 4},
        })
    };
    let (sid, w1) = s
        .session_spec(spec(json!([
            bash_use("toolu_1", "echo kept-across-items > notes.txt && mkdir -p src && echo 'fn main() {}' > src/main.rs && cat mem/facts.md"),
        ])))
        .await;
    let r = s.results(&sid, 1).await;
    assert!(result_text(&r, "toolu_1").contains("water is wet"), "{r:?}");
    s.append(&sid, json!([end_turn()])).await;
    // The idle end closes the item; its workspace stays, unmounted.
    s.work_state(&w1, "stopped").await;
    s.closed().await;
    let image = s.kept_image(&sid);
    assert!(image.exists(), "the session's workspace was not kept");
    let mount = s
        .registry
        .sandbox()
        .state_dir
        .join("workspaces")
        .join(format!("kept-{sid}"));
    assert!(
        !mount.join("notes.txt").exists(),
        "still mounted between items"
    );
    // The next turn is a new work item of the same session.
    let w2 = s.next_item(&sid, json!({"ttl_seconds": 4})).await;
    s.append(
        &sid,
        json!([bash_use(
            "toolu_2",
            "cat notes.txt src/main.rs mem/facts.md; ls -a mem"
        )]),
    )
    .await;
    let r = s.results(&sid, 2).await;
    let text = result_text(&r, "toolu_2");
    assert!(text.contains("kept-across-items"), "{text}");
    assert!(text.contains("fn main() {}"), "{text}");
    assert!(
        text.contains("water is wet"),
        "the store was not downloaded again: {text}"
    );
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&w2, "stopped").await;
    s.closed().await;
    assert!(image.exists());
    s.finish().await.unwrap();
}

/// A session seen terminated or archived has no further items: its kept
/// workspace goes at the end of the item that saw it (live termination) or at
/// once (an item whose session is already over when it is fetched).
#[tokio::test(flavor = "multi_thread")]
async fn a_finished_sessions_workspace_is_removed() {
    needs_fake!();
    let s = Served::start(2, &[]).await;
    // Terminated while an item runs.
    let (sid, w) = s
        .session(
            json!([bash_use("toolu_1", "echo x > f")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.results(&sid, 1).await;
    assert!(s.kept_image(&sid).exists());
    s.append(&sid, json!([{"type": "session.status_terminated"}]))
        .await;
    s.work_state(&w, "stopped").await;
    until("the terminated session's workspace removed", || async {
        !s.kept_image(&sid).exists()
    })
    .await;
    // Archived between items: the next item finds the session over.
    let (sid2, w2) = s
        .session(
            json!([bash_use("toolu_2", "echo y > f")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.results(&sid2, 1).await;
    s.append(&sid2, json!([end_turn()])).await;
    s.work_state(&w2, "stopped").await;
    s.closed().await;
    assert!(s.kept_image(&sid2).exists());
    s.fake
        .control(
            "POST",
            &format!("/_fake/sessions/{sid2}/update"),
            Some(json!({"archived_at": "2026-12-01T00:00:00Z"})),
        )
        .await;
    let w3 = s.next_item(&sid2, json!({"ttl_seconds": 4})).await;
    s.work_state(&w3, "stopped").await;
    until("the archived session's workspace removed", || async {
        !s.kept_image(&sid2).exists()
    })
    .await;
    s.finish().await.unwrap();
}

/// A kept workspace that no item has used for the retention time is removed
/// by the sweep at start (and every hour); one in use never is.
#[tokio::test(flavor = "multi_thread")]
async fn kept_workspaces_past_their_retention_are_swept() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let (sid, w) = s
        .session(
            json!([bash_use("toolu_1", "echo x > f")]),
            json!({"ttl_seconds": 4}),
        )
        .await;
    s.results(&sid, 1).await;
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&w, "stopped").await;
    s.closed().await;
    let image = s.kept_image(&sid);
    assert!(image.exists());
    let workspaces = s.registry.sandbox().workspaces.clone();
    assert_eq!(
        workspaces.sweep_kept(Duration::from_secs(3600)),
        0,
        "not yet old"
    );
    // In use: never swept, however old.
    let held = workspaces
        .open_kept(
            &sid,
            hands::workspace::Geometry {
                bytes: 1 << 30,
                inodes: 1 << 16,
            },
            false,
        )
        .unwrap();
    // The scenario: the retention (1 s here) passes while the workspace is in
    // use.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        workspaces.sweep_kept(Duration::from_secs(1)),
        0,
        "swept while in use"
    );
    assert!(held.path().join("f").exists(), "the files came back");
    workspaces.remove(held).unwrap();
    // And passes again once it is released.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(workspaces.sweep_kept(Duration::from_secs(1)), 1);
    assert!(!image.exists());
    s.finish().await.unwrap();
}

/// The same work item offered again to the worker that still holds a handler
/// for it (its lease expired and the item was re-queued while the old handler
/// had not yet heard): never two handlers at once, never one sandbox between
/// them, and the old handler's teardown never touches the new one's sandbox.
/// The new claim serves the session to its end.
#[tokio::test(flavor = "multi_thread")]
async fn an_item_served_again_waits_for_its_previous_handler() {
    needs_fake!();
    let s = Served::start(2, &[]).await;
    let (sid, work) = s
        .session(
            json!([bash_use("toolu_long", "sleep 3; echo first-claim")]),
            json!({"ttl_seconds": 6}),
        )
        .await;
    s.running("toolu_long").await;
    // The lease expires server-side: the item is queued again and this
    // worker (capacity 2) takes it while its first handler still runs.
    s.fake
        .control("POST", &format!("/_fake/work/{work}/expire"), None)
        .await;
    until("the item acked a second time", || async {
        let w = s
            .fake
            .control("GET", &format!("/_fake/work/{work}"), None)
            .await;
        w["acks"].as_array().map(Vec::len).unwrap_or(0) >= 2
    })
    .await;
    // At no point two sandboxes of this session at once.
    let mut most = 0;
    let watch = async {
        loop {
            most = most.max(s.registry.open_sessions());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let served = async {
        let r = s.results(&sid, 1).await;
        assert!(
            result_text(&r, "toolu_long").contains("first-claim"),
            "{r:?}"
        );
        s.append(&sid, json!([bash_use("toolu_next", "echo second-call")]))
            .await;
        let r = s.results(&sid, 2).await;
        assert_eq!(result_text(&r, "toolu_next"), "second-call", "{r:?}");
    };
    tokio::select! {
        () = served => {}
        () = watch => unreachable!(),
    }
    assert!(most <= 1, "two handlers had sandboxes at once ({most})");
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&work, "stopped").await;
    s.finish().await.unwrap();
}
