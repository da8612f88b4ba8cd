//! The session resolver: the DNS server a session in the `egress` network
//! mode reaches at `127.0.0.1:53` inside its own network namespace.
//!
//! Three parts, all on our own small codec (RFC 1035):
//!
//! - **Queries in** ([`parse_query`]): the input is untrusted — it comes from
//!   code the agent runs — so the parser is strict and bounded: a 12-byte
//!   header, exactly one question, no answer or authority records, at most one
//!   additional record which must be an EDNS OPT (tolerated and ignored, the
//!   resolver answers as a plain RFC 1035 server), no compression pointer in
//!   the question, labels of at most 63 bytes from the host-name alphabet
//!   (letters, digits, `-`, `_`), a name of at most 255 bytes on the wire, and
//!   nothing after the last record. A packet without a full header, or with
//!   QR set (a response, never answered so two resolvers cannot ping-pong), is
//!   dropped; any other malformed packet is answered FORMERR, another opcode
//!   NOTIMP.
//! - **Answers out** ([`response`]): the ID and the question as received,
//!   QR and RA set, RD copied, never AA, only the answer section. A UDP
//!   response stays within 512 bytes: answers that do not fit are left out
//!   whole and TC is set, for the client to ask again over TCP
//!   ([`SessionResolver::serve_tcp`], up to 64 KiB). The [`SessionResolver`]
//!   never gives more than [`ResolverLimits::max_addrs`] addresses (16 by
//!   default): sixteen AAAA records fit in 512 bytes for names of up to 46
//!   bytes, sixteen A records for names of up to 238.
//! - **Upstream** ([`query_upstream`]): the worker's own queries for names the
//!   policy allows, over UDP from a fresh socket (random source port, random
//!   ID), each server in turn with a timeout, retried over TCP when the answer
//!   is truncated, and the answer checked against the query before any
//!   address in it is believed.
//!
//! The [`SessionResolver`] never forwards a query: every query goes to the
//! caller's [`Answerer`], which decides from the policy, and only a name the
//! answerer chooses to resolve (with [`query_upstream`] or the host's
//! getaddrinfo) leaves the worker. A name the policy does not allow therefore
//! cannot carry data out of the session.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// QTYPE of an IPv4 address record.
pub const TYPE_A: u16 = 1;
/// QTYPE of an alias record.
pub const TYPE_CNAME: u16 = 5;
/// QTYPE of an IPv6 address record.
pub const TYPE_AAAA: u16 = 28;
/// QCLASS of the Internet, the only class answered.
pub const CLASS_IN: u16 = 1;
/// The largest response sent over UDP (RFC 1035 §4.2.1; EDNS is not offered).
pub const MAX_UDP_RESPONSE: usize = 512;
/// The largest response sent over TCP (its 2-byte length prefix).
pub const MAX_TCP_RESPONSE: usize = 65535;
/// How long [`query_upstream`] waits for each server (and again for a TCP
/// retry).
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

const TYPE_OPT: u16 = 41;
const HEADER_LEN: usize = 12;
const MAX_NAME_WIRE: usize = 255;
const MAX_LABEL: usize = 63;
/// CNAME links followed from the question inside one upstream answer.
const MAX_CNAME_CHAIN: usize = 8;
/// Compression pointers followed while reading one name of an upstream answer
/// (the strictly-decreasing rule already forbids loops; this bounds the work).
const MAX_POINTERS: usize = 32;
/// How many `nameserver` lines glibc reads from resolv.conf (MAXNS).
const MAX_NAMESERVERS: usize = 3;
/// Receive buffer of the server and of the upstream UDP client.
const RECV_BUF: usize = 4096;

const FLAG_QR: u16 = 0x8000;
const OPCODE_MASK: u16 = 0x7800;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
const RCODE_MASK: u16 = 0x000f;

/// The response codes the resolver gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Rcode {
    /// The answer, possibly empty (NODATA).
    NoError = 0,
    /// The query could not be read.
    FormErr = 1,
    /// The answer could not be found in time, or upstream failed.
    ServFail = 2,
    /// No such name.
    NxDomain = 3,
    /// An opcode other than QUERY.
    NotImp = 4,
    /// Not answered, by policy or for lack of capacity.
    Refused = 5,
}

/// The first two fields of a message's header, enough to answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The query's ID, copied into the response.
    pub id: u16,
    /// The query's flags word (QR, opcode, AA, TC, RD, RA, Z, RCODE).
    pub flags: u16,
}

/// A query that passed [`parse_query`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The ID, copied into the response.
    pub id: u16,
    /// RD, copied into the response.
    pub recursion_desired: bool,
    /// The name asked for, lower-cased, labels joined by `.`, without the
    /// trailing dot (the root is the empty string).
    pub name: String,
    /// QTYPE ([`TYPE_A`], [`TYPE_AAAA`], or any other).
    pub qtype: u16,
    /// QCLASS ([`CLASS_IN`] or any other).
    pub qclass: u16,
    /// Whether the query carried an EDNS OPT record (ignored).
    pub edns: bool,
    /// The question section exactly as received, echoed in the response (so
    /// the client's letter case is kept).
    question: Vec<u8>,
}

/// Why [`parse_query`] did not return a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryError {
    /// No full header, or QR set: dropped without a response.
    Dropped,
    /// A header but a malformed body: answered FORMERR.
    Malformed(Header),
    /// An opcode other than QUERY: answered NOTIMP.
    NotImplemented(Header),
}

impl QueryError {
    /// The response to send back, if any: a header-only FORMERR or NOTIMP.
    pub fn response(&self) -> Option<Vec<u8>> {
        match *self {
            QueryError::Dropped => None,
            QueryError::Malformed(h) => Some(header_only(h, Rcode::FormErr)),
            QueryError::NotImplemented(h) => Some(header_only(h, Rcode::NotImp)),
        }
    }
}

/// A bounds-checked cursor over a message.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let b = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(b)
    }

    fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

/// Reads a DNS query strictly (see the module documentation for the rules).
pub fn parse_query(packet: &[u8]) -> Result<Query, QueryError> {
    if packet.len() < HEADER_LEN {
        return Err(QueryError::Dropped);
    }
    let mut r = Reader::new(packet);
    let mut word = || r.u16().ok_or(QueryError::Dropped);
    let (id, flags) = (word()?, word()?);
    let (qdcount, ancount, nscount, arcount) = (word()?, word()?, word()?, word()?);
    let header = Header { id, flags };
    if flags & FLAG_QR != 0 {
        return Err(QueryError::Dropped);
    }
    if flags & OPCODE_MASK != 0 {
        return Err(QueryError::NotImplemented(header));
    }
    let bad = QueryError::Malformed(header);
    if qdcount != 1 || ancount != 0 || nscount != 0 || arcount > 1 {
        return Err(bad);
    }
    let start = r.pos;
    let name = read_query_name(&mut r).ok_or(bad)?;
    let qtype = r.u16().ok_or(bad)?;
    let qclass = r.u16().ok_or(bad)?;
    let question = packet[start..r.pos].to_vec();
    let edns = arcount == 1;
    if edns {
        // OPT: root owner, TYPE 41, CLASS = payload size, TTL = extended
        // RCODE and flags, then options, none of which is looked at.
        if r.u8() != Some(0) || r.u16() != Some(TYPE_OPT) {
            return Err(bad);
        }
        let _payload_size = r.u16().ok_or(bad)?;
        let _ext = r.u32().ok_or(bad)?;
        let rdlen = r.u16().ok_or(bad)?;
        r.bytes(rdlen.into()).ok_or(bad)?;
    }
    if r.remaining() != 0 {
        return Err(bad);
    }
    Ok(Query {
        id,
        recursion_desired: flags & FLAG_RD != 0,
        name,
        qtype,
        qclass,
        edns,
        question,
    })
}

/// A question's name: uncompressed labels only, from the host-name alphabet,
/// lower-cased.
fn read_query_name(r: &mut Reader<'_>) -> Option<String> {
    let mut name = String::new();
    let mut wire = 0usize;
    loop {
        let len = usize::from(r.u8()?);
        wire += 1 + len;
        if wire > MAX_NAME_WIRE {
            return None;
        }
        if len == 0 {
            return Some(name);
        }
        // Also refuses compression pointers (0xC0) and the reserved 0x40/0x80
        // label types, all of which are above 63.
        if len > MAX_LABEL {
            return None;
        }
        let label = r.bytes(len)?;
        if !name.is_empty() {
            name.push('.');
        }
        for &b in label {
            if !is_name_byte(b) {
                return None;
            }
            name.push(char::from(b.to_ascii_lowercase()));
        }
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// `name` lower-cased and without its trailing dot, if it is a name a query
/// can carry: labels of 1 to 63 bytes from the host-name alphabet (letters,
/// digits, `-`, `_`), at most 255 bytes on the wire. The root (`""` or `"."`)
/// is not accepted.
pub fn normalise_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() + 2 > MAX_NAME_WIRE {
        return None;
    }
    let ok = name
        .split('.')
        .all(|l| !l.is_empty() && l.len() <= MAX_LABEL && l.bytes().all(is_name_byte));
    ok.then(|| name.to_ascii_lowercase())
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_header(out: &mut Vec<u8>, id: u16, flags: u16, counts: [u16; 4]) {
    put_u16(out, id);
    put_u16(out, flags);
    for c in counts {
        put_u16(out, c);
    }
}

/// A response with no sections, for a query whose question could not be read.
fn header_only(h: Header, rcode: Rcode) -> Vec<u8> {
    let flags = FLAG_QR | FLAG_RA | (h.flags & (OPCODE_MASK | FLAG_RD)) | rcode as u16;
    let mut out = Vec::with_capacity(HEADER_LEN);
    put_header(&mut out, h.id, flags, [0; 4]);
    out
}

/// The response to `query`: its ID and question, QR and RA set, RD copied,
/// `rcode`, and one answer record (owner: the question's name, TTL `ttl`) for
/// each address of `addrs` that matches QTYPE (IPv4 for A, IPv6 for AAAA;
/// none for any other QTYPE). It is at most [`MAX_UDP_RESPONSE`] bytes: answer
/// records that do not fit are left out whole and TC is set.
pub fn response(query: &Query, rcode: Rcode, addrs: &[IpAddr], ttl: u32) -> Vec<u8> {
    response_within(query, rcode, addrs, ttl, MAX_UDP_RESPONSE)
}

/// [`response`] with another size limit (over TCP, [`MAX_TCP_RESPONSE`]).
fn response_within(
    query: &Query,
    rcode: Rcode,
    addrs: &[IpAddr],
    ttl: u32,
    max_len: usize,
) -> Vec<u8> {
    let mut flags = FLAG_QR | FLAG_RA | rcode as u16;
    if query.recursion_desired {
        flags |= FLAG_RD;
    }
    let mut out = Vec::with_capacity(MAX_UDP_RESPONSE.min(max_len));
    put_header(&mut out, query.id, 0, [1, 0, 0, 0]);
    out.extend_from_slice(&query.question);
    let mut count: u16 = 0;
    for addr in addrs {
        let (v4, v6);
        let rdata: &[u8] = match (query.qtype, addr) {
            (TYPE_A, IpAddr::V4(a)) => {
                v4 = a.octets();
                &v4
            }
            (TYPE_AAAA, IpAddr::V6(a)) => {
                v6 = a.octets();
                &v6
            }
            _ => continue,
        };
        // Owner (a pointer to the question's name at offset 12), TYPE, CLASS,
        // TTL, RDLENGTH, RDATA.
        if out.len() + 12 + rdata.len() > max_len || count == u16::MAX {
            flags |= FLAG_TC;
            break;
        }
        out.extend_from_slice(&[0xc0, HEADER_LEN as u8]);
        put_u16(&mut out, query.qtype);
        put_u16(&mut out, CLASS_IN);
        out.extend_from_slice(&ttl.to_be_bytes());
        put_u16(&mut out, rdata.len() as u16);
        out.extend_from_slice(rdata);
        count += 1;
    }
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&count.to_be_bytes());
    out
}

// ---------------------------------------------------------------------------
// Upstream
// ---------------------------------------------------------------------------

/// A query for the normalised `name` (see [`normalise_name`]), RD set.
fn encode_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + name.len() + 6);
    put_header(&mut out, id, FLAG_RD, [1, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    put_u16(&mut out, qtype);
    put_u16(&mut out, CLASS_IN);
    out
}

/// Reads a possibly compressed name of an upstream answer starting at `pos`:
/// the name (lower-cased; a byte outside the host-name alphabet written as
/// `\DDD`, so it can never equal a name we asked for) and the position after
/// it. A compression pointer must point strictly before every byte of the
/// name read so far, which rules out loops.
fn read_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut wire = 0usize;
    let mut end = None;
    let mut floor = pos;
    let mut pointers = 0;
    loop {
        let len = usize::from(*msg.get(pos)?);
        match len & 0xc0 {
            0x00 => {
                wire += 1 + len;
                if wire > MAX_NAME_WIRE {
                    return None;
                }
                if len == 0 {
                    return Some((name, end.unwrap_or(pos + 1)));
                }
                let label = msg.get(pos + 1..pos + 1 + len)?;
                if !name.is_empty() {
                    name.push('.');
                }
                for &b in label {
                    if is_name_byte(b) {
                        name.push(char::from(b.to_ascii_lowercase()));
                    } else {
                        name.push_str(&format!("\\{b:03}"));
                    }
                }
                pos += 1 + len;
            }
            0xc0 => {
                let target = ((len & 0x3f) << 8) | usize::from(*msg.get(pos + 1)?);
                end.get_or_insert(pos + 2);
                pointers += 1;
                if target >= floor || pointers > MAX_POINTERS {
                    return None;
                }
                floor = target;
                pos = target;
            }
            _ => return None,
        }
    }
}

/// What an upstream answer to our query said.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    /// TC set: ask again over TCP.
    Truncated,
    /// NOERROR: the addresses of the question's name (after CNAMEs), possibly
    /// none.
    Addrs(Vec<IpAddr>),
    /// NXDOMAIN.
    NxDomain,
    /// Any other RCODE.
    Failed(u8),
}

/// Checks that `msg` answers our query (`id`, `name`, `qtype`, class IN) and
/// reads it; `None` when it does not (spoofed, malformed, or another query's).
///
/// Only the answer section is read. Addresses are taken only for the name at
/// the end of the CNAME chain that starts at the question's name; records for
/// any other owner are ignored.
fn parse_response(msg: &[u8], id: u16, name: &str, qtype: u16) -> Option<Reply> {
    let mut r = Reader::new(msg);
    let (rid, flags, qdcount, ancount) = (r.u16()?, r.u16()?, r.u16()?, r.u16()?);
    let (_nscount, _arcount) = (r.u16()?, r.u16()?);
    if rid != id || flags & FLAG_QR == 0 || flags & OPCODE_MASK != 0 || qdcount != 1 {
        return None;
    }
    let (qname, after) = read_name(msg, r.pos)?;
    r.pos = after;
    if qname != name || r.u16()? != qtype || r.u16()? != CLASS_IN {
        return None;
    }
    if flags & FLAG_TC != 0 {
        return Some(Reply::Truncated);
    }
    match flags & RCODE_MASK {
        0 => {}
        3 => return Some(Reply::NxDomain),
        rc => return Some(Reply::Failed(rc as u8)),
    }
    let mut cnames: Vec<(String, String)> = Vec::new();
    let mut addrs: Vec<(String, IpAddr)> = Vec::new();
    for _ in 0..ancount {
        let (owner, after) = read_name(msg, r.pos)?;
        r.pos = after;
        let (rtype, class, _ttl) = (r.u16()?, r.u16()?, r.u32()?);
        let rdlen = usize::from(r.u16()?);
        let rdata_at = r.pos;
        let rdata = r.bytes(rdlen)?;
        if class != CLASS_IN {
            continue;
        }
        match rtype {
            TYPE_A => {
                let a: [u8; 4] = rdata.try_into().ok()?;
                addrs.push((owner, IpAddr::V4(Ipv4Addr::from(a))));
            }
            TYPE_AAAA => {
                let a: [u8; 16] = rdata.try_into().ok()?;
                addrs.push((owner, IpAddr::V6(Ipv6Addr::from(a))));
            }
            TYPE_CNAME => {
                let (target, end) = read_name(&msg[..rdata_at + rdlen], rdata_at)?;
                if end != rdata_at + rdlen {
                    return None;
                }
                cnames.push((owner, target));
            }
            _ => {}
        }
    }
    let mut target = name.to_owned();
    for _ in 0..MAX_CNAME_CHAIN {
        match cnames.iter().find(|(owner, _)| *owner == target) {
            Some((_, next)) => target = next.clone(),
            None => break,
        }
    }
    let wanted_v4 = qtype == TYPE_A;
    let mut found: Vec<IpAddr> = Vec::new();
    for (owner, addr) in addrs {
        if owner == target && addr.is_ipv4() == wanted_v4 && !found.contains(&addr) {
            found.push(addr);
        }
    }
    Some(Reply::Addrs(found))
}

fn random_id() -> io::Result<u16> {
    let mut b = [0u8; 2];
    getrandom::fill(&mut b).map_err(|e| io::Error::other(format!("random query ID: {e}")))?;
    Ok(u16::from_be_bytes(b))
}

/// Asks `servers`, in turn, for the `qtype` (A or AAAA) records of `name`,
/// waiting [`UPSTREAM_TIMEOUT`] for each; see [`query_upstream_with`].
pub async fn query_upstream(
    servers: &[SocketAddr],
    name: &str,
    qtype: u16,
) -> io::Result<Vec<IpAddr>> {
    query_upstream_with(servers, name, qtype, UPSTREAM_TIMEOUT).await
}

/// Asks `servers`, in turn, for the `qtype` (A or AAAA) records of `name`,
/// waiting `timeout` for each.
///
/// Each attempt is a fresh UDP socket (kernel-chosen source port) connected
/// to the server, with a random ID and RD set. A datagram that does not answer
/// the query (another ID or question, QR clear, malformed) is ignored and the
/// wait goes on; a truncated answer is asked again over TCP (with its own
/// `timeout`). The addresses are those of `name` or of the end of a CNAME
/// chain from it inside the answer, deduplicated; an empty list is NODATA.
///
/// Errors: `InvalidInput` for a name [`normalise_name`] refuses, a `qtype`
/// other than A or AAAA, or no server; `NotFound` for NXDOMAIN (the remaining
/// servers are not asked); otherwise the last server's error (`TimedOut`, a
/// failure RCODE, a socket error) once every server failed.
pub async fn query_upstream_with(
    servers: &[SocketAddr],
    name: &str,
    qtype: u16,
    timeout: Duration,
) -> io::Result<Vec<IpAddr>> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    if qtype != TYPE_A && qtype != TYPE_AAAA {
        return Err(invalid(format!("query type {qtype} is neither A nor AAAA")));
    }
    let name =
        normalise_name(name).ok_or_else(|| invalid(format!("{name:?} is not a host name")))?;
    let mut last = invalid("no upstream resolver".into());
    for &server in servers {
        match ask_udp(server, &name, qtype, timeout).await {
            Ok(Reply::Addrs(addrs)) => return Ok(addrs),
            Ok(Reply::NxDomain) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{name}: no such name (from {server})"),
                ))
            }
            Ok(Reply::Failed(rc)) => {
                last = io::Error::other(format!("{name}: {server} answered RCODE {rc}"))
            }
            Ok(Reply::Truncated) => {
                last = io::Error::other(format!("{name}: {server} answered truncated over TCP"))
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn ask_udp(
    server: SocketAddr,
    name: &str,
    qtype: u16,
    timeout: Duration,
) -> io::Result<Reply> {
    let id = random_id()?;
    let query = encode_query(id, name, qtype);
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    socket.send(&query).await?;
    let mut buf = vec![0u8; RECV_BUF];
    loop {
        let n = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{name}: no answer from {server} within {timeout:?}"),
                ))
            }
            Ok(r) => r?,
        };
        match parse_response(&buf[..n], id, name, qtype) {
            Some(Reply::Truncated) => {
                return ask_tcp(server, &query, id, name, qtype, timeout).await
            }
            Some(reply) => return Ok(reply),
            None => continue,
        }
    }
}

async fn ask_tcp(
    server: SocketAddr,
    query: &[u8],
    id: u16,
    name: &str,
    qtype: u16,
    timeout: Duration,
) -> io::Result<Reply> {
    let exchange = async {
        let mut stream = TcpStream::connect(server).await?;
        let mut framed = Vec::with_capacity(2 + query.len());
        put_u16(&mut framed, query.len() as u16);
        framed.extend_from_slice(query);
        stream.write_all(&framed).await?;
        let len = usize::from(stream.read_u16().await?);
        let mut buf = vec![0u8; len];
        stream.read_exact(&mut buf).await?;
        parse_response(&buf, id, name, qtype).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{name}: {server} did not answer the query over TCP"),
            )
        })
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{name}: no answer from {server} over TCP within {timeout:?}"),
        )
    })?
}

/// The host's resolvers: the `nameserver` lines of `/etc/resolv.conf` (see
/// [`parse_resolv_conf`]); empty when the file cannot be read or lists none
/// (glibc would then ask the local host; the caller decides).
pub fn system_resolvers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|text| parse_resolv_conf(&text))
        .unwrap_or_default()
}

/// The servers of a resolv.conf's `nameserver` lines, on port 53, the first
/// three as glibc does. An IPv6 address may carry a zone (`fe80::1%eth0` or
/// `fe80::1%2`), which becomes the scope ID; a line whose zone names no
/// interface, or that is not an address, is skipped.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "nameserver" {
                return None;
            }
            parse_nameserver(words.next()?)
        })
        .take(MAX_NAMESERVERS)
        .collect()
}

fn parse_nameserver(word: &str) -> Option<SocketAddr> {
    let (addr, zone) = match word.split_once('%') {
        Some((addr, zone)) => (addr, Some(zone)),
        None => (word, None),
    };
    match (addr.parse::<IpAddr>().ok()?, zone) {
        (IpAddr::V4(a), None) => Some(SocketAddr::new(IpAddr::V4(a), 53)),
        (IpAddr::V4(_), Some(_)) => None,
        (IpAddr::V6(a), zone) => {
            let scope = match zone {
                None => 0,
                Some(z) => match z.parse::<u32>() {
                    Ok(n) => n,
                    Err(_) => nix::net::if_::if_nametoindex(z).ok()?,
                },
            };
            Some(SocketAddr::V6(SocketAddrV6::new(a, 53, 0, scope)))
        }
    }
}

// ---------------------------------------------------------------------------
// The session resolver
// ---------------------------------------------------------------------------

/// The decision for one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// NOERROR with these addresses; those not matching the QTYPE are left out
    /// (so no matching address, or a QTYPE other than A or AAAA, is NODATA).
    Addrs(Vec<IpAddr>),
    /// NOERROR without answers: the name exists, not with this type.
    NoData,
    /// NXDOMAIN.
    NxDomain,
    /// REFUSED.
    Refused,
    /// SERVFAIL.
    ServFail,
}

/// Decides the answer to each query the [`SessionResolver`] receives; this is
/// where the policy is applied, and the only place a name may be looked up.
///
/// Any `Fn(&str, u16) -> impl Future<Output = Answer>` closure is an
/// answerer (the future must not borrow the name: copy it first).
pub trait Answerer: Send + Sync + 'static {
    /// Called for a query of `name` (lower-cased, without trailing dot, the
    /// root as `""`) and `qtype` ([`TYPE_A`], [`TYPE_AAAA`], or any other),
    /// class IN.
    fn answer(&self, name: &str, qtype: u16) -> impl Future<Output = Answer> + Send;
}

impl<F, Fut> Answerer for F
where
    F: Fn(&str, u16) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Answer> + Send,
{
    fn answer(&self, name: &str, qtype: u16) -> impl Future<Output = Answer> + Send {
        self(name, qtype)
    }
}

/// The bounds of a [`SessionResolver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverLimits {
    /// Queries being answered at once; a query beyond is answered REFUSED
    /// at once.
    pub max_in_flight: usize,
    /// How long the answerer may take before the query is answered SERVFAIL.
    pub answer_timeout: Duration,
    /// TTL of the answer records, in seconds.
    pub ttl: u32,
    /// Addresses given at most in one response.
    pub max_addrs: usize,
    /// TCP connections served at once by [`SessionResolver::serve_tcp`]; one
    /// beyond is closed at once.
    pub max_tcp_connections: usize,
    /// How long a TCP connection may take to send its next query (or a
    /// whole one), and to take its answer, before it is closed.
    pub tcp_idle_timeout: Duration,
}

impl Default for ResolverLimits {
    fn default() -> Self {
        ResolverLimits {
            max_in_flight: 64,
            answer_timeout: Duration::from_secs(4),
            ttl: 30,
            max_addrs: 16,
            max_tcp_connections: 8,
            tcp_idle_timeout: Duration::from_secs(10),
        }
    }
}

/// The DNS server of one session: answers every query through its
/// [`Answerer`], never forwarding one.
///
/// Clones share the answerer and the bound on queries in flight, so one clone
/// can [`serve`](Self::serve) UDP while another serves TCP.
pub struct SessionResolver<A> {
    answerer: Arc<A>,
    limits: ResolverLimits,
    in_flight: Arc<Semaphore>,
}

impl<A> Clone for SessionResolver<A> {
    fn clone(&self) -> Self {
        SessionResolver {
            answerer: self.answerer.clone(),
            limits: self.limits.clone(),
            in_flight: self.in_flight.clone(),
        }
    }
}

impl<A: Answerer> SessionResolver<A> {
    /// A resolver with the default [`ResolverLimits`].
    pub fn new(answerer: A) -> Self {
        Self::with_limits(answerer, ResolverLimits::default())
    }

    /// A resolver with these limits.
    pub fn with_limits(answerer: A, limits: ResolverLimits) -> Self {
        SessionResolver {
            answerer: Arc::new(answerer),
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            limits,
        }
    }

    /// Answers the queries arriving on `socket` (bound in the session's
    /// namespace) until a socket error other than a transient one, which is
    /// returned. Each query is answered on its own task, at most
    /// [`ResolverLimits::max_in_flight`] at once; dropping the future aborts
    /// the queries in flight.
    pub async fn serve(self, socket: UdpSocket) -> io::Result<()> {
        let socket = Arc::new(socket);
        let mut tasks = JoinSet::new();
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            while tasks.try_join_next().is_some() {}
            let (n, peer) = match socket.recv_from(&mut buf).await {
                Ok(got) => got,
                Err(e) if is_transient(&e) => continue,
                Err(e) => return Err(e),
            };
            let query = match parse_query(&buf[..n]) {
                Ok(query) => query,
                Err(e) => {
                    if let Some(resp) = e.response() {
                        let _ = socket.send_to(&resp, peer).await;
                    }
                    continue;
                }
            };
            let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                let resp = response(&query, Rcode::Refused, &[], 0);
                let _ = socket.send_to(&resp, peer).await;
                continue;
            };
            let answerer = self.answerer.clone();
            let limits = self.limits.clone();
            let socket = socket.clone();
            tasks.spawn(async move {
                let resp = answer_query(&*answerer, &limits, &query, MAX_UDP_RESPONSE).await;
                let _ = socket.send_to(&resp, peer).await;
                drop(permit);
            });
        }
    }

    /// The response to one packet, `None` when it is dropped; what
    /// [`serve`](Self::serve) does for each datagram, without the bound on
    /// queries in flight.
    pub async fn respond(&self, packet: &[u8]) -> Option<Vec<u8>> {
        match parse_query(packet) {
            Ok(query) => {
                let resp = answer_query(&*self.answerer, &self.limits, &query, MAX_UDP_RESPONSE);
                Some(resp.await)
            }
            Err(e) => e.response(),
        }
    }

    /// Answers DNS over TCP (RFC 7766: each message after a 2-byte length) on
    /// connections accepted from `listener`, for the clients that retry a
    /// truncated UDP answer. At most [`ResolverLimits::max_tcp_connections`]
    /// connections at once, each answered one query at a time, closed when
    /// idle for [`ResolverLimits::tcp_idle_timeout`] or on a packet that would
    /// be dropped over UDP; the queries count against the same bound on
    /// queries in flight as UDP's. Returns on an accept error other than a
    /// transient one or a lack of resources (after which it waits a little).
    pub async fn serve_tcp(self, listener: TcpListener) -> io::Result<()> {
        let connections = Arc::new(Semaphore::new(self.limits.max_tcp_connections));
        let mut tasks = JoinSet::new();
        loop {
            while tasks.try_join_next().is_some() {}
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) if is_transient(&e) || e.kind() == io::ErrorKind::ConnectionAborted => {
                    continue
                }
                Err(e) if is_out_of_resources(&e) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                continue;
            };
            let this = self.clone();
            tasks.spawn(async move {
                let _ = this.serve_connection(stream).await;
                drop(permit);
            });
        }
    }

    async fn serve_connection(&self, mut stream: TcpStream) -> io::Result<()> {
        let idle = self.limits.tcp_idle_timeout;
        let timed_out = |_| io::Error::from(io::ErrorKind::TimedOut);
        loop {
            let len = match tokio::time::timeout(idle, stream.read_u16()).await {
                Err(_) => return Ok(()),
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(len) => usize::from(len?),
            };
            let mut buf = vec![0u8; len];
            tokio::time::timeout(idle, stream.read_exact(&mut buf))
                .await
                .map_err(timed_out)??;
            let resp = match parse_query(&buf) {
                Ok(query) => match self.in_flight.clone().try_acquire_owned() {
                    Ok(_permit) => {
                        answer_query(&*self.answerer, &self.limits, &query, MAX_TCP_RESPONSE).await
                    }
                    Err(_) => response(&query, Rcode::Refused, &[], 0),
                },
                Err(e) => match e.response() {
                    Some(resp) => resp,
                    None => return Ok(()),
                },
            };
            let mut framed = Vec::with_capacity(2 + resp.len());
            put_u16(&mut framed, resp.len() as u16);
            framed.extend_from_slice(&resp);
            tokio::time::timeout(idle, stream.write_all(&framed))
                .await
                .map_err(timed_out)??;
        }
    }
}

fn is_out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

async fn answer_query<A: Answerer>(
    answerer: &A,
    limits: &ResolverLimits,
    query: &Query,
    max_len: usize,
) -> Vec<u8> {
    if query.qclass != CLASS_IN {
        return response(query, Rcode::Refused, &[], 0);
    }
    let answer = tokio::time::timeout(
        limits.answer_timeout,
        answerer.answer(&query.name, query.qtype),
    )
    .await
    .unwrap_or(Answer::ServFail);
    match answer {
        Answer::Addrs(addrs) => {
            let wanted_v4 = query.qtype == TYPE_A;
            let addrs: Vec<IpAddr> = addrs
                .into_iter()
                .filter(|a| matches!(query.qtype, TYPE_A | TYPE_AAAA) && a.is_ipv4() == wanted_v4)
                .take(limits.max_addrs)
                .collect();
            response_within(query, Rcode::NoError, &addrs, limits.ttl, max_len)
        }
        Answer::NoData => response(query, Rcode::NoError, &[], 0),
        Answer::NxDomain => response(query, Rcode::NxDomain, &[], 0),
        Answer::Refused => response(query, Rcode::Refused, &[], 0),
        Answer::ServFail => response(query, Rcode::ServFail, &[], 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    // --- A tiny test encoder -------------------------------------------------

    /// A name on the wire from its labels, no compression.
    fn wire_name(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.split('.').filter(|l| !l.is_empty()) {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    /// A message: header with these counts, then `body` as is.
    fn message(id: u16, flags: u16, counts: [u16; 4], body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_header(&mut out, id, flags, counts);
        out.extend_from_slice(body);
        out
    }

    fn question(name_wire: &[u8], qtype: u16, qclass: u16) -> Vec<u8> {
        let mut out = name_wire.to_vec();
        put_u16(&mut out, qtype);
        put_u16(&mut out, qclass);
        out
    }

    /// A standard query with RD set.
    fn query_packet(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        message(
            id,
            FLAG_RD,
            [1, 0, 0, 0],
            &question(&wire_name(name), qtype, CLASS_IN),
        )
    }

    /// An EDNS OPT record as dig sends it (payload 1232, a COOKIE option).
    fn opt_record() -> Vec<u8> {
        let mut out = vec![0];
        put_u16(&mut out, TYPE_OPT);
        put_u16(&mut out, 1232);
        out.extend_from_slice(&[0, 0, 0, 0]);
        put_u16(&mut out, 12);
        out.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        out
    }

    /// A resource record with an uncompressed (or given) owner.
    fn record(owner_wire: &[u8], rtype: u16, rdata: &[u8]) -> Vec<u8> {
        let mut out = owner_wire.to_vec();
        put_u16(&mut out, rtype);
        put_u16(&mut out, CLASS_IN);
        out.extend_from_slice(&300u32.to_be_bytes());
        put_u16(&mut out, rdata.len() as u16);
        out.extend_from_slice(rdata);
        out
    }

    fn a_rdata(addr: IpAddr) -> Vec<u8> {
        match addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    }

    /// An upstream answer to `query` (as received) with these answer records.
    fn answer_packet(query: &Query, flags: u16, records: &[Vec<u8>]) -> Vec<u8> {
        let mut body = query.question.clone();
        for r in records {
            body.extend_from_slice(r);
        }
        message(
            query.id,
            FLAG_QR | FLAG_RA | flags,
            [1, records.len() as u16, 0, 0],
            &body,
        )
    }

    fn rcode_of(resp: &[u8]) -> u16 {
        u16::from_be_bytes([resp[2], resp[3]]) & RCODE_MASK
    }

    fn flags_of(resp: &[u8]) -> u16 {
        u16::from_be_bytes([resp[2], resp[3]])
    }

    fn ancount_of(resp: &[u8]) -> u16 {
        u16::from_be_bytes([resp[6], resp[7]])
    }

    // --- Codec ------------------------------------------------------------------

    #[test]
    fn a_query_round_trips_lower_cased_without_the_trailing_dot() {
        let packet = query_packet(0x1234, "WWW.Example.TEST", TYPE_AAAA);
        let q = parse_query(&packet).unwrap();
        assert_eq!(q.id, 0x1234);
        assert!(q.recursion_desired);
        assert_eq!(q.name, "www.example.test");
        assert_eq!((q.qtype, q.qclass, q.edns), (TYPE_AAAA, CLASS_IN, false));

        let ours = encode_query(7, "allowed.test", TYPE_A);
        let q = parse_query(&ours).unwrap();
        assert_eq!(
            (q.id, q.name.as_str(), q.qtype),
            (7, "allowed.test", TYPE_A)
        );
    }

    #[test]
    fn the_root_name_is_the_empty_string() {
        let q = parse_query(&query_packet(1, "", 2)).unwrap();
        assert_eq!(q.name, "");
    }

    #[test]
    fn a_response_copies_id_question_and_rd_and_sets_qr_and_ra() {
        let packet = query_packet(0xbeef, "Allowed.Test", TYPE_A);
        let q = parse_query(&packet).unwrap();
        let resp = response(
            &q,
            Rcode::NoError,
            &[v4(1), "::1".parse().unwrap(), v4(2)],
            60,
        );
        assert_eq!(&resp[0..2], &[0xbe, 0xef]);
        let flags = flags_of(&resp);
        assert_eq!(flags & FLAG_QR, FLAG_QR);
        assert_eq!(flags & FLAG_RA, FLAG_RA);
        assert_eq!(flags & FLAG_RD, FLAG_RD);
        assert_eq!(flags & (FLAG_TC | 0x0400 | OPCODE_MASK | RCODE_MASK), 0);
        // The question exactly as asked, letter case included.
        assert_eq!(&resp[12..12 + q.question.len()], &packet[12..]);
        assert_eq!(ancount_of(&resp), 2, "the IPv6 address is not an A record");
        assert_eq!(
            parse_response(&resp, 0xbeef, "allowed.test", TYPE_A),
            Some(Reply::Addrs(vec![v4(1), v4(2)]))
        );
        // The TTL as given.
        let first = 12 + q.question.len();
        assert_eq!(&resp[first + 6..first + 10], &60u32.to_be_bytes());

        let no_rd = message(
            9,
            0,
            [1, 0, 0, 0],
            &question(&wire_name("a.test"), TYPE_A, CLASS_IN),
        );
        let resp = response(&parse_query(&no_rd).unwrap(), Rcode::NoError, &[], 0);
        assert_eq!(flags_of(&resp) & FLAG_RD, 0);
    }

    #[test]
    fn nodata_nxdomain_refused_and_servfail_have_the_question_and_no_answers() {
        let packet = query_packet(5, "allowed.test", 15);
        let q = parse_query(&packet).unwrap();
        for rcode in [
            Rcode::NoError,
            Rcode::NxDomain,
            Rcode::Refused,
            Rcode::ServFail,
        ] {
            let resp = response(&q, rcode, &[v4(1)], 60);
            assert_eq!(rcode_of(&resp), rcode as u16);
            assert_eq!(ancount_of(&resp), 0, "no MX records from addresses");
            assert_eq!(&resp[4..6], &[0, 1]);
            assert_eq!(resp.len(), packet.len());
        }
    }

    #[test]
    fn an_edns_opt_record_is_tolerated_and_not_echoed() {
        let mut body = question(&wire_name("allowed.test"), TYPE_A, CLASS_IN);
        body.extend_from_slice(&opt_record());
        let q = parse_query(&message(3, FLAG_RD, [1, 0, 0, 1], &body)).unwrap();
        assert!(q.edns);
        assert_eq!(q.name, "allowed.test");
        let resp = response(&q, Rcode::NoError, &[v4(1)], 1);
        assert_eq!(&resp[10..12], &[0, 0], "no additional records");
    }

    #[test]
    fn a_long_answer_is_truncated_without_partial_records() {
        let long = format!(
            "{}.{}.{}.test",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63)
        );
        let q = parse_query(&query_packet(1, &long, TYPE_AAAA)).unwrap();
        let addrs: Vec<IpAddr> = (0..16u8)
            .map(|i| IpAddr::V6(Ipv4Addr::new(127, 0, 0, i + 1).to_ipv6_mapped()))
            .collect();
        let resp = response(&q, Rcode::NoError, &addrs, 1);
        assert!(resp.len() <= MAX_UDP_RESPONSE);
        assert_eq!(flags_of(&resp) & FLAG_TC, FLAG_TC);
        let n = usize::from(ancount_of(&resp));
        assert!(n > 0 && n < 16);
        assert_eq!(
            resp.len(),
            12 + q.question.len() + n * 28,
            "whole records only"
        );

        // Sixteen AAAA records fit for a name of 46 bytes, not 47; sixteen A
        // records for 238, not 239 (as the module documentation says).
        let v4s: Vec<IpAddr> = (1..=16).map(v4).collect();
        for (qtype, addrs, fits) in [(TYPE_AAAA, &addrs, 46), (TYPE_A, &v4s, 238)] {
            for (len, whole) in [(fits, true), (fits + 1, false)] {
                let mut name = String::new();
                let mut left = len;
                while left > 63 {
                    name.push_str(&format!("{}.", "a".repeat(62)));
                    left -= 63;
                }
                name.push_str(&"b".repeat(left));
                assert_eq!(name.len(), len);
                let q = parse_query(&query_packet(1, &name, qtype)).unwrap();
                let resp = response(&q, Rcode::NoError, addrs, 1);
                assert_eq!(flags_of(&resp) & FLAG_TC == 0, whole, "{qtype} {len}");
                assert_eq!(ancount_of(&resp) == 16, whole, "{qtype} {len}");
            }
        }
    }

    #[test]
    fn a_packet_shorter_than_a_header_is_dropped() {
        let full = query_packet(1, "a.test", TYPE_A);
        for len in 0..HEADER_LEN {
            assert_eq!(parse_query(&full[..len]), Err(QueryError::Dropped));
            assert_eq!(QueryError::Dropped.response(), None);
        }
    }

    #[test]
    fn a_response_is_dropped_not_answered() {
        let mut packet = query_packet(1, "a.test", TYPE_A);
        packet[2] |= 0x80;
        assert_eq!(parse_query(&packet), Err(QueryError::Dropped));
    }

    #[test]
    fn another_opcode_is_answered_notimp() {
        let mut packet = query_packet(0x4242, "a.test", TYPE_A);
        packet[2] |= 2 << 3; // STATUS
        let err = parse_query(&packet).unwrap_err();
        assert!(matches!(err, QueryError::NotImplemented(_)));
        let resp = err.response().unwrap();
        assert_eq!(&resp[0..2], &[0x42, 0x42]);
        assert_eq!(rcode_of(&resp), Rcode::NotImp as u16);
        assert_eq!(flags_of(&resp) & OPCODE_MASK, 2 << 11);
    }

    #[test]
    fn malformed_queries_are_answered_formerr() {
        let q = |name_wire: &[u8]| question(name_wire, TYPE_A, CLASS_IN);
        let label64 = {
            let mut w = vec![64];
            w.extend_from_slice(&[b'a'; 64]);
            w.push(0);
            w
        };
        // 5 labels of 63: 320 bytes on the wire.
        let name_too_long = wire_name(&vec!["a".repeat(63); 5].join("."));
        // 3 labels of 63 and one of 62: 3 * 64 + 63 + 1 = 256 > 255.
        let name_just_too_long = wire_name(&format!(
            "{}.{}",
            vec!["a".repeat(63); 3].join("."),
            "b".repeat(62)
        ));
        let mut pointer = wire_name("a");
        pointer.pop();
        pointer.extend_from_slice(&[0xc0, 12]); // a.<pointer to itself>
        let mut reserved = vec![0x40 | 1, b'a', 0];
        reserved.truncate(3);
        let mut bad_byte = wire_name("a.test");
        bad_byte[1] = b'.';
        let mut trailing = q(&wire_name("a.test"));
        trailing.push(0);
        let mut non_opt = q(&wire_name("a.test"));
        non_opt.extend_from_slice(&record(&wire_name("a.test"), TYPE_A, &[127, 0, 0, 1]));
        let mut opt_short = q(&wire_name("a.test"));
        let opt = opt_record();
        opt_short.extend_from_slice(&opt[..opt.len() - 1]);
        let mut two = q(&wire_name("a.test"));
        two.extend_from_slice(&q(&wire_name("b.test")));

        let cases: Vec<(&str, [u16; 4], Vec<u8>)> = vec![
            ("label of 64", [1, 0, 0, 0], q(&label64)),
            ("name of 320 bytes", [1, 0, 0, 0], q(&name_too_long)),
            ("name of 256 bytes", [1, 0, 0, 0], q(&name_just_too_long)),
            ("compression pointer (a loop)", [1, 0, 0, 0], q(&pointer)),
            ("reserved label type", [1, 0, 0, 0], q(&reserved)),
            ("a dot inside a label", [1, 0, 0, 0], q(&bad_byte)),
            ("qdcount 0", [0, 0, 0, 0], vec![]),
            (
                "qdcount 0 with a question",
                [0, 0, 0, 0],
                q(&wire_name("a.test")),
            ),
            ("qdcount 2", [2, 0, 0, 0], two),
            ("an answer record", [1, 1, 0, 0], q(&wire_name("a.test"))),
            ("an authority record", [1, 0, 1, 0], q(&wire_name("a.test"))),
            (
                "two additional records",
                [1, 0, 0, 2],
                q(&wire_name("a.test")),
            ),
            (
                "an additional record that is not OPT",
                [1, 0, 0, 1],
                non_opt,
            ),
            ("a cut OPT record", [1, 0, 0, 1], opt_short),
            (
                "a missing OPT record",
                [1, 0, 0, 1],
                q(&wire_name("a.test")),
            ),
            ("a trailing byte", [1, 0, 0, 0], trailing),
            (
                "a cut question",
                [1, 0, 0, 0],
                q(&wire_name("a.test"))[..5].to_vec(),
            ),
            (
                "no QCLASS",
                [1, 0, 0, 0],
                q(&wire_name("a.test"))[..10].to_vec(),
            ),
            ("an unterminated name", [1, 0, 0, 0], vec![1, b'a']),
        ];
        for (what, counts, body) in cases {
            let packet = message(0x0a0b, FLAG_RD, counts, &body);
            let err = parse_query(&packet).unwrap_err();
            assert!(matches!(err, QueryError::Malformed(_)), "{what}: {err:?}");
            let resp = err.response().unwrap();
            assert_eq!(resp.len(), HEADER_LEN, "{what}");
            assert_eq!(&resp[0..2], &[0x0a, 0x0b], "{what}");
            assert_eq!(
                flags_of(&resp),
                FLAG_QR | FLAG_RD | FLAG_RA | Rcode::FormErr as u16,
                "{what}"
            );
        }
    }

    #[test]
    fn a_name_of_exactly_255_bytes_is_read() {
        // 3 labels of 63, one of 61: 3 * 64 + 62 + 1 = 255.
        let name = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "b".repeat(61));
        let q = parse_query(&query_packet(1, &name, TYPE_A)).unwrap();
        assert_eq!(q.name, name);
        assert_eq!(normalise_name(&name), Some(name.clone()));
        assert_eq!(normalise_name(&format!("{name}b")), None);
    }

    #[test]
    fn normalise_name_lower_cases_and_refuses_what_a_query_cannot_carry() {
        assert_eq!(normalise_name("Allowed.TEST."), Some("allowed.test".into()));
        assert_eq!(
            normalise_name("_sip._tcp.x-y.test"),
            Some("_sip._tcp.x-y.test".into())
        );
        for bad in [
            "",
            ".",
            "a..b",
            ".a",
            "a b",
            "a\0b",
            "ä.test",
            &"a".repeat(64),
        ] {
            assert_eq!(normalise_name(bad), None, "{bad:?}");
        }
    }

    /// xorshift64*, so the garbage is the same on every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn garbage_never_panics_the_parsers() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut seeds = vec![query_packet(1, "a.b.test", TYPE_A)];
        let q = parse_query(&seeds[0]).unwrap();
        seeds.push(answer_packet(
            &q,
            0,
            &[
                record(&[0xc0, 12], TYPE_CNAME, &[1, b'x', 0xc0, 14]),
                record(&wire_name("x.b.test"), TYPE_A, &[127, 0, 0, 1]),
            ],
        ));
        for round in 0..20_000 {
            let packet: Vec<u8> = if round % 2 == 0 {
                let len = (rng.next() % 300) as usize;
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                let mut p = seeds[round % 4 / 2].clone();
                for _ in 0..1 + rng.next() % 4 {
                    let i = (rng.next() as usize) % p.len();
                    p[i] = rng.next() as u8;
                }
                let cut = (rng.next() as usize) % (p.len() + 1);
                p.truncate(cut.max(p.len() / 2));
                p
            };
            if let Err(e) = parse_query(&packet) {
                let _ = e.response();
            }
            let _ = parse_response(&packet, 1, "a.b.test", TYPE_A);
        }
    }

    // --- Upstream answers ------------------------------------------------------

    fn our_query(id: u16, name: &str, qtype: u16) -> Query {
        parse_query(&encode_query(id, name, qtype)).unwrap()
    }

    #[test]
    fn an_upstream_answer_with_a_spoofed_id_is_refused() {
        let q = our_query(100, "allowed.test", TYPE_A);
        let good = answer_packet(&q, 0, &[record(&[0xc0, 12], TYPE_A, &[127, 0, 0, 1])]);
        assert_eq!(
            parse_response(&good, 100, "allowed.test", TYPE_A),
            Some(Reply::Addrs(vec![v4(1)]))
        );
        assert_eq!(parse_response(&good, 101, "allowed.test", TYPE_A), None);
    }

    #[test]
    fn an_upstream_answer_to_another_question_or_without_qr_is_refused() {
        let q = our_query(100, "allowed.test", TYPE_A);
        let good = answer_packet(&q, 0, &[record(&[0xc0, 12], TYPE_A, &[127, 0, 0, 1])]);
        assert_eq!(parse_response(&good, 100, "other.test", TYPE_A), None);
        assert_eq!(parse_response(&good, 100, "allowed.test", TYPE_AAAA), None);
        let mut no_qr = good.clone();
        no_qr[2] &= 0x7f;
        assert_eq!(parse_response(&no_qr, 100, "allowed.test", TYPE_A), None);
        let mut chaos = good.clone();
        let class_at = 12 + q.question.len() - 1;
        chaos[class_at] = 3;
        assert_eq!(parse_response(&chaos, 100, "allowed.test", TYPE_A), None);
        let mut bad_rdlen = good;
        let len = bad_rdlen.len();
        bad_rdlen.truncate(len - 1);
        assert_eq!(
            parse_response(&bad_rdlen, 100, "allowed.test", TYPE_A),
            None
        );
    }

    #[test]
    fn a_cname_chain_from_the_question_is_followed_within_the_answer() {
        let q = our_query(1, "www.allowed.test", TYPE_A);
        // www.allowed.test CNAME edge.cdn.test (the suffix compressed to
        // "allowed.test"'s "test"), edge.cdn.test CNAME e1.cdn.test,
        // e1.cdn.test A 127.0.0.2, plus records the chain does not reach.
        let test_at = 12 + 1 + 3 + 1 + 7; // offset of "test" in the question
        let mut edge = vec![4];
        edge.extend_from_slice(b"edge");
        edge.push(3);
        edge.extend_from_slice(b"cdn");
        edge.extend_from_slice(&[0xc0, test_at as u8]);
        let records = [
            record(&wire_name("unrelated.test"), TYPE_A, &[127, 0, 0, 9]),
            record(&[0xc0, 12], TYPE_CNAME, &edge),
            record(&wire_name("e1.cdn.test"), TYPE_A, &[127, 0, 0, 2]),
            record(
                &wire_name("EDGE.cdn.test"),
                TYPE_CNAME,
                &wire_name("e1.cdn.test"),
            ),
            record(&wire_name("www.allowed.test"), TYPE_A, &[127, 0, 0, 8]),
            record(
                &wire_name("e1.cdn.test"),
                TYPE_AAAA,
                &a_rdata("::1".parse().unwrap()),
            ),
            record(&wire_name("e1.cdn.test"), TYPE_A, &[127, 0, 0, 2]),
        ];
        let resp = answer_packet(&q, 0, &records);
        assert_eq!(
            parse_response(&resp, 1, "www.allowed.test", TYPE_A),
            Some(Reply::Addrs(vec![v4(2)]))
        );
    }

    #[test]
    fn a_cname_loop_yields_no_addresses() {
        let q = our_query(1, "a.test", TYPE_A);
        let records = [
            record(&wire_name("a.test"), TYPE_CNAME, &wire_name("b.test")),
            record(&wire_name("b.test"), TYPE_CNAME, &wire_name("a.test")),
            record(&wire_name("c.test"), TYPE_A, &[127, 0, 0, 1]),
        ];
        let resp = answer_packet(&q, 0, &records);
        assert_eq!(
            parse_response(&resp, 1, "a.test", TYPE_A),
            Some(Reply::Addrs(vec![]))
        );
    }

    #[test]
    fn a_compression_pointer_loop_in_an_upstream_answer_is_refused() {
        let q = our_query(1, "a.test", TYPE_A);
        let owner_at = 12 + q.question.len();
        // x.<pointer to x>: points back to its own start.
        let looping = [1, b'x', 0xc0, owner_at as u8];
        let resp = answer_packet(&q, 0, &[record(&looping, TYPE_A, &[127, 0, 0, 1])]);
        assert_eq!(parse_response(&resp, 1, "a.test", TYPE_A), None);
        // A forward pointer is refused too.
        let forward = [0xc0, (owner_at + 2) as u8];
        let resp = answer_packet(&q, 0, &[record(&forward, TYPE_A, &[127, 0, 0, 1])]);
        assert_eq!(parse_response(&resp, 1, "a.test", TYPE_A), None);
    }

    #[test]
    fn upstream_rcodes_and_truncation_are_reported() {
        let q = our_query(1, "a.test", TYPE_A);
        let nx = answer_packet(&q, Rcode::NxDomain as u16, &[]);
        assert_eq!(
            parse_response(&nx, 1, "a.test", TYPE_A),
            Some(Reply::NxDomain)
        );
        let sf = answer_packet(&q, Rcode::ServFail as u16, &[]);
        assert_eq!(
            parse_response(&sf, 1, "a.test", TYPE_A),
            Some(Reply::Failed(2))
        );
        let tc = answer_packet(&q, FLAG_TC, &[]);
        assert_eq!(
            parse_response(&tc, 1, "a.test", TYPE_A),
            Some(Reply::Truncated)
        );
    }

    #[test]
    fn resolv_conf_nameservers_are_read_on_port_53() {
        let text = "# generated\nsearch example.test\nnameserver 127.0.0.1\n\
                    nameserver ::1 # trailing comment\n;nameserver 127.0.0.9\n\
                    nameserver fe80::1%lo\nnameserver fe80::2%7\nnameserver 127.0.0.5\n";
        let got = parse_resolv_conf(text);
        assert_eq!(got.len(), 3, "glibc reads three: {got:?}");
        assert_eq!(got[0], "127.0.0.1:53".parse().unwrap());
        assert_eq!(got[1], "[::1]:53".parse().unwrap());
        let SocketAddr::V6(zoned) = got[2] else {
            panic!("{got:?}")
        };
        assert_eq!(*zoned.ip(), "fe80::1".parse::<Ipv6Addr>().unwrap());
        assert_ne!(zoned.scope_id(), 0, "lo has an index");

        let text = "nameserver fe80::1%no-such-if0\nnameserver fe80::2%7\n\
                    nameserver 127.0.0.1%1\nnameserver bogus\nnameserver\n";
        let got = parse_resolv_conf(text);
        assert_eq!(got.len(), 1, "{got:?}");
        let SocketAddr::V6(zoned) = got[0] else {
            panic!("{got:?}")
        };
        assert_eq!((zoned.port(), zoned.scope_id()), (53, 7));
    }

    // --- Over sockets -----------------------------------------------------------

    type Seen = Arc<Mutex<Vec<(String, u16)>>>;

    /// A fake upstream on 127.0.0.1 recording every query it receives and
    /// sending back the datagrams `reply` makes for it.
    async fn fake_upstream<F>(socket: Option<UdpSocket>, reply: F) -> (SocketAddr, Seen)
    where
        F: Fn(&Query) -> Vec<Vec<u8>> + Send + 'static,
    {
        let socket = match socket {
            Some(s) => s,
            None => UdpSocket::bind((LOCAL, 0)).await.unwrap(),
        };
        let addr = socket.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let q = parse_query(&buf[..n]).expect("the client sends well-formed queries");
                log.lock().unwrap().push((q.name.clone(), q.qtype));
                for d in reply(&q) {
                    socket.send_to(&d, peer).await.unwrap();
                }
            }
        });
        (addr, seen)
    }

    /// The usual fake: 127.0.0.1 and 127.0.0.2 for A, ::1 for AAAA.
    fn loopback_answers(q: &Query) -> Vec<Vec<u8>> {
        let addrs = [v4(1), v4(2), "::1".parse().unwrap()];
        vec![response(q, Rcode::NoError, &addrs, 300)]
    }

    /// A session resolver on 127.0.0.1 (random port) allowing only names
    /// under `allowed.test`, which it resolves through `upstream`.
    async fn session_resolver(upstream: SocketAddr) -> SocketAddr {
        let answerer = move |name: &str, qtype: u16| {
            let name = name.to_owned();
            async move {
                if name != "allowed.test" && !name.ends_with(".allowed.test") {
                    return Answer::Refused;
                }
                if qtype != TYPE_A && qtype != TYPE_AAAA {
                    return Answer::NoData;
                }
                match query_upstream(&[upstream], &name, qtype).await {
                    Ok(addrs) => Answer::Addrs(addrs),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Answer::NxDomain,
                    Err(_) => Answer::ServFail,
                }
            }
        };
        let socket = UdpSocket::bind((LOCAL, 0)).await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(SessionResolver::new(answerer).serve(socket));
        addr
    }

    /// Sends `packet` to `server` and waits for one answer.
    async fn ask(server: SocketAddr, packet: &[u8]) -> Vec<u8> {
        let client = UdpSocket::bind((LOCAL, 0)).await.unwrap();
        client.send_to(packet, server).await.unwrap();
        let mut buf = vec![0u8; 2048];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        buf.truncate(n);
        buf
    }

    #[tokio::test]
    async fn an_allowed_name_is_answered_with_the_upstream_addresses() {
        let (upstream, seen) = fake_upstream(None, loopback_answers).await;
        let resolver = session_resolver(upstream).await;

        let resp = ask(resolver, &query_packet(0x1111, "www.Allowed.test", TYPE_A)).await;
        assert_eq!(rcode_of(&resp), 0);
        assert_eq!(
            parse_response(&resp, 0x1111, "www.allowed.test", TYPE_A),
            Some(Reply::Addrs(vec![v4(1), v4(2)]))
        );
        let resp = ask(resolver, &query_packet(0x2222, "allowed.test", TYPE_AAAA)).await;
        assert_eq!(
            parse_response(&resp, 0x2222, "allowed.test", TYPE_AAAA),
            Some(Reply::Addrs(vec!["::1".parse().unwrap()]))
        );
        // MX of an allowed name: NODATA, without asking upstream.
        let resp = ask(resolver, &query_packet(0x3333, "allowed.test", 15)).await;
        assert_eq!((rcode_of(&resp), ancount_of(&resp)), (0, 0));
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                ("www.allowed.test".into(), TYPE_A),
                ("allowed.test".into(), TYPE_AAAA)
            ]
        );
    }

    #[tokio::test]
    async fn a_refused_name_is_never_forwarded_upstream() {
        let (upstream, seen) = fake_upstream(None, loopback_answers).await;
        let resolver = session_resolver(upstream).await;
        for (id, name, qtype) in [
            (1, "evil.test", TYPE_A),
            (2, "secret-data.evil.test", TYPE_A),
            (3, "c2VjcmV0.evil.test", TYPE_AAAA),
            (4, "allowed.test.evil.test", TYPE_A),
            (5, "evil.test", 16),
        ] {
            let resp = ask(resolver, &query_packet(id, name, qtype)).await;
            assert_eq!(rcode_of(&resp), Rcode::Refused as u16, "{name}");
            assert_eq!(ancount_of(&resp), 0);
        }
        // Class CHAOS of an allowed name: refused before the answerer.
        let chaos = message(
            6,
            0,
            [1, 0, 0, 0],
            &question(&wire_name("allowed.test"), TYPE_A, 3),
        );
        assert_eq!(
            rcode_of(&ask(resolver, &chaos).await),
            Rcode::Refused as u16
        );
        assert!(
            seen.lock().unwrap().is_empty(),
            "{:?}",
            seen.lock().unwrap()
        );

        // The fake does see what is allowed, so its silence above means something.
        let resp = ask(resolver, &query_packet(7, "allowed.test", TYPE_A)).await;
        assert_eq!(rcode_of(&resp), 0);
        assert_eq!(*seen.lock().unwrap(), vec![("allowed.test".into(), TYPE_A)]);
    }

    #[tokio::test]
    async fn a_spoofed_upstream_answer_is_ignored_for_the_real_one() {
        let (upstream, _) = fake_upstream(None, |q: &Query| {
            let mut spoofed = q.clone();
            spoofed.id = q.id.wrapping_add(1);
            let mut other = q.clone();
            other.question = question(&wire_name("elsewhere.test"), TYPE_A, CLASS_IN);
            vec![
                response(&spoofed, Rcode::NoError, &[v4(66)], 300),
                response(&other, Rcode::NoError, &[v4(67)], 300),
                b"garbage".to_vec(),
                response(q, Rcode::NoError, &[v4(1)], 300),
            ]
        })
        .await;
        let got = query_upstream(&[upstream], "allowed.test", TYPE_A)
            .await
            .unwrap();
        assert_eq!(got, vec![v4(1)]);
    }

    #[tokio::test]
    async fn only_spoofed_answers_time_out_and_the_next_server_is_asked() {
        let (spoofing, _) = fake_upstream(None, |q: &Query| {
            let mut spoofed = q.clone();
            spoofed.id = q.id.wrapping_add(1);
            vec![response(&spoofed, Rcode::NoError, &[v4(66)], 300)]
        })
        .await;
        let timeout = Duration::from_millis(300);
        let err = query_upstream_with(&[spoofing], "allowed.test", TYPE_A, timeout)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");

        let (good, _) = fake_upstream(None, loopback_answers).await;
        let got = query_upstream_with(&[spoofing, good], "allowed.test", TYPE_A, timeout)
            .await
            .unwrap();
        assert_eq!(got, vec![v4(1), v4(2)]);
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_skipped_for_the_next() {
        let closed = UdpSocket::bind((LOCAL, 0)).await.unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let (good, _) = fake_upstream(None, loopback_answers).await;
        let started = std::time::Instant::now();
        let got = query_upstream(&[closed_addr, good], "allowed.test", TYPE_A)
            .await
            .unwrap();
        assert_eq!(got, vec![v4(1), v4(2)]);
        assert!(
            started.elapsed() < UPSTREAM_TIMEOUT,
            "the refusal was not waited out"
        );
    }

    #[tokio::test]
    async fn nxdomain_upstream_is_not_found() {
        let (upstream, _) =
            fake_upstream(None, |q: &Query| vec![response(q, Rcode::NxDomain, &[], 0)]).await;
        let err = query_upstream(&[upstream], "gone.allowed.test", TYPE_A)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        let resolver = session_resolver(upstream).await;
        let resp = ask(resolver, &query_packet(9, "gone.allowed.test", TYPE_A)).await;
        assert_eq!(rcode_of(&resp), Rcode::NxDomain as u16);
    }

    #[tokio::test]
    async fn query_upstream_refuses_what_it_cannot_ask() {
        let server: SocketAddr = (LOCAL, 9).into();
        for (name, qtype) in [("bad name.test", TYPE_A), ("ok.test", 15), ("", TYPE_A)] {
            let err = query_upstream(&[server], name, qtype).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{name} {qtype}");
        }
        let err = query_upstream(&[], "ok.test", TYPE_A).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn a_truncated_upstream_answer_is_retried_over_tcp() {
        // A TCP listener and a UDP socket on the same port of 127.0.0.1.
        let (listener, udp) = loop {
            let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
            let port = listener.local_addr().unwrap().port();
            if let Ok(udp) = UdpSocket::bind((LOCAL, port)).await {
                break (listener, udp);
            }
        };
        // Over UDP: TC set, no records.
        let (upstream, udp_seen) = fake_upstream(Some(udp), |q: &Query| {
            let mut resp = response(q, Rcode::NoError, &[], 0);
            resp[2] |= (FLAG_TC >> 8) as u8;
            vec![resp]
        })
        .await;
        // Over TCP: twenty A records.
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let counter = tcp_queries.clone();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let len = usize::from(stream.read_u16().await.unwrap());
            let mut buf = vec![0u8; len];
            stream.read_exact(&mut buf).await.unwrap();
            let q = parse_query(&buf).unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            let records: Vec<Vec<u8>> = (1..=20)
                .map(|i| record(&[0xc0, 12], TYPE_A, &[127, 0, 0, i]))
                .collect();
            let resp = answer_packet(&q, FLAG_RD, &records);
            let mut framed = Vec::new();
            put_u16(&mut framed, resp.len() as u16);
            framed.extend_from_slice(&resp);
            stream.write_all(&framed).await.unwrap();
        });
        let got = query_upstream(&[upstream], "big.allowed.test", TYPE_A)
            .await
            .unwrap();
        assert_eq!(got, (1..=20).map(v4).collect::<Vec<_>>());
        assert_eq!(udp_seen.lock().unwrap().len(), 1);
        assert_eq!(tcp_queries.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_flood_of_queries_is_answered_refused_beyond_the_bound() {
        let asked = Arc::new(AtomicUsize::new(0));
        // Closed until the test opens it.
        let gate = Arc::new(Semaphore::new(0));
        let (counter, release) = (asked.clone(), gate.clone());
        let answerer = move |_: &str, _: u16| {
            let (counter, gate) = (counter.clone(), gate.clone());
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let _open = gate.acquire().await;
                Answer::Addrs(vec![v4(1)])
            }
        };
        let socket = UdpSocket::bind((LOCAL, 0)).await.unwrap();
        let server = socket.local_addr().unwrap();
        let limits = ResolverLimits::default();
        let bound = limits.max_in_flight;
        tokio::spawn(SessionResolver::with_limits(answerer, limits).serve(socket));

        let client = UdpSocket::bind((LOCAL, 0)).await.unwrap();
        for id in 0..bound as u16 {
            client
                .send_to(&query_packet(id, "slow.test", TYPE_A), server)
                .await
                .unwrap();
        }
        // Every one of them reached the answerer, none was answered yet.
        tokio::time::timeout(Duration::from_secs(5), async {
            while asked.load(Ordering::SeqCst) < bound {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the bound's worth of queries in flight");

        let extra = 10u16;
        for id in 0..extra {
            let id = bound as u16 + id;
            client
                .send_to(&query_packet(id, "slow.test", TYPE_A), server)
                .await
                .unwrap();
        }
        let mut buf = [0u8; 512];
        async fn recv(client: &UdpSocket, buf: &mut [u8]) -> usize {
            let fut = client.recv_from(buf);
            tokio::time::timeout(Duration::from_secs(5), fut)
                .await
                .unwrap()
                .unwrap()
                .0
        }
        for _ in 0..extra {
            let n = recv(&client, &mut buf).await;
            let id = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
            assert!(id >= bound, "query {id} was within the bound");
            assert_eq!(rcode_of(&buf[..n]), Rcode::Refused as u16);
        }
        assert_eq!(
            asked.load(Ordering::SeqCst),
            bound,
            "the extra never reached the answerer"
        );

        release.add_permits(1);
        let mut answered = std::collections::HashSet::new();
        for _ in 0..bound {
            let n = recv(&client, &mut buf).await;
            assert_eq!((rcode_of(&buf[..n]), ancount_of(&buf[..n])), (0, 1));
            answered.insert(u16::from_be_bytes([buf[0], buf[1]]));
        }
        assert_eq!(answered.len(), bound);

        // The permits are back: a new query is answered again.
        let resp = ask(server, &query_packet(999, "slow.test", TYPE_A)).await;
        assert_eq!((rcode_of(&resp), ancount_of(&resp)), (0, 1));
    }

    #[tokio::test]
    async fn a_slow_answer_is_servfail() {
        let answerer = |_: &str, _: u16| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Answer::NoData
        };
        let socket = UdpSocket::bind((LOCAL, 0)).await.unwrap();
        let server = socket.local_addr().unwrap();
        let limits = ResolverLimits {
            answer_timeout: Duration::from_millis(200),
            ..ResolverLimits::default()
        };
        tokio::spawn(SessionResolver::with_limits(answerer, limits).serve(socket));
        let resp = ask(server, &query_packet(1, "slow.test", TYPE_A)).await;
        assert_eq!(rcode_of(&resp), Rcode::ServFail as u16);
    }

    #[tokio::test]
    async fn malformed_datagrams_get_formerr_or_nothing_from_the_server() {
        let resolver = SessionResolver::new(|_: &str, _: u16| async { Answer::NxDomain });
        assert_eq!(resolver.respond(&[1, 2, 3]).await, None);
        let resp = resolver
            .respond(&message(7, 0, [0, 0, 0, 0], &[]))
            .await
            .unwrap();
        assert_eq!(rcode_of(&resp), Rcode::FormErr as u16);
        let resp = resolver
            .respond(&query_packet(8, "x.test", TYPE_A))
            .await
            .unwrap();
        assert_eq!(rcode_of(&resp), Rcode::NxDomain as u16);

        // Over a socket: garbage gets no answer and does not stop the server.
        let socket = UdpSocket::bind((LOCAL, 0)).await.unwrap();
        let server = socket.local_addr().unwrap();
        tokio::spawn(resolver.serve(socket));
        let client = UdpSocket::bind((LOCAL, 0)).await.unwrap();
        client.send_to(b"junk", server).await.unwrap();
        let resp = ask(server, &message(9, 0, [2, 0, 0, 0], &[])).await;
        assert_eq!(&resp[0..2], &[0, 9]);
        assert_eq!(rcode_of(&resp), Rcode::FormErr as u16);
        let resp = ask(server, &query_packet(10, "x.test", TYPE_A)).await;
        assert_eq!(rcode_of(&resp), Rcode::NxDomain as u16);
    }

    /// A resolver answering sixteen IPv6 addresses (IPv4-mapped loopback) for
    /// any name, on both UDP
    /// and TCP of the same port of 127.0.0.1.
    async fn sixteen_addresses_resolver(limits: ResolverLimits) -> SocketAddr {
        let answerer = |_: &str, _: u16| async {
            let addrs = (1..=16).map(|i| IpAddr::V6(Ipv4Addr::new(127, 0, 0, i).to_ipv6_mapped()));
            Answer::Addrs(addrs.collect())
        };
        let (listener, udp) = loop {
            let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
            let port = listener.local_addr().unwrap().port();
            if let Ok(udp) = UdpSocket::bind((LOCAL, port)).await {
                break (listener, udp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let resolver = SessionResolver::with_limits(answerer, limits);
        tokio::spawn(resolver.clone().serve(udp));
        tokio::spawn(resolver.serve_tcp(listener));
        addr
    }

    async fn ask_tcp_once(stream: &mut TcpStream, packet: &[u8]) -> io::Result<Vec<u8>> {
        let mut framed = Vec::new();
        put_u16(&mut framed, packet.len() as u16);
        framed.extend_from_slice(packet);
        stream.write_all(&framed).await?;
        let len = usize::from(stream.read_u16().await?);
        let mut buf = vec![0u8; len];
        stream.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn an_answer_truncated_over_udp_comes_whole_over_tcp() {
        let server = sixteen_addresses_resolver(ResolverLimits::default()).await;
        let long = format!("{}.{}.test", "a".repeat(63), "b".repeat(63));
        let packet = query_packet(0x5151, &long, TYPE_AAAA);

        let resp = ask(server, &packet).await;
        assert_eq!(flags_of(&resp) & FLAG_TC, FLAG_TC);
        assert!(ancount_of(&resp) < 16);

        let mut stream = TcpStream::connect(server).await.unwrap();
        let resp = ask_tcp_once(&mut stream, &packet).await.unwrap();
        assert_eq!(flags_of(&resp) & FLAG_TC, 0);
        let Some(Reply::Addrs(addrs)) = parse_response(&resp, 0x5151, &long, TYPE_AAAA) else {
            panic!("{resp:?}")
        };
        assert_eq!(addrs.len(), 16);
        // The connection serves the next query too; garbage closes it.
        let resp = ask_tcp_once(&mut stream, &query_packet(2, "x.test", TYPE_A))
            .await
            .unwrap();
        assert_eq!((rcode_of(&resp), ancount_of(&resp)), (0, 0));
        let resp = ask_tcp_once(&mut stream, &message(3, 0, [2, 0, 0, 0], &[]))
            .await
            .unwrap();
        assert_eq!(rcode_of(&resp), Rcode::FormErr as u16);
        assert!(ask_tcp_once(&mut stream, b"junk").await.is_err());
    }

    #[tokio::test]
    async fn tcp_connections_beyond_the_bound_are_closed() {
        let limits = ResolverLimits {
            max_tcp_connections: 2,
            ..ResolverLimits::default()
        };
        let server = sixteen_addresses_resolver(limits).await;
        let packet = query_packet(1, "x.test", TYPE_AAAA);
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(server).await.unwrap();
            ask_tcp_once(&mut stream, &packet).await.unwrap();
            held.push(stream);
        }
        let mut third = TcpStream::connect(server).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), ask_tcp_once(&mut third, &packet));
        assert!(
            got.await.unwrap().is_err(),
            "the third connection was served"
        );
        drop(held);
        // Once the others are gone, a new connection is served.
        let served = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let mut stream = TcpStream::connect(server).await.unwrap();
                if ask_tcp_once(&mut stream, &packet).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        served.await.unwrap();
    }

    /// Runs dig against `server`, `None` when dig is not installed.
    async fn dig(server: SocketAddr, args: &[&str]) -> Option<String> {
        let out = tokio::process::Command::new("dig")
            .arg(format!("@{}", server.ip()))
            .args(["-p", &server.port().to_string(), "+tries=1", "+time=3"])
            .args(args)
            .output()
            .await;
        match out {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // .ci/run installs it: under CI its absence is a failure.
                assert!(
                    std::env::var_os("CI").is_none(),
                    "dig is not installed (apt-get install dnsutils)"
                );
                eprintln!("dig is not installed (apt-get install dnsutils): skipped");
                None
            }
            Err(e) => panic!("running dig: {e}"),
            Ok(out) => Some(String::from_utf8_lossy(&out.stdout).into_owned()),
        }
    }

    #[tokio::test]
    async fn dig_gets_the_allowed_addresses_and_nothing_else() {
        let (upstream, seen) = fake_upstream(None, loopback_answers).await;
        let resolver = session_resolver(upstream).await;
        let Some(out) = dig(resolver, &["allowed.test", "A", "+short"]).await else {
            return;
        };
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            ["127.0.0.1", "127.0.0.2"],
            "{out}"
        );
        let out = dig(resolver, &["WWW.allowed.test.", "AAAA", "+short"])
            .await
            .unwrap();
        assert_eq!(out.trim(), "::1");
        let out = dig(resolver, &["secret-data.evil.test", "A"])
            .await
            .unwrap();
        assert!(out.contains("status: REFUSED"), "{out}");
        let out = dig(resolver, &["allowed.test", "MX"]).await.unwrap();
        assert!(
            out.contains("status: NOERROR") && out.contains("ANSWER: 0"),
            "{out}"
        );
        let out = dig(resolver, &["root.test", "A", "+norecurse", "+noedns"])
            .await
            .unwrap();
        assert!(out.contains("status: REFUSED"), "{out}");
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                ("allowed.test".into(), TYPE_A),
                ("www.allowed.test".into(), TYPE_AAAA)
            ]
        );
    }

    #[tokio::test]
    async fn dig_falls_back_to_tcp_for_a_truncated_answer() {
        let server = sixteen_addresses_resolver(ResolverLimits::default()).await;
        let long = format!("{}.{}.test", "a".repeat(63), "b".repeat(63));
        let Some(out) = dig(server, &[&long, "AAAA", "+short"]).await else {
            return;
        };
        assert_eq!(out.lines().count(), 16, "{out}");
        let out = dig(server, &[&long, "AAAA", "+short", "+tcp"])
            .await
            .unwrap();
        assert_eq!(out.lines().count(), 16, "{out}");
        let out = dig(server, &[&long, "AAAA", "+short", "+ignore"])
            .await
            .unwrap();
        assert!(out.lines().count() < 16, "{out}");
    }
}
