//! The outbound dial through an HTTP CONNECT proxy, and the proxy choice:
//! the worker's explicit `proxy` setting, else `HTTPS_PROXY`/`https_proxy`
//! unless `NO_PROXY`/`no_proxy` exempts the host (curl's and Go's rules:
//! `*`, domain suffixes with or without a leading dot, optional `:port`, IP
//! addresses and CIDR blocks).
//!
//! The proxy is spoken to in plain HTTP; what it relays is the worker's TLS
//! 1.3 session with the gateway, which the proxy cannot read or alter.

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTP proxy that tunnels with CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
    /// `user:password` from the URL, sent as Basic `Proxy-Authorization`.
    pub auth: Option<String>,
}

impl std::fmt::Display for Proxy {
    // Never prints the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}:{}", self.host, self.port)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy URL {0:?}: {1}")]
    Url(String, &'static str),
    #[error("connecting to proxy {proxy}: {cause}")]
    Connect {
        proxy: String,
        cause: std::io::Error,
    },
    #[error("proxy {proxy} refused CONNECT {target}: {status}")]
    Refused {
        proxy: String,
        target: String,
        status: String,
    },
    #[error("proxy {proxy}: {message}")]
    Protocol { proxy: String, message: String },
}

impl Proxy {
    /// Parses `http://[user:pass@]host[:port][/]` (port default 80; a bare
    /// `host:port` is taken as http, as curl does).
    pub fn parse(url: &str) -> Result<Proxy, ProxyError> {
        let bad = |why| ProxyError::Url(redact(url), why);
        let rest = if let Some(r) = url.strip_prefix("http://") {
            r
        } else if url.contains("://") {
            return Err(bad(
                "only http:// proxies are supported (CONNECT carries the TLS session)",
            ));
        } else {
            url
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(bad("a proxy URL has no path"));
        }
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a.to_string()), h),
            None => (None, rest),
        };
        let (host, port) = split_host_port(hostport, 80).ok_or_else(|| bad("bad host or port"))?;
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Proxy { host, port, auth })
    }

    /// The proxy for `host` from the environment, if any.
    pub fn from_env(host: &str, port: u16) -> Result<Option<Proxy>, ProxyError> {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        };
        let Some(url) = var(&["HTTPS_PROXY", "https_proxy"]) else {
            return Ok(None);
        };
        if let Some(no) = var(&["NO_PROXY", "no_proxy"]) {
            if no_proxy_matches(&no, host, port) {
                return Ok(None);
            }
        }
        Proxy::parse(&url).map(Some)
    }

    /// Opens a TCP connection to `host:port` through the proxy.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpStream, ProxyError> {
        let proxy = self.to_string();
        let target = authority(host, port);
        let fut = async {
            let mut stream = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|cause| ProxyError::Connect {
                    proxy: proxy.clone(),
                    cause,
                })?;
            let _ = stream.set_nodelay(true);
            let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
            if let Some(auth) = &self.auth {
                let token = base64::engine::general_purpose::STANDARD.encode(auth);
                req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
            }
            req.push_str("\r\n");
            let protocol = |message: String| ProxyError::Protocol {
                proxy: proxy.clone(),
                message,
            };
            stream
                .write_all(req.as_bytes())
                .await
                .map_err(|e| protocol(format!("sending CONNECT: {e}")))?;
            // Read the response head byte by byte: nothing after it may be
            // consumed, since the tunnel's first bytes are the gateway's.
            let mut head = Vec::with_capacity(256);
            while !head.ends_with(b"\r\n\r\n") {
                if head.len() >= 16 * 1024 {
                    return Err(protocol("response head over 16 KiB".into()));
                }
                let b = stream
                    .read_u8()
                    .await
                    .map_err(|e| protocol(format!("reading the CONNECT response: {e}")))?;
                head.push(b);
            }
            let text = String::from_utf8_lossy(&head);
            let status_line = text.lines().next().unwrap_or("").to_string();
            let code = status_line.split_whitespace().nth(1).unwrap_or("");
            if !status_line.starts_with("HTTP/1.") || !code.starts_with('2') {
                return Err(ProxyError::Refused {
                    proxy: proxy.clone(),
                    target: target.clone(),
                    status: status_line,
                });
            }
            Ok(stream)
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ProxyError::Protocol {
                proxy: self.to_string(),
                message: format!("no CONNECT answer within {timeout:?}"),
            }),
        }
    }
}

fn redact(url: &str) -> String {
    match url.rsplit_once('@') {
        Some((before, after)) => {
            let scheme = before.split_once("://").map(|(s, _)| s).unwrap_or("");
            if scheme.is_empty() {
                format!("***@{after}")
            } else {
                format!("{scheme}://***@{after}")
            }
        }
        None => url.to_string(),
    }
}

/// `host:port` for a request line, bracketing IPv6 literals.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Splits `host[:port]` / `[v6][:port]`.
pub fn split_host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => None, // an unbracketed IPv6 literal is ambiguous
        None => Some((s.to_string(), default_port)),
    }
}

/// Whether a `NO_PROXY` list exempts `host:port`.
pub fn no_proxy_matches(list: &str, host: &str, port: u16) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let ip: Option<IpAddr> = host.parse().ok();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if entry == "*" {
            return true;
        }
        let entry = entry.to_ascii_lowercase();
        // CIDR block or IP address.
        if let Some((net, bits)) = entry.split_once('/') {
            if let (Some(ip), Ok(net), Ok(bits)) = (ip, net.parse::<IpAddr>(), bits.parse::<u8>()) {
                if in_cidr(ip, net, bits) {
                    return true;
                }
            }
            continue;
        }
        let (name, eport) = match split_host_port(&entry, 0) {
            Some(x) => x,
            None => (entry.clone(), 0),
        };
        if eport != 0 && eport != port {
            continue;
        }
        if let (Some(ip), Ok(eip)) = (ip, name.parse::<IpAddr>()) {
            if ip == eip {
                return true;
            }
            continue;
        }
        let name = name.trim_start_matches('.').trim_start_matches("*.");
        if host == name || host.ends_with(&format!(".{name}")) {
            return true;
        }
    }
    false
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if bits <= 32 => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if bits <= 128 => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proxy_urls() {
        let p = Proxy::parse("http://user:pw@proxy.corp:3128/").unwrap();
        assert_eq!(
            p,
            Proxy {
                host: "proxy.corp".into(),
                port: 3128,
                auth: Some("user:pw".into())
            }
        );
        assert_eq!(p.to_string(), "http://proxy.corp:3128");
        assert_eq!(Proxy::parse("proxy:8080").unwrap().port, 8080);
        assert_eq!(Proxy::parse("http://[::1]:9").unwrap().host, "::1");
        assert_eq!(Proxy::parse("http://proxy").unwrap().port, 80);
        let e = Proxy::parse("https://u:secret@p:1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("only http://"), "{e}");
        assert!(!e.contains("secret"), "credentials leaked: {e}");
        assert!(Proxy::parse("http://p:notaport").is_err());
    }

    #[test]
    fn no_proxy_rules() {
        let list = "localhost, .corp.example,internal:8443, 10.0.0.0/8, ::1, 192.168.1.5";
        assert!(no_proxy_matches(list, "localhost", 1));
        assert!(no_proxy_matches(list, "gw.corp.example", 443));
        assert!(no_proxy_matches(list, "corp.example", 443));
        assert!(!no_proxy_matches(list, "notcorp.example", 443));
        assert!(no_proxy_matches(list, "internal", 8443));
        assert!(!no_proxy_matches(list, "internal", 443));
        assert!(no_proxy_matches(list, "10.2.3.4", 443));
        assert!(!no_proxy_matches(list, "11.2.3.4", 443));
        assert!(no_proxy_matches(list, "::1", 443));
        assert!(no_proxy_matches(list, "192.168.1.5", 443));
        assert!(!no_proxy_matches(list, "gateway.example", 443));
        assert!(no_proxy_matches("*", "anything", 1));
        assert!(no_proxy_matches("example.com", "A.EXAMPLE.COM.", 1));
    }
}
