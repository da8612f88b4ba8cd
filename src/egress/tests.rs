//! The decision, behaviour by behaviour; the bypass attempts an agent could make
//! are the `a_*_is_refused` tests.

use super::*;

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
    EgressPolicy::parse(&strings(allow), &strings(deny), &[], false)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| ip(s)).collect()
}

/// A public address for names that should resolve somewhere ordinary.
const PUBLIC: &str = "151.101.0.223";

fn decide(p: &EgressPolicy, name: Option<&str>, port: u16, addrs: &[&str]) -> Decision {
    p.decide(name, port, &ips(addrs), &[])
}

fn allowed_by(decision: &Decision, rule: &str) {
    assert_eq!(
        decision,
        &Decision::Allow {
            target: match decision {
                Decision::Allow { target, .. } => target.clone(),
                _ => panic!("{decision} should be allowed by {rule}"),
            },
            rule: rule.to_string()
        },
        "{decision}"
    );
}

fn denied_as(decision: &Decision, class: AddressClass) {
    match decision {
        Decision::Deny {
            reason: DenyReason::Class { class: c, .. },
            ..
        } if *c == class => {}
        other => panic!("{other} should be refused as {class}"),
    }
}

fn no_rule(decision: &Decision) {
    assert!(
        matches!(
            decision,
            Decision::Deny {
                reason: DenyReason::NoRule { .. },
                rule: None,
                ..
            }
        ),
        "{decision:?} should be refused for want of a rule"
    );
}

#[test]
fn a_name_rule_allows_its_name_at_a_public_address() {
    let p = policy(&["pypi.org", "github.com:443"], &[]);
    let d = decide(&p, Some("pypi.org"), 443, &[PUBLIC]);
    allowed_by(&d, "pypi.org");
    assert_eq!(d.to_string(), "pypi.org:443 allowed (rule: pypi.org)");
    allowed_by(&decide(&p, Some("PyPI.org."), 80, &[PUBLIC]), "pypi.org");
    allowed_by(
        &decide(&p, Some("github.com"), 443, &["2a04:4e42::223", PUBLIC]),
        "github.com:443",
    );
}

#[test]
fn an_unmatched_name_is_refused() {
    let p = policy(&["pypi.org"], &[]);
    let d = decide(&p, Some("evil.test"), 443, &[PUBLIC]);
    no_rule(&d);
    assert_eq!(
        d.to_string(),
        "evil.test:443 denied: no rule allows evil.test"
    );
    no_rule(&decide(&p, Some("pypi.org.evil.test"), 443, &[PUBLIC]));
    no_rule(&decide(&p, Some("www.pypi.org"), 443, &[PUBLIC]));
}

#[test]
fn a_port_other_than_the_rules_is_refused() {
    let p = policy(&["github.com:443", "10.20.0.0/16:5432"], &[]);
    let d = decide(&p, Some("github.com"), 22, &[PUBLIC]);
    no_rule(&d);
    assert_eq!(
        d.to_string(),
        "github.com:22 denied: no rule allows github.com on port 22"
    );
    no_rule(&decide(&p, None, 5433, &["10.20.1.1"]));
    allowed_by(&decide(&p, None, 5432, &["10.20.1.1"]), "10.20.0.0/16:5432");
}

#[test]
fn deny_wins_over_allow() {
    let p = policy(
        &["*.example.com", "10.0.0.0/8"],
        &["secret.example.com", "10.9.0.0/16:22"],
    );
    let d = decide(&p, Some("secret.example.com"), 443, &[PUBLIC]);
    assert_eq!(
        d,
        Decision::Deny {
            target: "secret.example.com:443".into(),
            reason: DenyReason::DenyRule,
            rule: Some("secret.example.com".into()),
        }
    );
    assert_eq!(
        d.to_string(),
        "secret.example.com:443 denied: a deny rule matches (rule: secret.example.com)"
    );
    allowed_by(
        &decide(&p, Some("www.example.com"), 443, &[PUBLIC]),
        "*.example.com",
    );
    // A deny network rule refuses a name that resolves into it, on its port only.
    let d = decide(&p, Some("www.example.com"), 22, &["10.9.1.1"]);
    assert_eq!(d.rule(), Some("10.9.0.0/16:22"), "{d}");
    allowed_by(&decide(&p, None, 80, &["10.9.1.1"]), "10.0.0.0/8");
}

#[test]
fn a_wildcard_never_matches_its_bare_suffix() {
    let p = policy(&["*.pythonhosted.org:443"], &[]);
    allowed_by(
        &decide(&p, Some("files.pythonhosted.org"), 443, &[PUBLIC]),
        "*.pythonhosted.org:443",
    );
    allowed_by(
        &decide(&p, Some("x.y.pythonhosted.org"), 443, &[PUBLIC]),
        "*.pythonhosted.org:443",
    );
    no_rule(&decide(&p, Some("pythonhosted.org"), 443, &[PUBLIC]));
}

#[test]
fn a_name_that_resolves_to_loopback_is_refused() {
    let p = policy(&["pypi.org"], &[]);
    let d = decide(&p, Some("pypi.org"), 443, &[PUBLIC, "127.0.0.1"]);
    denied_as(&d, AddressClass::Loopback);
    assert_eq!(
        d.to_string(),
        "pypi.org:443 denied: resolves to 127.0.0.1, a loopback address (rule: none)"
    );
    denied_as(
        &decide(&p, Some("pypi.org"), 443, &["::1"]),
        AddressClass::Loopback,
    );
    denied_as(
        &decide(&p, Some("pypi.org"), 443, &["0.0.0.0"]),
        AddressClass::Unspecified,
    );
}

#[test]
fn a_name_that_resolves_to_the_metadata_address_is_refused() {
    let p = policy(&["pypi.org", "*.internal.example"], &[]);
    for addr in ["169.254.169.254", "fd00:ec2::254", "100.100.100.200"] {
        denied_as(
            &decide(&p, Some("pypi.org"), 80, &[addr]),
            AddressClass::Metadata,
        );
    }
    denied_as(
        &decide(
            &p,
            Some("metadata.internal.example"),
            80,
            &["169.254.169.254"],
        ),
        AddressClass::Metadata,
    );
}

#[test]
fn names_resolving_to_private_networks_are_refused() {
    let p = policy(&["pypi.org"], &[]);
    for (addr, class) in [
        ("10.0.0.1", AddressClass::Private),
        ("192.168.1.1", AddressClass::Private),
        ("172.20.0.1", AddressClass::Private),
        ("169.254.0.1", AddressClass::LinkLocal),
        ("100.64.1.1", AddressClass::Cgnat),
        ("fd12::1", AddressClass::UniqueLocal),
        ("fe80::1", AddressClass::LinkLocal),
        ("224.0.0.251", AddressClass::Multicast),
        ("255.255.255.255", AddressClass::Broadcast),
        ("240.0.0.1", AddressClass::Reserved),
        ("192.0.2.1", AddressClass::Documentation),
    ] {
        denied_as(&decide(&p, Some("pypi.org"), 443, &[addr]), class);
    }
}

#[test]
fn mapped_ipv6_metadata_is_reported_as_metadata() {
    let p = policy(&["pypi.org"], &[]);
    for addr in [
        "::ffff:169.254.169.254",
        "::ffff:a9fe:a9fe",
        "64:ff9b::a9fe:a9fe",
        "2002:a9fe:a9fe::1",
        "::169.254.169.254",
    ] {
        let d = decide(&p, Some("pypi.org"), 80, &[addr]);
        denied_as(&d, AddressClass::Metadata);
        let d = decide(&p, None, 80, &[addr]);
        no_rule(&d);
    }
    let d = decide(&p, Some("pypi.org"), 80, &["::ffff:a9fe:a9fe"]);
    assert_eq!(
        d.to_string(),
        "pypi.org:80 denied: resolves to ::ffff:169.254.169.254, a metadata address (rule: none)"
    );
}

#[test]
fn ipv4_in_ipv6_is_a_class_of_its_own() {
    let p = policy(&["pypi.org", "151.101.0.0/16"], &[]);
    let d = decide(&p, Some("pypi.org"), 443, &["::ffff:151.101.0.223"]);
    denied_as(&d, AddressClass::Ipv4InIpv6);
    // The IPv4 rule does not reach the mapped form of its addresses.
    no_rule(&decide(&p, None, 443, &["::ffff:151.101.0.223"]));
    // An IPv6 rule for exactly the mapped addresses does.
    let p = policy(&["pypi.org", "::ffff:151.101.0.0/112"], &[]);
    allowed_by(
        &decide(&p, Some("pypi.org"), 443, &["::ffff:151.101.0.223"]),
        "pypi.org",
    );
}

#[test]
fn an_ipv6_rule_for_a_carried_address_does_not_open_the_ipv4_it_carries() {
    let p = policy(&["pypi.org", "::ffff:0:0/96"], &[]);
    let d = decide(&p, Some("pypi.org"), 80, &["::ffff:169.254.169.254"]);
    denied_as(&d, AddressClass::Metadata);
    let p = policy(&["pypi.org", "::ffff:0:0/96", "169.254.169.254:80"], &[]);
    allowed_by(
        &decide(&p, Some("pypi.org"), 80, &["::ffff:169.254.169.254"]),
        "pypi.org",
    );
}

#[test]
fn an_ip_literal_is_matched_only_by_cidr_rules() {
    let p = policy(&["pypi.org", "*.example.com"], &[]);
    for literal in [
        "151.101.0.223",
        "[2a04:4e42::223]",
        "2a04:4e42::223",
        "0x97.0x65.0.0xdf",
        "2539978975",
    ] {
        let d = p.decide(Some(literal), 443, &[], &[]);
        no_rule(&d);
    }
    let p = policy(&["151.101.0.0/16:443"], &[]);
    let d = p.decide(Some("2539978975"), 443, &[], &[]);
    allowed_by(&d, "151.101.0.0/16:443");
    assert_eq!(
        d.to_string(),
        "151.101.0.223:443 allowed (rule: 151.101.0.0/16:443)"
    );
}

#[test]
fn ip_literals_of_refused_classes_are_refused() {
    let p = policy(&["*.example.com", "2a04:4e42::/32"], &[]);
    for literal in [
        "127.0.0.1",
        "0x7f.1",
        "2130706433",
        "169.254.169.254",
        "[::ffff:a9fe:a9fe]",
        "64:ff9b::a9fe:a9fe",
        "2002:a9fe:a9fe::1",
        "[::1]",
    ] {
        let d = p.decide(Some(literal), 80, &[], &[]);
        no_rule(&d);
    }
    let d = p.decide(Some("169.254.169.254"), 80, &[], &[]);
    assert_eq!(
        d.to_string(),
        "169.254.169.254:80 denied: no rule allows 169.254.169.254"
    );
}

#[test]
fn a_broad_cidr_rule_does_not_open_the_refused_classes() {
    let p = EgressPolicy::parse(&strings(&["0.0.0.0/0", "::/0"]), &[], &[], true).unwrap();
    allowed_by(&decide(&p, None, 443, &[PUBLIC]), "0.0.0.0/0");
    for addr in [
        "127.0.0.1",
        "169.254.169.254",
        "10.1.1.1",
        "::1",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "2002:a9fe:a9fe::1",
        "2001:0:4136:e378:8000:63bf:5601:5601",
    ] {
        let d = decide(&p, None, 80, &[addr]);
        assert!(
            matches!(
                d,
                Decision::Deny {
                    reason: DenyReason::Class { .. },
                    ..
                }
            ),
            "{addr}: {d}"
        );
    }
    let d = decide(&p, None, 80, &["169.254.169.254"]);
    assert_eq!(
        d.to_string(),
        "169.254.169.254:80 denied: metadata address (rule: none)"
    );
}

#[test]
fn an_explicit_cidr_rule_opens_its_class() {
    let p = policy(
        &[
            "db.corp.example",
            "10.20.0.0/16:5432",
            "169.254.169.254/32:80",
        ],
        &[],
    );
    allowed_by(
        &decide(&p, Some("db.corp.example"), 5432, &["10.20.0.5"]),
        "db.corp.example",
    );
    denied_as(
        &decide(&p, Some("db.corp.example"), 5433, &["10.20.0.5"]),
        AddressClass::Private,
    );
    denied_as(
        &decide(&p, Some("db.corp.example"), 5432, &["10.21.0.5"]),
        AddressClass::Private,
    );
    allowed_by(&decide(&p, None, 5432, &["10.20.0.5"]), "10.20.0.0/16:5432");
    allowed_by(
        &decide(&p, None, 80, &["169.254.169.254"]),
        "169.254.169.254/32:80",
    );
}

#[test]
fn an_allowed_address_does_not_rescue_an_unmatched_name() {
    let p = policy(&["pypi.org", "151.101.0.0/16"], &[]);
    no_rule(&decide(&p, Some("evil.test"), 443, &[PUBLIC]));
    let p = policy(&["pypi.org", "151.101.0.0/16"], &["evil.test"]);
    let d = decide(&p, Some("evil.test"), 443, &[PUBLIC]);
    assert_eq!(d.rule(), Some("evil.test"));
}

#[test]
fn the_hosts_own_addresses_are_refused() {
    let p = EgressPolicy::parse(&strings(&["pypi.org", "198.51.0.0/16"]), &[], &[], false).unwrap();
    let host = ips(&["151.101.0.223", "2a04:4e42::223"]);
    let d = p.decide(Some("pypi.org"), 443, &ips(&[PUBLIC]), &host);
    denied_as(&d, AddressClass::HostAddress);
    assert_eq!(
        d.to_string(),
        "pypi.org:443 denied: resolves to 151.101.0.223, an address of this host (rule: none)"
    );
    let d = p.decide(
        Some("pypi.org"),
        443,
        &ips(&["::ffff:151.101.0.223"]),
        &host,
    );
    denied_as(&d, AddressClass::Ipv4InIpv6);
    let p = policy(&["pypi.org", "151.101.0.223/32:443"], &[]);
    allowed_by(
        &p.decide(Some("pypi.org"), 443, &ips(&[PUBLIC]), &host),
        "pypi.org",
    );
}

#[test]
fn nothing_to_judge_is_refused() {
    let p = policy(&["pypi.org"], &[]);
    let d = p.decide(Some("pypi.org"), 443, &[], &[]);
    assert!(
        matches!(
            d,
            Decision::Deny {
                reason: DenyReason::NoAddress,
                ..
            }
        ),
        "{d}"
    );
    let d = p.decide(None, 443, &[], &[]);
    assert!(
        matches!(
            d,
            Decision::Deny {
                reason: DenyReason::NoAddress,
                ..
            }
        ),
        "{d}"
    );
}

#[test]
fn a_malformed_name_is_refused() {
    let p = EgressPolicy::parse(&strings(&["*"]), &[], &[], true).unwrap();
    for bad in ["a..b", "foo.123", "a b", "-x.example"] {
        let d = p.decide(Some(bad), 443, &ips(&[PUBLIC]), &[]);
        assert!(
            matches!(
                d,
                Decision::Deny {
                    reason: DenyReason::BadName(_),
                    ..
                }
            ),
            "{bad}: {d}"
        );
    }
}

#[test]
fn idna_names_are_compared_in_ascii() {
    let p = policy(&["bücher.example", "*.xn--e1afmkfd.xn--p1ai:443"], &[]);
    allowed_by(
        &decide(&p, Some("xn--bcher-kva.example"), 443, &[PUBLIC]),
        "bücher.example",
    );
    allowed_by(
        &decide(&p, Some("BÜCHER.example"), 443, &[PUBLIC]),
        "bücher.example",
    );
    allowed_by(
        &decide(&p, Some("www.пример.рф"), 443, &[PUBLIC]),
        "*.xn--e1afmkfd.xn--p1ai:443",
    );
    assert!(p.name_allowed("Bücher.Example.", None));
}

#[test]
fn name_allowed_answers_for_names_only() {
    let p = policy(
        &["pypi.org", "github.com:443", "*.example.com", "10.0.0.0/8"],
        &["secret.example.com", "www.example.com:80"],
    );
    assert!(p.name_allowed("pypi.org", None));
    assert!(p.name_allowed("pypi.org", Some(8080)));
    assert!(p.name_allowed("github.com", None));
    assert!(p.name_allowed("github.com", Some(443)));
    assert!(!p.name_allowed("github.com", Some(22)));
    assert!(p.name_allowed("a.example.com", None));
    assert!(!p.name_allowed("example.com", None));
    assert!(!p.name_allowed("secret.example.com", None));
    assert!(p.name_allowed("www.example.com", None));
    assert!(!p.name_allowed("www.example.com", Some(80)));
    assert!(!p.name_allowed("evil.test", None));
    assert!(!p.name_allowed("10.0.0.1", None));
    assert!(!p.name_allowed("a..b", None));
}

#[test]
fn broad_rules_are_refused_unless_allowed() {
    for text in [
        "*",
        "*.com",
        "*.co.uk",
        "*.github.io",
        "0.0.0.0/0",
        "::/0",
        "2.0.0.0/7",
    ] {
        let error =
            EgressPolicy::parse(&strings(&["pypi.org", text]), &[], &[], false).expect_err(text);
        assert_eq!(error.key, "allow[1]");
        assert!(error.message.contains("too broad"), "{error}");
        assert!(error.message.contains("allow_broad = true"), "{error}");
        let p = EgressPolicy::parse(&strings(&["pypi.org", text]), &[], &[], true).unwrap();
        assert!(p.allow_broad);
    }
    // Broad deny rules are fine: they only refuse.
    EgressPolicy::parse(
        &strings(&["pypi.org"]),
        &strings(&["*.com", "::/0"]),
        &[],
        false,
    )
    .unwrap();
}

#[test]
fn duplicates_and_bad_entries_name_their_index() {
    let error = EgressPolicy::parse(
        &strings(&["pypi.org", "github.com", "PyPI.org."]),
        &[],
        &[],
        false,
    )
    .unwrap_err();
    assert_eq!(error.key, "allow[2]");
    assert!(error.message.contains("listed twice"), "{error}");
    let error =
        EgressPolicy::parse(&strings(&["pypi.org"]), &strings(&["a.*"]), &[], false).unwrap_err();
    assert_eq!(
        error.to_string(),
        "deny[0]: `a.*`: `*` is allowed only as the whole first label, as in `*.example.com`"
    );
    let error =
        EgressPolicy::parse(&[], &[], &strings(&["1.1.1.1", "dns.example"]), false).unwrap_err();
    assert_eq!(error.key, "resolvers[1]");
}

#[test]
fn resolvers() {
    let p = EgressPolicy::parse(
        &[],
        &[],
        &strings(&[
            "1.1.1.1",
            "9.9.9.9:5353",
            "[2606:4700::1111]:53",
            "2606:4700::1001",
        ]),
        false,
    )
    .unwrap();
    assert_eq!(
        p.resolvers,
        [
            "1.1.1.1:53".parse::<SocketAddr>().unwrap(),
            "9.9.9.9:5353".parse().unwrap(),
            "[2606:4700::1111]:53".parse().unwrap(),
            "[2606:4700::1001]:53".parse().unwrap(),
        ]
    );
    for bad in ["1.1.1.1:0", "1.1.1.1:99999", "1.1.1.1", "x"] {
        let list = strings(&["1.1.1.1", bad]);
        assert!(
            EgressPolicy::parse(&[], &[], &list, false).is_err(),
            "{bad}"
        );
    }
}
