//! Per-session control groups: memory, pids and CPU limits from the policy, and
//! killing a session's whole process tree, on cgroup v1 (this machine class) and
//! v2 (most Kubernetes nodes) behind one type, through `cgroups-rs`.
//!
//! Layout: `<hierarchy>/hands/<session>`; on v1 the same relative path exists in
//! each used controller (memory, pids, cpu, freezer). A v2 hierarchy can be rooted
//! anywhere, which is how the v2 code path is tested on a fake cgroupfs here.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cgroups_rs::cgroup::Cgroup;
use cgroups_rs::cpu::CpuController;
use cgroups_rs::freezer::FreezerController;
use cgroups_rs::memory::MemController;
use cgroups_rs::pid::PidController;
use cgroups_rs::{CgroupPid, Hierarchy, MaxValue, Resources, Subsystem};

/// Name of the parent group every session group lives under.
pub const PARENT: &str = "hands";

const V1_CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "freezer"];
const V2_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
const CFS_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// Limits of one session group.
#[derive(Debug, Clone, Copy)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// CPU cores (fraction allowed).
    pub cpu: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy: {0}")]
    Unavailable(String),
    #[error("cgroup {path}: {op}: {cause}")]
    Op {
        path: String,
        op: &'static str,
        cause: cgroups_rs::error::Error,
    },
    #[error("cgroup {path}: {op}: {cause}")]
    Io {
        path: String,
        op: &'static str,
        cause: std::io::Error,
    },
    #[error("cgroup {path}: processes still alive after {waited:?}")]
    NotEmpty { path: String, waited: Duration },
}

/// A cgroup v2 hierarchy rooted at an arbitrary directory (the real
/// `/sys/fs/cgroup`, or a fake tree in tests).
#[derive(Debug, Clone)]
struct RootedV2 {
    root: PathBuf,
}

impl Hierarchy for RootedV2 {
    fn v2(&self) -> bool {
        true
    }

    fn subsystems(&self) -> Vec<Subsystem> {
        let controllers =
            std::fs::read_to_string(self.root.join("cgroup.controllers")).unwrap_or_default();
        let mut subs = Vec::new();
        for c in controllers.split_whitespace() {
            match c {
                "memory" => subs.push(Subsystem::Mem(MemController::new(self.root.clone(), true))),
                "pids" => subs.push(Subsystem::Pid(PidController::new(self.root.clone(), true))),
                "cpu" => subs.push(Subsystem::Cpu(CpuController::new(self.root.clone(), true))),
                _ => {}
            }
        }
        // v2 freezing is core functionality, not a listed controller.
        subs.push(Subsystem::Freezer(FreezerController::new(
            self.root.clone(),
            true,
        )));
        subs
    }

    fn root_control_group(&self) -> Cgroup {
        Cgroup::load(Box::new(self.clone()), "")
    }

    fn parent_control_group(&self, path: &str) -> Cgroup {
        let parent = Path::new(path)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        Cgroup::load(Box::new(self.clone()), parent)
    }

    fn root(&self) -> PathBuf {
        self.root.clone()
    }
}

/// The host's cgroup hierarchy as hands uses it.
#[derive(Debug, Clone)]
pub struct Cgroups {
    version: CgroupVersion,
    v2_root: PathBuf,
}

impl Cgroups {
    /// Picks v2 when `/sys/fs/cgroup` is a unified hierarchy with the memory and
    /// pids controllers, else v1 when those controllers are mounted.
    pub fn detect() -> Result<Cgroups, CgroupError> {
        let v2_root = PathBuf::from("/sys/fs/cgroup");
        let controllers =
            std::fs::read_to_string(v2_root.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        if has("memory") && has("pids") {
            return Ok(Cgroups {
                version: CgroupVersion::V2,
                v2_root,
            });
        }
        let v1 = cgroups_rs::hierarchies::V1::new();
        let missing: Vec<&str> = V1_CONTROLLERS
            .iter()
            .copied()
            .filter(|c| {
                let ctl = match *c {
                    "memory" => cgroups_rs::Controllers::Mem,
                    "pids" => cgroups_rs::Controllers::Pids,
                    "cpu" => cgroups_rs::Controllers::Cpu,
                    _ => cgroups_rs::Controllers::Freezer,
                };
                v1.get_mount_point(ctl).is_none()
            })
            .collect();
        if missing.is_empty() {
            Ok(Cgroups {
                version: CgroupVersion::V1,
                v2_root,
            })
        } else {
            Err(CgroupError::Unavailable(format!(
                "no cgroup v2 with memory+pids at /sys/fs/cgroup, and cgroup v1 lacks {}",
                missing.join(", ")
            )))
        }
    }

    /// A v2 hierarchy rooted at `root` (tests use a fake cgroupfs).
    pub fn v2_at(root: impl Into<PathBuf>) -> Cgroups {
        Cgroups {
            version: CgroupVersion::V2,
            v2_root: root.into(),
        }
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    fn hierarchy(&self) -> Box<dyn Hierarchy> {
        match self.version {
            CgroupVersion::V1 => Box::new(cgroups_rs::hierarchies::V1::new()),
            CgroupVersion::V2 => Box::new(RootedV2 {
                root: self.v2_root.clone(),
            }),
        }
    }

    /// The directory of group `rel` for controller `ctl` (`memory`, `pids`).
    fn controller_dir(&self, ctl: cgroups_rs::Controllers, rel: &str) -> PathBuf {
        match self.version {
            CgroupVersion::V2 => self.v2_root.join(rel),
            CgroupVersion::V1 => cgroups_rs::hierarchies::V1::new()
                .get_mount_point(ctl)
                .unwrap_or_default()
                .join(rel),
        }
    }

    fn session(&self, cg: Cgroup, rel: String) -> SessionCgroup {
        SessionCgroup {
            memory_dir: self.controller_dir(cgroups_rs::Controllers::Mem, &rel),
            pids_dir: self.controller_dir(cgroups_rs::Controllers::Pids, &rel),
            cg,
            rel,
            version: self.version,
        }
    }

    fn load(&self, rel: &str) -> Cgroup {
        match self.version {
            CgroupVersion::V1 => Cgroup::load_with_specified_controllers(
                self.hierarchy(),
                rel,
                V1_CONTROLLERS.iter().map(|s| s.to_string()).collect(),
            ),
            CgroupVersion::V2 => Cgroup::load(self.hierarchy(), rel),
        }
    }

    /// Creates `hands/<name>` with the given limits. An existing group of that
    /// name (left by a worker that died) is emptied and reused.
    pub fn create(&self, name: &str, limits: CgroupLimits) -> Result<SessionCgroup, CgroupError> {
        let rel = format!("{PARENT}/{name}");
        let cg = self.load(&rel);
        cg.create().map_err(|cause| CgroupError::Op {
            path: rel.clone(),
            op: "create",
            cause,
        })?;
        if self.version == CgroupVersion::V2 {
            // Delegate the controllers down to the session group: cgroups-rs only
            // does this against the real /sys/fs/cgroup, and only for controllers
            // listed there.
            let enable = V2_CONTROLLERS.map(|c| format!("+{c}")).join(" ");
            for dir in [self.v2_root.clone(), self.v2_root.join(PARENT)] {
                let ctl = dir.join("cgroup.subtree_control");
                // A controller the host does not delegate leaves its limit file
                // absent, which apply() then reports with the file's name.
                let _ = std::fs::write(&ctl, &enable);
            }
        }
        let session = self.session(cg, rel);
        session.apply(limits)?;
        Ok(session)
    }

    /// Names of existing session groups (to clean up orphans).
    pub fn existing(&self) -> Vec<String> {
        let dir = match self.version {
            CgroupVersion::V2 => self.v2_root.join(PARENT),
            CgroupVersion::V1 => cgroups_rs::hierarchies::V1::new()
                .get_mount_point(cgroups_rs::Controllers::Pids)
                .unwrap_or_default()
                .join(PARENT),
        };
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Opens an existing session group by name (no creation).
    pub fn open(&self, name: &str) -> SessionCgroup {
        let rel = format!("{PARENT}/{name}");
        self.session(self.load(&rel), rel)
    }
}

/// One session's group.
#[derive(Debug)]
pub struct SessionCgroup {
    cg: Cgroup,
    rel: String,
    version: CgroupVersion,
    /// The group's directory in the memory and pids hierarchies (one and the
    /// same on v2), where the kernel counts the limits' events.
    memory_dir: PathBuf,
    pids_dir: PathBuf,
}

/// How often a session hit its limits so far (counters only grow).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitEvents {
    /// Processes the OOM killer killed because the group reached its memory
    /// limit (v1 `memory.oom_control` oom_kill, v2 `memory.events` oom_kill).
    pub oom_kills: u64,
    /// Forks refused because the group reached its pids limit (`pids.events`
    /// max, v1 and v2).
    pub pids_refused: u64,
}

/// The value of `key` in a flat-keyed cgroup file (`key value` lines).
fn counter(path: &Path, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok())?
            })
        })
        .unwrap_or(0)
}

impl SessionCgroup {
    fn op_err(
        &self,
        op: &'static str,
    ) -> impl FnOnce(cgroups_rs::error::Error) -> CgroupError + '_ {
        move |cause| CgroupError::Op {
            path: self.rel.clone(),
            op,
            cause,
        }
    }

    fn apply(&self, limits: CgroupLimits) -> Result<(), CgroupError> {
        let mut res = Resources::default();
        res.memory.memory_hard_limit = Some(limits.memory_bytes as i64);
        res.pid.maximum_number_of_processes = Some(MaxValue::Value(limits.pids as i64));
        res.cpu.period = Some(CFS_PERIOD_US);
        res.cpu.quota = Some((limits.cpu * CFS_PERIOD_US as f64).round().max(1000.0) as i64);
        self.cg.apply(&res).map_err(self.op_err("apply limits"))
    }

    /// Relative path (`hands/<name>`).
    pub fn path(&self) -> &str {
        &self.rel
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// Moves process `pid` (host pid namespace) into the group.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        self.cg
            .add_task_by_tgid(CgroupPid::from(pid as u64))
            .map_err(self.op_err("add process"))
    }

    /// Pids of the processes in the group.
    pub fn procs(&self) -> Vec<u32> {
        self.cg.procs().into_iter().map(|p| p.pid as u32).collect()
    }

    /// Kills every process in the group and waits until it is empty. v2 uses
    /// `cgroup.kill`; v1 freezes the group first so nothing can fork between the
    /// listing and the kill, kills every member, then thaws so the SIGKILLs land.
    pub fn kill_all(&self, wait: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        loop {
            let procs = self.procs();
            if procs.is_empty() {
                return Ok(());
            }
            if start.elapsed() > wait {
                return Err(CgroupError::NotEmpty {
                    path: self.rel.clone(),
                    waited: wait,
                });
            }
            match self.version {
                CgroupVersion::V2 if self.cg.kill().is_ok() => {}
                _ => {
                    let freezer: Option<&FreezerController> = self.cg.controller_of();
                    if let Some(f) = freezer {
                        let _ = f.freeze();
                    }
                    for pid in self.procs() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                    if let Some(f) = freezer {
                        let _ = f.thaw();
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Removes the (empty) group.
    pub fn delete(&self) -> Result<(), CgroupError> {
        self.cg.delete().map_err(self.op_err("delete"))
    }

    /// How many times the memory limit was hit and the OOM killer ran (v1
    /// `memory.oom_control` oom_kill / v2 `memory.events` oom_kill).
    pub fn oom_kills(&self) -> u64 {
        self.limit_events().oom_kills
    }

    /// The group's limit counters, read from the files the kernel keeps
    /// (cgroups-rs reads no `memory.events` on v2). A counter the kernel does
    /// not offer reads as 0.
    pub fn limit_events(&self) -> LimitEvents {
        let memory_file = match self.version {
            CgroupVersion::V1 => "memory.oom_control",
            CgroupVersion::V2 => "memory.events",
        };
        LimitEvents {
            oom_kills: counter(&self.memory_dir.join(memory_file), "oom_kill"),
            pids_refused: counter(&self.pids_dir.join("pids.events"), "max"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The v2 code path against a fake cgroupfs: limits land in the v2 files with
    /// the v2 syntax, processes are written to cgroup.procs.
    /// What the kernel puts in a new v2 group directory (the fake cgroupfs has no
    /// kernel behind it, so the test lays the files down as mkdir would).
    fn fake_v2_group(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for (f, v) in [
            ("cgroup.controllers", "cpuset cpu io memory pids\n"),
            ("cgroup.subtree_control", ""),
            ("cgroup.type", "domain\n"),
            ("cgroup.procs", ""),
            ("memory.max", "max\n"),
            ("pids.max", "max\n"),
            ("cpu.max", "max 100000\n"),
        ] {
            std::fs::write(dir.join(f), v).unwrap();
        }
    }

    #[test]
    fn v2_limits_on_fake_cgroupfs() {
        let root = tempfile::tempdir().unwrap();
        fake_v2_group(root.path());
        fake_v2_group(&root.path().join("hands/s7"));
        let cgs = Cgroups::v2_at(root.path());
        let cg = cgs
            .create(
                "s7",
                CgroupLimits {
                    memory_bytes: 64 << 20,
                    pids: 32,
                    cpu: 0.5,
                },
            )
            .unwrap();
        let dir = root.path().join("hands/s7");
        assert!(dir.is_dir());
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max").trim(), (64u64 << 20).to_string());
        assert_eq!(read("pids.max").trim(), "32");
        assert_eq!(read("cpu.max").trim(), "50000 100000");
        let parent_ctl =
            std::fs::read_to_string(root.path().join("hands/cgroup.subtree_control")).unwrap();
        assert!(parent_ctl.contains("+memory") && parent_ctl.contains("+pids"));
        cg.add_process(4242).unwrap();
        assert_eq!(read("cgroup.procs").trim(), "4242");
        assert_eq!(cgs.existing(), vec!["s7".to_string()]);
        // The limits' counters, as the kernel writes them.
        assert_eq!(cg.limit_events(), LimitEvents::default());
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n",
        )
        .unwrap();
        std::fs::write(dir.join("pids.events"), "max 5\n").unwrap();
        assert_eq!(
            cg.limit_events(),
            LimitEvents {
                oom_kills: 2,
                pids_refused: 5
            }
        );
    }
}
