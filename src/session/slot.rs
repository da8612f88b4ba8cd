//! Session slots: a host-wide numbering of open sessions that decides each
//! session's uid and cgroup name. A slot is held by an exclusive `flock` on
//! `<state_dir>/slots/<n>.lock`, so it is safe across worker processes and is
//! released by the kernel when a worker dies; a group left behind by a dead
//! worker is cleaned when its slot is next taken.

use std::fs::{File, OpenOptions};
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// A held slot; dropping it releases the lock.
#[derive(Debug)]
pub struct Slot {
    pub n: u32,
    _lock: Flock<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("creating {path}: {cause}")]
    Dir { path: String, cause: std::io::Error },
    #[error("all {0} session slots are in use on this host")]
    Exhausted(u32),
}

/// Takes slot `n` if no one holds it.
pub fn try_acquire(state_dir: &Path, n: u32) -> Option<Slot> {
    let path = state_dir.join("slots").join(format!("{n}.lock"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ok()?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .ok()
        .map(|lock| Slot { n, _lock: lock })
}

/// Takes the lowest free slot below `max`. The search starts at a point derived
/// from the pid so that concurrent workers rarely contend on the same lock file.
pub fn acquire(state_dir: &Path, max: u32) -> Result<Slot, SlotError> {
    let dir = state_dir.join("slots");
    std::fs::create_dir_all(&dir).map_err(|cause| SlotError::Dir {
        path: dir.display().to_string(),
        cause,
    })?;
    let start = (std::process::id() * 7) % max.max(1);
    for i in 0..max {
        let n = (start + i) % max;
        let path = dir.join(format!("{n}.lock"));
        let Ok(file) = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        else {
            continue;
        };
        if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            return Ok(Slot { n, _lock: lock });
        }
    }
    Err(SlotError::Exhausted(max))
}
