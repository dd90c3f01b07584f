//! TLS inspection of one connection, only for a host one of the sandbox's
//! credentials goes to (every other connection is spliced, unopened).
//! Owns: holding the client's ClientHello (rustls' `Acceptor`), dialling
//! and verifying the upstream with the client's ALPN list (system roots
//! and `inspect.upstream_ca_file`), finishing the client's handshake with
//! a leaf from the sandbox's CA and the protocol the upstream chose, then
//! HTTP/1.1 or HTTP/2 end to end through `hyper` (trailers, so gRPC, and
//! HTTP/1.1 upgrades, so WebSocket, pass): every request judged (the same
//! host, the caller still allowed, no placeholder where it does not
//! belong), the credential's header set, and each request audited.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use super::Gateway;
use super::pipeline::{Conn, Upstream};
use super::pool::{Pool, Pooled, Sender};
use super::stream::{Joined, Stream};
use crate::authority::Authority;
use crate::credentials::Sealed;
use crate::decision::{Caller, Permit, Target};
use crate::deny::Deny;
use crate::events::{Event, Kind, Verdict};
use crate::host::{Host, HostName};
use crate::metrics as m;

/// What inspecting a connection needs beyond the pipeline's own.
pub struct Plan {
    pub sealed: Arc<Sealed>,
    pub authority: Arc<Authority>,
    pub host: HostName,
    /// Where its upstream connection waits for the next, once done.
    pub pool: Arc<Pool>,
}

/// The TLS alert a client is sent when the upstream cannot be used:
/// fatal, `bad_certificate` (42) for one that failed verification,
/// `internal_error` (80) otherwise.
fn alert(deny: Deny) -> [u8; 7] {
    let code = if deny == Deny::UpstreamCertificate {
        42
    } else {
        80
    };
    [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, code]
}

/// Is this rustls error (inside an I/O error) a certificate that did not
/// verify?
fn certificate_error(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidCertificate(_))
    )
}

/// Did the client end the handshake with an alert (it refused the leaf)?
fn client_alert(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(_))
    )
}

/// Inspects the connection whose ClientHello is `hello`, to `upstream`
/// (dialled, TLS not begun), until it ends, the permit's token is
/// cancelled (revocation, expiry, the gateway's hard stop), or it is idle.
pub async fn serve(
    conn: &mut Conn,
    permit: &Permit,
    caller: Caller,
    target: Target,
    upstream: Upstream,
    hello: Vec<u8>,
    plan: Plan,
) {
    let (idle, handshake) = {
        let policy = conn.gw.policy();
        let g = &policy.gateway;
        (
            Duration::from_millis(g.idle_timeout_ms),
            Duration::from_millis(g.peek_timeout_ms.max(g.connect_timeout_ms)),
        )
    };
    let traffic = Arc::clone(&conn.record.traffic);
    let client = std::mem::replace(&mut conn.client, Stream::closed().split());
    let io = Joined::new(hello, client, Arc::clone(&traffic));
    let reset = Arc::clone(&io.reset);
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let mut start = match tokio::time::timeout(handshake, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(_)) | Err(_) => {
            conn.record.end = "client_error";
            return;
        }
    };
    // Only what sluice can carry end to end is offered upstream.
    let offered: Vec<Vec<u8>> = start
        .client_hello()
        .alpn()
        .map(|protocols| {
            protocols
                .filter(|p| *p == b"h2" || *p == b"http/1.1")
                .map(<[u8]>::to_vec)
                .collect()
        })
        .unwrap_or_default();
    // The upstream: an idle one of the sandbox's that speaks a protocol
    // the client offered (HTTP/1.1 when it offered none), or a new one.
    let key = super::pipeline::pool_key(permit, &plan, &target);
    // An idle connection of the sandbox's that speaks the client's first
    // choice (HTTP/1.1 when it offered none), or a new one.
    let want: &[u8] = offered.first().map_or(b"http/1.1", Vec::as_slice);
    let pooled = match &upstream {
        Upstream::Pooled(d) => d.pool.take(&d.key, want),
        Upstream::Dialled(_) => None,
    };
    let upstream = match pooled {
        Some(p) => {
            conn.record.upstream = Some(p.addr);
            Ok(p.sender)
        }
        None => match upstream.tcp(conn, &target).await {
            Ok(s) => Err(s),
            Err(d) => return refuse_before(conn, &mut start.io, d).await,
        },
    };
    let (sender, chosen) = match upstream {
        // The client's first choice, which the pooled connection speaks.
        Ok(sender) => {
            let chosen = (!offered.is_empty()).then(|| sender.alpn().to_vec());
            (sender, chosen)
        }
        Err(tcp) => match dial(permit, &plan, tcp, offered, handshake).await {
            Ok(dialled) => dialled,
            Err(Some(d)) => return refuse_before(conn, &mut start.io, d).await,
            Err(None) => {
                conn.record.end = "upstream_error";
                return;
            }
        },
    };

    // The client's side: a leaf for the name, the upstream's protocol.
    let container = Arc::clone(&permit.grant.container);
    let ruled = permit.grant.allowlist.ruled_names();
    let server = plan
        .authority
        .ca(&container, Authority::permitted(&plan.sealed, &ruled))
        .and_then(|ca| {
            plan.authority
                .server_config(&container, &ca, &plan.host, chosen)
        });
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot make an inspection leaf");
            return refuse_before(conn, &mut start.io, Deny::Overloaded).await;
        }
    };
    let client = match tokio::time::timeout(handshake, start.into_stream(server)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if client_alert(&e) => {
            conn.record.end = "client_rejected_certificate";
            tracing::info!(
                container_id = %container,
                host = %plan.host,
                error = %e,
                hint = "the sandbox does not trust its inspection CA: install GET /v1/sandboxes/{id}/ca.pem beside the system roots",
                "a client refused the inspection certificate"
            );
            return;
        }
        Ok(Err(_)) | Err(_) => {
            conn.record.end = "client_error";
            return;
        }
    };

    let session = Arc::new(Session {
        gw: Arc::clone(&conn.gw),
        caller,
        target,
        host: plan.host,
        sealed: plan.sealed,
        grant: Arc::clone(&permit.grant),
        door: conn.record.mode,
        source: conn.record.source,
        sender: tokio::sync::Mutex::new(None),
        h2_sender: std::sync::Mutex::new(None),
        refused: AtomicBool::new(false),
        stop: permit.revoked.clone(),
    });
    let stop = permit.revoked.clone();
    let client_io = TokioIo::new(client);
    let svc = {
        let session = Arc::clone(&session);
        hyper::service::service_fn(move |req| {
            let session = Arc::clone(&session);
            async move { Ok::<_, Infallible>(session.handle(req).await) }
        })
    };
    let end = match sender {
        Sender::H2(sender) => {
            *session.h2_sender.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(client_io, svc);
            run(served, &traffic, idle, &stop, &reset).await
        }
        Sender::H1(sender) => {
            *session.sender.lock().await = Some(sender);
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(client_io, svc)
                .with_upgrades();
            run(served, &traffic, idle, &stop, &reset).await
        }
    };
    // The client is gone (closed, reset, or idle: its side says nothing of
    // the upstream's): the upstream waits for the sandbox's next connection
    // to the host, if it can carry a request (not mid-answer, not
    // upgraded, not closed). Not when the token was cancelled, nor after
    // a request was refused for misusing a credential.
    if !session.refused.load(Ordering::Acquire) && !stop.is_cancelled() {
        let h1 = session.sender.lock().await.take().map(Sender::H1);
        let h2 = session
            .h2_sender
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let (Some(sender), Some(addr)) = (h1.or(h2.map(Sender::H2)), conn.record.upstream) {
            plan.pool.put(key, Pooled { sender, addr });
        }
    }
    conn.record.end = end;
    if session.refused.load(Ordering::Acquire) {
        conn.record.decide(Err(Deny::CredentialMisuse));
        conn.record.end = end;
    }
}

/// Runs the client's connection (the upstream's runs in a task of its
/// own) until it ends, the token is cancelled, or nothing moves for
/// `idle`. Cancelled, the client's close is a reset (`reset` set before
/// the connection is dropped): bytes still queued for it are not
/// delivered.
async fn run<C, E>(
    served: C,
    traffic: &super::relay::Traffic,
    idle: Duration,
    stop: &CancellationToken,
    reset: &AtomicBool,
) -> &'static str
where
    C: Future<Output = Result<(), E>>,
{
    let mut served = std::pin::pin!(served);
    traffic.touch();
    loop {
        let idle_at = traffic.last() + idle;
        tokio::select! {
            r = &mut served => return if r.is_ok() { "closed" } else { "reset" },
            _ = stop.cancelled() => {
                reset.store(true, Ordering::Release);
                return "cancelled";
            }
            _ = tokio::time::sleep_until(idle_at) => {
                if traffic.last() + idle <= tokio::time::Instant::now() {
                    return "idle_timeout";
                }
            }
        }
    }
}

/// TLS to the dialled upstream (verified, offering the client's
/// protocols), then HTTP over it, driven by a task of its own; with the
/// protocol the upstream chose. `Err` with the refusal when TLS fails,
/// `Err(None)` when HTTP's handshake does.
async fn dial(
    permit: &Permit,
    plan: &Plan,
    tcp: TcpStream,
    offered: Vec<Vec<u8>>,
    handshake: Duration,
) -> Result<(Sender, Option<Vec<u8>>), Option<Deny>> {
    let mut config = (*plan.authority.upstream).clone();
    config.alpn_protocols = offered;
    let name =
        ServerName::try_from(plan.host.as_str().to_owned()).map_err(|_| Some(Deny::NoHost))?;
    // A limited sandbox's bytes are metered under the TLS, as they go.
    let upstream = super::stream::Metered::new(tcp, permit.live.meter().cloned());
    let connect = TlsConnector::from(Arc::new(config)).connect(name, upstream);
    let upstream = match tokio::time::timeout(handshake, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            if certificate_error(&e) {
                tracing::info!(
                    host = %plan.host,
                    error = %e,
                    "an inspected upstream's certificate did not verify"
                );
                return Err(Some(Deny::UpstreamCertificate));
            }
            return Err(Some(Deny::UpstreamUnreachable));
        }
        Err(_) => return Err(Some(Deny::UpstreamTimeout)),
    };
    let chosen = upstream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let h2 = chosen.as_deref() == Some(b"h2");
    let io = TokioIo::new(upstream);
    if h2 {
        let (sender, up_conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(|_| None)?;
        tokio::spawn(async move {
            let _ = up_conn.await;
        });
        Ok((Sender::H2(sender), chosen))
    } else {
        let (sender, up_conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|_| None)?;
        tokio::spawn(async move {
            let _ = up_conn.with_upgrades().await;
        });
        Ok((Sender::H1(sender), chosen))
    }
}

/// Refuses before the client's handshake is finished: a TLS alert, the
/// decision recorded.
async fn refuse_before<IO: tokio::io::AsyncWrite + Unpin>(
    conn: &mut Conn,
    io: &mut IO,
    deny: Deny,
) {
    use tokio::io::AsyncWriteExt;
    conn.record.decide(Err(deny));
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        io.write_all(&alert(deny)).await?;
        io.shutdown().await
    })
    .await;
}

type Body = Either<Incoming, Full<Bytes>>;

/// One inspected connection's state, shared by its requests.
struct Session {
    gw: Arc<Gateway>,
    caller: Caller,
    target: Target,
    host: HostName,
    sealed: Arc<Sealed>,
    /// What each request's event names: the sandbox, the door, the client.
    grant: Arc<crate::identity::token::Grant>,
    door: crate::metrics::Mode,
    source: std::net::SocketAddr,
    /// HTTP/1.1 upstream: one request at a time.
    sender: tokio::sync::Mutex<Option<hyper::client::conn::http1::SendRequest<Incoming>>>,
    /// HTTP/2 upstream: shared by every stream.
    h2_sender: std::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<Incoming>>>,
    /// A request was refused for carrying a placeholder.
    refused: AtomicBool,
    stop: CancellationToken,
}

impl Session {
    async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let started = std::time::Instant::now();
        let would_deny = match self.judge(&req) {
            Ok(w) => w,
            Err(deny) => {
                // A placeholder out of place is hostile: that connection ends.
                // A request off the rules is refused alone; the next goes on.
                let hostile = deny == Deny::CredentialMisuse;
                if hostile {
                    self.refused.store(true, Ordering::Release);
                }
                let status = if is_grpc(&req) {
                    200
                } else {
                    deny.http_status().0
                };
                self.audit(&method, &path, (Err(deny), None), &[], status, started);
                if !hostile {
                    // Read (and drop) what the client still sends of the
                    // refused request, as the plain door does: an HTTP/2
                    // client still uploading when its stream is answered
                    // and reset may report an error instead of the answer.
                    discard_body(req.body_mut()).await;
                }
                if is_grpc(&req) {
                    return grpc_refusal(deny);
                }
                return refusal(deny, hostile && req.version() == hyper::Version::HTTP_11);
            }
        };
        let injected = self.inject(&mut req);
        strip_proxy_headers(&mut req);
        if req.version() == hyper::Version::HTTP_2 {
            set_absolute(&mut req, &self.host, self.target.port);
        } else {
            set_origin_form(&mut req);
        }
        let wants_upgrade = req.headers().contains_key(hyper::header::UPGRADE);
        let client_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
        let answered = self.send(req).await;
        let mut resp = match answered {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, host = %self.host, "inspected request failed upstream");
                let d = Deny::UpstreamUnreachable;
                self.audit(&method, &path, (Err(d), None), &injected, 502, started);
                return refusal(Deny::UpstreamUnreachable, false);
            }
        };
        let status = resp.status().as_u16();
        self.audit(
            &method,
            &path,
            (Ok(()), would_deny),
            &injected,
            status,
            started,
        );
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let stop = self.stop.clone();
            self.gw.shutdown.spawn(async move {
                let (Ok(a), Ok(b)) = tokio::join!(client_upgrade, upstream_upgrade) else {
                    return;
                };
                let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
        resp.map(Either::Left)
    }

    /// The same host the connection was opened to, the caller still
    /// allowed there, and no placeholder outside the headers the gateway
    /// sets.
    /// `Ok(Some(deny))`: a report-mode sandbox's refusal, let through.
    fn judge(&self, req: &Request<Incoming>) -> Result<Option<Deny>, Deny> {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.host().to_owned())
            .or_else(|| {
                req.headers()
                    .get(hyper::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .and_then(|h| crate::host::split_authority(h).ok())
                    .map(|(h, _)| h.to_string())
            })
            .ok_or(Deny::BadRequest)?;
        match Host::parse(&authority) {
            Ok(Host::Name(n)) if n == self.host => {}
            _ => return Err(Deny::HostNotAllowed),
        }
        let policy = self.gw.policy();
        let allowed = self
            .gw
            .decision(&policy)
            .authorize(&self.caller, &self.target)?;
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let would_deny = allowed.request(
            &self.target,
            &policy.gateway.allowed_ports,
            req.method().as_str(),
            path,
        )?;
        let set: Vec<&str> = self
            .sealed
            .for_host(&self.host)
            .map(|c| c.header.as_str())
            .collect();
        let uri = req.uri().to_string();
        if self.sealed.find_in(uri.as_bytes()).is_some() {
            return Err(Deny::CredentialMisuse);
        }
        for (name, value) in req.headers() {
            if set.contains(&name.as_str()) {
                continue;
            }
            let line = [name.as_str().as_bytes(), b": ", value.as_bytes()].concat();
            if self.sealed.find_in(&line).is_some() {
                return Err(Deny::CredentialMisuse);
            }
        }
        Ok(would_deny.or(allowed.would_deny))
    }

    /// Sets each credential for this host in its header, replacing what
    /// the client sent; the names set.
    fn inject(&self, req: &mut Request<Incoming>) -> Vec<Arc<str>> {
        let mut names = Vec::new();
        for c in self.sealed.for_host(&self.host) {
            let (Ok(name), Ok(mut value)) = (
                HeaderName::from_bytes(c.header.as_bytes()),
                HeaderValue::from_str(&c.header_value()),
            ) else {
                continue;
            };
            // Never indexed by HPACK, never shown by hyper's Debug.
            value.set_sensitive(true);
            req.headers_mut().remove(&name);
            req.headers_mut().insert(name, value);
            ::metrics::counter!(m::CREDENTIAL_INJECTIONS_TOTAL, "credential" => c.name.to_string())
                .increment(1);
            names.push(Arc::clone(&c.name));
        }
        names
    }

    async fn send(&self, req: Request<Incoming>) -> Result<Response<Incoming>, hyper::Error> {
        let h2 = self
            .h2_sender
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(mut h2) = h2 {
            h2.ready().await?;
            return h2.send_request(req).await;
        }
        let mut guard = self.sender.lock().await;
        match guard.as_mut() {
            Some(h1) => {
                h1.ready().await?;
                h1.send_request(req).await
            }
            // Not reached: the sender is set before the first request.
            None => {
                drop(guard);
                std::future::pending().await
            }
        }
    }

    /// One event per request judged: its decision (a report-mode
    /// refusal let through is `would_deny`), the credentials set by name,
    /// the status answered.
    fn audit(
        &self,
        method: &hyper::Method,
        path: &str,
        (decision, would_deny): (Result<(), Deny>, Option<Deny>),
        injected: &[Arc<str>],
        status: u16,
        started: std::time::Instant,
    ) {
        let (verdict, reason) = Verdict::of(decision, would_deny);
        ::metrics::counter!(m::INSPECTED_REQUESTS_TOTAL, "decision" => verdict.as_str(), "reason" => reason)
            .increment(1);
        let mut event =
            Event::new(Kind::Request, self.door.as_str(), "https").with_grant(&self.grant);
        event.source = Some(self.source);
        event.host = Some(self.host.to_string());
        event.port = self.target.port;
        event.method = Some(method.to_string());
        // The path only: a query string may carry what is not ours to log.
        event.path = Some(path.to_owned());
        event.decision = verdict;
        event.reason = reason;
        event.credentials = injected.iter().map(|n| n.to_string()).collect();
        event.end = status.to_string();
        event.timings.total_ms = started.elapsed().as_millis() as u64;
        self.gw.events.emit(event);
    }
}

/// A gRPC call (its answer is a trailers-only status, not an HTTP one).
/// Reads and drops a refused request's body: at most 1 MiB, for at most
/// a second (what is left after that is the client's to lose).
async fn discard_body(body: &mut Incoming) {
    use http_body_util::BodyExt;
    use hyper::body::Body as _;
    if body.is_end_stream() {
        return;
    }
    let drain = async {
        let mut read = 0usize;
        while read < DISCARD_MAX {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// The most of a refused request's body that is read and dropped.
const DISCARD_MAX: usize = 1 << 20;

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The answer to a refused request, with the reason.
fn refusal(deny: Deny, close: bool) -> Response<Body> {
    let (code, _) = deny.http_status();
    let body = format!("sluice: {}\n", deny.as_str());
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::FORBIDDEN);
    let h = resp.headers_mut();
    h.insert("x-deny-reason", HeaderValue::from_static(deny.as_str()));
    h.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    if close {
        h.insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A refused gRPC call: `PERMISSION_DENIED` (7) as a trailers-only
/// answer, which is how a gRPC client reads it; the reason beside it.
fn grpc_refusal(deny: Deny) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
    let h = resp.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from_static("7"));
    h.insert("grpc-message", HeaderValue::from_static(deny.as_str()));
    h.insert("x-deny-reason", HeaderValue::from_static(deny.as_str()));
    resp
}

/// The proxy's own headers never go upstream.
fn strip_proxy_headers(req: &mut Request<Incoming>) {
    let h = req.headers_mut();
    h.remove(hyper::header::PROXY_AUTHORIZATION);
    h.remove("proxy-connection");
}

/// HTTP/2 upstream: the request's URI absolute, `https` to the host.
fn set_absolute(req: &mut Request<Incoming>, host: &HostName, port: u16) {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let authority = if port == 443 {
        host.as_str().to_owned()
    } else {
        format!("{}:{port}", host.as_str())
    };
    if let Ok(uri) = format!("https://{authority}{path}").parse() {
        *req.uri_mut() = uri;
    }
}

/// HTTP/1.1 upstream: the request's URI in origin form.
fn set_origin_form(req: &mut Request<Incoming>) {
    if req.uri().authority().is_none() {
        return;
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    if let Ok(uri) = path.parse() {
        *req.uri_mut() = uri;
    }
}
