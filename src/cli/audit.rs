//! `hands audit verify FILE…`: checks the hash chain of an audit log (several
//! files: oldest first, as rotation leaves them: `audit.jsonl.2 audit.jsonl.1
//! audit.jsonl`). Prints where the chain holds, or the first record that
//! breaks it and why (edited, deleted, inserted, reordered). Exit status: 0
//! when the chain holds, 1 when it is broken, 2 when a file cannot be read.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::audit::{verify, Verdict};

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The log's files, oldest first.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

pub fn verify_cmd(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let verdict = verify(&args.files).with_context(|| {
        format!(
            "reading {}",
            args.files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    Ok(match verdict {
        Verdict::Holds {
            records,
            first,
            last,
        } => {
            if records == 0 {
                println!("ok: no records");
            } else {
                println!("ok: the chain holds: {records} records, sequence {first} to {last}");
            }
            ExitCode::SUCCESS
        }
        Verdict::Broken { file, line, why } => {
            println!("BROKEN: {} line {line}: {why}", file.display());
            ExitCode::from(1)
        }
    })
}
