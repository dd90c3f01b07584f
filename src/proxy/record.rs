//! The connection record: what became of one connection (or one upstream
//! session of a proxy connection), filled in along the pipeline and written
//! exactly once, when it is dropped, whatever the ending: one event (the
//! audit line, the event stream, the destinations table, the export), one
//! count in `sluice_connections_total` with the final decision, the bytes
//! each way (a refusal's answer included), and the active gauge. No door
//! builds an event or counts a decision by hand.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::relay::Traffic;
use super::sniff::Protocol;
use crate::deny::Deny;
use crate::events::{Event, Events, Kind, Timings, Verdict};
use crate::host::Host;
use crate::identity::token::Grant;
use crate::metrics::{self as m, ActiveGuard, Mode};

pub struct Record {
    pub mode: Mode,
    pub source: SocketAddr,
    pub protocol: Protocol,
    pub container_id: Option<std::sync::Arc<str>>,
    pub host: Option<Host>,
    /// The destination port, as soon as it is known (the original
    /// destination's, before a byte is read).
    pub port: u16,
    pub upstream: Option<SocketAddr>,
    /// `None` until decided; a connection that ends before any decision is
    /// recorded as the deny its ending implies.
    decision: Option<Result<(), Deny>>,
    pub traffic: Arc<Traffic>,
    pub end: &'static str,
    /// The grant that decided it, once known (organisation and token id).
    pub grant: Option<Arc<Grant>>,
    /// A report-mode sandbox's denial that was let through.
    pub would_deny: Option<Deny>,
    /// The allowlist entry that admitted it, as written.
    pub matched: Option<String>,
    /// Resolving and connecting, once done.
    pub resolve_ms: Option<u64>,
    pub connect_ms: Option<u64>,
    events: Arc<Events>,
    started: Instant,
    timed: bool,
    _active: ActiveGuard,
}

impl Record {
    pub fn new(mode: Mode, source: SocketAddr, events: Arc<Events>) -> Record {
        Record {
            mode,
            source,
            protocol: Protocol::Other,
            container_id: None,
            host: None,
            port: 0,
            upstream: None,
            decision: None,
            traffic: Arc::new(Traffic::default()),
            end: "denied",
            grant: None,
            would_deny: None,
            matched: None,
            resolve_ms: None,
            connect_ms: None,
            events,
            started: Instant::now(),
            timed: false,
            _active: ActiveGuard::new(mode),
        }
    }

    /// Records the decision, and the time taken to reach it (once).
    pub fn decide(&mut self, decision: Result<(), Deny>) {
        if !self.timed {
            self.timed = true;
            ::metrics::histogram!(m::DECISION_SECONDS).record(self.started.elapsed().as_secs_f64());
        }
        self.decision = Some(decision);
        if decision.is_err() {
            self.end = "denied";
        }
    }

    pub fn decision(&self) -> Option<Result<(), Deny>> {
        self.decision
    }

    /// Milliseconds since the connection was accepted.
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn set_target(&mut self, protocol: Protocol, host: &Host, port: u16) {
        self.protocol = protocol;
        self.host = Some(host.clone());
        self.port = port;
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let decision = self.decision.unwrap_or(Err(Deny::NoHost));
        let (verdict, reason) = Verdict::of(decision, self.would_deny);
        super::count(self.mode, self.protocol, verdict, reason);
        let up = self.traffic.to_upstream.load(Ordering::Relaxed);
        let down = self.traffic.to_client.load(Ordering::Relaxed);
        ::metrics::counter!(m::BYTES_TOTAL, "direction" => "client_to_upstream").increment(up);
        ::metrics::counter!(m::BYTES_TOTAL, "direction" => "upstream_to_client").increment(down);
        let mut event = Event::new(Kind::Connection, self.mode.as_str(), self.protocol.as_str());
        if let Some(grant) = &self.grant {
            event = event.with_grant(grant);
        }
        if event.container_id.is_none() {
            event.container_id = self.container_id.as_deref().map(str::to_owned);
        }
        event.source = Some(self.source);
        event.host = self.host.as_ref().map(|h| h.to_string());
        event.port = self.port;
        event.upstream = self.upstream;
        event.decision = verdict;
        event.reason = reason;
        event.matched = self.matched.take();
        event.bytes_to_upstream = up;
        event.bytes_to_client = down;
        event.timings = Timings {
            resolve_ms: self.resolve_ms,
            connect_ms: self.connect_ms,
            first_byte_ms: self.traffic.first_byte_ms(self.started),
            total_ms: self.elapsed_ms(),
        };
        event.end = self.end.to_owned();
        self.events.emit(event);
    }
}
