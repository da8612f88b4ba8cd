//! `hands demo`: a gateway and a worker in this process, on loopback, with a
//! temporary PKI, and a scripted session through the gateway's HTTP API —
//! every tool, one denied escape, one timeout, then a session of an `egress`
//! environment with one allowed and one denied request — printed as a
//! transcript. Each step checks what it shows, so the demo exits 0 only when
//! hands works.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::gateway::client::ApiClient;

#[derive(clap::Args)]
pub struct Args {
    /// Environment (policy) the demo session runs in.
    #[arg(long, default_value = "default")]
    env: String,
    /// Keep the temporary directory (PKI, configs) and print its path.
    #[arg(long)]
    keep: bool,
}

pub fn run(args: Args, lookup: &crate::policy::lookup::Lookup) -> anyhow::Result<ExitCode> {
    super::require_root("hands demo")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(demo(args, lookup))
}

const WORKER_ID: &str = "demo-worker";

async fn demo(args: Args, lookup: &crate::policy::lookup::Lookup) -> anyhow::Result<ExitCode> {
    let dir = tempfile::Builder::new()
        .prefix("hands-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let pki_dir = dir.path().join("pki");
    let pki = crate::pki::generate(&crate::pki::Options {
        worker_id: WORKER_ID.into(),
        ..Default::default()
    })?;
    crate::pki::write(&pki_dir, &pki, false)?;
    let mut token_bytes = [0u8; 24];
    getrandom::fill(&mut token_bytes).map_err(|e| anyhow::anyhow!("random token: {e}"))?;
    let token: String = token_bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(dir.path().join("token"), &token)?;

    section("hands demo: a gateway and a worker on loopback, over mTLS");
    note(&format!("temporary PKI in {}", pki_dir.display()));

    // The gateway.
    let gw_toml = dir.path().join("gateway.toml");
    std::fs::write(
        &gw_toml,
        "[tunnel]\nlisten = \"127.0.0.1:0\"\nca = \"pki/ca.pem\"\ncert = \"pki/gateway.pem\"\nkey = \"pki/gateway-key.pem\"\n\n[api]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"token\"\n",
    )?;
    let gw_config = crate::gateway::Config::load(&gw_toml)?;
    let (stop_gateway, gw_shutdown) = tokio::sync::watch::channel(false);
    let (stop_worker, shutdown) = tokio::sync::watch::channel(false);
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let gateway = tokio::spawn(crate::gateway::run(
        gw_config,
        move |b, _| {
            let _ = bound_tx.send(b);
        },
        gw_shutdown,
    ));
    let bound = bound_rx.await.context("the gateway did not start")?;
    note(&format!(
        "gateway: tunnel on {}, HTTP API on {}",
        bound.tunnel, bound.api
    ));

    // A web server on this host's loopback, and an egress environment that
    // allows exactly it.
    let web = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let web_port = web.local_addr()?.port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut c, _)) = web.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 4096];
                let _ = c.read(&mut b).await;
                let body = "hello from the demo's server on the host\n";
                let _ = c
                    .write_all(
                        format!(
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies)?;
    let egress_policy = crate::policy::builtin_text("default")
        .context("the default policy")?
        .replace(
            "mode = \"loopback\"",
            &format!(
                "mode = \"egress\"\n\n[egress]\n# The demo's server on the host's loopback, that port only.\nallow = [\"127.0.0.1/32:{web_port}\"]"
            ),
        );
    std::fs::write(policies.join(format!("{EGRESS_ENV}.toml")), egress_policy)?;

    // The worker, dialing the gateway.
    let w_toml = dir.path().join("worker.toml");
    std::fs::write(
        &w_toml,
        format!(
            "worker_id = \"{WORKER_ID}\"\ncapacity = 4\nenvironments = [\"{}\", \"{EGRESS_ENV}\"]\npolicy_dirs = [\"policies\"]\n\n[tunnel]\nendpoints = [\"{}\"]\nserver_name = \"localhost\"\nca = \"pki/ca.pem\"\ncert = \"pki/worker.pem\"\nkey = \"pki/worker-key.pem\"\nproxy = \"none\"\n",
            args.env, bound.tunnel
        ),
    )?;
    let w_config = crate::worker::Config::load(&w_toml, lookup)?;
    let sandbox = crate::sandbox::SandboxConfig::from_env().context("sandbox configuration")?;
    crate::session::sweep_orphans(&sandbox);
    let workspaces = sandbox.workspaces.clone();
    crate::worker::prepare_workspaces(&w_config, &sandbox);
    let registry = crate::worker::registry(&w_config, sandbox)?;
    let worker = {
        let registry = registry.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            crate::worker::serve(
                &w_config,
                registry,
                |_| {},
                |_| {},
                None,
                Default::default(),
                shutdown,
            )
            .await
        })
    };

    let result = match script(&bound, &token, &args.env).await {
        Ok(()) => egress(&bound, &token, web_port).await,
        Err(e) => Err(e),
    };

    // The worker first: its tunnel ends with GOAWAY rather than a cut.
    stop_worker.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), worker).await;
    stop_gateway.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), gateway).await;
    registry.close_all();
    drop(registry);
    workspaces.shutdown(super::DRAIN);
    super::release_cgroups();
    if args.keep {
        let kept = dir.keep();
        note(&format!("kept {}", kept.display()));
    }
    match result {
        Ok(()) => {
            section("demo finished: every step behaved as expected");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!(
                "\nhands demo: FAILED: {}",
                crate::util::error_chain(e.as_ref())
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The demo's egress environment.
const EGRESS_ENV: &str = "demo-egress";

/// A session of an `egress` environment: one request its policy allows, one it
/// denies, and the note the model reads.
async fn egress(bound: &crate::gateway::Bound, token: &str, port: u16) -> anyhow::Result<()> {
    let api = ApiClient::new(bound.api, token);
    let mut s = Script::open(
        api,
        EGRESS_ENV,
        &format!("egress to 127.0.0.1:{port} of the host only"),
        100,
    )
    .await?;
    let session = s.session.clone();
    // bash's /dev/tcp speaks to the session's HTTP proxy (127.0.0.1 inside
    // the session is the session's own loopback; the proxy is the worker's).
    let request = |url: &str, host: &str| {
        format!(
            "exec 3<>/dev/tcp/127.0.0.1/3128 && printf 'GET {url} HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n' >&3 && cat <&3"
        )
    };
    let r = s
        .call(
            "bash",
            json!({"command": request(&format!("http://127.0.0.1:{port}/"), &format!("127.0.0.1:{port}"))}),
            "a request the environment allows, through the session's proxy",
        )
        .await?;
    expect(
        text_of(&r).contains("hello from the demo's server on the host"),
        "allowed: the worker connected to the address it checked",
    )?;
    let r = s
        .call(
            "bash",
            json!({"command": format!("{}; curl -sS --max-time 5 https://example.com/ 2>&1 | head -1; true", request("http://example.com/", "example.com"))}),
            "a host the environment does not allow, through the proxy and then with curl",
        )
        .await?;
    let t = text_of(&r);
    expect(
        t.contains("403 Forbidden") && t.contains("X-Hands-Egress: denied; host=example.com"),
        "denied with a 403 that names the host (example.com was never resolved)",
    )?;
    expect(
        t.contains(&format!(
            "[egress] denied by environment {EGRESS_ENV}: example.com"
        )),
        "the result ends with the note the model reads",
    )?;
    let closed = s
        .api
        .request("DELETE", &format!("/v1/sessions/{session}"), None)
        .await?;
    expect(closed.body["closed"] == true, "session closed")?;
    Ok(())
}

fn section(title: &str) {
    println!("\n== {title}");
}

fn note(text: &str) {
    println!("   {text}");
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("   │ {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn text_of(result: &Value) -> String {
    result["content"]
        .as_array()
        .map(|blocks| {
            blocks
                .iter()
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default()
}

struct Script {
    api: ApiClient,
    session: String,
    n: usize,
}

impl Script {
    /// Opens a session of `env` through the API and says so (with `about`,
    /// if any); its tool_use ids count from `n`.
    async fn open(mut api: ApiClient, env: &str, about: &str, n: usize) -> anyhow::Result<Script> {
        let opened = api
            .request("POST", "/v1/sessions", Some(&json!({"environment": env})))
            .await?;
        if opened.status != 201 {
            bail!("opening a session: HTTP {}: {}", opened.status, opened.body);
        }
        let session = opened.body["session_id"]
            .as_str()
            .context("session_id")?
            .to_string();
        let about = if about.is_empty() {
            String::new()
        } else {
            format!(": {about}")
        };
        section(&format!(
            "POST /v1/sessions -> {session} (environment {env}{about})"
        ));
        Ok(Script { api, session, n })
    }

    /// Posts one tool_use block; prints it and its tool_result.
    async fn call(&mut self, name: &str, input: Value, why: &str) -> anyhow::Result<Value> {
        self.n += 1;
        let id = format!("toolu_demo_{:02}", self.n);
        println!("\n-> {name} {input}    # {why}");
        let t0 = Instant::now();
        let a = self
            .api
            .request(
                "POST",
                &format!("/v1/sessions/{}/tool_use", self.session),
                Some(&json!({"type": "tool_use", "id": id, "name": name, "input": input})),
            )
            .await?;
        if a.status != 200 {
            bail!("{name}: HTTP {}: {}", a.status, a.body);
        }
        let took = t0.elapsed();
        println!(
            "<- tool_result is_error={} outcome={} ({:.1} ms)",
            a.body["is_error"],
            a.outcome.as_deref().unwrap_or("?"),
            took.as_secs_f64() * 1000.0
        );
        println!("{}", indent(&text_of(&a.body)));
        Ok(a.body)
    }
}

fn expect(ok: bool, what: &str) -> anyhow::Result<()> {
    if ok {
        println!("   ✓ {what}");
        Ok(())
    } else {
        bail!("expected: {what}")
    }
}

async fn script(bound: &crate::gateway::Bound, token: &str, env: &str) -> anyhow::Result<()> {
    let mut api = ApiClient::new(bound.api, token);
    // The worker dials on its own; wait for it to register.
    let deadline = Instant::now() + Duration::from_secs(15);
    let workers = loop {
        let a = api.request("GET", "/v1/workers", None).await?;
        if a.body["workers"].as_array().is_some_and(|w| !w.is_empty()) {
            break a.body;
        }
        if Instant::now() > deadline {
            bail!("the worker did not connect to the gateway within 15s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    section("GET /v1/workers");
    println!("{}", indent(&serde_json::to_string_pretty(&workers)?));
    let tools = api.request("GET", "/v1/tools", None).await?;
    let names: Vec<&str> = tools.body["tools"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["name"].as_str()).collect())
        .unwrap_or_default();
    section("GET /v1/tools (ready for the Messages API `tools` parameter)");
    note(&names.join(", "));

    let mut s = Script::open(api, env, "", 0).await?;
    let session = s.session.clone();
    let r = s
        .call(
            "write",
            json!({"file_path": "notes/todo.txt", "content": "buy milk\nfix the tunnel\nship hands\n"}),
            "create a file in the session's workspace",
        )
        .await?;
    expect(r["is_error"] == false, "write succeeded")?;
    let r = s
        .call(
            "read",
            json!({"file_path": "notes/todo.txt"}),
            "read it back",
        )
        .await?;
    expect(
        text_of(&r).contains("fix the tunnel"),
        "read shows the file",
    )?;
    let r = s
        .call(
            "edit",
            json!({"file_path": "notes/todo.txt", "old_string": "buy milk", "new_string": "buy oat milk"}),
            "replace one exact string",
        )
        .await?;
    expect(r["is_error"] == false, "edit succeeded")?;
    let r = s
        .call(
            "glob",
            json!({"pattern": "**/*.txt"}),
            "find files by pattern",
        )
        .await?;
    expect(text_of(&r).contains("todo.txt"), "glob finds the file")?;
    let r = s
        .call("grep", json!({"pattern": "oat|ship"}), "search contents")
        .await?;
    expect(
        text_of(&r).contains("buy oat milk") && text_of(&r).contains("ship hands"),
        "grep sees the edit",
    )?;
    let r = s
        .call(
            "bash",
            json!({"command": "cd notes && wc -l todo.txt && id -u && hostname"}),
            "a persistent, confined shell",
        )
        .await?;
    expect(
        text_of(&r).contains("3 todo.txt"),
        "bash runs in the workspace as the session's own uid",
    )?;

    // Streaming: the same API with Accept: text/event-stream.
    s.n += 1;
    let id = format!("toolu_demo_{:02}", s.n);
    let input = json!({"command": "for i in 1 2 3; do echo tick $i; sleep 0.2; done"});
    println!("\n-> bash {input}    # streamed as server-sent events");
    let t0 = Instant::now();
    let (_, events) = s
        .api
        .stream(
            "POST",
            &format!("/v1/sessions/{session}/tool_use"),
            Some(&json!({"id": id, "name": "bash", "input": input})),
            |ev| {
                let at = t0.elapsed().as_millis();
                match ev.event.as_str() {
                    "output" => println!(
                        "   [{at:>4} ms] output {:?}",
                        ev.data["text"].as_str().unwrap_or("")
                    ),
                    "tool_result" => {
                        println!("   [{at:>4} ms] tool_result {:?}", text_of(&ev.data))
                    }
                    other => println!("   [{at:>4} ms] {other} {}", ev.data),
                }
            },
        )
        .await?;
    expect(
        events.iter().filter(|e| e.event == "output").count() >= 3
            && events.last().is_some_and(|e| e.event == "tool_result"),
        "output arrived as it was produced, then the result",
    )?;

    let r = s
        .call(
            "bash",
            json!({"command": "cat /etc/shadow; unshare --user --map-root-user id; echo exit=$?"}),
            "an escape attempt: host secrets, then a user namespace",
        )
        .await?;
    let t = text_of(&r);
    // An environment with a narrow /etc (strict) does not show /etc/shadow at
    // all: stricter than a denied read, and as good.
    let shadow = if t.contains("cat: /etc/shadow: No such file or directory") {
        "/etc/shadow is not in this environment at all"
    } else {
        "DAC for /etc/shadow"
    };
    expect(
        (t.contains("Permission denied") || t.contains("No such file or directory"))
            && t.contains("Operation not permitted")
            && !t.contains("root:"),
        &format!("denied by the kernel: {shadow}, seccomp for unshare"),
    )?;
    let r = s
        .call(
            "bash",
            json!({"command": "sleep 30", "timeout_ms": 1000}),
            "a command that outlives its timeout",
        )
        .await?;
    expect(
        r["is_error"] == true && text_of(&r).contains("timed out"),
        "killed at its timeout, with the whole process tree",
    )?;
    let r = s
        .call(
            "bash",
            json!({"restart": true}),
            "the timeout ended the shell (as the toolset does): start a new one",
        )
        .await?;
    expect(r["is_error"] == false, "restarted")?;
    let r = s
        .call(
            "bash",
            json!({"command": "cat notes/todo.txt | head -1"}),
            "the session and its workspace live on",
        )
        .await?;
    expect(text_of(&r).contains("buy oat milk"), "the next call works")?;

    let closed = s
        .api
        .request("DELETE", &format!("/v1/sessions/{session}"), None)
        .await?;
    section(&format!("DELETE /v1/sessions/{session} -> {}", closed.body));
    expect(
        closed.body["closed"] == true,
        "session closed, its processes gone",
    )?;
    Ok(())
}
