//! `hands worker --config FILE`: the daemon. Dials its gateways when a
//! `[tunnel]` is configured, and prints `listening on ADDR` on stdout once the
//! debug listener is bound. The first SIGTERM or SIGINT drains it (tunnels
//! end with GOAWAY, no new session or call; running calls get
//! `shutdown_grace_secs`, then are cut short), closing every session and so
//! killing everything they started; a second one cuts running calls short at
//! once. SIGHUP reloads (`crate::worker::reload`). A service manager hears
//! readiness, status, watchdog pings and the stop (`crate::worker::notify`).
//! The `[metrics]` listener starts before the ways in (`metrics listening on
//! ADDR`) and stops after the sessions closed.
//!
//! Exit status: 0 after a stop by signal; [`EXIT_KEY_REFUSED`] when the
//! Claude Managed Agents connector's environment key is missing or refused
//! (restarting cannot help: a unit names it in `RestartPreventExitStatus=`);
//! 2 for any other error (configuration, policies, not root, …).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

use crate::policy::lookup::Lookup;
use crate::session::registry::Registry;
use crate::worker::health::Health;
use crate::worker::notify::Notifier;

/// EX_CONFIG of sysexits.h: the environment key could not be read, or the
/// control plane refused it (401, 403 or 404 on poll).
pub const EXIT_KEY_REFUSED: u8 = 78;

#[derive(clap::Args)]
pub struct Args {
    /// The worker's configuration (TOML): every key is documented in
    /// docs/worker.md of the hands repository.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

pub fn run(args: Args, lookup: &Lookup) -> anyhow::Result<ExitCode> {
    super::require_root("hands worker")?;
    // Read (and removed from the environment) before any thread starts.
    let notifier = Arc::new(Notifier::from_env());
    let config = crate::worker::Config::load(&args.config, lookup)?;
    anyhow::ensure!(
        config.listen.is_some()
            || config.tunnel.is_some()
            || config.anthropic.is_some()
            || config.mcp.is_some(),
        "{}: nothing to serve: set `listen`, a [tunnel], an [anthropic] or an [mcp] table",
        args.config.display()
    );
    let sandbox = crate::sandbox::SandboxConfig::from_env().context("sandbox configuration")?;
    crate::util::return_large_buffers_to_the_kernel();
    for p in &config.policies {
        if let Some(source) = config.sources.get(&p.name) {
            tracing::info!(target: "hands::worker", environment = %p.name, %source, "offering environment");
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = rt.block_on(async {
        let swept = crate::session::sweep_orphans(&sandbox);
        if swept > 0 {
            tracing::info!(swept, "removed session groups left by a worker that died");
        }
        if let Some(unit) = sandbox.cgroups.undelegated_unit() {
            tracing::warn!(
                unit,
                "the worker's systemd unit is not marked as delegated (trusted.delegate): \
                 give it Delegate=yes, or systemd may move or remove the sessions' cgroups \
                 (systemd before 251 never marks it; then ignore this)"
            );
        }
        let workspaces = sandbox.workspaces.clone();
        crate::worker::prepare_workspaces(&config, &sandbox);
        let registry = crate::worker::registry(&config, sandbox)?;
        // What readiness waits for is known before anyone asks.
        let health = Arc::new(Health::default());
        health.expect_configured(&config);
        let (stop, shutdown) = watch::channel(false);
        // Installed before anything is served: a signal that comes early is
        // still this process's to handle.
        let signals = Signals::install()?;
        // Up before the ways in (a probe is answered during a long tunnel
        // dial), stopped after the sessions closed.
        let probes =
            crate::worker::probes::Probes::start(&config, &registry, health.clone()).await?;
        if let Some(p) = &probes {
            announce(format_args!("metrics listening on {}", p.local_addr()));
        }
        let supervisor = Supervisor {
            stop,
            registry: registry.clone(),
            health: health.clone(),
            notifier: notifier.clone(),
            config_path: args.config.clone(),
            lookup: lookup.clone(),
            running: config.clone(),
        };
        let signalled = tokio::spawn(supervisor.handle(signals));
        let reporting = tokio::spawn(report(notifier.clone(), health.clone(), registry.clone()));
        let served = crate::worker::serve(
            &config,
            registry.clone(),
            |addr| announce(format_args!("listening on {addr}")),
            |addr| announce(format_args!("mcp listening on {addr}")),
            None,
            health.clone(),
            shutdown,
        )
        .await;
        // Stopping for whatever reason (a signal, or the connector gave up).
        health.drain();
        reporting.abort();
        notifier.stopping(&format!("closing {} session(s)", registry.open_sessions()));
        registry.close_all();
        drop(registry);
        workspaces.shutdown(super::DRAIN);
        super::release_cgroups();
        if let Some(p) = probes {
            p.stop().await;
        }
        signalled.abort();
        Ok::<_, anyhow::Error>(served)
    })?;
    match served {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(crate::worker::WorkerError::Connector(c)) if key_problem(&c) => {
            eprintln!("hands: {}", crate::worker::WorkerError::Connector(c));
            eprintln!(
                "hands: exiting with status {EXIT_KEY_REFUSED}: a restart cannot fix the \
                 environment key (RestartPreventExitStatus={EXIT_KEY_REFUSED})"
            );
            Ok(ExitCode::from(EXIT_KEY_REFUSED))
        }
        Err(e) => Err(e.into()),
    }
}

/// The signals a worker acts on.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        let on = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("installing the {name} handler"))
        };
        Ok(Signals {
            term: on(SignalKind::terminate(), "SIGTERM")?,
            int: on(SignalKind::interrupt(), "SIGINT")?,
            hup: on(SignalKind::hangup(), "SIGHUP")?,
        })
    }
}

/// What the worker does on a signal: the first SIGTERM or SIGINT drains, the
/// next cuts running calls short at once; SIGHUP reloads.
struct Supervisor {
    stop: watch::Sender<bool>,
    registry: Arc<Registry>,
    health: Arc<Health>,
    notifier: Arc<Notifier>,
    config_path: PathBuf,
    lookup: Lookup,
    /// The configuration in force (what a reload compares against).
    running: crate::worker::Config,
}

impl Supervisor {
    async fn handle(mut self, mut s: Signals) {
        let mut stops = 0u32;
        loop {
            let name = tokio::select! {
                _ = s.term.recv() => "SIGTERM",
                _ = s.int.recv() => "SIGINT",
                _ = s.hup.recv() => {
                    self.reload();
                    continue;
                }
            };
            stops += 1;
            if stops == 1 {
                let running = self.registry.journals().running().len();
                tracing::info!(
                    target: "hands::worker",
                    signal = name,
                    running_calls = running,
                    "draining: no new session or call is taken; running calls may finish \
                     (send it again to cut them short now)"
                );
                self.health.drain();
                self.notifier
                    .stopping(&format!("draining: {running} call(s) running"));
                self.stop.send_replace(true);
            } else {
                let cut = self.registry.journals().cut_short_now();
                tracing::warn!(
                    target: "hands::worker",
                    signal = name,
                    calls = cut.len(),
                    "stopped again while draining: cutting short {} running call(s) now",
                    cut.len()
                );
                self.notifier.stopping("cutting running calls short");
            }
        }
    }

    /// Reads the configuration and policies again; applies what can change
    /// under running sessions and names what needs a restart. Nothing changes
    /// when the new configuration is invalid.
    fn reload(&mut self) {
        if self.health.draining() {
            tracing::warn!(target: "hands::worker", "SIGHUP ignored: the worker is draining");
            return;
        }
        self.notifier.reloading();
        let path = self.config_path.display().to_string();
        match crate::worker::Config::load(&self.config_path, &self.lookup) {
            Err(e) => tracing::error!(
                target: "hands::worker",
                config = %path,
                "reload refused, nothing changed: {}",
                crate::util::error_chain(&e)
            ),
            Ok(new) => {
                let sources = new.sources.clone();
                match crate::worker::reload::apply(&mut self.running, new, &self.registry) {
                    Err(e) => tracing::error!(
                        target: "hands::worker",
                        config = %path,
                        "reload refused, nothing changed: {e}"
                    ),
                    Ok(r) => {
                        for name in r.added.iter().chain(&r.changed) {
                            if let Some(source) = sources.get(name) {
                                tracing::info!(target: "hands::worker", environment = %name, %source, "offering environment");
                            }
                        }
                        let summary = r.summary();
                        if r.needs_restart.is_empty() {
                            tracing::info!(target: "hands::worker", config = %path, "reloaded: {summary}");
                        } else {
                            tracing::warn!(target: "hands::worker", config = %path, "reloaded: {summary}");
                        }
                    }
                }
            }
        }
        self.notifier.ready(&status(&self.health, &self.registry));
    }
}

/// Keeps the service manager informed: `READY=1` once the worker is ready,
/// `STATUS=` when it changes (checked every few seconds and on every change of
/// readiness), `WATCHDOG=1` at half the watchdog interval. Does nothing
/// without a service manager.
async fn report(notifier: Arc<Notifier>, health: Arc<Health>, registry: Arc<Registry>) {
    if !notifier.enabled() {
        return;
    }
    let mut changed = health.subscribe();
    let mut tick = tokio::time::interval(STATUS_EVERY);
    let mut watchdog = notifier.watchdog().map(|d| tokio::time::interval(d / 2));
    let (mut ready_sent, mut last) = (false, String::new());
    loop {
        let wd = async {
            match watchdog.as_mut() {
                Some(i) => {
                    i.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = wd => {
                notifier.watchdog_ping();
                continue;
            }
            _ = changed.changed() => {}
            _ = tick.tick() => {}
        }
        let now = status(&health, &registry);
        if !ready_sent && health.ready() {
            ready_sent = true;
            tracing::info!(target: "hands::worker", "ready: {now}");
            notifier.ready(&now);
        } else if now != last {
            notifier.status(&now);
        }
        last = now;
    }
}

/// How often the status line is refreshed.
const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// `3 session(s) open of 16, 1 call(s) running; ready`.
fn status(health: &Health, registry: &Registry) -> String {
    format!(
        "{} session(s) open of {}, {} call(s) running; {}",
        registry.open_sessions(),
        registry.capacity(),
        registry.journals().running().len(),
        health.describe()
    )
}

/// Whether the connector stopped because of its environment key: it could
/// not be read, or the control plane refused it.
fn key_problem(e: &crate::connectors::cma::worker::ConnectorError) -> bool {
    use crate::connectors::cma::worker::ConnectorError;
    match e {
        ConnectorError::Secret(_) => true,
        // The connector stops on an API error only when the poll is refused
        // (401, 403, 404); a bad base URL has no status.
        ConnectorError::Api(api) => api.status().is_some(),
    }
}

/// One line on stdout, flushed: a bound listener's address, for scripts and
/// supervisors (port 0 picks one). Nobody reading stdout is no error: a closed
/// pipe must not take the worker down.
fn announce(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
