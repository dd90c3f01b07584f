//! The DNS door: sandboxes resolve through the gateway, which answers only
//! the names they may reach. A query comes from a source address (the
//! sandbox, as for TCP), asks one question, and gets:
//!
//! - for a name the sandbox's allowlist admits on any port: the A records
//!   of sluice's own resolution (the shared cache entry the dialer uses),
//!   every address through the private-destination guard, TTL capped at
//!   `dns.max_ttl_s`; AAAA and other types an empty answer (sandboxes have
//!   no IPv6 through the gateway). Each address answered is remembered for
//!   the sandbox for the answer's TTL, so a later connection to it is known
//!   by name even when it carries none;
//! - for a name it may not reach: NXDOMAIN, and the query never leaves the
//!   gateway (no exfiltration through queries);
//! - from an unknown source, or past its query rate: REFUSED; PTR:
//!   NXDOMAIN; an EDNS version other than 0: BADVERS; a malformed
//!   message: FORMERR (or nothing, when not even its ID can be read).
//!
//! Messages are parsed and built with `hickory-proto`. The ID, the
//! question as sent (0x20 case randomisation survives) and EDNS(0) are
//! echoed; a UDP answer larger than the client takes is truncated (TC) so
//! it asks again over TCP. Parsing and building are pure functions over
//! bytes ([`parse`], [`respond`]); [`Door`] adds identity, the decision,
//! the rate limit and resolution; [`serve_udp`] and [`serve_tcp`] are the
//! listeners.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::decision::Caller;
use crate::deny::Deny;
use crate::host::{Host, HostName};
use crate::metrics as m;
use crate::proxy::Gateway;

/// Largest query read, over UDP or TCP: a query carries one question and
/// at most an OPT record, far below this.
pub const MAX_QUERY: usize = 4096;
/// The UDP payload sluice offers in its own EDNS, and the most it sends
/// over UDP (RFC 9715's advice, below common path MTUs).
pub const MAX_UDP_ANSWER: u16 = 1232;
/// A UDP answer to a client without EDNS (RFC 1035).
const CLASSIC_UDP: usize = 512;
/// A TCP client that sends nothing for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// How a query came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What the door answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A records, with their TTL.
    Addresses(Vec<std::net::Ipv4Addr>, u32),
    /// NOERROR with no records.
    Empty,
    NxDomain,
    Refused,
    FormErr,
    ServFail,
    NotImp,
    /// An EDNS version other than 0 (RFC 6891): BADVERS, with our OPT
    /// saying version 0.
    BadVers,
}

/// Parses a query. `Err(Some(id))`: malformed, answered FORMERR with that
/// ID; `Err(None)`: not even a header, or a response, dropped.
pub fn parse(bytes: &[u8]) -> Result<Message, Option<u16>> {
    if bytes.len() < 12 {
        return Err(None);
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    // QR set: a response, never answered (no reflection loops).
    if bytes[2] & 0x80 != 0 {
        return Err(None);
    }
    if bytes.len() > MAX_QUERY {
        return Err(Some(id));
    }
    Message::from_vec(bytes).map_err(|_| Some(id))
}

/// Builds the answer to `request` (pure): its ID, its question as sent,
/// RD echoed, RA set, EDNS echoed with sluice's payload size; answers over
/// `max_size` bytes are truncated (TC, no records).
pub fn respond(request: &Message, answer: &Answer, max_size: usize) -> Vec<u8> {
    let meta = &request.metadata;
    let code = match answer {
        Answer::Addresses(..) | Answer::Empty => ResponseCode::NoError,
        Answer::NxDomain => ResponseCode::NXDomain,
        Answer::Refused => ResponseCode::Refused,
        Answer::FormErr => ResponseCode::FormErr,
        Answer::ServFail => ResponseCode::ServFail,
        Answer::NotImp => ResponseCode::NotImp,
        Answer::BadVers => ResponseCode::BADVERS,
    };
    let mut msg = Message::error_msg(meta.id, meta.op_code, code);
    msg.metadata.recursion_desired = meta.recursion_desired;
    msg.metadata.recursion_available = true;
    msg.metadata.checking_disabled = meta.checking_disabled;
    if *answer != Answer::FormErr {
        msg.add_queries(request.queries.iter().cloned());
    }
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_ANSWER);
        msg.set_edns(edns);
    }
    if let (Answer::Addresses(ips, ttl), Some(q)) = (answer, request.queries.first()) {
        for ip in ips {
            msg.add_answer(Record::from_rdata(q.name().clone(), *ttl, RData::A(A(*ip))));
        }
    }
    let bytes = msg.to_vec().unwrap_or_default();
    if bytes.len() <= max_size {
        return bytes;
    }
    let truncated = msg.truncate().to_vec().unwrap_or_default();
    if truncated.len() <= max_size {
        return truncated;
    }
    // Even the questions do not fit (a message with many): the header
    // alone, with TC.
    let mut bare = Message::error_msg(meta.id, meta.op_code, code);
    bare.metadata.truncation = true;
    bare.to_vec().unwrap_or_default()
}

/// The most a UDP answer to `request` may be.
pub fn udp_limit(request: &Message) -> usize {
    match &request.edns {
        Some(e) => usize::from(e.max_payload().clamp(512, MAX_UDP_ANSWER)),
        None => CLASSIC_UDP,
    }
}

/// The metric label of a query type: a closed set.
pub fn qtype_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::HTTPS => "HTTPS",
        RecordType::SVCB => "SVCB",
        RecordType::TXT => "TXT",
        RecordType::MX => "MX",
        RecordType::PTR => "PTR",
        RecordType::CNAME => "CNAME",
        RecordType::NS => "NS",
        RecordType::SOA => "SOA",
        RecordType::SRV => "SRV",
        RecordType::ANY => "ANY",
        _ => "other",
    }
}

/// The DNS door's state, shared by its listeners.
pub struct Door {
    gw: Arc<Gateway>,
}

/// One query's outcome, for its event and the metrics.
struct Outcome {
    source: IpAddr,
    sandbox: Option<Arc<crate::identity::Sandbox>>,
    name: Option<String>,
    qtype: &'static str,
    decision: Result<(), Deny>,
    /// A report-mode sandbox's denial, answered anyway.
    would_deny: Option<Deny>,
    answers: usize,
}

impl Outcome {
    fn record(&self, events: &crate::events::Events) {
        use crate::events::{Event, Kind, Verdict};
        let (verdict, reason) = Verdict::of(self.decision, self.would_deny);
        let decision = verdict.as_str();
        ::metrics::counter!(
            m::DNS_QUERIES_TOTAL,
            "qtype" => self.qtype,
            "decision" => decision,
            "reason" => reason
        )
        .increment(1);
        let mut event = Event::new(Kind::Dns, "dns", "dns");
        if let Some(sandbox) = &self.sandbox {
            event = event.with_grant(&sandbox.grant());
        }
        event.source = Some(std::net::SocketAddr::new(self.source, 0));
        event.host = self.name.clone();
        event.port = 53;
        event.method = Some(self.qtype.to_owned());
        event.decision = verdict;
        event.reason = reason;
        event.end = self.answers.to_string();
        events.emit(event);
    }
}

impl Door {
    pub fn new(gw: Arc<Gateway>) -> Door {
        Door { gw }
    }

    /// Forgets the rate-limit state of sources that have been quiet.
    pub fn tidy(&self) {
        self.gw.resolver().tidy();
    }

    /// Answers one query from `source`; `None` when nothing is to be sent.
    pub async fn answer(
        &self,
        source: IpAddr,
        bytes: &[u8],
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let source = source.to_canonical();
        let request = match parse(bytes) {
            Ok(r) => r,
            Err(None) => return None,
            Err(Some(id)) => {
                let outcome = Outcome {
                    source,
                    sandbox: None,
                    name: None,
                    qtype: "other",
                    decision: Err(Deny::BadRequest),
                    would_deny: None,
                    answers: 0,
                };
                outcome.record(&self.gw.events);
                let mut empty = Message::new(id, MessageType::Query, OpCode::Query);
                empty.metadata.id = id;
                return Some(respond(&empty, &Answer::FormErr, CLASSIC_UDP));
            }
        };
        let limit = match transport {
            Transport::Udp => udp_limit(&request),
            Transport::Tcp => usize::from(u16::MAX),
        };
        let sandbox = self.gw.registry.get(source);
        let mut outcome = Outcome {
            source,
            sandbox: sandbox.clone(),
            name: request.queries.first().map(|q| q.name().to_ascii()),
            qtype: request
                .queries
                .first()
                .map(|q| qtype_label(q.query_type()))
                .unwrap_or("other"),
            decision: Ok(()),
            would_deny: None,
            answers: 0,
        };
        let answer = self.decide(&request, sandbox, &mut outcome).await;
        if let Answer::Addresses(ips, _) = &answer {
            outcome.answers = ips.len();
        }
        outcome.record(&self.gw.events);
        Some(respond(&request, &answer, limit))
    }

    async fn decide(
        &self,
        request: &Message,
        sandbox: Option<Arc<crate::identity::Sandbox>>,
        outcome: &mut Outcome,
    ) -> Answer {
        let mut deny = |d: Deny, a: Answer| {
            outcome.decision = Err(d);
            a
        };
        let Some(sandbox) = sandbox else {
            return deny(Deny::UnknownSource, Answer::Refused);
        };
        // A token's `dns_queries_per_s` takes the place of the gateway's
        // rate for its sandbox.
        match self.gw.registry.tenants().admit_query(&sandbox.grant()) {
            Some(true) => {}
            Some(false) => return deny(Deny::QuotaExceeded, Answer::Refused),
            None if !self.gw.resolver().admit_query(sandbox.source_ip) => {
                return deny(Deny::Overloaded, Answer::Refused);
            }
            None => {}
        }
        if request.edns.as_ref().is_some_and(|e| e.version() != 0) {
            return deny(Deny::BadRequest, Answer::BadVers);
        }
        if request.metadata.op_code != OpCode::Query {
            return deny(Deny::UnsupportedProtocol, Answer::NotImp);
        }
        let [query] = request.queries.as_slice() else {
            return deny(Deny::BadRequest, Answer::FormErr);
        };
        if query.query_class() != DNSClass::IN {
            return deny(Deny::UnsupportedProtocol, Answer::Refused);
        }
        if query.query_type() == RecordType::PTR {
            return deny(Deny::HostNotAllowed, Answer::NxDomain);
        }
        let ascii = query.name().to_ascii();
        let Ok(name) = HostName::parse(&ascii) else {
            return deny(Deny::NoHost, Answer::NxDomain);
        };
        // A placeholder in a name is a way out for it (a query to a
        // wildcard-allowed zone): refused, and audited.
        if let Some((sealed, _)) = self.gw.sealed(&sandbox.grant())
            && let Some(credential) = sealed.find_in_name(name.as_str())
        {
            tracing::warn!(
                target: "sluice::audit",
                container_id = %sandbox.grant().claims.container_id,
                credential,
                "a credential placeholder in a DNS query"
            );
            return deny(Deny::CredentialMisuse, Answer::Refused);
        }
        let policy = self.gw.policy();
        let decision = self.gw.decision(&policy);
        let caller = Caller::Sandbox(Arc::clone(&sandbox));
        match decision.authorize_name(&caller, &Host::Name(name.clone())) {
            Ok((_, would_deny)) => outcome.would_deny = would_deny,
            // Never sent upstream.
            Err(d) => return deny(d, Answer::NxDomain),
        }
        match query.query_type() {
            RecordType::A => {}
            // No IPv6 through the gateway: an empty answer, so clients do
            // not wait on addresses they cannot reach. Other types of an
            // allowed name: empty too.
            _ => return Answer::Empty,
        }
        let asker = crate::resolver::Asker::Query(sandbox.source_ip);
        let (addrs, ttl) = match policy.upstream.resolve_name(&name, asker).await {
            Ok(r) => r,
            Err(d) => return deny(d, Answer::ServFail),
        };
        if addrs.is_empty() {
            return deny(Deny::NoHost, Answer::NxDomain);
        }
        let allowed: Vec<std::net::Ipv4Addr> = addrs
            .iter()
            .filter(|ip| policy.upstream.guard_permits_ip(**ip))
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        if allowed.is_empty() {
            let had_v4 = addrs.iter().any(IpAddr::is_ipv4);
            return if had_v4 {
                deny(Deny::PrivateDestination, Answer::Empty)
            } else {
                Answer::Empty
            };
        }
        let until = Instant::now() + Duration::from_secs(ttl.into());
        for ip in &allowed {
            sandbox.remember(IpAddr::V4(*ip), &name, until);
        }
        Answer::Addresses(allowed, ttl)
    }
}

/// Queries answered at once over UDP; past that a query is dropped (the
/// client asks again). Per-source rates are the resolver's; this bounds
/// the work any number of sources can start.
const MAX_UDP_INFLIGHT: usize = 4096;
/// TCP connections one source may hold to the DNS door (RFC 7766 clients
/// use one or two).
const TCP_PER_SOURCE: usize = 8;
/// Queries one TCP connection may ask, and how long it may live: a client
/// that sends without reading is closed well before the kernel's queues
/// fill.
const TCP_MAX_QUERIES: usize = 1000;
const TCP_MAX_LIFE: Duration = Duration::from_secs(120);

/// Answers queries on a UDP socket until shutdown. Each query runs on its
/// own task, tracked by the drain, so a lookup that waits upstream does
/// not hold up the others; at most `MAX_UDP_INFLIGHT` at once.
pub async fn serve_udp(socket: UdpSocket, door: Arc<Door>) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; MAX_QUERY + 1];
    let shutdown = door.gw.shutdown.clone();
    let inflight = Arc::new(tokio::sync::Semaphore::new(MAX_UDP_INFLIGHT));
    loop {
        let (n, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "dns recv failed");
                    continue;
                }
            },
            _ = shutdown.stopping() => return,
        };
        let Ok(slot) = Arc::clone(&inflight).try_acquire_owned() else {
            continue;
        };
        let query = buf[..n].to_vec();
        let (door, socket) = (Arc::clone(&door), Arc::clone(&socket));
        shutdown.spawn(async move {
            if let Some(answer) = door.answer(peer.ip(), &query, Transport::Udp).await {
                let _ = socket.send_to(&answer, peer).await;
            }
            drop(slot);
        });
    }
}

/// Answers length-prefixed queries on TCP connections until shutdown,
/// through the one listener primitive: under the gateway's
/// `max_connections`, at most `TCP_PER_SOURCE` per source, tracked by the
/// drain.
pub async fn serve_tcp(listener: TcpListener, door: Arc<Door>) {
    let limits = door.gw.limits.sharing_total(TCP_PER_SOURCE);
    let shutdown = door.gw.shutdown.clone();
    crate::listener::serve(
        listener,
        limits,
        shutdown,
        |stream, peer, admission| {
            let door = Arc::clone(&door);
            async move {
                let _admission = admission;
                let _ =
                    tokio::time::timeout(TCP_MAX_LIFE, tcp_connection(stream, peer, &door)).await;
            }
        },
        |stream, _| drop(stream),
    )
    .await;
}

/// One TCP client: reads and writes each under a deadline, and at most
/// `TCP_MAX_QUERIES` queries.
async fn tcp_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    door: &Door,
) -> std::io::Result<()> {
    for _ in 0..TCP_MAX_QUERIES {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len > MAX_QUERY {
            return Ok(());
        }
        let mut query = vec![0u8; len];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let Some(answer) = door.answer(peer.ip(), &query, Transport::Tcp).await else {
            return Ok(());
        };
        let Ok(n) = u16::try_from(answer.len()) else {
            return Ok(());
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&n.to_be_bytes());
        framed.extend_from_slice(&answer);
        // A client that does not read is cut here, not buffered for.
        match tokio::time::timeout(TCP_IDLE, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => return Ok(()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
