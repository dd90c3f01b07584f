//! The connection record: what became of one connection (or one upstream
//! session of a proxy connection), filled in along the pipeline and written
//! exactly once, when it is dropped, whatever the ending: one audit line,
//! one count in `sluice_connections_total` with the final decision, the
//! bytes each way (a refusal's answer included), and the active gauge.
//! No door builds an audit line or counts a decision by hand.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::relay::Traffic;
use super::sniff::Protocol;
use crate::audit;
use crate::deny::Deny;
use crate::host::Host;
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
    started: Instant,
    timed: bool,
    _active: ActiveGuard,
}

impl Record {
    pub fn new(mode: Mode, source: SocketAddr) -> Record {
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

    pub fn set_target(&mut self, protocol: Protocol, host: &Host, port: u16) {
        self.protocol = protocol;
        self.host = Some(host.clone());
        self.port = port;
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let decision = self.decision.unwrap_or(Err(Deny::NoHost));
        super::count(self.mode, self.protocol, decision);
        let up = self.traffic.to_upstream.load(Ordering::Relaxed);
        let down = self.traffic.to_client.load(Ordering::Relaxed);
        ::metrics::counter!(m::BYTES_TOTAL, "direction" => "client_to_upstream").increment(up);
        ::metrics::counter!(m::BYTES_TOTAL, "direction" => "upstream_to_client").increment(down);
        audit::Record {
            container_id: self.container_id.as_deref(),
            source: self.source,
            mode: self.mode,
            protocol: self.protocol.as_str(),
            host: self.host.as_ref(),
            port: self.port,
            upstream: self.upstream,
            decision,
            bytes_to_upstream: up,
            bytes_to_client: down,
            duration: self.started.elapsed(),
            end: self.end,
        }
        .emit();
    }
}
