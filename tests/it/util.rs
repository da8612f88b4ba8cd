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

pub fn hands_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hands")
}

/// A built-in policy, possibly modified.
pub fn policy(name: &str) -> Policy {
    hands::policy::PolicySet::builtin()
        .get(name)
        .unwrap_or_else(|| panic!("no built-in policy {name}"))
        .clone()
}

pub async fn open_with(policy: Policy, workspace: Option<&Path>) -> Session {
    Session::open(
        &config(),
        SessionOptions {
            policy: Arc::new(policy),
            workspace: workspace.map(Path::to_path_buf),
            extra_dirs: Vec::new(),
            journal: None,
        },
    )
    .await
    .expect("open session")
}

pub async fn open(workspace: Option<&Path>) -> Session {
    open_with(policy("default"), workspace).await
}

pub async fn bash(s: &Session, cmd: &str) -> ToolResult {
    s.call("bash", &json!({ "command": cmd })).await
}

/// Runs a bash command and returns its text, panicking on is_error.
pub async fn sh(s: &Session, cmd: &str) -> String {
    let r = bash(s, cmd).await;
    assert!(!r.is_error, "command {cmd:?} failed: {}", r.text_content());
    r.text_content()
}

pub async fn tool(s: &Session, name: &str, input: Value) -> ToolResult {
    s.call(name, &input).await
}

/// Runs a Python snippet in the sandbox with Debian's python3 and returns
/// (is_error, text). Probes print `DENIED <errno>` or `ALLOWED`.
pub async fn py(s: &Session, code: &str) -> (bool, String) {
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
