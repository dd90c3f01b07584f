//! Destinations a sandbox must never reach, whatever name it is allowed:
//! every resolved or literal address in a guarded range, in any IPv6 form
//! that embeds one, and sluice's own listeners.

#![allow(clippy::unwrap_used)]

mod support;

use support::*;

#[tokio::test]
async fn guarded_destinations_are_refused_cleanly() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let guarded: &[(&str, &str)] = &[
        ("rfc1918.test", "10.1.2.3"),
        ("rfc1918b.test", "172.16.0.9"),
        ("rfc1918c.test", "192.168.1.1"),
        ("metadata.test", "169.254.169.254"),
        ("alibaba.test", "100.100.100.200"),
        ("azure.test", "168.63.129.16"),
        ("aws6.test", "fd00:ec2::254"),
        ("mapped.test", "::ffff:10.0.0.1"),
        ("compat.test", "::10.0.0.1"),
        ("nat64.test", "64:ff9b::a00:1"),
        ("sixtofour.test", "2002:a00:1::1"),
        ("teredo.test", "2001:0:4136:e378::1"),
        ("unspecified.test", "0.0.0.0"),
        ("multicast.test", "224.0.0.1"),
        ("benchmark.test", "198.18.0.1"),
        ("documentation.test", "192.0.2.1"),
        ("linklocal6.test", "fe80::1"),
        ("loopback6.test", "::1"),
    ];
    let gw = start(up.addr, |c| {
        // Only the test upstream's loopback address is exempt.
        c.gateway.allow_destinations = vec!["127.0.0.1/32".parse().unwrap()];
        for (name, addr) in guarded {
            c.gateway.resolve.insert((*name).into(), vec![ip(addr)]);
        }
        c.gateway
            .resolve
            .insert("mixed.test".into(), vec![ip("127.0.0.1"), ip("10.0.0.1")]);
    })
    .await;
    let mut allowed: Vec<String> = guarded.iter().map(|(n, _)| format!("{n}:{port}")).collect();
    allowed.push(format!("mixed.test:{port}"));
    allowed.push(format!("169.254.169.254:{port}"));
    allowed.push(format!("[::ffff:127.0.0.2]:{port}"));
    let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
    gw.register("c1", "127.0.0.1", &allowed, 600).await;

    let mut cases: Vec<Case> = guarded
        .iter()
        .map(|(name, _)| Case {
            name,
            source: "127.0.0.1",
            send: format!("GET / HTTP/1.1\r\nHost: {name}\r\n\r\n").into_bytes(),
            refusal: Refusal::Http(403),
            protocol: "http",
            reason: "private_destination",
        })
        .collect();
    for (name, host) in [
        (
            "a name with one private address among public ones",
            "mixed.test",
        ),
        (
            "an allowed IP literal in the metadata range",
            "169.254.169.254",
        ),
        (
            "an allowed v4-mapped literal of a guarded address",
            "[::ffff:127.0.0.2]",
        ),
    ] {
        cases.push(Case {
            name,
            source: "127.0.0.1",
            send: format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes(),
            refusal: Refusal::Http(403),
            protocol: "http",
            reason: "private_destination",
        });
    }
    run_cases(&gw, &[&up], cases).await;
    the_gateways_own_addresses_are_refused_inside_allow_destinations().await;
    sluice_never_dials_its_own_listeners().await;
}

/// (Run after the table, not beside it: it counts the same series.)
async fn sluice_never_dials_its_own_listeners() {
    // The original destination is the gateway's own admin port; the name
    // resolves to loopback, which is exempt: the loop guard still refuses.
    let dir = tempfile::tempdir().unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = start_in(dir, admin, |c| {
        c.admin.listen = admin;
        c.gateway
            .resolve
            .insert("loop.test".into(), vec![ip("127.0.0.1")]);
    })
    .await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&format!("loop.test:{}", admin.port())],
        600,
    )
    .await;
    let answer = gw
        .request_from(
            "127.0.0.1",
            b"GET /healthz HTTP/1.1\r\nHost: loop.test\r\n\r\n",
        )
        .await;
    assert!(
        answer.contains("x-deny-reason: private_destination"),
        "{answer}"
    );
}

/// The gateway's own addresses are never destinations, whatever
/// `allow_destinations` exempts: with loopback exempt but
/// `allow_local_destinations` off (the default), a name that resolves to
/// any address of this host, or a literal one, is refused and the service
/// there never sees a connection. (Run after the table above, not beside
/// it: both count the same series.)
async fn the_gateways_own_addresses_are_refused_inside_allow_destinations() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let gw = start(up.addr, |c| {
        c.gateway.allow_destinations = vec!["127.0.0.0/8".parse().unwrap()];
        c.gateway.allow_local_destinations = false;
        c.gateway
            .resolve
            .insert("node.test".into(), vec![ip("127.0.0.1")]);
    })
    .await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&format!("node.test:{port}"), &format!("127.0.0.1:{port}")],
        600,
    )
    .await;
    let cases = ["node.test", "127.0.0.1"]
        .into_iter()
        .map(|host| Case {
            name: host,
            source: "127.0.0.1",
            send: format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes(),
            refusal: Refusal::Http(403),
            protocol: "http",
            reason: "private_destination",
        })
        .collect();
    run_cases(&gw, &[&up], cases).await;
    assert_eq!(up.accepted(), 0);
}
