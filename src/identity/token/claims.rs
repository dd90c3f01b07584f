//! What a token says ([`Claims`], with its comma-or-array host list and
//! string-or-bool flags), and the [`Grant`] a verified token gives: its
//! claims with the allowlist compiled once.

use super::*;

/// `"a,b"` or `["a","b"]` in, `"a,b"` out, as the original design has it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostList(pub Vec<String>);

impl HostList {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for HostList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.join(","))
    }
}

impl<'de> Deserialize<'de> for HostList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let list = match Raw::deserialize(d)? {
            Raw::One(s) => s.split(',').map(str::to_owned).collect(),
            Raw::Many(v) => v,
        };
        Ok(HostList(
            list.into_iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        ))
    }
}

/// `"true"`/`"false"` (the original design's strings) or a JSON boolean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flag(pub bool);

impl Serialize for Flag {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0 { "true" } else { "false" })
    }
}

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            B(bool),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::B(b) => Ok(Flag(b)),
            Raw::S(s) if s.eq_ignore_ascii_case("true") => Ok(Flag(true)),
            Raw::S(s) if s.eq_ignore_ascii_case("false") => Ok(Flag(false)),
            Raw::S(s) => Err(serde::de::Error::custom(format!(
                "{s:?} is not true or false"
            ))),
        }
    }
}

/// `enforce`: what a denial by the allowlist or the request rules does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Enforce {
    /// Refused (the default).
    #[default]
    Enforce,
    /// Let through, and recorded as `would_deny` with its reason.
    /// Identity, token validity, the private-destination guard and
    /// credentials are never relaxed.
    Report,
}

impl Enforce {
    pub fn is_enforce(&self) -> bool {
        *self == Enforce::Enforce
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Enforce::Enforce => "enforce",
            Enforce::Report => "report",
        }
    }
}

/// The claims of a sluice token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: serde_json::Value,
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    pub exp: u64,
    pub jti: String,
    pub container_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization_uuid: Option<String>,
    pub allowed_hosts: HostList,
    /// The `[credentials.NAME]` this sandbox may use (CSV or array).
    #[serde(default, skip_serializing_if = "HostList::is_empty")]
    pub credentials: HostList,
    #[serde(default)]
    pub enforce_container_binding: Flag,
    /// `"enforce"` (the default) or `"report"`.
    #[serde(default, skip_serializing_if = "Enforce::is_enforce")]
    pub enforce: Enforce,
    /// Per-sandbox limits; a missing key is no limit.
    #[serde(default, skip_serializing_if = "crate::limits::Limits::is_empty")]
    pub limits: crate::limits::Limits,
    #[serde(default)]
    pub use_egress_gateway: Flag,
}

/// A verified token: its claims and its compiled allowlist.
#[derive(Debug)]
pub struct Grant {
    pub claims: Claims,
    pub allowlist: Allowlist,
    /// `claims.container_id`, shared: what each connection's slot and
    /// record hold without copying it.
    pub container: Arc<str>,
    /// Its credentials' placeholders, made once per seal.
    pub placeholders: crate::credentials::Placeholders<crate::proxy::Seal>,
}

impl Grant {
    /// Expired at `now` (seconds), allowing `leeway`?
    pub fn expired_at(&self, now: u64, leeway: u64) -> bool {
        now > self.claims.exp.saturating_add(leeway)
    }
}

/// Compiles `allowed_hosts`, `@name` entries expanded from `presets`; one
/// bad entry (or an unknown preset) makes the whole token invalid. An
/// entry may carry a request rule after its host: `HOST[:PORT] [METHODS]
/// /PATH-GLOB`; a malformed rule is refused with its reason, never
/// dropped.
pub fn compile_hosts(hosts: &[String], presets: &Presets) -> Result<Allowlist, TokenError> {
    let mut patterns = Vec::with_capacity(hosts.len());
    for h in hosts {
        let entry = h.trim();
        let bad = |why: String| TokenError::BadAllowedHosts(h.clone(), why);
        if let Some(name) = entry.strip_prefix('@') {
            if name.contains(char::is_whitespace) {
                return Err(bad("a preset entry takes no rule".into()));
            }
            let group = presets.expand(name).map_err(|e| bad(e.to_string()))?;
            let label: Arc<str> = Arc::from(entry);
            patterns.extend(
                group
                    .iter()
                    .map(|(p, rule)| (p.clone(), rule.clone(), Some(Arc::clone(&label)))),
            );
            continue;
        }
        let (pattern, rule) = crate::policy::parse_entry(entry).map_err(bad)?;
        patterns.push((pattern, rule, None));
    }
    Ok(Allowlist::with_rules(patterns))
}
