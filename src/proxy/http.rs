//! HTTP/1.x through the gateway, both ways, for connections whose every
//! request is judged. Client to upstream, one request at a time: each head
//! is parsed and checked before a byte of it is forwarded, rewritten for the
//! next hop (origin-form for the proxy door; the sandbox's own
//! `Proxy-Authorization` stripped everywhere), and its body forwarded
//! exactly as its framing says, so the next head is found where it really
//! starts. Upstream to client, responses are framed too (status line,
//! `Content-Length`, chunked, or close-delimited; bodies spliced), so a
//! connection leaves HTTP only when the answer to an `Upgrade` request is
//! `101 Switching Protocols`: until then every request is parsed and
//! checked. A refused request is never forwarded: the answers to earlier
//! requests are let finish (bounded by [`REFUSAL_GRACE`]), then the refusal
//! is written. A request only the request rules refuse
//! (`request_not_allowed`), on a connection the client keeps
//! ([`RequestHead::reusable`]), is answered in turn, its body (up to
//! [`DISCARD_MAX`]) read and dropped, and the next request read; any other
//! refusal closes the connection.

use std::collections::VecDeque;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::relay::{self, Done, RelayEnd, Traffic, move_bytes, send};
use super::sniff::{
    ChunkProgress, ChunkedState, Framing, HeadReader, MAX_HEADERS, ReadEnd, RequestHead,
    read_until, strip_scheme,
};
use super::stream::{ReadHalf, Split, Stream, WriteHalf};
use crate::deny::Deny;

/// Body bytes read at a time while forwarding.
const BODY_BUF: usize = 64 * 1024;
/// How long the answers to earlier requests may take to reach the client
/// once a later request is refused (or, on the proxy door, goes elsewhere).
pub const REFUSAL_GRACE: Duration = Duration::from_secs(5);

/// The most of a refused request's body read and dropped so that its
/// connection can go on; a longer body ends the connection after the
/// refusal.
pub const DISCARD_MAX: u64 = 1024 * 1024;

/// What a request's check says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it on this connection.
    Forward,
    /// It is for another upstream (the proxy door dials it): hand the
    /// connection back once the answers so far are through.
    Elsewhere,
}

/// How a head is rewritten for the next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrite {
    /// As sent, less `Proxy-Authorization` (the sandbox's token is never
    /// forwarded).
    StripProxyAuth,
    /// Absolute-form to origin-form, hop-by-hop headers removed.
    OriginForm,
}

/// How an exchange ended, beyond the relay's own ending.
#[derive(Debug)]
pub enum HttpEnd {
    /// The connection closed, or left HTTP after a `101` and closed later.
    Closed,
    /// A request was refused; the refusal was written when `answered`.
    Refused { deny: Deny, answered: bool },
    /// The next request (its head at the start of `buf`) is for another
    /// upstream; the client connection is still open.
    Elsewhere { head: RequestHead, buf: Vec<u8> },
}

/// The judgement of each request: its parsed head, and the head's bytes
/// as sent.
pub type Check = Box<dyn Fn(&RequestHead, &[u8]) -> Result<Verdict, Deny> + Send + Sync>;

/// One client connection's HTTP exchange with one upstream.
pub struct Exchange<'a> {
    /// The client's connection: borrowed, since it may carry another
    /// exchange after this one (the proxy door's next authority).
    pub client: &'a mut Split,
    pub upstream: Stream,
    pub traffic: &'a Traffic,
    pub max_head: usize,
    pub rewrite: Rewrite,
    pub check: Check,
    /// The refusal a door writes for a deny.
    pub answer: fn(Deny) -> Vec<u8>,
}

/// What both directions read of an exchange.
struct Rules {
    max_head: usize,
    rewrite: Rewrite,
    check: Check,
    answer: fn(Deny) -> Vec<u8>,
}

/// A request forwarded, waiting for its answer.
struct Pending {
    /// Which request it is, in order.
    seq: u64,
    head_method: bool,
    /// Its head and body have all gone upstream: only then may it be
    /// answered `101` (an upstream that switches earlier is answering
    /// something else, or nothing).
    forwarded: bool,
    /// Told whether the answer switched protocols.
    upgrade: Option<oneshot::Sender<bool>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    outstanding: usize,
    responses_done: bool,
}

struct Shared<'a> {
    queue: Mutex<VecDeque<Pending>>,
    progress: watch::Sender<Progress>,
    /// The client's write half belongs to the request side from now on (a
    /// refusal or a hand-over is coming): the response side must not close it.
    held: AtomicBool,
    end: Mutex<Option<HttpEnd>>,
    /// The client's write half: the answers' mostly, a refusal's at the end.
    client_write: tokio::sync::Mutex<&'a mut WriteHalf>,
    traffic: &'a Traffic,
    rules: Rules,
}

impl Shared<'_> {
    fn set_end(&self, end: HttpEnd) {
        *self.end.lock().unwrap_or_else(|p| p.into_inner()) = Some(end);
    }
}

/// Runs the exchange until it ends; `buf` holds the bytes already read
/// from the client (beginning at a request head).
pub async fn relay(
    ex: Exchange<'_>,
    buf: Vec<u8>,
    idle: Duration,
    revoked: &CancellationToken,
) -> (RelayEnd, HttpEnd) {
    let Exchange {
        client,
        upstream,
        traffic,
        max_head,
        rewrite,
        check,
        answer,
    } = ex;
    let Split {
        read: client_read,
        write: client_write,
    } = client;
    let Split {
        read: mut upstream_read,
        write: mut upstream_write,
    } = upstream.split();
    let shared = Shared {
        queue: Mutex::new(VecDeque::new()),
        progress: watch::Sender::new(Progress::default()),
        held: AtomicBool::new(false),
        end: Mutex::new(None),
        client_write: tokio::sync::Mutex::new(client_write),
        traffic,
        rules: Rules {
            max_head,
            rewrite,
            check,
            answer,
        },
    };
    let requests = Box::pin(requests(client_read, &mut upstream_write, &shared, buf));
    let responses = async {
        let r = Box::pin(responses(&mut upstream_read, &shared)).await;
        shared.progress.send_modify(|p| p.responses_done = true);
        r
    };
    let end = relay::run_pair(requests, responses, traffic, idle, revoked).await;
    let http = shared
        .end
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or(HttpEnd::Closed);
    (end, http)
}

/// Client → upstream: request by request.
async fn requests(
    client: &mut ReadHalf,
    upstream: &mut WriteHalf,
    shared: &Shared<'_>,
    mut buf: Vec<u8>,
) -> io::Result<Done> {
    let traffic = shared.traffic;
    let counter = &traffic.to_upstream;
    let rules = &shared.rules;
    let mut seq: u64 = 0;
    loop {
        seq += 1;
        let mut reader = HeadReader::new(rules.max_head);
        let head = match read_until(client, &mut buf, &mut reader).await? {
            ReadEnd::Found(head) => head,
            // EOF between requests is the normal end.
            ReadEnd::Eof => {
                upstream.shutdown().await;
                return Ok(Done::Half);
            }
            ReadEnd::Invalid(d) => return refuse(upstream, shared, d).await,
        };
        traffic.touch();
        match (rules.check)(&head, &buf[..head.head_len]) {
            Err(Deny::RequestNotAllowed) if head.reusable && discardable(head.framing) => {
                let d = Deny::RequestNotAllowed;
                if !answer_in_turn(shared, d).await {
                    shared.held.store(true, Ordering::Release);
                    upstream.shutdown().await;
                    shared.set_end(HttpEnd::Refused {
                        deny: d,
                        answered: false,
                    });
                    return Ok(Done::Whole);
                }
                buf.drain(..head.head_len);
                if discard_body(client, &mut buf, head.framing, traffic).await? {
                    continue;
                }
                // A body too long to drop, or malformed: the refusal is
                // written, the connection ends.
                shared.held.store(true, Ordering::Release);
                upstream.shutdown().await;
                shared.set_end(HttpEnd::Refused {
                    deny: d,
                    answered: true,
                });
                return Ok(Done::Whole);
            }
            Err(d) => return refuse(upstream, shared, d).await,
            Ok(Verdict::Elsewhere) => {
                let answered = hold_client(upstream, shared).await;
                if answered {
                    shared.set_end(HttpEnd::Elsewhere { head, buf });
                }
                return Ok(Done::Whole);
            }
            Ok(Verdict::Forward) => {}
        }
        let rewritten = match rules.rewrite {
            Rewrite::StripProxyAuth if head.proxy_authorization.is_some() => {
                strip_proxy_authorization(&buf[..head.head_len])
            }
            Rewrite::StripProxyAuth => Ok(buf[..head.head_len].to_vec()),
            Rewrite::OriginForm => origin_form_head(&buf[..head.head_len]),
        };
        let rewritten = match rewritten {
            Ok(r) => r,
            Err(d) => return refuse(upstream, shared, d).await,
        };
        let (tx, rx) = if head.upgrade {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        // Queued before a byte goes up, so its answer always finds it.
        shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(Pending {
                seq,
                head_method: head.method == "HEAD",
                forwarded: false,
                upgrade: tx,
            });
        shared.progress.send_modify(|p| p.outstanding += 1);
        send(upstream, &rewritten, counter, traffic).await?;
        buf.drain(..head.head_len);

        let body_done = match head.framing {
            Framing::None => true,
            Framing::Length(n) => {
                forward_length(client, upstream, &mut buf, n, counter, traffic).await?
            }
            Framing::Chunked => {
                match forward_chunked(client, upstream, &mut buf, counter, traffic).await? {
                    Some(done) => done,
                    None => return refuse(upstream, shared, Deny::BadRequest).await,
                }
            }
        };
        if !body_done {
            upstream.shutdown().await;
            return Ok(Done::Half);
        }
        // Answered early (an error before the body) it is gone already.
        if let Some(p) = shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .back_mut()
            .filter(|p| p.seq == seq)
        {
            p.forwarded = true;
        }
        if let Some(rx) = rx {
            // Nothing more is read from the client until the answer says
            // whether the connection still speaks HTTP.
            if rx.await.unwrap_or(false) {
                send(upstream, &buf, counter, traffic).await?;
                drop(buf);
                return relay::pipe(client, upstream, counter, traffic).await;
            }
        }
    }
}

/// Stops sending upstream and waits (bounded) until the answers to the
/// requests already forwarded have reached the client. `true` if they all
/// did, so the client connection may carry something more.
async fn hold_client(upstream: &mut WriteHalf, shared: &Shared<'_>) -> bool {
    shared.held.store(true, Ordering::Release);
    upstream.shutdown().await;
    let mut rx = shared.progress.subscribe();
    let waited = tokio::time::timeout(
        REFUSAL_GRACE,
        rx.wait_for(|p| p.outstanding == 0 || p.responses_done),
    )
    .await;
    matches!(waited, Ok(Ok(p)) if p.outstanding == 0)
}

/// Could a refused request's body be dropped to go on? A declared
/// length within [`DISCARD_MAX`]; a chunked body is counted as it comes.
fn discardable(framing: Framing) -> bool {
    match framing {
        Framing::Length(n) => n <= DISCARD_MAX,
        Framing::None | Framing::Chunked => true,
    }
}

/// Writes a refusal that keeps the connection once the answers to the
/// requests before it are through (bounded by [`REFUSAL_GRACE`]); the
/// upstream connection stays open for the requests after it. `false`
/// when the earlier answers did not finish in time (nothing written).
async fn answer_in_turn(shared: &Shared<'_>, deny: Deny) -> bool {
    let mut rx = shared.progress.subscribe();
    let waited = tokio::time::timeout(REFUSAL_GRACE, async {
        rx.wait_for(|p| p.outstanding == 0 || p.responses_done)
            .await
            .map(|p| p.outstanding == 0)
    })
    .await;
    if !matches!(waited, Ok(Ok(true))) {
        return false;
    }
    let bytes = super::refusal_keeping_connection(deny);
    let t = shared.traffic;
    let sent = tokio::time::timeout(Duration::from_secs(1), async {
        let mut client = shared.client_write.lock().await;
        send(&mut client, &bytes, &t.to_client, t).await
    })
    .await;
    matches!(sent, Ok(Ok(())))
}

/// Reads and drops a refused request's body (those of its bytes already
/// in `buf` first), leaving in `buf` what follows it. `false` when the
/// client closed first, the chunking is malformed, or it runs over
/// [`DISCARD_MAX`].
async fn discard_body(
    client: &mut ReadHalf,
    buf: &mut Vec<u8>,
    framing: Framing,
    traffic: &Traffic,
) -> io::Result<bool> {
    match framing {
        Framing::None => Ok(true),
        Framing::Length(n) => {
            let mut left = n;
            loop {
                let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                buf.drain(..take);
                left -= take as u64;
                if left == 0 {
                    return Ok(true);
                }
                if client.read_some(buf, BODY_BUF).await? == 0 {
                    return Ok(false);
                }
                traffic.touch();
            }
        }
        Framing::Chunked => {
            let mut state = ChunkedState::default();
            let mut dropped: u64 = 0;
            loop {
                match state.feed(buf) {
                    ChunkProgress::Done(n) => {
                        buf.drain(..n);
                        return Ok(true);
                    }
                    ChunkProgress::Consumed => {
                        dropped += buf.len() as u64;
                        buf.clear();
                    }
                    ChunkProgress::Invalid => return Ok(false),
                }
                if dropped > DISCARD_MAX || client.read_some(buf, BODY_BUF).await? == 0 {
                    return Ok(false);
                }
                traffic.touch();
            }
        }
    }
}

/// Refuses a request: never forwarded; the earlier answers let finish,
/// then the refusal, unless an answer was cut short (the client then gets
/// a close, not a refusal inside a body).
async fn refuse(upstream: &mut WriteHalf, shared: &Shared<'_>, deny: Deny) -> io::Result<Done> {
    let answered = hold_client(upstream, shared).await;
    if answered {
        let bytes = (shared.rules.answer)(deny);
        let t = shared.traffic;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let mut client = shared.client_write.lock().await;
            send(&mut client, &bytes, &t.to_client, t).await
        })
        .await;
    }
    shared.set_end(HttpEnd::Refused { deny, answered });
    Ok(Done::Whole)
}

/// Upstream → client: response by response. The client's write half is
/// held while an answer goes through, and let go between answers.
async fn responses(upstream: &mut ReadHalf, shared: &Shared<'_>) -> io::Result<Done> {
    let traffic = shared.traffic;
    let counter = &traffic.to_client;
    let max_head = shared.rules.max_head;
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    loop {
        let head = match read_response_head(upstream, &mut buf, max_head).await? {
            Some(head) => head,
            None => {
                // The upstream closed between answers.
                if !shared.held.load(Ordering::Acquire) {
                    shared.client_write.lock().await.shutdown().await;
                }
                return Ok(Done::Half);
            }
        };
        // Each answer is paired with the request it answers, checked
        // before a byte of it reaches the client: none with no request
        // outstanding, and a switch only to an upgrade request that went
        // up whole.
        let front = {
            let q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.front()
                .map(|p| (p.head_method, p.upgrade.is_some(), p.forwarded))
        };
        let Some((head_method, upgrade, forwarded)) = front else {
            return Err(io::Error::other("an answer to no request"));
        };
        if head.status == 101 && !(upgrade && forwarded) {
            return Err(io::Error::other(
                "101 to a request that asked no upgrade, or before it was forwarded",
            ));
        }
        let mut client = shared.client_write.lock().await;
        send(&mut client, &buf[..head.len], counter, traffic).await?;
        buf.drain(..head.len);
        if head.status == 101 {
            if let Some(tx) = pop(shared).and_then(|p| p.upgrade) {
                let _ = tx.send(true);
            }
            send(&mut client, &buf, counter, traffic).await?;
            drop(buf);
            return relay::pipe(upstream, &mut client, counter, traffic).await;
        }
        if (100..200).contains(&head.status) {
            // Informational: the final answer follows.
            continue;
        }
        let framing = if head_method || head.status == 204 || head.status == 304 {
            ResponseBody::None
        } else {
            head.body
        };
        let complete = match framing {
            ResponseBody::None => true,
            ResponseBody::Length(n) => {
                forward_length(upstream, &mut client, &mut buf, n, counter, traffic).await?
            }
            ResponseBody::Chunked => {
                forward_chunked(upstream, &mut client, &mut buf, counter, traffic)
                    .await?
                    .ok_or_else(|| io::Error::other("malformed chunked response"))?
            }
            ResponseBody::UntilClose => {
                send(&mut client, &buf, counter, traffic).await?;
                buf.clear();
                move_bytes(upstream, &mut client, None, counter, traffic).await?;
                false
            }
        };
        drop(client);
        if let Some(tx) = pop(shared).and_then(|p| p.upgrade) {
            let _ = tx.send(false);
        }
        if !complete {
            // The answer ended with the upstream's side of the connection.
            if !shared.held.load(Ordering::Acquire) {
                shared.client_write.lock().await.shutdown().await;
            }
            return Ok(Done::Half);
        }
    }
}

fn pop(shared: &Shared<'_>) -> Option<Pending> {
    let p = shared
        .queue
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop_front();
    shared
        .progress
        .send_modify(|p| p.outstanding = p.outstanding.saturating_sub(1));
    p
}

/// How a response's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseBody {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ResponseHead {
    status: u16,
    body: ResponseBody,
    len: usize,
}

/// Parses a response head, for the fuzz invariants: never panics, never
/// claims bytes it was not given.
pub fn response_head(buf: &[u8]) {
    if let Ok(Some(head)) = parse_response_head(buf) {
        assert!(head.len <= buf.len());
    }
}

/// A response head, parsed (pure).
fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>, io::Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(io::Error::other(format!("bad response head: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let mut length: Option<u64> = None;
    let mut chunked = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| io::Error::other("bad content-length in response"))?;
            if length.is_some_and(|l| l != n) {
                return Err(io::Error::other("conflicting content-length in response"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or(b"");
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    let body = match (chunked, length) {
        (Some(true), _) => ResponseBody::Chunked,
        (Some(false), _) => ResponseBody::UntilClose,
        (None, Some(n)) => ResponseBody::Length(n),
        (None, None) => ResponseBody::UntilClose,
    };
    Ok(Some(ResponseHead { status, body, len }))
}

/// Reads the upstream until `buf` starts with a whole response head.
/// `None` at EOF before the first byte of one.
async fn read_response_head(
    upstream: &mut ReadHalf,
    buf: &mut Vec<u8>,
    max_head: usize,
) -> io::Result<Option<ResponseHead>> {
    let mut scanned = 0usize;
    loop {
        if !buf.is_empty() {
            let from = scanned.saturating_sub(3);
            let end_seen = buf[from..].windows(2).any(|w| w == b"\n\n")
                || buf[from..].windows(3).any(|w| w == b"\n\r\n");
            scanned = buf.len();
            if end_seen && let Some(head) = parse_response_head(buf)? {
                return Ok(Some(head));
            }
        }
        if buf.len() >= max_head {
            return Err(io::Error::other("response head over the cap"));
        }
        if upstream.read_some(buf, max_head).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Forwards exactly `len` body bytes, those already in `buf` first, the
/// rest spliced. `false` if the source closed first.
async fn forward_length(
    src: &mut ReadHalf,
    dst: &mut WriteHalf,
    buf: &mut Vec<u8>,
    len: u64,
    counter: &AtomicU64,
    traffic: &Traffic,
) -> io::Result<bool> {
    let take = buf.len().min(usize::try_from(len).unwrap_or(usize::MAX));
    send(dst, &buf[..take], counter, traffic).await?;
    buf.drain(..take);
    let left = len - take as u64;
    if left == 0 {
        return Ok(true);
    }
    let moved = move_bytes(src, dst, Some(left), counter, traffic).await?;
    Ok(moved == left)
}

/// Forwards a chunked body up to its end. `Some(false)` if the source
/// closed first, `None` if the chunking is malformed.
async fn forward_chunked(
    src: &mut ReadHalf,
    dst: &mut WriteHalf,
    buf: &mut Vec<u8>,
    counter: &AtomicU64,
    traffic: &Traffic,
) -> io::Result<Option<bool>> {
    let mut state = ChunkedState::default();
    loop {
        match state.feed(buf) {
            ChunkProgress::Done(n) => {
                send(dst, &buf[..n], counter, traffic).await?;
                buf.drain(..n);
                return Ok(Some(true));
            }
            ChunkProgress::Consumed => {
                send(dst, buf, counter, traffic).await?;
                buf.clear();
            }
            ChunkProgress::Invalid => return Ok(None),
        }
        if src.read_some(buf, BODY_BUF).await? == 0 {
            return Ok(Some(false));
        }
    }
}

/// The head without its `Proxy-Authorization` lines (the transparent door
/// and tunnels: the sandbox's token never goes upstream).
pub fn strip_proxy_authorization(head: &[u8]) -> Result<Vec<u8>, Deny> {
    let mut out = Vec::with_capacity(head.len());
    let mut first = true;
    for line in head.split_inclusive(|b| *b == b'\n') {
        let name_end = line.iter().position(|b| *b == b':');
        let is_auth = !first
            && name_end.is_some_and(|i| line[..i].eq_ignore_ascii_case(b"proxy-authorization"));
        first = false;
        if !is_auth {
            out.extend_from_slice(line);
        }
    }
    Ok(out)
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), and
/// the proxy's own.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

/// Rewrites an absolute-form request head (`GET http://h/p HTTP/1.1`) for
/// the origin: origin-form request line, hop-by-hop headers and those the
/// `Connection` header lists removed, `Host` kept (or added from the URI).
/// An upgrade request keeps its `Upgrade` and `Connection: upgrade`.
pub fn origin_form_head(head: &[u8]) -> Result<Vec<u8>, Deny> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(Deny::BadRequest),
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(Deny::BadRequest);
    };
    let Some((_, rest)) = strip_scheme(target) else {
        return Err(Deny::BadRequest);
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let path = match path {
        "" => "/".to_owned(),
        p if p.starts_with('/') => p.split('#').next().unwrap_or("/").to_owned(),
        p => format!("/{}", p.split('#').next().unwrap_or("")),
    };
    let mut listed: Vec<String> = Vec::new();
    let mut upgrade = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            for token in String::from_utf8_lossy(h.value).split(',') {
                let token = token.trim().to_ascii_lowercase();
                upgrade |= token == "upgrade";
                listed.push(token);
            }
        }
    }
    let version = if req.version == Some(0) { "1.0" } else { "1.1" };
    let mut out = Vec::with_capacity(head.len());
    out.extend_from_slice(format!("{method} {path} HTTP/{version}\r\n").as_bytes());
    let mut has_host = false;
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        let keep_for_upgrade = upgrade && name == "upgrade";
        if !keep_for_upgrade && (HOP_BY_HOP.contains(&name.as_str()) || listed.contains(&name)) {
            continue;
        }
        has_host |= name == "host";
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if !has_host {
        out.extend_from_slice(format!("Host: {authority}\r\n").as_bytes());
    }
    if upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_form_rewrite_drops_hop_by_hop_headers() {
        let head = b"GET http://a.test:8080/p/q?x=1#frag HTTP/1.1\r\nHost: a.test:8080\r\nProxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nAccept: */*\r\n\r\n";
        let out = String::from_utf8(origin_form_head(head).unwrap()).unwrap();
        assert_eq!(
            out,
            "GET /p/q?x=1 HTTP/1.1\r\nHost: a.test:8080\r\nAccept: */*\r\n\r\n"
        );
        let out =
            String::from_utf8(origin_form_head(b"GET http://a.test HTTP/1.0\r\n\r\n").unwrap())
                .unwrap();
        assert_eq!(out, "GET / HTTP/1.0\r\nHost: a.test\r\n\r\n");
        let ws = b"GET http://a.test/chat HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let out = String::from_utf8(origin_form_head(ws).unwrap()).unwrap();
        assert_eq!(
            out,
            "GET /chat HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
        );
        assert!(origin_form_head(b"GET /relative HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
    }

    #[test]
    fn proxy_authorization_is_stripped_and_nothing_else() {
        let head = b"GET / HTTP/1.1\r\nHost: a.test\r\nproxy-authorization: Bearer x\r\nX-Proxy-Authorization-Note: kept\r\n\r\n";
        let out = String::from_utf8(strip_proxy_authorization(head).unwrap()).unwrap();
        assert_eq!(
            out,
            "GET / HTTP/1.1\r\nHost: a.test\r\nX-Proxy-Authorization-Note: kept\r\n\r\n"
        );
    }

    #[test]
    fn response_framing() {
        let cases: &[(&[u8], u16, ResponseBody)] = &[
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                200,
                ResponseBody::Length(5),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                200,
                ResponseBody::Chunked,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                200,
                ResponseBody::UntilClose,
            ),
            (b"HTTP/1.0 200 OK\r\n\r\n", 200, ResponseBody::UntilClose),
            (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
                101,
                ResponseBody::UntilClose,
            ),
        ];
        for (bytes, status, body) in cases {
            let head = parse_response_head(bytes).unwrap().unwrap();
            assert_eq!(
                (head.status, head.body, head.len),
                (*status, *body, bytes.len())
            );
        }
        assert!(
            parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n")
                .unwrap()
                .is_none()
        );
        assert!(
            parse_response_head(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
            )
            .is_err()
        );
        assert!(parse_response_head(b"NOT HTTP\r\n\r\n").is_err());
    }
}
