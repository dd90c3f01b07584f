//! Pure parsers over the first bytes a client sends: which protocol it
//! speaks, the SNI of a TLS ClientHello, and an HTTP/1.x request head with
//! its body framing; and [`read_until`], the one loop that reads a stream
//! into a bounded buffer until one of them has an answer. The parsers do no
//! I/O. They are driven incrementally ([`HelloReader`], [`HeadReader`]):
//! the TLS record and handshake headers say how many bytes to wait for, and
//! a head is parsed again only once its end may have arrived (or the buffer
//! has doubled), so the cost is linear in the bytes received however they
//! are segmented, bounded by the size caps and the caller's deadline. Every
//! byte read is kept in the buffer, to be replayed upstream.
//!
//! Anything ambiguous or unparseable is an [`Parsed::Invalid`] with a deny
//! reason, never a guess that lets bytes through.

use std::io;
use std::net::IpAddr;

use crate::deny::Deny;
use crate::host::{Host, HostName, split_authority};

/// The three ways a parse ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    Found(T),
    /// The bytes so far are a valid prefix; read more and call again.
    NeedMore,
    Invalid(Deny),
}

/// What the first bytes of a connection look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tls,
    Http,
    /// An explicit proxy's `CONNECT` tunnel.
    Connect,
    Other,
}

impl Protocol {
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tls => "tls",
            Protocol::Http => "http",
            Protocol::Connect => "connect",
            Protocol::Other => "other",
        }
    }
}

/// HTTP/2 with prior knowledge: refused, sluice speaks HTTP/1.x only.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Classifies a connection from its first bytes (at least one).
pub fn classify(buf: &[u8]) -> Protocol {
    match buf.first() {
        Some(0x16) => Protocol::Tls,
        Some(b) if b.is_ascii_uppercase() => {
            // A method token (uppercase letters, at most 16) then a space.
            let token_len = buf
                .iter()
                .take(17)
                .take_while(|b| b.is_ascii_uppercase() || **b == b'-' || **b == b'_')
                .count();
            let is_h2 = H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]);
            if is_h2 {
                Protocol::Other
            } else if token_len < buf.len() {
                if buf[token_len] == b' ' && token_len <= 16 {
                    Protocol::Http
                } else {
                    Protocol::Other
                }
            } else if token_len <= 16 {
                // Only a method-like prefix so far: treat as HTTP; the head
                // parser will ask for more or refuse it.
                Protocol::Http
            } else {
                Protocol::Other
            }
        }
        _ => Protocol::Other,
    }
}

// ---------------------------------------------------------------- TLS --

const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
/// RFC 8446 §5.1: a plaintext record carries at most 2^14 bytes.
const MAX_RECORD: usize = 1 << 14;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;

/// What sluice needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    pub sni: HostName,
    /// The hello offers Encrypted ClientHello: `sni` is the outer, public
    /// name, which is where the bytes go.
    pub ech: bool,
}

/// Finds the SNI of a TLS ClientHello that may span several records and
/// arrive in several reads. `max_hello` caps the handshake message: a larger
/// one is `no_host`, never a blind relay. Allocates only when the message
/// spans records.
pub fn parse_client_hello(buf: &[u8], max_hello: usize) -> Parsed<ClientHello> {
    let mut assembled: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        let Some(header) = buf.get(pos..pos + RECORD_HEADER) else {
            return Parsed::NeedMore;
        };
        if header[0] != CONTENT_HANDSHAKE || header[1] != 3 {
            return Parsed::Invalid(Deny::UnsupportedProtocol);
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Parsed::Invalid(Deny::UnsupportedProtocol);
        }
        let start = pos + RECORD_HEADER;
        let fragment = &buf[start..buf.len().min(start + len)];
        let fragment_complete = fragment.len() == len;
        let so_far: &[u8] = if pos == 0 {
            fragment
        } else {
            assembled.extend_from_slice(fragment);
            &assembled
        };
        // The handshake header is checked as soon as it is here, so a wrong
        // type or an over-cap length is refused without waiting for more.
        if let Some(&msg_type) = so_far.first()
            && msg_type != HANDSHAKE_CLIENT_HELLO
        {
            return Parsed::Invalid(Deny::UnsupportedProtocol);
        }
        if let [_, a, b, c, ..] = *so_far {
            let hello_len = u32::from_be_bytes([0, a, b, c]) as usize;
            if hello_len > max_hello {
                return Parsed::Invalid(Deny::NoHost);
            }
            if let Some(msg) = so_far.get(..4 + hello_len) {
                return match sni_of_hello(msg) {
                    Ok(hello) => Parsed::Found(hello),
                    Err(deny) => Parsed::Invalid(deny),
                };
            }
        }
        if !fragment_complete {
            return Parsed::NeedMore;
        }
        if pos == 0 {
            assembled.extend_from_slice(fragment);
        }
        pos = start + len;
    }
}

/// The SNI inside one complete ClientHello handshake message.
fn sni_of_hello(msg: &[u8]) -> Result<ClientHello, Deny> {
    use tls_parser::{TlsMessage, TlsMessageHandshake, parse_tls_message_handshake};

    let hello = match parse_tls_message_handshake(msg) {
        Ok((&[], TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) => hello,
        _ => return Err(Deny::UnsupportedProtocol),
    };
    let Some(mut exts) = hello.ext else {
        return Err(Deny::NoHost);
    };
    let mut sni = None;
    let mut seen: Vec<u16> = Vec::with_capacity(24);
    while !exts.is_empty() {
        if exts.len() < 4 {
            return Err(Deny::UnsupportedProtocol);
        }
        let ext_type = u16::from_be_bytes([exts[0], exts[1]]);
        let len = usize::from(u16::from_be_bytes([exts[2], exts[3]]));
        let Some(data) = exts.get(4..4 + len) else {
            return Err(Deny::UnsupportedProtocol);
        };
        exts = &exts[4 + len..];
        // GREASE values (RFC 8701) are ignored, but a repeated extension of
        // any other type is a protocol error (RFC 8446 §4.2).
        if ext_type & 0x0f0f == 0x0a0a {
            continue;
        }
        if seen.contains(&ext_type) {
            return Err(Deny::NoHost);
        }
        seen.push(ext_type);
        if ext_type == EXT_SERVER_NAME {
            sni = Some(server_name(data)?);
        }
    }
    let sni = sni.ok_or(Deny::NoHost)?;
    Ok(ClientHello {
        sni,
        ech: seen.contains(&EXT_ENCRYPTED_CLIENT_HELLO),
    })
}

/// The one host name of a `server_name` extension. Several names, an empty
/// or NUL-carrying name, an IP literal or trailing bytes are refused.
fn server_name(data: &[u8]) -> Result<HostName, Deny> {
    let Some((list_len, list)) = data.split_first_chunk::<2>() else {
        return Err(Deny::NoHost);
    };
    if usize::from(u16::from_be_bytes(*list_len)) != list.len() {
        return Err(Deny::NoHost);
    }
    let [name_type, l0, l1, name @ ..] = list else {
        return Err(Deny::NoHost);
    };
    if *name_type != 0 || usize::from(u16::from_be_bytes([*l0, *l1])) != name.len() {
        return Err(Deny::NoHost);
    }
    let name = std::str::from_utf8(name).map_err(|_| Deny::NoHost)?;
    if name.parse::<IpAddr>().is_ok() {
        // RFC 6066 §3: literal addresses are not permitted in SNI.
        return Err(Deny::NoHost);
    }
    HostName::parse(name).map_err(|_| Deny::NoHost)
}

// ------------------------------------------------------ incremental --

/// A parser driven with a growing buffer.
pub trait Incremental {
    type Output;
    /// Looks at `buf` (which only ever grows between calls).
    fn poll(&mut self, buf: &[u8]) -> Parsed<Self::Output>;
    /// The most bytes this parser reads before it must have an answer.
    fn cap(&self) -> usize;
    /// The deny when the cap is reached without an answer, or the stream
    /// ends first.
    fn incomplete(&self) -> Deny;
}

/// Drives [`parse_client_hello`] with as little re-parsing as the TLS
/// headers allow: it walks record headers as they arrive, counting the
/// handshake bytes, and parses once the whole hello is there (or a header
/// is wrong). Every byte is looked at a bounded number of times.
#[derive(Debug, Clone)]
pub struct HelloReader {
    max_hello: usize,
    /// Where the current record's header starts.
    record: usize,
    /// Bytes of the current record's fragment already counted.
    counted: usize,
    /// Handshake bytes seen so far, over all records.
    payload: usize,
    /// The handshake header (type and 24-bit length), once here.
    header: [u8; 4],
}

impl HelloReader {
    pub fn new(max_hello: usize) -> HelloReader {
        HelloReader {
            max_hello,
            record: 0,
            counted: 0,
            payload: 0,
            header: [0; 4],
        }
    }

    fn hello_len(&self) -> Option<usize> {
        (self.payload >= 4).then(|| {
            u32::from_be_bytes([0, self.header[1], self.header[2], self.header[3]]) as usize
        })
    }
}

impl Incremental for HelloReader {
    type Output = ClientHello;

    fn poll(&mut self, buf: &[u8]) -> Parsed<ClientHello> {
        loop {
            if self.payload >= 1 && self.header[0] != HANDSHAKE_CLIENT_HELLO {
                return parse_client_hello(buf, self.max_hello);
            }
            if let Some(len) = self.hello_len()
                && (len > self.max_hello || self.payload >= 4 + len)
            {
                return parse_client_hello(buf, self.max_hello);
            }
            let Some(h) = buf.get(self.record..self.record + RECORD_HEADER) else {
                return Parsed::NeedMore;
            };
            let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
            if h[0] != CONTENT_HANDSHAKE || h[1] != 3 || len == 0 || len > MAX_RECORD {
                // The full parser names the reason.
                return parse_client_hello(buf, self.max_hello);
            }
            let start = self.record + RECORD_HEADER;
            let have = buf.len().saturating_sub(start).min(len);
            // Count the fragment's new bytes, keeping the first four
            // (the handshake header).
            let mut i = start + self.counted;
            while self.payload < 4 && i < start + have {
                self.header[self.payload] = buf[i];
                self.payload += 1;
                i += 1;
            }
            self.payload += start + have - i;
            self.counted = have;
            if have < len {
                let ready = self.payload >= 1 && self.header[0] != HANDSHAKE_CLIENT_HELLO
                    || self
                        .hello_len()
                        .is_some_and(|n| n > self.max_hello || self.payload >= 4 + n);
                if ready {
                    return parse_client_hello(buf, self.max_hello);
                }
                return Parsed::NeedMore;
            }
            self.record = start + len;
            self.counted = 0;
        }
    }

    fn cap(&self) -> usize {
        // A hello split into many small records carries 5 bytes of header
        // per record; leave room for that, bounded.
        self.max_hello * 2 + 64
    }

    fn incomplete(&self) -> Deny {
        Deny::NoHost
    }
}

/// Finds a request head's end in what has arrived since the last look and
/// parses only then (or once the buffer has doubled, so a head that is bad
/// from its first line is refused early), so a head dribbled a byte at a
/// time costs linear time.
#[derive(Debug, Clone)]
pub struct HeadReader {
    max_head: usize,
    scanned: usize,
    parsed_at: usize,
}

impl HeadReader {
    pub fn new(max_head: usize) -> HeadReader {
        HeadReader {
            max_head,
            scanned: 0,
            parsed_at: 0,
        }
    }
}

impl Incremental for HeadReader {
    type Output = RequestHead;

    fn poll(&mut self, buf: &[u8]) -> Parsed<RequestHead> {
        let from = self.scanned.saturating_sub(3);
        let end_seen = buf.get(from..).is_some_and(|new| {
            new.windows(2).any(|w| w == b"\n\n") || new.windows(3).any(|w| w == b"\n\r\n")
        });
        self.scanned = buf.len();
        let worth = end_seen
            || self.parsed_at == 0
            || buf.len() >= self.parsed_at.saturating_mul(2)
            || buf.len() >= self.max_head;
        if !worth || buf.is_empty() {
            return Parsed::NeedMore;
        }
        self.parsed_at = buf.len();
        parse_request_head(buf, self.max_head)
    }

    fn cap(&self) -> usize {
        self.max_head
    }

    fn incomplete(&self) -> Deny {
        Deny::BadRequest
    }
}

/// What a connection's first bytes turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    Tls(ClientHello),
    Http(RequestHead),
    /// Neither TLS nor HTTP/1.x (the first bytes say so).
    Other,
}

impl Opening {
    pub fn protocol(&self) -> Protocol {
        match self {
            Opening::Tls(_) => Protocol::Tls,
            Opening::Http(h) if h.connect => Protocol::Connect,
            Opening::Http(_) => Protocol::Http,
            Opening::Other => Protocol::Other,
        }
    }
}

/// Classifies the first bytes, then parses them as what they are.
#[derive(Debug, Clone)]
pub struct OpeningReader {
    hello: HelloReader,
    head: HeadReader,
    protocol: Protocol,
}

impl OpeningReader {
    pub fn new(max_hello: usize, max_head: usize) -> OpeningReader {
        OpeningReader {
            hello: HelloReader::new(max_hello),
            head: HeadReader::new(max_head),
            protocol: Protocol::Other,
        }
    }

    /// What the bytes so far look like (`Other` before the first byte).
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }
}

impl Incremental for OpeningReader {
    type Output = Opening;

    fn poll(&mut self, buf: &[u8]) -> Parsed<Opening> {
        if buf.is_empty() {
            return Parsed::NeedMore;
        }
        self.protocol = classify(buf);
        match self.protocol {
            Protocol::Tls => match self.hello.poll(buf) {
                Parsed::Found(h) => Parsed::Found(Opening::Tls(h)),
                Parsed::NeedMore => Parsed::NeedMore,
                Parsed::Invalid(d) => Parsed::Invalid(d),
            },
            Protocol::Http | Protocol::Connect => match self.head.poll(buf) {
                Parsed::Found(h) => Parsed::Found(Opening::Http(h)),
                Parsed::NeedMore => Parsed::NeedMore,
                Parsed::Invalid(d) => Parsed::Invalid(d),
            },
            Protocol::Other => Parsed::Found(Opening::Other),
        }
    }

    fn cap(&self) -> usize {
        match self.protocol {
            Protocol::Tls => self.hello.cap(),
            Protocol::Http | Protocol::Connect => self.head.cap(),
            Protocol::Other => self.hello.cap().max(self.head.cap()),
        }
    }

    fn incomplete(&self) -> Deny {
        match self.protocol {
            Protocol::Http | Protocol::Connect => Deny::BadRequest,
            _ => Deny::NoHost,
        }
    }
}

/// How [`read_until`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadEnd<T> {
    Found(T),
    /// Refused: unparseable, over the cap, or the stream ended first.
    Invalid(Deny),
    /// The stream ended before its first byte.
    Eof,
}

/// Reads `stream` into `buf` until `parser` has an answer. Bytes already in
/// `buf` are looked at first. The caller bounds it in time.
/// Cancellation-safe: `buf` holds every byte read, whenever it is dropped.
pub async fn read_until<P: Incremental>(
    stream: &mut super::stream::ReadHalf,
    buf: &mut Vec<u8>,
    parser: &mut P,
) -> io::Result<ReadEnd<P::Output>> {
    loop {
        match parser.poll(buf) {
            Parsed::Found(v) => return Ok(ReadEnd::Found(v)),
            Parsed::Invalid(d) => return Ok(ReadEnd::Invalid(d)),
            Parsed::NeedMore if buf.len() >= parser.cap() => {
                return Ok(ReadEnd::Invalid(parser.incomplete()));
            }
            Parsed::NeedMore => {}
        }
        if stream.read_some(buf, parser.cap()).await? == 0 {
            return Ok(if buf.is_empty() {
                ReadEnd::Eof
            } else {
                ReadEnd::Invalid(parser.incomplete())
            });
        }
    }
}

// --------------------------------------------------------------- HTTP --

/// Limits on a request head; the head itself is also capped by the
/// caller's buffer.
pub const MAX_HEADERS: usize = 100;

/// How a request's body is delimited (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// What sluice needs from an HTTP/1.x request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The authority the request names: its `Host` (origin-form), or the
    /// absolute-URI's authority, which must then agree with `Host`.
    pub host: Host,
    pub port: Option<u16>,
    /// `true` for `GET http://host/path` (absolute-form).
    pub absolute_form: bool,
    /// The absolute-form URI's scheme was `https`.
    pub https: bool,
    /// `CONNECT host:port` (authority-form).
    pub connect: bool,
    /// The `Proxy-Authorization` value, if one was sent.
    pub proxy_authorization: Option<String>,
    pub framing: Framing,
    /// `Upgrade` requested (`Connection: upgrade` with an `Upgrade` header):
    /// after this request the connection carries another protocol.
    pub upgrade: bool,
    /// The request target's path and query as sent (`/a/b?c`; `/` for an
    /// absolute-form URI without one; empty for CONNECT): what request
    /// rules read, normalised.
    pub path: String,
    /// The head's length in bytes, CRLFCRLF included.
    pub head_len: usize,
    /// HTTP/1.1, no `Connection: close` (nor `Proxy-Connection: close`),
    /// no `Expect` and no upgrade: the client reads a refusal and goes
    /// on with its next request on the same connection (after the body
    /// it sends regardless).
    pub reusable: bool,
}

/// Parses an HTTP/1.x request head. `Found` once the whole head is in
/// `buf`; bodies are not looked at.
pub fn parse_request_head(buf: &[u8], max_head: usize) -> Parsed<RequestHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => {
            return Parsed::Invalid(Deny::BadRequest);
        }
        Ok(httparse::Status::Partial) => return Parsed::NeedMore,
        Err(httparse::Error::Version) if buf.starts_with(H2_PREFACE) => {
            return Parsed::Invalid(Deny::UnsupportedProtocol);
        }
        Err(_) => return Parsed::Invalid(Deny::BadRequest),
    };
    if head_len > max_head {
        return Parsed::Invalid(Deny::BadRequest);
    }
    match head_from(&req, head_len) {
        Ok(head) => Parsed::Found(head),
        Err(deny) => Parsed::Invalid(deny),
    }
}

fn head_from(req: &httparse::Request<'_, '_>, head_len: usize) -> Result<RequestHead, Deny> {
    let method = req.method.ok_or(Deny::BadRequest)?;
    let target = req.path.ok_or(Deny::BadRequest)?;
    if req.version != Some(1) && req.version != Some(0) {
        return Err(Deny::UnsupportedProtocol);
    }
    let connect = method == "CONNECT";

    let mut host_header: Option<&[u8]> = None;
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked_last = false;
    let mut has_upgrade = false;
    let mut connection_upgrade = false;
    let mut proxy_authorization: Option<String> = None;
    let mut closes = false;
    let mut expects = false;
    for h in req.headers.iter() {
        if h.name.is_empty() {
            return Err(Deny::BadRequest);
        }
        if h.value
            .iter()
            .any(|b| *b == b'\r' || *b == b'\n' || *b == 0)
        {
            return Err(Deny::BadRequest);
        }
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            if host_header.is_some() {
                return Err(Deny::BadRequest);
            }
            host_header = Some(h.value);
        } else if name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .map_err(|_| Deny::BadRequest)?
                .trim();
            if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Deny::BadRequest);
            }
            let n: u64 = v.parse().map_err(|_| Deny::BadRequest)?;
            if content_length.is_some_and(|prev| prev != n) {
                return Err(Deny::BadRequest);
            }
            if content_length.is_some() {
                // Even an identical repeat is refused: it is the shape of a
                // smuggling probe, and no honest client sends it.
                return Err(Deny::BadRequest);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if transfer_encoding {
                // Two codings lists are one list to some parsers and two
                // to others: refused.
                return Err(Deny::BadRequest);
            }
            transfer_encoding = true;
            // Exactly `chunked`, trimmed of ASCII blanks only: a coding list
            // (`gzip, chunked`) or a value another parser might trim to
            // `chunked` (a non-ASCII space) is a framing disagreement.
            let v = h.value.trim_ascii();
            chunked_last = v.eq_ignore_ascii_case(b"chunked");
            if !chunked_last {
                return Err(Deny::BadRequest);
            }
        } else if name.eq_ignore_ascii_case("proxy-authorization") {
            if proxy_authorization.is_some() {
                return Err(Deny::BadRequest);
            }
            let v = std::str::from_utf8(h.value).map_err(|_| Deny::BadRequest)?;
            proxy_authorization = Some(v.trim().to_owned());
        } else if name.eq_ignore_ascii_case("upgrade") {
            has_upgrade = true;
        } else if name.eq_ignore_ascii_case("expect") {
            expects = true;
        } else if name.eq_ignore_ascii_case("proxy-connection") {
            closes |= h
                .value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if name.eq_ignore_ascii_case("connection") {
            let v = std::str::from_utf8(h.value).map_err(|_| Deny::BadRequest)?;
            for token in v.split(',').map(str::trim) {
                connection_upgrade |= token.eq_ignore_ascii_case("upgrade");
                closes |= token.eq_ignore_ascii_case("close");
                // A hop-by-hop list that names a header framing the message
                // would have a forwarder drop it and still send the body,
                // which the next hop reads as another request.
                if FRAMING_HEADERS
                    .iter()
                    .any(|f| token.eq_ignore_ascii_case(f))
                {
                    return Err(Deny::BadRequest);
                }
            }
        }
    }

    let framing = match (transfer_encoding, content_length) {
        (true, Some(_)) => return Err(Deny::BadRequest),
        // HTTP/1.0 has no chunked coding (RFC 9112 §6.1): an HTTP/1.0
        // server reads the chunks as the body's bytes, or as requests.
        (true, None) if req.version == Some(0) => return Err(Deny::BadRequest),
        (true, None) if chunked_last => Framing::Chunked,
        // A request whose final coding is not chunked has no length it can
        // be framed by (RFC 9112 §6.3): refuse.
        (true, None) => return Err(Deny::BadRequest),
        (false, Some(0)) | (false, None) => Framing::None,
        (false, Some(n)) => Framing::Length(n),
    };

    let host_value = match host_header {
        Some(v) => Some(std::str::from_utf8(v).map_err(|_| Deny::BadRequest)?.trim()),
        None => None,
    };
    let mut https = false;
    let mut path = target.to_owned();
    let (absolute_form, authority) = if connect {
        // authority-form: host and port, nothing else.
        if target.contains(['/', '@', '?', '#']) {
            return Err(Deny::BadRequest);
        }
        match split_authority(target) {
            Ok((host, Some(port))) => {
                return Ok(RequestHead {
                    method: method.to_owned(),
                    host,
                    port: Some(port),
                    absolute_form: false,
                    https: false,
                    connect: true,
                    proxy_authorization,
                    framing,
                    upgrade: false,
                    path: String::new(),
                    head_len,
                    reusable: false,
                });
            }
            _ => return Err(Deny::BadRequest),
        }
    } else if let Some((scheme_https, rest)) = strip_scheme(target) {
        https = scheme_https;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.contains('@') {
            return Err(Deny::BadRequest);
        }
        path = match &rest[authority.len()..] {
            "" => "/".to_owned(),
            p if p.starts_with('/') => p.to_owned(),
            p => format!("/{p}"),
        };
        (true, Some(authority))
    } else if target.starts_with('/') || target == "*" {
        (false, None)
    } else {
        return Err(Deny::BadRequest);
    };

    let (host, port) = match (authority, host_value) {
        (Some(a), host_value) => {
            let (host, port) = split_authority(a).map_err(|_| Deny::BadRequest)?;
            if let Some(v) = host_value {
                let (h2, p2) = split_authority(v).map_err(|_| Deny::BadRequest)?;
                if h2 != host || p2 != port {
                    return Err(Deny::BadRequest);
                }
            }
            (host, port)
        }
        (None, Some("")) | (None, None) => return Err(Deny::NoHost),
        (None, Some(v)) => split_authority(v).map_err(|_| Deny::BadRequest)?,
    };

    let upgrade = has_upgrade && connection_upgrade;
    Ok(RequestHead {
        method: method.to_owned(),
        host,
        port,
        absolute_form,
        https,
        connect: false,
        proxy_authorization,
        framing,
        upgrade,
        path,
        head_len,
        reusable: req.version == Some(1) && !closes && !expects && !upgrade,
    })
}

/// `http://…` or `https://…`: whether it was https, and the rest.
pub(crate) fn strip_scheme(target: &str) -> Option<(bool, &str)> {
    let (scheme, rest) = target.split_once("://")?;
    if scheme.eq_ignore_ascii_case("http") {
        Some((false, rest))
    } else if scheme.eq_ignore_ascii_case("https") {
        Some((true, rest))
    } else {
        None
    }
}

/// Headers that frame a message: never removed on the way, so a
/// `Connection` header that names one is refused.
const FRAMING_HEADERS: &[&str] = &["content-length", "transfer-encoding", "host"];

/// Progress through a chunked body (RFC 9112 §7.1), fed bytes as they come.
/// It only finds where the body ends; the bytes pass through untouched.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChunkedState {
    phase: ChunkPhase,
    /// Digits of the current size line, to cap it.
    line_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ChunkPhase {
    #[default]
    Size,
    SizeValue(u64),
    /// After `;`: extensions up to CRLF.
    Ext(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// Trailer section: at the start of a line.
    TrailerLineStart,
    TrailerName,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

/// What feeding bytes to a [`ChunkedState`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkProgress {
    /// All bytes belong to the body; more are to come.
    Consumed,
    /// The body ended after this many bytes of the input.
    Done(usize),
    Invalid,
}

/// Longest chunk-size line (size plus extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

impl ChunkedState {
    pub fn feed(&mut self, input: &[u8]) -> ChunkProgress {
        use ChunkPhase::*;
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.phase = match self.phase {
                Size | SizeValue(_) => {
                    self.line_len += 1;
                    let so_far = match self.phase {
                        SizeValue(v) => Some(v),
                        _ => None,
                    };
                    match (b, so_far) {
                        (b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F', v) => {
                            let digit = u64::from((b as char).to_digit(16).unwrap_or(0));
                            let v = v.unwrap_or(0);
                            if v > (u64::MAX >> 4) {
                                return ChunkProgress::Invalid;
                            }
                            SizeValue(v << 4 | digit)
                        }
                        (b';', Some(v)) => Ext(v),
                        (b'\r', Some(v)) => SizeLf(v),
                        _ => return ChunkProgress::Invalid,
                    }
                }
                Ext(v) => {
                    self.line_len += 1;
                    if self.line_len > MAX_CHUNK_LINE {
                        return ChunkProgress::Invalid;
                    }
                    match b {
                        b'\r' => SizeLf(v),
                        b'\n' | 0 => return ChunkProgress::Invalid,
                        _ => Ext(v),
                    }
                }
                SizeLf(v) => {
                    self.line_len = 0;
                    match (b, v) {
                        (b'\n', 0) => TrailerLineStart,
                        (b'\n', v) => Data(v),
                        _ => return ChunkProgress::Invalid,
                    }
                }
                Data(left) => {
                    let take = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    i += take;
                    let left = left - take as u64;
                    self.phase = if left == 0 { DataCr } else { Data(left) };
                    continue;
                }
                DataCr if b == b'\r' => DataLf,
                DataLf if b == b'\n' => Size,
                DataCr | DataLf => return ChunkProgress::Invalid,
                TrailerLineStart => match b {
                    b'\r' => FinalLf,
                    b'\n' | 0 | b':' | b' ' | b'\t' => return ChunkProgress::Invalid,
                    _ => {
                        self.line_len = 1;
                        TrailerName
                    }
                },
                // A trailer line is a field: a name, then a colon. A line
                // without one is read differently by different parsers.
                TrailerName => {
                    self.line_len += 1;
                    if self.line_len > MAX_CHUNK_LINE {
                        return ChunkProgress::Invalid;
                    }
                    match b {
                        b':' => TrailerLine,
                        b'\r' | b'\n' | 0 | b' ' | b'\t' => return ChunkProgress::Invalid,
                        _ => TrailerName,
                    }
                }
                TrailerLine => {
                    self.line_len += 1;
                    if self.line_len > MAX_CHUNK_LINE {
                        return ChunkProgress::Invalid;
                    }
                    match b {
                        b'\r' => TrailerLf,
                        b'\n' | 0 => return ChunkProgress::Invalid,
                        _ => TrailerLine,
                    }
                }
                TrailerLf if b == b'\n' => TrailerLineStart,
                FinalLf if b == b'\n' => {
                    self.phase = Done;
                    return ChunkProgress::Done(i + 1);
                }
                TrailerLf | FinalLf => return ChunkProgress::Invalid,
                Done => return ChunkProgress::Done(i),
            };
            if matches!(self.phase, Size | SizeValue(_)) && self.line_len > MAX_CHUNK_LINE {
                return ChunkProgress::Invalid;
            }
            i += 1;
        }
        ChunkProgress::Consumed
    }
}

#[cfg(test)]
mod tests;
