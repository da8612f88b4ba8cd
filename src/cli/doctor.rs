//! `hands doctor`: the kernel features hands relies on, whether this host has
//! them, and what the worker does about each; the environments the policy
//! lookup finds; then a live probe that opens a session and runs `/bin/true`
//! in it. Exits non-zero when a required feature is missing, a policy file is
//! invalid, or the probe fails.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use crate::sandbox::cgroup::{CgroupVersion, Cgroups};
use crate::sandbox::landlock::{self, LandlockFeature, FULL_ABI};
use crate::sandbox::{seccomp, sys};

#[derive(clap::Args)]
pub struct Args {
    /// Skip the live session probe.
    #[arg(long)]
    no_probe: bool,
}

/// One row of the report.
pub struct Check {
    pub feature: &'static str,
    pub ok: bool,
    pub required: bool,
    pub status: String,
    pub action: String,
}

/// The checks, without printing (tests use them to decide what the kernel has).
pub fn checks() -> Vec<Check> {
    let mut out = Vec::new();
    let root = nix::unistd::geteuid().is_root();
    out.push(Check {
        feature: "root",
        ok: root,
        required: true,
        status: if root { "euid 0".into() } else { format!("euid {}", nix::unistd::geteuid()) },
        action: "the worker builds namespaces, mounts and cgroups for each session, then drops every session to its own unprivileged uid".into(),
    });

    let (ok, status, action) = match sys::landlock_abi() {
        Ok(abi) => {
            let missing = LandlockFeature::missing_at(abi);
            (
                true,
                format!("ABI {abi}"),
                if missing.is_empty() {
                    format!("every session is landlocked with all ABI {abi} rights (fs, refer, truncate, TCP, ioctl, signal/socket scopes{})", if abi >= 7 { ", audit of exec'd programs" } else { "" })
                } else {
                    format!("every session is landlocked with the ABI {abi} rights; each right this kernel lacks (full set: ABI {FULL_ABI}) is covered by another layer, below; an environment with sandbox.landlock = \"full\" refuses them")
                },
            )
        }
        Err(e) => (
            false,
            format!("unavailable: {e}"),
            "no environment is offered: sessions fail closed".into(),
        ),
    };
    out.push(Check {
        feature: "landlock",
        ok,
        required: true,
        status,
        action,
    });
    if let Ok(abi) = sys::landlock_abi() {
        for f in LandlockFeature::missing_at(abi) {
            let action = match f {
                LandlockFeature::LandlockNet => format!(
                    "network.mode = \"none\": {}; \"loopback\" and \"egress\" ask for no TCP rule",
                    landlock::coverage(f, true).unwrap_or("nothing")
                ),
                _ => landlock::coverage(f, true).unwrap_or("nothing").to_string(),
            };
            out.push(Check {
                feature: f.name(),
                ok: true,
                required: false,
                status: format!("missing (ABI {}), covered", f.abi()),
                action,
            });
        }
    }

    let seccomp_ok = Path::new("/proc/self/status").exists()
        && std::fs::read_to_string("/proc/self/status")
            .map(|s| s.contains("Seccomp:"))
            .unwrap_or(false)
        && seccomp::programs(crate::sandbox::seccomp::Profile::default()).is_ok();
    out.push(Check {
        feature: "seccomp",
        ok: seccomp_ok,
        required: true,
        status: if seccomp_ok {
            "filter mode".into()
        } else {
            "unavailable".into()
        },
        action: format!(
            "{} deny rules (EPERM) installed in every session, plus no_new_privs",
            seccomp::denied_count()
        ),
    });

    for (ns, why) in [
        (
            "mnt",
            "private root: only the policy's read-only paths, /workspace, private /tmp",
        ),
        (
            "pid",
            "session processes see only each other; closing kills them all",
        ),
        ("net", "only loopback; nothing outside is routable"),
        ("ipc", "no shared SysV IPC with the host"),
        ("uts", "own hostname"),
        (
            "user",
            "describes the idmapped workspace mount (no process runs in it)",
        ),
    ] {
        let ok = Path::new("/proc/self/ns").join(ns).exists();
        out.push(Check {
            feature: match ns {
                "mnt" => "mount namespace",
                "pid" => "pid namespace",
                "net" => "network namespace",
                "ipc" => "ipc namespace",
                "uts" => "uts namespace",
                _ => "user namespace",
            },
            ok,
            required: true,
            status: if ok {
                "available".into()
            } else {
                "missing".into()
            },
            action: why.into(),
        });
    }

    match Cgroups::detect() {
        Ok(c) if c.undelegated_unit().is_some() => out.push(Check {
            feature: "cgroups",
            ok: false,
            required: false,
            status: format!("v2: {} is not delegated", c.undelegated_unit().unwrap_or_default()),
            action: "systemd did not mark this unit's cgroup as delegated (trusted.delegate, systemd 251 and later): give the unit Delegate=yes, or systemd may move or remove the sessions' groups".into(),
        }),
        Ok(c) => out.push(Check {
            feature: "cgroups",
            ok: true,
            required: true,
            status: match c.version() {
                CgroupVersion::V1 => "v1: memory, pids, cpu, freezer".into(),
                CgroupVersion::V2 => format!("v2: memory, pids, cpu in {}", c.describe()),
            },
            action: "per-session memory, pids and CPU limits; the whole tree is killed at timeout and close".into(),
        }),
        Err(e) => out.push(Check {
            feature: "cgroups",
            ok: false,
            required: true,
            status: e.to_string(),
            action: "no environment is offered".into(),
        }),
    }

    let openat2 = nix::fcntl::openat2(
        nix::fcntl::AT_FDCWD,
        "/",
        nix::fcntl::OpenHow::new().flags(nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC),
    )
    .is_ok();
    out.push(Check {
        feature: "openat2",
        ok: openat2,
        required: true,
        status: if openat2 {
            "available".into()
        } else {
            "missing (kernel < 5.6)".into()
        },
        action:
            "file tools never re-follow a symlink after resolving a path (no check-then-use race)"
                .into(),
    });
    let workspaces =
        crate::sandbox::SandboxConfig::from_env().map(|c| c.workspaces.mechanism().clone());
    let (ok, status, action) = match workspaces {
        Ok(crate::workspace::Mechanism::LoopExt4 { .. }) => (
            true,
            "loop devices + mke2fs".to_string(),
            "each workspace hands makes is an ext4 image of the policy's limits.disk and limits.disk_inodes, mounted nosuid,nodev; removed by unmounting it".to_string(),
        ),
        Ok(crate::workspace::Mechanism::Unavailable(why)) => (
            false,
            why,
            "sessions without --workspace refuse to open unless their policy allows the workspace-disk degradation (a plain, unbounded directory)".to_string(),
        ),
        Err(e) => (false, e.to_string(), "no workspace can be made".to_string()),
    };
    out.push(Check {
        feature: "workspace disk",
        ok,
        required: false,
        status,
        action,
    });
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default();
    out.push(Check {
        feature: "core dumps",
        ok: true,
        required: false,
        status: if pattern.starts_with('|') {
            "core_pattern is a pipe".into()
        } else {
            "core_pattern is a file".into()
        },
        action: "session processes run with RLIMIT_CORE 1, the value the kernel honours for pipe handlers too: no crash inside reaches the host".into(),
    });
    let (ok, status) = match crate::sandbox::netfilter::probe() {
        Ok(()) => (
            true,
            "nftables and routes installed in a test namespace".to_string(),
        ),
        Err(e) => (false, format!("unavailable: {e}")),
    };
    out.push(Check {
        feature: "egress barrier",
        ok,
        required: false,
        status,
        action: if ok {
            "sessions in network.mode = \"egress\" get nftables in their namespace: TCP to other hosts goes to the worker's transparent listener, everything else is dropped".into()
        } else {
            "sessions in network.mode = \"egress\" fail to open (fail closed); \"none\" and \"loopback\" are unaffected".into()
        },
    });
    let pidfd = sys::pidfd_open(std::process::id() as i32).is_ok();
    out.push(Check {
        feature: "pidfd",
        ok: pidfd,
        required: true,
        status: if pidfd {
            "available".into()
        } else {
            "missing (kernel < 5.3)".into()
        },
        action: "session helpers are signalled without pid-reuse races".into(),
    });
    out
}

/// The directory itself, or its nearest existing ancestor (what it will be
/// created on).
fn existing_ancestor(p: &Path) -> &Path {
    p.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"))
}

/// Whether an idmapped clone of a mount can be made of `dir` (what a plain
/// directory workspace needs): a detached clone, idmapped, then dropped.
fn idmap_probe(dir: &Path) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    let tree = sys::open_tree_clone(&c)?;
    let userns = sys::userns_with_maps(Path::new("/proc"), "0 65534 1\n", "0 65534 1\n")?;
    sys::mount_setattr(tree.as_fd(), sys::MOUNT_ATTR_IDMAP, Some(userns.as_fd()))
}

/// The state directory (slots, mount points: a tmpfs is right) and the data
/// directory (images, kept workspaces, plain directories: a disk filesystem
/// that survives a reboot and supports idmapped mounts), tested where they are.
fn directories() -> Vec<Check> {
    let (state, data) = crate::sandbox::SandboxConfig::dirs_from_env();
    let fs_of = |p: &Path| {
        std::fs::File::open(existing_ancestor(p))
            .map(|f| {
                use std::os::fd::AsFd;
                crate::sandbox::mounts::fs_name(f.as_fd())
            })
            .unwrap_or_else(|e| format!("unreadable: {e}"))
    };
    let mut out = vec![Check {
        feature: "state directory",
        ok: true,
        required: false,
        status: format!("{} on {}", state.display(), fs_of(&state)),
        action: "slots, session roots and workspace mount points only; nothing there needs to survive a reboot or be idmapped".into(),
    }];
    let data_fs = fs_of(&data);
    let volatile = data_fs == "tmpfs";
    let idmap = idmap_probe(existing_ancestor(&data));
    let (ok, status, action) = match (&idmap, volatile) {
        (Ok(()), false) => (
            true,
            format!("{} on {data_fs}, idmapped mounts ok", data.display()),
            "workspace images, kept Claude Managed Agents workspaces (survive a restart and a reboot), plain-directory workspaces".to_string(),
        ),
        (Ok(()), true) => (
            false,
            format!("{} on tmpfs", data.display()),
            "kept Claude Managed Agents workspaces are lost at reboot: set HANDS_DATA_DIR to a disk filesystem".to_string(),
        ),
        (Err(e), _) => (
            false,
            format!("{} on {data_fs}: no idmapped mounts ({e})", data.display()),
            "plain-directory workspaces (the workspace-disk degradation) cannot be given to a session here; workspace images are unaffected: set HANDS_DATA_DIR to ext4, xfs or btrfs".to_string(),
        ),
    };
    out.push(Check {
        feature: "data directory",
        ok,
        required: false,
        status,
        action,
    });
    out
}

/// The environments the lookup finds, as a row of the report, then a row for
/// each environment this kernel's landlock cannot serve.
fn policies(lookup: &crate::policy::lookup::Lookup) -> Vec<Check> {
    let catalog = match lookup.load() {
        Ok(catalog) => catalog,
        Err(e) => {
            return vec![Check {
                feature: "policies",
                ok: false,
                required: true,
                status: e.to_string(),
                action: "the worker refuses to start".into(),
            }]
        }
    };
    let local = catalog
        .iter()
        .filter(|e| e.source != crate::policy::lookup::Source::BuiltIn)
        .count();
    let mut out = vec![Check {
        feature: "policies",
        ok: true,
        required: true,
        status: format!("{} environments, {local} from files", catalog.len()),
        action: "every policy file is validated at start; `hands policy list` shows each environment and its file".into(),
    }];
    let Ok(abi) = sys::landlock_abi() else {
        return out;
    };
    for env in catalog.iter() {
        let refused = landlock_refusal(&env.policy, abi);
        if !refused.is_empty() {
            let names: Vec<&str> = refused.iter().map(|f| f.name()).collect();
            out.push(Check {
                feature: "environment",
                ok: false,
                required: false,
                status: format!("{}: refused on ABI {abi}", env.policy.name),
                action: format!(
                    "its sessions fail to open: it lacks {} (sandbox.landlock = \"{}\", allow_degraded names none of them)",
                    names.join(", "),
                    env.policy.landlock.name()
                ),
            });
        }
    }
    out
}

/// The missing landlock rights a session of `policy` would refuse at `abi`.
pub fn landlock_refusal(policy: &crate::policy::Policy, abi: u32) -> Vec<LandlockFeature> {
    use crate::policy::{LandlockMode, NetworkMode};
    // "loopback" and "egress" ask landlock for no TCP rule: the session's network
    // namespace (and for egress its nftables barrier) confines them.
    let none = policy.network.mode == NetworkMode::None;
    landlock::refused(
        abi,
        none,
        &landlock::Acceptance {
            allowed: crate::session::degradations(policy),
            covered: policy.landlock == LandlockMode::Covered,
            inet_refused: none,
        },
    )
}

pub fn run(args: Args, lookup: &crate::policy::lookup::Lookup) -> anyhow::Result<ExitCode> {
    let mut checks = checks();
    // Here, not in checks(): a real idmapped mount each time, which the tests
    // asking what the kernel has do not need.
    checks.extend(directories());
    checks.extend(policies(lookup));
    let mut failed = false;
    println!(
        "{:<18} {:<6} {:<34} what hands does",
        "feature", "", "status"
    );
    for c in &checks {
        let mark = if c.ok {
            "ok"
        } else if c.required {
            "FAIL"
        } else {
            "warn"
        };
        failed |= !c.ok && c.required;
        println!(
            "{:<18} {:<6} {:<34} {}",
            c.feature, mark, c.status, c.action
        );
    }
    if !args.no_probe && !failed {
        let rt = super::runtime()?;
        let probe = rt.block_on(async {
            let t = Instant::now();
            let s = super::open_session(
                "default",
                lookup,
                None,
                false,
                crate::session::Connector::Local,
            )
            .await?;
            let opened = t.elapsed();
            let r = s
                .call("bash", &serde_json::json!({"command": "/bin/true"}))
                .await;
            let report = s.confinement().clone();
            let workspaces = s.workspaces();
            s.close().await?;
            workspaces.drain(super::DRAIN);
            super::release_cgroups();
            anyhow::ensure!(!r.is_error, "bash /bin/true failed: {}", r.text_content());
            Ok::<_, anyhow::Error>((opened, report))
        });
        match probe {
            Ok((opened, report)) => println!(
                "{:<18} {:<6} {:<34} opened in {:.1} ms as uid {}, landlock ABI {}, caps {:#x}",
                "session probe",
                "ok",
                "default environment",
                opened.as_secs_f64() * 1000.0,
                report.uid,
                report.landlock.abi,
                report.effective_caps
            ),
            Err(e) => {
                failed = true;
                println!(
                    "{:<18} {:<6} {}",
                    "session probe",
                    "FAIL",
                    crate::util::error_chain(e.as_ref())
                );
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
