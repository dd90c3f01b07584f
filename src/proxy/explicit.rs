//! The explicit proxy front door, for sandboxes that use `HTTP_PROXY` /
//! `HTTPS_PROXY`: `CONNECT host:port` tunnels and absolute-form HTTP/1.1
//! requests. Identity is the token in `Proxy-Authorization` (Basic
//! `container_<ID>:jwt_<TOKEN>` or Bearer), verified through the same
//! claims cache as the transparent path; no registration is needed. Over
//! plain TCP, or over TLS (`HTTPS_PROXY=https://…`, so the token never
//! crosses the network in clear): the door reads its stream either way.
//!
//! A thin negotiation over the [`pipeline`](super::pipeline): each request
//! head gives a caller (its credentials) and a target, handed to one
//! [`drive`] call. Absolute-form requests go in origin-form to an upstream kept
//! while requests name the same authority and replaced, between requests,
//! when they name another allowed one; each upstream session has its own
//! record. A tunnel's first bytes are classified and checked like a
//! transparent connection's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::http::{self, Verdict};
use super::pipeline::{Conn, Ending, Opened, drive};
use super::record::Record;
use super::sniff::{HeadReader, Protocol, ReadEnd, RequestHead, read_until};
use super::stream::Stream;
use super::{Admission, Gateway, proxy_deny_response};
use crate::decision::{Caller, Credentials, Target};
use crate::deny::Deny;
use crate::metrics::Mode;
use crate::tls::Reloadable;

/// One client connection to the proxy listener.
pub async fn handle(gw: Arc<Gateway>, stream: TcpStream, peer: SocketAddr, _admission: Admission) {
    serve(gw, Stream::Tcp(stream), peer).await;
}

/// One client connection to the proxy listener when it speaks TLS
/// (`HTTPS_PROXY=https://…`): the handshake, bounded by the peek timeout,
/// then the same door over the TLS stream.
pub async fn handle_tls(
    gw: Arc<Gateway>,
    stream: TcpStream,
    peer: SocketAddr,
    _admission: Admission,
    tls: Arc<Reloadable>,
) {
    let peek = Duration::from_millis(gw.policy().gateway.peek_timeout_ms);
    match tls.accept(stream, peek).await {
        Ok(client) => serve(gw, Stream::other(client), peer).await,
        Err(e) => tracing::debug!(%peer, error = %e, "proxy TLS handshake failed"),
    }
}

async fn serve(gw: Arc<Gateway>, client: Stream, peer: SocketAddr) {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let policy = gw.policy();
    let mut buf = Vec::with_capacity(2048);
    let mut reader = HeadReader::new(policy.gateway.max_request_head_bytes);
    let peek = Duration::from_millis(policy.gateway.peek_timeout_ms);
    drop(policy);
    let mut conn = Conn::new(gw, client, Mode::Proxy, peer);
    let first = read_until(&mut conn.client.read, &mut buf, &mut reader);
    let mut head = match tokio::time::timeout(peek, Box::pin(first)).await {
        Ok(Ok(ReadEnd::Found(h))) => h,
        Ok(Ok(ReadEnd::Eof)) | Ok(Err(_)) => return,
        Ok(Ok(ReadEnd::Invalid(d))) => {
            return conn
                .refuse(Protocol::Http, d, Some(proxy_deny_response(d)))
                .await;
        }
        Err(_) => {
            let d = Deny::PeekTimeout;
            return conn
                .refuse(Protocol::Http, d, Some(proxy_deny_response(d)))
                .await;
        }
    };
    // Each upstream session has its own record; the connection (and the
    // container's slot it holds) carries on while requests go elsewhere.
    loop {
        match session(&mut conn, head, buf).await {
            Ending::Elsewhere {
                head: next,
                buf: rest,
            } => (head, buf) = (next, rest),
            Ending::Closed => return,
        }
        conn.record = Record::new(Mode::Proxy, peer, Arc::clone(&conn.gw.events));
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
/// authority, handed to the pipeline.
async fn session(conn: &mut Conn, head: RequestHead, buf: Vec<u8>) -> Ending {
    let protocol = if head.connect {
        Protocol::Connect
    } else {
        Protocol::Http
    };
    conn.record.protocol = protocol;
    conn.record.host = Some(head.host.clone());
    conn.record.port = head.port.unwrap_or(0);
    let (caller, target) = match caller_and_target(&head) {
        Ok(ct) => ct,
        Err(d) => {
            conn.refuse(protocol, d, Some(proxy_deny_response(d))).await;
            return Ending::Closed;
        }
    };
    let opened = if head.connect {
        Opened::Tunnel {
            head_len: head.head_len,
        }
    } else {
        Opened::Requests {
            check: session_check(
                &conn.gw,
                target.clone(),
                super::pipeline::Judged {
                    door: Mode::Proxy,
                    source: conn.record.source,
                },
            ),
        }
    };
    drop(head);
    drive(conn, caller, target, opened, buf).await
}

/// The check for every request on a session: one for another authority
/// (or a CONNECT) ends the session and is judged afresh by the door; one
/// for this authority is authenticated and authorised on its own.
fn session_check(gw: &Arc<Gateway>, target: Target, at: super::pipeline::Judged) -> http::Check {
    let gw = Arc::clone(gw);
    Box::new(move |head: &RequestHead, bytes: &[u8]| {
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
        let allowed = gw.decision(&policy).authorize(&caller, &target)?;
        // A credential's host in cleartext, or a placeholder anywhere in
        // the request: refused.
        if let (crate::host::Host::Name(name), Some((sealed, _))) =
            (&target.host, gw.sealed(&allowed.grant))
            && sealed.covers(name)
        {
            return Err(Deny::CredentialMisuse);
        }
        super::pipeline::misuse_check(&gw, &allowed.grant, bytes)?;
        super::pipeline::judge_request(
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
