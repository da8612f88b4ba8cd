//! Small helpers the daemons share: an error with its causes on one line (for
//! logs), a constant-time comparison of secrets, waiting for a shutdown flag,
//! and the allocator setting that lets freed tool results leave the RSS.

/// An error and its sources, `: `-separated. hyper and rustls put the useful
/// part ("certificate expired", "keep-alive timed out") in a source.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

/// Equality whose time does not depend on where two equal-length values
/// differ (bearer tokens, keys).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Resolves once `rx` reads true (or its sender is gone).
pub async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Allocations from this size up get an mmap of their own, returned to the
/// kernel when freed.
pub const MMAP_THRESHOLD: usize = 1 << 20;

/// Makes large buffers (tool results, frames, request bodies: up to 64 MiB
/// each) go back to the kernel when freed, so that a daemon's RSS follows what
/// it holds (measured: 60 reads of a 20 MiB PDF left 1.4 GiB resident after
/// their session closed under glibc's default). Called once at daemon start;
/// a failure is logged, not fatal.
pub fn return_large_buffers_to_the_kernel() {
    if let Err(e) = crate::sandbox::sys::set_malloc_mmap_threshold(MMAP_THRESHOLD) {
        tracing::warn!(error = %e, "setting the allocator's mmap threshold");
    }
}

/// This host's name (the worker id of commands that have no configuration).
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_and_comparisons() {
        let io = std::io::Error::other("inner cause");
        let outer = crate::net::tls::TlsError::Certificate("outer".into());
        assert_eq!(error_chain(&outer), "certificate: outer");
        assert_eq!(error_chain(&io), "inner cause");
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
