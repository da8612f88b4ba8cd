//! `hands bench --tunnel`: the protocol's cost, against baselines in the same
//! run. A worker runs as its own process (so its RSS is its own), dialing a
//! gateway in this process over mTLS on loopback; it also serves its debug
//! listener, so the same calls are measured three ways:
//!
//! - through the gateway's HTTP API → tunnel → worker (what an agent loop pays);
//! - through the gRPC service directly (the debug listener, plaintext);
//! - in process: the same tool call on a session in this process, no RPC.
//!
//! Baselines: a bare fork/exec of `/bin/true` for bash, and for read an
//! unconfined read tool served by a tonic server on loopback (the same gRPC
//! stack with no sandbox). Floors: the same unconfined read served by another
//! process ([`FLOOR_ARG`]), straight over gRPC and through the gateway and a
//! tunnel of its own: what any worker that is a process of its own pays before
//! it confines anything. Throughput: reads/s at 1 and 64 concurrent calls.
//! Memory: the worker's RSS idle and per idle session (the sessions' helpers
//! are their own processes and are reported apart).

use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::json;
use tonic::transport::Channel;

use super::bench::{Row, Series};
use crate::gateway::client::ApiClient;
use crate::proto::v1;
use crate::proto::v1::sandbox_client::SandboxClient;

const TOKEN: &str = "bench-token-0123456789abcdef";

/// Reads VmRSS of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Child processes of every thread of `pid`.
/// CPU time (user + system) process `pid` has used, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The fields after the command name, which is in parentheses and may
    // hold spaces: utime and stime are the 12th and 13th of them.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks as f64 / hz
}

/// CPU seconds of the worker and of its sessions' helpers (its children).
fn worker_cpu(worker: u32) -> (f64, f64) {
    let helpers = children(worker).into_iter().map(cpu_secs).sum();
    (cpu_secs(worker), helpers)
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The unconfined baseline: `read` run in process by a tonic service. As the
/// floor process it also tells the gateway who it is and opens sessions (of
/// nothing: every session reads the same directory).
struct UnconfinedRead {
    ctx: crate::tools::fs::FsContext,
    /// The floor's worker id and process id; `None` for the baseline.
    identity: Option<(String, String)>,
}

/// The floor process's worker id, and the one environment it offers.
const FLOOR: &str = "bench-floor";

/// Hidden subcommand: the floor process (`__bench-floor DIR TUNNEL DIRECT`)
/// serves the unconfined read tool through a tunnel to the gateway at `TUNNEL` with
/// `DIR/pki`'s `bench-floor` certificate, and over plaintext gRPC on `DIRECT`;
/// it reads `DIR/ws`, and runs until it is killed. On its stdin and stdout it
/// answers each byte with 20 KiB: the bare round trip between two
/// processes, the least a tool run in a process of its own can cost.
pub const FLOOR_ARG: &str = "__bench-floor";

/// Bytes of each answer of the floor's round trip: the read's 20 KiB.
const PONG: usize = 20 * 1024;

/// The floor process (see [`FLOOR_ARG`]).
pub fn floor_main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let [dir, tunnel, direct] = args.as_slice() else {
        eprintln!("usage: hands {FLOOR_ARG} DIR TUNNEL_ADDR DIRECT_ADDR");
        return ExitCode::from(2);
    };
    std::thread::spawn(|| {
        use std::io::{Read, Write};
        let (mut input, mut output) = (std::io::stdin().lock(), std::io::stdout().lock());
        let answer = vec![b'x'; PONG];
        let mut byte = [0u8; 1];
        while input.read_exact(&mut byte).is_ok() {
            if output
                .write_all(&answer)
                .and_then(|()| output.flush())
                .is_err()
            {
                return;
            }
        }
    });
    let served = (|| -> anyhow::Result<()> {
        let dir = std::path::Path::new(dir);
        let tunnel: SocketAddr = tunnel.parse().context("the tunnel address")?;
        let direct: SocketAddr = direct.parse().context("the direct address")?;
        // It serves reads with no authentication: never beyond this host.
        ensure!(
            direct.ip().is_loopback(),
            "the direct address must be a loopback address"
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        rt.block_on(floor(dir, tunnel, direct))
    })();
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hands {FLOOR_ARG}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn floor(
    dir: &std::path::Path,
    tunnel: SocketAddr,
    direct: SocketAddr,
) -> anyhow::Result<()> {
    use crate::connectors::hands_v1::tunnel as t;
    let svc = || UnconfinedRead {
        ctx: crate::tools::fs::FsContext::new(dir.join("ws")),
        identity: Some((FLOOR.into(), format!("floor-{}", std::process::id()))),
    };
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(v1::sandbox_server::SandboxServer::new(svc()));
    let [cert_name, key_name] = crate::pki::worker_files(FLOOR);
    let config = t::TunnelConfig {
        endpoints: vec![t::Endpoint {
            host: tunnel.ip().to_string(),
            port: tunnel.port(),
        }],
        server_name: Some("localhost".into()),
        tls: crate::net::tls::TlsFiles {
            ca: dir.join("pki/ca.pem"),
            cert: dir.join("pki").join(cert_name),
            key: dir.join("pki").join(key_name),
        },
        connections: 1,
        proxy: t::ProxyChoice::Direct,
        keepalive: Duration::from_secs(15),
        connect_timeout: Duration::from_secs(10),
        backoff: t::Backoff::default(),
    };
    let tls = Arc::new(crate::net::tls::ClientTls::client(config.tls.clone())?);
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let listener = tokio::net::TcpListener::bind(direct).await?;
    let served = tonic::transport::Server::builder()
        .add_service(v1::sandbox_server::SandboxServer::new(svc()))
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        );
    tokio::select! {
        () = t::run(Arc::new(config), tls, routes.routes(), shutdown, None, None) => Ok(()),
        r = served => Ok(r?),
    }
}

type Events =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::CallEvent, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl v1::sandbox_server::Sandbox for UnconfinedRead {
    async fn info(
        &self,
        _: tonic::Request<v1::InfoRequest>,
    ) -> Result<tonic::Response<v1::InfoResponse>, tonic::Status> {
        let Some((worker_id, instance_id)) = &self.identity else {
            return Err(tonic::Status::unimplemented("baseline"));
        };
        Ok(tonic::Response::new(v1::InfoResponse {
            worker_id: worker_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            protocols: vec!["hands.v1".into()],
            environments: vec![v1::Environment {
                name: FLOOR.into(),
                tools: vec!["read".into()],
                ..Default::default()
            }],
            capacity: 1024,
            instance_id: instance_id.clone(),
            ..Default::default()
        }))
    }
    async fn open_session(
        &self,
        req: tonic::Request<v1::OpenSessionRequest>,
    ) -> Result<tonic::Response<v1::OpenSessionResponse>, tonic::Status> {
        let Some((worker_id, _)) = &self.identity else {
            return Err(tonic::Status::unimplemented("baseline"));
        };
        let r = req.into_inner();
        Ok(tonic::Response::new(v1::OpenSessionResponse {
            session_id: r.session_id,
            created: true,
            environment: r.environment,
            worker_id: worker_id.clone(),
        }))
    }
    async fn close_session(
        &self,
        _: tonic::Request<v1::CloseSessionRequest>,
    ) -> Result<tonic::Response<v1::CloseSessionResponse>, tonic::Status> {
        match self.identity {
            Some(_) => Ok(tonic::Response::new(v1::CloseSessionResponse {
                closed: true,
            })),
            None => Err(tonic::Status::unimplemented("baseline")),
        }
    }
    async fn list_sessions(
        &self,
        _: tonic::Request<v1::ListSessionsRequest>,
    ) -> Result<tonic::Response<v1::ListSessionsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("baseline"))
    }
    type CallStream = Events;
    async fn call(
        &self,
        req: tonic::Request<v1::CallRequest>,
    ) -> Result<tonic::Response<Events>, tonic::Status> {
        let r = req.into_inner();
        let input: serde_json::Value = serde_json::from_str(&r.input_json)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let result = crate::tools::read::run(&input, &self.ctx);
        let events = vec![
            Ok(v1::CallEvent {
                event: Some(v1::call_event::Event::Started(v1::Started {
                    call_id: r.call_id,
                    executed_now: true,
                })),
            }),
            Ok(v1::CallEvent {
                event: Some(v1::call_event::Event::Finished(crate::proto::finished(
                    &result,
                    v1::Outcome::Completed,
                ))),
            }),
        ];
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(events))))
    }
    type AttachStream = Events;
    async fn attach(
        &self,
        _: tonic::Request<v1::AttachRequest>,
    ) -> Result<tonic::Response<Events>, tonic::Status> {
        Err(tonic::Status::unimplemented("baseline"))
    }
    async fn cancel(
        &self,
        _: tonic::Request<v1::CancelRequest>,
    ) -> Result<tonic::Response<v1::CancelResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("baseline"))
    }
}

async fn grpc_call(
    c: &mut SandboxClient<Channel>,
    sid: &str,
    id: &str,
    tool: &str,
    input: &str,
) -> anyhow::Result<()> {
    let mut s = c
        .call(v1::CallRequest {
            session_id: sid.into(),
            call_id: id.into(),
            tool: tool.into(),
            input_json: input.into(),
            stream_output: false,
        })
        .await?
        .into_inner();
    let mut finished = false;
    while let Some(ev) = s.message().await? {
        if let Some(v1::call_event::Event::Finished(f)) = ev.event {
            ensure!(!f.is_error, "{tool} failed: {:?}", f.content);
            finished = true;
        }
    }
    ensure!(finished, "no Finished");
    Ok(())
}

async fn api_call(
    api: &mut ApiClient,
    sid: &str,
    id: &str,
    tool: &str,
    input: &serde_json::Value,
) -> anyhow::Result<()> {
    let a = api
        .request(
            "POST",
            &format!("/v1/sessions/{sid}/tool_use"),
            Some(&json!({"id": id, "name": tool, "input": input})),
        )
        .await?;
    ensure!(
        a.status == 200 && a.body["is_error"] == false,
        "{tool}: {} {}",
        a.status,
        a.body
    );
    Ok(())
}

async fn open_session(api: &mut ApiClient) -> anyhow::Result<String> {
    open_session_in(api, "default").await
}

async fn open_session_in(api: &mut ApiClient, environment: &str) -> anyhow::Result<String> {
    let a = api
        .request(
            "POST",
            "/v1/sessions",
            Some(&json!({ "environment": environment })),
        )
        .await?;
    ensure!(a.status == 201, "open: {}", a.body);
    Ok(a.body["session_id"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// Calls/s with `conc` callers each running `per` calls.
async fn throughput<F, Fut>(conc: usize, per: usize, make: F) -> anyhow::Result<f64>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..conc {
        set.spawn(make(i));
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok((conc * per) as f64 / t0.elapsed().as_secs_f64())
}

pub fn run(
    iterations: usize,
    json_out: bool,
    lookup: &crate::policy::lookup::Lookup,
) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(bench(iterations, json_out, lookup))
}

async fn bench(
    n: usize,
    json_out: bool,
    lookup: &crate::policy::lookup::Lookup,
) -> anyhow::Result<ExitCode> {
    let dir = tempfile::Builder::new().prefix("hands-bench-").tempdir()?;
    let d = dir.path();
    let pki = crate::pki::generate(&crate::pki::Options {
        worker_id: "bench-worker".into(),
        ..Default::default()
    })?;
    crate::pki::write(&d.join("pki"), &pki, false)?;
    crate::pki::issue_worker(&d.join("pki"), FLOOR, 1)?;
    std::fs::write(d.join("token"), TOKEN)?;
    std::fs::write(
        d.join("gateway.toml"),
        "[tunnel]\nlisten = \"127.0.0.1:0\"\nca = \"pki/ca.pem\"\ncert = \"pki/gateway.pem\"\nkey = \"pki/gateway-key.pem\"\n[api]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"token\"\n",
    )?;
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let gateway = tokio::spawn(crate::gateway::run(
        crate::gateway::Config::load(&d.join("gateway.toml"))?,
        move |b, _| {
            let _ = tx.send(b);
        },
        shutdown,
    ));
    let bound = rx.await.context("the gateway did not start")?;

    // The worker, its own process.
    let debug = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    std::fs::write(
        d.join("worker.toml"),
        format!(
            "worker_id = \"bench-worker\"\ncapacity = 64\nenvironments = [\"default\"]\nlisten = \"{debug}\"\n[tunnel]\nendpoints = [\"{}\"]\nserver_name = \"localhost\"\nca = \"pki/ca.pem\"\ncert = \"pki/worker.pem\"\nkey = \"pki/worker-key.pem\"\nproxy = \"none\"\n[audit]\nfile = \"audit.jsonl\"\n",
            bound.tunnel
        ),
    )?;
    let exe = std::env::current_exe()?;
    let mut worker = Command::new(&exe);
    // The same lookup as this process ($HANDS_POLICY_DIR is inherited).
    for dir in lookup.dirs() {
        if dir.origin == crate::policy::lookup::Origin::Flag {
            worker.arg("--policy-dir").arg(&dir.path);
        }
    }
    let mut worker = worker
        .arg("worker")
        .arg("--config")
        .arg(d.join("worker.toml"))
        .stdout(Stdio::null())
        // Its log (an audit record mirrored per call, as in production) is
        // written, to a file of the bench's: it would drown the figures.
        .stderr(std::fs::File::create(d.join("worker.log")).context("the worker's log")?)
        .spawn()
        .context("starting the worker")?;
    let worker_pid = worker.id();
    // The floor, its own process too.
    let floor_direct = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut floor = Command::new(&exe)
        .arg(FLOOR_ARG)
        .arg(d)
        .arg(bound.tunnel.to_string())
        .arg(floor_direct.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(d.join("floor.log")).context("the floor's log")?)
        .spawn()
        .context("starting the floor process")?;
    let floor_pid = floor.id();
    let pong = floor.stdin.take().zip(floor.stdout.take());
    let result = match pong {
        Some(pong) => {
            let at = Floor {
                direct: floor_direct,
                pong,
            };
            measure(n, &bound, debug, at, worker_pid, d, lookup).await
        }
        None => Err(anyhow::anyhow!("the floor's stdio")),
    };
    for (child, pid) in [(&mut worker, worker_pid), (&mut floor, floor_pid)] {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
    }
    stop.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), gateway).await;
    let (rows, extra) = result?;
    super::bench::report(&rows, &extra, json_out)?;
    Ok(ExitCode::SUCCESS)
}

/// The floor process, as [`measure`] reaches it.
struct Floor {
    /// Its plaintext gRPC listener.
    direct: SocketAddr,
    /// Its stdin and stdout, for the bare round trip.
    pong: (std::process::ChildStdin, std::process::ChildStdout),
}

impl Floor {
    /// One bare round trip: a byte out, [`PONG`] bytes back (blocking: nothing
    /// else of the bench runs meanwhile).
    fn round_trip(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        use std::io::{Read, Write};
        self.pong.0.write_all(b"?")?;
        self.pong.1.read_exact(buf)?;
        Ok(())
    }
}

async fn measure(
    n: usize,
    bound: &crate::gateway::Bound,
    debug: SocketAddr,
    mut floor_at: Floor,
    worker_pid: u32,
    d: &std::path::Path,
    lookup: &crate::policy::lookup::Lookup,
) -> anyhow::Result<(Vec<Row>, serde_json::Value)> {
    let mut api = ApiClient::new(bound.api, TOKEN);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = api.request("GET", "/v1/workers", None).await?;
        if a.body["workers"].as_array().is_some_and(|w| w.len() == 2) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the worker and the floor did not both connect: {}", a.body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle = rss_kib(worker_pid);

    // Memory: idle sessions, before anything else has run.
    let idle_n = 20;
    let mut idle = Vec::new();
    for _ in 0..idle_n {
        idle.push(open_session(&mut api).await?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_sessions = rss_kib(worker_pid);
    let helpers: Vec<u64> = children(worker_pid).into_iter().map(rss_kib).collect();
    for sid in &idle {
        let _ = api
            .request("DELETE", &format!("/v1/sessions/{sid}"), None)
            .await?;
    }
    let mut figures = serde_json::Map::new();
    figures.insert(
        "worker RSS idle, tunnel connected (MiB)".into(),
        json!((rss_idle as f64 / 1024.0 * 10.0).round() / 10.0),
    );
    figures.insert(
        format!("worker RSS per idle session, {idle_n} sessions (KiB)"),
        json!((rss_sessions.saturating_sub(rss_idle) as f64 / idle_n as f64).round()),
    );
    figures.insert(
        format!(
            "session helper RSS, each ({} helpers, own processes, KiB)",
            helpers.len()
        ),
        json!((helpers.iter().sum::<u64>() as f64 / helpers.len().max(1) as f64).round()),
    );

    let sid = open_session(&mut api).await?;
    let line = "the quick brown fox jumps over the lazy dog, 0123456789\n";
    let text: String = line.repeat(20 * 1024 / line.len() + 1)[..20 * 1024].to_string();
    api_call(
        &mut api,
        &sid,
        "setup",
        "write",
        &json!({"file_path": "file20k.txt", "content": text}),
    )
    .await?;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{debug}"))?
        .connect()
        .await?;
    let mut grpc = SandboxClient::new(channel.clone()).max_decoding_message_size(64 << 20);

    // The in-process baseline: a session of this process.
    let cfg = crate::sandbox::SandboxConfig::from_env()?;
    let policy = Arc::new(lookup.load()?.policy("default")?);
    let ws = d.join("ws");
    std::fs::create_dir(&ws)?;
    std::fs::write(ws.join("file20k.txt"), &text)?;
    let local = crate::session::Session::open(
        &cfg,
        // The bench's own temporary directory.
        crate::session::SessionOptions::new(policy).in_dir(ws.clone(), true),
    )
    .await?;

    // The unconfined read baseline over the same gRPC stack.
    let baseline_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let baseline_addr = baseline_listener.local_addr()?;
    let svc = UnconfinedRead {
        ctx: crate::tools::fs::FsContext::new(std::fs::canonicalize(&ws)?),
        identity: None,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(v1::sandbox_server::SandboxServer::new(svc))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(baseline_listener)
                    .with_nodelay(Some(true)),
            ),
    );
    let mut baseline = SandboxClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{baseline_addr}"))?
            .connect()
            .await?,
    );
    // The floor reads the same directory, from its own process.
    let mut floor = SandboxClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", floor_at.direct))?
            .connect()
            .await?,
    );
    let floor_sid = open_session_in(&mut api, FLOOR).await?;

    let bash_in = json!({"command": "/bin/true"});
    let read_in = json!({"file_path": "file20k.txt"});
    let bash_s = bash_in.to_string();
    let read_s = read_in.to_string();
    let mut k = 0usize;
    let mut id = || {
        k += 1;
        format!("b{k}")
    };

    // Interleaved rounds: one of each operation per round.
    let mut pong = vec![0u8; PONG];
    let mut s: Vec<Vec<Duration>> = vec![Vec::new(); 11];
    for round in 0..(n + n / 10) {
        let mut t = Instant::now();
        let lap = |i: usize, t: &mut Instant, s: &mut Vec<Vec<Duration>>| {
            if round >= n / 10 {
                s[i].push(t.elapsed());
            }
            *t = Instant::now();
        };
        let st = Command::new("/bin/true").status()?;
        ensure!(st.success());
        lap(0, &mut t, &mut s);
        let r = local.call("bash", &bash_in).await;
        ensure!(!r.is_error, "{r:?}");
        lap(1, &mut t, &mut s);
        grpc_call(&mut grpc, &sid, &id(), "bash", &bash_s).await?;
        lap(2, &mut t, &mut s);
        api_call(&mut api, &sid, &id(), "bash", &bash_in).await?;
        lap(3, &mut t, &mut s);
        let r = local.call("read", &read_in).await;
        ensure!(!r.is_error, "{r:?}");
        lap(4, &mut t, &mut s);
        grpc_call(&mut baseline, "-", &id(), "read", &read_s).await?;
        lap(5, &mut t, &mut s);
        grpc_call(&mut grpc, &sid, &id(), "read", &read_s).await?;
        lap(6, &mut t, &mut s);
        api_call(&mut api, &sid, &id(), "read", &read_in).await?;
        lap(7, &mut t, &mut s);
        grpc_call(&mut floor, "-", &id(), "read", &read_s).await?;
        lap(8, &mut t, &mut s);
        api_call(&mut api, &floor_sid, &id(), "read", &read_in).await?;
        lap(9, &mut t, &mut s);
        floor_at.round_trip(&mut pong)?;
        lap(10, &mut t, &mut s);
    }
    let names = [
        "bare fork/exec /bin/true",
        "bash /bin/true, in process (sandboxed session)",
        "bash /bin/true, gRPC (debug listener)",
        "bash /bin/true, gateway API -> tunnel -> worker",
        "read 20 KiB, in process (sandboxed session)",
        "read 20 KiB, unconfined, over gRPC (baseline)",
        "read 20 KiB, gRPC (debug listener)",
        "read 20 KiB, gateway API -> tunnel -> worker",
        "read 20 KiB, unconfined, gRPC to another process (floor)",
        "read 20 KiB, unconfined, gateway API -> tunnel -> another process (floor)",
        "bare round trip to another process, 1 byte out, 20 KiB back (pipes)",
    ];
    let series: Vec<Series> = names
        .iter()
        .zip(s)
        .map(|(name, samples)| Series::new(name, samples))
        .collect();
    let rows = vec![
        series[3].row(Some(&series[0])),
        series[2].row(Some(&series[0])),
        series[1].row(Some(&series[0])),
        series[0].row(None),
        series[7].row(Some(&series[5])),
        series[6].row(Some(&series[5])),
        series[4].row(Some(&series[5])),
        series[5].row(None),
        series[9].row(Some(&series[5])),
        series[8].row(Some(&series[5])),
        series[10].row(Some(&series[5])),
        // What the sandbox itself adds, against the floor of each way in.
        series[7].row(Some(&series[9])),
        series[6].row(Some(&series[8])),
    ];

    // Throughput: reads/s, 1 and 64 concurrent callers, 8 sessions.
    let mut sessions = vec![sid.clone()];
    for _ in 0..7 {
        let s = open_session(&mut api).await?;
        api_call(
            &mut api,
            &s,
            "setup",
            "write",
            &json!({"file_path": "file20k.txt", "content": text}),
        )
        .await?;
        sessions.push(s);
    }
    let sessions = Arc::new(sessions);
    for conc in [1usize, 64] {
        let per = (4000 / conc).clamp(50, 2000);
        let api_addr = bound.api;
        let ss = sessions.clone();
        let cpu0 = worker_cpu(worker_pid);
        let gw = throughput(conc, per, move |i| {
            let ss = ss.clone();
            async move {
                let mut api = ApiClient::new(api_addr, TOKEN);
                let sid = ss[i % ss.len()].clone();
                for j in 0..per {
                    api_call(
                        &mut api,
                        &sid,
                        &format!("t{conc}-{i}-{j}"),
                        "read",
                        &json!({"file_path": "file20k.txt"}),
                    )
                    .await?;
                }
                Ok(())
            }
        })
        .await?;
        let cpu1 = worker_cpu(worker_pid);
        let ss = sessions.clone();
        let ch = channel.clone();
        let direct = throughput(conc, per, move |i| {
            let ss = ss.clone();
            let mut c = SandboxClient::new(ch.clone());
            async move {
                let sid = ss[i % ss.len()].clone();
                for j in 0..per {
                    grpc_call(
                        &mut c,
                        &sid,
                        &format!("g{conc}-{i}-{j}"),
                        "read",
                        r#"{"file_path":"file20k.txt"}"#,
                    )
                    .await?;
                }
                Ok(())
            }
        })
        .await?;
        figures.insert(
            format!("reads/s at {conc} concurrent, gateway API -> tunnel"),
            json!(gw.round()),
        );
        figures.insert(
            format!("reads/s at {conc} concurrent, gRPC direct"),
            json!(direct.round()),
        );
        let cpu2 = worker_cpu(worker_pid);
        // CPU time per call: what a read costs the host whatever the load
        // generator does to the wall clock on a machine it shares.
        let calls = (conc * per) as f64;
        let us = |a: f64, b: f64| json!(((b - a) / calls * 1e6).round());
        figures.insert(
            format!("worker CPU us per read at {conc} concurrent, gateway API -> tunnel"),
            us(cpu0.0, cpu1.0),
        );
        figures.insert(
            format!("helper CPU us per read at {conc} concurrent, gateway API -> tunnel"),
            us(cpu0.1, cpu1.1),
        );
        figures.insert(
            format!("worker CPU us per read at {conc} concurrent, gRPC direct"),
            us(cpu1.0, cpu2.0),
        );
        figures.insert(
            format!("helper CPU us per read at {conc} concurrent, gRPC direct"),
            us(cpu1.1, cpu2.1),
        );
    }

    let _ = local.close().await;
    Ok((rows, serde_json::Value::Object(figures)))
}
