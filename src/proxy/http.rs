//! HTTP/1.x, client to upstream, one request at a time: every request head
//! on a connection is parsed and checked before a byte of it is forwarded,
//! and its body is forwarded exactly as its framing says (Content-Length or
//! chunked), so the next head is found where it really starts. A request
//! that fails its check ends the connection with a deny; it is never
//! forwarded. After an `Upgrade` request the rest is relayed raw.
//! Responses (upstream to client) are not parsed: they go through the
//! spliced relay.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpStream;

use super::relay::{Flow, Traffic, one_way};
use super::sniff::{
    ChunkProgress, ChunkedState, Framing, MAX_SNIFF_READS, Parsed, RequestHead, parse_request_head,
};
use crate::deny::Deny;
use crate::net::{read_some, shutdown_write, write_all};

/// Body bytes read at a time while forwarding.
const BODY_BUF: usize = 64 * 1024;

/// Forwards requests from `client` to `upstream`, starting with the bytes
/// already read into `buf` (which begin at a request head). `check` judges
/// each head.
pub async fn forward_requests<F>(
    client: &TcpStream,
    upstream: &TcpStream,
    mut buf: Vec<u8>,
    max_head: usize,
    check: F,
    traffic: &Traffic,
) -> io::Result<Flow>
where
    F: Fn(&RequestHead) -> Result<(), Deny>,
{
    let counter = &traffic.to_upstream;
    loop {
        let mut reads = 0;
        let head = loop {
            if !buf.is_empty() {
                match parse_request_head(&buf, max_head) {
                    Parsed::Found(head) => break head,
                    Parsed::Invalid(deny) => return Ok(refuse_later(upstream, traffic, deny)),
                    Parsed::NeedMore => {}
                }
            }
            if reads >= MAX_SNIFF_READS {
                return Ok(refuse_later(upstream, traffic, Deny::BadRequest));
            }
            reads += 1;
            let n = read_some(client, &mut buf, max_head).await?;
            if n == 0 {
                // EOF between requests is the normal end; inside a head it
                // is a truncated request, which is dropped, not forwarded.
                shutdown_write(upstream);
                return Ok(Flow::Eof);
            }
            traffic.touch();
        };
        if let Err(deny) = check(&head) {
            return Ok(refuse_later(upstream, traffic, deny));
        }
        send(upstream, &buf[..head.head_len], counter, traffic).await?;
        buf.drain(..head.head_len);

        let body_done = match head.framing {
            Framing::None => true,
            Framing::Length(n) => {
                forward_length(client, upstream, &mut buf, n, counter, traffic).await?
            }
            Framing::Chunked => {
                match forward_chunked(client, upstream, &mut buf, counter, traffic).await? {
                    Some(done) => done,
                    None => return Ok(refuse_later(upstream, traffic, Deny::BadRequest)),
                }
            }
        };
        if !body_done {
            shutdown_write(upstream);
            return Ok(Flow::Eof);
        }
        if head.upgrade {
            // From here on the connection speaks another protocol.
            send(upstream, &buf, counter, traffic).await?;
            return one_way(client, upstream, counter, traffic).await;
        }
    }
}

/// A request on an open connection is refused: nothing more goes
/// upstream, whose answers to earlier requests may still come back, and
/// the client's side stays open for the refusal.
fn refuse_later(upstream: &TcpStream, traffic: &Traffic, deny: Deny) -> Flow {
    traffic.hold_for_refusal();
    shutdown_write(upstream);
    Flow::Denied(deny)
}

pub(super) async fn send(
    upstream: &TcpStream,
    bytes: &[u8],
    counter: &AtomicU64,
    traffic: &Traffic,
) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    write_all(upstream, bytes).await?;
    counter.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    traffic.touch();
    Ok(())
}

/// Forwards exactly `len` body bytes. `false` if the client closed first.
pub(super) async fn forward_length(
    client: &TcpStream,
    upstream: &TcpStream,
    buf: &mut Vec<u8>,
    mut len: u64,
    counter: &AtomicU64,
    traffic: &Traffic,
) -> io::Result<bool> {
    loop {
        let take = buf.len().min(usize::try_from(len).unwrap_or(usize::MAX));
        send(upstream, &buf[..take], counter, traffic).await?;
        buf.drain(..take);
        len -= take as u64;
        if len == 0 {
            return Ok(true);
        }
        if read_some(client, buf, BODY_BUF).await? == 0 {
            return Ok(false);
        }
    }
}

/// Forwards a chunked body up to its end. `Some(false)` if the client
/// closed first, `None` if the chunking is malformed.
pub(super) async fn forward_chunked(
    client: &TcpStream,
    upstream: &TcpStream,
    buf: &mut Vec<u8>,
    counter: &AtomicU64,
    traffic: &Traffic,
) -> io::Result<Option<bool>> {
    let mut state = ChunkedState::default();
    loop {
        match state.feed(buf) {
            ChunkProgress::Done(n) => {
                send(upstream, &buf[..n], counter, traffic).await?;
                buf.drain(..n);
                return Ok(Some(true));
            }
            ChunkProgress::Consumed => {
                send(upstream, buf, counter, traffic).await?;
                buf.clear();
            }
            ChunkProgress::Invalid => return Ok(None),
        }
        if read_some(client, buf, BODY_BUF).await? == 0 {
            return Ok(Some(false));
        }
    }
}
