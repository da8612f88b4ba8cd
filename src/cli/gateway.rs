//! `hands gateway --config FILE`: the reference gateway. Prints
//! `tunnel listening on ADDR` and `api listening on ADDR` once bound; SIGTERM or
//! SIGINT stops it (tunnels close; workers redial).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    /// The gateway's configuration (TOML): every key is documented in
    /// docs/gateway.md of the hands repository.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = crate::gateway::Config::load(&args.config)?;
    crate::util::return_large_buffers_to_the_kernel();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
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
        crate::gateway::run(
            config,
            |bound, _| {
                println!("tunnel listening on {}", bound.tunnel);
                println!("api listening on {}", bound.api);
                use std::io::Write;
                let _ = std::io::stdout().flush();
            },
            shutdown,
        )
        .await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
