//! `hands bench --egress`: what the egress layer costs, against the same work
//! without hands in the same run.
//!
//! - session open in an `egress` environment vs a `loopback` one (the barrier,
//!   the listeners and the resolver against nothing);
//! - connection setup (connect, a 16-byte HTTP answer, close) from a session
//!   through the explicit proxy vs the same client on the host straight to the
//!   server;
//! - a 100 MiB download the same two ways, five of each, interleaved (medians).
//!
//! The server is this process's, on the host's loopback; the environment
//! allows exactly its port. The client is Python (`/usr/bin/python3`, the same
//! interpreter inside and outside the sandbox), timing itself.

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
def get(path):
    if proxy:
        s = socket.create_connection(("127.0.0.1", int(proxy)))
        s.sendall(f"GET http://{host}:{port}{path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
    else:
        s = socket.create_connection((host, port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
    got = 0
    while True:
        b = s.recv(1 << 20)
        if not b:
            break
        got += len(b)
    s.close()
    return got
setup = []
for i in range(n + n // 10):
    t = time.perf_counter()
    get("/16")
    if i >= n // 10:
        setup.append((time.perf_counter() - t) * 1e6)
t = time.perf_counter()
got = get(f"/{size}")
rate = got / (time.perf_counter() - t)
print(json.dumps({"setup_us": setup, "bytes": got, "bytes_per_s": rate}))
"#;

/// Downloads: this many by each way, interleaved, the median reported.
const DOWNLOADS: usize = 5;

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
    let rt = super::runtime()?;
    rt.block_on(bench(iterations, opens, json_out, lookup))
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
    n: usize,
    opens: usize,
    json_out: bool,
    lookup: &crate::policy::lookup::Lookup,
) -> anyhow::Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(serve(listener));

    let loopback = Arc::new(lookup.load()?.policy("default")?);
    let text = crate::policy::builtin_text("default")
        .context("the default policy")?
        .replace(
            "mode = \"loopback\"",
            &format!("mode = \"egress\"\n[egress]\nallow = [\"127.0.0.1/32:{port}\"]"),
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

    // The same client on the host straight to the server, and in an egress
    // session through the explicit proxy, interleaved: the first run of each
    // times the connections, every run a download.
    std::fs::write(ws.join("client.py"), CLIENT)?;
    let s = open(&egress).await?;
    let (mut direct, mut proxied) = (None::<Measured>, None::<Measured>);
    let (mut rates_direct, mut rates_proxy) = (Vec::new(), Vec::new());
    for i in 0..DOWNLOADS {
        let conns = if i == 0 { n } else { 0 };
        let out = tokio::process::Command::new(PYTHON)
            .args(["-c", CLIENT, "127.0.0.1", &port.to_string()])
            .args([conns.to_string(), DOWNLOAD.to_string(), String::new()])
            .output()
            .await
            .context("running the client on the host")?;
        let d = parse(&String::from_utf8_lossy(&out.stdout))?;
        let r = s
            .call(
                "bash",
                &json!({"command": format!(
                    "{PYTHON} client.py 127.0.0.1 {port} {conns} {DOWNLOAD} {}",
                    crate::sandbox::netfilter::HTTP_PROXY_PORT
                ), "timeout_ms": 600000}),
            )
            .await;
        if r.is_error {
            bail!("the client in the session failed: {}", r.text_content());
        }
        let p = parse(&r.text_content())?;
        if p.bytes < DOWNLOAD as u64 || d.bytes < DOWNLOAD as u64 {
            bail!("a download came short");
        }
        rates_direct.push(d.bytes_per_s);
        rates_proxy.push(p.bytes_per_s);
        if i == 0 {
            (direct, proxied) = (Some(d), Some(p));
        }
    }
    s.close().await?;
    let (mut direct, mut proxied) = (
        direct.context("no direct run")?,
        proxied.context("no proxied run")?,
    );
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    direct.bytes_per_s = median(&mut rates_direct);
    proxied.bytes_per_s = median(&mut rates_proxy);
    let us = |v: &[f64]| -> Vec<Duration> {
        v.iter().map(|u| Duration::from_secs_f64(u / 1e6)).collect()
    };
    let setup_direct = Series::new(
        "connection + 16-byte answer, host straight to the server",
        us(&direct.setup_us),
    );
    let setup_proxy = Series::new(
        "connection + 16-byte answer, session through the HTTP proxy",
        us(&proxied.setup_us),
    );
    let rows: Vec<Row> = vec![
        open_egress.row(Some(&open_loop)),
        open_loop.row(None),
        setup_proxy.row(Some(&setup_direct)),
        setup_direct.row(None),
    ];
    let mib = |b: f64| (b / (1 << 20) as f64 * 10.0).round() / 10.0;
    let figures = json!({
        "100 MiB download, host straight to the server (MiB/s, median of 5)": mib(direct.bytes_per_s),
        "100 MiB download, session through the HTTP proxy (MiB/s, median of 5)": mib(proxied.bytes_per_s),
        "100 MiB download through the proxy, ratio of the medians to direct": ((proxied.bytes_per_s / direct.bytes_per_s) * 100.0).round() / 100.0,
        "connection setup added by the proxy at p50 (ms)": ((setup_proxy.p50() - setup_direct.p50()) * 1000.0).round() / 1000.0,
    });
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"rows": rows, "figures": figures}))?
        );
    } else {
        print_table(&rows);
        for (k, v) in figures.as_object().into_iter().flatten() {
            println!("{k:<58} {v}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
