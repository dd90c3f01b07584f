//! Wiring: prepares the state directory (keys, admin token), binds every
//! listener, starts the transparent data plane, the admin API and the
//! metrics endpoint, and hands back the bound addresses and a handle that
//! drains them. Tests bind port 0 and drive the whole lifecycle through
//! [`run`] and [`Running::shutdown`].

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::config::{Config, ConfigError};
use crate::control::ControlPlane;
use crate::identity::Registry;
use crate::identity::store::{Change, Store, StoreError};
use crate::identity::token::{Jwks, KeyError, KeyPair, Signer, Verifier, write_private};
use crate::metrics::Mode;
use crate::net::orig_dst::OrigDstSource;
use crate::proxy::{Gateway, accept_loop};
use crate::sandbox::Runsc;
use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("keys")]
    Keys(#[from] KeyError),
    #[error("registry")]
    Store(#[from] StoreError),
    #[error("dns")]
    Resolver(#[from] crate::resolver::ResolveError),
    #[error("cannot bind {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("state directory {path}")]
    State {
        path: String,
        source: std::io::Error,
    },
    #[error("TLS")]
    Tls(#[from] crate::tls::TlsError),
    #[error("inspection")]
    Inspect(#[from] crate::authority::AuthorityError),
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("keys from auth.jwks_url")]
    Jwks(#[from] crate::identity::jwks_remote::RemoteError),
    #[error("store.redis_url")]
    Fleet(#[source] redis::RedisError),
}

/// What a caller may put in place of the real thing: how the gateway
/// learns original destinations (tests fix one) and what starts launched
/// sandboxes (tests use a fake; by default runsc).
#[derive(Clone)]
pub struct Options {
    pub orig_dst: OrigDstSource,
    pub launcher: Option<Arc<dyn crate::sandbox::Launcher>>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("orig_dst", &self.orig_dst)
            .field("launcher", &self.launcher.as_ref().map(|_| "custom"))
            .finish()
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            orig_dst: OrigDstSource::Socket,
            launcher: None,
        }
    }
}

/// A running gateway.
pub struct Running {
    jwks_path: std::path::PathBuf,
    /// With `auth.jwks_url`: wakes the refresher (SIGHUP).
    jwks_refresh: Option<Arc<tokio::sync::Notify>>,
    /// With `[store] backend = "redis"`.
    fleet: Option<Arc<crate::fleet::Fleet>>,
    gateway: Arc<Gateway>,
    /// Mints tokens; its presets are replaced on SIGHUP.
    signer: Option<Arc<Signer>>,
    started_with: Arc<Config>,
    /// `[dns]` as it applies now (SIGHUP replaces it).
    dns_now: std::sync::RwLock<crate::config::DnsConfig>,
    pub transparent_addr: SocketAddr,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The DNS door, UDP and TCP.
    pub dns_addr: SocketAddr,
    pub admin_token: String,
    pub registry: Arc<Registry>,
    pub verifier: Arc<Verifier>,
    shutdown: Shutdown,
    drain: Duration,
    servers: Vec<JoinHandle<()>>,
    /// The TLS doors' certificates (admin, proxy), reloaded on SIGHUP.
    tls: Vec<Arc<crate::tls::Reloadable>>,
}

impl Running {
    /// Whether the store answers: the fleet's Redis, or the local one
    /// (always).
    pub fn store_up(&self) -> bool {
        self.fleet.as_ref().is_none_or(|f| f.is_up())
    }

    /// Reloads the JWKS now (SIGHUP). A broken file keeps the current set.
    /// With `auth.jwks_url` the refresher fetches at once, in the
    /// background; the current set's size is returned.
    pub fn reload(&self) -> Result<usize, KeyError> {
        if let Some(now) = &self.jwks_refresh {
            now.notify_one();
            return Ok(self.verifier.jwks().len());
        }
        reload_jwks(&self.verifier, &self.jwks_path)
    }

    /// Reads the TLS doors' certificate, key and client CA files again
    /// (SIGHUP); a door whose files are broken keeps its last good set.
    /// New handshakes use the new ones; live connections keep theirs.
    pub fn reload_tls(&self) -> Vec<crate::tls::TlsError> {
        self.tls.iter().filter_map(|t| t.reload().err()).collect()
    }

    /// Applies a new configuration (SIGHUP) to what comes from now on:
    /// `[gateway]`'s policy, `[dns]` (a new resolver, its cache empty) and
    /// `[presets]` (tokens verified from now on). What is fixed at start
    /// keeps its value and is named, every key in one log line: listener
    /// addresses, `max_connections`, the proxy's TLS file names,
    /// `l2_bind_iface` (its bindings live on that bridge), `dns.listen`,
    /// `[store]`, `[auth]`, `[admin]`, `[metrics]`, `[sandbox]`,
    /// `state_dir`. Live connections keep what they started with.
    pub fn reload_config(&self, new: &Config) -> Result<(), ConfigError> {
        new.validate()?;
        let presets = crate::presets::Presets::new(&new.presets).map_err(|e| {
            ConfigError::Invalid(vec![crate::config::KeyError {
                key: "presets".into(),
                message: e.to_string(),
            }])
        })?;
        let old = &self.started_with;
        let (mut g, was) = (new.gateway.clone(), &old.gateway);
        let mut restart: Vec<&'static str> = Vec::new();
        let mut keep = |changed: bool, key: &'static str| {
            if changed {
                restart.push(key);
            }
        };
        keep(
            g.transparent_listen != was.transparent_listen,
            "gateway.transparent_listen",
        );
        keep(g.proxy_listen != was.proxy_listen, "gateway.proxy_listen");
        keep(
            g.max_connections != was.max_connections,
            "gateway.max_connections",
        );
        // The files named at start are read again on SIGHUP; other names
        // take a restart.
        keep(
            g.proxy_tls_cert_file != was.proxy_tls_cert_file,
            "gateway.proxy_tls_cert_file",
        );
        keep(
            g.proxy_tls_key_file != was.proxy_tls_key_file,
            "gateway.proxy_tls_key_file",
        );
        keep(
            g.l2_bind_iface != was.l2_bind_iface,
            "gateway.l2_bind_iface",
        );
        keep(new.dns.listen != old.dns.listen, "dns.listen");
        keep(new.store != old.store, "[store]");
        keep(new.auth != old.auth, "[auth]");
        keep(new.admin != old.admin, "[admin]");
        keep(new.metrics != old.metrics, "[metrics]");
        keep(new.sandbox != old.sandbox, "[sandbox]");
        keep(new.state_dir != old.state_dir, "state_dir");
        keep(
            new.audit.otlp_endpoint != old.audit.otlp_endpoint,
            "audit.otlp_endpoint",
        );
        keep(new.audit.queue != old.audit.queue, "audit.queue");
        keep(new.limits != old.limits, "[limits]");
        // The data plane and the control plane keep one view of what is
        // fixed: the values they started with.
        g.transparent_listen = was.transparent_listen;
        g.proxy_listen = was.proxy_listen;
        g.max_connections = was.max_connections;
        g.proxy_tls_cert_file.clone_from(&was.proxy_tls_cert_file);
        g.proxy_tls_key_file.clone_from(&was.proxy_tls_key_file);
        g.l2_bind_iface.clone_from(&was.l2_bind_iface);
        let mut dns = new.dns.clone();
        dns.listen = old.dns.listen;
        let applied_dns = dns != *self.dns_now.read().unwrap_or_else(|p| p.into_inner());
        if applied_dns {
            let resolver = crate::resolver::Resolver::new(&dns).map_err(|e| {
                ConfigError::Invalid(vec![crate::config::KeyError {
                    key: "dns".into(),
                    message: e.to_string(),
                }])
            })?;
            self.gateway.set_resolver(resolver, &g);
            *self.dns_now.write().unwrap_or_else(|p| p.into_inner()) = dns;
        } else {
            self.gateway.set_policy(&g);
        }
        let presets = Arc::new(presets);
        if let Some(signer) = &self.signer {
            signer.set_presets(Arc::clone(&presets));
        }
        self.verifier.set_presets(presets);
        keep(new.inspect != old.inspect, "[inspect]");
        // The secrets are read again: a rotated file or variable applies
        // to every request from now on.
        let seal = self.gateway.seal();
        let credentials = crate::credentials::Credentials::load(&new.credentials).map_err(|p| {
            ConfigError::Invalid(
                p.into_iter()
                    .map(|(key, e)| crate::config::KeyError {
                        key,
                        message: e.to_string(),
                    })
                    .collect(),
            )
        })?;
        // A new pool: a connection pooled under the old secrets is not
        // reused under the new ones.
        self.gateway.set_seal(crate::proxy::Seal {
            authority: seal.authority.clone(),
            credentials: Arc::new(credentials),
            pool: Arc::default(),
        });
        if !restart.is_empty() {
            tracing::warn!(
                keys = %restart.join(", "),
                "these changed keys take effect only with a restart; their running values stay"
            );
        }
        tracing::info!(
            dns = applied_dns,
            "configuration reloaded: [gateway] policy, [presets] and [credentials] (secrets read again) applied; [dns] applied when it changed"
        );
        Ok(())
    }

    /// Stops accepting, drains live connections up to
    /// `gateway.drain_timeout_ms`, closes the rest, stops the admin and
    /// metrics servers. Returns how many connections had to be cut.
    pub async fn shutdown(self) -> usize {
        let cut = self.shutdown.drain(self.drain).await;
        for server in self.servers {
            server.abort();
            let _ = server.await;
        }
        // The destinations as the last connection left them.
        let path = self
            .started_with
            .state_dir
            .join(crate::events::DESTINATIONS_FILE);
        let registry = Arc::clone(&self.registry);
        if let Err(e) = self
            .gateway
            .events
            .save(&path, |c| registry.get_by_id(c).is_some())
        {
            tracing::warn!(path = %path.display(), error = %e, "destinations not saved");
        }
        let counts = path.with_file_name(crate::live::COUNTS_FILE);
        if let Err(e) = self.registry.tenants().save_counts(&counts) {
            tracing::warn!(path = %counts.display(), error = %e, "daily counts not saved");
        }
        cut
    }
}

/// Connections the admin API holds at once, in total and from one source.
const ADMIN_CONNECTIONS: usize = 1024;
const ADMIN_PER_SOURCE: usize = 64;
/// A TLS handshake on the admin API must finish within this.
const ADMIN_HANDSHAKE: Duration = Duration::from_secs(3);

/// Starts everything the config describes.
pub async fn run(config: Config, options: Options) -> Result<Running, AppError> {
    config.validate()?;
    let config = Arc::new(config);
    let state = prepare_state(&config)?;
    let prometheus = crate::metrics::install();

    let bind = |what: &'static str, addr: SocketAddr| {
        crate::net::bind(addr).map_err(|source| AppError::Bind { what, addr, source })
    };
    let g = &config.gateway;
    let transparent = bind("gateway.transparent_listen", g.transparent_listen)?;
    let proxy = bind("gateway.proxy_listen", g.proxy_listen)?;
    let admin_listener = bind("admin.listen", config.admin.listen)?;
    let metrics_listener = bind("metrics.listen", config.metrics.listen)?;
    let local = |l: &tokio::net::TcpListener, what: &'static str, addr| {
        l.local_addr()
            .map_err(|source| AppError::Bind { what, addr, source })
    };
    let transparent_addr = local(
        &transparent,
        "gateway.transparent_listen",
        g.transparent_listen,
    )?;
    let proxy_addr = local(&proxy, "gateway.proxy_listen", g.proxy_listen)?;
    let admin_addr = local(&admin_listener, "admin.listen", config.admin.listen)?;
    let metrics_addr = local(&metrics_listener, "metrics.listen", config.metrics.listen)?;
    // The DNS door: TCP and UDP on one port (port 0 takes the TCP port's).
    let dns_tcp = bind("dns.listen", config.dns.listen)?;
    let dns_addr = local(&dns_tcp, "dns.listen", config.dns.listen)?;
    let dns_udp = bind_udp(dns_addr).map_err(|source| AppError::Bind {
        what: "dns.listen (udp)",
        addr: dns_addr,
        source,
    })?;

    // Keys from auth.jwks_url (a fleet's), or the file.
    let remote = if config.auth.jwks_url.is_empty() {
        None
    } else {
        let ca = &config.auth.jwks_ca_file;
        Some(Arc::new(crate::identity::jwks_remote::RemoteJwks::new(
            &config.auth.jwks_url,
            (!ca.as_os_str().is_empty()).then_some(ca.as_path()),
            &config.state_dir,
        )?))
    };
    let jwks = match &remote {
        Some(r) => r.initial().await?,
        None => state.jwks,
    };
    let shutdown = Shutdown::new();
    let verifier = Arc::new(
        Verifier::new(
            jwks,
            &config.auth.issuer,
            &config.auth.audience,
            config.auth.leeway_s,
        )
        .with_max_life(config.auth.max_ttl_s)
        .with_presets(Arc::clone(&state.presets))
        .with_stop(shutdown.hard()),
    );
    let registry = Arc::new(Registry::new());
    let store = Arc::new(Store::open(&config.state_dir)?);
    let restored = store.restore(&registry, &verifier).await?;
    if !registry.is_empty() || !restored.dropped.is_empty() {
        tracing::info!(
            restored = registry.len(),
            dropped = restored.dropped.len(),
            "registry restored"
        );
    }
    // The fleet store: this gateway's durable changes are shared once on
    // disk here; Redis's health is sluice_store_up.
    let data_plane: Arc<std::sync::OnceLock<Arc<Gateway>>> = Arc::default();
    let fleet = match config.store.backend {
        crate::config::StoreBackend::Local => {
            ::metrics::gauge!(crate::metrics::STORE_UP).set(1.0);
            None
        }
        crate::config::StoreBackend::Redis => {
            let name = nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "sluice".into());
            let gateway = format!("{name}/{admin_addr}");
            let fleet = Arc::new(
                crate::fleet::Fleet::new(
                    &config.store.redis_url,
                    &config.store.key_prefix,
                    &gateway,
                )
                .map_err(AppError::Fleet)?,
            );
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            store.share_with(tx);
            tokio::spawn(Arc::clone(&fleet).run(
                crate::fleet::Local {
                    registry: Arc::clone(&registry),
                    verifier: Arc::clone(&verifier),
                    store: Arc::clone(&store),
                    gateway: Arc::clone(&data_plane),
                },
                rx,
                shutdown.clone(),
            ));
            Some(fleet)
        }
    };
    let orgs = Arc::new(crate::limits::org::OrgBudgets::new(
        &config.limits.organization_budgets(),
        fleet.is_some(),
    ));
    registry.tenants().set_orgs(Arc::clone(&orgs));
    if let Some(fleet) = &fleet {
        tokio::spawn(Arc::clone(fleet).lease(orgs, shutdown.clone()));
    }
    let own = vec![
        transparent_addr,
        proxy_addr,
        admin_addr,
        metrics_addr,
        dns_addr,
    ];
    let resolver = Arc::new(crate::resolver::Resolver::new(&config.dns)?);
    let local = Arc::new(crate::net::local_addrs::LocalAddrs::read());
    let gateway = Arc::new(Gateway::new(
        Arc::clone(&config),
        Arc::clone(&registry),
        Arc::clone(&verifier),
        shutdown.clone(),
        options.orig_dst,
        crate::proxy::upstream::Own {
            listeners: own,
            addrs: Arc::clone(&local),
        },
        resolver,
    ));
    let _ = data_plane.set(Arc::clone(&gateway));
    // Inspection: the key every sandbox CA and placeholder is derived
    // from, and the credentials (their secrets read now, again on SIGHUP).
    let key = crate::authority::load_key(&config.inspect.key_file, &config.state_dir)?;
    let authority = crate::authority::Authority::new(
        key,
        Duration::from_secs(config.inspect.leaf_ttl_s),
        &config.inspect.upstream_ca_file,
    )?;
    let credentials = crate::credentials::Credentials::load(&config.credentials)
        .map_err(|problems| AppError::Credentials(credential_errors(problems)))?;
    gateway.set_seal(crate::proxy::Seal {
        authority: Some(Arc::new(authority)),
        credentials: Arc::new(credentials),
        pool: Arc::default(),
    });

    let signer = state.signer.map(Arc::new);
    let signing = signer.is_some();
    let control = Arc::new(
        ControlPlane::new(
            Arc::clone(&config),
            Arc::clone(&registry),
            Arc::clone(&verifier),
            signer.clone(),
            Arc::clone(&store),
            options.launcher.clone().unwrap_or_else(|| {
                Arc::new(Runsc::new(
                    Arc::clone(&config),
                    transparent_addr.port(),
                    proxy_addr.port(),
                    dns_addr.port(),
                ))
            }),
            proxy_addr.port(),
        )
        .with_gateway(Arc::clone(&gateway)),
    );
    control.reconcile(restored).await;
    let verify_pass = tokio::spawn(verify_restored(
        Arc::clone(&control),
        Arc::clone(&registry),
        Arc::clone(&verifier),
    ));

    // Events: what each registered sandbox reached, kept across a
    // restart (saved every few seconds and at the end), and the export.
    let destinations_file = config.state_dir.join(crate::events::DESTINATIONS_FILE);
    registry
        .tenants()
        .load_counts(&config.state_dir.join(crate::live::COUNTS_FILE));
    {
        let r = Arc::clone(&registry);
        gateway
            .events
            .load(&destinations_file, |c| r.get_by_id(c).is_some());
    }
    let mut servers = vec![verify_pass];
    servers.push(tokio::spawn(save_destinations(
        Arc::clone(&gateway.events),
        Arc::clone(&registry),
        destinations_file,
        shutdown.clone(),
    )));
    if !config.audit.otlp_endpoint.is_empty() {
        let rx = gateway.events.export_to(config.audit.queue);
        let stop = tokio_util::sync::CancellationToken::new();
        let (s, st) = (shutdown.clone(), stop.clone());
        tokio::spawn(async move {
            s.stopping().await;
            st.cancel();
        });
        servers.push(tokio::spawn(crate::events::otlp::run(
            config.audit.otlp_endpoint.clone(),
            rx,
            stop,
        )));
    }
    servers.push(tokio::spawn(local.watch(shutdown.clone())));
    servers.push(tokio::spawn(accept_loop(
        transparent,
        Arc::clone(&gateway),
        Mode::Transparent,
        crate::proxy::transparent::handle,
    )));
    let mut tls = Vec::new();
    match crate::tls::TlsFiles::new(
        "gateway.proxy_tls_",
        &g.proxy_tls_cert_file,
        &g.proxy_tls_key_file,
        None,
    ) {
        None => servers.push(tokio::spawn(accept_loop(
            proxy,
            Arc::clone(&gateway),
            Mode::Proxy,
            crate::proxy::explicit::handle,
        ))),
        Some(files) => {
            let door_tls = Arc::new(crate::tls::Reloadable::load(files)?);
            tls.push(Arc::clone(&door_tls));
            servers.push(tokio::spawn(accept_loop(
                proxy,
                Arc::clone(&gateway),
                Mode::Proxy,
                move |gw, stream, peer, admission| {
                    crate::proxy::explicit::handle_tls(
                        gw,
                        stream,
                        peer,
                        admission,
                        Arc::clone(&door_tls),
                    )
                },
            )));
        }
    }

    let door = Arc::new(crate::dns::Door::new(Arc::clone(&gateway)));
    servers.push(tokio::spawn(crate::dns::serve_udp(
        dns_udp,
        Arc::clone(&door),
    )));
    servers.push(tokio::spawn(crate::dns::serve_tcp(
        dns_tcp,
        Arc::clone(&door),
    )));
    servers.push(tokio::spawn({
        let (door, shutdown) = (Arc::clone(&door), shutdown.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = tick.tick() => door.tidy(),
                    _ = shutdown.stopping() => return,
                }
            }
        }
    }));

    let admin_router = admin::router(Arc::new(AdminState {
        config: Arc::clone(&config),
        registry: Arc::clone(&registry),
        verifier: Arc::clone(&verifier),
        admin_token: state.admin_token.clone(),
        control: Arc::clone(&control),
        gateway: Arc::clone(&gateway),
    }));
    servers.push(tokio::spawn(reaper(
        Arc::clone(&control),
        Arc::clone(&verifier),
        Arc::clone(&store),
        config.sandbox.reap_after_s,
        shutdown.clone(),
    )));
    // The admin API through the listener primitive: connections capped in
    // total and per source, so one party cannot hold every place.
    let admin_limits = crate::listener::Limits::new(ADMIN_CONNECTIONS, ADMIN_PER_SOURCE);
    match crate::tls::TlsFiles::new(
        "admin.tls_",
        &config.admin.tls_cert_file,
        &config.admin.tls_key_file,
        Some(&config.admin.client_ca_file),
    ) {
        None => servers.push(serve_http(
            crate::listener::Admitting::new(admin_listener, admin_limits, shutdown.clone()),
            admin_router,
            shutdown.clone(),
        )),
        Some(files) => {
            let admin_tls = Arc::new(crate::tls::Reloadable::load(files)?);
            tls.push(Arc::clone(&admin_tls));
            let listener = crate::tls::TlsListener::new(
                admin_listener,
                admin_tls,
                ADMIN_HANDSHAKE,
                admin_limits,
                shutdown.clone(),
            )
            .map_err(|source| AppError::Bind {
                what: "admin.listen",
                addr: admin_addr,
                source,
            })?;
            servers.push(serve_http(listener, admin_router, shutdown.clone()));
        }
    }
    let metrics_router = Router::new().route(
        "/metrics",
        get(move || {
            let p = prometheus.clone();
            async move { p.render() }
        }),
    );
    servers.push(serve_http(
        crate::listener::Admitting::new(
            metrics_listener,
            crate::listener::Limits::new(ADMIN_CONNECTIONS, ADMIN_PER_SOURCE),
            shutdown.clone(),
        ),
        metrics_router,
        shutdown.clone(),
    ));

    // One line that says what runs where (the whole configuration is at
    // debug level).
    tracing::info!(
        transparent = %transparent_addr,
        proxy = %proxy_addr,
        dns = %dns_addr,
        admin = %admin_addr,
        metrics = %metrics_addr,
        keys = verifier.jwks().len(),
        jwks = %remote.as_ref().map_or_else(|| config.jwks_path().display().to_string(), |r| r.url().to_owned()),
        signing,
        store = %config.state_dir.display(),
        sandboxes = registry.len(),
        "sluice listening"
    );
    let jwks_refresh = match remote {
        None => {
            servers.push(tokio::spawn(jwks_watcher(
                Arc::clone(&verifier),
                config.jwks_path(),
                shutdown.clone(),
            )));
            None
        }
        Some(remote) => {
            let now = Arc::new(tokio::sync::Notify::new());
            servers.push(tokio::spawn(jwks_refresher(
                Arc::clone(&verifier),
                remote,
                Duration::from_secs(config.auth.jwks_refresh_s),
                Arc::clone(&now),
                shutdown.clone(),
            )));
            Some(now)
        }
    };
    Ok(Running {
        jwks_path: config.jwks_path(),
        jwks_refresh,
        fleet,
        gateway: Arc::clone(&gateway),
        signer: signer.clone(),
        started_with: Arc::clone(&config),
        dns_now: std::sync::RwLock::new(config.dns.clone()),
        transparent_addr,
        proxy_addr,
        admin_addr,
        metrics_addr,
        dns_addr,
        admin_token: state.admin_token,
        registry,
        verifier,
        shutdown,
        tls,
        drain: Duration::from_millis(g.drain_timeout_ms),
        servers,
    })
}

/// Once a second: closes the connections of expired sandboxes, removes
/// those expired past `reap_after_s`, forgets revocations of tokens that
/// expired anyway, and writes the registry when any of that changed it.
async fn reaper(
    control: Arc<ControlPlane>,
    verifier: Arc<Verifier>,
    store: Arc<Store>,
    reap_after_s: u64,
    shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while shutdown.tick(&mut tick).await {
        let now = crate::identity::token::now_s();
        if let Err(e) = control.reap(now, reap_after_s).await {
            tracing::error!(error = %crate::error_chain(&e), "cannot persist the registry");
        }
        let purged = verifier.purge_expired(now);
        if let Err(e) = store
            .apply(purged.into_iter().map(Change::Forget).collect())
            .await
        {
            tracing::error!(error = %crate::error_chain(&e), "cannot persist the registry");
        }
    }
}

fn reload_jwks(verifier: &Verifier, path: &Path) -> Result<usize, KeyError> {
    match Jwks::load(path) {
        Ok(jwks) => {
            let keys = jwks.len();
            verifier.set_jwks(jwks);
            tracing::info!(path = %path.display(), keys, "JWKS reloaded");
            Ok(keys)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %crate::error_chain(&e), "JWKS not reloaded; keeping the last good set");
            Err(e)
        }
    }
}

/// Fetches `auth.jwks_url` every `every` (or when woken), applying a
/// changed set; a failure keeps the current one.
async fn jwks_refresher(
    verifier: Arc<Verifier>,
    remote: Arc<crate::identity::jwks_remote::RemoteJwks>,
    every: Duration,
    now: Arc<tokio::sync::Notify>,
    shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = now.notified() => {}
            _ = shutdown.stopping() => return,
        }
        if let Err(e) = remote.refresh(&verifier).await {
            tracing::warn!(error = %crate::error_chain(&e), "JWKS not refreshed; keeping the last good set");
        }
    }
}

/// Reloads the JWKS when its file changes (size or mtime), so keys rotate
/// without a restart.
async fn jwks_watcher(verifier: Arc<Verifier>, path: std::path::PathBuf, shutdown: Shutdown) {
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    let mut seen = stamp(&path);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while shutdown.tick(&mut tick).await {
        let now = stamp(&path);
        if now != seen {
            seen = now;
            let _ = reload_jwks(&verifier, &path);
        }
    }
}

fn serve_http<L>(listener: L, router: Router, shutdown: Shutdown) -> JoinHandle<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    tokio::spawn(async move {
        let stop = async move { shutdown.stopping().await };
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "HTTP server failed");
        }
    })
}

struct State {
    jwks: Jwks,
    signer: Option<Signer>,
    admin_token: String,
    presets: Arc<crate::presets::Presets>,
}

/// Creates what a first start needs (state dir 0700, an ES256 key pair,
/// an admin token, files 0600) and loads it.
fn prepare_state(config: &Config) -> Result<State, AppError> {
    let state_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| AppError::State { path, source }
    };
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.state_dir)
            .map_err(state_err(&config.state_dir))?;
    }
    // Validated with the config: a bad preset never gets this far.
    let presets = Arc::new(crate::presets::Presets::new(&config.presets).map_err(|e| {
        AppError::Config(ConfigError::Invalid(vec![crate::config::KeyError {
            key: "presets".into(),
            message: e.to_string(),
        }]))
    })?);
    let key_path = config.signing_key_path();
    let jwks_path = config.jwks_path();
    let kid = &config.auth.signing_kid;
    if !key_path.exists() && !jwks_path.exists() {
        let pair = KeyPair::generate(kid)?;
        pair.write_to(&key_path, &jwks_path)?;
        tracing::info!(key = %key_path.display(), jwks = %jwks_path.display(), kid, "generated an ES256 key pair");
    } else if key_path.exists() && !jwks_path.exists() {
        let pem = std::fs::read_to_string(&key_path).map_err(state_err(&key_path))?;
        let pair = KeyPair::from_private_pem(&pem, kid)?;
        pair.write_jwks(&jwks_path)?;
    }
    let jwks = Jwks::load(&jwks_path)?;
    let signer = if key_path.exists() {
        Some(
            Signer::load(&key_path, kid, &config.auth.issuer, &config.auth.audience)?
                .with_presets(Arc::clone(&presets)),
        )
    } else {
        tracing::warn!(key = %key_path.display(), "no signing key: POST /v1/tokens is unavailable");
        None
    };
    if signer.is_some()
        && !jwks.public()["keys"]
            .as_array()
            .is_some_and(|keys| keys.iter().any(|k| k["kid"] == kid.as_str()))
    {
        tracing::warn!(kid, jwks = %jwks_path.display(), "the signing kid is not in the JWKS: minted tokens will not verify");
    }

    let token_path = config.admin_token_path();
    if !token_path.exists() {
        let mut raw = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        if let Some(dir) = token_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(state_err(dir))?;
        }
        write_private(
            &token_path,
            format!("{}\n", URL_SAFE_NO_PAD.encode(raw)).as_bytes(),
        )?;
        tracing::info!(path = %token_path.display(), "generated the admin token");
    }
    let admin_token = std::fs::read_to_string(&token_path)
        .map_err(state_err(&token_path))?
        .trim()
        .to_owned();
    if admin_token.len() < 16 {
        return Err(AppError::State {
            path: token_path.display().to_string(),
            source: std::io::Error::other("the admin token must be at least 16 characters"),
        });
    }
    Ok(State {
        jwks,
        signer,
        admin_token,
        presets,
    })
}

/// Binds the DNS door's UDP socket.
fn bind_udp(addr: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// After a restore: every restored token verified in full (ES256), on the
/// blocking pool, a few hundred at a time, while the gateway already
/// serves. A token that no longer verifies (its key gone, a bad signature)
/// has its sandbox removed; the cache keeps the good ones, so their first
/// connections do not pay for it.
async fn verify_restored(
    control: Arc<ControlPlane>,
    registry: Arc<Registry>,
    verifier: Arc<Verifier>,
) {
    use crate::deny::Deny;
    let all = registry.list();
    let started = std::time::Instant::now();
    let mut failed: Vec<String> = Vec::new();
    for chunk in all.chunks(256) {
        let chunk: Vec<_> = chunk.to_vec();
        let v = Arc::clone(&verifier);
        let bad = tokio::task::spawn_blocking(move || {
            chunk
                .iter()
                .filter(|s| {
                    matches!(
                        s.current_grant(&v),
                        Err(d) if !matches!(d, Deny::TokenExpired | Deny::TokenRevoked)
                    )
                })
                .map(|s| s.container_id.clone())
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        failed.extend(bad);
    }
    for id in &failed {
        tracing::warn!(container_id = %id, "a restored token does not verify: sandbox removed");
        if let Err(e) = control.destroy(id).await {
            tracing::error!(container_id = %id, error = %crate::error_chain(&e), "cannot remove it");
        }
    }
    if !all.is_empty() {
        tracing::info!(
            verified = all.len() - failed.len(),
            removed = failed.len(),
            ms = started.elapsed().as_millis() as u64,
            "restored tokens verified"
        );
    }
}

/// Every credential problem, each with its key, on one line.
fn credential_errors(problems: Vec<(String, crate::credentials::CredentialError)>) -> String {
    problems
        .iter()
        .map(|(k, e)| format!("{k}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Saves the destinations tables every few seconds while anything
/// changed, and once more when the gateway stops; a sandbox no longer
/// registered is dropped from them. Off the runtime's threads.
async fn save_destinations(
    events: Arc<crate::events::Events>,
    registry: Arc<Registry>,
    path: std::path::PathBuf,
    shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(crate::events::SAVE_EVERY);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown.stopping() => true,
        };
        let (e, r, p) = (Arc::clone(&events), Arc::clone(&registry), path.clone());
        let saved =
            tokio::task::spawn_blocking(move || e.save(&p, |c| r.get_by_id(c).is_some())).await;
        if let Ok(Err(err)) = saved {
            tracing::warn!(path = %path.display(), error = %err, "destinations not saved");
        }
        // And today's daily counts, so a restart gives no budget back.
        let counts = path.with_file_name(crate::live::COUNTS_FILE);
        let (r, c) = (Arc::clone(&registry), counts.clone());
        let saved = tokio::task::spawn_blocking(move || r.tenants().save_counts(&c)).await;
        if let Ok(Err(err)) = saved {
            tracing::warn!(path = %counts.display(), error = %err, "daily counts not saved");
        }
        if last {
            return;
        }
    }
}
