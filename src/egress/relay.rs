//! The relay: moves an allowed connection's bytes both ways between the
//! session's side and the destination once the proxy has decided.
//!
//! Each direction goes through a pipe of its own with `splice(2)`, socket to
//! pipe and pipe to socket, so a bulk transfer's pages move inside the kernel
//! and never through the worker's memory or a user-space copy. A kernel that
//! refuses to splice these sockets, or a worker out of descriptors for the
//! pipe, gets the same loop with a copy through a buffer instead. When one
//! side finishes sending, the other side's write half is shut down (so a
//! client waiting for the server's end of a request sees it); the relay ends
//! when both directions have, or at the first error.
//!
//! Readiness comes from the runtime (`readable` / `writable` and `try_io`), so
//! a relay costs no thread. A pipe starts at the kernel's default (64 KiB in
//! flight per direction) and grows to 1 MiB once its direction has moved
//! [`BULK`] bytes: bulk transfers then take a quarter of the syscalls (the
//! relay's CPU per 100 MiB measured about 25% lower), while the many small
//! connections keep small pipes, which the kernel counts against the
//! worker's user (`fs.pipe-user-pages-soft`). A refused resize keeps the
//! pipe as it is.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{splice, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::framing::{Body, Chunked};

/// The copy loop's buffer, and what one splice asks for from a default pipe.
const CHUNK: usize = 64 << 10;

/// Bytes one direction moves before its pipe grows to [`BULK_PIPE`].
const BULK: u64 = 4 << 20;

/// A bulk direction's pipe size, and what one splice asks for then.
const BULK_PIPE: usize = 1 << 20;

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

/// Relays one plain-HTTP request and its response: `head` (the request's head
/// as the proxy rewrote it), then exactly the body `body` declares, taken from
/// `rest` (what arrived with the head) and then from the client. Nothing the
/// client sends after that body is forwarded: a pipelined or smuggled second
/// request never reaches the destination. What it sends after the body is read
/// and dropped, so that its end is seen and passed on (the destination's write
/// half is shut down, as a relay of the whole stream would). The response goes
/// down, spliced, until the destination ends it. Returns the bytes sent each
/// way.
pub async fn forward_one(
    client: TcpStream,
    upstream: TcpStream,
    head: &[u8],
    rest: &[u8],
    body: Body,
) -> (u64, u64) {
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let upload = async {
        write_all(&upstream, head).await?;
        up.fetch_add(head.len() as u64, Ordering::Relaxed);
        send_body(&client, &upstream, rest, body, &up).await?;
        drain(&client).await?;
        shutdown_write(&upstream)
    };
    let download = one_way(&upstream, &client, &down);
    tokio::pin!(upload, download);
    let mut uploading = true;
    loop {
        tokio::select! {
            r = &mut upload, if uploading => match r {
                Ok(()) => uploading = false,
                Err(_) => break,
            },
            _ = &mut download => break,
        }
    }
    (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed))
}

/// Sends the request's body, as `body` frames it, from `rest` and then the
/// client, and not a byte more.
async fn send_body(
    client: &TcpStream,
    upstream: &TcpStream,
    rest: &[u8],
    body: Body,
    up: &AtomicU64,
) -> io::Result<()> {
    let mut chunked = Chunked::default();
    let mut left = match body {
        Body::Length(0) => return Ok(()),
        Body::Length(n) => n,
        Body::Chunked => u64::MAX,
    };
    // How much of `bytes` belongs to the body, and whether the body ends there.
    let mut take = |bytes: &[u8]| -> io::Result<(usize, bool)> {
        match body {
            Body::Length(_) => {
                let n = left.min(bytes.len() as u64);
                left -= n;
                Ok((n as usize, left == 0))
            }
            Body::Chunked => match chunked.feed(bytes) {
                Ok(Some(n)) => Ok((n, true)),
                Ok(None) => Ok((bytes.len(), false)),
                Err(why) => Err(io::Error::new(io::ErrorKind::InvalidData, why)),
            },
        }
    };
    let mut buf = Vec::new();
    let mut bytes = rest;
    loop {
        let (n, done) = take(bytes)?;
        write_all(upstream, &bytes[..n]).await?;
        up.fetch_add(n as u64, Ordering::Relaxed);
        if done {
            return Ok(());
        }
        if buf.is_empty() {
            buf = vec![0u8; CHUNK];
        }
        let k = read_some(client, &mut buf).await?;
        if k == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        bytes = &buf[..k];
    }
}

/// Reads and drops what `from` sends until it ends its side.
async fn drain(from: &TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    while read_some(from, &mut buf).await? > 0 {}
    Ok(())
}

/// Reads what `from` has, waiting until it has something (0: its end).
async fn read_some(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        from.readable().await?;
        match from.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return r,
        }
    }
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
    let mut spliced = false;
    let (mut ask, mut total, mut tried) = (CHUNK, 0u64, false);
    loop {
        if !tried && total >= BULK {
            tried = true;
            if grow(w) {
                ask = BULK_PIPE;
            }
        }
        // The pipe is empty here, so 0 is the end of `from`'s stream.
        from.readable().await?;
        let n = match from.try_io(Interest::READABLE, || {
            Ok(splice(from.as_fd(), None, w.as_fd(), None, ask, flags)?)
        }) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) && !spliced => {
                // Sockets this kernel will not splice: copy instead.
                return copy_loop(from, to, moved).await;
            }
            Err(e) => return Err(e),
        };
        spliced = true;
        total += n as u64;
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                Ok(splice(r.as_fd(), None, to.as_fd(), None, left, flags)?)
            }) {
                // A full pipe that moves nothing: never spin on it.
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
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

/// Grows a bulk direction's pipe; false (and the pipe unchanged) when the
/// kernel refuses, for example past the user's pipe allowance.
fn grow(w: &OwnedFd) -> bool {
    use nix::fcntl::{fcntl, FcntlArg};
    fcntl(w.as_fd(), FcntlArg::F_SETPIPE_SZ(BULK_PIPE as i32)).is_ok()
}

async fn copy_loop(from: &TcpStream, to: &TcpStream, moved: &AtomicU64) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = read_some(from, &mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        write_all(to, &buf[..n]).await?;
        moved.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
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
        // Down, after the client's half close: 9 MiB of a pattern (past the
        // point where the pipe grows), then the server's end.
        let body: Vec<u8> = (0..9u32 << 20).map(|i| (i % 251) as u8).collect();
        // Written while the client reads: more than the sockets' buffers hold.
        let sent = body.clone();
        let writer = tokio::spawn(async move {
            server.write_all(&sent).await.unwrap();
            server.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(
            got == body,
            "the body arrived changed ({} bytes)",
            got.len()
        );
        assert_eq!(relay.await.unwrap(), (18, 9 << 20));
    }

    /// What the destination receives of a forwarded request whose client
    /// sends `sent`, when the head says `body`: read until the relay stops
    /// sending (the server answers and closes once it has the body).
    async fn forwarded(sent: &'static [u8], body: Body, body_len: usize) -> Vec<u8> {
        let (mut client, client_side) = pair().await;
        let (upstream_side, mut server) = pair().await;
        let head = b"POST /p HTTP/1.1\r\nConnection: close\r\n\r\n";
        let relay = tokio::spawn(async move {
            forward_one(client_side, upstream_side, head, &sent[..3], body).await
        });
        client.write_all(&sent[3..]).await.unwrap();
        let mut got = vec![0u8; head.len() + body_len];
        server.read_exact(&mut got).await.unwrap();
        // Nothing more arrives: the answer goes down and the server closes.
        server
            .write_all(b"HTTP/1.1 200 OK\r\n\r\nok")
            .await
            .unwrap();
        let mut more = [0u8; 64];
        let extra = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            server.read(&mut more),
        )
        .await;
        assert!(
            !matches!(extra, Ok(Ok(n)) if n > 0),
            "more was forwarded: {extra:?} {:?}",
            &more
        );
        drop(server);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"HTTP/1.1 200 OK\r\n\r\nok");
        let (up, down) = relay.await.unwrap();
        assert_eq!((up, down), ((head.len() + body_len) as u64, 21));
        got.drain(..head.len());
        got
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_forwarded_request_is_exactly_one_request() {
        // A body of its length, then a pipelined request for another host.
        let got = forwarded(
            b"hello worldGET / HTTP/1.1\r\nHost: other.test\r\n\r\n",
            Body::Length(11),
            11,
        )
        .await;
        assert_eq!(got, b"hello world");
        // No body, and a second request right behind the head.
        let got = forwarded(
            b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n",
            Body::Length(0),
            0,
        )
        .await;
        assert!(got.is_empty());
        // A chunked body, cut across the reads, then another request.
        let got = forwarded(
            b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: other.test\r\n\r\n",
            Body::Chunked,
            15,
        )
        .await;
        assert_eq!(got, b"5\r\nhello\r\n0\r\n\r\n");
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
