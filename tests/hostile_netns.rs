//! Round 2's surfaces probed as an attacker would, on the real path: a
//! sandbox namespace whose TCP and DNS the project's rules REDIRECT to
//! `sluice serve`, and behind the gateway a shared frontend that serves
//! every name on one address (as CDNs and load balancers do) and logs
//! every byte it receives. Each class is closed at its mechanism:
//!
//! - a remembered DNS answer on an explicit-port entry does not turn a
//!   connection whose client speaks TLS or HTTP into a raw relay;
//! - an allowed name is allowed whatever the DNS door answered for the
//!   address dialled;
//! - the gateway's own addresses, even inside `allow_destinations`, are
//!   never destinations (also one added after start).
//!
//! Without root (or the tools) it skips with a reason; with `CI=true` a
//! skip is a failure.

#![allow(clippy::unwrap_used)]

mod netns;
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netns::{Lab, from_sandbox, read_for, require_root_and};

const FRONTEND: &str = "198.18.1.10";

/// Everything the frontend received on one port, connection by connection.
type Log = Arc<Mutex<Vec<u8>>>;

/// A listener that logs every byte it receives and answers each HTTP head
/// with `200` naming the host; anything else (TLS) is only logged.
fn serve_logging(listener: TcpListener, log: Log) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                let mut seen = Vec::new();
                while let Ok(n) = s.read(&mut chunk) {
                    if n == 0 {
                        return;
                    }
                    log.lock().unwrap().extend_from_slice(&chunk[..n]);
                    seen.extend_from_slice(&chunk[..n]);
                    if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                        let host = head
                            .lines()
                            .find_map(|l| l.strip_prefix("host:"))
                            .unwrap_or("")
                            .trim()
                            .to_owned();
                        seen.drain(..end + 4);
                        let body = format!("frontend {host}\n");
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                    }
                }
            });
        }
    });
}

/// An HTTP request for `host` sent to `to`, and what came back.
fn http_from_sandbox(lab: &Lab, to: &str, host: &str, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    from_sandbox(lab, to, move |mut s| {
        s.write_all(request.as_bytes()).unwrap();
        String::from_utf8_lossy(&read_for(&mut s, Duration::from_secs(3))).into_owned()
    })
}

/// `dig` in the sandbox, through the gateway's DNS door: the addresses.
fn dig(lab: &Lab, name: &str) -> String {
    let r = lab.run_in(
        &lab.sb,
        &[],
        &["dig", "+short", "+time=3", "+tries=1", "@198.18.0.1", name],
    );
    assert_eq!(r.code, 0, "{r:?}");
    r.stdout.trim().to_owned()
}

fn contains(log: &Log, needle: &[u8]) -> bool {
    log.lock()
        .unwrap()
        .windows(needle.len())
        .any(|w| w == needle)
}

#[test]
fn answered_names_open_no_raw_path_and_refuse_no_allowed_name() {
    if !require_root_and(
        "answered_names_open_no_raw_path_and_refuse_no_allowed_name",
        &["dig"],
    ) {
        return;
    }
    let mut lab = Lab::with_rules("ha", "--dns-port 15053");
    let (web, tls): (Log, Log) = (Arc::default(), Arc::default());
    serve_logging(
        lab.listen_upstream(&format!("{FRONTEND}:80")),
        Arc::clone(&web),
    );
    serve_logging(
        lab.listen_upstream(&format!("{FRONTEND}:443")),
        Arc::clone(&tls),
    );
    let names = [
        "api.test",
        "web.test",
        "forbidden.test",
        "api.example.test",
        "cdn-a.test",
        "cdn-b.test",
    ];
    let resolve: String = names
        .iter()
        .map(|n| format!("\"{n}\" = [\"{FRONTEND}\"]\n"))
        .collect();
    lab.start_sluice(&format!(
        "[dns]\nlisten = \"0.0.0.0:15053\"\nupstream = [\"127.0.0.1:9\"]\n[gateway.resolve]\n{resolve}"
    ));
    // Explicit ports, as people write them to be explicit.
    let token = lab.mint(
        "sb-h",
        &["api.test:443", "web.test:80", "cdn-a.test", "cdn-b.test"],
        600,
    );
    lab.register(&token, "198.18.0.2");
    assert_eq!(dig(&lab, "api.test"), FRONTEND);
    assert_eq!(dig(&lab, "web.test"), FRONTEND);

    // A ClientHello for another name, to the address answered for an
    // explicit-port entry: judged by its SNI, refused with an alert, and
    // the frontend receives nothing.
    let hello = support::capture("clienthello-curl.bin"); // SNI api.example.test
    let got = from_sandbox(&lab, &format!("{FRONTEND}:443"), move |mut s| {
        s.write_all(&hello).unwrap();
        read_for(&mut s, Duration::from_secs(3))
    });
    assert_eq!(
        got,
        [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49],
        "access_denied"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(tls.lock().unwrap().is_empty(), "the frontend saw TLS bytes");
    // HTTP naming another host, on the explicit-port entry for port 80.
    let got = http_from_sandbox(
        &lab,
        &format!("{FRONTEND}:80"),
        "forbidden.test",
        "/fronted",
    );
    assert!(got.contains("x-deny-reason: host_not_allowed"), "{got}");
    assert!(!contains(&web, b"/fronted"), "the frontend saw the request");
    // The entry's own name still works, client first, on the same path.
    let got = http_from_sandbox(&lab, &format!("{FRONTEND}:80"), "web.test", "/mine");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("frontend web.test"), "{got}");
    // A client that sends nothing for a while and then a request for
    // another host is judged all the same (no raw relay on a timer).
    let got = from_sandbox(&lab, &format!("{FRONTEND}:80"), |mut s| {
        std::thread::sleep(Duration::from_millis(1500));
        s.write_all(b"GET /late HTTP/1.1\r\nHost: forbidden.test\r\n\r\n")
            .unwrap();
        String::from_utf8_lossy(&read_for(&mut s, Duration::from_secs(3))).into_owned()
    });
    assert!(got.contains("x-deny-reason: host_not_allowed"), "{got}");
    assert!(
        !contains(&web, b"/late"),
        "the frontend saw the late request"
    );

    // A shared address answered for one allowed name serves another
    // allowed name that was never answered: the gateway dials its own
    // resolution, so the DNS door's answers refuse nothing.
    assert_eq!(dig(&lab, "cdn-a.test"), FRONTEND);
    let got = http_from_sandbox(&lab, &format!("{FRONTEND}:80"), "cdn-b.test", "/b");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("frontend cdn-b.test"), "{got}");
}

/// A service on the gateway's own host, on every address: counts the
/// connections it is ever opened.
fn serve_counting(listener: TcpListener, count: Arc<AtomicUsize>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if conn.is_ok() {
                count.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
}

#[test]
fn the_gateways_own_addresses_are_never_destinations() {
    if !require_root_and(
        "the_gateways_own_addresses_are_never_destinations",
        &["dig"],
    ) {
        return;
    }
    let mut lab = Lab::with_rules("hl", "--dns-port 15053");
    let web: Log = Arc::default();
    serve_logging(
        lab.listen_upstream(&format!("{FRONTEND}:80")),
        Arc::clone(&web),
    );
    // Something on the node that a sandbox must never reach (a kubelet,
    // an exporter, the fleet's Redis), on every address of the gateway.
    let node_hits = Arc::new(AtomicUsize::new(0));
    let node = Lab::in_ns(&lab.gw, || TcpListener::bind("0.0.0.0:8080").unwrap());
    serve_counting(node, Arc::clone(&node_hits));
    // Every address here is inside allow_destinations (198.18.0.0/15).
    lab.start_sluice(&format!(
        "[dns]\nlisten = \"0.0.0.0:15053\"\nupstream = [\"127.0.0.1:9\"]\n[gateway.resolve]\n\
         \"site.test\" = [\"{FRONTEND}\"]\n\"node.test\" = [\"198.18.1.1\"]\n\
         \"node0.test\" = [\"198.18.0.1\"]\n\"late.test\" = [\"198.18.1.99\"]\n"
    ));
    let token = lab.mint(
        "sb-l",
        &[
            "site.test",
            "node.test:8080",
            "node0.test:8080",
            "late.test:8080",
        ],
        600,
    );
    lab.register(&token, "198.18.0.2");
    let got = http_from_sandbox(&lab, &format!("{FRONTEND}:80"), "site.test", "/");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");

    for name in ["node.test", "node0.test"] {
        // Not answered by the DNS door...
        assert_eq!(dig(&lab, name), "", "{name} answered");
        // ... and not dialled.
        let got = http_from_sandbox(&lab, &format!("{FRONTEND}:8080"), name, "/");
        assert!(
            got.contains("x-deny-reason: private_destination"),
            "{name}: {got}"
        );
    }
    // An address the gateway gains after start is refused too, once the
    // change is seen (netlink; a few seconds at most).
    let gu = format!("sl{}gu", lab.id);
    let r = lab.run_in(
        &lab.gw.clone(),
        &[],
        &["ip", "addr", "add", "198.18.1.99/24", "dev", &gu],
    );
    assert_eq!(r.code, 0, "{r:?}");
    std::thread::sleep(Duration::from_millis(1000));
    let got = http_from_sandbox(&lab, &format!("{FRONTEND}:8080"), "late.test", "/");
    assert!(got.contains("x-deny-reason: private_destination"), "{got}");
    assert_eq!(dig(&lab, "late.test"), "");
    assert_eq!(
        node_hits.load(Ordering::SeqCst),
        0,
        "the node's service was reached"
    );
}

/// The DNS door's TCP from a hostile client: connections capped per
/// source, a client that sends without reading is closed (no send queue
/// growing for ever), another sandbox is answered meanwhile, and the DNS
/// port is not reachable from a network that is not the sandboxes'. And
/// QUIC is rejected at once whether the gateway forwards IPv4 or not.
#[test]
fn dns_over_tcp_and_quic_from_a_hostile_sandbox() {
    if !require_root_and(
        "dns_over_tcp_and_quic_from_a_hostile_sandbox",
        &["dig", "python3", "ss"],
    ) {
        return;
    }
    let mut lab = Lab::with_rules("hd", "--dns-port 15053");
    lab.start_sluice(&format!(
        "[dns]\nlisten = \"0.0.0.0:15053\"\nupstream = [\"127.0.0.1:9\"]\n[gateway.resolve]\n\"api.test\" = [\"{FRONTEND}\"]\n"
    ));
    let token = lab.mint("sb-d", &["api.test"], 600);
    lab.register(&token, "198.18.0.2");
    let calm = lab.mint("sb-calm", &["api.test"], 600);
    lab.register(&calm, "198.18.0.3");
    // 20 connections from one sandbox, each sending 1,200 queries and
    // reading nothing, held open by the client for 6 s.
    let flood = r#"
import socket, struct, time
q = struct.pack('>HHHHHH', 1, 0x0100, 1, 0, 0, 0) + b'\x03api\x04test\x00' + struct.pack('>HH', 1, 1)
framed = struct.pack('>H', len(q)) + q
conns = []
for i in range(20):
    s = socket.create_connection(('198.18.0.1', 53), timeout=3)
    s.setblocking(False)
    conns.append(s)
for s in conns:
    try:
        s.send(framed * 1200)
    except OSError:
        pass
time.sleep(6)
print('held', len(conns))
"#;
    let sb = lab.sb.clone();
    let holder = {
        let lab_sb = sb.clone();
        std::thread::spawn(move || {
            let mut cmd = std::process::Command::new("nsenter");
            cmd.arg(format!("--net=/run/netns/{lab_sb}"))
                .args(["timeout", "30", "python3", "-c", flood]);
            cmd.output().unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    // The other sandbox, over TCP, meanwhile.
    let r = lab.run_in(
        &sb,
        &[],
        &[
            "dig",
            "+tcp",
            "+short",
            "+time=3",
            "+tries=1",
            "-b",
            "198.18.0.3",
            "@198.18.0.1",
            "api.test",
        ],
    );
    assert_eq!(r.stdout.trim(), FRONTEND, "{r:?}");
    // While the flood's client still holds its sockets, the gateway holds
    // none of them open.
    std::thread::sleep(Duration::from_millis(2500));
    let ss = lab.run_in(
        &lab.gw.clone(),
        &[],
        &["ss", "-Htn", "state", "established", "( sport = :15053 )"],
    );
    assert_eq!(ss.stdout.trim(), "", "DNS connections still open: {ss:?}");
    let out = holder.join().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("held 20"),
        "{out:?}"
    );

    // The DNS port from the upstream network: dropped.
    let direct = Lab::in_ns(&lab.up, || {
        TcpStream::connect_timeout(&"198.18.1.1:15053".parse().unwrap(), Duration::from_secs(1))
    });
    assert!(direct.is_err(), "{direct:?}");

    // QUIC: ICMP port unreachable at once, forwarding on and off.
    let quic = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.connect(('{FRONTEND}', 443))\n\
         s.settimeout(2)\ns.send(b'x')\ntry:\n    s.recv(16)\n    print('answered')\nexcept ConnectionRefusedError:\n    print('rejected')\nexcept socket.timeout:\n    print('silent')\n"
    );
    for forward in ["1", "0"] {
        let r = lab.run_in(
            &lab.gw.clone(),
            &[],
            &["sysctl", "-qw", &format!("net.ipv4.ip_forward={forward}")],
        );
        assert_eq!(r.code, 0, "{r:?}");
        let r = lab.run_in(&sb, &[], &["python3", "-c", &quic]);
        assert_eq!(r.stdout.trim(), "rejected", "ip_forward={forward}: {r:?}");
    }
}
