//! `hands pki init DIR`: a development CA and gateway/worker certificates; or,
//! when DIR already holds that CA, a certificate for one more worker.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct InitArgs {
    /// Directory to write ca.pem, gateway.pem, worker.pem and their keys into.
    /// When it already holds ca.pem and ca-key.pem, only a certificate for
    /// --worker-id is issued from that CA: worker-ID.pem and worker-ID-key.pem.
    dir: PathBuf,
    /// The worker's identity (its certificate's common name).
    #[arg(long, default_value = "dev-worker")]
    worker_id: String,
    /// A name the gateway is reached by (DNS name or IP); repeatable.
    /// Default: localhost and 127.0.0.1. Only for a new PKI.
    #[arg(long = "gateway-name")]
    gateway_names: Vec<String>,
    /// Validity in days (a worker certificate from an existing CA ends with
    /// the CA at the latest).
    #[arg(long, default_value_t = 90)]
    days: i64,
    /// Replace the whole development PKI in DIR: a new CA, gateway and worker.
    #[arg(long)]
    force: bool,
}

pub fn init(args: InitArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.days > 0, "--days must be positive");
    anyhow::ensure!(
        crate::session::registry::valid_id(&args.worker_id),
        "--worker-id: 1 to 128 characters of [A-Za-z0-9._:-]"
    );
    if !args.force && crate::pki::has_ca(&args.dir) {
        if !args.gateway_names.is_empty() {
            return Err(crate::pki::PkiError::GatewayNames { dir: args.dir }.into());
        }
        for path in crate::pki::issue_worker(&args.dir, &args.worker_id, args.days)? {
            println!("{}", path.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut opts = crate::pki::Options {
        worker_id: args.worker_id,
        days: args.days,
        ..Default::default()
    };
    if !args.gateway_names.is_empty() {
        opts.gateway_names = args.gateway_names;
    }
    let pki = crate::pki::generate(&opts)?;
    crate::pki::write(&args.dir, &pki, args.force)?;
    for f in crate::pki::FILES {
        println!("{}", args.dir.join(f).display());
    }
    Ok(ExitCode::SUCCESS)
}
