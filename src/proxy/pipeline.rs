//! The connection pipeline both doors are thin adapters over:
//! accepted → (caller, target) → [`Permit`] → connected → relayed. A door
//! finds its caller and target its own way (a source address and the first
//! bytes; credentials and a request head); from there every connection
//! takes the same steps: the one decision ([`crate::decision`]), a dial
//! under the current policy, and a relay that judges every HTTP request and
//! watches the token. A CONNECT tunnel is a connection whose target is
//! already known: its first bytes go through [`open_tunnel`], the same
//! classification and checks as a transparent connection's.
//! The [`Record`] a connection carries writes its audit line and metrics.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::http::{self, Exchange, HttpEnd, Rewrite, Verdict};
use super::record::Record;
use super::relay::{self, RelayEnd};
use super::sniff::{Opening, OpeningReader, Protocol, ReadEnd, RequestHead, read_until};
use super::{Gateway, Policy, linger_close};
use crate::decision::{Caller, Decision, Permit, Target};
use crate::deny::Deny;
use crate::host::Host;

impl Gateway {
    /// The decision under `policy`.
    pub fn decision<'a>(&'a self, policy: &'a Policy) -> Decision<'a> {
        Decision {
            verifier: &self.verifier,
            connections: self.registry.connections(),
            gateway: &policy.gateway,
        }
    }
}

/// A client connection being served, and its record.
pub struct Conn {
    pub gw: Arc<Gateway>,
    pub client: Arc<TcpStream>,
    pub record: Record,
}

impl Conn {
    /// Refuses: the decision recorded, the answer (counted) written, then
    /// a bounded linger so the answer is read before the close.
    pub async fn refuse(&mut self, protocol: Protocol, deny: Deny, answer: Option<Vec<u8>>) {
        self.record.protocol = protocol;
        self.record.decide(Err(deny));
        if let Some(bytes) = answer {
            let t = &self.record.traffic;
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                relay::send(&self.client, &bytes, &t.to_client, t),
            )
            .await;
        }
        linger_close(&self.client).await;
    }

    /// Resolves, guards and connects under the policy in force now (a
    /// SIGHUP that tightened it applies to every new dial).
    pub async fn connect(&mut self, target: &Target) -> Result<TcpStream, Deny> {
        let policy = self.gw.policy();
        // Its lookups are the client's to spend.
        let asker = crate::resolver::Asker::Connection(self.record.source.ip());
        let addrs = policy
            .upstream
            .resolve(&target.host, target.port, asker)
            .await?;
        let (stream, addr) = policy.upstream.connect(&addrs).await?;
        self.record.upstream = Some(addr);
        Ok(stream)
    }
}

/// The check for every request of an HTTP connection bound to one host
/// (transparent, or inside a tunnel): not a CONNECT, the same host the
/// connection was opened to, and the caller still allowed there now.
pub fn same_host_check(gw: &Arc<Gateway>, caller: Caller, target: Target) -> http::Check {
    let gw = Arc::clone(gw);
    Box::new(move |head: &RequestHead| {
        if head.connect {
            return Err(Deny::BadRequest);
        }
        let policy = gw.policy();
        gw.decision(&policy).authorize(&caller, &target)?;
        if head.host != target.host {
            return Err(Deny::HostNotAllowed);
        }
        Ok(Verdict::Forward)
    })
}

/// A connection past its decision: who, where, what it holds, and the
/// upstream it was connected to.
pub struct Allowed {
    pub caller: Caller,
    pub target: Target,
    pub permit: Permit,
    pub upstream: TcpStream,
}

/// Relays an allowed connection whose first bytes (in `buf`) are known,
/// until it ends: request by request when they are HTTP (`http`), raw
/// otherwise; the record gets the ending.
pub async fn relay_opening(
    conn: &mut Conn,
    allowed: Allowed,
    http: bool,
    buf: Vec<u8>,
    answer: fn(Deny) -> Vec<u8>,
) {
    let Allowed {
        caller,
        target,
        permit,
        upstream,
    } = allowed;
    let (idle, max_head) = {
        let policy = conn.gw.policy();
        let g = &policy.gateway;
        (
            Duration::from_millis(g.idle_timeout_ms),
            g.max_request_head_bytes,
        )
    };
    if http {
        let ex = Exchange {
            client: Arc::clone(&conn.client),
            upstream: Arc::new(upstream),
            traffic: Arc::clone(&conn.record.traffic),
            max_head,
            rewrite: Rewrite::StripProxyAuth,
            check: same_host_check(&conn.gw, caller, target),
            answer,
        };
        // Boxed: a raw connection, the common case, does not carry the
        // HTTP exchange's state in its own.
        let (end, http_end) = Box::pin(http::relay(
            ex,
            buf,
            idle,
            &permit.revoked,
            conn.gw.shutdown.hard(),
        ))
        .await;
        finish_http(conn, end, http_end).await;
        return;
    }
    // Not needed while the bytes flow.
    drop((caller, target));
    let end = raw(conn, &upstream, buf, idle, &permit).await;
    conn.record.end = end.as_str();
}

/// Both directions raw, the bytes already read first.
async fn raw(
    conn: &Conn,
    upstream: &TcpStream,
    buf: Vec<u8>,
    idle: Duration,
    permit: &Permit,
) -> RelayEnd {
    relay::raw_pair(
        &conn.client,
        upstream,
        buf,
        &conn.record.traffic,
        idle,
        &permit.revoked,
        conn.gw.shutdown.hard(),
    )
    .await
}

/// Records how an HTTP exchange ended; a refusal closes the connection.
pub async fn finish_http(conn: &mut Conn, end: RelayEnd, http_end: HttpEnd) {
    conn.record.end = end.as_str();
    if let HttpEnd::Refused { deny, .. } = http_end {
        conn.record.decide(Err(deny));
        linger_close(&conn.client).await;
    }
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
pub async fn open_tunnel(
    conn: &Conn,
    upstream: &TcpStream,
    buf: &mut Vec<u8>,
    explicit_port: bool,
    read_limit: Duration,
) -> TunnelOpening {
    let policy = conn.gw.policy();
    let g = &policy.gateway;
    let mut reader = OpeningReader::new(g.max_client_hello_bytes, g.max_request_head_bytes);
    let idle = Duration::from_millis(g.idle_timeout_ms);
    if explicit_port && buf.is_empty() {
        // Only while the client has sent nothing: a hello under way is
        // read to its end and checked.
        // `peek`, not `readable`: readiness left over from reading the
        // CONNECT head would say the client had spoken when it has not.
        let (mut one, mut other) = ([0u8; 1], [0u8; 1]);
        tokio::select! {
            biased;
            _ = conn.client.peek(&mut one) => {}
            _ = upstream.peek(&mut other) => return TunnelOpening::ServerFirst,
            _ = tokio::time::sleep(idle) => return TunnelOpening::Gone("idle_timeout"),
        }
    }
    match tokio::time::timeout(read_limit, read_until(&conn.client, buf, &mut reader)).await {
        Err(_) => TunnelOpening::Gone("idle_timeout"),
        Ok(Err(_)) | Ok(Ok(ReadEnd::Eof)) => TunnelOpening::Gone("closed"),
        Ok(Ok(ReadEnd::Invalid(d))) => TunnelOpening::Refused(reader.protocol(), d),
        Ok(Ok(ReadEnd::Found(o))) => TunnelOpening::Client(o),
    }
}

/// The target a tunnel's first bytes may name: for TLS, the SNI must be
/// the CONNECT host; for HTTP, every request is checked against it; any
/// other protocol only where an entry names the port.
pub fn tunnel_target_check(
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
