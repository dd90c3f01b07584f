//! Tokens: ES256 key pairs and their JWKS, minting, and verification with
//! sluice's own rules (ES256 only, `kid` required and looked up, `iss`,
//! `aud`, `exp`, `nbf` and `iat` checked with the configured leeway, the
//! claims sluice relies on required). Verified tokens are cached as
//! [`Grant`]s keyed by a SHA-256 of the token, each entry living no longer
//! than its token. The cache is never the source of truth: a miss verifies
//! again.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dashmap::DashMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::deny::Deny;
use crate::host::HostPattern;
use crate::metrics as m;
use crate::policy::Allowlist;
use crate::presets::Presets;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// How many verified tokens the cache holds.
const CACHE_CAPACITY: u64 = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("not a JWT: {0}")]
    Malformed(String),
    #[error("algorithm {0} is not accepted (ES256 only)")]
    BadAlgorithm(String),
    #[error("token header has no kid")]
    MissingKid,
    #[error("no key with kid {0:?} in the JWKS")]
    UnknownKid(String),
    #[error("bad signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token revoked")]
    Revoked,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("token issued in the future (iat)")]
    IssuedInFuture,
    #[error("wrong issuer")]
    BadIssuer,
    #[error("wrong audience")]
    BadAudience,
    #[error("missing claim {0}")]
    MissingClaim(String),
    #[error("bad claims: {0}")]
    BadClaims(String),
    #[error("bad allowed_hosts entry {0:?}: {1}")]
    BadAllowedHosts(String, String),
}

impl TokenError {
    pub fn deny(&self) -> Deny {
        match self {
            TokenError::Expired => Deny::TokenExpired,
            TokenError::Revoked => Deny::TokenRevoked,
            _ => Deny::TokenInvalid,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Format(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// `"a,b"` or `["a","b"]` in, `"a,b"` out, as the original design has it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostList(pub Vec<String>);

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
    #[serde(default)]
    pub enforce_container_binding: Flag,
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
}

impl Grant {
    /// Expired at `now` (seconds), allowing `leeway`?
    pub fn expired_at(&self, now: u64, leeway: u64) -> bool {
        now > self.claims.exp.saturating_add(leeway)
    }
}

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A freshly generated ES256 key pair, in the three files `keygen` writes.
pub struct KeyPair {
    pub private_pem: String,
    pub public_pem: String,
    pub jwk: serde_json::Value,
}

impl KeyPair {
    pub fn generate(kid: &str) -> Result<KeyPair, KeyError> {
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        Self::from_secret(&secret, kid)
    }

    /// Reads a PKCS#8 PEM private key and derives the rest.
    pub fn from_private_pem(pem: &str, kid: &str) -> Result<KeyPair, KeyError> {
        let secret = p256::SecretKey::from_pkcs8_pem(pem)
            .map_err(|e| KeyError::Format(format!("not a P-256 PKCS#8 private key: {e}")))?;
        Self::from_secret(&secret, kid)
    }

    fn from_secret(secret: &p256::SecretKey, kid: &str) -> Result<KeyPair, KeyError> {
        let private_pem = secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| KeyError::Format(e.to_string()))?
            .to_string();
        let public = secret.public_key();
        let public_pem = public
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| KeyError::Format(e.to_string()))?;
        let point = public.to_encoded_point(false);
        let (Some(x), Some(y)) = (point.x(), point.y()) else {
            return Err(KeyError::Format("public key is the identity".into()));
        };
        let jwk = serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(x),
            "y": URL_SAFE_NO_PAD.encode(y),
            "use": "sig",
            "alg": "ES256",
            "kid": kid,
        });
        Ok(KeyPair {
            private_pem,
            public_pem,
            jwk,
        })
    }

    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": [self.jwk] })
    }

    /// Writes `private-key.pem` (0600), `public-key.pem` and `jwks.json`
    /// into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), KeyError> {
        self.write_to(&dir.join("private-key.pem"), &dir.join("jwks.json"))
    }

    /// Writes the private key (0600, never over an existing file), the
    /// public key beside it as `public-key.pem`, and the JWKS.
    pub fn write_to(&self, key_path: &Path, jwks_path: &Path) -> Result<(), KeyError> {
        let key_dir = parent_of(key_path);
        std::fs::create_dir_all(key_dir).map_err(io_err(key_dir))?;
        write_private(key_path, self.private_pem.as_bytes())?;
        write_public(&key_dir.join("public-key.pem"), &self.public_pem)?;
        self.write_jwks(jwks_path)
    }

    /// Writes the JWKS alone (for a private key that has none yet).
    pub fn write_jwks(&self, jwks_path: &Path) -> Result<(), KeyError> {
        let text = serde_json::to_string_pretty(&self.jwks())
            .map_err(|e| KeyError::Format(e.to_string()))?;
        write_public(jwks_path, &text)
    }
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn write_public(path: &Path, text: &str) -> Result<(), KeyError> {
    let dir = parent_of(path);
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    std::fs::write(path, format!("{}\n", text.trim_end())).map_err(io_err(path))
}

/// Creates a file readable by its owner only, failing if it exists.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(contents).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// A set of public keys by kid, and the JSON it came from (served as is).
pub struct Jwks {
    keys: HashMap<String, DecodingKey>,
    public: serde_json::Value,
}

impl Jwks {
    pub fn parse(json: &str) -> Result<Jwks, KeyError> {
        #[derive(Deserialize)]
        struct Set {
            keys: Vec<serde_json::Value>,
        }
        #[derive(Deserialize)]
        struct EcKey {
            kty: String,
            crv: String,
            x: String,
            y: String,
            kid: String,
            #[serde(default)]
            alg: Option<String>,
            #[serde(rename = "use", default)]
            use_: Option<String>,
        }
        let set: Set =
            serde_json::from_str(json).map_err(|e| KeyError::Format(format!("JWKS: {e}")))?;
        let mut keys = HashMap::new();
        for (i, raw) in set.keys.iter().enumerate() {
            let key: EcKey = serde_json::from_value(raw.clone())
                .map_err(|e| KeyError::Format(format!("JWKS key {i}: {e}")))?;
            if key.kty != "EC" || key.crv != "P-256" {
                return Err(KeyError::Format(format!(
                    "JWKS key {:?}: only EC P-256 keys are accepted",
                    key.kid
                )));
            }
            if key.alg.as_deref().is_some_and(|a| a != "ES256")
                || key.use_.as_deref().is_some_and(|u| u != "sig")
            {
                return Err(KeyError::Format(format!(
                    "JWKS key {:?}: alg must be ES256 and use sig",
                    key.kid
                )));
            }
            let decoding = DecodingKey::from_ec_components(&key.x, &key.y)
                .map_err(|e| KeyError::Format(format!("JWKS key {:?}: {e}", key.kid)))?;
            if keys.insert(key.kid.clone(), decoding).is_some() {
                return Err(KeyError::Format(format!("JWKS: kid {:?} twice", key.kid)));
            }
        }
        Ok(Jwks {
            keys,
            public: serde_json::json!({ "keys": set.keys }),
        })
    }

    pub fn load(path: &Path) -> Result<Jwks, KeyError> {
        Self::parse(&std::fs::read_to_string(path).map_err(io_err(path))?)
    }

    pub fn public(&self) -> &serde_json::Value {
        &self.public
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Checks tokens against a JWKS and caches what passed. Owns the
/// revocation list too, so no path can verify a token and miss it.
pub struct Verifier {
    jwks: RwLock<Arc<Jwks>>,
    validation: Validation,
    leeway: u64,
    cache: moka::sync::Cache<[u8; 32], Arc<Grant>>,
    /// Revoked `jti` → its `exp` (kept until then, plus leeway).
    revoked: DashMap<String, u64>,
    /// `jti` → cancelled when that token is revoked: live connections
    /// holding it close.
    watchers: DashMap<String, (u64, CancellationToken)>,
    /// `@name` entries expand from these.
    presets: Arc<Presets>,
    /// Bumped on every key-set change: a grant verified under an older
    /// generation is verified again before it is trusted.
    generation: std::sync::atomic::AtomicU64,
}

struct UntilExpiry {
    leeway: u64,
}

impl moka::Expiry<[u8; 32], Arc<Grant>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        grant: &Arc<Grant>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        let until = grant.claims.exp.saturating_add(self.leeway);
        Some(Duration::from_secs(until.saturating_sub(now_s())))
    }
}

pub fn token_key(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Verifier {
    pub fn new(jwks: Jwks, issuer: &str, audience: &str, leeway: u64) -> Verifier {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = leeway;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        Verifier {
            jwks: RwLock::new(Arc::new(jwks)),
            validation,
            leeway,
            cache: moka::sync::Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .expire_after(UntilExpiry { leeway })
                .build(),
            revoked: DashMap::new(),
            watchers: DashMap::new(),
            presets: Arc::default(),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Uses these presets (built in and `[presets]`) for `@name` entries.
    pub fn with_presets(mut self, presets: Arc<Presets>) -> Verifier {
        self.presets = presets;
        self
    }

    /// Refuses the token with this `jti` from now on (until `exp`), and
    /// closes the live connections that watch it. `true` if it was new.
    pub fn revoke(&self, jti: &str, exp: u64) -> bool {
        let new = self.revoked.insert(jti.to_owned(), exp).is_none();
        if let Some((_, (_, token))) = self.watchers.remove(jti) {
            token.cancel();
        }
        new
    }

    pub fn is_revoked(&self, jti: &str) -> bool {
        self.revoked.contains_key(jti)
    }

    /// Revoked tokens not yet expired, as `(jti, exp)`.
    pub fn revoked(&self) -> Vec<(String, u64)> {
        let mut all: Vec<_> = self
            .revoked
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect();
        all.sort();
        all
    }

    /// A token cancelled when this grant's token is revoked.
    pub fn watch(&self, grant: &Grant) -> CancellationToken {
        let jti = &grant.claims.jti;
        if self.is_revoked(jti) {
            let t = CancellationToken::new();
            t.cancel();
            return t;
        }
        // Every connection asks: the common case (the token is watched
        // already) takes a read lock and copies nothing.
        if let Some(w) = self.watchers.get(jti.as_str()) {
            return w.1.clone();
        }
        self.watchers
            .entry(jti.clone())
            .or_insert_with(|| (grant.claims.exp, CancellationToken::new()))
            .1
            .clone()
    }

    /// Forgets revocations of tokens that have expired anyway, and closes
    /// the watchers of expired tokens. `true` if a revocation was dropped.
    pub fn purge_expired(&self, now: u64) -> Vec<String> {
        let mut purged = Vec::new();
        self.revoked.retain(|jti, exp| {
            let keep = exp.saturating_add(self.leeway) >= now;
            if !keep {
                purged.push(jti.clone());
            }
            keep
        });
        // An expired token's live proxy connections close too.
        self.watchers.retain(|_, (exp, token)| {
            let live = exp.saturating_add(self.leeway) >= now;
            if !live {
                token.cancel();
            }
            live
        });
        purged
    }

    pub fn jwks(&self) -> Arc<Jwks> {
        Arc::clone(&self.jwks.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the key set; cached grants are dropped so every token is
    /// checked against the new keys.
    pub fn set_jwks(&self, jwks: Jwks) {
        *self.jwks.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(jwks);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.cache.invalidate_all();
    }

    /// The key set's generation (see [`Sandbox`](super::Sandbox)'s
    /// verified grant).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Full verification and the revocation check, without the cache: for
    /// a registered sandbox, which keeps its own verified grant.
    pub fn verify_fresh(&self, token: &str) -> Result<Arc<Grant>, TokenError> {
        let grant = self.verify_uncached(token)?;
        if self.is_revoked(&grant.claims.jti) {
            return Err(TokenError::Revoked);
        }
        Ok(Arc::new(grant))
    }

    pub fn leeway(&self) -> u64 {
        self.leeway
    }

    /// Verifies a token, from the cache when it was verified before.
    pub fn verify(&self, token: &str) -> Result<Arc<Grant>, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        self.verify_keyed(token, &token_key(token))
    }

    /// As [`verify`](Self::verify), with the cache key already computed.
    pub fn verify_keyed(&self, token: &str, key: &[u8; 32]) -> Result<Arc<Grant>, TokenError> {
        let grant = match self.cache.get(key) {
            Some(grant) => {
                ::metrics::counter!(m::CLAIMS_CACHE_HITS).increment(1);
                if grant.expired_at(now_s(), self.leeway) {
                    self.cache.invalidate(key);
                    return Err(TokenError::Expired);
                }
                grant
            }
            None => {
                ::metrics::counter!(m::CLAIMS_CACHE_MISSES).increment(1);
                let grant = Arc::new(self.verify_uncached(token)?);
                self.cache.insert(*key, Arc::clone(&grant));
                grant
            }
        };
        if !self.revoked.is_empty() && self.revoked.contains_key(&grant.claims.jti) {
            return Err(TokenError::Revoked);
        }
        Ok(grant)
    }

    /// Full verification, no cache.
    pub fn verify_uncached(&self, token: &str) -> Result<Grant, TokenError> {
        use jsonwebtoken::errors::ErrorKind as K;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let header = header_of(token)?;
        let kid = header.kid.ok_or(TokenError::MissingKid)?;
        let jwks = self.jwks();
        let key = jwks
            .keys
            .get(&kid)
            .ok_or_else(|| TokenError::UnknownKid(kid.clone()))?;
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
                match e.kind() {
                    K::InvalidSignature => TokenError::BadSignature,
                    K::ExpiredSignature => TokenError::Expired,
                    K::ImmatureSignature => TokenError::NotYetValid,
                    K::InvalidIssuer => TokenError::BadIssuer,
                    K::InvalidAudience => TokenError::BadAudience,
                    K::InvalidAlgorithm => TokenError::BadAlgorithm(format!("{:?}", header.alg)),
                    K::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
                    K::Json(e) => missing_field(&e.to_string())
                        .map(TokenError::MissingClaim)
                        .unwrap_or_else(|| TokenError::BadClaims(e.to_string())),
                    other => TokenError::Malformed(format!("{other:?}")),
                }
            })?;
        let claims = data.claims;
        if claims.iat > now_s().saturating_add(self.leeway) {
            return Err(TokenError::IssuedInFuture);
        }
        if claims.container_id.is_empty() {
            return Err(TokenError::MissingClaim("container_id".into()));
        }
        let allowlist = compile_hosts(&claims.allowed_hosts.0, &self.presets)?;
        Ok(Grant {
            container: Arc::from(claims.container_id.as_str()),
            claims,
            allowlist,
        })
    }
}

/// A token's claims, read without checking anything: for describing a
/// token that was verified elsewhere (a fleet session), never for a
/// decision.
pub fn claims_unverified(token: &str) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge);
    }
    jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|e| TokenError::Malformed(e.to_string()))
}

impl Verifier {
    /// A stored token's claims, read without checking its signature: what a
    /// restart restores before serving, so it does not wait for every
    /// token's ES256 verification. Each is verified in full on its first
    /// use (through the cache, as always) and by the background pass that
    /// follows a restore; an expired token is refused here already.
    pub fn decode_unverified(&self, token: &str) -> Result<Grant, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let claims: Claims = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|e| TokenError::Malformed(e.to_string()))?;
        let grant = Grant {
            allowlist: compile_hosts(&claims.allowed_hosts.0, &self.presets)?,
            container: Arc::from(claims.container_id.as_str()),
            claims,
        };
        if grant.expired_at(now_s(), self.leeway) {
            return Err(TokenError::Expired);
        }
        Ok(grant)
    }
}

/// serde's "missing field `exp` at …" names the claim.
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_owned())
}

/// The token's header, with the algorithm checked before anything else.
fn header_of(token: &str) -> Result<Header, TokenError> {
    // `alg: none` and friends are not in jsonwebtoken's Algorithm enum, so
    // they fail here as malformed; say which algorithm it was.
    let header = jsonwebtoken::decode_header(token).map_err(|e| {
        let alg = token
            .split('.')
            .next()
            .and_then(|h| URL_SAFE_NO_PAD.decode(h).ok())
            .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
            .and_then(|h| h.get("alg").and_then(|a| a.as_str()).map(str::to_owned));
        match alg {
            Some(alg) if alg != "ES256" => TokenError::BadAlgorithm(alg),
            _ => TokenError::Malformed(e.to_string()),
        }
    })?;
    if header.alg != Algorithm::ES256 {
        return Err(TokenError::BadAlgorithm(format!("{:?}", header.alg)));
    }
    Ok(header)
}

/// Compiles `allowed_hosts`, `@name` entries expanded from `presets`; one
/// bad entry (or an unknown preset) makes the whole token invalid.
pub fn compile_hosts(hosts: &[String], presets: &Presets) -> Result<Allowlist, TokenError> {
    let mut patterns = Vec::with_capacity(hosts.len());
    for h in hosts {
        if let Some(name) = h.trim().strip_prefix('@') {
            let group = presets
                .expand(name)
                .map_err(|e| TokenError::BadAllowedHosts(h.clone(), e.to_string()))?;
            let label: Arc<str> = Arc::from(h.trim());
            patterns.extend(group.iter().map(|p| (p.clone(), Some(Arc::clone(&label)))));
            continue;
        }
        let p: HostPattern = h.parse().map_err(|e: crate::host::HostError| {
            TokenError::BadAllowedHosts(h.clone(), e.to_string())
        })?;
        patterns.push((p, None));
    }
    Ok(Allowlist::with_presets(patterns))
}

/// What to mint.
#[derive(Debug, Clone)]
pub struct MintRequest {
    pub container_id: String,
    pub user_id: String,
    pub allowed_hosts: Vec<String>,
    pub ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("{0}")]
    BadRequest(String),
    #[error("signing failed: {0}")]
    Signing(String),
}

/// A minted token and its facts.
#[derive(Debug, Clone)]
pub struct Minted {
    pub token: String,
    pub claims: Claims,
}

/// Signs tokens with one private key.
pub struct Signer {
    kid: String,
    key: EncodingKey,
    issuer: String,
    audience: String,
    presets: Arc<Presets>,
}

/// Is `s` a safe identifier (container or user id)? Letters, digits, `_`,
/// `-`, `.`, 1 to 128 bytes, not `.` or `..`.
pub fn is_safe_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl Signer {
    pub fn from_pem(
        pem: &[u8],
        kid: &str,
        issuer: &str,
        audience: &str,
    ) -> Result<Signer, KeyError> {
        let key = EncodingKey::from_ec_pem(pem)
            .map_err(|e| KeyError::Format(format!("not an EC private key: {e}")))?;
        Ok(Signer {
            kid: kid.to_owned(),
            key,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            presets: Arc::default(),
        })
    }

    /// Checks `@name` entries against these presets when minting.
    pub fn with_presets(mut self, presets: Arc<Presets>) -> Signer {
        self.presets = presets;
        self
    }

    pub fn load(path: &Path, kid: &str, issuer: &str, audience: &str) -> Result<Signer, KeyError> {
        let pem = std::fs::read(path).map_err(io_err(path))?;
        Self::from_pem(&pem, kid, issuer, audience)
    }

    pub fn mint(&self, req: &MintRequest) -> Result<Minted, MintError> {
        if !is_safe_id(&req.container_id) {
            return Err(MintError::BadRequest(
                "container_id must be 1-128 letters, digits, '_', '-' or '.'".into(),
            ));
        }
        if !is_safe_id(&req.user_id) {
            return Err(MintError::BadRequest(
                "user_id must be 1-128 letters, digits, '_', '-' or '.'".into(),
            ));
        }
        if req.allowed_hosts.is_empty() {
            return Err(MintError::BadRequest("allowed_hosts is empty".into()));
        }
        compile_hosts(&req.allowed_hosts, &self.presets)
            .map_err(|e| MintError::BadRequest(e.to_string()))?;
        if req.ttl.is_zero() {
            return Err(MintError::BadRequest("ttl must be positive".into()));
        }
        let now = now_s();
        let mut jti = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut jti);
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: serde_json::Value::String(self.audience.clone()),
            iat: now,
            nbf: Some(now),
            exp: now.saturating_add(req.ttl.as_secs()),
            jti: jti.iter().map(|b| format!("{b:02x}")).collect(),
            container_id: req.container_id.clone(),
            user_id: Some(req.user_id.clone()),
            organization_uuid: None,
            allowed_hosts: HostList(req.allowed_hosts.clone()),
            enforce_container_binding: Flag(true),
            use_egress_gateway: Flag(true),
        };
        let token = self.sign(&claims)?;
        if token.len() > MAX_TOKEN_BYTES {
            // No verifier would accept it: refuse it here, with the reason.
            return Err(MintError::BadRequest(format!(
                "the token would be {} bytes, over the {MAX_TOKEN_BYTES}-byte limit every                  verifier enforces: allow fewer or shorter hosts (a wildcard covers many)",
                token.len()
            )));
        }
        Ok(Minted { token, claims })
    }

    /// Signs arbitrary claims: for tests and tools that need odd tokens.
    pub fn sign(&self, claims: &Claims) -> Result<String, MintError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key)
            .map_err(|e| MintError::Signing(e.to_string()))
    }
}

#[cfg(test)]
mod tests;
