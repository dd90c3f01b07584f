//! A three-namespace lab for root-only tests: `sb` (the sandbox, 198.18.0.2-4),
//! `gw` (the gateway: sluice and the `iptables/` rules, 198.18.0.1 and
//! 198.18.1.1) and `up` (upstream servers, 198.18.1.10-11). Sockets are
//! bound inside a namespace by a helper thread that `setns`es first; the
//! sockets keep their namespace. Dropping the lab kills what it started and
//! deletes the namespaces (and with them the veths and the rules).
#![allow(dead_code, clippy::unwrap_used)]

use std::fs::File;
use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub use crate::support::pattern;

pub const BIG: usize = 100 * 1024 * 1024;
/// The bridged lab's sandbox MACs.
pub const MAC_A: &str = "02:00:5e:00:00:0a";
pub const MAC_B: &str = "02:00:5e:00:00:0b";

/// Root and the tools, or a skip with a reason (a failure under CI=true).
pub fn require_root(test: &str) -> bool {
    require_root_and(test, &[])
}

/// As [`require_root`], with more tools the test needs.
pub fn require_root_and(test: &str, more: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_owned());
    }
    let base = [
        "ip",
        "iptables",
        "ip6tables",
        "nsenter",
        "curl",
        "openssl",
        "timeout",
    ];
    for tool in base.iter().chain(more) {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            missing.push((*tool).to_owned());
        }
    }
    if missing.is_empty() {
        return true;
    }
    let reason = format!("{test}: needs {}", missing.join(", "));
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{reason} (CI=true: a skip is a failure)");
    }
    eprintln!("SKIPPED {reason}");
    false
}

pub struct CurlOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for CurlOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

pub struct Lab {
    pub id: String,
    pub gw: String,
    pub sb: String,
    pub up: String,
    pub gw_if: String,
    /// More sandbox namespaces (the bridged lab's second sandbox).
    pub extra_ns: Vec<String>,
    pub dir: tempfile::TempDir,
    children: Vec<Child>,
    sluice: Option<Child>,
    sluice_config: PathBuf,
    sluice_log: PathBuf,
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A bash script (`-euo pipefail`) that must succeed; its stderr in the
/// panic when it does not.
pub fn sh(script: &str) {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn bash(script: &str) {
    run(Command::new("bash").args(["-euo", "pipefail", "-c", script]));
}

impl Lab {
    pub fn new(tag: &str) -> Lab {
        Self::with_rules(tag, "")
    }

    /// A lab whose gateway rules get `extra` arguments (e.g. `--proxy-port 8443`).
    pub fn with_rules(tag: &str, extra: &str) -> Lab {
        let id = format!("{tag}{}", std::process::id() % 100_000);
        let lab = Lab {
            gw: format!("sl-{id}-gw"),
            sb: format!("sl-{id}-sb"),
            up: format!("sl-{id}-up"),
            gw_if: format!("sl{id}gs"),
            extra_ns: Vec::new(),
            id: id.clone(),
            dir: tempfile::tempdir().unwrap(),
            children: Vec::new(),
            sluice: None,
            sluice_config: PathBuf::new(),
            sluice_log: PathBuf::new(),
        };
        // From here on a panic drops `lab`, which cleans up.
        let (gw, sb, up, gs) = (&lab.gw, &lab.sb, &lab.up, &lab.gw_if);
        let (sg, gu, ug) = (
            format!("sl{id}sg"),
            format!("sl{id}gu"),
            format!("sl{id}ug"),
        );
        let rules = env!("CARGO_BIN_EXE_sluice");
        bash(&format!(
            "ip netns add {gw}; ip netns add {sb}; ip netns add {up}
             ip link add {gs} type veth peer name {sg}
             ip link set {gs} netns {gw}; ip link set {sg} netns {sb}
             ip link add {gu} type veth peer name {ug}
             ip link set {gu} netns {gw}; ip link set {ug} netns {up}
             ip -n {gw} addr add 198.18.0.1/24 dev {gs}
             ip -n {gw} addr add 198.18.1.1/24 dev {gu}
             for l in lo {gs} {gu}; do ip -n {gw} link set $l up; done
             for a in 2 3 4; do ip -n {sb} addr add 198.18.0.$a/24 dev {sg}; done
             ip -n {sb} link set lo up; ip -n {sb} link set {sg} up
             ip -n {sb} route add default via 198.18.0.1
             ip -n {up} addr add 198.18.1.10/24 dev {ug}
             ip -n {up} addr add 198.18.1.11/24 dev {ug}
             ip -n {up} link set lo up; ip -n {up} link set {ug} up
             ip -n {up} route add 198.18.0.0/24 via 198.18.1.1
             nsenter --net=/run/netns/{gw} sysctl -qw net.ipv4.ip_forward=1
             nsenter --net=/run/netns/{gw} {rules} rules apply --iface {gs} {extra}
             nsenter --net=/run/netns/{gw} {rules} rules apply --iface {gs} {extra}"
        ));
        lab
    }

    /// A lab whose sandboxes share one bridge in the gateway, as pods on a
    /// node do: `sb` is 198.18.0.2 (MAC `MAC_A`), `extra_ns[0]` is
    /// 198.18.0.3 (MAC `MAC_B`), both ports of bridge `gw_if`
    /// (198.18.0.1). No rules are applied: the test applies them.
    pub fn bridged(tag: &str) -> Lab {
        let id = format!("{tag}{}", std::process::id() % 100_000);
        let lab = Lab {
            gw: format!("sl-{id}-gw"),
            sb: format!("sl-{id}-sb"),
            up: format!("sl-{id}-up"),
            gw_if: format!("sl{id}br"),
            extra_ns: vec![format!("sl-{id}-s2")],
            id: id.clone(),
            dir: tempfile::tempdir().unwrap(),
            children: Vec::new(),
            sluice: None,
            sluice_config: PathBuf::new(),
            sluice_log: PathBuf::new(),
        };
        let (gw, sb, s2, up, br) = (&lab.gw, &lab.sb, &lab.extra_ns[0], &lab.up, &lab.gw_if);
        bash(&format!(
            "ip netns add {gw}; ip netns add {sb}; ip netns add {s2}; ip netns add {up}
             ip -n {gw} link add {br} type bridge
             ip link add sl{id}pa type veth peer name sl{id}ea address {MAC_A}
             ip link add sl{id}pb type veth peer name sl{id}eb address {MAC_B}
             ip link set sl{id}pa netns {gw}; ip link set sl{id}pb netns {gw}
             ip link set sl{id}ea netns {sb}; ip link set sl{id}eb netns {s2}
             ip -n {gw} link set sl{id}pa master {br}; ip -n {gw} link set sl{id}pb master {br}
             ip -n {gw} addr add 198.18.0.1/24 dev {br}
             for l in lo {br} sl{id}pa sl{id}pb; do ip -n {gw} link set $l up; done
             ip -n {sb} addr add 198.18.0.2/24 dev sl{id}ea
             ip -n {s2} addr add 198.18.0.3/24 dev sl{id}eb
             for n in {sb} {s2}; do ip -n $n link set lo up; done
             ip -n {sb} link set sl{id}ea up; ip -n {s2} link set sl{id}eb up
             ip -n {sb} route add default via 198.18.0.1; ip -n {s2} route add default via 198.18.0.1
             ip link add sl{id}gu type veth peer name sl{id}ug
             ip link set sl{id}gu netns {gw}; ip link set sl{id}ug netns {up}
             ip -n {gw} addr add 198.18.1.1/24 dev sl{id}gu; ip -n {gw} link set sl{id}gu up
             ip -n {up} addr add 198.18.1.10/24 dev sl{id}ug
             ip -n {up} link set lo up; ip -n {up} link set sl{id}ug up
             ip -n {up} route add 198.18.0.0/24 via 198.18.1.1
             nsenter --net=/run/netns/{gw} sysctl -qw net.ipv4.ip_forward=1"
        ));
        lab
    }

    /// `sluice rules <args>`, run in the gateway namespace: its exit code
    /// and what it printed.
    pub fn rules(&self, args: &str) -> CurlOut {
        let sluice = env!("CARGO_BIN_EXE_sluice");
        let out = Command::new("nsenter")
            .arg(format!("--net={}", Self::ns_path(&self.gw)))
            .args(["bash", "-c", &format!("{sluice} rules {args}")])
            .output()
            .unwrap();
        CurlOut {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn ns_path(ns: &str) -> String {
        format!("/run/netns/{ns}")
    }

    /// Runs `f` on a thread that has entered namespace `ns`.
    pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = Self::ns_path(ns);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap();
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    pub fn listen_upstream(&self, addr: &str) -> TcpListener {
        let addr = addr.to_owned();
        Self::in_ns(&self.up, move || TcpListener::bind(addr).unwrap())
    }

    pub fn udp_upstream(&self, addr: &str) -> UdpSocket {
        let addr = addr.to_owned();
        Self::in_ns(&self.up, move || UdpSocket::bind(addr).unwrap())
    }

    fn wait_port(&self, ns: &str, addr: &str) {
        let addr = addr.to_owned();
        let ok = Self::in_ns(ns, move || {
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if std::net::TcpStream::connect(&addr).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        });
        assert!(ok, "nothing listening in {ns}");
    }

    /// Starts a program inside a namespace, ended when the lab drops.
    pub fn spawn(&mut self, ns: &str, args: &[&str], log: Option<&PathBuf>) {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", Self::ns_path(ns)))
            .args(args)
            .stdin(Stdio::null());
        match log {
            Some(path) => {
                let f = File::create(path).unwrap();
                cmd.stdout(f.try_clone().unwrap()).stderr(f);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        self.children.push(cmd.spawn().unwrap());
    }

    /// `openssl s_server -www` with a self-signed certificate for `name`.
    pub fn start_tls_server(&mut self, ip: &str, name: &str) {
        let dir = self.dir.path().to_owned();
        let (key, cert) = (dir.join("tls.key"), dir.join("tls.crt"));
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "1",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                cert.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()));
        let up = self.up.clone();
        self.spawn(
            &up,
            &[
                "openssl",
                "s_server",
                "-accept",
                &format!("{ip}:443"),
                "-cert",
                cert.to_str().unwrap(),
                "-key",
                key.to_str().unwrap(),
                "-www",
                "-quiet",
            ],
            None,
        );
        self.wait_port(&up, &format!("{ip}:443"));
    }

    /// `sluice serve` in the gateway namespace, with `extra` TOML appended.
    pub fn start_sluice(&mut self, extra: &str) {
        self.start_sluice_with("", extra)
    }

    /// As [`start_sluice`](Self::start_sluice), with `gateway` lines added
    /// to the `[gateway]` table.
    pub fn start_sluice_with(&mut self, gateway: &str, extra: &str) {
        let state = self.dir.path().join("state");
        let config = self.dir.path().join("sluice.toml");
        std::fs::write(
            &config,
            format!(
                r#"state_dir = "{}"
[gateway]
transparent_listen = "0.0.0.0:15001"
proxy_listen = "0.0.0.0:8443"
allow_destinations = ["198.18.0.0/15"]
peek_timeout_ms = 3000
{gateway}
[auth]
leeway_s = 0
[admin]
listen = "127.0.0.1:9080"
[metrics]
listen = "127.0.0.1:9090"
{extra}"#,
                state.display()
            ),
        )
        .unwrap();
        self.sluice_log = self.dir.path().join("sluice.log");
        self.sluice_config = config;
        self.restart_sluice();
    }

    /// Starts (again) `sluice serve` on the same config and state.
    pub fn restart_sluice(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.sluice_log)
            .unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net={}", Self::ns_path(&self.gw)))
            .args([
                env!("CARGO_BIN_EXE_sluice"),
                "serve",
                "--config",
                self.sluice_config.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.sluice = Some(child);
        let gw = self.gw.clone();
        self.wait_port(&gw, "127.0.0.1:9080");
    }

    /// SIGKILLs sluice (nsenter execs it, so the child is sluice itself).
    pub fn kill_sluice(&mut self) {
        if let Some(mut child) = self.sluice.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let gw = self.gw.clone();
        let gone = Self::in_ns(&gw, || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect("127.0.0.1:9080").is_ok() {
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            true
        });
        assert!(gone, "sluice did not die");
    }

    /// SIGHUP to sluice: its configuration (and secrets) read again.
    pub fn reload_sluice(&self) {
        if let Some(child) = &self.sluice {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGHUP,
            )
            .unwrap();
        }
    }

    pub fn sluice_log(&self) -> String {
        std::fs::read_to_string(&self.sluice_log).unwrap_or_default()
    }

    fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("state/admin-token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// curl inside a namespace; returns its exit code and output.
    pub fn curl_in(&self, ns: &str, args: &[&str]) -> CurlOut {
        let mut full = vec!["curl", "--max-time", "45"];
        full.extend_from_slice(args);
        self.run_in(ns, &[], &full)
    }

    /// A command inside a namespace, with extra environment variables (and
    /// no proxy variables but those given).
    pub fn run_in(&self, ns: &str, env: &[(&str, &str)], args: &[&str]) -> CurlOut {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", Self::ns_path(ns)))
            .args(["timeout", "60"])
            .args(args);
        output(cmd, env)
    }

    /// A command in a namespace through `ip netns exec`, which also binds
    /// /etc/netns/<ns>/resolv.conf over /etc/resolv.conf: a client whose
    /// only configuration is that file.
    pub fn exec_in(&self, ns: &str, env: &[(&str, &str)], args: &[&str]) -> CurlOut {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "timeout", "60"]).args(args);
        output(cmd, env)
    }

    /// Writes /etc/netns/<ns>/resolv.conf (removed when the lab drops).
    pub fn resolv_conf(&self, ns: &str, contents: &str) {
        let dir = PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), contents).unwrap();
    }

    /// curl from the sandbox.
    pub fn curl(&self, args: &[&str]) -> CurlOut {
        self.curl_in(&self.sb, args)
    }

    pub fn sandbox_sh(&self, script: &str) {
        run(Command::new("nsenter")
            .arg(format!("--net={}", Self::ns_path(&self.sb)))
            .args(["timeout", "20", "bash", "-c", script]));
    }

    pub fn admin(&self, method: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
        self.admin_status(method, path, body).1
    }

    /// An admin call: its status and its JSON answer (null when empty).
    pub fn admin_status(
        &self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let auth = format!("Authorization: Bearer {}", self.admin_token());
        let url = format!("http://127.0.0.1:9080{path}");
        let body = body.to_string();
        let r = self.curl_in(
            &self.gw,
            &[
                "-sS",
                "-X",
                method,
                "-H",
                &auth,
                "-H",
                "Content-Type: application/json",
                "-d",
                &body,
                "-w",
                "\n%{http_code}",
                &url,
            ],
        );
        assert_eq!(r.code, 0, "{r:?}");
        let (json, code) = r.stdout.rsplit_once('\n').unwrap_or(("", &r.stdout));
        let value = if json.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(json).unwrap_or_else(|_| panic!("{path}: {r:?}"))
        };
        (code.trim().parse().unwrap_or(0), value)
    }

    /// An admin GET whose answer is not JSON: its status and its text.
    pub fn admin_text(&self, path: &str) -> (u16, String) {
        let auth = format!("Authorization: Bearer {}", self.admin_token());
        let url = format!("http://127.0.0.1:9080{path}");
        let r = self.curl_in(
            &self.gw,
            &["-sS", "-H", &auth, "-w", "\n%{http_code}", &url],
        );
        assert_eq!(r.code, 0, "{r:?}");
        let (text, code) = r.stdout.rsplit_once('\n').unwrap_or(("", &r.stdout));
        (code.trim().parse().unwrap_or(0), text.to_owned())
    }

    pub fn mint(&self, container: &str, hosts: &[&str], ttl: u64) -> String {
        let v = self.admin(
            "POST",
            "/v1/tokens",
            &serde_json::json!({"container_id": container, "user_id": "e2e", "allowed_hosts": hosts, "ttl_seconds": ttl}),
        );
        v["token"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"))
            .to_owned()
    }

    pub fn register(&self, token: &str, ip: &str) {
        let v = self.admin(
            "POST",
            "/v1/sandboxes",
            &serde_json::json!({"source_ip": ip, "token": token}),
        );
        assert_eq!(v["source_ip"], ip, "{v}");
    }

    pub fn metrics(&self) -> String {
        self.curl_in(&self.gw, &["-sS", "http://127.0.0.1:9090/metrics"])
            .stdout
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.sluice.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Containers sluice launched, and their namespaces, even if the test
        // failed before destroying them. runsc is reached from inside each
        // sandbox's namespace (its control socket is namespaced).
        let root = self.dir.path().join("state/runsc");
        let registry = std::fs::read_to_string(self.dir.path().join("state/registry.json"))
            .unwrap_or_default();
        let registry: serde_json::Value = serde_json::from_str(&registry).unwrap_or_default();
        for s in registry["sandboxes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let (Some(id), Some(ns)) = (s["container_id"].as_str(), s["launch"]["netns"].as_str())
            else {
                continue;
            };
            for args in [vec!["kill", id, "KILL"], vec!["delete", "--force", id]] {
                let _ = Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{ns}"))
                    .arg("runsc")
                    .arg("--root")
                    .arg(&root)
                    .args(args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        // Any sandbox namespace the registry no longer names (a launch cut
        // short): sl- and ten hex digits is the launcher's pattern.
        if root.exists() {
            for entry in std::fs::read_dir("/run/netns")
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.len() == 13
                    && name.starts_with("sl-")
                    && name[3..].bytes().all(|b| b.is_ascii_hexdigit())
                {
                    let _ = Command::new("ip")
                        .args(["netns", "del", &name])
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
        for child in &mut self.children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for child in &mut self.children {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.sb, &self.gw, &self.up]
            .into_iter()
            .chain(&self.extra_ns)
        {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
        }
    }
}

/// Runs `cmd` with `env` and no proxy variables but those given.
fn output(mut cmd: Command, env: &[(&str, &str)]) -> CurlOut {
    for var in [
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    CurlOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Reads what arrives within `wait` (until EOF or quiet).
pub fn read_for(s: &mut std::net::TcpStream, wait: Duration) -> Vec<u8> {
    use std::io::Read;
    s.set_read_timeout(Some(wait)).unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Runs `f` with a TCP connection opened from the sandbox namespace.
pub fn from_sandbox<T: Send + 'static>(
    lab: &Lab,
    to: &str,
    f: impl FnOnce(std::net::TcpStream) -> T + Send + 'static,
) -> T {
    let to = to.to_owned();
    Lab::in_ns(&lab.sb, move || {
        let s = std::net::TcpStream::connect(&to).unwrap();
        s.set_nodelay(true).unwrap();
        f(s)
    })
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

pub fn pattern_sha256(len: usize) -> [u8; 32] {
    sha256(&pattern(len))
}
