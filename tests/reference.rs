//! `docs/reference.md` is the interface, kept true here: every command of
//! the binary, every config key (from the config struct itself), every
//! route of the admin API (from its OpenAPI document, built from the same
//! registrations as its router), every deny reason and every metric name is
//! in it, and nothing it lists as a key, a route or a metric is missing
//! from the code.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::process::Command;

const DOC: &str = include_str!("../docs/reference.md");
const METRICS_SRC: &str = include_str!("../src/metrics.rs");

/// The text of one `## ` section of the document.
fn section(title_start: &str) -> &'static str {
    let start = DOC
        .find(&format!("\n## {title_start}"))
        .unwrap_or_else(|| panic!("no section {title_start}"));
    let rest = &DOC[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    &rest[..end]
}

fn subcommands(args: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect()
}

#[test]
fn every_command_is_in_the_reference() {
    let commands = section("Commands");
    let top = subcommands(&[]);
    assert!(top.len() >= 5, "{top:?}");
    for c in &top {
        assert!(
            commands.contains(&format!("`sluice {c}")),
            "sluice {c} is not in docs/reference.md"
        );
    }
    for c in subcommands(&["token"]) {
        assert!(
            commands.contains(&format!("`sluice token {c}")),
            "sluice token {c} is not in docs/reference.md"
        );
    }
}

fn keys(prefix: &str, v: &serde_json::Value, out: &mut BTreeSet<String>) {
    match v {
        // Maps of the operator's own names are one key each.
        serde_json::Value::Object(m)
            if prefix != "presets"
                && prefix != "gateway.resolve"
                && prefix != "credentials"
                && prefix != "limits.organizations" =>
        {
            for (k, x) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                keys(&key, x, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

#[test]
fn every_config_key_is_in_the_reference_and_no_other() {
    let config = serde_json::to_value(sluice::config::Config::default()).unwrap();
    let mut real = BTreeSet::new();
    keys("", &config, &mut real);
    assert!(real.len() > 40, "{real:?}");
    let table = section("Configuration");
    let listed: BTreeSet<String> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect();
    let missing: Vec<_> = real.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&real).collect();
    assert!(
        missing.is_empty(),
        "keys not in docs/reference.md: {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "docs/reference.md lists keys that do not exist: {unknown:?}"
    );
}

/// `{anything}` → `{}`, so `{id}` and `{container_id}` compare equal.
fn shape(path: &str) -> String {
    let path = path.split('?').next().unwrap();
    let mut out = String::new();
    let mut inside = false;
    for c in path.chars() {
        match c {
            '{' => {
                inside = true;
                out.push_str("{}");
            }
            '}' => inside = false,
            _ if inside => {}
            _ => out.push(c),
        }
    }
    out
}

#[test]
fn every_admin_route_is_in_the_reference_and_no_other() {
    // (method, path) from the OpenAPI document, which the router's own
    // registrations (`routes!`) build.
    let doc = serde_json::to_value(sluice::admin::openapi()).unwrap();
    let mut real = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            real.insert((method.to_uppercase(), shape(path)));
        }
    }
    assert!(real.len() >= 10, "{real:?}");
    let table = section("Admin API");
    let listed: BTreeSet<(String, String)> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter_map(|call| call.split_once(' '))
        .map(|(m, p)| (m.to_owned(), shape(p)))
        .collect();
    let missing: Vec<_> = real.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&real).collect();
    assert!(
        missing.is_empty(),
        "routes not in docs/reference.md: {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "docs/reference.md lists routes that do not exist: {unknown:?}"
    );
}

#[test]
fn every_deny_reason_is_in_the_reference() {
    let reasons = section("Deny reasons");
    for d in sluice::deny::Deny::ALL {
        assert!(
            reasons.contains(&format!("`{}`", d.as_str())),
            "{} is not in docs/reference.md",
            d.as_str()
        );
    }
}

fn sluice_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("sluice_") {
        let tail = &text[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
    }
    names
}

#[test]
fn every_metric_is_in_the_reference_and_no_other() {
    let real: BTreeSet<String> = METRICS_SRC
        .lines()
        .filter(|l| l.starts_with("pub const") && l.contains("&str"))
        .flat_map(sluice_names)
        .collect();
    assert!(real.len() >= 10, "{real:?}");
    let listed = sluice_names(section("Metrics"));
    let missing: Vec<_> = real.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&real).collect();
    assert!(
        missing.is_empty(),
        "metrics not in docs/reference.md: {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "docs/reference.md lists metrics that do not exist: {unknown:?}"
    );
}
