//! What operators watch, checked with Prometheus' own tool: the alert
//! rules load and pass their unit tests (`promtool check rules`, `promtool
//! test rules`), every Grafana panel query parses as PromQL, a live scrape
//! of a gateway that has relayed, refused and answered DNS passes
//! `promtool check metrics`, and every metric the dashboard and the alerts
//! name is in that scrape. Without promtool (Debian's `prometheus`
//! package) the test says so and skips, except with `CI=true`.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use support::*;
use tokio::io::AsyncWriteExt;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

fn promtool(args: &[&str], dir: &Path, stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Every panel query of the dashboard, with Grafana's variables put to
/// values Prometheus accepts.
fn panel_queries() -> Vec<String> {
    let text = std::fs::read_to_string(format!("{DEPLOY}/grafana/sluice.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            out.push(
                expr.replace("$__rate_interval", "5m")
                    .replace("$instance", ".*"),
            );
        }
    }
    out
}

/// The `sluice_*` names in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("sluice_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn alerts_dashboard_and_a_live_scrape_pass_promtool() {
    if !have_tool(
        "promtool",
        "--version",
        "alerts_dashboard_and_a_live_scrape_pass_promtool",
    ) {
        return;
    }
    let prometheus = Path::new(DEPLOY).join("prometheus");
    let (ok, out) = promtool(&["check", "rules", "sluice-alerts.yml"], &prometheus, None);
    assert!(ok, "{out}");
    let (ok, out) = promtool(
        &["test", "rules", "sluice-alerts.test.yml"],
        &prometheus,
        None,
    );
    assert!(ok, "{out}");

    // Each panel query as a recording rule: promtool parses every one.
    let queries = panel_queries();
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        rules += &format!(
            "      - record: sluice:dashboard_panel_{i}\n        expr: {}\n",
            serde_json::to_string(q).unwrap()
        );
    }
    std::fs::write(dir.path().join("panels.yml"), &rules).unwrap();
    let (ok, out) = promtool(&["check", "rules", "panels.yml"], dir.path(), None);
    assert!(ok, "a panel query does not parse:\n{out}\n{rules}");

    // A gateway that has relayed an HTTP request, refused an unknown
    // source and answered a DNS query.
    let up = http_upstream().await;
    let gw = start(up.addr, |_| {}).await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&format!("api.test:{}", up.addr.port())],
        600,
    )
    .await;
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .unwrap();
    let answer = read_response(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(s);
    let refused = gw
        .request_from("127.0.0.9", b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await;
    assert!(refused.contains("unknown_source"), "{refused}");
    let query = [
        0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'a', b'p', b'i', 4, b't', b'e', b's', b't',
        0, 0, 1, 0, 1,
    ];
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&query, gw.running.dns_addr).await.unwrap();
    let mut buf = [0u8; 512];
    tokio::time::timeout(std::time::Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("no DNS answer")
        .unwrap();
    // The connection's record is written when it ends.
    let mut page = String::new();
    for _ in 0..50 {
        page = gw.metrics().await;
        if page.contains("sluice_bytes_total") && page.contains("sluice_dns_queries_total") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (ok, out) = promtool(&["check", "metrics"], dir.path(), Some(&page));
    assert!(ok, "promtool check metrics:\n{out}\n{page}");

    let scraped: BTreeSet<String> = page
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let alerts = std::fs::read_to_string(prometheus.join("sluice-alerts.yml")).unwrap();
    let named: BTreeSet<String> = metric_names(&alerts)
        .into_iter()
        .chain(queries.iter().flat_map(|q| metric_names(q)))
        .collect();
    assert!(named.len() >= 10, "{named:?}");
    for name in &named {
        assert!(
            scraped.contains(name),
            "{name} is named by the dashboard or the alerts but not in a scrape:\n{page}"
        );
    }
    // And the reasons they name are sluice's own.
    let reasons: BTreeSet<&str> = sluice::deny::Deny::ALL.iter().map(|d| d.as_str()).collect();
    let text = alerts + &queries.join("\n");
    for part in text.split("reason=").skip(1) {
        let value = part.trim_start_matches('~').trim_start_matches('"');
        let value = &value[..value.find('"').unwrap()];
        for reason in value.split('|') {
            assert!(
                reasons.contains(reason),
                "unknown reason {reason} in {value}"
            );
        }
    }
}
