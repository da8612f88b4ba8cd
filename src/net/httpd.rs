//! The small HTTP/1.1 server of the daemons' own endpoints: the gateway's API
//! and the worker's metrics and health listener. What anyone who reaches
//! such a port can hold is bounded:
//!
//! - **A budget.** At most [`Limits::max_connections`] connections are served
//!   at once; one more is answered with the listener's [`Refusal`] (a 503)
//!   and closed, and past 32 of those at once closed unanswered.
//! - **Accept errors** ([`Acceptor`]) are logged and followed by a growing
//!   pause: at EMFILE the listener stays readable, and a loop that retried at
//!   once would spin a core; a loop that gave up would stop the listener.
//! - **Three timers**, as Go's `net/http` has them: a request's head must
//!   arrive within `header_read_timeout` (from the connection's start for its
//!   first request, from its first byte for later ones); a kept-alive
//!   connection may wait `idle_timeout` for its next request; and a client
//!   that leaves a response unread for `idle_timeout` (the connection's writes
//!   blocked all along) is dropped. A request being handled has no time limit
//!   of its own — a gateway's tool call may run for minutes.
//!
//! What happens is reported to the listener's [`Observer`] (the gateway
//! counts it in its metrics).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;

/// Connections over the budget being answered at once; past that, they are
/// closed unanswered.
const REFUSING: usize = 32;

/// How long a refused connection's answer may take to send, and how long the
/// server then waits for the client to close.
const REFUSAL_LINGER: Duration = Duration::from_millis(250);

/// How long in-flight requests may take to finish at shutdown, usually.
pub const DRAIN: Duration = Duration::from_secs(10);

/// What a listener's owner learns of its connections. Every method defaults
/// to doing nothing.
pub trait Observer: Send + Sync + 'static {
    /// An accept on `listener` failed (the listener pauses).
    fn accept_failed(&self, _listener: &'static str) {}
    /// A connection within the budget is being served…
    fn connection_opened(&self) {}
    /// …and has ended.
    fn connection_closed(&self) {}
    /// A connection over the budget was refused.
    fn connection_refused(&self) {}
    /// A connection was closed by a timer (`header_read`, `idle`,
    /// `stalled_reader`).
    fn connection_timed_out(&self, _reason: &'static str) {}
}

/// An observer that is told nothing.
pub struct Unobserved;

impl Observer for Unobserved {}

/// A listener's accept loop state: the pause after failed accepts.
pub struct Acceptor<O: Observer> {
    listener: TcpListener,
    what: &'static str,
    observer: Arc<O>,
    pause: Duration,
    failures: u64,
    last_log: Option<Instant>,
}

const FIRST_PAUSE: Duration = Duration::from_millis(5);
const MAX_PAUSE: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(5);

impl<O: Observer> Acceptor<O> {
    /// Accepts on `listener`, named `what` in logs and to `observer`.
    pub fn new(listener: TcpListener, what: &'static str, observer: Arc<O>) -> Acceptor<O> {
        Acceptor {
            listener,
            what,
            observer,
            pause: FIRST_PAUSE,
            failures: 0,
            last_log: None,
        }
    }

    /// The next connection, or `None` once `stop` reads true. Failed accepts
    /// are counted, logged at most every 5 s, and paused after (5 ms doubling
    /// to 1 s while they go on); the loop never ends on one.
    pub async fn accept(
        &mut self,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let r = tokio::select! {
                r = self.listener.accept() => r,
                () = crate::util::stopped(stop) => return None,
            };
            match r {
                Ok(c) => {
                    self.pause = FIRST_PAUSE;
                    return Some(c);
                }
                Err(e) => self.failed(e, stop).await?,
            }
        }
    }

    async fn failed(&mut self, e: io::Error, stop: &mut watch::Receiver<bool>) -> Option<()> {
        self.failures += 1;
        self.observer.accept_failed(self.what);
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            tracing::warn!(
                listener = self.what,
                error = %e,
                failures = self.failures,
                pause_ms = self.pause.as_millis() as u64,
                "accepting a connection failed; pausing the listener"
            );
            self.last_log = Some(now);
        }
        tokio::select! {
            () = tokio::time::sleep(self.pause) => {}
            () = crate::util::stopped(stop) => return None,
        }
        self.pause = (self.pause * 2).min(MAX_PAUSE);
        Some(())
    }
}

/// A listener's budget and timers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// At shutdown, how long requests in flight may take to finish.
    pub drain: Duration,
}

/// The answer of a connection over the budget: `503 Service Unavailable`
/// with `Retry-After: 1` and this body.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub content_type: &'static str,
    pub body: String,
}

/// Serves `router` on `listener` (named `what`) until `stop`, then lets
/// requests in flight finish for up to 10 s.
pub async fn serve<O: Observer>(
    listener: TcpListener,
    what: &'static str,
    router: axum::Router,
    limits: Limits,
    refusal: Refusal,
    observer: Arc<O>,
    stop: watch::Receiver<bool>,
) {
    serve_with(
        listener, what, router, limits, refusal, None, observer, stop,
    )
    .await
}

/// Serves as [`serve`] does, over TLS when `tls` is given: the handshake must
/// end within the header timeout (it counts as the first request's head), and
/// a connection over the budget is closed unanswered (a plain-text 503 means
/// nothing to a TLS client).
#[allow(clippy::too_many_arguments)]
pub async fn serve_with<O: Observer>(
    listener: TcpListener,
    what: &'static str,
    router: axum::Router,
    limits: Limits,
    refusal: Refusal,
    tls: Option<tokio_rustls::TlsAcceptor>,
    observer: Arc<O>,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let refusal = Arc::new(refusal);
    let mut conns = tokio::task::JoinSet::new();
    let mut acceptor = Acceptor::new(listener, what, observer.clone());
    while let Some((tcp, _peer)) = acceptor.accept(&mut stop).await {
        let _ = tcp.set_nodelay(true);
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let (router, observer, stop) = (router.clone(), observer.clone(), stop.clone());
                let tls = tls.clone();
                conns.spawn(async move {
                    observer.connection_opened();
                    match tls {
                        None => serve_connection(tcp, router, limits, &*observer, stop).await,
                        Some(tls) => {
                            let shake =
                                tokio::time::timeout(limits.header_read_timeout, tls.accept(tcp));
                            match shake.await {
                                Ok(Ok(stream)) => {
                                    serve_connection(stream, router, limits, &*observer, stop)
                                        .await
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(listener = what, error = %e, "TLS handshake failed")
                                }
                                Err(_) => observer.connection_timed_out("tls_handshake"),
                            }
                        }
                    }
                    observer.connection_closed();
                    drop(permit);
                });
            }
            Err(_) => {
                observer.connection_refused();
                if tls.is_none() {
                    refuse(tcp, &refusing, &refusal);
                }
            }
        }
        while conns.try_join_next().is_some() {}
    }
    // Every connection saw `stop` too: idle ones are closed, requests in
    // flight finish (their connections then close) or are cut after the drain.
    let drained = tokio::time::timeout(limits.drain, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            listener = what,
            left = conns.len(),
            "requests still in flight at shutdown were cut"
        );
        conns.shutdown().await;
    }
}

/// Answers a connection over the budget with a 503 it can read, then closes
/// it; past [`REFUSING`] of them at once, closes it unanswered.
fn refuse(mut tcp: TcpStream, refusing: &Arc<Semaphore>, refusal: &Arc<Refusal>) {
    let Ok(permit) = refusing.clone().try_acquire_owned() else {
        return;
    };
    let refusal = refusal.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {}\r\n\
             retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{}",
            refusal.content_type,
            refusal.body.len(),
            refusal.body
        );
        // The answer fits the socket's buffer: a client that does not read
        // cannot hold this slot.
        let sent = tokio::time::timeout(REFUSAL_LINGER, async {
            tcp.write_all(answer.as_bytes()).await?;
            tcp.shutdown().await
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
        // Read what the client sent until it closes, for a moment: closing
        // with unread data sends a reset, which can destroy the answer before
        // the client reads it.
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            let mut sink = [0u8; 1024];
            while tcp.read(&mut sink).await? > 0 {}
            Ok::<_, io::Error>(())
        })
        .await;
    });
}

/// Why the watchdog closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// A request's head did not arrive in time.
    Header,
    /// No request came on a kept-alive connection.
    Idle,
    /// The client left a response unread.
    StalledReader,
}

impl Expired {
    fn label(self) -> &'static str {
        match self {
            Expired::Header => "header_read",
            Expired::Idle => "idle",
            Expired::StalledReader => "stalled_reader",
        }
    }
}

/// What one connection is doing, as its timers need it. Updated by the
/// connection's I/O ([`Watched`]) and its requests ([`InFlight`]), read by
/// its watchdog ([`Activity::expired`]); the mutex is only ever held for a
/// few assignments.
struct Activity {
    state: Mutex<ActivityState>,
    /// Wakes the watchdog when a deadline may have moved earlier.
    changed: Notify,
}

struct ActivityState {
    accepted: Instant,
    requests: u64,
    in_flight: usize,
    /// When the connection last became idle (no request in flight).
    idle_since: Instant,
    /// The first byte read since then: a request's head is arriving.
    head_started: Option<Instant>,
    /// Since when writes have been blocked (the client does not read); reset
    /// by any write that goes through.
    write_blocked: Option<Instant>,
}

impl Activity {
    fn new() -> Activity {
        let now = Instant::now();
        Activity {
            state: Mutex::new(ActivityState {
                accepted: now,
                requests: 0,
                in_flight: 0,
                idle_since: now,
                head_started: None,
                write_blocked: None,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        let mut s = self.lock();
        s.requests += 1;
        s.in_flight += 1;
        s.head_started = None;
        drop(s);
        self.changed.notify_one();
        InFlight(self.clone())
    }

    /// The next deadline and what it is for.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, Expired)> {
        let s = self.lock();
        let mut next: Option<(Instant, Expired)> = None;
        let mut consider = |at: Instant, why| {
            if next.is_none_or(|(t, _)| at < t) {
                next = Some((at, why));
            }
        };
        if let Some(t) = s.write_blocked {
            consider(t + limits.idle_timeout, Expired::StalledReader);
        }
        // With no request in flight, a response may still be being flushed
        // (hyper takes a whole body before writing it): blocked writes are
        // then a stalled reader, not an idle connection.
        if s.in_flight == 0 && s.write_blocked.is_none() {
            if s.requests == 0 {
                consider(s.accepted + limits.header_read_timeout, Expired::Header);
            } else if let Some(t) = s.head_started {
                consider(t + limits.header_read_timeout, Expired::Header);
            } else {
                consider(s.idle_since + limits.idle_timeout, Expired::Idle);
            }
        }
        next
    }

    /// Resolves when a deadline passes.
    async fn expired(&self, limits: &Limits) -> Expired {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.deadline(limits) {
                Some((at, why)) if Instant::now() >= at => return why,
                Some((at, _)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

/// A request being handled, until its response body is done or dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.in_flight -= 1;
        if s.in_flight == 0 {
            s.idle_since = Instant::now();
            s.head_started = None;
        }
        drop(s);
        self.0.changed.notify_one();
    }
}

/// A response body that keeps its request in flight while it is sent (an
/// SSE stream can last as long as its call).
struct TrackedBody {
    inner: axum::body::Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's socket, reporting reads and blocked writes to its
/// [`Activity`].
struct Watched<S> {
    tcp: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Pending => {
                let mut s = self.activity.lock();
                if s.write_blocked.is_none() {
                    s.write_blocked = Some(Instant::now());
                    drop(s);
                    self.activity.changed.notify_one();
                }
            }
            Poll::Ready(Ok(n)) if *n > 0 => {
                let mut s = self.activity.lock();
                if s.write_blocked.take().is_some() && s.in_flight == 0 {
                    // The end of a response, flushed after a block: the
                    // connection is idle from now.
                    s.idle_since = Instant::now();
                }
            }
            Poll::Ready(_) => {}
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let mut s = this.activity.lock();
            if s.in_flight == 0 && s.head_started.is_none() {
                s.head_started = Some(Instant::now());
                drop(s);
                this.activity.changed.notify_one();
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_write(cx, buf);
        this.wrote(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Serves one connection until it ends, its watchdog expires, or `stop`
/// (then requests in flight finish and the connection closes).
async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    tcp: S,
    router: axum::Router,
    limits: Limits,
    observer: &dyn Observer,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        tcp,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let in_flight = activity.request_started();
            let router = router.clone();
            async move {
                use tower::ServiceExt;
                let resp = router
                    .oneshot(req.map(axum::body::Body::new))
                    .await
                    .unwrap_or_else(|e: Infallible| match e {});
                Ok::<_, Infallible>(resp.map(|inner| TrackedBody {
                    inner,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // hyper's own header timer starts whenever it waits for a head,
        // kept-alive connections included: a backstop past the watchdog's
        // deadlines, which it never reaches first.
        .header_read_timeout(limits.header_read_timeout + limits.idle_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            why = activity.expired(&limits) => {
                observer.connection_timed_out(why.label());
                tracing::debug!(reason = why.label(), "closing a connection");
                return;
            }
            () = crate::util::stopped(&mut stop), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 1,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            drain: DRAIN,
        }
    }

    #[tokio::test]
    async fn deadlines_follow_the_connection_s_state() {
        let l = limits();
        let a = Arc::new(Activity::new());
        let t0 = a.lock().accepted;
        // A new connection: its first head within the header timeout.
        assert_eq!(
            a.deadline(&l),
            Some((t0 + l.header_read_timeout, Expired::Header))
        );
        let req = a.request_started();
        assert_eq!(
            a.deadline(&l),
            None,
            "a request in flight has no time limit"
        );
        drop(req);
        let t1 = a.lock().idle_since;
        assert!(t1 >= t0);
        assert_eq!(a.deadline(&l), Some((t1 + l.idle_timeout, Expired::Idle)));
        // The next head's first byte starts the header timer.
        let t2 = t1 + Duration::from_secs(5);
        a.lock().head_started = Some(t2);
        assert_eq!(
            a.deadline(&l),
            Some((t2 + l.header_read_timeout, Expired::Header))
        );
        // A response the client does not read, even mid-request.
        let req = a.request_started();
        let t3 = Instant::now();
        a.lock().write_blocked = Some(t3);
        assert_eq!(
            a.deadline(&l),
            Some((t3 + l.idle_timeout, Expired::StalledReader))
        );
        // hyper takes a whole body before flushing it: still a stalled reader.
        drop(req);
        assert_eq!(
            a.deadline(&l),
            Some((t3 + l.idle_timeout, Expired::StalledReader))
        );
        let quick = Limits {
            idle_timeout: Duration::from_millis(50),
            ..l
        };
        let took = Instant::now();
        assert_eq!(a.expired(&quick).await, Expired::StalledReader);
        assert!(took.elapsed() < Duration::from_secs(5));
    }
}
