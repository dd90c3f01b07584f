//! Policy: what a sandbox may reach. Owns the closed set of deny reasons
//! ([`Deny`]), normalised host names ([`HostName`], [`Host`]), allowlist
//! entries ([`HostPattern`]) and the compiled [`Allowlist`] whose
//! [`Allowlist::decide`] is a synchronous pure function.
//!
//! Matching cost does not grow with the allowlist: a name is looked up once
//! exactly and once per parent suffix (wildcards), an IP literal once.
//! This module never resolves, connects or reads the network.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

/// Why a connection was refused. `as_str()` is at once the `x-deny-reason`
/// header, the metrics label and the audit field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Deny {
    HostNotAllowed,
    PortNotAllowed,
    UnknownSource,
    TokenInvalid,
    TokenExpired,
    TokenRevoked,
    ContainerMismatch,
    PrivateDestination,
    NoHost,
    UnsupportedProtocol,
    BadRequest,
    PeekTimeout,
    Overloaded,
    UpstreamUnreachable,
    UpstreamTimeout,
}

impl Deny {
    pub const ALL: [Deny; 15] = [
        Deny::HostNotAllowed,
        Deny::PortNotAllowed,
        Deny::UnknownSource,
        Deny::TokenInvalid,
        Deny::TokenExpired,
        Deny::TokenRevoked,
        Deny::ContainerMismatch,
        Deny::PrivateDestination,
        Deny::NoHost,
        Deny::UnsupportedProtocol,
        Deny::BadRequest,
        Deny::PeekTimeout,
        Deny::Overloaded,
        Deny::UpstreamUnreachable,
        Deny::UpstreamTimeout,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Deny::HostNotAllowed => "host_not_allowed",
            Deny::PortNotAllowed => "port_not_allowed",
            Deny::UnknownSource => "unknown_source",
            Deny::TokenInvalid => "token_invalid",
            Deny::TokenExpired => "token_expired",
            Deny::TokenRevoked => "token_revoked",
            Deny::ContainerMismatch => "container_mismatch",
            Deny::PrivateDestination => "private_destination",
            Deny::NoHost => "no_host",
            Deny::UnsupportedProtocol => "unsupported_protocol",
            Deny::BadRequest => "bad_request",
            Deny::PeekTimeout => "peek_timeout",
            Deny::Overloaded => "overloaded",
            Deny::UpstreamUnreachable => "upstream_unreachable",
            Deny::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// The HTTP status a denied HTTP client receives.
    pub const fn http_status(self) -> (u16, &'static str) {
        match self {
            Deny::BadRequest => (400, "Bad Request"),
            Deny::UpstreamUnreachable => (502, "Bad Gateway"),
            Deny::UpstreamTimeout => (504, "Gateway Timeout"),
            _ => (403, "Forbidden"),
        }
    }
}

impl fmt::Display for Deny {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a host name or an allowlist entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("empty host name")]
    Empty,
    #[error("host name longer than 253 characters")]
    TooLong,
    #[error("empty label in host name")]
    EmptyLabel,
    #[error("label longer than 63 characters")]
    LabelTooLong,
    #[error("invalid character {0:?} in host name")]
    BadChar(char),
    #[error("numeric top-level label: not a host name and not a valid IP address")]
    NumericTld,
    #[error("invalid port {0:?}")]
    BadPort(String),
    #[error("a bare `*` would allow everything")]
    BareWildcard,
    #[error("`*` may only stand as the whole first label (`*.example.com`)")]
    MisplacedWildcard,
    #[error("a wildcard cannot cover an IP address")]
    WildcardIp,
}

/// A DNS host name, normalised once: ASCII lowercase, one trailing dot
/// removed, letters, digits, `-` and `_` only, labels of 1..=63 bytes,
/// at most 253 bytes, and a top-level label that is not all digits (so that
/// `127.1` or `0x7f.1`, which the system resolver would read as addresses,
/// are never names).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostName(Box<str>);

impl HostName {
    pub fn parse(raw: &str) -> Result<Self, HostError> {
        let trimmed = raw.strip_suffix('.').unwrap_or(raw);
        if trimmed.is_empty() {
            return Err(HostError::Empty);
        }
        if trimmed.len() > 253 {
            return Err(HostError::TooLong);
        }
        let mut last_label = "";
        for label in trimmed.split('.') {
            if label.is_empty() {
                return Err(HostError::EmptyLabel);
            }
            if label.len() > 63 {
                return Err(HostError::LabelTooLong);
            }
            if let Some(c) = label
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
            {
                return Err(HostError::BadChar(c));
            }
            last_label = label;
        }
        let tld = last_label.to_ascii_lowercase();
        if tld.bytes().all(|b| b.is_ascii_digit())
            || (tld.starts_with("0x") && tld[2..].bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(HostError::NumericTld);
        }
        Ok(HostName(trimmed.to_ascii_lowercase().into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The parent domains, nearest first: `a.b.c` gives `b.c`, then `c`.
    pub fn parents(&self) -> impl Iterator<Item = &str> {
        let s: &str = &self.0;
        s.match_indices('.').map(move |(i, _)| &s[i + 1..])
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a client asked for: a name, or an IP literal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Name(HostName),
    Ip(IpAddr),
}

impl Host {
    /// Parses a bare host (no port): an IPv4 literal, an IPv6 literal with
    /// or without brackets, or a host name.
    pub fn parse(raw: &str) -> Result<Self, HostError> {
        let unbracketed = raw
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(raw);
        if let Ok(ip) = IpAddr::from_str(unbracketed) {
            return Ok(Host::Ip(ip.to_canonical()));
        }
        HostName::parse(raw).map(Host::Name)
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => n.fmt(f),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => ip.fmt(f),
        }
    }
}

/// Splits an authority (`host`, `host:port`, `[v6]`, `[v6]:port`) into its
/// host and optional port. A bare IPv6 address without brackets is taken
/// whole, as a host.
pub fn split_authority(raw: &str) -> Result<(Host, Option<u16>), HostError> {
    if raw.starts_with('[') {
        let end = raw.find(']').ok_or(HostError::BadChar('['))?;
        let host = Host::parse(&raw[..=end])?;
        let rest = &raw[end + 1..];
        return match rest.strip_prefix(':') {
            None if rest.is_empty() => Ok((host, None)),
            None => Err(HostError::BadChar(rest.chars().next().unwrap_or(']'))),
            Some(port) => Ok((host, Some(parse_port(port)?))),
        };
    }
    if raw.parse::<Ipv6Addr>().is_ok() {
        return Ok((Host::parse(raw)?, None));
    }
    match raw.rsplit_once(':') {
        Some((host, port)) => Ok((Host::parse(host)?, Some(parse_port(port)?))),
        None => Ok((Host::parse(raw)?, None)),
    }
}

fn parse_port(raw: &str) -> Result<u16, HostError> {
    if raw.is_empty() || raw.len() > 5 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostError::BadPort(raw.to_owned()));
    }
    match raw.parse::<u16>() {
        Ok(0) | Err(_) => Err(HostError::BadPort(raw.to_owned())),
        Ok(p) => Ok(p),
    }
}

/// One allowlist entry, as written in a token's `allowed_hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `example.com`: exactly that name.
    Exact(HostName, Option<u16>),
    /// `*.example.com`: any name below `example.com`, not the apex.
    Wildcard(HostName, Option<u16>),
    /// `192.0.2.7`, `[2001:db8::1]:443`: only that address.
    Ip(IpAddr, Option<u16>),
}

impl FromStr for HostPattern {
    type Err = HostError;

    fn from_str(raw: &str) -> Result<Self, HostError> {
        let raw = raw.trim();
        if raw == "*" || raw.starts_with("*:") {
            return Err(HostError::BareWildcard);
        }
        if let Some(rest) = raw.strip_prefix("*.") {
            if rest.contains('*') {
                return Err(HostError::MisplacedWildcard);
            }
            return match split_authority(rest)? {
                (Host::Name(name), port) => Ok(HostPattern::Wildcard(name, port)),
                (Host::Ip(_), _) => Err(HostError::WildcardIp),
            };
        }
        if raw.contains('*') {
            return Err(HostError::MisplacedWildcard);
        }
        Ok(match split_authority(raw)? {
            (Host::Name(name), port) => HostPattern::Exact(name, port),
            (Host::Ip(ip), port) => HostPattern::Ip(ip, port),
        })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (prefix, host, port) = match self {
            HostPattern::Exact(n, p) => ("", Host::Name(n.clone()), p),
            HostPattern::Wildcard(n, p) => ("*.", Host::Name(n.clone()), p),
            HostPattern::Ip(ip, p) => ("", Host::Ip(*ip), p),
        };
        match port {
            Some(port) => write!(f, "{prefix}{host}:{port}"),
            None => write!(f, "{prefix}{host}"),
        }
    }
}

/// The ports an entry admits: the gateway's `allowed_ports` (an entry
/// without a port) and/or the ports named explicitly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PortRule {
    default_ports: bool,
    ports: Vec<u16>,
}

impl PortRule {
    fn add(&mut self, port: Option<u16>) {
        match port {
            None => self.default_ports = true,
            Some(p) if !self.ports.contains(&p) => self.ports.push(p),
            Some(_) => {}
        }
    }

    fn admits(&self, port: u16, allowed_ports: &[u16]) -> bool {
        self.ports.contains(&port) || (self.default_ports && allowed_ports.contains(&port))
    }
}

/// A sandbox's allowlist, compiled for lookups that cost the same for 10
/// entries as for 100,000.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    exact: HashMap<Box<str>, PortRule>,
    wildcard: HashMap<Box<str>, PortRule>,
    ips: HashMap<IpAddr, PortRule>,
    entries: Vec<HostPattern>,
}

impl Allowlist {
    pub fn new(patterns: impl IntoIterator<Item = HostPattern>) -> Self {
        let mut list = Allowlist::default();
        for pattern in patterns {
            match &pattern {
                HostPattern::Exact(name, port) => list
                    .exact
                    .entry(name.as_str().into())
                    .or_default()
                    .add(*port),
                HostPattern::Wildcard(name, port) => list
                    .wildcard
                    .entry(name.as_str().into())
                    .or_default()
                    .add(*port),
                HostPattern::Ip(ip, port) => list.ips.entry(*ip).or_default().add(*port),
            }
            list.entries.push(pattern);
        }
        list
    }

    /// Parses a list of entries; the first bad one is the error.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, (String, HostError)> {
        let mut patterns = Vec::with_capacity(entries.len());
        for entry in entries {
            let entry = entry.as_ref();
            patterns.push(entry.parse().map_err(|e| (entry.to_owned(), e))?);
        }
        Ok(Self::new(patterns))
    }

    pub fn entries(&self) -> &[HostPattern] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// May a connection to `host` on `port` go ahead? A name that matches
    /// but not on this port is `port_not_allowed`; one that matches nothing
    /// is `host_not_allowed`.
    pub fn decide(&self, host: &Host, port: u16, allowed_ports: &[u16]) -> Result<(), Deny> {
        let mut name_matched = false;
        let mut check = |rule: Option<&PortRule>| -> bool {
            match rule {
                Some(rule) => {
                    name_matched = true;
                    rule.admits(port, allowed_ports)
                }
                None => false,
            }
        };
        let admitted = match host {
            Host::Ip(ip) => check(self.ips.get(&ip.to_canonical())),
            Host::Name(name) => {
                check(self.exact.get(name.as_str()))
                    || name
                        .parents()
                        .any(|parent| check(self.wildcard.get(parent)))
            }
        };
        match (admitted, name_matched) {
            (true, _) => Ok(()),
            (false, true) => Err(Deny::PortNotAllowed),
            (false, false) => Err(Deny::HostNotAllowed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORTS: &[u16] = &[80, 443];

    fn host(s: &str) -> Host {
        Host::parse(s).unwrap()
    }

    fn list(entries: &[&str]) -> Allowlist {
        Allowlist::parse(entries).unwrap()
    }

    #[test]
    fn host_names_are_normalised() {
        assert_eq!(
            HostName::parse("API.Example.COM.").unwrap().as_str(),
            "api.example.com"
        );
        assert_eq!(HostName::parse("a_b.test").unwrap().as_str(), "a_b.test");
        for bad in [
            "",
            ".",
            "a..b",
            "a.b..",
            "exa mple.com",
            "ex/ample.com",
            "ex\0ample.com",
            "ex\u{e9}.com",
            "127.1",
            "10.0.0.010",
            "0x7f.1",
            "a.0x10",
        ] {
            assert!(HostName::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(
            HostName::parse(&"a".repeat(64)),
            Err(HostError::LabelTooLong)
        );
        let long = ["a".repeat(60).as_str(); 5].join(".");
        assert_eq!(HostName::parse(&long), Err(HostError::TooLong));
    }

    #[test]
    fn hosts_split_literals_from_names() {
        assert_eq!(host("198.18.0.1"), Host::Ip("198.18.0.1".parse().unwrap()));
        assert_eq!(
            host("[2001:db8::1]"),
            Host::Ip("2001:db8::1".parse().unwrap())
        );
        // An IPv4-mapped IPv6 literal is its IPv4 address.
        assert_eq!(
            host("[::ffff:198.18.0.1]"),
            Host::Ip("198.18.0.1".parse().unwrap())
        );
        assert!(matches!(host("Example.com"), Host::Name(_)));
    }

    #[test]
    fn authorities_split_host_and_port() {
        let cases: &[(&str, &str, Option<u16>)] = &[
            ("example.com", "example.com", None),
            ("example.com:8443", "example.com", Some(8443)),
            ("[2001:db8::1]:443", "[2001:db8::1]", Some(443)),
            ("2001:db8::1", "[2001:db8::1]", None),
            ("198.18.0.1:80", "198.18.0.1", Some(80)),
        ];
        for (raw, h, p) in cases {
            let (got_h, got_p) = split_authority(raw).unwrap();
            assert_eq!((got_h.to_string().as_str(), got_p), (*h, *p), "{raw}");
        }
        for bad in [
            "example.com:",
            "example.com:0",
            "example.com:65536",
            "example.com:+80",
            "[::1",
            "[::1]x",
            ":80",
        ] {
            assert!(split_authority(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn patterns_parse_and_refuse_wildcards_that_allow_everything() {
        assert_eq!(
            "*.Example.com:443".parse::<HostPattern>().unwrap(),
            HostPattern::Wildcard(HostName::parse("example.com").unwrap(), Some(443))
        );
        assert_eq!("*".parse::<HostPattern>(), Err(HostError::BareWildcard));
        assert_eq!("*:443".parse::<HostPattern>(), Err(HostError::BareWildcard));
        assert_eq!(
            "a.*.com".parse::<HostPattern>(),
            Err(HostError::MisplacedWildcard)
        );
        assert_eq!(
            "*.*.com".parse::<HostPattern>(),
            Err(HostError::MisplacedWildcard)
        );
        assert_eq!(
            "*.10.0.0.1".parse::<HostPattern>(),
            Err(HostError::WildcardIp)
        );
        assert_eq!(
            "*.example.123".parse::<HostPattern>(),
            Err(HostError::NumericTld)
        );
        for s in [
            "example.com",
            "*.example.com:8443",
            "198.18.0.1:22",
            "[2001:db8::1]:443",
        ] {
            assert_eq!(s.parse::<HostPattern>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn decisions_follow_the_contract() {
        let l = list(&[
            "example.com",
            "*.wild.test",
            "ssh.test:22",
            "198.18.1.10",
            "[2001:db8::5]:8443",
        ]);
        let cases: &[(&str, u16, Result<(), Deny>)] = &[
            ("example.com", 443, Ok(())),
            ("EXAMPLE.com.", 80, Ok(())),
            ("example.com", 22, Err(Deny::PortNotAllowed)),
            ("www.example.com", 443, Err(Deny::HostNotAllowed)),
            ("notexample.com", 443, Err(Deny::HostNotAllowed)),
            ("a.wild.test", 443, Ok(())),
            ("a.b.wild.test", 443, Ok(())),
            ("wild.test", 443, Err(Deny::HostNotAllowed)),
            ("evilwild.test", 443, Err(Deny::HostNotAllowed)),
            ("ssh.test", 22, Ok(())),
            ("ssh.test", 443, Err(Deny::PortNotAllowed)),
            ("198.18.1.10", 80, Ok(())),
            ("[::ffff:198.18.1.10]", 80, Ok(())),
            ("198.18.1.11", 80, Err(Deny::HostNotAllowed)),
            ("[2001:db8::5]", 8443, Ok(())),
            ("[2001:db8::5]", 443, Err(Deny::PortNotAllowed)),
        ];
        for (h, port, want) in cases {
            assert_eq!(l.decide(&host(h), *port, PORTS), *want, "{h}:{port}");
        }
    }

    #[test]
    fn an_empty_allowlist_allows_nothing() {
        assert_eq!(
            Allowlist::default().decide(&host("example.com"), 443, PORTS),
            Err(Deny::HostNotAllowed)
        );
    }

    #[test]
    fn the_same_name_with_several_ports_admits_each() {
        let l = list(&["api.test:8443", "api.test:9443", "api.test"]);
        for port in [80, 443, 8443, 9443] {
            assert_eq!(l.decide(&host("api.test"), port, PORTS), Ok(()));
        }
        assert_eq!(
            l.decide(&host("api.test"), 22, PORTS),
            Err(Deny::PortNotAllowed)
        );
    }

    #[test]
    fn deny_reasons_are_unique_strings() {
        let mut seen = std::collections::HashSet::new();
        for d in Deny::ALL {
            assert!(seen.insert(d.as_str()), "{d} twice");
        }
    }
}
