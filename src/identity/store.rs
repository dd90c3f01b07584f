//! The registry on disk: every registered sandbox (with its token) and
//! every revoked `jti`, in `state_dir/registry.json`. Written on every
//! change, atomically (a temporary file, fsync, rename, fsync of the
//! directory), before the change is acknowledged, so a kill -9 at any
//! moment loses nothing the API said it had done. Restored on start, each
//! token verified again: what has expired or no longer verifies is
//! dropped, with a warning.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::token::{Verifier, now_s};
use super::{LaunchRecord, Origin, Registry, Sandbox};

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxRecord {
    pub container_id: String,
    pub source_ip: IpAddr,
    pub token: String,
    pub origin: Origin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<crate::identity::MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<LaunchRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedRecord {
    pub jti: String,
    pub exp: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub version: u32,
    pub sandboxes: Vec<SandboxRecord>,
    pub revoked: Vec<RevokedRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a sluice registry: {message}")]
    Format { path: PathBuf, message: String },
}

/// The registry file, written by one writer at a time.
pub struct Store {
    path: PathBuf,
    write: Mutex<()>,
}

impl Store {
    pub fn new(state_dir: &Path) -> Store {
        Store {
            path: state_dir.join("registry.json"),
            write: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved snapshot; empty if there is none yet.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Snapshot::default()),
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let snap: Snapshot = serde_json::from_str(&text).map_err(|e| StoreError::Format {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        if snap.version != FORMAT_VERSION {
            return Err(StoreError::Format {
                path: self.path.clone(),
                message: format!(
                    "version {} (this sluice reads {FORMAT_VERSION})",
                    snap.version
                ),
            });
        }
        Ok(snap)
    }

    /// Writes the current state of the registry and the revocations.
    pub fn save(&self, registry: &Registry, verifier: &Verifier) -> Result<(), StoreError> {
        // The snapshot is taken under the lock, so the last write is of the
        // latest state whatever order concurrent changes finish in.
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let snap = Snapshot {
            version: FORMAT_VERSION,
            sandboxes: registry
                .list()
                .iter()
                .map(|s| SandboxRecord {
                    container_id: s.container_id.clone(),
                    source_ip: s.source_ip,
                    token: s.token.clone(),
                    origin: s.origin,
                    mac: s.mac,
                    launch: s.launch.clone(),
                })
                .collect(),
            revoked: verifier
                .revoked()
                .into_iter()
                .map(|(jti, exp)| RevokedRecord { jti, exp })
                .collect(),
        };
        let text = serde_json::to_vec_pretty(&snap).map_err(|e| StoreError::Format {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        write_atomically(&self.path, &text).map_err(|source| StoreError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Loads the snapshot into an empty registry and verifier. Returns the
    /// records that were dropped (expired or no longer valid), so a
    /// launcher can clean up what they leave behind.
    pub fn restore(
        &self,
        registry: &Registry,
        verifier: &Verifier,
    ) -> Result<Vec<SandboxRecord>, StoreError> {
        let snap = self.load()?;
        let now = now_s();
        for r in &snap.revoked {
            if r.exp.saturating_add(verifier.leeway()) >= now {
                verifier.revoke(&r.jti, r.exp);
            }
        }
        let mut dropped = Vec::new();
        for record in snap.sandboxes {
            // Lifetime only, not the signature: a restart serves at once,
            // and each token is verified in full on its first use and by
            // the pass that follows (`app::verify_restored`). A revoked
            // token's registration stays (its connections are denied
            // token_revoked, and its address stays taken) until it expires.
            let grant = match verifier.decode_unverified(&record.token) {
                Ok(g) => std::sync::Arc::new(g),
                Err(e) => {
                    tracing::warn!(container_id = %record.container_id, error = %e, "not restoring a registration");
                    dropped.push(record);
                    continue;
                }
            };
            let mut sandbox =
                Sandbox::new(record.source_ip, record.token.clone(), grant, record.origin)
                    .with_mac(record.mac);
            if let Some(launch) = &record.launch {
                sandbox = sandbox.launched(launch.clone());
            }
            if let Err(e) = registry.bind(sandbox) {
                tracing::warn!(container_id = %record.container_id, error = %e, "not restoring a registration");
                dropped.push(record);
            }
        }
        Ok(dropped)
    }
}

/// Replaces `path` with `contents` so that a reader (or a crash) sees the
/// old file or the new one, never a mix: temporary file in the same
/// directory, fsync, rename over, fsync the directory.
pub fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::token::{Jwks, KeyPair, MintRequest, Signer};
    use std::sync::Arc;
    use std::time::Duration;

    fn setup() -> (Signer, Verifier, tempfile::TempDir, String) {
        let pair = KeyPair::generate("k").unwrap();
        let signer = Signer::from_pem(pair.private_pem.as_bytes(), "k", "i", "a").unwrap();
        let jwks = pair.jwks().to_string();
        let verifier = Verifier::new(Jwks::parse(&jwks).unwrap(), "i", "a", 0);
        (signer, verifier, tempfile::tempdir().unwrap(), jwks)
    }

    fn mint(signer: &Signer, id: &str, ttl: u64) -> crate::identity::token::Minted {
        signer
            .mint(&MintRequest {
                container_id: id.into(),
                user_id: "u".into(),
                allowed_hosts: vec!["a.test".into()],
                ttl: Duration::from_secs(ttl),
            })
            .unwrap()
    }

    #[test]
    fn a_saved_registry_comes_back() {
        let (signer, verifier, dir, jwks) = setup();
        let store = Store::new(dir.path());
        let registry = Registry::new();
        for (id, ip) in [("c1", "198.18.0.2"), ("c2", "198.18.0.3")] {
            let m = mint(&signer, id, 600);
            let grant = verifier.verify(&m.token).unwrap();
            registry
                .bind(Sandbox::new(
                    ip.parse().unwrap(),
                    m.token,
                    grant,
                    Origin::Registered,
                ))
                .unwrap();
        }
        let revoked = mint(&signer, "c3", 600);
        verifier.revoke(&revoked.claims.jti, revoked.claims.exp);
        store.save(&registry, &verifier).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(store.path())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );

        let (registry2, verifier2) = (
            Registry::new(),
            Verifier::new(Jwks::parse(&jwks).unwrap(), "i", "a", 0),
        );
        let dropped = store.restore(&registry2, &verifier2).unwrap();
        assert!(dropped.is_empty());
        assert_eq!(registry2.len(), 2);
        assert_eq!(
            registry2
                .get("198.18.0.3".parse().unwrap())
                .unwrap()
                .container_id,
            "c2"
        );
        assert!(verifier2.is_revoked(&revoked.claims.jti));
    }

    #[test]
    fn expired_and_unverifiable_records_are_dropped() {
        let (signer, verifier, dir, jwks) = setup();
        let store = Store::new(dir.path());
        let registry = Registry::new();
        let m = mint(&signer, "short", 1);
        let grant = verifier.verify(&m.token).unwrap();
        registry
            .bind(Sandbox::new(
                "198.18.0.9".parse().unwrap(),
                m.token,
                Arc::clone(&grant),
                Origin::Registered,
            ))
            .unwrap();
        store.save(&registry, &verifier).unwrap();
        std::thread::sleep(Duration::from_millis(2100));
        let (registry2, verifier2) = (
            Registry::new(),
            Verifier::new(Jwks::parse(&jwks).unwrap(), "i", "a", 0),
        );
        let dropped = store.restore(&registry2, &verifier2).unwrap();
        assert_eq!(dropped.len(), 1);
        assert!(registry2.is_empty());
    }

    #[test]
    fn broken_files_are_errors_not_empty_registries() {
        let (_, verifier, dir, _) = setup();
        let store = Store::new(dir.path());
        assert_eq!(store.load().unwrap(), Snapshot::default());
        std::fs::write(store.path(), "{\"version\": 1, \"sandboxes\": [").unwrap();
        assert!(matches!(
            store.restore(&Registry::new(), &verifier),
            Err(StoreError::Format { .. })
        ));
        std::fs::write(
            store.path(),
            "{\"version\": 9, \"sandboxes\": [], \"revoked\": []}",
        )
        .unwrap();
        assert!(store.load().is_err());
    }

    #[test]
    fn atomic_writes_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
