//! `hands bench --egress`: what the egress layer costs, against the same work
//! without hands in the same run.
//!
//! - session open in an `egress` environment vs a `loopback` one (the barrier,
//!   the listeners and the resolver against nothing);
//! - connection setup (connect, a 16-byte HTTP answer, close) from a session
//!   through the explicit proxy, and from a session straight to the server's
//!   address (captured transparently), vs the same client on the host
//!   straight to the server;
//! - a 100 MiB download the same three ways, eleven of each, interleaved
//!   (medians).
//!
//! The bench runs in a network namespace of its own: the server listens on a
//! documentation address on that namespace's loopback, on a thread and
//! runtime of its own, and the environment allows exactly its address and
//! port. The proxy runs on a multi-threaded runtime, as in `hands worker`.
//! The client is Python (`/usr/bin/python3`, the same interpreter inside and
//! outside the sandbox), timing itself.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::bench::{print_table, Row, Series};
use crate::policy::Policy;
use crate::sandbox::SandboxConfig;
use crate::session::{Session, SessionOptions};

/// The client: `N` round trips of `GET /16` and one `GET /SIZE`, through
/// `PROXY` when it is set; prints one JSON line of microseconds and bytes/s.
const CLIENT: &str = r#"
import json, socket, sys, time
host, port, n, size, proxy = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
buf = bytearray(1 << 20)
def get(path):
    if proxy:
        s = socket.create_connection(("127.0.0.1", int(proxy)))
        s.sendall(f"GET http://{host}:{port}{path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
    else:
        s = socket.create_connection((host, port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
    got = 0
    while True:
        k = s.recv_into(buf)
        if not k:
            break
        got += k
    s.close()
    return got
setup = []
for i in range(n + n // 10):
    t = time.perf_counter()
    get("/16")
    if i >= n // 10:
        setup.append((time.perf_counter() - t) * 1e6)
t = time.perf_counter()
c = time.process_time()
got = get(f"/{size}")
rate = got / (time.perf_counter() - t)
cpu = time.process_time() - c
print(json.dumps({"setup_us": setup, "bytes": got, "bytes_per_s": rate, "cpu_s": cpu}))
"#;

/// Downloads: this many by each way, interleaved, the median reported.
const DOWNLOADS: usize = 11;

const PYTHON: &str = "/usr/bin/python3";
const DOWNLOAD: usize = 100 << 20;

pub fn run(
    iterations: usize,
    opens: usize,
    json_out: bool,
    lookup: &crate::policy::lookup::Lookup,
) -> anyhow::Result<ExitCode> {
    if !std::path::Path::new(PYTHON).exists() {
        bail!("hands bench --egress needs {PYTHON} (the client, inside and outside the sandbox)");
    }
    let server = private_network()?;
    // The worker's runtime, as `hands worker` builds it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(bench(server, iterations, opens, json_out, lookup))
}

/// The server's address: not loopback, so that a session's connection to it
/// is captured transparently when it ignores the proxy (loopback is the
/// session's own).
const SERVER_IP: &str = "198.51.100.2";

/// Moves this process into a network namespace of its own, before any other
/// thread exists (so every later thread and child is in it too), with the
/// server's address on its loopback, and starts the server there on a thread
/// and runtime of its own (the "internet": not the worker's runtime). Nothing
/// of the host's network is touched or used. Returns the server's port.
fn private_network() -> anyhow::Result<u16> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("making the bench's own network namespace (needs root)")?;
    for args in [
        vec!["link", "set", "lo", "up"],
        vec!["addr", "add", &format!("{SERVER_IP}/32"), "dev", "lo"],
    ] {
        let out = std::process::Command::new("ip")
            .args(&args)
            .output()
            .context("running ip(8) (iproute2) to set up the bench's network")?;
        if !out.status.success() {
            bail!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let listener = std::net::TcpListener::bind((SERVER_IP, 0)).context("binding the server")?;
    let port = listener.local_addr()?.port();
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("bench-server".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the server's runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                serve(listener).await
            })
        })?;
    Ok(port)
}

/// Answers `GET /N` with N bytes.
async fn serve(listener: tokio::net::TcpListener) {
    while let Ok((mut c, _)) = listener.accept().await {
        let _ = c.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut got = 0;
            while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") && got < buf.len() {
                match c.read(&mut buf[got..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got += n,
                }
            }
            let head = String::from_utf8_lossy(&buf[..got]);
            let n: usize = head
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.trim_start_matches('/').parse().ok())
                .unwrap_or(0);
            let _ = c
                .write_all(format!("HTTP/1.0 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes())
                .await;
            let chunk = vec![b'x'; 1 << 20];
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len());
                if c.write_all(&chunk[..k]).await.is_err() {
                    return;
                }
                left -= k;
            }
        });
    }
}

#[derive(serde::Deserialize)]
struct Measured {
    setup_us: Vec<f64>,
    bytes: u64,
    bytes_per_s: f64,
    cpu_s: f64,
}

fn own_cpu() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let t = |v: nix::sys::time::TimeVal| v.tv_sec() as f64 + v.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

fn parse(text: &str) -> anyhow::Result<Measured> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("the client printed no figures: {text}"))?;
    Ok(serde_json::from_str(line)?)
}

async fn bench(
    port: u16,
    n: usize,
    opens: usize,
    json_out: bool,
    lookup: &crate::policy::lookup::Lookup,
) -> anyhow::Result<ExitCode> {
    let loopback = Arc::new(lookup.load()?.policy("default")?);
    let text = crate::policy::builtin_text("default")
        .context("the default policy")?
        .replace(
            "mode = \"loopback\"",
            &format!("mode = \"egress\"\n[egress]\nallow = [\"{SERVER_IP}/32:{port}\"]"),
        );
    let mut egress = Policy::from_toml_str(
        "bench-egress",
        &text,
        std::path::Path::new("(bench) bench-egress.toml"),
    )?;
    // The client on the host has every core; so has the one in the session
    // (the default policy's 1-CPU quota would measure the policy, not egress).
    egress.limits.cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let egress = Arc::new(egress);
    let cfg = SandboxConfig::from_env()?;
    let dir = tempfile::Builder::new().prefix("hands-bench-").tempdir()?;
    let ws = dir.path().join("ws");
    std::fs::create_dir(&ws)?;
    let open = |p: &Arc<Policy>| {
        Session::open(
            &cfg,
            SessionOptions::new(p.clone()).in_dir(ws.clone(), true),
        )
    };

    // Session opens, interleaved.
    let (mut s_loop, mut s_egress) = (Vec::new(), Vec::new());
    for i in 0..opens + opens / 10 {
        for (p, out) in [(&loopback, &mut s_loop), (&egress, &mut s_egress)] {
            let t = Instant::now();
            let s = open(p).await?;
            if i >= opens / 10 {
                out.push(t.elapsed());
            }
            s.close().await?;
        }
    }
    let open_loop = Series::new("session open, loopback mode (given workspace)", s_loop);
    let open_egress = Series::new(
        "session open, egress mode (barrier, listeners, resolver)",
        s_egress,
    );

    // The same client three ways, interleaved: on the host straight to the
    // server; in an egress session through the explicit proxy; in the session
    // straight to the server's address, captured transparently. The first run
    // of each times the connections, every run a download.
    std::fs::write(ws.join("client.py"), CLIENT)?;
    let s = open(&egress).await?;
    let proxy_port = crate::sandbox::netfilter::HTTP_PROXY_PORT.to_string();
    let ways: [(&str, Option<&str>); 3] = [
        ("host straight to the server", None),
        ("session through the HTTP proxy", Some(&proxy_port)),
        ("session, captured transparently", Some("")),
    ];
    let mut first: Vec<Option<Measured>> = vec![None, None, None];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(), Vec::new(), Vec::new()];
    // CPU seconds per download: this process's (the server, and the relay
    // when the session's connection passes through it) and the client's.
    let (mut own, mut client): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
        (vec![Vec::new(); 3], vec![Vec::new(); 3]);
    for i in 0..DOWNLOADS {
        let conns = if i == 0 { n } else { 0 };
        for (w, (_, in_session)) in ways.iter().enumerate() {
            let cpu0 = own_cpu();
            let m = match in_session {
                None => {
                    let out = tokio::process::Command::new(PYTHON)
                        .args(["-c", CLIENT, SERVER_IP, &port.to_string()])
                        .args([conns.to_string(), DOWNLOAD.to_string(), String::new()])
                        .output()
                        .await
                        .context("running the client on the host")?;
                    parse(&String::from_utf8_lossy(&out.stdout))?
                }
                Some(proxy) => {
                    let r = s
                        .call(
                            "bash",
                            &json!({"command": format!(
                                "{PYTHON} client.py {SERVER_IP} {port} {conns} {DOWNLOAD} '{proxy}'"
                            ), "timeout_ms": 600000}),
                        )
                        .await;
                    if r.is_error {
                        bail!("the client in the session failed: {}", r.text_content());
                    }
                    parse(&r.text_content())?
                }
            };
            if m.bytes < DOWNLOAD as u64 {
                bail!("a download came short ({}: {} bytes)", ways[w].0, m.bytes);
            }
            rates[w].push(m.bytes_per_s);
            own[w].push(own_cpu() - cpu0);
            client[w].push(m.cpu_s);
            if i == 0 {
                first[w] = Some(m);
            }
        }
    }
    s.close().await?;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let us = |v: &[f64]| -> Vec<Duration> {
        v.iter().map(|u| Duration::from_secs_f64(u / 1e6)).collect()
    };
    let mut setups = Vec::new();
    let mut rate = Vec::new();
    for (w, (name, _)) in ways.iter().enumerate() {
        let m = first[w].take().context("no first run")?;
        setups.push(Series::new(
            &format!("connection + 16-byte answer, {name}"),
            us(&m.setup_us),
        ));
        rate.push(median(&mut rates[w]));
    }
    let rows: Vec<Row> = vec![
        open_egress.row(Some(&open_loop)),
        open_loop.row(None),
        setups[1].row(Some(&setups[0])),
        setups[2].row(Some(&setups[0])),
        setups[0].row(None),
    ];
    let mib = |b: f64| (b / (1 << 20) as f64 * 10.0).round() / 10.0;
    let ms = |s: f64| (s * 1e4).round() / 10.0;
    let own: Vec<f64> = own.iter_mut().map(&median).collect();
    let client: Vec<f64> = client.iter_mut().map(&median).collect();
    // What the relay spends: this process's CPU beyond the server's own.
    let relay = |w: usize| (own[w] - own[0]).max(0.0);
    let ratio = |a: f64, b: f64| (a / b * 100.0).round() / 100.0;
    let added = |s: &Series| ((s.p50() - setups[0].p50()) * 1000.0).round() / 1000.0;
    let figures = json!({
        "100 MiB download, host straight to the server (MiB/s, median of 11)": mib(rate[0]),
        "100 MiB download, session through the HTTP proxy (MiB/s, median of 11)": mib(rate[1]),
        "100 MiB download, session captured transparently (MiB/s, median of 11)": mib(rate[2]),
        "100 MiB download through the proxy, ratio of the medians to direct": ratio(rate[1], rate[0]),
        "100 MiB download captured transparently, ratio of the medians to direct": ratio(rate[2], rate[0]),
        "CPU per 100 MiB, the server (ms, median)": ms(own[0]),
        "CPU per 100 MiB, the client on the host / in the session (ms, medians)": format!("{} / {}", ms(client[0]), ms(client[2])),
        "CPU per 100 MiB, the worker's relay, proxy / transparent (ms, medians)": format!("{} / {}", ms(relay(1)), ms(relay(2))),
        "connection setup added by the proxy at p50 (ms)": added(&setups[1]),
        "connection setup added by transparent capture at p50 (ms)": added(&setups[2]),
    });
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"rows": rows, "figures": figures}))?
        );
    } else {
        print_table(&rows);
        for (k, v) in figures.as_object().into_iter().flatten() {
            match v.as_str() {
                Some(text) => println!("{k:<72} {text}"),
                None => println!("{k:<72} {v}"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
