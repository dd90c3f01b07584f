//! Identity by source address on a bridge that several sandboxes share (the
//! Kubernetes layout): a sandbox that claims its neighbour's address, and
//! answers ARP for it, must not become that neighbour. As root, with two
//! sandbox namespaces on one bridge in the gateway namespace, the project's
//! rules with `--bind IP=MAC`, and `sluice serve`.
//!
//! Without root (or the tools) it skips with a reason; with `CI=true` a
//! skip is a failure.

#![allow(clippy::unwrap_used)]

mod netns;
mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use netns::{Lab, MAC_A, MAC_B};

const UP: &str = "198.18.1.10";

/// `200 hello` to every request.
fn serve_http(listener: TcpListener) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nhello\n",
                );
            });
        }
    });
}

/// From namespace `ns`, on interface `dev`: ARP claiming that `ip` is at
/// `mac`, both as a gratuitous reply and as a request to the gateway (which
/// Linux learns its neighbour entry from), a few times.
fn arp_takeover(lab: &Lab, ns: &str, dev: &str, ip: &str, mac: &str) {
    let script = format!(
        r#"
import socket, struct, time
mac = bytes.fromhex("{mac}".replace(":", ""))
ip = socket.inet_aton("{ip}")
gw = socket.inet_aton("198.18.0.1")
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("{dev}", 0))
arp = lambda op, tha, tpa: struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac + ip + tha + tpa
for _ in range(5):
    s.send(b"\xff" * 6 + mac + b"\x08\x06" + arp(2, b"\xff" * 6, ip))
    s.send(b"\xff" * 6 + mac + b"\x08\x06" + arp(1, b"\x00" * 6, gw))
    time.sleep(0.05)
"#
    );
    let r = lab.run_in(ns, &[], &["python3", "-c", &script]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn a_neighbour_on_the_bridge_cannot_become_another_sandbox() {
    if !netns::require_root_and(
        "a_neighbour_on_the_bridge_cannot_become_another_sandbox",
        &["arping", "ping", "bridge"],
    ) {
        return;
    }
    let mut lab = Lab::bridged("l2");
    let br = lab.gw_if.clone();
    let s2 = lab.extra_ns[0].clone();
    let dev_b = format!("sl{}eb", lab.id);

    // A bridge with no bindings: refused, unless the operator states that
    // the network below prevents spoofing.
    let r = lab.rules(&format!("apply --iface {br} --proxy-port 8443"));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("no --bind IP=MAC"), "{r:?}");
    let r = lab.rules("apply --subnet 198.18.0.0/24");
    assert_eq!(r.code, 2, "{r:?}");
    let r = lab.rules(&format!("status --iface {br}"));
    assert!(
        r.code == 1 && r.stdout.starts_with("not applied"),
        "nothing was applied: {r:?}"
    );

    let binds = format!("--bind 198.18.0.2={MAC_A} --bind 198.18.0.3={MAC_B}");
    for _ in 0..2 {
        let r = lab.rules(&format!("apply --iface {br} {binds}"));
        assert_eq!(r.code, 0, "{r:?}");
    }
    let status = lab.rules(&format!("status --iface {br}"));
    // Applied twice, one set: one RETURN per binding, then the DROP.
    assert_eq!(
        status.stdout.matches("--mac-source").count(),
        2,
        "{status:?}"
    );
    assert_eq!(
        status
            .stdout
            .matches(&format!("-s 198.18.0.2/32 -m mac --mac-source {MAC_A}"))
            .count(),
        1,
        "{status:?}"
    );

    // Sandbox ports cannot reach each other at L2: A's frames to B (its
    // ARP for B, then anything) never arrive, and A's ARP claiming the
    // gateway's address does not reach B's neighbour table.
    let r = lab.run_in(
        &lab.sb.clone(),
        &[],
        &["ping", "-c", "2", "-W", "1", "198.18.0.3"],
    );
    assert!(
        r.code != 0 && r.stdout.contains("100% packet loss"),
        "a sandbox reached its neighbour: {r:?}"
    );
    let r = lab.run_in(
        &s2.clone(),
        &[],
        &["ping", "-c", "1", "-W", "1", "198.18.0.1"],
    );
    let _ = r; // ICMP to the gateway is dropped; the ARP it made is what counts.
    let dev_a = format!("sl{}ea", lab.id);
    let r = lab.run_in(
        &lab.sb.clone(),
        &[],
        &[
            "arping",
            "-c",
            "2",
            "-U",
            "-s",
            "198.18.0.1",
            "-I",
            &dev_a,
            "198.18.0.1",
        ],
    );
    let _ = r;
    let neigh = lab.run_in(&s2.clone(), &[], &["ip", "neigh", "show", "198.18.0.1"]);
    assert!(
        !neigh.stdout.to_ascii_lowercase().contains(MAC_A),
        "the neighbour took the gateway's address: {neigh:?}"
    );

    serve_http(lab.listen_upstream(&format!("{UP}:80")));
    lab.start_sluice(&format!(
        "[gateway.resolve]\n\"allowed.test\" = [\"{UP}\"]\n"
    ));
    let a = lab.mint("sb-a", &["allowed.test"], 600);
    let b = lab.mint("sb-b", &["elsewhere.test"], 600);
    lab.register(&a, "198.18.0.2");
    lab.register(&b, "198.18.0.3");

    fn curl(lab: &Lab, ns: &str, extra: &[&str]) -> netns::CurlOut {
        // The sandboxes have no resolver here: the name is given its
        // address (which does not matter: sluice dials its own resolution).
        let mut args = vec![
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "4",
            "--resolve",
            "allowed.test:80:198.18.1.10",
        ];
        args.extend_from_slice(extra);
        args.push("http://allowed.test/");
        lab.curl_in(ns, &args)
    }
    assert_eq!(
        curl(&lab, &lab.sb.clone(), &[]).stdout,
        "200",
        "A is allowed"
    );
    assert_eq!(curl(&lab, &s2, &[]).stdout, "403", "B is not");

    // B takes A's address and answers ARP for it.
    let r = lab.run_in(
        &s2,
        &[],
        &["ip", "addr", "add", "198.18.0.2/32", "dev", &dev_b],
    );
    assert_eq!(r.code, 0, "{r:?}");
    arp_takeover(&lab, &s2, &dev_b, "198.18.0.2", MAC_B);
    let neigh = lab.run_in(&lab.gw.clone(), &[], &["ip", "neigh", "show", "198.18.0.2"]);
    assert!(
        !neigh.stdout.contains(MAC_B),
        "the gateway learnt B's MAC for A's address: {neigh:?}"
    );
    let r = curl(&lab, &s2, &["--interface", "198.18.0.2"]);
    assert_ne!(r.stdout, "200", "B reached A's allowlist: {r:?}");
    // A still works.
    assert_eq!(curl(&lab, &lab.sb.clone(), &[]).stdout, "200");

    // Registration supplies the binding: with --bind-dynamic and
    // gateway.l2_bind_iface, nothing passes until sluice binds an address
    // at registration, and the binding goes with the registration.
    lab.kill_sluice();
    let r = lab.rules(&format!("apply --iface {br} --bind-dynamic"));
    assert_eq!(r.code, 0, "{r:?}");
    let _ = lab.run_in(
        &s2,
        &[],
        &["ip", "addr", "del", "198.18.0.2/32", "dev", &dev_b],
    );
    let _ = lab.run_in(&lab.gw.clone(), &[], &["ip", "neigh", "flush", "dev", &br]);
    std::fs::remove_dir_all(lab.dir.path().join("state")).unwrap();
    lab.start_sluice_with(
        &format!("l2_bind_iface = \"{br}\"\n"),
        &format!("[gateway.resolve]\n\"allowed.test\" = [\"{UP}\"]\n"),
    );
    let a = lab.mint("sb-a", &["allowed.test"], 600);
    assert_ne!(
        curl(&lab, &lab.sb.clone(), &[]).stdout,
        "200",
        "unbound: nothing passes"
    );
    let (code, body) = lab.admin_status(
        "POST",
        "/v1/sandboxes",
        &serde_json::json!({"source_ip": "198.18.0.2", "token": a}),
    );
    assert_eq!(
        (code, body["error"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    let (code, body) = lab.admin_status(
        "POST",
        "/v1/sandboxes",
        &serde_json::json!({"source_ip": "198.18.0.2", "token": a, "mac": MAC_A}),
    );
    assert_eq!(code, 201, "{body}");
    assert_eq!(
        curl(&lab, &lab.sb.clone(), &[]).stdout,
        "200",
        "bound at registration"
    );
    let status = lab.rules(&format!("status --iface {br}"));
    assert!(status.stdout.contains(MAC_A), "{status:?}");
    let (code, _) = lab.admin_status("DELETE", "/v1/sandboxes/sb-a", &serde_json::json!(null));
    assert_eq!(code, 204);
    let status = lab.rules(&format!("status --iface {br}"));
    assert!(
        !status.stdout.contains(MAC_A),
        "unbound with the registration: {status:?}"
    );

    // The control: the same takeover with --l2-trusted (no bindings)
    // succeeds, so the refusal above is the bindings' doing.
    lab.kill_sluice();
    let r = lab.rules(&format!("apply --iface {br} --l2-trusted"));
    assert_eq!(r.code, 0, "{r:?}");
    std::fs::remove_dir_all(lab.dir.path().join("state")).unwrap();
    lab.start_sluice(&format!(
        "[gateway.resolve]\n\"allowed.test\" = [\"{UP}\"]\n"
    ));
    let a = lab.mint("sb-a", &["allowed.test"], 600);
    lab.register(&a, "198.18.0.2");
    let r = lab.run_in(
        &s2,
        &[],
        &["ip", "addr", "add", "198.18.0.2/32", "dev", &dev_b],
    );
    assert_eq!(r.code, 0, "{r:?}");
    arp_takeover(&lab, &s2, &dev_b, "198.18.0.2", MAC_B);
    std::thread::sleep(Duration::from_millis(200));
    let r = curl(&lab, &s2, &["--interface", "198.18.0.2"]);
    assert_eq!(
        r.stdout, "200",
        "without bindings the takeover works: {r:?}"
    );
}
