//! The escape suite: each test is one named attack from inside a session, from
//! bash and, where it applies, from the file tools. Every one must be denied, and
//! each asserts the specific effect the attack would have had, so it fails if the
//! confinement that stops it is removed.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::json;

use crate::require_sandbox;
use crate::util::*;

// ---------------------------------------------------------------------------
// Filesystem: reading and writing outside the workspace.

#[tokio::test(flavor = "multi_thread")]
async fn read_outside_direct_host_path() {
    require_sandbox!();
    let fx = HostFixture::new();
    let s = open(Some(&fx.ws())).await;
    let host_path = fx.secret_path().display().to_string();
    let r = bash(&s, &format!("cat {host_path}")).await;
    assert!(
        r.is_error && !r.text_content().contains(&fx.secret),
        "{r:?}"
    );
    let r = tool(&s, "read", json!({ "file_path": host_path })).await;
    assert!(
        r.is_error && !r.text_content().contains(&fx.secret),
        "{r:?}"
    );
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn read_outside_via_dotdot() {
    require_sandbox!();
    let fx = HostFixture::new();
    let s = open(Some(&fx.ws())).await;
    // On the host, ws/../secret.txt is the secret; inside, /workspace/.. is the
    // sandbox's own root.
    let r = bash(
        &s,
        "cat /workspace/../secret.txt; cat ../secret.txt; cat ../../../../secret.txt",
    )
    .await;
    assert!(
        r.is_error && !r.text_content().contains(&fx.secret),
        "{r:?}"
    );
    let r = tool(&s, "read", json!({ "file_path": "../secret.txt" })).await;
    assert!(r.is_error, "{r:?}");
    assert!(
        r.text_content()
            .contains("is outside the session's working directory"),
        "{r:?}"
    );
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn read_outside_via_planted_symlink() {
    require_sandbox!();
    let fx = HostFixture::new();
    // Planted on the host before the session: absolute and relative links to the
    // secret.
    std::os::unix::fs::symlink(fx.secret_path(), fx.ws().join("abs")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", fx.ws().join("rel")).unwrap();
    let s = open(Some(&fx.ws())).await;
    let r = bash(&s, "cat abs; cat rel").await;
    assert!(
        r.is_error && !r.text_content().contains(&fx.secret),
        "{r:?}"
    );
    for link in ["abs", "rel"] {
        let r = tool(&s, "read", json!({ "file_path": link })).await;
        assert!(
            r.is_error && !r.text_content().contains(&fx.secret),
            "{link}: {r:?}"
        );
        let r = tool(
            &s,
            "grep",
            json!({ "pattern": "host-secret", "path": link }),
        )
        .await;
        assert!(!r.text_content().contains(&fx.secret), "{link}: {r:?}");
    }
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn write_outside_via_planted_symlink() {
    require_sandbox!();
    let fx = HostFixture::new();
    let target = fx.root().join("planted-target.txt");
    std::os::unix::fs::symlink(&target, fx.ws().join("out")).unwrap();
    std::os::unix::fs::symlink(fx.secret_path(), fx.ws().join("sec")).unwrap();
    let s = open(Some(&fx.ws())).await;
    let _ = bash(
        &s,
        "echo pwned > out; echo pwned >> sec; echo pwned > ../planted-target.txt",
    )
    .await;
    let _ = tool(
        &s,
        "write",
        json!({ "file_path": "out", "content": "pwned" }),
    )
    .await;
    let _ = tool(
        &s,
        "edit",
        json!({ "file_path": "sec", "old_string": "host", "new_string": "pwned" }),
    )
    .await;
    assert!(
        !target.exists(),
        "a write reached the host through the symlink"
    );
    assert_eq!(
        std::fs::read_to_string(fx.secret_path()).unwrap(),
        fx.secret
    );
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn hardlink_to_file_outside_workspace() {
    require_sandbox!();
    let fx = HostFixture::new();
    // From inside: linking a visible file from another mount into the workspace.
    let s = open(Some(&fx.ws())).await;
    let r = bash(&s, "ln /etc/passwd /workspace/pw && echo LINKED").await;
    assert!(r.is_error && !r.text_content().contains("LINKED"), "{r:?}");
    let r = bash(&s, "ln /etc/shadow /workspace/sh && echo LINKED").await;
    assert!(r.is_error && !r.text_content().contains("LINKED"), "{r:?}");
    s.close().await.unwrap();

    // Planted from outside: a hardlink to another user's private file stays that
    // user's file, unreadable and unwritable through the workspace.
    let private = fx.root().join("private.txt");
    std::fs::write(&private, &fx.secret).unwrap();
    std::os::unix::fs::chown(&private, Some(12345), Some(12345)).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::hard_link(&private, fx.ws().join("hl")).unwrap();
    let s = open(Some(&fx.ws())).await;
    let r = bash(&s, "cat hl").await;
    assert!(
        r.is_error && r.text_content().contains("Permission denied"),
        "{r:?}"
    );
    let r = tool(&s, "read", json!({ "file_path": "hl" })).await;
    assert!(
        r.is_error && !r.text_content().contains(&fx.secret),
        "{r:?}"
    );
    let r = bash(&s, "echo pwned > hl").await;
    assert!(r.is_error, "{r:?}");
    assert_eq!(std::fs::read_to_string(&private).unwrap(), fx.secret);
    s.close().await.unwrap();
}

/// A background process keeps swapping a directory for a symlink to a directory
/// outside the workspace while the file tools read and write through it: no
/// read may return the outside file, no write may land in it.
#[tokio::test(flavor = "multi_thread")]
async fn symlink_swapped_in_during_file_tool() {
    require_sandbox!();
    let s = open(None).await;
    let token = format!("OUTSIDE-{}", rand_hex());
    sh(
        &s,
        &format!(
            "mkdir -p real /tmp/other && echo inside > real/f && echo {token} > /tmp/other/f && \
             (while :; do ln -sfn real d; ln -sfn /tmp/other d; done) >/dev/null 2>&1 &"
        ),
    )
    .await;
    let mut inside = 0;
    for _ in 0..300 {
        let r = tool(&s, "read", json!({ "file_path": "d/f" })).await;
        assert!(
            !r.text_content().contains(&token),
            "read followed the raced symlink: {r:?}"
        );
        if !r.is_error {
            assert_eq!(r.text_content(), "inside\n");
            inside += 1;
        }
        let _ = tool(
            &s,
            "write",
            json!({ "file_path": "d/f", "content": "inside\n" }),
        )
        .await;
        let _ = tool(
            &s,
            "edit",
            json!({ "file_path": "d/f", "old_string": "inside", "new_string": "inside" }),
        )
        .await;
    }
    let outside = sh(&s, "cat /tmp/other/f").await;
    assert_eq!(outside, token, "a write went through the raced symlink");
    eprintln!("{inside} of 300 reads resolved inside the workspace");
    s.close().await.unwrap();
}

/// The same race against the walking tools. A host thread exchanges a real
/// directory of the workspace with a symlink to `/etc` (visible inside the
/// sandbox, read-only, outside `/workspace`) as fast as it can, with
/// `renameat2(RENAME_EXCHANGE)`, so `real` is always one or the other. grep and
/// glob, through `real` and over the whole workspace, must never return
/// anything of `/etc`: no `PRETTY_NAME` line of `/etc/os-release`, no name
/// that exists only there, no path outside the workspace. The kernel boundary
/// would hold either way (the tools run in the sandbox); this is the tools' own
/// rule. Every call is bounded: none may hang, none may panic.
#[tokio::test(flavor = "multi_thread")]
async fn directory_swapped_for_a_symlink_during_grep_and_glob() {
    require_sandbox!();
    let fx = HostFixture::new();
    let ws = fx.ws();
    std::fs::create_dir_all(ws.join("real/sub")).unwrap();
    let inside = ["real/a.txt", "real/b.txt", "real/sub/c.txt", "top.txt"];
    for f in inside {
        std::fs::write(ws.join(f), "NAME=inside\n").unwrap();
    }
    std::os::unix::fs::symlink("/etc", ws.join("lnk")).unwrap();
    // The session's uid owns the workspace through the idmapping.
    let s = open(Some(&ws)).await;
    let seen = sh(
        &s,
        "grep -c PRETTY_NAME /etc/os-release; ls /workspace/lnk/os-release",
    )
    .await;
    assert!(
        seen.starts_with('1'),
        "the target is visible inside: {seen}"
    );

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swaps = {
        let (stop, ws) = (stop.clone(), ws.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let exchanged = nix::fcntl::renameat2(
                    nix::fcntl::AT_FDCWD,
                    &ws.join("real"),
                    nix::fcntl::AT_FDCWD,
                    &ws.join("lnk"),
                    nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                );
                if exchanged.is_err() {
                    break; // the fixture is gone: the test failed
                }
                n += 1;
            }
            n
        })
    };
    let allowed: Vec<String> = inside
        .iter()
        .flat_map(|f| {
            // Either name of the exchanged pair may be printed for a file of it.
            [
                format!("/workspace/{f}"),
                format!("/workspace/{}", f.replacen("real/", "lnk/", 1)),
            ]
        })
        .chain(
            [
                "/workspace/real",
                "/workspace/lnk",
                "/workspace/real/sub",
                "/workspace/lnk/sub",
            ]
            .map(String::from),
        )
        .collect();
    let calls = [
        ("grep", json!({"pattern": "NAME", "path": "real"})),
        ("grep", json!({"pattern": "NAME"})),
        (
            "grep",
            json!({"pattern": "NAME", "path": "real", "output_mode": "files_with_matches"}),
        ),
        ("glob", json!({"pattern": "real/*"})),
        ("glob", json!({"pattern": "**/*"})),
        ("glob", json!({"pattern": "*", "path": "real"})),
    ];
    let (mut answered, mut errors) = (0, 0);
    for round in 0..200 {
        for (name, input) in &calls {
            let r = tokio::time::timeout(Duration::from_secs(20), tool(&s, name, input.clone()))
                .await
                .unwrap_or_else(|_| panic!("{name} {input} hung (round {round})"));
            let text = r.text_content();
            assert!(
                !text.contains("PRETTY_NAME") && !text.contains("os-release"),
                "{name} {input} returned /etc through the raced symlink (round {round}): {text}"
            );
            assert!(
                !text.contains("panic") && !text.contains("internal error"),
                "{name} {input} (round {round}): {text}"
            );
            // Every path named, in a result or an error, is one of the workspace's.
            for (at, _) in text.match_indices("/workspace/") {
                let named: String = text[at..]
                    .chars()
                    .take_while(|c| !matches!(c, ':' | ' ' | '\n' | '\''))
                    .collect();
                assert!(
                    allowed.contains(&named),
                    "{name} {input} named a path that is not the workspace's (round {round}): {named}\n{text}"
                );
            }
            if r.is_error {
                errors += 1;
                continue;
            }
            answered += 1;
            if *name == "grep" && text != "no matches" {
                for line in text.lines() {
                    assert!(
                        line.ends_with("NAME=inside") || line.starts_with("/workspace/"),
                        "grep {input} (round {round}): {line}"
                    );
                }
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = swaps.join().unwrap();
    eprintln!("{answered} answers, {errors} errors (refused or raced paths), {n} exchanges");
    assert!(answered > 0, "some calls must get through");
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn proc_self_root_does_not_reach_the_host() {
    require_sandbox!();
    let fx = HostFixture::new();
    let s = open(Some(&fx.ws())).await;
    let secret = fx.secret_path().display().to_string();
    let r = bash(
        &s,
        &format!("cat /proc/self/root{secret}; cat /proc/1/root{secret}; ls /proc/self/root/"),
    )
    .await;
    let text = r.text_content();
    assert!(!text.contains(&fx.secret), "{text}");
    // /proc/self/root is the sandbox's own root, not the host's.
    assert!(
        text.contains("workspace") && !text.contains("home"),
        "{text}"
    );
    let r = tool(
        &s,
        "read",
        json!({ "file_path": format!("/proc/self/root{secret}") }),
    )
    .await;
    assert!(
        r.is_error && !r.text_content().contains(&fx.secret),
        "{r:?}"
    );
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn proc_pid_cwd_does_not_reach_the_host() {
    require_sandbox!();
    let fx = HostFixture::new();
    let s = open(Some(&fx.ws())).await;
    // Every process visible inside, through its cwd and root links.
    let r = bash(
        &s,
        "for p in /proc/[0-9]*; do cat $p/cwd/../secret.txt $p/root/../secret.txt 2>/dev/null; done; echo done",
    )
    .await;
    assert!(!r.text_content().contains(&fx.secret), "{r:?}");
    // The worker (this test process) is not even visible.
    let me = std::process::id();
    let r = bash(&s, &format!("ls /proc/{me}/cwd/")).await;
    assert!(r.is_error, "worker pid {me} visible inside: {r:?}");
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn read_etc_shadow() {
    require_sandbox!();
    let s = open(None).await;
    let r = bash(&s, "cat /etc/shadow").await;
    assert!(
        r.is_error && r.text_content().contains("Permission denied"),
        "{r:?}"
    );
    let r = tool(&s, "read", json!({ "file_path": "/etc/shadow" })).await;
    assert!(r.is_error && !r.text_content().contains("root:"), "{r:?}");
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn write_to_read_only_system_paths() {
    require_sandbox!();
    let s = open(None).await;
    let marker = format!("/usr/hands-escape-{}", rand_hex());
    let r = bash(
        &s,
        &format!("touch {marker} /etc/hands-escape; echo x > /bin/hands-escape"),
    )
    .await;
    assert!(r.is_error, "{r:?}");
    assert!(!std::path::Path::new(&marker).exists());
    assert!(!std::path::Path::new("/etc/hands-escape").exists());
    s.close().await.unwrap();
}

/// /proc is read-only to the session by landlock alone: DAC lets a process write
/// its own oom_score_adj (upwards), comm, clear_refs and loginuid-style files.
#[tokio::test(flavor = "multi_thread")]
async fn tamper_with_proc_files() {
    require_sandbox!();
    let s = open(None).await;
    let r = bash(
        &s,
        "for f in oom_score_adj comm clear_refs; do \
           (echo 1000 > /proc/self/$f) 2>&1 && echo WROTE-$f; done; cat /proc/self/oom_score_adj",
    )
    .await;
    let text = r.text_content();
    assert!(!text.contains("WROTE"), "{text}");
    assert_eq!(text.matches("Permission denied").count(), 3, "{text}");
    assert!(text.ends_with("\n0") || text.ends_with('0'), "{text}");
    s.close().await.unwrap();
}

/// File descriptors: nothing the worker holds (here a pipe it opened without
/// close-on-exec) and not the helper's channel to the worker reaches a sandboxed
/// process; through the channel a process could forge the helper's answers.
#[tokio::test(flavor = "multi_thread")]
async fn inherit_the_workers_file_descriptors() {
    require_sandbox!();
    // A leaky fd in the worker: no O_CLOEXEC.
    let (leak_r, leak_w) = nix::unistd::pipe().unwrap();
    use std::os::fd::AsRawFd;
    let leaked = std::fs::read_link(format!("/proc/self/fd/{}", leak_w.as_raw_fd()))
        .unwrap()
        .display()
        .to_string();
    let s = open(None).await;
    // Listed from a child, so the listing adds no fd to the shell it inspects:
    // "<fd> <target>" per line.
    let fds: String = sh(&s, "ls -l /proc/$$/fd")
        .await
        .lines()
        .filter_map(|l| {
            l.split_once(" -> ")
                .map(|(a, b)| (a.rsplit(' ').next().unwrap_or(""), b))
        })
        .map(|(fd, target)| format!("{fd} {target}\n"))
        .collect();
    let exec_fds = {
        let (_, out) = py(&s, "import os\nfor f in sorted(os.listdir('/proc/self/fd')):\n    print(f, os.readlink('/proc/self/fd/' + f))").await;
        out
    };
    for listing in [&fds, &exec_fds] {
        assert!(
            !listing.contains("socket:"),
            "a socket reached the sandbox:\n{listing}"
        );
        assert!(
            !listing.contains(&leaked),
            "the worker's fd {leaked} reached the sandbox:\n{listing}"
        );
    }
    // The shell's only pipes are its own stdin and stdout (bash keeps saved
    // copies of them at fds 10 and up while a command runs with </dev/null).
    let mut pipes: Vec<&str> = fds
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|t| t.starts_with("pipe:"))
        .collect();
    pipes.sort_unstable();
    pipes.dedup();
    assert!(
        pipes.len() <= 2,
        "pipes beyond the shell's stdio {pipes:?}:\n{fds}"
    );
    drop((leak_r, leak_w));
    s.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// The worker's environment and memory.

#[test]
fn worker_environment_is_not_readable() {
    require_sandbox!();
    let token = format!("worker-token-{}", rand_hex());
    // The worker is launched with the secret in its environment, like an
    // ANTHROPIC_* key; nothing inside may see it.
    let out = std::process::Command::new(hands_bin())
        .env("ANTHROPIC_ENVIRONMENT_KEY", &token)
        .env("HANDS_TEST_SECRET", &token)
        .args(["exec", "--env", "default", "--", "/bin/sh", "-c"])
        .arg("env; for f in /proc/[0-9]*/environ; do cat $f 2>&1; echo; done; cat /proc/$PPID/environ; tr '\\0' '\\n' < /proc/1/environ")
        .output()
        .expect("run hands exec");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.code().is_some(), "{all}");
    assert!(
        !all.contains(&token),
        "the worker's environment leaked: {all}"
    );
    assert!(
        all.contains("PATH=/usr/local/bin"),
        "the probe did not run: {all}"
    );
}

/// This test process is the worker: its memory, maps and environment must be out
/// of reach, by host pid and through every process visible inside (the helper,
/// pid 1, is not dumpable).
#[tokio::test(flavor = "multi_thread")]
async fn worker_memory_is_not_readable() {
    require_sandbox!();
    let s = open(None).await;
    let me = std::process::id();
    let r = bash(
        &s,
        &format!(
            "for p in {me} 1 $PPID; do cat /proc/$p/maps; head -c 64 /proc/$p/mem; cat /proc/$p/environ; done 2>&1; echo END"
        ),
    )
    .await;
    let text = r.text_content();
    assert!(text.contains("END"), "{text}");
    assert!(
        !text.contains("r-xp") && !text.contains("rw-p"),
        "a memory map leaked: {text}"
    );
    assert!(
        text.contains("No such file or directory"),
        "worker pid {me} visible: {text}"
    );
    assert!(
        text.contains("Permission denied"),
        "the helper's memory is open: {text}"
    );
    s.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// Other processes.

#[tokio::test(flavor = "multi_thread")]
async fn ptrace_another_process() {
    require_sandbox!();
    let s = open(None).await;
    sh(&s, "sleep 300 >/dev/null 2>&1 &").await;
    let (_, out) = py(
        &s,
        &syscall_probe(
            "import subprocess\n\
             pid = int(subprocess.check_output(['pgrep', '-n', 'sleep']).strip())\n\
             report(libc.syscall(101, 16, pid, 0, 0))  # PTRACE_ATTACH\n\
             report(libc.syscall(101, 0, 0, 0, 0))     # PTRACE_TRACEME",
        ),
    )
    .await;
    assert_eq!(out.matches("DENIED EPERM").count(), 2, "{out}");
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn process_vm_readv_another_process() {
    require_sandbox!();
    let s = open(None).await;
    sh(&s, "sleep 300 >/dev/null 2>&1 &").await;
    let (_, out) = py(
        &s,
        &syscall_probe(
            "import subprocess\n\
             pid = int(subprocess.check_output(['pgrep', '-n', 'sleep']).strip())\n\
             buf = ctypes.create_string_buffer(16)\n\
             class iov(ctypes.Structure):\n    _fields_ = [('b', ctypes.c_void_p), ('l', ctypes.c_size_t)]\n\
             local = iov(ctypes.addressof(buf), 16)\n\
             remote = iov(0x400000, 16)\n\
             report(libc.syscall(310, pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))\n\
             report(libc.syscall(311, pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))",
        ),
    )
    .await;
    assert_eq!(out.matches("DENIED EPERM").count(), 2, "{out}");
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn see_processes_outside_the_session() {
    require_sandbox!();
    let mut host = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let s = open(None).await;
    let pids = sh(&s, "ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '").await;
    let visible: Vec<u32> = pids
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(
        !visible.contains(&host.id()),
        "host pid {} visible: {pids}",
        host.id()
    );
    // The helper (1), the shell and the pipeline: a handful of small pids.
    assert!(
        visible.len() <= 10 && visible.iter().all(|p| *p < 100),
        "{pids}"
    );
    let ps = sh(&s, "ps -eo comm | tail -n +2 | sort | tr '\\n' ' '").await;
    assert!(!ps.contains("sleep"), "host sleep visible: {ps}");
    host.kill().unwrap();
    let _ = host.wait();
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn signal_a_process_outside_the_session() {
    require_sandbox!();
    let mut host = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let s = open(None).await;
    let r = bash(&s, &format!("kill -9 {}", host.id())).await;
    assert!(r.is_error, "{r:?}");
    // Signalling everything it can see reaches only the session itself.
    let _ = bash(&s, "kill -9 -1").await;
    assert!(
        pid_alive(host.id()),
        "the host process was killed from inside"
    );
    host.kill().unwrap();
    let _ = host.wait();
    s.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// Kernel interfaces denied by seccomp (EPERM, not a kill).

async fn denied(probe: &str, expect: &str, count: usize) {
    let s = open(None).await;
    let (_, out) = py(&s, &syscall_probe(probe)).await;
    assert_eq!(out.matches(expect).count(), count, "probe output: {out}");
    assert!(!out.contains("ALLOWED"), "probe output: {out}");
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn mount_a_filesystem() {
    require_sandbox!();
    denied(
        "report(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None))\n\
         report(libc.syscall(428, -100, b'/tmp', 1))  # open_tree\n\
         report(libc.syscall(430, b'tmpfs', 0))       # fsopen",
        "DENIED EPERM",
        3,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unshare_namespaces() {
    require_sandbox!();
    denied(
        "for flag in (0x10000000, 0x00020000, 0x40000000, 0x20000000, 0x08000000, 0x04000000, 0x02000000):\n    report(libc.unshare(flag))",
        "DENIED EPERM",
        7,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn setns_into_another_namespace() {
    require_sandbox!();
    denied(
        "fd = os.open('/proc/self/ns/net', os.O_RDONLY)\n\
         report(libc.setns(fd, 0))\n\
         report(libc.syscall(308, fd, 0x40000000))",
        "DENIED EPERM",
        2,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn create_a_user_namespace() {
    require_sandbox!();
    // unshare(CLONE_NEWUSER), clone(CLONE_NEWUSER), and clone3 (ENOSYS, so libc
    // falls back to clone where the flags are checked).
    denied(
        "report(libc.unshare(0x10000000))\n\
         report(libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0))",
        "DENIED EPERM",
        2,
    )
    .await;
    let s = open(None).await;
    let r = bash(&s, "unshare --user --map-root-user id").await;
    assert!(r.is_error && !r.text_content().contains("uid=0"), "{r:?}");
    let (_, out) = py(
        &s,
        &syscall_probe(
            "args = (ctypes.c_uint64 * 11)(0x10000000)\nreport(libc.syscall(435, args, 88))",
        ),
    )
    .await;
    assert!(out.contains("DENIED ENOSYS"), "{out}");
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn bpf() {
    require_sandbox!();
    denied("report(libc.syscall(321, 0, 0, 0))", "DENIED EPERM", 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keyctl() {
    require_sandbox!();
    denied(
        "report(libc.syscall(250, 0, -3, 0, 0))   # keyctl GET_KEYRING_ID\n\
         report(libc.syscall(248, b'user', b'k', b'v', 1, -3))  # add_key",
        "DENIED EPERM",
        2,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn io_uring() {
    require_sandbox!();
    denied(
        "params = ctypes.create_string_buffer(120)\nreport(libc.syscall(425, 8, params))",
        "DENIED EPERM",
        1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn perf_event_open() {
    require_sandbox!();
    denied(
        "attr = ctypes.create_string_buffer(128)\nreport(libc.syscall(298, attr, 0, -1, -1, 0))",
        "DENIED EPERM",
        1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_and_packet_sockets() {
    require_sandbox!();
    denied(
        "report(libc.socket(2, 3, 1))     # AF_INET SOCK_RAW ICMP\n\
         report(libc.socket(10, 3, 58))   # AF_INET6 SOCK_RAW ICMPv6\n\
         report(libc.socket(17, 3, 0))    # AF_PACKET SOCK_RAW\n\
         report(libc.socket(17, 2, 0))    # AF_PACKET SOCK_DGRAM\n\
         report(libc.socket(2, 10, 0))    # SOCK_PACKET",
        "DENIED EPERM",
        5,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn vsock_socket() {
    require_sandbox!();
    denied(
        "report(libc.socket(40, 1, 0))   # AF_VSOCK stream\n\
         report(libc.socket(40, 2, 0))   # AF_VSOCK dgram",
        "DENIED EPERM",
        2,
    )
    .await;
}

// ---------------------------------------------------------------------------
// Network.

/// A peer that the host itself can reach (a test host in a network namespace
/// made for this test), and the session cannot.
#[tokio::test(flavor = "multi_thread")]
async fn connect_to_a_non_loopback_address() {
    require_sandbox!();
    let peer = crate::netpeer::Peer::start().expect("test peer");
    assert!(
        peer.host_can_connect(),
        "the peer must be reachable from the host"
    );
    let s = open(None).await;
    let (_, out) = py(
        &s,
        &format!(
            "import socket\ns = socket.socket()\ns.settimeout(3)\n\
             try:\n    s.connect(('{}', {}))\n    print('CONNECTED')\n\
             except OSError as e:\n    print('DENIED', e.errno)",
            peer.addr, peer.port
        ),
    )
    .await;
    assert!(out.contains("DENIED"), "{out}");
    assert_eq!(
        peer.accepted(),
        1,
        "only the host's own check may have connected"
    );
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_to_the_hosts_loopback() {
    require_sandbox!();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = open(None).await;
    let (_, out) = py(
        &s,
        &format!(
            "import socket\ns = socket.socket()\ns.settimeout(3)\n\
             try:\n    s.connect(('127.0.0.1', {port}))\n    print('CONNECTED')\n\
             except OSError as e:\n    print('DENIED', e.errno)"
        ),
    )
    .await;
    assert!(
        out.contains("DENIED 111"),
        "expected ECONNREFUSED from the session's own lo: {out}"
    );
    assert!(
        listener.accept().is_err(),
        "the host listener got a connection"
    );
    s.close().await.unwrap();
}

/// `none` is no network at all: no interface up, and no IP socket of any
/// protocol (TCP, UDP, MPTCP, ICMP, IPv6) can even be created.
#[tokio::test(flavor = "multi_thread")]
async fn network_none_has_no_interface_and_no_ip_socket() {
    require_sandbox!();
    let s = open_with(policy("strict"), None).await;
    let (_, out) = py(
        &s,
        "import socket\n\
         for fam, typ, proto in [(2, 1, 0), (2, 2, 0), (2, 1, 262), (10, 1, 0), (10, 2, 0), (2, 2, 1)]:\n\
         \x20   try:\n\
         \x20       socket.socket(fam, typ, proto)\n\
         \x20       print('CREATED', fam, typ, proto)\n\
         \x20   except OSError as e:\n\
         \x20       print('DENIED', e.errno)",
    )
    .await;
    assert_eq!(
        out.matches(&format!("DENIED {}", libc::EAFNOSUPPORT))
            .count(),
        6,
        "every IP socket must be refused: {out}"
    );
    let r = bash(
        &s,
        "ip link set lo up 2>/dev/null; echo up=$?; ip -o link show up | wc -l; ip -o link",
    )
    .await;
    let text = r.text_content();
    assert!(text.contains("up=2"), "lo could be brought up: {text}");
    assert!(text.contains("\n0\n"), "an interface is up: {text}");
    assert!(text.contains("lo") && !text.contains("state UP"), "{text}");
    s.close().await.unwrap();
}

/// With the IP socket refusal switched off, landlock still refuses every TCP
/// bind and connect under `none`: the second wall holds on its own. On a kernel
/// without landlock's TCP rules (ABI < 4) nothing else covers TCP then, so the
/// session refuses to open and names the missing right.
#[tokio::test(flavor = "multi_thread")]
async fn network_none_denies_tcp_even_without_the_socket_filter() {
    require_sandbox!();
    let mut cfg = config();
    cfg.weakened.inet_guard = true;
    if hands::sandbox::sys::landlock_abi().unwrap() < 4 {
        let err = try_open_cfg(&cfg, policy("strict"), None)
            .await
            .err()
            .expect("a session without TCP rules or socket refusal opened");
        let err = err.to_string();
        assert!(
            err.contains("landlock-net") && err.contains("no other layer"),
            "{err}"
        );
        return;
    }
    let s = open_cfg(&cfg, policy("strict"), None).await;
    let (_, out) = py(
        &s,
        "import socket\ns = socket.socket()\n\
         try:\n    s.bind(('127.0.0.1', 8080))\n    print('BOUND')\n\
         except OSError as e:\n    print('DENIED', e.errno)\n\
         c = socket.socket()\n\
         try:\n    c.connect(('127.0.0.1', 22))\n    print('CONNECTED')\n\
         except OSError as e:\n    print('DENIED', e.errno)",
    )
    .await;
    assert_eq!(
        out.matches("DENIED 13").count(),
        2,
        "landlock should refuse TCP: {out}"
    );
    s.close().await.unwrap();
}

/// The x32 ABI numbers every system call again (bit 30 set) under the same
/// architecture: a deny list keyed by number would miss them all. Refused by
/// the session's own filter (EPERM; a kernel without x32 would say ENOSYS).
#[cfg(target_arch = "x86_64")]
#[tokio::test(flavor = "multi_thread")]
async fn x32_system_calls_bypass_nothing() {
    require_sandbox!();
    denied(
        "report(libc.syscall(0x40000000 + 39))\nreport(libc.syscall(0x40000000 + 90, b'/workspace', 0o4755))",
        "DENIED EPERM",
        2,
    )
    .await;
}

/// MPTCP sockets are not TCP to landlock on every kernel: refused everywhere,
/// as a kernel without MPTCP would (programs fall back to TCP).
#[tokio::test(flavor = "multi_thread")]
async fn mptcp_sockets_are_refused() {
    require_sandbox!();
    denied(
        "report(libc.socket(2, 1, 262))\nreport(libc.socket(10, 1, 262))",
        "DENIED EPROTONOSUPPORT",
        2,
    )
    .await;
}

/// Netlink is for `ip` and getaddrinfo: routing only. Kernel uevents of the
/// host's devices, audit, generic netlink, netfilter and socket diagnostics are
/// refused.
#[tokio::test(flavor = "multi_thread")]
async fn netlink_families_other_than_routing() {
    require_sandbox!();
    let s = open(None).await;
    let (_, out) = py(
        &s,
        &syscall_probe(
            "for proto in [15, 9, 16, 12, 4, 6]:\n    report(libc.socket(16, 3, proto))\n\
             fd = libc.socket(16, 3, 0)\nprint('ROUTE', 'ok' if fd >= 0 else 'refused')",
        ),
    )
    .await;
    assert_eq!(out.matches("DENIED EPERM").count(), 6, "{out}");
    assert!(out.contains("ROUTE ok"), "routing netlink must work: {out}");
    let r = bash(&s, "ip -brief address show lo").await;
    assert!(r.text_content().contains("127.0.0.1"), "{r:?}");
    s.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// Privileges.

#[tokio::test(flavor = "multi_thread")]
async fn write_into_sys_fs_cgroup() {
    require_sandbox!();
    let s = open(None).await;
    let r = bash(
        &s,
        "echo 0 > /sys/fs/cgroup/pids/hands/cgroup.procs; echo max > /sys/fs/cgroup/memory/memory.limit_in_bytes; \
         mkdir -p /tmp/cg && mount -t cgroup -o pids none /tmp/cg && echo MOUNTED",
    )
    .await;
    assert!(r.is_error && !r.text_content().contains("MOUNTED"), "{r:?}");
    // The session's limits on the host are untouched.
    let cg = s.cgroup().unwrap();
    assert!(!cg.procs().is_empty());
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn change_uid() {
    require_sandbox!();
    denied(
        "report(libc.setuid(0))\nreport(libc.setresuid(0, 0, 0))\nreport(libc.setgid(0))\nreport(libc.setgroups(0, None))",
        "DENIED EPERM",
        4,
    )
    .await;
}

/// A setuid-root binary visible in the sandbox must not grant root or any
/// capability: the read-only mounts are nosuid, no_new_privs is set, and the
/// bounding set is empty.
#[tokio::test(flavor = "multi_thread")]
async fn gain_capability_through_setuid_binary() {
    require_sandbox!();
    // Outside /tmp: the sandbox's private /tmp would cover it.
    let dir = tempfile::Builder::new().tempdir_in("/var/tmp").unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for prog in ["cat", "id"] {
        let dst = bin.join(format!("suid{prog}"));
        std::fs::copy(format!("/usr/bin/{prog}"), &dst).unwrap();
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o4755)).unwrap();
    }
    let mut p = policy("default");
    p.filesystem.read_only.push(bin.clone());
    let s = open_with(p, None).await;
    let b = bin.display();
    let r = bash(&s, &format!("{b}/suidid; {b}/suidcat /etc/shadow")).await;
    let text = r.text_content();
    assert!(
        !text.contains("euid=0") && !text.contains("uid=0("),
        "{text}"
    );
    assert!(r.is_error && text.contains("Permission denied"), "{text}");
    let r = bash(&s, "grep -E 'Cap(Prm|Eff|Bnd|Amb)' /proc/self/status").await;
    assert_eq!(
        r.text_content().matches("0000000000000000").count(),
        4,
        "{r:?}"
    );
    s.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// What a session leaves on the host. Each attack is checked where it would
// land: on the host, while the session runs and after it ends.

/// The attack: copy a shell into the workspace and make it set-user-ID root,
/// so that any user of the host runs it as root. Both layers on: refused inside,
/// and nothing privileged on the host.
#[tokio::test(flavor = "multi_thread")]
async fn setuid_shell_planted_in_the_workspace() {
    require_sandbox!();
    let s = open(None).await;
    let r = bash(
        &s,
        "cp /bin/bash /workspace/rootsh && chmod 6755 /workspace/rootsh; \
         install -m 4755 /usr/bin/id /workspace/rootid; ls -l /workspace",
    )
    .await;
    assert!(
        r.text_content().contains("Operation not permitted"),
        "{r:?}"
    );
    let host = s.workspace().to_path_buf();
    let found = privileged_files(&host);
    assert!(found.is_empty(), "set-ID files on the host: {found:?}");
    assert!(host.join("rootsh").exists(), "the copy itself is allowed");
    close_and_drain(s).await;
    assert!(
        !host.join("rootsh").exists(),
        "the workspace outlived its session"
    );
}

/// Layer (a) on its own: a workspace the operator gave lives on the host's own
/// filesystem, which honours set-user-ID bits. Every system call that sets a
/// mode is refused a mode with set-user-ID or set-group-ID; `openat2`, whose
/// mode the filter cannot see, does not exist for the session's processes.
#[tokio::test(flavor = "multi_thread")]
async fn setid_modes_are_refused_by_every_call_that_sets_one() {
    require_sandbox!();
    let ws = user_workspace();
    // A set-user-ID file already there (the host's own doing): rewriting it
    // with the file tools drops the bit, as an in-place write by the owner would.
    let planted = ws.path().join("planted");
    std::fs::write(&planted, "old").unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::chown(&planted, Some(4242), Some(4242)).unwrap();
    let s = open(Some(ws.path())).await;
    let r = tool(
        &s,
        "write",
        json!({"file_path": "planted", "content": "new"}),
    )
    .await;
    assert!(!r.is_error, "{r:?}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&planted).unwrap().mode() & 0o7777, 0o755);
    let (_, out) = py(
        &s,
        &syscall_probe(
            r#"import struct
AT = -100
open("/workspace/f", "w").close()
b = lambda s: s.encode()
report(libc.syscall(90, b("/workspace/f"), 0o4755))                 # chmod
fd = os.open("/workspace/f", os.O_RDONLY)
report(libc.syscall(91, fd, 0o2755))                                # fchmod
report(libc.syscall(268, AT, b("/workspace/f"), 0o6755))            # fchmodat
report(libc.syscall(452, AT, b("/workspace/f"), 0o4755, 0))         # fchmodat2
report(libc.syscall(2, b("/workspace/o"), os.O_CREAT | os.O_WRONLY, 0o4755))       # open
report(libc.syscall(257, AT, b("/workspace/oa"), os.O_CREAT | os.O_WRONLY, 0o2755)) # openat
report(libc.syscall(257, AT, b("/workspace"), 0o20200000 | os.O_WRONLY, 0o4755))  # O_TMPFILE
report(libc.syscall(85, b("/workspace/c"), 0o4755))                 # creat
report(libc.syscall(133, b("/workspace/n"), 0o100000 | 0o4755, 0))  # mknod, a regular file
report(libc.syscall(259, AT, b("/workspace/na"), 0o100000 | 0o2755, 0))  # mknodat
report(libc.syscall(83, b("/workspace/d"), 0o2755))                 # mkdir
report(libc.syscall(258, AT, b("/workspace/da"), 0o4755))           # mkdirat
how = struct.pack("QQQ", os.O_CREAT | os.O_WRONLY, 0o4755, 0)
buf = ctypes.create_string_buffer(how)
report(libc.syscall(437, AT, b("/workspace/o2"), buf, len(how)))    # openat2
"#,
        ),
    )
    .await;
    assert_eq!(out.matches("DENIED EPERM").count(), 12, "{out}");
    assert_eq!(out.matches("DENIED ENOSYS").count(), 1, "openat2: {out}");
    assert!(!out.contains("ALLOWED"), "{out}");
    // Nor can one be brought in: a hard link to a set-user-ID program of the
    // read-only paths crosses mounts (and the host protects hard links).
    let r = bash(&s, "ln /usr/bin/su su || ln /usr/bin/passwd pw").await;
    assert!(r.is_error, "{r:?}");
    // The ordinary modes still work.
    let r = bash(
        &s,
        "chmod 755 f && mkdir -m 1777 sticky && stat -c %a f sticky",
    )
    .await;
    assert!(!r.is_error && r.text_content().contains("1777"), "{r:?}");
    let found = privileged_files(ws.path());
    assert!(found.is_empty(), "set-ID files on the host: {found:?}");
    s.close().await.unwrap();
    let found = privileged_files(ws.path());
    assert!(
        found.is_empty(),
        "set-ID files on the host after the session: {found:?}"
    );
}

/// Layer (b) on its own: with the seccomp refusal switched off the session can
/// set the bit, but the workspace hands made is a filesystem mounted nosuid on
/// the host, so a host user who runs the file does not become root.
#[tokio::test(flavor = "multi_thread")]
async fn setuid_file_on_the_workspace_filesystem_grants_nothing_on_the_host() {
    require_sandbox!();
    let mut cfg = config();
    cfg.weakened.setid_guard = true;
    let s = open_cfg(&cfg, policy("default"), None).await;
    let r = bash(
        &s,
        "cp /usr/bin/id rootid && chmod 4755 rootid && stat -c %a rootid",
    )
    .await;
    assert!(
        r.text_content().contains("4755"),
        "the filter is off, so the bit is set inside: {r:?}"
    );
    let file = s.workspace().join("rootid");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o7777),
        (0, 0o4755),
        "root's set-user-ID file"
    );
    let vfs = nix::sys::statvfs::statvfs(s.workspace()).unwrap();
    assert!(
        vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_NOSUID)
            && vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_NODEV),
        "{:?}",
        vfs.flags()
    );
    let out = run_as_nobody(&file, &[]);
    assert!(out.contains("uid=65534"), "{out}");
    assert!(!out.contains("euid=0"), "the host honoured the bit: {out}");
    close_and_drain(s).await;
    assert!(!file.exists());
}

/// The control for the two tests above: the same file on a filesystem that
/// honours the bit does make `nobody` root, so `run_as_nobody` can tell.
#[test]
fn run_as_nobody_sees_a_set_user_id_file_that_the_host_honours() {
    let dir = user_workspace();
    let file = dir.path().join("rootid");
    std::fs::copy("/usr/bin/id", &file).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o4755)).unwrap();
    assert!(run_as_nobody(&file, &[]).contains("euid=0"));
    assert_eq!(privileged_files(dir.path()).len(), 1);
}

/// Opens a session in the directory `given`, which must be refused; returns
/// the error's text.
async fn refused_workspace(
    cfg: &hands::sandbox::SandboxConfig,
    given: &std::path::Path,
    allow_root: bool,
) -> String {
    let opts = hands::session::SessionOptions::new(std::sync::Arc::new(policy("default")))
        .in_dir(given.to_path_buf(), allow_root);
    match hands::session::Session::open(cfg, opts).await {
        Ok(_) => panic!("{given:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

/// A workspace owned by root would make everything the agent writes root's on
/// the host: refused unless the operator says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_root_owned_workspace_needs_an_explicit_opt_in() {
    require_sandbox!();
    let dir = tempfile::Builder::new().tempdir_in("/var/tmp").unwrap();
    let err = refused_workspace(&config(), dir.path(), false).await;
    assert!(err.contains("owned by root"), "{err}");
    let s = hands::session::Session::open(
        &config(),
        hands::session::SessionOptions::new(std::sync::Arc::new(policy("default")))
            .in_dir(dir.path().to_path_buf(), true),
    )
    .await
    .unwrap();
    s.close().await.unwrap();
    // The command line says the same, and names the flag.
    let out = std::process::Command::new(hands_bin())
        .args(["exec", "--workspace"])
        .arg(dir.path())
        .args(["--", "/bin/true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-root-workspace"));
}

/// File capabilities and ACLs cannot do what the set-user-ID bit cannot:
/// setting `security.capability` needs CAP_SETFCAP, which no process of a
/// session has, `trusted.*` needs CAP_SYS_ADMIN, and an ACL never carries set-ID
/// bits. Another `security.*` name is the kernel's to judge, and the session gets
/// what an unprivileged host user gets (the control below): refused by the
/// capability check, or, on kernels whose BPF LSM answers that hook first
/// (Debian 12's 6.1), allowed to the file's owner, where no module reads it.
#[tokio::test(flavor = "multi_thread")]
async fn file_capabilities_and_acls_grant_nothing() {
    require_sandbox!();
    let ws = user_workspace();
    let s = open(Some(ws.path())).await;
    let (_, out) = py(
        &s,
        r#"import os, struct, shutil
shutil.copy("/usr/bin/id", "/workspace/capid")
# VFS_CAP_REVISION_2 with cap_setuid (7) permitted and effective.
cap = struct.pack("<IIIII", 0x02000001, 1 << 7, 1 << 7, 0, 0)
for name in ["security.capability", "trusted.x", "security.x"]:
    try:
        os.setxattr("/workspace/capid", name, cap)
        print("SET", name)
    except OSError as e:
        print("DENIED", name, e.errno)
# An access ACL (user::rwx group::rwx other::rwx) on a file of our own.
acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, 7, 0xffffffff) for tag in (1, 4, 0x20))
os.setxattr("/workspace/capid", "system.posix_acl_access", acl)
print("MODE %o" % os.stat("/workspace/capid").st_mode)
"#,
    )
    .await;
    assert!(out.contains("DENIED security.capability 1"), "{out}");
    assert!(out.contains("DENIED trusted.x 1"), "{out}");
    assert!(out.contains("MODE 100777"), "{out}");
    // The control: the same call by an unprivileged host user on its own file.
    let control = tempfile::Builder::new().tempdir_in("/var/tmp").unwrap();
    let file = control.path().join("f");
    std::fs::write(&file, "x").unwrap();
    std::os::unix::fs::chown(control.path(), Some(4242), Some(4242)).unwrap();
    std::os::unix::fs::chown(&file, Some(4242), Some(4242)).unwrap();
    let host = std::process::Command::new("setpriv")
        .args([
            "--reuid=4242",
            "--regid=4242",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args(["/usr/bin/python3", "-c"])
        .arg(format!(
            "import os
try:
    os.setxattr({:?}, 'security.x', b'1')
    print('SET security.x')
except OSError as e:
    print('DENIED security.x', e.errno)",
            file.to_str().unwrap()
        ))
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&host.stdout).trim().to_string();
    assert!(
        host.contains("security.x"),
        "the control did not run: {host}"
    );
    assert!(
        out.contains(&host),
        "the session got more than a host user ({host}): {out}"
    );
    let found = privileged_files(ws.path());
    assert!(found.is_empty(), "privileged files on the host: {found:?}");
    s.close().await.unwrap();
}

/// The attack: one session replaces a directory of its workspace with a symlink
/// to `/`; a later session given that directory would mount the host's root
/// read-write. Every component is resolved without following a symlink.
#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_cannot_turn_a_later_workspace_into_the_hosts_root() {
    require_sandbox!();
    let ws = user_workspace();
    for d in ["sub", "dir"] {
        std::fs::create_dir(ws.path().join(d)).unwrap();
        std::os::unix::fs::chown(ws.path().join(d), Some(4242), Some(4242)).unwrap();
    }
    let s = open(Some(ws.path())).await;
    sh(
        &s,
        "rm -r sub && ln -s / sub && rm -r dir && ln -s /etc dir",
    )
    .await;
    s.close().await.unwrap();
    for given in [
        ws.path().join("sub"),
        ws.path().join("sub/var/tmp"),
        ws.path().join("dir/.."),
    ] {
        let err = refused_workspace(&config(), &given, true).await;
        assert!(err.contains("symbolic link"), "{given:?}: {err}");
    }
}

/// `/`, the directories above hands' own and the ones inside them are never a
/// workspace, whoever owns them and whatever the operator allows.
#[tokio::test(flavor = "multi_thread")]
async fn workspaces_that_would_expose_the_host_or_hands_itself() {
    require_sandbox!();
    let cfg = config();
    let inside = cfg.state_dir.join("slots");
    for (given, reason) in [
        (std::path::PathBuf::from("/"), "root"),
        (cfg.state_dir.parent().unwrap().to_path_buf(), "contains"),
        (cfg.state_dir.clone(), "contains"),
        (inside, "inside"),
        (std::path::PathBuf::from("/proc/self"), "/proc"),
    ] {
        let err = refused_workspace(&cfg, &given, true).await;
        assert!(err.contains(reason), "{given:?}: {err}");
    }
}

/// The helper runs as the session's uid: the kernel would let the session's
/// processes signal it, change its limits and its scheduling. None of it
/// reaches the helper, and the session keeps working.
#[tokio::test(flavor = "multi_thread")]
async fn the_session_cannot_disable_its_helper() {
    require_sandbox!();
    let s = open(None).await;
    let helper = s.helper_pid();
    let limits_before = std::fs::read_to_string(format!("/proc/{helper}/limits")).unwrap();
    let _ = bash(
        &s,
        "for sig in SEGV BUS KILL TERM STOP INT HUP USR1 33; do kill -s $sig 1; done; \
         for t in /proc/1/task/*; do kill -SEGV ${t##*/}; done; \
         prlimit --pid 1 --nofile=4:4; prlimit --pid 1 --as=1000000; \
         renice -n 19 -p 1; renice -n 19 -u $(id -u); taskset -p 1 1; \
         chrt -i -p 0 1; ionice -c 3 -p 1; echo done",
    )
    .await;
    let (_, out) = py(
        &s,
        &syscall_probe(
            "report(libc.syscall(302, 1, 7, None, None))           # prlimit64(1, NOFILE)\n\
             report(libc.syscall(141, 0, 1, 19))                    # setpriority(PROCESS, 1)\n\
             report(libc.syscall(141, 2, 0, 19))                    # setpriority(USER, self)\n\
             report(libc.syscall(141, 1, 0, 19))                    # setpriority(PGRP)\n\
             report(libc.syscall(203, 1, 8, ctypes.byref(ctypes.c_ulong(1))))  # sched_setaffinity\n\
             report(libc.syscall(251, 1, 1, 7 << 13))               # ioprio_set(PROCESS, 1)\n\
             report(libc.syscall(302, 0, 7, None, None))            # prlimit64(self)\n",
        ),
    )
    .await;
    assert_eq!(out.matches("DENIED EPERM").count(), 6, "{out}");
    assert!(
        out.contains("ALLOWED 0"),
        "a process's own limits stay its own: {out}"
    );
    assert!(pid_alive(helper as u32), "the helper died");
    let stat = std::fs::read_to_string(format!("/proc/{helper}/stat")).unwrap();
    assert!(!stat.contains(") T "), "the helper was stopped: {stat}");
    let limits_after = std::fs::read_to_string(format!("/proc/{helper}/limits")).unwrap();
    assert_eq!(limits_before, limits_after);
    // Still serving: a file tool and a new shell. And the extra landlock layer
    // of the session's processes (signal scoping) takes no file access away: a
    // directory moves across directories with rename(2), not a copy.
    sh(
        &s,
        "mkdir a b && python3 -c \"import os; os.rename('a', 'b/a')\"",
    )
    .await;
    let r = tool(&s, "write", json!({"file_path": "ok.txt", "content": "ok"})).await;
    assert!(!r.is_error, "{r:?}");
    assert_eq!(sh(&s, "cat ok.txt").await, "ok");
    s.close().await.unwrap();
}

/// The helper's channel to the worker (requests on its fd 3, answers on its fd
/// 4) is the one thing in the session that speaks to the worker: a process of
/// the session that held either socket could forge answers or read other
/// calls' requests. The helper runs as the session's uid, but nothing of the
/// session can take its descriptors: not through `/proc/1/fd`, not with
/// `pidfd_getfd`, not by inheriting them.
#[tokio::test(flavor = "multi_thread")]
async fn attack_the_session_cannot_take_the_helpers_channel_sockets() {
    require_sandbox!();
    let s = open(None).await;
    let (_, out) = py(
        &s,
        &syscall_probe(
            r#"
for fd in (3, 4):
    pidfd = os.pidfd_open(1)
    report(libc.syscall(438, pidfd, fd, 0))  # pidfd_getfd(1, fd)
    try:
        os.open('/proc/1/fd/%d' % fd, os.O_RDWR)
        print('OPENED', fd)
    except OSError as e:
        print('REFUSED', errno.errorcode[e.errno])
try:
    print('LISTED', os.listdir('/proc/1/fd'))
except OSError as e:
    print('REFUSED', errno.errorcode[e.errno])
for fd in range(3, 64):
    try:
        print('HELD', fd, os.readlink('/proc/self/fd/%d' % fd))
    except OSError:
        pass
"#,
        ),
    )
    .await;
    assert_eq!(out.matches("DENIED EPERM").count(), 2, "{out}");
    assert_eq!(out.matches("REFUSED").count(), 3, "{out}");
    for taken in ["ALLOWED", "OPENED", "LISTED", "socket:["] {
        assert!(!out.contains(taken), "{taken}: {out}");
    }
    // The channel still works.
    let r = tool(&s, "write", json!({"file_path": "ok.txt", "content": "ok"})).await;
    assert!(!r.is_error, "{r:?}");
    assert_eq!(sh(&s, "cat ok.txt").await, "ok");
    s.close().await.unwrap();
}

/// A call cancelled while its large request is still being written to the
/// helper must leave the channel framed: the next calls work.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_cancelled_mid_write_leaves_the_helper_channel_framed() {
    require_sandbox!();
    let s = open(None).await;
    let content = "x".repeat(24 << 20);
    for i in 0..8 {
        let input = json!({"file_path": format!("big{i}"), "content": content});
        // Cancelled by its deadline after the first bytes are on their way.
        let deadline =
            tokio::time::Instant::now() + std::time::Duration::from_micros(200 + i * 300);
        let spec = hands::session::CallSpec::new(format!("big{i}"), "write", input.to_string())
            .with_deadline(Some(deadline));
        let submitted = s.submit(spec).unwrap();
        let (_, outcome) = submitted.result().await.unwrap();
        let _ = outcome;
    }
    for i in 0..3 {
        let r = tool(
            &s,
            "write",
            json!({"file_path": format!("small{i}"), "content": "ok"}),
        )
        .await;
        assert!(!r.is_error, "{r:?}");
        let r = tool(&s, "read", json!({"file_path": format!("small{i}")})).await;
        assert!(r.text_content().contains("ok"), "{r:?}");
    }
    assert!(sh(&s, "echo alive").await.contains("alive"));
    s.close().await.unwrap();
}

/// What the session sees of the host: the kernel's command line, the host path
/// of the workspace and of the hands binary are hidden.
#[tokio::test(flavor = "multi_thread")]
async fn host_paths_and_boot_parameters_are_hidden() {
    require_sandbox!();
    let s = open(None).await;
    let cfg = config();
    let text = sh(
        &s,
        "echo cmdline=$(wc -c < /proc/cmdline); tr '\\0' ' ' < /proc/1/cmdline; echo; \
         cat /proc/self/mountinfo; cat /proc/keys /proc/key-users /proc/timer_list 2>&1 | wc -c",
    )
    .await;
    assert!(text.contains("cmdline=0"), "{text}");
    let exe = cfg.helper_exe.display().to_string();
    assert!(
        !text.contains(&exe),
        "the helper's host path is visible: {text}"
    );
    let ws = s.workspace().display().to_string();
    assert!(
        !text.contains(&ws),
        "the workspace's host path is visible: {text}"
    );
    let state = cfg.state_dir.display().to_string();
    assert!(
        !text.contains(&state),
        "the state directory is visible: {text}"
    );
    assert!(
        text.trim_end().ends_with('0'),
        "host keys or timers are visible: {text}"
    );
    s.close().await.unwrap();
}

/// The attack: write escape sequences to `/dev/tty`, the terminal of whoever
/// runs `hands exec`. The sandbox has no controlling terminal.
#[test]
fn the_sandbox_cannot_write_to_the_operators_terminal() {
    if !crate::util::sandbox_available("the_sandbox_cannot_write_to_the_operators_terminal") {
        return;
    }
    // `script` runs hands exec on a new pseudo-terminal, as an operator's shell
    // would; everything written to that terminal comes back on its stdout.
    let cmd = format!(
        "{} exec -- /bin/sh -c 'printf \"\\033]0;TTYMARK\\007TTYMARK\" > /dev/tty; echo rc=$?'",
        hands_bin()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rc=") && !text.contains("rc=0"), "{text}");
    assert!(text.contains("No such device or address"), "{text}");
    assert!(
        !text.contains("TTYMARK"),
        "the sandbox wrote to the terminal: {text}"
    );
}

/// Workspaces are private to hands: whatever modes the agent gives its files
/// (umask 000, chmod 666), no other user of the host can list or read them,
/// because every directory above a workspace is root's alone.
#[tokio::test(flavor = "multi_thread")]
async fn another_host_user_cannot_read_a_workspace() {
    require_sandbox!();
    let s = open(None).await;
    sh(
        &s,
        "umask 000; echo private-notes > notes.txt; chmod 666 notes.txt; mkdir -m 777 open",
    )
    .await;
    let file = s.workspace().join("notes.txt");
    let as_nobody = |args: &[&str]| {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(args)
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let out = as_nobody(&["cat", file.to_str().unwrap()]);
    assert!(
        !out.contains("private-notes") && out.contains("Permission denied"),
        "{out}"
    );
    let cfg = config();
    for dir in [
        cfg.state_dir.join("workspaces"),
        cfg.data_dir.clone(),
        cfg.data_dir.join("disks"),
    ] {
        let out = as_nobody(&["ls", dir.to_str().unwrap()]);
        assert!(
            out.contains("Permission denied"),
            "{}: {out}",
            dir.display()
        );
    }
    s.close().await.unwrap();
}

/// `egress`: nothing leaves the session's namespace except through the
/// worker. UDP anywhere but the session's loopback is dropped at once; a TCP
/// connection to an address no rule allows is captured and reset (never a
/// hang, never the host's network); the sandbox cannot lift the barrier.
/// Runs on every kernel of the matrix: the nftables barrier must install.
#[tokio::test(flavor = "multi_thread")]
async fn egress_leaves_only_through_the_worker() {
    require_sandbox!();
    let s = open_with(policy("packages"), None).await;
    let (_, out) = py(
        &s,
        "import socket, time\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         try:\n\
         \x20   u.sendto(b'x', ('192.0.2.1', 53)); print('UDP SENT')\n\
         except OSError as e:\n\
         \x20   print('UDP DENIED', e.errno)\n\
         try:\n\
         \x20   c = socket.create_connection(('192.0.2.1', 80), 10)\n\
         \x20   c.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print('TCP READ', c.recv(10))\n\
         except OSError as e:\n\
         \x20   print('TCP REFUSED', e.errno)",
    )
    .await;
    assert!(
        out.contains(&format!("UDP DENIED {}", libc::EPERM)),
        "{out}"
    );
    // Reset or refused by the worker, never a timeout (a hang shows as
    // `TCP REFUSED None` after the 10 s connect timeout).
    assert!(
        out.contains(&format!("TCP REFUSED {}", libc::ECONNRESET))
            || out.contains(&format!("TCP REFUSED {}", libc::ECONNREFUSED))
            || out.contains("TCP READ b''"),
        "{out}"
    );
    let r = bash(
        &s,
        "ip route del default 2>&1; echo route=$?; ip link set lo down 2>&1; echo link=$?; \
         cat /etc/resolv.conf; env | grep -i '^https_proxy='",
    )
    .await;
    let text = r.text_content();
    assert!(
        text.contains("route=2") && text.contains("link=2"),
        "{text}"
    );
    assert!(text.contains("nameserver 127.0.0.1"), "{text}");
    assert!(text.contains("HTTPS_PROXY=http://127.0.0.1:3128"), "{text}");
    s.close().await.unwrap();
}

/// The worker's egress listeners live in each egress session's own network
/// namespace: another session (here one of `loopback` mode, open at the same
/// time as an egress one) finds nothing on their ports.
#[tokio::test(flavor = "multi_thread")]
async fn egress_listeners_are_not_reachable_from_another_session() {
    require_sandbox!();
    let egress = open_with(policy("packages"), None).await;
    let other = open_with(policy("default"), None).await;
    let probe = "import socket\n\
                 for port in (3128, 1080, 15001):\n\
                 \x20   try:\n\
                 \x20       socket.create_connection(('127.0.0.1', port), 5).close(); print('OPEN', port)\n\
                 \x20   except OSError as e:\n\
                 \x20       print('CLOSED', port, e.errno)";
    let (_, own) = py(&egress, probe).await;
    assert!(
        own.contains("OPEN 3128") && own.contains("OPEN 1080"),
        "{own}"
    );
    let (_, out) = py(&other, probe).await;
    assert_eq!(out.matches("CLOSED").count(), 3, "{out}");
    egress.close().await.unwrap();
    other.close().await.unwrap();
}
