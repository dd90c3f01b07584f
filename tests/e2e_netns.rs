//! End to end on a real network path, as root: a sandbox namespace whose
//! TCP is REDIRECTed by `sluice rules` to `sluice serve` in a
//! gateway namespace, and an upstream namespace with an HTTP server, a TLS
//! server (`openssl s_server`, self-signed) and a decoy that must never see
//! a connection. Clients are real `curl`s. Everything the test creates is
//! removed by a guard on drop, pass or fail.
//!
//! Without root (or the tools) it skips with a reason; with `CI=true` a
//! skip is a failure.

#![allow(clippy::unwrap_used)]

mod netns;
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use netns::{Lab, pattern_sha256, require_root};

/// Serves HTTP/1.1 (kept alive) on a listener: `/big` is 100 MB of a known
/// pattern (then close), anything else names the server's address.
/// Counts connections.
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
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    if path == "/big" {
                        let body = netns::pattern(netns::BIG);
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = s.write_all(&body);
                        return;
                    }
                    let body = format!("hello from {local} {path}\n");
                    if write!(
                        s,
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .is_err()
                    {
                        return;
                    }
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

const UP: &str = "198.18.1.10";
const DECOY: &str = "198.18.1.11";

/// A lab with the upstreams every test uses (HTTP on UP:80, TLS for
/// secure.test on UP:443, a decoy on DECOY:80 and :443) and sluice
/// resolving api.test and secure.test to UP, other.test to DECOY.
/// Returns the lab and the HTTP and decoy connection counters.
fn lab_with_upstreams(tag: &str, rules: &str) -> (Lab, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let mut lab = Lab::with_rules(tag, rules);
    let http_hits = Arc::new(AtomicUsize::new(0));
    let decoy_hits = Arc::new(AtomicUsize::new(0));
    serve_http(
        lab.listen_upstream(&format!("{UP}:80")),
        Arc::clone(&http_hits),
    );
    for port in [80, 443] {
        serve_decoy(
            lab.listen_upstream(&format!("{DECOY}:{port}")),
            Arc::clone(&decoy_hits),
        );
    }
    lab.start_tls_server(UP, "secure.test");
    lab.start_sluice(&format!(
        "[gateway.resolve]\n\"api.test\" = [\"{UP}\"]\n\"secure.test\" = [\"{UP}\"]\n\"other.test\" = [\"{DECOY}\"]\n"
    ));
    (lab, http_hits, decoy_hits)
}

#[test]
fn transparent_gateway_end_to_end() {
    if !require_root("transparent_gateway_end_to_end") {
        return;
    }
    let (lab, http_hits, decoy_hits) = lab_with_upstreams("t", "");
    let (up, decoy) = (UP, DECOY);
    let udp: UdpSocket = lab.udp_upstream(&format!("{up}:5353"));
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
        support::metric(
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
        support::metric(&page, "sluice_registered_sandboxes"),
        2.0,
        "{page}"
    );
    assert!(
        support::metric(
            &page,
            r#"sluice_bytes_total{direction="upstream_to_client"}"#
        ) >= netns::BIG as f64
    );

    // The audit log has a line per decision.
    let log = lab.sluice_log();
    assert_eq!(log.matches("sluice::audit").count(), 9, "{log}");
    assert!(log.contains("reason=\"token_expired\""));
}

/// Python's urllib through HTTP_PROXY / HTTPS_PROXY: an HTTP GET and an
/// HTTPS GET (CONNECT). Prints the status and the body, or the error.
const URLLIB: &str = r#"
import ssl, sys, urllib.request, urllib.error
for url in sys.argv[1:]:
    try:
        with urllib.request.urlopen(url, timeout=20, context=ssl._create_unverified_context()) as r:
            print(url, r.status, r.read().decode(errors="replace").replace("\n", " ")[:200])
    except urllib.error.HTTPError as e:
        print(url, e.code, e.headers.get("x-deny-reason"))
    except Exception as e:
        print(url, "error", e)
"#;

#[test]
fn explicit_proxy_end_to_end() {
    if !require_root("explicit_proxy_end_to_end") {
        return;
    }
    let (lab, http_hits, decoy_hits) = lab_with_upstreams("p", "--proxy-port 8443");
    let up = UP;
    let token_a = lab.mint("sandbox-a", &["api.test", "secure.test"], 600);
    let expired = lab.mint("sandbox-e", &["api.test"], 1);
    std::thread::sleep(Duration::from_millis(2100));

    // The environment exactly as the original design sets it.
    let proxy_url =
        |id: &str, token: &str| format!("http://container_{id}:jwt_{token}@198.18.0.1:8443");
    let env_for = |url: &str| -> Vec<(String, String)> {
        vec![
            ("HTTP_PROXY".into(), url.to_owned()),
            ("HTTPS_PROXY".into(), url.to_owned()),
            ("http_proxy".into(), url.to_owned()),
            ("https_proxy".into(), url.to_owned()),
            ("NO_PROXY".into(), "localhost,127.0.0.1".into()),
            ("no_proxy".into(), "localhost,127.0.0.1".into()),
        ]
    };
    let run = |env: &[(String, String)], args: &[&str]| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        lab.run_in(&lab.sb, &env, args)
    };
    let good = env_for(&proxy_url("sandbox-a", &token_a));

    // curl: allowed HTTP (absolute-form) and HTTPS (CONNECT).
    let r = run(
        &good,
        &[
            "curl",
            "-sS",
            "-i",
            "--max-time",
            "30",
            "http://api.test/hello",
        ],
    );
    assert!(r.stdout.starts_with("HTTP/1.1 200"), "{r:?}");
    assert!(
        r.stdout.contains(&format!("hello from {up} /hello")),
        "{r:?}"
    );
    let r = run(
        &good,
        &[
            "curl",
            "-sS",
            "-k",
            "--max-time",
            "30",
            "https://secure.test/",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("s_server"), "{r:?}");

    // A disallowed host: 403 host_not_allowed, over HTTP and over CONNECT.
    let r = run(
        &good,
        &[
            "curl",
            "-sS",
            "-i",
            "--max-time",
            "30",
            "http://other.test/",
        ],
    );
    assert!(r.stdout.starts_with("HTTP/1.1 403"), "{r:?}");
    assert!(
        r.stdout.contains("x-deny-reason: host_not_allowed"),
        "{r:?}"
    );
    let r = run(
        &good,
        &[
            "curl",
            "-sS",
            "-k",
            "-v",
            "--max-time",
            "30",
            "https://other.test/",
        ],
    );
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("403"), "{r:?}");

    // A kept-alive connection: the first request is served, the second,
    // to a disallowed host on the same connection, is denied.
    let r = run(
        &good,
        &[
            "curl",
            "-sS",
            "-i",
            "-v",
            "--max-time",
            "30",
            "http://api.test/first",
            "http://other.test/second",
        ],
    );
    assert!(
        r.stdout.contains(&format!("hello from {up} /first")),
        "{r:?}"
    );
    assert!(
        r.stdout.contains("x-deny-reason: host_not_allowed"),
        "{r:?}"
    );
    assert!(
        r.stderr.contains("existing connection"),
        "curl did not reuse the connection: {r:?}"
    );

    // Credentials: another container's name, none, an expired token.
    let r = run(
        &env_for(&proxy_url("sandbox-b", &token_a)),
        &["curl", "-sS", "-i", "--max-time", "30", "http://api.test/"],
    );
    assert!(r.stdout.starts_with("HTTP/1.1 407"), "{r:?}");
    assert!(
        r.stdout.contains("x-deny-reason: container_mismatch"),
        "{r:?}"
    );
    let r = run(
        &env_for("http://198.18.0.1:8443"),
        &["curl", "-sS", "-i", "--max-time", "30", "http://api.test/"],
    );
    assert!(r.stdout.starts_with("HTTP/1.1 407"), "{r:?}");
    assert!(
        r.stdout
            .contains("Proxy-Authenticate: Basic realm=\"sluice\""),
        "{r:?}"
    );
    let r = run(
        &env_for(&proxy_url("sandbox-e", &expired)),
        &["curl", "-sS", "-i", "--max-time", "30", "http://api.test/"],
    );
    assert!(r.stdout.starts_with("HTTP/1.1 407"), "{r:?}");
    assert!(r.stdout.contains("x-deny-reason: token_expired"), "{r:?}");

    // Python's urllib, a stock client that honours the same variables.
    let r = run(
        &good,
        &[
            "python3",
            "-c",
            URLLIB,
            "http://api.test/py",
            "https://secure.test/",
            "http://other.test/py",
        ],
    );
    assert!(
        r.stdout
            .contains(&format!("http://api.test/py 200 hello from {up} /py")),
        "{r:?}"
    );
    assert!(r.stdout.contains("https://secure.test/ 200"), "{r:?}");
    assert!(
        r.stdout
            .contains("http://other.test/py 403 host_not_allowed"),
        "{r:?}"
    );
    let r = run(
        &env_for(&proxy_url("sandbox-e", &expired)),
        &["python3", "-c", URLLIB, "http://api.test/py"],
    );
    assert!(
        r.stdout.contains("http://api.test/py 407 token_expired"),
        "{r:?}"
    );

    // Nothing reached the decoy; the HTTP upstream saw hello, first and py.
    assert_eq!(decoy_hits.load(Ordering::SeqCst), 0);
    assert_eq!(http_hits.load(Ordering::SeqCst), 3);

    let page = lab.metrics();
    let series = |protocol: &str, decision: &str, reason: &str| {
        support::metric(
            &page,
            &format!(
                r#"sluice_connections_total{{mode="proxy",protocol="{protocol}",decision="{decision}",reason="{reason}"}}"#
            ),
        )
    };
    assert_eq!(series("http", "allow", "none"), 3.0, "{page}");
    assert_eq!(series("connect", "allow", "none"), 2.0, "{page}");
    assert_eq!(series("http", "deny", "host_not_allowed"), 3.0, "{page}");
    assert_eq!(series("connect", "deny", "host_not_allowed"), 1.0, "{page}");
    assert_eq!(series("http", "deny", "container_mismatch"), 1.0, "{page}");
    assert_eq!(series("http", "deny", "token_expired"), 2.0, "{page}");
    assert_eq!(series("http", "deny", "token_invalid"), 1.0, "{page}");
    assert!(lab.sluice_log().contains("mode=\"proxy\""));
}
