//! The registry on disk: every registered sandbox (with its token) and
//! every revoked `jti`, in `state_dir/registry.redb`. Owns durability:
//! each change is a small transaction (one record in, one out), fsynced
//! before the change is acknowledged, so a kill -9 at any moment loses
//! nothing the API said it had done, and its cost does not grow with the
//! registry. Changes that arrive while a commit is in flight go together
//! in the next one (group commit), so 32 clients share fsyncs instead of
//! queueing for one each.
//!
//! The engine is `redb`: an embedded, crash-safe (copy-on-write B-trees,
//! checksummed commits), pure-Rust key-value store, so no C library and no
//! server. A `registry.json` written by earlier versions is read once on
//! start, its records imported in one transaction, and the file renamed
//! `registry.json.migrated`.
//!
//! Restored on start without verifying signatures (a restart serves at
//! once, see `app::verify_restored`): what has expired or does not decode
//! is dropped, with a warning, and removed from the file.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::token::{Verifier, now_s};
use super::{LaunchRecord, Origin, Registry, Sandbox};

const FORMAT_VERSION: u32 = 1;
/// container_id → the record as JSON.
const SANDBOXES: TableDefinition<&str, &[u8]> = TableDefinition::new("sandboxes");
/// jti → until when (Unix seconds).
const REVOKED: TableDefinition<&str, u64> = TableDefinition::new("revoked");
/// redb's page cache.
const CACHE_BYTES: usize = 8 << 20;
/// The most changes one commit takes.
const MAX_BATCH: usize = 4096;

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

impl SandboxRecord {
    /// The record of a registered sandbox, with where its pieces are if
    /// sluice launched it (the control plane's, not the data plane's).
    pub fn of(s: &Sandbox, launch: Option<&LaunchRecord>) -> SandboxRecord {
        SandboxRecord {
            container_id: s.container_id.clone(),
            source_ip: s.source_ip,
            token: s.token().to_string(),
            origin: s.origin,
            mac: s.mac,
            launch: launch.cloned(),
        }
    }
}

/// What a restore found: the launch records of the restored sandboxes
/// (for the control plane) and the records it dropped.
#[derive(Debug, Default)]
pub struct Restored {
    pub launched: Vec<(String, LaunchRecord)>,
    pub dropped: Vec<SandboxRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedRecord {
    pub jti: String,
    pub exp: u64,
}

/// The whole registry, as the JSON file of earlier versions held it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub version: u32,
    pub sandboxes: Vec<SandboxRecord>,
    pub revoked: Vec<RevokedRecord>,
}

/// One change to the registry on disk.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A sandbox registered (or its record replaced).
    Put(SandboxRecord),
    /// A sandbox gone.
    Remove(String),
    /// A token refused until `exp`.
    Revoke { jti: String, exp: u64 },
    /// A revocation past its token's expiry, no longer needed.
    Forget(String),
    /// A token replaced in place: `jti` refused until `exp`, like
    /// [`Change::Revoke`] here; the fleet is told the replacement `token`
    /// too, so its gateways keep the live connections it still allows.
    Replace {
        jti: String,
        exp: u64,
        token: String,
    },
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
    #[error("{path}")]
    Db {
        path: PathBuf,
        #[source]
        source: Arc<redb::Error>,
    },
    #[error("{path}: the store's writer has stopped")]
    Stopped { path: PathBuf },
}

struct Job {
    changes: Vec<Change>,
    done: tokio::sync::oneshot::Sender<Result<(), Arc<redb::Error>>>,
}

/// The registry file and its one writer thread.
pub struct Store {
    path: PathBuf,
    db: Arc<Database>,
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// With a fleet store: every durable change, in order, to share.
    share: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Vec<Change>>>,
}

impl Drop for Store {
    /// The writer finishes what it has and stops, so the file is closed
    /// (and can be opened again) once the store is gone.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn db_error(path: &Path, e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db {
        path: path.to_owned(),
        source: Arc::new(e.into()),
    }
}

impl Store {
    /// Opens (or creates, 0600) `state_dir/registry.redb`, importing a
    /// `registry.json` of an earlier version first.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = state_dir.join("registry.redb");
        // Created 0600 before redb opens it: tokens are secrets.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        // The store is read once, at start; the registry in memory serves
        // every lookup, so redb's page cache (1 GiB by default) would only
        // hold a second copy of it.
        let db = Arc::new(
            Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create(&path)
                .map_err(|e| db_error(&path, e))?,
        );
        {
            // Both tables exist from the first start on.
            let txn = db.begin_write().map_err(|e| db_error(&path, e))?;
            txn.open_table(SANDBOXES).map_err(|e| db_error(&path, e))?;
            txn.open_table(REVOKED).map_err(|e| db_error(&path, e))?;
            txn.commit().map_err(|e| db_error(&path, e))?;
        }
        let (jobs, rx) = std::sync::mpsc::channel();
        let writer_db = Arc::clone(&db);
        let writer = std::thread::Builder::new()
            .name("sluice-store".into())
            .spawn(move || writer(&writer_db, &rx))
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        let store = Store {
            path,
            db,
            jobs: Some(jobs),
            writer: Some(writer),
            share: std::sync::OnceLock::new(),
        };
        store.migrate(state_dir)?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `registry.json` (earlier versions' whole-file registry) into
    /// the store in one commit, then renames it out of the way. Running it
    /// again after a crash imports the same records again: harmless.
    fn migrate(&self, state_dir: &Path) -> Result<(), StoreError> {
        let json = state_dir.join("registry.json");
        let Some(snap) = load_json(&json)? else {
            return Ok(());
        };
        let mut changes: Vec<Change> = snap.sandboxes.into_iter().map(Change::Put).collect();
        changes.extend(snap.revoked.into_iter().map(|r| Change::Revoke {
            jti: r.jti,
            exp: r.exp,
        }));
        let n = changes.len();
        commit(&self.db, changes.iter()).map_err(|e| db_error(&self.path, e))?;
        let done = state_dir.join("registry.json.migrated");
        std::fs::rename(&json, &done).map_err(|source| StoreError::Io {
            path: json.clone(),
            source,
        })?;
        tracing::info!(records = n, from = %json.display(), "registry migrated");
        Ok(())
    }

    /// From now on, every durable change also goes to `to` (the fleet
    /// store), after it is on disk here.
    pub fn share_with(&self, to: tokio::sync::mpsc::UnboundedSender<Vec<Change>>) {
        let _ = self.share.set(to);
    }

    /// Makes `changes` durable, in one transaction (shared with whatever
    /// else is waiting), before it returns; then shares them with the
    /// fleet, if there is one.
    pub async fn apply(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let shared = self.share.get().map(|_| changes.clone());
        self.apply_unshared(changes).await?;
        if let (Some(to), Some(changes)) = (self.share.get(), shared) {
            let _ = to.send(changes);
        }
        Ok(())
    }

    /// As [`apply`](Self::apply), without sharing: for what came from the
    /// fleet.
    pub async fn apply_unshared(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let (done, wait) = tokio::sync::oneshot::channel();
        let stopped = || StoreError::Stopped {
            path: self.path.clone(),
        };
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(Job { changes, done })
            .map_err(|_| stopped())?;
        wait.await
            .map_err(|_| stopped())?
            .map_err(|source| StoreError::Db {
                path: self.path.clone(),
                source,
            })
    }

    /// Everything stored.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let e = |e: redb::Error| db_error(&self.path, e);
        let txn = self.db.begin_read().map_err(|x| e(x.into()))?;
        let sandboxes = txn.open_table(SANDBOXES).map_err(|x| e(x.into()))?;
        let mut snap = Snapshot {
            version: FORMAT_VERSION,
            ..Snapshot::default()
        };
        for row in sandboxes.iter().map_err(|x| e(x.into()))? {
            let (id, value) = row.map_err(|x| e(x.into()))?;
            let record: SandboxRecord =
                serde_json::from_slice(value.value()).map_err(|x| StoreError::Format {
                    path: self.path.clone(),
                    message: format!("record {:?}: {x}", id.value()),
                })?;
            snap.sandboxes.push(record);
        }
        let revoked = txn.open_table(REVOKED).map_err(|x| e(x.into()))?;
        for row in revoked.iter().map_err(|x| e(x.into()))? {
            let (jti, exp) = row.map_err(|x| e(x.into()))?;
            snap.revoked.push(RevokedRecord {
                jti: jti.value().to_owned(),
                exp: exp.value(),
            });
        }
        Ok(snap)
    }

    /// Loads the store into an empty registry and verifier. Returns the
    /// records that were dropped (expired or undecodable, now removed from
    /// the store too), so a launcher can clean up what they leave behind.
    pub async fn restore(
        &self,
        registry: &Registry,
        verifier: &Verifier,
    ) -> Result<Restored, StoreError> {
        let snap = self.load()?;
        let now = now_s();
        let mut gone = Vec::new();
        for r in snap.revoked {
            if r.exp.saturating_add(verifier.leeway()) >= now {
                verifier.revoke(&r.jti, r.exp);
            } else {
                gone.push(Change::Forget(r.jti));
            }
        }
        let mut dropped = Vec::new();
        let mut launched = Vec::new();
        for record in snap.sandboxes {
            // Lifetime only, not the signature: a restart serves at once,
            // and each token is verified in full on its first use and by
            // the pass that follows (`app::verify_restored`). A revoked
            // token's registration stays (its connections are denied
            // token_revoked, and its address stays taken) until it expires.
            let grant = match verifier.decode_unverified(&record.token) {
                Ok(g) => Arc::new(g),
                Err(e) => {
                    tracing::warn!(container_id = %record.container_id, error = %e, "not restoring a registration");
                    gone.push(Change::Remove(record.container_id.clone()));
                    dropped.push(record);
                    continue;
                }
            };
            let sandbox =
                Sandbox::new(record.source_ip, record.token.clone(), grant, record.origin)
                    .with_mac(record.mac);
            match registry.bind(sandbox) {
                Ok(_) => {
                    if let Some(launch) = record.launch {
                        launched.push((record.container_id, launch));
                    }
                }
                Err(e) => {
                    tracing::warn!(container_id = %record.container_id, error = %e, "not restoring a registration");
                    gone.push(Change::Remove(record.container_id.clone()));
                    dropped.push(record);
                }
            }
        }
        self.apply(gone).await?;
        Ok(Restored { launched, dropped })
    }
}

/// The writer thread: takes every job waiting, commits their changes in
/// one transaction, answers each.
fn writer(db: &Database, jobs: &std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        let mut changes = batch[0].changes.len();
        while changes < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => {
                    changes += job.changes.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let result = commit(db, batch.iter().flat_map(|j| j.changes.iter())).map_err(Arc::new);
        for job in batch {
            let _ = job.done.send(result.clone());
        }
    }
}

/// One durable transaction with `changes`, in order.
fn commit<'a>(db: &Database, changes: impl Iterator<Item = &'a Change>) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    {
        let mut sandboxes = txn.open_table(SANDBOXES)?;
        let mut revoked = txn.open_table(REVOKED)?;
        for change in changes {
            match change {
                Change::Put(record) => {
                    let bytes = serde_json::to_vec(record).map_err(|e| {
                        redb::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
                    })?;
                    sandboxes.insert(record.container_id.as_str(), bytes.as_slice())?;
                }
                Change::Remove(id) => {
                    sandboxes.remove(id.as_str())?;
                }
                Change::Revoke { jti, exp } | Change::Replace { jti, exp, .. } => {
                    revoked.insert(jti.as_str(), *exp)?;
                }
                Change::Forget(jti) => {
                    revoked.remove(jti.as_str())?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

/// The JSON registry of earlier versions, if there is one.
fn load_json(path: &Path) -> Result<Option<Snapshot>, StoreError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let snap: Snapshot = serde_json::from_str(&text).map_err(|e| StoreError::Format {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if snap.version != FORMAT_VERSION {
        return Err(StoreError::Format {
            path: path.to_owned(),
            message: format!(
                "version {} (this sluice reads {FORMAT_VERSION})",
                snap.version
            ),
        });
    }
    Ok(Some(snap))
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
                limits: Default::default(),
                organization_uuid: None,
                enforce: Default::default(),
                credentials: Vec::new(),
                container_id: id.into(),
                user_id: "u".into(),
                allowed_hosts: vec!["a.test".into()],
                ttl: Duration::from_secs(ttl),
            })
            .unwrap()
    }

    fn bound(
        registry: &Registry,
        signer: &Signer,
        verifier: &Verifier,
        id: &str,
        ip: &str,
        ttl: u64,
    ) -> Arc<Sandbox> {
        let m = mint(signer, id, ttl);
        let grant = verifier.verify(&m.token).unwrap();
        registry
            .bind(Sandbox::new(
                ip.parse().unwrap(),
                m.token,
                grant,
                Origin::Registered,
            ))
            .unwrap()
    }

    fn fresh(jwks: &str) -> (Registry, Verifier) {
        (
            Registry::new(),
            Verifier::new(Jwks::parse(jwks).unwrap(), "i", "a", 0),
        )
    }

    #[tokio::test]
    async fn a_stored_registry_comes_back_and_changes_are_one_record_each() {
        let (signer, verifier, dir, jwks) = setup();
        let store = Store::open(dir.path()).unwrap();
        let registry = Registry::new();
        for (id, ip) in [
            ("c1", "198.18.0.2"),
            ("c2", "198.18.0.3"),
            ("c3", "198.18.0.4"),
        ] {
            let s = bound(&registry, &signer, &verifier, id, ip, 600);
            store
                .apply(vec![Change::Put(SandboxRecord::of(&s, None))])
                .await
                .unwrap();
        }
        let revoked = mint(&signer, "c9", 600);
        verifier.revoke(&revoked.claims.jti, revoked.claims.exp);
        store
            .apply(vec![
                Change::Remove("c3".into()),
                Change::Revoke {
                    jti: revoked.claims.jti.clone(),
                    exp: revoked.claims.exp,
                },
            ])
            .await
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        let (registry2, verifier2) = fresh(&jwks);
        let dropped = store.restore(&registry2, &verifier2).await.unwrap().dropped;
        assert!(dropped.is_empty());
        assert_eq!(registry2.len(), 2);
        let c2 = registry2.get("198.18.0.3".parse().unwrap()).unwrap();
        assert_eq!(c2.container_id, "c2");
        assert!(registry2.get("198.18.0.4".parse().unwrap()).is_none());
        assert!(verifier2.is_revoked(&revoked.claims.jti));
    }

    #[tokio::test]
    async fn concurrent_changes_share_commits_and_all_land() {
        let (signer, verifier, dir, jwks) = setup();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let registry = Registry::new();
        let mut records = Vec::new();
        for i in 0..200u32 {
            let s = bound(
                &registry,
                &signer,
                &verifier,
                &format!("c{i:03}"),
                &format!("198.18.{}.{}", i / 200, i % 200 + 2),
                600,
            );
            records.push(SandboxRecord::of(&s, None));
        }
        let tasks: Vec<_> = records
            .into_iter()
            .map(|r| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.apply(vec![Change::Put(r)]).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let (registry2, verifier2) = fresh(&jwks);
        store.restore(&registry2, &verifier2).await.unwrap();
        assert_eq!(registry2.len(), 200);
    }

    #[tokio::test]
    async fn expired_and_undecodable_records_are_dropped_and_removed() {
        let (signer, verifier, dir, jwks) = setup();
        let store = Store::open(dir.path()).unwrap();
        let registry = Registry::new();
        let s = bound(&registry, &signer, &verifier, "short", "198.18.0.9", 1);
        let mut broken = SandboxRecord::of(&s, None);
        broken.container_id = "broken".into();
        broken.source_ip = "198.18.0.10".parse().unwrap();
        broken.token = "not.a.token".into();
        store
            .apply(vec![
                Change::Put(SandboxRecord::of(&s, None)),
                Change::Put(broken),
            ])
            .await
            .unwrap();
        std::thread::sleep(Duration::from_millis(2100));
        let (registry2, verifier2) = fresh(&jwks);
        let dropped = store.restore(&registry2, &verifier2).await.unwrap().dropped;
        assert_eq!(dropped.len(), 2);
        assert!(registry2.is_empty());
        assert!(
            store.load().unwrap().sandboxes.is_empty(),
            "removed from the store too"
        );
    }

    #[tokio::test]
    async fn a_json_registry_is_migrated_once() {
        let (signer, verifier, dir, jwks) = setup();
        let registry = Registry::new();
        let s = bound(&registry, &signer, &verifier, "old", "198.18.0.2", 600);
        let snap = Snapshot {
            version: FORMAT_VERSION,
            sandboxes: vec![SandboxRecord::of(&s, None)],
            revoked: vec![RevokedRecord {
                jti: "gone-1".into(),
                exp: now_s() + 600,
            }],
        };
        let json = dir.path().join("registry.json");
        std::fs::write(&json, serde_json::to_vec(&snap).unwrap()).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(!json.exists());
        assert!(dir.path().join("registry.json.migrated").exists());
        let (registry2, verifier2) = fresh(&jwks);
        store.restore(&registry2, &verifier2).await.unwrap();
        assert_eq!(registry2.len(), 1);
        assert!(verifier2.is_revoked("gone-1"));
    }

    #[tokio::test]
    async fn broken_files_are_errors_not_empty_registries() {
        let (_, _, dir, _) = setup();
        std::fs::write(
            dir.path().join("registry.json"),
            "{\"version\": 1, \"sandboxes\": [",
        )
        .unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Format { .. })
        ));
        std::fs::write(
            dir.path().join("registry.json"),
            "{\"version\": 9, \"sandboxes\": [], \"revoked\": []}",
        )
        .unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Format { .. })
        ));
        std::fs::remove_file(dir.path().join("registry.json")).unwrap();
        std::fs::write(
            dir.path().join("registry.redb"),
            b"this is not a database at all, not at all",
        )
        .unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Db { .. })
        ));
    }
}
