//! The command line as a user meets it: `hands exec`, `hands tool`,
//! `hands doctor`, `hands demo`, `hands policy`, run as the real binary; and
//! the repository's own documentation, which that binary and the README point
//! to.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::require_sandbox;
use crate::util::*;

fn hands(args: &[&str]) -> std::process::Output {
    Command::new(hands_bin())
        .args(args)
        .output()
        .expect("run hands")
}

#[test]
fn exec_streams_output_and_exits_with_the_commands_status() {
    require_sandbox!();
    let out = hands(&[
        "exec",
        "--env",
        "default",
        "--",
        "/bin/sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
}

/// A session's file modes and descriptor limit are its own, not the
/// worker's: started under `umask 077` (a hardened unit's) and with its soft
/// descriptor limit raised to the hard one (the worker unit sets both to a
/// million), strict's narrow `/etc` is still a directory the session can
/// enter, files it makes are 0644, and it gets a service's usual 1024 soft
/// descriptors (hard: at most 524288).
#[test]
fn a_session_takes_neither_the_workers_umask_nor_its_descriptor_limit() {
    require_sandbox!();
    let out = Command::new("/bin/sh")
        .args([
            "-c",
            "umask 077 && ulimit -Sn $(ulimit -Hn) && exec \"$0\" \"$@\"",
            hands_bin(),
            "exec",
            "--env",
            "strict",
            "--",
            "/bin/sh",
            "-c",
            "cat /etc/passwd >/dev/null && echo etc $(stat -c %a /etc) && \
             touch /workspace/f && echo file $(stat -c %a /workspace/f) && \
             echo umask $(umask) nofile $(ulimit -Sn):$(ulimit -Hn)",
        ])
        .output()
        .expect("run hands under umask 077");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    assert!(
        hard > 1024,
        "this test needs a hard limit above 1024, not {hard}"
    );
    assert_eq!(
        stdout,
        format!(
            "etc 755\nfile 644\numask 0022 nofile 1024:{}\n",
            hard.min(524_288)
        )
    );
}

#[test]
fn exec_relays_stdin() {
    require_sandbox!();
    use std::io::Write;
    let mut child = Command::new(hands_bin())
        .args(["exec", "--", "/usr/bin/tr", "a-z", "A-Z"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO\n");
}

#[test]
fn exec_timeout_kills_the_tree_and_exits_124() {
    require_sandbox!();
    let out = hands(&[
        "exec",
        "--timeout",
        "0.5",
        "--",
        "/bin/sh",
        "-c",
        "sleep 100 & sleep 100",
    ]);
    assert_eq!(out.status.code(), Some(124), "{out:?}");
}

#[test]
fn exec_uses_the_given_workspace() {
    require_sandbox!();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.txt"), "from host\n").unwrap();
    // An operator's directory, owned by an unprivileged user.
    std::os::unix::fs::chown(dir.path(), Some(4242), Some(4242)).unwrap();
    let ws = dir.path().to_str().unwrap();
    let out = hands(&[
        "exec",
        "--workspace",
        ws,
        "--",
        "/bin/sh",
        "-c",
        "cat in.txt; echo made > out.txt",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from host\n");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out.txt")).unwrap(),
        "made\n"
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir.path().join("out.txt")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (4242, 4242),
        "owned by the workspace's owner"
    );
}

#[test]
fn exec_unknown_environment_is_a_clear_error() {
    let out = hands(&["exec", "--env", "no-such-env", "--", "/bin/true"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-env"), "{err}");
}

#[test]
fn tool_prints_the_result_as_json() {
    require_sandbox!();
    let out = hands(&[
        "tool",
        "--env",
        "default",
        "bash",
        r#"{"command":"echo hi"}"#,
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"content": [{"type": "text", "text": "hi"}], "is_error": false})
    );
    let out = hands(&["tool", "read", r#"{"file_path":"nope.txt"}"#]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["is_error"], true);
    let out = hands(&["tool", "read", "{not json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));
}

#[test]
fn doctor_reports_every_feature_and_passes_here() {
    require_sandbox!();
    let out = hands(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for f in [
        "landlock",
        "seccomp",
        "cgroups",
        "pid namespace",
        "network namespace",
        "session probe",
    ] {
        assert!(text.contains(f), "doctor omits {f}: {text}");
    }
    assert_eq!(out.status.code(), Some(0), "{text}");
}

#[test]
fn policy_check_accepts_shipped_policies_and_rejects_bad_ones() {
    let root = env!("CARGO_MANIFEST_DIR");
    let shipped: Vec<String> = std::fs::read_dir(format!("{root}/policies"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    let mut args = vec!["policy", "check"];
    args.extend(shipped.iter().map(String::as_str));
    let out = hands(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(format!("{root}/policies/default.toml")).unwrap();
    std::fs::write(
        &bad,
        text.replace("[limits]", "[limits]\nmemroy = \"1GiB\""),
    )
    .unwrap();
    let out = hands(&["policy", "check", bad.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("bad.toml") && all.contains("memroy"), "{all}");
}

/// Runs `hands` with extra environment variables and a working directory.
fn hands_in(args: &[&str], env: &[(&str, &Path)], cwd: &Path) -> std::process::Output {
    let mut cmd = Command::new(hands_bin());
    cmd.args(args).current_dir(cwd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run hands")
}

fn all_output(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A policy directory with one valid environment, `good`, and one file with an
/// invalid key, `bad.toml` (`limits.memory = "1GB"`).
fn directory_with_a_bad_policy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("good.toml"), policy_text("default", &[])).unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        policy_text("default", &[("memory = \"1GiB\"", "memory = \"1GB\"")]),
    )
    .unwrap();
    (dir, bad)
}

// ---- issue #11, item 3: one policy lookup ------------------------------------

/// Every command looks environments up the same way, and an invalid file in a
/// policy directory stops each of them with the file and the key, even when
/// the command asks for another environment (`default`, which would be found).
#[test]
fn every_command_refuses_an_invalid_policy_file_naming_it_and_its_key() {
    require_sandbox!();
    let (dir, bad) = directory_with_a_bad_policy();
    let worker = tempfile::tempdir().unwrap();
    let config = worker.path().join("worker.toml");
    std::fs::write(&config, "worker_id = \"w\"\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let config = config.to_str().unwrap();
    let env = [("HANDS_POLICY_DIR", dir.path())];
    for args in [
        &["exec", "--env", "default", "--", "/bin/true"][..],
        &["tool", "--env", "default", "bash", r#"{"command":"true"}"#],
        &["doctor", "--no-probe"],
        &["demo"],
        &["policy", "list"],
        &["worker", "--config", config],
    ] {
        let out = hands_in(args, &env, Path::new("/"));
        let text = all_output(&out);
        assert!(!out.status.success(), "hands {args:?} went on: {text}");
        assert!(
            text.contains(&format!("{}: limits.memory: ", bad.display())),
            "hands {args:?} does not name the file and the key: {text}"
        );
    }
}

/// `hands policy list --config` shows what that worker offers and where each
/// environment comes from: its own `policy_dirs` (relative to the file), the
/// built-in policies, and which built-in copy a file hides.
#[test]
fn policy_list_shows_each_offered_environment_and_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("pol");
    std::fs::create_dir(&pol).unwrap();
    std::fs::write(pol.join("custom.toml"), policy_text("default", &[])).unwrap();
    std::fs::write(
        pol.join("default.toml"),
        policy_text("default", &[("pids = 512", "pids = 100")]),
    )
    .unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        "worker_id = \"w\"\nlisten = \"127.0.0.1:0\"\npolicy_dirs = [\"pol\"]\n\
         environments = [\"custom\", \"default\", \"strict\"]\n",
    )
    .unwrap();
    let out = hands_in(
        &["policy", "list", "--config", config.to_str().unwrap()],
        &[],
        Path::new("/"),
    );
    let text = all_output(&out);
    assert!(out.status.success(), "{text}");
    let line = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no line for {name}: {text}"))
            .to_string()
    };
    let custom = pol.join("custom.toml");
    assert!(line("custom").contains(custom.to_str().unwrap()), "{text}");
    let default = line("default");
    assert!(
        default.contains(pol.join("default.toml").to_str().unwrap())
            && default.contains("hides built in"),
        "{text}"
    );
    assert!(line("strict").contains("built in"), "{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("build ")),
        "build is not offered: {text}"
    );
    assert!(text.contains("policy_dirs of"), "{text}");

    // `policy show` prints the file that wins.
    let out = hands_in(
        &[
            "policy",
            "show",
            "default",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
        Path::new("/"),
    );
    let text = all_output(&out);
    assert!(
        out.status.success() && text.contains("pids = 100"),
        "{text}"
    );
}

// ---- issue #11, item 7: honest answers at the edges --------------------------

#[test]
fn exec_of_a_missing_command_names_it_and_exits_127() {
    require_sandbox!();
    let out = hands(&["exec", "--", "nosuchcmd", "--flag"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(127), "{err}");
    assert!(
        err.contains("nosuchcmd: command not found"),
        "the command is not named: {err}"
    );
    let out = hands(&["exec", "--", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(127));
    // A directory cannot be executed (EACCES), whatever the host's file modes.
    let out = hands(&["exec", "--", "/usr"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "{err}");
    assert!(err.contains("/usr: cannot execute"), "{err}");
}

/// A policy directory with environment `small`: `default` with other limits.
fn small_environment(replace: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("small.toml"),
        policy_text("default", replace),
    )
    .unwrap();
    dir
}

fn tool_text(out: &std::process::Output) -> String {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("not a tool result: {}", all_output(out)));
    v["content"][0]["text"].as_str().unwrap_or("").to_string()
}

#[test]
fn a_call_killed_at_the_memory_limit_says_so_in_its_result() {
    require_sandbox!();
    let dir = small_environment(&[("memory = \"1GiB\"", "memory = \"64MiB\"")]);
    let out = hands_in(
        &[
            "tool",
            "--env",
            "small",
            "bash",
            r#"{"command": "python3 -c 'b = bytearray(1 << 30)'; echo status=$?"}"#,
        ],
        &[("HANDS_POLICY_DIR", dir.path())],
        Path::new("/"),
    );
    let text = tool_text(&out);
    assert!(text.contains("status=137"), "not OOM-killed: {text}");
    assert!(
        text.ends_with("killed: the session's memory limit (64 MiB) was reached"),
        "{text}"
    );
    // A call that stays within the limit reads as the SDK's would.
    let out = hands_in(
        &[
            "tool",
            "--env",
            "small",
            "bash",
            r#"{"command": "echo fine"}"#,
        ],
        &[("HANDS_POLICY_DIR", dir.path())],
        Path::new("/"),
    );
    assert_eq!(tool_text(&out), "fine");
}

#[test]
fn a_call_refused_processes_at_the_pids_limit_says_so_in_its_result() {
    require_sandbox!();
    let dir = small_environment(&[("pids = 512", "pids = 32")]);
    let bomb = "import os, time\nn = 0\nfor i in range(100):\n    try:\n        pid = os.fork()\n    except OSError as e:\n        print('fork failed:', e)\n        break\n    if pid == 0:\n        time.sleep(5)\n        os._exit(0)\n    n += 1\n";
    let input = serde_json::json!({
        "command": format!("cat > /tmp/bomb.py <<'EOF'\n{bomb}EOF\npython3 /tmp/bomb.py")
    })
    .to_string();
    let out = hands_in(
        &["tool", "--env", "small", "bash", &input],
        &[("HANDS_POLICY_DIR", dir.path())],
        Path::new("/"),
    );
    let text = tool_text(&out);
    assert!(
        text.contains("fork failed"),
        "the limit was not hit: {text}"
    );
    assert!(
        text.ends_with("processes refused: the session's pids limit (32) was reached"),
        "{text}"
    );
}

/// `hands` copied where an unprivileged user can run it.
fn binary_for_nobody() -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("hands-nobody-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("hands");
    std::fs::copy(hands_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, bin)
}

#[test]
fn non_root_is_told_root_is_required_and_nothing_is_left_behind() {
    let (dir, bin) = binary_for_nobody();
    let state = dir.path().join("state");
    let data = dir.path().join("data");
    let config = dir.path().join("worker.toml");
    std::fs::write(&config, "worker_id = \"w\"\nlisten = \"127.0.0.1:0\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    for args in [
        &["exec", "--", "/bin/true"][..],
        &["tool", "bash", r#"{"command":"true"}"#],
        &["worker", "--config", config.to_str().unwrap()],
        &["demo"],
        &["bench"],
    ] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .args(args)
            .env("HANDS_STATE_DIR", &state)
            .env("HANDS_DATA_DIR", &data)
            .current_dir("/")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "hands {args:?}: {err}");
        assert!(
            err.contains("must run as root") && err.contains("uid 65534"),
            "hands {args:?}: {err}"
        );
        assert!(
            !state.exists() && !data.exists(),
            "hands {args:?} left directories behind"
        );
    }
}

/// Each cause once: no error repeats its own cause.
#[test]
fn errors_are_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let bad_toml = dir.path().join("worker.toml");
    std::fs::write(&bad_toml, "worker_id = \"w\"\nlisen = 1\n").unwrap();
    let missing = dir.path().join("missing.toml");
    let (bad_toml, missing) = (bad_toml.to_str().unwrap(), missing.to_str().unwrap());
    let cases: [(&[&str], &str); 6] = [
        (
            &["worker", "--config", missing],
            "No such file or directory",
        ),
        (&["worker", "--config", bad_toml], "TOML parse error"),
        (&["worker", "--config", bad_toml], "unknown field `lisen`"),
        (
            &["exec", "--workspace", "/nonexistent/ws", "--", "/bin/true"],
            "No such file or directory",
        ),
        (
            &["exec", "--workspace", "/etc/hostname", "--", "/bin/true"],
            "not a directory",
        ),
        (
            &["conformance", "--grpc", "127.0.0.1:1"],
            "tcp connect error",
        ),
    ];
    for (args, cause) in cases {
        let out = hands(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "hands {args:?}: {err}");
        assert_eq!(
            err.matches(cause).count(),
            1,
            "hands {args:?} should say {cause:?} once: {err}"
        );
    }
}

/// strict shows no /etc/shadow at all: stricter than a denied read, and the
/// demo passes.
#[test]
fn demo_passes_in_the_strict_environment() {
    require_sandbox!();
    let out = hands(&["demo", "--env", "strict"]);
    let text = all_output(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("/etc/shadow is not in this environment at all"),
        "{text}"
    );
}

// ---- issue #11, item 8: the repository stands alone ---------------------------

/// The keys serde expects in one table, from the binary's own refusal of an
/// unknown key there ("unknown field `zz_unknown`, expected one of `a`, `b`").
fn expected_keys(args: &[&str], file: &Path, text: &str) -> Vec<String> {
    std::fs::write(file, text).unwrap();
    let out = hands(&[args, &[file.to_str().unwrap()]].concat());
    let all = all_output(&out);
    let line = all
        .lines()
        .find(|l| l.contains("unknown field `zz_unknown`, expected"))
        .unwrap_or_else(|| panic!("no list of keys in: {all}"));
    let list = line.split("expected").nth(1).unwrap();
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect()
}

/// Someone with only the repository, or only the binary, finds every piece of
/// user documentation there: no pointer out of the repository or into source
/// files from the README, `deploy/`, `docs/`, the shipped policies or any
/// `--help`; every `docs/` link of the README resolves; `docs/worker.md`,
/// `docs/gateway.md` and `docs/policy.md` document every key the binary accepts.
#[test]
fn the_repository_and_the_binary_document_themselves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut user_docs = vec![root.join("README.md"), root.join("deploy/README.md")];
    for dir in ["docs", "policies"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir)) {
            user_docs.extend(entries.map(|e| e.unwrap().path()));
        }
    }
    for path in &user_docs {
        let text = std::fs::read_to_string(path).unwrap();
        for bad in ["../shared", "shared/", "DESIGN", "§", "module doc"] {
            assert!(
                !text.contains(bad),
                "{} points outside the repository or into the source ({bad:?})",
                path.display()
            );
        }
        if !path.ends_with("README.md") {
            assert!(
                !text.contains("src/"),
                "{} points at a source file",
                path.display()
            );
        }
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut linked = 0;
    for link in readme.split("](").skip(1) {
        let target = link.split(')').next().unwrap().split('#').next().unwrap();
        if target.starts_with("docs/") {
            linked += 1;
            assert!(
                root.join(target).is_file(),
                "README links to missing {target}"
            );
        }
    }
    for doc in [
        "docs/worker.md",
        "docs/policy.md",
        "docs/claude-managed-agents.md",
        "docs/gateway.md",
    ] {
        assert!(
            readme.contains(&format!("]({doc}")),
            "README does not link {doc}"
        );
    }
    assert!(linked >= 4);

    // Every --help.
    let mut commands: Vec<Vec<&str>> = vec![vec![]];
    for c in [
        "demo",
        "worker",
        "gateway",
        "exec",
        "tool",
        "doctor",
        "bench",
        "conformance",
        "policy",
        "pki",
    ] {
        commands.push(vec![c]);
    }
    for c in [
        ["policy", "check"],
        ["policy", "list"],
        ["policy", "show"],
        ["pki", "init"],
    ] {
        commands.push(c.to_vec());
    }
    for c in commands {
        let out = hands(&[&c[..], &["--help"]].concat());
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "hands {c:?} --help: {help}");
        for bad in ["src/", ".rs", "shared/", "DESIGN", "§"] {
            assert!(
                !help.contains(bad),
                "hands {c:?} --help points at {bad:?}:\n{help}"
            );
        }
    }

    // Every key the binary accepts is documented.
    let tmp = tempfile::tempdir().unwrap();
    let worker_doc = std::fs::read_to_string(root.join("docs/worker.md")).unwrap();
    let cfg = tmp.path().join("worker.toml");
    let worker = ["worker", "--config"];
    let mut keys = Vec::new();
    for table in [
        "",
        "[tunnel]\n",
        "[journal]\n",
        "[sessions]\n",
        "[audit]\n",
        "[anthropic]\n",
    ] {
        let prefix = table.trim().trim_matches(|c| c == '[' || c == ']');
        let text = format!("worker_id = \"w\"\n{table}zz_unknown = 1\n");
        for k in expected_keys(&worker, &cfg, &text) {
            keys.push(if prefix.is_empty() {
                k
            } else {
                format!("{prefix}.{k}")
            });
        }
    }
    assert!(keys.len() > 30, "{keys:?}");
    for k in &keys {
        let bare = k.rsplit('.').next().unwrap();
        assert!(
            worker_doc.contains(&format!("`{k}`")) || worker_doc.contains(&format!("`{bare}`")),
            "docs/worker.md does not document `{k}`"
        );
    }
    let gateway_doc = std::fs::read_to_string(root.join("docs/gateway.md")).unwrap();
    let gateway = ["gateway", "--config"];
    let mut keys = expected_keys(&gateway, &cfg, "zz_unknown = 1\n");
    for table in ["tunnel", "api"] {
        let text = format!("[{table}]\nzz_unknown = 1\n");
        keys.extend(
            expected_keys(&gateway, &cfg, &text)
                .into_iter()
                .map(|k| format!("{table}.{k}")),
        );
    }
    assert!(keys.len() > 12, "{keys:?}");
    for k in &keys {
        assert!(
            gateway_doc.contains(&format!("`{k}`")) || gateway_doc.contains(&format!("`[{k}]`")),
            "docs/gateway.md does not document `{k}`"
        );
    }
    let policy_doc = std::fs::read_to_string(root.join("docs/policy.md")).unwrap();
    let pol = tmp.path().join("x.toml");
    let valid = policy_text("default", &[]);
    let check = ["policy", "check"];
    let mut keys = expected_keys(&check, &pol, &format!("zz_unknown = 1\n{valid}"));
    for table in ["filesystem", "network", "limits", "tools", "sandbox"] {
        let text = valid.replace(
            &format!("[{table}]\n"),
            &format!("[{table}]\nzz_unknown = 1\n"),
        );
        keys.extend(
            expected_keys(&check, &pol, &text)
                .into_iter()
                .map(|k| format!("{table}.{k}")),
        );
    }
    // The [egress] table, which no shipped default has: parsed before it is
    // validated, so an unknown key lists the table's keys whatever the mode.
    let text = format!("{valid}\n[egress]\nzz_unknown = 1\n");
    keys.extend(
        expected_keys(&check, &pol, &text)
            .into_iter()
            .map(|k| format!("egress.{k}")),
    );
    assert!(keys.len() > 19, "{keys:?}");
    for k in &keys {
        assert!(
            policy_doc.contains(&format!("`{k}`")),
            "docs/policy.md does not document `{k}`"
        );
    }
}

/// `hands bench --tunnel` runs end to end: the worker and the floor process
/// (an unconfined read server of its own) both dial the gateway, and every row
/// the README's figures come from is reported, each against its baseline. No
/// timing is asserted: only that each figure was measured.
#[test]
fn bench_tunnel_measures_every_row_against_its_baseline_and_floor() {
    require_sandbox!();
    let out = hands(&["bench", "--tunnel", "--iterations", "20", "--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "hands bench --tunnel: {err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    let rows = v["rows"].as_array().expect("rows");
    let row = |name: &str, baseline: Option<&str>| {
        let r = rows
            .iter()
            .find(|r| r["name"] == name && r["baseline"].as_str() == baseline)
            .unwrap_or_else(|| panic!("no row {name:?} against {baseline:?} in {v}"));
        assert!(r["p50_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{r}");
    };
    let baseline = "read 20 KiB, unconfined, over gRPC (baseline)";
    let floor_tunnel = "read 20 KiB, unconfined, gateway API -> tunnel -> another process (floor)";
    let floor_grpc = "read 20 KiB, unconfined, gRPC to another process (floor)";
    row(baseline, None);
    row(
        "read 20 KiB, gateway API -> tunnel -> worker",
        Some(baseline),
    );
    row("read 20 KiB, gRPC (debug listener)", Some(baseline));
    row(floor_tunnel, Some(baseline));
    row(floor_grpc, Some(baseline));
    row(
        "bare round trip to another process, 1 byte out, 20 KiB back (pipes)",
        Some(baseline),
    );
    row(
        "read 20 KiB, gateway API -> tunnel -> worker",
        Some(floor_tunnel),
    );
    row("read 20 KiB, gRPC (debug listener)", Some(floor_grpc));
    for figure in [
        "reads/s at 64 concurrent, gateway API -> tunnel",
        "worker CPU us per read at 64 concurrent, gRPC direct",
    ] {
        assert!(v["figures"][figure].as_f64().is_some(), "{figure}: {v}");
    }
}
