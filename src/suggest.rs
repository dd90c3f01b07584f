//! `sluice policy suggest`: an `allowed_hosts` value built from what a
//! sandbox reached (and, in report mode, would have been denied). Pure:
//! destinations in, entries out. Owns the collapsing rules: hosts of a
//! preset become the preset when two or more of its hosts were reached;
//! three or more names under one parent become `*.parent`, only when the
//! parent is not a public suffix (the same check minting makes) and no
//! preset took them; a port outside the gateway's `allowed_ports` is
//! named (`host:port`). What was refused for a reason that is not the
//! allowlist's (a private destination, a bad request, a token) is never
//! suggested, nor, unless asked, what an enforcing sandbox was denied.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::events::Destination;
use crate::host::HostPattern;
use crate::presets::{OS_UPDATES, PACKAGE_MANAGERS};

/// How many names under one parent make a wildcard.
pub const WILDCARD_AT: usize = 3;

/// One suggested entry, with what it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Suggested {
    pub entry: String,
    /// The destinations (`host` or `host:port`) it stands for.
    pub covers: Vec<String>,
    pub allowed: u64,
    pub denied: u64,
    pub would_deny: u64,
}

/// The suggestion: the value to put in `allowed_hosts`, and its entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Suggestion {
    pub allowed_hosts: String,
    pub entries: Vec<Suggested>,
}

/// Reasons that say the allowlist (or its rules) refused it: a host the
/// sandbox needed.
fn allowlist_reason(reason: &str) -> bool {
    matches!(
        reason,
        "host_not_allowed" | "port_not_allowed" | "request_not_allowed"
    )
}

/// Builds the suggestion from a sandbox's destinations. `include_denied`
/// adds what an enforcing sandbox was refused by its allowlist.
pub fn suggest(
    destinations: &[Destination],
    allowed_ports: &[u16],
    include_denied: bool,
) -> Suggestion {
    // Each wanted host, its ports and counts.
    let mut wanted: BTreeMap<String, (BTreeSet<u16>, [u64; 3])> = BTreeMap::new();
    for d in destinations {
        let needed = d.allowed > 0
            || d.would_deny > 0
            || (include_denied && d.denied > 0 && allowlist_reason(&d.last_reason));
        if !needed || d.host.parse::<HostPattern>().is_err() {
            continue;
        }
        let host = d.host.trim_end_matches('.').to_ascii_lowercase();
        let w = wanted.entry(host).or_default();
        w.0.insert(d.port);
        w.1[0] += d.allowed;
        w.1[1] += d.denied;
        w.1[2] += d.would_deny;
    }
    let mut entries: Vec<Suggested> = Vec::new();
    let mut taken: BTreeSet<String> = BTreeSet::new();
    // Names on the default ports only may collapse; a named port stays.
    let default_only = |ports: &BTreeSet<u16>| ports.iter().all(|p| allowed_ports.contains(p));
    for (preset, members) in [
        ("@package_managers", PACKAGE_MANAGERS),
        ("@os_updates", OS_UPDATES),
    ] {
        let hits: Vec<&String> = wanted
            .iter()
            .filter(|(h, (ports, _))| members.contains(&h.as_str()) && default_only(ports))
            .map(|(h, _)| h)
            .collect();
        if hits.len() >= 2 {
            entries.push(collect(preset, &hits, &wanted));
            taken.extend(hits.into_iter().cloned());
        }
    }
    // Three or more names under one parent that may be wildcarded.
    let mut by_parent: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    for (h, (ports, _)) in &wanted {
        if taken.contains(h) || !default_only(ports) {
            continue;
        }
        if let Some((_, parent)) = h.split_once('.')
            && format!("*.{parent}").parse::<HostPattern>().is_ok()
        {
            by_parent.entry(parent.to_owned()).or_default().push(h);
        }
    }
    for (parent, hosts) in by_parent {
        if hosts.len() >= WILDCARD_AT {
            entries.push(collect(&format!("*.{parent}"), &hosts, &wanted));
            taken.extend(hosts.into_iter().cloned());
        }
    }
    for (h, (ports, counts)) in &wanted {
        if taken.contains(h) {
            continue;
        }
        let mut covers = Vec::new();
        let mut names: Vec<String> = Vec::new();
        if ports.iter().any(|p| allowed_ports.contains(p)) {
            names.push(h.clone());
            covers.push(h.clone());
        }
        for p in ports.iter().filter(|p| !allowed_ports.contains(p)) {
            names.push(format!("{h}:{p}"));
            covers.push(format!("{h}:{p}"));
        }
        for name in names {
            entries.push(Suggested {
                entry: name,
                covers: covers.clone(),
                allowed: counts[0],
                denied: counts[1],
                would_deny: counts[2],
            });
        }
    }
    entries.sort_by(|a, b| a.entry.cmp(&b.entry));
    entries.dedup_by(|a, b| a.entry == b.entry);
    Suggestion {
        allowed_hosts: entries
            .iter()
            .map(|e| e.entry.as_str())
            .collect::<Vec<_>>()
            .join(","),
        entries,
    }
}

fn collect(
    entry: &str,
    hosts: &[&String],
    wanted: &BTreeMap<String, (BTreeSet<u16>, [u64; 3])>,
) -> Suggested {
    let mut s = Suggested {
        entry: entry.to_owned(),
        covers: hosts.iter().map(|h| (*h).clone()).collect(),
        allowed: 0,
        denied: 0,
        would_deny: 0,
    };
    for h in hosts {
        if let Some((_, c)) = wanted.get(*h) {
            s.allowed += c[0];
            s.denied += c[1];
            s.would_deny += c[2];
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(
        host: &str,
        port: u16,
        allowed: u64,
        denied: u64,
        would: u64,
        reason: &str,
    ) -> Destination {
        Destination {
            host: host.into(),
            port,
            allowed,
            denied,
            would_deny: would,
            last_reason: reason.into(),
            bytes_to_upstream: 0,
            bytes_to_client: 0,
            first_seen: 0,
            last_seen: 0,
        }
    }

    #[test]
    fn reached_hosts_are_suggested_and_collapsed_only_where_safe() {
        let list = vec![
            d("api.test", 443, 3, 0, 0, "none"),
            d("db.test", 5432, 1, 0, 0, "none"),
            d("pypi.org", 443, 2, 0, 0, "none"),
            d("files.pythonhosted.org", 443, 2, 0, 0, "none"),
            d("a.cdn.example.com", 443, 1, 0, 0, "none"),
            d("b.cdn.example.com", 443, 1, 0, 0, "none"),
            d("c.cdn.example.com", 443, 1, 0, 0, "none"),
            // Under a public suffix: never `*.co.uk`.
            d("a.co.uk", 443, 1, 0, 0, "none"),
            d("b.co.uk", 443, 1, 0, 0, "none"),
            d("c.co.uk", 443, 1, 0, 0, "none"),
            d("evil.test", 443, 0, 4, 0, "host_not_allowed"),
            d("ten.test", 443, 0, 1, 0, "private_destination"),
            d("report.test", 443, 0, 0, 2, "host_not_allowed"),
        ];
        let s = suggest(&list, &[80, 443], false);
        assert_eq!(
            s.allowed_hosts,
            "*.cdn.example.com,@package_managers,a.co.uk,api.test,b.co.uk,c.co.uk,db.test:5432,report.test"
        );
        let pm = s
            .entries
            .iter()
            .find(|e| e.entry == "@package_managers")
            .unwrap();
        assert_eq!(pm.allowed, 4);
        assert_eq!(pm.covers, vec!["files.pythonhosted.org", "pypi.org"]);
        let with_denied = suggest(&list, &[80, 443], true);
        assert!(with_denied.allowed_hosts.contains("evil.test"));
        assert!(!with_denied.allowed_hosts.contains("ten.test"));
        // What it suggests mints.
        let presets = crate::presets::Presets::default();
        let hosts: Vec<String> = s.allowed_hosts.split(',').map(str::to_owned).collect();
        assert!(crate::identity::token::compile_hosts(&hosts, &presets).is_ok());
        assert_eq!(suggest(&[], &[80, 443], true).allowed_hosts, "");
    }
}
