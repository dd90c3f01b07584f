//! Events: every decision on every door as one typed [`Event`] (a
//! connection, an HTTP request judged, a DNS query), with the same fields
//! whatever the door. Owns where an event goes: the stderr audit line,
//! the server-sent events of `GET /v1/events`, the per-sandbox
//! destinations table (`GET /v1/sandboxes/{id}/destinations`, kept across
//! a restart) and, when `[audit] otlp_endpoint` is set, the OpenTelemetry
//! export. All are written from the one event, so they cannot disagree;
//! none makes the data path wait (a full queue drops and counts).

pub mod otlp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use crate::deny::Deny;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A connection (or one upstream session of a proxy connection), at
    /// its end.
    Connection,
    /// One HTTP request judged on its own (inspected, or refused by the
    /// request rules on a connection that goes on).
    Request,
    /// One DNS query.
    Dns,
    /// A change of a sandbox's policy: its token replaced.
    Policy,
}

impl Kind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Connection => "connection",
            Kind::Request => "request",
            Kind::Dns => "dns",
            Kind::Policy => "policy",
        }
    }
}

/// The decision an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    /// A report-mode sandbox's allowlist or request-rule denial, let
    /// through.
    WouldDeny,
}

impl Verdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::WouldDeny => "would_deny",
        }
    }

    /// The verdict and reason of a decision, `would_deny` when a
    /// report-mode denial was let through.
    pub fn of(decision: Result<(), Deny>, would_deny: Option<Deny>) -> (Verdict, &'static str) {
        match (decision, would_deny) {
            (Err(d), _) => (Verdict::Deny, d.as_str()),
            (Ok(()), Some(d)) => (Verdict::WouldDeny, d.as_str()),
            (Ok(()), None) => (Verdict::Allow, "none"),
        }
    }
}

/// How long each step took, in milliseconds, where it happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolve_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_byte_ms: Option<u64>,
    pub total_ms: u64,
}

/// One decision, with everything known about it. Never a secret: no
/// token, no credential, no query string (a path only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: Kind,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub container_id: Option<String>,
    pub organization: Option<String>,
    pub jti: Option<String>,
    pub source: Option<SocketAddr>,
    /// `transparent`, `proxy` or `dns`.
    pub door: &'static str,
    /// `http`, `tls`, `connect`, `other` or `dns`; `https` for a request
    /// on an inspected connection.
    pub protocol: &'static str,
    pub host: Option<String>,
    pub port: u16,
    pub method: Option<String>,
    pub path: Option<String>,
    /// The address dialled, once resolved.
    pub upstream: Option<SocketAddr>,
    pub decision: Verdict,
    pub reason: &'static str,
    /// The allowlist entry (or request rule) that admitted it, as written.
    pub matched: Option<String>,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
    pub timings: Timings,
    /// How a connection ended (`closed`, `idle`, `revoked`, …), a
    /// request's status, a DNS answer's count: the kind's own outcome.
    pub end: String,
    /// Credentials set on a request, by name (never a value).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<String>,
}

impl Event {
    /// An event of `kind`, now, with nothing else known yet.
    pub fn new(kind: Kind, door: &'static str, protocol: &'static str) -> Event {
        Event {
            kind,
            time_ms: now_ms(),
            container_id: None,
            organization: None,
            jti: None,
            source: None,
            door,
            protocol,
            host: None,
            port: 0,
            method: None,
            path: None,
            upstream: None,
            decision: Verdict::Allow,
            reason: "none",
            matched: None,
            bytes_to_upstream: 0,
            bytes_to_client: 0,
            timings: Timings::default(),
            end: String::new(),
            credentials: Vec::new(),
        }
    }

    /// The sandbox's identity from its grant: container, organisation,
    /// token id.
    pub fn with_grant(mut self, grant: &crate::identity::token::Grant) -> Event {
        self.container_id = Some(grant.claims.container_id.clone());
        self.organization = grant.claims.organization_uuid.clone();
        self.jti = Some(grant.claims.jti.clone());
        self
    }

    /// The stderr audit line (`sluice::audit`), one per event, its
    /// message the kind's own (`decision` for a connection, as before).
    pub fn log(&self) {
        let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
        let source = self.source.map_or_else(|| "-".into(), |s| s.to_string());
        let upstream = self.upstream.map_or_else(|| "-".into(), |s| s.to_string());
        let (decision, reason) = (self.decision.as_str(), self.reason);
        match self.kind {
            Kind::Connection => tracing::info!(
                target: "sluice::audit",
                kind = "connection",
                container_id = %dash(&self.container_id),
                organization = %dash(&self.organization),
                jti = %dash(&self.jti),
                source = %source,
                mode = self.door,
                protocol = self.protocol,
                host = %dash(&self.host),
                port = self.port,
                upstream = %upstream,
                decision,
                reason,
                matched = %dash(&self.matched),
                bytes_to_upstream = self.bytes_to_upstream,
                bytes_to_client = self.bytes_to_client,
                resolve_ms = self.timings.resolve_ms.unwrap_or(0),
                connect_ms = self.timings.connect_ms.unwrap_or(0),
                first_byte_ms = self.timings.first_byte_ms.unwrap_or(0),
                duration_ms = self.timings.total_ms,
                end = %self.end,
                "decision"
            ),
            Kind::Request => tracing::info!(
                target: "sluice::audit",
                kind = "request",
                container_id = %dash(&self.container_id),
                organization = %dash(&self.organization),
                jti = %dash(&self.jti),
                source = %source,
                mode = self.door,
                protocol = self.protocol,
                host = %dash(&self.host),
                port = self.port,
                method = %dash(&self.method),
                path = %dash(&self.path),
                decision,
                reason,
                matched = %dash(&self.matched),
                credentials = %self.credentials.join(","),
                status = %self.end,
                duration_ms = self.timings.total_ms,
                "{}",
                if self.protocol == "https" {
                    "inspected request"
                } else {
                    "refused request"
                }
            ),
            Kind::Policy => tracing::info!(
                target: "sluice::audit",
                kind = "policy",
                container_id = %dash(&self.container_id),
                organization = %dash(&self.organization),
                jti = %dash(&self.jti),
                reason,
                end = %self.end,
                "token replaced"
            ),
            Kind::Dns => tracing::info!(
                target: "sluice::audit",
                kind = "dns",
                protocol = "dns",
                container_id = %dash(&self.container_id),
                organization = %dash(&self.organization),
                jti = %dash(&self.jti),
                source = %source,
                name = %dash(&self.host),
                qtype = %dash(&self.method),
                decision,
                reason,
                answers = %self.end,
                "dns"
            ),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The most destinations kept per sandbox; past it the one seen least
/// recently goes.
pub const MAX_DESTINATIONS: usize = 512;
/// Events held for `GET /v1/events` subscribers; one that falls further
/// behind is told how many it missed.
const STREAM_CAPACITY: usize = 4096;

/// One host and port a sandbox reached or tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Destination {
    pub host: String,
    pub port: u16,
    /// Connections allowed.
    pub allowed: u64,
    /// Connections and requests refused.
    pub denied: u64,
    /// A report-mode sandbox's denials, let through.
    #[serde(default)]
    pub would_deny: u64,
    /// The last denial's reason (`none` if never denied).
    pub last_reason: String,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
    /// Seconds since the Unix epoch.
    pub first_seen: u64,
    pub last_seen: u64,
}

/// One sandbox's destinations, by host and port.
type Table = HashMap<(String, u16), Destination>;

/// Where events go, beside the log.
pub struct Events {
    stream: broadcast::Sender<std::sync::Arc<Event>>,
    destinations: Mutex<HashMap<String, Table>>,
    dirty: AtomicBool,
    otlp: Mutex<Option<mpsc::Sender<std::sync::Arc<Event>>>>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            stream: broadcast::Sender::new(STREAM_CAPACITY),
            destinations: Mutex::default(),
            dirty: AtomicBool::new(false),
            otlp: Mutex::default(),
        }
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Events {
    /// Records one event everywhere it goes. Never waits.
    pub fn emit(&self, event: Event) {
        event.log();
        self.note_destination(&event);
        let event = std::sync::Arc::new(event);
        if let Some(tx) = self.otlp.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
            && tx.try_send(std::sync::Arc::clone(&event)).is_err()
        {
            ::metrics::counter!(crate::metrics::AUDIT_EVENTS_DROPPED_TOTAL).increment(1);
        }
        // No subscriber is not an error.
        let _ = self.stream.send(event);
    }

    /// A live feed of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<std::sync::Arc<Event>> {
        self.stream.subscribe()
    }

    /// Sends events to an exporter through a queue of `queue` events;
    /// what does not fit is dropped and counted.
    pub fn export_to(&self, queue: usize) -> mpsc::Receiver<std::sync::Arc<Event>> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        *self.otlp.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    fn note_destination(&self, e: &Event) {
        let (Some(container), Some(host)) = (&e.container_id, &e.host) else {
            return;
        };
        let counts = match e.kind {
            Kind::Connection => true,
            // A request judged on its own counts when it was refused (its
            // connection is counted allowed at its end).
            Kind::Request => e.decision != Verdict::Allow,
            Kind::Dns | Kind::Policy => false,
        };
        if !counts {
            return;
        }
        let now = e.time_ms / 1000;
        let mut all = self.destinations.lock().unwrap_or_else(|p| p.into_inner());
        let table = all.entry(container.clone()).or_default();
        let key = (host.clone(), e.port);
        if !table.contains_key(&key)
            && table.len() >= MAX_DESTINATIONS
            && let Some(oldest) = table
                .iter()
                .min_by_key(|(_, d)| d.last_seen)
                .map(|(k, _)| k.clone())
        {
            table.remove(&oldest);
        }
        let d = table.entry(key).or_insert_with(|| Destination {
            host: host.clone(),
            port: e.port,
            allowed: 0,
            denied: 0,
            would_deny: 0,
            last_reason: "none".into(),
            bytes_to_upstream: 0,
            bytes_to_client: 0,
            first_seen: now,
            last_seen: now,
        });
        match e.decision {
            Verdict::Allow => d.allowed += 1,
            Verdict::Deny => d.denied += 1,
            Verdict::WouldDeny => d.would_deny += 1,
        }
        if e.decision != Verdict::Allow || d.last_reason.is_empty() {
            d.last_reason = e.reason.to_owned();
        }
        d.bytes_to_upstream += e.bytes_to_upstream;
        d.bytes_to_client += e.bytes_to_client;
        d.last_seen = now.max(d.last_seen);
        self.dirty.store(true, Ordering::Release);
    }

    /// What a sandbox reached or tried, the most recent first.
    pub fn destinations(&self, container: &str) -> Vec<Destination> {
        let all = self.destinations.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Destination> = all
            .get(container)
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        out.sort_by(|a, b| {
            b.last_seen
                .cmp(&a.last_seen)
                .then_with(|| a.host.cmp(&b.host))
                .then_with(|| a.port.cmp(&b.port))
        });
        out
    }

    /// Forgets a sandbox's destinations (it is gone).
    pub fn forget(&self, container: &str) {
        let mut all = self.destinations.lock().unwrap_or_else(|p| p.into_inner());
        if all.remove(container).is_some() {
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// Loads the tables saved at `path`, keeping only the sandboxes
    /// `keep` says are registered; a missing file is an empty start, a
    /// damaged one is logged and ignored (the tables are a record, not
    /// state the gateway needs).
    pub fn load(&self, path: &Path, keep: impl Fn(&str) -> bool) {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "destinations not read");
                return;
            }
        };
        let saved: Saved = match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "destinations file damaged; starting empty");
                return;
            }
        };
        let mut all = self.destinations.lock().unwrap_or_else(|p| p.into_inner());
        for (container, list) in saved.sandboxes {
            if !keep(&container) {
                continue;
            }
            let table = all.entry(container).or_default();
            for d in list.into_iter().take(MAX_DESTINATIONS) {
                table.insert((d.host.clone(), d.port), d);
            }
        }
    }

    /// Writes the tables of the sandboxes `keep` says are registered to
    /// `path` (atomically: a temporary file renamed), if anything changed
    /// since the last save.
    pub fn save(&self, path: &Path, keep: impl Fn(&str) -> bool) -> std::io::Result<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let saved = {
            let mut all = self.destinations.lock().unwrap_or_else(|p| p.into_inner());
            all.retain(|c, _| keep(c));
            Saved {
                sandboxes: all
                    .iter()
                    .map(|(c, t)| (c.clone(), t.values().cloned().collect()))
                    .collect(),
            }
        };
        let tmp = tmp_path(path);
        let body = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, path).inspect_err(|_| self.dirty.store(true, Ordering::Release))
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[derive(Serialize, Deserialize, Default)]
struct Saved {
    sandboxes: HashMap<String, Vec<Destination>>,
}

/// Where the destinations tables are kept, in `state_dir`.
pub const DESTINATIONS_FILE: &str = "destinations.json";

/// How often the destinations are saved while the gateway runs.
pub const SAVE_EVERY: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(container: &str, host: &str, port: u16, decision: Verdict, t: u64) -> Event {
        let mut e = Event::new(Kind::Connection, "transparent", "tls");
        e.container_id = Some(container.into());
        e.host = Some(host.into());
        e.port = port;
        e.decision = decision;
        e.reason = if decision == Verdict::Allow {
            "none"
        } else {
            "host_not_allowed"
        };
        e.bytes_to_upstream = 10;
        e.bytes_to_client = 20;
        e.time_ms = t * 1000;
        e
    }

    #[test]
    fn destinations_count_each_host_and_port_and_stay_bounded() {
        let ev = Events::default();
        ev.emit(conn("c1", "a.test", 443, Verdict::Allow, 100));
        ev.emit(conn("c1", "a.test", 443, Verdict::Allow, 105));
        ev.emit(conn("c1", "b.test", 443, Verdict::Deny, 110));
        ev.emit(conn("c1", "c.test", 443, Verdict::WouldDeny, 111));
        ev.emit(conn("c2", "a.test", 443, Verdict::Allow, 100));
        let d = ev.destinations("c1");
        assert_eq!(d.len(), 3);
        assert_eq!(d[0].host, "c.test");
        let a = d.iter().find(|d| d.host == "a.test").unwrap();
        assert_eq!(
            (a.allowed, a.denied, a.first_seen, a.last_seen),
            (2, 0, 100, 105)
        );
        assert_eq!((a.bytes_to_upstream, a.bytes_to_client), (20, 40));
        let b = d.iter().find(|d| d.host == "b.test").unwrap();
        assert_eq!((b.denied, b.last_reason.as_str()), (1, "host_not_allowed"));
        for i in 0..(MAX_DESTINATIONS as u64 + 10) {
            ev.emit(conn(
                "c3",
                &format!("h{i}.test"),
                443,
                Verdict::Allow,
                200 + i,
            ));
        }
        let d = ev.destinations("c3");
        assert_eq!(d.len(), MAX_DESTINATIONS);
        // The oldest went.
        assert!(!d.iter().any(|d| d.host == "h0.test"));
        ev.forget("c3");
        assert!(ev.destinations("c3").is_empty());
    }

    #[test]
    fn destinations_survive_a_save_and_load_for_registered_sandboxes_only() {
        let dir = std::env::temp_dir().join(format!("sluice-dest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("destinations.json");
        let ev = Events::default();
        ev.emit(conn("kept", "a.test", 443, Verdict::Allow, 100));
        ev.emit(conn("gone", "a.test", 443, Verdict::Allow, 100));
        ev.save(&path, |c| c != "gone").unwrap();
        let again = Events::default();
        again.load(&path, |_| true);
        assert_eq!(again.destinations("kept").len(), 1);
        assert!(again.destinations("gone").is_empty());
        // A damaged file is an empty start, not an error.
        std::fs::write(&path, b"{not json").unwrap();
        let fresh = Events::default();
        fresh.load(&path, |_| true);
        assert!(fresh.destinations("kept").is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_export_queue_drops_without_waiting() {
        let ev = Events::default();
        let mut rx = ev.export_to(2);
        for i in 0..5 {
            ev.emit(conn("c1", "a.test", 443, Verdict::Allow, i));
        }
        let mut got = 0;
        while rx.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, 2);
    }
}
