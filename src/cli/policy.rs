//! `hands policy check FILE…`: validate policy files the way the worker loads them.
//!
//! Every file is checked, not just up to the first failure, so one run shows an admin
//! everything to fix. Each file gets one line on stdout: `ok   <path> (<summary>)`
//! or `FAIL <error>` (the error names the file and the key). The summary prints the
//! values as the worker will use them, in the units a policy file accepts, so an
//! admin sees e.g. that `"1GiB"` was read as 1 GiB.

use std::path::PathBuf;

use anyhow::bail;

use crate::policy::units::{format_duration, format_size};
use crate::policy::Policy;

/// Checks each file; fails (non-zero exit) if any file is invalid or none was given.
pub fn check(paths: &[PathBuf]) -> anyhow::Result<()> {
    if paths.is_empty() {
        bail!("no policy files given");
    }
    let mut failed = 0;
    for path in paths {
        match Policy::load(path) {
            Ok(policy) => println!("ok   {} ({})", path.display(), summary(&policy)),
            Err(error) => {
                failed += 1;
                println!("FAIL {error}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} policy files invalid", paths.len());
    }
    Ok(())
}

/// One line with every value of the policy that decides what a session may do.
fn summary(policy: &Policy) -> String {
    let limits = &policy.limits;
    let mut parts = vec![
        format!("memory {}", format_size(limits.memory_bytes)),
        format!("pids {}", limits.pids),
        format!("cpu {}", limits.cpu),
        format!("tmp {}", format_size(policy.filesystem.tmp_size)),
        format!("network {}", policy.network.mode.name()),
        format!("bash timeout {}", format_duration(limits.bash_timeout)),
        format!("call timeout {}", format_duration(limits.call_timeout)),
        format!("output {}", format_size(limits.output_bytes as u64)),
        format!("file {}", format_size(limits.file_bytes)),
        format!("{} read-only paths", policy.filesystem.read_only.len()),
        format!(
            "tools {}",
            policy
                .tools
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(" ")
        ),
    ];
    if !policy.env.is_empty() {
        let names: Vec<&str> = policy.env.keys().map(String::as_str).collect();
        parts.push(format!("variables {}", names.join(" ")));
    }
    if !policy.allow_degraded.is_empty() {
        let names: Vec<&str> = policy.allow_degraded.iter().map(|d| d.name()).collect();
        parts.push(format!("degraded {}", names.join(" ")));
    }
    format!("env {}: {}", policy.name, parts.join(", "))
}
