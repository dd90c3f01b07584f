//! TLS on the admin API and the explicit proxy listener (rustls). Owns:
//! server configurations built from PEM files (through `rustls-pki-types`),
//! replaced whole on reload (SIGHUP) so a handshake always sees one
//! consistent certificate, key and client CA, a broken file keeping the
//! last good set; and the listener that hands the admin API only
//! connections whose handshake finished.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::listener::{Accepted, AdmittedIo, Limits};
use crate::shutdown::Shutdown;

/// Handshakes the admin listener runs at once, and from one source: past
/// either, a new connection is closed at once (never queued), so silent
/// connections cannot lock out an operator from another address.
const MAX_HANDSHAKES: usize = 256;
const HANDSHAKES_PER_SOURCE: usize = 8;

/// The files of one TLS door, and the config keys that named them.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// `admin.tls_` or `gateway.proxy_tls_`: error messages name the key.
    pub prefix: &'static str,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates from this CA are required, when set.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// `None` when the door is plain (no certificate configured).
    pub fn new(
        prefix: &'static str,
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Option<TlsFiles> {
        (!cert.as_os_str().is_empty()).then(|| TlsFiles {
            prefix,
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: client_ca
                .filter(|p| !p.as_os_str().is_empty())
                .map(Path::to_owned),
        })
    }
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {}", path.display())]
    Pem {
        key: String,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{key}: {} holds no certificate", path.display())]
    NoCertificate { key: String, path: PathBuf },
    #[error("{key}: a CA certificate in {} is not usable", path.display())]
    BadCa {
        key: String,
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{key}: cannot verify client certificates with {}", path.display())]
    Verifier {
        key: String,
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("{prefix}cert_file and {prefix}key_file do not make a usable pair")]
    Pair {
        prefix: &'static str,
        #[source]
        source: rustls::Error,
    },
}

fn certs(key: String, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        key: key.clone(),
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// A server configuration from `files`, speaking HTTP/1.1.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let p = files.prefix;
    let chain = certs(format!("{p}cert_file"), &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::Pem {
        key: format!("{p}key_file"),
        path: files.key.clone(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Pair { prefix: p, source })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            // The client CA key is `admin.client_ca_file`.
            let key = "admin.client_ca_file".to_owned();
            let mut roots = rustls::RootCertStore::empty();
            for cert in certs(key.clone(), ca)? {
                roots.add(cert).map_err(|source| TlsError::BadCa {
                    key: key.clone(),
                    path: ca.clone(),
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|source| TlsError::Verifier {
                    key,
                    path: ca.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Pair { prefix: p, source })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// One door's TLS configuration, replaceable while it serves.
#[derive(Debug)]
pub struct Reloadable {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl Reloadable {
    pub fn load(files: TlsFiles) -> Result<Reloadable, TlsError> {
        let config = server_config(&files)?;
        Ok(Reloadable {
            files,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// Reads the files again; on any error the last good configuration
    /// stays. Handshakes from now on use the new one.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(server_config(&self.files)?);
        match self.current.write() {
            Ok(mut c) => *c = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
        Ok(())
    }

    /// An acceptor with the configuration of this moment.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = match self.current.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        TlsAcceptor::from(config)
    }

    /// The handshake on `stream`, bounded by `timeout`.
    pub async fn accept(
        &self,
        stream: TcpStream,
        timeout: Duration,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        tokio::time::timeout(timeout, self.acceptor().accept(stream))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake"))?
    }
}

/// A listener for `axum::serve` that yields connections whose TLS
/// handshake has finished. Handshakes run in their own tasks (bounded in
/// time and number), so a slow client holds up nobody else.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(AdmittedIo<TlsStream<TcpStream>>, SocketAddr)>,
}

impl TlsListener {
    /// `established` caps the connections that finished their handshake
    /// (and hold their place until they end); handshakes under way are
    /// capped apart, in total and per source, each within `timeout`.
    pub fn new(
        listener: TcpListener,
        tls: Arc<Reloadable>,
        timeout: Duration,
        established: Limits,
        shutdown: Shutdown,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let handshakes = Limits::new(MAX_HANDSHAKES, HANDSHAKES_PER_SOURCE);
        let stopping = shutdown.clone();
        tokio::spawn(async move {
            while let Some(accepted) =
                crate::listener::next(&listener, &handshakes, &stopping).await
            {
                let (stream, peer, handshake) = match accepted {
                    Accepted::Admitted(stream, peer, a) => (stream, peer, a),
                    Accepted::Refused(stream, peer) => {
                        tracing::debug!(%peer, "admin TLS: too many handshakes; closed");
                        drop(stream);
                        continue;
                    }
                };
                let Some(place) = established.admit(peer) else {
                    tracing::debug!(%peer, "admin TLS: too many connections; closed");
                    continue;
                };
                let (tls, tx) = (Arc::clone(&tls), tx.clone());
                shutdown.spawn(async move {
                    let result = tls.accept(stream, timeout).await;
                    drop(handshake);
                    match result {
                        Ok(s) => {
                            let _ = tx.send((AdmittedIo::new(s, place), peer)).await;
                        }
                        Err(e) => tracing::debug!(%peer, error = %e, "admin TLS handshake failed"),
                    }
                });
            }
        });
        Ok(TlsListener { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = AdmittedIo<TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The acceptor has stopped: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
