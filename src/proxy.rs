//! The data plane: the shared [`Gateway`] state, the accept loop, and the
//! way a denied client is told. A connection's path is
//! accept → [`net::orig_dst`](crate::net::orig_dst) → identity →
//! [`sniff`] → [`decision`](crate::decision) → [`upstream`] → [`relay`]
//! (with [`http`] judging every request of an HTTP connection), strung
//! together once in [`pipeline`], over the [`stream`] each connection
//! runs on (TCP, spliced; or TLS); [`transparent`] and [`explicit`] are the
//! front doors that negotiate a caller and a target and make one pipeline
//! call, and [`record`] writes what became of each connection.

pub mod explicit;
pub mod http;
pub mod inspect;
pub mod pipeline;
pub mod pool;
pub mod record;
pub mod relay;
pub mod sniff;
pub mod stream;
pub mod transparent;
pub mod upstream;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use tokio::net::{TcpListener, TcpStream};

use crate::config::{Config, GatewayConfig};
use crate::deny::Deny;
use crate::identity::Registry;
use crate::identity::token::Verifier;
use crate::metrics::{self as m, Mode};
use crate::net::orig_dst::OrigDstSource;
use crate::resolver::Resolver;
use crate::shutdown::Shutdown;
use sniff::Protocol;
use upstream::{Own, Upstream};

/// The part of the configuration SIGHUP can change (`[gateway]`: ports,
/// resolution, the destination guard, timeouts, caps), with the upstream
/// built from it. Swapped whole; each connection keeps the one it started
/// with.
pub struct Policy {
    pub gateway: GatewayConfig,
    pub upstream: Upstream,
}

/// Everything a connection task needs, shared.
pub struct Gateway {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    pub verifier: Arc<Verifier>,
    pub shutdown: Shutdown,
    pub orig_dst: OrigDstSource,
    /// `max_connections` and `max_connections_per_source`, shared by every
    /// TCP door (the DNS door's TCP too), counted from accept on: a client
    /// not yet identified cannot take the global budget.
    pub limits: crate::listener::Limits,
    policy: RwLock<Arc<Policy>>,
    /// sluice's own listeners and addresses, never a destination.
    own: Own,
    /// The one caching resolver: kept across policy reloads, replaced
    /// when `[dns]` changes.
    resolver: RwLock<Arc<Resolver>>,
    /// Inspection and the credentials, replaced on SIGHUP.
    seal: RwLock<Arc<Seal>>,
    /// Where every decision's event goes.
    pub events: Arc<crate::events::Events>,
}

/// Why a sandbox's inspection CA cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("inspection is not set up")]
    NotSetUp,
    #[error("the sandbox CA")]
    Ca(#[from] crate::authority::AuthorityError),
}

/// What sealed credentials need: the inspection authority (without one,
/// a connection that needs inspecting is refused, never passed unopened)
/// and the credentials the gateway holds.
#[derive(Debug, Default)]
pub struct Seal {
    pub authority: Option<Arc<crate::authority::Authority>>,
    pub credentials: Arc<crate::credentials::Credentials>,
    /// Idle upstream connections of inspected hosts, per sandbox.
    pub pool: Arc<pool::Pool>,
}

impl Gateway {
    pub fn new(
        config: Arc<Config>,
        registry: Arc<Registry>,
        verifier: Arc<Verifier>,
        shutdown: Shutdown,
        orig_dst: OrigDstSource,
        own: Own,
        resolver: Arc<Resolver>,
    ) -> Gateway {
        let policy = Arc::new(Policy {
            upstream: Upstream::new(&config.gateway, &own, Arc::clone(&resolver)),
            gateway: config.gateway.clone(),
        });
        Gateway {
            limits: crate::listener::Limits::new(
                config.gateway.max_connections,
                config.gateway.max_connections_per_source,
            ),
            config,
            registry,
            verifier,
            shutdown,
            orig_dst,
            policy: RwLock::new(policy),
            own,
            resolver: RwLock::new(resolver),
            seal: RwLock::default(),
            events: Arc::default(),
        }
    }

    /// Inspection and the credentials in force now.
    pub fn seal(&self) -> Arc<Seal> {
        Arc::clone(&self.seal.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces them (at start, and when SIGHUP re-reads the secrets).
    pub fn set_seal(&self, seal: Seal) {
        *self.seal.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(seal);
    }

    /// A sandbox's token `old_jti` (expiring at `old_exp`) is replaced by
    /// `grant`, whose `token` was verified in full under key-set
    /// `generation`: the registered sandbox (if this gateway has it under
    /// the old token) holds the new one and forgets the DNS answers it no
    /// longer admits; every live connection under the old token is
    /// checked again ([`still_allows`](Self::still_allows)), kept under
    /// the new grant or closed `policy_changed`; the old token is
    /// revoked. Returns how many connections were kept and closed.
    pub fn replace_token(
        &self,
        old_jti: &str,
        old_exp: u64,
        grant: &Arc<crate::identity::token::Grant>,
        token: &str,
        generation: u64,
    ) -> (usize, usize) {
        if let Some(s) = self.registry.get_by_id(&grant.claims.container_id)
            && s.grant().claims.jti == old_jti
        {
            s.replace(token, Arc::clone(grant), generation);
        }
        // Its idle upstream connections were opened under the old grant.
        self.seal().pool.forget(&grant.claims.container_id);
        let (kept, closed) =
            self.registry
                .tenants()
                .replace(old_jti, old_exp, grant, &self.verifier, |c, g| {
                    self.still_allows(c, g)
                });
        for (outcome, n) in [("kept", kept), ("closed", closed)] {
            ::metrics::counter!(crate::metrics::POLICY_CHANGES_TOTAL, "outcome" => outcome)
                .increment(n as u64);
        }
        let mut event = crate::events::Event::new(crate::events::Kind::Policy, "admin", "token")
            .with_grant(grant);
        event.reason = Deny::PolicyChanged.as_str();
        event.end = format!("token replaced: {kept} connections kept, {closed} closed");
        self.events.emit(event);
        (kept, closed)
    }

    /// Would `grant` let this live connection go on as it is? Its target
    /// must be allowed (or, in report mode, let through), and what it
    /// carries must be what a new connection would: bytes relayed unread
    /// only where no request rules apply, plain HTTP (judged request by
    /// request under the new grant) only to a host no credential of the
    /// sandbox goes to, inspected TLS only with the same credentials set.
    pub fn still_allows(
        &self,
        conn: &crate::live::LiveConn,
        grant: &crate::identity::token::Grant,
    ) -> bool {
        use crate::live::Carried;
        let (host, port) = conn.target();
        let reports = grant.claims.enforce == crate::identity::token::Enforce::Report;
        let policy = self.policy();
        let restricted = match grant
            .allowlist
            .decide(host, *port, &policy.gateway.allowed_ports)
        {
            Ok(a) => a.restricted,
            Err(Deny::HostNotAllowed | Deny::PortNotAllowed) if reports => false,
            Err(_) => return false,
        };
        let credentials = match host {
            crate::host::Host::Name(name) => self
                .sealed(grant)
                .map(|(s, _)| s.names_for(name))
                .unwrap_or_default(),
            crate::host::Host::Ip(_) => Vec::new(),
        };
        match conn.carried() {
            Carried::Opening => true,
            Carried::Raw => !restricted || reports,
            Carried::Judged => credentials.is_empty(),
            Carried::Inspected(had) => had == credentials,
        }
    }

    /// A sandbox's inspection CA: permitting its credentials' hosts and
    /// the hosts its request rules name.
    pub fn sandbox_ca(
        &self,
        grant: &crate::identity::token::Grant,
    ) -> Result<Arc<crate::authority::SandboxCa>, InspectError> {
        let seal = self.seal();
        let authority = seal.authority.as_ref().ok_or(InspectError::NotSetUp)?;
        let sealed = crate::credentials::Sealed::new(
            authority.key(),
            &grant.claims.container_id,
            &grant.claims.credentials.0,
            &seal.credentials,
        );
        let permitted =
            crate::authority::Authority::permitted(&sealed, &grant.allowlist.ruled_names());
        Ok(authority.ca(&grant.container, permitted)?)
    }

    /// A grant's sealed credentials (each with its placeholder), or `None`
    /// when its token names none: the common case costs nothing.
    pub fn sealed(
        &self,
        grant: &crate::identity::token::Grant,
    ) -> Option<(Arc<crate::credentials::Sealed>, Arc<Seal>)> {
        let names = &grant.claims.credentials.0;
        if names.is_empty() {
            return None;
        }
        let seal = self.seal();
        let placeholders = grant.placeholders.under(&seal, || {
            let key = seal.authority.as_ref().map(|a| a.key()).unwrap_or(&[]);
            names
                .iter()
                .map(|n| crate::credentials::placeholder(key, &grant.claims.container_id, n))
                .collect()
        });
        let sealed =
            crate::credentials::Sealed::with_placeholders(names, &placeholders, &seal.credentials);
        Some((Arc::new(sealed), seal))
    }

    /// The resolver in use now.
    pub fn resolver(&self) -> Arc<Resolver> {
        Arc::clone(&self.resolver.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The current policy (a connection takes it once, at its start).
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the resolver (a changed `[dns]`, its cache starting empty)
    /// and the policy built on it, for lookups from now on.
    pub fn set_resolver(&self, resolver: Resolver, gateway: &GatewayConfig) {
        *self.resolver.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(resolver);
        self.set_policy(gateway);
    }

    /// Replaces the policy for connections from now on. Listener addresses
    /// and `max_connections` are fixed at start and not changed here.
    pub fn set_policy(&self, gateway: &GatewayConfig) {
        let policy = Arc::new(Policy {
            upstream: Upstream::new(gateway, &self.own, self.resolver()),
            gateway: gateway.clone(),
        });
        self.limits
            .set_per_source_cap(gateway.max_connections_per_source);
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy;
    }
}

pub use crate::listener::Admission;

/// Accepts connections until shutdown, each on its own tracked task
/// running `handle`; one over a cap is refused `overloaded`.
pub async fn accept_loop<H, F>(listener: TcpListener, gw: Arc<Gateway>, mode: Mode, handle: H)
where
    H: Fn(Arc<Gateway>, TcpStream, SocketAddr, Admission) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (limits, shutdown) = (gw.limits.clone(), gw.shutdown.clone());
    let events = Arc::clone(&gw.events);
    crate::listener::serve(
        listener,
        limits,
        shutdown,
        |stream: TcpStream, peer, admission| {
            let _ = stream.set_nodelay(true);
            handle(Arc::clone(&gw), stream, peer, admission)
        },
        move |stream, peer| overloaded(stream, peer, mode, Arc::clone(&events)),
    )
    .await;
}

fn overloaded(stream: TcpStream, peer: SocketAddr, mode: Mode, events: Arc<crate::events::Events>) {
    let mut record = record::Record::new(mode, peer, events);
    record.decide(Err(Deny::Overloaded));
    record.end = "overloaded";
    drop(stream);
}

/// Counts one decision (`would_deny` for a report-mode denial let
/// through).
pub fn count(
    mode: Mode,
    protocol: Protocol,
    verdict: crate::events::Verdict,
    reason: &'static str,
) {
    let decision = verdict.as_str();
    ::metrics::counter!(
        m::CONNECTIONS_TOTAL,
        "mode" => mode.as_str(),
        "protocol" => protocol.as_str(),
        "decision" => decision,
        "reason" => reason
    )
    .increment(1);
}

/// TLS alert record: fatal (2), access_denied (49).
const TLS_ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49];
/// TLS alert record: fatal (2), internal_error (80), for upstream failures.
const TLS_INTERNAL_ERROR: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 80];

/// What a denied client receives, by protocol: an HTTP status with
/// `x-deny-reason`, a TLS alert, or nothing (close).
pub fn deny_response(protocol: Protocol, deny: Deny) -> Option<Cow<'static, [u8]>> {
    match protocol {
        Protocol::Http => {
            let (code, text) = deny.http_status();
            let body = format!("sluice: {}\n", deny.as_str());
            Some(Cow::Owned(
                format!(
                    "HTTP/1.1 {code} {text}\r\nx-deny-reason: {}\r\ncontent-type: text/plain\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    deny.as_str(),
                    body.len()
                )
                .into_bytes(),
            ))
        }
        Protocol::Tls => match deny {
            Deny::UpstreamUnreachable | Deny::UpstreamTimeout => {
                Some(Cow::Borrowed(&TLS_INTERNAL_ERROR[..]))
            }
            _ => Some(Cow::Borrowed(&TLS_ACCESS_DENIED[..])),
        },
        Protocol::Connect | Protocol::Other => None,
    }
}

/// The answer to a request refused on a connection that goes on (the
/// request rules' `request_not_allowed`): as [`deny_response`]'s, without
/// `connection: close`.
pub fn refusal_keeping_connection(deny: Deny) -> Vec<u8> {
    let (code, text) = deny.http_status();
    let body = format!("sluice: {}\n", deny.as_str());
    format!(
        "HTTP/1.1 {code} {text}\r\nx-deny-reason: {}\r\ncontent-type: text/plain\r\n\
         content-length: {}\r\n\r\n{body}",
        deny.as_str(),
        body.len()
    )
    .into_bytes()
}

/// The proxy door's answer to a refused request: a credential failure is
/// a 407 with the challenge, anything else the HTTP answer by reason.
pub fn proxy_deny_response(d: Deny) -> Vec<u8> {
    if !crate::decision::is_auth_failure(d) {
        return deny_response(Protocol::Http, d)
            .map(|b| b.into_owned())
            .unwrap_or_default();
    }
    let body = format!("sluice: {}\n", d.as_str());
    format!(
        "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"sluice\"\r\n\
         x-deny-reason: {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        d.as_str(),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_denies_carry_the_reason() {
        let bytes = deny_response(Protocol::Http, Deny::HostNotAllowed).unwrap();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"));
        assert!(text.contains("\r\nx-deny-reason: host_not_allowed\r\n"));
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let bytes = deny_response(Protocol::Http, Deny::UpstreamTimeout).unwrap();
        assert!(bytes.starts_with(b"HTTP/1.1 504 "));
        let bytes = deny_response(Protocol::Http, Deny::BadRequest).unwrap();
        assert!(bytes.starts_with(b"HTTP/1.1 400 "));
    }

    #[test]
    fn auth_failures_are_407_with_the_challenge() {
        let r = String::from_utf8(proxy_deny_response(Deny::TokenExpired)).unwrap();
        assert!(r.starts_with("HTTP/1.1 407 "));
        assert!(r.contains("\r\nProxy-Authenticate: Basic realm=\"sluice\"\r\n"));
        assert!(r.contains("\r\nx-deny-reason: token_expired\r\n"));
        let r = String::from_utf8(proxy_deny_response(Deny::HostNotAllowed)).unwrap();
        assert!(r.starts_with("HTTP/1.1 403 "));
        assert!(!r.contains("Proxy-Authenticate"));
    }

    #[test]
    fn tls_denies_are_alerts_and_others_close() {
        assert_eq!(
            &*deny_response(Protocol::Tls, Deny::HostNotAllowed).unwrap(),
            &TLS_ACCESS_DENIED
        );
        assert!(deny_response(Protocol::Other, Deny::UnsupportedProtocol).is_none());
    }
}
