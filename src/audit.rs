//! The audit log: one structured line per connection decision, on the
//! `sluice::audit` tracing target. Host names and addresses go here, never
//! into metric labels.

use std::net::SocketAddr;
use std::time::Duration;

use crate::deny::Deny;
use crate::host::Host;
use crate::metrics::Mode;

/// Everything known about one connection's decision and its outcome.
#[derive(Debug)]
pub struct Record<'a> {
    pub container_id: Option<&'a str>,
    pub source: SocketAddr,
    pub mode: Mode,
    pub protocol: &'static str,
    pub host: Option<&'a Host>,
    pub port: u16,
    pub upstream: Option<SocketAddr>,
    pub decision: Result<(), Deny>,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
    pub duration: Duration,
    pub end: &'static str,
}

impl Record<'_> {
    pub fn emit(&self) {
        let (decision, reason) = match self.decision {
            Ok(()) => ("allow", "none"),
            Err(d) => ("deny", d.as_str()),
        };
        tracing::info!(
            target: "sluice::audit",
            container_id = self.container_id.unwrap_or("-"),
            source = %self.source,
            mode = self.mode.as_str(),
            protocol = self.protocol,
            host = %self.host.map(|h| h.to_string()).unwrap_or_else(|| "-".into()),
            port = self.port,
            upstream = %self.upstream.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            decision,
            reason,
            bytes_to_upstream = self.bytes_to_upstream,
            bytes_to_client = self.bytes_to_client,
            duration_ms = self.duration.as_millis() as u64,
            end = self.end,
            "decision"
        );
    }
}
