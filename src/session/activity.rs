//! How busy a session is: the calls running in it, the calls it has run, and
//! when it was last used. The registry reads it to list sessions and to close
//! the ones left idle; every call of the session moves it, whichever connector
//! made the call.
//!
//! Lock-free: calls on several tasks update it while the registry reads it
//! under its own lock, so it is atomics only. Times are milliseconds since the
//! session opened, on the monotonic clock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The activity of one session.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    running: AtomicU32,
    calls: AtomicU64,
    /// When the session was last used, in ms since `opened`.
    last_used_ms: AtomicU64,
}

/// What [`Activity::snapshot`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub age: Duration,
    pub running: u32,
    pub calls: u64,
    /// Zero while a call runs.
    pub idle: Duration,
}

/// A call in progress: counted as running until dropped (finished, cancelled,
/// or its future dropped), which marks the session used. Owned, so a call can
/// be counted from before the task that runs it is spawned.
#[must_use = "the call counts as running only while this lives"]
pub struct Running(Arc<Activity>);

impl Drop for Running {
    fn drop(&mut self) {
        // Marked used before the count drops, so the session never looks idle
        // since before this call ended.
        self.0.touch();
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            running: AtomicU32::new(0),
            calls: AtomicU64::new(0),
            last_used_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// Marks the session used now (a request named it).
    pub fn touch(&self) {
        self.last_used_ms.fetch_max(self.now_ms(), Ordering::SeqCst);
    }

    /// A call starts; it runs until the [`Running`] is dropped.
    pub fn start(self: &Arc<Self>) -> Running {
        self.running.fetch_add(1, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Running(self.clone())
    }

    pub fn snapshot(&self) -> Snapshot {
        // The count first: a call that ends between the two reads has
        // touched the session before decrementing, so it is never reported
        // idle for longer than it was.
        let running = self.running.load(Ordering::SeqCst);
        let now = self.now_ms();
        let last = self.last_used_ms.load(Ordering::SeqCst);
        Snapshot {
            age: Duration::from_millis(now),
            running,
            calls: self.calls.load(Ordering::Relaxed),
            idle: if running > 0 {
                Duration::ZERO
            } else {
                Duration::from_millis(now.saturating_sub(last))
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `idle` is at most the time since `since` (plus the millisecond the
    /// clock is truncated to).
    fn idle_since(s: Snapshot, since: Instant) -> bool {
        s.idle <= since.elapsed() + Duration::from_millis(1)
    }

    #[test]
    fn a_running_call_keeps_the_session_busy_and_its_end_counts_as_use() {
        let a = Arc::new(Activity::new());
        std::thread::sleep(Duration::from_millis(30));
        let s = a.snapshot();
        assert_eq!((s.running, s.calls), (0, 0));
        assert!(
            s.idle >= Duration::from_millis(30) && s.idle <= s.age,
            "{s:?}"
        );
        let g = a.start();
        let h = a.start();
        std::thread::sleep(Duration::from_millis(30));
        let s = a.snapshot();
        assert_eq!((s.running, s.calls, s.idle), (2, 2, Duration::ZERO));
        drop(g);
        assert_eq!(a.snapshot().idle, Duration::ZERO, "one call still runs");
        let ended = Instant::now();
        drop(h);
        let s = a.snapshot();
        assert_eq!(s.running, 0);
        assert!(idle_since(s, ended), "idle from the call's end: {s:?}");
        std::thread::sleep(Duration::from_millis(30));
        assert!(a.snapshot().idle >= Duration::from_millis(30));
        let touched = Instant::now();
        a.touch();
        assert!(idle_since(a.snapshot(), touched));
    }
}
