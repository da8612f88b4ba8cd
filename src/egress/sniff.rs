//! What a connection's first bytes say about where it is going: the server
//! name of a TLS ClientHello, or the `Host` of an HTTP/1 request. Input is
//! untrusted and bounded; every read is checked.

/// What the first bytes of a client's stream are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// Not enough bytes yet to tell.
    NeedMore,
    /// A TLS ClientHello; its server name, if it sends one.
    Tls(Option<String>),
    /// An HTTP/1 request head; its `Host` without the port, if it has one.
    Http(Option<String>),
    /// Neither.
    Other,
}

/// The most bytes worth waiting for before giving up on a name.
pub const MAX_SNIFF: usize = 16 << 10;

/// Looks at the first bytes a client sent.
pub fn sniff(buf: &[u8]) -> Sniffed {
    match buf.first() {
        None => Sniffed::NeedMore,
        Some(0x16) => tls(buf),
        Some(b'A'..=b'Z') => http(buf),
        Some(_) => Sniffed::Other,
    }
}

fn be16(b: &[u8], at: usize) -> Option<usize> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]) as usize)
}

fn tls(buf: &[u8]) -> Sniffed {
    // Record header: type, version (2), length (2).
    if buf.len() < 5 {
        return Sniffed::NeedMore;
    }
    if buf[1] != 3 {
        return Sniffed::Other;
    }
    let Some(len) = be16(buf, 3) else {
        return Sniffed::NeedMore;
    };
    if buf.len() < 5 + len {
        return if 5 + len > MAX_SNIFF {
            Sniffed::Tls(None)
        } else {
            Sniffed::NeedMore
        };
    }
    Sniffed::Tls(client_hello_sni(&buf[5..5 + len]))
}

/// The `server_name` of a ClientHello handshake message that fits in one
/// record (which every client's does in practice).
fn client_hello_sni(h: &[u8]) -> Option<String> {
    if *h.first()? != 1 {
        return None;
    }
    // Type (1), length (3), version (2), random (32).
    let mut at = 4 + 2 + 32;
    let sid = *h.get(at)? as usize;
    at += 1 + sid;
    at += 2 + be16(h, at)?; // cipher suites
    at += 1 + *h.get(at)? as usize; // compression methods
    let ext_end = at + 2 + be16(h, at)?;
    at += 2;
    if ext_end > h.len() {
        return None;
    }
    while at + 4 <= ext_end {
        let ty = be16(h, at)?;
        let len = be16(h, at + 2)?;
        let body = h.get(at + 4..at + 4 + len)?;
        if ty == 0 {
            // server_name_list: length (2), then entries of type (1), length (2).
            let mut p = 2;
            while p + 3 <= body.len() {
                let kind = body[p];
                let n = be16(body, p + 1)?;
                let name = body.get(p + 3..p + 3 + n)?;
                if kind == 0 {
                    return std::str::from_utf8(name)
                        .ok()
                        .map(|s| s.to_ascii_lowercase());
                }
                p += 3 + n;
            }
            return None;
        }
        at += 4 + len;
    }
    None
}

fn http(buf: &[u8]) -> Sniffed {
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        return if buf.len() >= MAX_SNIFF {
            Sniffed::Other
        } else if looks_like_request_line(buf) {
            Sniffed::NeedMore
        } else {
            Sniffed::Other
        };
    };
    let head = &buf[..end];
    if !looks_like_request_line(head) {
        return Sniffed::Other;
    }
    Sniffed::Http(header(head, "host").map(|h| strip_port(&h).to_ascii_lowercase()))
}

fn looks_like_request_line(buf: &[u8]) -> bool {
    let line = buf.split(|&b| b == b'\n').next().unwrap_or(buf);
    let method_len = line.iter().take_while(|b| b.is_ascii_uppercase()).count();
    (1..=16).contains(&method_len) && line.get(method_len) == Some(&b' ')
}

/// The value of header `name` (case-insensitive) in a request head; `None`
/// when absent or given twice (two `Host` headers are an attack, not a name).
pub fn header(head: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(head).ok()?;
    let mut found = None;
    for line in text.split("\r\n").skip(1) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if k.trim().eq_ignore_ascii_case(name) {
            if found.is_some() {
                return None;
            }
            found = Some(v.trim().to_string());
        }
    }
    found
}

/// `host:port` → `host`; `[v6]:port` and `[v6]` → `v6`.
pub fn strip_port(hostport: &str) -> &str {
    if let Some(rest) = hostport.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => hostport,
    }
}

/// A minimal TLS ClientHello naming `sni`, for tests of the proxy.
#[cfg(test)]
pub(crate) fn tests_hello(sni: &str) -> Vec<u8> {
    tests::client_hello(Some(sni))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello with `sni` (or none).
    pub(crate) fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(name) = sni {
            let mut list = vec![0u8];
            list.extend((name.len() as u16).to_be_bytes());
            list.extend(name.as_bytes());
            let mut body = (list.len() as u16).to_be_bytes().to_vec();
            body.extend(list);
            ext.extend(0u16.to_be_bytes());
            ext.extend((body.len() as u16).to_be_bytes());
            ext.extend(body);
        }
        // An unrelated extension first (supported_versions).
        let mut all = vec![0, 43, 0, 3, 2, 3, 4];
        all.extend(ext);
        let mut hello = vec![3, 3];
        hello.extend([7u8; 32]);
        hello.push(0); // session id
        hello.extend([0, 2, 0x13, 0x01]); // one cipher suite
        hello.extend([1, 0]); // compression: null
        hello.extend((all.len() as u16).to_be_bytes());
        hello.extend(all);
        let mut hs = vec![1];
        hs.extend(&(hello.len() as u32).to_be_bytes()[1..]);
        hs.extend(hello);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn the_server_name_of_a_client_hello_is_read() {
        let hello = client_hello(Some("PyPI.org"));
        assert_eq!(sniff(&hello), Sniffed::Tls(Some("pypi.org".into())));
        assert_eq!(sniff(&client_hello(None)), Sniffed::Tls(None));
        // Split anywhere: more is needed, never a wrong answer.
        for cut in 0..hello.len() {
            assert_eq!(sniff(&hello[..cut]), Sniffed::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn a_mangled_client_hello_never_panics() {
        let hello = client_hello(Some("example.test"));
        for i in 5..hello.len() {
            for v in [0u8, 0xff, 0x7f] {
                let mut h = hello.clone();
                h[i] = v;
                let _ = sniff(&h);
            }
        }
    }

    #[test]
    fn the_host_of_an_http_request_is_read_without_its_port() {
        let req = b"GET / HTTP/1.1\r\nHost: Example.test:8080\r\nAccept: */*\r\n\r\n";
        assert_eq!(sniff(req), Sniffed::Http(Some("example.test".into())));
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHo"), Sniffed::NeedMore);
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"),
            Sniffed::Http(None),
            "two Host headers name nothing"
        );
        assert_eq!(sniff(b"SSH-2.0-OpenSSH_9.2\r\n"), Sniffed::Other);
        assert_eq!(sniff(b"\x00\x01binary"), Sniffed::Other);
    }

    #[test]
    fn ports_are_stripped_from_names_and_bracketed_addresses() {
        assert_eq!(strip_port("a.test:443"), "a.test");
        assert_eq!(strip_port("a.test"), "a.test");
        assert_eq!(strip_port("[2001:db8::1]:443"), "2001:db8::1");
        assert_eq!(strip_port("2001:db8::1"), "2001:db8::1");
    }
}
