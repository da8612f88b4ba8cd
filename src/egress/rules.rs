//! Egress rules as written in a policy, parsed once: host names, `*.suffix`
//! wildcards and CIDR networks, each with an optional port; and the host-name
//! normalisation that rules and connection names share, so both are compared in
//! the same (ASCII, lower-case) form.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest host name in its dotted ASCII form (RFC 1035 gives 255 octets on the
/// wire, which is 253 characters written out).
const MAX_NAME: usize = 253;
/// Longest label (RFC 1035).
const MAX_LABEL: usize = 63;
/// IPv4 networks shorter than this are too broad (`0.0.0.0/0` and `/1`..`/7`
/// each span several of the old class-A blocks).
const MIN_BROAD_V4: u8 = 8;
/// IPv6 networks shorter than this are too broad (`::/0` .. `/15`: wider than
/// any single allocation to a registry).
const MIN_BROAD_V6: u8 = 16;

/// What a host name given to [`parse_host`] turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A host name in normal form: ASCII (IDNA labels as punycode), lower case,
    /// no trailing dot.
    Name(String),
    /// An IP address literal, in any spelling `inet_aton(3)` accepts for IPv4
    /// (`127.0.0.1`, `0x7f.1`, `2130706433`) or IPv6, bracketed or not.
    Ip(IpAddr),
}

/// Reads a host as a connection names it (a TLS SNI, an HTTP `Host`, a DNS
/// question): an IP literal in any spelling, or a host name in normal form.
///
/// Every IPv4 spelling `inet_aton(3)` accepts is an address, not a name (`0x7f.1`
/// and `2130706433` are 127.0.0.1 to libc, curl and browsers alike), and so is a
/// name that IDNA maps to one (full-width digits). A name whose last label is a
/// number but which is no such address (`1.2.3.256`, `foo.123`) is refused: no
/// top-level domain is numeric, and programs disagree on what it means.
pub fn parse_host(text: &str) -> Result<Host, String> {
    if text.is_empty() {
        return Err("the host is empty".to_string());
    }
    if let Some(inner) = text.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| format!("`{text}` lacks its closing `]`"))?;
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .map_err(|_| format!("`{text}` is not a bracketed IPv6 address"));
    }
    if text.contains(':') {
        return text
            .parse::<Ipv6Addr>()
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .map_err(|_| format!("`{text}` is neither a host name nor an IPv6 address"));
    }
    let ascii = idna::domain_to_ascii(text)
        .map_err(|_| format!("`{text}` is not a valid (international) host name"))?;
    let ascii = ascii.strip_suffix('.').unwrap_or(&ascii);
    if let Some(ip) = inet_aton(ascii) {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    check_name(text, ascii)?;
    Ok(Host::Name(ascii.to_string()))
}

/// The normal form of a host name (see [`parse_host`]); an IP literal is an
/// error here, since only names are normalised.
pub fn normalize_host(text: &str) -> Result<String, String> {
    match parse_host(text)? {
        Host::Name(name) => Ok(name),
        Host::Ip(ip) => Err(format!("`{text}` is the IP address {ip}, not a host name")),
    }
}

/// Checks the ASCII form of a name; `text` is the spelling to show in messages.
fn check_name(text: &str, ascii: &str) -> Result<(), String> {
    if ascii.is_empty() {
        return Err(format!("`{text}` has no labels"));
    }
    if ascii.len() > MAX_NAME {
        return Err(format!(
            "`{text}` is longer than {MAX_NAME} characters (in its ASCII form)"
        ));
    }
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err(format!("`{text}` has an empty label"));
        }
        if label.len() > MAX_LABEL {
            return Err(format!(
                "`{text}` has a label longer than {MAX_LABEL} characters"
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
        {
            return Err(format!("`{text}` contains `{c}`, which no host name has"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("`{text}` has a label that starts or ends with `-`"));
        }
    }
    let last = ascii.rsplit('.').next().unwrap_or(ascii);
    if is_number(last) {
        return Err(format!(
            "`{text}` ends in a number but is not an IPv4 address: no host name does"
        ));
    }
    Ok(())
}

/// A label `inet_aton` would read as a number: decimal, or hexadecimal after `0x`.
fn is_number(label: &str) -> bool {
    let hex = label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"));
    match hex {
        Some(digits) => digits.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// `inet_aton(3)`: one to four parts separated by dots, each decimal, octal
/// (leading `0`) or hexadecimal (`0x`); the last part fills the remaining bytes.
pub fn inet_aton(text: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(4);
    for part in &parts {
        values.push(aton_part(part)?);
    }
    let (last, init) = values.split_last()?;
    if init.iter().any(|v| *v > 255) {
        return None;
    }
    let room = 8 * (4 - init.len() as u32);
    if room < 32 && *last >> room != 0 {
        return None;
    }
    let mut value = 0u32;
    for (i, v) in init.iter().enumerate() {
        value |= v << (24 - 8 * i as u32);
    }
    Some(Ipv4Addr::from(value | last))
}

fn aton_part(part: &str) -> Option<u32> {
    if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
        if hex.is_empty() {
            return Some(0);
        }
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        return u32::from_str_radix(hex, 16).ok();
    }
    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if part.len() > 1 && part.starts_with('0') {
        return u32::from_str_radix(&part[1..], 8).ok();
    }
    part.parse().ok()
}

/// An IP network: an address with no bits set beyond its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network of one address (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr {
            addr,
            prefix: max_prefix(addr),
        }
    }

    /// `addr/prefix`, refusing a prefix too long for the family and host bits set.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, String> {
        if prefix > max_prefix(addr) {
            return Err(format!(
                "/{prefix} is longer than an {} address",
                if addr.is_ipv4() { "IPv4" } else { "IPv6" }
            ));
        }
        let network = Cidr {
            addr: masked(addr, prefix),
            prefix,
        };
        if network.addr != addr {
            return Err(format!(
                "`{addr}/{prefix}` has host bits set; write the network as `{network}`"
            ));
        }
        Ok(network)
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in this network (never across families: an IPv4 network
    /// does not contain the IPv4-mapped IPv6 form of its addresses).
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && masked(ip, self.prefix) == self.addr
    }

    /// Whether every address of `other` is in this network.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }

    /// Parses `addr/prefix` (or a bare address, a single-address network).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IP address"))?;
        match prefix {
            None => Ok(Cidr::host(addr)),
            Some(p) => {
                let prefix = p
                    .parse::<u8>()
                    .ok()
                    .filter(|_| p.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| format!("`/{p}` is not a prefix length"))?;
                Cidr::new(addr, prefix)
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn masked(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// What a rule matches, before the port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// `*`: every name (never an IP literal). Too broad without `allow_broad`.
    AnyName,
    /// Exactly this name (normal form).
    Name(String),
    /// `*.suffix`: every name strictly below the suffix (normal form), never the
    /// suffix itself.
    Subdomains(String),
    /// Addresses in this network. Only these rules match IP literals and the
    /// addresses of nameless connections.
    Net(Cidr),
}

/// One egress rule: a target and an optional port (none: every port). Keeps its
/// text as written, which is how decisions name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    text: String,
    target: Target,
    port: Option<u16>,
}

impl Rule {
    /// Parses one rule: `pypi.org`, `github.com:443`, `*.pythonhosted.org`,
    /// `10.20.0.0/16:5432`, `192.0.2.7:80`, `2001:db8::/32`, `[2001:db8::/32]:443`.
    pub fn parse(text: &str) -> Result<Rule, String> {
        let (host, port, bracketed) = split_port(text)?;
        let target = if bracketed || host.contains(':') {
            let net = Cidr::parse(host).map_err(|m| {
                if bracketed {
                    m
                } else {
                    format!(
                        "{m}; an IPv6 rule with a port is written in brackets, as `[2001:db8::/32]:443`"
                    )
                }
            })?;
            if !net.addr.is_ipv6() {
                return Err(format!(
                    "`{host}` is IPv4: only IPv6 is written in brackets"
                ));
            }
            Target::Net(net)
        } else if host.contains('/') || host.parse::<Ipv4Addr>().is_ok() {
            Target::Net(Cidr::parse(host)?)
        } else if let Some(ip) = inet_aton(host) {
            return Err(format!(
                "`{host}` is an unusual spelling of {ip}; write the address as `{ip}`"
            ));
        } else if host == "*" {
            Target::AnyName
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if suffix.contains('*') {
                return Err(wildcard_error(host));
            }
            Target::Subdomains(name_of_rule(suffix)?)
        } else if host.contains('*') {
            return Err(wildcard_error(host));
        } else {
            Target::Name(name_of_rule(host)?)
        };
        Ok(Rule {
            text: text.to_string(),
            target,
            port,
        })
    }

    /// The rule as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The port, or `None` for every port.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    fn port_matches(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }

    /// Whether this rule matches `name` (in normal form) on some port; IP rules
    /// never match a name.
    pub fn matches_name_any_port(&self, name: &str) -> bool {
        match &self.target {
            Target::AnyName => true,
            Target::Name(n) => n == name,
            Target::Subdomains(suffix) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            Target::Net(_) => false,
        }
    }

    /// Whether this rule matches `name` (in normal form) on `port`.
    pub fn matches_name(&self, name: &str, port: u16) -> bool {
        self.port_matches(port) && self.matches_name_any_port(name)
    }

    /// Whether this is a network rule containing `ip`, on some port.
    pub fn matches_addr_any_port(&self, ip: IpAddr) -> bool {
        matches!(&self.target, Target::Net(net) if net.contains(ip))
    }

    /// Whether this is a network rule containing `ip`, on `port`.
    pub fn matches_addr(&self, ip: IpAddr, port: u16) -> bool {
        self.port_matches(port) && self.matches_addr_any_port(ip)
    }

    /// Why this rule is too broad to allow without `allow_broad = true`, if it is:
    /// `*`; a wildcard over one label or over a suffix of the public suffix list
    /// (its ICANN and its private section: `*.github.io` lets anyone who makes a
    /// GitHub Pages site receive data); an IPv4 network shorter than /8 or an IPv6
    /// network shorter than /16.
    pub fn too_broad(&self) -> Option<String> {
        match &self.target {
            Target::AnyName => Some("`*` allows every host name".to_string()),
            Target::Name(_) => None,
            Target::Subdomains(suffix) => {
                if !suffix.contains('.') {
                    Some(format!(
                        "`*.{suffix}` allows every name under the top-level domain `{suffix}`"
                    ))
                } else if is_public_suffix(suffix) {
                    Some(format!(
                        "`*.{suffix}` allows every site under `{suffix}`, a public suffix (anyone can register a name there)"
                    ))
                } else {
                    None
                }
            }
            Target::Net(net) => {
                let min = if net.addr.is_ipv4() {
                    MIN_BROAD_V4
                } else {
                    MIN_BROAD_V6
                };
                (net.prefix < min).then(|| format!("`{net}` spans more than a /{min}"))
            }
        }
    }
}

impl fmt::Display for Host {
    /// A name as is, an address as std writes it (`::ffff:169.254.169.254`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Whether `suffix` (normal form) is exactly a suffix of the public suffix list,
/// ICANN or private section. The list is compiled into the `psl` crate; it is
/// consulted in both the ASCII and the Unicode spelling, since lists differ in
/// which one they carry for international suffixes.
pub fn is_public_suffix(suffix: &str) -> bool {
    let known = |name: &str| {
        psl::suffix(name.as_bytes())
            .is_some_and(|s| s.is_known() && s.as_bytes() == name.as_bytes())
    };
    if known(suffix) {
        return true;
    }
    let (unicode, result) = idna::domain_to_unicode(suffix);
    result.is_ok() && unicode != suffix && known(&unicode)
}

fn wildcard_error(host: &str) -> String {
    format!("`{host}`: `*` is allowed only as the whole first label, as in `*.example.com`")
}

/// A rule's name part: a host name, never an IP address in disguise.
fn name_of_rule(text: &str) -> Result<String, String> {
    match parse_host(text)? {
        Host::Name(name) => Ok(name),
        Host::Ip(ip) => Err(format!(
            "`{text}` is the IP address {ip}; write the address as `{ip}`"
        )),
    }
}

/// Splits `host[:port]`, `[v6]` and `[v6]:port`; more than one `:` without
/// brackets is an IPv6 address or network with no port.
fn split_port(text: &str) -> Result<(&str, Option<u16>, bool), String> {
    if text.is_empty() {
        return Err("the rule is empty".to_string());
    }
    if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("`{text}` lacks its closing `]`"))?;
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(parse_port(port)?),
                None => return Err(format!("`{text}`: only `:port` may follow `]`")),
            },
        };
        return Ok((inside, port, true));
    }
    match text.matches(':').count() {
        0 => Ok((text, None, false)),
        1 => {
            let (host, port) = text.split_once(':').expect("one colon");
            Ok((host, Some(parse_port(port)?), false))
        }
        _ => Ok((text, None, false)),
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    let port: u32 = text
        .parse()
        .ok()
        .filter(|_| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("`{text}` is not a port number"))?;
    match port {
        1..=65535 => Ok(port as u16),
        _ => Err(format!("port {port} is out of range (1 to 65535)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> Rule {
        Rule::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn refused(text: &str, needle: &str) {
        let error = Rule::parse(text).expect_err(text);
        assert!(error.contains(needle), "{text}: {error:?} lacks {needle:?}");
    }

    fn name(text: &str) -> String {
        normalize_host(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(name("PyPI.org"), "pypi.org");
        assert_eq!(name("pypi.org."), "pypi.org");
        assert_eq!(name("_dmarc.example.com"), "_dmarc.example.com");
        assert_eq!(name("a-b.example"), "a-b.example");
    }

    #[test]
    fn idna_names_are_compared_in_ascii() {
        assert_eq!(name("Bücher.example"), "xn--bcher-kva.example");
        assert_eq!(name("xn--bcher-kva.example"), "xn--bcher-kva.example");
        let r = rule("bücher.example:443");
        assert!(r.matches_name(&name("BÜCHER.example."), 443));
        let r = rule("*.пример.рф");
        assert!(r.matches_name(&name("a.xn--e1afmkfd.xn--p1ai"), 1));
    }

    #[test]
    fn malformed_names_are_refused() {
        let long_label = format!("{}.example", "a".repeat(64));
        let long_name = format!("{}.example", vec!["a".repeat(60); 5].join("."));
        for (bad, needle) in [
            ("", "empty"),
            ("a..b", "empty label"),
            ("pypi.org..", "empty label"),
            (".pypi.org", "empty label"),
            (long_label.as_str(), "longer than 63"),
            (long_name.as_str(), "longer than 253"),
            ("a b.example", "` `"),
            ("a!.example", "`!`"),
            ("a/b", "`/`"),
            ("-a.example", "starts or ends with `-`"),
            ("1.2.3.256", "ends in a number"),
            ("foo.123", "ends in a number"),
            ("foo:bar", "neither a host name nor an IPv6"),
        ] {
            let error = normalize_host(bad).expect_err(bad);
            assert!(error.contains(needle), "{bad}: {error:?} lacks {needle:?}");
        }
    }

    #[test]
    fn every_spelling_inet_aton_accepts_is_an_address() {
        let loopback = Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        for text in [
            "127.0.0.1",
            "127.1",
            "0x7f.1",
            "0x7F.0.0.1",
            "2130706433",
            "0x7f000001",
            "017700000001",
            "0177.0.0.1",
            "127.0.0.1.",
            "１２７.０.０.１",
        ] {
            assert_eq!(parse_host(text), Ok(loopback.clone()), "{text}");
        }
        assert_eq!(
            parse_host("[::1]"),
            Ok(Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)))
        );
        assert_eq!(
            parse_host("::ffff:169.254.169.254"),
            Ok(Host::Ip("::ffff:a9fe:a9fe".parse().unwrap()))
        );
        assert!(normalize_host("0x7f.1").unwrap_err().contains("127.0.0.1"));
        assert_eq!(inet_aton("256.1.1.1"), None);
        assert_eq!(inet_aton("1.2.3.4.5"), None);
        assert_eq!(inet_aton("1.2.65536"), None);
        assert_eq!(inet_aton("08.1.1.1"), None);
        assert_eq!(inet_aton("1.2.65535"), Some(Ipv4Addr::new(1, 2, 255, 255)));
    }

    #[test]
    fn rule_forms() {
        let r = rule("pypi.org");
        assert_eq!(r.target(), &Target::Name("pypi.org".into()));
        assert_eq!(r.port(), None);
        let r = rule("github.com:443");
        assert_eq!(r.port(), Some(443));
        let r = rule("10.20.0.0/16:5432");
        assert_eq!(
            r.target(),
            &Target::Net(Cidr::parse("10.20.0.0/16").unwrap())
        );
        assert_eq!(r.port(), Some(5432));
        let r = rule("192.0.2.7:80");
        assert_eq!(
            r.target(),
            &Target::Net(Cidr::parse("192.0.2.7/32").unwrap())
        );
        let r = rule("[2001:db8::/32]:443");
        assert_eq!(r.port(), Some(443));
        assert!(r.matches_addr("2001:db8::1".parse().unwrap(), 443));
        assert_eq!(rule("2001:db8::/32").port(), None);
        assert_eq!(rule("[2001:db8::/32]").port(), None);
        let r = rule("[2001:db8::7]:80");
        assert_eq!(
            r.target(),
            &Target::Net(Cidr::parse("2001:db8::7/128").unwrap())
        );
        assert_eq!(rule("*").target(), &Target::AnyName);
        assert_eq!(rule("*:443").port(), Some(443));
        assert_eq!(
            rule("Files.PythonHosted.org.:443").text(),
            "Files.PythonHosted.org.:443"
        );
    }

    #[test]
    fn malformed_rules_are_refused() {
        refused("", "empty");
        refused("pypi.org:0", "out of range");
        refused("pypi.org:65536", "out of range");
        refused("pypi.org:", "not a port");
        refused("pypi.org:https", "not a port");
        refused("pypi.org:+443", "not a port");
        refused("a.*.example", "whole first label");
        refused("*a.example", "whole first label");
        refused("**.example", "whole first label");
        refused("*.*.example", "whole first label");
        refused("example.*", "whole first label");
        refused("0x7f.1", "write the address as `127.0.0.1`");
        refused("10.0.0.0/33", "longer than an IPv4");
        refused("10.0.0.0/x", "not a prefix length");
        refused("[10.0.0.0/8]:80", "only IPv6");
        refused("[2001:db8::/32", "closing `]`");
        refused("[2001:db8::/32]443", "only `:port`");
        refused("2001:db8::/32:443", "in brackets");
        refused("*.0x7f.1", "IP address");
    }

    #[test]
    fn a_cidr_with_host_bits_is_refused_with_the_network_form() {
        refused("10.0.0.1/8", "write the network as `10.0.0.0/8`");
        refused(
            "[2001:db8::1/32]:443",
            "write the network as `2001:db8::/32`",
        );
        refused("192.168.1.77/24:22", "`192.168.1.0/24`");
    }

    #[test]
    fn a_wildcard_never_matches_its_bare_suffix() {
        let r = rule("*.pythonhosted.org");
        assert!(r.matches_name("a.pythonhosted.org", 443));
        assert!(r.matches_name("x.y.pythonhosted.org", 443));
        assert!(!r.matches_name("pythonhosted.org", 443));
        assert!(!r.matches_name("evilpythonhosted.org", 443));
        assert!(!r.matches_name(".pythonhosted.org", 443));
    }

    #[test]
    fn a_name_rule_matches_only_that_name() {
        let r = rule("pypi.org");
        assert!(r.matches_name("pypi.org", 1));
        assert!(r.matches_name("pypi.org", 65535));
        assert!(!r.matches_name("www.pypi.org", 443));
        assert!(!r.matches_name("pypi.org.evil.test", 443));
        assert!(!r.matches_addr_any_port("151.101.0.223".parse().unwrap()));
    }

    #[test]
    fn a_rule_with_a_port_matches_no_other_port() {
        let r = rule("github.com:443");
        assert!(r.matches_name("github.com", 443));
        assert!(!r.matches_name("github.com", 22));
        let r = rule("10.20.0.0/16:5432");
        assert!(r.matches_addr("10.20.3.4".parse().unwrap(), 5432));
        assert!(!r.matches_addr("10.20.3.4".parse().unwrap(), 5433));
    }

    #[test]
    fn an_ipv4_network_does_not_match_mapped_ipv6() {
        let r = rule("10.0.0.0/8");
        assert!(r.matches_addr_any_port("10.1.2.3".parse().unwrap()));
        assert!(!r.matches_addr_any_port("::ffff:10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn too_broad_rules() {
        for (text, needle) in [
            ("*", "every host name"),
            ("*:443", "every host name"),
            ("*.com", "top-level domain `com`"),
            ("*.internal", "top-level domain"),
            ("*.co.uk", "public suffix"),
            ("*.github.io", "public suffix"),
            ("*.s3.amazonaws.com", "public suffix"),
            ("*.рф", "top-level domain"),
            ("*.com.ru", "public suffix"),
            ("0.0.0.0/0", "more than a /8"),
            ("::/0", "more than a /16"),
            ("128.0.0.0/1", "more than a /8"),
            ("[2000::/3]:443", "more than a /16"),
        ] {
            let r = rule(text);
            let why = r.too_broad().unwrap_or_else(|| panic!("{text} is broad"));
            assert!(why.contains(needle), "{text}: {why:?} lacks {needle:?}");
        }
        for text in [
            "*.pythonhosted.org",
            "*.user.github.io",
            "pypi.org",
            "com",
            "10.0.0.0/8",
            "2001::/16",
            "*.example.co.uk",
        ] {
            assert_eq!(rule(text).too_broad(), None, "{text}");
        }
    }

    #[test]
    fn public_suffixes_are_known_in_both_spellings() {
        assert!(is_public_suffix("co.uk"));
        assert!(is_public_suffix("github.io"));
        assert!(is_public_suffix("xn--p1ai"));
        assert!(!is_public_suffix("example.co.uk"));
        assert!(!is_public_suffix("pythonhosted.org"));
    }
}
