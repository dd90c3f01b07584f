//! ES256 key pairs (generated, written 0600, read back), the JWKS their
//! public halves make, and minting with a [`Signer`].

use super::*;

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
    pub(super) keys: HashMap<String, DecodingKey>,
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

/// What to mint.
#[derive(Debug, Clone)]
pub struct MintRequest {
    pub container_id: String,
    pub user_id: String,
    pub allowed_hosts: Vec<String>,
    /// `[credentials.NAME]` names (claim `credentials`).
    pub credentials: Vec<String>,
    pub ttl: Duration,
    /// Claim `enforce`.
    pub enforce: super::Enforce,
    /// Claim `limits`.
    pub limits: crate::limits::Limits,
    /// Claim `organization_uuid`: whose `[limits.organizations]` budget
    /// the sandbox spends.
    pub organization_uuid: Option<String>,
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
    presets: RwLock<Arc<Presets>>,
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
            presets: RwLock::default(),
        })
    }

    /// Replaces the presets minting checks `@name` entries against
    /// (SIGHUP).
    pub fn set_presets(&self, presets: Arc<Presets>) {
        *self.presets.write().unwrap_or_else(|p| p.into_inner()) = presets;
    }

    /// Checks `@name` entries against these presets when minting.
    pub fn with_presets(self, presets: Arc<Presets>) -> Signer {
        self.set_presets(presets);
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
        let presets = Arc::clone(&self.presets.read().unwrap_or_else(|p| p.into_inner()));
        compile_hosts(&req.allowed_hosts, &presets)
            .map_err(|e| MintError::BadRequest(e.to_string()))?;
        if req.ttl.is_zero() {
            return Err(MintError::BadRequest("ttl must be positive".into()));
        }
        req.limits.validate().map_err(MintError::BadRequest)?;
        if let Some(org) = &req.organization_uuid
            && !is_safe_id(org)
        {
            return Err(MintError::BadRequest(
                "organization_uuid must be 1-128 letters, digits, '_', '-' or '.'".into(),
            ));
        }
        if let Some(bad) = req.credentials.iter().find(|n| !is_credential_name(n)) {
            return Err(MintError::BadRequest(format!(
                "{bad:?} is not a credential name (letters, digits, '_', '-')"
            )));
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
            organization_uuid: req.organization_uuid.clone(),
            allowed_hosts: HostList(req.allowed_hosts.clone()),
            credentials: HostList(req.credentials.clone()),
            enforce_container_binding: Flag(true),
            enforce: req.enforce,
            limits: req.limits,
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

/// A `[credentials.NAME]` name: letters, digits, `_`, `-`.
pub fn is_credential_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}
