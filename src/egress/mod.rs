//! The egress policy of `network.mode = "egress"`: which hosts a session may reach,
//! as validated data and one decision function.
//!
//! This module owns the rules of an environment's `[egress]` table ([`Rule`]), the
//! normal form of host names ([`normalize_host`], [`parse_host`]), the address
//! classes a session never reaches by accident ([`AddressClass`], [`classify`]), and
//! the decision ([`EgressPolicy::decide`], [`EgressPolicy::name_allowed`]). It
//! does no I/O: it resolves no name and reads no interface; the worker's proxy, the
//! session's DNS resolver and the kernel barrier of the session's network namespace
//! call it with what they saw, and enforce its answer.
//!
//! Its submodules are that enforcement, served from the worker's runtime for
//! each session in the mode: [`proxy`] (the explicit HTTP and SOCKS5 proxies and
//! the transparent listener), `relay` (the `splice(2)` relay of an allowed
//! connection's bytes), [`sniff`] (the name a connection's first bytes
//! carry) and [`dns`] (the session resolver, which answers only allowed names and
//! never forwards another upstream). The kernel barrier that leaves a session no
//! other way out is [`crate::sandbox::netfilter`].
//!
//! # Rules
//!
//! - a host name, `pypi.org`, optionally with a port, `github.com:443` (without a
//!   port: every port). Compared in normal form: lower case, no trailing dot,
//!   international names in their ASCII (punycode) form.
//! - `*.suffix`: every name strictly below the suffix (`a.pythonhosted.org`,
//!   `x.y.pythonhosted.org`), never the suffix itself; optional port. `*` is
//!   allowed only as the whole first label, or alone (every name, too broad).
//! - a network, `10.20.0.0/16`, `10.20.0.0/16:5432`; a bare address is a `/32` or
//!   `/128` (`192.0.2.7:80`); IPv6 in brackets when a port follows
//!   (`[2001:db8::/32]:443`), brackets optional without one. A network with host
//!   bits set (`10.0.0.1/8`) is refused with its network form in the message.
//!
//! Too broad, refused in `allow` unless `allow_broad = true` ([`Rule::too_broad`]):
//! `*`; a wildcard over a single label (`*.com`, `*.internal`) or over any suffix of
//! the public suffix list, ICANN and private sections alike (`*.co.uk`,
//! `*.github.io`: anyone can publish under those); an IPv4 network shorter than
//! `/8` or an IPv6 one shorter than `/16`.
//!
//! # The decision
//!
//! Quoted from the specification of the egress mode, and implemented as written:
//!
//! > A connection is allowed when no deny rule matches its name or address, and
//! > either (a) a name rule matches its name and port and every address it resolves
//! > to is outside the refused classes or inside a CIDR allow rule for that port, or
//! > (b) it has no name (an IP literal, or a transparent connection without
//! > SNI/Host/resolver answer) and a CIDR rule matches its address and port. A
//! > connection whose name is denied or unmatched is refused even when its address
//! > is allowed by a CIDR rule. An IP literal is matched only by CIDR rules.
//!
//! Precisions this module adds:
//!
//! - In both cases, an address of a refused class ([`AddressClass`], including the
//!   host's own addresses the caller passes) is allowed only when a CIDR allow
//!   rule for the port contains it **and lies within the class's range** (a rule
//!   inside `10.0.0.0/8` for a private `10.x` address; exactly
//!   `169.254.169.254/32` for the metadata address; exactly the address for one of
//!   the host's own). So a broad rule such as `0.0.0.0/0` (with `allow_broad`)
//!   never opens loopback, the metadata service or the host itself.
//! - An IPv6 address carrying IPv4 is refused as [`AddressClass::Ipv4InIpv6`]
//!   unless an IPv6 rule within its carrying prefix allows it, and the IPv4
//!   address it carries is judged as well, as if connected to directly:
//!   `::ffff:169.254.169.254` is refused as a metadata address. IPv4 rules never
//!   match IPv6 addresses.
//! - A name given as an IP literal (`[::1]`, and every IPv4 spelling
//!   `inet_aton(3)` accepts: `0x7f.1`, `2130706433`) is no name: case (b) with that
//!   address.
//! - A connection with a name but no address is refused (nothing to judge); so
//!   is a connection with neither. The caller passes every address it may connect
//!   to.
//! - Deny rules match names on their port (or every port), and any address of the
//!   connection by CIDR.

mod classes;
pub mod dns;
mod framing;
pub mod proxy;
mod relay;
mod rules;
pub mod sniff;

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

pub use classes::{classify, embedded_ipv4, AddressClass};
pub use rules::{
    inet_aton, is_public_suffix, normalize_host, parse_host, Cidr, Host, Rule, Target,
};

/// The port a resolver listens on when its address gives none.
const DNS_PORT: u16 = 53;

/// The validated `[egress]` table of a policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Destinations a session may reach, in file order.
    pub allow: Vec<Rule>,
    /// Destinations refused even when an allow rule matches them.
    pub deny: Vec<Rule>,
    /// DNS servers the worker asks on the session's behalf; empty: the host's own
    /// (`/etc/resolv.conf`).
    pub resolvers: Vec<SocketAddr>,
    /// Whether too-broad allow rules were accepted.
    pub allow_broad: bool,
}

/// A bad entry of an `[egress]` table: `key` is relative to the table
/// (`allow[2]`, `resolvers[0]`), the caller prefixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl std::error::Error for RuleError {}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// A deny rule matches the name or an address (the decision names the rule).
    DenyRule,
    /// No allow rule matches. `what` is the name, or the address of a nameless
    /// connection; `other_port` says whether some rule matches it on another port.
    NoRule { what: String, other_port: bool },
    /// An address of a refused class that no suitable CIDR allow rule covers.
    Class { class: AddressClass, addr: IpAddr },
    /// Nothing to judge: a name that resolved to no address, or no name and no
    /// address.
    NoAddress,
    /// The name is not a host name (the message says why).
    BadName(String),
}

/// The answer of [`EgressPolicy::decide`]; its `Display` is a short text for the
/// agent: `evil.test:443 denied: no rule allows evil.test`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        /// `name:port` or `address:port`.
        target: String,
        /// The allow rule, as written.
        rule: String,
    },
    Deny {
        target: String,
        reason: DenyReason,
        /// The deny rule that matched, if one did.
        rule: Option<String>,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The rule that decided, as written; `None` when no rule did.
    pub fn rule(&self) -> Option<&str> {
        match self {
            Decision::Allow { rule, .. } => Some(rule),
            Decision::Deny { rule, .. } => rule.as_deref(),
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow { target, rule } => write!(f, "{target} allowed (rule: {rule})"),
            Decision::Deny {
                target,
                reason,
                rule,
            } => {
                write!(f, "{target} denied: ")?;
                match reason {
                    DenyReason::DenyRule => write!(
                        f,
                        "a deny rule matches (rule: {})",
                        rule.as_deref().unwrap_or("none")
                    ),
                    DenyReason::NoRule { what, other_port } => {
                        write!(f, "no rule allows {what}")?;
                        if *other_port {
                            let port = target.rsplit(':').next().unwrap_or("");
                            write!(f, " on port {port}")?;
                        }
                        Ok(())
                    }
                    DenyReason::Class { class, addr } => {
                        match target.parse::<SocketAddr>() {
                            Ok(sa) if sa.ip() == *addr => write!(f, "{class}")?,
                            Ok(_) => write!(f, "{addr} is {}", class.with_article())?,
                            Err(_) => write!(f, "resolves to {addr}, {}", class.with_article())?,
                        }
                        f.write_str(" (rule: none)")
                    }
                    DenyReason::NoAddress => write!(f, "no address to connect to"),
                    DenyReason::BadName(message) => f.write_str(message),
                }
            }
        }
    }
}

fn target(name: Option<&str>, addr: Option<IpAddr>, port: u16) -> String {
    match (name, addr) {
        (Some(name), _) => format!("{name}:{port}"),
        (None, Some(ip)) => SocketAddr::new(ip, port).to_string(),
        (None, None) => format!("(nothing):{port}"),
    }
}

impl EgressPolicy {
    /// Parses the strings of an `[egress]` table. `allow` may be empty here (then
    /// nothing is allowed); a policy requires it not to be. Refuses malformed rules,
    /// duplicates, too-broad allow rules unless `allow_broad`, and resolvers that
    /// are not `address` or `address:port` (IPv6 bracketed with a port).
    pub fn parse(
        allow: &[String],
        deny: &[String],
        resolvers: &[String],
        allow_broad: bool,
    ) -> Result<EgressPolicy, RuleError> {
        let allow = parse_rules("allow", allow, Some(allow_broad))?;
        let deny = parse_rules("deny", deny, None)?;
        let mut parsed = Vec::with_capacity(resolvers.len());
        for (i, text) in resolvers.iter().enumerate() {
            let error = |message: String| RuleError {
                key: format!("resolvers[{i}]"),
                message,
            };
            let addr = parse_resolver(text).map_err(error)?;
            if parsed.contains(&addr) {
                return Err(error(format!("`{text}` is listed twice")));
            }
            parsed.push(addr);
        }
        Ok(EgressPolicy {
            allow,
            deny,
            resolvers: parsed,
            allow_broad,
        })
    }

    /// Decides one connection (see the module doc for the exact rule). `name` is
    /// what the connection names (SNI, `Host`, the question the session's resolver
    /// answered), `None` for a transparent connection that names nothing; `addrs`
    /// every address it may connect to; `host_addrs` the host's own interface
    /// addresses, refused like a class.
    pub fn decide(
        &self,
        name: Option<&str>,
        port: u16,
        addrs: &[IpAddr],
        host_addrs: &[IpAddr],
    ) -> Decision {
        let mut addrs = addrs.to_vec();
        let name = match name.map(parse_host) {
            None => None,
            Some(Ok(Host::Name(name))) => Some(name),
            Some(Ok(Host::Ip(ip))) => {
                if !addrs.contains(&ip) {
                    addrs.insert(0, ip);
                }
                None
            }
            Some(Err(message)) => {
                return Decision::Deny {
                    target: format!("{}:{port}", name.unwrap_or_default()),
                    reason: DenyReason::BadName(message),
                    rule: None,
                }
            }
        };
        let target = target(name.as_deref(), addrs.first().copied(), port);
        let deny = |reason, rule: Option<&Rule>| Decision::Deny {
            target: target.clone(),
            reason,
            rule: rule.map(|r| r.text().to_string()),
        };

        // No deny rule may match the name or any address.
        let denied = self.deny.iter().find(|r| {
            name.as_deref().is_some_and(|n| r.matches_name(n, port))
                || addrs.iter().any(|ip| r.matches_addr(*ip, port))
        });
        if let Some(rule) = denied {
            return deny(DenyReason::DenyRule, Some(rule));
        }

        let rule = match &name {
            // (a) a name rule matches the name and port ...
            Some(name) => {
                let Some(rule) = self.allow.iter().find(|r| r.matches_name(name, port)) else {
                    let other_port = self.allow.iter().any(|r| r.matches_name_any_port(name));
                    return deny(
                        DenyReason::NoRule {
                            what: name.clone(),
                            other_port,
                        },
                        None,
                    );
                };
                rule
            }
            // (b) ... or, without a name, a CIDR rule matches every address and port.
            None => {
                let mut first = None;
                for ip in &addrs {
                    match self.allow.iter().find(|r| r.matches_addr(*ip, port)) {
                        Some(rule) => {
                            first.get_or_insert(rule);
                        }
                        None => {
                            let other_port =
                                self.allow.iter().any(|r| r.matches_addr_any_port(*ip));
                            return deny(
                                DenyReason::NoRule {
                                    what: ip.to_string(),
                                    other_port,
                                },
                                None,
                            );
                        }
                    }
                }
                match first {
                    Some(rule) => rule,
                    None => return deny(DenyReason::NoAddress, None),
                }
            }
        };
        if addrs.is_empty() {
            return deny(DenyReason::NoAddress, None);
        }
        // ... and every address is outside the refused classes or explicitly allowed.
        for ip in &addrs {
            if let Some((class, addr)) = self.refusal(*ip, port, host_addrs) {
                return deny(DenyReason::Class { class, addr }, None);
            }
        }
        Decision::Allow {
            target,
            rule: rule.text().to_string(),
        }
    }

    /// Whether the session's resolver may answer a question for `name`: some
    /// allow name rule matches it (on `port`, or on any port when `None`) and no
    /// deny name rule does. Malformed names and IP literals are not answerable.
    /// Cheap: no address is judged (that is [`EgressPolicy::decide`]'s work).
    pub fn name_allowed(&self, name: &str, port: Option<u16>) -> bool {
        let Ok(Host::Name(name)) = parse_host(name) else {
            return false;
        };
        let matches = |r: &Rule| match port {
            Some(port) => r.matches_name(&name, port),
            None => r.matches_name_any_port(&name),
        };
        let denied = |r: &Rule| match port {
            Some(port) => r.matches_name(&name, port),
            None => r.port().is_none() && r.matches_name_any_port(&name),
        };
        self.allow.iter().any(matches) && !self.deny.iter().any(denied)
    }

    /// The class that refuses `ip` (and the address it applies to: the IPv4 one
    /// carried in an IPv6 address, when that is what is refused), unless a CIDR
    /// allow rule for `port` within the class's range contains it.
    fn refusal(
        &self,
        ip: IpAddr,
        port: u16,
        host_addrs: &[IpAddr],
    ) -> Option<(AddressClass, IpAddr)> {
        let allowed_within = |range: &Cidr| {
            self.allow.iter().any(|r| {
                matches!(r.target(), Target::Net(net) if range.covers(net))
                    && r.matches_addr(ip, port)
            })
        };
        if host_addrs.contains(&ip) && !allowed_within(&Cidr::host(ip)) {
            return Some((AddressClass::HostAddress, ip));
        }
        let (range, class) = classes::range_of(ip)?;
        if class != AddressClass::Ipv4InIpv6 {
            return (!allowed_within(&range)).then_some((class, ip));
        }
        let IpAddr::V6(v6) = ip else {
            return Some((class, ip));
        };
        if !allowed_within(&range) {
            return Some((classify(ip).unwrap_or(class), ip));
        }
        embedded_ipv4(v6)
            .into_iter()
            .filter_map(|v4| self.refusal(IpAddr::V4(v4), port, host_addrs))
            .max_by_key(|(class, _)| class.rank())
    }
}

fn parse_rules(
    list: &str,
    texts: &[String],
    allow_broad: Option<bool>,
) -> Result<Vec<Rule>, RuleError> {
    let mut rules: Vec<Rule> = Vec::with_capacity(texts.len());
    let mut seen = HashSet::new();
    for (i, text) in texts.iter().enumerate() {
        let error = |message: String| RuleError {
            key: format!("{list}[{i}]"),
            message,
        };
        let rule = Rule::parse(text).map_err(error)?;
        if allow_broad == Some(false) {
            if let Some(why) = rule.too_broad() {
                return Err(error(format!(
                    "`{text}` is too broad: {why}; set allow_broad = true in [egress] to allow it anyway"
                )));
            }
        }
        let key = (rule.target().clone(), rule.port());
        if !seen.insert(key) {
            return Err(error(format!("`{text}` is listed twice")));
        }
        rules.push(rule);
    }
    Ok(rules)
}

fn parse_resolver(text: &str) -> Result<SocketAddr, String> {
    let addr = match text.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => SocketAddr::new(
            text.parse::<IpAddr>().map_err(|_| {
                format!(
                    "`{text}` is not an IP address or address:port (IPv6 with a port in brackets)"
                )
            })?,
            DNS_PORT,
        ),
    };
    if addr.port() == 0 {
        return Err(format!("`{text}`: port 0 is not a port"));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests;
