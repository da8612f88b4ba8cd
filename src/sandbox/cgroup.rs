//! Per-session control groups: memory, pids and CPU limits from the policy, and
//! killing a session's whole process tree, on cgroup v1 (this machine class) and
//! v2 (most Kubernetes nodes) behind one type, through `cgroups-rs`.
//!
//! Layout on v1: `<controller mount>/hands/<session>` in each used controller
//! (memory, pids, cpu, freezer).
//!
//! On v2 hands is a guest of the cgroup it starts in (its *base*: a systemd unit's
//! cgroup with `Delegate=yes`, a pod's container cgroup, a scope): it never
//! writes above the base and never touches the hierarchy's root. The first
//! session moves every process of the base into the leaf `<base>/supervisor`
//! (the kernel's no-internal-processes rule: a group that hands controllers down
//! holds no process itself; systemd's `DelegateSubgroup=supervisor` does the same),
//! enables memory, pids and cpu in the base's `cgroup.subtree_control` and in
//! `<base>/hands`, and creates sessions as `<base>/hands/<session>`. A hands
//! process that starts in `<base>/supervisor` takes `<base>` as its base. Running
//! in the root cgroup, or in a group whose parent does not delegate those three
//! controllers, is refused with what to do. A v2 hierarchy can be rooted anywhere,
//! which is how the v2 code path is tested on a fake cgroupfs here.

use std::fs::File;
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
/// v2: the leaf of the base group that holds the base's own processes.
pub const LEAF: &str = "supervisor";

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
    /// The base group, relative to `v2_root` ("" for the root of a cgroup
    /// namespace); empty on v1.
    base: String,
    /// The group session groups are created in, relative to the hierarchy
    /// (`<base>/hands` on v2, `hands` on v1).
    parent: String,
}

/// The v2 path of the calling process (`0::/system.slice/hands.service`), without
/// its leading `/`.
fn own_v2_path() -> Result<String, CgroupError> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| CgroupError::Unavailable(format!("reading /proc/self/cgroup: {e}")))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().trim_start_matches('/').to_string())
        .ok_or_else(|| {
            CgroupError::Unavailable("/proc/self/cgroup names no cgroup v2 group".into())
        })
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.display().to_string();
    move |cause| CgroupError::Io { path, op, cause }
}

fn words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

impl Cgroups {
    /// Picks v2 when `/sys/fs/cgroup` is a unified hierarchy (then the base is
    /// the group this process runs in, see the module doc), else v1 when the
    /// memory, pids, cpu and freezer controllers are mounted.
    pub fn detect() -> Result<Cgroups, CgroupError> {
        let v2_root = PathBuf::from("/sys/fs/cgroup");
        if v2_root.join("cgroup.controllers").exists() {
            return Cgroups::v2_guest(v2_root, &own_v2_path()?);
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
                base: String::new(),
                parent: PARENT.to_string(),
            })
        } else {
            Err(CgroupError::Unavailable(format!(
                "no cgroup v2 with memory+pids at /sys/fs/cgroup, and cgroup v1 lacks {}",
                missing.join(", ")
            )))
        }
    }

    /// hands as a guest of group `own` (relative to `root`) of a v2 hierarchy
    /// mounted at `root` (tests use a fake cgroupfs): the base is `own`, or its
    /// parent when `own` is the base's leaf. Refused in the hierarchy's root and
    /// when the base lacks a controller hands needs.
    pub fn v2_guest(root: impl Into<PathBuf>, own: &str) -> Result<Cgroups, CgroupError> {
        let root = root.into();
        let own = own.trim_matches('/');
        let base = match own.rsplit_once('/') {
            Some((parent, LEAF)) => parent.to_string(),
            None if own == LEAF => String::new(),
            _ => own.to_string(),
        };
        let base_dir = root.join(&base);
        // Only the real root of a v2 hierarchy has no cgroup.type; the root of a
        // cgroup namespace (a container's) has one.
        if !base_dir.join("cgroup.type").exists() {
            return Err(CgroupError::Unavailable(format!(
                "hands runs in the root cgroup of the v2 hierarchy at {}, and creates sessions only inside a cgroup of its own: run it under a systemd unit with Delegate=yes (`systemd-run --scope -p Delegate=yes hands ...` for one command), or in a container's cgroup",
                root.display()
            )));
        }
        let offered = words(&base_dir.join("cgroup.controllers"));
        let missing: Vec<&str> = V2_CONTROLLERS
            .iter()
            .copied()
            .filter(|c| !offered.iter().any(|o| o == c))
            .collect();
        if !missing.is_empty() {
            return Err(CgroupError::Unavailable(format!(
                "the cgroup hands runs in (/{base}) is not given the {} controller by its parent, so session limits cannot be set below it: run hands under a systemd unit with Delegate=yes (`systemd-run --scope -p Delegate=yes hands ...` for one command), or give its cgroup those controllers",
                missing.join(", ")
            )));
        }
        let parent = if base.is_empty() {
            PARENT.to_string()
        } else {
            format!("{base}/{PARENT}")
        };
        Ok(Cgroups {
            version: CgroupVersion::V2,
            v2_root: root,
            base,
            parent,
        })
    }

    /// v2: whether the base is a systemd unit's group (`.service`, `.scope`)
    /// that systemd did not mark as delegated (`trusted.delegate`, set by systemd
    /// 251 and later on the groups of units with `Delegate=yes`). Creating groups
    /// in such a unit breaks systemd's delegation contract: it may move or remove
    /// them. `None` when the base is not a unit's, or on v1.
    pub fn undelegated_unit(&self) -> Option<String> {
        if self.version != CgroupVersion::V2 {
            return None;
        }
        let unit = self.base.rsplit('/').next().unwrap_or_default();
        if !(unit.ends_with(".service") || unit.ends_with(".scope")) {
            return None;
        }
        let dir = self.v2_root.join(&self.base);
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
        (!super::sys::has_xattr(&path, c"trusted.delegate")).then(|| unit.to_string())
    }

    /// Where session groups are created, for messages (`/sys/fs/cgroup/x/hands`,
    /// `hands` under each v1 controller).
    pub fn describe(&self) -> String {
        match self.version {
            CgroupVersion::V2 => self.v2_root.join(&self.parent).display().to_string(),
            CgroupVersion::V1 => format!("{PARENT} under each v1 controller"),
        }
    }

    /// v2: makes the base hand memory, pids and cpu down to `<base>/hands` and
    /// its session groups, touching nothing above the base. Idempotent, and safe
    /// against another hands process doing the same at once.
    fn prepare_v2(&self) -> Result<(), CgroupError> {
        let base_dir = self.v2_root.join(&self.base);
        let enable = V2_CONTROLLERS.map(|c| format!("+{c}")).join(" ");
        let enabled = |dir: &Path| {
            let on = words(&dir.join("cgroup.subtree_control"));
            V2_CONTROLLERS.iter().all(|c| on.iter().any(|o| o == c))
        };
        if !enabled(&base_dir) {
            // A group that hands controllers down holds no process itself: move
            // the base's processes (this one among them) into its leaf first.
            let leaf = base_dir.join(LEAF);
            match std::fs::create_dir(&leaf) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(io_err(&leaf, "mkdir")(e))
                }
                _ => {}
            }
            let mut attempt = 0;
            loop {
                for pid in words(&base_dir.join("cgroup.procs")) {
                    // A process that exited meanwhile (ESRCH) needs no move.
                    match std::fs::write(leaf.join("cgroup.procs"), &pid) {
                        Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                            return Err(io_err(&leaf, "move the base's processes into its leaf")(e))
                        }
                        _ => {}
                    }
                }
                match std::fs::write(base_dir.join("cgroup.subtree_control"), &enable) {
                    Ok(()) => break,
                    // A process entered the base between the listing and the write.
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 50 => {
                        attempt += 1;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => return Err(io_err(&base_dir, "enable controllers")(e)),
                }
            }
        }
        let parent_dir = self.v2_root.join(&self.parent);
        match std::fs::create_dir(&parent_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(io_err(&parent_dir, "mkdir")(e))
            }
            _ => {}
        }
        if !enabled(&parent_dir) {
            std::fs::write(parent_dir.join("cgroup.subtree_control"), &enable)
                .map_err(io_err(&parent_dir, "enable controllers"))?;
        }
        Ok(())
    }

    /// Removes `<base>/hands` when no session group is left in it (at the end of
    /// a command or of the worker); the leaf stays, since this process is in it.
    pub fn release(&self) {
        if self.version == CgroupVersion::V2 {
            let _ = std::fs::remove_dir(self.v2_root.join(&self.parent));
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
            counters: Default::default(),
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

    /// Creates `<parent>/<name>` with the given limits. An existing group of that
    /// name (left by a worker that died) is emptied and reused.
    pub fn create(&self, name: &str, limits: CgroupLimits) -> Result<SessionCgroup, CgroupError> {
        if self.version == CgroupVersion::V2 {
            self.prepare_v2()?;
        }
        let rel = format!("{}/{name}", self.parent);
        let cg = self.load(&rel);
        match self.version {
            // Not cgroups-rs's create: on v2 it enables every controller of the
            // host in the hierarchy's root and in each ancestor.
            CgroupVersion::V2 => {
                let dir = self.v2_root.join(&rel);
                let mut made = std::fs::create_dir(&dir);
                if matches!(&made, Err(e) if e.kind() == std::io::ErrorKind::NotFound) {
                    // Another hands process of this base released the parent
                    // between prepare and mkdir.
                    self.prepare_v2()?;
                    made = std::fs::create_dir(&dir);
                }
                match made {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                        return Err(io_err(&dir, "mkdir")(e))
                    }
                    _ => {}
                }
            }
            CgroupVersion::V1 => cg.create().map_err(|cause| CgroupError::Op {
                path: rel.clone(),
                op: "create",
                cause,
            })?,
        }
        let session = self.session(cg, rel);
        session.apply(limits)?;
        Ok(session)
    }

    /// Names of existing session groups (to clean up orphans).
    pub fn existing(&self) -> Vec<String> {
        let dir = match self.version {
            CgroupVersion::V2 => self.v2_root.join(&self.parent),
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
        let rel = format!("{}/{name}", self.parent);
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
    /// The two counter files (memory, pids), opened at the first read that
    /// finds them and read in place after every call (a `pread` each, not an
    /// open, read and close).
    counters: [std::sync::OnceLock<File>; 2],
}

/// How often a session hit its limits so far (counters only grow).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitEvents {
    /// Processes the OOM killer killed because the group reached its memory
    /// limit (v1 `memory.oom_control` oom_kill, v2 `memory.events` oom_kill).
    pub oom_kills: u64,
    /// Times the group's own memory limit was reached and an allocation was
    /// about to fail (v2 `memory.events` oom); `None` where the kernel does not
    /// tell (v1), so a kill cannot be told apart from one forced from above.
    pub own_limit_ooms: Option<u64>,
    /// Forks refused because the group reached its pids limit (`pids.events`
    /// max, v1 and v2). Before Linux 6.13 a fork refused by a limit above the
    /// group (a unit's `TasksMax=`, a pod's) counts here too.
    pub pids_refused: u64,
}

/// The tightest limits set on the groups above a session's: the worker's own
/// group, its unit's or pod's, their slices. Every session of the worker
/// shares them, so a session can meet one before its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OuterLimits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
}

/// The smallest numeric value of `file` in the directories above `dir`, up to
/// the first that has no such file (the hierarchy's root, or above it). "max"
/// and v1's "unlimited" (close to `i64::MAX`) are no limit.
fn tightest_above(dir: &Path, file: &str) -> Option<u64> {
    let mut tightest: Option<u64> = None;
    let mut at = dir.parent();
    while let Some(d) = at {
        let Ok(text) = std::fs::read_to_string(d.join(file)) else {
            break;
        };
        if let Ok(v) = text.trim().parse::<u64>() {
            if v < 1 << 62 {
                tightest = Some(tightest.map_or(v, |t| t.min(v)));
            }
        }
        at = d.parent();
    }
    tightest
}

/// The value of `key` in a flat-keyed cgroup file (`key value` lines), read
/// from its start.
fn counter(file: Option<&File>, key: &str) -> u64 {
    use std::os::unix::fs::FileExt;
    let Some(file) = file else { return 0 };
    // These files hold a few short lines (v2 `memory.events` is the longest).
    let mut buf = [0u8; 1024];
    let n = file.read_at(&mut buf, 0).unwrap_or(0);
    std::str::from_utf8(&buf[..n])
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
        let file = |i: usize, path: PathBuf| -> Option<&File> {
            if let Some(f) = self.counters[i].get() {
                return Some(f);
            }
            let f = File::open(path).ok()?;
            // Two first readers at once: either copy is the same file.
            Some(self.counters[i].get_or_init(|| f))
        };
        let memory = file(0, self.memory_dir.join(memory_file));
        LimitEvents {
            oom_kills: counter(memory, "oom_kill"),
            own_limit_ooms: (self.version == CgroupVersion::V2).then(|| counter(memory, "oom")),
            pids_refused: counter(file(1, self.pids_dir.join("pids.events")), "max"),
        }
    }

    /// The limits above this group, read now (an operator may change them
    /// while the worker runs).
    pub fn outer_limits(&self) -> OuterLimits {
        let memory_file = match self.version {
            CgroupVersion::V1 => "memory.limit_in_bytes",
            CgroupVersion::V2 => "memory.max",
        };
        OuterLimits {
            memory_bytes: tightest_above(&self.memory_dir, memory_file),
            pids: tightest_above(&self.pids_dir, "pids.max"),
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

    const LIMITS: CgroupLimits = CgroupLimits {
        memory_bytes: 64 << 20,
        pids: 32,
        cpu: 0.5,
    };

    /// The real root of a v2 hierarchy: no cgroup.type.
    fn fake_v2_root(dir: &Path) {
        fake_v2_group(dir);
        std::fs::remove_file(dir.join("cgroup.type")).unwrap();
        std::fs::write(dir.join("cgroup.subtree_control"), "memory pids\n").unwrap();
    }

    /// A guest of a systemd unit: the unit's processes move into its leaf, the
    /// controllers are enabled in the unit's group and below only, the root is
    /// never written, sessions are created inside the unit.
    #[test]
    fn v2_sessions_live_inside_the_unit_and_the_root_is_untouched() {
        let root = tempfile::tempdir().unwrap();
        fake_v2_root(root.path());
        let unit = root.path().join("system.slice/hands.service");
        fake_v2_group(&unit);
        std::fs::write(unit.join("cgroup.procs"), "101\n").unwrap();
        fake_v2_group(&unit.join("hands/s7"));
        let cgs = Cgroups::v2_guest(root.path(), "/system.slice/hands.service").unwrap();
        cgs.create("s7", LIMITS).unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(
            read(&root.path().join("cgroup.subtree_control")),
            "memory pids\n"
        );
        assert_eq!(read(&unit.join("supervisor/cgroup.procs")).trim(), "101");
        assert_eq!(
            read(&unit.join("cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(
            read(&unit.join("hands/cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(read(&unit.join("hands/s7/pids.max")).trim(), "32");
        assert!(!root.path().join("hands").exists());
        assert_eq!(cgs.existing(), vec!["s7".to_string()]);
        // A second hands process, started in the leaf, shares the same base.
        let again =
            Cgroups::v2_guest(root.path(), "system.slice/hands.service/supervisor").unwrap();
        assert_eq!(again.describe(), unit.join("hands").display().to_string());
    }

    /// The root of the hierarchy, and a group not given the controllers, are
    /// refused with what to do.
    #[test]
    fn v2_refuses_the_root_and_an_undelegated_group() {
        let root = tempfile::tempdir().unwrap();
        fake_v2_root(root.path());
        let e = Cgroups::v2_guest(root.path(), "/").unwrap_err().to_string();
        assert!(
            e.contains("root cgroup") && e.contains("Delegate=yes"),
            "{e}"
        );
        let scope = root.path().join("user.slice/session-1.scope");
        fake_v2_group(&scope);
        std::fs::write(scope.join("cgroup.controllers"), "memory pids\n").unwrap();
        let e = Cgroups::v2_guest(root.path(), "/user.slice/session-1.scope")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/user.slice/session-1.scope") && e.contains("cpu controller"),
            "{e}"
        );
    }

    #[test]
    fn v2_limits_on_fake_cgroupfs() {
        let root = tempfile::tempdir().unwrap();
        fake_v2_group(root.path());
        fake_v2_group(&root.path().join("hands/s7"));
        // The root of a container's cgroup namespace (it has a cgroup.type).
        let cgs = Cgroups::v2_guest(root.path(), "/").unwrap();
        let cg = cgs.create("s7", LIMITS).unwrap();
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
        assert_eq!(
            cg.limit_events(),
            LimitEvents {
                own_limit_ooms: Some(0),
                ..LimitEvents::default()
            }
        );
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
                own_limit_ooms: Some(2),
                pids_refused: 5
            }
        );
        // The limits above: the tightest numeric one, up to the first group
        // without the file.
        assert_eq!(cg.outer_limits(), OuterLimits::default());
        for (dir, memory, pids) in [
            (root.path().join("hands"), "max", "max"),
            (root.path().to_path_buf(), "536870912", "200"),
        ] {
            std::fs::write(dir.join("memory.max"), memory).unwrap();
            std::fs::write(dir.join("pids.max"), pids).unwrap();
        }
        assert_eq!(
            cg.outer_limits(),
            OuterLimits {
                memory_bytes: Some(512 << 20),
                pids: Some(200)
            }
        );
    }
}
