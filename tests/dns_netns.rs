//! DNS for sandboxes on the real path, as root: the sandbox's only
//! configuration is a resolv.conf naming its gateway (no `--resolve`, no
//! hosts entries); the rules REDIRECT its port 53 to sluice's DNS door; an
//! upstream namespace runs a real resolver (dnsmasq, logging every query)
//! and the servers. Real programs resolve by name and work: curl over HTTP
//! and HTTPS, Python's urllib, `pip download` from a PEP 503 index, `git
//! clone` over HTTP, a server-first protocol on an allowlisted
//! `host:port`. A name the sandbox may not reach is NXDOMAIN and never
//! reaches the resolver; an unknown source is REFUSED; DNS over TCP works;
//! QUIC is refused at once.
//!
//! Without root (or the tools) it skips with a reason; with `CI=true` a
//! skip is a failure.

#![allow(clippy::unwrap_used)]

mod netns;
mod support;

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use netns::{Lab, require_root_and};

const WEB: &str = "198.18.1.10";
const DB: &str = "198.18.1.11";

/// A PEP 503 index with one pure wheel ([`support::pep503_index`]), and a
/// git repository served over the dumb HTTP protocol, under `root`.
fn make_site(root: &Path) {
    support::pep503_index(root);
    std::fs::write(root.join("index.html"), "hello by name\n").unwrap();
    let work = root.join("work");
    let bare = root.join("repo.git");
    let sh = format!(
        "set -e
         git init -q -b main {w}
         cd {w} && echo 'cloned by name' > README && git add README
         git -c user.name=t -c user.email=t@t.test commit -q -m first
         git clone -q --bare {w} {b}
         cd {b} && git update-server-info",
        w = work.display(),
        b = bare.display()
    );
    let out = Command::new("bash").args(["-c", &sh]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A server-first protocol: a banner on connect, counted.
fn serve_banner(listener: TcpListener, count: Arc<AtomicUsize>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            let _ = s.write_all(b"BANNER db.test ready\n");
        }
    });
}

#[test]
fn sandboxes_resolve_through_the_gateway() {
    if !require_root_and(
        "sandboxes_resolve_through_the_gateway",
        &["dnsmasq", "dig", "git", "python3"],
    ) {
        return;
    }
    let mut lab = Lab::with_rules("dn", "--proxy-port 8443 --dns-port 15053");
    let site = lab.dir.path().join("site");
    make_site(&site);
    let banners = Arc::new(AtomicUsize::new(0));
    serve_banner(
        lab.listen_upstream(&format!("{DB}:5432")),
        Arc::clone(&banners),
    );
    let up = lab.up.clone();
    lab.spawn(
        &up,
        &[
            "python3",
            "-m",
            "http.server",
            "--bind",
            WEB,
            "--directory",
            site.to_str().unwrap(),
            "80",
        ],
        None,
    );
    lab.start_tls_server(WEB, "allowed.test");
    let dns_log = lab.dir.path().join("dnsmasq.log");
    lab.spawn(
        &up,
        &[
            "dnsmasq",
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--pid-file=",
            "--bind-interfaces",
            &format!("--listen-address={WEB}"),
            "--port=53",
            "--log-queries",
            &format!("--log-facility={}", dns_log.display()),
            &format!("--host-record=allowed.test,{WEB}"),
            &format!("--host-record=pypi.test,{WEB}"),
            &format!("--host-record=git.test,{WEB}"),
            &format!("--host-record=db.test,{DB}"),
            &format!("--host-record=secret.test,{WEB}"),
            "--address=/secret.test/198.18.1.10",
        ],
        None,
    );
    lab.start_sluice(&format!(
        "[dns]\nlisten = \"0.0.0.0:15053\"\nupstream = [\"{WEB}:53\"]\nmax_ttl_s = 120\n"
    ));
    // Python's http.server and dnsmasq take a moment.
    for _ in 0..100 {
        let ready = std::fs::read_to_string(&dns_log).is_ok_and(|l| l.contains("started"));
        if ready {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let token = lab.mint(
        "sb-dns",
        &["allowed.test", "pypi.test", "git.test", "db.test:5432"],
        600,
    );
    lab.register(&token, "198.18.0.2");
    // The sandbox's only configuration: its resolver is the gateway.
    let sb = lab.sb.clone();
    lab.resolv_conf(&sb, "nameserver 198.18.0.1\n");
    let run = |args: &[&str]| lab.exec_in(&sb, &[], args);

    // Before anything was answered, a connection to an address that was
    // never answered reaches nothing (it carries no name).
    let r = run(&[
        "python3",
        "-c",
        &format!(
            "import socket; s = socket.create_connection(('{DB}', 5432), timeout=6); s.settimeout(6)\n\
             try:\n    print(repr(s.recv(64)))\nexcept Exception as e:\n    print(type(e).__name__)"
        ),
    ]);
    assert!(!r.stdout.contains("BANNER"), "{r:?}");
    assert_eq!(banners.load(Ordering::SeqCst), 0, "{r:?}");

    // curl over HTTP and HTTPS, by name.
    let r = run(&["curl", "-sS", "--max-time", "20", "http://allowed.test/"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "hello by name\n"), "{r:?}");
    let r = run(&[
        "curl",
        "-sSk",
        "--max-time",
        "20",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "https://allowed.test/",
    ]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "200"), "{r:?}");
    // Python's urllib.
    let r = run(&[
        "python3",
        "-c",
        "import urllib.request; print(urllib.request.urlopen('http://allowed.test/', timeout=20).read().decode(), end='')",
    ]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "hello by name\n"), "{r:?}");
    // pip, from a PEP 503 index, by name.
    let dest = lab.dir.path().join("pip-dest");
    let r = lab.exec_in(
        &sb,
        &[("PIP_CONFIG_FILE", "/dev/null"), ("PIP_NO_CACHE_DIR", "1")],
        &[
            "python3",
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "--no-deps",
            "--index-url",
            "http://pypi.test/simple/",
            "--trusted-host",
            "pypi.test",
            "-d",
            dest.to_str().unwrap(),
            "demo",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(dest.join("demo-1.0-py3-none-any.whl").exists(), "{r:?}");
    // git clone over HTTP, by name.
    let clone = lab.dir.path().join("clone");
    let r = run(&[
        "git",
        "clone",
        "-q",
        "http://git.test/repo.git",
        clone.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        std::fs::read_to_string(clone.join("README")).unwrap(),
        "cloned by name\n"
    );
    // A server-first protocol on an allowlisted host:port: known by the
    // name its address was answered for, allowed without client bytes.
    let r = run(&[
        "python3",
        "-c",
        "import socket; s = socket.create_connection(('db.test', 5432), timeout=10); s.settimeout(5); print(s.recv(64).decode(), end='')",
    ]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "BANNER db.test ready\n"),
        "{r:?}"
    );
    assert_eq!(banners.load(Ordering::SeqCst), 1);

    // A name it may not reach: NXDOMAIN, and neither it nor twenty random
    // subdomains of it ever reached the resolver.
    let dig = |args: &[&str]| {
        let mut full = vec!["dig", "+time=3", "+tries=1"];
        full.extend_from_slice(args);
        lab.run_in(&sb, &[], &full)
    };
    let r = dig(&["@198.18.0.1", "secret.test", "A"]);
    assert!(r.stdout.contains("status: NXDOMAIN"), "{r:?}");
    for i in 0..20 {
        let r = dig(&["@198.18.0.1", &format!("k{i}x9d2.secret.test"), "A"]);
        assert!(r.stdout.contains("status: NXDOMAIN"), "{r:?}");
    }
    let r = run(&["curl", "-sS", "--max-time", "10", "http://secret.test/"]);
    assert_ne!(r.code, 0, "{r:?}");
    std::thread::sleep(Duration::from_millis(300));
    let log = std::fs::read_to_string(&dns_log).unwrap();
    assert!(
        log.contains("allowed.test"),
        "the resolver logs queries: {log}"
    );
    assert!(
        !log.contains("secret.test"),
        "a refused name reached the resolver:\n{log}"
    );
    // An unknown source: REFUSED.
    let r = dig(&["@198.18.0.1", "-b", "198.18.0.3", "allowed.test", "A"]);
    assert!(r.stdout.contains("status: REFUSED"), "{r:?}");
    // DNS over TCP.
    let r = dig(&["@198.18.0.1", "+tcp", "+short", "allowed.test", "A"]);
    assert_eq!(r.stdout.trim(), WEB, "{r:?}");
    // QUIC: refused at once (ICMP port unreachable), so clients fall back.
    let started = Instant::now();
    let r = run(&[
        "python3",
        "-c",
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); s.connect(('198.18.1.10', 443)); s.send(b'quic')\n\
         try:\n    s.recv(16); print('answered')\nexcept ConnectionRefusedError:\n    print('refused')\nexcept socket.timeout:\n    print('timeout')",
    ]);
    assert_eq!(r.stdout.trim(), "refused", "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // The counters.
    let page = lab.metrics();
    let series = |qtype: &str, decision: &str, reason: &str| {
        support::metric(
            &page,
            &format!(
                r#"sluice_dns_queries_total{{qtype="{qtype}",decision="{decision}",reason="{reason}"}}"#
            ),
        )
    };
    assert!(series("A", "allow", "none") >= 5.0, "{page}");
    assert!(series("A", "deny", "host_not_allowed") >= 21.0, "{page}");
    assert_eq!(series("A", "deny", "unknown_source"), 1.0, "{page}");
    assert!(
        support::metric(&page, "sluice_dns_cache_hits_total") >= 1.0,
        "{page}"
    );
    assert!(
        support::metric(&page, "sluice_dns_cache_misses_total") >= 1.0,
        "{page}"
    );
}
