//! `hands worker --config FILE`: the daemon. Dials its gateways when a
//! `[tunnel]` is configured, and prints `listening on ADDR` on stdout once the
//! debug listener is bound; SIGTERM or SIGINT stops it (tunnels end with
//! GOAWAY), closing every session and so killing everything they started.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    /// The worker's configuration (TOML; see `src/worker/config.rs`).
    #[arg(long)]
    config: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = crate::worker::Config::load(&args.config)?;
    anyhow::ensure!(
        config.listen.is_some() || config.tunnel.is_some() || config.anthropic.is_some(),
        "{}: nothing to serve: set `listen`, a [tunnel] or an [anthropic] table",
        args.config.display()
    );
    let sandbox = crate::sandbox::SandboxConfig::from_env().context("sandbox configuration")?;
    crate::util::return_large_buffers_to_the_kernel();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let swept = crate::session::sweep_orphans(&sandbox);
        if swept > 0 {
            tracing::info!(swept, "removed session groups left by a worker that died");
        }
        let workspaces = sandbox.workspaces.clone();
        crate::worker::prepare_workspaces(&config, &sandbox);
        let registry = crate::worker::registry(&config, sandbox);
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
        crate::worker::serve(
            &config,
            registry.clone(),
            |addr| {
                println!("listening on {addr}");
                use std::io::Write;
                let _ = std::io::stdout().flush();
            },
            None,
            shutdown,
        )
        .await?;
        registry.close_all();
        drop(registry);
        workspaces.shutdown(super::DRAIN);
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
