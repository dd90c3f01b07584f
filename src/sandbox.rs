//! Sandboxes sluice launches. [`Sandboxes`] owns the lifecycle: it checks a
//! launch request, picks an address no registered sandbox holds, mints the
//! sandbox's token and registers it (on disk) before anything starts, asks
//! the [`Launcher`] to build and start it, and undoes all of that if any
//! step fails. Destroying takes everything down and frees the address
//! last. [`Runsc`] is the real launcher: a network namespace and a veth
//! pair per sandbox, the `iptables/` rules with anti-spoofing, a hardened
//! OCI bundle (read-only root, size-limited /tmp, no capabilities but the
//! configured ones, no_new_privileges, memory/CPU/pids limits) and gVisor's
//! `runsc`. API tests can put a fake behind the trait.

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use rand::RngCore;
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::config::Config;
use crate::identity::store::{Change, SandboxRecord, Store, StoreError};
use crate::identity::token::{MintRequest, Signer, Verifier, is_safe_id};
use crate::identity::{BindError, LaunchRecord, MacAddr, Registry, Sandbox};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Largest stdout or stderr an exec returns.
pub const MAX_EXEC_OUTPUT: usize = 1 << 20;
const MAX_ARGS: usize = 256;
const MAX_ARG_BYTES: usize = 4096;
const MAX_COMMAND_BYTES: usize = 64 * 1024;
const MAX_EXEC_TIMEOUT_MS: u64 = 10 * 60 * 1000;
const DEFAULT_TTL_S: u64 = 3600;
/// runsc applies the OCI pids limit to the host cgroup that holds the
/// sandbox's kernel (the sentry) and its gofer, whose own threads count
/// against it: the request's limit gets this allowance on top, or a small
/// limit would stop gVisor itself from starting processes.
const GVISOR_PIDS_ALLOWANCE: i64 = 512;

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Taken(#[from] BindError),
    #[error("gateway.l2_bind_iface is set: a registration must carry the sandbox's `mac`")]
    MacRequired,
    #[error("a `mac` was given, but gateway.l2_bind_iface is not set: nothing would bind it")]
    MacUnexpected,
    #[error("cannot bind the address to its MAC")]
    L2(#[source] LaunchError),
    #[error("cannot persist the registry")]
    Persist(#[source] crate::identity::store::StoreError),
}

/// Why a launch (or a stop, or an exec) failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("no free address left in {0}")]
    Exhausted(IpNet),
    #[error("no such sandbox")]
    NotFound,
    #[error("sandbox {0} was registered, not launched: there is nothing to exec in")]
    NotLaunched(String),
    #[error("command did not finish within {0} ms")]
    Timeout(u64),
    #[error("{0}")]
    Failed(String),
    #[error("cannot set the gateway's rules")]
    Rules(#[source] crate::rules::RulesError),
    #[error("cannot persist the registry")]
    Store(#[source] crate::identity::store::StoreError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("OCI spec")]
    Spec(#[source] oci_spec::OciSpecError),
    #[error("cannot encode the OCI spec")]
    Json(#[source] serde_json::Error),
    #[error("a blocking task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl LaunchError {
    /// An I/O failure and what was being done.
    pub fn io(what: impl std::fmt::Display, source: std::io::Error) -> LaunchError {
        LaunchError::Io {
            what: what.to_string(),
            source,
        }
    }

    /// The API's reason for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            LaunchError::BadRequest(_) => "bad_request",
            LaunchError::Unavailable(_) => "runtime_unavailable",
            LaunchError::Exhausted(_) => "subnet_exhausted",
            LaunchError::NotFound => "not_found",
            LaunchError::NotLaunched(_) => "not_launched",
            LaunchError::Timeout(_) => "exec_timeout",
            LaunchError::Failed(_)
            | LaunchError::Rules(_)
            | LaunchError::Io { .. }
            | LaunchError::Spec(_)
            | LaunchError::Json(_)
            | LaunchError::Task(_) => "launch_failed",
            LaunchError::Store(_) => "persist_failed",
        }
    }
}

/// `POST /v1/sandboxes/launch`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LaunchRequest {
    /// Who the sandbox runs for (claim `user_id`, and its data directory).
    pub user_id: String,
    /// Allowlist entries for its token.
    pub allowed_hosts: Vec<String>,
    /// The program and its arguments, run as the sandbox's process.
    pub command: Vec<String>,
    /// Its token's lifetime (default and maximum in `[sandbox]`/`[auth]`).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    #[serde(default)]
    pub cpu_millis: Option<u64>,
    #[serde(default)]
    pub pids_limit: Option<i64>,
}

/// Everything a launcher needs to start one sandbox.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub container_id: String,
    pub user_id: String,
    pub source_ip: Ipv4Addr,
    pub gateway_ip: Ipv4Addr,
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub memory_bytes: u64,
    pub cpu_millis: u64,
    pub pids_limit: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Starts, runs commands in and stops sandboxes.
pub trait Launcher: Send + Sync {
    /// Everything the sandbox needs, then the sandbox; on error, nothing
    /// left behind.
    fn start<'a>(
        &'a self,
        spec: &'a LaunchSpec,
    ) -> BoxFuture<'a, Result<LaunchRecord, LaunchError>>;
    fn exec<'a>(
        &'a self,
        id: &'a str,
        record: &'a LaunchRecord,
        env: &'a [String],
        command: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<ExecOutput, LaunchError>>;
    /// Kills and removes the sandbox and its network pieces; never fails
    /// half-way (each piece is removed on its own, errors are logged).
    fn stop<'a>(&'a self, id: &'a str, record: &'a LaunchRecord) -> BoxFuture<'a, ()>;
    fn is_running<'a>(&'a self, id: &'a str, record: &'a LaunchRecord) -> BoxFuture<'a, bool>;
}

/// What a launch answers.
#[derive(Debug, Clone)]
pub struct Launched {
    pub container_id: String,
    pub source_ip: Ipv4Addr,
    pub token: String,
    pub expires_at: u64,
}

/// The lifecycle of launched sandboxes.
pub struct Sandboxes {
    config: Arc<Config>,
    registry: Arc<Registry>,
    verifier: Arc<Verifier>,
    signer: Option<Arc<Signer>>,
    store: Arc<Store>,
    launcher: Arc<dyn Launcher>,
    proxy_port: u16,
    /// Addresses being launched or torn down: not free, though not (or no
    /// longer) in the registry.
    reserved: Mutex<HashSet<Ipv4Addr>>,
}

impl Sandboxes {
    pub fn new(
        config: Arc<Config>,
        registry: Arc<Registry>,
        verifier: Arc<Verifier>,
        signer: Option<Arc<Signer>>,
        store: Arc<Store>,
        launcher: Arc<dyn Launcher>,
        proxy_port: u16,
    ) -> Sandboxes {
        Sandboxes {
            config,
            registry,
            verifier,
            signer,
            store,
            launcher,
            proxy_port,
            reserved: Mutex::new(HashSet::new()),
        }
    }

    /// The gateway's address on every sandbox link: the subnet's first host.
    pub fn gateway_ip(&self) -> Option<Ipv4Addr> {
        match self.config.sandbox.subnet {
            IpNet::V4(n) => Some(Ipv4Addr::from(u32::from(n.network()) + 1)),
            IpNet::V6(_) => None,
        }
    }

    /// The first free address of the subnet, reserved until released.
    fn allocate(&self) -> Result<Ipv4Addr, LaunchError> {
        let IpNet::V4(net) = self.config.sandbox.subnet else {
            return Err(LaunchError::Unavailable(
                "sandbox.subnet is not IPv4".into(),
            ));
        };
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let first = u32::from(net.network()) + 2;
        let last = u32::from(net.broadcast()).saturating_sub(1);
        for n in first..=last {
            let ip = Ipv4Addr::from(n);
            if !reserved.contains(&ip) && self.registry.get(IpAddr::V4(ip)).is_none() {
                reserved.insert(ip);
                return Ok(ip);
            }
        }
        Err(LaunchError::Exhausted(self.config.sandbox.subnet))
    }

    fn release(&self, ip: Ipv4Addr) {
        self.reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ip);
    }

    /// Makes `changes` durable (shared with concurrent ones) before the
    /// caller acknowledges anything.
    async fn persist(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        self.store.apply(changes).await
    }

    /// Registers a sandbox started elsewhere: on a bridge that several
    /// sandboxes share (`gateway.l2_bind_iface`), its address is first
    /// bound to its MAC; then it is in the table and on disk before this
    /// returns. Anything done is undone on failure.
    pub async fn register(&self, sandbox: Sandbox) -> Result<Arc<Sandbox>, RegisterError> {
        let iface = self.config.gateway.l2_bind_iface.as_str();
        let binding = match (iface.is_empty(), sandbox.mac) {
            (true, None) => None,
            (true, Some(_)) => return Err(RegisterError::MacUnexpected),
            (false, None) => return Err(RegisterError::MacRequired),
            (false, Some(mac)) => Some((sandbox.source_ip, mac)),
        };
        if let Some((ip, mac)) = binding {
            self.l2(true, ip, mac).await.map_err(RegisterError::L2)?;
        }
        let undo_l2 = async {
            if let Some((ip, mac)) = binding
                && let Err(e) = self.l2(false, ip, mac).await
            {
                tracing::error!(error = %e, "cannot undo an L2 binding");
            }
        };
        let sandbox = match self.registry.bind(sandbox) {
            Ok(s) => s,
            Err(e) => {
                undo_l2.await;
                return Err(e.into());
            }
        };
        if let Err(e) = self
            .persist(vec![Change::Put(SandboxRecord::of(&sandbox))])
            .await
        {
            // Not on disk, so not acknowledged: undone.
            self.registry.unbind(&sandbox.container_id);
            undo_l2.await;
            return Err(RegisterError::Persist(e));
        }
        Ok(sandbox)
    }

    /// Adds or removes one address-to-MAC binding on the shared bridge.
    async fn l2(&self, add: bool, ip: IpAddr, mac: MacAddr) -> Result<(), LaunchError> {
        let IpAddr::V4(ip) = ip else {
            return Err(LaunchError::BadRequest(
                "L2 bindings are for IPv4 sandbox addresses".into(),
            ));
        };
        let target = crate::rules::Target::new(Some(&self.config.gateway.l2_bind_iface), None)
            .map_err(LaunchError::Rules)?;
        let binding = crate::rules::Binding { ip, mac };
        tokio::task::spawn_blocking(move || crate::rules::bind(&target, &binding, add))
            .await
            .map_err(LaunchError::Task)?
            .map_err(LaunchError::Rules)
    }

    /// Launches a sandbox: validated, addressed, its token minted and
    /// registered (on disk) before it starts; all undone on failure.
    pub async fn launch(&self, req: LaunchRequest) -> Result<Launched, LaunchError> {
        let (ttl, memory_bytes, cpu_millis, pids_limit) = validate_launch(&self.config, &req)?;
        let signer = self
            .signer
            .as_ref()
            .ok_or_else(|| LaunchError::Unavailable("this gateway has no signing key".into()))?;
        let gateway_ip = self
            .gateway_ip()
            .ok_or_else(|| LaunchError::Unavailable("sandbox.subnet is not IPv4".into()))?;
        let mut raw = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let container_id = format!(
            "sb-{}",
            raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let minted = signer
            .mint(&MintRequest {
                container_id: container_id.clone(),
                user_id: req.user_id.clone(),
                allowed_hosts: req.allowed_hosts.clone(),
                ttl: Duration::from_secs(ttl),
            })
            .map_err(|e| LaunchError::BadRequest(e.to_string()))?;
        let generation = self.verifier.generation();
        let grant = self.verifier.verify_fresh(&minted.token).map_err(|e| {
            LaunchError::Failed(format!("a token sluice just minted does not verify: {e}"))
        })?;

        let source_ip = self.allocate()?;
        let env = sandbox_env(&container_id, &minted.token, gateway_ip, self.proxy_port);
        let spec = LaunchSpec {
            container_id: container_id.clone(),
            user_id: req.user_id,
            source_ip,
            gateway_ip,
            command: req.command,
            env,
            memory_bytes,
            cpu_millis,
            pids_limit,
        };
        // Registered and on disk before it starts: a crash from here on
        // leaves a record that reconciliation cleans up.
        let record = LaunchRecord {
            netns: netns_name(&container_id),
            host_veth: host_veth_name(&container_id),
            bundle: self.config.state_dir.join("sandboxes").join(&container_id),
            gateway_ip,
        };
        let sandbox = Sandbox::new(
            IpAddr::V4(source_ip),
            minted.token.clone(),
            grant,
            crate::identity::Origin::Launched,
        )
        .verified_under(generation)
        .launched(record.clone());
        let sandbox = match self.registry.bind(sandbox) {
            Ok(s) => s,
            Err(e) => {
                self.release(source_ip);
                return Err(LaunchError::Failed(e.to_string()));
            }
        };
        if let Err(e) = self
            .persist(vec![Change::Put(SandboxRecord::of(&sandbox))])
            .await
        {
            self.registry.unbind(&container_id);
            self.release(source_ip);
            return Err(LaunchError::Store(e));
        }
        match self.launcher.start(&spec).await {
            Ok(_) => {
                tracing::info!(container_id, source_ip = %source_ip, "sandbox launched");
                Ok(Launched {
                    container_id,
                    source_ip,
                    token: minted.token,
                    expires_at: minted.claims.exp,
                })
            }
            Err(e) => {
                tracing::warn!(container_id, error = %e, "launch failed; undoing it");
                self.registry.unbind(&container_id);
                if let Err(e) = self
                    .persist(vec![Change::Remove(container_id.clone())])
                    .await
                {
                    tracing::error!(container_id, error = %crate::error_chain(&e), "cannot remove the failed launch's record; the next start cleans it up");
                }
                self.release(source_ip);
                Err(e)
            }
        }
    }

    pub async fn exec(
        &self,
        id: &str,
        command: Vec<String>,
        timeout_ms: Option<u64>,
    ) -> Result<ExecOutput, LaunchError> {
        let sandbox = self.registry.get_by_id(id).ok_or(LaunchError::NotFound)?;
        let Some(record) = sandbox.launch.clone() else {
            return Err(LaunchError::NotLaunched(id.to_owned()));
        };
        if command.is_empty() || command[0].is_empty() || command.len() > MAX_ARGS {
            return Err(LaunchError::BadRequest(format!(
                "command must name a program, with at most {MAX_ARGS} arguments"
            )));
        }
        if command
            .iter()
            .any(|a| a.len() > MAX_ARG_BYTES || a.contains('\0'))
        {
            return Err(LaunchError::BadRequest(format!(
                "command arguments are at most {MAX_ARG_BYTES} bytes, without NUL"
            )));
        }
        let timeout_ms = timeout_ms.unwrap_or(30_000);
        if timeout_ms == 0 || timeout_ms > MAX_EXEC_TIMEOUT_MS {
            return Err(LaunchError::BadRequest(format!(
                "timeout_ms must be between 1 and {MAX_EXEC_TIMEOUT_MS}"
            )));
        }
        let env = sandbox_env(id, &sandbox.token, record.gateway_ip, self.proxy_port);
        self.launcher
            .exec(
                id,
                &record,
                &env,
                &command,
                Duration::from_millis(timeout_ms),
            )
            .await
    }

    /// Unregisters a sandbox (closing its live connections) and, if it was
    /// launched, kills it and removes its pieces; its address is free only
    /// after that.
    pub async fn destroy(&self, id: &str) -> Result<(), LaunchError> {
        let sandbox = self.registry.get_by_id(id).ok_or(LaunchError::NotFound)?;
        let ip = match sandbox.source_ip {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        };
        if let Some(ip) = ip.filter(|_| sandbox.launch.is_some()) {
            self.reserved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(ip);
        }
        self.registry.unbind(id);
        // Unregistered means its token is good nowhere: revoked (durably,
        // with the registry), which closes every connection it carries on
        // both doors and refuses it on the proxy door from now on.
        self.verifier
            .revoke(&sandbox.grant.claims.jti, sandbox.grant.claims.exp);
        let persisted = self
            .persist(vec![
                Change::Remove(id.to_owned()),
                Change::Revoke {
                    jti: sandbox.grant.claims.jti.clone(),
                    exp: sandbox.grant.claims.exp,
                },
            ])
            .await
            .map_err(LaunchError::Store);
        if let Some(mac) = sandbox.mac
            && !self.config.gateway.l2_bind_iface.is_empty()
            && let Err(e) = self.l2(false, sandbox.source_ip, mac).await
        {
            tracing::error!(container_id = id, error = %e, "cannot remove the L2 binding");
        }
        if let Some(record) = &sandbox.launch {
            self.launcher.stop(id, record).await;
            if let Some(ip) = ip {
                self.release(ip);
            }
            tracing::info!(container_id = id, "sandbox destroyed");
        }
        persisted
    }

    /// The reaper's pass (see [`Registry::reap`]), stopping the launched
    /// sandboxes it removes and removing their records.
    pub async fn reap(&self, now: u64, retention: u64) -> Result<(), StoreError> {
        let removed = self.registry.reap(now, self.verifier.leeway(), retention);
        for s in &removed {
            tracing::info!(container_id = %s.container_id, source_ip = %s.source_ip, "expired sandbox removed");
            if let Some(record) = &s.launch {
                if let IpAddr::V4(ip) = s.source_ip {
                    self.reserved
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(ip);
                }
                self.launcher.stop(&s.container_id, record).await;
                if let IpAddr::V4(ip) = s.source_ip {
                    self.release(ip);
                }
            }
        }
        self.persist(
            removed
                .iter()
                .map(|s| Change::Remove(s.container_id.clone()))
                .collect(),
        )
        .await
    }

    /// At start: a launched sandbox that no longer runs is cleaned up;
    /// pieces of dropped (expired) launched records are removed.
    pub async fn reconcile(&self, dropped: &[crate::identity::store::SandboxRecord]) {
        // Bindings are kernel state: after a reboot they are gone while the
        // registrations remain. Binding again is idempotent.
        if !self.config.gateway.l2_bind_iface.is_empty() {
            for s in self.registry.list() {
                if let Some(mac) = s.mac
                    && let Err(e) = self.l2(true, s.source_ip, mac).await
                {
                    tracing::error!(container_id = %s.container_id, error = %e, "cannot restore the L2 binding");
                }
            }
        }
        for record in dropped {
            if let Some(launch) = &record.launch {
                self.launcher.stop(&record.container_id, launch).await;
            }
        }
        for s in self.registry.list() {
            let Some(record) = &s.launch else { continue };
            if !self.launcher.is_running(&s.container_id, record).await {
                tracing::warn!(container_id = %s.container_id, "launched sandbox is gone; cleaning up");
                let _ = self.destroy(&s.container_id).await;
            }
        }
    }
}

/// Checks a launch request against `[sandbox]` and `[auth]`: the TTL,
/// memory, CPU and pids limits it resolves to, or why it is refused.
pub fn validate_launch(
    config: &Config,
    req: &LaunchRequest,
) -> Result<(u64, u64, u64, i64), LaunchError> {
    let sb = &config.sandbox;
    let bad = |m: String| Err(LaunchError::BadRequest(m));
    if !is_safe_id(&req.user_id) {
        return bad(
            "user_id must be 1-128 letters, digits, '_', '-' or '.' (a safe path component)".into(),
        );
    }
    if req.command.is_empty() || req.command[0].is_empty() {
        return bad("command must name a program".into());
    }
    if req.command.len() > MAX_ARGS {
        return bad(format!("command has more than {MAX_ARGS} arguments"));
    }
    if req
        .command
        .iter()
        .any(|a| a.len() > MAX_ARG_BYTES || a.contains('\0'))
    {
        return bad(format!(
            "command arguments are at most {MAX_ARG_BYTES} bytes, without NUL"
        ));
    }
    if req.command.iter().map(String::len).sum::<usize>() > MAX_COMMAND_BYTES {
        return bad(format!("command is longer than {MAX_COMMAND_BYTES} bytes"));
    }
    let ttl = req.ttl_seconds.unwrap_or(DEFAULT_TTL_S.min(sb.max_ttl_s));
    let max_ttl = sb.max_ttl_s.min(config.auth.max_ttl_s);
    if ttl == 0 || ttl > max_ttl {
        return bad(format!("ttl_seconds must be between 1 and {max_ttl}"));
    }
    let memory = req.memory_bytes.unwrap_or(sb.default_memory_bytes);
    if !(16 << 20..=sb.max_memory_bytes).contains(&memory) {
        return bad(format!(
            "memory_bytes must be between {} and {}",
            16 << 20,
            sb.max_memory_bytes
        ));
    }
    let cpu = req.cpu_millis.unwrap_or(sb.default_cpu_millis);
    if !(10..=sb.max_cpu_millis).contains(&cpu) {
        return bad(format!(
            "cpu_millis must be between 10 and {}",
            sb.max_cpu_millis
        ));
    }
    let pids = req.pids_limit.unwrap_or(sb.default_pids_limit);
    if !(1..=sb.max_pids_limit).contains(&pids) {
        return bad(format!(
            "pids_limit must be between 1 and {}",
            sb.max_pids_limit
        ));
    }
    Ok((ttl, memory, cpu, pids))
}

/// The environment a launched sandbox runs with (and its execs): the
/// original design's `CONTAINER_ID`, `HTTP_PROXY`, `HTTPS_PROXY`,
/// `NO_PROXY` (and their lowercase forms, which busybox and curl read).
pub fn sandbox_env(id: &str, token: &str, gateway_ip: Ipv4Addr, proxy_port: u16) -> Vec<String> {
    let proxy = format!("http://container_{id}:jwt_{token}@{gateway_ip}:{proxy_port}");
    vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        format!("CONTAINER_ID={id}"),
        format!("HTTP_PROXY={proxy}"),
        format!("HTTPS_PROXY={proxy}"),
        format!("http_proxy={proxy}"),
        format!("https_proxy={proxy}"),
        "NO_PROXY=localhost,127.0.0.1".to_owned(),
        "no_proxy=localhost,127.0.0.1".to_owned(),
    ]
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sb-").unwrap_or(id);
    &hex[..hex.len().min(10)]
}

fn netns_name(id: &str) -> String {
    format!("sl-{}", short_id(id))
}

/// Interface names are at most 15 bytes.
/// The MAC a launched sandbox's `eth0` gets: locally administered,
/// unicast, and derived from its address, so the rules can bind one to
/// the other before the sandbox starts.
pub fn sandbox_mac(ip: Ipv4Addr) -> MacAddr {
    let [a, b, c, d] = ip.octets();
    MacAddr([0x02, 0x53, a, b, c, d])
}

fn host_veth_name(id: &str) -> String {
    format!("slv{}", short_id(id))
}

fn peer_veth_name(id: &str) -> String {
    format!("slp{}", short_id(id))
}

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

impl Launcher for Runsc {
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

/// Deletes a file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn read_capped(mut pipe: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut buf = Vec::new();
    let _ = (&mut pipe)
        .take(MAX_EXEC_OUTPUT as u64)
        .read_to_end(&mut buf)
        .await;
    String::from_utf8_lossy(&buf).into_owned()
}

fn tail(s: &str) -> String {
    let t: String = s
        .chars()
        .rev()
        .take(500)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    t.trim().to_owned()
}

fn on_path(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

async fn run(args: &[String]) -> Result<(), LaunchError> {
    let (program, rest) = args
        .split_first()
        .ok_or_else(|| LaunchError::Failed("empty command".into()))?;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(program)
            .args(rest)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .map_err(|_| LaunchError::Failed(format!("{} timed out", args.join(" "))))?
    .map_err(|e| LaunchError::io(program, e))?;
    if !out.status.success() {
        return Err(LaunchError::Failed(format!(
            "{} failed: {}",
            args.join(" "),
            tail(&String::from_utf8_lossy(&out.stderr))
        )));
    }
    Ok(())
}

fn capabilities(config: &Config) -> Result<oci_spec::runtime::Capabilities, LaunchError> {
    config
        .sandbox
        .capabilities
        .iter()
        .map(|c| {
            serde_json::from_value(serde_json::Value::String(c.clone()))
                .map_err(|_| LaunchError::Unavailable(format!("sandbox.capabilities: unknown {c}")))
        })
        .collect()
}

/// The hardened process: the sandbox's user, only the configured
/// capabilities, no_new_privileges, a descriptor limit.
fn process(
    config: &Config,
    args: &[String],
    env: &[String],
) -> Result<oci_spec::runtime::Process, LaunchError> {
    use oci_spec::runtime::{
        LinuxCapabilitiesBuilder, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, UserBuilder,
    };
    let err = LaunchError::Spec;
    let caps = capabilities(config)?;
    ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(config.sandbox.uid)
                .gid(config.sandbox.gid)
                .build()
                .map_err(err)?,
        )
        .args(args.to_vec())
        .env(env.to_vec())
        .cwd("/")
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .inheritable(caps.clone())
                .permitted(caps.clone())
                .ambient(caps)
                .build()
                .map_err(err)?,
        )
        .rlimits(vec![
            PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitNofile)
                .hard(4096u64)
                .soft(1024u64)
                .build()
                .map_err(err)?,
        ])
        .no_new_privileges(true)
        .build()
        .map_err(err)
}

fn process_json(config: &Config, args: &[String], env: &[String]) -> Result<Vec<u8>, LaunchError> {
    serde_json::to_vec_pretty(&process(config, args, env)?).map_err(LaunchError::Json)
}

/// The OCI bundle's `config.json` for one sandbox.
pub fn bundle_config(
    config: &Config,
    spec: &LaunchSpec,
    user_mounts: &[(PathBuf, &str, bool)],
) -> Result<Vec<u8>, LaunchError> {
    use oci_spec::runtime::{
        LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespaceType, LinuxPidsBuilder,
        LinuxResourcesBuilder, MountBuilder, RootBuilder, Spec,
    };
    let err = LaunchError::Spec;
    let rootfs = config.sandbox.rootfs.canonicalize().map_err(|e| {
        LaunchError::Unavailable(format!(
            "sandbox.rootfs {}: {e}",
            config.sandbox.rootfs.display()
        ))
    })?;
    let mut oci = Spec::default();
    oci.set_hostname(Some(spec.container_id.clone()));
    oci.set_root(Some(
        RootBuilder::default()
            .path(rootfs)
            .readonly(true)
            .build()
            .map_err(err)?,
    ));
    oci.set_process(Some(process(config, &spec.command, &spec.env)?));

    let mut mounts = oci.mounts().clone().unwrap_or_default();
    mounts.retain(|m| m.destination() != Path::new("/tmp"));
    mounts.push(
        MountBuilder::default()
            .destination("/tmp")
            .typ("tmpfs")
            .source("tmpfs")
            .options(vec![
                "nosuid".into(),
                "nodev".into(),
                "mode=1777".into(),
                format!("size={}", config.sandbox.tmp_size_bytes),
            ])
            .build()
            .map_err(err)?,
    );
    for (source, target, writable) in user_mounts {
        mounts.push(
            MountBuilder::default()
                .destination(*target)
                .typ("bind")
                .source(source)
                .options(vec![
                    "rbind".into(),
                    "nosuid".into(),
                    "nodev".into(),
                    if *writable { "rw".into() } else { "ro".into() },
                ])
                .build()
                .map_err(err)?,
        );
    }
    oci.set_mounts(Some(mounts));

    if let Some(linux) = oci.linux_mut() {
        // The network is the namespace runsc is started in (the sandbox's).
        let namespaces = linux
            .namespaces()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Network)
            .collect();
        linux.set_namespaces(Some(namespaces));
        let period = 100_000u64;
        linux.set_resources(Some(
            LinuxResourcesBuilder::default()
                .memory(
                    LinuxMemoryBuilder::default()
                        .limit(spec.memory_bytes as i64)
                        .build()
                        .map_err(err)?,
                )
                .cpu(
                    LinuxCpuBuilder::default()
                        .period(period)
                        .quota((spec.cpu_millis * period / 1000) as i64)
                        .build()
                        .map_err(err)?,
                )
                .pids(
                    LinuxPidsBuilder::default()
                        .limit(spec.pids_limit.saturating_add(GVISOR_PIDS_ALLOWANCE))
                        .build()
                        .map_err(err)?,
                )
                .build()
                .map_err(err)?,
        ));
        linux.set_cgroups_path(Some(PathBuf::from(format!(
            "/sluice/{}",
            spec.container_id
        ))));
    }
    serde_json::to_vec_pretty(&oci).map_err(LaunchError::Json)
}

#[cfg(test)]
mod tests;
