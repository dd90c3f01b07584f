//! The explicit proxy front door, for sandboxes that use `HTTP_PROXY` /
//! `HTTPS_PROXY`: `CONNECT host:port` tunnels and absolute-form HTTP/1.1
//! requests. Identity is the token in `Proxy-Authorization` (Basic
//! `container_<ID>:jwt_<TOKEN>` or Bearer), verified through the same
//! claims cache as the transparent path; no registration is needed.
//!
//! A thin adapter over the [`pipeline`](super::pipeline): each request head
//! gives a caller (its credentials) and a target, judged by the one
//! decision. Absolute-form requests go in origin-form to an upstream kept
//! while requests name the same authority and replaced, between requests,
//! when they name another allowed one; each upstream session has its own
//! record. A tunnel's first bytes are classified and checked like a
//! transparent connection's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::Gateway;
use super::http::{self, Exchange, HttpEnd, Rewrite, Verdict};
use super::pipeline::{
    Allowed, Conn, TunnelOpening, finish_http, open_tunnel, relay_opening, tunnel_target_check,
};
use super::record::Record;
use super::sniff::{HeadReader, Opening, Protocol, ReadEnd, RequestHead, read_until};
use crate::decision::{Caller, Credentials, Permit, Target, is_auth_failure};
use crate::deny::Deny;
use crate::identity::CountGuard;
use crate::metrics::Mode;
use crate::net::write_all;

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

/// One client connection to the proxy listener.
pub async fn handle(
    gw: Arc<Gateway>,
    stream: TcpStream,
    peer: SocketAddr,
    _admission: super::Admission,
) {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let hard = gw.shutdown.hard().clone();
    let client = Arc::new(stream);
    tokio::select! {
        _ = serve(&gw, &client, peer) => {}
        _ = hard.cancelled() => {}
    }
}

fn new_conn(gw: &Arc<Gateway>, client: &Arc<TcpStream>, peer: SocketAddr) -> Conn {
    Conn {
        gw: Arc::clone(gw),
        client: Arc::clone(client),
        record: Record::new(Mode::Proxy, peer),
    }
}

async fn serve(gw: &Arc<Gateway>, client: &Arc<TcpStream>, peer: SocketAddr) {
    let policy = gw.policy();
    let mut buf = Vec::with_capacity(2048);
    let mut reader = HeadReader::new(policy.gateway.max_request_head_bytes);
    let peek = Duration::from_millis(policy.gateway.peek_timeout_ms);
    let first = tokio::time::timeout(peek, Box::pin(read_until(client, &mut buf, &mut reader)));
    let mut head = match first.await {
        Ok(Ok(ReadEnd::Found(h))) => h,
        Ok(Ok(ReadEnd::Eof)) | Ok(Err(_)) => return,
        Ok(Ok(ReadEnd::Invalid(d))) => {
            let mut conn = new_conn(gw, client, peer);
            return conn
                .refuse(Protocol::Http, d, Some(proxy_deny_response(d)))
                .await;
        }
        Err(_) => {
            let mut conn = new_conn(gw, client, peer);
            let d = Deny::PeekTimeout;
            return conn
                .refuse(Protocol::Http, d, Some(proxy_deny_response(d)))
                .await;
        }
    };
    // The container's share of connections, taken at the first allowed
    // request and held for the connection's life.
    let mut slot: Option<CountGuard> = None;
    loop {
        let mut conn = new_conn(gw, client, peer);
        match session(&mut conn, head, buf, &mut slot).await {
            Some((next, rest)) => (head, buf) = (next, rest),
            None => return,
        }
    }
}

/// The caller and target a request head names, or why it names none.
fn caller_and_target(head: &RequestHead) -> Result<(Caller, Target), Deny> {
    let creds = head
        .proxy_authorization
        .as_deref()
        .and_then(Credentials::parse)
        .ok_or(Deny::TokenInvalid)?;
    let port = match (head.connect, head.absolute_form && !head.https) {
        (true, _) => head.port.unwrap_or(443),
        (false, true) => head.port.unwrap_or(80),
        // origin-form (not a proxy request) or https:// (sluice does not
        // originate TLS): refused.
        (false, false) => return Err(Deny::BadRequest),
    };
    Ok((
        Caller::Credentials(creds),
        Target {
            host: head.host.clone(),
            port,
        },
    ))
}

/// One upstream session: a tunnel, or absolute-form requests to one
/// authority. Returns the next head when a request goes elsewhere.
async fn session(
    conn: &mut Conn,
    head: RequestHead,
    buf: Vec<u8>,
    slot: &mut Option<CountGuard>,
) -> Option<(RequestHead, Vec<u8>)> {
    let protocol = if head.connect {
        Protocol::Connect
    } else {
        Protocol::Http
    };
    conn.record.protocol = protocol;
    conn.record.host = Some(head.host.clone());
    conn.record.port = head.port.unwrap_or(0);
    let refuse = |d: Deny| (d, Some(proxy_deny_response(d)));
    let decided = caller_and_target(&head).and_then(|(caller, target)| {
        let policy = conn.gw.policy();
        let decision = conn.gw.decision(&policy);
        let permit = match slot.take() {
            None => decision.decide(&caller, &target)?,
            // The connection holds its container's slot already.
            Some(held) => match decision.authorize(&caller, &target) {
                Ok(a) => Permit {
                    revoked: conn.gw.verifier.watch(&a.grant),
                    grant: a.grant,
                    explicit_port: a.explicit_port,
                    slot: held,
                },
                Err(d) => {
                    *slot = Some(held);
                    return Err(d);
                }
            },
        };
        Ok((caller, target, permit))
    });
    let (caller, target, permit) = match decided {
        Ok(d) => d,
        Err(d) => {
            let (d, answer) = refuse(d);
            conn.refuse(protocol, d, answer).await;
            return None;
        }
    };
    conn.record.container_id = Some(std::sync::Arc::clone(&permit.grant.container));
    conn.record.set_target(protocol, &target.host, target.port);
    let upstream = match Box::pin(conn.connect(&target)).await {
        Ok(u) => u,
        Err(d) => {
            let (d, answer) = refuse(d);
            conn.refuse(protocol, d, answer).await;
            return None;
        }
    };
    conn.record.decide(Ok(()));
    if head.connect {
        tunnel(conn, caller, permit, upstream, head, buf, target).await;
        return None;
    }
    let policy = conn.gw.policy();
    let g = &policy.gateway;
    let ex = Exchange {
        client: Arc::clone(&conn.client),
        upstream: Arc::new(upstream),
        traffic: Arc::clone(&conn.record.traffic),
        max_head: g.max_request_head_bytes,
        rewrite: Rewrite::OriginForm,
        check: session_check(&conn.gw, target),
        answer: proxy_deny_response,
    };
    let idle = Duration::from_millis(g.idle_timeout_ms);
    let (end, http_end) =
        http::relay(ex, buf, idle, &permit.revoked, conn.gw.shutdown.hard()).await;
    // The slot stays with the connection for its next session.
    *slot = Some(permit.slot);
    match http_end {
        HttpEnd::Elsewhere { head, buf } => {
            conn.record.end = "closed";
            Some((head, buf))
        }
        other => {
            finish_http(conn, end, other).await;
            None
        }
    }
}

/// The check for every request on a session: one for another authority
/// (or a CONNECT) ends the session and is judged afresh by the door; one
/// for this authority is authenticated and authorised on its own.
fn session_check(gw: &Arc<Gateway>, target: Target) -> http::Check {
    let gw = Arc::clone(gw);
    Box::new(move |head: &RequestHead| {
        let same = !head.connect
            && head.absolute_form
            && !head.https
            && head.host == target.host
            && head.port.unwrap_or(80) == target.port;
        if !same {
            return Ok(Verdict::Elsewhere);
        }
        let (caller, target) = caller_and_target(head)?;
        let policy = gw.policy();
        gw.decision(&policy).authorize(&caller, &target)?;
        Ok(Verdict::Forward)
    })
}

/// `CONNECT`: answer 200, then treat the tunnel like a transparent
/// connection whose target is already known (bytes the client sent after
/// the CONNECT head go first).
async fn tunnel(
    conn: &mut Conn,
    caller: Caller,
    permit: Permit,
    upstream: TcpStream,
    head: RequestHead,
    mut buf: Vec<u8>,
    target: Target,
) {
    if write_all(&conn.client, b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        conn.record.end = "client_error";
        return;
    }
    buf.drain(..head.head_len);
    // However late a tunnel's first bytes come, they are read and judged.
    let idle = Duration::from_millis(conn.gw.policy().gateway.idle_timeout_ms);
    let opening = match open_tunnel(conn, &upstream, &mut buf, permit.explicit_port, idle).await {
        TunnelOpening::Client(o) => o,
        TunnelOpening::ServerFirst => Opening::Other,
        TunnelOpening::Gone(end) => {
            conn.record.end = end;
            return;
        }
        TunnelOpening::Refused(protocol, d) => {
            drop(upstream);
            return conn.refuse(protocol, d, tunnel_refusal(protocol, d)).await;
        }
    };
    if let Err((protocol, d)) = tunnel_target_check(&opening, &target.host, permit.explicit_port) {
        drop(upstream);
        return conn.refuse(protocol, d, tunnel_refusal(protocol, d)).await;
    }
    let allowed = Allowed {
        caller,
        target,
        permit,
        upstream,
    };
    let http = matches!(opening, Opening::Http(_));
    drop(opening);
    relay_opening(conn, allowed, http, buf, tunnel_answer).await;
}

/// Inside a tunnel the client speaks to the origin: refusals are the
/// transparent door's (403, a TLS alert, a close), never a 407.
fn tunnel_answer(d: Deny) -> Vec<u8> {
    super::deny_response(Protocol::Http, d)
        .map(|b| b.into_owned())
        .unwrap_or_default()
}

fn tunnel_refusal(protocol: Protocol, d: Deny) -> Option<Vec<u8>> {
    super::deny_response(protocol, d).map(|b| b.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

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
