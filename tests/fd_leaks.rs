//! No path leaks a file descriptor: after many allowed, denied, timed-out
//! and reset connections the process holds what it held before. (Its own
//! test binary: descriptor counts are process-wide.)

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::*;
use tokio::io::AsyncWriteExt;

/// This process's descriptors, less the empty pipes the relay keeps
/// pooled for reuse (bounded by `relay::POOL_MAX`): what is left must
/// return to its baseline, or something leaked.
fn open_fds() -> usize {
    let all = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    all.saturating_sub(2 * sluice::proxy::relay::pooled_pipes())
}

async fn one_round(gw: &Gw, up: &Upstream) {
    let port = up.addr.port();
    let requests: Vec<(&str, Vec<u8>)> = vec![
        (
            "127.0.0.1",
            b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n".to_vec(),
        ),
        (
            "127.0.0.2",
            b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n".to_vec(),
        ),
        ("127.0.0.1", b"SSH-2.0-x\r\n".to_vec()),
        ("127.0.0.1", b"GET / HT".to_vec()),
        ("127.0.0.1", capture("clienthello-curl.bin")),
        (
            "127.0.0.1",
            b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
                .to_vec(),
        ),
    ];
    let mut tasks = Vec::new();
    for (src, bytes) in requests {
        let mut s = gw.connect_from(src).await;
        tasks.push(tokio::spawn(async move {
            let _ = s.write_all(&bytes).await;
            read_all(&mut s).await
        }));
    }
    // Two allowed ones: one closes cleanly after its answer, one resets.
    for reset in [false, true] {
        let mut s = gw.connect_from("127.0.0.1").await;
        s.write_all(format!("GET / HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
        if reset {
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        drop(s);
    }
    for t in tasks {
        let _ = t.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_descriptor_outlives_its_connection() {
    let up = http_upstream().await;
    let gw = start(up.addr, |c| c.gateway.peek_timeout_ms = 200).await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&format!("api.test:{}", up.addr.port())],
        600,
    )
    .await;
    // Warm up: the runtime, resolver and caches make their descriptors once.
    one_round(&gw, &up).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let baseline = open_fds();
    for _ in 0..20 {
        one_round(&gw, &up).await;
    }
    // Lingering closes take up to 500 ms.
    let mut now = open_fds();
    for _ in 0..40 {
        if now <= baseline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = open_fds();
    }
    assert!(
        now <= baseline,
        "descriptors: {baseline} before, {now} after"
    );
}
