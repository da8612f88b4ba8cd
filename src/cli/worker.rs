//! `hands worker --config FILE`: the daemon. Dials its gateways when a
//! `[tunnel]` is configured, and prints `listening on ADDR` on stdout once the
//! debug listener is bound; SIGTERM or SIGINT stops it (tunnels end with
//! GOAWAY; running calls get `shutdown_grace_secs`, then are cut short),
//! closing every session and so killing everything they started. The
//! `[metrics]` listener starts before everything else (`metrics listening on
//! ADDR`) and stops after the sessions closed.
//!
//! Exit status: 0 after a stop by signal; [`EXIT_KEY_REFUSED`] when the
//! Claude Managed Agents connector's environment key is missing or refused
//! (restarting cannot help: a unit names it in `RestartPreventExitStatus=`);
//! 2 for any other error (configuration, policies, not root, …).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::policy::lookup::Lookup;

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
    let config = crate::worker::Config::load(&args.config, lookup)?;
    anyhow::ensure!(
        config.listen.is_some() || config.tunnel.is_some() || config.anthropic.is_some(),
        "{}: nothing to serve: set `listen`, a [tunnel] or an [anthropic] table",
        args.config.display()
    );
    let sandbox = crate::sandbox::SandboxConfig::from_env().context("sandbox configuration")?;
    crate::util::return_large_buffers_to_the_kernel();
    for p in &config.policies {
        if let Some(source) = config.sources.get(&p.name) {
            tracing::info!(environment = %p.name, %source, "offering environment");
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
        // Up before the ways in (a probe is answered during a long tunnel
        // dial), stopped after the sessions closed.
        let health = std::sync::Arc::new(crate::worker::health::Health::default());
        let probes =
            crate::worker::probes::Probes::start(&config, &registry, health.clone()).await?;
        if let Some(p) = &probes {
            println!("metrics listening on {}", p.local_addr());
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            stop.send_replace(true);
        });
        let served = crate::worker::serve(
            &config,
            registry.clone(),
            |addr| {
                println!("listening on {addr}");
                use std::io::Write;
                let _ = std::io::stdout().flush();
            },
            None,
            health,
            shutdown,
        )
        .await;
        registry.close_all();
        drop(registry);
        workspaces.shutdown(super::DRAIN);
        super::release_cgroups();
        if let Some(p) = probes {
            p.stop().await;
        }
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
