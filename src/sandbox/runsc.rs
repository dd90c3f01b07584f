//! The real launcher: gVisor's `runsc`, each sandbox in a network
//! namespace of its own behind a veth pair, with the gateway's rules on
//! the host end.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;
use tokio::process::Command;

use super::bundle::{bundle_config, process_json};
use super::command::{RemoveOnDrop, on_path, read_capped, run, tail};
use super::netns::{host_veth_name, netns_name, peer_veth_name, sandbox_mac};
use super::{BoxFuture, ExecOutput, LaunchError, LaunchSpec, Launcher};
use crate::config::Config;
use crate::identity::LaunchRecord;
use crate::identity::token::is_safe_id;

/// The real launcher: gVisor's runsc in a namespace of its own.
pub struct Runsc {
    config: Arc<Config>,
    root: PathBuf,
    transparent_port: u16,
    proxy_port: u16,
    dns_port: u16,
}

impl Runsc {
    pub fn new(
        config: Arc<Config>,
        transparent_port: u16,
        proxy_port: u16,
        dns_port: u16,
    ) -> Runsc {
        Runsc {
            root: config.state_dir.join("runsc"),
            config,
            transparent_port,
            proxy_port,
            dns_port,
        }
    }

    /// runsc, run in the sandbox's network namespace: its control socket
    /// is an abstract unix socket, which only that namespace can reach.
    fn runtime(&self, netns: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{netns}"))
            .arg(&self.config.sandbox.runtime)
            .arg("--root")
            .arg(&self.root)
            .args(&self.config.sandbox.runtime_args)
            .stdin(Stdio::null());
        cmd
    }

    /// What must exist before anything is made.
    fn check_available(&self) -> Result<(), LaunchError> {
        let sb = &self.config.sandbox;
        if !on_path(&sb.runtime) {
            return Err(LaunchError::Unavailable(format!(
                "the runtime {:?} is not installed",
                sb.runtime
            )));
        }
        if !sb.rootfs.join("bin").is_dir() && !sb.rootfs.is_dir() {
            return Err(LaunchError::Unavailable(format!(
                "the root filesystem {} does not exist",
                sb.rootfs.display()
            )));
        }
        for tool in [
            "ip",
            "iptables-restore",
            "iptables-save",
            "ip6tables-restore",
            "ip6tables-save",
            "arptables",
            "arptables-save",
            "nsenter",
        ] {
            if !on_path(tool) {
                return Err(LaunchError::Unavailable(format!("{tool} is not installed")));
            }
        }
        Ok(())
    }

    /// The per-user bind mounts, their paths checked against the base.
    fn user_mounts(
        &self,
        user_id: &str,
    ) -> Result<Vec<(PathBuf, &'static str, bool)>, LaunchError> {
        let Some(base) = &self.config.sandbox.user_data_dir else {
            return Ok(Vec::new());
        };
        if !is_safe_id(user_id) {
            return Err(LaunchError::BadRequest(
                "user_id is not a safe path component".into(),
            ));
        }
        let base = base.canonicalize().map_err(|e| {
            LaunchError::Unavailable(format!("sandbox.user_data_dir {}: {e}", base.display()))
        })?;
        let mut mounts = Vec::new();
        for (sub, target, writable) in [
            ("uploads", "/mnt/user-data/uploads", false),
            ("outputs", "/mnt/user-data/outputs", true),
        ] {
            let dir = base.join(user_id).join(sub);
            std::fs::create_dir_all(&dir).map_err(|e| LaunchError::io(dir.display(), e))?;
            let real = dir
                .canonicalize()
                .map_err(|e| LaunchError::io(dir.display(), e))?;
            if !real.starts_with(&base) {
                return Err(LaunchError::BadRequest(format!(
                    "{} escapes sandbox.user_data_dir",
                    dir.display()
                )));
            }
            if writable {
                // The sandbox's user writes its outputs; uploads stay root's.
                let (uid, gid) = (self.config.sandbox.uid, self.config.sandbox.gid);
                nix::unistd::chown(&real, Some(uid.into()), Some(gid.into()))
                    .map_err(|e| LaunchError::io(format!("chown {}", real.display()), e.into()))?;
            }
            mounts.push((real, target, writable));
        }
        Ok(mounts)
    }

    async fn setup(&self, spec: &LaunchSpec, record: &LaunchRecord) -> Result<(), LaunchError> {
        let id = &spec.container_id;
        let (ns, host, peer) = (&record.netns, &record.host_veth, peer_veth_name(id));
        let (ip, gw) = (spec.source_ip.to_string(), spec.gateway_ip.to_string());
        let mac = sandbox_mac(spec.source_ip).to_string();
        let steps: Vec<Vec<String>> = vec![
            vec!["ip", "netns", "add", ns],
            vec![
                "ip", "link", "add", host, "type", "veth", "peer", "name", &peer, "address", &mac,
            ],
            vec!["ip", "link", "set", &peer, "netns", ns],
            vec!["ip", "addr", "add", &format!("{gw}/32"), "dev", host],
            vec!["ip", "link", "set", host, "up"],
            vec!["ip", "route", "replace", &format!("{ip}/32"), "dev", host],
            vec!["ip", "-n", ns, "link", "set", &peer, "name", "eth0"],
            vec![
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/32"),
                "dev",
                "eth0",
            ],
            vec!["ip", "-n", ns, "link", "set", "eth0", "up"],
            vec!["ip", "-n", ns, "link", "set", "lo", "up"],
            vec![
                "ip", "-n", ns, "route", "add", &gw, "dev", "eth0", "scope", "link",
            ],
            vec![
                "ip", "-n", ns, "route", "add", "default", "via", &gw, "dev", "eth0",
            ],
        ]
        .into_iter()
        .map(|v| v.into_iter().map(str::to_owned).collect())
        .collect();
        for step in &steps {
            run(step).await?;
        }
        let mut rules = crate::rules::Spec::new(
            crate::rules::Target::Iface(host.clone()),
            self.transparent_port,
        );
        rules.proxy_port = Some(self.proxy_port);
        rules.dns_port = Some(self.dns_port);
        rules.source = Some(spec.source_ip);
        // The link is this sandbox's alone; the binding also pins its
        // address to its MAC, as on a shared bridge.
        rules.binds = vec![crate::rules::Binding {
            ip: spec.source_ip,
            mac: sandbox_mac(spec.source_ip),
        }];
        tokio::task::spawn_blocking(move || crate::rules::apply(&rules))
            .await
            .map_err(LaunchError::Task)?
            .map_err(LaunchError::Rules)?;
        shape_link(record, &spec.limits).await?;

        std::fs::create_dir_all(&record.bundle)
            .map_err(|e| LaunchError::io(record.bundle.display(), e))?;
        std::fs::create_dir_all(&self.root).map_err(|e| LaunchError::io(self.root.display(), e))?;
        let mut mounts = self.user_mounts(&spec.user_id)?;
        // Names resolve through the gateway's DNS door (port 53 to any
        // address is REDIRECTed there); the files are read-only inside.
        let (resolv, hosts) = (
            record.bundle.join("resolv.conf"),
            record.bundle.join("hosts"),
        );
        std::fs::write(&resolv, format!("nameserver {gw}\noptions ndots:1\n"))
            .map_err(|e| LaunchError::io(resolv.display(), e))?;
        std::fs::write(&hosts, "127.0.0.1 localhost\n::1 localhost\n")
            .map_err(|e| LaunchError::io(hosts.display(), e))?;
        mounts.push((resolv, "/etc/resolv.conf", false));
        mounts.push((hosts, "/etc/hosts", false));
        if let Some(ca) = &spec.trust {
            // The system's roots and the sandbox's CA, never the CA alone:
            // every other host keeps verifying as it did.
            let system = std::fs::read_to_string(super::CA_BUNDLE)
                .map_err(|e| LaunchError::io(super::CA_BUNDLE, e))?;
            let bundle = record.bundle.join("ca-certificates.crt");
            std::fs::write(&bundle, format!("{}\n{ca}", system.trim_end()))
                .map_err(|e| LaunchError::io(bundle.display(), e))?;
            mounts.push((bundle, super::CA_BUNDLE, false));
        }
        let config = bundle_config(&self.config, spec, &mounts)?;
        let config_path = record.bundle.join("config.json");
        std::fs::write(&config_path, config)
            .map_err(|e| LaunchError::io(config_path.display(), e))?;

        let log_path = record.bundle.join("console.log");
        let log =
            std::fs::File::create(&log_path).map_err(|e| LaunchError::io(log_path.display(), e))?;
        let mut create = self.runtime(ns);
        create
            .args(["create", "--bundle"])
            .arg(&record.bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(|e| LaunchError::io(log_path.display(), e))?,
            )
            .stderr(log);
        let status = tokio::time::timeout(Duration::from_secs(60), create.status())
            .await
            .map_err(|_| LaunchError::Failed("runsc create timed out".into()))?
            .map_err(|e| LaunchError::io("runsc create", e))?;
        if !status.success() {
            let log =
                std::fs::read_to_string(record.bundle.join("console.log")).unwrap_or_default();
            return Err(LaunchError::Failed(format!(
                "runsc create failed ({status}): {}",
                tail(&log)
            )));
        }
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            self.runtime(ns).arg("start").arg(id).output(),
        )
        .await
        .map_err(|_| LaunchError::Failed("runsc start timed out".into()))?
        .map_err(|e| LaunchError::io("runsc start", e))?;
        if !out.status.success() {
            return Err(LaunchError::Failed(format!(
                "runsc start failed: {}",
                tail(&String::from_utf8_lossy(&out.stderr))
            )));
        }
        Ok(())
    }
}

/// The second layer's rate over the token's: a quarter more, so the
/// gateway's meter (exact, per byte relayed) is what binds, and this one
/// (on packets, headers included) only holds a sandbox that gets past it.
fn link_rate_bits(bytes_per_s: u64) -> u64 {
    bytes_per_s.saturating_mul(10)
}

/// `tc` commands that shape a launched sandbox's veth pair to `limits`:
/// a token bucket filter on its own end (what it sends) and on the
/// gateway's end (what it receives), or none (`qdisc del`, whose "nothing
/// to delete" is not an error) when the token sets no rate.
///
/// This runsc (Debian's `0.0~20221219.0`) has no rate limit of its own:
/// its `--qdisc` takes `none` or `fifo` (gVisor's rate-limiting qdisc,
/// google/gvisor#13104, is later), and with `--network=host` its
/// packets go through the kernel of the sandbox's namespace anyway. So
/// the second layer is the kernel's `tbf` on the sandbox's link.
pub fn shaping(record: &LaunchRecord, limits: &crate::limits::Limits) -> Vec<(Vec<String>, bool)> {
    let tbf = |rate: u64| {
        let bits = link_rate_bits(rate);
        let burst = (rate / 4).max(32 * 1024);
        vec![
            "root".to_owned(),
            "tbf".to_owned(),
            "rate".to_owned(),
            format!("{bits}bit"),
            "burst".to_owned(),
            burst.to_string(),
            "latency".to_owned(),
            "200ms".to_owned(),
        ]
    };
    let mut out = Vec::new();
    for (netns, dev, rate) in [
        (
            Some(record.netns.as_str()),
            "eth0",
            limits.egress_bytes_per_s,
        ),
        (None, record.host_veth.as_str(), limits.ingress_bytes_per_s),
    ] {
        let mut cmd = vec!["tc".to_owned()];
        if let Some(ns) = netns {
            cmd.extend(["-n".to_owned(), ns.to_owned()]);
        }
        cmd.extend(["qdisc".to_owned()]);
        match rate {
            Some(rate) => {
                cmd.extend(["replace".to_owned(), "dev".to_owned(), dev.to_owned()]);
                cmd.extend(tbf(rate));
                out.push((cmd, true));
            }
            None => {
                cmd.extend([
                    "del".to_owned(),
                    "dev".to_owned(),
                    dev.to_owned(),
                    "root".to_owned(),
                ]);
                out.push((cmd, false));
            }
        }
    }
    out
}

/// Applies [`shaping`]: a failure to shape is an error; a failure to
/// remove shaping that is not there is not.
async fn shape_link(
    record: &LaunchRecord,
    limits: &crate::limits::Limits,
) -> Result<(), LaunchError> {
    for (cmd, must) in shaping(record, limits) {
        match run(&cmd).await {
            Ok(()) => {}
            Err(e) if must => return Err(e),
            Err(_) => {}
        }
    }
    Ok(())
}

impl Launcher for Runsc {
    fn shape<'a>(
        &'a self,
        record: &'a LaunchRecord,
        limits: &'a crate::limits::Limits,
    ) -> BoxFuture<'a, Result<(), LaunchError>> {
        Box::pin(shape_link(record, limits))
    }

    fn start<'a>(
        &'a self,
        spec: &'a LaunchSpec,
    ) -> BoxFuture<'a, Result<LaunchRecord, LaunchError>> {
        Box::pin(async move {
            self.check_available()?;
            let record = LaunchRecord {
                netns: netns_name(&spec.container_id),
                host_veth: host_veth_name(&spec.container_id),
                bundle: self
                    .config
                    .state_dir
                    .join("sandboxes")
                    .join(&spec.container_id),
                gateway_ip: spec.gateway_ip,
            };
            if let Err(e) = self.setup(spec, &record).await {
                self.stop(&spec.container_id, &record).await;
                return Err(e);
            }
            Ok(record)
        })
    }

    fn exec<'a>(
        &'a self,
        id: &'a str,
        record: &'a LaunchRecord,
        env: &'a [String],
        command: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<ExecOutput, LaunchError>> {
        Box::pin(async move {
            // The process runs with the sandbox's own user, capabilities and
            // no_new_privileges, not runsc exec's defaults.
            let process = process_json(&self.config, command, env)?;
            let mut raw = [0u8; 8];
            rand::rngs::OsRng.fill_bytes(&mut raw);
            let path = self
                .root
                .join(format!("exec-{id}-{:016x}.json", u64::from_le_bytes(raw)));
            std::fs::create_dir_all(&self.root)
                .map_err(|e| LaunchError::io(self.root.display(), e))?;
            std::fs::write(&path, process).map_err(|e| LaunchError::io(path.display(), e))?;
            let _remove = RemoveOnDrop(path.clone());
            let mut child = self
                .runtime(&record.netns)
                .args(["exec", "--process"])
                .arg(&path)
                .arg(id)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| LaunchError::io("runsc exec", e))?;
            let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
                return Err(LaunchError::Failed("runsc exec: no pipes".into()));
            };
            let run = async {
                let (stdout, stderr) = tokio::join!(read_capped(out), read_capped(err));
                let status = child
                    .wait()
                    .await
                    .map_err(|e| LaunchError::io("runsc exec", e))?;
                Ok::<_, LaunchError>(ExecOutput {
                    exit_code: status.code().unwrap_or(-1),
                    stdout,
                    stderr,
                })
            };
            tokio::time::timeout(timeout, run)
                .await
                .map_err(|_| LaunchError::Timeout(timeout.as_millis() as u64))?
        })
    }

    fn stop<'a>(&'a self, id: &'a str, record: &'a LaunchRecord) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let mut kill = self.runtime(&record.netns);
            kill.args(["kill", id, "KILL"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let _ = tokio::time::timeout(Duration::from_secs(10), kill.status()).await;
            let mut delete = self.runtime(&record.netns);
            delete
                .args(["delete", "--force", id])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let _ = tokio::time::timeout(Duration::from_secs(20), delete.status()).await;
            let target = crate::rules::Target::Iface(record.host_veth.clone());
            match tokio::task::spawn_blocking(move || crate::rules::remove(&target)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %crate::error_chain(&e), "teardown: rules"),
                Err(e) => tracing::debug!(error = %e, "teardown: rules task"),
            }
            for step in [
                vec![
                    "ip".into(),
                    "link".into(),
                    "del".into(),
                    record.host_veth.clone(),
                ],
                vec![
                    "ip".into(),
                    "netns".into(),
                    "del".into(),
                    record.netns.clone(),
                ],
            ] {
                if let Err(e) = run(&step).await {
                    tracing::debug!(error = %e, "teardown step");
                }
            }
            if record
                .bundle
                .starts_with(self.config.state_dir.join("sandboxes"))
            {
                let _ = std::fs::remove_dir_all(&record.bundle);
            }
        })
    }

    fn is_running<'a>(&'a self, id: &'a str, record: &'a LaunchRecord) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let mut state = self.runtime(&record.netns);
            state.args(["state", id]).stderr(Stdio::null());
            match tokio::time::timeout(Duration::from_secs(10), state.output()).await {
                Ok(Ok(out)) if out.status.success() => {
                    serde_json::from_slice::<serde_json::Value>(&out.stdout)
                        .ok()
                        .and_then(|v| {
                            v["status"]
                                .as_str()
                                .map(|s| s == "running" || s == "created")
                        })
                        .unwrap_or(false)
                }
                _ => false,
            }
        })
    }
}
