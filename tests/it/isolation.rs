//! Two sessions open at once cannot see, signal or read each other.

use serde_json::json;

use crate::require_sandbox;
use crate::util::*;

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_sessions_cannot_see_signal_or_read_each_other() {
    require_sandbox!();
    let (a, b) = tokio::join!(open(None), open(None));
    let secret = format!("a-secret-{}", rand_hex());
    sh(
        &a,
        &format!(
            "echo {secret} > mine.txt; echo {secret} > /tmp/mine.txt; sleep 1000 >/dev/null 2>&1 &"
        ),
    )
    .await;
    let a_host_pids: Vec<u32> = a.cgroup().unwrap().procs();

    // Distinct uids, distinct workspaces.
    let ua = sh(&a, "id -u").await;
    let ub = sh(&b, "id -u").await;
    assert_ne!(ua, ub);
    assert_ne!(a.workspace(), b.workspace());

    // B cannot find A's files: not in its workspace, its /tmp, or by host path.
    let r = bash(
        &b,
        &format!(
            "cat mine.txt /tmp/mine.txt {}/mine.txt 2>&1; grep -r {secret} /workspace /tmp /proc/[0-9]*/cwd/ 2>/dev/null; echo done",
            a.workspace().display()
        ),
    )
    .await;
    assert!(!r.text_content().contains(&secret), "{r:?}");
    let r = tool(
        &b,
        "read",
        json!({"file_path": format!("{}/mine.txt", a.workspace().display())}),
    )
    .await;
    assert!(r.is_error && !r.text_content().contains(&secret));

    // B cannot see A's processes nor signal them by host pid.
    let ps = sh(&b, "ps -eo pid,comm | tail -n +2").await;
    assert!(!ps.contains("sleep"), "{ps}");
    for pid in &a_host_pids {
        let r = bash(&b, &format!("kill -9 {pid}")).await;
        assert!(r.is_error, "kill {pid}: {r:?}");
    }
    assert!(
        a_host_pids.iter().all(|p| pid_alive(*p)),
        "A lost a process to B"
    );
    assert!(sh(&a, "pgrep -c sleep").await.trim() == "1");

    let (ra, rb) = tokio::join!(a.close(), b.close());
    ra.unwrap();
    rb.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn workspace_files_belong_to_the_workspace_owner_on_the_host() {
    require_sandbox!();
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(4321), Some(4321)).unwrap();
    let s = open(Some(dir.path())).await;
    let inside = sh(&s, "echo hi > f && mkdir d && stat -c '%u' f d . | sort -u").await;
    // Inside, the session's uid owns them; on the host, the workspace owner does.
    assert_eq!(inside.trim(), sh(&s, "id -u").await.trim());
    for p in ["f", "d"] {
        let m = std::fs::metadata(dir.path().join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (4321, 4321), "{p}");
    }
    let r = tool(&s, "write", json!({"file_path": "w.txt", "content": "x"})).await;
    assert!(!r.is_error, "{r:?}");
    assert_eq!(
        std::fs::metadata(dir.path().join("w.txt")).unwrap().uid(),
        4321
    );
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_session_network_has_only_loopback() {
    require_sandbox!();
    let s = open(None).await;
    // netlink works (ip, getaddrinfo), and shows a single interface: lo, up.
    let out = sh(&s, "ip -brief address").await;
    let ifaces: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(ifaces, ["lo"], "{out}");
    assert!(out.contains("127.0.0.1/8"), "{out}");
    // A server and its client inside the session talk over that loopback.
    let (_, out) = py(
        &s,
        "import socket, threading\nsrv = socket.socket()\nsrv.bind(('127.0.0.1', 0))\nsrv.listen()\n\
         port = srv.getsockname()[1]\nthreading.Thread(target=lambda: srv.accept()[0].sendall(b'pong')).start()\n\
         c = socket.create_connection(('127.0.0.1', port))\nprint(c.recv(4).decode())",
    )
    .await;
    assert_eq!(out.trim(), "pong");
    s.close().await.unwrap();
}
