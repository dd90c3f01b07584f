//! Configuration: one typed struct, loaded once from TOML over embedded
//! defaults, validated with errors that name the key, shared as
//! `Arc<Config>`. Every key is optional (see `shared/CONTRACT.md`).
//! This module reads files and nothing else; it never mutates the process
//! environment.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::host::HostName;

/// Why a configuration was refused. `Invalid` carries every problem found,
/// each with the key it belongs to.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<KeyError>),
}

/// One problem with one key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct KeyError {
    pub key: String,
    pub message: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub state_dir: PathBuf,
    pub gateway: GatewayConfig,
    pub auth: AuthConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub sandbox: SandboxConfig,
    pub dns: DnsConfig,
    pub store: StoreConfig,
    /// Named host groups for allowlists (`@name`), beside the built-in
    /// `package_managers` and `os_updates`.
    pub presets: BTreeMap<String, Vec<String>>,
    pub inspect: InspectConfig,
    /// `[credentials.NAME]`: secrets the gateway adds to requests.
    pub credentials: BTreeMap<String, CredentialConfig>,
    pub audit: AuditConfig,
    pub limits: LimitsConfig,
}

/// `[limits]`: budgets beyond one sandbox's token.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// `organization_uuid` → its budget, for every sandbox whose token
    /// names it, together (across the fleet with `[store] backend =
    /// "redis"`).
    pub organizations: BTreeMap<String, OrgLimitConfig>,
}

/// One organisation's budget.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OrgLimitConfig {
    /// Bytes both ways per UTC day.
    pub bytes_per_day: u64,
}

impl LimitsConfig {
    /// uuid → bytes per day.
    pub fn organization_budgets(&self) -> BTreeMap<String, u64> {
        self.organizations
            .iter()
            .map(|(k, v)| (k.clone(), v.bytes_per_day))
            .collect()
    }
}

/// `[audit]`: where events go beside stderr.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// An OTLP/HTTP (protobuf) logs endpoint
    /// (`http://collector:4318/v1/logs`); empty: stderr only.
    pub otlp_endpoint: String,
    /// Events held while the collector is slow or away; beyond it they
    /// are dropped and counted.
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            otlp_endpoint: String::new(),
            queue: 10_000,
        }
    }
}

/// `[inspect]`: TLS inspection, only for the hosts that need it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct InspectConfig {
    /// The secret each sandbox's inspection CA and placeholders are
    /// derived from, shared by a fleet; empty: made in
    /// `state_dir/inspect/key` on first start (0600).
    pub key_file: PathBuf,
    /// Extra roots to verify inspected upstreams with, beside the system's.
    pub upstream_ca_file: PathBuf,
    /// Leaf certificates' life ahead (`notBefore` is a day back).
    pub leaf_ttl_s: u64,
}

impl Default for InspectConfig {
    fn default() -> Self {
        InspectConfig {
            key_file: PathBuf::new(),
            upstream_ca_file: PathBuf::new(),
            leaf_ttl_s: 86_400,
        }
    }
}

/// `[credentials.NAME]`: a secret the gateway holds and sets in a header
/// of an inspected request to one of `hosts`; a sandbox holds only a
/// placeholder. Never serialised with its secret (it has none here: only
/// where to read it).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct CredentialConfig {
    pub hosts: Vec<String>,
    pub secret_file: PathBuf,
    pub secret_env: String,
    pub header: String,
    pub format: String,
    pub env: String,
}

/// `[store]`: where registrations and revocations live beyond this
/// process. Always the local file; with `redis`, also shared with a fleet.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    pub redis_url: String,
    pub key_prefix: String,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// `state_dir/registry.redb` only.
    Local,
    /// And a Redis shared by the gateways of a fleet: sessions and
    /// revocations.
    Redis,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Local,
            redis_url: "redis://127.0.0.1:6379/0".into(),
            key_prefix: "sluice:".into(),
        }
    }
}

/// `[dns]`: the DNS door for sandboxes, and the resolver sluice itself
/// uses for names not in `[gateway.resolve]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// UDP and TCP; the rules REDIRECT sandboxes' port 53 here.
    pub listen: SocketAddr,
    /// Resolvers (`ip:port`) for names not in `[gateway.resolve]`; empty:
    /// the nameservers of /etc/resolv.conf.
    pub upstream: Vec<SocketAddr>,
    /// Cap on the TTL of answers given and cached.
    pub max_ttl_s: u32,
    /// Queries per second one sandbox may make (then REFUSED), and the
    /// burst above that rate it may make at once.
    pub queries_per_second: u32,
    pub burst: u32,
    /// Lookups sent upstream at once, over all sandboxes (then SERVFAIL).
    pub max_inflight: usize,
    /// Lookups one sandbox may have in flight at once, from its DNS
    /// queries and the names its connections make the gateway resolve
    /// alike (then SERVFAIL, or 502): its share of `max_inflight`.
    pub max_inflight_per_sandbox: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub transparent_listen: SocketAddr,
    pub proxy_listen: SocketAddr,
    /// With a key: the proxy listener speaks TLS (`HTTPS_PROXY=https://…`).
    pub proxy_tls_cert_file: PathBuf,
    pub proxy_tls_key_file: PathBuf,
    pub allowed_ports: Vec<u16>,
    pub peek_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub drain_timeout_ms: u64,
    pub max_connections: usize,
    /// Concurrent relayed connections one sandbox may hold.
    pub max_connections_per_sandbox: usize,
    /// Concurrent connections from one source address, counted from
    /// accept (before anything identifies the client), on both doors.
    pub max_connections_per_source: usize,
    pub deny_private_destinations: bool,
    pub allow_destinations: Vec<IpNet>,
    /// The gateway's own addresses (every address of its namespace, read
    /// at start and on every change) are refused whatever
    /// `allow_destinations` says; `true` hands them to the ordinary guard.
    /// Only for a gateway that fronts a service on its own host (the quick
    /// start, tests): a sandbox could then reach whatever listens there.
    pub allow_local_destinations: bool,
    /// Static name → addresses, checked before DNS.
    pub resolve: BTreeMap<String, Vec<IpAddr>>,
    /// Largest ClientHello handshake message accepted before `no_host`.
    pub max_client_hello_bytes: usize,
    /// Largest HTTP request head accepted before `bad_request`.
    pub max_request_head_bytes: usize,
    /// A bridge several sandboxes share, whose rules were applied with
    /// `--bind-dynamic`: every registration then carries the sandbox's MAC,
    /// and sluice binds its address to it (and unbinds it on removal).
    pub l2_bind_iface: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub issuer: String,
    pub audience: String,
    /// Defaults to `<state_dir>/keys/jwks.json`.
    pub jwks_file: Option<PathBuf>,
    /// The JWKS over HTTPS instead of a file: fetched on start and every
    /// `jwks_refresh_s`, the last good set kept on any failure.
    pub jwks_url: String,
    pub jwks_refresh_s: u64,
    /// The CA that `jwks_url`'s certificate must chain to; empty: the
    /// system's roots.
    pub jwks_ca_file: PathBuf,
    /// Defaults to `<state_dir>/keys/private-key.pem`.
    pub signing_key_file: Option<PathBuf>,
    pub signing_kid: String,
    pub leeway_s: u64,
    /// Longest lifetime `POST /v1/tokens` will mint, and the most life a
    /// token may have left to be accepted here (so no revocation, local or
    /// from the fleet, is kept longer).
    pub max_ttl_s: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Defaults to `<state_dir>/admin-token`.
    pub token_file: Option<PathBuf>,
    /// With a key: the admin API is served over TLS.
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
    /// With TLS: only clients with a certificate from this CA (and the
    /// bearer token).
    pub client_ca_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// How long a sandbox whose token expired stays registered (its
    /// connections denied `token_expired`) before the reaper removes it.
    pub reap_after_s: u64,
    pub runtime: String,
    pub runtime_args: Vec<String>,
    pub rootfs: PathBuf,
    pub subnet: IpNet,
    /// Per-user bind mounts: `<user_data_dir>/<user_id>/uploads` (read-only)
    /// and `.../outputs` (read-write), when set.
    pub user_data_dir: Option<PathBuf>,
    /// Capabilities kept in launched sandboxes (all others are dropped).
    pub capabilities: Vec<String>,
    pub uid: u32,
    pub gid: u32,
    pub tmp_size_bytes: u64,
    pub default_memory_bytes: u64,
    pub max_memory_bytes: u64,
    pub default_cpu_millis: u64,
    pub max_cpu_millis: u64,
    pub default_pids_limit: i64,
    pub max_pids_limit: i64,
    pub max_ttl_s: u64,
}

fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| unreachable!("embedded default {s}"))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from(".sluice"),
            gateway: GatewayConfig::default(),
            auth: AuthConfig::default(),
            admin: AdminConfig::default(),
            metrics: MetricsConfig::default(),
            sandbox: SandboxConfig::default(),
            dns: DnsConfig::default(),
            store: StoreConfig::default(),
            presets: BTreeMap::new(),
            inspect: InspectConfig::default(),
            credentials: BTreeMap::new(),
            audit: AuditConfig::default(),
            limits: LimitsConfig::default(),
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            transparent_listen: addr("127.0.0.1:15001"),
            proxy_listen: addr("127.0.0.1:8443"),
            allowed_ports: vec![80, 443],
            peek_timeout_ms: 5_000,
            connect_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            drain_timeout_ms: 30_000,
            max_connections: 65_536,
            max_connections_per_sandbox: 4096,
            max_connections_per_source: 4096,
            deny_private_destinations: true,
            allow_destinations: Vec::new(),
            allow_local_destinations: false,
            resolve: BTreeMap::new(),
            max_client_hello_bytes: 16 * 1024,
            max_request_head_bytes: 64 * 1024,
            l2_bind_iface: String::new(),
            proxy_tls_cert_file: PathBuf::new(),
            proxy_tls_key_file: PathBuf::new(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            issuer: "secure-egress-control".into(),
            audience: "egress-proxy".into(),
            jwks_file: None,
            jwks_url: String::new(),
            jwks_refresh_s: 300,
            jwks_ca_file: PathBuf::new(),
            signing_key_file: None,
            signing_kid: "sluice-1".into(),
            leeway_s: 30,
            max_ttl_s: 7 * 24 * 3600,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: addr("127.0.0.1:9080"),
            token_file: None,
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
            client_ca_file: PathBuf::new(),
        }
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: addr("127.0.0.1:15053"),
            upstream: Vec::new(),
            max_ttl_s: 300,
            queries_per_second: 100,
            burst: 200,
            max_inflight: 256,
            max_inflight_per_sandbox: 32,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: addr("127.0.0.1:9090"),
        }
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            reap_after_s: 60,
            runtime: "runsc".into(),
            runtime_args: Vec::new(),
            rootfs: PathBuf::from("/srv/sandbox/rootfs"),
            subnet: "10.213.0.0/16"
                .parse()
                .unwrap_or_else(|_| unreachable!("embedded default subnet")),
            user_data_dir: None,
            capabilities: Vec::new(),
            uid: 65534,
            gid: 65534,
            tmp_size_bytes: 64 << 20,
            default_memory_bytes: 512 << 20,
            max_memory_bytes: 8 << 30,
            default_cpu_millis: 1000,
            max_cpu_millis: 8000,
            default_pids_limit: 256,
            max_pids_limit: 8192,
            max_ttl_s: 24 * 3600,
        }
    }
}

/// Sets aside what `path` (serde's path to a value that did not parse)
/// names in a section: one element of a list (`allowed_ports[1]`), so
/// the list's other elements are still read and validated, or else the
/// whole key. `false` when nothing could be set aside.
fn set_aside(table: &mut toml::Table, path: &str) -> bool {
    if let Some((key, rest)) = path.split_once('[')
        && !key.contains('.')
        && let Some(index) = rest.strip_suffix(']').and_then(|i| i.parse::<usize>().ok())
        && let Some(toml::Value::Array(items)) = table.get_mut(key)
        && index < items.len()
    {
        items.remove(index);
        return true;
    }
    let first = path.split(['.', '[']).next().unwrap_or("");
    !first.is_empty() && first != "?" && table.remove(first).is_some()
}

/// Reads one section. A key that does not parse is an error with its full
/// key; it is set aside and the rest of the section read again, so every
/// bad key of a section is named in one run. `None` if the section could
/// not be read even so (it then keeps its defaults).
fn section<T: serde::de::DeserializeOwned + Default>(
    name: &str,
    mut value: toml::Value,
    errors: &mut Vec<KeyError>,
) -> Option<T> {
    // Bounded: each round removes a key, or ends.
    for _ in 0..=64 {
        match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            // What is left is validated with the rest (a key set aside
            // keeps its default, which is valid).
            Ok(v) => return Some(v),
            Err(e) => {
                let path = e.path().to_string();
                let key = if path == "." || path.is_empty() {
                    name.to_owned()
                } else {
                    format!("{name}.{path}")
                };
                // toml adds "in `key`" lines: the key is named already.
                let message = e.into_inner().to_string();
                let message = message.lines().next().unwrap_or("").trim().to_owned();
                errors.push(KeyError { key, message });
                let removed = match &mut value {
                    toml::Value::Table(t) => set_aside(t, &path),
                    _ => false,
                };
                if !removed {
                    return None;
                }
            }
        }
    }
    None
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text. Every error is reported, not only
    /// the first: what parses is kept, each section is read on its own
    /// (a key that does not parse is named and set aside, and the rest of
    /// its section read again), then every section is validated. Only a
    /// file that is not TOML at all stops at its one syntax error.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: PathBuf::from("<config>"),
                message: e.to_string(),
            })?;
        let mut errors = Vec::new();
        let mut config = Config::default();
        let mut broken: Vec<&'static str> = Vec::new();
        for (key, value) in table {
            let ok = match key.as_str() {
                "state_dir" => section(&key, value, &mut errors).map(|v| config.state_dir = v),
                "gateway" => section(&key, value, &mut errors).map(|v| config.gateway = v),
                "auth" => section(&key, value, &mut errors).map(|v| config.auth = v),
                "admin" => section(&key, value, &mut errors).map(|v| config.admin = v),
                "metrics" => section(&key, value, &mut errors).map(|v| config.metrics = v),
                "sandbox" => section(&key, value, &mut errors).map(|v| config.sandbox = v),
                "dns" => section(&key, value, &mut errors).map(|v| config.dns = v),
                "store" => section(&key, value, &mut errors).map(|v| config.store = v),
                "presets" => section(&key, value, &mut errors).map(|v| config.presets = v),
                "inspect" => section(&key, value, &mut errors).map(|v| config.inspect = v),
                "credentials" => section(&key, value, &mut errors).map(|v| config.credentials = v),
                "audit" => section(&key, value, &mut errors).map(|v| config.audit = v),
                "limits" => section(&key, value, &mut errors).map(|v| config.limits = v),
                _ => {
                    errors.push(KeyError {
                        key: key.clone(),
                        message:
                            "unknown key (state_dir, gateway, auth, admin, metrics, sandbox, dns, store, presets, inspect, credentials, audit, limits)"
                                .into(),
                    });
                    Some(())
                }
            };
            if ok.is_none() {
                broken.push(match key.as_str() {
                    "gateway" => "gateway",
                    "auth" => "auth",
                    "admin" => "admin",
                    "metrics" => "metrics",
                    "sandbox" => "sandbox",
                    "dns" => "dns",
                    "store" => "store",
                    "presets" => "presets",
                    "inspect" => "inspect",
                    "credentials" => "credentials",
                    "audit" => "audit",
                    "limits" => "limits",
                    _ => "state_dir",
                });
            }
        }
        if let Err(ConfigError::Invalid(invalid)) = config.validate() {
            // A section that did not parse was validated at its defaults:
            // what it reports then says nothing about the file.
            errors.extend(invalid.into_iter().filter(|e| {
                !broken
                    .iter()
                    .any(|b| e.key == *b || e.key.starts_with(&format!("{b}.")))
            }));
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// Every problem with the values, each naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut err = |key: &str, message: String| {
            errors.push(KeyError {
                key: key.to_owned(),
                message,
            })
        };
        let g = &self.gateway;
        if g.allowed_ports.contains(&0) {
            err("gateway.allowed_ports", "port 0 is not a port".into());
        }
        for (key, v) in [
            ("gateway.peek_timeout_ms", g.peek_timeout_ms),
            ("gateway.connect_timeout_ms", g.connect_timeout_ms),
            ("gateway.idle_timeout_ms", g.idle_timeout_ms),
        ] {
            if v == 0 {
                err(key, "must be greater than 0".into());
            }
        }
        if g.max_connections == 0 {
            err("gateway.max_connections", "must be greater than 0".into());
        }
        if g.max_connections_per_sandbox == 0 {
            err(
                "gateway.max_connections_per_sandbox",
                "must be greater than 0".into(),
            );
        }
        let iface_ok = g.l2_bind_iface.len() <= 15
            && g.l2_bind_iface
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b));
        if !iface_ok {
            err(
                "gateway.l2_bind_iface",
                "must be an interface name (1-15 letters, digits, '_', '.', '@', '-')".into(),
            );
        }
        if g.max_connections_per_source == 0 {
            err(
                "gateway.max_connections_per_source",
                "must be greater than 0".into(),
            );
        }
        if !(512..=1 << 20).contains(&g.max_client_hello_bytes) {
            err(
                "gateway.max_client_hello_bytes",
                "must be between 512 and 1048576".into(),
            );
        }
        if !(1024..=1 << 20).contains(&g.max_request_head_bytes) {
            err(
                "gateway.max_request_head_bytes",
                "must be between 1024 and 1048576".into(),
            );
        }
        if let Err(e) = crate::presets::Presets::new(&self.presets) {
            err("presets", e.to_string());
        }
        if !self.audit.otlp_endpoint.is_empty() {
            match reqwest::Url::parse(&self.audit.otlp_endpoint) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => err(
                    "audit.otlp_endpoint",
                    "must be an http:// or https:// URL (e.g. http://collector:4318/v1/logs)"
                        .into(),
                ),
            }
        }
        for (uuid, budget) in &self.limits.organizations {
            let key = format!("limits.organizations.{uuid:?}");
            if !crate::identity::token::is_safe_id(uuid) {
                err(
                    &key,
                    "an organization_uuid is 1-128 letters, digits, '_', '-' or '.'".into(),
                );
            }
            if !(1..=crate::limits::MAX_LIMIT).contains(&budget.bytes_per_day) {
                err(
                    &format!("{key}.bytes_per_day"),
                    format!("must be between 1 and {}", crate::limits::MAX_LIMIT),
                );
            }
        }
        if self.audit.queue == 0 || self.audit.queue > 1_000_000 {
            err("audit.queue", "must be between 1 and 1000000".into());
        }
        if self.inspect.leaf_ttl_s < 3600 || self.inspect.leaf_ttl_s > 90 * 86_400 {
            err(
                "inspect.leaf_ttl_s",
                "must be between 3600 and 7776000 (90 days)".into(),
            );
        }
        for (path, key) in [
            (&self.inspect.upstream_ca_file, "inspect.upstream_ca_file"),
            (&self.inspect.key_file, "inspect.key_file"),
        ] {
            if !path.as_os_str().is_empty() && !path.is_file() {
                err(key, format!("{} is not a readable file", path.display()));
            }
        }
        // Every credential's shape, and its secret read (the secret never
        // appears in the message).
        if let Err(problems) = crate::credentials::Credentials::load(&self.credentials) {
            for (key, e) in problems {
                err(&key, e.to_string());
            }
        }
        let d = &self.dns;
        for (key, value) in [
            ("dns.max_ttl_s", u64::from(d.max_ttl_s)),
            ("dns.queries_per_second", u64::from(d.queries_per_second)),
            ("dns.burst", u64::from(d.burst)),
            ("dns.max_inflight", d.max_inflight as u64),
            (
                "dns.max_inflight_per_sandbox",
                d.max_inflight_per_sandbox as u64,
            ),
        ] {
            if value == 0 {
                err(key, "must be greater than 0".into());
            }
        }
        for (name, addrs) in &g.resolve {
            let key = format!("gateway.resolve.\"{name}\"");
            if let Err(e) = HostName::parse(name) {
                err(&key, format!("not a host name: {e}"));
            }
            if addrs.is_empty() {
                err(&key, "needs at least one address".into());
            }
        }
        let listeners = [
            ("gateway.transparent_listen", g.transparent_listen),
            ("gateway.proxy_listen", g.proxy_listen),
            ("admin.listen", self.admin.listen),
            ("metrics.listen", self.metrics.listen),
            ("dns.listen", self.dns.listen),
        ];
        for (i, (key, a)) in listeners.iter().enumerate() {
            if a.port() == 0 {
                continue;
            }
            if let Some((other, _)) = listeners[..i].iter().find(|(_, b)| b == a) {
                err(key, format!("same address as {other} ({a})"));
            }
        }
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        for (cert_key, cert, key_key, key) in [
            (
                "gateway.proxy_tls_cert_file",
                &g.proxy_tls_cert_file,
                "gateway.proxy_tls_key_file",
                &g.proxy_tls_key_file,
            ),
            (
                "admin.tls_cert_file",
                &self.admin.tls_cert_file,
                "admin.tls_key_file",
                &self.admin.tls_key_file,
            ),
        ] {
            if set(cert) && !set(key) {
                err(key_key, format!("needed with {cert_key}"));
            }
            if set(key) && !set(cert) {
                err(cert_key, format!("needed with {key_key}"));
            }
        }
        if set(&self.admin.client_ca_file) && !set(&self.admin.tls_cert_file) {
            err(
                "admin.client_ca_file",
                "needs admin.tls_cert_file and admin.tls_key_file (client certificates are a TLS matter)".into(),
            );
        }
        if self.auth.issuer.is_empty() {
            err("auth.issuer", "must not be empty".into());
        }
        if self.auth.audience.is_empty() {
            err("auth.audience", "must not be empty".into());
        }
        if self.auth.signing_kid.is_empty() {
            err("auth.signing_kid", "must not be empty".into());
        }
        let a = &self.auth;
        if !a.jwks_url.is_empty() {
            match reqwest::Url::parse(&a.jwks_url) {
                Ok(u) if u.scheme() == "https" && u.host().is_some() => {}
                Ok(_) => err(
                    "auth.jwks_url",
                    "must be an https:// URL: keys fetched in clear could be replaced on the way"
                        .into(),
                ),
                Err(e) => err("auth.jwks_url", format!("not a URL: {e}")),
            }
            if a.jwks_file.is_some() {
                err(
                    "auth.jwks_file",
                    "set one of auth.jwks_file and auth.jwks_url, not both".into(),
                );
            }
        }
        if self.store.backend == StoreBackend::Redis {
            match redis::Client::open(self.store.redis_url.as_str()) {
                Ok(_) if self.store.redis_url.starts_with("redis://") => {}
                Ok(_) => err(
                    "store.redis_url",
                    "must be a redis:// URL (TCP; a unix socket or TLS is not supported here)"
                        .into(),
                ),
                Err(e) => err("store.redis_url", format!("not a Redis URL: {e}")),
            }
        }
        if a.jwks_refresh_s == 0 {
            err("auth.jwks_refresh_s", "must be greater than 0".into());
        }
        if self.auth.max_ttl_s == 0 {
            err("auth.max_ttl_s", "must be greater than 0".into());
        }
        let sb = &self.sandbox;
        if sb.runtime.is_empty() {
            err("sandbox.runtime", "must not be empty".into());
        }
        match sb.subnet {
            IpNet::V4(n) if n.prefix_len() <= 30 => {}
            _ => err(
                "sandbox.subnet",
                "must be an IPv4 subnet of /30 or larger".into(),
            ),
        }
        for (key, default, max) in [
            (
                "sandbox.default_memory_bytes",
                sb.default_memory_bytes,
                sb.max_memory_bytes,
            ),
            (
                "sandbox.default_cpu_millis",
                sb.default_cpu_millis,
                sb.max_cpu_millis,
            ),
            (
                "sandbox.default_pids_limit",
                u64::try_from(sb.default_pids_limit).unwrap_or(0),
                u64::try_from(sb.max_pids_limit).unwrap_or(0),
            ),
        ] {
            if default == 0 || default > max {
                err(key, "must be positive and not above its maximum".into());
            }
        }
        for cap in &sb.capabilities {
            if !cap.starts_with("CAP_")
                || !cap[4..]
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'_')
            {
                err(
                    "sandbox.capabilities",
                    format!("{cap:?} is not a capability name (CAP_...)"),
                );
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    pub fn jwks_path(&self) -> PathBuf {
        self.auth
            .jwks_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("keys/jwks.json"))
    }

    pub fn signing_key_path(&self) -> PathBuf {
        self.auth
            .signing_key_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("keys/private-key.pem"))
    }

    pub fn admin_token_path(&self) -> PathBuf {
        self.admin
            .token_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("admin-token"))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_value_of_the_wrong_type_hides_nothing_else_in_its_section() {
        let e = Config::parse(
            "[gateway]\nallowed_ports = [0, 70000]\ntransparent_listen = \"nowhere\"\nidle_timeout_ms = 0\n",
        )
        .unwrap_err()
        .to_string();
        for key in [
            "gateway.allowed_ports[1]",
            "gateway.transparent_listen",
            "gateway.idle_timeout_ms",
            "port 0 is not a port",
        ] {
            assert!(e.contains(key), "{key} missing from:\n{e}");
        }
    }

    #[test]
    fn every_error_of_a_file_is_reported_with_its_key() {
        let text = "state_dir = 7\nbogus = 1\n[gateway]\npeek_timeout_ms = \"soon\"\nnot_a_key = true\nmax_connections = 0\n\
                    [auth]\nleeway_s = -1\n[metrics]\nlisten = \"nowhere\"\n[dns]\nmax_ttl_s = 0\n";
        let Err(ConfigError::Invalid(errors)) = Config::parse(text) else {
            panic!("accepted");
        };
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        for want in [
            "state_dir",
            "bogus",
            "gateway.peek_timeout_ms",
            "gateway.not_a_key",
            "gateway.max_connections",
            "auth.leeway_s",
            "metrics.listen",
            "dns.max_ttl_s",
        ] {
            assert!(
                keys.iter().any(|k| k.starts_with(want)),
                "{want} not in {keys:?}"
            );
        }
    }
    use super::*;

    #[test]
    fn empty_config_is_the_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        assert_eq!(
            Config::default().jwks_path(),
            PathBuf::from(".sluice/keys/jwks.json")
        );
    }

    #[test]
    fn the_contract_example_parses() {
        let text = r#"
state_dir = ".sluice"

[gateway]
transparent_listen = "127.0.0.1:15001"
proxy_listen = "127.0.0.1:8443"
allowed_ports = [80, 443]
peek_timeout_ms = 5000
connect_timeout_ms = 10000
idle_timeout_ms = 300000
drain_timeout_ms = 30000
max_connections = 65536
deny_private_destinations = true
allow_destinations = ["198.18.0.0/15"]

[gateway.resolve]
"api.example.com" = ["198.18.1.10"]

[auth]
issuer = "secure-egress-control"
audience = "egress-proxy"
jwks_file = ".sluice/keys/jwks.json"
signing_key_file = ".sluice/keys/private-key.pem"
signing_kid = "sluice-1"
leeway_s = 30

[admin]
listen = "127.0.0.1:9080"
token_file = ".sluice/admin-token"

[metrics]
listen = "127.0.0.1:9090"

[sandbox]
runtime = "runsc"
runtime_args = []
rootfs = "/srv/sandbox/rootfs"
subnet = "10.213.0.0/16"
"#;
        let c = Config::parse(text).unwrap();
        assert_eq!(
            c.gateway.resolve["api.example.com"],
            vec!["198.18.1.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            c.gateway.allow_destinations,
            vec!["198.18.0.0/15".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn every_section_of_a_config_reads_back() {
        // Every key of every section, written out and read by the same
        // parser `sluice serve` and `sluice check` use: a section the
        // parser does not know would be an error here.
        let mut c = Config::default();
        c.store.backend = StoreBackend::Redis;
        c.auth.jwks_url = "https://keys.test/jwks.json".into();
        c.admin.tls_cert_file = "/etc/sluice/admin.pem".into();
        c.admin.tls_key_file = "/etc/sluice/admin-key.pem".into();
        let text = toml::to_string(&c).unwrap_or_default();
        match Config::parse(&text) {
            Ok(back) => assert_eq!(back, c, "{text}"),
            Err(e) => panic!("{}\n{text}", crate::error_chain(&e)),
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_name_their_key() {
        let e = Config::parse("[gateway]\npeek_timeout = 5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("peek_timeout"), "{e}");
        let e = Config::parse("[gateway]\ntransparent_listen = \"nowhere\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("transparent_listen"), "{e}");
        let e = Config::parse("[gateway]\nallow_destinations = [\"10.0.0.0/33\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("allow_destinations"), "{e}");
    }

    #[test]
    fn every_invalid_value_is_reported() {
        let text = r#"
[gateway]
allowed_ports = [0]
peek_timeout_ms = 0
proxy_listen = "127.0.0.1:15001"
[gateway.resolve]
"bad name" = []
[auth]
issuer = ""
"#;
        let Err(ConfigError::Invalid(errors)) = Config::parse(text) else {
            panic!("should be invalid");
        };
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        for want in [
            "gateway.allowed_ports",
            "gateway.peek_timeout_ms",
            "gateway.proxy_listen",
            "gateway.resolve.\"bad name\"",
            "auth.issuer",
        ] {
            assert!(keys.contains(&want), "{want} missing from {keys:?}");
        }
    }
}
