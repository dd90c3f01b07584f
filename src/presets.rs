//! Named groups of allowlist entries a token may use as `@name`: built in
//! (`@package_managers`, `@os_updates`, and `@github_read:ORG`, which
//! takes an organisation) and the operator's own from `[presets]`, whose
//! entries may carry request rules. A token lists the preset as given; it
//! is expanded when the token is minted (to refuse a name no gateway
//! knows) and when it is verified, so a changed preset applies to every
//! token that names it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use crate::policy::{Entry, parse_entry};

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

/// `@github_read:ORG`: clone and fetch over HTTPS and read-only access
/// for one organisation, nothing that writes. `{org}` is the
/// organisation. Smart HTTP's ref advertisement is admitted only for
/// `git-upload-pack` (a push asks for `git-receive-pack` first and is
/// refused there, with the reason git prints); no gists, no GraphQL, no
/// other organisation. LFS: the batch endpoint (a download's first step;
/// an upload's storage `PUT` is never admitted) and the storage hosts'
/// `GET`s, whose signed URLs carry no organisation.
pub const GITHUB_READ: &[&str] = &[
    "github.com GET|HEAD /{org}/*/info/refs?service=git-upload-pack",
    "github.com POST /{org}/*/git-upload-pack",
    "github.com POST /{org}/*/info/lfs/objects/batch",
    "github.com GET|HEAD /{org}/*/archive/**",
    "github.com GET|HEAD /{org}/*/releases/download/**",
    "api.github.com GET|HEAD /repos/{org}/**",
    "codeload.github.com GET|HEAD /{org}/**",
    "raw.githubusercontent.com GET|HEAD /{org}/**",
    "media.githubusercontent.com GET|HEAD /media/{org}/**",
    "objects.githubusercontent.com GET|HEAD /**",
    "github-cloud.githubusercontent.com GET|HEAD /**",
];

/// A GitHub organisation (or user) name: 1-39 letters, digits and
/// single hyphens, not at either end.
fn github_org(org: &str) -> bool {
    !org.is_empty()
        && org.len() <= 39
        && org.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !org.starts_with('-')
        && !org.ends_with('-')
        && !org.contains("--")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresetError {
    #[error("unknown preset @{0}")]
    Unknown(String),
    #[error("@{0}: takes an organisation, as @{0}:ORG")]
    NeedsParameter(String),
    #[error("@github_read:{0:?}: an organisation is 1-39 letters, digits or single hyphens")]
    BadOrganisation(String),
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
        error: String,
    },
}

/// Every preset this gateway knows, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presets {
    groups: HashMap<String, Vec<Entry>>,
}

impl Default for Presets {
    fn default() -> Self {
        Presets::new(&BTreeMap::new()).unwrap_or(Presets {
            groups: HashMap::new(),
        })
    }
}

fn compile(name: &str, entries: &[&str]) -> Result<Vec<Entry>, PresetError> {
    entries
        .iter()
        .map(|e| {
            if e.trim_start().starts_with('@') {
                return Err(PresetError::BadEntry {
                    name: name.to_owned(),
                    entry: (*e).to_owned(),
                    error: "a preset cannot name another".into(),
                });
            }
            parse_entry(e).map_err(|error| PresetError::BadEntry {
                name: name.to_owned(),
                entry: (*e).to_owned(),
                error,
            })
        })
        .collect()
}

/// The built-in presets that take a parameter, by name.
const PARAMETRIC: &[&str] = &["github_read"];

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
            if groups.contains_key(name) || PARAMETRIC.contains(&name.as_str()) {
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

    /// The entries `@name` (or `@name:PARAMETER`) stands for.
    pub fn expand(&self, name: &str) -> Result<Cow<'_, [Entry]>, PresetError> {
        if let Some((base, param)) = name.split_once(':') {
            return match base {
                "github_read" if github_org(param) => {
                    let entries: Vec<String> = GITHUB_READ
                        .iter()
                        .map(|e| e.replace("{org}", param))
                        .collect();
                    let entries: Vec<&str> = entries.iter().map(String::as_str).collect();
                    compile(name, &entries).map(Cow::Owned)
                }
                "github_read" => Err(PresetError::BadOrganisation(param.to_owned())),
                _ => Err(PresetError::Unknown(name.to_owned())),
            };
        }
        if PARAMETRIC.contains(&name) {
            return Err(PresetError::NeedsParameter(name.to_owned()));
        }
        self.groups
            .get(name)
            .map(|g| Cow::Borrowed(g.as_slice()))
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
        assert_eq!(
            p.expand("github_read"),
            Err(PresetError::NeedsParameter("github_read".into()))
        );
        for bad in [
            "",
            "-acme",
            "acme-",
            "a--b",
            "ac/me",
            "acme*",
            "a.b",
            &"a".repeat(40),
        ] {
            assert_eq!(
                p.expand(&format!("github_read:{bad}")),
                Err(PresetError::BadOrganisation(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            p.expand("github_read:acme").unwrap().len(),
            GITHUB_READ.len()
        );
        for (name, entries, want) in [
            ("os_updates", vec!["a.test"], "built in"),
            ("Bad Name", vec!["a.test"], "lowercase"),
            ("empty", vec![], "empty"),
            ("wide", vec!["*.com"], "public suffix"),
            ("github_read", vec!["a.test"], "built in"),
            ("nested", vec!["@os_updates"], "another"),
            ("badrule", vec!["a.test get /x"], "methods"),
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
