//! A work item's lease (contract §3.4, §3.5): the heartbeat arithmetic and the
//! reasons a lease ends, kept apart from the HTTP calls so the rules are
//! tested on their own.
//!
//! The first heartbeat sends `expected_last_heartbeat=NO_HEARTBEAT`, every
//! later one echoes the previous answer's `last_heartbeat` verbatim. The
//! interval starts at 30 s with an assumed TTL of 90 s; a positive
//! `ttl_seconds` sets the TTL and the interval to `max(1, min(ttl/2, 30))`.
//! Each attempt is cut off after one interval.

use std::time::{Duration, Instant};

use serde_json::Value;

/// Why a lease ended. The first reason recorded wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The runner ended by itself (idle, terminated session, non-session item).
    RunnerDone,
    /// The heartbeat reported `stopping`/`stopped`, or `lease_extended: false`.
    HeartbeatStop,
    /// A fatal 4xx other than 412 on the heartbeat.
    HeartbeatRejected,
    /// 412: another worker may hold the lease.
    LeaseLost,
    /// No successful heartbeat for longer than the TTL.
    AssumedLost,
    /// The worker drains: no further call is taken, the call in flight may
    /// finish (its result is posted) within the worker's grace, and the
    /// heartbeat keeps the lease meanwhile.
    Draining,
}

impl EndReason {
    /// The reason as the worker's metrics label it.
    pub fn name(self) -> &'static str {
        match self {
            EndReason::RunnerDone => "runner_done",
            EndReason::HeartbeatStop => "heartbeat_stop",
            EndReason::HeartbeatRejected => "heartbeat_rejected",
            EndReason::LeaseLost => "lease_lost",
            EndReason::AssumedLost => "assumed_lost",
            EndReason::Draining => "draining",
        }
    }

    /// Whether the item is force-stopped afterwards: not when the lease may
    /// belong to someone else.
    pub fn force_stop(self) -> bool {
        !matches!(self, EndReason::LeaseLost | EndReason::AssumedLost)
    }

    /// Whether results may still be posted for the item. The SDK worker
    /// posts after losing the lease; hands does not (the lease moved on).
    pub fn may_post(self) -> bool {
        !matches!(self, EndReason::LeaseLost | EndReason::AssumedLost)
    }
}

pub const NO_HEARTBEAT: &str = "NO_HEARTBEAT";

/// The heartbeat state of one item.
#[derive(Debug, Clone)]
pub struct Lease {
    pub interval: Duration,
    pub ttl: Duration,
    /// What the next heartbeat echoes.
    pub last: String,
    pub last_success: Instant,
}

/// What one heartbeat attempt came to.
#[derive(Debug)]
pub enum Beat {
    /// 200 with this body.
    Ok(Value),
    /// An HTTP status that is not 2xx (after client retries).
    Status(u16),
    /// Transport error, or the per-attempt cut-off.
    Transient,
}

impl Lease {
    pub fn new(now: Instant) -> Lease {
        Lease {
            interval: Duration::from_secs(30),
            ttl: Duration::from_secs(90),
            last: NO_HEARTBEAT.to_string(),
            last_success: now,
        }
    }

    /// Applies one attempt's outcome; Some(reason) ends the lease.
    pub fn record(&mut self, beat: Beat, now: Instant) -> Option<EndReason> {
        match beat {
            Beat::Ok(body) => {
                self.last = body["last_heartbeat"].as_str().unwrap_or("").to_string();
                self.last_success = now;
                if let Some(ttl) = body["ttl_seconds"].as_u64().filter(|t| *t > 0) {
                    self.ttl = Duration::from_secs(ttl);
                    self.interval = Duration::from_secs_f64((ttl as f64 / 2.0).clamp(1.0, 30.0));
                }
                let state = body["state"].as_str().unwrap_or("");
                if matches!(state, "stopping" | "stopped") || body["lease_extended"] == false {
                    return Some(EndReason::HeartbeatStop);
                }
                None
            }
            Beat::Status(412) => Some(EndReason::LeaseLost),
            Beat::Status(s) if super::http::fatal_4xx(s) => Some(EndReason::HeartbeatRejected),
            Beat::Status(_) | Beat::Transient => {
                (now.duration_since(self.last_success) > self.ttl).then_some(EndReason::AssumedLost)
            }
        }
    }

    /// How long the next attempt may take: one interval, and never past the
    /// TTL since the last success. `None` once the TTL has passed: the lease is
    /// lost, and no further heartbeat may go out with a stale
    /// `last_heartbeat` (it would extend a lease that is someone else's).
    pub fn next_attempt(&self, now: Instant) -> Option<Duration> {
        let left = (self.last_success + self.ttl).checked_duration_since(now)?;
        (!left.is_zero()).then(|| left.min(self.interval))
    }

    /// The query value of the next heartbeat.
    pub fn expected(&self) -> &str {
        &self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn heartbeats_echo_and_follow_the_ttl() {
        let t0 = Instant::now();
        let mut l = Lease::new(t0);
        assert_eq!(l.expected(), "NO_HEARTBEAT");
        assert_eq!(l.interval, Duration::from_secs(30));
        let r = l.record(
            Beat::Ok(json!({"last_heartbeat": "2026-01-01T00:00:01Z", "lease_extended": true, "state": "active", "ttl_seconds": 4})),
            t0,
        );
        assert_eq!(r, None);
        assert_eq!(l.expected(), "2026-01-01T00:00:01Z");
        assert_eq!(
            (l.ttl, l.interval),
            (Duration::from_secs(4), Duration::from_secs(2))
        );
        l.record(Beat::Ok(json!({"last_heartbeat": "", "lease_extended": true, "state": "active", "ttl_seconds": 300})), t0);
        assert_eq!(l.expected(), "", "echoed verbatim, even empty");
        assert_eq!(l.interval, Duration::from_secs(30));
        l.record(Beat::Ok(json!({"last_heartbeat": "x", "lease_extended": true, "state": "active", "ttl_seconds": 0})), t0);
        assert_eq!(
            l.interval,
            Duration::from_secs(30),
            "ttl 0 leaves the interval"
        );
        l.record(Beat::Ok(json!({"last_heartbeat": "x", "lease_extended": true, "state": "active", "ttl_seconds": 1})), t0);
        assert_eq!(l.interval, Duration::from_secs(1), "at least one second");
    }

    #[test]
    fn lease_end_reasons() {
        let t0 = Instant::now();
        let ok = |state: &str, ext: bool| {
            Beat::Ok(
                json!({"last_heartbeat": "a", "lease_extended": ext, "state": state, "ttl_seconds": 10}),
            )
        };
        assert_eq!(
            Lease::new(t0).record(ok("stopping", true), t0),
            Some(EndReason::HeartbeatStop)
        );
        assert_eq!(
            Lease::new(t0).record(ok("stopped", true), t0),
            Some(EndReason::HeartbeatStop)
        );
        assert_eq!(
            Lease::new(t0).record(ok("active", false), t0),
            Some(EndReason::HeartbeatStop)
        );
        assert_eq!(
            Lease::new(t0).record(Beat::Status(412), t0),
            Some(EndReason::LeaseLost)
        );
        assert_eq!(
            Lease::new(t0).record(Beat::Status(403), t0),
            Some(EndReason::HeartbeatRejected)
        );
        let mut l = Lease::new(t0);
        l.record(ok("active", true), t0);
        assert_eq!(
            l.record(Beat::Status(503), t0 + Duration::from_secs(5)),
            None
        );
        assert_eq!(
            l.record(Beat::Transient, t0 + Duration::from_secs(10)),
            None
        );
        assert_eq!(
            l.record(Beat::Status(429), t0 + Duration::from_secs(11)),
            Some(EndReason::AssumedLost)
        );
        assert!(!EndReason::LeaseLost.force_stop() && !EndReason::AssumedLost.may_post());
        // Past the TTL since the last success no attempt goes out; before it an
        // attempt may take at most what is left of it.
        let mut l = Lease::new(t0);
        l.record(ok("active", true), t0);
        assert_eq!(l.next_attempt(t0), Some(Duration::from_secs(5)));
        assert_eq!(
            l.next_attempt(t0 + Duration::from_secs(8)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(l.next_attempt(t0 + Duration::from_secs(10)), None);
        assert_eq!(l.next_attempt(t0 + Duration::from_secs(11)), None);
        assert!(EndReason::HeartbeatStop.force_stop() && EndReason::RunnerDone.may_post());
    }
}
