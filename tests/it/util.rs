//! Shared helpers of the integration suite: kernel-feature gating (a missing
//! feature fails under CI=true, never a silent skip), sessions with the real
//! `hands` binary as helper, and small probes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hands::policy::Policy;
use hands::sandbox::SandboxConfig;
use hands::session::{Session, SessionOptions};
use hands::tools::ToolResult;
use serde_json::{json, Value};

/// True when the machine can run sandbox tests. Under `CI=true` a missing
/// feature panics (the test fails); otherwise the test says why it is skipped.
pub fn sandbox_available(test: &str) -> bool {
    let missing: Vec<String> = hands::cli::doctor::checks()
        .into_iter()
        .filter(|c| c.required && !c.ok)
        .map(|c| format!("{}: {}", c.feature, c.status))
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: required kernel features missing under CI=true: {missing:?}");
    }
    eprintln!("SKIP {test}: missing {missing:?}");
    false
}

/// Skips (or fails under CI) the calling test when the sandbox cannot run.
#[macro_export]
macro_rules! require_sandbox {
    () => {
        if !$crate::util::sandbox_available(module_path!()) {
            return;
        }
    };
}

pub fn config() -> SandboxConfig {
    let mut cfg = SandboxConfig::from_env().expect("sandbox config");
    cfg.helper_exe = PathBuf::from(env!("CARGO_BIN_EXE_hands"));
    cfg
}

/// The `hands` binary the process-level tests run: this build's, or the one
/// `$HANDS_TEST_BIN` names (to run them against another build, such as the
/// one before a change, and see them fail there).
pub fn hands_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        // Every worker a test starts appends its audit records to a file of
        // this run, not to the machine's own log under /var/lib/hands (a test
        // about the default location removes the variable and names its own
        // data directory).
        if std::env::var_os("HANDS_AUDIT_LOG").is_none() {
            let dir = std::env::temp_dir().join(format!("hands-it-audit-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::env::set_var("HANDS_AUDIT_LOG", dir.join("audit.jsonl"));
        }
        std::env::var("HANDS_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_hands").into())
    })
}

/// The text of a built-in policy with each `(from, to)` replacement made
/// (each `from` must occur), for policy files of a test's own.
pub fn policy_text(name: &str, replace: &[(&str, &str)]) -> String {
    let mut text = hands::policy::builtin_text(name)
        .unwrap_or_else(|| panic!("no built-in policy {name}"))
        .to_string();
    for (from, to) in replace {
        assert!(text.contains(from), "{name}.toml has no {from:?}");
        text = text.replace(from, to);
    }
    text
}

/// A built-in policy, possibly modified.
pub fn policy(name: &str) -> Policy {
    hands::policy::PolicySet::builtin()
        .get(name)
        .unwrap_or_else(|| panic!("no built-in policy {name}"))
        .clone()
}

pub async fn open_with(policy: Policy, workspace: Option<&Path>) -> Arc<Session> {
    open_cfg(&config(), policy, workspace).await
}

/// A session with a sandbox configuration of the test's own (weakened layers,
/// a single slot).
pub async fn open_cfg(
    cfg: &SandboxConfig,
    policy: Policy,
    workspace: Option<&Path>,
) -> Arc<Session> {
    try_open_cfg(cfg, policy, workspace)
        .await
        .expect("open session")
}

/// [`open_cfg`], with the error.
pub async fn try_open_cfg(
    cfg: &SandboxConfig,
    policy: Policy,
    workspace: Option<&Path>,
) -> Result<Arc<Session>, hands::session::SessionError> {
    Session::open(
        cfg,
        SessionOptions {
            policy: Arc::new(policy),
            workspace: workspace.map(Path::to_path_buf),
            // The suite's fixtures are root's temporary directories; the refusal
            // itself is tested on its own.
            allow_root_workspace: true,
            workspace_owner: None,
            extra_dirs: Vec::new(),
            journal: None,
            kept: None,
            origin: None,
            connector: hands::session::Connector::Local,
            audit: None,
            metrics: None,
        },
    )
    .await
}

pub async fn open(workspace: Option<&Path>) -> Arc<Session> {
    open_with(policy("default"), workspace).await
}

pub async fn bash(s: &Arc<Session>, cmd: &str) -> ToolResult {
    s.call("bash", &json!({ "command": cmd })).await
}

/// Runs a bash command and returns its text, panicking on is_error.
pub async fn sh(s: &Arc<Session>, cmd: &str) -> String {
    let r = bash(s, cmd).await;
    assert!(!r.is_error, "command {cmd:?} failed: {}", r.text_content());
    r.text_content()
}

pub async fn tool(s: &Arc<Session>, name: &str, input: Value) -> ToolResult {
    s.call(name, &input).await
}

/// Runs a Python snippet in the sandbox with Debian's python3 and returns
/// (is_error, text). Probes print `DENIED <errno>` or `ALLOWED`.
pub async fn py(s: &Arc<Session>, code: &str) -> (bool, String) {
    let path = format!("/tmp/probe-{}.py", rand_hex());
    let write = format!("cat > {path} <<'PYEOF'\n{code}\nPYEOF");
    sh(s, &write).await;
    let r = bash(s, &format!("/usr/bin/python3 {path}")).await;
    (r.is_error, r.text_content())
}

/// A syscall probe: calls `libc.syscall(nr, *args)` and prints ALLOWED or
/// `DENIED <errno name>`.
pub fn syscall_probe(body: &str) -> String {
    format!(
        r#"import ctypes, errno, os, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def report(ret):
    if ret == -1:
        print("DENIED", errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno()))
    else:
        print("ALLOWED", ret)
{body}
"#
    )
}

pub fn rand_hex() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("random");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A host directory outside any workspace holding a secret, plus a workspace
/// inside it: `<root>/secret.txt`, `<root>/ws/`.
pub struct HostFixture {
    pub dir: tempfile::TempDir,
    pub secret: String,
}

impl HostFixture {
    pub fn new() -> HostFixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = format!("host-secret-{}", rand_hex());
        std::fs::write(dir.path().join("secret.txt"), &secret).expect("write secret");
        std::fs::create_dir(dir.path().join("ws")).expect("mkdir ws");
        HostFixture { dir, secret }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn ws(&self) -> PathBuf {
        self.dir.path().join("ws")
    }

    pub fn secret_path(&self) -> PathBuf {
        self.dir.path().join("secret.txt")
    }
}

/// Resident set size of this process in KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; only count processes that can run.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit(')')
                .next()
                .and_then(|s| s.trim_start().chars().next()),
            Some('Z') | Some('X')
        ),
        Err(_) => false,
    }
}

/// Files under `root` (on the host, symlinks not followed) that carry a
/// set-user-ID or set-group-ID bit, or file capabilities.
pub fn privileged_files(root: &Path) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            let mode = meta.permissions().mode();
            if meta.is_dir() {
                stack.push(e.path());
            }
            let has_caps = meta.is_file()
                && std::process::Command::new("python3")
                    .args([
                        "-c",
                        "import os, sys; os.getxattr(sys.argv[1], 'security.capability')",
                    ])
                    .arg(e.path())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .map(|st| st.success())
                    .unwrap_or(false);
            if mode & 0o6000 != 0 && !meta.is_dir() || has_caps {
                out.push((e.path(), mode));
            }
        }
    }
    out
}

/// Runs `path` on the host as `nobody` (with the right to traverse root-only
/// directories, so that only the file's own bits decide) and returns its
/// output: a set-user-ID file that the host honours prints `euid=0`.
pub fn run_as_nobody(path: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search",
        ])
        .arg(path)
        .args(args)
        .output()
        .expect("setpriv");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A temporary directory owned by an unprivileged user (uid and gid 4242), as an
/// operator's `--workspace` would be, on the host's own filesystem (which honours
/// set-user-ID bits). Not under `/tmp`, which the sandbox covers.
pub fn user_workspace() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("hands-userws-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(dir.path(), Some(4242), Some(4242)).expect("chown");
    dir
}

/// Opens a session in slot 0 (uid base + 0), waiting while another test holds
/// it: for tests that must see the next session of the same slot.
pub async fn open_in_slot_zero(policy: Policy) -> Arc<Session> {
    let mut cfg = config();
    cfg.slots = 1;
    let policy = Arc::new(policy);
    for _ in 0..600 {
        match Session::open(&cfg, SessionOptions::new(policy.clone())).await {
            Ok(s) => return s,
            Err(hands::session::SessionError::Slot(_)) => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            Err(e) => panic!("open session: {e}"),
        }
    }
    panic!("slot 0 stayed busy for a minute")
}

/// Closes a session and waits until its workspace is removed from the host (a
/// filesystem of its own is detached and deleted in the background).
pub async fn close_and_drain(s: Arc<Session>) {
    let workspaces = s.workspaces();
    s.close().await.expect("close");
    workspaces.drain(std::time::Duration::from_secs(30));
}

/// The machine-readable reason a hands.v1 error carries (`SESSION_NOT_FOUND`).
pub fn reason(s: &tonic::Status) -> String {
    s.metadata()
        .get(hands::connectors::hands_v1::REASON)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}
