//! The load benchmark on the real path: a client namespace → the gateway
//! namespace (iptables REDIRECT) → an upstream namespace, all on
//! 198.18.0.0/15, with the same load through each target in the same run:
//! `direct` (the gateway namespace only routes), `sluice`, HAProxy (TCP
//! mode, SNI allowlist, splice) and nginx (stream, `ssl_preread`, a map
//! allowlist).
//!
//! ```text
//! sudo -E cargo bench --bench load                       # 3 rounds, ~6 min
//! sudo -E cargo bench --bench load -- --rounds 5 --seconds 8 --targets sluice,haproxy
//! sudo -E cargo bench --bench load -- --copying --only bulk   # copying endpoints
//! ```
//!
//! The targets: `direct`, `sluice`, `haproxy` (splice, default pipes),
//! `haproxy-1m` (splice, `tune.pipesize 1048576`) and `nginx`. The bulk
//! endpoints move bytes without copying unless `--copying` is given (see
//! `roles`).
//!
//! Per target and round: bulk throughput with 1 and 32 streams; new
//! connections per second (each sends a ClientHello, waits for the
//! upstream's first bytes, closes) with p50/p99 latency; RSS and
//! descriptors of the gateway with N idle established connections; CPU
//! seconds per GB relayed. The table gives the median of the rounds with
//! min–max, and ratios to direct and to HAProxy.
//!
//! Without `--bench` (that is, under `cargo test --all-targets`) it runs
//! one short round of every target as a check that the harness and each
//! gateway work: every figure present, every allowlist refusing a name it
//! does not hold. It needs root; without root it says why and skips,
//! except with `CI=true`, where a skip is a failure.

#![allow(clippy::unwrap_used)]

mod lab;
#[allow(dead_code)] // what the inspection bench uses as well
mod procfs;
mod roles;
mod targets;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use lab::{Lab, UPSTREAM};
use roles::Endpoints;
use targets::{Gateway, Target};

#[derive(Debug, Clone)]
struct Options {
    rounds: usize,
    warmup: f64,
    seconds: f64,
    idle: usize,
    concurrency: usize,
    max_conns: u64,
    targets: Vec<Target>,
    /// How the bulk endpoints move bytes (`--copying`; zero-copy by default).
    endpoints: Endpoints,
    /// Which loads run (`--only idle,bulk,rate`; all by default).
    only: Vec<String>,
    /// Keep the gateways' logs and configs (`--keep-logs`).
    keep_logs: bool,
    /// A check run (`cargo test`), not a measurement.
    smoke: bool,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options> {
        let smoke = !args.iter().any(|a| a == "--bench");
        // The gateway holds two descriptors per relayed connection.
        let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(_, h)| h as usize)
            .unwrap_or(1024);
        // HAProxy also counts descriptors for its pipes and listeners.
        let fit = hard.saturating_sub(2048) / 2 / 100 * 100;
        let mut o = if smoke {
            Options {
                rounds: 1,
                warmup: 0.2,
                seconds: 0.5,
                idle: 200.min(fit),
                concurrency: 8,
                max_conns: 20_000,
                targets: Target::ALL.to_vec(),
                endpoints: Endpoints::ZeroCopy,
                only: Vec::new(),
                keep_logs: false,
                smoke,
            }
        } else {
            Options {
                rounds: 3,
                warmup: 1.0,
                seconds: 5.0,
                idle: 10_000.min(fit),
                concurrency: 32,
                max_conns: 500_000,
                targets: Target::ALL.to_vec(),
                endpoints: Endpoints::ZeroCopy,
                only: Vec::new(),
                keep_logs: false,
                smoke,
            }
        };
        let mut it = args.iter().skip(1);
        while let Some(a) = it.next() {
            let mut val = || it.next().context(format!("{a} needs a value"));
            match a.as_str() {
                "--rounds" => o.rounds = val()?.parse()?,
                "--warmup" => o.warmup = val()?.parse()?,
                "--seconds" => o.seconds = val()?.parse()?,
                "--idle" => o.idle = val()?.parse()?,
                "--concurrency" => o.concurrency = val()?.parse()?,
                "--max-conns" => o.max_conns = val()?.parse()?,
                "--targets" => {
                    o.targets = val()?
                        .split(',')
                        .map(|t| Target::parse(t).with_context(|| format!("unknown target {t}")))
                        .collect::<Result<_>>()?
                }
                "--only" => o.only = val()?.split(',').map(str::to_owned).collect(),
                "--keep-logs" => o.keep_logs = true,
                "--copying" => o.endpoints = Endpoints::Copying,
                "--bench" => {}
                // cargo's own flags and filters.
                _ => {}
            }
        }
        if o.idle > fit {
            bail!(
                "--idle {}: the descriptor limit ({hard}) fits {fit}",
                o.idle
            );
        }
        Ok(o)
    }
}

/// One figure of one target in one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Figure {
    Bulk1,
    Bulk32,
    ConnRate,
    P50,
    P99,
    ConnCpu,
    IdleRss,
    RssPerConn,
    IdleFds,
    GatewayCpu,
    MachineCpu,
}

impl Figure {
    const ALL: [Figure; 11] = [
        Figure::Bulk1,
        Figure::Bulk32,
        Figure::ConnRate,
        Figure::P50,
        Figure::P99,
        Figure::ConnCpu,
        Figure::IdleRss,
        Figure::RssPerConn,
        Figure::IdleFds,
        Figure::GatewayCpu,
        Figure::MachineCpu,
    ];

    fn label(self, idle: usize) -> String {
        match self {
            Figure::Bulk1 => "throughput, 1 stream (Gbit/s, higher is better)".into(),
            Figure::Bulk32 => "throughput, 32 streams (Gbit/s, higher is better)".into(),
            Figure::ConnRate => "new TLS connections/s (higher is better)".into(),
            Figure::P50 => "connection latency p50 (µs)".into(),
            Figure::P99 => "connection latency p99 (µs)".into(),
            Figure::ConnCpu => "gateway CPU µs per new connection".into(),
            Figure::IdleRss => format!("gateway RSS with {idle} idle connections (MiB)"),
            Figure::RssPerConn => "RSS growth per idle connection (KiB)".into(),
            Figure::IdleFds => format!("gateway descriptors with {idle} idle connections"),
            Figure::GatewayCpu => "gateway CPU s per GB relayed".into(),
            Figure::MachineCpu => "machine CPU s per GB relayed (all processes)".into(),
        }
    }
}

type Samples = BTreeMap<(Figure, usize), Vec<f64>>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--role") {
        if let Err(e) = roles::run(&args[2..]) {
            eprintln!(
                "load {}: {e:#}",
                args.get(2).map(String::as_str).unwrap_or("")
            );
            std::process::exit(1);
        }
        return;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let opts = match Options::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("load: {e:#}");
            std::process::exit(2);
        }
    };
    if let Some(why) = cannot_run() {
        println!("load benchmark skipped: {why}");
        if ci {
            eprintln!("CI=true: a skip is a failure");
            std::process::exit(1);
        }
        return;
    }
    match run(opts, ci) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("load benchmark failed: {e:#}");
            std::process::exit(1);
        }
    }
}

fn cannot_run() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (network namespaces, iptables)".into());
    }
    for tool in ["ip", "iptables", "nsenter", "curl"] {
        let ok = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

fn run(mut opts: Options, ci: bool) -> Result<()> {
    let mut skipped = Vec::new();
    opts.targets.retain(|t| match t.missing() {
        Some(why) => {
            skipped.push(format!("{}: {why}", t.name()));
            false
        }
        None => true,
    });
    if !skipped.is_empty() {
        for s in &skipped {
            println!("target skipped: {s}");
        }
        if ci {
            bail!("CI=true: every target must run");
        }
    }
    let mut lab = Lab::new()?;
    lab.start_upstream(opts.endpoints.flag())?;
    let mut samples = Samples::new();
    let started = Instant::now();
    for round in 0..opts.rounds {
        // Targets take turns within a round, so drift over the run falls
        // on all of them alike.
        for (i, &target) in opts.targets.iter().enumerate() {
            eprintln!("round {}/{}: {}", round + 1, opts.rounds, target.name());
            let got = measure(&lab, target, &opts).with_context(|| {
                format!("{}:\n{}", target.name(), targets::log_of(&lab, target))
            })?;
            for (f, v) in got {
                samples.entry((f, i)).or_default().push(v);
            }
        }
    }
    let table = report(&opts, &samples);
    println!("{table}");
    eprintln!("load benchmark: {:.0} s", started.elapsed().as_secs_f64());
    if opts.smoke {
        smoke_check(&opts, &samples)?;
    }
    if opts.keep_logs {
        let dir = lab.keep_dir();
        eprintln!("logs and configs kept in {}", dir.display());
    }
    drop(lab);
    Ok(())
}

/// One target, one round: start it, run each load, stop it.
fn measure(lab: &Lab, target: Target, o: &Options) -> Result<Vec<(Figure, f64)>> {
    let gw = Gateway::start(lab, target, o.idle)?;
    let mut out = Vec::new();
    if target != Target::Direct && !targets::denies_other_names(lab)? {
        bail!("a name off the allowlist reached the upstream");
    }

    // Idle first, on a fresh process: RSS growth per connection.
    let pids = gw.pids();
    let rss = |pids: &[u32]| -> f64 {
        pids.iter()
            .map(|&p| procfs::status_kib(p, "VmRSS:"))
            .sum::<u64>() as f64
    };
    let fds =
        |pids: &[u32]| -> f64 { pids.iter().map(|&p| procfs::open_fds(p)).sum::<u64>() as f64 };
    let runs = |load: &str| o.only.is_empty() || o.only.iter().any(|l| l == load);
    if !pids.is_empty() && runs("idle") {
        let (rss0, fds0) = (rss(&pids), fds(&pids));
        let mut client = lab.client(&args(
            &["idle", "--to", UPSTREAM],
            &[("--count", o.idle as f64)],
        ))?;
        let end = read_until_end(&mut client, &pids, 60.0 + o.idle as f64 / 500.0)?;
        let established = end.kv.get("established").copied().unwrap_or(0.0);
        if established < o.idle as f64 {
            bail!("idle: {established} of {} connections established", o.idle);
        }
        let pids = gw.pids();
        let (rss1, fds1) = (rss(&pids), fds(&pids));
        out.push((Figure::IdleRss, rss1 / 1024.0));
        out.push((Figure::RssPerConn, (rss1 - rss0) / o.idle as f64));
        out.push((Figure::IdleFds, fds1));
        close_client(client)?;
        // Wait for the gateway to let go of them.
        let deadline = Instant::now() + Duration::from_secs(20);
        while fds(&gw.pids()) > fds0 + 16.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let mut cpu_gw = 0.0;
    let mut cpu_machine = 0.0;
    let mut bytes = 0.0;
    let bulks = if runs("bulk") {
        vec![(1, Figure::Bulk1), (32, Figure::Bulk32)]
    } else {
        Vec::new()
    };
    for (streams, figure) in bulks {
        let mut client = lab.client(&args(
            &["bulk", "--to", UPSTREAM, "--endpoints", o.endpoints.flag()],
            &[
                ("--streams", streams as f64),
                ("--warmup", o.warmup),
                ("--seconds", o.seconds),
            ],
        ))?;
        let end = read_until_end(&mut client, &gw.pids(), o.warmup + o.seconds + 60.0)?;
        wait_client(client)?;
        let b = end.kv.get("bytes").copied().unwrap_or(0.0);
        let secs = end.kv.get("secs").copied().unwrap_or(1.0);
        out.push((figure, b * 8.0 / secs / 1e9));
        cpu_gw += end.cpu_gateway;
        cpu_machine += end.cpu_machine;
        bytes += b;
    }
    if bytes > 0.0 {
        if target != Target::Direct {
            out.push((Figure::GatewayCpu, cpu_gw / (bytes / 1e9)));
        }
        out.push((Figure::MachineCpu, cpu_machine / (bytes / 1e9)));
    }
    if !runs("rate") {
        gw.stop();
        return Ok(out);
    }

    let mut client = lab.client(&args(
        &["rate", "--to", UPSTREAM],
        &[
            ("--concurrency", o.concurrency as f64),
            ("--warmup", o.warmup),
            ("--seconds", o.seconds),
            ("--max", o.max_conns as f64),
        ],
    ))?;
    let end = read_until_end(&mut client, &gw.pids(), o.warmup + o.seconds + 60.0)?;
    wait_client(client)?;
    let conns = end.kv.get("conns").copied().unwrap_or(0.0);
    let errors = end.kv.get("errors").copied().unwrap_or(0.0);
    if errors > conns / 1000.0 {
        bail!("rate: {errors} failed connections of {conns}");
    }
    out.push((
        Figure::ConnRate,
        conns / end.kv.get("secs").copied().unwrap_or(1.0),
    ));
    out.push((Figure::P50, end.kv.get("p50_us").copied().unwrap_or(0.0)));
    out.push((Figure::P99, end.kv.get("p99_us").copied().unwrap_or(0.0)));
    if target != Target::Direct && conns > 0.0 {
        out.push((Figure::ConnCpu, end.cpu_gateway / conns * 1e6));
    }

    gw.stop();
    Ok(out)
}

fn args(fixed: &[&str], nums: &[(&str, f64)]) -> Vec<String> {
    let mut v: Vec<String> = fixed.iter().map(|s| s.to_string()).collect();
    for (k, n) in nums {
        v.push(k.to_string());
        v.push(n.to_string());
    }
    v
}

/// A client's `end` line, and the CPU used between its `start` and its
/// `stop` (or `end`).
struct End {
    kv: BTreeMap<String, f64>,
    cpu_gateway: f64,
    cpu_machine: f64,
}

fn read_until_end(client: &mut Child, pids: &[u32], limit_s: f64) -> Result<End> {
    let stdout = client.stdout.take().context("no client stdout")?;
    // A client that hangs is killed; its stdout then ends.
    let pid = client.id();
    let watchdog = std::thread::spawn({
        let limit = Duration::from_secs_f64(limit_s);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        move || {
            if rx.recv_timeout(limit).is_err() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            drop(tx);
        }
    });
    let cpu = |pids: &[u32]| pids.iter().map(|&p| procfs::cpu_seconds(p)).sum::<f64>();
    let mut start = None;
    let mut stop = None;
    let mut kv = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        match line.split_whitespace().next() {
            Some("start") => start = Some((cpu(pids), procfs::machine_cpu_seconds())),
            Some("stop") => stop = Some((cpu(pids), procfs::machine_cpu_seconds())),
            Some("end") => {
                let now = (cpu(pids), procfs::machine_cpu_seconds());
                stop.get_or_insert(now);
                kv = Some(
                    line.split_whitespace()
                        .skip(1)
                        .filter_map(|p| p.split_once('='))
                        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
                        .collect(),
                );
                break;
            }
            _ => {}
        }
    }
    drop(watchdog);
    let kv = kv.context("the client ended without figures (timed out or failed)")?;
    let (s, e) = (start.unwrap_or_default(), stop.unwrap_or_default());
    Ok(End {
        kv,
        cpu_gateway: e.0 - s.0,
        cpu_machine: e.1 - s.1,
    })
}

fn wait_client(mut client: Child) -> Result<()> {
    let status = client.wait()?;
    if !status.success() {
        bail!("the client failed: {status}");
    }
    Ok(())
}

fn close_client(mut client: Child) -> Result<()> {
    if let Some(mut stdin) = client.stdin.take() {
        let _ = writeln!(stdin, "close");
    }
    wait_client(client)
}

// ---------------------------------------------------------------- report

fn stats(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    let median = if s.len() % 2 == 1 {
        s[mid]
    } else {
        (s[mid - 1] + s[mid]) / 2.0
    };
    Some((median, s[0], s[s.len() - 1]))
}

fn fmt(v: f64) -> String {
    match v.abs() {
        a if a >= 1000.0 => format!("{v:.0}"),
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

fn median_of(o: &Options, s: &Samples, f: Figure, t: Target) -> Option<f64> {
    let i = o.targets.iter().position(|&x| x == t)?;
    stats(s.get(&(f, i))?).map(|m| m.0)
}

fn report(o: &Options, s: &Samples) -> String {
    let mut out = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    out += &format!(
        "\nsluice load benchmark: {} round(s), {} s windows after {} s warm-up, {} idle connections, {} connection workers, {} endpoints\n",
        o.rounds,
        o.seconds,
        o.warmup,
        o.idle,
        o.concurrency,
        o.endpoints.flag()
    );
    out += &format!("machine: {cores} cores, {cpu}; {}\n\n", targets::versions());
    out += "| figure | target | median | min–max | × direct | × HAProxy | × HAProxy-1MiB |\n";
    out += "|---|---|---:|---:|---:|---:|---:|\n";
    for f in Figure::ALL {
        for (i, &t) in o.targets.iter().enumerate() {
            let Some((m, lo, hi)) = s.get(&(f, i)).and_then(|v| stats(v)) else {
                continue;
            };
            let ratio = |base: Target| {
                median_of(o, s, f, base)
                    .filter(|b| *b > 0.0 && base != t)
                    .map(|b| format!("{:.2}", m / b))
                    .unwrap_or_else(|| "".into())
            };
            out += &format!(
                "| {} | {} | {} | {}–{} | {} | {} | {} |\n",
                f.label(o.idle),
                t.name(),
                fmt(m),
                fmt(lo),
                fmt(hi),
                ratio(Target::Direct),
                ratio(Target::Haproxy),
                ratio(Target::Haproxy1m),
            );
        }
    }
    out += &goals(o, s);
    out
}

/// The goals, checked on the medians. "HAProxy" is the better of its two
/// configurations on each figure, so a goal is never met against the
/// weaker one only.
fn goals(o: &Options, s: &Samples) -> String {
    let m = |f, t| median_of(o, s, f, t);
    // The better HAProxy on `f`: the higher figure, or the lower where
    // lower is better.
    let best_haproxy = |f: Figure, lower_better: bool| {
        let (a, b) = (m(f, Target::Haproxy), m(f, Target::Haproxy1m));
        match (a, b) {
            (Some(a), Some(b)) if lower_better => Some(a.min(b)),
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    };
    let mut out = format!(
        "\ngoals (medians; endpoints {}; HAProxy = the better of haproxy and haproxy-1m):\n",
        o.endpoints.flag()
    );
    let mut line = |what: &str, ok: Option<bool>, detail: String| {
        let verdict = match ok {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        out += &format!("- {what}: {verdict} ({detail})\n");
    };
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let shown = |r: Option<f64>| format!("{:.2}×", r.unwrap_or(f64::NAN));
    for (f, n) in [(Figure::Bulk1, 1), (Figure::Bulk32, 32)] {
        let sl = m(f, Target::Sluice);
        let r = ratio(sl, m(f, Target::Direct));
        line(
            &format!("{n} stream(s) ≥ 0.90× direct"),
            r.map(|r| r >= 0.90),
            shown(r),
        );
        let r = ratio(sl, m(f, Target::Haproxy1m));
        line(
            &format!("{n} stream(s) ≥ 1.0× HAProxy with 1 MiB pipes"),
            r.map(|r| r >= 1.0),
            shown(r),
        );
    }
    let r = ratio(
        m(Figure::ConnRate, Target::Sluice),
        best_haproxy(Figure::ConnRate, false),
    );
    line(
        "new connections/s ≥ 1.2× HAProxy",
        r.map(|r| r >= 1.2),
        shown(r),
    );
    // Against HAProxy writing a line per connection, as sluice does.
    let r = ratio(
        m(Figure::ConnRate, Target::Sluice),
        m(Figure::ConnRate, Target::HaproxyLog),
    );
    line(
        "new connections/s ≥ 1.2× HAProxy with its per-connection log",
        r.map(|r| r >= 1.2),
        shown(r),
    );
    // Lower is better: sluice's median at or under the better HAProxy's.
    for (f, what, unit, digits) in [
        (Figure::P99, "p99 latency ≤ HAProxy's", "µs", 0),
        (
            Figure::RssPerConn,
            "RSS growth per idle connection ≤ HAProxy's",
            "KiB",
            2,
        ),
        (
            Figure::GatewayCpu,
            "gateway CPU s per GB ≤ HAProxy's",
            "s",
            3,
        ),
    ] {
        let pair = m(f, Target::Sluice).zip(best_haproxy(f, true));
        line(
            what,
            pair.map(|(a, b)| a <= b),
            pair.map(|(a, b)| format!("{a:.digits$} {unit} vs {b:.digits$} {unit}"))
                .unwrap_or_default(),
        );
    }
    if let Some((a, b)) =
        m(Figure::ConnCpu, Target::Sluice).zip(best_haproxy(Figure::ConnCpu, true))
    {
        out +=
            &format!("- (for the record) gateway CPU per new connection: {a:.0} µs vs {b:.0} µs\n");
    }
    out
}

/// The check under `cargo test`: every target produced every figure, and
/// each gateway moved bytes and held every idle connection.
fn smoke_check(o: &Options, s: &Samples) -> Result<()> {
    for (i, &t) in o.targets.iter().enumerate() {
        for f in Figure::ALL {
            let expected = match f {
                Figure::IdleRss
                | Figure::RssPerConn
                | Figure::IdleFds
                | Figure::GatewayCpu
                | Figure::ConnCpu => t != Target::Direct,
                _ => true,
            };
            let got = s.get(&(f, i)).and_then(|v| stats(v));
            match (expected, got) {
                (true, None) => bail!("{}: no figure for {f:?}", t.name()),
                (true, Some((m, _, _)))
                    if m <= 0.0 && !matches!(f, Figure::RssPerConn | Figure::GatewayCpu) =>
                {
                    bail!("{}: {f:?} is {m}", t.name())
                }
                _ => {}
            }
        }
        if t != Target::Direct {
            // Two per connection at least: the client's and the upstream's.
            let fds = median_of(o, s, Figure::IdleFds, t).unwrap_or(0.0);
            if fds < 2.0 * o.idle as f64 {
                bail!(
                    "{}: {fds} descriptors for {} relayed connections",
                    t.name(),
                    o.idle
                );
            }
            // sluice's idle connections hold no pipe: two sockets each.
            if t == Target::Sluice && fds > 2.0 * o.idle as f64 + 64.0 {
                bail!("sluice: {fds} descriptors for {} idle connections", o.idle);
            }
        }
    }
    Ok(())
}
