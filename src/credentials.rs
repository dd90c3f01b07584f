//! Sealed credentials: the secrets the gateway holds (`[credentials.NAME]`)
//! and the worthless placeholders a sandbox holds instead. Owns: reading a
//! secret (a file or the environment, again on SIGHUP), the header it
//! becomes on an inspected request to one of its hosts, each sandbox's
//! placeholder for it (derived from the inspection key, so every gateway of
//! a fleet knows it without storing it), and finding a placeholder where
//! it does not belong. A [`Secret`] never prints: its `Debug` is redacted,
//! and nothing here puts it in an error.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::Sha256;

use crate::config::CredentialConfig;
use crate::host::{HostName, HostPattern};

/// A secret's bytes. `Debug` and `Display` never show them.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// The bytes, for the one place they go: a header on an inspected
    /// request.
    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why a credential cannot be used. Never carries the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("cannot read the secret file {0}: {1}")]
    SecretFile(String, String),
    #[error("the environment variable {0} is not set, or not UTF-8")]
    SecretEnv(String),
    #[error("the secret is empty")]
    Empty,
    #[error("the secret holds a byte a header cannot carry (a control character)")]
    NotHeaderSafe,
    #[error("give secret_file or secret_env, not both and not neither")]
    SecretSource,
    #[error("{0:?} is not a host a credential can go to: {1}")]
    Host(String, String),
    #[error("hosts is empty: a credential goes to no host")]
    NoHosts,
    #[error("format must hold {{secret}} or {{basic:USER}}: {0:?}")]
    Format(String),
    #[error("{0:?} is not an HTTP header name")]
    Header(String),
    #[error("header {0:?} is the gateway's own, or hop-by-hop: it cannot carry a credential")]
    ReservedHeader(String),
    #[error("{0:?} is not an environment variable name")]
    Env(String),
    #[error("{0:?} is not a credential name (letters, digits, '_', '-')")]
    Name(String),
}

/// How the header's value is made from the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// Text around `{secret}`: `Bearer {secret}`, or the bare secret.
    Template { before: String, after: String },
    /// `Basic {basic:USER}`: `Basic base64(USER:secret)`, as git sends.
    Basic { before: String, user: String },
}

impl Format {
    pub fn parse(raw: &str) -> Result<Format, CredentialError> {
        if let Some(i) = raw.find("{basic:") {
            let rest = &raw[i + "{basic:".len()..];
            let Some(end) = rest.find('}') else {
                return Err(CredentialError::Format(raw.to_owned()));
            };
            let user = &rest[..end];
            if user.contains(':') || !rest[end + 1..].is_empty() || raw.contains("{secret}") {
                return Err(CredentialError::Format(raw.to_owned()));
            }
            return Ok(Format::Basic {
                before: raw[..i].to_owned(),
                user: user.to_owned(),
            });
        }
        match raw.split_once("{secret}") {
            Some((before, after)) if !after.contains("{secret}") => Ok(Format::Template {
                before: before.to_owned(),
                after: after.to_owned(),
            }),
            _ => Err(CredentialError::Format(raw.to_owned())),
        }
    }

    /// The header's value for `secret`.
    fn render(&self, secret: &Secret) -> String {
        match self {
            Format::Template { before, after } => format!("{before}{}{after}", secret.expose()),
            Format::Basic { before, user } => {
                let pair = format!("{user}:{}", secret.expose());
                format!("{before}{}", B64.encode(pair))
            }
        }
    }
}

/// Headers a credential may never be set in: the gateway's own, and those
/// that describe the connection rather than the request.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-authorization",
    "proxy-connection",
    "keep-alive",
    "trailer",
];

/// One `[credentials.NAME]`, checked and with its secret read.
#[derive(Debug, Clone)]
pub struct Credential {
    pub name: Arc<str>,
    pub hosts: Vec<HostPattern>,
    /// Lower case.
    pub header: String,
    pub format: Format,
    pub env: Option<String>,
    secret: Secret,
}

impl Credential {
    /// Does this credential go to `host`?
    pub fn covers(&self, host: &HostName) -> bool {
        self.hosts.iter().any(|p| name_matches(p, host))
    }

    /// The header value the gateway sets on an inspected request.
    pub fn header_value(&self) -> String {
        self.format.render(&self.secret)
    }
}

fn name_matches(pattern: &HostPattern, host: &HostName) -> bool {
    match pattern {
        HostPattern::Exact(n, _) => n == host,
        HostPattern::Wildcard(n, _) => host
            .as_str()
            .strip_suffix(n.as_str())
            .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
        HostPattern::Ip(..) => false,
    }
}

/// The checks on one credential's configuration that need no secret.
pub fn check_shape(name: &str, c: &CredentialConfig) -> Vec<(String, CredentialError)> {
    let mut errors = Vec::new();
    let key = |k: &str| format!("credentials.{name}.{k}");
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        errors.push((
            format!("credentials.{name}"),
            CredentialError::Name(name.into()),
        ));
    }
    if c.hosts.is_empty() {
        errors.push((key("hosts"), CredentialError::NoHosts));
    }
    for h in &c.hosts {
        if let Err(e) = parse_host(h) {
            errors.push((key("hosts"), e));
        }
    }
    if let Err(e) = Format::parse(&c.format) {
        errors.push((key("format"), e));
    }
    let header = c.header.trim().to_ascii_lowercase();
    if header.is_empty() || !header.bytes().all(is_token_byte) {
        errors.push((key("header"), CredentialError::Header(c.header.clone())));
    } else if RESERVED_HEADERS.contains(&header.as_str()) {
        errors.push((key("header"), CredentialError::ReservedHeader(header)));
    }
    if !c.env.is_empty()
        && (!c
            .env
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            || c.env.as_bytes()[0].is_ascii_digit())
    {
        errors.push((key("env"), CredentialError::Env(c.env.clone())));
    }
    if c.secret_file.as_os_str().is_empty() == c.secret_env.is_empty() {
        errors.push((key("secret_file"), CredentialError::SecretSource));
    }
    errors
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A credential's host: a name or `*.suffix`, never an address or a port
/// (the inspection CA's name constraints are DNS names).
fn parse_host(raw: &str) -> Result<HostPattern, CredentialError> {
    let p: HostPattern = raw
        .parse()
        .map_err(|e: crate::host::HostError| CredentialError::Host(raw.into(), e.to_string()))?;
    match &p {
        HostPattern::Exact(_, None) | HostPattern::Wildcard(_, None) => Ok(p),
        _ => Err(CredentialError::Host(
            raw.into(),
            "a credential names hosts, without a port or an address".into(),
        )),
    }
}

/// Reads a credential's secret: the file's text (one trailing newline
/// dropped) or the variable's value.
fn read_secret(c: &CredentialConfig) -> Result<Secret, CredentialError> {
    let text = if !c.secret_file.as_os_str().is_empty() {
        let path = c.secret_file.display().to_string();
        std::fs::read_to_string(&c.secret_file)
            .map_err(|e| CredentialError::SecretFile(path, e.kind().to_string()))?
    } else {
        std::env::var(&c.secret_env)
            .map_err(|_| CredentialError::SecretEnv(c.secret_env.clone()))?
    };
    let text = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if text.is_empty() {
        return Err(CredentialError::Empty);
    }
    if text.bytes().any(|b| b.is_ascii_control() || b == 0x7f) {
        return Err(CredentialError::NotHeaderSafe);
    }
    Ok(Secret(Arc::from(text)))
}

/// Every configured credential, secrets read.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    by_name: BTreeMap<Arc<str>, Arc<Credential>>,
}

impl Credentials {
    /// Checks and reads every credential; every problem is returned, each
    /// with its key.
    pub fn load(
        config: &BTreeMap<String, CredentialConfig>,
    ) -> Result<Credentials, Vec<(String, CredentialError)>> {
        let mut errors = Vec::new();
        let mut by_name = BTreeMap::new();
        for (name, c) in config {
            let shape = check_shape(name, c);
            if !shape.is_empty() {
                errors.extend(shape);
                continue;
            }
            let key = if c.secret_file.as_os_str().is_empty() {
                format!("credentials.{name}.secret_env")
            } else {
                format!("credentials.{name}.secret_file")
            };
            let secret = match read_secret(c) {
                Ok(s) => s,
                Err(e) => {
                    errors.push((key, e));
                    continue;
                }
            };
            let (Ok(format), Ok(hosts)) = (
                Format::parse(&c.format),
                c.hosts
                    .iter()
                    .map(|h| parse_host(h))
                    .collect::<Result<Vec<_>, _>>(),
            ) else {
                continue;
            };
            let name: Arc<str> = Arc::from(name.as_str());
            by_name.insert(
                Arc::clone(&name),
                Arc::new(Credential {
                    name,
                    hosts,
                    header: c.header.trim().to_ascii_lowercase(),
                    format,
                    env: (!c.env.is_empty()).then(|| c.env.clone()),
                    secret,
                }),
            );
        }
        if errors.is_empty() {
            Ok(Credentials { by_name })
        } else {
            Err(errors)
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Credential>> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(|k| &**k)
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The prefix every placeholder starts with: what a reader of a request
/// (or a person) recognises as one.
pub const PLACEHOLDER_PREFIX: &str = "sluice-sealed-";

/// Sandbox `container_id`'s placeholder for credential `name`: the prefix,
/// the name, and 128 bits of HMAC-SHA-256 under the inspection key, so it
/// is unguessable, the same on every gateway holding the key, and worth
/// nothing anywhere else.
pub fn placeholder(key: &[u8], container_id: &str, name: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"sluice placeholder\0");
    mac.update(container_id.as_bytes());
    mac.update(b"\0");
    mac.update(name.as_bytes());
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(PLACEHOLDER_PREFIX.len() + name.len() + 33);
    out.push_str(PLACEHOLDER_PREFIX);
    out.push_str(name);
    out.push('-');
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in &tag[..16] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// A grant's placeholders as last made, against the seal they were made
/// under (its key): every connection of a sandbox that has credentials
/// asks for its sealed credentials, and each placeholder is an HMAC.
/// The seal is held weakly and compared by identity, so a new one
/// (SIGHUP: a new key or new credentials) makes them anew and an old one
/// is not kept alive here. Only placeholders are held, never a secret.
pub struct Placeholders<K> {
    last: std::sync::Mutex<Option<MadeUnder<K>>>,
}

/// Placeholders, and the seal they were made under.
type MadeUnder<K> = (std::sync::Weak<K>, Arc<[String]>);

impl<K> Default for Placeholders<K> {
    fn default() -> Self {
        Placeholders {
            last: std::sync::Mutex::new(None),
        }
    }
}

impl<K> fmt::Debug for Placeholders<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Placeholders")
    }
}

impl<K> Placeholders<K> {
    /// The placeholders made under `seal`: remembered ones if they were,
    /// else `make`'s, remembered.
    pub fn under(&self, seal: &Arc<K>, make: impl FnOnce() -> Vec<String>) -> Arc<[String]> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((made_under, made)) = &*last
            && std::ptr::eq(made_under.as_ptr(), Arc::as_ptr(seal))
        {
            return Arc::clone(made);
        }
        let made: Arc<[String]> = make().into();
        *last = Some((Arc::downgrade(seal), Arc::clone(&made)));
        made
    }
}

/// One sandbox's credentials: each name with its placeholder and the
/// credential itself (absent when the gateway has no such credential: its
/// placeholder then belongs nowhere).
#[derive(Debug, Clone, Default)]
pub struct Sealed {
    pub items: Vec<(Arc<str>, String, Option<Arc<Credential>>)>,
}

impl Sealed {
    pub fn new(key: &[u8], container_id: &str, names: &[String], all: &Credentials) -> Sealed {
        let placeholders: Vec<String> = names
            .iter()
            .map(|n| placeholder(key, container_id, n))
            .collect();
        Sealed::with_placeholders(names, &placeholders, all)
    }

    /// `names` with their placeholders, made already (in the same order).
    pub fn with_placeholders(
        names: &[String],
        placeholders: &[String],
        all: &Credentials,
    ) -> Sealed {
        Sealed {
            items: names
                .iter()
                .zip(placeholders)
                .map(|(n, p)| (Arc::from(n.as_str()), p.clone(), all.get(n).cloned()))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The credentials that go to `host`.
    pub fn for_host<'a>(&'a self, host: &'a HostName) -> impl Iterator<Item = &'a Arc<Credential>> {
        self.items
            .iter()
            .filter_map(|(_, _, c)| c.as_ref())
            .filter(move |c| c.covers(host))
    }

    /// The names of the credentials that go to `host`, in order.
    pub fn names_for(&self, host: &HostName) -> Vec<Arc<str>> {
        self.items
            .iter()
            .filter(|(_, _, c)| c.as_ref().is_some_and(|c| c.covers(host)))
            .map(|(n, _, _)| Arc::clone(n))
            .collect()
    }

    /// Is `host` one of this sandbox's credential hosts?
    pub fn covers(&self, host: &HostName) -> bool {
        self.for_host(host).next().is_some()
    }

    /// The name of the first credential whose placeholder `bytes` carry,
    /// as they are or inside `Basic` credentials (base64 of `user:pass`).
    pub fn find_in(&self, bytes: &[u8]) -> Option<&str> {
        if self.items.is_empty() {
            return None;
        }
        let found = |hay: &[u8]| {
            self.items
                .iter()
                .find(|(_, p, _)| memchr::memmem::find(hay, p.as_bytes()).is_some())
                .map(|(n, _, _)| &**n)
        };
        if let Some(n) = found(bytes) {
            return Some(n);
        }
        // Basic credentials hide it in base64: every `Basic` token is
        // decoded and looked at too.
        for line in bytes.split(|b| *b == b'\n') {
            let mut rest = line;
            while let Some(i) = find_ascii_ci(rest, b"basic ") {
                let token: Vec<u8> = rest[i + 6..]
                    .iter()
                    .copied()
                    .skip_while(|b| *b == b' ')
                    .take_while(|b| !b" \r\t,;\"'".contains(b))
                    .collect();
                if let Ok(decoded) = B64.decode(&token)
                    && let Some(n) = found(&decoded)
                {
                    return Some(n);
                }
                rest = &rest[i + 6..];
            }
        }
        None
    }
}

impl Sealed {
    /// The name of the first credential whose placeholder a host name
    /// carries (a label of a DNS query, an SNI, a `Host`): names compare
    /// without case.
    pub fn find_in_name(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.items
            .iter()
            .find(|(_, p, _)| name.contains(&p.to_ascii_lowercase()))
            .map(|(n, _, _)| &**n)
    }
}

fn find_ascii_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hosts: &[&str], format: &str, env_var: &str) -> CredentialConfig {
        CredentialConfig {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            secret_file: Default::default(),
            secret_env: env_var.into(),
            header: "authorization".into(),
            format: format.into(),
            env: "GITHUB_TOKEN".into(),
        }
    }

    #[test]
    fn formats_render_and_refuse() {
        let s = Secret(Arc::from("s3cr3t"));
        assert_eq!(
            Format::parse("Bearer {secret}").unwrap().render(&s),
            "Bearer s3cr3t"
        );
        assert_eq!(Format::parse("{secret}").unwrap().render(&s), "s3cr3t");
        assert_eq!(
            Format::parse("Basic {basic:x-access-token}")
                .unwrap()
                .render(&s),
            format!("Basic {}", B64.encode("x-access-token:s3cr3t"))
        );
        for bad in [
            "Bearer",
            "{secret}{secret}",
            "Basic {basic:a:b}",
            "{basic:u",
            "{basic:u} x",
        ] {
            assert!(Format::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_secret_never_prints() {
        let s = Secret(Arc::from("s3cr3t"));
        assert!(!format!("{s:?}").contains("s3cr3t"));
        let c = Credential {
            name: Arc::from("gh"),
            hosts: vec![],
            header: "authorization".into(),
            format: Format::parse("Bearer {secret}").unwrap(),
            env: None,
            secret: s,
        };
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    #[test]
    fn shapes_are_checked_with_their_keys() {
        let ok = config(&["github.test", "*.github.test"], "Bearer {secret}", "X");
        assert!(check_shape("github", &ok).is_empty());
        let keys = |c: &CredentialConfig, name: &str| {
            check_shape(name, c)
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            keys(&config(&["*.com"], "Bearer {secret}", "X"), "g"),
            ["credentials.g.hosts"]
        );
        assert_eq!(
            keys(&config(&["10.0.0.1"], "Bearer {secret}", "X"), "g"),
            ["credentials.g.hosts"]
        );
        assert_eq!(
            keys(&config(&["a.test:443"], "Bearer {secret}", "X"), "g"),
            ["credentials.g.hosts"]
        );
        assert_eq!(
            keys(&config(&["a.test"], "Bearer", "X"), "g"),
            ["credentials.g.format"]
        );
        let mut host_header = config(&["a.test"], "{secret}", "X");
        host_header.header = "Host".into();
        assert_eq!(keys(&host_header, "g"), ["credentials.g.header"]);
        let mut both = config(&["a.test"], "{secret}", "X");
        both.secret_file = "/x".into();
        assert_eq!(keys(&both, "g"), ["credentials.g.secret_file"]);
        assert_eq!(
            keys(&config(&["a.test"], "{secret}", "X"), "a b"),
            ["credentials.a b"]
        );
    }

    #[test]
    fn a_secret_that_cannot_be_read_names_its_key_and_not_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gh");
        std::fs::write(&file, "tok\u{7}en\n").unwrap();
        let mut c = config(&["a.test"], "{secret}", "");
        c.secret_file = file.clone();
        let all = BTreeMap::from([("gh".to_string(), c.clone())]);
        let errors = Credentials::load(&all).unwrap_err();
        assert_eq!(errors[0].0, "credentials.gh.secret_file");
        assert!(!errors[0].1.to_string().contains("tok"));
        std::fs::write(&file, "token\n").unwrap();
        let loaded = Credentials::load(&all).unwrap();
        assert_eq!(loaded.get("gh").unwrap().header_value(), "token");
        c.secret_file = dir.path().join("missing");
        let errors = Credentials::load(&BTreeMap::from([("gh".to_string(), c)])).unwrap_err();
        assert_eq!(errors[0].0, "credentials.gh.secret_file");
    }

    #[test]
    fn placeholders_are_per_sandbox_and_credential() {
        let a = placeholder(b"k", "c1", "github");
        // Every gateway of a fleet, of any version, makes the same one:
        // HMAC-SHA-256("k", "sluice placeholder\0c1\0github"), 128 bits, hex.
        assert_eq!(a, "sluice-sealed-github-e3557c48e0a4db9035ca5a7edafc0186");
        assert_eq!(a, placeholder(b"k", "c1", "github"));
        assert_ne!(a, placeholder(b"k", "c2", "github"));
        assert_ne!(a, placeholder(b"k", "c1", "openai"));
        assert_ne!(a, placeholder(b"other", "c1", "github"));
    }

    /// A sandbox's placeholders are made once per seal: asked again under
    /// the same seal, the same ones without an HMAC; under a new seal (a
    /// SIGHUP's new key), made anew; the old seal is not kept alive.
    #[test]
    fn placeholders_are_remembered_per_seal() {
        let memo = Placeholders::<Vec<u8>>::default();
        let made = std::cell::Cell::new(0);
        let make = |key: &[u8]| {
            made.set(made.get() + 1);
            vec![placeholder(key, "c1", "github")]
        };
        let first = Arc::new(b"k".to_vec());
        let a = memo.under(&first, || make(&first));
        let b = memo.under(&first, || make(&first));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(made.get(), 1);
        let second = Arc::new(b"other".to_vec());
        let c = memo.under(&second, || make(&second));
        assert_eq!(made.get(), 2);
        assert_ne!(a, c);
        assert_eq!(&*c, &[placeholder(b"other", "c1", "github")]);
        let weak = Arc::downgrade(&second);
        drop(second);
        assert!(weak.upgrade().is_none(), "the memo keeps no seal alive");
        // A seal made after the remembered one is gone is a new seal.
        let third = Arc::new(b"third".to_vec());
        memo.under(&third, || make(&third));
        assert_eq!(made.get(), 3);
    }

    #[test]
    fn placeholders_are_found_plain_and_in_basic() {
        let sealed = Sealed::new(b"k", "c1", &["gh".into()], &Credentials::default());
        let p = sealed.items[0].1.clone();
        let head = format!("GET /?t={p} HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(sealed.find_in(head.as_bytes()), Some("gh"));
        let basic = B64.encode(format!("git:{p}"));
        let head = format!("GET / HTTP/1.1\r\nAuthorization: Basic {basic}\r\n\r\n");
        assert_eq!(sealed.find_in(head.as_bytes()), Some("gh"));
        let head = format!("GET / HTTP/1.1\r\nX-Note: bAsIc   {basic}, more\r\n\r\n");
        assert_eq!(sealed.find_in(head.as_bytes()), Some("gh"));
        let other = placeholder(b"k", "c2", "gh");
        assert_eq!(sealed.find_in(other.as_bytes()), None);
        assert_eq!(
            sealed.find_in(b"GET / HTTP/1.1\r\nAuthorization: Basic !!!\r\n\r\n"),
            None
        );
    }

    #[test]
    fn placeholders_are_found_in_names_whatever_their_case() {
        let sealed = Sealed::new(b"k", "c1", &["GH".into()], &Credentials::default());
        let p = sealed.items[0].1.clone();
        assert!(p.len() < 64, "a placeholder fits in one DNS label: {p}");
        let name = format!("{}.exfil.test", p.to_ascii_lowercase());
        assert_eq!(sealed.find_in_name(&name), Some("GH"));
        assert_eq!(sealed.find_in_name("api.exfil.test"), None);
    }

    #[test]
    fn hosts_match_exactly_or_below_a_wildcard() {
        let mut c = config(
            &["api.github.test", "*.githubusercontent.test"],
            "{secret}",
            "",
        );
        c.secret_env = "PATH".into();
        let all = Credentials::load(&BTreeMap::from([("gh".to_string(), c)])).unwrap();
        let gh = all.get("gh").unwrap();
        let n = |s: &str| HostName::parse(s).unwrap();
        assert!(gh.covers(&n("api.github.test")));
        assert!(!gh.covers(&n("github.test")));
        assert!(gh.covers(&n("raw.githubusercontent.test")));
        assert!(!gh.covers(&n("githubusercontent.test")));
        assert!(!gh.covers(&n("evilgithubusercontent.test")));
    }
}
