//! The bench's network: three namespaces on 198.19.248.0/23 (inside the
//! benchmarking range 198.18.0.0/15), made at start and removed on drop,
//! panics included.
//!
//! ```text
//!  client ns            gateway ns                     upstream ns
//!  198.19.248.2 ── veth ── 198.19.248.1 | 198.19.249.1 ── veth ── 198.19.249.2:443
//! ```
//!
//! The client dials the upstream's address. With `direct` the gateway
//! namespace only routes; with a proxy, the real rules script REDIRECTs
//! the client's TCP to port 15001 there and forwards nothing.

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub const CLIENT_IP: &str = "198.19.248.2";
pub const UPSTREAM_IP: &str = "198.19.249.2";
pub const UPSTREAM: &str = "198.19.249.2:443";
pub const UPSTREAM_NET: &str = "198.19.249.0/24";
pub const LISTEN_PORT: u16 = 15001;
const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/iptables/sluice-gateway.sh");
const PREFIX: &str = "slb-";

pub struct Lab {
    pub client: String,
    pub gateway: String,
    pub upstream: String,
    /// The gateway's interface towards the client: the rules hang on it.
    pub gateway_if: String,
    pub dir: tempfile::TempDir,
    server: Option<Child>,
}

pub fn sh(script: &str) -> Result<()> {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "{script}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A command run inside network namespace `ns` (nsenter execs it, so the
/// child's pid is the program's own).
pub fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg(program);
    c
}

/// Runs `f` on a thread that has entered namespace `ns`.
pub fn with_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> Result<T> {
        nix::sched::setns(File::open(&path)?, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
}

/// Waits until something accepts on `addr` inside `ns`.
pub fn wait_port(ns: &str, addr: &str) -> Result<()> {
    let addr: std::net::SocketAddr = addr.parse()?;
    let ok = with_ns(ns, move || {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    })?;
    if !ok {
        bail!("nothing listens on {addr} in {ns}");
    }
    Ok(())
}

impl Lab {
    pub fn new() -> Result<Lab> {
        remove_stale();
        let id = std::process::id();
        let lab = Lab {
            client: format!("{PREFIX}{id}-c"),
            gateway: format!("{PREFIX}{id}-g"),
            upstream: format!("{PREFIX}{id}-u"),
            gateway_if: format!("slb{id}gc"),
            dir: tempfile::tempdir()?,
            server: None,
        };
        // From here on an error drops `lab`, which removes what was made.
        let (c, g, u, gc) = (&lab.client, &lab.gateway, &lab.upstream, &lab.gateway_if);
        sh(&format!(
            "ip netns add {c}; ip netns add {g}; ip netns add {u}
             ip link add slb{id}cg type veth peer name {gc}
             ip link set slb{id}cg netns {c}; ip link set {gc} netns {g}
             ip link add slb{id}gu type veth peer name slb{id}ug
             ip link set slb{id}gu netns {g}; ip link set slb{id}ug netns {u}
             ip -n {c} addr add {CLIENT_IP}/24 dev slb{id}cg
             ip -n {g} addr add 198.19.248.1/24 dev {gc}
             ip -n {g} addr add 198.19.249.1/24 dev slb{id}gu
             ip -n {u} addr add {UPSTREAM_IP}/24 dev slb{id}ug
             for l in lo slb{id}cg; do ip -n {c} link set $l up; done
             for l in lo {gc} slb{id}gu; do ip -n {g} link set $l up; done
             for l in lo slb{id}ug; do ip -n {u} link set $l up; done
             ip -n {c} route add default via 198.19.248.1
             ip -n {u} route add default via 198.19.249.1
             nsenter --net=/run/netns/{g} sysctl -qw net.ipv4.ip_forward=1
             # New connections back to back: the client's and the
             # gateway's ephemeral ports are reused out of TIME_WAIT.
             for n in {c} {g}; do
               nsenter --net=/run/netns/$n sysctl -qw net.ipv4.ip_local_port_range='1024 65000'
               nsenter --net=/run/netns/$n sysctl -qw net.ipv4.tcp_tw_reuse=1
             done
             for n in {c} {g} {u}; do
               nsenter --net=/run/netns/$n sysctl -qw net.core.somaxconn=8192
               nsenter --net=/run/netns/$n sysctl -qw net.ipv4.tcp_max_syn_backlog=8192
             done"
        ))?;
        Ok(lab)
    }

    /// Starts the upstream server (this binary, `--role server`).
    pub fn start_upstream(&mut self, endpoints: &str) -> Result<()> {
        let exe = std::env::current_exe()?;
        let child = in_ns(&self.upstream, &exe.to_string_lossy())
            .args(["--role", "server", "--listen", UPSTREAM])
            .args(["--endpoints", endpoints])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the upstream")?;
        self.server = Some(child);
        wait_port(&self.client, UPSTREAM)
    }

    /// Keeps the working directory (logs, configs) past the run.
    pub fn keep_dir(&mut self) -> std::path::PathBuf {
        let dir = std::mem::replace(&mut self.dir, tempfile::TempDir::new().expect("a temp dir"));
        dir.keep()
    }

    /// Sends the client's TCP to port 15001 in the gateway (or stops it).
    pub fn redirect(&self, on: bool) -> Result<()> {
        let action = if on { "apply" } else { "remove" };
        sh(&format!(
            "nsenter --net=/run/netns/{} bash {RULES} {action} --iface {} --port {LISTEN_PORT}",
            self.gateway, self.gateway_if
        ))
    }

    /// A client run in the client namespace; its stdout is piped.
    pub fn client(&self, args: &[String]) -> Result<Child> {
        let exe = std::env::current_exe()?;
        in_ns(&self.client, &exe.to_string_lossy())
            .args(["--role", "client"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the client")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in [&self.client, &self.gateway, &self.upstream] {
            // Processes still inside would keep it alive: end them first.
            let _ = sh(&format!(
                "for p in $(ip netns pids {ns} 2>/dev/null); do kill -9 $p; done; ip netns del {ns} 2>/dev/null || true"
            ));
        }
    }
}

/// Namespaces left by a bench run that was killed (its pid gone).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh(&format!(
                "for p in $(ip netns pids {name}); do kill -9 $p; done; ip netns del {name}"
            ));
        }
    }
}
