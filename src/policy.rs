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
use rules::{RequestRule, RuleSet};

/// The ports an entry admits: the gateway's `allowed_ports` (an entry
/// without a port) and/or the ports named explicitly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PortRule {
    /// The first entry without a port, by index: it admits the
    /// gateway's `allowed_ports`.
    default_ports: Option<usize>,
    /// Each port named explicitly, with the first entry naming it.
    ports: Vec<(u16, usize)>,
}

impl PortRule {
    fn add(&mut self, port: Option<u16>, entry: usize) {
        match port {
            None => {
                self.default_ports.get_or_insert(entry);
            }
            Some(p) if !self.ports.iter().any(|(q, _)| *q == p) => self.ports.push((p, entry)),
            Some(_) => {}
        }
    }

    fn explicit(&self, port: u16) -> Option<usize> {
        self.ports.iter().find(|(p, _)| *p == port).map(|(_, e)| *e)
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
    /// For each entry, its request rule, if it has one.
    rules: Vec<Option<RequestRule>>,
    /// Entries with request rules, apart: they admit a host only for the
    /// requests a rule admits. An entry without a rule for the same host
    /// and port admits every request, as before.
    ruled: RuleMap,
}

/// The rules of a host's ruled entries, by the port they name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Ported {
    /// Entries without a port: on the gateway's `allowed_ports`.
    default_ports: RuleSet,
    ports: Vec<(u16, RuleSet)>,
}

impl Ported {
    fn add(&mut self, port: Option<u16>, rule: RequestRule) {
        match port {
            None => self.default_ports.push(rule),
            Some(p) => match self.ports.iter_mut().find(|(q, _)| *q == p) {
                Some((_, set)) => set.push(rule),
                None => {
                    let mut set = RuleSet::default();
                    set.push(rule);
                    self.ports.push((p, set));
                }
            },
        }
    }

    /// The rules that apply on `port`, and whether the port was named.
    fn on(&self, port: u16, allowed_ports: &[u16]) -> impl Iterator<Item = (&RuleSet, bool)> {
        let named = self
            .ports
            .iter()
            .filter(move |(p, _)| *p == port)
            .map(|(_, s)| (s, true));
        let default = (!self.default_ports.is_empty() && allowed_ports.contains(&port))
            .then_some((&self.default_ports, false));
        named.chain(default)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RuleMap {
    exact: HashMap<Box<str>, Ported>,
    wildcard: HashMap<Box<str>, Ported>,
    ips: HashMap<IpAddr, Ported>,
}

impl RuleMap {
    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty() && self.ips.is_empty()
    }

    /// Every ruled entry naming `host`, whatever its port.
    fn for_host<'a>(&'a self, host: &'a Host) -> Box<dyn Iterator<Item = &'a Ported> + 'a> {
        match host {
            Host::Ip(ip) => Box::new(self.ips.get(&ip.to_canonical()).into_iter()),
            Host::Name(name) => Box::new(
                self.exact
                    .get(name.as_str())
                    .into_iter()
                    .chain(name.parents().filter_map(|p| self.wildcard.get(p))),
            ),
        }
    }
}

/// One allowlist entry: a host pattern and, when it has one, its request
/// rule.
pub type Entry = (HostPattern, Option<RequestRule>);

/// Parses one entry, `HOST[:PORT] [METHODS] /PATH-GLOB[?KEY=VALUE]` (the
/// rule optional); the reason when it cannot be. Not for `@preset`
/// entries: those are expanded by the caller.
pub fn parse_entry(entry: &str) -> Result<Entry, String> {
    let mut words = entry.split_ascii_whitespace();
    let host = words.next().unwrap_or("");
    let rule: Vec<&str> = words.collect();
    let pattern: HostPattern = host.parse().map_err(|e: HostError| e.to_string())?;
    let rule = if rule.is_empty() {
        None
    } else {
        Some(RequestRule::parse(&rule)?)
    };
    Ok((pattern, rule))
}

impl Allowlist {
    pub fn new(patterns: impl IntoIterator<Item = HostPattern>) -> Self {
        Self::with_presets(patterns.into_iter().map(|p| (p, None)))
    }

    /// Entries, each with the preset it was expanded from, if any.
    pub fn with_presets(
        patterns: impl IntoIterator<Item = (HostPattern, Option<std::sync::Arc<str>>)>,
    ) -> Self {
        Self::with_rules(patterns.into_iter().map(|(p, preset)| (p, None, preset)))
    }

    /// Entries, each with its request rule (if any) and the preset it was
    /// expanded from (if any).
    pub fn with_rules(
        patterns: impl IntoIterator<
            Item = (
                HostPattern,
                Option<RequestRule>,
                Option<std::sync::Arc<str>>,
            ),
        >,
    ) -> Self {
        let mut list = Allowlist::default();
        for (pattern, rule, preset) in patterns {
            list.presets.push(preset);
            list.rules.push(rule.clone());
            if let Some(rule) = rule {
                let ported = match &pattern {
                    HostPattern::Exact(name, _) => {
                        list.ruled.exact.entry(name.as_str().into()).or_default()
                    }
                    HostPattern::Wildcard(name, _) => {
                        list.ruled.wildcard.entry(name.as_str().into()).or_default()
                    }
                    HostPattern::Ip(ip, _) => list.ruled.ips.entry(*ip).or_default(),
                };
                let port = match &pattern {
                    HostPattern::Exact(_, p)
                    | HostPattern::Wildcard(_, p)
                    | HostPattern::Ip(_, p) => *p,
                };
                ported.add(port, rule);
                list.entries.push(pattern);
                continue;
            }
            let index = list.entries.len();
            match &pattern {
                HostPattern::Exact(name, port) => list
                    .exact
                    .entry(name.as_str().into())
                    .or_default()
                    .add(*port, index),
                HostPattern::Wildcard(name, port) => list
                    .wildcard
                    .entry(name.as_str().into())
                    .or_default()
                    .add(*port, index),
                HostPattern::Ip(ip, port) => list.ips.entry(*ip).or_default().add(*port, index),
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
        let mut best: Option<(bool, usize)> = None;
        for i in 0..self.entries.len() {
            if let Some(explicit) = self.covers(i, host, port, allowed_ports)
                && best.is_none_or(|(e, _)| explicit && !e)
            {
                best = Some((explicit, i));
            }
        }
        let (_, i) = best?;
        Some(self.written(i))
    }

    /// The entry with a request rule that admits this request (`path`
    /// normalised first), as an operator reads it: what `explain` shows
    /// for a request to a restricted host.
    pub fn matched_request(
        &self,
        host: &Host,
        port: u16,
        allowed_ports: &[u16],
        method: &str,
        target: &str,
    ) -> Option<String> {
        let path = rules::normalize_path(target).ok()?;
        let query = rules::query_of(target);
        (0..self.entries.len())
            .find(|&i| {
                self.covers(i, host, port, allowed_ports).is_some()
                    && self.rules[i]
                        .as_ref()
                        .is_some_and(|r| r.admits(method, &path, query))
            })
            .map(|i| self.written(i))
    }

    /// Does entry `i` cover `host` on `port`: `Some(true)` naming the port,
    /// `Some(false)` on the allowed ports. A scan, for explaining, never
    /// on a connection's path.
    fn covers(&self, i: usize, host: &Host, port: u16, allowed_ports: &[u16]) -> Option<bool> {
        let (hit, entry_port) = match (&self.entries[i], host) {
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
    }

    /// Entry `i` as an operator reads it (with the preset it came from):
    /// what an event names as the entry that admitted a connection.
    pub fn entry_text(&self, i: usize) -> Option<String> {
        (i < self.entries.len()).then(|| self.written(i))
    }

    /// Entry `i` as written, with its rule and the preset it came from.
    fn written(&self, i: usize) -> String {
        let entry = match &self.rules[i] {
            Some(rule) => format!("{} {rule}", self.entries[i]),
            None => self.entries[i].to_string(),
        };
        match &self.presets[i] {
            Some(preset) => format!("{entry} ({preset})"),
            None => entry,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What each preset the token names stands for, entry by entry as
    /// written: what `explain` shows beside its decision.
    pub fn preset_expansions(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (i, preset) in self.presets.iter().enumerate() {
            if let Some(label) = preset {
                let entry = match &self.rules[i] {
                    Some(rule) => format!("{} {rule}", self.entries[i]),
                    None => self.entries[i].to_string(),
                };
                out.entry(label.to_string()).or_default().push(entry);
            }
        }
        out
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
            let explicit = rule.explicit(port);
            let by_default = rule.default_ports.filter(|_| allowed_ports.contains(&port));
            if let Some(entry) = explicit.or(by_default) {
                // An explicit port anywhere wins over a default-port match.
                let prev = found.filter(|a| a.explicit_port);
                found = Some(match prev {
                    Some(p) if explicit.is_none() => p,
                    _ => Admitted {
                        explicit_port: explicit.is_some(),
                        restricted: false,
                        entry: Some(entry),
                    },
                });
                return explicit.is_some();
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
            // Only entries with rules can still admit it, for some
            // requests.
            _ if !self.ruled.is_empty() => {
                self.decide_ruled(host, port, allowed_ports, name_matched)
            }
            (None, true) => Err(Deny::PortNotAllowed),
            (None, false) => Err(Deny::HostNotAllowed),
        }
    }

    fn decide_ruled(
        &self,
        host: &Host,
        port: u16,
        allowed_ports: &[u16],
        name_matched: bool,
    ) -> Result<Admitted, Deny> {
        let mut any = name_matched;
        let mut explicit_port = None;
        for ported in self.ruled.for_host(host) {
            any = true;
            for (_, named) in ported.on(port, allowed_ports) {
                explicit_port = Some(explicit_port.unwrap_or(false) || named);
            }
        }
        match (explicit_port, any) {
            (Some(explicit_port), _) => Ok(Admitted {
                explicit_port,
                restricted: true,
                entry: None,
            }),
            (None, true) => Err(Deny::PortNotAllowed),
            (None, false) => Err(Deny::HostNotAllowed),
        }
    }

    /// The names entries with request rules name (`*.x` as `x`): hosts
    /// whose TLS is opened so their requests can be judged, and what a
    /// sandbox's inspection CA must permit.
    pub fn ruled_names(&self) -> Vec<String> {
        self.ruled
            .exact
            .keys()
            .chain(self.ruled.wildcard.keys())
            .map(|k| k.to_string())
            .collect()
    }

    /// May this request go to `host` on `port`, admitted only by entries
    /// with rules (`decide` said `restricted`)? Its path is normalised
    /// first (`bad_request` when it cannot be), the query ignored.
    pub fn admits_request(
        &self,
        host: &Host,
        port: u16,
        allowed_ports: &[u16],
        method: &str,
        target: &str,
    ) -> Result<(), Deny> {
        let path = rules::normalize_path(target).map_err(|_| Deny::BadRequest)?;
        let query = rules::query_of(target);
        let admitted = self
            .ruled
            .for_host(host)
            .flat_map(|p| p.on(port, allowed_ports))
            .any(|(set, _)| set.admits(method, &path, query).is_some());
        if admitted {
            Ok(())
        } else {
            Err(Deny::RequestNotAllowed)
        }
    }
}

impl Allowlist {
    /// Does an entry admit this name on some port? What the DNS door asks:
    /// a name is answered if the sandbox may reach it at all.
    pub fn admits_name(&self, host: &Host) -> bool {
        let unruled = match host {
            Host::Ip(ip) => self.ips.contains_key(&ip.to_canonical()),
            Host::Name(name) => {
                self.exact.contains_key(name.as_str())
                    || name.parents().any(|p| self.wildcard.contains_key(p))
            }
        };
        unruled || self.ruled.for_host(host).next().is_some()
    }
}

/// How an allowlist admitted a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// An entry names this port (`git.example.com:22`), rather than the
    /// gateway's `allowed_ports` admitting it.
    pub explicit_port: bool,
    /// Only entries with request rules admit it: every request must be
    /// read and judged ([`Allowlist::admits_request`]); bytes that cannot
    /// be read are refused.
    pub restricted: bool,
    /// The entry that admitted it (the first for its name and port), for
    /// [`Allowlist::entry_text`]; none when only ruled entries do (each
    /// request then names its own).
    pub entry: Option<usize>,
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

    fn ruled(entries: &[&str]) -> Allowlist {
        let presets = crate::presets::Presets::default();
        let owned: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
        crate::identity::token::compile_hosts(&owned, &presets).unwrap()
    }

    #[test]
    fn request_rules_restrict_only_their_host_and_port() {
        let l = ruled(&[
            "github.test GET|HEAD /acme/**",
            "github.test POST /acme/*/git-upload-pack",
            "api.test",
            "*.cdn.test GET /pub/*",
        ]);
        let gh = host("github.test");
        let a = l.decide(&gh, 443, PORTS).unwrap();
        assert!(a.restricted && !a.explicit_port);
        let req = |m: &str, p: &str| l.admits_request(&gh, 443, PORTS, m, p);
        assert_eq!(req("GET", "/acme/repo/info/refs?service=x"), Ok(()));
        assert_eq!(req("HEAD", "/acme/x"), Ok(()));
        assert_eq!(req("POST", "/acme/repo/git-upload-pack"), Ok(()));
        assert_eq!(
            req("POST", "/acme/repo/git-receive-pack"),
            Err(Deny::RequestNotAllowed)
        );
        assert_eq!(req("GET", "/other/repo"), Err(Deny::RequestNotAllowed));
        // Normalised first: a climb out of the allowed prefix, an encoded
        // slash, are not allowed in.
        assert_eq!(req("GET", "/acme/../other/x"), Err(Deny::RequestNotAllowed));
        assert_eq!(req("GET", "/acme%2F..%2Fother"), Err(Deny::BadRequest));
        // Paths are case-sensitive.
        assert_eq!(req("GET", "/ACME/x"), Err(Deny::RequestNotAllowed));
        // A host without rules is not restricted; a port no entry names is
        // still refused.
        assert!(!l.decide(&host("api.test"), 443, PORTS).unwrap().restricted);
        assert_eq!(l.decide(&gh, 22, PORTS), Err(Deny::PortNotAllowed));
        assert_eq!(
            l.decide(&host("x.test"), 443, PORTS),
            Err(Deny::HostNotAllowed)
        );
        let cdn = host("a.cdn.test");
        assert!(l.decide(&cdn, 443, PORTS).unwrap().restricted);
        assert_eq!(l.admits_request(&cdn, 443, PORTS, "GET", "/pub/x"), Ok(()));
        assert!(l.admits_name(&gh) && l.admits_name(&cdn));
    }

    #[test]
    fn an_entry_without_a_rule_admits_every_request_to_its_host() {
        let l = ruled(&["github.test GET /acme/**", "github.test"]);
        assert!(
            !l.decide(&host("github.test"), 443, PORTS)
                .unwrap()
                .restricted
        );
        // On another port only the rule's entry names: restricted there.
        let l = ruled(&["github.test:8443 GET /x", "github.test"]);
        let a = l.decide(&host("github.test"), 8443, PORTS).unwrap();
        assert!(a.restricted && a.explicit_port);
        assert!(
            !l.decide(&host("github.test"), 443, PORTS)
                .unwrap()
                .restricted
        );
    }

    /// `@github_read:ORG`: fetch and read for one organisation, nothing
    /// that writes, nothing of another.
    #[test]
    fn github_read_admits_fetching_one_organisation_only() {
        let l = ruled(&["@github_read:acme"]);
        let req = |h: &str, m: &str, p: &str| l.admits_request(&host(h), 443, PORTS, m, p);
        let ok = [
            (
                "github.com",
                "GET",
                "/acme/w.git/info/refs?service=git-upload-pack",
            ),
            (
                "github.com",
                "GET",
                "/acme/w/info/refs?service=git-upload-pack",
            ),
            ("github.com", "POST", "/acme/w.git/git-upload-pack"),
            ("github.com", "POST", "/acme/w.git/info/lfs/objects/batch"),
            (
                "github.com",
                "GET",
                "/acme/w/archive/refs/heads/main.tar.gz",
            ),
            ("github.com", "GET", "/acme/w/releases/download/v1/w.tgz"),
            ("api.github.com", "GET", "/repos/acme/w/pulls?state=open"),
            ("api.github.com", "HEAD", "/repos/acme/w"),
            ("codeload.github.com", "GET", "/acme/w/tar.gz/main"),
            ("raw.githubusercontent.com", "GET", "/acme/w/main/README.md"),
            (
                "media.githubusercontent.com",
                "GET",
                "/media/acme/w/main/big.bin",
            ),
            (
                "objects.githubusercontent.com",
                "GET",
                "/github-production-release-asset/1",
            ),
        ];
        for (h, m, p) in ok {
            assert_eq!(req(h, m, p), Ok(()), "{m} {h}{p}");
        }
        let refused = [
            (
                "github.com",
                "GET",
                "/acme/w.git/info/refs?service=git-receive-pack",
            ),
            ("github.com", "GET", "/acme/w.git/info/refs"),
            (
                "github.com",
                "GET",
                "/acme/w.git/info/refs?service=git-upload-pack&service=git-receive-pack",
            ),
            ("github.com", "POST", "/acme/w.git/git-receive-pack"),
            (
                "github.com",
                "GET",
                "/other/w.git/info/refs?service=git-upload-pack",
            ),
            ("github.com", "POST", "/other/w.git/git-upload-pack"),
            ("github.com", "GET", "/acme/../other/w/archive/x.tgz"),
            ("github.com", "POST", "/acme/w.git/info/lfs/locks"),
            ("api.github.com", "POST", "/repos/acme/w/issues"),
            ("api.github.com", "PATCH", "/repos/acme/w"),
            ("api.github.com", "DELETE", "/repos/acme/w"),
            ("api.github.com", "POST", "/graphql"),
            ("api.github.com", "GET", "/graphql"),
            ("api.github.com", "POST", "/gists"),
            ("api.github.com", "GET", "/repos/other/w"),
            ("api.github.com", "GET", "/repos/acmex/w"),
            ("codeload.github.com", "GET", "/other/w/tar.gz/main"),
            ("raw.githubusercontent.com", "GET", "/other/w/main/x"),
            ("objects.githubusercontent.com", "PUT", "/x"),
        ];
        for (h, m, p) in refused {
            assert_eq!(req(h, m, p), Err(Deny::RequestNotAllowed), "{m} {h}{p}");
        }
        // A host the preset does not name at all.
        assert_eq!(
            l.decide(&host("gist.github.com"), 443, PORTS),
            Err(Deny::HostNotAllowed)
        );
        let gh = host("github.com");
        assert_eq!(
            l.matched_request(&gh, 443, PORTS, "POST", "/acme/w.git/git-upload-pack")
                .as_deref(),
            Some("github.com POST /acme/*/git-upload-pack (@github_read:acme)")
        );
        let shown = l.preset_expansions();
        assert_eq!(
            shown["@github_read:acme"].len(),
            crate::presets::GITHUB_READ.len()
        );
    }

    #[test]
    fn malformed_rules_are_refused_with_their_reason() {
        let presets = crate::presets::Presets::default();
        for bad in [
            "github.test GET",
            "github.test GET acme/**",
            "github.test GET|BOGUS? /x",
            "github.test GET /a/**/b/** extra",
            "@package_managers GET /x",
            "@github_read",
            "@github_read:",
            "@github_read:ac/me",
            "@github_read:acme GET /x",
            "@nope:acme",
            "github.test GET /x?service",
        ] {
            let e = crate::identity::token::compile_hosts(&[bad.to_string()], &presets);
            assert!(e.is_err(), "{bad} was accepted");
        }
    }
}
