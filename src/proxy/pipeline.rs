//! The connection pipeline every door hands its connections to. A door
//! finds its caller and target its own way (a source address and the first
//! bytes; credentials and a request head) and calls [`drive`] once; from
//! there every connection takes the same steps to its end: the one
//! decision ([`crate::decision`]), a dial under the current policy, the
//! opening a tunnel or an answered name needs (its first bytes read and
//! judged as a transparent connection's), and a relay that judges every
//! HTTP request and watches the token. The gateway's hard stop is applied
//! here, around all of it. The [`Record`] a connection carries writes its
//! audit line and metrics.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::http::{self, Exchange, HttpEnd, Rewrite, Verdict};
use super::inspect;
use super::pool::{Deferred, Key};
use super::record::Record;
use super::relay::{self, RelayEnd};
use super::sniff::{
    Incremental, Opening, OpeningReader, Protocol, ReadEnd, RequestHead, read_until,
};
use super::stream::{Metered, Split, Stream};
use super::{Gateway, Policy, deny_response, proxy_deny_response};
use crate::decision::{Caller, Decision, Permit, Target};
use crate::deny::Deny;
use crate::events::{Event, Kind, Verdict as Outcome};
use crate::host::Host;
use crate::identity::CountGuard;
use crate::live::Carried;
use crate::metrics::Mode;

impl Gateway {
    /// The decision under `policy`.
    pub fn decision<'a>(&'a self, policy: &'a Policy) -> Decision<'a> {
        Decision {
            verifier: &self.verifier,
            connections: self.registry.connections(),
            tenants: self.registry.tenants(),
            gateway: &policy.gateway,
        }
    }
}

/// A client connection being served, and its record.
pub struct Conn {
    pub gw: Arc<Gateway>,
    pub client: Split,
    pub record: Record,
    /// The container's share of connections, taken at the first allowed
    /// session and held for the connection's life (the proxy door's later
    /// sessions reuse it).
    slot: Option<CountGuard>,
}

impl Conn {
    pub fn new(gw: Arc<Gateway>, client: Stream, mode: Mode, peer: std::net::SocketAddr) -> Conn {
        Conn {
            record: Record::new(mode, peer, Arc::clone(&gw.events)),
            gw,
            client: client.split(),
            slot: None,
        }
    }

    /// Refuses: the decision recorded, the answer (counted) written, then
    /// a bounded linger so the answer is read before the close.
    pub async fn refuse(&mut self, protocol: Protocol, deny: Deny, answer: Option<Vec<u8>>) {
        self.record.protocol = protocol;
        self.record.decide(Err(deny));
        if let Some(bytes) = answer {
            let t = &self.record.traffic;
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                relay::send(&mut self.client.write, &bytes, &t.to_client, t),
            )
            .await;
        }
        linger_close(&mut self.client).await;
    }

    /// Resolves, guards and connects under the policy in force now (a
    /// SIGHUP that tightened it applies to every new dial).
    pub async fn connect(&mut self, target: &Target) -> Result<TcpStream, Deny> {
        let policy = self.gw.policy();
        // Its lookups are the client's to spend.
        let asker = crate::resolver::Asker::Connection(self.record.source.ip());
        let t0 = std::time::Instant::now();
        let addrs = policy
            .upstream
            .resolve(&target.host, target.port, asker)
            .await?;
        let t1 = std::time::Instant::now();
        self.record.resolve_ms = Some(t1.duration_since(t0).as_millis() as u64);
        let (stream, addr) = policy.upstream.connect(&addrs).await?;
        self.record.connect_ms = Some(t1.elapsed().as_millis() as u64);
        self.record.upstream = Some(addr);
        Ok(stream)
    }

    /// Not dialled, when the connection will be inspected (TLS, or a
    /// tunnel, to a host inspection opens) and the sandbox has an idle
    /// upstream connection to the target: it will take one.
    fn deferred(&self, opened: &Opened, permit: &Permit, target: &Target) -> Option<Deferred> {
        if !matches!(
            opened,
            Opened::FirstBytes(Protocol::Tls) | Opened::Tunnel { .. }
        ) {
            return None;
        }
        let pool = Arc::clone(&self.gw.seal().pool);
        if pool.is_empty() {
            return None;
        }
        let plan = inspection(&self.gw, permit, target).ok()??;
        let key = pool_key(permit, &plan, target);
        pool.has(&key).then_some(Deferred { pool, key })
    }

    /// The one decision, holding the container's slot: taken now, or the
    /// one this connection already holds.
    fn permit(&mut self, caller: &Caller, target: &Target) -> Result<Permit, Deny> {
        let policy = self.gw.policy();
        let decision = self.gw.decision(&policy);
        let Some(held) = self.slot.take() else {
            return decision.decide(caller, target);
        };
        let admitted = decision
            .authorize(caller, target)
            .and_then(|a| decision.admit(&a.grant, target).map(|live| (a, live)));
        match admitted {
            Ok((a, live)) => Ok(Permit {
                revoked: live.conn.closed.clone(),
                grant: a.grant,
                explicit_port: a.explicit_port,
                restricted: a.restricted,
                would_deny: a.would_deny,
                entry: a.entry,
                slot: held,
                live,
            }),
            Err(d) => {
                self.slot = Some(held);
                Err(d)
            }
        }
    }

    /// Decides and dials; refused in `opened`'s form when either fails.
    async fn open(
        &mut self,
        opened: &Opened,
        caller: &Caller,
        target: &Target,
    ) -> Option<(Permit, Upstream)> {
        let protocol = opened.protocol();
        self.record.set_target(protocol, &target.host, target.port);
        let permit = match self.permit(caller, target) {
            Ok(p) => p,
            Err(d) => {
                // Whose refusal it is, when the caller is known (its
                // token valid, the target not allowed).
                let policy = self.gw.policy();
                if let Ok(grant) = self.gw.decision(&policy).grant(caller) {
                    self.record.container_id = Some(Arc::clone(&grant.container));
                    self.record.grant = Some(grant);
                }
                self.refuse(protocol, d, opened.refusal(protocol, d)).await;
                return None;
            }
        };
        self.record.container_id = Some(Arc::clone(&permit.grant.container));
        self.record.grant = Some(Arc::clone(&permit.grant));
        self.record.would_deny = permit.would_deny;
        self.record.matched = permit
            .entry
            .and_then(|i| permit.grant.allowlist.entry_text(i));
        // A placeholder in the name itself (an SNI or `Host` under a
        // wildcard-allowed zone) would carry it out: refused, not dialled.
        if let (Host::Name(name), Some((sealed, _))) = (&target.host, self.gw.sealed(&permit.grant))
            && let Some(credential) = sealed.find_in_name(name.as_str())
        {
            tracing::warn!(
                target: "sluice::audit",
                container_id = %permit.grant.claims.container_id,
                credential,
                "a credential placeholder in a host name"
            );
            self.slot = Some(permit.slot);
            let d = Deny::CredentialMisuse;
            self.refuse(protocol, d, opened.refusal(protocol, d)).await;
            return None;
        }
        if let Some(deferred) = self.deferred(opened, &permit, target) {
            self.record.decide(Ok(()));
            return Some((permit, Upstream::Pooled(deferred)));
        }
        match self.connect(target).await {
            Ok(upstream) => {
                self.record.decide(Ok(()));
                Some((permit, Upstream::Dialled(upstream)))
            }
            Err(d) => {
                self.slot = Some(permit.slot);
                self.refuse(protocol, d, opened.refusal(protocol, d)).await;
                None
            }
        }
    }
}

/// What a door knows of a connection when it hands it over; the bytes
/// already read from the client go with it.
pub enum Opened {
    /// The client's first bytes, read and naming the target: TLS, HTTP
    /// (judged request by request, each against the same host), or
    /// another protocol on a port an entry names.
    FirstBytes(Protocol),
    /// A `CONNECT` (its head, `head_len` bytes, first in the buffer):
    /// answered 200, then the tunnel's own first bytes are read and judged.
    Tunnel { head_len: usize },
    /// Absolute-form requests through the proxy door to one authority,
    /// each judged by the door's `check`.
    Requests { check: http::Check },
    /// A name the DNS door answered for the dialled address, whose entry
    /// names this port: dialled before the client speaks, so a server
    /// that speaks first (SSH, SMTP, a database) can.
    Answered,
}

impl Opened {
    fn protocol(&self) -> Protocol {
        match self {
            Opened::FirstBytes(p) => *p,
            Opened::Tunnel { .. } => Protocol::Connect,
            Opened::Requests { .. } => Protocol::Http,
            Opened::Answered => Protocol::Other,
        }
    }

    /// What a client refused before its relay began is sent: the proxy
    /// door's answer (407 for a credential failure) to a proxy request,
    /// the protocol's own (403, a TLS alert, a close) otherwise.
    fn refusal(&self, protocol: Protocol, d: Deny) -> Option<Vec<u8>> {
        match self {
            Opened::Tunnel { .. } | Opened::Requests { .. } => Some(proxy_deny_response(d)),
            Opened::FirstBytes(_) | Opened::Answered => {
                deny_response(protocol, d).map(|b| b.into_owned())
            }
        }
    }
}

/// How a connection handed to the pipeline ended.
pub enum Ending {
    /// It is over: the client connection is done with.
    Closed,
    /// The proxy door's next request (its head first in `buf`) names
    /// another authority; the client connection is still open.
    Elsewhere { head: RequestHead, buf: Vec<u8> },
}

/// Drives a connection from its caller and target to its end: decided,
/// dialled, opened as `opened` says, relayed; `buf` holds what was read
/// from the client. Once allowed, everything that waits on the client or
/// the upstream also waits on the permit's token, cancelled by
/// revocation, unregistration, expiry or the gateway's hard stop (the
/// verifier makes every such token a child of it): one wire, one place.
pub async fn drive(
    conn: &mut Conn,
    caller: Caller,
    target: Target,
    opened: Opened,
    buf: Vec<u8>,
) -> Ending {
    // Boxed: deciding, dialling and opening are freed once done, so a
    // relayed connection keeps only the relay's state.
    let ready = match Box::pin(open(conn, caller, target, opened, buf)).await {
        Ok(ready) => ready,
        Err(ending) => return ending,
    };
    let (idle, max_head) = idle_and_head(conn);
    let permit = ready.permit;
    permit.live.conn.set_carried(carried(&ready.relay));
    let ending = match ready.relay {
        // Two TCP sockets, spliced: the common case, its state inline.
        Relay::Raw(upstream) => {
            let traffic = Arc::clone(&conn.record.traffic);
            let end = match (conn.client.tcp(), upstream) {
                (Some(client), Stream::Tcp(upstream)) => {
                    let (head, closed) = (ready.buf, &permit.revoked);
                    let meter = permit.live.meter().map(|m| &**m);
                    relay::raw_pair(client, &upstream, head, &traffic, idle, closed, meter).await
                }
                (_, upstream) => {
                    let (head, closed) = (ready.buf, &permit.revoked);
                    let upstream = Metered::wrap(upstream, permit.live.meter().cloned());
                    let copy =
                        relay::copy_pair(&mut conn.client, upstream, head, &traffic, idle, closed);
                    Box::pin(copy).await
                }
            };
            conn.record.end = end.as_str();
            Ending::Closed
        }
        Relay::Http(upstream, rules) => {
            let traffic = Arc::clone(&conn.record.traffic);
            let ex = Exchange {
                client: &mut conn.client,
                upstream: Metered::wrap(upstream, permit.live.meter().cloned()),
                traffic: &traffic,
                max_head,
                rewrite: rules.rewrite,
                check: rules.check,
                answer: rules.answer,
            };
            // Boxed: a raw connection, the common case, does not carry
            // the HTTP exchange's state in its own.
            let relayed = http::relay(ex, ready.buf, idle, &permit.revoked);
            let (end, http_end) = Box::pin(relayed).await;
            match http_end {
                HttpEnd::Elsewhere { head, buf } => {
                    conn.record.end = "closed";
                    Ending::Elsewhere { head, buf }
                }
                other => {
                    // Boxed: only an HTTP connection's ending pays for it.
                    Box::pin(finish_http(conn, end, other)).await;
                    Ending::Closed
                }
            }
        }
        Relay::Inspect(i) => {
            let Inspected {
                caller,
                target,
                upstream,
                plan,
            } = *i;
            let served = inspect::serve(conn, &permit, caller, target, upstream, ready.buf, plan);
            Box::pin(served).await;
            Ending::Closed
        }
    };
    // Closed on its own: a replacement token that no longer allows it,
    // or a spent budget (which closes the sandbox's other connections too).
    if let Some(limit) = permit.live.meter().and_then(|m| m.spent()) {
        limit.count();
        conn.record.end = Deny::QuotaExceeded.as_str();
        permit.live.close_all(Deny::QuotaExceeded);
    }
    if let Some(why) = permit.live.conn.reason() {
        conn.record.end = why.as_str();
    }
    if permit.revoked.is_cancelled() {
        // Revoked (or the gateway stopping hard): the close is a reset, so
        // what the kernel still holds for the client is not delivered.
        conn.client.abort();
    }
    // Held for the connection's life, whatever it carries next.
    conn.slot = Some(permit.slot);
    ending
}

/// What a relay carries, for a token replacement's re-check.
fn carried(relay: &Relay) -> Carried {
    match relay {
        Relay::Raw(_) => Carried::Raw,
        Relay::Http(..) => Carried::Judged,
        Relay::Inspect(i) => Carried::Inspected(i.plan.sealed.names_for(&i.plan.host)),
    }
}

/// A decided connection's upstream: dialled for it, or to be taken from
/// the sandbox's idle ones (for a host inspection opens).
pub enum Upstream {
    Dialled(TcpStream),
    Pooled(Deferred),
}

impl Upstream {
    /// The dialled socket, if it is one.
    fn dialled(&self) -> Option<&TcpStream> {
        match self {
            Upstream::Dialled(s) => Some(s),
            Upstream::Pooled(_) => None,
        }
    }

    /// A TCP connection: the dialled one, or (for a deferred one not
    /// inspected after all: a tunnel's first bytes not TLS) the target
    /// dialled now.
    pub async fn tcp(self, conn: &mut Conn, target: &Target) -> Result<TcpStream, Deny> {
        match self {
            Upstream::Dialled(s) => Ok(s),
            Upstream::Pooled(_) => conn.connect(target).await,
        }
    }
}

/// The pool key of an inspected connection: the sandbox, the host and
/// port, the meter its bytes go to.
pub fn pool_key(permit: &Permit, plan: &inspect::Plan, target: &Target) -> Key {
    Key {
        container: Arc::clone(&permit.grant.container),
        host: plan.host.clone(),
        port: target.port,
        meter: permit.live.meter().map_or(0, |m| Arc::as_ptr(m) as usize),
    }
}

/// A connection decided, dialled and opened: what the relay needs.
struct Ready {
    permit: Permit,
    /// Bytes read from the client, not yet sent.
    buf: Vec<u8>,
    relay: Relay,
}

/// How a connection is relayed, with its upstream.
enum Relay {
    /// Raw bytes, both ways.
    Raw(Stream),
    /// HTTP, each request judged by these.
    Http(Stream, HttpRules),
    /// TLS opened, for a host a credential goes to.
    Inspect(Box<Inspected>),
}

struct Inspected {
    caller: Caller,
    target: Target,
    upstream: Upstream,
    plan: inspect::Plan,
}

/// How each request of an HTTP connection is judged, rewritten and, when
/// refused, answered.
struct HttpRules {
    check: http::Check,
    rewrite: Rewrite,
    answer: fn(Deny) -> Vec<u8>,
}

/// Relayed as the first bytes say: TLS opened when a credential of the
/// sandbox goes to the host (else spliced), HTTP judged request by request
/// against the one host (and refused outright to a credential's host: a
/// credential never travels in clear), anything else raw. Refused in
/// `protocol`'s form when it cannot go on.
async fn to_origin(
    conn: &mut Conn,
    permit: Permit,
    caller: Caller,
    target: Target,
    upstream: Upstream,
    protocol: Protocol,
    buf: Vec<u8>,
) -> Result<Ready, Ending> {
    let inspect = match protocol {
        Protocol::Tls => Some(inspection(&conn.gw, &permit, &target)),
        _ => None,
    };
    let inspect = match inspect {
        Some(Ok(Some(plan))) => {
            let relay = Relay::Inspect(Box::new(Inspected {
                caller,
                target,
                upstream,
                plan,
            }));
            return Ok(Ready { permit, buf, relay });
        }
        Some(Err(d)) => Err(d),
        Some(Ok(None)) | None => Ok(()),
    };
    // Not inspected: a TCP connection of its own.
    let upstream = match upstream.tcp(conn, &target).await {
        Ok(s) => s,
        Err(d) => {
            conn.slot = Some(permit.slot);
            conn.refuse(protocol, d, refusal(protocol, d)).await;
            return Err(Ending::Closed);
        }
    };
    let relay = match protocol {
        // Not opened (an inspected one went above).
        Protocol::Tls => match inspect {
            Ok(()) if !permit.restricted => Relay::Raw(Stream::Tcp(upstream)),
            // Report mode: what cannot be judged is let through, recorded.
            Ok(()) if reports(&permit) => {
                conn.record.would_deny = Some(Deny::RequestNotAllowed);
                Relay::Raw(Stream::Tcp(upstream))
            }
            // A host with request rules whose TLS is not opened: its
            // requests cannot be judged, so none pass.
            Ok(()) => {
                drop(upstream);
                conn.slot = Some(permit.slot);
                let d = Deny::RequestNotAllowed;
                conn.refuse(protocol, d, refusal(protocol, d)).await;
                return Err(Ending::Closed);
            }
            Err(d) => {
                drop(upstream);
                conn.slot = Some(permit.slot);
                conn.refuse(protocol, d, refusal(protocol, d)).await;
                return Err(Ending::Closed);
            }
        },
        Protocol::Http => {
            if let (Host::Name(name), Some((sealed, _))) =
                (&target.host, conn.gw.sealed(&permit.grant))
                && sealed.covers(name)
            {
                drop(upstream);
                conn.slot = Some(permit.slot);
                let d = Deny::CredentialMisuse;
                conn.refuse(protocol, d, refusal(protocol, d)).await;
                return Err(Ending::Closed);
            }
            Relay::Http(
                Stream::Tcp(upstream),
                HttpRules {
                    check: same_host_check(
                        &conn.gw,
                        caller,
                        target,
                        Judged {
                            door: conn.record.mode,
                            source: conn.record.source,
                        },
                    ),
                    rewrite: Rewrite::StripProxyAuth,
                    answer: origin_answer,
                },
            )
        }
        // Bytes that are not HTTP cannot be judged by request rules.
        Protocol::Connect | Protocol::Other if permit.restricted && reports(&permit) => {
            conn.record.would_deny = Some(Deny::RequestNotAllowed);
            Relay::Raw(Stream::Tcp(upstream))
        }
        Protocol::Connect | Protocol::Other if permit.restricted => {
            drop(upstream);
            conn.slot = Some(permit.slot);
            let d = Deny::RequestNotAllowed;
            conn.refuse(protocol, d, refusal(protocol, d)).await;
            return Err(Ending::Closed);
        }
        Protocol::Connect | Protocol::Other => Relay::Raw(Stream::Tcp(upstream)),
    };
    Ok(Ready { permit, buf, relay })
}

/// Is the permit's sandbox in report mode?
fn reports(permit: &Permit) -> bool {
    permit.grant.claims.enforce == crate::identity::token::Enforce::Report
}

/// What inspecting a TLS connection to `target` takes, when it must be:
/// the sandbox's token names a credential whose hosts cover the name, or
/// only entries with request rules admit it. Refused when it must be and
/// cannot.
fn inspection(
    gw: &Gateway,
    permit: &Permit,
    target: &Target,
) -> Result<Option<inspect::Plan>, Deny> {
    let Host::Name(name) = &target.host else {
        return Ok(None);
    };
    let sealed = gw.sealed(&permit.grant).map(|(s, _)| s);
    let credential_host = sealed.as_ref().is_some_and(|s| s.covers(name));
    // Opened for a credential's host, or for a host with request rules
    // (so its requests can be judged).
    if !credential_host && !permit.restricted {
        return Ok(None);
    }
    let authority = gw
        .seal()
        .authority
        .clone()
        .ok_or(Deny::UpstreamCertificate)?;
    Ok(Some(inspect::Plan {
        sealed: sealed.unwrap_or_default(),
        authority,
        host: name.clone(),
        pool: Arc::clone(&gw.seal().pool),
    }))
}

/// Decides, dials, and opens the connection as `opened` says; `Err` with
/// its ending when it goes no further (refused, gone, or over).
async fn open(
    conn: &mut Conn,
    mut caller: Caller,
    mut target: Target,
    mut opened: Opened,
    mut buf: Vec<u8>,
) -> Result<Ready, Ending> {
    loop {
        let Some((permit, upstream)) = conn.open(&opened, &caller, &target).await else {
            return Err(Ending::Closed);
        };
        // From here on the connection asks as itself: under the grant it
        // was admitted with, or the one a token replacement swapped in.
        caller = Caller::Live(Arc::clone(&permit.live.conn));
        match opened {
            Opened::FirstBytes(protocol) => {
                return to_origin(conn, permit, caller, target, upstream, protocol, buf).await;
            }
            Opened::Tunnel { head_len } => {
                let head = &buf[..head_len.min(buf.len())];
                if let Err(d) = misuse_check(&conn.gw, &permit.grant, head) {
                    drop(upstream);
                    conn.slot = Some(permit.slot);
                    conn.refuse(Protocol::Connect, d, Some(proxy_deny_response(d)))
                        .await;
                    return Err(Ending::Closed);
                }
                buf.drain(..head_len.min(buf.len()));
                return tunnel(conn, permit, caller, target, upstream, buf).await;
            }
            Opened::Requests { check } => {
                let rules = HttpRules {
                    check,
                    rewrite: Rewrite::OriginForm,
                    answer: proxy_deny_response,
                };
                // Never pooled (only what is inspected is), so no dial here.
                let upstream = match upstream.tcp(conn, &target).await {
                    Ok(s) => s,
                    Err(d) => {
                        conn.slot = Some(permit.slot);
                        conn.refuse(Protocol::Http, d, Some(proxy_deny_response(d)))
                            .await;
                        return Err(Ending::Closed);
                    }
                };
                let relay = Relay::Http(Stream::Tcp(upstream), rules);
                return Ok(Ready { permit, buf, relay });
            }
            Opened::Answered => {}
        }
        let peek = Duration::from_millis(conn.gw.policy().gateway.peek_timeout_ms);
        let opening = open_tunnel(conn, upstream.dialled(), &mut buf, &permit, peek).await;
        let (opening, upstream) = settle(conn, opening, upstream).await?;
        let Some(opening) = opening else {
            let other = Protocol::Other;
            return to_origin(conn, permit, caller, target, upstream, other, buf).await;
        };
        match target_of(&opening, Some(target.port)) {
            // It names what was dialled: go on with it.
            Ok((protocol, host, port)) if host == target.host && port == target.port => {
                conn.record.set_target(protocol, &host, port);
                return to_origin(conn, permit, caller, target, upstream, protocol, buf).await;
            }
            // It names another host: decided and dialled on its own.
            Ok((protocol, host, port)) => {
                drop(upstream);
                conn.slot = Some(permit.slot);
                (target, opened) = (Target { host, port }, Opened::FirstBytes(protocol));
            }
            // It names nothing (SSH's banner): the answered name.
            Err((Protocol::Other, _)) => {
                let other = Protocol::Other;
                return to_origin(conn, permit, caller, target, upstream, other, buf).await;
            }
            Err((protocol, d)) => {
                drop(upstream);
                conn.refuse(protocol, d, refusal(protocol, d)).await;
                return Err(Ending::Closed);
            }
        }
        // Round once more: the new target's opening is its first bytes.
    }
}

/// What a refused client is sent, by protocol.
fn refusal(protocol: Protocol, d: Deny) -> Option<Vec<u8>> {
    deny_response(protocol, d).map(|b| b.into_owned())
}

/// The answer to a refused HTTP request on a connection to one origin
/// (transparent, or inside a tunnel): the client speaks to the origin, so
/// never a 407.
fn origin_answer(d: Deny) -> Vec<u8> {
    refusal(Protocol::Http, d).unwrap_or_default()
}

/// The protocol, host and port a client's first bytes name (the port
/// dialled if known, else the one the request names, else the protocol's);
/// a refusal when they name none.
pub fn target_of(
    opening: &Opening,
    port: Option<u16>,
) -> Result<(Protocol, Host, u16), (Protocol, Deny)> {
    match opening {
        Opening::Tls(hello) => Ok((
            Protocol::Tls,
            Host::Name(hello.sni.clone()),
            port.unwrap_or(443),
        )),
        // Tunnels belong to the explicit proxy listener.
        Opening::Http(head) if head.connect => Err((Protocol::Http, Deny::BadRequest)),
        Opening::Http(head) => Ok((
            Protocol::Http,
            head.host.clone(),
            port.or(head.port).unwrap_or(80),
        )),
        Opening::Other => Err((Protocol::Other, Deny::UnsupportedProtocol)),
    }
}

/// The check for every request of an HTTP connection bound to one host
/// (transparent, or inside a tunnel): not a CONNECT, the same host the
/// connection was opened to, and the caller still allowed there now.
pub fn same_host_check(
    gw: &Arc<Gateway>,
    caller: Caller,
    target: Target,
    at: Judged,
) -> http::Check {
    let gw = Arc::clone(gw);
    Box::new(move |head: &RequestHead, bytes: &[u8]| {
        if head.connect {
            return Err(Deny::BadRequest);
        }
        let policy = gw.policy();
        let allowed = gw.decision(&policy).authorize(&caller, &target)?;
        if head.host != target.host {
            return Err(Deny::HostNotAllowed);
        }
        misuse_check(&gw, &allowed.grant, bytes)?;
        judge_request(
            &gw,
            &allowed,
            &target,
            &policy.gateway.allowed_ports,
            head,
            at,
        )?;
        Ok(Verdict::Forward)
    })
}

/// Where a plain request was judged: the door and the client.
#[derive(Debug, Clone, Copy)]
pub struct Judged {
    pub door: Mode,
    pub source: std::net::SocketAddr,
}

/// The request rules' word on one plain HTTP request (`Ok` when the host
/// is unrestricted, or a report-mode sandbox's refusal let through); a
/// refusal (or a would-be one) is its own event and counted, since its
/// connection may go on.
pub fn judge_request(
    gw: &Gateway,
    allowed: &crate::decision::Authorized,
    target: &Target,
    allowed_ports: &[u16],
    head: &RequestHead,
    at: Judged,
) -> Result<(), Deny> {
    let judged = allowed.request(target, allowed_ports, &head.method, &head.path);
    let (verdict, reason) = match judged {
        Ok(None) => return Ok(()),
        Ok(Some(d)) => (Outcome::WouldDeny, d),
        Err(d) => (Outcome::Deny, d),
    };
    ::metrics::counter!(crate::metrics::REFUSED_REQUESTS_TOTAL, "reason" => reason.as_str(), "decision" => verdict.as_str())
        .increment(1);
    let mut event = Event::new(Kind::Request, at.door.as_str(), "http").with_grant(&allowed.grant);
    event.source = Some(at.source);
    event.host = Some(target.host.to_string());
    event.port = target.port;
    event.method = Some(head.method.clone());
    // The path only: a query string may carry what is not ours to log.
    event.path = Some(head.path.split(['?', '#']).next().unwrap_or("").to_owned());
    event.decision = verdict;
    event.reason = reason.as_str();
    event.end = if verdict == Outcome::Deny {
        reason.http_status().0.to_string()
    } else {
        "forwarded".to_owned()
    };
    gw.events.emit(event);
    match verdict {
        Outcome::Deny => Err(reason),
        _ => Ok(()),
    }
}

/// A placeholder of the sandbox's in bytes that go out as they are (a
/// cleartext request, a CONNECT head): `credential_misuse`, audited.
pub fn misuse_check(
    gw: &Gateway,
    grant: &crate::identity::token::Grant,
    bytes: &[u8],
) -> Result<(), Deny> {
    let Some((sealed, _)) = gw.sealed(grant) else {
        return Ok(());
    };
    match sealed.find_in(bytes) {
        Some(name) => {
            tracing::warn!(
                target: "sluice::audit",
                container_id = %grant.claims.container_id,
                credential = name,
                "a credential placeholder where it does not belong"
            );
            Err(Deny::CredentialMisuse)
        }
        None => Ok(()),
    }
}

fn idle_and_head(conn: &Conn) -> (Duration, usize) {
    let policy = conn.gw.policy();
    let g = &policy.gateway;
    (
        Duration::from_millis(g.idle_timeout_ms),
        g.max_request_head_bytes,
    )
}

/// `CONNECT`: answer 200, then treat the tunnel like a transparent
/// connection whose target is already known (bytes the client sent after
/// the CONNECT head go first).
async fn tunnel(
    conn: &mut Conn,
    permit: Permit,
    caller: Caller,
    target: Target,
    upstream: Upstream,
    mut buf: Vec<u8>,
) -> Result<Ready, Ending> {
    let established = b"HTTP/1.1 200 Connection established\r\n\r\n";
    let t = Arc::clone(&conn.record.traffic);
    if relay::send(&mut conn.client.write, established, &t.to_client, &t)
        .await
        .is_err()
    {
        conn.record.end = "client_error";
        return Err(Ending::Closed);
    }
    // However late a tunnel's first bytes come, they are read and judged.
    let idle = Duration::from_millis(conn.gw.policy().gateway.idle_timeout_ms);
    let opening = open_tunnel(conn, upstream.dialled(), &mut buf, &permit, idle).await;
    let (opening, upstream) = settle(conn, opening, upstream).await?;
    let opening = opening.unwrap_or(Opening::Other);
    if let Err((protocol, d)) = tunnel_target_check(&opening, &target.host, permit.explicit_port) {
        drop(upstream);
        conn.refuse(protocol, d, refusal(protocol, d)).await;
        return Err(Ending::Closed);
    }
    let protocol = match opening {
        Opening::Tls(_) => Protocol::Tls,
        Opening::Http(_) => Protocol::Http,
        Opening::Other => Protocol::Other,
    };
    to_origin(conn, permit, caller, target, upstream, protocol, buf).await
}

/// What a tunnel's opening leaves to go on with: the client's first bytes
/// (`None` when the upstream spoke first) and the upstream; the ending when
/// the client went, or was refused (the upstream closed first).
async fn settle(
    conn: &mut Conn,
    opening: TunnelOpening,
    upstream: Upstream,
) -> Result<(Option<Opening>, Upstream), Ending> {
    match opening {
        TunnelOpening::Client(o) => Ok((Some(o), upstream)),
        TunnelOpening::ServerFirst => Ok((None, upstream)),
        TunnelOpening::Gone(end) => {
            conn.record.end = end;
            Err(Ending::Closed)
        }
        TunnelOpening::Refused(protocol, d) => {
            drop(upstream);
            conn.refuse(protocol, d, refusal(protocol, d)).await;
            Err(Ending::Closed)
        }
    }
}

/// Records how an HTTP exchange ended; a refusal closes the connection.
async fn finish_http(conn: &mut Conn, end: RelayEnd, http_end: HttpEnd) {
    conn.record.end = end.as_str();
    if let HttpEnd::Refused { deny, .. } = http_end {
        conn.record.decide(Err(deny));
        linger_close(&mut conn.client).await;
    }
}

/// Shuts down our write half, then waits (briefly, bounded) for the
/// client's remaining bytes, so the close does not reset the connection
/// before the answer is read.
pub async fn linger_close(client: &mut Split) {
    client.write.shutdown().await;
    let linger = async {
        let mut buf = Vec::with_capacity(16 * 1024);
        let mut total = 0usize;
        while total < 256 * 1024 {
            buf.clear();
            match client.read.read_some(&mut buf, 16 * 1024).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), linger).await;
}

/// What a tunnel's first bytes turned out to be.
pub enum TunnelOpening {
    /// The client spoke first.
    Client(Opening),
    /// The upstream spoke first (SSH, SMTP, a database) on a port the
    /// allowlist names explicitly.
    ServerFirst,
    /// The client closed, or went idle, before a byte.
    Gone(&'static str),
    Refused(Protocol, Deny),
}

/// Waits for whoever speaks first on a connection already dialled (a
/// tunnel, or a transparent connection to an answered name on an explicit
/// port), bounded by the idle timeout, and classifies the client's first
/// bytes as the transparent door does, read within `read_limit` once they
/// start. An upstream that speaks first lets the connection go raw only
/// when an allowlist entry names the port.
async fn open_tunnel(
    conn: &mut Conn,
    upstream: Option<&TcpStream>,
    buf: &mut Vec<u8>,
    permit: &Permit,
    read_limit: Duration,
) -> TunnelOpening {
    let (explicit_port, stop) = (permit.explicit_port, &permit.revoked);
    let policy = conn.gw.policy();
    let g = &policy.gateway;
    let mut reader = OpeningReader::new(g.max_client_hello_bytes, g.max_request_head_bytes);
    let idle = Duration::from_millis(g.idle_timeout_ms);
    drop(policy);
    // A pooled upstream (an inspected host's) has spoken HTTP already: the
    // client speaks first.
    if let Some(upstream) = upstream.filter(|_| explicit_port && buf.is_empty()) {
        // Only while the client has sent nothing: a hello under way is
        // read to its end and checked. The client's first bytes are read
        // (a cancelled read keeps what it read); the upstream's are only
        // looked at, and stay for the relay.
        let (cap, mut other) = (reader.cap(), [0u8; 1]);
        tokio::select! {
            biased;
            r = conn.client.read.read_some(buf, cap) => match r {
                Ok(0) | Err(_) => return TunnelOpening::Gone("closed"),
                Ok(_) => {}
            },
            _ = upstream.peek(&mut other) => return TunnelOpening::ServerFirst,
            _ = tokio::time::sleep(idle) => return TunnelOpening::Gone("idle_timeout"),
            _ = stop.cancelled() => return TunnelOpening::Gone(RelayEnd::Cancelled.as_str()),
        }
    }
    let read = read_until(&mut conn.client.read, buf, &mut reader);
    let read = tokio::select! {
        r = tokio::time::timeout(read_limit, read) => r,
        _ = stop.cancelled() => return TunnelOpening::Gone(RelayEnd::Cancelled.as_str()),
    };
    match read {
        Err(_) => TunnelOpening::Gone("idle_timeout"),
        Ok(Err(_)) | Ok(Ok(ReadEnd::Eof)) => TunnelOpening::Gone("closed"),
        Ok(Ok(ReadEnd::Invalid(d))) => TunnelOpening::Refused(reader.protocol(), d),
        Ok(Ok(ReadEnd::Found(o))) => TunnelOpening::Client(o),
    }
}

/// The target a tunnel's first bytes may name: for TLS, the SNI must be
/// the CONNECT host; for HTTP, every request is checked against it; any
/// other protocol only where an entry names the port.
fn tunnel_target_check(
    opening: &Opening,
    connect_host: &Host,
    explicit_port: bool,
) -> Result<(), (Protocol, Deny)> {
    match opening {
        Opening::Tls(hello) => match connect_host {
            Host::Name(name) if hello.sni != *name => Err((Protocol::Tls, Deny::HostNotAllowed)),
            _ => Ok(()),
        },
        Opening::Http(head) if head.connect => Err((Protocol::Http, Deny::BadRequest)),
        Opening::Http(_) => Ok(()),
        Opening::Other if explicit_port => Ok(()),
        Opening::Other => Err((Protocol::Other, Deny::UnsupportedProtocol)),
    }
}
