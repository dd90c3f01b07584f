//! The OpenTelemetry export: events as OTLP/HTTP (protobuf) log records,
//! batched, posted to `[audit] otlp_endpoint`. The messages are the
//! official ones (`opentelemetry-proto`'s generated types); the queue is
//! sluice's own, because the data path must never wait for a collector
//! and every event that does not fit must be counted
//! (`sluice_audit_events_dropped_total`), which the SDK's batch processor
//! does not expose. A batch the collector refuses, or that cannot be
//! posted, is dropped and counted the same way: the stderr line is the
//! record of last resort.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Event, Kind, Verdict};

/// Records per request, at most.
pub const BATCH: usize = 512;
/// How long a record waits for its batch to fill.
pub const LINGER: Duration = Duration::from_millis(500);
/// How long one post may take.
const POST_TIMEOUT: Duration = Duration::from_secs(5);

fn string(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn int(key: &str, value: u64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(
                i64::try_from(value).unwrap_or(i64::MAX),
            )),
        }),
        ..Default::default()
    }
}

/// One event as a log record: its fields as attributes (the same names
/// as the stderr line's), its kind's message as the body.
pub fn record(e: &Event) -> LogRecord {
    let mut attrs = vec![
        string("sluice.kind", e.kind.as_str()),
        string("decision", e.decision.as_str()),
        string("reason", e.reason),
        string("mode", e.door),
        string("protocol", e.protocol),
        int("port", u64::from(e.port)),
        int("bytes_to_upstream", e.bytes_to_upstream),
        int("bytes_to_client", e.bytes_to_client),
        int("duration_ms", e.timings.total_ms),
        string("end", e.end.clone()),
    ];
    let optional = [
        ("container_id", &e.container_id),
        ("organization", &e.organization),
        ("jti", &e.jti),
        ("host", &e.host),
        ("method", &e.method),
        ("path", &e.path),
        ("matched", &e.matched),
    ];
    for (key, value) in optional {
        if let Some(v) = value {
            attrs.push(string(key, v.clone()));
        }
    }
    if let Some(s) = e.source {
        attrs.push(string("source", s.to_string()));
    }
    if let Some(u) = e.upstream {
        attrs.push(string("upstream", u.to_string()));
    }
    for (key, value) in [
        ("resolve_ms", e.timings.resolve_ms),
        ("connect_ms", e.timings.connect_ms),
        ("first_byte_ms", e.timings.first_byte_ms),
    ] {
        if let Some(v) = value {
            attrs.push(int(key, v));
        }
    }
    if !e.credentials.is_empty() {
        attrs.push(string("credentials", e.credentials.join(",")));
    }
    let (severity_number, severity_text) = match e.decision {
        Verdict::Allow => (9, "INFO"),
        Verdict::WouldDeny | Verdict::Deny => (13, "WARN"),
    };
    let body = match e.kind {
        Kind::Connection => "decision",
        Kind::Request if e.protocol == "https" => "inspected request",
        Kind::Request => "refused request",
        Kind::Dns => "dns",
        Kind::Policy => "token replaced",
    };
    let nanos = e.time_ms.saturating_mul(1_000_000);
    LogRecord {
        time_unix_nano: nanos,
        observed_time_unix_nano: nanos,
        severity_number,
        severity_text: severity_text.to_owned(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(body.to_owned())),
        }),
        attributes: attrs,
        event_name: format!("sluice.{}", e.kind.as_str()),
        ..Default::default()
    }
}

/// A batch of events as one export request.
pub fn request(events: &[Arc<Event>]) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![
                    string("service.name", "sluice"),
                    string("service.version", env!("CARGO_PKG_VERSION")),
                ],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "sluice.audit".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                log_records: events.iter().map(|e| record(e)).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Posts batches from `rx` to `endpoint` until `stop` (then what is
/// queued is sent once more, bounded by the post timeout).
pub async fn run(endpoint: String, mut rx: mpsc::Receiver<Arc<Event>>, stop: CancellationToken) {
    let client = match reqwest::Client::builder().timeout(POST_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the OTLP exporter cannot start; events go to stderr only");
            return;
        }
    };
    let mut batch: Vec<Arc<Event>> = Vec::with_capacity(BATCH);
    let mut warned = false;
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            got = rx.recv() => match got {
                Some(e) => { batch.push(e); false }
                None => true,
            },
        };
        if !stopping {
            // Fill the batch for a while, never past its size.
            let deadline = tokio::time::Instant::now() + LINGER;
            while batch.len() < BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(e)) => batch.push(e),
                    Ok(None) | Err(_) => break,
                }
            }
        } else {
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(e) => batch.push(e),
                    Err(_) => break,
                }
            }
        }
        if !batch.is_empty() {
            let body = request(&batch).encode_to_vec();
            let sent = client
                .post(&endpoint)
                .header("content-type", "application/x-protobuf")
                .body(body)
                .send()
                .await
                .and_then(|r| r.error_for_status());
            match sent {
                Ok(_) => warned = false,
                Err(e) => {
                    ::metrics::counter!(crate::metrics::AUDIT_EVENTS_DROPPED_TOTAL)
                        .increment(batch.len() as u64);
                    if !warned {
                        // Once per outage, not once per batch. The
                        // endpoint's address only: never a URL's userinfo.
                        tracing::warn!(
                            error = %e.without_url(),
                            "the OTLP collector did not take a batch; its events are dropped and counted"
                        );
                        warned = true;
                    }
                }
            }
            batch.clear();
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_becomes_a_record_with_the_audit_fields() {
        let mut e = Event::new(Kind::Connection, "transparent", "tls");
        e.container_id = Some("c1".into());
        e.host = Some("a.test".into());
        e.port = 443;
        e.decision = Verdict::Deny;
        e.reason = "host_not_allowed";
        e.time_ms = 1_700_000_000_000;
        let req = request(&[Arc::new(e)]);
        let bytes = req.encode_to_vec();
        let back = ExportLogsServiceRequest::decode(bytes.as_slice()).unwrap();
        let rec = &back.resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!(rec.time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(rec.severity_number, 13);
        assert_eq!(rec.event_name, "sluice.connection");
        let get = |k: &str| {
            rec.attributes
                .iter()
                .find(|a| a.key == k)
                .and_then(|a| a.value.clone())
                .and_then(|v| v.value)
        };
        assert_eq!(
            get("reason"),
            Some(any_value::Value::StringValue("host_not_allowed".into()))
        );
        assert_eq!(get("port"), Some(any_value::Value::IntValue(443)));
        assert_eq!(get("method"), None);
    }
}
