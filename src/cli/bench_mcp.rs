//! `hands bench --mcp`: the MCP face's round trip. A `hands mcp` process
//! driven over its stdin and stdout with JSON-RPC lines, as an MCP client
//! drives it; the worker's streamable HTTP endpoint (served in the bench's
//! process, on loopback) driven by the conformance client; against the same
//! calls in a session of the bench's own process. Interleaved, one of each
//! per round, so drift lands on all alike.

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::bench::{Row, Series};

/// A `hands mcp` child and the lines it writes.
struct Client {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    next: u64,
}

impl Client {
    async fn start(ws: &std::path::Path) -> anyhow::Result<Client> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args([
                "mcp",
                "--env",
                "default",
                "--allow-root-workspace",
                "--workspace",
            ])
            .arg(ws)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting hands mcp")?;
        let stdin = child.stdin.take().context("stdin")?;
        let lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let mut c = Client {
            child,
            stdin,
            lines,
            next: 0,
        };
        c.request(
            "initialize",
            json!({"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "hands-bench", "version": "1"}}),
        )
        .await?;
        c.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await?;
        Ok(c)
    }

    async fn send(&mut self, v: &Value) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(v)?;
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn request(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next += 1;
        let id = self.next;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await?;
        loop {
            let Some(line) = self.lines.next_line().await? else {
                bail!("hands mcp closed its output");
            };
            let v: Value = serde_json::from_str(&line)?;
            if v["id"] == id {
                ensure!(v.get("error").is_none(), "{method}: {v}");
                return Ok(v);
            }
        }
    }

    async fn call(&mut self, tool: &str, arguments: &Value) -> anyhow::Result<Value> {
        let v = self
            .request("tools/call", json!({"name": tool, "arguments": arguments}))
            .await?;
        ensure!(v["result"]["isError"] == false, "{tool}: {v}");
        Ok(v)
    }
}

pub fn run(
    iterations: usize,
    json_out: bool,
    lookup: &crate::policy::lookup::Lookup,
) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    let (rows, figures) = rt.block_on(measure(iterations, lookup))?;
    super::bench::report(&rows, &figures, json_out)?;
    Ok(ExitCode::SUCCESS)
}

async fn measure(
    n: usize,
    lookup: &crate::policy::lookup::Lookup,
) -> anyhow::Result<(Vec<Row>, Value)> {
    let scratch = tempfile::Builder::new()
        .prefix("hands-bench-mcp-")
        .tempdir()?;
    let ws = scratch.path().join("ws");
    std::fs::create_dir(&ws)?;
    let line = "the quick brown fox jumps over the lazy dog, 0123456789\n";
    let text: String = line.repeat(20 * 1024 / line.len() + 1)[..20 * 1024].to_string();
    std::fs::write(ws.join("file20k.txt"), &text)?;

    let cfg = crate::sandbox::SandboxConfig::from_env()?;
    let policy = Arc::new(lookup.load()?.policy("default")?);
    let local = crate::session::Session::open(
        &cfg,
        crate::session::SessionOptions::new(policy).in_dir(ws.clone(), true),
    )
    .await?;
    let started = Instant::now();
    let mut mcp = Client::start(&ws).await?;
    let start_ms = started.elapsed().as_secs_f64() * 1000.0;

    // The worker's MCP endpoint, on loopback.
    let registry = Arc::new(crate::session::registry::Registry::new(
        cfg.clone(),
        lookup.load()?.iter().map(|e| e.policy.clone()),
        4,
    ));
    let stop = tokio_util::sync::CancellationToken::new();
    let backend = Arc::new(crate::connectors::mcp::http::LocalBackend::new(
        registry.clone(),
        "default",
    ));
    let (service, _sessions) =
        crate::connectors::mcp::http::endpoint_service(backend, Vec::new(), &stop);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = axum::Router::new().route_service("/mcp", service);
    // Served as the worker's [mcp] listener serves it.
    let (stop_server, server_stopped) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(crate::net::httpd::serve_with(
        listener,
        "mcp",
        router,
        crate::net::httpd::Limits {
            max_connections: 16,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            drain: Duration::from_secs(1),
        },
        crate::net::httpd::Refusal {
            content_type: "text/plain",
            body: String::new(),
        },
        None,
        Arc::new(crate::net::httpd::Unobserved),
        server_stopped,
    ));
    let target = crate::conformance::mcp::McpTarget::new(&format!("http://{addr}/mcp"), None)
        .map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let http = target.session().await.map_err(anyhow::Error::msg)?;
    let http_start_ms = started.elapsed().as_secs_f64() * 1000.0;
    http.text(
        "write",
        json!({"file_path": "file20k.txt", "content": text.clone()}),
    )
    .await
    .map_err(anyhow::Error::msg)?;

    let bash_in = json!({"command": "/bin/true"});
    let read_in = json!({"file_path": "file20k.txt"});
    let mut v: [Vec<Duration>; 6] = Default::default();
    let warm = (n / 10).max(3);
    for round in 0..warm + n {
        let keep = round >= warm;
        let t = Instant::now();
        mcp.call("bash", &bash_in).await?;
        let d0 = t.elapsed();
        let t = Instant::now();
        let r = local.call("bash", &bash_in).await;
        ensure!(!r.is_error, "bash in process: {}", r.text_content());
        let d1 = t.elapsed();
        let t = Instant::now();
        let m = mcp.call("read", &read_in).await?;
        let d2 = t.elapsed();
        let t = Instant::now();
        let r = local.call("read", &read_in).await;
        ensure!(!r.is_error, "read in process: {}", r.text_content());
        let d3 = t.elapsed();
        let t = Instant::now();
        http.text("bash", bash_in.clone())
            .await
            .map_err(anyhow::Error::msg)?;
        let d4 = t.elapsed();
        let t = Instant::now();
        let h = http
            .text("read", read_in.clone())
            .await
            .map_err(anyhow::Error::msg)?;
        let d5 = t.elapsed();
        if round == 0 {
            ensure!(
                h.len() >= text.len(),
                "the MCP read over HTTP returned {} bytes",
                h.len()
            );
            let got = m["result"]["content"][0]["text"]
                .as_str()
                .unwrap_or_default();
            ensure!(
                got.len() >= text.len(),
                "the MCP read returned {} bytes",
                got.len()
            );
        }
        if keep {
            for (s, d) in v.iter_mut().zip([d0, d1, d2, d3, d4, d5]) {
                s.push(d);
            }
        }
    }
    let [mcp_bash, in_bash, mcp_read, in_read, http_bash, http_read] = v;
    let http_bash = Series::new("bash /bin/true, MCP over streamable HTTP", http_bash);
    let http_read = Series::new("read 20 KiB, MCP over streamable HTTP", http_read);
    let mcp_bash = Series::new("bash /bin/true, MCP over stdio (hands mcp)", mcp_bash);
    let in_bash = Series::new("bash /bin/true, in process (sandboxed session)", in_bash);
    let mcp_read = Series::new("read 20 KiB, MCP over stdio (hands mcp)", mcp_read);
    let in_read = Series::new("read 20 KiB, in process (sandboxed session)", in_read);
    let rows = vec![
        mcp_bash.row(Some(&in_bash)),
        http_bash.row(Some(&in_bash)),
        in_bash.row(None),
        mcp_read.row(Some(&in_read)),
        http_read.row(Some(&in_read)),
        in_read.row(None),
    ];
    let _ = http.delete().await;
    stop.cancel();
    stop_server.send_replace(true);
    let _ = server.await;
    registry.close_all();
    drop(mcp.stdin);
    let _ = tokio::time::timeout(Duration::from_secs(10), mcp.child.wait()).await;
    local.close().await?;
    let figures = json!({
        "hands mcp start to initialized, session open included (ms)": (start_ms * 10.0).round() / 10.0,
        "streamable HTTP initialize, session open included (ms)": (http_start_ms * 10.0).round() / 10.0,
    });
    Ok((rows, figures))
}
