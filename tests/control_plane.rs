//! The control plane's launch lifecycle with a fake launcher (passed in
//! through `app::Options`), so it runs without root or runsc: a launch that
//! fails at each step leaves no registration, no stored record and no held
//! address; exec and DELETE reach the launcher; the reaper stops an expired
//! launched sandbox; and after a restart, reconciliation destroys the
//! sandboxes that no longer run and stops the pieces of expired ones.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use sluice::app::Options;
use sluice::identity::LaunchRecord;
use sluice::net::orig_dst::OrigDstSource;
use sluice::sandbox::{ExecOutput, LaunchError, LaunchSpec, Launcher};
use support::*;

/// A launcher that starts nothing: it remembers what runs, what was
/// stopped, and fails `start` on request.
#[derive(Default)]
struct Fake {
    running: Mutex<HashSet<String>>,
    stopped: Mutex<Vec<String>>,
    fail_start: AtomicBool,
}

impl Fake {
    fn running(&self) -> HashSet<String> {
        self.running.lock().unwrap().clone()
    }
    fn stopped(&self) -> Vec<String> {
        self.stopped.lock().unwrap().clone()
    }
}

impl Launcher for Fake {
    fn start<'a>(
        &'a self,
        spec: &'a LaunchSpec,
    ) -> BoxFuture<'a, Result<LaunchRecord, LaunchError>> {
        Box::pin(async move {
            if self.fail_start.load(Ordering::SeqCst) {
                return Err(LaunchError::Failed("injected: the runtime refused".into()));
            }
            self.running
                .lock()
                .unwrap()
                .insert(spec.container_id.clone());
            Ok(LaunchRecord {
                netns: format!("ns-{}", spec.container_id),
                host_veth: "veth-fake".into(),
                bundle: "/nonexistent/bundle".into(),
                gateway_ip: spec.gateway_ip,
            })
        })
    }

    fn exec<'a>(
        &'a self,
        id: &'a str,
        _record: &'a LaunchRecord,
        _env: &'a [String],
        command: &'a [String],
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<ExecOutput, LaunchError>> {
        Box::pin(async move {
            Ok(ExecOutput {
                exit_code: 0,
                stdout: format!("{id}: {}", command.join(" ")),
                stderr: String::new(),
            })
        })
    }

    fn stop<'a>(&'a self, id: &'a str, _record: &'a LaunchRecord) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.running.lock().unwrap().remove(id);
            self.stopped.lock().unwrap().push(id.to_owned());
        })
    }

    fn is_running<'a>(&'a self, id: &'a str, _record: &'a LaunchRecord) -> BoxFuture<'a, bool> {
        Box::pin(async move { self.running.lock().unwrap().contains(id) })
    }
}

/// One address for sandboxes (198.18.9.2): a leaked one shows at once.
const ONE: &str = "198.18.9.0/30";

async fn gateway(dir: tempfile::TempDir, fake: &Arc<Fake>, subnet: &str) -> Gw {
    let mut config = test_config(dir.path());
    config.sandbox.subnet = subnet.parse().unwrap();
    config.sandbox.reap_after_s = 0;
    let running = sluice::app::run(
        config,
        Options {
            orig_dst: OrigDstSource::Fixed("127.0.0.1:9".parse().unwrap()),
            launcher: Some(Arc::clone(fake) as Arc<dyn Launcher>),
        },
    )
    .await
    .unwrap();
    Gw { running, dir }
}

fn launch(ttl: u64) -> Option<Value> {
    Some(
        json!({"user_id": "u", "allowed_hosts": ["api.test"], "command": ["sleep", "60"], "ttl_seconds": ttl}),
    )
}

async fn listed(gw: &Gw) -> Vec<String> {
    let (_, body) = gw.admin("GET", "/v1/sandboxes", None).await;
    body["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["container_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn stored(gw: Gw) -> (Vec<String>, tempfile::TempDir) {
    let Gw { running, dir } = gw;
    running.shutdown().await;
    let snap = sluice::identity::store::Store::open(dir.path())
        .unwrap()
        .load()
        .unwrap();
    (
        snap.sandboxes.into_iter().map(|r| r.container_id).collect(),
        dir,
    )
}

#[tokio::test]
async fn a_failed_launch_leaves_nothing_and_a_good_one_runs_execs_and_goes() {
    let fake = Arc::new(Fake::default());
    let gw = gateway(tempfile::tempdir().unwrap(), &fake, ONE).await;

    // The runtime fails: 500, nothing registered, the address released.
    fake.fail_start.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        let (status, body) = gw.admin("POST", "/v1/sandboxes/launch", launch(600)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (500, Some("launch_failed")),
            "{body}"
        );
        assert!(listed(&gw).await.is_empty());
    }
    // A bad request: refused before anything is made.
    let (status, _) = gw
        .admin(
            "POST",
            "/v1/sandboxes/launch",
            Some(json!({"user_id": "u", "allowed_hosts": ["*"], "command": ["x"]})),
        )
        .await;
    assert_eq!(status, 400);

    // Now it works: the one address is free again.
    fake.fail_start.store(false, Ordering::SeqCst);
    let (status, body) = gw.admin("POST", "/v1/sandboxes/launch", launch(600)).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["source_ip"], "198.18.9.2");
    let id = body["container_id"].as_str().unwrap().to_owned();
    assert_eq!(fake.running(), HashSet::from([id.clone()]));
    // The subnet is full now.
    let (status, body) = gw.admin("POST", "/v1/sandboxes/launch", launch(600)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("subnet_exhausted"))
    );

    let (status, body) = gw
        .admin(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"command": ["echo", "hi"]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stdout"], format!("{id}: echo hi"));

    let (status, _) = gw
        .admin("DELETE", &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(status, 204);
    assert_eq!(fake.stopped(), vec![id]);
    assert!(fake.running().is_empty());
    let (ids, _) = stored(gw).await;
    assert!(ids.is_empty(), "records left on disk: {ids:?}");
}

#[tokio::test]
async fn the_reaper_stops_an_expired_launched_sandbox() {
    let fake = Arc::new(Fake::default());
    let gw = gateway(tempfile::tempdir().unwrap(), &fake, ONE).await;
    let (status, body) = gw.admin("POST", "/v1/sandboxes/launch", launch(1)).await;
    assert_eq!(status, 201, "{body}");
    let id = body["container_id"].as_str().unwrap().to_owned();
    let start = Instant::now();
    while fake.stopped().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "not reaped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(fake.stopped(), vec![id]);
    assert!(listed(&gw).await.is_empty());
    let (ids, _) = stored(gw).await;
    assert!(ids.is_empty(), "{ids:?}");
}

#[tokio::test]
async fn a_restart_reconciles_what_no_longer_runs_and_what_expired() {
    let fake = Arc::new(Fake::default());
    // Three addresses this time.
    let gw = gateway(tempfile::tempdir().unwrap(), &fake, "198.18.9.0/29").await;
    let mut ids = Vec::new();
    for ttl in [600, 600, 2] {
        let (status, body) = gw.admin("POST", "/v1/sandboxes/launch", launch(ttl)).await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["container_id"].as_str().unwrap().to_owned());
    }
    let (kept, gone, expired) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
    let Gw { running, dir } = gw;
    running.shutdown().await;
    // While it was down: one sandbox died, and one token expired (exp is
    // in whole seconds: 2 s after minting, past it only a second later).
    fake.running.lock().unwrap().remove(&gone);
    tokio::time::sleep(Duration::from_millis(3200)).await;

    let gw = gateway(dir, &fake, "198.18.9.0/29").await;
    assert_eq!(listed(&gw).await, vec![kept.clone()]);
    let stopped = fake.stopped();
    assert!(
        stopped.contains(&gone),
        "the dead one cleaned up: {stopped:?}"
    );
    assert!(
        stopped.contains(&expired),
        "the expired one's pieces removed: {stopped:?}"
    );
    assert!(!stopped.contains(&kept));
    let (ids, _) = stored(gw).await;
    assert_eq!(ids, vec![kept]);
}
