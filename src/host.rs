//! Host names and the authorities clients and tokens write: [`HostName`]
//! (normalised once), [`Host`] (a name or an IP literal),
//! [`split_authority`], and [`HostPattern`], one allowlist entry as a token
//! writes it. Pure parsing: the parsers of client bytes and the policy stage
//! both build on this module, which depends on neither.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

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
    #[error("`*.{0}` would cover a public suffix: every domain registered under it")]
    PublicSuffix(String),
    #[error(
        "`{0}` is under a wildcard-DNS service, whose names map to any address their text names: a wildcard there allows every address"
    )]
    WildcardDns(String),
    #[error("the unspecified address reaches this host's own services, never an upstream")]
    Unspecified,
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
                (Host::Name(name), _) if is_public_suffix(&name) => {
                    Err(HostError::PublicSuffix(name.to_string()))
                }
                (Host::Name(name), _) if is_wildcard_dns(&name) => {
                    Err(HostError::WildcardDns(format!("*.{name}")))
                }
                (Host::Name(name), port) => Ok(HostPattern::Wildcard(name, port)),
                (Host::Ip(_), _) => Err(HostError::WildcardIp),
            };
        }
        if raw.contains('*') {
            return Err(HostError::MisplacedWildcard);
        }
        Ok(match split_authority(raw)? {
            (Host::Name(name), port) => HostPattern::Exact(name, port),
            (Host::Ip(ip), _) if ip.is_unspecified() => return Err(HostError::Unspecified),
            (Host::Ip(ip), port) => HostPattern::Ip(ip, port),
        })
    }
}

/// Services whose every name resolves to the address written in it
/// (`10.0.0.1.nip.io`, `1-2-3-4.sslip.io`): a wildcard under one is an
/// allowlist of every address.
const WILDCARD_DNS: &[&str] = &[
    "nip.io",
    "sslip.io",
    "xip.io",
    "traefik.me",
    "localtest.me",
    "lvh.me",
    "vcap.me",
    "nip.direct",
    "backname.io",
];

/// Is `name` a wildcard-DNS service, or under one?
fn is_wildcard_dns(name: &HostName) -> bool {
    let n = name.as_str();
    WILDCARD_DNS
        .iter()
        .any(|d| n == *d || n.strip_suffix(d).is_some_and(|rest| rest.ends_with('.')))
}

/// Would `*.name` cover a public suffix? A single label (any top-level
/// domain, listed or not) or a name the Public Suffix List names as a
/// suffix (`com`, `co.uk`, `github.io`): under it, anyone can register a
/// name, so a wildcard there allows the world.
fn is_public_suffix(name: &HostName) -> bool {
    if !name.as_str().contains('.') {
        return true;
    }
    psl::suffix(name.as_str().as_bytes())
        .is_some_and(|s| s.is_known() && s.as_bytes() == name.as_str().as_bytes())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Host {
        Host::parse(s).unwrap()
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
    fn wildcards_over_public_suffixes_and_the_unspecified_address_are_refused() {
        for raw in [
            "*.com",
            "*.co.uk",
            "*.CO.UK.",
            "*.test",
            "*.github.io",
            "*.com:443",
        ] {
            assert!(
                matches!(raw.parse::<HostPattern>(), Err(HostError::PublicSuffix(_))),
                "{raw}"
            );
        }
        for raw in ["*.nip.io", "*.sslip.io:443", "*.a.nip.io", "*.LVH.ME"] {
            assert!(
                matches!(raw.parse::<HostPattern>(), Err(HostError::WildcardDns(_))),
                "{raw}"
            );
        }
        // An exact name there pins the one address its text names; a
        // look-alike domain is not the service.
        assert!("10.0.0.1.nip.io".parse::<HostPattern>().is_ok());
        assert!("*.notnip.io".parse::<HostPattern>().is_ok());
        for raw in [
            "0.0.0.0",
            "0.0.0.0:80",
            "[::]:443",
            "::",
            "[::ffff:0.0.0.0]",
        ] {
            assert_eq!(
                raw.parse::<HostPattern>(),
                Err(HostError::Unspecified),
                "{raw}"
            );
        }
        for raw in [
            "*.example.com",
            "*.example.co.uk",
            "*.wild.test",
            "com",
            "co.uk",
        ] {
            assert!(raw.parse::<HostPattern>().is_ok(), "{raw}");
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
}
