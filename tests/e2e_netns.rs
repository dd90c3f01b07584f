//! End to end on a real network path, as root: a sandbox namespace whose
//! TCP is REDIRECTed by `iptables/sluice-gateway.sh` to `sluice serve` in a
//! gateway namespace, and an upstream namespace with an HTTP server, a TLS
//! server (`openssl s_server`, self-signed) and a decoy that must never see
//! a connection. Clients are real `curl`s. Everything the test creates is
//! removed by a guard on drop, pass or fail.
//!
//! Without root (or the tools) it skips with a reason; with `CI=true` a
//! skip is a failure.

#![allow(clippy::unwrap_used)]

mod netns;

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use netns::{Lab, pattern_sha256, require_root};

/// Serves HTTP/1.1 on a listener: `/big` is 100 MB of a known pattern,
/// anything else names the server's address. Counts connections.
fn serve_http(listener: TcpListener, count: Arc<AtomicUsize>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let local = s
                    .local_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf);
                let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                if path == "/big" {
                    let body = netns::pattern(netns::BIG);
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(&body);
                } else {
                    let body = format!("hello from {local} {path}\n");
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
            });
        }
    });
}

/// Accepts and counts; never answers.
fn serve_decoy(listener: TcpListener, count: Arc<AtomicUsize>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if conn.is_ok() {
                count.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
}

#[test]
fn transparent_gateway_end_to_end() {
    if !require_root("transparent_gateway_end_to_end") {
        return;
    }
    let mut lab = Lab::new("t");
    let up = "198.18.1.10";
    let decoy = "198.18.1.11";

    // Upstream servers.
    let http_hits = Arc::new(AtomicUsize::new(0));
    let decoy_hits = Arc::new(AtomicUsize::new(0));
    serve_http(
        lab.listen_upstream(&format!("{up}:80")),
        Arc::clone(&http_hits),
    );
    serve_decoy(
        lab.listen_upstream(&format!("{decoy}:80")),
        Arc::clone(&decoy_hits),
    );
    serve_decoy(
        lab.listen_upstream(&format!("{decoy}:443")),
        Arc::clone(&decoy_hits),
    );
    lab.start_tls_server(up, "secure.test");
    let udp: UdpSocket = lab.udp_upstream(&format!("{up}:5353"));

    // The gateway.
    lab.start_sluice(&format!(
        r#"
[gateway.resolve]
"api.test" = ["{up}"]
"secure.test" = ["{up}"]
"other.test" = ["{decoy}"]
"#
    ));
    let allowed = lab.mint("sandbox-a", &["api.test", "secure.test"], 600);
    lab.register(&allowed, "198.18.0.2");
    let short = lab.mint("sandbox-c", &["api.test"], 1);
    lab.register(&short, "198.18.0.4");
    std::thread::sleep(Duration::from_millis(2100));

    // Allowed HTTP: the upstream's answer. The address the client dials is
    // irrelevant (198.18.1.99 does not exist): sluice resolves the name.
    let r = lab.curl(&[
        "-sS",
        "-i",
        "--resolve",
        "api.test:80:198.18.1.99",
        "http://api.test/hello",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.starts_with("HTTP/1.1 200"), "{r:?}");
    assert!(
        r.stdout.contains(&format!("hello from {up} /hello")),
        "{r:?}"
    );

    // A host not in allowed_hosts: 403 host_not_allowed, nothing upstream.
    let r = lab.curl(&[
        "-sS",
        "-i",
        "--resolve",
        &format!("other.test:80:{decoy}"),
        "http://other.test/",
    ]);
    assert!(r.stdout.starts_with("HTTP/1.1 403"), "{r:?}");
    assert!(
        r.stdout.contains("x-deny-reason: host_not_allowed"),
        "{r:?}"
    );

    // Allowed HTTPS completes its handshake with the real upstream.
    let r = lab.curl(&[
        "-sS",
        "-k",
        "--resolve",
        &format!("secure.test:443:{up}"),
        "https://secure.test/",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("s_server"), "{r:?}");

    // Disallowed HTTPS fails with the access_denied alert.
    let r = lab.curl(&[
        "-sS",
        "-k",
        "-v",
        "--resolve",
        &format!("other.test:443:{decoy}"),
        "https://other.test/",
    ]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.to_lowercase().contains("access denied"), "{r:?}");

    // An allowed SNI sent to another server's address still reaches only
    // the allowed host's real address.
    let r = lab.curl(&[
        "-sS",
        "-k",
        "--resolve",
        &format!("secure.test:443:{decoy}"),
        "https://secure.test/",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("s_server"), "{r:?}");
    let r = lab.curl(&[
        "-sS",
        "-H",
        "Host: api.test",
        &format!("http://{decoy}/lie"),
    ]);
    assert!(r.stdout.contains(&format!("hello from {up} /lie")), "{r:?}");

    // A source with no registration, and one whose token expired.
    let r = lab.curl(&[
        "-sS",
        "-i",
        "--interface",
        "198.18.0.3",
        "--resolve",
        "api.test:80:198.18.1.10",
        "http://api.test/",
    ]);
    assert!(r.stdout.contains("x-deny-reason: unknown_source"), "{r:?}");
    let r = lab.curl(&[
        "-sS",
        "-i",
        "--interface",
        "198.18.0.4",
        "--resolve",
        "api.test:80:198.18.1.10",
        "http://api.test/",
    ]);
    assert!(r.stdout.contains("x-deny-reason: token_expired"), "{r:?}");

    // 100 MB through the gateway arrives intact.
    let out = lab.dir.path().join("big.bin");
    let started = Instant::now();
    let r = lab.curl(&[
        "-sS",
        "-o",
        out.to_str().unwrap(),
        "--resolve",
        "api.test:80:198.18.1.10",
        "http://api.test/big",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), netns::BIG);
    assert_eq!(
        netns::sha256(&got),
        pattern_sha256(netns::BIG),
        "100 MB corrupted in transit"
    );
    eprintln!("100 MB relayed in {:?}", started.elapsed());

    // UDP from the sandbox goes nowhere: not to the upstream (forwarding is
    // on in the gateway, the rules drop it), not to the gateway.
    lab.sandbox_sh("for i in 1 2 3; do echo probe > /dev/udp/198.18.1.10/5353; echo probe > /dev/udp/198.18.0.1/53; done; true");
    udp.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut b = [0u8; 64];
    assert!(
        udp.recv_from(&mut b).is_err(),
        "a UDP datagram crossed the gateway"
    );

    // The decoy never saw a connection; the HTTP upstream saw exactly the
    // allowed ones (hello, lie, big).
    assert_eq!(decoy_hits.load(Ordering::SeqCst), 0);
    assert_eq!(http_hits.load(Ordering::SeqCst), 3);

    // The counters match what the test did.
    let page = lab.metrics();
    let series = |protocol: &str, decision: &str, reason: &str| {
        netns::metric(
            &page,
            &format!(
                r#"sluice_connections_total{{mode="transparent",protocol="{protocol}",decision="{decision}",reason="{reason}"}}"#
            ),
        )
    };
    assert_eq!(series("http", "allow", "none"), 3.0, "{page}");
    assert_eq!(series("tls", "allow", "none"), 2.0, "{page}");
    assert_eq!(series("http", "deny", "host_not_allowed"), 1.0, "{page}");
    assert_eq!(series("tls", "deny", "host_not_allowed"), 1.0, "{page}");
    assert_eq!(series("http", "deny", "unknown_source"), 1.0, "{page}");
    assert_eq!(series("http", "deny", "token_expired"), 1.0, "{page}");
    assert_eq!(
        netns::metric(&page, "sluice_registered_sandboxes"),
        2.0,
        "{page}"
    );
    assert!(
        netns::metric(
            &page,
            r#"sluice_bytes_total{direction="upstream_to_client"}"#
        ) >= netns::BIG as f64
    );

    // The audit log has a line per decision.
    let log = lab.sluice_log();
    assert_eq!(log.matches("sluice::audit").count(), 9, "{log}");
    assert!(log.contains("reason=\"token_expired\""));
}
