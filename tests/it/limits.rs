//! Resource attacks: each one is held by the session's limits while the worker
//! (this process) and other sessions keep working.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::json;

use crate::require_sandbox;
use crate::util::*;

/// Processes of the session as the host sees them, minus the helper.
fn session_procs(s: &hands::session::Session) -> Vec<u32> {
    let helper = s.helper_pid() as u32;
    s.cgroup()
        .expect("cgroup")
        .procs()
        .into_iter()
        .filter(|p| *p != helper && pid_alive(*p))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn fork_bomb_is_held_by_the_pids_limit() {
    require_sandbox!();
    let mut p = policy("default");
    p.limits.pids = 64;
    let s = open_with(p, None).await;
    let r = s
        .call(
            "bash",
            &json!({"command": "bomb() { bomb | bomb & }; bomb; sleep 5", "timeout_ms": 3000}),
        )
        .await;
    assert!(r.is_error, "{r:?}");
    // The bomb never grew past the limit, and the timeout killed all of it.
    assert!(
        session_procs(&s).is_empty(),
        "left: {:?}",
        session_procs(&s)
    );
    let r = s.call("bash", &json!({"restart": true})).await;
    assert!(!r.is_error, "{r:?}");
    assert_eq!(sh(&s, "echo alive").await, "alive");
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn fork_bomb_cannot_exceed_pids_max() {
    require_sandbox!();
    let mut p = policy("default");
    p.limits.pids = 32;
    let s = open_with(p, None).await;
    // Fork up to 100 sleepers, stopping at the first refused fork, then count
    // the session's processes.
    let (_, out) = py(
        &s,
        "import os, time\nn = 0\nfor i in range(100):\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    n += 1\n\
         print(n, len([p for p in os.listdir('/proc') if p.isdigit()]))",
    )
    .await;
    let mut it = out
        .split_whitespace()
        .map(|x| x.parse::<u32>().unwrap_or(999));
    let (forked, out) = (it.next().unwrap_or(0), it.next().unwrap_or(999).to_string());
    assert!(forked >= 16, "the probe could not fork at all: {forked}");
    let live: u32 = out.trim().parse().unwrap_or(999);
    assert!(live <= 32, "{live} processes in a session limited to 32");
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_bomb_is_killed_inside_its_cgroup() {
    require_sandbox!();
    let mut p = policy("default");
    p.limits.memory_bytes = 96 << 20;
    let bomb = open_with(p, None).await;
    let other = open(None).await;
    let before = rss_kib();
    let r = bomb
        .call(
            "bash",
            &json!({"command": "python3 -c 'b = bytearray(1 << 30); print(len(b))'; echo status=$?"}),
        )
        .await;
    let text = r.text_content();
    assert!(
        text.contains("status=137"),
        "the bomb was not OOM-killed: {text}"
    );
    assert!(!text.contains("1073741824"), "{text}");
    assert!(
        bomb.cgroup().unwrap().oom_kills() >= 1,
        "no OOM kill recorded in the session cgroup"
    );
    // The worker and another session are unaffected; the bombed session still works.
    assert_eq!(sh(&other, "echo fine").await, "fine");
    assert_eq!(sh(&bomb, "echo still-here").await, "still-here");
    assert!(
        rss_kib() < before + 32 * 1024,
        "worker RSS grew from {before} KiB to {} KiB",
        rss_kib()
    );
    bomb.close().await.unwrap();
    other.close().await.unwrap();
}

/// Peak RSS (KiB) of a `hands tool` worker process running one call, polled
/// from /proc while it runs (VmHWM only grows).
fn worker_peak_rss_kib(tool: &str, input: &str) -> (u64, String) {
    let child = std::process::Command::new(hands_bin())
        .args(["tool", tool, input])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn hands tool");
    let pid = child.id();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let p = peak.clone();
    let poller = std::thread::spawn(move || {
        while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(v) = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                p.fetch_max(v, std::sync::atomic::Ordering::Relaxed);
            }
            if !pid_alive(pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let out = child.wait_with_output().expect("hands tool");
    let _ = poller.join();
    (
        peak.load(std::sync::atomic::Ordering::Relaxed),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn one_gib_of_output_is_capped_and_the_worker_stays_flat() {
    require_sandbox!();
    let (small, _) = worker_peak_rss_kib("bash", r#"{"command": "echo small"}"#);
    let (big, out) = worker_peak_rss_kib(
        "bash",
        r#"{"command": "head -c 1073741824 /dev/zero | tr '\\0' 'a'; echo; echo tail-marker", "timeout_ms": 120000}"#,
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("result JSON");
    let text = v["content"][0]["text"].as_str().unwrap_or_default();
    assert_eq!(v["is_error"], false, "{}", &text[..text.len().min(200)]);
    assert!(
        text.starts_with("[output truncated]\n"),
        "{}",
        &text[..text.len().min(40)]
    );
    assert!(text.ends_with("tail-marker"));
    assert!(text.len() <= 102_400, "{} bytes returned", text.len());
    assert!(
        big < small + 16 * 1024,
        "worker peak RSS {big} KiB for 1 GiB of output vs {small} KiB for one line"
    );
    eprintln!("worker peak RSS: {small} KiB (one line), {big} KiB (1 GiB of output)");
}

#[tokio::test(flavor = "multi_thread")]
async fn grep_output_is_capped() {
    require_sandbox!();
    let s = open(None).await;
    sh(&s, "seq 1 200000 | sed 's/^/line /' > big.txt").await;
    let g = tool(&s, "grep", json!({"pattern": "line", "path": "big.txt"})).await;
    let text = g.text_content();
    assert!(
        text.ends_with("\n[output truncated at 102400 bytes]"),
        "grep uncapped"
    );
    assert_eq!(
        text.len(),
        102_400 + "\n[output truncated at 102400 bytes]".len()
    );
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn infinite_loop_is_killed_at_its_timeout_with_nothing_left() {
    require_sandbox!();
    let s = open(None).await;
    let r = s
        .call(
            "bash",
            &json!({"command": "(while :; do :; done) & while :; do :; done", "timeout_ms": 700}),
        )
        .await;
    assert!(r.is_error);
    assert_eq!(r.text_content(), "bash: bash command timed out after 0.7s");
    let left = session_procs(&s);
    assert!(left.is_empty(), "processes left in the session: {left:?}");
    let r = s.call("bash", &json!({"command": "echo x"})).await;
    assert_eq!(
        r.text_content(),
        "bash: bash session terminated; restart required"
    );
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn setsid_nohup_daemon_is_gone_after_close() {
    require_sandbox!();
    let s = open(None).await;
    sh(&s, "setsid nohup sleep 1000 >/dev/null 2>&1 & (setsid sh -c 'sleep 1001 & exit' &) ; sleep 0.2").await;
    let daemons = session_procs(&s);
    assert!(
        daemons.len() >= 3,
        "expected the shell and two daemons: {daemons:?}"
    );
    let cg_path = s.cgroup().unwrap().path().to_string();
    s.close().await.unwrap();
    for pid in &daemons {
        assert!(!pid_alive(*pid), "pid {pid} outlived the session");
    }
    // The cgroup is gone too.
    let cgroups = hands::sandbox::cgroup::Cgroups::detect().unwrap();
    let name = cg_path.rsplit('/').next().unwrap();
    // A later session may reuse the slot; only an empty or absent group is fine.
    let g = cgroups.open(name);
    assert!(g.procs().iter().all(|p| !daemons.contains(p)));
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_kills_background_jobs() {
    require_sandbox!();
    let s = open(None).await;
    sh(
        &s,
        "sleep 1000 & disown; nohup sleep 1001 >/dev/null 2>&1 &",
    )
    .await;
    let before = session_procs(&s);
    assert!(before.len() >= 3, "{before:?}");
    let r = s.call("bash", &json!({"restart": true})).await;
    assert_eq!(r.text_content(), "bash session restarted");
    tokio::time::sleep(Duration::from_millis(50)).await;
    for pid in before {
        assert!(!pid_alive(pid), "pid {pid} survived the restart");
    }
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_session_kills_everything() {
    require_sandbox!();
    let s = open(None).await;
    sh(&s, "setsid sleep 1000 >/dev/null 2>&1 &").await;
    let procs = session_procs(&s);
    let helper = s.helper_pid() as u32;
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline
        && (pid_alive(helper) || procs.iter().any(|p| pid_alive(*p)))
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!pid_alive(helper));
    for p in procs {
        assert!(!pid_alive(p), "pid {p} outlived a dropped session");
    }
}

/// A group left by a worker that died (its slot lock released) is swept; a live
/// session's group is not.
#[tokio::test(flavor = "multi_thread")]
async fn orphaned_groups_are_swept_and_live_ones_kept() {
    require_sandbox!();
    let cfg = config();
    let live = open(None).await;
    let live_group = live
        .cgroup()
        .unwrap()
        .path()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    // An orphan: a group for a slot nobody holds, with a process in it. The
    // slot is held while the group is made, and is half the slot range away
    // from the first free one, which is where this process's other tests open
    // their sessions (one of them taking it would make the group live).
    let first = hands::session::slot::acquire(&cfg.state_dir, cfg.slots).unwrap();
    let orphan_slot = (1..cfg.slots)
        .map(|i| (first.n + cfg.slots / 2 + i) % cfg.slots)
        .find_map(|n| hands::session::slot::try_acquire(&cfg.state_dir, n))
        .unwrap();
    drop(first);
    let name = format!("s{}", orphan_slot.n);
    let cg = cfg
        .cgroups
        .create(
            &name,
            hands::sandbox::cgroup::CgroupLimits {
                memory_bytes: 64 << 20,
                pids: 16,
                cpu: 1.0,
            },
        )
        .unwrap();
    let mut sleeper = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    cg.add_process(sleeper.id()).unwrap();
    drop(orphan_slot);
    // A worker another test starts sweeps at its start too, and may take the
    // orphan first: what is checked is the sweep's effect, not who made it.
    hands::session::sweep_orphans(&cfg);
    assert!(
        !cfg.cgroups.existing().contains(&name),
        "orphan {name} kept"
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        sleeper.wait().unwrap().signal(),
        Some(9),
        "the orphan's process was not killed"
    );
    assert!(
        cfg.cgroups.existing().contains(&live_group),
        "live group {live_group} swept"
    );
    assert_eq!(sh(&live, "echo alive").await, "alive");
    live.close().await.unwrap();
}

/// The policy's memory, pids and CPU limits are what the kernel enforces for the
/// session (read back from the cgroup files on the host).
#[tokio::test(flavor = "multi_thread")]
async fn policy_limits_land_in_the_session_cgroup() {
    require_sandbox!();
    let mut p = policy("default");
    p.limits.memory_bytes = 200 << 20;
    p.limits.pids = 77;
    p.limits.cpu = 0.5;
    let s = open_with(p, None).await;
    let rel = s.cgroup().unwrap().path().to_string();
    let read = |f: &str| std::fs::read_to_string(f).map(|s| s.trim().to_string());
    match s.cgroup().unwrap().version() {
        hands::sandbox::cgroup::CgroupVersion::V1 => {
            let root = "/sys/fs/cgroup";
            assert_eq!(
                read(&format!("{root}/memory/{rel}/memory.limit_in_bytes")).unwrap(),
                (200u64 << 20).to_string()
            );
            assert_eq!(read(&format!("{root}/pids/{rel}/pids.max")).unwrap(), "77");
            assert_eq!(
                read(&format!("{root}/cpu/{rel}/cpu.cfs_quota_us")).unwrap(),
                "50000"
            );
            assert_eq!(
                read(&format!("{root}/cpu/{rel}/cpu.cfs_period_us")).unwrap(),
                "100000"
            );
        }
        hands::sandbox::cgroup::CgroupVersion::V2 => {
            let dir = format!("/sys/fs/cgroup/{rel}");
            assert_eq!(
                read(&format!("{dir}/memory.max")).unwrap(),
                (200u64 << 20).to_string()
            );
            assert_eq!(read(&format!("{dir}/pids.max")).unwrap(), "77");
            assert_eq!(read(&format!("{dir}/cpu.max")).unwrap(), "50000 100000");
        }
    }
    // Every process of the session is in it, the helper included.
    sh(&s, "sleep 100 >/dev/null 2>&1 &").await;
    assert!(s
        .cgroup()
        .unwrap()
        .procs()
        .contains(&(s.helper_pid() as u32)));
    assert!(s.cgroup().unwrap().procs().len() >= 3);
    s.close().await.unwrap();
}

/// Commands that exit at once, many times over: every exit must be reported. (A
/// child reaped before the helper recorded its pid once lost its exit and hung
/// `exec` under CI's load; the window is microseconds, so this guards the path
/// rather than reproducing that race on demand.)
#[tokio::test(flavor = "multi_thread")]
async fn instantly_exiting_commands_never_lose_their_exit() {
    require_sandbox!();
    let s = open(None).await;
    for i in 0..300 {
        let null = || std::fs::File::open("/dev/null").unwrap().into();
        let status = s
            .exec(
                &format!("x{i}"),
                vec!["/bin/sh".into(), "-c".into(), format!("exit {}", i % 7)],
                [null(), null(), null()],
                Some(Duration::from_secs(10)),
            )
            .await
            .unwrap();
        assert_eq!(status, Some(i % 7), "exit {i} lost");
    }
    s.close().await.unwrap();
}

/// A command that cannot be started, many times over: `Command::spawn` reaps
/// its failed child itself, and the helper's reaper must never take that
/// child from under it. (The helper died of that race once, under the full
/// suite's load, taking its session with it; the window is a few
/// instructions, so this guards the path rather than reproducing the race on
/// demand.)
#[tokio::test(flavor = "multi_thread")]
async fn failed_spawns_never_take_the_helper_down() {
    require_sandbox!();
    let s = open(None).await;
    for i in 0..500 {
        let null = || std::fs::File::open("/dev/null").unwrap().into();
        let r = s
            .exec(
                &format!("missing{i}"),
                vec!["/no/such/program".into()],
                [null(), null(), null()],
                Some(Duration::from_secs(10)),
            )
            .await;
        match r {
            Err(hands::session::SessionError::Sandbox(hands::sandbox::SandboxError::Spawn {
                errno: Some(libc::ENOENT),
                ..
            })) => {}
            other => panic!("spawn {i}: {other:?}"),
        }
    }
    assert_eq!(sh(&s, "echo alive").await.trim(), "alive");
    s.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// The host's disk, and what a session leaves behind.

/// A session's workspace is a filesystem of the policy's size: writing past it
/// says "No space left on device" inside, for bytes and for inodes, while the
/// worker and another session keep working, and the host spends no more than
/// the limit.
#[tokio::test(flavor = "multi_thread")]
async fn the_workspace_disk_is_bounded_by_the_policy() {
    require_sandbox!();
    let mut p = policy("default");
    p.limits.disk_bytes = 32 << 20;
    p.limits.disk_inodes = 2048;
    let s = open_with(p, None).await;
    let other = open(None).await;
    let r = bash(
        &s,
        "dd if=/dev/zero of=big bs=1M count=200 2>&1; df -k /workspace",
    )
    .await;
    assert!(
        r.text_content().contains("No space left on device"),
        "{r:?}"
    );
    let r = bash(
        &s,
        "rm big; for i in $(seq 4000); do : > f$i || { echo STOPPED at $i; break; }; done 2>&1 | tail -2",
    )
    .await;
    let text = r.text_content();
    assert!(
        text.contains("No space left on device") && text.contains("STOPPED"),
        "{text}"
    );
    // The other session and the worker are unaffected.
    assert_eq!(sh(&other, "echo x > f && cat f").await, "x");
    // On the host: the image holds at most its size.
    use std::os::unix::fs::MetadataExt;
    let images = std::fs::read_dir(config().data_dir.join("disks"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".img"))
        .map(|e| e.metadata().unwrap())
        .filter(|m| m.len() == 32 << 20)
        .collect::<Vec<_>>();
    assert!(!images.is_empty(), "no image of the policy's size");
    for m in images {
        assert!(m.blocks() * 512 <= 33 << 20, "{} bytes", m.blocks() * 512);
    }
    s.close().await.unwrap();
    other.close().await.unwrap();
}

/// A fresh workspace is empty and new, even when the previous session of the
/// same slot left a tree behind that is still in use on the host (an open fd
/// keeps its filesystem busy).
#[tokio::test(flavor = "multi_thread")]
async fn the_next_session_of_a_slot_gets_an_empty_new_workspace() {
    require_sandbox!();
    let a = open_in_slot_zero(policy("default")).await;
    sh(
        &a,
        "mkdir -p keep/deeper && echo secret-of-a > keep/deeper/f",
    )
    .await;
    let held = std::fs::File::open(a.workspace().join("keep/deeper/f")).unwrap();
    use std::os::unix::fs::MetadataExt;
    let dev_a = std::fs::metadata(a.workspace()).unwrap().dev();
    let uid_a = a.confinement().uid;
    a.close().await.unwrap();
    let b = open_in_slot_zero(policy("default")).await;
    assert_eq!(b.confinement().uid, uid_a, "not the same slot");
    assert_ne!(std::fs::metadata(b.workspace()).unwrap().dev(), dev_a);
    assert_eq!(sh(&b, "ls -A /workspace | wc -l").await, "0");
    let r = bash(&b, "cat keep/deeper/f").await;
    assert!(
        r.is_error && !r.text_content().contains("secret-of-a"),
        "{r:?}"
    );
    b.close().await.unwrap();
    drop(held);
}

/// The attack: 16,000 nested directories, which crashed a recursive removal
/// (and every session with it) at close and again at the next open. Closing is
/// an unmount; the worker (this process) survives, nothing is left, and the slot
/// works again.
#[tokio::test(flavor = "multi_thread")]
async fn a_deep_tree_does_not_take_the_worker_down() {
    require_sandbox!();
    let s = open_in_slot_zero(policy("default")).await;
    // Built bottom-up (each new level is a rename at the top), which takes a
    // second where 16,000 chdirs deeper and deeper take landlock's path walk
    // half a minute.
    let r = bash(
        &s,
        "python3 -c \"import os\nos.mkdir('d')\nfor i in range(16000):\n    \
         os.mkdir('t'); os.rename('d', 't/d'); os.rename('t', 'd')\nprint('deep')\"",
    )
    .await;
    assert!(r.text_content().contains("deep"), "{r:?}");
    let ws = s.workspace().to_path_buf();
    assert!(depth_of(&ws.join("d")) > 16000, "the tree is not that deep");
    close_and_drain(s).await;
    assert!(!ws.join("d").exists(), "the tree outlived its session");
    let again = open_in_slot_zero(policy("default")).await;
    assert_eq!(sh(&again, "ls -A | wc -l").await, "0");
    again.close().await.unwrap();
    // The remover itself, on a thread with a small stack, for the workspaces
    // that are plain directories (the `workspace-disk` degradation).
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("t");
    std::fs::create_dir(&top).unwrap();
    nest(&top, 16000);
    let parent: std::os::fd::OwnedFd = std::fs::File::open(dir.path()).unwrap().into();
    std::thread::Builder::new()
        .stack_size(128 * 1024)
        .spawn(move || {
            hands::workspace::remove::remove_tree(
                std::os::fd::AsFd::as_fd(&parent),
                std::ffi::OsStr::new("t"),
            )
        })
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    assert!(!top.exists());
}

/// Nests `n` directories named `d` under `top` (by fd: no path grows long).
fn nest(top: &std::path::Path, n: usize) {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::{mkdirat, Mode};
    let mut cur: std::os::fd::OwnedFd = std::fs::File::open(top).unwrap().into();
    for _ in 0..n {
        mkdirat(&cur, "d", Mode::from_bits_truncate(0o755)).unwrap();
        cur = openat(
            &cur,
            "d",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
    }
}

/// How many `d` directories are nested under `top` (walked by fd, on the host).
fn depth_of(top: &std::path::Path) -> usize {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::Mode;
    let mut cur: std::os::fd::OwnedFd = std::fs::File::open(top).unwrap().into();
    let mut n = 1;
    while let Ok(next) = openat(
        &cur,
        "d",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
    ) {
        cur = next;
        n += 1;
    }
    n
}

/// Restores the host's `core_pattern` when dropped.
struct CorePattern(String);

impl CorePattern {
    fn set(pattern: &str) -> CorePattern {
        let old = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
        std::fs::write("/proc/sys/kernel/core_pattern", pattern).unwrap();
        CorePattern(old)
    }
}

impl Drop for CorePattern {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/core_pattern", self.0.trim_end());
    }
}

/// With a pipe `core_pattern` (systemd-coredump, apport) the kernel ignores
/// RLIMIT_CORE = 0 and hands a crashing process's memory to a root process on
/// the host. A crash inside a session reaches no handler.
#[tokio::test(flavor = "multi_thread")]
async fn core_dumps_never_reach_a_pipe_handler() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    let handler = dir.path().join("handler.sh");
    let log = dir.path().join("dumps.log");
    std::fs::write(
        &handler,
        format!(
            "#!/bin/sh\necho \"$1 $2\" >> {}\ncat > /dev/null\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&handler, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _pattern = CorePattern::set(&format!("|{} %p %e", handler.display()));
    // The control: a host process with RLIMIT_CORE = 0 still reaches the handler.
    let st = std::process::Command::new("/bin/bash")
        .args([
            "-c",
            "ulimit -c 0; /bin/sleep 30 & sleep 0.2; kill -SEGV $!; wait $!",
        ])
        .status()
        .unwrap();
    assert!(!st.success());
    let waited = std::time::Instant::now();
    while !log.exists() && waited.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let control = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        control.contains("sleep"),
        "the pipe handler never ran: {control:?}"
    );
    std::fs::remove_file(&log).unwrap();

    let s = open(None).await;
    let r = bash(
        &s,
        "ulimit -c unlimited 2>&1; ulimit -c; /bin/sleep 30 & sleep 0.2; kill -SEGV $!; wait; \
         python3 -c 'import os; os.abort()'; echo crashed",
    )
    .await;
    assert!(r.text_content().contains("crashed"), "{r:?}");
    std::thread::sleep(Duration::from_secs(2));
    let dumps = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        dumps.is_empty(),
        "a core dump reached the host's handler: {dumps}"
    );
    s.close().await.unwrap();
}

/// A worker killed with its sessions open leaves their workspaces mounted and
/// their images on disk. The next worker's sweep removes them (no process holds
/// their lock) and leaves a live session's workspace alone.
#[tokio::test(flavor = "multi_thread")]
async fn workspaces_of_a_worker_that_died_are_swept() {
    require_sandbox!();
    let cfg = config();
    let live = open(None).await;
    sh(&live, "echo kept > f").await;
    let mut dead = std::process::Command::new(hands_bin())
        .args([
            "exec",
            "--",
            "/bin/sh",
            "-c",
            "echo left > f; echo ready; sleep 300",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(dead.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    // Its workspace: the mount whose file says "left".
    let mounts = cfg.state_dir.join("workspaces");
    let find_left = || {
        std::fs::read_dir(&mounts)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| std::fs::read_to_string(p.join("f")).is_ok_and(|t| t == "left\n"))
    };
    let left = find_left().expect("the dying worker's workspace");
    let id = left.file_name().unwrap().to_string_lossy().into_owned();
    let image = cfg.data_dir.join("disks").join(format!("{id}.img"));
    assert!(image.exists());
    dead.kill().unwrap();
    dead.wait().unwrap();
    // (Another test's worker may sweep it first; the effect is what counts.)
    hands::session::sweep_orphans(&cfg);
    assert!(
        find_left().is_none(),
        "the dead worker's workspace is still there"
    );
    assert!(!image.exists(), "its image is still there");
    assert_eq!(sh(&live, "cat f").await, "kept");
    assert!(live.workspace().join("f").exists());
    live.close().await.unwrap();
}

/// The `workspace-disk` degradation (a host without loop devices): workspaces
/// are plain directories. One that cannot be removed (here an immutable file,
/// as `EMFILE` or an operator's `chattr` would) is quarantined, never handed out
/// again, and the next workspace is a new, empty directory; a refused policy
/// never gets a directory at all; a deep tree is removed without recursion.
#[test]
fn plain_directory_workspaces_are_removed_or_quarantined_never_reused() {
    use hands::workspace::{Geometry, Workspaces};
    let state = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let w = Workspaces::without_filesystems(state.path().into(), data.path().into());
    let g = Geometry {
        bytes: 1 << 30,
        inodes: 1 << 16,
    };
    let err = w.create(g, false).unwrap_err();
    assert!(err.to_string().contains("workspace-disk"), "{err}");

    let a = w.create(g, true).unwrap();
    let a_path = a.path().to_path_buf();
    std::fs::write(a_path.join("stuck"), "a's file").unwrap();
    let chattr = std::process::Command::new("chattr")
        .arg("+i")
        .arg(a_path.join("stuck"))
        .status()
        .unwrap();
    assert!(
        chattr.success(),
        "chattr +i needs a filesystem with attributes"
    );
    let err = w.remove(a).unwrap_err();
    assert!(err.to_string().contains("quarantine"), "{err}");
    assert!(!a_path.exists(), "left under its old name");
    let quarantined: Vec<_> = std::fs::read_dir(data.path().join("quarantine"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(quarantined.len(), 1);
    let b = w.create(g, true).unwrap();
    assert_ne!(b.path(), a_path);
    assert_eq!(std::fs::read_dir(b.path()).unwrap().count(), 0);
    // A deep tree in it goes without recursion.
    nest(b.path(), 3000);
    let b_path = b.path().to_path_buf();
    w.remove(b).unwrap();
    assert!(!b_path.exists());
    // Clean up what the test made immutable.
    for q in quarantined {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(q.join("stuck"))
            .status();
    }
}
