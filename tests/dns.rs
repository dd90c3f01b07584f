//! The DNS door in process, over real UDP and TCP on loopback: what a
//! registered sandbox is answered for names it may and may not reach, an
//! unknown source, other query types, hostile messages, truncation, the
//! rate limit, and the counters. A counting UDP socket stands in as the
//! upstream resolver, to show that a refused name is never sent upstream.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

fn query(name: &str, qtype: RecordType, edns: bool) -> Message {
    let mut m = Message::new(0x5eed, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m
}

async fn ask_from(source: &str, to: SocketAddr, bytes: &[u8]) -> Option<Message> {
    let sock = UdpSocket::bind(format!("{source}:0")).await.unwrap();
    sock.send_to(bytes, to).await.unwrap();
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(Message::from_vec(&buf[..n]).unwrap()),
        _ => None,
    }
}

fn addresses(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// A UDP "resolver" that only counts what reaches it (and never answers).
async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&count);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while sock.recv_from(&mut buf).await.is_ok() {
            c.fetch_add(1, Ordering::SeqCst);
        }
    });
    (addr, count)
}

#[tokio::test]
async fn the_dns_door_answers_only_what_a_sandbox_may_reach() {
    let (upstream, seen) = counting_upstream().await;
    let gw = start("127.0.0.1:1".parse().unwrap(), |c| {
        c.dns.upstream = vec![upstream];
        c.dns.max_ttl_s = 60;
        c.gateway.resolve.insert(
            "many.test".into(),
            (1..=40)
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i)))
                .collect(),
        );
        c.gateway
            .resolve
            .insert("private.test".into(), vec!["10.0.0.5".parse().unwrap()]);
    })
    .await;
    gw.register(
        "c1",
        "127.0.0.1",
        &["api.test", "*.wild.test", "many.test", "private.test"],
        600,
    )
    .await;
    let dns = gw.running.dns_addr;
    let ask = |m: Message| async move {
        ask_from("127.0.0.1", dns, &m.to_vec().unwrap())
            .await
            .unwrap()
    };

    // Allowed: the address sluice resolved, the question echoed as sent
    // (0x20 case), the ID, EDNS; TTL capped.
    let r = ask(query("ApI.TeSt.", RecordType::A, true)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(r.metadata.id, 0x5eed);
    assert!(r.metadata.recursion_available);
    assert_eq!(r.queries[0].name().to_ascii(), "ApI.TeSt.");
    assert_eq!(addresses(&r), vec![Ipv4Addr::LOCALHOST]);
    assert!(r.answers[0].ttl <= 60);
    assert!(r.edns.is_some());

    // Not allowed: NXDOMAIN, and nothing went upstream (nor for twenty
    // random subdomains of it).
    let r = ask(query("secret.example.", RecordType::A, false)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    for i in 0..20 {
        let r = ask(query(
            &format!("x{i}q7.data.exfil.example."),
            RecordType::A,
            false,
        ))
        .await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "a refused name reached the resolver"
    );

    // Other types of an allowed name: empty NOERROR; AAAA too (no IPv6
    // through the gateway); PTR: NXDOMAIN.
    for t in [
        RecordType::AAAA,
        RecordType::HTTPS,
        RecordType::TXT,
        RecordType::MX,
    ] {
        let r = ask(query("api.test.", t, false)).await;
        assert_eq!(
            (r.metadata.response_code, r.answers.len()),
            (ResponseCode::NoError, 0),
            "{t:?}"
        );
    }
    let r = ask(query("1.0.0.127.in-addr.arpa.", RecordType::PTR, false)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);

    // Guarded addresses are left out; none left: an empty answer.
    let r = ask(query("private.test.", RecordType::A, false)).await;
    assert_eq!(
        (r.metadata.response_code, r.answers.len()),
        (ResponseCode::NoError, 0)
    );

    // Over 512 bytes without EDNS: truncated, so the client asks over TCP,
    // where the whole answer comes.
    let r = ask(query("many.test.", RecordType::A, false)).await;
    assert!(r.metadata.truncation, "{r:?}");
    assert!(r.answers.is_empty());
    let bytes = query("many.test.", RecordType::A, false).to_vec().unwrap();
    let mut tcp = tokio::net::TcpStream::connect(dns).await.unwrap();
    tcp.write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .unwrap();
    tcp.write_all(&bytes).await.unwrap();
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).await.unwrap();
    let mut answer = vec![0u8; u16::from_be_bytes(len).into()];
    tcp.read_exact(&mut answer).await.unwrap();
    let r = Message::from_vec(&answer).unwrap();
    assert!(!r.metadata.truncation);
    assert_eq!(addresses(&r).len(), 40);

    // An unknown source: REFUSED.
    let r = ask_from(
        "127.0.0.9",
        dns,
        &query("api.test.", RecordType::A, false).to_vec().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);

    // Hostile messages: FORMERR where the ID can be read, nothing where it
    // cannot; never a crash.
    let mut zero = query("api.test.", RecordType::A, false);
    zero.queries.clear();
    let r = ask(zero).await;
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    let mut two = query("api.test.", RecordType::A, false);
    two.add_query(Query::query(
        Name::from_ascii("other.test.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(ask(two).await.metadata.response_code, ResponseCode::FormErr);
    let mut lying = query("api.test.", RecordType::A, false).to_vec().unwrap();
    lying[5] = 9; // nine questions, one present
    let r = ask_from("127.0.0.1", dns, &lying).await.unwrap();
    assert_eq!(
        (r.metadata.id, r.metadata.response_code),
        (0x5eed, ResponseCode::FormErr)
    );
    // A compression pointer to itself.
    let mut looped = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    let r = ask_from("127.0.0.1", dns, &looped).await.unwrap();
    assert_eq!(
        (r.metadata.id, r.metadata.response_code),
        (0x1234, ResponseCode::FormErr)
    );
    assert!(ask_from("127.0.0.1", dns, b"\x01\x02\x03").await.is_none());
    let oversized = [
        &query("api.test.", RecordType::A, false).to_vec().unwrap()[..],
        &[0u8; 5000],
    ]
    .concat();
    let r = ask_from("127.0.0.1", dns, &oversized).await.unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    // A response sent to the door is never answered (no loops).
    let mut response = query("api.test.", RecordType::A, false);
    response.metadata.message_type = MessageType::Response;
    assert!(
        ask_from("127.0.0.1", dns, &response.to_vec().unwrap())
            .await
            .is_none()
    );

    // The counters.
    let page = gw.metrics().await;
    let series = |qtype: &str, decision: &str, reason: &str| {
        metric(
            &page,
            &format!(
                r#"sluice_dns_queries_total{{qtype="{qtype}",decision="{decision}",reason="{reason}"}}"#
            ),
        )
    };
    assert_eq!(series("A", "deny", "host_not_allowed"), 21.0, "{page}");
    assert_eq!(series("A", "deny", "unknown_source"), 1.0, "{page}");
    assert!(series("A", "allow", "none") >= 3.0, "{page}");
    assert_eq!(series("A", "deny", "private_destination"), 1.0, "{page}");
    assert_eq!(series("PTR", "deny", "host_not_allowed"), 1.0, "{page}");
}

#[tokio::test]
async fn one_sandboxs_flood_is_refused_without_starving_another() {
    let gw = start("127.0.0.1:1".parse().unwrap(), |c| {
        c.dns.queries_per_second = 20;
        c.dns.burst = 20;
    })
    .await;
    gw.register("flood", "127.0.0.1", &["api.test"], 600).await;
    gw.register("calm", "127.0.0.2", &["api.test"], 600).await;
    let dns = gw.running.dns_addr;
    let q = query("api.test.", RecordType::A, false).to_vec().unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..200 {
        sock.send_to(&q, dns).await.unwrap();
    }
    let mut refused = 0;
    let mut buf = vec![0u8; 4096];
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await
    {
        if Message::from_vec(&buf[..n]).unwrap().metadata.response_code == ResponseCode::Refused {
            refused += 1;
        }
    }
    assert!(refused >= 150, "{refused} refused of 200");
    // The other sandbox is answered meanwhile.
    let r = ask_from("127.0.0.2", dns, &q).await.unwrap();
    assert_eq!(addresses(&r), vec![Ipv4Addr::LOCALHOST]);
}

/// A UDP resolver that answers names under `ok.test` with 127.0.0.1 and
/// never answers anything else (a slow authoritative server, as one
/// sandbox can make its own wildcard's names).
async fn selective_upstream() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let Some(question) = q.queries.first().cloned() else {
                continue;
            };
            if !question.name().to_ascii().ends_with("ok.test.") {
                continue;
            }
            let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            r.metadata.recursion_available = true;
            r.add_query(question.clone());
            if question.query_type() == RecordType::A {
                r.add_answer(hickory_proto::rr::Record::from_rdata(
                    question.name().clone(),
                    60,
                    RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::LOCALHOST)),
                ));
            }
            let _ = sock.send_to(&r.to_vec().unwrap(), peer).await;
        }
    });
    addr
}

/// One sandbox asking for slow names under its own wildcard, through its
/// DNS queries and through the names its connections make the gateway
/// resolve, within its query rate, holds only its own share of the
/// lookups in flight: another sandbox keeps being answered meanwhile.
#[tokio::test]
async fn slow_names_of_one_sandbox_do_not_starve_another() {
    let upstream = selective_upstream().await;
    let gw = start("127.0.0.1:80".parse().unwrap(), |c| {
        c.dns.upstream = vec![upstream];
        c.dns.max_inflight = 16;
        c.dns.max_inflight_per_sandbox = 4;
        c.dns.queries_per_second = 1000;
        c.dns.burst = 1000;
    })
    .await;
    gw.register("greedy", "127.0.0.3", &["*.slow.test"], 600)
        .await;
    gw.register("calm", "127.0.0.4", &["*.ok.test"], 600).await;
    let dns = gw.running.dns_addr;
    // The flood: 200 distinct slow names by query, and 40 by connection.
    let flood = UdpSocket::bind("127.0.0.3:0").await.unwrap();
    for i in 0..200 {
        let q = query(&format!("n{i}.slow.test."), RecordType::A, false);
        flood.send_to(&q.to_vec().unwrap(), dns).await.unwrap();
    }
    let mut conns = Vec::new();
    for i in 0..40 {
        let mut s = gw.connect_from("127.0.0.3").await;
        let req = format!("GET / HTTP/1.1\r\nHost: c{i}.slow.test\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The other sandbox, meanwhile: every name answered.
    let mut answered = 0;
    for i in 0..20 {
        let q = query(&format!("a{i}.ok.test."), RecordType::A, false);
        let r = ask_from("127.0.0.4", dns, &q.to_vec().unwrap()).await;
        if r.is_some_and(|r| addresses(&r) == vec![Ipv4Addr::LOCALHOST]) {
            answered += 1;
        }
    }
    assert_eq!(answered, 20, "the calm sandbox was starved");
    // The greedy sandbox's own excess was refused at once (SERVFAIL), not
    // queued: most of its 200 queries are answered before any lookup
    // could have finished.
    let mut buf = vec![0u8; 4096];
    let mut servfail = 0;
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(300), flood.recv_from(&mut buf)).await
    {
        if Message::from_vec(&buf[..n]).unwrap().metadata.response_code == ResponseCode::ServFail {
            servfail += 1;
        }
    }
    assert!(servfail >= 150, "{servfail} of 200 refused at once");
    drop(conns);
}

/// RFC 6891: a query with an EDNS version other than 0 is answered
/// BADVERS (from a registered sandbox, never sent upstream).
#[tokio::test]
async fn an_unknown_edns_version_gets_badvers() {
    let (upstream, seen) = counting_upstream().await;
    let gw = start("127.0.0.1:1".parse().unwrap(), |c| {
        c.dns.upstream = vec![upstream];
    })
    .await;
    gw.register("v", "127.0.0.8", &["*.any.test"], 600).await;
    let mut q = query("x.any.test.", RecordType::A, true);
    if let Some(e) = q.edns.as_mut() {
        e.set_version(1);
    }
    let r = ask_from("127.0.0.8", gw.running.dns_addr, &q.to_vec().unwrap())
        .await
        .unwrap();
    // BADVERS is 16 on the wire (read back, hickory names 16 BADSIG).
    assert_eq!(u16::from(r.metadata.response_code), 16);
    assert_eq!(seen.load(Ordering::SeqCst), 0);
}

/// A sandbox's credential placeholder in a query name (a way out through
/// a wildcard-allowed zone) is refused and never sent upstream; the same
/// zone's other names still resolve upstream.
#[tokio::test]
async fn a_placeholder_in_a_query_name_is_refused() {
    let (upstream, seen) = counting_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("gh");
    std::fs::write(&secret, "dns-S3CRET").unwrap();
    let gw = start("127.0.0.1:1".parse().unwrap(), move |c| {
        c.dns.upstream = vec![upstream];
        c.credentials.insert(
            "gh".into(),
            sluice::config::CredentialConfig {
                hosts: vec!["api.gh.test".into()],
                secret_file: secret,
                header: "authorization".into(),
                format: "Bearer {secret}".into(),
                ..Default::default()
            },
        );
    })
    .await;
    let (status, minted) = gw
        .admin(
            "POST",
            "/v1/tokens",
            Some(serde_json::json!({"container_id": "p", "user_id": "u", "allowed_hosts": ["*.any.test"],
                                    "credentials": ["gh"], "ttl_seconds": 600})),
        )
        .await;
    assert_eq!(status, 201, "{minted}");
    let (status, reg) = gw
        .admin(
            "POST",
            "/v1/sandboxes",
            Some(serde_json::json!({"source_ip": "127.0.0.9", "token": minted["token"]})),
        )
        .await;
    assert_eq!(status, 201, "{reg}");
    let placeholder = reg["credentials"]["gh"].as_str().unwrap().to_owned();
    let q = query(&format!("{placeholder}.any.test."), RecordType::A, false);
    let r = ask_from("127.0.0.9", gw.running.dns_addr, &q.to_vec().unwrap())
        .await
        .unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "the placeholder went upstream"
    );
    // Another name of the zone is asked upstream (which never answers).
    let q = query("fine.any.test.", RecordType::A, false);
    let _ = ask_from("127.0.0.9", gw.running.dns_addr, &q.to_vec().unwrap()).await;
    assert!(seen.load(Ordering::SeqCst) > 0);
    let page = gw.metrics().await;
    assert!(
        page.contains(
            "sluice_dns_queries_total{qtype=\"A\",decision=\"deny\",reason=\"credential_misuse\"}"
        ),
        "{page}"
    );
}

/// A token's `dns_queries_per_s` takes the place of the gateway's rate
/// for its sandbox, both ways, as dig sees it: a sandbox allowed 100 a
/// second is answered 20 times in a row on a gateway whose own rate is
/// 2; one allowed 1 a second is refused (`quota_exceeded`, counted).
#[tokio::test]
async fn a_tokens_dns_rate_replaces_the_gateways() {
    if !have_tool("dig", "-v", "a_tokens_dns_rate_replaces_the_gateways") {
        return;
    }
    let gw = start("127.0.0.1:1".parse().unwrap(), |c| {
        c.dns.queries_per_second = 2;
        c.dns.burst = 2;
    })
    .await;
    for (id, ip, rate) in [("dns-fast", "127.0.0.3", 100), ("dns-slow", "127.0.0.4", 1)] {
        let (status, minted) = gw
            .admin(
                "POST",
                "/v1/tokens",
                Some(serde_json::json!({"container_id": id, "user_id": "u", "allowed_hosts": ["api.test"],
                    "ttl_seconds": 600, "limits": {"dns_queries_per_s": rate}})),
            )
            .await;
        assert_eq!(status, 201, "{minted}");
        let (status, body) = gw
            .admin(
                "POST",
                "/v1/sandboxes",
                Some(serde_json::json!({"source_ip": ip, "token": minted["token"]})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let port = gw.running.dns_addr.port().to_string();
    let dig = |source: &'static str, n: usize| {
        let port = port.clone();
        tokio::task::spawn_blocking(move || {
            (0..n)
                .map(|_| {
                    let out = std::process::Command::new("dig")
                        .args(["-b", source, "@127.0.0.1", "-p", &port])
                        .args([
                            "api.test",
                            "A",
                            "+tries=1",
                            "+time=2",
                            "+noall",
                            "+comments",
                        ])
                        .output()
                        .unwrap();
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    text.split("status: ")
                        .nth(1)
                        .and_then(|s| s.split(',').next())
                        .unwrap_or("none")
                        .to_owned()
                })
                .collect::<Vec<String>>()
        })
    };
    let fast = dig("127.0.0.3", 20).await.unwrap();
    assert!(fast.iter().all(|s| s == "NOERROR"), "{fast:?}");
    let slow = dig("127.0.0.4", 5).await.unwrap();
    assert_eq!(slow[0], "NOERROR", "{slow:?}");
    assert!(
        slow.iter().filter(|s| *s == "REFUSED").count() >= 3,
        "{slow:?}"
    );
    let page = gw.metrics().await;
    assert!(
        page.lines()
            .any(|l| l.starts_with("sluice_dns_queries_total")
                && l.contains("reason=\"quota_exceeded\"")),
        "{page}"
    );
    assert!(
        metric(&page, "sluice_limited_total{limit=\"dns_queries_per_s\"}") >= 3.0,
        "{page}"
    );
}
