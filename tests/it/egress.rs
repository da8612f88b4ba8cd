//! Egress with real clients, in a test network of the suite's own: two network
//! namespaces joined by a veth pair (no address of the machine's own network is
//! ever used).
//!
//! - the *worker side* (198.51.100.1/24) runs `hands exec` and `hands tool`,
//!   so the sessions' egress is served from there;
//! - the *server side* holds dnsmasq on 198.51.100.53 (the policy's resolver),
//!   HTTP on 198.51.100.10 and .11, HTTPS on 198.51.100.10:443 and :8443 under a
//!   test CA (a git repository served the dumb way, a Python package index),
//!   and bait listeners on 169.254.169.254 and 198.51.100.66 that log every
//!   connection they see.
//!
//! Both namespaces are anchored by processes that die with the test binary
//! (`setpriv --pdeathsig`, spawned from a thread that lives as long as it), so
//! nothing outlives a run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Duration;

use crate::util::hands_bin;

/// The environment of these tests, written to the suite's policy directory.
const POLICY: &str = r#"
description = "egress tests"

[filesystem]
read_only = ["/usr", "/bin", "/lib", "/lib64", "/etc"]
tmp_size = "64MiB"

[network]
mode = "egress"

[egress]
allow = [
    "allowed.test",
    "*.wild.test",
    "tls.test:443",
    "rebind.test",
    "metadata.test",
    # The test servers live in a documentation range, refused unless a network
    # rule opens it: only .10, on every port.
    "198.51.100.10/32",
]
deny = ["denied.test"]
resolvers = ["198.51.100.53:53"]

[limits]
memory = "512MiB"
pids = 256
cpu = 1.0
output_bytes = 102400
file_bytes = 262144
bash_timeout = "60s"
call_timeout = "90s"
disk = "256MiB"
disk_inodes = 65536

[tools]
enabled = ["bash", "read", "write", "edit", "glob", "grep"]
"#;

/// Spawns long-lived processes from one thread that never ends, so their
/// parent-death signal fires only when the test binary exits.
fn spawn_kept(cmd: Command, log: Option<&Path>) -> u32 {
    type Job = (Command, mpsc::Sender<u32>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            for (mut cmd, reply) in rx {
                let child = cmd.spawn().expect("spawn a test network process");
                let _ = reply.send(child.id());
                kept.push(child);
            }
        });
        Mutex::new(tx)
    });
    let (reply, pid) = mpsc::channel();
    let mut kept = Command::new("setpriv");
    kept.args(["--pdeathsig", "KILL", "--"])
        .arg(cmd.get_program());
    kept.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => kept.env(k, v),
            None => kept.env_remove(k),
        };
    }
    match log {
        Some(path) => {
            let f = std::fs::File::create(path).unwrap();
            kept.stdout(f.try_clone().unwrap()).stderr(f);
        }
        None => {
            kept.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    tx.lock().unwrap().send((kept, reply)).unwrap();
    pid.recv().unwrap()
}

/// A process in a network namespace of its own, for as long as the run.
fn namespace() -> u32 {
    let mut cmd = Command::new("unshare");
    cmd.args(["--net", "--", "sleep", "infinity"]);
    let pid = spawn_kept(cmd, None);
    let own = std::fs::read_link("/proc/self/ns/net").unwrap();
    for _ in 0..500 {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
        if comm.trim() == "sleep" && ns.is_some_and(|ns| ns != own) {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no network namespace for the test network");
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn nsenter(pid: u32) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/proc/{pid}/ns/net"));
    c
}

pub(crate) struct Net {
    pub(crate) dir: tempfile::TempDir,
    /// The worker side's anchor.
    worker: u32,
    pub(crate) ca: PathBuf,
}

impl Net {
    /// The suite's one test network, made on first use.
    pub(crate) fn get() -> &'static Net {
        static NET: OnceLock<Net> = OnceLock::new();
        NET.get_or_init(Net::make)
    }

    fn make() -> Net {
        let dir = tempfile::Builder::new()
            .prefix("hands-egress-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let (w, s) = (namespace(), namespace());
        run(Command::new("ip").args([
            "link",
            "add",
            "ew0",
            "netns",
            &w.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            "es0",
            "netns",
            &s.to_string(),
        ]));
        for (pid, args) in [
            (w, "link set lo up"),
            (w, "addr add 198.51.100.1/24 dev ew0"),
            (w, "link set ew0 up"),
            (w, "route add 169.254.169.254/32 dev ew0"),
            (s, "link set lo up"),
            (s, "addr add 198.51.100.10/24 dev es0"),
            (s, "addr add 198.51.100.11/24 dev es0"),
            (s, "addr add 198.51.100.53/24 dev es0"),
            (s, "addr add 198.51.100.66/24 dev es0"),
            (s, "addr add 169.254.169.254/32 dev es0"),
            (s, "link set es0 up"),
            (s, "route add default via 198.51.100.1"),
        ] {
            run(nsenter(pid).arg("ip").args(args.split(' ')));
        }

        // The test CA and the servers' certificate.
        let ca = hands::pki::Ca::new(30).unwrap();
        let ca_pem = d.join("ca.pem");
        std::fs::write(&ca_pem, &ca.issued.cert_pem).unwrap();
        let server = ca
            .gateway(
                &[
                    "allowed.test".into(),
                    "tls.test".into(),
                    "a.wild.test".into(),
                ],
                30,
            )
            .unwrap();
        std::fs::write(d.join("server.pem"), &server.cert_pem).unwrap();
        std::fs::write(d.join("server-key.pem"), &server.key_pem).unwrap();
        www(d);

        let mut dns = nsenter(s);
        dns.args([
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=198.51.100.53",
            "--user=root",
            "--group=root",
            "--log-queries",
        ])
        .arg(format!("--log-facility={}", d.join("dns.log").display()))
        .arg(format!("--pid-file={}", d.join("dnsmasq.pid").display()));
        for (name, addr) in [
            ("allowed.test", "198.51.100.10"),
            ("tls.test", "198.51.100.10"),
            ("a.wild.test", "198.51.100.10"),
            ("wild.test", "198.51.100.10"),
            ("denied.test", "198.51.100.10"),
            ("unlisted.test", "198.51.100.11"),
            ("rebind.test", "127.0.0.1"),
            ("metadata.test", "169.254.169.254"),
        ] {
            dns.arg(format!("--address=/{name}/{addr}"));
        }
        spawn_kept(dns, Some(&d.join("dnsmasq.out")));
        let mut servers = nsenter(s);
        servers
            .env("PYTHONFAULTHANDLER", "1")
            .arg("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/egress/servers.py"
            ))
            .arg(d)
            .arg(d.join("server.pem"))
            .arg(d.join("server-key.pem"));
        spawn_kept(servers, Some(&d.join("servers.out")));
        for _ in 0..1000 {
            if d.join("servers.ready").exists() && d.join("dns.log").exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !d.join("servers.ready").exists() {
            let out = |f: &str| std::fs::read_to_string(d.join(f)).unwrap_or_default();
            let (a, b) = (out("servers.out"), out("dnsmasq.out"));
            panic!(
                "the test servers did not start (in {}): {a}{b}",
                dir.keep().display()
            );
        }

        let policies = d.join("policies");
        std::fs::create_dir(&policies).unwrap();
        std::fs::write(policies.join("egtest.toml"), POLICY).unwrap();
        Net {
            dir,
            worker: w,
            ca: ca_pem,
        }
    }

    fn policies(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    /// `hands exec` of `script` (sh) in a session of the test environment,
    /// from the worker side; the workspace holds the test CA as `ca.pem`.
    pub(crate) fn exec(&self, script: &str) -> Output {
        let ws = tempfile::tempdir().unwrap();
        std::fs::copy(&self.ca, ws.path().join("ca.pem")).unwrap();
        let out = nsenter(self.worker)
            .arg(hands_bin())
            .arg("--policy-dir")
            .arg(self.policies())
            .args([
                "exec",
                "--env",
                "egtest",
                "--allow-root-workspace",
                "--workspace",
            ])
            .arg(ws.path())
            .args(["--", "/bin/sh", "-c", script])
            .output()
            .unwrap();
        out
    }

    /// The lines the bait listeners logged.
    pub(crate) fn bait(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bait.log")).unwrap_or_default()
    }

    /// What dnsmasq was asked.
    pub(crate) fn dns_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dns.log")).unwrap_or_default()
    }
}

/// The files the HTTPS server serves: a git repository (dumb HTTP) and a
/// package index with one wheel.
fn www(d: &Path) {
    let www = d.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let work = d.join("repo-work");
    let git = |dir: &Path, args: &[&str]| {
        run(Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .arg("-C")
            .arg(dir)
            .args(args));
    };
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q"]);
    std::fs::write(work.join("README"), "cloned through hands egress\n").unwrap();
    git(&work, &["add", "README"]);
    git(&work, &["commit", "-qm", "one"]);
    git(
        &www,
        &["clone", "-q", "--bare", work.to_str().unwrap(), "repo.git"],
    );
    git(&www.join("repo.git"), &["update-server-info"]);
    run(Command::new("python3").arg("-c").arg(WHEEL).arg(&www));
}

/// Writes `simple/handsdemo/` with a pure-Python wheel under the directory
/// given as `sys.argv[1]`.
const WHEEL: &str = r#"
import base64, hashlib, os, sys, zipfile
root = os.path.join(sys.argv[1], "simple", "handsdemo")
os.makedirs(root, exist_ok=True)
name = "handsdemo-0.1-py3-none-any.whl"
files = {
    "handsdemo/__init__.py": "GREETING = 'installed through hands egress'\n",
    "handsdemo-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: handsdemo\nVersion: 0.1\n",
    "handsdemo-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hands-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
with zipfile.ZipFile(os.path.join(root, name), "w") as z:
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
        z.writestr(path, data)
    record.append("handsdemo-0.1.dist-info/RECORD,,")
    z.writestr("handsdemo-0.1.dist-info/RECORD", "\n".join(record) + "\n")
with open(os.path.join(root, "index.html"), "w") as f:
    f.write(f'<html><body><a href="{name}">{name}</a></body></html>\n')
"#;

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const CURL: &str = "curl -sS --max-time 20 --cacert /workspace/ca.pem";

#[test]
fn curl_through_the_proxy_reaches_an_allowed_host() {
    crate::require_sandbox!();
    let net = Net::get();
    let out = net.exec(&format!(
        "{CURL} http://allowed.test/plain && {CURL} https://allowed.test/tls"
    ));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("hello from 198.51.100.10 allowed.test /plain"),
        "{t}"
    );
    assert!(
        t.contains("hello from 198.51.100.10 allowed.test /tls"),
        "{t}"
    );
}
