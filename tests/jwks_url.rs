//! `auth.jwks_url`: the JWKS fetched over HTTPS from a local test server
//! whose certificate comes from a test CA (`rcgen`): the set is used at
//! start, a rotation is picked up within the refresh period, a broken
//! answer (an error status, a body that is no JWKS) keeps the last good
//! set, a restart while the server is down verifies with the cached set,
//! and a first start with nothing to go on fails naming the key.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::json;
use sluice::identity::token::{KeyPair as Keys, MintRequest, Signer};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the key server answers: a status and a body; `up = false` closes
/// every connection at once.
struct Answer {
    up: bool,
    status: u16,
    body: String,
}

/// An HTTPS server on loopback serving `answer` for every request; its CA
/// certificate is written to `ca.pem` in `dir`.
async fn key_server(dir: &std::path::Path, answer: Arc<Mutex<Answer>>) -> u16 {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "key server CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, answer) = (acceptor.clone(), Arc::clone(&answer));
            tokio::spawn(async move {
                if !answer.lock().unwrap().up {
                    return;
                }
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if tls.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let (status, body) = {
                    let a = answer.lock().unwrap();
                    (a.status, a.body.clone())
                };
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

fn signer(keys: &Keys) -> Signer {
    Signer::from_pem(
        keys.private_pem.as_bytes(),
        keys.jwk["kid"].as_str().unwrap(),
        "secure-egress-control",
        "egress-proxy",
    )
    .unwrap()
}

fn token(signer: &Signer, id: &str) -> String {
    signer
        .mint(&MintRequest {
            limits: Default::default(),
            organization_uuid: None,
            enforce: Default::default(),
            credentials: Vec::new(),
            container_id: id.into(),
            user_id: "u".into(),
            allowed_hosts: vec!["api.test".into()],
            ttl: Duration::from_secs(600),
        })
        .unwrap()
        .token
}

/// Waits up to `within` for `f` to hold.
async fn eventually(within: Duration, what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn keys_come_from_the_url_rotate_and_survive_a_broken_answer_and_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Keys::generate("a").unwrap(), Keys::generate("b").unwrap());
    let answer = Arc::new(Mutex::new(Answer {
        up: true,
        status: 200,
        body: a.jwks().to_string(),
    }));
    let port = key_server(dir.path(), Arc::clone(&answer)).await;
    let key_file = dir.path().join("a.pem");
    std::fs::write(&key_file, &a.private_pem).unwrap();
    let state = tempfile::tempdir().unwrap();
    let (ca, kf) = (dir.path().join("ca.pem"), key_file.clone());
    let tweak = move |c: &mut sluice::config::Config| {
        c.auth.jwks_url = format!("https://localhost:{port}/jwks.json");
        c.auth.jwks_ca_file = ca.clone();
        c.auth.jwks_refresh_s = 1;
        c.auth.signing_key_file = Some(kf.clone());
        c.auth.signing_kid = "a".into();
    };
    let gw = start_in(state, "127.0.0.1:9".parse().unwrap(), tweak.clone()).await;
    let (ta, tb) = (token(&signer(&a), "sb-a"), token(&signer(&b), "sb-b"));
    let v = Arc::clone(&gw.running.verifier);
    assert!(v.verify(&ta).is_ok(), "the URL's key verifies");
    assert!(v.verify(&tb).is_err(), "a key not in the set does not");
    // The admin API mints with key a, and a sandbox registers with it.
    gw.register("sb-reg", "198.18.0.2", &["api.test"], 600)
        .await;

    // Rotation: the server now has only key b.
    answer.lock().unwrap().body = b.jwks().to_string();
    eventually(Duration::from_secs(5), "rotation picked up", || {
        v.verify(&tb).is_ok() && v.verify(&ta).is_err()
    })
    .await;
    // The registered sandbox's token (key a) is refused from now on.
    let reg = gw.running.registry.get_by_id("sb-reg").unwrap();
    assert!(reg.current_grant(&v).is_err());

    // Broken answers: the last good set stays.
    for (status, body) in [
        (500, json!({"error": "down"}).to_string()),
        (200, "not json".to_owned()),
        (200, json!({"keys": []}).to_string()),
    ] {
        {
            let mut a = answer.lock().unwrap();
            a.status = status;
            a.body = body;
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            v.verify(&tb).is_ok(),
            "a broken answer ({status}) replaced the set"
        );
    }

    // A restart while the server is down: the cached set (key b) serves.
    answer.lock().unwrap().up = false;
    let Gw {
        running,
        dir: state,
    } = gw;
    running.shutdown().await;
    let gw = start_in(state, "127.0.0.1:9".parse().unwrap(), tweak.clone()).await;
    assert!(gw.running.verifier.verify(&tb).is_ok(), "the cached set");
    assert!(gw.running.verifier.verify(&ta).is_err());

    // A first start with the server down and no cache: refused, naming it.
    let fresh = tempfile::tempdir().unwrap();
    let mut c = test_config(fresh.path());
    tweak(&mut c);
    let err = sluice::app::run(c, sluice::app::Options::default())
        .await
        .err()
        .unwrap();
    let msg = sluice::error_chain(&err);
    assert!(
        msg.contains("auth.jwks_url") || msg.contains("jwks.json"),
        "{msg}"
    );
}

#[test]
fn the_config_check_refuses_a_plain_or_doubled_key_source() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = test_config(dir.path());
    c.auth.jwks_url = "http://keys.test/jwks.json".into();
    let msg = sluice::error_chain(&c.validate().unwrap_err());
    assert!(
        msg.contains("auth.jwks_url") && msg.contains("https"),
        "{msg}"
    );
    c.auth.jwks_url = "https://keys.test/jwks.json".into();
    c.auth.jwks_file = Some("/etc/sluice/jwks.json".into());
    let msg = sluice::error_chain(&c.validate().unwrap_err());
    assert!(msg.contains("auth.jwks_file"), "{msg}");
    c.auth.jwks_file = None;
    c.auth.jwks_refresh_s = 0;
    let msg = sluice::error_chain(&c.validate().unwrap_err());
    assert!(msg.contains("auth.jwks_refresh_s"), "{msg}");
    c.auth.jwks_refresh_s = 300;
    assert!(c.validate().is_ok());
}
