//! The gateways under test, each started in the gateway namespace with
//! the same job: let TLS to `{bulk,rate,idle}.bench.test` through to the
//! upstream and nothing else, deciding on the ClientHello's SNI.
//!
//! - `direct`: no gateway; the namespace routes (the baseline).
//! - `sluice`: `sluice serve`, the client registered with a token allowing
//!   the three names, resolved by `[gateway.resolve]`.
//! - `haproxy`: Debian's HAProxy in TCP mode, `req.ssl_sni` allowlist,
//!   splice on in both directions, default (64 KiB) pipes.
//! - `haproxy-1m`: the same with `tune.pipesize 1048576`, HAProxy's own
//!   answer to single-stream throughput.
//! - `haproxy-log`: `haproxy` with a log line per connection (`option
//!   tcplog` to its stdout, a file), as sluice writes an audit line per
//!   connection: the fair comparison for the connection rate.
//! - `nginx`: Debian's nginx, stream module, `ssl_preread` and a `map`
//!   allowlist.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::lab::{self, CLIENT_IP, LISTEN_PORT, Lab, UPSTREAM, UPSTREAM_IP, UPSTREAM_NET};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Direct,
    Sluice,
    Haproxy,
    Haproxy1m,
    HaproxyLog,
    Nginx,
}

impl Target {
    pub const ALL: [Target; 6] = [
        Target::Direct,
        Target::Sluice,
        Target::Haproxy,
        Target::Haproxy1m,
        Target::HaproxyLog,
        Target::Nginx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Sluice => "sluice",
            Target::Haproxy => "haproxy",
            Target::Haproxy1m => "haproxy-1m",
            Target::HaproxyLog => "haproxy-log",
            Target::Nginx => "nginx",
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == s)
    }

    /// Why this target cannot run here, if it cannot.
    pub fn missing(self) -> Option<String> {
        let program = match self {
            Target::Direct | Target::Sluice => return None,
            Target::Haproxy | Target::Haproxy1m | Target::HaproxyLog => "haproxy",
            Target::Nginx => "nginx",
        };
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(program).exists()))
            .unwrap_or(false);
        let found = found || Path::new("/usr/sbin").join(program).exists();
        (!found).then(|| format!("{program} is not installed (apt-get install -y {program})"))
    }
}

/// A gateway running for one round of measurements.
pub struct Gateway {
    child: Option<Child>,
}

const NAMES: [&str; 3] = ["bulk.bench.test", "rate.bench.test", "idle.bench.test"];

impl Gateway {
    /// Starts `target` in the lab's gateway namespace and waits until it
    /// takes connections; `max_conns` is the idle test's count.
    pub fn start(lab: &Lab, target: Target, max_conns: usize) -> Result<Gateway> {
        let child = match target {
            Target::Direct => None,
            Target::Sluice => Some(start_sluice(lab, max_conns)?),
            Target::Haproxy => Some(start_haproxy(lab, max_conns, None, false)?),
            Target::Haproxy1m => Some(start_haproxy(lab, max_conns, Some(1 << 20), false)?),
            Target::HaproxyLog => Some(start_haproxy(lab, max_conns, None, true)?),
            Target::Nginx => Some(start_nginx(lab, max_conns)?),
        };
        let gw = Gateway { child };
        if target != Target::Direct {
            lab::wait_port(&lab.gateway, &format!("127.0.0.1:{LISTEN_PORT}"))?;
            if target == Target::Sluice {
                register(lab)?;
            }
        }
        lab.redirect(target != Target::Direct)?;
        Ok(gw)
    }

    /// The processes whose CPU, memory and descriptors are the gateway's.
    pub fn pids(&self) -> Vec<u32> {
        match &self.child {
            None => Vec::new(),
            Some(c) => crate::procfs::family(c.id()),
        }
    }

    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM first (nginx's master takes its workers with it).
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

fn log_file(lab: &Lab, name: &str) -> Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(lab.dir.path().join(name))?)
}

fn spawn(lab: &Lab, program: &str, args: &[&str], log: &str) -> Result<Child> {
    let log = log_file(lab, log)?;
    lab::in_ns(&lab.gateway, program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {program}"))
}

fn start_sluice(lab: &Lab, max_conns: usize) -> Result<Child> {
    let dir = lab.dir.path();
    let state = dir.join("sluice-state");
    // A fresh start each round: no registration carried over.
    let _ = std::fs::remove_dir_all(&state);
    let resolve: String = NAMES
        .iter()
        .map(|n| format!("\"{n}\" = [\"{UPSTREAM_IP}\"]\n"))
        .collect();
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            r#"state_dir = "{}"
[gateway]
transparent_listen = "0.0.0.0:{LISTEN_PORT}"
proxy_listen = "127.0.0.1:18443"
allowed_ports = [443]
allow_destinations = ["{UPSTREAM_NET}"]
max_connections = {max}
max_connections_per_sandbox = {max}
max_connections_per_source = {max}
[gateway.resolve]
{resolve}
[admin]
listen = "127.0.0.1:19080"
[metrics]
listen = "127.0.0.1:19090"
"#,
            state.display(),
            max = max_conns + 1024,
        ),
    )?;
    let config = config.to_string_lossy().into_owned();
    // SLUICE_BENCH_BIN runs another build (an earlier commit's) in the
    // same lab, for a side-by-side run.
    let exe = std::env::var("SLUICE_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_sluice").to_owned());
    spawn(lab, &exe, &["serve", "--config", &config], "sluice.log")
}

/// Mints a token for the three names and registers the client's address,
/// through the admin API (curl inside the gateway namespace).
fn register(lab: &Lab) -> Result<()> {
    lab::wait_port(&lab.gateway, "127.0.0.1:19080")?;
    let token_file = lab.dir.path().join("sluice-state/admin-token");
    let admin = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading {}", token_file.display()))?;
    let call = |path: &str, body: serde_json::Value| -> Result<serde_json::Value> {
        let out = lab::in_ns(&lab.gateway, "curl")
            .args(["-sS", "--fail-with-body", "--max-time", "10", "-X", "POST"])
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", admin.trim()))
            .args(["-H", "Content-Type: application/json", "-d"])
            .arg(body.to_string())
            .arg(format!("http://127.0.0.1:19080{path}"))
            .output()?;
        if !out.status.success() {
            bail!(
                "admin {path}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let minted = call(
        "/v1/tokens",
        serde_json::json!({"container_id": "bench", "user_id": "bench",
            "allowed_hosts": NAMES, "ttl_seconds": 3600}),
    )?;
    let token = minted["token"]
        .as_str()
        .with_context(|| format!("no token in {minted}"))?;
    call(
        "/v1/sandboxes",
        serde_json::json!({"source_ip": CLIENT_IP, "token": token}),
    )?;
    Ok(())
}

/// HAProxy, with `tune.pipesize` when `pipesize` is given.
fn start_haproxy(lab: &Lab, max_conns: usize, pipesize: Option<usize>, log: bool) -> Result<Child> {
    let config = lab.dir.path().join("haproxy.cfg");
    let tune = pipesize
        .map(|n| format!("    tune.pipesize {n}\n"))
        .unwrap_or_default();
    // One line per connection on stdout, which `spawn` sends to a file.
    let (global_log, defaults_log) = if log {
        (
            "    log stdout format raw local0\n",
            "    log global\n    option tcplog\n",
        )
    } else {
        ("", "")
    };
    std::fs::write(
        &config,
        format!(
            "global
    maxconn {max}
    maxpipes 512
    nbthread 2
{global_log}{tune}defaults
{defaults_log}    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    option splice-request
    option splice-response
frontend sni
    bind 0.0.0.0:{LISTEN_PORT}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    tcp-request content reject
    use_backend upstream if {{ req.ssl_sni -i {names} }}
backend upstream
    server u {UPSTREAM}
",
            max = max_conns + 128,
            names = NAMES.join(" "),
        ),
    )?;
    let config = config.to_string_lossy().into_owned();
    spawn(lab, "haproxy", &["-db", "-f", &config], "haproxy.log")
}

fn start_nginx(lab: &Lab, max_conns: usize) -> Result<Child> {
    let dir = lab.dir.path().join("nginx");
    std::fs::create_dir_all(dir.join("logs"))?;
    let map: String = NAMES
        .iter()
        .map(|n| format!("        {n} {UPSTREAM};\n"))
        .collect();
    let config = dir.join("nginx.conf");
    std::fs::write(
        &config,
        format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
worker_processes 2;
worker_rlimit_nofile {nofile};
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log warn;
events {{ worker_connections {conns}; }}
stream {{
    map $ssl_preread_server_name $allowed {{
{map}        default 127.0.0.1:1;
    }}
    server {{
        listen 0.0.0.0:{LISTEN_PORT};
        ssl_preread on;
        preread_timeout 5s;
        proxy_connect_timeout 5s;
        proxy_timeout 300s;
        proxy_pass $allowed;
    }}
}}
",
            dir = dir.display(),
            nofile = max_conns * 2 + 512,
            conns = max_conns * 2 + 256,
        ),
    )?;
    let (config, prefix) = (
        config.to_string_lossy().into_owned(),
        dir.to_string_lossy().into_owned(),
    );
    let mut c = spawn(
        lab,
        "nginx",
        &["-p", &prefix, "-e", "logs/error.log", "-c", &config],
        "nginx.log",
    )?;
    // A config error ends nginx at once; say why.
    std::thread::sleep(std::time::Duration::from_millis(200));
    if let Ok(Some(status)) = c.try_wait() {
        let log = std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default();
        bail!("nginx exited ({status}): {log}");
    }
    Ok(c)
}

/// What a gateway printed, for an error message.
pub fn log_of(lab: &Lab, target: Target) -> String {
    let name = match target {
        Target::Direct => return String::new(),
        Target::Sluice => "sluice.log",
        Target::Haproxy | Target::Haproxy1m | Target::HaproxyLog => "haproxy.log",
        Target::Nginx => "nginx/logs/error.log",
    };
    let text = std::fs::read_to_string(lab.dir.path().join(name)).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(20).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Checks that the gateway really decides: a name off the allowlist must
/// not reach the upstream's answer.
pub fn denies_other_names(lab: &Lab) -> Result<bool> {
    let hello = crate::roles::client_hello("other.bench.test");
    lab::with_ns(&lab.client, move || {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(
            &UPSTREAM.parse().expect("a socket address"),
            std::time::Duration::from_secs(5),
        ) else {
            return true;
        };
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
        let _ = s.write_all(&hello);
        let mut buf = [0u8; 64];
        // Denied: closed, reset, or an alert (21), never the upstream's
        // 0x16 bytes (the upstream closes on a name it does not know).
        !matches!(s.read(&mut buf), Ok(n) if n > 0 && buf[0] == 0x16)
    })
}

/// The command that printed the table, for the record.
pub fn versions() -> String {
    let v = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .map(|o| {
                let s = String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr);
                s.lines().next().unwrap_or("").trim().to_owned()
            })
            .unwrap_or_else(|_| "not installed".to_owned())
    };
    format!(
        "{}; {}; kernel {}",
        v("haproxy", &["-v"]),
        v("nginx", &["-v"]),
        v("uname", &["-r"])
    )
}
