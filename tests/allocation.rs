//! No input of 10 KiB or less makes the gateway allocate more than 1 MiB:
//! a counting global allocator tracks live bytes, and for each hostile
//! input (sent whole over one connection, answered and closed) the peak
//! above the live bytes before it must stay under 1 MiB. Its own test
//! binary: the allocator counts the whole process.

#![allow(clippy::unwrap_used)]

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use support::*;
use tokio::io::AsyncWriteExt;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counters only observe sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size
                    - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const LIMIT: usize = 1 << 20;
const INPUT: usize = 10 * 1024;

/// Hostile inputs of exactly 10 KiB.
fn inputs(port: u16) -> Vec<(&'static str, Vec<u8>)> {
    let pad = |mut v: Vec<u8>, fill: u8| {
        v.resize(INPUT, fill);
        v
    };
    let mut hello_claiming_16k = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc];
    hello_claiming_16k.resize(INPUT, 0);
    let mut tiny_records = Vec::new();
    while tiny_records.len() + 6 <= INPUT {
        tiny_records.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x01, 0x01]);
    }
    let many_headers: String = (0..2000).map(|i| format!("X{i}: y\r\n")).collect();
    let chunks =
        format!("POST / HTTP/1.1\r\nHost: api.test:{port}\r\nTransfer-Encoding: chunked\r\n\r\n");
    let mut chunked = chunks.into_bytes();
    while chunked.len() + 6 <= INPUT {
        chunked.extend_from_slice(b"1\r\nx\r\n");
    }
    let one_line = format!(
        "GET /{} HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n",
        "a".repeat(INPUT - 60)
    );
    vec![
        ("a TLS record claiming 16 KiB", hello_claiming_16k),
        ("a hello in 1-byte records", pad(tiny_records, 0x16)),
        ("garbage", pad(Vec::new(), 0xfe)),
        (
            "an unending HTTP head",
            pad(
                format!("GET / HTTP/1.1\r\nHost: api.test:{port}\r\n{many_headers}").into_bytes(),
                b'a',
            ),
        ),
        ("an HTTP head with a 10 KiB target", one_line.into_bytes()),
        ("a body of 1-byte chunks", pad(chunked, b'0')),
        (
            "a pipelined burst",
            pad(
                format!("GET / HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n")
                    .repeat(200)
                    .into_bytes(),
                b'\n',
            ),
        ),
    ]
}

#[tokio::test(flavor = "current_thread")]
async fn no_small_input_costs_more_than_a_mebibyte() {
    let up = http_upstream().await;
    let gw = start(up.addr, |c| c.gateway.peek_timeout_ms = 500).await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&format!("api.test:{}", up.addr.port())],
        600,
    )
    .await;
    // Warm up every path once (caches, the runtime's own buffers).
    for (_, input) in inputs(up.addr.port()) {
        let mut s = gw.connect_from("127.0.0.1").await;
        let _ = s.write_all(&input).await;
        let _ = s.shutdown().await;
        read_all(&mut s).await;
    }
    for (what, input) in inputs(up.addr.port()) {
        assert!(input.len() <= INPUT, "{what}: {} bytes", input.len());
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let mut s = gw.connect_from("127.0.0.1").await;
        let _ = s.write_all(&input).await;
        let _ = s.shutdown().await;
        read_all(&mut s).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let used = PEAK.load(Ordering::Relaxed).saturating_sub(before);
        eprintln!("{what}: peak {used} bytes above the baseline");
        assert!(used < LIMIT, "{what}: {used} bytes");
    }
}

/// Connections the idle measurement holds, and the ones that warm it up.
const IDLE: usize = 200;
const WARM: usize = 20;

/// Opens `n` connections to the transparent door from 127.0.0.1, each past
/// its ClientHello and the upstream's 8 first bytes, on a thread of its own
/// (the std sockets it returns hold no heap).
fn open_idle(door: std::net::SocketAddr, hello: &[u8], n: usize) -> Vec<std::net::TcpStream> {
    use std::io::{Read, Write};
    let hello = hello.to_vec();
    std::thread::spawn(move || {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            let mut s = std::net::TcpStream::connect(door).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            s.write_all(&hello).unwrap();
            let mut answer = [0u8; 8];
            s.read_exact(&mut answer).unwrap();
            held.push(s);
        }
        held
    })
    .join()
    .unwrap()
}

/// What an idle relayed connection keeps on the heap, all of it (the
/// connection's task, its sockets' registrations, its record and permit):
/// measured as the live bytes the gateway holds for 200 idle TLS
/// connections, per connection. The bound is what keeps it from growing
/// unnoticed; the load bench measures the RSS.
#[tokio::test(flavor = "current_thread")]
async fn an_idle_relayed_connection_holds_little_heap() {
    let hello = capture("clienthello-pq.bin");
    // The upstream: a thread that takes each hello, answers 8 bytes and
    // holds the connection (std sockets: no heap per connection).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = listener.local_addr().unwrap();
    let hello_len = hello.len();
    let upstream = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut held = Vec::with_capacity(IDLE + WARM);
        let mut buf = vec![0u8; hello_len];
        for _ in 0..IDLE + WARM {
            let (mut s, _) = listener.accept().unwrap();
            s.read_exact(&mut buf).unwrap();
            s.write_all(&[0x16; 8]).unwrap();
            held.push(s);
        }
        held
    });
    let gw = start(up, |_| {}).await;
    gw.register(
        "c1",
        "127.0.0.1",
        &[&format!("api.example.test:{}", up.port())],
        600,
    )
    .await;
    let door = gw.running.transparent_addr;
    // Warm up: the first connections make what every later one shares
    // (caches, the pipe pool, the runtime's slabs).
    let (hello2, door2) = (hello.clone(), door);
    let warm = tokio::task::spawn_blocking(move || open_idle(door2, &hello2, WARM))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let before = LIVE.load(Ordering::Relaxed);
    let held = tokio::task::spawn_blocking(move || open_idle(door, &hello, IDLE))
        .await
        .unwrap();
    // Let every connection reach its relay and go idle.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let after = LIVE.load(Ordering::Relaxed);
    let per = after.saturating_sub(before) / IDLE;
    eprintln!("an idle relayed connection holds {per} bytes of heap");
    assert!(
        per <= 2600,
        "an idle relayed connection holds {per} bytes of heap"
    );
    drop((held, warm));
    drop(upstream.join().unwrap());
}
