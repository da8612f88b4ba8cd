//! Memory stores (contract §8): downloaded with their marker, synced both
//! ways at the server's mount path, and the harder rules (a conflict, a refused
//! 413 not sent again, a wipe, a lost marker); the host side of the sync under
//! an agent's symlinks and hard links; a bounded send budget; and a prompt
//! shutdown in the middle of a large sync (`hands worker` as a process).

use std::time::Duration;

use serde_json::json;

use super::{
    bash_use, end_turn, needs_fake, remote, requests, requests_of, store, until, Served,
    WorkerProcess,
};

/// Contract §8: stores are downloaded with their marker, synced both ways
/// after calls (new, edited, server-side new/changed/deleted), deletions wait
/// for the final sync, and a read-only store is read-only to bash as well.
/// The store appears at the server's mount path inside the sandbox only: on
/// the host it lives in the item's workspace.
#[tokio::test(flavor = "multi_thread")]
async fn memory_stores_sync_both_ways_at_their_mount_paths() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let notes = store(
        &s,
        json!([
            {"path": "/a.md", "content": "alpha\n"},
            {"path": "/dir/b.md", "content": "beta\n"},
            {"path": "/gone.md", "content": "gone\n"},
        ]),
    )
    .await;
    let kb = store(&s, json!([{"path": "/k.md", "content": "kb\n"}])).await;
    let mnt = format!("/srv/hands-it-{}/notes", std::process::id());
    let (sid, work) = s
        .session_spec(json!({
            "resources": [
                {"type": "memory_store", "memory_store_id": notes, "mount_path": mnt, "access": "read_write", "name": "notes"},
                {"type": "memory_store", "memory_store_id": kb, "mount_path": "/workspace/kb", "access": "read_only", "name": "kb"},
            ],
            "events": [],
            "work": {"ttl_seconds": 10},
        }))
        .await;
    let out = s
        .bash(&sid, "toolu_1", &format!("cat {mnt}/a.md {mnt}/dir/b.md /workspace/kb/k.md {mnt}/.anthropic-memory-store; echo; echo x > /workspace/kb/x.md"))
        .await;
    assert!(
        out.starts_with(&format!("alpha\nbeta\nkb\nversion 1\n{notes}\n")),
        "{out}"
    );
    assert!(
        out.contains("Read-only file system"),
        "a read-only store is read-only to bash: {out}"
    );
    assert!(
        !std::path::Path::new(&mnt).exists(),
        "the server's mount path exists inside the sandbox only"
    );
    let w = s
        .call(&sid, json!({"type": "agent.tool_use", "id": "toolu_2", "name": "write", "input": {"file_path": format!("{mnt}/c.md"), "content": "gamma\n"}}))
        .await;
    assert!(!w.1, "{w:?}");
    let e = s
        .call(&sid, json!({"type": "agent.tool_use", "id": "toolu_3", "name": "edit", "input": {"file_path": format!("{mnt}/a.md"), "old_string": "alpha", "new_string": "ALPHA"}}))
        .await;
    assert!(!e.1, "{e:?}");
    s.bash(
        &sid,
        "toolu_4",
        &format!("rm {mnt}/dir/b.md; ln -s /etc/passwd {mnt}/passwd.md; ln -s /etc {mnt}/etc"),
    )
    .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/memory_stores/{notes}/memories"),
            Some(json!({"path": "/d.md", "content": "delta\n"})),
        )
        .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/memory_stores/{notes}/memories/delete"),
            Some(json!({"path": "/gone.md"})),
        )
        .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/memory_stores/{kb}/memories"),
            Some(json!({"path": "/k.md", "content": "kb2\n"})),
        )
        .await;
    // A sync (once the interval has passed, after a call).
    s.fake.sync_memory(&sid, &notes, "toolu_5").await;
    until("c.md uploaded", || async {
        remote(&s, &notes).await.contains_key("/c.md")
    })
    .await;
    until("a.md updated", || async {
        remote(&s, &notes).await.get("/a.md").map(String::as_str) == Some("ALPHA\n")
    })
    .await;
    // Syncs run beside the calls: wait for the read-only store's pull.
    let pulled = s
        .fake
        .await_requests(
            &format!("endpoint=E12&memory_store_id={kb}&completed=1"),
            1,
            "the read-only store's pull",
        )
        .await;
    assert_eq!(pulled.len(), 1, "{pulled:?}");
    let out = s
        .bash(&sid, "toolu_6", &format!("for i in $(seq 100); do grep -q kb2 /workspace/kb/k.md && break; sleep 0.1; done; cat {mnt}/d.md /workspace/kb/k.md; ls {mnt}"))
        .await;
    assert!(out.starts_with("delta\nkb2\n"), "{out}");
    assert!(
        !out.contains("gone.md"),
        "deleted on the server, unchanged here: {out}"
    );
    let r = remote(&s, &notes).await;
    assert_eq!(r.get("/c.md").map(String::as_str), Some("gamma\n"));
    assert!(
        r.contains_key("/dir/b.md"),
        "a local deletion waits 30 s (or the final sync)"
    );
    assert!(
        !r.keys()
            .any(|k| k.contains("passwd") || k.starts_with("/etc")),
        "symlinks are never followed: {r:?}"
    );
    assert!(!r.contains_key("/.anthropic-memory-store"));
    assert_eq!(
        remote(&s, &kb).await.len(),
        1,
        "nothing is pushed to a read-only store"
    );

    // End of turn: the clean end's final sync sends the deletion.
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&work, "stopped").await;
    until("b.md deleted", || async {
        !remote(&s, &notes).await.contains_key("/dir/b.md")
    })
    .await;
    let reqs = s
        .fake
        .control("GET", "/_fake/requests?endpoint=E15", None)
        .await;
    let del = &reqs["requests"][0];
    assert!(
        del["raw_query"]
            .as_str()
            .unwrap()
            .starts_with("expected_content_sha256="),
        "{del}"
    );
    s.finish().await.unwrap();
}

/// Attack on the host side of memory sync, which runs as root outside the
/// sandbox: the agent plants symlinks whose targets the host would resolve
/// in its own filesystem. The decoys stand for what an agent would aim at —
/// a host file (`a.md` → it; a changed server memory would be written
/// through the link, and the file read and uploaded), a host directory
/// (`sub` → it; a new server memory would land there), and finally the whole
/// folder swapped for a link to a directory holding a valid marker, as
/// another session's folder of the same store would. The worker follows none
/// of them: the decoys are untouched and nothing of theirs is uploaded.
#[tokio::test(flavor = "multi_thread")]
async fn the_host_side_of_memory_sync_follows_none_of_the_agents_symlinks() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let notes = store(
        &s,
        json!([{"path": "/a.md", "content": "alpha\n"}, {"path": "/b.md", "content": "beta\n"}]),
    )
    .await;
    let decoy = tempfile::tempdir().unwrap();
    let (file, dir) = (
        decoy.path().join("host-file"),
        decoy.path().join("host-dir"),
    );
    std::fs::write(&file, "decoy file secret\n").unwrap();
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("secret.md"), "decoy dir secret\n").unwrap();
    std::fs::write(
        dir.join(".anthropic-memory-store"),
        format!("version 1\n{notes}"),
    )
    .unwrap();
    let (sid, work) = s
        .session_spec(json!({
            "resources": [{"type": "memory_store", "memory_store_id": notes, "mount_path": "/mnt/memory/notes", "access": "read_write"}],
            "events": [],
            "work": {"ttl_seconds": 10},
        }))
        .await;
    let (file, dir) = (file.display().to_string(), dir.display().to_string());
    s.bash(
        &sid,
        "toolu_1",
        &format!("F=$(readlink -f /mnt/memory/notes); rm $F/a.md && ln -s {file} $F/a.md && ln -s {dir} $F/sub && echo planted"),
    )
    .await;
    for (path, content) in [
        ("/a.md", "written through a.md\n"),
        ("/sub/owned.md", "owned\n"),
    ] {
        s.fake
            .control(
                "POST",
                &format!("/_fake/memory_stores/{notes}/memories"),
                Some(json!({"path": path, "content": content})),
            )
            .await;
    }
    // A sync lists the store (and, done wrong, would pull through the links;
    // what it wrote is checked once the item is over).
    s.fake.sync_memory(&sid, &notes, "toolu_2").await;
    // Now the whole folder: a link to a directory with a valid marker.
    s.bash(
        &sid,
        "toolu_3",
        &format!(
            "F=$(readlink -f /mnt/memory/notes); mv $F $F.old && ln -s {dir} $F && echo swapped"
        ),
    )
    .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/memory_stores/{notes}/memories"),
            Some(json!({"path": "/owned2.md", "content": "owned\n"})),
        )
        .await;
    // The sync interval (5 s) passes, and the next call's sync finds the
    // folder swapped. Left alone, as it must be, the folder makes that sync
    // send nothing: there is no request to wait for. What it did is checked
    // once the item is over, when every sync (the final one too) is.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    s.bash(&sid, "toolu_4", "true").await;
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&work, "stopped").await;
    s.closed().await;
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "decoy file secret\n"
    );
    let mut in_dir: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    in_dir.sort();
    assert_eq!(
        in_dir,
        [".anthropic-memory-store", "secret.md"],
        "written into the host directory"
    );
    for r in requests(&s, &format!("memory_store_id={notes}")).await {
        assert!(
            !r["body_text"].as_str().unwrap_or("").contains("decoy"),
            "a host file was uploaded: {r}"
        );
    }
    let remote = remote(&s, &notes).await;
    assert!(!remote.contains_key("/secret.md"), "{remote:?}");
    s.finish().await.unwrap();
}

/// The E13 (create) requests sent for `path` in `store`, completed.
async fn creates(s: &Served, store: &str, path: &str) -> usize {
    requests(
        s,
        &format!("endpoint=E13&memory_store_id={store}&completed=1"),
    )
    .await
    .iter()
    .filter(|r| r["body"]["path"] == path)
    .count()
}

/// Contract §8.5, the harder rules, one sync at a time (interval 5 s, a sync
/// follows the first call after it): both sides changed → the server wins;
/// content the server refuses (413) is not sent again until it changes;
/// every local file gone → a wipe: downloaded again, nothing deleted; a
/// missing marker with files left → that store is not synced, not even by
/// the final flush.
#[tokio::test(flavor = "multi_thread")]
async fn memory_sync_conflicts_refusals_wipes_and_a_lost_marker() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    let m = store(
        &s,
        json!([
            {"path": "/a.md", "content": "a\n"},
            {"path": "/b.md", "content": "b\n"},
            {"path": "/c.md", "content": "c\n"},
        ]),
    )
    .await;
    let dir = "/mnt/memory/rules";
    let (sid, work) = s
        .session_spec(json!({
            "resources": [{"type": "memory_store", "memory_store_id": m, "mount_path": dir, "access": "read_write"}],
            "events": [],
            "work": {"ttl_seconds": 10},
        }))
        .await;
    let sync = |n: &str| {
        let (s, sid, m, tag) = (&s, sid.clone(), m.clone(), format!("toolu_sync{n}"));
        async move {
            s.fake.sync_memory(&sid, &m, &tag).await;
        }
    };
    // 1: a conflict, and a file over the server's 1 MiB limit.
    s.bash(
        &sid,
        "toolu_1",
        &format!("echo local > {dir}/a.md; head -c 1100000 /dev/zero | tr '\\0' x > {dir}/big.md"),
    )
    .await;
    s.fake
        .control(
            "POST",
            &format!("/_fake/memory_stores/{m}/memories"),
            Some(json!({"path": "/a.md", "content": "server\n"})),
        )
        .await;
    sync("1").await;
    until("big.md refused", || async {
        creates(&s, &m, "/big.md").await == 1
    })
    .await;
    let a = s
        .bash(&sid, "toolu_2", &format!("for i in $(seq 100); do grep -q server {dir}/a.md && break; sleep 0.1; done; cat {dir}/a.md"))
        .await;
    assert_eq!(a, "server", "both changed: the server's version wins");
    assert_eq!(remote(&s, &m).await["/a.md"], "server\n");
    // 2: a new file sorts after big.md; once it is sent, big.md was not.
    s.bash(&sid, "toolu_3", &format!("echo zz > {dir}/zz.md"))
        .await;
    sync("2").await;
    until("zz.md created", || async {
        creates(&s, &m, "/zz.md").await == 1
    })
    .await;
    assert_eq!(
        creates(&s, &m, "/big.md").await,
        1,
        "refused content was sent again"
    );
    // 3: every file gone: a wipe, not four deletions.
    s.bash(&sid, "toolu_4", &format!("rm -f {dir}/*.md")).await;
    sync("3").await;
    let listed = s
        .fake
        .await_requests(
            &format!("endpoint=E11&memory_store_id={m}&query=view%3Dfull&completed=1"),
            2,
            "the store downloaded again",
        )
        .await;
    assert_eq!(listed.len(), 2, "downloaded again");
    let ls = s
        .bash(
            &sid,
            "toolu_5",
            &format!(
                "for i in $(seq 100); do [ -e {dir}/zz.md ] && break; sleep 0.1; done; ls {dir}"
            ),
        )
        .await;
    assert_eq!(ls, "a.md\nb.md\nc.md\nzz.md", "{ls}");
    // 4: the marker removed while files remain: hands leaves the store alone.
    s.bash(
        &sid,
        "toolu_6",
        &format!("rm {dir}/.anthropic-memory-store; echo new > {dir}/new.md; rm {dir}/b.md"),
    )
    .await;
    // The sync interval (5 s) passes, and the next call's sync finds the
    // marker gone. Leaving the store alone, as it must, that sync sends
    // nothing: there is no request to wait for. What it did is checked once
    // the item is over, when every sync (the final one too) is.
    tokio::time::sleep(Duration::from_millis(5200)).await;
    s.bash(&sid, "toolu_sync4", "true").await;
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&work, "stopped").await;
    s.closed().await;
    assert_eq!(
        creates(&s, &m, "/new.md").await,
        0,
        "a store without its marker was synced"
    );
    assert!(
        requests(&s, &format!("endpoint=E15&memory_store_id={m}"))
            .await
            .is_empty(),
        "deleted on the server"
    );
    let r = remote(&s, &m).await;
    assert_eq!(
        r.keys().cloned().collect::<Vec<_>>(),
        ["/a.md", "/b.md", "/c.md", "/zz.md"]
    );
    s.finish().await.unwrap();
}

/// 400 hard links to one sparse 8 MiB file: 3.2 GB of logical content on a
/// few kilobytes of disk. The agent plants them in a memory folder from bash.
const HARD_LINK_ATTACK: &str = "F=$(readlink -f /mnt/memory/notes) && printf 'hello ' > $F/big \
     && truncate -s 8M $F/big && for i in $(seq 400); do ln $F/big $F/l$i; done \
     && echo $(ls $F | wc -l) files, $(du -sk $F | cut -f1) KiB on disk";

/// Issue #10, finding #5: the sync after the attack held every file in
/// memory at once (the worker grew from 13 MB to 6.7 GB). Now files are
/// hashed one at a time, the inode once, and uploaded one at a time: the
/// worker's peak RSS stays small, and it keeps serving the item.
#[tokio::test(flavor = "multi_thread")]
async fn memory_sync_of_hard_links_to_a_sparse_file_keeps_the_worker_small() {
    needs_fake!();
    let w = WorkerProcess::start().await;
    let (sid, _work, store) = w.session_with_store().await;
    let (planted, err) = w
        .fake
        .call(&sid, bash_use("toolu_1", HARD_LINK_ATTACK))
        .await;
    assert!(!err && planted.starts_with("401 files"), "{planted}");
    let before = w.status_kib("VmHWM");
    // A sync: it hashes the folder, lists the store, then uploads.
    w.fake.sync_memory(&sid, &store, "toolu_2").await;
    // The sync has hashed the folder and reached its uploads.
    let uploads = w
        .fake
        .control(
            "GET",
            &format!("/_fake/requests?endpoint=E13&memory_store_id={store}&bodies=0&completed=1&wait_count=1&timeout_ms=120000"),
            None,
        )
        .await;
    assert!(
        !uploads["requests"].as_array().unwrap().is_empty(),
        "the sync never uploaded:\n{}",
        w.log()
    );
    // The worker keeps serving the item meanwhile.
    let (alive, err) = w.fake.call(&sid, bash_use("toolu_3", "echo alive")).await;
    assert_eq!((alive.trim(), err), ("alive", false));
    // The peak over the whole sync: syncs run one after the other, so the
    // next one listing the store shows this one over.
    w.fake.sync_memory(&sid, &store, "toolu_4").await;
    let peak = w.status_kib("VmHWM");
    eprintln!(
        "worker peak RSS: {} MiB before the sync, {} MiB after it ({} uploads seen)",
        before / 1024,
        peak / 1024,
        requests_of(
            &w.fake,
            &format!("endpoint=E13&bodies=0&memory_store_id={store}")
        )
        .await
        .len()
    );
    assert!(
        peak < 300 * 1024,
        "the worker's peak RSS reached {} MiB",
        peak / 1024
    );
    // 401 memories of one content the server refuses (413, above its 1 MiB):
    // sent once, the others refused without being sent.
    let sent = requests_of(
        &w.fake,
        &format!("endpoint=E13&bodies=0&memory_store_id={store}"),
    )
    .await;
    assert!(
        sent.len() < 10,
        "{} uploads of one refused content",
        sent.len()
    );
}

/// Issue #10, finding #5: a worker shutting down while a large sync is in
/// progress (here: the sync's first upload held by a slow server) cancels the
/// sync and gives the item only the bounded flush, which reads nothing again
/// (the hash cache) and sends the refused content once. Before, the flush read
/// the whole folder again and re-sent every link until its 30 s bound.
#[tokio::test(flavor = "multi_thread")]
async fn worker_shutdown_during_a_large_memory_sync_is_prompt() {
    needs_fake!();
    let mut w = WorkerProcess::start().await;
    let (sid, work, store) = w.session_with_store().await;
    let (planted, _) = w
        .fake
        .call(&sid, bash_use("toolu_1", HARD_LINK_ATTACK))
        .await;
    assert!(planted.starts_with("401 files"), "{planted}");
    w.fake
        .control(
            "POST",
            "/_fake/faults",
            Some(json!({"endpoint": "E13", "times": 1, "action": "delay", "delay_ms": 60000})),
        )
        .await;
    w.fake.sync_memory(&sid, &store, "toolu_2").await;
    // The sync is in its uploads, the first one held.
    w.fake
        .await_requests(
            &format!("endpoint=E13&memory_store_id={store}&bodies=0"),
            1,
            "the sync's first upload",
        )
        .await;
    let took = w.terminate();
    eprintln!("the worker exited {took:?} after SIGTERM");
    assert!(
        took < Duration::from_secs(20),
        "shutdown took {took:?}:\n{}",
        w.log()
    );
    // The item was torn down properly: force-stopped.
    let item = w
        .fake
        .control("GET", &format!("/_fake/work/{work}"), None)
        .await;
    assert!(!item["stops"].as_array().unwrap().is_empty(), "{item}");
}

/// Issue #10, finding #5: what a sync sends is bounded (64 MiB of content);
/// the rest goes with the next sync, none of it lost. Nine 7.5 MiB text files
/// (67.5 MiB) take two syncs.
#[tokio::test(flavor = "multi_thread")]
async fn a_memory_sync_past_the_send_budget_completes_in_the_next_sync() {
    needs_fake!();
    let s = Served::start(1, &[]).await;
    s.fake
        .control(
            "POST",
            "/_fake/config",
            Some(json!({"max_memory_bytes": 16 << 20})),
        )
        .await;
    let m = store(&s, json!([])).await;
    let (sid, work) = s
        .session_spec(json!({
            "resources": [{"type": "memory_store", "memory_store_id": m, "mount_path": "/mnt/memory/big", "access": "read_write"}],
            "events": [],
            "work": {"ttl_seconds": 10},
        }))
        .await;
    // 5898240 random bytes are 7.5 MiB of base64 text.
    let out = s
        .bash(
            &sid,
            "toolu_1",
            "for i in 1 2 3 4 5 6 7 8 9; do head -c 5898240 /dev/urandom | base64 -w0 > /mnt/memory/big/f$i.md; done; \
             cat /mnt/memory/big/f*.md | wc -c",
        )
        .await;
    assert_eq!(out.trim(), (9 * 7_864_320).to_string());
    let first = s.fake.sync_memory(&sid, &m, "toolu_2").await;
    until("the first sync's uploads", || async {
        remote(&s, &m).await.len() >= 8
    })
    .await;
    // Syncs run one after the other: the uploads between the first sync's
    // listing and the next one's are all the first sync sent.
    let next = s.fake.sync_memory(&sid, &m, "toolu_3").await;
    let (from, to) = (
        first["seq"].as_u64().unwrap(),
        next["seq"].as_u64().unwrap(),
    );
    let uploaded = requests(
        &s,
        &format!("endpoint=E13&memory_store_id={m}&bodies=0&completed=1"),
    )
    .await
    .iter()
    .filter(|r| r["status"] == 200 && r["seq"].as_u64().is_some_and(|q| (from..to).contains(&q)))
    .count();
    assert_eq!(
        uploaded, 8,
        "the first sync sends 64 MiB (eight files), not more"
    );
    until("the next sync sends the rest", || async {
        remote(&s, &m).await.len() == 9
    })
    .await;
    let local = s
        .bash(&sid, "toolu_4", "cd /mnt/memory/big && sha256sum f*.md")
        .await;
    let r = remote(&s, &m).await;
    for line in local.lines() {
        let (sha, name) = line.split_once("  ").unwrap();
        let content = &r[&format!("/{name}")];
        assert_eq!(sha, hex_sha256(content.as_bytes()), "{name} arrived whole");
    }
    s.append(&sid, json!([end_turn()])).await;
    s.work_state(&work, "stopped").await;
    s.finish().await.unwrap();
}

fn hex_sha256(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
