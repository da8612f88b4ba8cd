//! `hands bench`: the foundation's figures, each against a baseline measured in
//! the same run, reported as ratios. Not a test: nothing here asserts a time.
//!
//! - a sandboxed `bash` call running `/bin/true` vs a bare fork/exec of
//!   `/bin/true`, vs `bwrap --unshare-net … true`, vs the official SDK's bash tool
//!   in process (unconfined);
//! - a `read` of a 20 KiB file vs the same read tool in process without the
//!   sandbox, vs `std::fs::read`, vs the SDK's read tool;
//! - session open and close, p50/p99: with a given workspace, and with a
//!   workspace filesystem of its own (from the pool, and formatted on demand);
//! - grep (a literal and an alternation) over a generated tree vs `rg`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use serde_json::json;

use crate::policy::Policy;
use crate::sandbox::SandboxConfig;
use crate::session::{Session, SessionOptions};
use crate::tools::fs::FsContext;
use crate::tools::Tool;

#[derive(clap::Args)]
pub struct Args {
    /// Calls per measured operation.
    #[arg(long, default_value_t = 300)]
    iterations: usize,
    /// Session opens to measure.
    #[arg(long, default_value_t = 100)]
    opens: usize,
    /// Files in the generated grep tree (about 24 KiB each).
    #[arg(long, default_value_t = 8000)]
    grep_files: usize,
    /// Python with the official SDK (anthropic 2.10.0) for the SDK baselines;
    /// they are skipped when it cannot be imported.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Print the figures as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Measure the tunnel instead: round trips through the gateway and the
    /// gRPC service vs in process, throughput, worker memory.
    #[arg(long)]
    tunnel: bool,
    /// Measure egress instead: session open in an egress environment, and
    /// connection setup and a 100 MiB download through the session's proxy,
    /// against the same without hands.
    #[arg(long, conflicts_with = "tunnel")]
    egress: bool,
    /// Measure the MCP face instead: bash and read through `hands mcp` over
    /// stdio against the same calls in process.
    #[arg(long, conflicts_with_all = ["tunnel", "egress"])]
    mcp: bool,
}

#[derive(serde::Serialize)]
pub(super) struct Row {
    name: String,
    p50_ms: f64,
    p99_ms: f64,
    baseline: Option<String>,
    ratio_p50: Option<f64>,
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

pub(super) struct Series {
    name: String,
    samples: Vec<Duration>,
}

impl Series {
    pub(super) fn new(name: &str, mut samples: Vec<Duration>) -> Series {
        samples.sort();
        Series {
            name: name.to_string(),
            samples,
        }
    }
    pub(super) fn p50(&self) -> f64 {
        pct(&self.samples, 0.5)
    }
    pub(super) fn row(&self, baseline: Option<&Series>) -> Row {
        Row {
            name: self.name.clone(),
            p50_ms: self.p50(),
            p99_ms: pct(&self.samples, 0.99),
            baseline: baseline.map(|b| b.name.clone()),
            ratio_p50: baseline.map(|b| self.p50() / b.p50()),
        }
    }
}

fn time_n(n: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Vec<Duration>> {
    for _ in 0..(n / 10).max(3) {
        f()?;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        out.push(t.elapsed());
    }
    Ok(out)
}

async fn time_n_async<F, Fut>(n: usize, mut f: F) -> anyhow::Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for _ in 0..(n / 10).max(3) {
        f().await?;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

async fn open(
    cfg: &SandboxConfig,
    policy: &Arc<Policy>,
    ws: &Path,
) -> anyhow::Result<Arc<Session>> {
    Ok(Session::open(
        cfg,
        // The bench's own temporary directory.
        SessionOptions::new(policy.clone()).in_dir(ws.to_path_buf(), true),
    )
    .await?)
}

/// A session whose workspace hands makes (a filesystem of its own).
async fn open_made(cfg: &SandboxConfig, policy: &Arc<Policy>) -> anyhow::Result<Arc<Session>> {
    Ok(Session::open(cfg, SessionOptions::new(policy.clone())).await?)
}

fn run_status(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status()?;
    ensure!(st.success(), "{cmd:?} failed: {st}");
    Ok(())
}

/// Deterministic pseudo-random text: ~24 KiB a file, needles in 1 file of 100.
fn generate_tree(root: &Path, files: usize) -> anyhow::Result<()> {
    const WORDS: [&str; 16] = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    ];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..files {
        let dir = root.join(format!("d{:03}", i / 100));
        std::fs::create_dir_all(&dir)?;
        let mut text = String::with_capacity(25_000);
        let mut line = 0;
        while text.len() < 24_000 {
            for _ in 0..10 {
                text.push_str(WORDS[(next() % 16) as usize]);
                text.push('_');
                text.push_str(&(next() % 1000).to_string());
                text.push(' ');
            }
            if i % 100 == 7 && line % 50 == 0 {
                text.push_str("hands_needle_literal needle_red");
            }
            text.push('\n');
            line += 1;
        }
        std::fs::write(dir.join(format!("f{i:05}.txt")), text)?;
    }
    Ok(())
}

fn count_lines(s: &str) -> usize {
    s.lines()
        .filter(|l| !l.starts_with("[output truncated"))
        .count()
}

pub fn run(args: Args, lookup: &crate::policy::lookup::Lookup) -> anyhow::Result<ExitCode> {
    super::require_root("hands bench")?;
    if args.tunnel {
        return super::bench_tunnel::run(args.iterations, args.json, lookup);
    }
    if args.egress {
        return super::bench_egress::run(args.iterations, args.opens, args.json, lookup);
    }
    if args.mcp {
        return super::bench_mcp::run(args.iterations, args.json, lookup);
    }
    let policy: Policy = lookup.load()?.policy("default")?;
    let policy = Arc::new(policy);
    let cfg = SandboxConfig::from_env()?;
    let rt = super::runtime()?;
    let n = args.iterations;
    let mut rows = Vec::new();
    let scratch = tempfile::tempdir().context("scratch directory")?;
    let ws = scratch.path().join("ws");
    std::fs::create_dir(&ws)?;
    let line = "the quick brown fox jumps over the lazy dog, 0123456789\n";
    let text: String = line.repeat(20 * 1024 / line.len() + 1)[..20 * 1024].to_string();
    std::fs::write(ws.join("file20k.txt"), &text)?;

    // Tool calls in one session.
    // The compared operations run interleaved, one of each per round, so that
    // drift on a shared machine lands on all of them alike.
    let ctx = FsContext::new(std::fs::canonicalize(&ws)?);
    let read_in = json!({"file_path": "file20k.txt"});
    let [bash_s, bare, shell_proto, read_s, inproc, raw_read, colon_s, colon_host] =
        rt.block_on(async {
            let s = open(&cfg, &policy, &ws).await?;
            let mut host = HostShell::start()?;
            let bash_in = json!({"command": "/bin/true"});
            let colon_in = json!({"command": ":"});
            let mut v: [Vec<Duration>; 8] = Default::default();
            let warm = (n / 10).max(3);
            for round in 0..warm + n {
                let keep = round >= warm;
                let t = Instant::now();
                let r = s.call("bash", &bash_in).await;
                ensure!(!r.is_error, "bash failed: {}", r.text_content());
                let d0 = t.elapsed();
                let t = Instant::now();
                run_status(&mut Command::new("/bin/true"))?;
                let d1 = t.elapsed();
                let t = Instant::now();
                host.once("/bin/true").await?;
                let d2 = t.elapsed();
                let t = Instant::now();
                let r = s.call("read", &read_in).await;
                ensure!(
                    !r.is_error && r.text_content().len() == 20 * 1024,
                    "read failed"
                );
                let d3 = t.elapsed();
                let t = Instant::now();
                let r = crate::tools::fs::run(Tool::Read, &read_in, &ctx);
                ensure!(!r.is_error, "in-process read failed");
                let d4 = t.elapsed();
                let t = Instant::now();
                std::fs::read_to_string(ws.join("file20k.txt"))?;
                let d5 = t.elapsed();
                // The shell protocol alone: a builtin, so no fork.
                let t = Instant::now();
                let r = s.call("bash", &colon_in).await;
                ensure!(!r.is_error, "bash failed: {}", r.text_content());
                let d6 = t.elapsed();
                let t = Instant::now();
                host.once(":").await?;
                let d7 = t.elapsed();
                if keep {
                    for (series, d) in v.iter_mut().zip([d0, d1, d2, d3, d4, d5, d6, d7]) {
                        series.push(d);
                    }
                }
            }
            s.close().await?;
            Ok::<_, anyhow::Error>(v)
        })?;
    let bash_s = Series::new("bash /bin/true, sandboxed call", bash_s);
    let bare = Series::new("bare fork/exec /bin/true", bare);
    let shell_proto = Series::new(
        "same shell protocol, unconfined bash on the host",
        shell_proto,
    );
    let read_s = Series::new("read 20 KiB, sandboxed call", read_s);
    let inproc = Series::new(
        "read 20 KiB, same read tool in process (no sandbox)",
        inproc,
    );
    let raw_read = Series::new("read 20 KiB, std::fs::read_to_string", raw_read);
    let colon_s = Series::new(
        "bash : (a builtin: the protocol, no fork), sandboxed call",
        colon_s,
    );
    let colon_host = Series::new(
        "bash : (a builtin), same shell protocol, unconfined bash on the host",
        colon_host,
    );

    let bwrap = which("bwrap").map(|b| {
        time_n(n, || {
            run_status(Command::new(&b).args([
                "--unshare-net",
                "--unshare-pid",
                "--die-with-parent",
                "--ro-bind",
                "/usr",
                "/usr",
                "--symlink",
                "usr/bin",
                "/bin",
                "--symlink",
                "usr/lib",
                "/lib",
                "--symlink",
                "usr/lib64",
                "/lib64",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "--tmpfs",
                "/tmp",
                "/bin/true",
            ]))
        })
        .map(|v| Series::new("bwrap --unshare-net --unshare-pid … /bin/true", v))
    });
    let bwrap = match bwrap {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            eprintln!("bench: bwrap baseline skipped: {e:#}");
            None
        }
        None => None,
    };

    let sdk = sdk_baselines(&args.python, &ws, n);
    let (sdk_bash, sdk_read) = match sdk {
        Ok((b, r)) => (
            Some(Series::new(
                "SDK bash tool /bin/true, in process (unconfined)",
                b,
            )),
            Some(Series::new("SDK read tool 20 KiB, in process", r)),
        ),
        Err(e) => {
            eprintln!("bench: SDK baselines skipped: {e:#}");
            (None, None)
        }
    };

    rows.push(bash_s.row(Some(&bare)));
    rows.push(bare.row(None));
    rows.push(shell_proto.row(Some(&bare)));
    rows.push(bash_s.row(Some(&shell_proto)));
    rows.push(colon_s.row(Some(&colon_host)));
    rows.push(colon_host.row(None));
    if let Some(b) = &bwrap {
        rows.push(b.row(Some(&bare)));
        rows.push(bash_s.row(Some(b)));
    }
    if let Some(b) = &sdk_bash {
        rows.push(b.row(Some(&bare)));
        rows.push(bash_s.row(Some(b)));
    }
    rows.push(read_s.row(Some(&inproc)));
    rows.push(inproc.row(Some(&raw_read)));
    rows.push(raw_read.row(None));
    if let Some(r) = &sdk_read {
        rows.push(r.row(Some(&inproc)));
        rows.push(read_s.row(Some(r)));
    }

    // Session open/close, after the per-call figures: the kernel tears down each
    // closed session's network namespace asynchronously, and that work must not
    // land in the other measurements.
    let (opens, closes) = rt.block_on(async {
        let mut opens = Vec::new();
        let mut closes = Vec::new();
        for i in 0..args.opens + 5 {
            let t = Instant::now();
            let s = open(&cfg, &policy, &ws).await?;
            let opened = t.elapsed();
            let t = Instant::now();
            s.close().await?;
            if i >= 5 {
                opens.push(opened);
                closes.push(t.elapsed());
            }
        }
        Ok::<_, anyhow::Error>((opens, closes))
    })?;
    let open_s = Series::new(
        "session open, given workspace (namespaces + cgroup + confined helper)",
        opens,
    );
    let close_s = Series::new(
        "session close, given workspace (kill tree, remove cgroup)",
        closes,
    );

    // The same with a workspace hands makes: a filesystem of its own, from the
    // pool of formatted images (the worker keeps one per environment), and
    // formatted on demand (a geometry the pool does not hold).
    let pooled = crate::workspace::Geometry {
        bytes: policy.limits.disk_bytes,
        inodes: policy.limits.disk_inodes,
    };
    cfg.workspaces.keep_ready(pooled, 2);
    let mut on_demand_policy = (*policy).clone();
    on_demand_policy.limits.disk_inodes += 1;
    let on_demand_policy = Arc::new(on_demand_policy);
    let [made_open, made_close, fresh_open] = rt.block_on(async {
        let mut v: [Vec<Duration>; 3] = Default::default();
        for i in 0..args.opens + 5 {
            // Opens arrive slower than back to back in service; let the pool
            // refill so this measures the pooled path.
            let waited = Instant::now();
            while cfg.workspaces.ready(pooled) < 2 && waited.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let t = Instant::now();
            let s = open_made(&cfg, &policy).await?;
            let opened = t.elapsed();
            let t = Instant::now();
            s.close().await?;
            let closed = t.elapsed();
            let t = Instant::now();
            let s = open_made(&cfg, &on_demand_policy).await?;
            let fresh = t.elapsed();
            s.close().await?;
            if i >= 5 {
                for (series, d) in v.iter_mut().zip([opened, closed, fresh]) {
                    series.push(d);
                }
            }
        }
        Ok::<_, anyhow::Error>(v)
    })?;
    let made_open = Series::new(
        "session open, own workspace filesystem from the pool",
        made_open,
    );
    let made_close = Series::new(
        "session close, own workspace filesystem (unmount)",
        made_close,
    );
    let fresh_open = Series::new(
        "session open, own workspace filesystem formatted on demand",
        fresh_open,
    );
    // A Claude Managed Agents session's next item: its kept filesystem is
    // mounted again (the first open formats it; not measured).
    let key = format!("bench-{}", std::process::id());
    let [kept_open, kept_close] = rt.block_on(async {
        let mut v: [Vec<Duration>; 2] = Default::default();
        for i in 0..args.opens + 5 {
            let mut o = SessionOptions::new(policy.clone());
            o.kept = Some(key.clone());
            let t = Instant::now();
            let s = Session::open(&cfg, o).await?;
            let opened = t.elapsed();
            let t = Instant::now();
            s.close().await?;
            let closed = t.elapsed();
            if i >= 5 {
                v[0].push(opened);
                v[1].push(closed);
            }
        }
        Ok::<_, anyhow::Error>(v)
    })?;
    if let Err(e) = cfg.workspaces.delete_kept(&key) {
        tracing::warn!(error = %e, "removing the bench's kept workspace");
    }
    let kept_open = Series::new(
        "session open, kept workspace filesystem (a session's next item)",
        kept_open,
    );
    let kept_close = Series::new(
        "session close, kept workspace filesystem (sync, unmount)",
        kept_close,
    );
    rows.push(open_s.row(None));
    rows.push(made_open.row(Some(&open_s)));
    rows.push(fresh_open.row(Some(&open_s)));
    rows.push(kept_open.row(Some(&open_s)));
    rows.push(close_s.row(None));
    rows.push(made_close.row(Some(&close_s)));
    rows.push(kept_close.row(Some(&close_s)));
    cfg.workspaces.shutdown(super::DRAIN);

    // grep over a generated tree vs rg.
    let tree = scratch.path().join("tree");
    generate_tree(&tree, args.grep_files)?;
    // rg may use every core; so may the session here (the default policy's
    // 1-CPU quota would halve grep's parallelism and measure the policy, not grep).
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut gp = (*policy).clone();
    gp.limits.cpu = cores as f64;
    let grep_policy = Arc::new(gp);
    match which("rg") {
        None => eprintln!("bench: rg not found; grep comparison skipped"),
        Some(rg) => {
            for (label, pattern) in [
                ("literal", "hands_needle_literal"),
                (
                    "alternation",
                    "needle_(red|blue)|zulu_[0-9]+|hands_(haystack|needle_alternate)",
                ),
            ] {
                let rg_out = Command::new(&rg)
                    .args(["--no-config", "-n", "--no-heading", "-e", pattern, "--"])
                    .arg(&tree)
                    .output()?;
                let rg_lines = count_lines(&String::from_utf8_lossy(&rg_out.stdout));
                let rg_s = time_n(10, || {
                    run_status(
                        Command::new(&rg)
                            .args(["--no-config", "-n", "--no-heading", "-e", pattern, "--"])
                            .arg(&tree),
                    )
                })?;
                let (hands_s, hands_lines) = rt.block_on(async {
                    let s = open(&cfg, &grep_policy, &tree).await?;
                    let input = json!({ "pattern": pattern });
                    let first = s.call("grep", &input).await;
                    let lines = count_lines(&first.text_content());
                    let samples = time_n_async(10, || async {
                        let r = s.call("grep", &input).await;
                        ensure!(!r.is_error, "grep failed: {}", r.text_content());
                        Ok(())
                    })
                    .await?;
                    s.close().await?;
                    Ok::<_, anyhow::Error>((samples, lines))
                })?;
                if hands_lines != rg_lines {
                    eprintln!("bench: grep {label}: hands found {hands_lines} lines, rg {rg_lines} (the output cap may apply)");
                }
                let rg_series = Series::new(
                    &format!("rg, {label} ({rg_lines} lines, {} files)", args.grep_files),
                    rg_s,
                );
                let hands_series =
                    Series::new(&format!("grep tool, {label}, sandboxed call"), hands_s);
                rows.push(hands_series.row(Some(&rg_series)));
                rows.push(rg_series.row(None));
            }
        }
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a bench's rows and figures: JSON, or the table and one line per
/// figure.
pub(super) fn report(
    rows: &[Row],
    figures: &serde_json::Value,
    json_out: bool,
) -> anyhow::Result<()> {
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"rows": rows, "figures": figures}))?
        );
    } else {
        print_table(rows);
        for (k, v) in figures.as_object().into_iter().flatten() {
            println!("{k:<58} {v}");
        }
    }
    Ok(())
}

pub(super) fn print_table(rows: &[Row]) {
    let uname = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "hands bench: kernel {uname}, {cores} cores, {} build",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "{:<58} {:>9} {:>9}  ratio (p50)",
        "operation", "p50 ms", "p99 ms"
    );
    for r in rows {
        let ratio = match (&r.baseline, r.ratio_p50) {
            (Some(b), Some(x)) => format!("{x:.2}x  {b}"),
            _ => String::new(),
        };
        println!(
            "{:<58} {:>9.3} {:>9.3}  {}",
            r.name, r.p50_ms, r.p99_ms, ratio
        );
    }
}

/// The bash tool's wire protocol (same wrapper, sentinel and reader) against an
/// unconfined `/bin/bash` on the host: separates what confinement costs from what
/// a persistent shell costs.
struct HostShell {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
    chunk: Vec<u8>,
}

impl HostShell {
    fn start() -> anyhow::Result<HostShell> {
        let mut child = tokio::process::Command::new("/bin/bash")
            .args(["--noprofile", "--norc"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        Ok(HostShell {
            stdin: child.stdin.take().context("stdin")?,
            stdout: child.stdout.take().context("stdout")?,
            _child: child,
            chunk: vec![0u8; 64 * 1024],
        })
    }

    async fn once(&mut self, command: &str) -> anyhow::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (wrapped, sentinel) = crate::tools::bash::wrap(command);
        self.stdin.write_all(wrapped.as_bytes()).await?;
        let mut buf = Vec::new();
        loop {
            let k = self.stdout.read(&mut self.chunk).await?;
            ensure!(k > 0, "shell exited");
            buf.extend_from_slice(&self.chunk[..k]);
            if memchr::memmem::find(&buf, sentinel.as_bytes()).is_some() && buf.ends_with(b"\n") {
                break;
            }
        }
        let (_, code) = crate::tools::bash::parse_output(&buf, &sentinel, false);
        ensure!(code == 0, "exit {code}");
        Ok(())
    }
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file())
}

fn sdk_baselines(
    python: &str,
    ws: &Path,
    n: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/sdk_tools.py");
    ensure!(
        script.is_file(),
        "{} not found (run from a source checkout)",
        script.display()
    );
    let sdk_ws = tempfile::tempdir()?;
    let sdk_ws_path = std::fs::canonicalize(sdk_ws.path())?;
    std::fs::copy(ws.join("file20k.txt"), sdk_ws_path.join("file20k.txt"))?;
    let out = Command::new(python)
        .arg(&script)
        .arg("--workdir")
        .arg(&sdk_ws_path)
        .args(["--file", "file20k.txt", "--iterations", &n.to_string()])
        .output()
        .with_context(|| format!("running {python}"))?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let series = |k: &str| -> Vec<Duration> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_f64())
                    .map(Duration::from_secs_f64)
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok((series("bash_true"), series("read")))
}
