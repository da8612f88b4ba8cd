//! The service manager's notification protocol (`sd_notify(3)`): one datagram
//! of `KEY=value` lines to the socket named by `$NOTIFY_SOCKET`. The worker
//! says `READY=1` once [`super::health`] says it is ready, keeps `STATUS=`
//! current (sessions open, calls running, what it waits for), pings the
//! watchdog while its runtime runs, and says `STOPPING=1` when it drains and
//! `RELOADING=1` around a reload.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd with `Type=notify`, or in a
//! Kubernetes pod) every call is a no-op. The variables are read once and
//! removed from the environment, so nothing the worker starts inherits them.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where notifications go, when anywhere.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` and `$WATCHDOG_USEC`/`$WATCHDOG_PID`, and removes
    /// them from the environment. Call before any thread is started.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(var);
        }
        // The watchdog is this process's when no other pid is named.
        let ours = pid.is_none_or(|p| p.trim() == std::process::id().to_string());
        let watchdog = usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && ours)
            .map(Duration::from_micros);
        let target = socket.and_then(|s| match connect(&s) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(socket = ?s, error = %e, "NOTIFY_SOCKET is set but unusable; not notifying");
                None
            }
        });
        Notifier {
            watchdog: watchdog.filter(|_| target.is_some()),
            target,
        }
    }

    /// A notifier that sends nothing.
    pub fn none() -> Notifier {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often the manager expects `WATCHDOG=1`, if it does.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state` (newline-separated `KEY=value` assignments). Failures are
    /// logged at debug level: the manager's socket going away must never stop
    /// the worker.
    pub fn send(&self, state: &str) {
        if let Some((sock, addr)) = &self.target {
            if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
                tracing::debug!(error = %e, "sd_notify");
            }
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }

    /// `RELOADING=1` with the monotonic time systemd 253+ asks for (older
    /// versions ignore both fields); [`Notifier::ready`] ends the reload.
    pub fn reloading(&self) {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
            .unwrap_or(0);
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={now}"));
    }

    pub fn watchdog_ping(&self) {
        self.send("WATCHDOG=1");
    }
}

/// A status is one line: a newline would start another assignment.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The socket: a path, or an abstract name when it starts with `@`.
fn connect(name: &std::ffi::OsStr) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    let bytes = name.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name)?,
        None if bytes.starts_with(b"/") => SocketAddr::from_pathname(name)?,
        None => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither an absolute path nor an abstract name (@…)",
            ))
        }
    };
    let sock = UnixDatagram::unbound()?;
    Ok((sock, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_each_state_as_one_datagram_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(connect(path.as_os_str()).unwrap()),
            watchdog: None,
        };
        n.ready("3 sessions\nopen");
        n.watchdog_ping();
        n.stopping("draining");
        let mut buf = [0u8; 256];
        let mut got = Vec::new();
        for _ in 0..3 {
            let k = listener.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..k]).into_owned());
        }
        assert_eq!(
            got,
            [
                "READY=1\nSTATUS=3 sessions open",
                "WATCHDOG=1",
                "STOPPING=1\nSTATUS=draining"
            ]
        );
    }

    #[test]
    fn reaches_an_abstract_socket_and_refuses_a_relative_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("hands-notify-test-{}", std::process::id());
        let listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let n = Notifier {
            target: Some(connect(std::ffi::OsStr::new(&format!("@{name}"))).unwrap()),
            watchdog: None,
        };
        n.status("ok");
        let mut buf = [0u8; 64];
        let k = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"STATUS=ok");
        assert!(connect(std::ffi::OsStr::new("relative/notify")).is_err());
    }

    #[test]
    fn without_a_socket_nothing_is_sent_and_nothing_fails() {
        let n = Notifier::none();
        assert!(!n.enabled() && n.watchdog().is_none());
        n.ready("x");
        n.watchdog_ping();
    }
}
