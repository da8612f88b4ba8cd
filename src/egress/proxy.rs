//! Serving an `egress` session's listeners: the explicit HTTP proxy (CONNECT
//! and absolute-URI forwarding), SOCKS5 (CONNECT, names resolved here), and
//! the transparent listener every other TCP connection of the session is
//! redirected to (see [`crate::sandbox::netfilter`]).
//!
//! Every path comes to one decision ([`Gate`]) made on what the worker itself
//! resolved, and connects to exactly the address it checked. A name the policy
//! does not allow is never resolved, so a name cannot carry data out through
//! the worker's resolver. Each decision is one audit record, and each denial is
//! kept for the note the running `bash` call's result ends with.
//!
//! The signal of a denial, per path: the HTTP proxy answers `403 Forbidden`
//! with an `X-Hands-Egress` header and a body naming the host, the port, the
//! environment and the rule; SOCKS5 answers reply code 2 ("connection not
//! allowed by ruleset"); a transparent connection is reset at once.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use super::framing;
use super::relay::{self, relay};
use super::sniff::{self, Sniffed};
use crate::audit::Auditor;
use crate::sandbox::netfilter::Listeners;

/// A request head or a SOCKS handshake must arrive within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection to an allowed address must be made within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new connection may stay silent before it is taken for a
/// protocol where the server speaks first (SSH banners aside, SMTP, FTP).
const FIRST_BYTES_WAIT: Duration = Duration::from_millis(500);
/// The largest HTTP request head the proxy reads.
const MAX_HEAD: usize = 64 << 10;
/// Connections of one session at once; beyond it a new one is refused.
pub const MAX_CONNECTIONS: usize = 256;

/// The decision for one destination (the policy's rules and address checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The rule that decided, as written in the policy, or `no rule matches`.
    pub rule: String,
    /// Why, in a few words the agent can read.
    pub reason: String,
}

/// The policy as the proxy asks it.
pub trait Gate: Send + Sync + 'static {
    /// Before resolving `name`: `Some` refuses it (denied, or matched by no
    /// rule), so an unlisted name is never sent to a resolver.
    fn check_name(&self, name: &str, port: u16) -> Option<Verdict>;
    /// The decision for a connection to `port` of `addrs`, which are what
    /// `name` resolved to, or the one address of a connection without a name.
    fn decide(&self, name: Option<&str>, port: u16, addrs: &[IpAddr]) -> Verdict;
    /// Whether the session resolver may answer `name` at all (on some port).
    fn name_answerable(&self, name: &str) -> bool;
    /// Whether the session resolver may give out `addr` (not of a refused
    /// class, or opened by a network rule).
    fn addr_answerable(&self, addr: IpAddr) -> bool;
}

/// The environment's `[egress]` rules and the host's own addresses, as the
/// proxy asks them.
pub struct PolicyGate {
    pub policy: super::EgressPolicy,
    /// The host's interface addresses (refused unless a rule names them).
    pub host_addrs: Vec<IpAddr>,
}

impl PolicyGate {
    pub fn new(policy: super::EgressPolicy) -> PolicyGate {
        PolicyGate {
            policy,
            host_addrs: host_addresses(),
        }
    }
}

/// The addresses of the host's interfaces, as the worker sees them.
pub fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(sa) = a.address else { continue };
            let ip = if let Some(v4) = sa.as_sockaddr_in() {
                IpAddr::from(v4.ip())
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                IpAddr::from(v6.ip())
            } else {
                continue;
            };
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

fn verdict(d: &super::Decision) -> Verdict {
    let text = d.to_string();
    Verdict {
        allowed: d.is_allowed(),
        rule: d.rule().unwrap_or("no rule matches").to_string(),
        // The words after "HOST:PORT denied: ", without the rule (named apart).
        reason: {
            let why = text.split_once(" denied: ").map_or(&*text, |(_, why)| why);
            why.rsplit_once(" (rule: ")
                .map_or(why, |(w, _)| w)
                .to_string()
        },
    }
}

impl Gate for PolicyGate {
    fn check_name(&self, name: &str, port: u16) -> Option<Verdict> {
        if self.policy.name_allowed(name, Some(port)) {
            return None;
        }
        Some(verdict(&self.policy.decide(
            Some(name),
            port,
            &[],
            &self.host_addrs,
        )))
    }

    fn decide(&self, name: Option<&str>, port: u16, addrs: &[IpAddr]) -> Verdict {
        verdict(&self.policy.decide(name, port, addrs, &self.host_addrs))
    }

    fn name_answerable(&self, name: &str) -> bool {
        self.policy.name_allowed(name, None)
    }

    fn addr_answerable(&self, addr: IpAddr) -> bool {
        let in_net = |rules: &[super::Rule]| rules.iter().any(|r| r.matches_addr_any_port(addr));
        if in_net(&self.policy.deny) {
            return false;
        }
        (super::classify(addr).is_none() && !self.host_addrs.contains(&addr))
            || in_net(&self.policy.allow)
    }
}

/// What one session's egress shares between its listeners.
pub struct Context {
    /// The client's session id and the worker's sandbox id, for the audit log.
    pub session: String,
    pub sandbox: String,
    pub environment: String,
    pub gate: Arc<dyn Gate>,
    pub audit: Arc<Auditor>,
    /// The policy's resolvers; empty: the host's (getaddrinfo).
    pub resolvers: Vec<SocketAddr>,
    /// The worker's metrics, which count every decision (by environment and
    /// decision, never by host).
    pub metrics: Option<Arc<crate::worker::metrics::WorkerMetrics>>,
    /// The call running in the session, whose result gets the denial note.
    call: Mutex<Option<String>>,
    /// Denied destinations since the running call began.
    denials: Mutex<Denials>,
    /// How many egress records the session may still write at once.
    budget: Mutex<Budget>,
    /// Those of the last call that ended.
    last: Mutex<Vec<String>>,
    /// What the session resolver answered, address → name: the name of a
    /// transparent connection that carries none itself.
    names: Mutex<HashMap<IpAddr, String>>,
    connections: Arc<Semaphore>,
}

impl Context {
    pub fn new(
        session: String,
        sandbox: String,
        environment: String,
        gate: Arc<dyn Gate>,
        audit: Arc<Auditor>,
    ) -> Context {
        Context {
            session,
            sandbox,
            environment,
            gate,
            audit,
            resolvers: Vec::new(),
            metrics: None,
            call: Mutex::new(None),
            denials: Mutex::new(Denials::default()),
            budget: Mutex::new(Budget::new()),
            last: Mutex::new(Vec::new()),
            names: Mutex::new(HashMap::new()),
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }

    /// Remembers that the session resolver answered `name` with `addrs`.
    pub fn resolved(&self, name: &str, addrs: &[IpAddr]) {
        let mut names = lock(&self.names);
        // Bounded: a session that resolves without end forgets the oldest
        // half rather than growing the worker.
        if names.len() > 4096 {
            let keep: Vec<_> = names.keys().take(2048).copied().collect();
            for k in keep {
                names.remove(&k);
            }
        }
        for a in addrs {
            names.insert(*a, name.to_string());
        }
    }

    /// A call starts: denials from here on belong to it.
    pub fn begin_call(&self, call_id: &str) {
        *lock(&self.call) = Some(call_id.to_string());
        *lock(&self.denials) = Denials::default();
    }

    /// The call ended: the destinations denied while it ran, each once, in
    /// the order they were first denied, at most [`MAX_NOTED`] of them and
    /// then how many more denials there were (also kept for
    /// [`Context::last_denied`]).
    pub fn end_call(&self) -> Vec<String> {
        *lock(&self.call) = None;
        let d = std::mem::take(&mut *lock(&self.denials));
        let mut seen = d.noted;
        if d.more > 0 {
            seen.push(format!("and {} more denials", d.more));
        }
        *lock(&self.last) = seen.clone();
        seen
    }

    /// What the last call that ended had denied.
    pub fn last_denied(&self) -> Vec<String> {
        lock(&self.last).clone()
    }

    /// The note a call's result ends with when something was denied.
    pub fn note(&self, denied: &[String]) -> Option<String> {
        if denied.is_empty() {
            return None;
        }
        Some(format!(
            "[egress] denied by environment {}: {}",
            self.environment,
            denied.join(", ")
        ))
    }

    fn record(
        &self,
        via: &str,
        host: &str,
        port: u16,
        addr: Option<IpAddr>,
        v: &Verdict,
        (up, down): (u64, u64),
    ) {
        // Counted whether or not the audit budget lets the record through.
        if let Some(m) = &self.metrics {
            m.egress_decided(&self.environment, v.allowed);
        }
        let mut f = Map::new();
        f.insert("session".into(), self.session.clone().into());
        f.insert("sandbox".into(), self.sandbox.clone().into());
        f.insert(
            "call_id".into(),
            lock(&self.call).clone().map_or(Value::Null, Value::from),
        );
        f.insert("via".into(), via.into());
        f.insert("host".into(), host.into());
        f.insert("port".into(), port.into());
        f.insert(
            "address".into(),
            addr.map_or(Value::Null, |a| a.to_string().into()),
        );
        f.insert(
            "decision".into(),
            if v.allowed { "allowed" } else { "denied" }.into(),
        );
        f.insert("rule".into(), v.rule.clone().into());
        f.insert("reason".into(), v.reason.clone().into());
        f.insert("bytes_up".into(), json!(up));
        f.insert("bytes_down".into(), json!(down));
        let (write, unwritten) = lock(&self.budget).take(Instant::now(), v.allowed);
        if let Some(counts) = unwritten {
            self.write_unitemised(counts);
        }
        if write {
            self.audit.record("egress", f);
        }
    }

    /// The record of decisions the budget counted instead of writing.
    fn write_unitemised(&self, (allowed, denied): (u64, u64)) {
        let mut f = Map::new();
        f.insert("session".into(), self.session.clone().into());
        f.insert("sandbox".into(), self.sandbox.clone().into());
        f.insert("decision".into(), "not itemised".into());
        f.insert("allowed".into(), json!(allowed));
        f.insert("denied".into(), json!(denied));
        f.insert(
            "reason".into(),
            format!(
                "over the session's audit budget ({BUDGET_RATE} egress records a second, \
                 bursts of {BUDGET_BURST}): counted, not itemised"
            )
            .into(),
        );
        self.audit.record("egress", f);
    }

    /// Writes the count of what the budget has not itemised yet (the session
    /// is ending).
    pub fn flush(&self) {
        let unwritten = lock(&self.budget).drain();
        if let Some(counts) = unwritten {
            self.write_unitemised(counts);
        }
    }

    fn deny(&self, via: &str, host: &str, port: u16, addr: Option<IpAddr>, v: &Verdict) {
        self.record(via, host, port, addr, v, (0, 0));
        lock(&self.denials).add(format!("{} ({})", hostport(host, port), v.reason));
    }
}

/// The distinct destinations named in a call's denial note.
pub const MAX_NOTED: usize = 16;

/// A call's denials, bounded: a session that is denied without end costs the
/// worker [`MAX_NOTED`] strings and a counter, and its note stays short.
#[derive(Debug, Default)]
struct Denials {
    noted: Vec<String>,
    /// Denials of destinations past the first [`MAX_NOTED`].
    more: u64,
}

impl Denials {
    fn add(&mut self, d: String) {
        if self.noted.contains(&d) {
            return;
        }
        if self.noted.len() < MAX_NOTED {
            self.noted.push(d);
        } else {
            self.more += 1;
        }
    }
}

/// Egress records a session may write each second, on average…
const BUDGET_RATE: u32 = 50;
/// …and at once.
const BUDGET_BURST: u32 = 500;

/// The session's audit budget (a token bucket). Past it, decisions are
/// counted, and the count is written as one record as soon as the budget
/// allows another (or the session ends): a session that opens connections or
/// asks names without end cannot flood the audit log, whose rotation would
/// otherwise drop the older records of every session.
#[derive(Debug)]
struct Budget {
    tokens: f64,
    at: Option<Instant>,
    /// Decisions counted instead of written: allowed, denied.
    unwritten: (u64, u64),
}

impl Budget {
    fn new() -> Budget {
        Budget {
            tokens: BUDGET_BURST as f64,
            at: None,
            unwritten: (0, 0),
        }
    }

    /// Whether a decision made `now` is written, and the counts to write
    /// first (when some were counted and the budget allows again).
    fn take(&mut self, now: Instant, allowed: bool) -> (bool, Option<(u64, u64)>) {
        if let Some(at) = self.at {
            let refill = now.saturating_duration_since(at).as_secs_f64() * BUDGET_RATE as f64;
            self.tokens = (self.tokens + refill).min(BUDGET_BURST as f64);
        }
        self.at = Some(now);
        if self.tokens < 1.0 {
            if allowed {
                self.unwritten.0 += 1;
            } else {
                self.unwritten.1 += 1;
            }
            return (false, None);
        }
        self.tokens -= 1.0;
        (true, self.drain())
    }

    fn drain(&mut self) -> Option<(u64, u64)> {
        let counts = std::mem::take(&mut self.unwritten);
        (counts != (0, 0)).then_some(counts)
    }
}

/// Closes `conn` with a reset: the client learns at once that it was refused
/// (`SO_LINGER` of zero; the socket is non-blocking, so nothing waits).
pub(super) fn reset(conn: TcpStream) {
    let _ = nix::sys::socket::setsockopt(
        &conn,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
    drop(conn);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn hostport(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A session's egress: its listeners served until it is dropped, which also
/// ends every connection it carries.
pub struct SessionEgress {
    ctx: Arc<Context>,
    _stop: watch::Sender<()>,
    accepts: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for SessionEgress {
    fn drop(&mut self) {
        for t in &self.accepts {
            t.abort();
        }
        self.ctx.flush();
    }
}

#[derive(Clone, Copy)]
enum Face {
    Http,
    Socks,
    Transparent,
}

impl SessionEgress {
    /// Serves `listeners` (made in the session's namespace) on the current
    /// runtime. The DNS sockets are served by the session resolver.
    pub fn start(listeners: Listeners, ctx: Context) -> io::Result<SessionEgress> {
        let ctx = Arc::new(ctx);
        let (stop, stopped) = watch::channel(());
        let mut accepts = Vec::new();
        for (face, list) in [
            (Face::Http, listeners.http),
            (Face::Socks, listeners.socks),
            (Face::Transparent, listeners.transparent),
        ] {
            for l in list {
                let l = TcpListener::from_std(l)?;
                accepts.push(tokio::spawn(accept_forever(
                    l,
                    face,
                    ctx.clone(),
                    stopped.clone(),
                )));
            }
        }
        for sock in listeners.dns {
            let sock = tokio::net::UdpSocket::from_std(sock)?;
            let resolver = super::dns::SessionResolver::new(Answers(ctx.clone()));
            accepts.push(tokio::spawn(async move {
                let _ = resolver.serve(sock).await;
            }));
        }
        Ok(SessionEgress {
            ctx,
            _stop: stop,
            accepts,
        })
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }
}

async fn accept_forever(
    l: TcpListener,
    face: Face,
    ctx: Arc<Context>,
    stopped: watch::Receiver<()>,
) {
    loop {
        let (conn, _) = match l.accept().await {
            Ok(c) => c,
            // Out of descriptors or the like: wait a little, keep serving.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = ctx.connections.clone().try_acquire_owned() else {
            // Over the bound: refused at once.
            reset(conn);
            continue;
        };
        let ctx = ctx.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = conn.set_nodelay(true);
            tokio::select! {
                _ = serve(face, conn, &ctx) => {}
                _ = stopped.changed() => {}
            }
        });
    }
}

async fn serve(face: Face, conn: TcpStream, ctx: &Context) {
    match face {
        Face::Http => http(conn, ctx).await,
        Face::Socks => socks(conn, ctx).await,
        Face::Transparent => transparent(conn, ctx).await,
    }
}

/// What came of trying to reach a destination.
enum Reach {
    Connected(TcpStream, IpAddr, Verdict),
    Denied(Verdict),
    /// Not a policy decision: the name did not resolve or nothing answered.
    Failed(String),
}

/// Lower case, no trailing dot.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Decides on `host` (a name or an IP literal) and `port`, and connects to
/// the first address that was checked and answers.
async fn reach(
    ctx: &Context,
    via: &str,
    host: &str,
    port: u16,
    must_include: Option<IpAddr>,
) -> Reach {
    let host = normalize(host);
    let (name, addrs) = match host.parse::<IpAddr>() {
        Ok(ip) => (None, vec![ip]),
        Err(_) => {
            if let Some(v) = ctx.gate.check_name(&host, port) {
                ctx.deny(via, &host, port, must_include, &v);
                return Reach::Denied(v);
            }
            match resolve(&ctx.resolvers, &host, port).await {
                Ok(a) if !a.is_empty() => (Some(host.as_str()), a),
                Ok(_) | Err(_) => return Reach::Failed(format!("{host} does not resolve")),
            }
        }
    };
    let verdict = ctx.gate.decide(name, port, &addrs);
    if !verdict.allowed {
        ctx.deny(via, &host, port, addrs.first().copied(), &verdict);
        return Reach::Denied(verdict);
    }
    // A transparent connection goes where it was going, and only if that is
    // one of the addresses its name was checked with.
    let targets: Vec<IpAddr> = match must_include {
        Some(ip) if addrs.contains(&ip) => vec![ip],
        Some(ip) => {
            let v = Verdict {
                allowed: false,
                rule: verdict.rule,
                reason: format!("{host} does not resolve to {ip}"),
            };
            ctx.deny(via, &host, port, Some(ip), &v);
            return Reach::Denied(v);
        }
        None => addrs,
    };
    let mut last = String::new();
    for ip in targets {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((ip, port))).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Reach::Connected(s, ip, verdict);
            }
            Ok(Err(e)) => last = format!("{}: {e}", SocketAddr::from((ip, port))),
            Err(_) => last = format!("{}: timed out", SocketAddr::from((ip, port))),
        }
    }
    Reach::Failed(last)
}

/// The worker's own resolution of an allowed name: the policy's resolvers
/// asked directly (A and AAAA), or the host's resolver.
async fn resolve(resolvers: &[SocketAddr], name: &str, port: u16) -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    if resolvers.is_empty() {
        for a in tokio::net::lookup_host((name, port)).await? {
            if !out.contains(&a.ip()) {
                out.push(a.ip());
            }
        }
        return Ok(out);
    }
    let (v4, v6) = tokio::join!(
        super::dns::query_upstream(resolvers, name, super::dns::TYPE_A),
        super::dns::query_upstream(resolvers, name, super::dns::TYPE_AAAA),
    );
    match (v4, v6) {
        (Err(e), Err(_)) => return Err(e),
        (a, b) => {
            for ip in a
                .unwrap_or_default()
                .into_iter()
                .chain(b.unwrap_or_default())
            {
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
    }
    Ok(out)
}

/// The session resolver's answers: an allowed name resolved by the worker,
/// less the addresses the session may not reach; any other name NXDOMAIN,
/// never asked upstream.
struct Answers(Arc<Context>);

impl super::dns::Answerer for Answers {
    async fn answer(&self, name: &str, qtype: u16) -> super::dns::Answer {
        use super::dns::Answer;
        let ctx = &self.0;
        let refused = |reason: String| {
            let v = Verdict {
                allowed: false,
                rule: "no rule matches".into(),
                reason,
            };
            ctx.deny("dns", name, 53, None, &v);
        };
        if !ctx.gate.name_answerable(name) {
            refused(format!("no rule allows {name}"));
            return Answer::NxDomain;
        }
        if qtype != super::dns::TYPE_A && qtype != super::dns::TYPE_AAAA {
            return Answer::NoData;
        }
        let addrs = match resolve(&ctx.resolvers, name, 0).await {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Answer::NxDomain,
            Err(_) => return Answer::ServFail,
        };
        let given: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|a| ctx.gate.addr_answerable(*a))
            .collect();
        if given.is_empty() && !addrs.is_empty() {
            refused(format!(
                "{name} resolves only to addresses the session may not reach"
            ));
            return Answer::Refused;
        }
        ctx.resolved(name, &given);
        Answer::Addrs(given)
    }
}

/// Reads what the client sends first, up to a TLS ClientHello or an HTTP
/// head; empty when it stays silent for [`FIRST_BYTES_WAIT`].
async fn first_bytes<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Sniffed {
    let deadline = Instant::now() + FIRST_BYTES_WAIT;
    loop {
        let s = sniff::sniff(buf);
        if s != Sniffed::NeedMore || buf.len() >= sniff::MAX_SNIFF {
            return s;
        }
        let wait = if buf.is_empty() {
            deadline.saturating_duration_since(Instant::now())
        } else {
            HANDSHAKE_TIMEOUT
        };
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(wait, r.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return sniff::sniff(buf),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {
                return if buf.is_empty() {
                    Sniffed::Other
                } else {
                    sniff::sniff(buf)
                }
            }
        }
    }
}

/// A request's `Host` that names another host than its target: the denial,
/// recorded.
fn host_disagrees(
    ctx: &Context,
    via: &str,
    header: Option<&str>,
    host: &str,
    port: u16,
) -> Option<Verdict> {
    let h = header?;
    if normalize(sniff::strip_port(h)) == normalize(host) {
        return None;
    }
    let v = Verdict {
        allowed: false,
        rule: "Host must name the request's target".into(),
        reason: format!("Host {h} disagrees with the target"),
    };
    ctx.deny(via, host, port, None, &v);
    Some(v)
}

/// Whether a tunnel's first bytes (TLS server name, HTTP `Host`) name another
/// host than the one it was opened to; if so the denial is recorded.
fn names_another(
    ctx: &Context,
    via: &str,
    sniffed: &Sniffed,
    host: &str,
    port: u16,
    ip: IpAddr,
    allowed: &Verdict,
) -> bool {
    let named = match sniffed {
        Sniffed::Tls(Some(n)) | Sniffed::Http(Some(n)) => normalize(n),
        _ => return false,
    };
    if named == normalize(host) {
        return false;
    }
    let v = Verdict {
        allowed: false,
        rule: allowed.rule.clone(),
        reason: format!("the connection names {named}, not {host}"),
    };
    ctx.deny(via, host, port, Some(ip), &v);
    true
}

/// A request head as the destination gets it: `line` as its request line, the
/// client's header lines without the proxy's and the connection's own
/// (`Proxy-*`, `Connection`, `Keep-Alive`), `Host: host` when given (the client
/// sent none), and `Connection: close`: one request per connection.
fn head_for_destination(line: &str, head: &str, host: Option<String>) -> String {
    let mut out = format!("{line}\r\n");
    for l in head.split("\r\n").skip(1) {
        let name = l.split(':').next().unwrap_or("").to_ascii_lowercase();
        if name.starts_with("proxy-") || name == "connection" || name == "keep-alive" {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    if let Some(h) = host {
        out.push_str(&format!("Host: {h}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

/// How an allowed connection is passed on once its first bytes are in.
enum Passing {
    /// Relayed as it is: TLS, and protocols other than HTTP.
    Whole,
    /// Plain HTTP: one request per connection, as through the forward proxy.
    /// Its head (rewritten, `Connection: close`) goes first, then exactly its
    /// body, starting at `first[rest..]`; nothing after it is forwarded, so a
    /// later request on the connection cannot name another host to the same
    /// server (the client opens a new connection, decided afresh).
    OneRequest {
        head: String,
        rest: usize,
        body: framing::Body,
    },
}

/// How to pass on a connection whose first bytes are `first`; refused, with
/// the reason, when they are an HTTP request whose length is ambiguous.
fn passing(first: &[u8], sniffed: &Sniffed) -> Result<Passing, &'static str> {
    if !matches!(sniffed, Sniffed::Http(_)) {
        return Ok(Passing::Whole);
    }
    let end = memchr::memmem::find(first, b"\r\n\r\n").ok_or("an incomplete request head")?;
    let head = std::str::from_utf8(&first[..end]).map_err(|_| "a request head that is not text")?;
    let body = framing::request_body(head)?;
    let line = head.split("\r\n").next().unwrap_or_default();
    Ok(Passing::OneRequest {
        head: head_for_destination(line, head, None),
        rest: end + 4,
        body,
    })
}

/// Passes an allowed connection on ([`Passing`]) and records it with the
/// bytes each way; a request whose length is ambiguous is recorded as denied
/// and the connection reset.
async fn pass_on(
    ctx: &Context,
    via: &str,
    (conn, up): (TcpStream, TcpStream),
    (first, sniffed): (&[u8], &Sniffed),
    (host, port, ip): (&str, u16, IpAddr),
    allowed: &Verdict,
) {
    let bytes = match passing(first, sniffed) {
        Ok(Passing::Whole) => relay(conn, up, first).await,
        Ok(Passing::OneRequest { head, rest, body }) => {
            relay::forward_one(conn, up, head.as_bytes(), &first[rest..], body).await
        }
        Err(why) => {
            let v = Verdict {
                allowed: false,
                rule: allowed.rule.clone(),
                reason: format!("the request's length is ambiguous: {why}"),
            };
            ctx.deny(via, host, port, Some(ip), &v);
            return reset(conn);
        }
    };
    ctx.record(via, host, port, Some(ip), allowed, bytes);
}

// ---------------------------------------------------------------------------
// HTTP

async fn write_status(conn: &mut TcpStream, status: &str, reason_header: Option<&str>, body: &str) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len() + 1
    );
    if let Some(r) = reason_header {
        // Header values stay on one line.
        let r: String = r
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        head.push_str(&format!("X-Hands-Egress: {r}\r\n"));
    }
    head.push_str("\r\n");
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body.as_bytes()).await;
    let _ = conn.write_all(b"\n").await;
    let _ = conn.shutdown().await;
}

fn denial_text(ctx: &Context, host: &str, port: u16, v: &Verdict) -> String {
    format!(
        "hands egress: {} denied in environment {}: {} (rule: {})",
        hostport(host, port),
        ctx.environment,
        v.reason,
        v.rule
    )
}

async fn forbidden(conn: &mut TcpStream, ctx: &Context, host: &str, port: u16, v: &Verdict) {
    let text = denial_text(ctx, host, port, v);
    write_status(
        conn,
        "403 Forbidden",
        Some(&format!(
            "denied; host={host}; port={port}; rule={}",
            v.rule
        )),
        &text,
    )
    .await;
}

/// Reads a request head (through the blank line); the bytes after it stay in
/// the returned buffer after `end`.
async fn read_head(conn: &mut TcpStream) -> Result<(Vec<u8>, usize), &'static str> {
    let mut buf = Vec::with_capacity(4096);
    let read = async {
        loop {
            if let Some(i) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                return Ok(i + 4);
            }
            if buf.len() > MAX_HEAD {
                return Err("431 Request Header Fields Too Large");
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return Err(""),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, read).await {
        Ok(Ok(end)) => Ok((buf, end)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("408 Request Timeout"),
    }
}

/// `host:port` (port required) or `[v6]:port`.
fn authority(s: &str, default_port: Option<u16>) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port?,
            None => return None,
        };
        (h.to_string(), port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().ok()?),
            Some(_) => return None,
            None => (s.to_string(), default_port?),
        }
    };
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host, port))
}

async fn http(mut conn: TcpStream, ctx: &Context) {
    let (buf, end) = match read_head(&mut conn).await {
        Ok(h) => h,
        Err("") => return,
        Err(status) => {
            return write_status(
                &mut conn,
                status,
                None,
                "hands egress: the request head did not arrive whole",
            )
            .await
        }
    };
    let head = &buf[..end - 4];
    let Some(line) = std::str::from_utf8(head)
        .ok()
        .and_then(|t| t.split("\r\n").next())
    else {
        return write_status(
            &mut conn,
            "400 Bad Request",
            None,
            "hands egress: a request head that is not text",
        )
        .await;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return write_status(
            &mut conn,
            "400 Bad Request",
            None,
            "hands egress: a malformed request line",
        )
        .await;
    };
    if !version.starts_with("HTTP/1.") {
        return write_status(
            &mut conn,
            "505 HTTP Version Not Supported",
            None,
            "hands egress: HTTP/1.x only",
        )
        .await;
    }
    let host_header = sniff::header(head, "host");
    if method == "CONNECT" {
        let Some((host, port)) = authority(target, None) else {
            return write_status(
                &mut conn,
                "400 Bad Request",
                None,
                "hands egress: CONNECT needs host:port",
            )
            .await;
        };
        if let Some(v) = host_disagrees(ctx, "connect", host_header.as_deref(), &host, port) {
            return forbidden(&mut conn, ctx, &host, port, &v).await;
        }
        match reach(ctx, "connect", &host, port, None).await {
            Reach::Denied(v) => forbidden(&mut conn, ctx, &host, port, &v).await,
            Reach::Failed(why) => {
                write_status(
                    &mut conn,
                    "502 Bad Gateway",
                    None,
                    &format!("hands egress: {why}"),
                )
                .await
            }
            Reach::Connected(up, ip, v) => {
                if conn
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let mut first = buf[end..].to_vec();
                let sniffed = first_bytes(&mut conn, &mut first).await;
                if names_another(ctx, "connect", &sniffed, &host, port, ip, &v) {
                    return reset(conn);
                }
                let to = (host.as_str(), port, ip);
                pass_on(ctx, "connect", (conn, up), (&first, &sniffed), to, &v).await;
            }
        }
        return;
    }
    // Absolute-URI forwarding of plain HTTP.
    let Some(rest) = target.strip_prefix("http://") else {
        return write_status(
            &mut conn,
            "400 Bad Request",
            None,
            "hands egress: a proxy request needs an absolute http:// URI (use CONNECT for https)",
        )
        .await;
    };
    let (auth, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let Some((host, port)) = authority(auth, Some(80)) else {
        return write_status(
            &mut conn,
            "400 Bad Request",
            None,
            "hands egress: a malformed URI authority",
        )
        .await;
    };
    // Where the request ends, as the server will find it (the head is text:
    // checked above).
    let body = match framing::request_body(std::str::from_utf8(head).unwrap_or_default()) {
        Ok(b) => b,
        Err(why) => {
            return write_status(
                &mut conn,
                "400 Bad Request",
                None,
                &format!("hands egress: the request's length is ambiguous: {why}"),
            )
            .await
        }
    };
    if let Some(v) = host_disagrees(ctx, "http", host_header.as_deref(), &host, port) {
        return forbidden(&mut conn, ctx, &host, port, &v).await;
    }
    match reach(ctx, "http", &host, port, None).await {
        Reach::Denied(v) => forbidden(&mut conn, ctx, &host, port, &v).await,
        Reach::Failed(why) => {
            write_status(
                &mut conn,
                "502 Bad Gateway",
                None,
                &format!("hands egress: {why}"),
            )
            .await
        }
        Reach::Connected(up, ip, v) => {
            // origin-form, one request per connection (a second request on
            // it could name another host): nothing after this request's body
            // is forwarded.
            let out = head_for_destination(
                &format!("{method} {path} {version}"),
                &String::from_utf8_lossy(head),
                host_header.is_none().then(|| hostport(&host, port)),
            );
            let (up_n, down_n) =
                relay::forward_one(conn, up, out.as_bytes(), &buf[end..], body).await;
            ctx.record("http", &host, port, Some(ip), &v, (up_n, down_n));
        }
    }
}

// ---------------------------------------------------------------------------
// SOCKS5

async fn socks(mut conn: TcpStream, ctx: &Context) {
    let handshake = async {
        let mut hello = [0u8; 2];
        conn.read_exact(&mut hello).await.ok()?;
        if hello[0] != 5 {
            return None;
        }
        let mut methods = vec![0u8; hello[1] as usize];
        conn.read_exact(&mut methods).await.ok()?;
        if !methods.contains(&0) {
            let _ = conn.write_all(&[5, 0xff]).await;
            return None;
        }
        conn.write_all(&[5, 0]).await.ok()?;
        let mut req = [0u8; 4];
        conn.read_exact(&mut req).await.ok()?;
        let host = match req[3] {
            1 => {
                let mut a = [0u8; 4];
                conn.read_exact(&mut a).await.ok()?;
                std::net::Ipv4Addr::from(a).to_string()
            }
            3 => {
                let mut n = [0u8; 1];
                conn.read_exact(&mut n).await.ok()?;
                let mut name = vec![0u8; n[0] as usize];
                conn.read_exact(&mut name).await.ok()?;
                String::from_utf8(name).ok()?
            }
            4 => {
                let mut a = [0u8; 16];
                conn.read_exact(&mut a).await.ok()?;
                std::net::Ipv6Addr::from(a).to_string()
            }
            _ => return Some(Err(8u8)),
        };
        let mut port = [0u8; 2];
        conn.read_exact(&mut port).await.ok()?;
        if req[0] != 5 {
            return None;
        }
        if req[1] != 1 {
            // BIND and UDP ASSOCIATE: not offered.
            return Some(Err(7u8));
        }
        Some(Ok((host, u16::from_be_bytes(port))))
    };
    let reply = |code: u8| [5, code, 0, 1, 0, 0, 0, 0, 0, 0];
    let (host, port) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Some(Ok(t))) => t,
        Ok(Some(Err(code))) => {
            let _ = conn.write_all(&reply(code)).await;
            return;
        }
        _ => return,
    };
    match reach(ctx, "socks", &host, port, None).await {
        // 2: connection not allowed by ruleset.
        Reach::Denied(_) => {
            let _ = conn.write_all(&reply(2)).await;
        }
        // 4: host unreachable (no such name, or nothing answered).
        Reach::Failed(_) => {
            let _ = conn.write_all(&reply(4)).await;
        }
        Reach::Connected(up, ip, v) => {
            if conn.write_all(&reply(0)).await.is_err() {
                return;
            }
            let mut first = Vec::new();
            let sniffed = first_bytes(&mut conn, &mut first).await;
            if host.parse::<IpAddr>().is_err()
                && names_another(ctx, "socks", &sniffed, &host, port, ip, &v)
            {
                return reset(conn);
            }
            let to = (host.as_str(), port, ip);
            pass_on(ctx, "socks", (conn, up), (&first, &sniffed), to, &v).await;
        }
    }
}

// ---------------------------------------------------------------------------
// transparent

/// Where a redirected connection was going.
fn original_destination(conn: &TcpStream) -> io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    match conn.local_addr()? {
        SocketAddr::V4(_) => {
            let a = getsockopt(conn, sockopt::OriginalDst)?;
            Ok(SocketAddr::from((
                std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        SocketAddr::V6(_) => {
            let a = getsockopt(conn, sockopt::Ip6tOriginalDst)?;
            Ok(SocketAddr::from((
                std::net::Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
            )))
        }
    }
}

async fn transparent(mut conn: TcpStream, ctx: &Context) {
    let Ok(dst) = original_destination(&conn) else {
        return reset(conn);
    };
    let (ip, port) = (dst.ip(), dst.port());
    if ip.is_loopback() {
        // Straight to the listener's port: not a redirected connection.
        return reset(conn);
    }
    let mut first = Vec::new();
    let sniffed = first_bytes(&mut conn, &mut first).await;
    let carried = match &sniffed {
        Sniffed::Tls(Some(n)) | Sniffed::Http(Some(n)) => Some(normalize(n)),
        _ => None,
    };
    let answered = lock(&ctx.names).get(&ip).cloned();
    let name = carried.or(answered);
    let outcome = match &name {
        // The name decides, and the connection must go to one of its
        // addresses as the worker resolves them.
        Some(n) if n.parse::<IpAddr>().is_err() => {
            reach(ctx, "transparent", n, port, Some(ip)).await
        }
        _ => reach(ctx, "transparent", &ip.to_string(), port, None).await,
    };
    match outcome {
        Reach::Connected(up, ip, v) => {
            let host = name.unwrap_or_else(|| ip.to_string());
            let to = (host.as_str(), port, ip);
            pass_on(ctx, "transparent", (conn, up), (&first, &sniffed), to, &v).await;
        }
        Reach::Denied(_) | Reach::Failed(_) => reset(conn),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::mpsc;

    #[test]
    fn the_audit_budget_writes_a_burst_then_counts_then_writes_the_count() {
        let mut b = Budget::new();
        let t0 = Instant::now();
        for i in 0..BUDGET_BURST {
            assert_eq!(b.take(t0, i % 2 == 0), (true, None), "{i}");
        }
        // Over it: counted, allowed and denied apart.
        assert_eq!(b.take(t0, true), (false, None));
        assert_eq!(b.take(t0, false), (false, None));
        assert_eq!(b.take(t0, false), (false, None));
        // A tenth of a second later: five more may be written, the first
        // with the count before it.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.take(t1, false), (true, Some((1, 2))));
        for _ in 0..4 {
            assert_eq!(b.take(t1, false), (true, None));
        }
        assert_eq!(b.take(t1, true), (false, None));
        // What is left is written when the session ends.
        assert_eq!(b.drain(), Some((1, 0)));
        assert_eq!(b.drain(), None);
        // A long silence refills the burst, no more.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..BUDGET_BURST {
            assert!(b.take(t2, true).0);
        }
        assert!(!b.take(t2, true).0);
    }

    #[test]
    fn a_call_s_denials_are_bounded_and_counted() {
        let mut d = Denials::default();
        for i in 0..10_000 {
            d.add(format!("h{}.test:80 (no rule)", i % 1000));
        }
        assert_eq!(d.noted.len(), MAX_NOTED);
        assert_eq!(d.noted[0], "h0.test:80 (no rule)");
        assert_eq!(d.more, 10_000 - 10 * MAX_NOTED as u64);
        // The same destination again and again: noted once.
        let mut d = Denials::default();
        for _ in 0..100 {
            d.add("a.test:80 (no rule)".into());
        }
        assert_eq!((d.noted.len(), d.more), (1, 0));
    }

    /// Allows `localhost` and the addresses it resolves to; refuses every
    /// other name before resolving it, and every address without a name.
    struct TestGate;

    impl Gate for TestGate {
        fn check_name(&self, name: &str, _port: u16) -> Option<Verdict> {
            (name != "localhost").then(|| Verdict {
                allowed: false,
                rule: "no rule matches".into(),
                reason: format!("no rule allows {name}"),
            })
        }
        fn name_answerable(&self, name: &str) -> bool {
            name == "localhost"
        }
        fn addr_answerable(&self, _addr: IpAddr) -> bool {
            true
        }
        fn decide(&self, name: Option<&str>, _port: u16, _addrs: &[IpAddr]) -> Verdict {
            Verdict {
                allowed: name == Some("localhost"),
                rule: if name.is_some() {
                    "localhost".into()
                } else {
                    "no rule matches".into()
                },
                reason: if name.is_some() {
                    "allowed".into()
                } else {
                    "an address without a name".into()
                },
            }
        }
    }

    /// A thread in a network namespace of its own with the barrier and the
    /// listeners; runs the closures it is sent (the session's side).
    struct Session {
        jobs: mpsc::Sender<Box<dyn FnOnce() + Send>>,
    }

    impl Session {
        fn start() -> (Session, Listeners) {
            let (jobs, rx) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
            let (ltx, lrx) = mpsc::channel();
            std::thread::spawn(move || {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                ltx.send(crate::sandbox::netfilter::install_with_listeners().unwrap())
                    .unwrap();
                for job in rx {
                    job();
                }
            });
            (Session { jobs }, lrx.recv().unwrap())
        }

        fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
            let (tx, rx) = mpsc::channel();
            self.jobs
                .send(Box::new(move || {
                    let _ = tx.send(f());
                }))
                .unwrap();
            rx.recv().unwrap()
        }
    }

    /// An upstream server on the host's loopback: answers `hello` to anything.
    async fn upstream() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 1024];
                    let _ = c.read(&mut b).await;
                    let _ = c.write_all(b"hello").await;
                });
            }
        });
        port
    }

    fn egress(listeners: Listeners) -> SessionEgress {
        let ctx = Context::new(
            "s".into(),
            "sb".into(),
            "testenv".into(),
            Arc::new(TestGate),
            Auditor::log_only("test".to_string()),
        );
        SessionEgress::start(listeners, ctx).unwrap()
    }

    fn exchange(port: u16, send: Vec<u8>) -> String {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(&send).unwrap();
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_http_proxy_connects_an_allowed_name_and_refuses_another_with_a_readable_403() {
        use crate::sandbox::netfilter::HTTP_PROXY_PORT as P;
        let (session, listeners) = Session::start();
        let eg = egress(listeners);
        let up = upstream().await;
        eg.context().begin_call("call-1");
        let got = session.run(move || {
            exchange(
                P,
                format!("CONNECT localhost:{up} HTTP/1.1\r\nHost: localhost:{up}\r\n\r\nping")
                    .into_bytes(),
            )
        });
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(got.ends_with("hello"), "{got}");
        let got =
            session.run(move || exchange(P, b"CONNECT denied.test:443 HTTP/1.1\r\n\r\n".to_vec()));
        assert!(got.starts_with("HTTP/1.1 403"), "{got}");
        assert!(
            got.contains("X-Hands-Egress: denied; host=denied.test; port=443"),
            "{got}"
        );
        assert!(
            got.contains("denied.test:443 denied in environment testenv"),
            "{got}"
        );
        let got = session.run(move || {
            exchange(
                P,
                format!("GET http://localhost:{up}/x HTTP/1.1\r\nHost: localhost:{up}\r\n\r\n")
                    .into_bytes(),
            )
        });
        assert!(got.ends_with("hello"), "{got}");
        // A Host that names another host than the URI.
        let got = session.run(move || {
            exchange(
                P,
                format!("GET http://localhost:{up}/ HTTP/1.1\r\nHost: evil.test\r\n\r\n")
                    .into_bytes(),
            )
        });
        assert!(got.starts_with("HTTP/1.1 403"), "{got}");
        let denied = eg.context().end_call();
        assert_eq!(denied.len(), 2, "{denied:?}");
        assert!(denied[0].starts_with("denied.test:443"), "{denied:?}");
        let note = eg.context().note(&denied).unwrap();
        assert!(note.contains("denied by environment testenv"), "{note}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socks5_connects_an_allowed_name_and_refuses_another_with_code_2() {
        use crate::sandbox::netfilter::SOCKS_PORT as P;
        let (session, listeners) = Session::start();
        let _eg = egress(listeners);
        let up = upstream().await;
        let socks = move |name: &str, port: u16| -> (Vec<u8>, String) {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", P)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(&[5, 1, 0]).unwrap();
            let mut m = [0u8; 2];
            c.read_exact(&mut m).unwrap();
            let mut req = vec![5, 1, 0, 3, name.len() as u8];
            req.extend(name.as_bytes());
            req.extend(port.to_be_bytes());
            c.write_all(&req).unwrap();
            let mut reply = [0u8; 10];
            c.read_exact(&mut reply).unwrap();
            let _ = c.write_all(b"ping");
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
            (reply.to_vec(), String::from_utf8_lossy(&rest).into_owned())
        };
        let (reply, body) = session.run(move || socks("localhost", up));
        assert_eq!(reply[1], 0, "{reply:?}");
        assert_eq!(body, "hello");
        let (reply, _) = session.run(move || socks("denied.test", 443));
        assert_eq!(reply[1], 2, "connection not allowed by ruleset: {reply:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transparent_connection_without_an_allowed_name_is_reset_at_once() {
        let (session, listeners) = Session::start();
        let _eg = egress(listeners);
        let err = session.run(|| {
            let started = Instant::now();
            let mut c = std::net::TcpStream::connect_timeout(
                &"192.0.2.10:443".parse().unwrap(),
                Duration::from_secs(10),
            )
            .unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = c.write_all(&crate::egress::sniff::tests_hello("denied.test"));
            let mut b = [0u8; 16];
            let r = c.read(&mut b);
            (r.map_err(|e| e.kind()), started.elapsed())
        });
        match err.0 {
            Err(std::io::ErrorKind::ConnectionReset) | Ok(0) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn authorities_need_a_port_unless_one_is_implied() {
        assert_eq!(authority("a.test:443", None), Some(("a.test".into(), 443)));
        assert_eq!(authority("a.test", None), None);
        assert_eq!(authority("a.test", Some(80)), Some(("a.test".into(), 80)));
        assert_eq!(
            authority("[2001:db8::1]:8443", None),
            Some(("2001:db8::1".into(), 8443))
        );
        assert_eq!(
            authority("2001:db8::1:443", None),
            None,
            "v6 needs brackets"
        );
        assert_eq!(authority("a.test:0", None), None);
        assert_eq!(authority("a.test:99999", None), None);
        assert_eq!(authority(":443", None), None);
    }
}
