//! The control plane: the one owner of every change of state. Registers
//! (a sandbox started elsewhere) and launches (one sluice starts) sandboxes,
//! runs commands in them, unregisters them, revokes tokens, reaps expired
//! sandboxes and reconciles what a restart finds; each change is in the
//! registry and durable in the store (and shared with the fleet, if any)
//! before it returns, and undone if a step fails. A launch checks the
//! request, picks an address no registered sandbox holds, mints the
//! sandbox's token and registers it before anything starts, asks the
//! [`Launcher`] to build and start it, and undoes all of that on failure;
//! destroying takes everything down and frees the address last. The admin
//! API only maps HTTP onto these calls.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use rand::RngCore;

use crate::config::Config;
use crate::identity::store::{Change, SandboxRecord, Store, StoreError};
use crate::identity::token::{MintRequest, Signer, Verifier};
use crate::identity::{BindError, LaunchRecord, MacAddr, Registry, Sandbox};
use crate::sandbox::{
    ExecOutput, LaunchError, LaunchRequest, LaunchSpec, Launcher, MAX_ARG_BYTES, MAX_ARGS,
    MAX_EXEC_TIMEOUT_MS, host_veth_name, netns_name, sandbox_env, validate_launch,
};

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The token does not verify (its deny reason is the API's reason).
    #[error("the token is refused")]
    Token(#[source] crate::identity::token::TokenError),
    #[error("source_ip must be a unicast address")]
    NotUnicast,
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

/// Why a revocation was refused.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("jti must be 1-128 letters, digits, '-' or '_'")]
    BadJti,
    #[error("cannot persist the revocation")]
    Persist(#[source] StoreError),
}

/// Why a token replacement was refused (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    #[error("no such sandbox")]
    NotFound,
    /// The replacement does not verify (its deny reason is the API's).
    #[error("the replacement token is refused")]
    Token(#[source] crate::identity::token::TokenError),
    #[error("the replacement token is for another container")]
    OtherContainer,
    #[error("the replacement token is the sandbox's token already")]
    SameToken,
    #[error("cannot persist the replacement")]
    Persist(#[source] StoreError),
}

/// What a replacement did.
#[derive(Debug, Clone)]
pub struct Replaced {
    pub sandbox: Arc<Sandbox>,
    /// Live connections the new token still allows, and those it closed.
    pub kept: usize,
    pub closed: usize,
}

/// Why a token was not minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("this gateway has no signing key configured")]
    NoSigningKey,
    #[error("ttl_seconds must be between 1 and {0}")]
    BadTtl(u64),
    #[error(transparent)]
    Token(#[from] crate::identity::token::MintError),
}

/// `POST /v1/tokens` without `ttl_seconds`: the CLI's default, 4 h.
const DEFAULT_MINT_TTL_S: u64 = 4 * 3600;

/// What a launch answers.
#[derive(Debug, Clone)]
pub struct Launched {
    pub container_id: String,
    pub source_ip: Ipv4Addr,
    pub token: String,
    pub expires_at: u64,
    /// Each credential the token names → the sandbox's placeholder.
    pub credentials: std::collections::BTreeMap<String, String>,
}

/// The control plane: every change of state goes through it.
pub struct ControlPlane {
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
    /// Where each launched sandbox's pieces are (netns, veth, bundle): the
    /// control plane's to know, not the data plane's.
    launched: Mutex<std::collections::HashMap<String, LaunchRecord>>,
    /// The data plane's credentials and inspection authority: what a
    /// launched sandbox's placeholders and CA come from.
    gateway: Option<Arc<crate::proxy::Gateway>>,
}

impl ControlPlane {
    pub fn new(
        config: Arc<Config>,
        registry: Arc<Registry>,
        verifier: Arc<Verifier>,
        signer: Option<Arc<Signer>>,
        store: Arc<Store>,
        launcher: Arc<dyn Launcher>,
        proxy_port: u16,
    ) -> ControlPlane {
        ControlPlane {
            config,
            registry,
            verifier,
            signer,
            store,
            launcher,
            proxy_port,
            reserved: Mutex::new(HashSet::new()),
            launched: Mutex::default(),
            gateway: None,
        }
    }

    /// Launched sandboxes get their placeholders and CA from `gateway`.
    pub fn with_gateway(mut self, gateway: Arc<crate::proxy::Gateway>) -> ControlPlane {
        self.gateway = Some(gateway);
        self
    }

    /// A launched sandbox's environment, for its process and every exec:
    /// its identity and proxy, and with credentials the CA bundle's
    /// variables and each credential's placeholder under its `env`.
    fn environment(
        &self,
        id: &str,
        token: &str,
        grant: &crate::identity::token::Grant,
        gateway_ip: Ipv4Addr,
    ) -> Result<Vec<String>, LaunchError> {
        let mut env = sandbox_env(id, token, gateway_ip, self.proxy_port);
        let (credentials, trust) = self.sealing(grant)?;
        if trust.is_some() {
            for var in crate::sandbox::CA_VARIABLES {
                env.push(format!("{var}={}", crate::sandbox::CA_BUNDLE));
            }
        }
        let seal = self.gateway.as_ref().map(|gw| gw.seal());
        for (name, placeholder) in &credentials {
            let var = seal
                .as_ref()
                .and_then(|s| s.credentials.get(name))
                .and_then(|c| c.env.clone());
            if let Some(var) = var {
                env.push(format!("{var}={placeholder}"));
            }
        }
        Ok(env)
    }

    /// A launched sandbox's placeholders (by credential name) and its
    /// inspection CA (PEM), when its token names credentials.
    fn sealing(
        &self,
        grant: &crate::identity::token::Grant,
    ) -> Result<(std::collections::BTreeMap<String, String>, Option<String>), LaunchError> {
        let Some(gw) = &self.gateway else {
            return Ok(Default::default());
        };
        let placeholders = gw
            .sealed(grant)
            .map(|(sealed, _)| {
                sealed
                    .items
                    .iter()
                    .map(|(n, p, _)| (n.to_string(), p.clone()))
                    .collect()
            })
            .unwrap_or_default();
        // A CA only where something is inspected: a credential's host, or
        // a host with request rules.
        if grant.claims.credentials.is_empty() && grant.allowlist.ruled_names().is_empty() {
            return Ok((placeholders, None));
        }
        let ca = gw
            .sandbox_ca(grant)
            .map_err(|e| LaunchError::Failed(crate::error_chain(&e)))?;
        Ok((placeholders, Some(ca.pem.clone())))
    }

    fn launched(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, LaunchRecord>> {
        self.launched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The launch record of `id`, if sluice launched it.
    pub fn launch_record(&self, id: &str) -> Option<LaunchRecord> {
        self.launched().get(id).cloned()
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
    /// Mints a token: `req` with its lifetime `ttl_seconds` (default 4 h,
    /// at most `auth.max_ttl_s`).
    pub fn mint(
        &self,
        mut req: MintRequest,
        ttl_seconds: Option<u64>,
    ) -> Result<crate::identity::token::Minted, MintError> {
        let signer = self.signer.as_ref().ok_or(MintError::NoSigningKey)?;
        let ttl = ttl_seconds.unwrap_or(DEFAULT_MINT_TTL_S);
        if ttl == 0 || ttl > self.config.auth.max_ttl_s {
            return Err(MintError::BadTtl(self.config.auth.max_ttl_s));
        }
        req.ttl = Duration::from_secs(ttl);
        Ok(signer.mint(&req)?)
    }

    /// Registers a sandbox started elsewhere: `source_ip` → `token`,
    /// verified in full (ES256) now, with its MAC on a shared bridge.
    pub async fn register_token(
        &self,
        source_ip: IpAddr,
        token: String,
        mac: Option<MacAddr>,
    ) -> Result<Arc<Sandbox>, RegisterError> {
        let ip = source_ip.to_canonical();
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(RegisterError::NotUnicast);
        }
        let generation = self.verifier.generation();
        let grant = self
            .verifier
            .verify_fresh(&token)
            .map_err(RegisterError::Token)?;
        let sandbox = Sandbox::new(ip, token, grant, crate::identity::Origin::Registered)
            .verified_under(generation)
            .with_mac(mac);
        self.register(sandbox).await
    }

    /// Refuses a token from now on, on every door, and closes its live
    /// connections; durable (and shared with the fleet) before it returns.
    pub async fn revoke(&self, jti: &str) -> Result<(), RevokeError> {
        let jti = jti.trim();
        if jti.is_empty()
            || jti.len() > 128
            || !jti
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(RevokeError::BadJti);
        }
        // Kept until the token would have expired anyway: its own exp when
        // a registered sandbox holds it, else the longest lifetime sluice
        // mints.
        let exp = self
            .registry
            .list()
            .iter()
            .find(|s| s.grant().claims.jti == jti)
            .map(|s| s.grant().claims.exp)
            .unwrap_or_else(|| crate::identity::token::now_s() + self.config.auth.max_ttl_s);
        // Its live connections, on both doors, watch the token: they close.
        self.verifier.revoke(jti, exp);
        self.persist(vec![Change::Revoke {
            jti: jti.to_owned(),
            exp,
        }])
        .await
        .map_err(RevokeError::Persist)?;
        tracing::info!(jti, "token revoked");
        Ok(())
    }

    /// Replaces a registered (or launched) sandbox's token in place: same
    /// container, same address. The new token is verified in full and
    /// must name the same container; then, durable (and shared with the
    /// fleet) first, the sandbox holds it, every live connection under
    /// the old token is checked again (kept, or closed `policy_changed`)
    /// and the old token is revoked. Refused, nothing changes.
    pub async fn replace_token(&self, id: &str, token: String) -> Result<Replaced, ReplaceError> {
        let sandbox = self.registry.get_by_id(id).ok_or(ReplaceError::NotFound)?;
        let generation = self.verifier.generation();
        let grant = self
            .verifier
            .verify_fresh(&token)
            .map_err(ReplaceError::Token)?;
        if grant.claims.container_id != sandbox.container_id {
            return Err(ReplaceError::OtherContainer);
        }
        let old = sandbox.grant();
        if grant.claims.jti == old.claims.jti {
            return Err(ReplaceError::SameToken);
        }
        let mut record = SandboxRecord::of(&sandbox, self.launch_record(id).as_ref());
        record.token.clone_from(&token);
        self.persist(vec![
            Change::Put(record),
            Change::Replace {
                jti: old.claims.jti.clone(),
                exp: old.claims.exp,
                token: token.clone(),
            },
        ])
        .await
        .map_err(ReplaceError::Persist)?;
        let (kept, closed) = match &self.gateway {
            Some(gw) => {
                gw.replace_token(&old.claims.jti, old.claims.exp, &grant, &token, generation)
            }
            None => {
                sandbox.replace(&token, Arc::clone(&grant), generation);
                self.verifier.revoke(&old.claims.jti, old.claims.exp);
                (0, 0)
            }
        };
        // A launched sandbox's link follows the new rates (the second
        // layer; the gateway's own limits already apply).
        if let Some(record) = self.launch_record(id)
            && let Err(e) = self.launcher.shape(&record, &grant.claims.limits).await
        {
            tracing::warn!(container_id = id, error = %crate::error_chain(&e), "cannot shape the sandbox's link to its new limits");
        }
        tracing::info!(container_id = id, kept, closed, "token replaced");
        Ok(Replaced {
            sandbox,
            kept,
            closed,
        })
    }

    async fn register(&self, sandbox: Sandbox) -> Result<Arc<Sandbox>, RegisterError> {
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
            .persist(vec![Change::Put(SandboxRecord::of(&sandbox, None))])
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
        if let Some(gw) = &self.gateway {
            let seal = gw.seal();
            if let Some(unknown) = req
                .credentials
                .iter()
                .find(|n| seal.credentials.get(n).is_none())
            {
                return Err(LaunchError::BadRequest(format!(
                    "no [credentials.{unknown}] on this gateway"
                )));
            }
        }
        let minted = signer
            .mint(&MintRequest {
                enforce: req.enforce,
                limits: req.limits,
                organization_uuid: req.organization_uuid.clone(),
                credentials: req.credentials.clone(),
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

        let (credentials, trust) = self.sealing(&grant)?;
        let source_ip = self.allocate()?;
        let env = self.environment(&container_id, &minted.token, &grant, gateway_ip)?;
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
            trust,
            limits: req.limits,
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
        .verified_under(generation);
        let sandbox = match self.registry.bind(sandbox) {
            Ok(s) => s,
            Err(e) => {
                self.release(source_ip);
                return Err(LaunchError::Failed(e.to_string()));
            }
        };
        self.launched().insert(container_id.clone(), record.clone());
        if let Err(e) = self
            .persist(vec![Change::Put(SandboxRecord::of(
                &sandbox,
                Some(&record),
            ))])
            .await
        {
            self.launched().remove(&container_id);
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
                    credentials,
                })
            }
            Err(e) => {
                tracing::warn!(container_id, error = %e, "launch failed; undoing it");
                self.registry.unbind(&container_id);
                self.launched().remove(&container_id);
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
        let Some(record) = self.launch_record(id) else {
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
        let env = self.environment(id, &sandbox.token(), &sandbox.grant(), record.gateway_ip)?;
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
        let record = self.launched().remove(id);
        if let Some(ip) = ip.filter(|_| record.is_some()) {
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
            .revoke(&sandbox.grant().claims.jti, sandbox.grant().claims.exp);
        let persisted = self
            .persist(vec![
                Change::Remove(id.to_owned()),
                Change::Revoke {
                    jti: sandbox.grant().claims.jti.clone(),
                    exp: sandbox.grant().claims.exp,
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
        if let Some(record) = &record {
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
        self.registry
            .tenants()
            .tidy(now.saturating_sub(self.verifier.leeway()));
        let removed = self.registry.reap(now, self.verifier.leeway(), retention);
        for s in &removed {
            tracing::info!(container_id = %s.container_id, source_ip = %s.source_ip, "expired sandbox removed");
            let record = self.launched().remove(&s.container_id);
            if let Some(record) = &record {
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
    pub async fn reconcile(&self, restored: crate::identity::store::Restored) {
        self.launched().extend(restored.launched);
        let dropped = &restored.dropped;
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
            let Some(record) = self.launch_record(&s.container_id) else {
                continue;
            };
            if !self.launcher.is_running(&s.container_id, &record).await {
                tracing::warn!(container_id = %s.container_id, "launched sandbox is gone; cleaning up");
                if let Err(e) = self.destroy(&s.container_id).await {
                    tracing::error!(container_id = %s.container_id, error = %crate::error_chain(&e), "cannot clean it up");
                }
            }
        }
    }
}
