//! Address classes an egress session may not reach unless a CIDR allow rule
//! names them explicitly: everything that is not an ordinary public address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use super::rules::Cidr;

/// A kind of address refused unless a CIDR allow rule covers it (see
/// [`super::EgressPolicy::decide`] for what "covers" means).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressClass {
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// `0.0.0.0/8` ("this network"), `::`.
    Unspecified,
    /// RFC 1918 `10/8`, `172.16/12`, `192.168/16`, and IPv6 site-local
    /// `fec0::/10` (deprecated, still routed inside some networks).
    Private,
    /// `169.254.0.0/16`, `fe80::/10`.
    LinkLocal,
    /// Shared address space of carrier-grade NAT, `100.64.0.0/10`.
    Cgnat,
    /// IPv6 unique local addresses, `fc00::/7`.
    UniqueLocal,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// The rest of `240.0.0.0/4`, IETF protocol assignments `192.0.0.0/24`, and
    /// the IPv6 discard prefix `100::/64`.
    Reserved,
    /// Cloud instance metadata services, which hand out credentials:
    /// `169.254.169.254` (AWS, GCP, Azure, OCI and others), `fd00:ec2::254`
    /// (AWS over IPv6), `100.100.100.200` (Alibaba Cloud).
    Metadata,
    /// Documentation ranges: `192.0.2.0/24`, `198.51.100.0/24`,
    /// `203.0.113.0/24`, `2001:db8::/32`, `3fff::/20`. Never routed on the
    /// internet; whatever answers there is local.
    Documentation,
    /// Benchmarking ranges `198.18.0.0/15`, `2001:2::/48`; same reason.
    Benchmark,
    /// An IPv6 address that carries an IPv4 one: IPv4-mapped `::ffff:0:0/96`,
    /// IPv4-translated `::ffff:0:0:0/96`, IPv4-compatible `::/96`, NAT64
    /// `64:ff9b::/96` and `64:ff9b:1::/48`, 6to4 `2002::/16`, Teredo
    /// `2001::/32`. Reaching one may reach its IPv4 address, so both are judged.
    Ipv4InIpv6,
    /// One of the host's own addresses (given by the caller, never read here).
    HostAddress,
}

impl AddressClass {
    /// Short words for messages: `"metadata"`, `"loopback"`, ...
    pub fn name(self) -> &'static str {
        match self {
            AddressClass::Loopback => "loopback",
            AddressClass::Unspecified => "unspecified",
            AddressClass::Private => "private",
            AddressClass::LinkLocal => "link-local",
            AddressClass::Cgnat => "carrier-grade NAT",
            AddressClass::UniqueLocal => "unique local",
            AddressClass::Multicast => "multicast",
            AddressClass::Broadcast => "broadcast",
            AddressClass::Reserved => "reserved",
            AddressClass::Metadata => "metadata",
            AddressClass::Documentation => "documentation",
            AddressClass::Benchmark => "benchmarking",
            AddressClass::Ipv4InIpv6 => "IPv4-in-IPv6",
            AddressClass::HostAddress => "host",
        }
    }

    /// Which class to report when an IPv6 address may carry several IPv4 ones
    /// (the positions of `64:ff9b:1::/48`, Teredo's server and client): the most
    /// telling, never the all-zero artefact of a position not in use.
    pub(crate) fn rank(self) -> u8 {
        match self {
            AddressClass::Metadata => 3,
            AddressClass::HostAddress | AddressClass::Loopback => 2,
            AddressClass::Unspecified => 0,
            _ => 1,
        }
    }

    /// The class with its article, for a sentence: `a loopback address`,
    /// `an IPv4-in-IPv6 address`, `an address of this host`.
    pub fn with_article(self) -> String {
        match self {
            AddressClass::HostAddress => "an address of this host".to_string(),
            AddressClass::Ipv4InIpv6 => format!("an {self}"),
            _ => format!("a {self}"),
        }
    }
}

impl fmt::Display for AddressClass {
    /// `loopback address`, `address of this host`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressClass::HostAddress => f.write_str("address of this host"),
            _ => write!(f, "{} address", self.name()),
        }
    }
}

/// Refused ranges, most specific first: the first that contains an address
/// classifies it.
static RANGES: LazyLock<Vec<(Cidr, AddressClass)>> = LazyLock::new(|| {
    use AddressClass::*;
    [
        ("169.254.169.254/32", Metadata),
        ("100.100.100.200/32", Metadata),
        ("0.0.0.0/8", Unspecified),
        ("127.0.0.0/8", Loopback),
        ("10.0.0.0/8", Private),
        ("172.16.0.0/12", Private),
        ("192.168.0.0/16", Private),
        ("169.254.0.0/16", LinkLocal),
        ("100.64.0.0/10", Cgnat),
        ("192.0.0.0/24", Reserved),
        ("192.0.2.0/24", Documentation),
        ("198.51.100.0/24", Documentation),
        ("203.0.113.0/24", Documentation),
        ("198.18.0.0/15", Benchmark),
        ("224.0.0.0/4", Multicast),
        ("255.255.255.255/32", Broadcast),
        ("240.0.0.0/4", Reserved),
        ("::/128", Unspecified),
        ("::1/128", Loopback),
        ("fd00:ec2::254/128", Metadata),
        ("::ffff:0:0/96", Ipv4InIpv6),
        ("::ffff:0:0:0/96", Ipv4InIpv6),
        ("::/96", Ipv4InIpv6),
        ("64:ff9b::/96", Ipv4InIpv6),
        ("64:ff9b:1::/48", Ipv4InIpv6),
        ("2002::/16", Ipv4InIpv6),
        ("2001::/32", Ipv4InIpv6),
        ("fe80::/10", LinkLocal),
        ("fec0::/10", Private),
        ("fc00::/7", UniqueLocal),
        ("ff00::/8", Multicast),
        ("2001:db8::/32", Documentation),
        ("3fff::/20", Documentation),
        ("2001:2::/48", Benchmark),
        ("100::/64", Reserved),
    ]
    .into_iter()
    .map(|(net, class)| (Cidr::parse(net).expect("a valid range"), class))
    .collect()
});

/// The refused range containing `ip` and its class, judging `ip` alone (an
/// IPv6 address carrying IPv4 is [`AddressClass::Ipv4InIpv6`] here).
pub(crate) fn range_of(ip: IpAddr) -> Option<(Cidr, AddressClass)> {
    RANGES.iter().find(|(net, _)| net.contains(ip)).copied()
}

/// The class of `ip`, or `None` for an ordinary public address. An IPv6 address
/// that carries IPv4 reports the class of the IPv4 address it carries when that
/// has one (`::ffff:169.254.169.254` is [`AddressClass::Metadata`]), else
/// [`AddressClass::Ipv4InIpv6`]. The host's own addresses are not known here:
/// [`super::EgressPolicy::decide`] takes them as a parameter.
pub fn classify(ip: IpAddr) -> Option<AddressClass> {
    let (_, class) = range_of(ip)?;
    if class != AddressClass::Ipv4InIpv6 {
        return Some(class);
    }
    let IpAddr::V6(v6) = ip else {
        return Some(class);
    };
    embedded_ipv4(v6)
        .into_iter()
        .filter_map(|v4| classify(IpAddr::V4(v4)))
        .max_by_key(|c| c.rank())
        .or(Some(class))
}

/// The IPv4 addresses an IPv6 address may carry: the last 32 bits of the mapped,
/// translated, compatible and NAT64 `/96` forms; for the local-use NAT64 prefix
/// `64:ff9b:1::/48`, every position RFC 6052 allows within it (prefix lengths
/// 48, 56, 64 and 96), since the prefix length used is a local choice; the 6to4
/// address (bits 16..48); and for Teredo both the server (bits 32..64) and the
/// client (the last 32 bits, inverted). Empty for any other address.
pub fn embedded_ipv4(ip: Ipv6Addr) -> Vec<Ipv4Addr> {
    let Some((net, AddressClass::Ipv4InIpv6)) = range_of(IpAddr::V6(ip)) else {
        return Vec::new();
    };
    let o = ip.octets();
    let v4 = |a: u8, b: u8, c: u8, d: u8| Ipv4Addr::new(a, b, c, d);
    let last = v4(o[12], o[13], o[14], o[15]);
    match net.addr() {
        IpAddr::V6(prefix) if prefix == Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0) => vec![
            v4(o[6], o[7], o[9], o[10]),
            v4(o[7], o[9], o[10], o[11]),
            v4(o[9], o[10], o[11], o[12]),
            last,
        ],
        IpAddr::V6(prefix) if prefix == Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0) => {
            vec![v4(o[2], o[3], o[4], o[5])]
        }
        IpAddr::V6(prefix) if prefix == Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0) => vec![
            v4(o[4], o[5], o[6], o[7]),
            v4(!o[12], !o[13], !o[14], !o[15]),
        ],
        _ => vec![last],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(text: &str) -> Option<AddressClass> {
        classify(text.parse().unwrap())
    }

    #[test]
    fn ipv4_classes() {
        use AddressClass::*;
        for (ip, expected) in [
            ("127.0.0.1", Some(Loopback)),
            ("127.255.1.2", Some(Loopback)),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("10.1.2.3", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("172.32.0.1", None),
            ("192.168.1.1", Some(Private)),
            ("169.254.1.1", Some(LinkLocal)),
            ("169.254.169.254", Some(Metadata)),
            ("100.100.100.200", Some(Metadata)),
            ("100.64.0.1", Some(Cgnat)),
            ("100.128.0.1", None),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("255.255.255.255", Some(Broadcast)),
            ("240.0.0.1", Some(Reserved)),
            ("192.0.0.8", Some(Reserved)),
            ("192.0.2.7", Some(Documentation)),
            ("198.18.0.1", Some(Benchmark)),
            ("1.1.1.1", None),
            ("151.101.0.223", None),
        ] {
            assert_eq!(class(ip), expected, "{ip}");
        }
    }

    #[test]
    fn ipv6_classes() {
        use AddressClass::*;
        for (ip, expected) in [
            ("::1", Some(Loopback)),
            ("::", Some(Unspecified)),
            ("fe80::1", Some(LinkLocal)),
            ("fd00::1", Some(UniqueLocal)),
            ("fc00::1", Some(UniqueLocal)),
            ("fec0::1", Some(Private)),
            ("fd00:ec2::254", Some(Metadata)),
            ("ff02::1", Some(Multicast)),
            ("2001:db8::1", Some(Documentation)),
            ("2001:2::1", Some(Benchmark)),
            ("100::1", Some(Reserved)),
            ("2606:4700::1111", None),
            ("2a04:4e42::223", None),
        ] {
            assert_eq!(class(ip), expected, "{ip}");
        }
    }

    #[test]
    fn mapped_ipv6_metadata_is_reported_as_metadata() {
        use AddressClass::*;
        for (ip, expected) in [
            ("::ffff:169.254.169.254", Metadata),
            ("::ffff:a9fe:a9fe", Metadata),
            ("::169.254.169.254", Metadata),
            ("::ffff:0:a9fe:a9fe", Metadata),
            ("64:ff9b::a9fe:a9fe", Metadata),
            ("64:ff9b:1:a9fe:a9:fe00::", Metadata),
            ("64:ff9b:1::a9fe:a9fe", Metadata),
            ("2002:a9fe:a9fe::1", Metadata),
            ("2001:0:a9fe:a9fe::1", Metadata),
            ("2001:0:4136:e378:8000:63bf:5601:5601", Metadata),
            ("::ffff:127.0.0.1", Loopback),
            ("2002:7f00:1::", Loopback),
            ("::ffff:10.0.0.1", Private),
            ("::ffff:1.1.1.1", Ipv4InIpv6),
            ("64:ff9b::101:101", Ipv4InIpv6),
            ("2002:101:101::1", Ipv4InIpv6),
        ] {
            assert_eq!(class(ip), Some(expected), "{ip}");
        }
    }

    #[test]
    fn embedded_addresses() {
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let v4 = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(embedded_ipv4(v6("::ffff:1.2.3.4")), [v4("1.2.3.4")]);
        assert_eq!(embedded_ipv4(v6("2002:102:304::")), [v4("1.2.3.4")]);
        assert_eq!(
            embedded_ipv4(v6("2001:0:102:304::fefd:fcfb")),
            [v4("1.2.3.4"), v4("1.2.3.4")]
        );
        assert!(embedded_ipv4(v6("2606:4700::1111")).is_empty());
    }
}
