//! The per-connection decision path, piece by piece: ClientHello and HTTP
//! head parsing on real captures, host normalisation, allowlist decisions
//! at 10 / 1,000 / 100,000 entries (exact and wildcard), the identity
//! lookup among 100,000 sandboxes, and token verification cold and from
//! the claims cache; and the whole decision (parse + lookup + match) at
//! each allowlist size; and the incremental readers fed a byte at a time
//! (a ClientHello or a head sent one byte per segment) at 2 KiB and 16 KiB,
//! whose cost must grow linearly with the size; and what a connection's
//! record costs when it ends (audit line, metrics, destinations).
//! `cargo bench --bench decision`.

#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sluice::host::{Host, HostName, HostPattern};
use sluice::identity::token::{Grant, Jwks, KeyPair, MintRequest, Signer, Verifier};
use sluice::identity::{Origin, Registry, Sandbox};
use sluice::policy::Allowlist;
use sluice::proxy::sniff::{
    HeadReader, HelloReader, Incremental, Parsed, parse_client_hello, parse_request_head,
};

fn capture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn parsers(c: &mut Criterion) {
    let mut g = c.benchmark_group("sniff");
    for name in ["clienthello-curl.bin", "clienthello-pq.bin"] {
        let hello = capture(name);
        g.bench_function(
            BenchmarkId::new("client_hello", format!("{name} ({} B)", hello.len())),
            |b| b.iter(|| parse_client_hello(black_box(&hello), 16 * 1024)),
        );
    }
    let head = b"GET /v1/models?limit=10 HTTP/1.1\r\nHost: api.example.test\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\nAuthorization: Bearer abcdefghijklmnopqrstuvwxyz\r\n\r\n";
    g.bench_function("http_head", |b| {
        b.iter(|| parse_request_head(black_box(head), 64 * 1024))
    });
    g.bench_function("host_name", |b| {
        b.iter(|| HostName::parse(black_box("API.Service.Example.TEST.")))
    });
    g.finish();
}

/// A ClientHello record of `size` bytes in all: the SNI, then a padding
/// extension (RFC 7685) that makes up the rest.
fn hello_of(size: usize) -> Vec<u8> {
    let name = b"api.example.test";
    let mut sni = vec![0u8, 0];
    let list_len = (name.len() + 3) as u16;
    sni.extend_from_slice(&(list_len + 2).to_be_bytes());
    sni.extend_from_slice(&list_len.to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    let fixed = 5 + 4 + 2 + 32 + 1 + 4 + 2 + 2 + sni.len() + 4;
    let pad = size.saturating_sub(fixed);
    let mut exts = sni;
    exts.extend_from_slice(&[0, 21]);
    exts.extend_from_slice(&(pad as u16).to_be_bytes());
    exts.resize(exts.len() + pad, 0);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.extend_from_slice(&[0, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut msg = vec![0x01];
    msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    rec.extend_from_slice(&msg);
    rec
}

/// Polls `reader` with every prefix of `bytes`, as a client sending one
/// byte per segment makes the gateway do.
fn byte_by_byte<P: Incremental>(mut reader: P, bytes: &[u8]) -> bool {
    for end in 1..=bytes.len() {
        if let Parsed::Found(_) = reader.poll(&bytes[..end]) {
            return true;
        }
    }
    false
}

fn dribbles(c: &mut Criterion) {
    let mut g = c.benchmark_group("sniff_byte_by_byte");
    for size in [2 * 1024, 16 * 1000] {
        let hello = hello_of(size);
        assert!(matches!(
            parse_client_hello(&hello, 16 * 1024),
            Parsed::Found(_)
        ));
        assert!(byte_by_byte(HelloReader::new(16 * 1024), &hello));
        g.bench_with_input(
            BenchmarkId::new("client_hello", hello.len()),
            &hello,
            |b, h| b.iter(|| byte_by_byte(HelloReader::new(16 * 1024), black_box(h))),
        );
        let mut head = b"GET / HTTP/1.1\r\nHost: api.example.test\r\n".to_vec();
        // Long values: the head stays under the 100-header limit.
        let line = format!("X-Pad: {}\r\n", "a".repeat(390));
        while head.len() + line.len() < size {
            head.extend_from_slice(line.as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        assert!(byte_by_byte(HeadReader::new(64 * 1024), &head));
        g.bench_with_input(BenchmarkId::new("http_head", head.len()), &head, |b, h| {
            b.iter(|| byte_by_byte(HeadReader::new(64 * 1024), black_box(h)))
        });
    }
    g.finish();
}

fn allowlists(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy");
    for n in [10usize, 1_000, 100_000] {
        let exact = Allowlist::new((0..n).map(|i| {
            format!("host-{i}.example.test")
                .parse::<HostPattern>()
                .unwrap()
        }));
        let wild = Allowlist::new((0..n).map(|i| {
            format!("*.zone-{i}.example.test")
                .parse::<HostPattern>()
                .unwrap()
        }));
        let hit = Host::Name(HostName::parse(&format!("host-{}.example.test", n / 2)).unwrap());
        let wild_hit =
            Host::Name(HostName::parse(&format!("a.b.zone-{}.example.test", n / 2)).unwrap());
        let miss = Host::Name(HostName::parse("nowhere.elsewhere.test").unwrap());
        g.bench_with_input(BenchmarkId::new("exact_hit", n), &n, |b, _| {
            b.iter(|| exact.decide(black_box(&hit), 443, &[80, 443]))
        });
        g.bench_with_input(BenchmarkId::new("wildcard_hit", n), &n, |b, _| {
            b.iter(|| wild.decide(black_box(&wild_hit), 443, &[80, 443]))
        });
        g.bench_with_input(BenchmarkId::new("miss", n), &n, |b, _| {
            b.iter(|| exact.decide(black_box(&miss), 443, &[80, 443]))
        });
    }
    g.finish();
}

fn identity(c: &mut Criterion) {
    let pair = KeyPair::generate("bench").unwrap();
    let signer = Signer::from_pem(pair.private_pem.as_bytes(), "bench", "iss", "aud").unwrap();
    let verifier = Verifier::new(
        Jwks::parse(&pair.jwks().to_string()).unwrap(),
        "iss",
        "aud",
        30,
    );
    let minted = signer
        .mint(&MintRequest {
            limits: Default::default(),
            organization_uuid: None,
            enforce: Default::default(),
            credentials: Vec::new(),
            container_id: "bench".into(),
            user_id: "u".into(),
            allowed_hosts: vec!["api.example.test".into(), "*.github.test".into()],
            ttl: Duration::from_secs(3600),
        })
        .unwrap();
    let mut g = c.benchmark_group("token");
    g.bench_function("verify_cold", |b| {
        b.iter(|| verifier.verify_uncached(black_box(&minted.token)).unwrap())
    });
    verifier.verify(&minted.token).unwrap();
    g.bench_function("verify_cached", |b| {
        b.iter(|| verifier.verify(black_box(&minted.token)).unwrap())
    });
    g.finish();

    let registry = Registry::new();
    let grant = Arc::new(verifier.verify_uncached(&minted.token).unwrap());
    for i in 0..100_000u32 {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        let mut claims = grant.claims.clone();
        claims.container_id = format!("c{i}");
        let g = Grant {
            container: Arc::from(claims.container_id.as_str()),
            claims,
            allowlist: grant.allowlist.clone(),
            placeholders: Default::default(),
        };
        registry
            .bind(Sandbox::new(
                ip,
                minted.token.clone(),
                Arc::new(g),
                Origin::Registered,
            ))
            .unwrap();
    }
    let probe = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + 54_321));
    c.bench_function("identity/lookup_100k", |b| {
        b.iter(|| registry.get(black_box(probe)).unwrap())
    });

    // What every connection leaves behind when it ends: its record turned
    // into the audit event (the log line, through the same formatter as
    // `sluice serve`, to a sink), the metrics, the destinations table and
    // the live feed.
    {
        use sluice::metrics::Mode;
        use sluice::proxy::record::Record;
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(std::io::sink)
            .with_ansi(false)
            .try_init();
        let _ = sluice::metrics::install();
        let events = Arc::new(sluice::events::Events::default());
        let source = "10.0.0.7:40000".parse().unwrap();
        let upstream = "198.18.0.9:443".parse().unwrap();
        let host = Host::parse("api.example.test").unwrap();
        c.bench_function("audit/connection_record", |b| {
            b.iter(|| {
                let mut r = Record::new(Mode::Transparent, source, Arc::clone(&events));
                r.grant = Some(Arc::clone(&grant));
                r.container_id = Some(Arc::clone(&grant.container));
                r.host = Some(host.clone());
                r.port = 443;
                r.protocol = sluice::proxy::sniff::Protocol::Tls;
                r.upstream = Some(upstream);
                r.matched = Some("api.example.test".into());
                r.connect_ms = Some(1);
                r.decide(Ok(()));
                r.end = "closed";
                drop(black_box(r));
            })
        });
    }

    // The whole decision for one connection, as the transparent listener
    // makes it: parse the post-quantum ClientHello (SNI past byte 1024),
    // find the sandbox among 100,000 by source address, take its grant
    // from the claims cache, and match the name against an allowlist of
    // 10 / 1,000 / 100,000 entries.
    let hello = capture("clienthello-pq.bin");
    verifier.verify(&minted.token).unwrap();
    let mut g = c.benchmark_group("decision");
    for n in [10usize, 1_000, 100_000] {
        let allowlist = Allowlist::new(
            (0..n)
                .map(|i| format!("host-{i}.example.test"))
                .chain(["api.example.test".to_owned()])
                .map(|p| p.parse::<HostPattern>().unwrap()),
        );
        g.bench_with_input(BenchmarkId::new("parse_lookup_match", n), &n, |b, _| {
            b.iter(|| {
                let Parsed::Found(h) = parse_client_hello(black_box(&hello), 16 * 1024) else {
                    panic!("no SNI");
                };
                let sandbox = registry.get(black_box(probe)).unwrap();
                let grant = sandbox.current_grant(&verifier).unwrap();
                black_box(&grant);
                allowlist.decide(&Host::Name(h.sni), 443, &[80, 443])
            })
        });
    }
    g.finish();
}

/// A request judged by request rules, as every door judges one: the
/// allowlist's `admits_request` (normalise the path, find the host's
/// ruled entries, match the rules of its port) on a token whose
/// `allowed_hosts` holds 10 / 100 / 1,000 ruled entries for the host (a
/// quarter sharing the request's first segment, the one that admits it
/// last), and on `@github_read:acme` (a query-checked git fetch).
fn request_rules(c: &mut Criterion) {
    use sluice::identity::token::compile_hosts;
    use sluice::policy::rules::normalize_path;
    use sluice::presets::Presets;
    let target = "/repos/acme/widgets/contents/src/%6Dain.rs?ref=main";
    c.bench_function("rules/normalize_path", |b| {
        b.iter(|| normalize_path(black_box(target)).unwrap())
    });
    let presets = Presets::default();
    let host = Host::Name(HostName::parse("api.github.test").unwrap());
    let mut g = c.benchmark_group("rules/admits_request");
    for n in [10usize, 100, 1_000] {
        let mut entries: Vec<String> = (0..n)
            .map(|i| {
                let first = ["repos", "orgs", "users", "gists"][i % 4];
                format!("api.github.test GET|HEAD /{first}/org-{i}/**")
            })
            .collect();
        entries.push("api.github.test * /*/health".into());
        entries.push("api.github.test GET|HEAD /repos/acme/*/contents/**".into());
        let list = compile_hosts(&entries, &presets).unwrap();
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                list.admits_request(black_box(&host), 443, &[80, 443], "GET", black_box(target))
            })
        });
    }
    let github = compile_hosts(&["@github_read:acme".to_owned()], &presets).unwrap();
    let gh = Host::Name(HostName::parse("github.com").unwrap());
    let fetch = "/acme/widgets.git/info/refs?service=git-upload-pack";
    g.bench_function("github_read", |b| {
        b.iter(|| github.admits_request(black_box(&gh), 443, &[80, 443], "GET", black_box(fetch)))
    });
    g.finish();
}

/// The DNS door's path for a name in the cache: parse the query, match
/// the name against the allowlist (any port), take the addresses from the
/// shared resolver's cache entry, build the answer.
fn dns_cache_hit(c: &mut Criterion) {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    use sluice::dns::{Answer, parse, respond, udp_limit};
    use sluice::resolver::Resolver;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // No upstream answers here: the name comes from /etc/hosts, and after
    // the first lookup from the cache.
    let config = sluice::config::DnsConfig {
        upstream: vec!["127.0.0.1:9".parse().unwrap()],
        ..Default::default()
    };
    let resolver = rt.block_on(async { Resolver::new(&config).unwrap() });
    let localhost = HostName::parse("localhost").unwrap();
    rt.block_on(resolver.resolve(&localhost, sluice::resolver::Asker::Gateway))
        .unwrap();
    let allowlist = Allowlist::new(
        (0..1_000)
            .map(|i| format!("host-{i}.example.test"))
            .chain(["localhost".to_owned()])
            .map(|p| p.parse::<HostPattern>().unwrap()),
    );
    let mut q = Message::new(7, MessageType::Query, OpCode::Query);
    q.add_query(Query::query(
        Name::from_ascii("localhost.").unwrap(),
        RecordType::A,
    ));
    let bytes = q.to_vec().unwrap();
    c.bench_function("dns/cache_hit_answer", |b| {
        b.iter(|| {
            let request = parse(black_box(&bytes)).unwrap();
            let name = HostName::parse(&request.queries[0].name().to_ascii()).unwrap();
            let host = Host::Name(name.clone());
            assert!(allowlist.admits_name(&host));
            let resolved = rt
                .block_on(resolver.resolve(&name, sluice::resolver::Asker::Gateway))
                .unwrap();
            let ips = resolved
                .addrs
                .iter()
                .filter_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
                .collect();
            respond(&request, &Answer::Addresses(ips, 30), udp_limit(&request))
        })
    });
}

/// What a connection of a sandbox with credentials asks for, a few times
/// (the door, the misuse check, the decision to inspect): its sealed
/// credentials. Made each time (an HMAC per placeholder), as before the
/// grant remembered them, and remembered under the same seal.
fn sealed_credentials(c: &mut Criterion) {
    use sluice::credentials::{Credentials, Placeholders, Sealed, placeholder};
    let key = Arc::new([7u8; 32].to_vec());
    let names = vec!["github".to_owned(), "openai".to_owned()];
    let all = Credentials::default();
    c.bench_function("credentials/placeholder", |b| {
        b.iter(|| placeholder(black_box(&key), black_box("c-12345"), black_box("github")))
    });
    c.bench_function("credentials/sealed_made", |b| {
        b.iter(|| Arc::new(Sealed::new(black_box(&key), "c-12345", &names, &all)))
    });
    let memo = Placeholders::<Vec<u8>>::default();
    c.bench_function("credentials/sealed_remembered", |b| {
        b.iter(|| {
            let placeholders = memo.under(black_box(&key), || {
                names
                    .iter()
                    .map(|n| placeholder(&key, "c-12345", n))
                    .collect()
            });
            Arc::new(Sealed::with_placeholders(&names, &placeholders, &all))
        })
    });
}

criterion_group!(
    benches,
    sealed_credentials,
    parsers,
    dribbles,
    allowlists,
    identity,
    request_rules,
    dns_cache_hit
);
criterion_main!(benches);
