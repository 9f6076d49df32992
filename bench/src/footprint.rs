//! The `footprint` suite: the agent's memory as it runs in production (the
//! daemon connected to a real hub, its mirror up, a synced image in its set),
//! idle and while it transfers a large image, the same for `imgfleet-agent
//! sync` and `serve`, and the size of each release binary.
//!
//! RSS is read from `/proc/<pid>/status`: `VmRSS` for "now", `VmHWM` for the
//! peak since the process started. Every process is a release binary found
//! next to `imgfleet-bench` (see [`sibling_binary`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use imgfleet_tests::fleet::{
    AgentOptions, AgentProcess, Cli, HubOptions, HubProcess, wait_repository_synced,
};
use imgfleet_tests::images::{ImageSpec, PushTarget};
use imgfleet_tests::{ChildGuard, Registry, RegistryOptions, free_port, log_file, policy};

use crate::Common;
use crate::report::{
    Report, Target, Unit, peak_rss_bytes, proc_status_bytes, rss_bytes, sibling_binary,
};

const SUITE: &str = "footprint";
/// The idle target: 20 MB, decimal (19.07 MiB).
const IDLE_TARGET_BYTES: f64 = 20.0 * 1e6;
/// The cluster the daemon is enrolled as.
const CLUSTER: &str = "edge-bench";
/// The small image kept in the daemon's set while it idles: 2 layers, 1 MiB.
const SMALL_LAYERS: [u64; 2] = [768 << 10, 256 << 10];
/// How long a sync through the hub may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(600);
/// How often RSS is sampled while a transfer runs.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// Options of the `footprint` suite.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Size of the large image, MiB (4 layers of a quarter each).
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// How long the agent is left alone before its idle RSS is read, seconds.
    #[arg(long, default_value_t = 10)]
    pub settle_secs: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            size_mib: 256,
            settle_secs: 10,
        }
    }
}

/// What one run measured, bytes unless said otherwise.
#[derive(Debug, Default)]
struct RunFigures {
    daemon_idle_rss: f64,
    daemon_idle_anon: f64,
    daemon_idle_threads: f64,
    daemon_sync_hwm: f64,
    daemon_sync_max_rss: f64,
    daemon_after_sync_rss: f64,
    sync_hwm: f64,
    sync_max_rss: f64,
    serve_idle_rss: f64,
}

/// The release binaries this suite runs.
#[derive(Debug)]
struct Binaries {
    hub: PathBuf,
    agent: PathBuf,
    cli: PathBuf,
}

pub async fn run(common: &Common, options: &Options, report: &mut Report) -> Result<()> {
    if options.size_mib < 4 {
        bail!(
            "--size-mib {}: expected at least 4 (the image has 4 layers)",
            options.size_mib
        );
    }
    let bins = Binaries {
        hub: sibling_binary("imgfleet-hub")?,
        agent: sibling_binary("imgfleet-agent")?,
        cli: sibling_binary("imgfleet")?,
    };
    let settle = Duration::from_secs(options.settle_secs);
    let work = tempfile::tempdir().context("creating the suite's temp dir")?;

    eprintln!("[{SUITE}] starting docker-registry and pushing the images");
    let registry = Registry::start(RegistryOptions::plain()).await?;
    let push = PushTarget::from(&registry);
    push.push_image("bench/small", "v1", &ImageSpec::random(&SMALL_LAYERS, 61))
        .await
        .context("pushing bench/small:v1")?;
    let quarter = (options.size_mib << 20) / 4;
    let big = push
        .push_image(
            "bench/big",
            "v1",
            &ImageSpec::random(&[quarter, quarter, quarter, quarter], 62),
        )
        .await
        .context("pushing bench/big:v1")?;
    eprintln!(
        "[{SUITE}] pushed bench/big:v1 ({:.1} MiB in 4 layers) and bench/small:v1",
        big.total_size as f64 / (1024.0 * 1024.0)
    );

    let mut runs: Vec<RunFigures> = Vec::new();
    for i in 0..common.runs {
        eprintln!("[{SUITE}] run {}/{}", i + 1, common.runs);
        let dir = work.path().join(format!("run-{i}"));
        let mut figures = RunFigures::default();
        let run = RunContext {
            bins: &bins,
            registry: &registry,
            dir: &dir,
            settle,
        };
        daemon_run(&run, &mut figures).await?;
        standalone_run(&run, &mut figures).await?;
        runs.push(figures);
    }

    let col = |f: fn(&RunFigures) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let idle_target = |m: f64| Target::at_most(m, IDLE_TARGET_BYTES, Unit::Bytes);
    report.add(
        SUITE,
        "agent daemon idle RSS (VmRSS, hub session + mirror, 1 synced image; target 20 MB = 20·10⁶ B)",
        Unit::Bytes,
        col(|r| r.daemon_idle_rss),
        Some(&idle_target),
    );
    report.add(
        SUITE,
        "agent daemon idle RSS, anonymous part (RssAnon)",
        Unit::Bytes,
        col(|r| r.daemon_idle_anon),
        None,
    );
    report.add(
        SUITE,
        "agent daemon threads while idle",
        Unit::Count,
        col(|r| r.daemon_idle_threads),
        None,
    );
    report.add(
        SUITE,
        format!(
            "agent daemon peak RSS syncing {} MiB / 4 layers (VmHWM)",
            options.size_mib
        ),
        Unit::Bytes,
        col(|r| r.daemon_sync_hwm),
        None,
    );
    report.add(
        SUITE,
        format!(
            "agent daemon max sampled VmRSS syncing {} MiB",
            options.size_mib
        ),
        Unit::Bytes,
        col(|r| r.daemon_sync_max_rss),
        None,
    );
    report.add(
        SUITE,
        format!(
            "agent daemon idle RSS {} s after that sync (VmRSS; target 20 MB)",
            options.settle_secs
        ),
        Unit::Bytes,
        col(|r| r.daemon_after_sync_rss),
        // Idle is also idle after a transfer: what the allocator kept counts.
        Some(&idle_target),
    );
    report.add(
        SUITE,
        format!(
            "`imgfleet-agent sync` peak RSS copying {} MiB / 4 layers (VmHWM)",
            options.size_mib
        ),
        Unit::Bytes,
        col(|r| r.sync_hwm),
        None,
    );
    report.add(
        SUITE,
        format!(
            "`imgfleet-agent sync` max sampled VmRSS copying {} MiB",
            options.size_mib
        ),
        Unit::Bytes,
        col(|r| r.sync_max_rss),
        None,
    );
    report.add(
        SUITE,
        "`imgfleet-agent serve` idle RSS (mirror only, VmRSS)",
        Unit::Bytes,
        col(|r| r.serve_idle_rss),
        Some(&idle_target),
    );
    for (name, path) in [
        ("imgfleet", &bins.cli),
        ("imgfleet-hub", &bins.hub),
        ("imgfleet-agent", &bins.agent),
    ] {
        let size = std::fs::metadata(path)
            .with_context(|| format!("reading the size of {}", path.display()))?
            .len() as f64;
        // `release` normally; `debug` when the suite itself runs as a debug build.
        let profile = path
            .parent()
            .and_then(Path::file_name)
            .map_or_else(|| "?".into(), |p| p.to_string_lossy());
        report.add(
            SUITE,
            format!("{profile} binary size: {name}"),
            Unit::Bytes,
            vec![size; common.runs],
            None,
        );
    }
    Ok(())
}

/// The anonymous RegistrySecret `bench` for the harness registry at `domain`.
fn registry_secret(domain: &str) -> String {
    policy::registry_secret("bench", domain, None)
}

/// A Repository of `repo:v1` through `bench`, placed on the bench cluster.
fn repository(name: &str, repo: &str) -> String {
    policy::repository(
        name,
        repo,
        "v1",
        "bench",
        &format!("  syncInterval: \"1h\"\n  placement: {{clusters: [{CLUSTER}]}}\n"),
    )
}

/// `VmRSS`, `VmHWM`, `RssAnon` and `Threads` of `pid`, in bytes (threads as a count).
fn proc_figures(pid: u32) -> Result<(f64, f64, f64, f64)> {
    let rss = rss_bytes(pid)? as f64;
    let hwm = peak_rss_bytes(pid)? as f64;
    let anon = proc_status_bytes(pid, "RssAnon")? as f64;
    let threads = thread_count(pid)? as f64;
    Ok((rss, hwm, anon, threads))
}

/// The `Threads:` line of `/proc/<pid>/status` (a count, not KiB).
fn thread_count(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("{path} has no Threads line"))
}

/// The largest mappings of `pid` by RSS, one line each, for the log: where the memory is.
fn rss_breakdown(pid: u32) -> String {
    let path = format!("/proc/{pid}/smaps");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return format!("(cannot read {path})");
    };
    let mut maps: Vec<(u64, String)> = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        // A mapping header starts with `start-end`; its name is the 6th field, if any.
        if first.contains('-') && !first.ends_with(':') {
            let name = line.split_whitespace().nth(5).unwrap_or("[anon]");
            current = name.to_string();
        } else if let Some(kib) = line.strip_prefix("Rss:") {
            let kib: u64 = kib
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            match maps.iter_mut().find(|(_, n)| *n == current) {
                Some((total, _)) => *total += kib,
                None => maps.push((kib, current.clone())),
            }
        }
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.0));
    maps.iter()
        .take(6)
        .map(|(kib, name)| format!("{name} {kib} KiB"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Samples `VmRSS`/`VmHWM` of `pid` until `done` resolves; returns (max VmRSS, last VmHWM).
async fn sample_while<F: std::future::Future<Output = Result<()>>>(
    pid: u32,
    done: F,
) -> Result<(f64, f64)> {
    let mut max_rss = 0.0f64;
    let mut hwm = 0.0f64;
    tokio::pin!(done);
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            r = &mut done => {
                r?;
                break;
            }
            _ = tick.tick() => {
                if let (Ok(rss), Ok(peak)) = (rss_bytes(pid), peak_rss_bytes(pid)) {
                    max_rss = max_rss.max(rss as f64);
                    hwm = hwm.max(peak as f64);
                }
            }
        }
    }
    // VmHWM only grows, so the reading after the sync is the peak of the sync.
    if let Ok(peak) = peak_rss_bytes(pid) {
        hwm = hwm.max(peak as f64);
    }
    Ok((max_rss, hwm))
}

/// What both halves of one run use: the binaries, the upstream registry, the run's
/// folder and how long to let a process settle before reading its memory.
#[derive(Clone, Copy)]
struct RunContext<'a> {
    bins: &'a Binaries,
    registry: &'a Registry,
    dir: &'a Path,
    settle: Duration,
}

/// Hub + daemon: idle RSS with the small image synced, then the large image
/// synced through the hub, then idle again.
async fn daemon_run(run: &RunContext<'_>, out: &mut RunFigures) -> Result<()> {
    let hub = HubProcess::start(HubOptions {
        binary: Some(run.bins.hub.clone()),
        cli_binary: Some(run.bins.cli.clone()),
        ..HubOptions::embedded(run.dir.join("hub"))
    })
    .await
    .context("starting the release imgfleet-hub")?;
    let cli: Cli = hub.cli();
    let creds = cli
        .enroll(
            CLUSTER,
            &[("role", "bench")],
            &["default"],
            &run.dir.join("creds"),
        )
        .await?;
    let agent = AgentProcess::start(AgentOptions {
        binary: Some(run.bins.agent.clone()),
        ..AgentOptions::new(vec![hub.url()], creds, run.dir.join("agent"))
    })
    .await
    .context("starting the release imgfleet-agent daemon")?;
    let pid = agent.pid().context("the agent daemon has no pid")?;

    let policy = [
        registry_secret(&run.registry.addr()),
        repository("small", "bench/small"),
    ]
    .join("---\n");
    cli.apply_yaml(&policy).await?;
    wait_repository_synced(&cli, "default", "small", 1, SYNC_TIMEOUT)
        .await
        .with_context(|| format!("agent log:\n{}", agent.log_tail(30)))?;
    eprintln!(
        "[{SUITE}] daemon synced bench/small:v1 and acked it; idling {} s",
        run.settle.as_secs()
    );
    tokio::time::sleep(run.settle).await;
    let (rss, _, anon, threads) = proc_figures(pid)?;
    eprintln!(
        "[{SUITE}] daemon idle: VmRSS {:.1} MiB, RssAnon {:.1} MiB, {threads} threads; largest mappings: {}",
        rss / 1048576.0,
        anon / 1048576.0,
        rss_breakdown(pid)
    );
    out.daemon_idle_rss = rss;
    out.daemon_idle_anon = anon;
    out.daemon_idle_threads = threads;

    eprintln!("[{SUITE}] daemon syncing bench/big:v1");
    let started = Instant::now();
    cli.apply_yaml(&repository("big", "bench/big")).await?;
    let (max_rss, hwm) = sample_while(pid, async {
        wait_repository_synced(&cli, "default", "big", 1, SYNC_TIMEOUT)
            .await
            .map(|_| ())
    })
    .await
    .with_context(|| format!("agent log:\n{}", agent.log_tail(30)))?;
    print_sync_memory("daemon synced bench/big:v1", started, hwm, max_rss);
    out.daemon_sync_hwm = hwm;
    out.daemon_sync_max_rss = max_rss;
    tokio::time::sleep(run.settle).await;
    out.daemon_after_sync_rss = rss_bytes(pid)? as f64;
    eprintln!(
        "[{SUITE}] daemon {} s after the sync: VmRSS {:.1} MiB",
        run.settle.as_secs(),
        out.daemon_after_sync_rss / 1048576.0
    );
    Ok(())
}

/// `imgfleet-agent sync` of the large image into a fresh store, then
/// `imgfleet-agent serve` of that store, idle.
async fn standalone_run(run: &RunContext<'_>, out: &mut RunFigures) -> Result<()> {
    let data = run.dir.join("standalone");
    let yaml = run.dir.join("standalone.yaml");
    let mut text = registry_secret(&run.registry.addr());
    text.push_str("---\n");
    text.push_str(&repository("big", "bench/big"));
    std::fs::write(&yaml, text).with_context(|| format!("writing {}", yaml.display()))?;

    eprintln!("[{SUITE}] imgfleet-agent sync of bench/big:v1");
    let mut cmd = Command::new(&run.bins.agent);
    cmd.arg("sync")
        .arg("--from")
        .arg(&yaml)
        .arg("--data-dir")
        .arg(&data);
    let mut child = ChildGuard::spawn("agent-sync", cmd)?;
    let pid = child.pid().context("imgfleet-agent sync has no pid")?;
    let started = Instant::now();
    let mut max_rss = 0.0f64;
    let mut hwm = 0.0f64;
    let status = loop {
        // Read before reaping: once reaped, /proc/<pid> is gone.
        if let (Ok(rss), Ok(peak)) = (rss_bytes(pid), peak_rss_bytes(pid)) {
            max_rss = max_rss.max(rss as f64);
            hwm = hwm.max(peak as f64);
        }
        if let Some(status) = child.try_wait() {
            break status;
        }
        if started.elapsed() > SYNC_TIMEOUT {
            return Err(child.error_with_log(format!("sync not done after {SYNC_TIMEOUT:?}")));
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    };
    if !status.success() {
        return Err(child.error_with_log(format!("imgfleet-agent sync exited with {status}")));
    }
    if hwm == 0.0 {
        bail!("imgfleet-agent sync ended before its memory could be read");
    }
    print_sync_memory("sync done", started, hwm, max_rss);
    out.sync_hwm = hwm;
    out.sync_max_rss = max_rss;

    let port = free_port();
    let mut cmd = Command::new(&run.bins.agent);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .arg("--mirror-listen")
        .arg(format!("127.0.0.1:{port}"));
    let mut serve = ChildGuard::spawn_with_log("agent-serve", cmd, log_file("agent-serve"))?;
    let http = reqwest_client()?;
    let base = format!("http://127.0.0.1:{port}");
    serve
        .wait_distribution_api(&http, &base, Duration::from_secs(30))
        .await?;
    // One manifest request, so the mirror has served something before it idles.
    let url = format!("{base}/v2/bench/big/manifests/v1");
    let status = http
        .get(&url)
        .header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .status();
    if !status.is_success() {
        return Err(serve.error_with_log(format!("GET {url}: {status}")));
    }
    tokio::time::sleep(run.settle).await;
    let serve_pid = serve.pid().context("imgfleet-agent serve has no pid")?;
    out.serve_idle_rss = rss_bytes(serve_pid)? as f64;
    eprintln!(
        "[{SUITE}] serve idle: VmRSS {:.1} MiB",
        out.serve_idle_rss / 1048576.0
    );
    Ok(())
}

fn reqwest_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .context("building the HTTP client")
}

/// Says on stderr how long a sync took and the memory it peaked at (bytes).
fn print_sync_memory(what: &str, started: Instant, hwm: f64, max_rss: f64) {
    eprintln!(
        "[{SUITE}] {what} in {:.1} s: VmHWM {:.1} MiB, max VmRSS {:.1} MiB",
        started.elapsed().as_secs_f64(),
        hwm / 1048576.0,
        max_rss / 1048576.0
    );
}
