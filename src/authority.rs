//! The inspection authority: the keys and certificates TLS inspection
//! needs. Owns: the fleet's inspection key (`inspect.key_file`, made in
//! `state_dir/inspect/` on first start when not given), each sandbox's CA,
//! the leaves it signs, and how inspected upstreams are verified.
//!
//! A sandbox's CA key is derived (HKDF-SHA-256) from the inspection key and
//! the sandbox's `container_id`, so every gateway of a fleet that shares
//! the key makes the same CA without storing or sending a private key
//! anywhere (Redis included). Its X.509 name constraints permit only the
//! hosts the sandbox's credentials go to (a sandbox without any gets a CA
//! that permits only `invalid`, a name that never resolves), and exclude
//! every IP address. Leaves are signed for one SNI each, with a key of
//! this process's, `notBefore` a day back (a sandbox's clock may lag) and
//! `notAfter` `inspect.leaf_ttl_s` ahead, cached per (sandbox, host).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hkdf::Hkdf;
use p256::pkcs8::EncodePrivateKey;
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use sha2::Sha256;

use crate::credentials::Sealed;
use crate::host::{HostName, HostPattern};

/// Why the authority could not do something.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("cannot read the inspection key {path}")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write a new inspection key at {path}")]
    WriteKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the inspection key {0} is shorter than 32 bytes")]
    ShortKey(PathBuf),
    #[error("cannot read inspect.upstream_ca_file {path}")]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("inspect.upstream_ca_file {0} holds no certificate")]
    NoCa(PathBuf),
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("key derivation")]
    Derive,
}

/// The smallest inspection key accepted, in bytes.
const MIN_KEY: usize = 32;

/// Reads the inspection key from `file`; when `file` is empty, from
/// `state_dir/inspect/key`, made there (0600, random) if missing.
pub fn load_key(file: &Path, state_dir: &Path) -> Result<Vec<u8>, AuthorityError> {
    let path = if file.as_os_str().is_empty() {
        state_dir.join("inspect").join("key")
    } else {
        file.to_owned()
    };
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() >= MIN_KEY => return Ok(bytes),
        Ok(_) => return Err(AuthorityError::ShortKey(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && file.as_os_str().is_empty() => {}
        Err(source) => return Err(AuthorityError::ReadKey { path, source }),
    }
    let mut key = vec![0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
    write_private(&path, &key).map_err(|source| AuthorityError::WriteKey {
        path: path.clone(),
        source,
    })?;
    Ok(key)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// One sandbox's inspection CA.
pub struct SandboxCa {
    /// The certificate, PEM: what `GET /v1/sandboxes/{id}/ca.pem` serves.
    pub pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// The DNS names its constraints permit.
    pub permitted: Vec<String>,
}

/// The keys and certificates of inspection, and the upstream verifier.
pub struct Authority {
    key: Vec<u8>,
    leaf_ttl: Duration,
    /// This process's key for every leaf, and its signing form.
    leaf_key: KeyPair,
    leaf_signer: Arc<dyn rustls::sign::SigningKey>,
    cas: moka::sync::Cache<(Arc<str>, Vec<String>), Arc<SandboxCa>>,
    leaves: moka::sync::Cache<(Arc<str>, HostName), Arc<CertifiedKey>>,
    /// What an inspected client is answered with, per sandbox, host and
    /// protocol: kept with the leaf, so a new connection costs no new
    /// configuration and its client can resume a session.
    configs: moka::sync::Cache<ConfigKey, Arc<rustls::ServerConfig>>,
    /// Verifies inspected upstreams: the system's roots and
    /// `inspect.upstream_ca_file`'s.
    pub upstream: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("leaf_ttl", &self.leaf_ttl)
            .finish_non_exhaustive()
    }
}

/// A server configuration's key: the sandbox, the host, the protocol
/// chosen upstream.
type ConfigKey = (Arc<str>, HostName, Option<Vec<u8>>);

/// How many sandbox CAs and leaves are kept made.
const CACHE: u64 = 10_000;

impl Authority {
    /// `key` is the inspection key; `upstream_ca_file` (may be empty)
    /// adds roots for upstreams beside the system's.
    pub fn new(
        key: Vec<u8>,
        leaf_ttl: Duration,
        upstream_ca_file: &Path,
    ) -> Result<Authority, AuthorityError> {
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let leaf_signer = rustls::crypto::ring::sign::any_ecdsa_type(&der)?;
        // Leaves are made again before they lapse.
        let leaf_life = (leaf_ttl / 2).max(Duration::from_secs(60));
        Ok(Authority {
            key,
            leaf_ttl,
            leaf_key,
            leaf_signer,
            cas: moka::sync::Cache::builder().max_capacity(CACHE).build(),
            leaves: moka::sync::Cache::builder()
                .max_capacity(CACHE)
                .time_to_live(leaf_life)
                .build(),
            configs: moka::sync::Cache::builder()
                .max_capacity(CACHE)
                .time_to_live(leaf_life)
                .build(),
            upstream: Arc::new(upstream_config(upstream_ca_file)?),
        })
    }

    /// The inspection key, for what else is derived from it (placeholders).
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The DNS names a sandbox's CA permits: its credentials' hosts
    /// (`*.suffix` as `suffix`) and `ruled`, the hosts its request rules
    /// name; sorted; `invalid` when there are none.
    pub fn permitted(sealed: &Sealed, ruled: &[String]) -> Vec<String> {
        let mut names: Vec<String> = sealed
            .items
            .iter()
            .filter_map(|(_, _, c)| c.as_ref())
            .flat_map(|c| c.hosts.iter())
            .filter_map(|p| match p {
                HostPattern::Exact(n, _) | HostPattern::Wildcard(n, _) => Some(n.to_string()),
                HostPattern::Ip(..) => None,
            })
            .chain(ruled.iter().cloned())
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            names.push("invalid".into());
        }
        names
    }

    /// The CA of sandbox `container_id`, permitting `permitted`.
    pub fn ca(
        &self,
        container_id: &Arc<str>,
        permitted: Vec<String>,
    ) -> Result<Arc<SandboxCa>, AuthorityError> {
        let k = (Arc::clone(container_id), permitted);
        if let Some(ca) = self.cas.get(&k) {
            return Ok(ca);
        }
        let ca = Arc::new(self.make_ca(container_id, k.1.clone())?);
        self.cas.insert(k, Arc::clone(&ca));
        Ok(ca)
    }

    fn derive(
        &self,
        label: &[u8],
        container_id: &str,
        out: &mut [u8],
    ) -> Result<(), AuthorityError> {
        let hk = Hkdf::<Sha256>::new(Some(b"sluice inspection v1"), &self.key);
        let info = [label, b"\0", container_id.as_bytes()].concat();
        hk.expand(&info, out).map_err(|_| AuthorityError::Derive)
    }

    fn make_ca(
        &self,
        container_id: &str,
        permitted: Vec<String>,
    ) -> Result<SandboxCa, AuthorityError> {
        // The CA's key: a P-256 scalar from the inspection key and the id
        // (a value out of range, one in 2^128, takes the next counter).
        let mut secret = None;
        for counter in 0u8..8 {
            let mut bytes = [0u8; 32];
            self.derive(
                &[b"ca key ", &[counter][..]].concat(),
                container_id,
                &mut bytes,
            )?;
            if let Ok(s) = p256::SecretKey::from_slice(&bytes) {
                secret = Some(s);
                break;
            }
        }
        let secret = secret.ok_or(AuthorityError::Derive)?;
        let pkcs8 = secret.to_pkcs8_der().map_err(|_| AuthorityError::Derive)?;
        let key = KeyPair::try_from(pkcs8.as_bytes())?;
        let mut serial = [0u8; 16];
        self.derive(b"ca serial", container_id, &mut serial)?;
        serial[0] &= 0x7f;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "sluice");
        let id: String = container_id.chars().take(40).collect();
        dn.push(DnType::CommonName, format!("sluice sandbox CA {id}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        // Fixed, so every gateway's copy of the certificate is the same
        // CA; what bounds it is its constraints and its key, derived for
        // this sandbox alone.
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2045, 1, 1);
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: permitted
                .iter()
                .map(|n| GeneralSubtree::DnsName(n.clone()))
                .collect(),
            excluded_subtrees: vec![
                GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
                GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
            ],
        });
        let cert = params.self_signed(&key)?;
        Ok(SandboxCa {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            permitted,
        })
    }

    /// How an inspected client of sandbox `container_id` connecting to
    /// `host` is answered: `host`'s leaf from `ca`, `alpn` (the protocol
    /// the upstream chose), and session tickets from a ticketer of this
    /// configuration's own, so a client resumes its session with the same
    /// sandbox and host only (no session state is kept per client).
    pub fn server_config(
        &self,
        container_id: &Arc<str>,
        ca: &SandboxCa,
        host: &HostName,
        alpn: Option<Vec<u8>>,
    ) -> Result<Arc<rustls::ServerConfig>, AuthorityError> {
        let k = (Arc::clone(container_id), host.clone(), alpn);
        if let Some(config) = self.configs.get(&k) {
            return Ok(config);
        }
        let leaf = self.leaf(container_id, ca, host)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(leaf)));
        config.alpn_protocols = k.2.iter().cloned().collect();
        config.ignore_client_order = true;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        let config = Arc::new(config);
        self.configs.insert(k, Arc::clone(&config));
        Ok(config)
    }

    /// A leaf for `host` signed by `ca`, with the chain a client is sent
    /// (leaf, then the CA).
    pub fn leaf(
        &self,
        container_id: &Arc<str>,
        ca: &SandboxCa,
        host: &HostName,
    ) -> Result<Arc<CertifiedKey>, AuthorityError> {
        let k = (Arc::clone(container_id), host.clone());
        if let Some(leaf) = self.leaves.get(&k) {
            return Ok(leaf);
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(host.as_str().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::seconds(self.leaf_ttl.as_secs() as i64);
        let mut serial = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params.signed_by(&self.leaf_key, &ca.issuer)?;
        let leaf = Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), ca.der.clone()],
            Arc::clone(&self.leaf_signer),
        ));
        self.leaves.insert(k, Arc::clone(&leaf));
        Ok(leaf)
    }
}

/// The client configuration inspected upstreams are verified with.
fn upstream_config(extra: &Path) -> Result<rustls::ClientConfig, AuthorityError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system root rustls cannot use is skipped, as every client does.
        let _ = roots.add(cert);
    }
    if !extra.as_os_str().is_empty() {
        let pem = std::fs::read(extra).map_err(|source| AuthorityError::ReadCa {
            path: extra.to_owned(),
            source,
        })?;
        let mut added = 0;
        for cert in rustls_pemfile_certs(&pem) {
            if roots.add(cert).is_ok() {
                added += 1;
            }
        }
        if added == 0 {
            return Err(AuthorityError::NoCa(extra.to_owned()));
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// ring's suites with AES-128-GCM first, on both sides of an inspected
/// connection (sluice's order, not the client's): as strong in practice,
/// and its SHA-256 key schedule runs on the CPU's SHA extensions, where
/// ring's SHA-384 (that of AES-256-GCM, rustls' first) is plain code on
/// x86-64, 6% of sluice's CPU in a handshake-bound profile.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// The certificates in a PEM file.
fn rustls_pemfile_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(key: &[u8]) -> Authority {
        Authority::new(key.to_vec(), Duration::from_secs(3600), Path::new("")).unwrap()
    }

    #[test]
    fn the_same_key_makes_the_same_ca_on_every_gateway() {
        let id: Arc<str> = Arc::from("c1");
        let names = vec!["api.github.test".to_string()];
        let (a, b) = (authority(&[7; 32]), authority(&[7; 32]));
        let (ca_a, ca_b) = (
            a.ca(&id, names.clone()).unwrap(),
            b.ca(&id, names.clone()).unwrap(),
        );
        let spki = |ca: &SandboxCa| {
            let (_, x) = x509_parser::parse_x509_certificate(&ca.der).unwrap();
            (
                x.tbs_certificate.subject_pki.raw.to_vec(),
                x.tbs_certificate.subject.to_string(),
                x.tbs_certificate.serial.clone(),
            )
        };
        assert_eq!(spki(&ca_a), spki(&ca_b));
        let other = authority(&[8; 32]).ca(&id, names.clone()).unwrap();
        assert_ne!(spki(&ca_a).0, spki(&other).0);
        let sibling = a.ca(&Arc::from("c2"), names).unwrap();
        assert_ne!(spki(&ca_a).0, spki(&sibling).0);
    }

    #[test]
    fn a_leaf_chains_to_its_sandbox_ca_and_is_backdated() {
        let a = authority(&[7; 32]);
        let id: Arc<str> = Arc::from("c1");
        let ca = a.ca(&id, vec!["api.github.test".into()]).unwrap();
        let host = HostName::parse("api.github.test").unwrap();
        let leaf = a.leaf(&id, &ca, &host).unwrap();
        assert_eq!(leaf.cert.len(), 2);
        let (_, x) = x509_parser::parse_x509_certificate(&leaf.cert[0]).unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(&ca.der).unwrap();
        assert_eq!(x.tbs_certificate.issuer, c.tbs_certificate.subject);
        x.verify_signature(Some(&c.tbs_certificate.subject_pki))
            .unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!(x.validity().not_before.timestamp() <= now - 86_000);
        // Cached: the same leaf again.
        assert!(Arc::ptr_eq(&leaf, &a.leaf(&id, &ca, &host).unwrap()));
    }

    /// What `from` has to send, read and processed by `to`.
    fn pass<A, B, D, E>(from: &mut A, to: &mut B)
    where
        A: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
        B: std::ops::DerefMut<Target = rustls::ConnectionCommon<E>>,
    {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
        }
        to.process_new_packets().unwrap();
    }

    /// One full handshake between a client configuration and `server`,
    /// in memory; how it went (full, or resumed) and the suite chosen.
    fn handshake(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> (rustls::HandshakeKind, rustls::CipherSuite) {
        let name = rustls::pki_types::ServerName::try_from("api.github.test").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::clone(client), name).unwrap();
        let mut s = rustls::ServerConnection::new(Arc::clone(server)).unwrap();
        // Both ways until neither has more to say; then the tickets, which
        // the client reads with the server's first data.
        for _ in 0..10 {
            pass(&mut c, &mut s);
            pass(&mut s, &mut c);
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        let suite = c.negotiated_cipher_suite().unwrap().suite();
        (c.handshake_kind().unwrap(), suite)
    }

    /// An inspected client's configuration is made once per sandbox, host
    /// and protocol; its client resumes (no certificate signed again), and
    /// only with the same sandbox: each configuration's tickets are its
    /// own. AES-128-GCM is chosen even for a client that prefers AES-256.
    #[test]
    fn an_inspected_client_resumes_with_its_own_sandbox_only() {
        let a = authority(&[7; 32]);
        let host = HostName::parse("api.github.test").unwrap();
        let config = |id: &str, alpn: Option<Vec<u8>>| {
            let id: Arc<str> = Arc::from(id);
            let ca = a.ca(&id, vec!["api.github.test".into()]).unwrap();
            (a.server_config(&id, &ca, &host, alpn).unwrap(), ca)
        };
        let (one, ca) = config("c1", None);
        assert!(Arc::ptr_eq(&one, &config("c1", None).0), "made again");
        assert!(!Arc::ptr_eq(&one, &config("c1", Some(b"h2".to_vec())).0));
        assert_eq!(config("c1", Some(b"h2".to_vec())).0.alpn_protocols, [b"h2"]);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der.clone()).unwrap();
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        assert_eq!(
            client.crypto_provider().cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            "the client prefers AES-256"
        );
        let (kind, suite) = handshake(&client, &one);
        assert_eq!(kind, rustls::HandshakeKind::Full);
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(handshake(&client, &one).0, rustls::HandshakeKind::Resumed);
        // Another sandbox's configuration (its own CA, trusted here too)
        // does not take the first one's ticket.
        let (two, ca_two) = config("c2", None);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der.clone()).unwrap();
        roots.add(ca_two.der.clone()).unwrap();
        let both = Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        assert_eq!(handshake(&both, &one).0, rustls::HandshakeKind::Full);
        assert_eq!(handshake(&both, &two).0, rustls::HandshakeKind::Full);
    }

    #[test]
    fn the_ca_is_name_constrained() {
        let a = authority(&[7; 32]);
        let ca = a
            .ca(
                &Arc::from("c1"),
                vec!["github.test".into(), "pypi.test".into()],
            )
            .unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(&ca.der).unwrap();
        let nc = c.name_constraints().unwrap().unwrap().value;
        let permitted: Vec<String> = nc
            .permitted_subtrees
            .as_ref()
            .unwrap()
            .iter()
            .map(|s| s.base.to_string())
            .collect();
        assert_eq!(permitted, ["DNSName(github.test)", "DNSName(pypi.test)"]);
        assert_eq!(nc.excluded_subtrees.as_ref().unwrap().len(), 2);
        assert!(c.basic_constraints().unwrap().unwrap().value.ca);
    }

    /// The name constraints hold for a real verifier: openssl refuses a
    /// leaf the CA signed for a name outside them (the gateway never
    /// signs one; this is what a stolen CA key could do).
    #[test]
    fn openssl_refuses_a_leaf_outside_the_constraints() {
        if std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_err()
        {
            assert!(std::env::var("CI").is_err(), "openssl is missing");
            eprintln!("skipped: no openssl");
            return;
        }
        let a = authority(&[7; 32]);
        let id: Arc<str> = Arc::from("c1");
        let ca = a.ca(&id, vec!["api.github.test".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
        let verify = |host: &str| {
            let leaf = a.leaf(&id, &ca, &HostName::parse(host).unwrap()).unwrap();
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD.encode(&leaf.cert[0]);
            let lines: Vec<&str> = b64
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            let pem = format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                lines.join("\n")
            );
            let path = dir.path().join(format!("{host}.pem"));
            std::fs::write(&path, pem).unwrap();
            let out = std::process::Command::new("openssl")
                .args(["verify", "-CAfile"])
                .arg(dir.path().join("ca.pem"))
                .arg(&path)
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr),
            )
        };
        let (ok, text) = verify("api.github.test");
        assert!(ok, "{text}");
        let (ok, text) = verify("evil.test");
        assert!(!ok, "{text}");
        assert!(text.contains("permitted subtree violation"), "{text}");
    }

    #[test]
    fn a_key_is_made_once_and_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = load_key(Path::new(""), dir.path()).unwrap();
        assert_eq!(key.len(), 32);
        let path = dir.path().join("inspect/key");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_key(Path::new(""), dir.path()).unwrap(), key);
        std::fs::write(dir.path().join("short"), b"abc").unwrap();
        assert!(matches!(
            load_key(&dir.path().join("short"), dir.path()),
            Err(AuthorityError::ShortKey(_))
        ));
        assert!(matches!(
            load_key(&dir.path().join("absent"), dir.path()),
            Err(AuthorityError::ReadKey { .. })
        ));
    }
}
