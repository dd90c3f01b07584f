//! Tokens, in three parts: `keys` (ES256 key pairs, their JWKS, and
//! minting with a [`Signer`]), `claims` (what a token says, and the
//! [`Grant`] a verified one gives), and `verify` (the [`Verifier`], with
//! sluice's own rules: ES256 only, `kid` required and looked up, `iss`,
//! `aud`, `exp`, `nbf` and `iat` checked with the configured leeway, the
//! claims sluice relies on required; verified tokens cached as grants
//! keyed by a SHA-256 of the token, each entry living no longer than its
//! token, the cache never the source of truth). This file holds what the
//! three share: the errors, the size limit and the clock.

mod claims;
mod keys;
mod verify;

pub use claims::*;
pub use keys::*;
pub use verify::*;

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
use crate::metrics as m;
use crate::policy::Allowlist;
use crate::presets::Presets;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

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
    #[error("token lives longer than this gateway accepts (auth.max_ttl_s = {0})")]
    TooLong(u64),
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

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
