//! Metrics: every name sluice exports, described once, and the Prometheus
//! recorder behind `GET /metrics`. Label values come only from closed enums
//! (mode, protocol, decision, reason, direction), never from a host name or
//! an address: those go to the audit log.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS_TOTAL: &str = "sluice_connections_total";
pub const ACTIVE_CONNECTIONS: &str = "sluice_active_connections";
pub const BYTES_TOTAL: &str = "sluice_bytes_total";
pub const DECISION_SECONDS: &str = "sluice_decision_seconds";
pub const UPSTREAM_CONNECT_SECONDS: &str = "sluice_upstream_connect_seconds";
pub const REGISTERED_SANDBOXES: &str = "sluice_registered_sandboxes";
pub const CLAIMS_CACHE_HITS: &str = "sluice_claims_cache_hits_total";
pub const CLAIMS_CACHE_MISSES: &str = "sluice_claims_cache_misses_total";
pub const DNS_QUERIES_TOTAL: &str = "sluice_dns_queries_total";
pub const DNS_CACHE_HITS: &str = "sluice_dns_cache_hits_total";
pub const DNS_CACHE_MISSES: &str = "sluice_dns_cache_misses_total";
pub const BUILD_INFO: &str = "sluice_build_info";
pub const STORE_UP: &str = "sluice_store_up";
pub const FLEET_REJECTED: &str = "sluice_fleet_entries_rejected_total";
pub const INSPECTED_REQUESTS_TOTAL: &str = "sluice_inspected_requests_total";
pub const CREDENTIAL_INJECTIONS_TOTAL: &str = "sluice_credential_injections_total";
pub const REFUSED_REQUESTS_TOTAL: &str = "sluice_refused_requests_total";
pub const AUDIT_EVENTS_DROPPED_TOTAL: &str = "sluice_audit_events_dropped_total";
pub const LIMITED_TOTAL: &str = "sluice_limited_total";
pub const POLICY_CHANGES_TOTAL: &str = "sluice_policy_changes_total";

/// Decision latencies are microseconds to milliseconds; connects up to the
/// connect timeout.
const DECISION_BUCKETS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
];
const CONNECT_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same
/// handle, so several gateways in one test process share it).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(DECISION_SECONDS.into()),
                    DECISION_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(UPSTREAM_CONNECT_SECONDS.into()),
                        CONNECT_BUCKETS,
                    )
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding
            // program's); then ours still renders what it was given.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        CONNECTIONS_TOTAL,
        "Connection decisions by mode, protocol, decision and reason."
    );
    describe_gauge!(ACTIVE_CONNECTIONS, "Connections open now, by mode.");
    describe_counter!(BYTES_TOTAL, Unit::Bytes, "Bytes relayed, by direction.");
    describe_histogram!(
        DECISION_SECONDS,
        Unit::Seconds,
        "Time from accept to the decision."
    );
    describe_histogram!(
        UPSTREAM_CONNECT_SECONDS,
        Unit::Seconds,
        "Time to connect upstream."
    );
    describe_gauge!(REGISTERED_SANDBOXES, "Sandboxes in the registry.");
    describe_counter!(
        CLAIMS_CACHE_HITS,
        "Token verifications answered from the claims cache."
    );
    describe_counter!(CLAIMS_CACHE_MISSES, "Token verifications that ran in full.");
    describe_counter!(
        DNS_QUERIES_TOTAL,
        "DNS queries from sandboxes, by query type, decision and reason."
    );
    describe_counter!(DNS_CACHE_HITS, "Name resolutions answered from the cache.");
    describe_counter!(
        DNS_CACHE_MISSES,
        "Name resolutions that asked the resolver."
    );
    describe_gauge!(
        STORE_UP,
        "1 while the store answers (the fleet's Redis with [store] backend = \"redis\"; always 1 for the local store)."
    );
    describe_counter!(
        FLEET_REJECTED,
        "Entries read from the fleet's Redis that were refused (an unreadable score or jti, or past the cap on what one read may add)."
    );
    describe_counter!(
        INSPECTED_REQUESTS_TOTAL,
        "Requests on inspected (TLS-opened) connections, by decision and reason."
    );
    describe_counter!(
        AUDIT_EVENTS_DROPPED_TOTAL,
        "Events the OpenTelemetry export dropped: its queue full, or a batch the collector did not take."
    );
    describe_counter!(
        REFUSED_REQUESTS_TOTAL,
        "Plain HTTP requests the request rules refused, by reason (each audited as \"refused request\"; a connection that then ends is counted apart)."
    );
    describe_counter!(
        LIMITED_TOTAL,
        "Flows slowed (a rate limit, counted at most once a second per key) or refused and closed (a count, a rate or a daily budget) by a `limits` key, by key."
    );
    describe_counter!(
        POLICY_CHANGES_TOTAL,
        "Live connections re-checked when their sandbox's token was replaced, by outcome (kept or closed)."
    );
    describe_counter!(
        CREDENTIAL_INJECTIONS_TOTAL,
        "Requests the gateway set a credential on, by credential name (never its value)."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; its version label is the running binary's version."
    );
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Zero values, so a scrape shows every series' name from the start.
    gauge!(REGISTERED_SANDBOXES).set(0.0);
    for counter in [
        FLEET_REJECTED,
        CLAIMS_CACHE_HITS,
        CLAIMS_CACHE_MISSES,
        DNS_CACHE_HITS,
        DNS_CACHE_MISSES,
    ] {
        metrics::counter!(counter).increment(0);
    }
    for mode in Mode::ALL {
        gauge!(ACTIVE_CONNECTIONS, "mode" => mode.as_str()).set(0.0);
    }
}

/// Which front door a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Transparent,
    Proxy,
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::Transparent, Mode::Proxy];

    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Transparent => "transparent",
            Mode::Proxy => "proxy",
        }
    }
}

/// Counts a connection as active for as long as it lives.
pub struct ActiveGuard(Mode);

impl ActiveGuard {
    pub fn new(mode: Mode) -> Self {
        gauge!(ACTIVE_CONNECTIONS, "mode" => mode.as_str()).increment(1.0);
        ActiveGuard(mode)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        gauge!(ACTIVE_CONNECTIONS, "mode" => self.0.as_str()).decrement(1.0);
    }
}
