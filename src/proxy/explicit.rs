//! The explicit proxy front door, for sandboxes that use `HTTP_PROXY` /
//! `HTTPS_PROXY`: `CONNECT host:port` tunnels and absolute-form HTTP/1.1
//! requests. Identity is the token in `Proxy-Authorization` (Basic
//! `container_<ID>:jwt_<TOKEN>` or Bearer), verified through the same
//! claims cache as the transparent path; no registration is needed.
//!
//! Every request on a connection is authenticated and authorised on its
//! own, before a byte of it is forwarded. Absolute-form requests are sent
//! in origin-form without hop-by-hop headers; the upstream connection is
//! kept while requests name the same authority and replaced, between
//! requests, when they name another allowed one. Responses are spliced.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::net::TcpStream;
use tokio_util::task::AbortOnDropHandle;

use super::http::{forward_chunked, forward_length, send};
use super::relay::{self, Flow, Traffic};
use super::sniff::{self, Framing, Parsed, Protocol, RequestHead};
use super::{Gateway, count};
use crate::audit;
use crate::deny::Deny;
use crate::host::Host;
use crate::identity::token::Grant;
use crate::metrics::{self as m, ActiveGuard, Mode};
use crate::net::{read_some, shutdown_write, write_all};

/// What `Proxy-Authorization` carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `Basic base64(container_<ID>:jwt_<TOKEN>)`, as `HTTP_PROXY` userinfo
    /// makes clients send.
    Basic {
        container_id: Option<String>,
        token: String,
    },
    /// `Bearer <TOKEN>`.
    Bearer(String),
}

impl Credentials {
    /// Parses a `Proxy-Authorization` value; `None` if it is unusable.
    pub fn parse(value: &str) -> Option<Credentials> {
        let (scheme, rest) = value.trim().split_once(' ')?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return (!rest.is_empty()).then(|| Credentials::Bearer(rest.to_owned()));
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = STANDARD.decode(rest).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, pass) = decoded.split_once(':')?;
        let token = pass.strip_prefix("jwt_").unwrap_or(pass);
        if token.is_empty() {
            return None;
        }
        let id = user.strip_prefix("container_").unwrap_or(user);
        Some(Credentials::Basic {
            container_id: (!id.is_empty()).then(|| id.to_owned()),
            token: token.to_owned(),
        })
    }

    fn token(&self) -> &str {
        match self {
            Credentials::Basic { token, .. } | Credentials::Bearer(token) => token,
        }
    }
}

/// Verifies the credentials of one request and, when the token asks for
/// it, that the container named in them is the token's.
pub fn authenticate(gw: &Gateway, value: Option<&str>) -> Result<Arc<Grant>, Deny> {
    let creds = value
        .and_then(Credentials::parse)
        .ok_or(Deny::TokenInvalid)?;
    let grant = gw.verifier.verify(creds.token()).map_err(|e| e.deny())?;
    if grant.claims.enforce_container_binding.0 {
        let named = match &creds {
            Credentials::Basic { container_id, .. } => container_id.as_deref(),
            // A bearer token carries no separate name: the claim is it.
            Credentials::Bearer(_) => Some(grant.claims.container_id.as_str()),
        };
        if named != Some(grant.claims.container_id.as_str()) {
            return Err(Deny::ContainerMismatch);
        }
    }
    Ok(grant)
}

/// Denies that are about credentials: answered `407`.
fn is_auth_failure(d: Deny) -> bool {
    matches!(
        d,
        Deny::TokenInvalid | Deny::TokenExpired | Deny::TokenRevoked | Deny::ContainerMismatch
    )
}

/// The proxy's answer to a refused request.
pub fn proxy_deny_response(d: Deny) -> Vec<u8> {
    if !is_auth_failure(d) {
        return super::deny_response(Protocol::Http, d)
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

/// The upstream connection that absolute-form requests currently go to.
struct Session {
    host: Host,
    port: u16,
    container_id: String,
    upstream: Arc<TcpStream>,
    addr: SocketAddr,
    traffic: Arc<Traffic>,
    /// Upstream → client, spliced.
    responses: Option<AbortOnDropHandle<std::io::Result<Flow>>>,
    started: Instant,
}

struct Conn {
    gw: Arc<Gateway>,
    /// The policy this connection started with.
    policy: Arc<super::Policy>,
    client: Arc<TcpStream>,
    peer: SocketAddr,
    accepted: Instant,
}

impl Conn {
    /// Counts, audits and answers a refused request, then closes.
    async fn refuse(
        &self,
        protocol: Protocol,
        head: Option<&RequestHead>,
        container: Option<&str>,
        d: Deny,
    ) {
        count(Mode::Proxy, protocol, Err(d));
        ::metrics::histogram!(m::DECISION_SECONDS).record(self.accepted.elapsed().as_secs_f64());
        audit::Record {
            container_id: container,
            source: self.peer,
            mode: Mode::Proxy,
            protocol: protocol.as_str(),
            host: head.map(|h| &h.host),
            port: head.and_then(|h| h.port).unwrap_or(0),
            upstream: None,
            decision: Err(d),
            bytes_to_upstream: 0,
            bytes_to_client: 0,
            duration: self.accepted.elapsed(),
            end: "denied",
        }
        .emit();
        let bytes = proxy_deny_response(d);
        let _ = tokio::time::timeout(Duration::from_secs(1), write_all(&self.client, &bytes)).await;
        super::linger_close(&self.client).await;
    }

    /// Connects to an allowed target, or says why not.
    async fn dial(&self, host: &Host, port: u16) -> Result<(TcpStream, SocketAddr), Deny> {
        let addrs = self.policy.upstream.resolve(host, port).await?;
        self.policy.upstream.connect(&addrs).await
    }
}

/// Ends a session: its audit line, its byte counts. With `wait`, the
/// response in flight is let finish first (the client closed its side
/// but may still be reading).
async fn end_session(conn: &Conn, session: Session, wait: Option<Duration>, end: &'static str) {
    let Session {
        host,
        port,
        container_id,
        upstream,
        addr,
        traffic,
        responses,
        started,
    } = session;
    match (wait, responses) {
        (Some(limit), Some(responses)) => {
            shutdown_write(&upstream);
            let _ = tokio::time::timeout(limit, responses).await;
        }
        (_, responses) => drop(responses),
    }
    drop(upstream);
    let (up, down) = super::count_bytes(&traffic);
    audit::Record {
        container_id: Some(&container_id),
        source: conn.peer,
        mode: Mode::Proxy,
        protocol: Protocol::Http.as_str(),
        host: Some(&host),
        port,
        upstream: Some(addr),
        decision: Ok(()),
        bytes_to_upstream: up,
        bytes_to_client: down,
        duration: started.elapsed(),
        end,
    }
    .emit();
}

/// Ends a session while the client connection goes on (to be refused, to
/// another authority, or into a tunnel): the upstream gets no more, the
/// answers to earlier requests still reach the client, in order and
/// bounded in time, and the client's side stays open.
async fn let_answers_finish(
    conn: &Conn,
    session: Option<Session>,
    idle: Duration,
    end: &'static str,
) {
    if let Some(s) = session {
        s.traffic.hold_for_refusal();
        end_session(conn, s, Some(idle.min(Duration::from_secs(5))), end).await;
    }
}

enum NextHead {
    Head(RequestHead),
    Eof,
    /// The token of the previous request was revoked meanwhile.
    Revoked,
    Invalid(Deny),
    TimedOut,
}

/// Reads until `buf` starts with a whole request head.
async fn next_head(
    client: &TcpStream,
    buf: &mut Vec<u8>,
    max_head: usize,
    deadline: tokio::time::Instant,
) -> NextHead {
    let mut reads = 0;
    loop {
        if !buf.is_empty() {
            match sniff::parse_request_head(buf, max_head) {
                Parsed::Found(h) => return NextHead::Head(h),
                Parsed::Invalid(d) => return NextHead::Invalid(d),
                Parsed::NeedMore => {}
            }
        }
        if reads >= sniff::MAX_SNIFF_READS {
            return NextHead::Invalid(Deny::BadRequest);
        }
        reads += 1;
        match tokio::time::timeout_at(deadline, read_some(client, buf, max_head)).await {
            Err(_) => return NextHead::TimedOut,
            Ok(Ok(0)) | Ok(Err(_)) => return NextHead::Eof,
            Ok(Ok(_)) => {}
        }
    }
}

/// One client connection to the proxy listener.
pub async fn handle(gw: Arc<Gateway>, stream: TcpStream, peer: SocketAddr) {
    let _active = ActiveGuard::new(Mode::Proxy);
    let hard = gw.shutdown.hard().clone();
    let conn = Conn {
        policy: gw.policy(),
        gw,
        client: Arc::new(stream),
        peer: SocketAddr::new(peer.ip().to_canonical(), peer.port()),
        accepted: Instant::now(),
    };
    tokio::select! {
        _ = serve(&conn) => {}
        _ = hard.cancelled() => {}
    }
}

async fn serve(conn: &Conn) {
    let g = &conn.policy.gateway;
    let max_head = g.max_request_head_bytes;
    let idle = Duration::from_millis(g.idle_timeout_ms);
    let mut buf = Vec::with_capacity(2048);
    let mut session: Option<Session> = None;
    let mut deadline = tokio::time::Instant::now() + Duration::from_millis(g.peek_timeout_ms);
    let mut first = true;
    // Cancelled when the token of the last request is revoked: the
    // connection (and the response it may be streaming) closes.
    let mut revoked = tokio_util::sync::CancellationToken::new();
    // The container's share of connections, taken at its first request and
    // held for the connection's life.
    let mut _slot: Option<crate::identity::CountGuard> = None;
    loop {
        let next = tokio::select! {
            next = next_head(&conn.client, &mut buf, max_head, deadline) => next,
            _ = revoked.cancelled() => NextHead::Revoked,
        };
        let head = match next {
            NextHead::Head(h) => h,
            NextHead::Revoked => {
                if let Some(s) = session.take() {
                    end_session(conn, s, None, "revoked").await;
                }
                return;
            }
            NextHead::Eof => {
                if let Some(s) = session.take() {
                    end_session(conn, s, Some(idle), "closed").await;
                }
                return;
            }
            NextHead::Invalid(d) => {
                let_answers_finish(conn, session.take(), idle, "denied").await;
                return conn.refuse(Protocol::Http, None, None, d).await;
            }
            NextHead::TimedOut => {
                // Still time while a response streams: the idle clock is the
                // session's last byte, either way.
                if let Some(s) = &session {
                    let resume = s.traffic.last() + idle;
                    if resume > tokio::time::Instant::now() {
                        deadline = resume;
                        continue;
                    }
                }
                if let Some(s) = session.take() {
                    end_session(conn, s, None, "idle_timeout").await;
                    return;
                }
                let d = if first {
                    Deny::PeekTimeout
                } else {
                    Deny::BadRequest
                };
                return conn.refuse(Protocol::Http, None, None, d).await;
            }
        };
        first = false;
        let protocol = if head.connect {
            Protocol::Connect
        } else {
            Protocol::Http
        };

        let grant = match authenticate(&conn.gw, head.proxy_authorization.as_deref()) {
            Ok(grant) => grant,
            Err(d) => {
                let_answers_finish(conn, session.take(), idle, "denied").await;
                return conn.refuse(protocol, Some(&head), None, d).await;
            }
        };
        let container = grant.claims.container_id.clone();
        revoked = conn.gw.verifier.watch(&grant);
        if _slot.is_none() {
            match conn
                .gw
                .proxy_counts
                .try_acquire(&container, g.max_connections_per_sandbox)
            {
                Some(slot) => _slot = Some(slot),
                None => {
                    let_answers_finish(conn, session.take(), idle, "denied").await;
                    return conn
                        .refuse(protocol, Some(&head), Some(&container), Deny::Overloaded)
                        .await;
                }
            }
        }
        let port = match (head.connect, head.absolute_form && !head.https) {
            (true, _) => head.port.unwrap_or(443),
            (false, true) => head.port.unwrap_or(80),
            // origin-form (not a proxy request) or https:// (sluice does
            // not originate TLS): refused.
            (false, false) => {
                let_answers_finish(conn, session.take(), idle, "denied").await;
                return conn
                    .refuse(protocol, Some(&head), Some(&container), Deny::BadRequest)
                    .await;
            }
        };
        if let Err(d) = grant.allowlist.decide(&head.host, port, &g.allowed_ports) {
            let_answers_finish(conn, session.take(), idle, "denied").await;
            return conn
                .refuse(protocol, Some(&head), Some(&container), d)
                .await;
        }

        if head.connect {
            let_answers_finish(conn, session.take(), idle, "closed").await;
            return tunnel(conn, head, grant, port, buf).await;
        }

        // Absolute-form: reuse the session for the same authority, else
        // replace it, once the previous authority's answers are through (so
        // a pipelining client gets them whole and in order).
        let same = session
            .as_ref()
            .is_some_and(|s| s.host == head.host && s.port == port);
        if !same {
            let_answers_finish(conn, session.take(), idle, "closed").await;
            let (upstream, addr) = match conn.dial(&head.host, port).await {
                Ok(u) => u,
                Err(d) => {
                    return conn
                        .refuse(protocol, Some(&head), Some(&container), d)
                        .await;
                }
            };
            let upstream = Arc::new(upstream);
            let traffic = Arc::new(Traffic::default());
            traffic.touch();
            let responses = {
                let (c, u, t) = (
                    Arc::clone(&conn.client),
                    Arc::clone(&upstream),
                    Arc::clone(&traffic),
                );
                AbortOnDropHandle::new(tokio::spawn(async move {
                    relay::one_way(&u, &c, &t.to_client, &t).await
                }))
            };
            session = Some(Session {
                host: head.host.clone(),
                port,
                container_id: container.clone(),
                upstream,
                addr,
                traffic,
                responses: Some(responses),
                started: Instant::now(),
            });
        }
        count(Mode::Proxy, protocol, Ok(()));
        ::metrics::histogram!(m::DECISION_SECONDS).record(conn.accepted.elapsed().as_secs_f64());
        let Some(s) = session.as_ref() else { return };

        let rewritten = match sniff::origin_form_head(&buf[..head.head_len]) {
            Ok(h) => h,
            Err(d) => {
                let_answers_finish(conn, session.take(), idle, "denied").await;
                return conn
                    .refuse(protocol, Some(&head), Some(&container), d)
                    .await;
            }
        };
        buf.drain(..head.head_len);
        let counter = &s.traffic.to_upstream;
        let forwarded = async {
            send(&s.upstream, &rewritten, counter, &s.traffic).await?;
            match head.framing {
                Framing::None => Ok(Some(true)),
                Framing::Length(n) => {
                    forward_length(&conn.client, &s.upstream, &mut buf, n, counter, &s.traffic)
                        .await
                        .map(Some)
                }
                Framing::Chunked => {
                    forward_chunked(&conn.client, &s.upstream, &mut buf, counter, &s.traffic).await
                }
            }
        };
        match forwarded.await {
            Ok(Some(true)) => {}
            Ok(Some(false)) | Err(_) => {
                if let Some(s) = session.take() {
                    end_session(conn, s, Some(idle), "closed").await;
                }
                return;
            }
            Ok(None) => {
                let_answers_finish(conn, session.take(), idle, "denied").await;
                return conn
                    .refuse(protocol, Some(&head), Some(&container), Deny::BadRequest)
                    .await;
            }
        }
        if head.upgrade {
            // The connection now speaks another protocol: raw both ways,
            // the response task already running carrying the other way.
            let Some(mut s) = session.take() else { return };
            let leftover = std::mem::take(&mut buf);
            let (c, u, t) = (
                Arc::clone(&conn.client),
                Arc::clone(&s.upstream),
                Arc::clone(&s.traffic),
            );
            let up = async move {
                send(&u, &leftover, &t.to_upstream, &t).await?;
                relay::one_way(&c, &u, &t.to_upstream, &t).await
            };
            let Some(responses) = s.responses.take() else {
                return;
            };
            let down = async move {
                responses
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            };
            let end = relay::run_pair(
                up,
                down,
                &s.traffic,
                idle,
                &revoked,
                conn.gw.shutdown.hard(),
            )
            .await;
            end_session(conn, s, None, end.as_str()).await;
            return;
        }
        deadline = tokio::time::Instant::now() + idle;
    }
}

/// `CONNECT`: dial, answer 200, then relay raw both ways (bytes the client
/// sent after the CONNECT head go first).
async fn tunnel(conn: &Conn, head: RequestHead, grant: Arc<Grant>, port: u16, mut buf: Vec<u8>) {
    let container = grant.claims.container_id.clone();
    let started = Instant::now();
    let (upstream, addr) = match conn.dial(&head.host, port).await {
        Ok(u) => u,
        Err(d) => {
            return conn
                .refuse(Protocol::Connect, Some(&head), Some(&container), d)
                .await;
        }
    };
    count(Mode::Proxy, Protocol::Connect, Ok(()));
    ::metrics::histogram!(m::DECISION_SECONDS).record(conn.accepted.elapsed().as_secs_f64());
    if write_all(&conn.client, b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    buf.drain(..head.head_len);
    let g = &conn.policy.gateway;
    // A TLS ClientHello in the tunnel must name the host the CONNECT named:
    // a client cannot reach one allowed name and speak to another.
    if let Host::Name(connect_name) = &head.host {
        let peek = Duration::from_millis(g.peek_timeout_ms);
        let refused = match tunnel_hello(
            &conn.client,
            &upstream,
            &mut buf,
            g.max_client_hello_bytes,
            peek,
        )
        .await
        {
            Some(Parsed::Found(hello)) if hello.sni != *connect_name => Some(Deny::HostNotAllowed),
            Some(Parsed::Found(_)) | None => None,
            Some(Parsed::Invalid(d)) => Some(d),
            Some(Parsed::NeedMore) => Some(Deny::PeekTimeout),
        };
        if let Some(d) = refused {
            count(Mode::Proxy, Protocol::Tls, Err(d));
            audit::Record {
                container_id: Some(&container),
                source: conn.peer,
                mode: Mode::Proxy,
                protocol: Protocol::Tls.as_str(),
                host: Some(&head.host),
                port,
                upstream: Some(addr),
                decision: Err(d),
                bytes_to_upstream: 0,
                bytes_to_client: 0,
                duration: started.elapsed(),
                end: "denied",
            }
            .emit();
            drop(upstream);
            super::refuse(&conn.client, Protocol::Tls, d).await;
            return;
        }
    }
    let upstream = Arc::new(upstream);
    let traffic = Arc::new(Traffic::default());
    let up = {
        let (c, u, t) = (
            Arc::clone(&conn.client),
            Arc::clone(&upstream),
            Arc::clone(&traffic),
        );
        async move {
            send(&u, &buf, &t.to_upstream, &t).await?;
            relay::one_way(&c, &u, &t.to_upstream, &t).await
        }
    };
    let down = {
        let (c, u, t) = (
            Arc::clone(&conn.client),
            Arc::clone(&upstream),
            Arc::clone(&traffic),
        );
        async move { relay::one_way(&u, &c, &t.to_client, &t).await }
    };
    // Revoking the token closes the tunnel.
    let revoked = conn.gw.verifier.watch(&grant);
    let end = relay::run_pair(
        up,
        down,
        &traffic,
        Duration::from_millis(g.idle_timeout_ms),
        &revoked,
        conn.gw.shutdown.hard(),
    )
    .await;
    let (to_upstream, to_client) = super::count_bytes(&traffic);
    audit::Record {
        container_id: Some(&container),
        source: conn.peer,
        mode: Mode::Proxy,
        protocol: Protocol::Connect.as_str(),
        host: Some(&head.host),
        port,
        upstream: Some(addr),
        decision: Ok(()),
        bytes_to_upstream: to_upstream,
        bytes_to_client: to_client,
        duration: started.elapsed(),
        end: end.as_str(),
    }
    .emit();
}

/// The tunnel's first ClientHello, if the client speaks TLS first: reads
/// the client's first bytes into `buf` until a hello is parsed, or returns
/// `None` when they are not TLS, when the upstream speaks first (SSH and
/// other server-first protocols), or when the client sends nothing before
/// the deadline. `NeedMore` means a hello was cut off by the deadline.
async fn tunnel_hello(
    client: &TcpStream,
    upstream: &TcpStream,
    buf: &mut Vec<u8>,
    max_hello: usize,
    peek: Duration,
) -> Option<Parsed<sniff::ClientHello>> {
    let deadline = tokio::time::Instant::now() + peek;
    let cap = max_hello * 2 + 64;
    let mut reads = 0;
    loop {
        if let Some(&first) = buf.first() {
            if first != 0x16 {
                return None;
            }
            match sniff::parse_client_hello(buf, max_hello) {
                Parsed::NeedMore if buf.len() >= cap => return Some(Parsed::Invalid(Deny::NoHost)),
                Parsed::NeedMore => {}
                done => return Some(done),
            }
        }
        if reads >= sniff::MAX_SNIFF_READS {
            return Some(Parsed::Invalid(Deny::NoHost));
        }
        reads += 1;
        let server_first = buf.is_empty();
        tokio::select! {
            r = tokio::time::timeout_at(deadline, read_some(client, buf, cap)) => match r {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return None,
                Err(_) if buf.is_empty() => return None,
                Err(_) => return Some(Parsed::NeedMore),
            },
            _ = upstream.readable(), if server_first => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(s: &str) -> String {
        format!("Basic {}", STANDARD.encode(s))
    }

    #[test]
    fn credentials_in_the_original_designs_shape() {
        assert_eq!(
            Credentials::parse(&basic("container_sb1:jwt_abc.def.ghi")),
            Some(Credentials::Basic {
                container_id: Some("sb1".into()),
                token: "abc.def.ghi".into()
            })
        );
        assert_eq!(
            Credentials::parse("Bearer abc.def.ghi"),
            Some(Credentials::Bearer("abc.def.ghi".into()))
        );
        assert_eq!(
            Credentials::parse("bearer  abc "),
            Some(Credentials::Bearer("abc".into()))
        );
        for bad in [
            "",
            "Basic",
            "Basic !!!",
            "Digest x",
            "Bearer ",
            &basic("nocolon"),
            &basic("container_x:jwt_"),
            &basic("container_x:"),
        ] {
            assert_eq!(Credentials::parse(bad), None, "{bad:?}");
        }
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
}
