//! The mirror against hostile and broken clients, over raw TCP: a half-sent
//! request head is cut after the header timeout, an idle kept-alive
//! connection after the idle timeout, a client that stops reading after the
//! stall timeout; the connection limit holds with backpressure and idle
//! connections make room; oversized heads, bodies and writes are refused.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use imgfleet_agent::mirror::{Limits, Stats};
use imgfleet_tests::images::{ImageSpec, PushedImage};
use imgfleet_tests::registry::{Registry, RegistryOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: u64 = 1024 * 1024;

/// A mirror over a store holding one image with a `layer_size` layer.
async fn mirror_with(
    layer_size: u64,
    limits: Limits,
) -> (Registry, tempfile::TempDir, Mirror, Arc<Stats>, PushedImage) {
    let reg = Registry::start(RegistryOptions::plain()).await.unwrap();
    let pushed = push(
        &reg,
        "demo/app",
        "v1",
        &ImageSpec::random(&[layer_size], 71),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    sync_v1(&engine, &reg, "demo/app", &pushed).await;
    let (mirror, stats) = start_mirror_with(engine.store().clone(), limits).await;
    (reg, dir, mirror, stats, pushed)
}

/// Reads until the server closes (or `limit` passes); returns the bytes.
async fn read_to_close(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server did not close the connection within {limit:?}"),
        }
    }
}

/// GETs `/v2/` (giving it 30 s), checks it answers 200 and says how long
/// that took.
async fn api_root_answers(mirror: &Mirror) -> Duration {
    let started = Instant::now();
    let r = reqwest::Client::new()
        .get(format!("http://{}/v2/", mirror.addr))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    started.elapsed()
}

fn head_request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n")
}

#[tokio::test]
async fn a_half_sent_request_head_is_cut_after_the_header_timeout() {
    let limits = Limits {
        header_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let (_reg, _dir, mirror, stats, _) = mirror_with(1000, limits).await;
    let mut s = TcpStream::connect(mirror.addr).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: mir")
        .await
        .unwrap();
    let started = Instant::now();
    let got = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(got.is_empty(), "answered a half-sent request: {got:?}");
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(stats.header_timeouts.load(Ordering::Relaxed), 1);
    // A client that trickles its head one byte at a time is cut the same way.
    let mut s = TcpStream::connect(mirror.addr).await.unwrap();
    let slow = tokio::spawn(async move {
        // One byte every 100 ms: the head takes longer than the timeout.
        let mut every = tokio::time::interval(Duration::from_millis(100));
        for b in b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nX-Pad: aaaaaaaaaaaaaaaaaaaa\r\n\r\n" {
            every.tick().await;
            if s.write_all(&[*b]).await.is_err() {
                return true;
            }
        }
        false
    });
    assert!(slow.await.unwrap(), "a trickled head was served");
    assert_eq!(stats.header_timeouts.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn kept_alive_connections_serve_pipelined_requests_then_idle_out() {
    let limits = Limits {
        idle_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let (_reg, _dir, mirror, stats, pushed) = mirror_with(1000, limits).await;
    let mut s = TcpStream::connect(mirror.addr).await.unwrap();
    // Two requests in one write: both answered, in order, on one connection.
    let two = format!(
        "{}{}",
        head_request("/v2/"),
        head_request("/v2/demo/app/manifests/v1")
    );
    s.write_all(two.as_bytes()).await.unwrap();
    let got = read_to_close(&mut s, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(
        got.ends_with(&pushed.manifest_bytes),
        "the second answer is the manifest"
    );
    assert_eq!(stats.idle_closed.load(Ordering::Relaxed), 1);
    assert_eq!(stats.requests.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_the_stall_timeout() {
    let limits = Limits {
        stall_timeout: Duration::from_millis(800),
        send_buffer: 32 * 1024,
        ..Limits::default()
    };
    let size = 8 * MIB;
    let (_reg, _dir, mirror, stats, pushed) = mirror_with(size, limits).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(32 * 1024).unwrap();
    let mut s = socket.connect(mirror.addr).await.unwrap();
    let path = format!("/v2/demo/app/blobs/{}", pushed.layer_digests[0]);
    s.write_all(head_request(&path).as_bytes()).await.unwrap();
    // Read nothing until the server has given up on us.
    wait_for(
        "the mirror to cut a client that reads nothing",
        Duration::from_secs(20),
        || stats.stalled.load(Ordering::Relaxed) > 0,
    )
    .await;
    let got = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(
        (got.len() as u64) < size / 2,
        "{} of {size} bytes were buffered for a client that read nothing",
        got.len()
    );
    wait_for("the cut connection closed", Duration::from_secs(10), || {
        stats.open.load(Ordering::Relaxed) == 0
    })
    .await;
}

#[tokio::test]
async fn the_connection_limit_holds_and_idle_connections_make_room() {
    let limits = Limits {
        max_connections: 4,
        // Only the limit closes the idle connections in this test.
        header_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let (_reg, _dir, mirror, stats, _) = mirror_with(1000, limits).await;
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(TcpStream::connect(mirror.addr).await.unwrap());
    }
    wait_for("4 connections accepted", Duration::from_secs(10), || {
        stats.open.load(Ordering::Relaxed) == 4
    })
    .await;
    // A real client still gets its answer: connections idle for over a
    // second are closed to make room, and the limit is never exceeded.
    let took = api_root_answers(&mirror).await;
    eprintln!("figures: served after {took:?} at the limit");
    assert!(stats.drained.load(Ordering::Relaxed) >= 1);
    assert!(stats.peak.load(Ordering::Relaxed) <= 4, "limit exceeded");
}

#[tokio::test]
async fn busy_connections_are_not_drained_new_ones_wait_for_room() {
    let limits = Limits {
        max_connections: 2,
        stall_timeout: Duration::from_secs(2),
        send_buffer: 32 * 1024,
        ..Limits::default()
    };
    let (_reg, _dir, mirror, stats, pushed) = mirror_with(8 * MIB, limits).await;
    let path = format!("/v2/demo/app/blobs/{}", pushed.layer_digests[0]);
    let mut readers = Vec::new();
    for _ in 0..2 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(32 * 1024).unwrap();
        let mut s = socket.connect(mirror.addr).await.unwrap();
        s.write_all(head_request(&path).as_bytes()).await.unwrap();
        readers.push(s);
    }
    wait_for("2 responses in progress", Duration::from_secs(10), || {
        stats.requests.load(Ordering::Relaxed) == 2
    })
    .await;
    // The third client waits in the backlog until the stalled ones are cut.
    let waited = api_root_answers(&mirror).await;
    assert!(
        waited >= Duration::from_secs(1),
        "served after {waited:?}: a busy connection was dropped for it"
    );
    // It got in when the first stuck download was cut; the other follows.
    assert!(stats.stalled.load(Ordering::Relaxed) >= 1);
    wait_for("both stuck downloads cut", Duration::from_secs(10), || {
        stats.stalled.load(Ordering::Relaxed) == 2
    })
    .await;
    assert_eq!(stats.drained.load(Ordering::Relaxed), 0);
    assert!(stats.peak.load(Ordering::Relaxed) <= 2);
}

#[tokio::test]
async fn many_clients_that_never_read_leave_the_api_responsive() {
    let limits = Limits {
        send_buffer: 64 * 1024,
        ..Limits::default()
    };
    let (_reg, _dir, mirror, stats, pushed) = mirror_with(4 * MIB, limits).await;
    let path = format!("/v2/demo/app/blobs/{}", pushed.layer_digests[0]);
    let mut clients = Vec::new();
    for _ in 0..200 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        let mut s = socket.connect(mirror.addr).await.unwrap();
        s.write_all(head_request(&path).as_bytes()).await.unwrap();
        clients.push(s);
    }
    wait_for("200 responses in progress", Duration::from_secs(30), || {
        stats.requests.load(Ordering::Relaxed) >= 200
    })
    .await;
    let http = reqwest::Client::new();
    for _ in 0..5 {
        let started = Instant::now();
        let r = http
            .get(format!("http://{}/v2/", mirror.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        eprintln!(
            "figures: GET /v2/ in {:?} beside 200 stuck downloads",
            started.elapsed()
        );
    }
    assert_eq!(
        stats.stalled.load(Ordering::Relaxed),
        0,
        "cut before the stall timeout"
    );
}

#[tokio::test]
async fn malformed_oversized_and_writing_requests_are_refused() {
    let (_reg, _dir, mirror, stats, _) = mirror_with(1000, Limits::default()).await;
    let exchange = |raw: Vec<u8>| async move {
        let mut s = TcpStream::connect(mirror.addr).await.unwrap();
        let _ = s.write_all(&raw).await;
        String::from_utf8_lossy(&read_to_close(&mut s, Duration::from_secs(10)).await).to_string()
    };
    let huge = format!(
        "GET /v2/ HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    let answer = exchange(huge.into_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    let answer = exchange(b"GET /v2/ HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody".to_vec()).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let answer =
        exchange(b"PUT /v2/demo/app/manifests/v1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec())
            .await;
    assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
    assert!(answer.contains("Allow: GET, HEAD"), "{answer}");
    assert!(answer.contains("\"UNSUPPORTED\""), "{answer}");
    let answer = exchange(b"\x16\x03\x01garbage\r\n\r\n".to_vec()).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert_eq!(stats.bad_requests.load(Ordering::Relaxed), 3);
}
