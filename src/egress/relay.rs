//! The relay: moves an allowed connection's bytes both ways between the
//! session's side and the destination once the proxy has decided.
//!
//! Each direction goes through a pipe of its own with `splice(2)`, socket to
//! pipe and pipe to socket, so a bulk transfer's pages move inside the kernel
//! and never through the worker's memory or a user-space copy. A kernel that
//! refuses to splice these sockets, or a worker out of descriptors for the
//! pipe, gets the same loop with a copy through a buffer instead. When one side finishes sending, the other side's write half
//! is shut down (so a client waiting for the server's end of a request sees
//! it); the relay ends when both directions have, or at the first error.
//!
//! Readiness comes from the runtime (`readable` / `writable` and `try_io`), so
//! a relay costs no thread, and at most one pipe's worth (64 KiB) is in
//! flight per direction.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{splice, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The most one splice moves; the pipe holds this much (the kernel's default
/// pipe size: larger pipes measured no faster).
const CHUNK: usize = 64 << 10;

/// Relays both ways until both sides are done or one fails; returns the bytes
/// sent up (client → destination) and down. `first` is what the client
/// already sent, written before anything else.
pub async fn relay(client: TcpStream, upstream: TcpStream, first: &[u8]) -> (u64, u64) {
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    if !first.is_empty() {
        if write_all(&upstream, first).await.is_err() {
            return (0, 0);
        }
        up.store(first.len() as u64, Ordering::Relaxed);
    }
    let _ = tokio::try_join!(
        one_way(&client, &upstream, &up),
        one_way(&upstream, &client, &down),
    );
    (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed))
}

/// Moves what `from` sends to `to` until `from` ends its side, then ends
/// `to`'s; `moved` counts the bytes delivered.
async fn one_way(from: &TcpStream, to: &TcpStream, moved: &AtomicU64) -> io::Result<()> {
    match pipe() {
        Ok((r, w)) => splice_loop(from, to, &r, &w, moved).await?,
        Err(_) => copy_loop(from, to, moved).await?,
    }
    shutdown_write(to)
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?)
}

async fn splice_loop(
    from: &TcpStream,
    to: &TcpStream,
    r: &OwnedFd,
    w: &OwnedFd,
    moved: &AtomicU64,
) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        // The pipe is empty here, so 0 is the end of `from`'s stream.
        from.readable().await?;
        let n = match from.try_io(Interest::READABLE, || {
            Ok(splice(from.as_fd(), None, w.as_fd(), None, CHUNK, flags)?)
        }) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) && moved_none(moved) => {
                // Sockets this kernel will not splice: copy instead.
                return copy_loop(from, to, moved).await;
            }
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                Ok(splice(r.as_fd(), None, to.as_fd(), None, left, flags)?)
            }) {
                Ok(k) => {
                    left -= k;
                    moved.fetch_add(k as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn moved_none(moved: &AtomicU64) -> bool {
    moved.load(Ordering::Relaxed) == 0
}

async fn copy_loop(from: &TcpStream, to: &TcpStream, moved: &AtomicU64) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        from.readable().await?;
        let n = match from.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        write_all(to, &buf[..n]).await?;
        moved.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(k) => data = &data[k..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn shutdown_write(s: &TcpStream) -> io::Result<()> {
    match socket_shutdown(s) {
        // The peer went away first: nothing left to end.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        r => r,
    }
}

fn socket_shutdown(s: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    Ok(nix::sys::socket::shutdown(
        s.as_raw_fd(),
        nix::sys::socket::Shutdown::Write,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair on loopback: (the side the test holds, the side the
    /// relay gets).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relays_both_ways_with_half_close_and_counts() {
        let (mut client, client_side) = pair().await;
        let (upstream_side, mut server) = pair().await;
        let relay = tokio::spawn(relay(client_side, upstream_side, b"GET / HTTP/1.0\r\n"));
        // Up: the first bytes, then more, then the client's end.
        client.write_all(b"\r\n").await.unwrap();
        client.shutdown().await.unwrap();
        let mut request = Vec::new();
        server.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"GET / HTTP/1.0\r\n\r\n");
        // Down, after the client's half close: 5 MiB of a pattern, then the
        // server's end.
        let body: Vec<u8> = (0..5u32 << 20).map(|i| (i % 251) as u8).collect();
        server.write_all(&body).await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(
            got == body,
            "the body arrived changed ({} bytes)",
            got.len()
        );
        assert_eq!(relay.await.unwrap(), (18, 5 << 20));
    }

    #[tokio::test]
    async fn a_reset_destination_ends_the_relay() {
        let (mut client, client_side) = pair().await;
        let (upstream_side, server) = pair().await;
        let relay = tokio::spawn(relay(client_side, upstream_side, b""));
        // The destination resets (SO_LINGER 0, then close).
        crate::egress::proxy::reset(server);
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;
        let (up, down) = relay.await.unwrap();
        assert_eq!((up, down, rest.len()), (0, 0, 0));
    }
}
