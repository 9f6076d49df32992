//! A fault-injecting TCP proxy: put it between a client and a server, then on command cut
//! every live connection, refuse new ones, stall all traffic or throttle it to N bytes/s.
//! It counts the bytes it forwards in each direction.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Largest piece forwarded at once.
const BUF_SIZE: usize = 16 * 1024;
/// How long connecting to the upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest sleep while waiting for throttle tokens, so rate changes take effect quickly.
const MAX_THROTTLE_SLEEP: Duration = Duration::from_millis(50);

#[derive(Debug)]
struct Bucket {
    rate: Option<u64>,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// At most a tenth of a second of traffic may pass in one burst.
    fn burst(rate: u64) -> f64 {
        (rate as f64 / 10.0).max(1.0)
    }
}

#[derive(Debug)]
struct Shared {
    to_upstream: AtomicU64,
    to_client: AtomicU64,
    refuse: AtomicBool,
    live: AtomicUsize,
    accepted: AtomicU64,
    /// Pumps holding a piece they read while stalled, waiting for the stall to end.
    held: AtomicUsize,
    stall: watch::Sender<bool>,
    cut: watch::Sender<u64>,
    bucket: Mutex<Bucket>,
    upstream: Mutex<SocketAddr>,
}

impl Shared {
    fn max_read(&self) -> usize {
        match self.bucket.lock().unwrap_or_else(|e| e.into_inner()).rate {
            // Keep each piece within one burst so throttled traffic flows smoothly.
            Some(rate) => (Bucket::burst(rate) as usize).clamp(1, BUF_SIZE),
            None => BUF_SIZE,
        }
    }

    /// Waits until `n` bytes may pass under the current throttle.
    async fn take_tokens(&self, n: usize) {
        loop {
            let wait = {
                let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
                let Some(rate) = b.rate else { return };
                let now = Instant::now();
                let burst = Bucket::burst(rate);
                b.tokens =
                    (b.tokens + now.duration_since(b.last).as_secs_f64() * rate as f64).min(burst);
                b.last = now;
                // A piece read before the rate dropped may exceed a burst: let it go into debt
                // once a full burst is available, so it cannot wait forever.
                let need = (n as f64).min(burst);
                if b.tokens >= need {
                    b.tokens -= n as f64;
                    return;
                }
                Duration::from_secs_f64((need - b.tokens) / rate as f64)
            };
            tokio::time::sleep(wait.min(MAX_THROTTLE_SLEEP)).await;
        }
    }
}

/// A TCP proxy on a free 127.0.0.1 port forwarding to an upstream address, with faults on
/// command. Dropping it stops it and closes every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream())
            .field("connections", &self.connections())
            .field("bytes_forwarded", &self.bytes_forwarded())
            .finish()
    }
}

impl FaultProxy {
    /// Starts the proxy on a free 127.0.0.1 port, forwarding every connection to `upstream`.
    /// Must be called inside a tokio runtime; the proxy runs on it.
    pub async fn start(upstream: SocketAddr) -> Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the fault proxy on 127.0.0.1:0")?;
        let addr = listener.local_addr().context("fault proxy local_addr")?;
        let shared = Arc::new(Shared {
            to_upstream: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            refuse: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            held: AtomicUsize::new(0),
            stall: watch::Sender::new(false),
            cut: watch::Sender::new(0),
            bucket: Mutex::new(Bucket {
                rate: None,
                tokens: 0.0,
                last: Instant::now(),
            }),
            upstream: Mutex::new(upstream),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy { addr, shared, task })
    }

    /// The proxy's listening address (127.0.0.1:PORT); point clients here.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream new connections go to.
    pub fn upstream(&self) -> SocketAddr {
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Sends new connections to another upstream (live ones stay where they are).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = upstream;
    }

    /// Bytes forwarded in both directions since start (or the last reset).
    pub fn bytes_forwarded(&self) -> u64 {
        self.bytes_to_upstream() + self.bytes_to_client()
    }

    /// Bytes forwarded from clients to the upstream.
    pub fn bytes_to_upstream(&self) -> u64 {
        self.shared.to_upstream.load(Ordering::Relaxed)
    }

    /// Bytes forwarded from the upstream to clients.
    pub fn bytes_to_client(&self) -> u64 {
        self.shared.to_client.load(Ordering::Relaxed)
    }

    /// Sets both byte counters to zero.
    pub fn reset_counters(&self) {
        self.shared.to_upstream.store(0, Ordering::Relaxed);
        self.shared.to_client.store(0, Ordering::Relaxed);
    }

    /// Connections currently open through the proxy.
    pub fn connections(&self) -> usize {
        self.shared.live.load(Ordering::Relaxed)
    }

    /// Connections accepted and forwarded since start (refused ones are not counted).
    pub fn total_connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Closes every live connection now, with a TCP reset on both sides. New connections
    /// are still accepted (combine with [`FaultProxy::set_refuse`] for an outage).
    pub fn cut(&self) {
        self.shared.cut.send_modify(|epoch| *epoch += 1);
    }

    /// While `true`, new connections are accepted and immediately reset; live ones go on.
    pub fn set_refuse(&self, refuse: bool) {
        self.shared.refuse.store(refuse, Ordering::SeqCst);
    }

    /// While `true`, no byte is forwarded in either direction, but connections stay open
    /// (a hung peer or a black-holed network). `false` resumes.
    pub fn set_stall(&self, stall: bool) {
        self.shared.stall.send_replace(stall);
    }

    /// How many directions of live connections hold a piece they read while stalled and
    /// wait for the stall to end: once every direction that has data does, nothing more
    /// passes until [`FaultProxy::set_stall`] lets it.
    pub fn held_by_stall(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// Limits the traffic of all connections together, both directions, to `bytes_per_sec`
    /// (token bucket with a burst of a tenth of a second); `None` lifts the limit.
    pub fn set_throttle(&self, bytes_per_sec: Option<u64>) {
        let mut b = self.shared.bucket.lock().unwrap_or_else(|e| e.into_inner());
        b.rate = bytes_per_sec.map(|r| r.max(1));
        b.tokens = 0.0;
        b.last = Instant::now();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    // Out of file descriptors and the like: back off rather than spin.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                if shared.refuse.load(Ordering::SeqCst) {
                    let _ = client.set_zero_linger();
                    drop(client);
                    continue;
                }
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                conns.spawn(handle(client, shared.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Decrements the live-connection count however the connection task ends.
struct LiveGuard(Arc<Shared>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle(mut client: TcpStream, shared: Arc<Shared>) {
    shared.live.fetch_add(1, Ordering::Relaxed);
    let _guard = LiveGuard(shared.clone());
    // Subscribe first, so only cuts from now on close this connection.
    let mut cut = shared.cut.subscribe();
    let upstream_addr = *shared.upstream.lock().unwrap_or_else(|e| e.into_inner());
    let connected = tokio::select! {
        c = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream_addr)) => c,
        _ = cut.changed() => {
            let _ = client.set_zero_linger();
            return;
        }
    };
    let mut upstream = match connected {
        Ok(Ok(s)) => s,
        _ => {
            // The upstream is down: the client sees a reset, as it would without the proxy.
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let cut_now = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let up = pump(&mut cr, &mut uw, &shared, &shared.to_upstream);
        let down = pump(&mut ur, &mut cw, &shared, &shared.to_client);
        tokio::select! {
            _ = async { tokio::join!(up, down) } => false,
            _ = cut.changed() => true,
        }
    };
    if cut_now {
        // A reset, not a clean end of stream, so the peers see a broken connection.
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
}

/// Copies one direction until end of stream or an error, honouring stall and throttle, then
/// half-closes the writer so the other side sees the end too.
async fn pump<R, W>(reader: &mut R, writer: &mut W, shared: &Shared, counter: &AtomicU64)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut stall = shared.stall.subscribe();
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let max = shared.max_read();
        let n = match reader.read(&mut buf[..max]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if *stall.borrow_and_update() {
            shared.held.fetch_add(1, Ordering::SeqCst);
            let resumed = stall.wait_for(|s| !*s).await.is_ok();
            shared.held.fetch_sub(1, Ordering::SeqCst);
            if !resumed {
                break;
            }
        }
        shared.take_tokens(n).await;
        if writer.write_all(&buf[..n]).await.is_err() {
            break;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = writer.shutdown().await;
}
