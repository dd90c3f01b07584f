//! Events (issue 22): one event per decision, the same in the event
//! stream (`GET /v1/events`), the destinations table and the OTLP export
//! (decoded by a receiver this test starts, with the official
//! OpenTelemetry protobuf definitions from PyPI's `opentelemetry-proto`);
//! the export never holds up the data path (the collector killed, requests
//! are still served and the drops are counted); report mode lets an
//! allowlist denial through as `would_deny` and nothing else; the
//! destinations survive a restart.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The receiver: OTLP/HTTP logs, decoded with `opentelemetry-proto`, one
/// JSON line per record in `out`.
const RECEIVER: &str = r#"
import sys, json, http.server
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
out = open(sys.argv[2], "a")
def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        req = logs_service_pb2.ExportLogsServiceRequest()
        req.ParseFromString(body)
        for rl in req.resource_logs:
            resource = {a.key: value(a.value) for a in rl.resource.attributes}
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    out.write(json.dumps({
                        "path": self.path,
                        "content_type": self.headers.get("content-type"),
                        "service": resource.get("service.name"),
                        "scope": sl.scope.name,
                        "body": value(r.body),
                        "event_name": r.event_name,
                        "severity": r.severity_number,
                        "time_unix_nano": r.time_unix_nano,
                        "attrs": {a.key: value(a.value) for a in r.attributes},
                    }) + "\n")
                    out.flush()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

fn python_with_otlp(test: &str) -> bool {
    let ok = std::process::Command::new("python3")
        .args([
            "-c",
            "import opentelemetry.proto.collector.logs.v1.logs_service_pb2",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    let reason = format!("{test}: needs python3 with opentelemetry-proto (pip)");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{reason} (CI=true: a skip is a failure)");
    }
    eprintln!("SKIPPED {reason}");
    false
}

/// Reads server-sent events from `GET /v1/events?container_id=` into a
/// shared list, until the connection ends.
async fn subscribe(gw: &Gw, container: &str) -> std::sync::Arc<std::sync::Mutex<Vec<Value>>> {
    let mut s = tokio::net::TcpStream::connect(gw.running.admin_addr)
        .await
        .unwrap();
    let req = format!(
        "GET /v1/events?container_id={container} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\n\r\n",
        gw.running.admin_token
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = std::sync::Arc::clone(&seen);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let mut ready = Some(ready_tx);
        loop {
            let n = match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            if let Some(tx) = ready.take() {
                let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
            }
            let text = String::from_utf8_lossy(&buf).into_owned();
            let mut list = out.lock().unwrap();
            list.clear();
            for line in text.lines() {
                if let Some(data) = line.strip_prefix("data: ")
                    && let Ok(v) = serde_json::from_str::<Value>(data)
                {
                    list.push(v);
                }
            }
        }
    });
    let head = tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .unwrap()
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    seen
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn otlp_records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A DNS query for `name` from 127.0.0.1, answered.
async fn dns_query(gw: &Gw, name: &str) {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    let mut q = Message::new(7, MessageType::Query, OpCode::Query);
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&q.to_vec().unwrap(), gw.running.dns_addr)
        .await
        .unwrap();
    let mut buf = [0u8; 1500];
    tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_reaches_the_stream_the_destinations_and_the_collector() {
    let test = "one_event_reaches_the_stream_the_destinations_and_the_collector";
    if !python_with_otlp(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("receiver.py");
    std::fs::write(&script, RECEIVER).unwrap();
    let out = dir.path().join("records.jsonl");
    let port = free_port();
    // Killed with the test, whatever happens.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let receiver = Kill(
        std::process::Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .arg(&out)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the receiver did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let up = http_upstream().await;
    let upport = up.addr.port();
    let gw = start(up.addr, |c| {
        c.audit.otlp_endpoint = format!("http://127.0.0.1:{port}/v1/logs");
        c.audit.queue = 64;
    })
    .await;
    let token = gw
        .register("ev-1", "127.0.0.1", &[&format!("api.test:{upport}")], 600)
        .await;
    let stream = subscribe(&gw, "ev-1").await;

    // Allowed and denied, on the transparent door and the proxy door, and
    // a DNS query.
    let ok = gw
        .request_from(
            "127.0.0.1",
            b"GET /a HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let no = gw
        .request_from(
            "127.0.0.1",
            b"GET / HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(no.contains("x-deny-reason: host_not_allowed"), "{no}");
    let auth = base64_basic(&format!("container_ev-1:jwt_{token}"));
    for (host, want) in [
        (format!("api.test:{upport}"), "HTTP/1.1 200"),
        ("other.test".to_owned(), "HTTP/1.1 403"),
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.running.proxy_addr)
            .await
            .unwrap();
        let req = format!(
            "GET http://{host}/p HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: Basic {auth}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let answer = read_response(&mut s).await;
        assert!(answer.starts_with(want), "{host}: {answer}");
    }
    dns_query(&gw, "api.test.").await;

    // The stream has each, with the same fields.
    let events = wait_for("five events on the stream", || {
        let list = stream.lock().unwrap().clone();
        (list.len() >= 5).then_some(list)
    })
    .await;
    let find = |kind: &str, door: &str, decision: &str| {
        events
            .iter()
            .find(|e| e["kind"] == kind && e["door"] == door && e["decision"] == decision)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} {door} {decision} in {events:?}"))
    };
    let allowed = find("connection", "transparent", "allow");
    assert_eq!(allowed["container_id"], "ev-1");
    assert_eq!(allowed["host"], "api.test");
    assert_eq!(allowed["matched"], format!("api.test:{upport}"));
    assert!(allowed["jti"].as_str().is_some_and(|j| !j.is_empty()));
    assert!(allowed["bytes_to_client"].as_u64().unwrap() > 0);
    assert!(allowed["timings"]["connect_ms"].is_u64(), "{allowed}");
    let denied = find("connection", "transparent", "deny");
    assert_eq!(denied["reason"], "host_not_allowed");
    find("connection", "proxy", "allow");
    find("connection", "proxy", "deny");
    let dns = find("dns", "dns", "allow");
    assert_eq!(dns["host"], "api.test.");
    // Nothing of the token in any event.
    for e in &events {
        assert!(!e.to_string().contains(&token), "{e}");
    }

    // The collector got the same, decoded with the official definitions.
    let records = wait_for("the five records at the collector", || {
        let r = otlp_records(&out);
        let have = |kind: &str, door: &str, decision: &str| {
            r.iter().any(|x| {
                x["attrs"]["sluice.kind"] == kind
                    && x["attrs"]["mode"] == door
                    && x["attrs"]["decision"] == decision
            })
        };
        (have("connection", "transparent", "allow")
            && have("connection", "transparent", "deny")
            && have("connection", "proxy", "allow")
            && have("connection", "proxy", "deny")
            && have("dns", "dns", "allow"))
        .then_some(r)
    })
    .await;
    for e in [&allowed, &denied, &dns] {
        let r = records
            .iter()
            .find(|x| {
                x["attrs"]["sluice.kind"] == e["kind"]
                    && x["attrs"]["mode"] == e["door"]
                    && x["attrs"]["decision"] == e["decision"]
            })
            .unwrap();
        assert_eq!(r["path"], "/v1/logs");
        assert_eq!(r["content_type"], "application/x-protobuf");
        assert_eq!(r["service"], "sluice");
        assert_eq!(r["scope"], "sluice.audit");
        assert_eq!(
            r["event_name"],
            format!("sluice.{}", e["kind"].as_str().unwrap())
        );
        assert_eq!(
            r["time_unix_nano"].as_u64().unwrap(),
            e["time_ms"].as_u64().unwrap() * 1_000_000
        );
        for key in [
            "container_id",
            "jti",
            "host",
            "reason",
            "protocol",
            "matched",
        ] {
            assert_eq!(r["attrs"][key], e[key], "{key}: {r} vs {e}");
        }
        assert_eq!(r["attrs"]["port"].as_u64(), e["port"].as_u64(), "{r}");
        assert_eq!(
            r["attrs"]["bytes_to_client"].as_u64(),
            e["bytes_to_client"].as_u64()
        );
    }
    assert_eq!(
        records
            .iter()
            .find(|x| x["attrs"]["decision"] == "deny")
            .unwrap()["severity"],
        13
    );

    // What the sandbox reached: each host and port, counted.
    let (status, d) = gw
        .admin("GET", "/v1/sandboxes/ev-1/destinations", None)
        .await;
    assert_eq!(status, 200, "{d}");
    let list = d["destinations"].as_array().unwrap();
    let api = list
        .iter()
        .find(|x| x["host"] == "api.test" && x["port"] == upport)
        .unwrap_or_else(|| panic!("{d}"));
    assert_eq!(api["allowed"], 2, "{d}");
    assert!(api["bytes_to_client"].as_u64().unwrap() > 0);
    // Refused on the transparent door (the port dialled) and through the
    // proxy (port 80): two destinations.
    let other: Vec<&Value> = list.iter().filter(|x| x["host"] == "other.test").collect();
    assert_eq!(other.len(), 2, "{d}");
    for o in other {
        assert_eq!(o["denied"], 1, "{d}");
        assert_eq!(o["last_reason"], "host_not_allowed");
    }
    let (status, _) = gw
        .admin("GET", "/v1/sandboxes/nobody/destinations", None)
        .await;
    assert_eq!(status, 404);

    // The collector gone: requests are served as before, and what cannot
    // be exported is dropped and counted.
    drop(receiver);
    let started = Instant::now();
    for i in 0..100 {
        let mut s = gw.connect_from("127.0.0.1").await;
        s.write_all(format!("GET /{i} HTTP/1.1\r\nHost: api.test\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let answer = read_response(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{i}: {answer}");
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    wait_for("drops counted", || {
        let page = futures_executor_block(gw.metrics());
        (metric(&page, "sluice_audit_events_dropped_total") > 0.0).then_some(())
    })
    .await;
}

/// Blocks on a future from inside a synchronous closure (the test's own
/// runtime has a second worker).
fn futures_executor_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

fn base64_basic(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Report mode: an allowlist denial is let through and recorded
/// `would_deny` with its reason, in the stream, the metrics, the
/// destinations, the sandbox's view and `explain`; the private-destination
/// guard still refuses. The destinations survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_lets_denials_through_and_records_them() {
    let up = http_upstream().await;
    let upport = up.addr.port();
    let gw = start(up.addr, |c| {
        c.gateway
            .resolve
            .insert("private.test".into(), vec!["10.0.0.1".parse().unwrap()]);
    })
    .await;
    let (status, minted) = gw
        .admin(
            "POST",
            "/v1/tokens",
            Some(json!({"container_id": "rep-1", "user_id": "t",
                "allowed_hosts": [format!("api.test:{upport}")], "enforce": "report"})),
        )
        .await;
    assert_eq!(status, 201, "{minted}");
    let (status, body) = gw
        .admin(
            "POST",
            "/v1/sandboxes",
            Some(json!({"source_ip": "127.0.0.3", "token": minted["token"]})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (_, shown) = gw.admin("GET", "/v1/sandboxes/rep-1", None).await;
    assert_eq!(shown["enforce"], "report", "{shown}");
    let stream = subscribe(&gw, "rep-1").await;

    // A host off the allowlist: served, recorded.
    let answer = gw
        .request_from(
            "127.0.0.3",
            b"GET /r HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("host=other.test"), "{answer}");
    // A private destination: still refused.
    let answer = gw
        .request_from(
            "127.0.0.3",
            b"GET /r HTTP/1.1\r\nHost: private.test\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(
        answer.contains("x-deny-reason: private_destination"),
        "{answer}"
    );
    let events = wait_for("the would_deny and the deny", || {
        let list = stream.lock().unwrap().clone();
        (list.iter().any(|e| e["decision"] == "would_deny")
            && list.iter().any(|e| e["decision"] == "deny"))
        .then_some(list)
    })
    .await;
    let would = events
        .iter()
        .find(|e| e["decision"] == "would_deny")
        .unwrap();
    assert_eq!(
        (would["host"].as_str(), would["reason"].as_str()),
        (Some("other.test"), Some("host_not_allowed"))
    );
    let deny = events.iter().find(|e| e["decision"] == "deny").unwrap();
    assert_eq!(deny["reason"], "private_destination");
    let page = gw.metrics().await;
    assert!(
        page.contains(r#"decision="would_deny",reason="host_not_allowed""#),
        "{page}"
    );
    let (_, e) = gw
        .admin(
            "GET",
            "/v1/explain?container_id=rep-1&host=other.test&port=443",
            None,
        )
        .await;
    assert_eq!(
        (e["decision"].as_str(), e["reason"].as_str()),
        (Some("would_deny"), Some("host_not_allowed")),
        "{e}"
    );

    // Destinations survive a restart while the sandbox is registered.
    let (_, before) = gw
        .admin("GET", "/v1/sandboxes/rep-1/destinations", None)
        .await;
    let other = before["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["host"] == "other.test")
        .cloned()
        .unwrap_or_else(|| panic!("{before}"));
    assert_eq!(other["would_deny"], 1);
    let Gw { running, dir } = gw;
    running.shutdown().await;
    let gw = start_in(dir, up.addr, |c| {
        c.gateway
            .resolve
            .insert("private.test".into(), vec!["10.0.0.1".parse().unwrap()]);
    })
    .await;
    let (status, after) = gw
        .admin("GET", "/v1/sandboxes/rep-1/destinations", None)
        .await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after, before);
}

/// One request from `source` to `host`, its answer read by its length
/// (the test upstream keeps the connection open).
async fn get(gw: &Gw, source: &str, host: &str) -> String {
    let mut s = gw.connect_from(source).await;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_response(&mut s).await
}

/// `sluice policy suggest`: a sandbox that fetched from three hosts and
/// was refused one gets a suggestion that allows the three (not the
/// refused one), and a token minted from it serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_suggest_allows_what_the_sandbox_reached() {
    let up = http_upstream().await;
    let p = up.addr.port();
    let gw = start(up.addr, |_| {}).await;
    let hosts = ["api.test", "secure.test", "api.example.test"];
    let entries: Vec<String> = hosts.iter().map(|h| format!("{h}:{p}")).collect();
    let entries: Vec<&str> = entries.iter().map(String::as_str).collect();
    gw.register("sg-1", "127.0.0.1", &entries, 600).await;
    for host in hosts.iter().chain(["other.test"].iter()) {
        let answer = get(&gw, "127.0.0.1", host).await;
        let want = if *host == "other.test" {
            "HTTP/1.1 403"
        } else {
            "HTTP/1.1 200"
        };
        assert!(answer.starts_with(want), "{host}: {answer}");
    }
    // Stopped, the gateway has saved what the sandbox reached.
    let Gw { running, dir } = gw;
    running.shutdown().await;
    let config = dir.path().join("suggest.toml");
    std::fs::write(
        &config,
        format!("state_dir = {:?}\n", dir.path().display().to_string()),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["policy", "suggest", "--config"])
        .arg(&config)
        .args(["--container-id", "sg-1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let suggestion: Value = serde_json::from_slice(&out.stdout).unwrap();
    let value = suggestion["allowed_hosts"].as_str().unwrap().to_owned();
    let mut got: Vec<&str> = value.split(',').collect();
    got.sort_unstable();
    let mut want: Vec<String> = hosts.iter().map(|h| format!("{h}:{p}")).collect();
    want.sort();
    assert_eq!(got, want, "{suggestion}");
    assert!(
        suggestion["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["allowed"] == 1)
    );
    // Nothing recorded for another sandbox: said, exit 1.
    let none = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["policy", "suggest", "--config"])
        .arg(&config)
        .args(["--container-id", "nobody"])
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(1));

    // Minted into a token, the suggestion serves the three.
    let gw = start_in(dir, up.addr, |_| {}).await;
    let suggested: Vec<&str> = value.split(',').collect();
    gw.register("sg-2", "127.0.0.4", &suggested, 600).await;
    for host in hosts.iter().chain(["other.test"].iter()) {
        let answer = get(&gw, "127.0.0.4", host).await;
        let want = if *host == "other.test" {
            "HTTP/1.1 403"
        } else {
            "HTTP/1.1 200"
        };
        assert!(answer.starts_with(want), "{host}: {answer}");
    }
}
