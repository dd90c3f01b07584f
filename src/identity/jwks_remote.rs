//! Keys for a fleet: the JWKS fetched over HTTPS (`auth.jwks_url`) on
//! start and every `auth.jwks_refresh_s` (and on SIGHUP). Owns fetching,
//! checking and keeping the last good set: any failure (unreachable, a
//! non-200 answer, a body that is not a JWKS or holds no usable key) keeps what the
//! verifier has; a changed set is applied like a file reload. Each good set
//! is also written to `state_dir/keys/jwks-url-cache.json`, so a restart
//! while the key server is down still verifies with the last set it gave.
//!
//! HTTPS through `reqwest` on rustls (ring), trusting the system's roots
//! or, with `auth.jwks_ca_file`, only that CA. Plain `http://` is refused
//! by the config check: keys that anyone on the path could replace would
//! let anyone mint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::token::{Jwks, KeyError, Verifier};

/// The largest JWKS accepted.
const MAX_BODY: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("auth.jwks_ca_file: cannot read {}", path.display())]
    Ca {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("auth.jwks_ca_file: {} holds no usable CA certificate", path.display())]
    NoCa { path: PathBuf },
    #[error("no system CA certificates to verify auth.jwks_url with")]
    NoRoots,
    #[error("cannot build the HTTPS client")]
    Client(#[source] reqwest::Error),
    #[error("cannot set up TLS for auth.jwks_url")]
    Tls(#[source] rustls::Error),
    #[error("cannot fetch {url}")]
    Fetch {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url} sent more than {MAX_BODY} bytes")]
    TooLarge { url: String },
    #[error("{url} sent a JWKS with no usable key")]
    Empty { url: String },
    #[error("{url} did not send a usable JWKS")]
    Keys {
        url: String,
        #[source]
        source: KeyError,
    },
}

/// Where the keys come from, and the last good set's copy on disk.
#[derive(Debug)]
pub struct RemoteJwks {
    url: String,
    client: reqwest::Client,
    cache: PathBuf,
}

fn roots(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, RemoteError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|source| RemoteError::Ca {
                    path: path.to_owned(),
                    source,
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(RemoteError::NoCa {
                    path: path.to_owned(),
                });
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!(error = %e, "a system CA certificate store could not be read");
            }
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(RemoteError::NoRoots);
            }
        }
    }
    Ok(roots)
}

impl RemoteJwks {
    pub fn new(url: &str, ca_file: Option<&Path>, state_dir: &Path) -> Result<Self, RemoteError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(RemoteError::Tls)?
            .with_root_certificates(roots(ca_file)?)
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .https_only(true)
            .timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(RemoteError::Client)?;
        Ok(RemoteJwks {
            url: url.to_owned(),
            client,
            cache: state_dir.join("keys/jwks-url-cache.json"),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// One fetch: the set and its text, or why not.
    pub async fn fetch(&self) -> Result<(Jwks, String), RemoteError> {
        let url = || self.url.clone();
        let mut resp = self
            .client
            .get(&self.url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|source| RemoteError::Fetch { url: url(), source })?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(RemoteError::Status {
                url: url(),
                status: resp.status().as_u16(),
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|source| RemoteError::Fetch { url: url(), source })?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(RemoteError::TooLarge { url: url() });
            }
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&body).into_owned();
        let jwks = Jwks::parse(&text).map_err(|source| RemoteError::Keys { url: url(), source })?;
        // An empty set would refuse every token: a server's mistake is
        // not a reason to lock every sandbox out.
        if jwks.is_empty() {
            return Err(RemoteError::Empty { url: url() });
        }
        Ok((jwks, text))
    }

    /// The set to start with: fetched, or else the last good one from the
    /// cache (with a warning), or else the fetch's error.
    pub async fn initial(&self) -> Result<Jwks, RemoteError> {
        match self.fetch().await {
            Ok((jwks, text)) => {
                self.keep(&text);
                Ok(jwks)
            }
            Err(e) => match std::fs::read_to_string(&self.cache)
                .ok()
                .and_then(|t| Jwks::parse(&t).ok())
            {
                Some(cached) => {
                    tracing::warn!(error = %crate::error_chain(&e), cache = %self.cache.display(), "auth.jwks_url unreachable at start: using the last good set");
                    Ok(cached)
                }
                None => Err(e),
            },
        }
    }

    /// Fetches again; a set that differs from the verifier's replaces it.
    /// `Ok(true)` when it changed. On error the verifier keeps its set.
    pub async fn refresh(&self, verifier: &Verifier) -> Result<bool, RemoteError> {
        let (jwks, text) = self.fetch().await?;
        if jwks.public() == verifier.jwks().public() {
            return Ok(false);
        }
        let keys = jwks.len();
        verifier.set_jwks(jwks);
        self.keep(&text);
        tracing::info!(url = %self.url, keys, "JWKS from auth.jwks_url changed: applied");
        Ok(true)
    }

    /// The good set's copy on disk (a failure to write it is logged).
    fn keep(&self, text: &str) {
        if let Some(dir) = self.cache.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::write(&self.cache, text) {
            tracing::warn!(cache = %self.cache.display(), error = %e, "cannot keep the JWKS");
        }
    }
}
