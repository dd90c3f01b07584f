//! Policy: what a sandbox may reach. Owns the compiled [`Allowlist`]
//! whose [`Allowlist::decide`] is a synchronous pure function over a
//! [`Host`] and a port, saying which kind of entry admitted it.
//!
//! Matching cost does not grow with the allowlist: a name is looked up once
//! exactly and once per parent suffix (wildcards), an IP literal once.
//! This module never resolves, connects or reads the network.

pub mod rules;

use std::collections::HashMap;
use std::net::IpAddr;

use crate::deny::Deny;
use crate::host::{Host, HostError, HostPattern};

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
}

/// A sandbox's allowlist, compiled for lookups that cost the same for 10
/// entries as for 100,000.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    exact: HashMap<Box<str>, PortRule>,
    wildcard: HashMap<Box<str>, PortRule>,
    ips: HashMap<IpAddr, PortRule>,
    entries: Vec<HostPattern>,
    /// For each entry, the preset it came from (`@package_managers`), if
    /// it was expanded from one.
    presets: Vec<Option<std::sync::Arc<str>>>,
}

impl Allowlist {
    pub fn new(patterns: impl IntoIterator<Item = HostPattern>) -> Self {
        Self::with_presets(patterns.into_iter().map(|p| (p, None)))
    }

    /// Entries, each with the preset it was expanded from, if any.
    pub fn with_presets(
        patterns: impl IntoIterator<Item = (HostPattern, Option<std::sync::Arc<str>>)>,
    ) -> Self {
        let mut list = Allowlist::default();
        for (pattern, preset) in patterns {
            list.presets.push(preset);
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

    /// The entry that admits `host` on `port`, as an operator reads it
    /// (`pypi.org (@package_managers)`): what `explain` shows. A scan of the
    /// entries, for explaining, never on a connection's path; an entry
    /// naming the port explicitly is preferred.
    pub fn matched(&self, host: &Host, port: u16, allowed_ports: &[u16]) -> Option<String> {
        let covers = |p: &HostPattern| -> Option<bool> {
            let (hit, entry_port) = match (p, host) {
                (HostPattern::Exact(n, ep), Host::Name(h)) => (n == h, *ep),
                (HostPattern::Wildcard(n, ep), Host::Name(h)) => {
                    (h.parents().any(|parent| parent == n.as_str()), *ep)
                }
                (HostPattern::Ip(ip, ep), Host::Ip(h)) => (ip == h, *ep),
                _ => (false, None),
            };
            match (hit, entry_port) {
                (false, _) => None,
                (true, Some(ep)) => (ep == port).then_some(true),
                (true, None) => allowed_ports.contains(&port).then_some(false),
            }
        };
        let mut best: Option<(bool, usize)> = None;
        for (i, p) in self.entries.iter().enumerate() {
            if let Some(explicit) = covers(p)
                && best.is_none_or(|(e, _)| explicit && !e)
            {
                best = Some((explicit, i));
            }
        }
        let (_, i) = best?;
        Some(match &self.presets[i] {
            Some(preset) => format!("{} ({preset})", self.entries[i]),
            None => self.entries[i].to_string(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// May a connection to `host` on `port` go ahead? A name that matches
    /// but not on this port is `port_not_allowed`; one that matches nothing
    /// is `host_not_allowed`. What admitted it says whether an entry named
    /// this port explicitly (`host:port`), which is what lets a protocol that
    /// carries no name of its own through.
    pub fn decide(&self, host: &Host, port: u16, allowed_ports: &[u16]) -> Result<Admitted, Deny> {
        let mut name_matched = false;
        let mut found: Option<Admitted> = None;
        let mut check = |rule: Option<&PortRule>| -> bool {
            let Some(rule) = rule else { return false };
            name_matched = true;
            let explicit_port = rule.ports.contains(&port);
            if explicit_port || (rule.default_ports && allowed_ports.contains(&port)) {
                // An explicit port anywhere wins over a default-port match.
                let prev = found.is_some_and(|a| a.explicit_port);
                found = Some(Admitted {
                    explicit_port: explicit_port || prev,
                });
                return explicit_port;
            }
            false
        };
        match host {
            Host::Ip(ip) => {
                check(self.ips.get(&ip.to_canonical()));
            }
            Host::Name(name) => {
                let _ = check(self.exact.get(name.as_str()))
                    || name
                        .parents()
                        .any(|parent| check(self.wildcard.get(parent)));
            }
        }
        match (found, name_matched) {
            (Some(a), _) => Ok(a),
            (None, true) => Err(Deny::PortNotAllowed),
            (None, false) => Err(Deny::HostNotAllowed),
        }
    }
}

impl Allowlist {
    /// Does an entry admit this name on some port? What the DNS door asks:
    /// a name is answered if the sandbox may reach it at all.
    pub fn admits_name(&self, host: &Host) -> bool {
        match host {
            Host::Ip(ip) => self.ips.contains_key(&ip.to_canonical()),
            Host::Name(name) => {
                self.exact.contains_key(name.as_str())
                    || name.parents().any(|p| self.wildcard.contains_key(p))
            }
        }
    }
}

/// How an allowlist admitted a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// An entry names this port (`git.example.com:22`), rather than the
    /// gateway's `allowed_ports` admitting it.
    pub explicit_port: bool,
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
            assert_eq!(
                l.decide(&host(h), *port, PORTS).map(|_| ()),
                *want,
                "{h}:{port}"
            );
        }
    }

    #[test]
    fn an_explicit_port_is_told_apart_from_a_default_one() {
        let l = list(&[
            "git.test:22",
            "web.test",
            "both.test",
            "both.test:443",
            "*.w.test:5432",
        ]);
        let explicit = |h: &str, p: u16| l.decide(&host(h), p, PORTS).map(|a| a.explicit_port);
        assert_eq!(explicit("git.test", 22), Ok(true));
        assert_eq!(explicit("web.test", 443), Ok(false));
        assert_eq!(explicit("both.test", 443), Ok(true));
        assert_eq!(explicit("both.test", 80), Ok(false));
        assert_eq!(explicit("db.w.test", 5432), Ok(true));
    }

    #[test]
    fn names_are_admitted_on_any_port_for_dns() {
        let l = list(&["git.test:22", "*.w.test", "exact.test"]);
        for yes in ["git.test", "a.w.test", "a.b.w.test", "EXACT.test."] {
            assert!(l.admits_name(&host(yes)), "{yes}");
        }
        for no in ["w.test", "other.test", "xgit.test", "sub.exact.test"] {
            assert!(!l.admits_name(&host(no)), "{no}");
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
            assert!(l.decide(&host("api.test"), port, PORTS).is_ok());
        }
        assert_eq!(
            l.decide(&host("api.test"), 22, PORTS),
            Err(Deny::PortNotAllowed)
        );
    }
}
