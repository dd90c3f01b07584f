//! The [`Verifier`]: full verification with sluice's rules, the claims
//! cache in front of it, revocations and the connections that watch them.

use super::*;

/// How many verified tokens the cache holds.
const CACHE_CAPACITY: u64 = 200_000;

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
    watchers: DashMap<String, Watched>,
    /// The parent of every watcher: cancelled, it closes every connection
    /// (the gateway's hard stop).
    root: CancellationToken,
    /// `@name` entries expand from these.
    presets: RwLock<Arc<Presets>>,
    /// Bumped on every key-set change: a grant verified under an older
    /// generation is verified again before it is trusted.
    generation: std::sync::atomic::AtomicU64,
    /// The longest life a token may have left (`auth.max_ttl_s`): a token
    /// that outlives it is refused, so no revocation ever needs to be kept
    /// longer, and one that claims to is cut to it.
    max_life: u64,
}

/// A gateway's default for the longest token life (7 days), as
/// `auth.max_ttl_s`'s.
pub const DEFAULT_MAX_LIFE_S: u64 = 7 * 24 * 3600;

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

/// The connections watching one token: cancelled when it is revoked or
/// expires; a replacement of the same container's token takes them over.
#[derive(Debug)]
struct Watched {
    exp: u64,
    container: Arc<str>,
    tokens: Vec<CancellationToken>,
}

impl Watched {
    fn new(grant: &Grant) -> Watched {
        Watched {
            exp: grant.claims.exp,
            container: Arc::clone(&grant.container),
            tokens: Vec::new(),
        }
    }
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
            root: CancellationToken::new(),
            presets: RwLock::default(),
            generation: std::sync::atomic::AtomicU64::new(0),
            max_life: DEFAULT_MAX_LIFE_S,
        }
    }

    /// Every connection's token is also cancelled with `stop` (the
    /// gateway's hard stop): one wire ends every connection, wherever it is.
    pub fn with_stop(mut self, stop: &CancellationToken) -> Verifier {
        self.root = stop.child_token();
        self
    }

    /// Refuses tokens with more than `secs` of life left (`auth.max_ttl_s`).
    pub fn with_max_life(mut self, secs: u64) -> Verifier {
        self.max_life = secs;
        self
    }

    /// The latest expiry a token verified now may have: what bounds every
    /// revocation, local or from the fleet.
    pub fn latest_exp(&self, now: u64) -> u64 {
        now.saturating_add(self.max_life)
            .saturating_add(self.leeway)
    }

    /// Uses these presets (built in and `[presets]`) for `@name` entries.
    pub fn with_presets(self, presets: Arc<Presets>) -> Verifier {
        self.set_presets(presets);
        self
    }

    /// Replaces the presets (SIGHUP): tokens verified from now on expand
    /// `@name` with these (the proxy door's cached grants are dropped); a
    /// registered sandbox keeps the allowlist it registered with.
    pub fn set_presets(&self, presets: Arc<Presets>) {
        *self.presets.write().unwrap_or_else(|p| p.into_inner()) = presets;
        self.cache.invalidate_all();
    }

    fn presets(&self) -> Arc<Presets> {
        Arc::clone(&self.presets.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Refuses the token with this `jti` from now on (until `exp`), and
    /// closes the live connections that watch it. `true` if it was new.
    /// An `exp` past the longest life a token may have is cut to it: no
    /// token this gateway accepts outlives that, and a far-future expiry
    /// (from a hostile fleet peer) cannot pin an entry for ever.
    pub fn revoke(&self, jti: &str, exp: u64) -> bool {
        let exp = exp.min(self.latest_exp(now_s()));
        let new = self.revoked.insert(jti.to_owned(), exp).is_none();
        if let Some((_, w)) = self.watchers.remove(jti) {
            w.tokens.iter().for_each(CancellationToken::cancel);
        }
        new
    }

    /// The connections watching `old_jti` watch `grant`'s token from now
    /// on (a replacement keeps them): revoking the old one no longer
    /// closes them, revoking (or the expiry of) the new one does.
    pub fn rekey(&self, old_jti: &str, grant: &Grant) {
        let Some((_, moved)) = self.watchers.remove(old_jti) else {
            return;
        };
        // Only a token of the same container takes them over (a peer
        // naming another container's jti moves nothing: those close).
        if moved.container != grant.container || self.is_revoked(&grant.claims.jti) {
            moved.tokens.iter().for_each(CancellationToken::cancel);
            return;
        }
        let mut entry = self
            .watchers
            .entry(grant.claims.jti.clone())
            .or_insert_with(|| Watched::new(grant));
        entry.exp = grant.claims.exp;
        entry.tokens.extend(moved.tokens);
    }

    pub fn is_revoked(&self, jti: &str) -> bool {
        self.revoked.contains_key(jti)
    }

    /// How many revocations are held.
    pub fn revoked_len(&self) -> usize {
        self.revoked.len()
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

    /// A token cancelled when this grant's token is revoked or expires, the
    /// sandbox is unregistered, or the gateway stops hard.
    pub fn watch(&self, grant: &Grant) -> CancellationToken {
        let jti = &grant.claims.jti;
        if self.is_revoked(jti) {
            let t = CancellationToken::new();
            t.cancel();
            return t;
        }
        // Every connection asks: the common case (the token is watched
        // already) takes a read lock and copies nothing.
        if let Some(w) = self.watchers.get(jti.as_str())
            && let Some(t) = w.tokens.first()
        {
            return t.clone();
        }
        let mut entry = self
            .watchers
            .entry(jti.clone())
            .or_insert_with(|| Watched::new(grant));
        if entry.tokens.is_empty() {
            entry.tokens.push(self.root.child_token());
        }
        entry.tokens[0].clone()
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
        self.watchers.retain(|_, w| {
            let live = w.exp.saturating_add(self.leeway) >= now;
            if !live {
                w.tokens.iter().for_each(CancellationToken::cancel);
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

    /// The key set's generation (see [`Sandbox`](crate::identity::Sandbox)'s
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
        if claims.exp > self.latest_exp(now_s()) {
            return Err(TokenError::TooLong(self.max_life));
        }
        claims.limits.validate().map_err(TokenError::BadClaims)?;
        let allowlist = compile_hosts(&claims.allowed_hosts.0, &self.presets())?;
        Ok(Grant {
            container: Arc::from(claims.container_id.as_str()),
            claims,
            allowlist,
            placeholders: Default::default(),
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
            allowlist: compile_hosts(&claims.allowed_hosts.0, &self.presets())?,
            container: Arc::from(claims.container_id.as_str()),
            claims,
            placeholders: Default::default(),
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
