//! TLS on the admin API and the proxy listener, with certificates made
//! here (`rcgen`): the admin API over TLS, client certificates required
//! with `admin.client_ca_file` (and the bearer token still needed), a
//! certificate replaced on reload (a broken one keeping the last good),
//! and `HTTPS_PROXY=https://…` working with curl and pip, so the token
//! never crosses in clear.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A test CA that issues server and client certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf for `names` (IP strings become IP SANs): (cert PEM, key PEM).
    fn leaf(&self, names: &[&str], cn: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn der(pem: &str) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// A client that trusts `ca`, with a client certificate when given.
fn client(ca: &str, identity: Option<(&str, &str)>) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(ca)).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![der(cert)],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// One HTTP/1.1 request over TLS: the status and body, or the error.
async fn https(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    req: &str,
) -> std::io::Result<(u16, String, Vec<CertificateDer<'static>>)> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.to_vec())
        .unwrap_or_default();
    tls.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tls.read_to_end(&mut out),
    )
    .await
    .map_err(|_| std::io::Error::other("timed out"))??;
    let (status, body) = parse_response(&String::from_utf8_lossy(&out));
    Ok((status, body, chain))
}

fn get(path: &str, token: Option<&str>) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n")
}

#[tokio::test]
async fn the_admin_api_over_tls_with_client_certificates_and_a_reload() {
    let ca = Ca::new("sluice test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"], "admin one");
    let cert_file = write(dir.path(), "admin.pem", &cert);
    let key_file = write(dir.path(), "admin-key.pem", &key);
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let (cf, kf, caf) = (cert_file.clone(), key_file.clone(), ca_file.clone());
    let gw = start("127.0.0.1:9".parse().unwrap(), move |c| {
        c.admin.tls_cert_file = cf;
        c.admin.tls_key_file = kf;
        c.admin.client_ca_file = caf;
    })
    .await;
    let addr = gw.running.admin_addr;
    let token = gw.running.admin_token.clone();
    let (client_cert, client_key) = ca.leaf(&["operator"], "operator");
    let with_cert = client(&ca.pem(), Some((&client_cert, &client_key)));

    // With a certificate from the CA: served; the bearer token still needed.
    let (status, body, chain) = https(addr, &with_cert, &get("/healthz", None))
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(chain[0], der(&cert), "the configured certificate");
    let (status, body, _) = https(addr, &with_cert, &get("/v1/sandboxes", None))
        .await
        .unwrap();
    assert_eq!(status, 401, "{body}");
    let (status, body, _) = https(addr, &with_cert, &get("/v1/sandboxes", Some(&token)))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["sandboxes"], json!([]));

    // No client certificate, or one from another CA: no answer at all.
    let other = Ca::new("someone else");
    let (oc, ok) = other.leaf(&["operator"], "intruder");
    for (what, connector) in [
        ("no client certificate", client(&ca.pem(), None)),
        ("another CA's", client(&ca.pem(), Some((&oc, &ok)))),
    ] {
        let r = https(addr, &connector, &get("/v1/sandboxes", Some(&token))).await;
        assert!(
            r.is_err(),
            "{what}: answered {:?}",
            r.map(|(s, b, _)| (s, b))
        );
    }
    // Plain HTTP on the TLS port gets no HTTP answer.
    let (status, _) = raw_http(addr, &get("/healthz", None)).await;
    assert_eq!(status, 0, "plain HTTP answered on the TLS port");

    // A new certificate in the same files: new handshakes see it.
    let (cert2, key2) = ca.leaf(&["localhost", "127.0.0.1"], "admin two");
    std::fs::write(&cert_file, &cert2).unwrap();
    std::fs::write(&key_file, &key2).unwrap();
    assert!(gw.running.reload_tls().is_empty());
    let (status, _, chain) = https(addr, &with_cert, &get("/healthz", None))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(chain[0], der(&cert2), "reloaded");
    // A broken file: the reload says so, and the last good set stays.
    std::fs::write(&cert_file, "not a certificate\n").unwrap();
    let errors = gw.running.reload_tls();
    assert_eq!(errors.len(), 1);
    let msg = sluice::error_chain(&errors[0]);
    assert!(msg.contains("admin.tls_cert_file"), "{msg}");
    let (status, _, chain) = https(addr, &with_cert, &get("/healthz", None))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(chain[0], der(&cert2), "the last good certificate");
}

#[tokio::test]
async fn a_broken_tls_config_is_refused_at_start_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "bad.pem", "nothing here\n");
    let mut c = test_config(dir.path());
    c.gateway.proxy_tls_cert_file = bad.clone();
    c.gateway.proxy_tls_key_file = bad;
    let err = sluice::app::run(c, sluice::app::Options::default())
        .await
        .err()
        .unwrap();
    let msg = sluice::error_chain(&err);
    assert!(msg.contains("gateway.proxy_tls_cert_file"), "{msg}");
    // Half a pair, or a client CA without TLS: `sluice check` names them.
    let mut c = test_config(dir.path());
    c.admin.tls_cert_file = "/x/cert.pem".into();
    c.admin.client_ca_file = "/x/ca.pem".into();
    c.gateway.proxy_tls_key_file = "/x/key.pem".into();
    let msg = sluice::error_chain(&c.validate().unwrap_err());
    for key in ["admin.tls_key_file", "gateway.proxy_tls_cert_file"] {
        assert!(msg.contains(key), "{key}: {msg}");
    }
    let mut c = test_config(dir.path());
    c.admin.client_ca_file = "/x/ca.pem".into();
    let msg = sluice::error_chain(&c.validate().unwrap_err());
    assert!(msg.contains("admin.client_ca_file"), "{msg}");
}

/// A gateway whose proxy listener speaks TLS, and a token for
/// `api.test:<port>`: (gateway, CA file, token).
async fn tls_proxy(dir: &Path, port: u16) -> (Gw, PathBuf, String) {
    let ca = Ca::new("sluice proxy CA");
    let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"], "proxy");
    let cert_file = write(dir, "proxy.pem", &cert);
    let key_file = write(dir, "proxy-key.pem", &key);
    let ca_file = write(dir, "ca.pem", &ca.pem());
    let gw = start("127.0.0.1:9".parse().unwrap(), move |c| {
        c.gateway.proxy_tls_cert_file = cert_file;
        c.gateway.proxy_tls_key_file = key_file;
    })
    .await;
    let (status, body) = gw
        .admin(
            "POST",
            "/v1/tokens",
            Some(json!({"container_id": "sb1", "user_id": "u", "allowed_hosts": [format!("api.test:{port}")], "ttl_seconds": 600})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let token = body["token"].as_str().unwrap().to_owned();
    (gw, ca_file, token)
}

fn curl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn curl_through_https_proxy_with_the_token_in_the_tls_stream() {
    if !have_tool(
        "curl",
        "--version",
        "curl_through_https_proxy_with_the_token_in_the_tls_stream",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let up = http_upstream().await;
    let (gw, ca_file, token) = tls_proxy(dir.path(), up.addr.port()).await;
    let proxy = format!(
        "https://container_sb1:jwt_{token}@localhost:{}",
        gw.running.proxy_addr.port()
    );
    let url = format!("http://api.test:{}/through", up.addr.port());
    let denied = format!("http://other.test:{}/", up.addr.port());
    let ca = ca_file.to_str().unwrap().to_owned();
    let (proxy2, url2, denied2, ca2) = (proxy.clone(), url.clone(), denied.clone(), ca.clone());
    let runs = tokio::task::spawn_blocking(move || {
        let base = [
            "-s",
            "--max-time",
            "20",
            "--noproxy",
            "",
            "--proxy",
            &proxy2,
            "--proxy-cacert",
            &ca2,
        ];
        let with = |extra: &[&str], target: &str| {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            args.push(target);
            curl(&args)
        };
        (
            // absolute-form over TLS
            with(&[], &url2),
            // CONNECT over TLS, HTTP inside the tunnel
            with(&["-p"], &url2),
            // a host the token does not allow: 403 with the reason
            with(&["-o", "/dev/null", "-w", "%{http_code}"], &denied2),
        )
    })
    .await
    .unwrap();
    let (plain, tunnel, refused) = runs;
    assert_eq!(plain.0, 0, "{plain:?}");
    assert!(plain.1.contains("upstream GET /through"), "{plain:?}");
    assert_eq!(tunnel.0, 0, "{tunnel:?}");
    assert!(tunnel.1.contains("upstream GET /through"), "{tunnel:?}");
    assert_eq!(refused.1, "403", "{refused:?}");
    // The proxy listener does not speak plain HTTP: no 407, no request read.
    let (status, _) = raw_http(
        gw.running.proxy_addr,
        &format!("GET {url} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 0, "plain HTTP was answered on the TLS proxy");
    // curl refuses a proxy certificate it cannot verify.
    let (code, _, _) = tokio::task::spawn_blocking(move || {
        curl(&[
            "-s",
            "--max-time",
            "10",
            "--noproxy",
            "",
            "--proxy",
            &proxy,
            &url,
        ])
    })
    .await
    .unwrap();
    assert_ne!(code, 0, "an unverified proxy certificate was accepted");
}

/// [`pep503_index`] under `root`, served by Python's http.server on a free
/// loopback port (killed on drop).
struct Index {
    child: std::process::Child,
    port: u16,
}

impl Drop for Index {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn index(root: &Path) -> Index {
    pep503_index(root);
    let script = r#"
import functools, http.server, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;
    let mut child = Command::new("python3")
        .args(["-c", script, root.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port = line.trim().parse().unwrap();
    Index { child, port }
}

#[tokio::test]
async fn pip_downloads_through_https_proxy() {
    if !have_tool("python3", "--version", "pip_downloads_through_https_proxy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    let index = index(&site);
    let (gw, ca_file, token) = tls_proxy(dir.path(), index.port).await;
    let proxy = format!(
        "https://container_sb1:jwt_{token}@localhost:{}",
        gw.running.proxy_addr.port()
    );
    let url = format!("http://api.test:{}/simple/", index.port);
    let ca = ca_file.to_str().unwrap().to_owned();
    let dest = dir.path().join("dest");
    let dest_arg = dest.to_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--disable-pip-version-check",
                "--no-deps",
                "--retries",
                "0",
                "--timeout",
                "20",
                "--proxy",
                &proxy,
                "--cert",
                &ca,
                "--index-url",
                &url,
                "--trusted-host",
                "api.test",
                "-d",
                &dest_arg,
                "demo",
            ])
            .env("PIP_CONFIG_FILE", "/dev/null")
            .env("PIP_NO_CACHE_DIR", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(dest.join("demo-1.0-py3-none-any.whl").exists(), "{text}");
    drop(index);
}

/// A gateway whose admin API speaks TLS with client certificates from a
/// test CA; the CA and the folder its files are in.
async fn admin_over_tls() -> (Gw, Ca, tempfile::TempDir) {
    let ca = Ca::new("sluice test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"], "admin one");
    let cf = write(dir.path(), "admin.pem", &cert);
    let kf = write(dir.path(), "admin-key.pem", &key);
    let caf = write(dir.path(), "ca.pem", &ca.pem());
    let gw = start("127.0.0.1:9".parse().unwrap(), move |c| {
        c.admin.tls_cert_file = cf;
        c.admin.tls_key_file = kf;
        c.admin.client_ca_file = caf;
    })
    .await;
    (gw, ca, dir)
}

/// Silent connections (no certificate needed to open them) cannot lock
/// the admin API: past a few handshakes in progress from one source the
/// next is closed at once, handshakes have a short deadline, and an
/// operator from another address is served meanwhile.
#[tokio::test]
async fn silent_connections_do_not_lock_operators_out_of_the_tls_admin_api() {
    let (gw, ca, _dir) = admin_over_tls().await;
    let addr = gw.running.admin_addr;
    let (client_cert, client_key) = ca.leaf(&["operator"], "operator");
    let operator = client(&ca.pem(), Some((&client_cert, &client_key)));
    // More silent connections than the API ever had handshake places.
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let mut tls = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        operator.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("the operator's handshake waited behind silent connections")
    .unwrap();
    tls.write_all(get("/healthz", None).as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), tls.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "served after {:?}",
        started.elapsed()
    );
    // Every silent connection is closed: at once past the source's cap,
    // the rest at the handshake deadline.
    let closed_by = std::time::Instant::now() + std::time::Duration::from_secs(8);
    for s in &mut silent {
        let mut byte = [0u8; 1];
        let left = closed_by.saturating_duration_since(std::time::Instant::now());
        let r = tokio::time::timeout(left, s.read(&mut byte)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "a silent connection still open"
        );
    }
}
