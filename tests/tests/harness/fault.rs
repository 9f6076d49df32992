//! Self-tests for the fault proxy: it counts bytes, throttling really slows traffic, a cut
//! really breaks an in-flight download, refusing and stalling really do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use imgfleet_tests::images::{ImageSpec, push_image};
use imgfleet_tests::{FaultProxy, Registry, RegistryOptions, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A server that echoes whatever it receives.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A server that sends `total` bytes (or forever for `None`) to every connection.
async fn source_server(total: Option<u64>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let chunk = vec![0xA5u8; 64 * 1024];
                let mut sent = 0u64;
                while total.is_none_or(|t| sent < t) {
                    let n = total.map_or(chunk.len() as u64, |t| (t - sent).min(chunk.len() as u64))
                        as usize;
                    if s.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    sent += n as u64;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn counts_bytes_in_both_directions() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let msg = vec![7u8; 10_000];
    s.write_all(&msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, msg);
    assert_eq!(proxy.connections(), 1);
    assert_eq!(proxy.bytes_to_upstream(), 10_000);
    assert_eq!(proxy.bytes_to_client(), 10_000);
    assert_eq!(proxy.bytes_forwarded(), 20_000);
    drop(s);
    wait_until("connection closed", Duration::from_secs(5), || async {
        Ok(proxy.connections() == 0)
    })
    .await
    .unwrap();
    assert_eq!(proxy.total_connections(), 1);
    proxy.reset_counters();
    assert_eq!(proxy.bytes_forwarded(), 0);
}

#[tokio::test]
async fn throttle_really_slows_traffic() {
    const TOTAL: u64 = 1024 * 1024;
    let proxy = FaultProxy::start(source_server(Some(TOTAL)).await)
        .await
        .unwrap();
    proxy.set_throttle(Some(256 * 1024));
    let start = Instant::now();
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    let elapsed = start.elapsed();
    assert_eq!(got.len() as u64, TOTAL);
    assert!(got.iter().all(|&b| b == 0xA5));
    // 1 MiB at 256 KiB/s is 4 s; only a lower bound is robust on a busy machine.
    assert!(
        elapsed >= Duration::from_secs(3),
        "1 MiB at 256 KiB/s took only {elapsed:?}"
    );

    // Lifting the throttle makes the same transfer fast again.
    proxy.set_throttle(None);
    let start = Instant::now();
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    got.clear();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len() as u64, TOTAL);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "unthrottled took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn cut_breaks_an_in_flight_blob_download() {
    let reg = Registry::start(RegistryOptions::default()).await.unwrap();
    let pushed = push_image(
        &reg,
        "cut/me",
        "v1",
        &ImageSpec::random(&[8 * 1024 * 1024], 11),
    )
    .await
    .unwrap();
    let upstream: SocketAddr = reg.addr().parse().unwrap();
    let proxy = FaultProxy::start(upstream).await.unwrap();
    // Slow enough that the download is surely in flight when we cut.
    proxy.set_throttle(Some(1024 * 1024));
    let url = format!(
        "http://{}/v2/cut/me/blobs/{}",
        proxy.addr(),
        pushed.layer_digests[0]
    );
    let resp = reg.http_client().get(&url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut resp = resp;
    let mut received = 0u64;
    let mut cut_done = false;
    let result = loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                received += c.len() as u64;
                if !cut_done && received >= 256 * 1024 {
                    proxy.cut();
                    cut_done = true;
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(
        result.is_err(),
        "download of 8 MiB completed after a cut ({received} bytes)"
    );
    assert!(received < 8 * 1024 * 1024);
    wait_until("cut connections gone", Duration::from_secs(5), || async {
        Ok(proxy.connections() == 0)
    })
    .await
    .unwrap();

    // A cut only affects live connections: a new download works.
    proxy.set_throttle(None);
    let body = reg
        .http_client()
        .get(&url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.len(), 8 * 1024 * 1024);
}

#[tokio::test]
async fn refuse_makes_new_connections_fail() {
    let reg = Registry::start(RegistryOptions::default()).await.unwrap();
    let proxy = FaultProxy::start(reg.addr().parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}/v2/", proxy.addr());
    // A fresh client per request so no pooled connection hides the refusal.
    let fresh = || {
        reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    assert_eq!(
        fresh().get(&url).send().await.unwrap().status().as_u16(),
        200
    );
    proxy.set_refuse(true);
    for _ in 0..3 {
        let err = fresh()
            .get(&url)
            .send()
            .await
            .expect_err("a refused connection must fail");
        assert!(err.is_connect() || err.is_request(), "{err:?}");
    }
    assert_eq!(
        proxy.total_connections(),
        1,
        "refused connections are not forwarded"
    );
    proxy.set_refuse(false);
    assert_eq!(
        fresh().get(&url).send().await.unwrap().status().as_u16(),
        200
    );
}

#[tokio::test]
async fn stall_stops_progress_and_unstall_resumes() {
    let proxy = FaultProxy::start(source_server(None).await).await.unwrap();
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            r.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    wait_until("data flows", Duration::from_secs(5), || async {
        Ok(received.load(Ordering::Relaxed) > 1 << 20)
    })
    .await
    .unwrap();
    proxy.set_stall(true);
    // The upstream keeps sending, so the pump towards the client soon holds a piece it may
    // not forward: from then on nothing passes. What it forwarded before arrives.
    wait_until(
        "the proxy holding data back",
        Duration::from_secs(5),
        || async { Ok(proxy.held_by_stall() == 1) },
    )
    .await
    .unwrap();
    let fwd = proxy.bytes_forwarded();
    wait_until(
        "what was forwarded arriving",
        Duration::from_secs(5),
        || async { Ok(received.load(Ordering::Relaxed) == proxy.bytes_to_client()) },
    )
    .await
    .unwrap();
    let got = received.load(Ordering::Relaxed);
    assert_eq!(
        proxy.bytes_forwarded(),
        fwd,
        "bytes forwarded while stalled"
    );
    assert_eq!(proxy.held_by_stall(), 1, "the stall holds its data back");
    assert_eq!(proxy.connections(), 1, "a stall keeps the connection open");

    proxy.set_stall(false);
    wait_until("data flows again", Duration::from_secs(5), || async {
        Ok(received.load(Ordering::Relaxed) > got + (1 << 20))
    })
    .await
    .unwrap();
    drop(proxy);
    // Dropping the proxy closes its connections.
    tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("reader ends after proxy drop")
        .unwrap();
}
