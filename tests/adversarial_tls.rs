//! Hostile TLS on the transparent path: every case refused with the
//! access_denied alert and counted with its reason, never reaching the
//! upstream, leaking nothing.

#![allow(clippy::unwrap_used)]

mod support;

use support::*;

fn ext(t: u16, data: &[u8]) -> Vec<u8> {
    let mut v = t.to_be_bytes().to_vec();
    v.extend_from_slice(&(data.len() as u16).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn sni(names: &[&[u8]]) -> Vec<u8> {
    let mut list = Vec::new();
    for n in names {
        list.push(0u8);
        list.extend_from_slice(&(n.len() as u16).to_be_bytes());
        list.extend_from_slice(n);
    }
    let mut data = (list.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    ext(0, &data)
}

/// A ClientHello record with these extensions (and padding to `pad`).
fn hello(exts: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.extend_from_slice(&[0, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    let e: Vec<u8> = exts.concat();
    body.extend_from_slice(&(e.len() as u16).to_be_bytes());
    body.extend_from_slice(&e);
    let mut msg = vec![0x01];
    msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    rec.extend_from_slice(&msg);
    rec
}

#[tokio::test]
async fn hostile_tls_is_refused_cleanly() {
    let up = raw_upstream(b"", usize::MAX).await;
    let gw = start(up.addr, |c| c.gateway.max_client_hello_bytes = 4096).await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&format!("api.example.test:{}", up.addr.port())],
        600,
    )
    .await;
    let case = |name, send: Vec<u8>, reason| Case {
        name,
        source: "127.0.0.1",
        send,
        refusal: Refusal::TlsAlert,
        protocol: "tls",
        reason,
    };
    let mut app_data = hello(&[sni(&[b"api.example.test"])]);
    app_data[0] = 0x17;
    let mut split = hello(&[sni(&[b"api.example.test"])]);
    // A second record that is not a handshake, in the middle of the hello.
    let msg = split.split_off(5);
    let mut interleaved = vec![0x16, 0x03, 0x01, 0x00, 0x10];
    interleaved.extend_from_slice(&msg[..16]);
    interleaved.extend_from_slice(&[0x15, 0x03, 0x01, 0x00, 0x02, 0x01, 0x00]);
    let big = ext(0x1234, &vec![0u8; 5000]);
    let cases = vec![
        case(
            "an SNI not allowed",
            capture("clienthello-openssl.bin"),
            "host_not_allowed",
        ),
        case("no SNI", hello(&[ext(10, &[0, 2, 0, 0x1d])]), "no_host"),
        case(
            "two names",
            hello(&[sni(&[b"api.example.test", b"evil.test"])]),
            "no_host",
        ),
        case(
            "two SNI extensions",
            hello(&[sni(&[b"evil.test"]), sni(&[b"api.example.test"])]),
            "no_host",
        ),
        case("an empty name", hello(&[sni(&[b""])]), "no_host"),
        case(
            "a NUL in the name",
            hello(&[sni(&[b"api.example.test\0.evil"])]),
            "no_host",
        ),
        case("an IP literal", hello(&[sni(&[b"127.0.0.1"])]), "no_host"),
        case(
            "a hello over the cap",
            hello(&[big, sni(&[b"api.example.test"])]),
            "no_host",
        ),
        // Not a handshake from its first byte: not taken for TLS at all.
        Case {
            name: "an application-data record",
            source: "127.0.0.1",
            send: app_data,
            refusal: Refusal::Closed,
            protocol: "other",
            reason: "unsupported_protocol",
        },
        case(
            "an alert between hello fragments",
            interleaved,
            "unsupported_protocol",
        ),
        case(
            "a truncated hello, then silence",
            capture("clienthello-curl.bin")[..100].to_vec(),
            "peek_timeout",
        ),
    ];
    // The truncated hello waits out the peek timeout (5 s by default).
    run_cases(&gw, &[&up], cases).await;
}
