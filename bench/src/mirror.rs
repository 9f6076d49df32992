//! The `mirror` suite: the agent's mirror against the docker-registry it
//! replaces, serving the same image side by side, and both under clients that
//! request a large blob and never read it.
//!
//! Setup, untimed: one docker-registry (plain HTTP, loopback) holds a large
//! image of a few layers; `imgfleet-agent sync` copies it into a store and
//! `imgfleet-agent serve` (release build, default limits) serves that store.
//! Both are read once in full and every blob is checked against its digest,
//! which also puts both copies in the page cache.
//!
//! 1. **Serve throughput.** For each node count N: N simulated nodes start at
//!    once; each GETs the manifest by tag, then the config and every layer on
//!    parallel connections, like containerd pulling an image. The time until
//!    the last node has every byte is measured for the mirror and for the
//!    registry in turn (alternating which goes first), and the ratio is the
//!    registry's time over the mirror's. The client is a minimal HTTP/1.1
//!    reader that discards the bytes into one 1 MiB buffer, so what is
//!    measured is the server, not a client's hashing or unpacking.
//! 2. **Non-reading clients.** C clients (receive buffer 64 KiB each) send
//!    `GET` for the largest layer and read nothing. The server's VmRSS is
//!    sampled until it settles; then `GET /v2/` is timed on fresh
//!    connections. The same against the registry, for comparison, with fewer
//!    clients by default (`--registry-clients`): docker-registry holds a
//!    4 MiB read buffer per stuck download, and 1,000 of them took 4–8 GiB
//!    of this shared machine's memory.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use imgfleet_tests::images::{ImageSpec, PushedImage, push_image, sha256_digest};
use imgfleet_tests::{ChildGuard, Registry, RegistryOptions, free_port, log_file};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Common;
use crate::image::ImageSize;
use crate::report::{Report, Target, Unit, peak_rss_bytes, rss_bytes, sibling_binary};

const SUITE: &str = "mirror";
const MIB: u64 = 1024 * 1024;
/// The repository both servers hold the image under.
const REPO: &str = "bench/big";
/// Receive buffer of each non-reading client: small, so that the server, not
/// the client, has to hold what does not fit.
const STUCK_RCVBUF: u32 = 64 * 1024;

/// Options of the `mirror` suite.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// The large image.
    #[command(flatten)]
    pub image: ImageSize,
    /// Node counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub nodes: Vec<usize>,
    /// Clients that request the largest layer and never read.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Non-reading clients against docker-registry (it needs several MiB each).
    #[arg(long, default_value_t = 100)]
    pub registry_clients: usize,
    /// Extra flag for `imgfleet-agent serve`, e.g. --serve-arg=--mirror-send-buffer=0;
    /// repeatable.
    #[arg(long, allow_hyphen_values = true)]
    pub serve_arg: Vec<String>,
    /// How long the non-reading clients are left before RSS is read, seconds.
    #[arg(long, default_value_t = 5)]
    pub settle_secs: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            image: ImageSize::default(),
            nodes: vec![1, 8],
            clients: 1000,
            registry_clients: 100,
            serve_arg: Vec::new(),
            settle_secs: 5,
        }
    }
}

/// One server under test: where it listens and how paths are formed.
struct Server {
    name: &'static str,
    addr: SocketAddr,
    /// Appended to every request path (the mirror gets containerd's `?ns=`).
    query: String,
    pid: u32,
}

impl Server {
    fn path(&self, tail: &str) -> String {
        format!("/v2/{REPO}/{tail}{}", self.query)
    }

    /// The requests one node makes: the manifest, then config and layers.
    fn pull_paths(&self, image: &PushedImage) -> (String, Vec<String>) {
        let blobs = image
            .blob_digests()
            .iter()
            .map(|d| self.path(&format!("blobs/{d}")))
            .collect();
        (self.path("manifests/v1"), blobs)
    }
}

pub async fn run(common: &Common, options: &Options, report: &mut Report) -> Result<()> {
    check_options(options)?;
    let agent = sibling_binary("imgfleet-agent")?;
    let work = tempfile::tempdir().context("creating the suite's temp dir")?;

    progress("starting docker-registry and pushing the image");
    let registry = Registry::start(RegistryOptions::plain())
        .await
        .context("starting docker-registry")?;
    let sizes = options.image.layer_sizes();
    let image = push_image(&registry, REPO, "v1", &ImageSpec::random(&sizes, 7000))
        .await
        .context("pushing the image")?;

    progress("syncing it into the agent's store (untimed)");
    let store = work.path().join("store");
    agent_sync(&agent, &registry.addr(), &store, work.path())?;
    let mirror_port = free_port();
    let mut serve = Command::new(&agent);
    serve
        .arg("serve")
        .arg("--data-dir")
        .arg(&store)
        .arg("--mirror-listen")
        .arg(format!("127.0.0.1:{mirror_port}"))
        .args(&options.serve_arg);
    let mut serve =
        ChildGuard::spawn_with_log("bench-mirror-serve", serve, log_file("bench-mirror-serve"))?;
    serve
        .wait_distribution_api(
            &reqwest::Client::new(),
            &format!("http://127.0.0.1:{mirror_port}"),
            Duration::from_secs(20),
        )
        .await?;
    let mirror = Server {
        name: "imgfleet mirror",
        addr: format!("127.0.0.1:{mirror_port}").parse()?,
        query: format!("?ns={}", registry.addr()),
        pid: serve.pid().context("the mirror has no pid")?,
    };
    let upstream = Server {
        name: "docker-registry",
        addr: registry.addr().parse()?,
        query: String::new(),
        pid: registry_pid(&registry)?,
    };

    progress("reading both in full and checking every digest (untimed)");
    for server in [&mirror, &upstream] {
        verify(server, &image)
            .await
            .with_context(|| format!("checking what {} serves", server.name))?;
    }

    let image_mib = image.total_size as f64 / MIB as f64;
    for &nodes in &options.nodes {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for run in 1..=common.runs {
            progress(&format!(
                "run {run}/{}: {nodes} node(s) pulling {image_mib:.0} MiB from each",
                common.runs
            ));
            // Alternate who goes first, so neither always meets a cooler cache.
            let order: [&Server; 2] = if run % 2 == 1 {
                [&mirror, &upstream]
            } else {
                [&upstream, &mirror]
            };
            for server in order {
                let took = pull(server, &image, nodes).await?;
                progress(&format!(
                    "  {}: {took:.3} s ({:.0} MiB/s)",
                    server.name,
                    image_mib * nodes as f64 / took
                ));
                if std::ptr::eq(server, &mirror) {
                    ours.push(took);
                } else {
                    theirs.push(took);
                }
            }
        }
        let name = format!(
            "{nodes} node(s) pulling {} MiB / {} layers at once",
            options.image.size_mib, options.image.layers
        );
        report.add(
            SUITE,
            format!("{name}: imgfleet mirror"),
            Unit::Seconds,
            ours.clone(),
            None,
        );
        report.add(
            SUITE,
            format!("{name}: docker-registry"),
            Unit::Seconds,
            theirs.clone(),
            None,
        );
        report.add(
            SUITE,
            format!("{name}: mirror throughput (MiB/s)"),
            Unit::Count,
            ours.iter().map(|t| image_mib * nodes as f64 / t).collect(),
            None,
        );
        let bound = if nodes > 1 { 1.2 } else { 1.0 };
        report.add(
            SUITE,
            format!("{name}: docker-registry ÷ mirror"),
            Unit::Ratio,
            theirs.iter().zip(&ours).map(|(t, o)| t / o).collect(),
            Some(&|m| Target::at_least(m, bound, Unit::Ratio)),
        );
    }

    let largest = image
        .layer_sizes
        .iter()
        .zip(&image.layer_digests)
        .max_by_key(|(s, _)| **s)
        .map(|(s, d)| (*s, d.clone()))
        .context("the image has no layer")?;
    let mut rss = [Vec::new(), Vec::new()];
    let mut hwm = Vec::new();
    let mut latency = [Vec::new(), Vec::new()];
    let mut idle = Vec::new();
    for run in 1..=common.runs {
        for (i, server) in [&mirror, &upstream].into_iter().enumerate() {
            let clients = if i == 0 {
                options.clients
            } else {
                options.registry_clients
            };
            progress(&format!(
                "run {run}/{}: {clients} clients that never read, against the {}",
                common.runs, server.name
            ));
            if i == 0 {
                idle.push(rss_bytes(server.pid)? as f64);
            }
            let stuck = stuck_clients(server, &largest.1, clients, options.settle_secs).await?;
            rss[i].push(stuck.max_rss);
            latency[i].push(stuck.api_latency);
            if i == 0 {
                hwm.push(peak_rss_bytes(server.pid)? as f64);
            }
            progress(&format!(
                "  RSS {:.1} MiB, GET /v2/ {:.0} ms",
                stuck.max_rss / MIB as f64,
                stuck.api_latency * 1000.0
            ));
        }
    }
    let c = options.clients;
    let rc = options.registry_clients;
    let blob = format!("{} MiB blob", largest.0 / MIB);
    report.add(
        SUITE,
        "mirror idle RSS before the clients",
        Unit::Bytes,
        idle,
        None,
    );
    report.add(
        SUITE,
        format!("mirror RSS with {c} clients not reading a {blob} (max sampled VmRSS)"),
        Unit::Bytes,
        rss[0].clone(),
        Some(&|m| Target::at_most(m, 100.0 * MIB as f64, Unit::Bytes)),
    );
    report.add(
        SUITE,
        "mirror peak RSS since start (VmHWM)",
        Unit::Bytes,
        hwm,
        None,
    );
    report.add(
        SUITE,
        format!("mirror: slowest GET /v2/ of 10 beside {c} stuck clients"),
        Unit::Millis,
        latency[0].iter().map(|s| s * 1000.0).collect(),
        Some(&|m| Target::at_most(m, 1000.0, Unit::Millis)),
    );
    report.add(
        SUITE,
        format!("docker-registry RSS with {rc} clients not reading a {blob}"),
        Unit::Bytes,
        rss[1].clone(),
        None,
    );
    report.add(
        SUITE,
        format!("docker-registry: slowest GET /v2/ of 10 beside {rc} stuck clients"),
        Unit::Millis,
        latency[1].iter().map(|s| s * 1000.0).collect(),
        None,
    );
    drop(serve);
    Ok(())
}

fn check_options(o: &Options) -> Result<()> {
    o.image.check(SUITE)?;
    if o.nodes.is_empty() || o.nodes.contains(&0) {
        bail!("mirror --nodes: expected node counts of at least 1, like 1,8");
    }
    if o.clients == 0 || o.registry_clients == 0 {
        bail!("mirror --clients/--registry-clients: expected at least 1");
    }
    Ok(())
}

fn progress(what: &str) {
    eprintln!("[{SUITE}] {what}");
}

/// `imgfleet-agent sync` of the image into `store`.
fn agent_sync(agent: &Path, registry: &str, store: &Path, work: &Path) -> Result<()> {
    let yaml = work.join("mirror-bench.yaml");
    std::fs::write(
        &yaml,
        format!(
            "apiVersion: image.theriseunion.io/v1alpha1\nkind: RegistrySecret\nmetadata: {{name: lab}}\n\
             spec: {{domain: \"{registry}\", insecure: true}}\n---\n\
             apiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\nmetadata: {{name: big}}\n\
             spec: {{repository: {REPO}, tag: v1, registryRef: {{name: lab}}}}\n"
        ),
    )
    .with_context(|| format!("writing {}", yaml.display()))?;
    let out = Command::new(agent)
        .args(["sync", "--no-gc", "--from"])
        .arg(&yaml)
        .arg("--data-dir")
        .arg(store)
        .output()
        .context("running imgfleet-agent sync")?;
    if !out.status.success() {
        bail!(
            "imgfleet-agent sync failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The pid of the harness's docker-registry: the process serving its config.
fn registry_pid(registry: &Registry) -> Result<u32> {
    let config = registry
        .storage_dir()
        .parent()
        .context("registry storage has no parent")?
        .join("config.yml");
    let want = config.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc")
        .context("reading /proc")?
        .flatten()
    {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.contains(&b"serve".as_slice()) && args.contains(&want.as_bytes()) {
            return Ok(pid);
        }
    }
    bail!("no docker-registry process serves {want}")
}

/// A response as the minimal client reads it.
struct Answer {
    status: u16,
    length: u64,
    /// The body, when asked to keep it.
    body: Vec<u8>,
}

/// One `GET` on a fresh connection: reads the head, then exactly
/// Content-Length bytes into `buf` (kept only when `keep`).
async fn get(addr: SocketAddr, path: &str, buf: &mut [u8], keep: bool) -> Result<Answer> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {}\r\nConnection: close\r\n\r\n",
            imgfleet_common::registry::MANIFEST_ACCEPT
        )
        .as_bytes(),
    )
    .await?;
    let mut head = Vec::new();
    let end = loop {
        let n = s.read(buf).await?;
        if n == 0 {
            bail!("GET {path}: connection closed before the response head");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > 64 * 1024 {
            bail!("GET {path}: response head too large");
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET {path}: no status in {text:?}"))?;
    let length: u64 = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .with_context(|| format!("GET {path}: no Content-Length in {text:?}"))?;
    let mut body = if keep {
        head[end..].to_vec()
    } else {
        Vec::new()
    };
    let mut got = (head.len() - end) as u64;
    while got < length {
        let n = s.read(buf).await?;
        if n == 0 {
            bail!("GET {path}: body ended at {got} of {length} bytes");
        }
        if keep {
            body.extend_from_slice(&buf[..n]);
        }
        got += n as u64;
    }
    Ok(Answer {
        status,
        length,
        body,
    })
}

/// Reads everything a pull reads once, checking status and digests.
async fn verify(server: &Server, image: &PushedImage) -> Result<()> {
    let mut buf = vec![0u8; MIB as usize];
    let (manifest, blobs) = server.pull_paths(image);
    let m = get(server.addr, &manifest, &mut buf, true).await?;
    if m.status != 200 || m.body != image.manifest_bytes {
        bail!(
            "{}: manifest answered {} with other bytes",
            server.name,
            m.status
        );
    }
    for (path, digest) in blobs.iter().zip(image.blob_digests()) {
        let a = get(server.addr, path, &mut buf, true).await?;
        if a.status != 200 || sha256_digest(&a.body) != digest {
            bail!(
                "{}: blob {digest} answered {} with other bytes",
                server.name,
                a.status
            );
        }
    }
    Ok(())
}

/// `nodes` nodes pull the image at once; returns the seconds until the last
/// one has every byte.
async fn pull(server: &Server, image: &PushedImage, nodes: usize) -> Result<f64> {
    let (manifest, blobs) = server.pull_paths(image);
    let expected: u64 = image.total_size;
    let addr = server.addr;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..nodes {
        let (manifest, blobs) = (manifest.clone(), blobs.clone());
        tasks.spawn(async move {
            let mut buf = vec![0u8; MIB as usize];
            let m = get(addr, &manifest, &mut buf, false).await?;
            if m.status != 200 {
                bail!("manifest: HTTP {}", m.status);
            }
            let mut layers = tokio::task::JoinSet::new();
            for path in blobs {
                layers.spawn(async move {
                    let mut buf = vec![0u8; MIB as usize];
                    let a = get(addr, &path, &mut buf, false).await?;
                    if a.status != 200 {
                        bail!("{path}: HTTP {}", a.status);
                    }
                    Ok::<u64, anyhow::Error>(a.length)
                });
            }
            let mut bytes = 0;
            while let Some(r) = layers.join_next().await {
                bytes += r??;
            }
            Ok::<u64, anyhow::Error>(bytes)
        });
    }
    while let Some(r) = tasks.join_next().await {
        let bytes = r.context("a node task")??;
        if bytes != expected {
            bail!("{}: a node got {bytes} of {expected} bytes", server.name);
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// What the non-reading clients did to a server.
struct Stuck {
    max_rss: f64,
    /// The slowest of 10 `GET /v2/` beside them, seconds.
    api_latency: f64,
}

async fn stuck_clients(
    server: &Server,
    digest: &str,
    count: usize,
    settle_secs: u64,
) -> Result<Stuck> {
    let path = server.path(&format!("blobs/{digest}"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr);
    let mut clients = Vec::with_capacity(count);
    let mut max_rss = rss_bytes(server.pid)? as f64;
    for i in 0..count {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(STUCK_RCVBUF)?;
        let mut s = socket
            .connect(server.addr)
            .await
            .with_context(|| format!("connecting stuck client {i}"))?;
        s.write_all(request.as_bytes()).await?;
        clients.push(s);
        if i % 100 == 0 {
            max_rss = max_rss.max(rss_bytes(server.pid)? as f64);
        }
    }
    // Sample while the server fills every client's buffers and settles.
    let until = Instant::now() + Duration::from_secs(settle_secs);
    while Instant::now() < until {
        max_rss = max_rss.max(rss_bytes(server.pid)? as f64);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut slowest: f64 = 0.0;
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..10 {
        let started = Instant::now();
        let a = tokio::time::timeout(
            Duration::from_secs(30),
            get(server.addr, "/v2/", &mut buf, false),
        )
        .await
        .with_context(|| format!("{}: GET /v2/ did not answer in 30 s", server.name))??;
        if a.status != 200 {
            bail!("{}: GET /v2/ answered {}", server.name, a.status);
        }
        slowest = slowest.max(started.elapsed().as_secs_f64());
        max_rss = max_rss.max(rss_bytes(server.pid)? as f64);
    }
    drop(clients);
    // Let the server notice the closed connections before the next step.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(Stuck {
        max_rss,
        api_latency: slowest,
    })
}
