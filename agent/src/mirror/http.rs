//! The mirror's HTTP/1.1 server: a small, read-only server built for hostile
//! clients and for moving blobs fast.
//!
//! Why not hyper (through axum, as before): the mirror needs what hyper's
//! server does not give: a blob body sent by `sendfile(2)` straight from the
//! page cache, a bound on the bytes each connection holds, cutting a reader
//! that stalls, and admission that stops accepting at a connection limit
//! instead of running out of file descriptors. A read-only registry needs
//! little of HTTP: GET and HEAD without bodies, keep-alive, pipelining. The
//! request head is parsed by `httparse` (hyper's own parser).
//!
//! Per connection, in order:
//!
//! - **Admission.** A connection is accepted only with a permit; at the
//!   limit the accept loop stops (the kernel's backlog holds new clients:
//!   backpressure) and asks connections idle for over a second to close, as
//!   nginx reuses keep-alive connections when it runs out.
//! - **Request head.** A fresh connection has `header_timeout` to send a
//!   whole head; between requests it may stay idle for `idle_timeout`, then
//!   has `header_timeout` from its first byte. At most [`MAX_HEAD`] bytes.
//! - **Response.** Written with no user-space copy of blob bytes: the head,
//!   then `sendfile` from the verified blob. The socket's send buffer is
//!   fixed at `send_buffer` bytes, so a client that does not read holds at
//!   most that much kernel memory and none of ours; a write that cannot make
//!   progress for `stall_timeout` ends the connection.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The largest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 32 * 1024;
/// The most header fields in a request head.
const MAX_HEADERS: usize = 64;
/// What a connection's read buffer starts at; it grows up to [`MAX_HEAD`]
/// only for a request that needs it, and shrinks back after it.
const READ_CHUNK: usize = 4096;
/// How long a connection must have waited for a request before it may be
/// closed to make room at the connection limit.
const DRAIN_AFTER: Duration = Duration::from_secs(1);
/// How often a full accept loop asks idle connections to make room again.
const DRAIN_EVERY: Duration = Duration::from_millis(250);
/// Bytes asked of one `sendfile` call; the kernel sends what fits.
const SENDFILE_CHUNK: u64 = 16 * 1024 * 1024;

/// The mirror's limits against clients that are slow, idle or hostile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more wait in the kernel's backlog. Lowered
    /// at start to what the process's file-descriptor limit allows (each
    /// connection may hold a socket and an open blob) with room left for the
    /// daemon's own files.
    pub max_connections: usize,
    /// Time to send a complete request head, from connecting or from the
    /// first byte of a later request.
    pub header_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Time a response may make no progress (the client reads nothing)
    /// before the connection is cut.
    pub stall_timeout: Duration,
    /// The socket send buffer, in bytes (`SO_SNDBUF`; the kernel doubles it
    /// for its bookkeeping). 0 keeps the kernel's autotuning.
    pub send_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(30),
            send_buffer: 256 * 1024,
        }
    }
}

/// File descriptors kept for the daemon's own use (content store, GC, hub
/// session, metrics, transfers) however many clients connect.
pub const RESERVED_FDS: u64 = 256;

/// Raises the soft file-descriptor limit to the hard one and returns how many
/// connections it leaves room for: each may hold two descriptors (socket
/// and blob), and [`RESERVED_FDS`] stay free.
pub fn connection_budget() -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return usize::MAX;
    };
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    usize::try_from(soft.saturating_sub(RESERVED_FDS) / 2)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// Counters of what the server did, for `/metrics` and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections open now.
    pub open: AtomicU64,
    /// The most connections open at once.
    pub peak: AtomicU64,
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
    /// Connections closed for not sending a request head in time.
    pub header_timeouts: AtomicU64,
    /// Kept-alive connections closed after `idle_timeout`.
    pub idle_closed: AtomicU64,
    /// Connections closed to make room at the connection limit.
    pub drained: AtomicU64,
    /// Connections cut because the client stopped reading a response.
    pub stalled: AtomicU64,
    /// Requests refused as malformed or too large.
    pub bad_requests: AtomicU64,
    /// How long each answered request took, head read to last byte sent.
    pub pulls: PullDurations,
}

/// The `image_pull_duration_seconds` histogram: one series per handler
/// (manifest, blob, tags, base, other) and status code, so a handful.
#[derive(Debug, Clone)]
pub struct PullDurations(pub PullFamily);

/// The histogram family behind [`PullDurations`].
pub type PullFamily = prometheus_client::metrics::family::Family<
    Vec<(&'static str, String)>,
    prometheus_client::metrics::histogram::Histogram,
    fn() -> prometheus_client::metrics::histogram::Histogram,
>;

impl Default for PullDurations {
    fn default() -> Self {
        // From 1 ms (a manifest from the page cache) to about 65 s (a large
        // layer over a slow node link).
        PullDurations(PullFamily::new_with_constructor(|| {
            prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 4.0, 9),
            )
        }))
    }
}

impl PullDurations {
    /// Records one answered request.
    pub fn observe(&self, handler: &'static str, code: u16, took: Duration) {
        self.0
            .get_or_create(&vec![
                ("handler", handler.to_string()),
                ("code", code.to_string()),
            ])
            .observe(took.as_secs_f64());
    }
}

impl Stats {
    fn opened(&self) {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(open, Ordering::Relaxed);
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }
}

/// A request as the handler sees it: parsed once, here. `Debug` never shows
/// the Authorization header.
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent.
    pub method: String,
    /// The path, percent-decoded.
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// The `Authorization` header, if any (a pull token). Never logged.
    pub authorization: Option<String>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query)
            .field("range", &self.range)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A response body.
#[derive(Debug)]
pub enum Body {
    /// Bytes in memory (JSON, errors, small manifests).
    Bytes(Vec<u8>),
    /// A byte range of a verified file, sent with `sendfile`.
    File {
        /// The open file.
        file: File,
        /// First byte.
        offset: u64,
        /// Bytes to send.
        len: u64,
    },
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }
}

/// A response: status, headers and body. `Content-Length` is added from the
/// body; a HEAD answer sends the same headers and no body.
#[derive(Debug)]
pub struct Response {
    /// Status code and reason.
    pub status: (u16, &'static str),
    /// Header fields other than Content-Length and Connection.
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Body,
}

/// What handles one request; runs on the blocking pool (it may open files
/// and rebuild the catalog).
pub type Handler = dyn Fn(&Request) -> Response + Send + Sync;

struct Server {
    limits: Limits,
    handler: Arc<Handler>,
    stats: Arc<Stats>,
    /// Signalled when the accept loop is at the connection limit.
    pressure: Notify,
}

/// Accepts and serves connections until `shutdown`, then lets responses in
/// progress finish for up to `grace` and returns.
pub async fn serve(
    listener: TcpListener,
    limits: Limits,
    handler: Arc<Handler>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    grace: Duration,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let server = Arc::new(Server {
        limits,
        handler,
        stats,
        pressure: Notify::new(),
    });
    let tracker = TaskTracker::new();
    loop {
        let Some(permit) = admit(&server, &permits, &shutdown).await else {
            break;
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                server.stats.opened();
                let server = server.clone();
                let shutdown = shutdown.clone();
                tracker.spawn(async move {
                    Connection::new(stream, &server, peer).run(&shutdown).await;
                    server.stats.open.fetch_sub(1, Ordering::Relaxed);
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of descriptors or memory: the pending connection stays
                // in the backlog and would fail again at once; wait a little.
                tracing::warn!(error = %e, "Mirror could not accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(?grace, "Mirror stopped with responses still in flight");
    }
    Ok(())
}

/// A permit for one more connection: at once when below the limit; at the
/// limit, after asking idle connections to make room (repeatedly, since the
/// ones that may go are those idle for over [`DRAIN_AFTER`]).
async fn admit(
    server: &Server,
    permits: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = permits.clone().try_acquire_owned() {
        return Some(p);
    }
    loop {
        server.pressure.notify_waiters();
        tokio::select! {
            p = permits.clone().acquire_owned() => return p.ok(),
            _ = tokio::time::sleep(DRAIN_EVERY) => {}
            _ = shutdown.cancelled() => return None,
        }
    }
}

/// Why reading a request head ended without one.
#[derive(Debug)]
enum HeadEnd {
    /// The client closed, or the connection must close quietly (idle
    /// timeout, room needed, shutdown).
    Close,
    /// A head that is malformed or too large: answer, then close.
    Bad(u16, &'static str, &'static str),
    /// The head did not arrive in time.
    Timeout,
}

struct Connection<'a> {
    stream: TcpStream,
    server: &'a Server,
    buf: Vec<u8>,
    peer: SocketAddr,
}

impl<'a> Connection<'a> {
    fn new(stream: TcpStream, server: &'a Server, peer: SocketAddr) -> Self {
        let _ = stream.set_nodelay(true);
        if server.limits.send_buffer > 0 {
            use nix::sys::socket::{setsockopt, sockopt::SndBuf};
            if let Err(e) = setsockopt(&stream, SndBuf, &server.limits.send_buffer) {
                tracing::debug!(error = %e, "Cannot set the mirror's socket send buffer");
            }
        }
        Connection {
            stream,
            server,
            buf: Vec::new(),
            peer,
        }
    }

    async fn run(mut self, shutdown: &CancellationToken) {
        let mut fresh = true;
        loop {
            let (request, keep_alive) = match self.read_head(fresh, shutdown).await {
                Ok(r) => r,
                Err(HeadEnd::Close) => return,
                Err(HeadEnd::Timeout) => {
                    self.server
                        .stats
                        .header_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = %self.peer, "Mirror client sent no complete request in time");
                    return;
                }
                Err(HeadEnd::Bad(status, code, message)) => {
                    self.server
                        .stats
                        .bad_requests
                        .fetch_add(1, Ordering::Relaxed);
                    let reply = super::error_response((status, reason(status)), code, message);
                    let _ = self.respond(reply, false, false).await;
                    return;
                }
            };
            fresh = false;
            let started = Instant::now();
            let route = super::handler_label(&request.path);
            let head_only = request.method == "HEAD";
            let handler = self.server.handler.clone();
            let reply = match tokio::task::spawn_blocking(move || handler(&request)).await {
                Ok(r) => r,
                Err(_) => super::error_response(
                    (500, "Internal Server Error"),
                    "UNKNOWN",
                    "internal error",
                ),
            };
            self.server.stats.requests.fetch_add(1, Ordering::Relaxed);
            let code = reply.status.0;
            let sent = self.respond(reply, head_only, keep_alive).await;
            self.server
                .stats
                .pulls
                .observe(route, code, started.elapsed());
            match sent {
                Ok(()) if keep_alive => {}
                Ok(()) => return,
                Err(e) => {
                    if e.kind() == io::ErrorKind::TimedOut {
                        self.server.stats.stalled.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(peer = %self.peer, "Mirror client stopped reading; connection cut");
                    }
                    return;
                }
            }
            if self.buf.capacity() > READ_CHUNK {
                self.buf.shrink_to(READ_CHUNK);
            }
        }
    }

    /// Reads one request head. Returns it with whether the connection stays
    /// open after the answer.
    async fn read_head(
        &mut self,
        fresh: bool,
        shutdown: &CancellationToken,
    ) -> Result<(Request, bool), HeadEnd> {
        let server = self.server;
        let limits = &server.limits;
        let waiting_since = Instant::now();
        // A fresh connection owes a whole head within header_timeout; a kept
        // one may idle first.
        let mut deadline = waiting_since
            + if fresh || !self.buf.is_empty() {
                limits.header_timeout
            } else {
                limits.idle_timeout
            };
        loop {
            if !self.buf.is_empty() {
                match parse_head(&self.buf) {
                    Ok(Some((request, keep_alive, used))) => {
                        self.buf.drain(..used);
                        return Ok((request, keep_alive));
                    }
                    Ok(None) if self.buf.len() >= MAX_HEAD => {
                        return Err(HeadEnd::Bad(
                            431,
                            "SIZE_INVALID",
                            "request head larger than 32 KiB",
                        ));
                    }
                    Ok(None) => {}
                    Err(bad) => return Err(bad),
                }
            }
            let had = self.buf.len();
            self.buf.reserve(READ_CHUNK.min(MAX_HEAD - had));
            let pressure = server.pressure.notified();
            tokio::select! {
                read = self.stream.read_buf(&mut self.buf) => match read {
                    Ok(0) | Err(_) => return Err(HeadEnd::Close),
                    Ok(_) => {
                        if had == 0 && !fresh {
                            // The next request started: it has header_timeout.
                            deadline = Instant::now() + limits.header_timeout;
                        }
                    }
                },
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(if self.buf.is_empty() && !fresh {
                        server.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                        HeadEnd::Close
                    } else {
                        HeadEnd::Timeout
                    });
                }
                _ = pressure => {
                    if waiting_since.elapsed() >= DRAIN_AFTER {
                        server.stats.drained.fetch_add(1, Ordering::Relaxed);
                        return Err(HeadEnd::Close);
                    }
                }
                _ = shutdown.cancelled() => return Err(HeadEnd::Close),
            }
        }
    }

    /// Writes a response; every write must make progress within
    /// `stall_timeout` (else `TimedOut`).
    async fn respond(
        &mut self,
        reply: Response,
        head_only: bool,
        keep_alive: bool,
    ) -> io::Result<()> {
        let stall = self.server.limits.stall_timeout;
        let mut head = format!("HTTP/1.1 {} {}\r\n", reply.status.0, reply.status.1);
        for (name, value) in &reply.headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
        if !keep_alive {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut head = head.into_bytes();
        match reply.body {
            _ if head_only => write_all(&mut self.stream, &head, stall).await?,
            Body::Bytes(bytes) => {
                // One write for head and a small body.
                head.extend_from_slice(&bytes);
                write_all(&mut self.stream, &head, stall).await?;
            }
            Body::File { file, offset, len } => {
                write_all(&mut self.stream, &head, stall).await?;
                send_file(&self.stream, &file, offset, len, stall).await?;
            }
        }
        if !keep_alive {
            let _ = self.stream.shutdown().await;
        }
        Ok(())
    }
}

fn stalled() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the client made no progress")
}

async fn write_all(stream: &mut TcpStream, mut data: &[u8], stall: Duration) -> io::Result<()> {
    while !data.is_empty() {
        let n = tokio::time::timeout(stall, stream.write(data))
            .await
            .map_err(|_| stalled())??;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}

/// Sends `len` bytes of `file` from `offset` with `sendfile(2)`: the kernel
/// moves them from the page cache to the socket, with no copy through this
/// process. Each wait for room in the socket may last `stall`.
async fn send_file(
    stream: &TcpStream,
    file: &File,
    offset: u64,
    len: u64,
    stall: Duration,
) -> io::Result<()> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| io::Error::other("range overflows"))?;
    let mut at = i64::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
    while (at as u64) < end {
        let want = (end - at as u64).min(SENDFILE_CHUNK) as usize;
        let sent = tokio::time::timeout(
            stall,
            stream.async_io(Interest::WRITABLE, || {
                nix::sys::sendfile::sendfile64(stream, file, Some(&mut at), want)
                    .map_err(io::Error::from)
            }),
        )
        .await
        .map_err(|_| stalled())??;
        if sent == 0 {
            // The file is shorter than the store said: never send less
            // than Content-Length promised without cutting the connection.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob shorter than its size",
            ));
        }
    }
    Ok(())
}

/// Parses a request head at the start of `buf`: `Ok(None)` while incomplete,
/// else the request, whether to keep the connection, and the bytes used.
fn parse_head(buf: &[u8]) -> Result<Option<(Request, bool, usize)>, HeadEnd> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadEnd::Bad(431, "SIZE_INVALID", "too many header fields"));
        }
        Err(_) => return Err(HeadEnd::Bad(400, "UNSUPPORTED", "malformed HTTP request")),
    };
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default();
    let version = req.version.unwrap_or(1);
    let mut keep_alive = version >= 1;
    let mut range = None;
    let mut authorization = None;
    let mut has_body = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or_default().trim();
        if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("range") {
            range = Some(value.to_string());
        } else if h.name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value.to_string());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-length") && value != "0")
        {
            has_body = true;
        }
    }
    if method != "GET" && method != "HEAD" {
        // Its body, if any, is never read: answer and close.
        return Ok(Some((
            Request {
                method,
                path: String::new(),
                query: None,
                range: None,
                authorization: None,
            },
            false,
            used,
        )));
    }
    if has_body {
        return Err(HeadEnd::Bad(
            400,
            "UNSUPPORTED",
            "this read-only mirror accepts no request bodies",
        ));
    }
    // origin-form (/v2/...) or absolute-form (http://host/v2/...).
    let target = match target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
    {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    if !target.starts_with('/') {
        return Err(HeadEnd::Bad(400, "UNSUPPORTED", "malformed request target"));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    let Some(path) = percent_decode(path) else {
        return Err(HeadEnd::Bad(400, "UNSUPPORTED", "malformed request target"));
    };
    Ok(Some((
        Request {
            method,
            path,
            query,
            range,
            authorization,
        },
        keep_alive,
        used,
    )))
}

/// Decodes `%XX` escapes; `None` for a bad escape or bytes that are not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_heads() {
        let ok = |raw: &str| match parse_head(raw.as_bytes()) {
            Ok(Some(r)) => r,
            other => panic!("{raw:?}: {other:?}"),
        };
        let (r, keep, used) = ok(
            "GET /v2/a/b/blobs/sha256%3Aab?ns=x HTTP/1.1\r\nHost: m\r\nRange: bytes=1-2\r\n\r\nGET",
        );
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/v2/a/b/blobs/sha256:ab");
        assert_eq!(r.query.as_deref(), Some("ns=x"));
        assert_eq!(r.range.as_deref(), Some("bytes=1-2"));
        assert!(keep);
        assert_eq!(
            used,
            "GET /v2/a/b/blobs/sha256%3Aab?ns=x HTTP/1.1\r\nHost: m\r\nRange: bytes=1-2\r\n\r\n"
                .len()
        );
        let (_, keep, _) = ok("HEAD / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(!keep);
        let (_, keep, _) = ok("GET / HTTP/1.0\r\n\r\n");
        assert!(!keep);
        let (_, keep, _) = ok("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(keep);
        let (r, _, _) = ok("GET http://mirror:5050/v2/?x=1 HTTP/1.1\r\n\r\n");
        assert_eq!(r.path, "/v2/");
        let (r, keep, _) = ok("PUT /v2/a/manifests/v1 HTTP/1.1\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(r.method, "PUT");
        assert!(!keep, "a body we do not read ends the connection");
        assert!(matches!(parse_head(b"GET /v2/ HTTP/1.1\r\nHo"), Ok(None)));
        for bad in [
            "GET /v2/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "GET /v2/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET v2 HTTP/1.1\r\n\r\n",
            "GET /v2/%zz HTTP/1.1\r\n\r\n",
            "NOT HTTP\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(bad.as_bytes()), Err(HeadEnd::Bad(..))),
                "{bad:?}"
            );
        }
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(matches!(
            parse_head(many.as_bytes()),
            Err(HeadEnd::Bad(431, ..))
        ));
    }

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("a%3Ab").as_deref(), Some("a:b"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%4"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
