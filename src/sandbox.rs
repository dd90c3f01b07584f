//! Sandboxes sluice launches: what a launch request may ask for
//! ([`validate_launch`]), what a launcher is given ([`LaunchSpec`]) and
//! must do ([`Launcher`]), and the real one, [`Runsc`]: a network
//! namespace and a veth pair per sandbox (`netns`), the gateway's rules
//! with anti-spoofing, a hardened OCI bundle (`bundle`: read-only root,
//! size-limited /tmp, no capabilities but the configured ones,
//! no_new_privileges, memory/CPU/pids limits) and gVisor's `runsc`, run
//! through `command`'s helpers. The lifecycle itself is the control
//! plane's ([`crate::control`]); tests put a fake behind the trait.

mod bundle;
mod command;
mod netns;
mod runsc;

pub use bundle::bundle_config;
pub use netns::sandbox_mac;
pub use netns::{host_veth_name, netns_name};
pub use runsc::Runsc;

use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::config::Config;
use crate::identity::LaunchRecord;
use crate::identity::token::is_safe_id;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Largest stdout or stderr an exec returns.
pub const MAX_EXEC_OUTPUT: usize = 1 << 20;
pub(crate) const MAX_ARGS: usize = 256;
pub(crate) const MAX_ARG_BYTES: usize = 4096;
pub(crate) const MAX_COMMAND_BYTES: usize = 64 * 1024;
pub(crate) const MAX_EXEC_TIMEOUT_MS: u64 = 10 * 60 * 1000;
pub(crate) const DEFAULT_TTL_S: u64 = 3600;
/// runsc applies the OCI pids limit to the host cgroup that holds the
/// sandbox's kernel (the sentry) and its gofer, whose own threads count
/// against it: the request's limit gets this allowance on top, or a small
/// limit would stop gVisor itself from starting processes.
pub(crate) const GVISOR_PIDS_ALLOWANCE: i64 = 512;

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
    /// `[credentials.NAME]` the sandbox may use: each credential's `env`
    /// holds its placeholder inside.
    #[serde(default)]
    pub credentials: Vec<String>,
    /// Claim `enforce`: `"enforce"` (default) or `"report"`.
    #[serde(default)]
    pub enforce: crate::identity::token::Enforce,
    /// Claim `limits`: per-sandbox limits, every key optional.
    #[serde(default)]
    pub limits: crate::limits::Limits,
    /// Claim `organization_uuid`.
    #[serde(default)]
    pub organization_uuid: Option<String>,
}

/// Where a launched sandbox's CA bundle is (read-only): the system's
/// roots and its own inspection CA.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The variables real clients read their CA bundle from.
pub const CA_VARIABLES: [&str; 7] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "PIP_CERT",
    "GIT_SSL_CAINFO",
    "CARGO_HTTP_CAINFO",
];

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
    /// The sandbox's inspection CA (PEM), put beside the system's roots in
    /// its CA bundle; `None`: the image's own bundle is left alone.
    pub trust: Option<String>,
    /// Its token's limits: the byte rates also shape its link (a second
    /// layer under the gateway's own).
    pub limits: crate::limits::Limits,
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
    /// Shapes the sandbox's link to `limits`' byte rates (a second layer
    /// under the gateway's), or removes the shaping when they set none.
    /// A launcher without such a layer does nothing.
    fn shape<'a>(
        &'a self,
        _record: &'a LaunchRecord,
        _limits: &'a crate::limits::Limits,
    ) -> BoxFuture<'a, Result<(), LaunchError>> {
        Box::pin(async { Ok(()) })
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

#[cfg(test)]
mod tests;
