//! Named host groups an allowlist may use as `@name`: two built in
//! (`@package_managers`, `@os_updates`) and the operator's own from
//! `[presets]`. A token lists the preset as given; it is expanded when the
//! token is minted (to refuse a name no gateway knows) and when it is
//! verified, so a changed preset applies to every token that names it.

use std::collections::{BTreeMap, HashMap};

use crate::host::{HostError, HostPattern};

/// The registries and mirrors package managers fetch from: the original
/// design's list (npmjs.com, registry.npmjs.org, pypi.org,
/// files.pythonhosted.org, crates.io, github.com) and the names those tools
/// really use beside them: cargo's sparse index and downloads
/// (index.crates.io, static.crates.io), and GitHub's archive and release
/// hosts that pip, npm and cargo fetch git dependencies and release assets
/// from (codeload.github.com, objects.githubusercontent.com).
pub const PACKAGE_MANAGERS: &[&str] = &[
    "npmjs.com",
    "registry.npmjs.org",
    "pypi.org",
    "files.pythonhosted.org",
    "crates.io",
    "index.crates.io",
    "static.crates.io",
    "github.com",
    "codeload.github.com",
    "objects.githubusercontent.com",
];

/// Debian and Ubuntu package mirrors: the original design's
/// (archive.ubuntu.com, security.ubuntu.com, deb.debian.org) and the
/// security and ports mirrors apt is configured with out of the box
/// (security.debian.org, ports.ubuntu.com).
pub const OS_UPDATES: &[&str] = &[
    "archive.ubuntu.com",
    "security.ubuntu.com",
    "ports.ubuntu.com",
    "deb.debian.org",
    "security.debian.org",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresetError {
    #[error("unknown preset @{0}")]
    Unknown(String),
    #[error("preset names are 1-64 lowercase letters, digits, '_' or '-': {0:?}")]
    BadName(String),
    #[error("@{0} is built in and cannot be redefined")]
    BuiltIn(String),
    #[error("preset @{0} is empty")]
    Empty(String),
    #[error("preset @{name}: {entry:?}: {error}")]
    BadEntry {
        name: String,
        entry: String,
        error: HostError,
    },
}

/// Every preset this gateway knows, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presets {
    groups: HashMap<String, Vec<HostPattern>>,
}

impl Default for Presets {
    fn default() -> Self {
        Presets::new(&BTreeMap::new()).unwrap_or(Presets {
            groups: HashMap::new(),
        })
    }
}

fn compile(name: &str, entries: &[&str]) -> Result<Vec<HostPattern>, PresetError> {
    entries
        .iter()
        .map(|e| {
            e.parse().map_err(|error| PresetError::BadEntry {
                name: name.to_owned(),
                entry: (*e).to_owned(),
                error,
            })
        })
        .collect()
}

impl Presets {
    /// The built-in presets and the operator's `[presets]`.
    pub fn new(custom: &BTreeMap<String, Vec<String>>) -> Result<Presets, PresetError> {
        let mut groups = HashMap::new();
        groups.insert(
            "package_managers".to_owned(),
            compile("package_managers", PACKAGE_MANAGERS)?,
        );
        groups.insert("os_updates".to_owned(), compile("os_updates", OS_UPDATES)?);
        for (name, entries) in custom {
            let valid = !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !valid {
                return Err(PresetError::BadName(name.clone()));
            }
            if groups.contains_key(name) {
                return Err(PresetError::BuiltIn(name.clone()));
            }
            if entries.is_empty() {
                return Err(PresetError::Empty(name.clone()));
            }
            let entries: Vec<&str> = entries.iter().map(String::as_str).collect();
            groups.insert(name.clone(), compile(name, &entries)?);
        }
        Ok(Presets { groups })
    }

    /// The entries `@name` stands for.
    pub fn expand(&self, name: &str) -> Result<&[HostPattern], PresetError> {
        self.groups
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| PresetError::Unknown(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_and_custom_presets() {
        let mut custom = BTreeMap::new();
        custom.insert(
            "ml".to_owned(),
            vec!["huggingface.co".to_owned(), "*.hf.co".to_owned()],
        );
        let p = Presets::new(&custom).unwrap();
        assert_eq!(
            p.expand("package_managers").unwrap().len(),
            PACKAGE_MANAGERS.len()
        );
        assert_eq!(p.expand("os_updates").unwrap().len(), OS_UPDATES.len());
        assert_eq!(p.expand("ml").unwrap().len(), 2);
        assert_eq!(p.expand("nope"), Err(PresetError::Unknown("nope".into())));
        for (name, entries, want) in [
            ("os_updates", vec!["a.test"], "built in"),
            ("Bad Name", vec!["a.test"], "lowercase"),
            ("empty", vec![], "empty"),
            ("wide", vec!["*.com"], "public suffix"),
        ] {
            let mut c = BTreeMap::new();
            c.insert(
                name.to_owned(),
                entries.into_iter().map(str::to_owned).collect(),
            );
            let e = Presets::new(&c).unwrap_err().to_string();
            assert!(e.contains(want), "{name}: {e}");
        }
    }
}
