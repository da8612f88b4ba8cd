//! The kernel barrier of an `egress` session's network namespace: routes that
//! send every destination to `lo`, and an nftables table that redirects every
//! TCP connection leaving for another host to the worker's transparent listener
//! and drops every other packet that is not for a loopback address.
//!
//! Installed by the worker over netlink (no `nft` or `ip` process) from a
//! thread that has joined the namespace, after the helper is cloned and before
//! it receives its setup, so nothing the agent runs ever sees the namespace
//! without it. The session's processes have no capabilities in the initial
//! user namespace, which owns the network namespace, so they cannot change it.
//!
//! The ruleset, as `nft list ruleset` shows it inside the namespace:
//!
//! ```text
//! table inet hands {
//!     chain nat_out {
//!         type nat hook output priority -100; policy accept;
//!         ip daddr != 127.0.0.0/8 meta l4proto tcp redirect to :PORT
//!         ip6 daddr != ::1 meta l4proto tcp redirect to :PORT
//!     }
//!     chain out {
//!         type filter hook output priority filter; policy drop;
//!         ip daddr 127.0.0.0/8 accept
//!         ip6 daddr ::1 accept
//!     }
//! }
//! ```
//!
//! Traffic between the session's own processes on `lo` stays as in `loopback`
//! mode. A packet the output hook drops fails its `send` at once with `EPERM`
//! (locally generated), so nothing hangs.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::socket::{
    bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

/// Name of the nftables table in each egress session's namespace.
pub const TABLE: &str = "hands";

/// Runs `f` on a thread of its own that has joined the network namespace of
/// process `pid` (the session helper); sockets `f` creates belong to that
/// namespace. The thread ends with `f`, so no thread of the worker's runtime
/// ever changes namespace.
pub fn in_netns_of<T: Send>(pid: i32, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(s, move || {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                    |e| io::Error::other(format!("joining the session's network namespace: {e}")),
                )?;
                f()
            })?
            .join()
            .map_err(|_| io::Error::other("the netns thread panicked"))?
    })
}

/// The ports of the worker's listeners on the session's loopback (IPv4 and,
/// where the kernel has it, IPv6). Below 1024 or bound before any session
/// process runs, so no session process can take them.
pub const HTTP_PROXY_PORT: u16 = 3128;
pub const SOCKS_PORT: u16 = 1080;
pub const TRANSPARENT_PORT: u16 = 15001;
pub const DNS_PORT: u16 = 53;

/// The worker's sockets inside a session's network namespace, made there by
/// [`install_with_listeners`] and served from the worker's runtime.
#[derive(Debug, Default)]
pub struct Listeners {
    pub transparent: Vec<std::net::TcpListener>,
    pub http: Vec<std::net::TcpListener>,
    pub socks: Vec<std::net::TcpListener>,
    pub dns: Vec<std::net::UdpSocket>,
}

/// [`install`] with [`TRANSPARENT_PORT`], then the listeners bound on
/// `127.0.0.1` and `::1` (IPv6 skipped where the namespace has no `::1`),
/// non-blocking, ready for the worker's runtime.
pub fn install_with_listeners() -> io::Result<Listeners> {
    install(TRANSPARENT_PORT)?;
    let mut l = Listeners::default();
    for ip in [
        std::net::IpAddr::from(Ipv4Addr::LOCALHOST),
        std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
    ] {
        let tcp = |port: u16| -> io::Result<Option<std::net::TcpListener>> {
            match std::net::TcpListener::bind((ip, port)) {
                Ok(s) => {
                    s.set_nonblocking(true)?;
                    Ok(Some(s))
                }
                Err(e) if ip.is_ipv6() && no_ipv6(&e) => Ok(None),
                Err(e) => Err(io::Error::new(
                    e.kind(),
                    format!("binding {ip}:{port}: {e}"),
                )),
            }
        };
        l.transparent.extend(tcp(TRANSPARENT_PORT)?);
        l.http.extend(tcp(HTTP_PROXY_PORT)?);
        l.socks.extend(tcp(SOCKS_PORT)?);
        match std::net::UdpSocket::bind((ip, DNS_PORT)) {
            Ok(s) => {
                s.set_nonblocking(true)?;
                l.dns.push(s);
            }
            Err(e) if ip.is_ipv6() && no_ipv6(&e) => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("binding {ip}:{DNS_PORT}/udp: {e}"),
                ))
            }
        }
    }
    Ok(l)
}

/// Installs the barrier and its listeners in a network namespace made for
/// the purpose on a thread of its own, gone with the thread: whether `egress`
/// sessions can open on this host (`hands doctor`, tests).
pub fn probe() -> io::Result<()> {
    std::thread::Builder::new()
        .name("netns-probe".into())
        .spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| io::Error::other(format!("a network namespace: {e}")))?;
            install_with_listeners().map(drop)
        })?
        .join()
        .map_err(|_| io::Error::other("the probe thread panicked"))?
}

/// IPv6 is off in this kernel or namespace.
fn no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRNOTAVAIL) | Some(libc::EAFNOSUPPORT)
    )
}

/// Installs the barrier in the calling thread's network namespace (see the
/// module doc): `lo` up, default routes over `lo`, and the `hands` table with
/// TCP redirected to `transparent_port`.
pub fn install(transparent_port: u16) -> io::Result<()> {
    super::sys::loopback_up().map_err(|e| io::Error::other(format!("bringing lo up: {e}")))?;
    routes().map_err(|e| io::Error::other(format!("routes over lo: {e}")))?;
    ruleset(transparent_port).map_err(|e| io::Error::other(format!("nftables: {e}")))
}

// ---------------------------------------------------------------------------
// netlink framing

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One netlink message under construction: header, fixed part, attributes.
struct Msg {
    buf: Vec<u8>,
    /// Offsets of the nests still open.
    nests: Vec<usize>,
}

impl Msg {
    fn new(ty: u16, flags: u16, seq: u32) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    fn raw(&mut self, bytes: &[u8]) -> &mut Msg {
        self.buf.extend_from_slice(bytes);
        self
    }

    fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Msg {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    fn str(&mut self, ty: u16, s: &str) -> &mut Msg {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(ty, &data)
    }

    fn be32(&mut self, ty: u16, v: u32) -> &mut Msg {
        self.attr(ty, &v.to_be_bytes())
    }

    fn begin(&mut self, ty: u16) -> &mut Msg {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn end(&mut self) -> &mut Msg {
        let at = self.nests.pop().expect("a nest is open");
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn finish(mut self) -> Vec<u8> {
        debug_assert!(self.nests.is_empty());
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn netlink(protocol: SockProtocol) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        protocol,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    Ok(fd)
}

/// Sends `msgs` in one datagram and waits for the acknowledgement of every
/// sequence number in `acks`; the first error the kernel reports is returned
/// with the name of the message it answers.
fn exchange(fd: &OwnedFd, msgs: &[u8], acks: &[(u32, &str)]) -> io::Result<()> {
    send(fd.as_raw_fd(), msgs, MsgFlags::empty())?;
    let mut waiting: Vec<(u32, &str)> = acks.to_vec();
    let mut buf = vec![0u8; 16 << 10];
    while !waiting.is_empty() {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut off = 0;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
            let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap());
            if len < 16 || off + len > n {
                return Err(io::Error::other("a malformed netlink answer"));
            }
            if ty == NLMSG_ERROR && len >= 20 {
                let errno = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap());
                let what = waiting
                    .iter()
                    .find(|(s, _)| *s == seq)
                    .map(|(_, w)| *w)
                    .unwrap_or("a message");
                if errno != 0 {
                    let e = io::Error::from_raw_os_error(-errno);
                    return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
                }
                waiting.retain(|(s, _)| *s != seq);
            }
            off += align4(len);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// routes

const RTM_NEWROUTE: u16 = 24;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const RTA_OIF: u16 = 4;
const RTA_PREFSRC: u16 = 7;
/// `lo` is interface 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Default routes for IPv4 (source 127.0.0.1) and IPv6 over `lo`, so a
/// connection to any address reaches the output hook instead of failing with
/// "network unreachable".
fn routes() -> io::Result<()> {
    let fd = netlink(SockProtocol::NetlinkRoute)?;
    let mut batch = Vec::new();
    for (seq, family) in [(1u32, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        let mut m = Msg::new(
            RTM_NEWROUTE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            seq,
        );
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope,
        // type, flags.
        m.raw(&[
            family,
            0,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_STATIC,
            RT_SCOPE_LINK,
            RTN_UNICAST,
        ])
        .raw(&0u32.to_ne_bytes())
        .attr(RTA_OIF, &LOOPBACK_IFINDEX.to_ne_bytes());
        if family == libc::AF_INET as u8 {
            m.attr(RTA_PREFSRC, &Ipv4Addr::LOCALHOST.octets());
        }
        batch.extend(m.finish());
    }
    exchange(&fd, &batch, &[(1, "the IPv4 route"), (2, "the IPv6 route")])
}

// ---------------------------------------------------------------------------
// nftables

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;

const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
/// The priorities nft calls `dstnat` (for the output hook: -100) and `filter`.
const PRIO_DSTNAT: i32 = -100;
const PRIO_FILTER: i32 = 0;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;

/// One expression of a rule.
#[derive(Clone, Copy)]
enum Expr<'a> {
    /// `meta KEY` into register 1.
    Meta(u32),
    /// `LEN` bytes of the network header at `OFFSET` into register 1.
    Payload { offset: u32, len: u32 },
    /// Register 1 compared with `data`.
    Cmp { op: u32, data: &'a [u8] },
    /// `data` into register 1.
    Load(&'a [u8]),
    /// The verdict.
    Verdict(u32),
    /// Redirect to the port in register 1.
    Redirect,
}

impl Expr<'_> {
    fn put(&self, m: &mut Msg) {
        m.begin(NFTA_LIST_ELEM);
        match self {
            Expr::Meta(key) => {
                m.str(NFTA_EXPR_NAME, "meta")
                    .begin(NFTA_EXPR_DATA)
                    .be32(2, *key) // NFTA_META_KEY
                    .be32(1, NFT_REG_1) // NFTA_META_DREG
                    .end();
            }
            Expr::Payload { offset, len } => {
                m.str(NFTA_EXPR_NAME, "payload")
                    .begin(NFTA_EXPR_DATA)
                    .be32(1, NFT_REG_1) // NFTA_PAYLOAD_DREG
                    .be32(2, NFT_PAYLOAD_NETWORK_HEADER) // NFTA_PAYLOAD_BASE
                    .be32(3, *offset) // NFTA_PAYLOAD_OFFSET
                    .be32(4, *len) // NFTA_PAYLOAD_LEN
                    .end();
            }
            Expr::Cmp { op, data } => {
                m.str(NFTA_EXPR_NAME, "cmp")
                    .begin(NFTA_EXPR_DATA)
                    .be32(1, NFT_REG_1) // NFTA_CMP_SREG
                    .be32(2, *op) // NFTA_CMP_OP
                    .begin(3) // NFTA_CMP_DATA
                    .attr(NFTA_DATA_VALUE, data)
                    .end()
                    .end();
            }
            Expr::Load(data) => {
                m.str(NFTA_EXPR_NAME, "immediate")
                    .begin(NFTA_EXPR_DATA)
                    .be32(1, NFT_REG_1) // NFTA_IMMEDIATE_DREG
                    .begin(2) // NFTA_IMMEDIATE_DATA
                    .attr(NFTA_DATA_VALUE, data)
                    .end()
                    .end();
            }
            Expr::Verdict(code) => {
                m.str(NFTA_EXPR_NAME, "immediate")
                    .begin(NFTA_EXPR_DATA)
                    .be32(1, NFT_REG_VERDICT)
                    .begin(2) // NFTA_IMMEDIATE_DATA
                    .begin(NFTA_DATA_VERDICT)
                    .be32(NFTA_VERDICT_CODE, *code)
                    .end()
                    .end()
                    .end();
            }
            Expr::Redirect => {
                m.str(NFTA_EXPR_NAME, "redir")
                    .begin(NFTA_EXPR_DATA)
                    .be32(1, NFT_REG_1) // NFTA_REDIR_REG_PROTO_MIN
                    .be32(2, NFT_REG_1) // NFTA_REDIR_REG_PROTO_MAX
                    .be32(3, NF_NAT_RANGE_PROTO_SPECIFIED) // NFTA_REDIR_FLAGS
                    .end();
            }
        }
        m.end();
    }
}

fn nft_msg(ty: u16, flags: u16, seq: u32, family: u8) -> Msg {
    let mut m = Msg::new((NFNL_SUBSYS_NFTABLES << 8) | ty, NLM_F_REQUEST | flags, seq);
    // struct nfgenmsg: family, version, resource id (big endian).
    m.raw(&[family, 0, 0, 0]);
    m
}

fn chain(seq: u32, name: &str, kind: &str, priority: i32, policy: u32) -> Vec<u8> {
    let mut m = nft_msg(
        NFT_MSG_NEWCHAIN,
        NLM_F_CREATE | NLM_F_ACK,
        seq,
        NFPROTO_INET,
    );
    m.str(NFTA_CHAIN_TABLE, TABLE)
        .str(NFTA_CHAIN_NAME, name)
        .begin(NFTA_CHAIN_HOOK)
        .be32(NFTA_HOOK_HOOKNUM, NF_INET_LOCAL_OUT)
        .be32(NFTA_HOOK_PRIORITY, priority as u32)
        .end()
        .be32(NFTA_CHAIN_POLICY, policy)
        .str(NFTA_CHAIN_TYPE, kind);
    m.finish()
}

fn rule(seq: u32, chain: &str, exprs: &[Expr<'_>]) -> Vec<u8> {
    let mut m = nft_msg(
        NFT_MSG_NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK,
        seq,
        NFPROTO_INET,
    );
    m.str(NFTA_RULE_TABLE, TABLE)
        .str(NFTA_RULE_CHAIN, chain)
        .begin(NFTA_RULE_EXPRESSIONS);
    for e in exprs {
        e.put(&mut m);
    }
    m.end();
    m.finish()
}

/// `meta nfproto FAMILY, <network header bytes> OP VALUE`, then `tail`.
fn match_daddr<'a>(
    family: &'a [u8; 1],
    daddr: Expr<'a>,
    op: u32,
    value: &'a [u8],
    tail: &[Expr<'a>],
) -> Vec<Expr<'a>> {
    let mut exprs = vec![
        Expr::Meta(NFT_META_NFPROTO),
        Expr::Cmp {
            op: NFT_CMP_EQ,
            data: family,
        },
        daddr,
        Expr::Cmp { op, data: value },
    ];
    exprs.extend_from_slice(tail);
    exprs
}

/// The `hands` table, in one transaction: all of it or nothing.
fn ruleset(port: u16) -> io::Result<()> {
    const V4: [u8; 1] = [NFPROTO_IPV4];
    const V6: [u8; 1] = [NFPROTO_IPV6];
    const TCP: [u8; 1] = [libc::IPPROTO_TCP as u8];
    // The first byte of the IPv4 destination (127.0.0.0/8), the whole IPv6 one.
    const LO4: [u8; 1] = [127];
    const LO6: [u8; 16] = std::net::Ipv6Addr::LOCALHOST.octets();
    const DADDR4: Expr<'static> = Expr::Payload { offset: 16, len: 1 };
    const DADDR6: Expr<'static> = Expr::Payload {
        offset: 24,
        len: 16,
    };
    let fd = netlink(SockProtocol::NetlinkNetFilter)?;
    let port = port.to_be_bytes();
    let redirect = [
        Expr::Meta(NFT_META_L4PROTO),
        Expr::Cmp {
            op: NFT_CMP_EQ,
            data: &TCP,
        },
        Expr::Load(&port),
        Expr::Redirect,
    ];
    let accept = [Expr::Verdict(NF_ACCEPT)];

    let mut batch = Vec::new();
    let mut begin = Msg::new(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0);
    begin.raw(&[0, 0]).raw(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
    batch.extend(begin.finish());
    let mut table = nft_msg(NFT_MSG_NEWTABLE, NLM_F_CREATE | NLM_F_ACK, 1, NFPROTO_INET);
    table.str(NFTA_TABLE_NAME, TABLE);
    batch.extend(table.finish());
    batch.extend(chain(2, "nat_out", "nat", PRIO_DSTNAT, NF_ACCEPT));
    batch.extend(chain(3, "out", "filter", PRIO_FILTER, NF_DROP));
    let rules = [
        (
            "nat_out",
            match_daddr(&V4, DADDR4, NFT_CMP_NEQ, &LO4, &redirect),
        ),
        (
            "nat_out",
            match_daddr(&V6, DADDR6, NFT_CMP_NEQ, &LO6, &redirect),
        ),
        ("out", match_daddr(&V4, DADDR4, NFT_CMP_EQ, &LO4, &accept)),
        ("out", match_daddr(&V6, DADDR6, NFT_CMP_EQ, &LO6, &accept)),
    ];
    for (i, (chain, exprs)) in rules.iter().enumerate() {
        batch.extend(rule(4 + i as u32, chain, exprs));
    }
    let mut end = Msg::new(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 8);
    end.raw(&[0, 0]).raw(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
    batch.extend(end.finish());
    exchange(
        &fd,
        &batch,
        &[
            (1, "the table"),
            (2, "the nat chain"),
            (3, "the filter chain"),
            (4, "the IPv4 redirect"),
            (5, "the IPv6 redirect"),
            (6, "the IPv4 loopback rule"),
            (7, "the IPv6 loopback rule"),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;
    use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::time::Duration;

    /// A process in a network namespace of its own, killed on drop.
    struct Netns(std::process::Child);

    impl Netns {
        fn new() -> Netns {
            let mut child = std::process::Command::new("unshare")
                .args(["--net", "sleep", "60"])
                .spawn()
                .expect("unshare (util-linux) runs as root");
            // unshare execs sleep once the namespace is made.
            let pid = child.id();
            let own = std::fs::read_link("/proc/self/ns/net").unwrap();
            for _ in 0..200 {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
                if comm.trim() == "sleep" && ns.is_some_and(|ns| ns != own) {
                    return Netns(child);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("unshare did not make a namespace");
        }

        fn pid(&self) -> i32 {
            self.0.id() as i32
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// The original destination of a redirected IPv4 connection.
    fn original_dst(s: &TcpStream) -> SocketAddr {
        nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::OriginalDst)
            .map(|a| {
                SocketAddr::from((
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                ))
            })
            .unwrap()
    }

    #[test]
    fn tcp_to_any_other_host_is_redirected_to_the_listener_with_its_destination_kept() {
        let ns = Netns::new();
        let got = in_netns_of(ns.pid(), || {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let port = listener.local_addr()?.port();
            install(port)?;
            let client = TcpStream::connect_timeout(
                &"192.0.2.7:443".parse().unwrap(),
                Duration::from_secs(5),
            )?;
            let (server, _) = listener.accept()?;
            drop(client);
            Ok(original_dst(&server))
        })
        .unwrap();
        assert_eq!(got, "192.0.2.7:443".parse().unwrap());
    }

    #[test]
    fn everything_else_that_leaves_lo_is_dropped_at_once() {
        let ns = Netns::new();
        in_netns_of(ns.pid(), || {
            install(15001)?;
            let udp = UdpSocket::bind("0.0.0.0:0")?;
            let err = udp.send_to(b"q", "192.0.2.53:53").unwrap_err();
            assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
            let udp6 = UdpSocket::bind("[::]:0")?;
            let err = udp6.send_to(b"q", "[2001:db8::53]:53").unwrap_err();
            assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
            // The session's own loopback traffic flows as in `loopback` mode.
            let a = UdpSocket::bind("127.0.0.1:0")?;
            UdpSocket::bind("127.0.0.1:0")?.send_to(b"x", a.local_addr()?)?;
            let mut buf = [0u8; 4];
            a.set_read_timeout(Some(Duration::from_secs(5)))?;
            assert_eq!(a.recv(&mut buf)?, 1);
            // No listener on the redirect port: refused, not a hang.
            let err = TcpStream::connect_timeout(
                &"[2001:db8::1]:80".parse().unwrap(),
                Duration::from_secs(5),
            )
            .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn the_probe_installs_the_barrier_and_its_listeners_in_a_namespace_of_its_own() {
        probe().unwrap();
        // Again: the namespace went with its thread, and the ports with it.
        probe().unwrap();
    }

    #[test]
    fn the_table_is_installed_whole_or_the_call_fails() {
        let ns = Netns::new();
        in_netns_of(ns.pid(), || install(15001)).unwrap();
        // A second install finds the routes there (NLM_F_EXCL): an error, not
        // a half-changed namespace.
        let err = in_netns_of(ns.pid(), || install(15001)).unwrap_err();
        assert!(err.to_string().contains("route"), "{err}");
    }

    /// What `nft` (the nftables command, from the test machine) reads back is
    /// the ruleset of the module doc.
    #[test]
    fn nft_reads_back_the_documented_ruleset() {
        let ns = Netns::new();
        in_netns_of(ns.pid(), || install(15001)).unwrap();
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", ns.pid()))
            .args(["nft", "list", "ruleset"])
            .output()
            .expect("nsenter and nft (the nftables package) are installed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let text = squash(&text);
        for line in [
            "table inet hands {",
            "type nat hook output priority -100; policy accept;",
            "ip daddr != 127.0.0.0/8 meta l4proto tcp redirect to :15001",
            "ip6 daddr != ::1 meta l4proto tcp redirect to :15001",
            "type filter hook output priority filter; policy drop;",
            "ip daddr 127.0.0.0/8 accept",
            "ip6 daddr ::1 accept",
        ] {
            assert!(text.contains(&squash(line)), "missing `{line}` in:\n{text}");
        }
    }
}
