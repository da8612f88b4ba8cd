//! What the worker says about itself to whoever supervises it: whether it is
//! ready (every configured way in is up: the debug listener bound, a tunnel
//! connected to a gateway, the Claude Managed Agents work queue answering, the
//! MCP listener bound), and
//! whether it is draining. systemd learns it through `sd_notify`
//! ([`super::notify`]), Kubernetes through the readiness probe; both read this
//! one state.
//!
//! A part that is not configured is not waited for. A part that goes down
//! again (every tunnel lost, polls failing) makes the worker not ready until it
//! is back; draining makes it not ready for good.

use std::sync::Mutex;

use tokio::sync::watch;

/// A way in whose state decides readiness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The loopback debug listener is bound.
    Listener,
    /// At least one tunnel connection to a gateway is established.
    Tunnel,
    /// The Claude Managed Agents work queue answered the last poll.
    Queue,
    /// The MCP listener (`[mcp]`) is bound.
    Mcp,
}

impl Part {
    const ALL: [Part; 4] = [Part::Listener, Part::Tunnel, Part::Queue, Part::Mcp];

    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Part::Listener => "listener",
            Part::Tunnel => "tunnel",
            Part::Queue => "work queue",
            Part::Mcp => "mcp listener",
        }
    }
}

#[derive(Clone, Copy, Default)]
struct State {
    wanted: [bool; 4],
    up: [bool; 4],
    draining: bool,
}

/// The worker's readiness; shared by the ways in (which report their parts),
/// the notifier and the health endpoints.
pub struct Health {
    state: Mutex<State>,
    changed: watch::Sender<()>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: Mutex::new(State::default()),
            changed: watch::channel(()).0,
        }
    }
}

impl Health {
    /// Marks `part` as configured: the worker is not ready until it is up.
    pub fn expect(&self, part: Part) {
        self.update(|s| s.wanted[part.index()] = true);
    }

    /// Marks every way in `config` configures as expected, as [`super::serve`]
    /// does when it starts them: a probe answered before then (the metrics
    /// listener starts first) is not told `ready`.
    pub fn expect_configured(&self, config: &super::Config) {
        if config.listen.is_some() {
            self.expect(Part::Listener);
        }
        if config.tunnel.is_some() {
            self.expect(Part::Tunnel);
        }
        if config.anthropic.is_some() {
            self.expect(Part::Queue);
        }
        if config.mcp.is_some() {
            self.expect(Part::Mcp);
        }
    }

    /// Reports whether `part` is up now.
    pub fn set(&self, part: Part, up: bool) {
        self.update(|s| s.up[part.index()] = up);
    }

    /// The worker stops taking work: never ready again.
    pub fn drain(&self) {
        self.update(|s| s.draining = true);
    }

    /// Every configured part is up and the worker is not draining.
    pub fn ready(&self) -> bool {
        let s = self.snapshot();
        !s.draining
            && Part::ALL
                .iter()
                .all(|p| !s.wanted[p.index()] || s.up[p.index()])
    }

    pub fn draining(&self) -> bool {
        self.snapshot().draining
    }

    /// One line for a status or a probe's answer: `ready`, `draining`, or
    /// what is not up yet (`waiting for: tunnel, work queue`).
    pub fn describe(&self) -> String {
        let s = self.snapshot();
        if s.draining {
            return "draining".into();
        }
        let down: Vec<&str> = Part::ALL
            .iter()
            .filter(|p| s.wanted[p.index()] && !s.up[p.index()])
            .map(|p| p.name())
            .collect();
        if down.is_empty() {
            "ready".into()
        } else {
            format!("waiting for: {}", down.join(", "))
        }
    }

    /// Wakes on every change of state.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    fn snapshot(&self) -> State {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        let changed = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let before = (s.wanted, s.up, s.draining);
            f(&mut s);
            before != (s.wanted, s.up, s.draining)
        };
        if changed {
            self.changed.send_replace(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_every_configured_part_is_up_and_never_while_draining() {
        let h = Health::default();
        // Nothing configured: ready at once.
        assert!(h.ready());
        h.expect(Part::Tunnel);
        h.expect(Part::Queue);
        assert!(!h.ready());
        assert_eq!(h.describe(), "waiting for: tunnel, work queue");
        h.set(Part::Tunnel, true);
        // A part that is not configured does not count.
        h.set(Part::Listener, false);
        assert!(!h.ready());
        h.set(Part::Queue, true);
        assert!(h.ready());
        assert_eq!(h.describe(), "ready");
        // Lost again: not ready until it is back.
        h.set(Part::Tunnel, false);
        assert!(!h.ready());
        h.set(Part::Tunnel, true);
        assert!(h.ready());
        h.drain();
        assert!(!h.ready() && h.draining());
        assert_eq!(h.describe(), "draining");
    }

    #[test]
    fn subscribers_wake_on_changes_only() {
        let h = Health::default();
        let mut rx = h.subscribe();
        rx.mark_unchanged();
        h.set(Part::Queue, false);
        assert!(!rx.has_changed().unwrap(), "no change, no wake-up");
        h.expect(Part::Queue);
        assert!(rx.has_changed().unwrap());
    }
}
