//! The gateway's packet-filter rules for the sandboxes behind one interface
//! or one IPv4 subnet (`sluice rules`, and the launcher for each sandbox's
//! veth). Owns: what the rules are ([`Spec`] → `iptables-restore` text, a
//! pure function of the spec and what is installed), and installing,
//! removing and reading them.
//!
//! IPv4 and IPv6 each go in as one `iptables-restore --noflush` batch, so a
//! half-applied set is never live: the kernel takes the whole batch or
//! nothing. ARP bindings go through `arptables` commands (its restore in
//! Debian's 1.8.9 cannot name an existing chain with `--noflush`), under a
//! temporary DROP, so an apply that breaks off fails closed. `iptables/sluice-gateway.sh`
//! is the readable form of the same rules; `tests/rules_netns.rs` holds the
//! two equal.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

use crate::identity::MacAddr;

/// What the rules are for: one sandbox-facing interface, or one subnet of
/// sandbox sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Everything arriving on this interface (IPv6 included: dropped).
    Iface(String),
    /// Every IPv4 source in this subnet, on any interface.
    Subnet(Ipv4Net),
}

impl Target {
    /// The interface name or the subnet, checked.
    pub fn new(iface: Option<&str>, subnet: Option<&str>) -> Result<Target, RulesError> {
        match (iface, subnet) {
            (Some(i), None) => {
                let ok = (1..=15).contains(&i.len())
                    && i.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b));
                if ok {
                    Ok(Target::Iface(i.to_owned()))
                } else {
                    Err(RulesError::Invalid(format!("bad interface name: {i}")))
                }
            }
            (None, Some(s)) => s
                .parse::<Ipv4Net>()
                .map(|n| Target::Subnet(n.trunc()))
                .map_err(|_| RulesError::Invalid(format!("bad IPv4 subnet: {s}"))),
            _ => Err(RulesError::Invalid(
                "give exactly one of --iface or --subnet".into(),
            )),
        }
    }

    /// What the chains are named after (28 characters at most in all).
    fn tag(&self) -> String {
        match self {
            Target::Iface(i) => i.clone(),
            Target::Subnet(n) => n.to_string().replace('.', "_").replace('/', "-"),
        }
    }

    fn ip_match(&self) -> String {
        match self {
            Target::Iface(i) => format!("-i {i}"),
            Target::Subnet(n) => format!("-s {n}"),
        }
    }

    fn arp_match(&self) -> Vec<String> {
        match self {
            Target::Iface(i) => vec!["-i".into(), i.clone()],
            Target::Subnet(n) => vec!["--source-ip".into(), n.to_string()],
        }
    }
}

/// An address admitted only from one MAC (IPv4 and ARP alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
}

impl std::str::FromStr for Binding {
    type Err = RulesError;

    fn from_str(s: &str) -> Result<Binding, RulesError> {
        let bad = || RulesError::Invalid(format!("bad --bind (IP=MAC): {s}"));
        let (ip, mac) = s.split_once('=').ok_or_else(bad)?;
        Ok(Binding {
            ip: ip.parse().map_err(|_| bad())?,
            mac: mac.parse().map_err(|_| bad())?,
        })
    }
}

/// The options of `sluice rules apply` (and of the script).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub target: Target,
    /// The transparent listener that TCP is REDIRECTed to.
    pub port: u16,
    /// The explicit proxy, let through unredirected to the gateway's own
    /// addresses.
    pub proxy_port: Option<u16>,
    /// The DNS door that port 53 (UDP and TCP) is REDIRECTed to.
    pub dns_port: Option<u16>,
    /// With an interface: the one source address it may send from.
    pub source: Option<Ipv4Addr>,
    pub binds: Vec<Binding>,
    /// L2 chains with no binding yet: sluice binds at registration.
    pub dynamic: bool,
    /// The network below already prevents spoofing.
    pub l2_trusted: bool,
}

impl Spec {
    /// The rules for `target` with the listener on `port` and nothing else.
    pub fn new(target: Target, port: u16) -> Spec {
        Spec {
            target,
            port,
            proxy_port: None,
            dns_port: None,
            source: None,
            binds: Vec::new(),
            dynamic: false,
            l2_trusted: false,
        }
    }

    /// Checks the options against each other and against the link:
    /// `shared` is a bridge or a subnet, where a source address alone does
    /// not say which sandbox sent a packet.
    pub fn check(&self, shared: bool) -> Result<(), RulesError> {
        for p in [Some(self.port), self.proxy_port, self.dns_port]
            .into_iter()
            .flatten()
        {
            if p == 0 {
                return Err(RulesError::Invalid(format!("bad port: {p}")));
            }
        }
        if let Target::Iface(i) = &self.target
            && i == "lo"
        {
            return Err(RulesError::Refused(
                "lo is the gateway's own loopback, not a sandbox link".into(),
            ));
        }
        if let Target::Subnet(n) = &self.target
            && (n.contains(&Ipv4Addr::LOCALHOST) || n.prefix_len() == 0)
        {
            return Err(RulesError::Refused(format!(
                "{n} holds loopback or everything: not a sandbox subnet"
            )));
        }
        if self.source.is_some() && !matches!(self.target, Target::Iface(_)) {
            return Err(RulesError::Invalid("--source goes with --iface".into()));
        }
        if shared && self.binds.is_empty() && !self.dynamic && !self.l2_trusted {
            return Err(RulesError::Refused(format!(
                "{} is shared by several sandboxes and no --bind IP=MAC was given; a sandbox \
                 could claim a neighbour's address. Bind each address to its MAC, use \
                 --bind-dynamic (sluice binds at registration), or --l2-trusted if the network \
                 below already prevents spoofing",
                match &self.target {
                    Target::Iface(i) => i.clone(),
                    Target::Subnet(n) => n.to_string(),
                }
            )));
        }
        Ok(())
    }

    fn l2(&self) -> bool {
        !self.binds.is_empty() || self.dynamic
    }
}

/// Why the rules could not be read, applied or removed.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// A bad option (exit 2).
    #[error("{0}")]
    Invalid(String),
    /// Options that would leave a hole (exit 2).
    #[error("refusing: {0}")]
    Refused(String),
    /// `bind`/`unbind` on rules applied without L2 chains.
    #[error("no {0} chain: apply with --bind or --bind-dynamic first")]
    NoL2Chain(String),
    #[error("cannot run {program}")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

impl RulesError {
    /// A usage error (exit 2) rather than a failure to change the rules.
    pub fn is_usage(&self) -> bool {
        matches!(self, RulesError::Invalid(_) | RulesError::Refused(_))
    }
}

/// The chains of one target, named as the script names them.
struct Chains {
    raw: String,
    l2: String,
    arp: String,
    lsn: String,
    pre: String,
    input: String,
    fwd: String,
}

impl Chains {
    fn of(target: &Target) -> Chains {
        let tag = target.tag();
        Chains {
            raw: format!("SL-RAW-{tag}"),
            l2: format!("SL-L2-{tag}"),
            arp: format!("SL-ARP-{tag}"),
            lsn: format!("SL-LSN-{tag}"),
            pre: format!("SL-PRE-{tag}"),
            input: format!("SL-IN-{tag}"),
            fwd: format!("SL-FWD-{tag}"),
        }
    }
}

/// One chain as it should be: its table, its rules, and the jump into it.
struct Chain {
    table: &'static str,
    name: String,
    rules: Vec<String>,
    /// The parent chain and the match of the jump (`-I parent 1 <match> -j name`).
    parent: &'static str,
    jump_match: String,
}

/// What `iptables-save` (or `ip6tables-save`) printed, by table.
#[derive(Debug, Default, Clone)]
pub struct Saved {
    tables: Vec<(String, Vec<String>)>,
}

impl Saved {
    /// Reads the output of `iptables-save`.
    pub fn parse(text: &str) -> Saved {
        let mut saved = Saved::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(table) = line.strip_prefix('*') {
                saved.tables.push((table.to_owned(), Vec::new()));
            } else if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
                continue;
            } else if let Some((_, lines)) = saved.tables.last_mut() {
                lines.push(line.to_owned());
            }
        }
        saved
    }

    fn table(&self, name: &str) -> &[String] {
        self.tables
            .iter()
            .find(|(t, _)| t == name)
            .map(|(_, l)| l.as_slice())
            .unwrap_or(&[])
    }

    fn has_chain(&self, table: &str, chain: &str) -> bool {
        self.table(table)
            .iter()
            .any(|l| l.strip_prefix(':').and_then(|l| l.split(' ').next()) == Some(chain))
    }

    /// Every rule that jumps to `chain`, as saved (`-A parent … -j chain`).
    fn jumps_to<'a>(&'a self, table: &str, chain: &'a str) -> impl Iterator<Item = &'a String> {
        self.table(table).iter().filter(move |l| {
            l.starts_with("-A ") && {
                let mut words = l.split(' ');
                words.any(|w| w == "-j") && words.next() == Some(chain)
            }
        })
    }

    /// The lines that belong to `chain`: its jumps and its own rules.
    fn lines_of<'a>(&'a self, table: &str, chain: &str) -> Vec<&'a String> {
        let own = format!("-A {chain} ");
        self.table(table)
            .iter()
            .filter(|l| {
                l.starts_with(&own)
                    || (l.starts_with("-A ")
                        && l.split(' ')
                            .collect::<Vec<_>>()
                            .windows(2)
                            .any(|w| w == ["-j", chain]))
            })
            .collect()
    }
}

/// The IPv4 chains `spec` wants, in the order the script creates them (so
/// the jumps end in the same order).
fn v4_chains(spec: &Spec, c: &Chains) -> Vec<Chain> {
    let m = spec.target.ip_match();
    let mut out = Vec::new();
    if let Some(src) = spec.source {
        out.push(Chain {
            table: "raw",
            name: c.raw.clone(),
            rules: vec![format!("! -s {src}/32 -j DROP")],
            parent: "PREROUTING",
            jump_match: m.clone(),
        });
    }
    if spec.l2() {
        let mut rules: Vec<String> = spec.binds.iter().rev().map(l2_rule).collect();
        rules.push("-j DROP".into());
        out.push(Chain {
            table: "raw",
            name: c.l2.clone(),
            rules,
            parent: "PREROUTING",
            jump_match: m.clone(),
        });
    }
    // The listeners sandboxes reach only through REDIRECT (the
    // transparent door, the DNS door) are dropped for anything else that
    // is not loopback: another interface, an upstream network.
    let mut lsn = vec![format!(
        "-p tcp --dport {} ! -i lo -m conntrack ! --ctstate DNAT -j DROP",
        spec.port
    )];
    if let Some(d) = spec.dns_port {
        for proto in ["udp", "tcp"] {
            lsn.push(format!(
                "-p {proto} --dport {d} ! -i lo -m conntrack ! --ctstate DNAT -j DROP"
            ));
        }
    }
    out.push(Chain {
        table: "filter",
        name: c.lsn.clone(),
        rules: lsn,
        parent: "INPUT",
        jump_match: String::new(),
    });
    let mut pre = Vec::new();
    if let Some(p) = spec.proxy_port {
        pre.push(format!(
            "-p tcp --dport {p} -m addrtype --dst-type LOCAL -j RETURN"
        ));
    }
    if let Some(d) = spec.dns_port {
        pre.push(format!("-p udp --dport 53 -j REDIRECT --to-ports {d}"));
        pre.push(format!("-p tcp --dport 53 -j REDIRECT --to-ports {d}"));
    }
    pre.push(format!("-p tcp -j REDIRECT --to-ports {}", spec.port));
    // QUIC to any address becomes local, so the INPUT chain's REJECT
    // answers it at once whether or not this host forwards IPv4 (with
    // forwarding off, a packet for another address never reaches FORWARD).
    pre.push("-p udp --dport 443 -j REDIRECT --to-ports 443".into());
    out.push(Chain {
        table: "nat",
        name: c.pre.clone(),
        rules: pre,
        parent: "PREROUTING",
        jump_match: m.clone(),
    });
    let mut input = vec![
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_owned(),
        // Only REDIRECTed connections reach the listener: a sandbox that
        // dials the gateway's own address on another port (admin, metrics)
        // or the listener port directly is dropped.
        format!(
            "-p tcp --dport {} -m conntrack --ctstate DNAT -j ACCEPT",
            spec.port
        ),
    ];
    if let Some(p) = spec.proxy_port {
        input.push(format!(
            "-p tcp --dport {p} -m addrtype --dst-type LOCAL -j ACCEPT"
        ));
    }
    if let Some(d) = spec.dns_port {
        input.push(format!(
            "-p udp --dport {d} -m conntrack --ctstate DNAT -j ACCEPT"
        ));
        input.push(format!(
            "-p tcp --dport {d} -m conntrack --ctstate DNAT -j ACCEPT"
        ));
    }
    input.push("-p udp --dport 443 -j REJECT --reject-with icmp-port-unreachable".into());
    input.push("-j DROP".into());
    out.push(Chain {
        table: "filter",
        name: c.input.clone(),
        rules: input,
        parent: "INPUT",
        jump_match: m.clone(),
    });
    out.push(Chain {
        table: "filter",
        name: c.fwd.clone(),
        rules: vec![
            "-p udp --dport 443 -j REJECT --reject-with icmp-port-unreachable".into(),
            "-j DROP".into(),
        ],
        parent: "FORWARD",
        jump_match: m,
    });
    out
}

fn v6_chains(spec: &Spec, c: &Chains) -> Vec<Chain> {
    let Target::Iface(_) = spec.target else {
        return Vec::new();
    };
    let m = spec.target.ip_match();
    vec![
        Chain {
            table: "filter",
            name: c.input.clone(),
            rules: vec!["-j DROP".into()],
            parent: "INPUT",
            jump_match: m.clone(),
        },
        Chain {
            table: "filter",
            name: c.fwd.clone(),
            rules: vec!["-j DROP".into()],
            parent: "FORWARD",
            jump_match: m,
        },
    ]
}

fn l2_rule(b: &Binding) -> String {
    format!("-s {}/32 -m mac --mac-source {} -j RETURN", b.ip, b.mac)
}

/// Every chain this target may own in one family, by table.
fn all_v4(c: &Chains) -> Vec<(&'static str, &str)> {
    vec![
        ("raw", c.l2.as_str()),
        ("raw", c.raw.as_str()),
        ("nat", c.pre.as_str()),
        ("filter", c.lsn.as_str()),
        ("filter", c.input.as_str()),
        ("filter", c.fwd.as_str()),
    ]
}

fn all_v6(c: &Chains) -> Vec<(&'static str, &str)> {
    vec![("filter", c.input.as_str()), ("filter", c.fwd.as_str())]
}

/// One `iptables-restore --noflush` batch that leaves exactly `wanted` of
/// the chains in `ours` installed (with their jumps), whatever `saved`
/// shows was there before; `None` when there is nothing to change.
fn batch(ours: &[(&'static str, &str)], wanted: &[Chain], saved: &Saved) -> Option<String> {
    let mut out = String::new();
    for table in ["raw", "nat", "filter"] {
        let mut section = String::new();
        // Declaring a chain creates it, or empties one that exists.
        for w in wanted.iter().filter(|w| w.table == table) {
            let _ = writeln!(section, ":{} - [0:0]", w.name);
        }
        for (_, name) in ours.iter().filter(|(t, _)| *t == table) {
            for jump in saved.jumps_to(table, name) {
                let _ = writeln!(section, "-D{}", &jump[2..]);
            }
        }
        for (_, name) in ours.iter().filter(|(t, _)| *t == table) {
            let kept = wanted.iter().any(|w| w.name == *name);
            if !kept && saved.has_chain(table, name) {
                let _ = writeln!(section, "-F {name}\n-X {name}");
            }
        }
        for w in wanted.iter().filter(|w| w.table == table) {
            for rule in &w.rules {
                let _ = writeln!(section, "-A {} {rule}", w.name);
            }
            let m = if w.jump_match.is_empty() {
                String::new()
            } else {
                format!("{} ", w.jump_match)
            };
            let _ = writeln!(section, "-I {} 1 {m}-j {}", w.parent, w.name);
        }
        if !section.is_empty() {
            let _ = write!(out, "*{table}\n{section}COMMIT\n");
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The IPv4 and IPv6 batches that apply `spec` over what is installed.
pub fn apply_batches(spec: &Spec, v4: &Saved, v6: &Saved) -> (Option<String>, Option<String>) {
    let c = Chains::of(&spec.target);
    (
        batch(&all_v4(&c), &v4_chains(spec, &c), v4),
        batch(&all_v6(&c), &v6_chains(spec, &c), v6),
    )
}

/// The IPv4 and IPv6 batches that remove every rule of `target`.
pub fn remove_batches(target: &Target, v4: &Saved, v6: &Saved) -> (Option<String>, Option<String>) {
    let c = Chains::of(target);
    (batch(&all_v4(&c), &[], v4), batch(&all_v6(&c), &[], v6))
}

/// Runs a command with `input` on its stdin (bounded by iptables' own
/// `-w` wait for the xtables lock).
fn run(program: &'static str, args: &[&str], input: Option<&str>) -> Result<String, RulesError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RulesError::Spawn { program, source })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|source| RulesError::Spawn { program, source })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| RulesError::Spawn { program, source })?;
    if !out.status.success() {
        return Err(RulesError::Failed {
            program,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn save(program: &'static str) -> Result<Saved, RulesError> {
    run(program, &[], None).map(|t| Saved::parse(&t))
}

fn restore(program: &'static str, batch: &str) -> Result<(), RulesError> {
    run(program, &["-w", "10", "--noflush"], Some(batch)).map(|_| ())
}

/// Whether `target` is a link several sandboxes share: a bridge, or a
/// subnet (sources from anywhere).
pub fn is_shared(target: &Target) -> Result<bool, RulesError> {
    match target {
        Target::Subnet(_) => Ok(true),
        // `ip`, not /sys/class/net: under `nsenter --net` sysfs still shows
        // the namespace that mounted it.
        Target::Iface(i) => Ok(run("ip", &["-o", "link", "show", "type", "bridge"], None)?
            .lines()
            .any(|l| {
                l.split(": ")
                    .nth(1)
                    .map(|n| n.split('@').next() == Some(i))
                    .unwrap_or(false)
            })),
    }
}

/// Installs `spec`'s rules in this network namespace, replacing any of the
/// target's earlier ones. Idempotent.
pub fn apply(spec: &Spec) -> Result<(), RulesError> {
    spec.check(is_shared(&spec.target)?)?;
    if let Target::Iface(i) = &spec.target
        && upstream_ifaces()?.iter().any(|u| u == i)
    {
        return Err(RulesError::Refused(format!(
            "{i} carries this host's default route (its upstream): REDIRECTing it would capture the gateway's own traffic"
        )));
    }
    let c = Chains::of(&spec.target);
    let (v4, v6) = apply_batches(spec, &save("iptables-save")?, &save("ip6tables-save")?);
    // IPv6 and ARP first: by the time sandboxes are REDIRECTed, what must
    // be dropped already is.
    if let Some(b) = v6 {
        restore("ip6tables-restore", &b)?;
    }
    // A failure from here on fails closed, never open: the IPv6 set is a
    // drop-all whatever the options, the IPv4 batch is taken whole or not
    // at all (the earlier set stays), and an ARP change that breaks off
    // leaves its guard dropping the target's ARP until an apply succeeds
    // or the rules are removed. (Removing everything here instead would
    // leave the sandboxes unfiltered.)
    arp_apply(spec, &c)?;
    if let Some(b) = v4 {
        restore("iptables-restore", &b)?;
    }
    isolate_ports(&spec.target)?;
    Ok(())
}

/// On a bridge, every port is isolated: a sandbox's frames reach the
/// gateway (the bridge itself) and nothing else, so a neighbour can
/// neither answer ARP for the gateway's address nor send it raw frames.
/// Ports that join later are isolated by the next `apply` or `bind` (a
/// launch or a `--bind-dynamic` registration binds).
fn isolate_ports(target: &Target) -> Result<(), RulesError> {
    let Target::Iface(bridge) = target else {
        return Ok(());
    };
    if !is_shared(target)? {
        return Ok(());
    }
    let ports = run("ip", &["-o", "link", "show", "master", bridge], None)?;
    for line in ports.lines() {
        let Some(name) = line.split(": ").nth(1).and_then(|n| n.split('@').next()) else {
            continue;
        };
        run(
            "bridge",
            &["link", "set", "dev", name, "isolated", "on"],
            None,
        )?;
    }
    Ok(())
}

/// The interfaces this namespace's default routes leave by.
fn upstream_ifaces() -> Result<Vec<String>, RulesError> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        let routes = run("ip", &[family, "-o", "route", "show", "default"], None)?;
        for line in routes.lines() {
            let mut words = line.split_whitespace();
            while let Some(w) = words.next() {
                if w == "dev"
                    && let Some(dev) = words.next()
                {
                    out.push(dev.to_owned());
                }
            }
        }
    }
    Ok(out)
}

/// Removes every rule of `target`. On a clean namespace it does nothing.
pub fn remove(target: &Target) -> Result<(), RulesError> {
    let c = Chains::of(target);
    let (v4, v6) = remove_batches(target, &save("iptables-save")?, &save("ip6tables-save")?);
    if let Some(b) = v4 {
        restore("iptables-restore", &b)?;
    }
    arp_remove(target, &c)?;
    if let Some(b) = v6 {
        restore("ip6tables-restore", &b)?;
    }
    Ok(())
}

fn arptables(args: &[&str]) -> Result<(), RulesError> {
    run("arptables", args, None).map(|_| ())
}

fn arp_has_chain(chain: &str) -> Result<bool, RulesError> {
    Ok(Saved::parse(&run("arptables-save", &[], None)?).has_chain("filter", chain))
}

fn arp_drop_chain(target: &Target, chain: &str) -> Result<(), RulesError> {
    let mut jump: Vec<&str> = vec!["INPUT"];
    let m = target.arp_match();
    jump.extend(m.iter().map(String::as_str));
    jump.extend(["-j", chain]);
    loop {
        let check: Vec<&str> = ["-C"].into_iter().chain(jump.iter().copied()).collect();
        if run("arptables", &check, None).is_err() {
            break;
        }
        let delete: Vec<&str> = ["-D"].into_iter().chain(jump.iter().copied()).collect();
        arptables(&delete)?;
    }
    if arp_has_chain(chain)? {
        arptables(&["-F", chain])?;
        arptables(&["-X", chain])?;
    }
    Ok(())
}

fn arp_bind(verb: &str, chain: &str, b: &Binding) -> Result<(), RulesError> {
    let (ip, mac) = (b.ip.to_string(), b.mac.to_string());
    arptables(&[
        verb,
        chain,
        "--source-ip",
        &ip,
        "--source-mac",
        &mac,
        "-j",
        "RETURN",
    ])
}

fn arp_apply(spec: &Spec, c: &Chains) -> Result<(), RulesError> {
    let m = spec.target.arp_match();
    let m: Vec<&str> = m.iter().map(String::as_str).collect();
    // While the chain is replaced, ARP from the target is dropped; if a
    // step fails the guard stays (fail closed) until an apply succeeds or
    // the rules are removed.
    arptables(&[&["-I", "INPUT", "1"][..], &m, &["-j", "DROP"]].concat())?;
    arp_drop_chain(&spec.target, &c.arp)?;
    if spec.l2() {
        arptables(&["-N", &c.arp])?;
        arptables(&["-A", &c.arp, "-j", "DROP"])?;
        for b in &spec.binds {
            arp_bind("-I", &c.arp, b)?;
        }
        arptables(&[&["-I", "INPUT", "2"][..], &m, &["-j", &c.arp]].concat())?;
    }
    arp_unguard(&spec.target)
}

/// Deletes every guard a broken-off ARP apply left.
fn arp_unguard(target: &Target) -> Result<(), RulesError> {
    let m = target.arp_match();
    let m: Vec<&str> = m.iter().map(String::as_str).collect();
    let guard: Vec<&str> = [&["INPUT"][..], &m, &["-j", "DROP"]].concat();
    while run("arptables", &[&["-C"][..], &guard].concat(), None).is_ok() {
        arptables(&[&["-D"][..], &guard].concat())?;
    }
    Ok(())
}

fn arp_remove(target: &Target, c: &Chains) -> Result<(), RulesError> {
    arp_drop_chain(target, &c.arp)?;
    arp_unguard(target)
}

/// Admits (`bind`) or no longer admits (`unbind`) one address from one
/// MAC, on rules applied with `--bind` or `--bind-dynamic`. Idempotent.
pub fn bind(target: &Target, b: &Binding, add: bool) -> Result<(), RulesError> {
    let c = Chains::of(target);
    let saved = save("iptables-save")?;
    if !saved.has_chain("raw", &c.l2) {
        return Err(RulesError::NoL2Chain(c.l2));
    }
    let rule = format!("-A {} {}", c.l2, l2_rule(b));
    let present: Vec<&String> = saved
        .table("raw")
        .iter()
        .filter(|l| l.eq_ignore_ascii_case(&rule))
        .collect();
    if add && present.is_empty() {
        restore(
            "iptables-restore",
            &format!("*raw\n-I {} 1 {}\nCOMMIT\n", c.l2, l2_rule(b)),
        )?;
        arp_bind("-I", &c.arp, b)?;
        // The sandbox's port may be new since the last apply.
        isolate_ports(target)?;
    } else if !add && !present.is_empty() {
        let mut text = String::from("*raw\n");
        for line in &present {
            let _ = writeln!(text, "-D{}", &line[2..]);
        }
        text.push_str("COMMIT\n");
        restore("iptables-restore", &text)?;
        for _ in &present {
            if arp_bind("-D", &c.arp, b).is_err() {
                break;
            }
        }
    }
    Ok(())
}

/// What is installed for `target`, as `iptables-save` lines by family and
/// table, and whether the rules are applied (every chain a plain apply
/// makes is there).
pub fn status(target: &Target) -> Result<(bool, String), RulesError> {
    let c = Chains::of(target);
    let (v4, v6) = (save("iptables-save")?, save("ip6tables-save")?);
    let arp = Saved::parse(&run("arptables-save", &[], None)?);
    let mut out = String::new();
    let mut report = |family: &str, saved: &Saved, chains: &[(&'static str, &str)]| {
        for (table, name) in chains {
            if saved.has_chain(table, name) {
                let _ = writeln!(out, "{family} {table} {name}:");
                for line in saved.lines_of(table, name) {
                    let _ = writeln!(out, "  {line}");
                }
            } else {
                let _ = writeln!(out, "{family} {table} {name}: absent");
            }
        }
    };
    report("ipv4", &v4, &all_v4(&c));
    if let Target::Iface(_) = target {
        report("ipv6", &v6, &all_v6(&c));
    }
    report("arp", &arp, &[("filter", c.arp.as_str())]);
    let applied = [
        ("nat", &c.pre),
        ("filter", &c.lsn),
        ("filter", &c.input),
        ("filter", &c.fwd),
    ]
    .iter()
    .all(|(t, n)| v4.has_chain(t, n));
    Ok((applied, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface_spec() -> Spec {
        let mut s = Spec::new(Target::Iface("veth-sb0".into()), 15001);
        s.proxy_port = Some(8443);
        s.dns_port = Some(15053);
        s.source = Some("10.213.0.2".parse().unwrap_or(Ipv4Addr::LOCALHOST));
        s
    }

    #[test]
    fn a_first_apply_declares_fills_and_jumps() {
        let (v4, v6) = apply_batches(&iface_spec(), &Saved::default(), &Saved::default());
        let v4 = v4.unwrap_or_default();
        assert!(v4.starts_with("*raw\n:SL-RAW-veth-sb0 - [0:0]\n"), "{v4}");
        assert!(v4.contains("-A SL-RAW-veth-sb0 ! -s 10.213.0.2/32 -j DROP\n"));
        assert!(v4.contains("-I PREROUTING 1 -i veth-sb0 -j SL-PRE-veth-sb0\n"));
        assert!(v4.contains("-A SL-PRE-veth-sb0 -p udp --dport 53 -j REDIRECT --to-ports 15053\n"));
        assert!(v4.contains("-I INPUT 1 -j SL-LSN-veth-sb0\n"));
        assert!(
            !v4.contains("-D "),
            "nothing to delete on a clean namespace"
        );
        assert!(!v4.contains("SL-L2-"), "no L2 chain without a binding");
        assert_eq!(v4.matches("COMMIT").count(), 3);
        let v6 = v6.unwrap_or_default();
        assert!(v6.contains("-I INPUT 1 -i veth-sb0 -j SL-IN-veth-sb0\n"));
    }

    #[test]
    fn a_reapply_deletes_the_old_jumps_and_drops_chains_no_longer_wanted() {
        let saved = Saved::parse(
            "*raw\n:PREROUTING ACCEPT [0:0]\n:SL-RAW-veth-sb0 - [0:0]\n\
             -A PREROUTING -i veth-sb0 -j SL-RAW-veth-sb0\n\
             -A SL-RAW-veth-sb0 ! -s 10.213.0.9/32 -j DROP\nCOMMIT\n\
             *filter\n:INPUT ACCEPT [0:0]\n:SL-IN-veth-sb0 - [0:0]\n\
             -A INPUT -i veth-sb0 -j SL-IN-veth-sb0\n-A INPUT -i veth-sb0 -j SL-IN-veth-sb0\n\
             -A INPUT -i other -j SL-IN-other\nCOMMIT\n",
        );
        let mut spec = iface_spec();
        spec.source = None;
        let (v4, _) = apply_batches(&spec, &saved, &Saved::default());
        let v4 = v4.unwrap_or_default();
        assert!(v4.contains("-D PREROUTING -i veth-sb0 -j SL-RAW-veth-sb0\n-F SL-RAW-veth-sb0\n-X SL-RAW-veth-sb0\n"), "{v4}");
        assert_eq!(
            v4.matches("-D INPUT -i veth-sb0 -j SL-IN-veth-sb0\n")
                .count(),
            2
        );
        assert!(
            !v4.contains("SL-IN-other"),
            "another target's rules are left alone"
        );
    }

    #[test]
    fn remove_on_a_clean_namespace_changes_nothing() {
        let t = Target::Iface("veth-sb0".into());
        assert_eq!(
            remove_batches(&t, &Saved::default(), &Saved::default()),
            (None, None)
        );
    }

    #[test]
    fn a_subnet_has_no_ipv6_rules_and_needs_bindings() {
        let t = Target::new(None, Some("198.18.0.0/24")).unwrap_or(Target::Iface("x".into()));
        assert_eq!(t.tag(), "198_18_0_0-24");
        let mut spec = Spec::new(t, 15001);
        assert!(matches!(spec.check(true), Err(RulesError::Refused(_))));
        spec.l2_trusted = true;
        assert!(spec.check(true).is_ok());
        let (v4, v6) = apply_batches(&spec, &Saved::default(), &Saved::default());
        assert!(
            v4.unwrap_or_default()
                .contains("-I INPUT 1 -s 198.18.0.0/24 -j SL-IN-198_18_0_0-24")
        );
        assert_eq!(v6, None);
        spec.source = "198.18.0.2".parse().ok();
        assert!(matches!(spec.check(true), Err(RulesError::Invalid(_))));
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(Target::new(Some("a b"), None).is_err());
        assert!(Target::new(Some("sixteen-chars-xx"), None).is_err());
        assert!(Target::new(None, Some("10.0.0.0/33")).is_err());
        assert!(Target::new(Some("x"), Some("10.0.0.0/8")).is_err());
        assert!(Target::new(None, None).is_err());
        assert!("10.0.0.2".parse::<Binding>().is_err());
        assert!("10.0.0.2=zz:00:00:00:00:01".parse::<Binding>().is_err());
        assert!("10.0.0.2=02:00:00:00:00:01".parse::<Binding>().is_ok());
        let mut spec = Spec::new(Target::Iface("x".into()), 0);
        assert!(spec.check(false).is_err());
        spec.port = 1;
        assert!(spec.check(false).is_ok());
    }
}
