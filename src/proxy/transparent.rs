//! The transparent front door: a connection that iptables `REDIRECT`ed to
//! sluice. Its source address says which sandbox it is; its first bytes say
//! which host it wants (TLS SNI or HTTP `Host`); its original destination
//! gives only the port. The upstream address is always sluice's own
//! resolution of the allowed name, never the address the client dialled.
//! Every path ends with one audit line and one counted decision.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::relay::{self, RelayEnd, Traffic};
use super::sniff::{self, Parsed, Protocol, RequestHead};
use super::{Gateway, Policy, count, http, refuse};
use crate::audit;
use crate::deny::Deny;
use crate::host::Host;
use crate::identity::Sandbox;
use crate::metrics::{self as m, ActiveGuard, Mode};

/// What the first bytes named.
struct Sniffed {
    protocol: Protocol,
    host: Host,
    /// The port in an HTTP `Host`, if any.
    port: Option<u16>,
}

/// Reads until the first bytes name a host, or say why they cannot.
async fn sniff_target(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    max_hello: usize,
    max_head: usize,
) -> io::Result<Result<Sniffed, (Protocol, Deny)>> {
    // A ClientHello split into many small records carries 5 bytes of
    // header per record; leave room for that, bounded.
    let tls_cap = max_hello * 2 + 64;
    let mut reads = 0;
    loop {
        let protocol = match buf.first() {
            None => Protocol::Other,
            Some(_) => sniff::classify(buf),
        };
        let (cap, parsed) = match protocol {
            _ if buf.is_empty() => (tls_cap.max(max_head), Parsed::NeedMore),
            Protocol::Tls => (
                tls_cap,
                match sniff::parse_client_hello(buf, max_hello) {
                    Parsed::Found(h) => Parsed::Found((Host::Name(h.sni), None)),
                    Parsed::NeedMore => Parsed::NeedMore,
                    Parsed::Invalid(d) => Parsed::Invalid(d),
                },
            ),
            Protocol::Http => (
                max_head,
                match sniff::parse_request_head(buf, max_head) {
                    // Tunnels belong to the explicit proxy listener.
                    Parsed::Found(h) if h.connect => Parsed::Invalid(Deny::BadRequest),
                    Parsed::Found(h) => Parsed::Found((h.host, h.port)),
                    Parsed::NeedMore => Parsed::NeedMore,
                    Parsed::Invalid(d) => Parsed::Invalid(d),
                },
            ),
            Protocol::Connect | Protocol::Other => {
                return Ok(Err((protocol, Deny::UnsupportedProtocol)));
            }
        };
        match parsed {
            Parsed::Found((host, port)) => {
                return Ok(Ok(Sniffed {
                    protocol,
                    host,
                    port,
                }));
            }
            Parsed::Invalid(d) => return Ok(Err((protocol, d))),
            Parsed::NeedMore if buf.len() >= cap => {
                let deny = if protocol == Protocol::Tls {
                    Deny::NoHost
                } else {
                    Deny::BadRequest
                };
                return Ok(Err((protocol, deny)));
            }
            Parsed::NeedMore if reads >= sniff::MAX_SNIFF_READS => {
                let deny = if protocol == Protocol::Tls {
                    Deny::NoHost
                } else {
                    Deny::BadRequest
                };
                return Ok(Err((protocol, deny)));
            }
            Parsed::NeedMore => {
                reads += 1;
                if crate::net::read_some(stream, buf, cap).await? == 0 {
                    // The client closed before naming a host.
                    return Ok(Err((protocol, Deny::NoHost)));
                }
            }
        }
    }
}

/// What became of a connection: filled in along the way, audited once.
struct Outcome {
    protocol: Protocol,
    host: Option<Host>,
    port: u16,
    upstream: Option<SocketAddr>,
    decision: Result<(), Deny>,
    sandbox: Option<Arc<Sandbox>>,
    traffic: Option<Arc<Traffic>>,
    end: &'static str,
}

impl Outcome {
    /// Counts a decision (once per decision, so a connection whose later
    /// request is refused counts an allow and then a deny).
    fn decide(&mut self, protocol: Protocol, decision: Result<(), Deny>, started: Instant) {
        ::metrics::histogram!(m::DECISION_SECONDS).record(started.elapsed().as_secs_f64());
        self.record(protocol, decision);
    }

    fn record(&mut self, protocol: Protocol, decision: Result<(), Deny>) {
        count(Mode::Transparent, protocol, decision);
        self.protocol = protocol;
        self.decision = decision;
    }

    /// Counts a deny and answers the client in its protocol.
    async fn refuse(&mut self, stream: &TcpStream, protocol: Protocol, d: Deny, started: Instant) {
        self.decide(protocol, Err(d), started);
        self.end = "denied";
        refuse(stream, protocol, d).await;
    }
}

/// One connection, from accept to close.
pub async fn handle(gw: Arc<Gateway>, stream: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let _active = ActiveGuard::new(Mode::Transparent);
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let mut out = Outcome {
        protocol: Protocol::Other,
        host: None,
        port: 0,
        upstream: None,
        decision: Ok(()),
        sandbox: None,
        traffic: None,
        end: "denied",
    };
    serve(&gw, stream, peer, started, &mut out).await;

    let (to_upstream, to_client) = out.traffic.as_ref().map(|t| t.totals()).unwrap_or((0, 0));
    if out.traffic.is_some() {
        ::metrics::counter!(m::BYTES_TOTAL, "direction" => "client_to_upstream")
            .increment(to_upstream);
        ::metrics::counter!(m::BYTES_TOTAL, "direction" => "upstream_to_client")
            .increment(to_client);
    }
    audit::Record {
        container_id: out.sandbox.as_deref().map(|s| s.container_id.as_str()),
        source: peer,
        mode: Mode::Transparent,
        protocol: out.protocol.as_str(),
        host: out.host.as_ref(),
        port: out.port,
        upstream: out.upstream,
        decision: out.decision,
        bytes_to_upstream: to_upstream,
        bytes_to_client: to_client,
        duration: started.elapsed(),
        end: out.end,
    }
    .emit();
}

async fn serve(
    gw: &Arc<Gateway>,
    stream: TcpStream,
    peer: SocketAddr,
    started: Instant,
    out: &mut Outcome,
) {
    // A REDIRECTed connection keeps its original port. One that came
    // straight to the listener has none (or has the listener's own address):
    // its port is then the one its request names, or the protocol's.
    let orig_port = match gw.orig_dst.redirected_port(&stream) {
        Ok(port) => port,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "no original destination: a direct connection");
            None
        }
    };
    out.sandbox = gw.registry.get(peer.ip());

    // The first bytes, under one deadline for all of them: a slow drip is
    // cut at the peek timeout, not reset by every byte.
    let policy = gw.policy();
    let g = &policy.gateway;
    let mut buf = Vec::with_capacity(2048);
    let peek = Duration::from_millis(g.peek_timeout_ms);
    // The decision's futures are boxed: they are freed once done, and the
    // connection's own state, held for as long as the relay runs, stays
    // small (what an idle connection costs).
    let sniffed = tokio::time::timeout(
        peek,
        Box::pin(sniff_target(
            &stream,
            &mut buf,
            g.max_client_hello_bytes,
            g.max_request_head_bytes,
        )),
    )
    .await;
    let target = match sniffed {
        Ok(Ok(Ok(t))) => t,
        Ok(Ok(Err((protocol, d)))) => return out.refuse(&stream, protocol, d, started).await,
        Ok(Err(_)) => {
            out.decide(Protocol::Other, Err(Deny::NoHost), started);
            out.end = "client_error";
            return;
        }
        Err(_) => {
            let protocol = buf
                .first()
                .map(|_| sniff::classify(&buf))
                .unwrap_or(Protocol::Other);
            return out
                .refuse(&stream, protocol, Deny::PeekTimeout, started)
                .await;
        }
    };
    let protocol = target.protocol;
    let host = target.host;
    let port = orig_port.or(target.port).unwrap_or(match protocol {
        Protocol::Tls => 443,
        _ => 80,
    });
    out.host = Some(host.clone());
    out.port = port;

    let decided = match &out.sandbox {
        None => Err(Deny::UnknownSource),
        Some(s) => authorise(gw, s, &host, port, &g.allowed_ports).map(|()| Arc::clone(s)),
    };
    let sandbox = match decided {
        Ok(sandbox) => sandbox,
        Err(d) => return out.refuse(&stream, protocol, d, started).await,
    };
    // The sandbox's own cap, taken before dialling and held to the end.
    let Some(_live) = sandbox.try_track(g.max_connections_per_sandbox) else {
        return out
            .refuse(&stream, protocol, Deny::Overloaded, started)
            .await;
    };
    let connected = Box::pin(async {
        match policy.upstream.resolve(&host, port).await {
            Ok(addrs) => policy.upstream.connect(&addrs).await,
            Err(d) => Err(d),
        }
    })
    .await;
    let (upstream, addr) = match connected {
        Ok(u) => u,
        Err(d) => return out.refuse(&stream, protocol, d, started).await,
    };
    out.decide(protocol, Ok(()), started);
    out.upstream = Some(addr);

    let traffic = Arc::new(Traffic::default());
    out.traffic = Some(Arc::clone(&traffic));
    let client = Arc::new(stream);
    let upstream = Arc::new(upstream);
    let idle = Duration::from_millis(g.idle_timeout_ms);

    // The directions are made and spawned in this block, so the state this
    // connection keeps while they run is only their handles.
    let pair = {
        let to_client = {
            let (c, u, t) = (
                Arc::clone(&client),
                Arc::clone(&upstream),
                Arc::clone(&traffic),
            );
            async move { relay::one_way(&u, &c, &t.to_client, &t).await }
        };
        let (c, u, t) = (
            Arc::clone(&client),
            Arc::clone(&upstream),
            Arc::clone(&traffic),
        );
        // HTTP is forwarded request by request; anything else (TLS) raw,
        // after the bytes already read.
        let check = (protocol == Protocol::Http)
            .then(|| next_request_check(gw, &policy, &sandbox, host, port));
        let max_head = g.max_request_head_bytes;
        let to_upstream = async move {
            match check {
                Some(check) => {
                    Box::pin(http::forward_requests(&c, &u, buf, max_head, check, &t)).await
                }
                None => {
                    http::send(&u, &buf, &t.to_upstream, &t).await?;
                    // Not held for the life of the connection.
                    drop(buf);
                    relay::one_way(&c, &u, &t.to_upstream, &t).await
                }
            }
        };
        relay::run_pair(
            to_upstream,
            to_client,
            &traffic,
            idle,
            sandbox.closed(),
            gw.shutdown.hard(),
        )
    };
    let end = pair.await;
    drop(upstream);
    out.end = end.as_str();
    if let RelayEnd::Denied(d) = end {
        // A later request on the connection was refused: it is answered and
        // the connection closed, and the decision counted and audited (not
        // timed: the time since accept is the connection's, not the
        // decision's).
        out.record(protocol, Err(d));
        refuse(&client, protocol, d).await;
    }
}

/// The decision for one target: the sandbox it comes from, that
/// sandbox's token still good, the host and port allowed.
fn authorise(
    gw: &Gateway,
    sandbox: &Sandbox,
    host: &Host,
    port: u16,
    allowed_ports: &[u16],
) -> Result<(), Deny> {
    let grant = sandbox.current_grant(&gw.verifier)?;
    grant.allowlist.decide(host, port, allowed_ports)
}

/// The check for every request on an HTTP connection: the sandbox's token
/// still valid, the host still allowed, and the same host the connection
/// was opened to (the upstream it is bound to).
fn next_request_check(
    gw: &Arc<Gateway>,
    policy: &Arc<Policy>,
    sandbox: &Arc<Sandbox>,
    first: Host,
    port: u16,
) -> impl Fn(&RequestHead) -> Result<(), Deny> + Send + 'static {
    let (gw, policy, sandbox) = (Arc::clone(gw), Arc::clone(policy), Arc::clone(sandbox));
    move |head: &RequestHead| {
        if head.connect {
            return Err(Deny::BadRequest);
        }
        authorise(
            &gw,
            &sandbox,
            &head.host,
            port,
            &policy.gateway.allowed_ports,
        )?;
        if head.host != first {
            return Err(Deny::HostNotAllowed);
        }
        Ok(())
    }
}
