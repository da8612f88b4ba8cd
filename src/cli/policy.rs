//! `hands policy check FILE…`: validate policy files the way the worker loads them.
//! `hands policy list [--config FILE]`: every environment the lookup finds (or
//! the worker of FILE would offer), and the file each comes from.
//! `hands policy show NAME`: the policy file of an environment, as found.
//!
//! Every file is checked, not just up to the first failure, so one run shows an admin
//! everything to fix. Each file gets one line on stdout: `ok   <path> (<summary>)`
//! or `FAIL <error>` (the error names the file and the key). The summary prints the
//! values as the worker will use them, in the units a policy file accepts, so an
//! admin sees e.g. that `"1GiB"` was read as 1 GiB. An egress policy's rules follow,
//! one per line (`allow pypi.org:443`), with its resolvers.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};

use crate::policy::lookup::{Lookup, Origin, Source};
use crate::policy::units::{format_duration, format_size};
use crate::policy::Policy;

#[derive(clap::Args)]
pub struct ListArgs {
    /// A worker configuration: add its policy_dirs to the lookup and list only
    /// the environments it offers (its `environments`, else every one found).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ShowArgs {
    /// The environment.
    name: String,
    /// A worker configuration whose policy_dirs join the lookup.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// The lookup with `config`'s `policy_dirs`, if a configuration is given.
fn with_config(lookup: &Lookup, config: Option<&PathBuf>) -> anyhow::Result<Lookup> {
    Ok(match config {
        Some(path) => crate::worker::Config::policy_lookup(path, lookup)?,
        None => lookup.clone(),
    })
}

/// Prints the directories searched, then one line per environment: its name,
/// the file it comes from, and the files of the same name it hides. Fails (as
/// the worker would) when any policy file is invalid.
pub fn list(args: ListArgs, command_line: &Lookup) -> anyhow::Result<ExitCode> {
    let lookup = with_config(command_line, args.config.as_ref())?;
    let catalog = lookup.load()?;
    // The worker's own reading of its configuration, so that the list is what
    // it would offer, not a second interpretation of `environments`.
    let offered: Option<Vec<String>> = match &args.config {
        Some(path) => Some(
            crate::worker::Config::load(path, command_line)?
                .policies
                .iter()
                .map(|p| p.name.clone())
                .collect(),
        ),
        None => None,
    };
    println!("searched, in order:");
    for dir in lookup.dirs() {
        let absent = dir.origin == Origin::System && !dir.path.exists();
        println!(
            "  {} ({}{})",
            dir.path.display(),
            dir.origin,
            if absent { "; absent" } else { "" }
        );
    }
    println!("  the built-in policies");
    println!();
    let entries: Vec<_> = catalog
        .iter()
        .filter(|e| {
            offered
                .as_ref()
                .is_none_or(|names| names.contains(&e.policy.name))
        })
        .collect();
    let width = entries
        .iter()
        .map(|e| e.policy.name.len())
        .max()
        .unwrap_or(0)
        .max("environment".len());
    println!("{:<width$}  source", "environment");
    for e in entries {
        let hides = if e.shadows.is_empty() {
            String::new()
        } else {
            let hidden: Vec<String> = e.shadows.iter().map(Source::to_string).collect();
            format!("  (hides {})", hidden.join(", "))
        };
        println!("{:<width$}  {}{hides}", e.policy.name, e.source);
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the policy file of environment `name` as the lookup finds it,
/// after a comment line saying where it comes from.
pub fn show(args: ShowArgs, lookup: &Lookup) -> anyhow::Result<ExitCode> {
    let lookup = with_config(lookup, args.config.as_ref())?;
    let catalog = lookup.load()?;
    let entry = catalog.get(&args.name)?;
    let text = match &entry.source {
        Source::File(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        Source::BuiltIn => crate::policy::builtin_text(&args.name)
            .context("a built-in policy without text")?
            .to_string(),
    };
    println!("# environment {}: {}", args.name, entry.source);
    print!("{text}");
    if !text.ends_with('\n') {
        println!();
    }
    Ok(ExitCode::SUCCESS)
}

/// Checks each file; fails (non-zero exit) if any file is invalid or none was given.
pub fn check(paths: &[PathBuf]) -> anyhow::Result<()> {
    if paths.is_empty() {
        bail!("no policy files given");
    }
    let mut failed = 0;
    for path in paths {
        match Policy::load(path) {
            Ok(policy) => {
                println!("ok   {} ({})", path.display(), summary(&policy));
                for line in egress_lines(&policy) {
                    println!("     {line}");
                }
            }
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

/// The egress rules of `policy`, as written, one per line; nothing for other modes.
fn egress_lines(policy: &Policy) -> Vec<String> {
    let Some(egress) = &policy.egress else {
        return Vec::new();
    };
    let mut lines: Vec<String> = egress.allow.iter().map(|r| format!("allow {r}")).collect();
    lines.extend(egress.deny.iter().map(|r| format!("deny  {r}")));
    if egress.resolvers.is_empty() {
        lines.push("resolvers: the host's (/etc/resolv.conf)".to_string());
    } else {
        let resolvers: Vec<String> = egress.resolvers.iter().map(|r| r.to_string()).collect();
        lines.push(format!("resolvers: {}", resolvers.join(" ")));
    }
    if egress.allow_broad {
        lines.push("allow_broad: too-broad rules accepted".to_string());
    }
    lines
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
    if policy.landlock == crate::policy::LandlockMode::Full {
        parts.push("full landlock".to_string());
    }
    if !policy.allow_degraded.is_empty() {
        let names: Vec<&str> = policy.allow_degraded.iter().map(|d| d.name()).collect();
        parts.push(format!("degraded {}", names.join(" ")));
    }
    format!("env {}: {}", policy.name, parts.join(", "))
}
