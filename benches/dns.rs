//! DNS answers per second and latency from the gateway, on the real path,
//! beside dnsmasq forwarding on the same path. As root:
//!
//! ```sh
//! sudo -E cargo bench --bench dns                    # 3 rounds of 5 s each
//! sudo -E cargo bench --bench dns -- --rounds 5 --seconds 8 --concurrency 64
//! ```
//!
//! Three namespaces (the load bench's lab): a client, a gateway and an
//! upstream. The upstream runs dnsmasq as the resolver of record for 100
//! names. In the gateway, sluice's DNS door (the client's port 53
//! REDIRECTed to it by the project's rules, its allowlist `*.bench.test`)
//! and, beside it, dnsmasq forwarding to the same resolver with its cache,
//! on a port the rules let through. The client, this binary, sends queries
//! for the 100 names from `--concurrency` sockets, each waiting for its
//! answer (1 s timeout), for `--seconds` per round, the two targets taking
//! turns; then prints answers/s and p50/p99 latency, medians over rounds.
//! Every loop is bounded in count and time.
//!
//! Without `--bench` (under `cargo test --all-targets`) it runs one short
//! round as a check: both answer, and sluice refuses a name off the list.

#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "load/lab.rs"]
mod lab;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use lab::{CLIENT_IP, Lab, UPSTREAM_IP, in_ns, sh, wait_port, with_ns};

const NAMES: usize = 100;
const SLUICE: &str = "198.19.248.1:53";
const DNSMASQ: &str = "198.19.248.1:5300";

struct Options {
    rounds: usize,
    seconds: u64,
    concurrency: usize,
    smoke: bool,
}

fn options() -> Result<Options> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Options {
        rounds: 3,
        seconds: 5,
        concurrency: 64,
        smoke: !args.iter().any(|a| a == "--bench"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = || -> Result<u64> {
            it.next()
                .context("a value is missing")?
                .parse()
                .context("not a number")
        };
        match a.as_str() {
            "--rounds" => o.rounds = num()?.clamp(1, 20) as usize,
            "--seconds" => o.seconds = num()?.clamp(1, 60),
            "--concurrency" => o.concurrency = num()?.clamp(1, 512) as usize,
            _ => {}
        }
    }
    if o.smoke {
        (o.rounds, o.seconds, o.concurrency) = (1, 1, 8);
    }
    Ok(o)
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

/// One round against one server: answers, failures, latencies (µs).
fn load(server: SocketAddr, seconds: u64, concurrency: usize) -> (u64, u64, Vec<u64>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for worker in 0..concurrency {
            tasks.push(tokio::spawn(async move {
                let sock = tokio::net::UdpSocket::bind(format!("{CLIENT_IP}:0"))
                    .await
                    .unwrap();
                sock.connect(server).await.unwrap();
                let (mut ok, mut failed, mut lat) = (0u64, 0u64, Vec::new());
                let mut buf = vec![0u8; 2048];
                let mut i = worker;
                // Bounded in time, and in count (no more than 1M queries).
                while tokio::time::Instant::now() < deadline && ok + failed < 1_000_000 {
                    let id = (i % 65536) as u16;
                    let q = query(id, &format!("n{}.bench.test.", i % NAMES));
                    i += concurrency;
                    let started = Instant::now();
                    if sock.send(&q).await.is_err() {
                        failed += 1;
                        continue;
                    }
                    match tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf)).await {
                        Ok(Ok(n)) if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id => {
                            ok += 1;
                            lat.push(started.elapsed().as_micros() as u64);
                        }
                        _ => failed += 1,
                    }
                }
                (ok, failed, lat)
            }));
        }
        let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
        for t in tasks {
            let (o, f, l) = t.await.unwrap();
            ok += o;
            failed += f;
            lat.extend(l);
        }
        (ok, failed, lat)
    })
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A raw admin call inside the gateway namespace.
fn admin(lab: &Lab, token: &str, path: &str, body: &str) -> Result<String> {
    let (gw, token, path, body) = (
        lab.gateway.clone(),
        token.to_owned(),
        path.to_owned(),
        body.to_owned(),
    );
    with_ns(&gw, move || -> Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:19080")?;
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })?
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn dnsmasq(ns: &str, args: &[String]) -> Result<Child> {
    in_ns(ns, "dnsmasq")
        .args([
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--pid-file=",
            "--bind-interfaces",
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting dnsmasq")
}

fn run(o: &Options) -> Result<()> {
    let lab = Lab::new()?;
    let gc = lab.gateway_if.clone();
    sh(&format!(
        "nsenter --net=/run/netns/{} bash {}/iptables/sluice-gateway.sh apply --iface {gc} --dns-port 15053
         nsenter --net=/run/netns/{} iptables -w -I SL-IN-{gc} 1 -p udp --dport 5300 -j ACCEPT",
        lab.gateway,
        env!("CARGO_MANIFEST_DIR"),
        lab.gateway
    ))?;
    let mut procs = Procs(Vec::new());
    let records: Vec<String> = (0..NAMES)
        .map(|i| format!("--host-record=n{i}.bench.test,{UPSTREAM_IP}"))
        .collect();
    let mut up_args = vec![
        format!("--listen-address={UPSTREAM_IP}"),
        "--port=53".into(),
    ];
    up_args.extend(records);
    procs.0.push(dnsmasq(&lab.upstream, &up_args)?);
    procs.0.push(dnsmasq(
        &lab.gateway,
        &[
            "--listen-address=198.19.248.1".into(),
            "--port=5300".into(),
            format!("--server={UPSTREAM_IP}#53"),
            "--cache-size=1000".into(),
        ],
    )?);
    let state = lab.dir.path().join("state");
    let config = lab.dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[gateway]\ntransparent_listen = \"0.0.0.0:15001\"\nallow_destinations = [\"198.19.249.0/24\"]\n\
             [admin]\nlisten = \"127.0.0.1:19080\"\n[metrics]\nlisten = \"127.0.0.1:19090\"\n\
             [dns]\nlisten = \"0.0.0.0:15053\"\nupstream = [\"{UPSTREAM_IP}:53\"]\nqueries_per_second = 1000000\nburst = 1000000\n",
            state.display()
        ),
    )?;
    let sluice = in_ns(&lab.gateway, env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config", config.to_str().unwrap_or_default()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting sluice")?;
    procs.0.push(sluice);
    wait_port(&lab.gateway, "127.0.0.1:19080")?;
    let token = std::fs::read_to_string(state.join("admin-token"))?
        .trim()
        .to_owned();
    let minted = admin(
        &lab,
        &token,
        "/v1/tokens",
        r#"{"container_id":"bench","user_id":"bench","allowed_hosts":["*.bench.test"]}"#,
    )?;
    let jwt = minted
        .split("\"token\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .context("no token minted")?
        .to_owned();
    let reg = admin(
        &lab,
        &token,
        "/v1/sandboxes",
        &format!(r#"{{"source_ip":"{CLIENT_IP}","token":"{jwt}"}}"#),
    )?;
    if !reg.starts_with("HTTP/1.1 201") {
        bail!("registration failed: {reg}");
    }

    let targets: [(&str, SocketAddr); 2] =
        [("sluice", SLUICE.parse()?), ("dnsmasq", DNSMASQ.parse()?)];
    // Warm both caches, and check what each answers.
    let client = lab.client.clone();
    let checked = with_ns(&client, move || -> Result<()> {
        let sock = std::net::UdpSocket::bind(format!("{CLIENT_IP}:0"))?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut buf = [0u8; 2048];
        for (what, addr) in targets {
            for i in 0..NAMES {
                sock.send_to(&query(i as u16, &format!("n{i}.bench.test.")), addr)?;
                let (n, _) = sock
                    .recv_from(&mut buf)
                    .with_context(|| format!("{what}: no answer"))?;
                let m = Message::from_vec(&buf[..n])?;
                if m.answers.is_empty() {
                    bail!("{what}: no address for n{i}.bench.test");
                }
            }
        }
        sock.send_to(
            &query(7, "elsewhere.example."),
            SLUICE.parse::<SocketAddr>()?,
        )?;
        let (n, _) = sock.recv_from(&mut buf)?;
        if Message::from_vec(&buf[..n])?.metadata.response_code != ResponseCode::NXDomain {
            bail!("sluice answered a name off the allowlist");
        }
        Ok(())
    })?;
    checked?;

    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut p50s: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut p99s: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut fails = [0u64; 2];
    for round in 0..o.rounds {
        for (t, (_, addr)) in targets.iter().enumerate() {
            let (addr, secs, conc) = (*addr, o.seconds, o.concurrency);
            let (ok, failed, mut lat) = with_ns(&lab.client, move || load(addr, secs, conc))?;
            lat.sort_unstable();
            rates[t].push(ok as f64 / secs as f64);
            p50s[t].push(percentile(&lat, 0.50) as f64);
            p99s[t].push(percentile(&lat, 0.99) as f64);
            fails[t] += failed;
            eprintln!(
                "round {round} {:>8}: {:>9.0} answers/s, p50 {:>6} µs, p99 {:>6} µs, {failed} failed",
                targets[t].0,
                ok as f64 / secs as f64,
                percentile(&lat, 0.50),
                percentile(&lat, 0.99)
            );
            if ok == 0 {
                bail!("{}: no answers", targets[t].0);
            }
        }
    }
    let r: Vec<f64> = rates.into_iter().map(median).collect();
    let p50: Vec<f64> = p50s.into_iter().map(median).collect();
    let p99: Vec<f64> = p99s.into_iter().map(median).collect();
    println!(
        "\nDNS on the real path, {} rounds × {} s, {} concurrent sockets, {NAMES} names (cache hits), medians\n",
        o.rounds, o.seconds, o.concurrency
    );
    println!("| figure | sluice | dnsmasq | sluice ×dnsmasq |");
    println!("|---|---|---|---|");
    println!(
        "| answers/s | {:.0} | {:.0} | {:.2} |",
        r[0],
        r[1],
        r[0] / r[1]
    );
    println!(
        "| p50 µs | {:.0} | {:.0} | {:.2} |",
        p50[0],
        p50[1],
        p50[0] / p50[1]
    );
    println!(
        "| p99 µs | {:.0} | {:.0} | {:.2} |",
        p99[0],
        p99[1],
        p99[0] / p99[1]
    );
    println!("| failed (timeouts) | {} | {} | |", fails[0], fails[1]);
    drop(procs);
    drop(lab);
    Ok(())
}

fn main() {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("dns bench: {e:#}");
            std::process::exit(2);
        }
    };
    let root = nix::unistd::geteuid().is_root();
    let tools = ["dnsmasq", "ip", "iptables", "nsenter"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    if !root || !tools {
        let reason = "the dns bench needs root, dnsmasq, ip, iptables and nsenter";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            eprintln!("{reason} (CI=true: a skip is a failure)");
            std::process::exit(1);
        }
        eprintln!("SKIPPED {reason}");
        return;
    }
    if let Err(e) = run(&o) {
        eprintln!("dns bench failed: {e:#}");
        std::process::exit(1);
    }
    if o.smoke {
        println!("dns bench check: 1 passed, 0 failed");
    }
}
