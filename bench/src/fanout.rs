//! The `fanout` suite: N simulated agents (10,000 by default), each with its
//! own mTLS connection and Connect stream, held in this process against one
//! release `imgfleet-hub`, with the embedded store and with etcd. It measures
//! the fan-out latency of a policy change (p50/p99/max), the hub's RSS per
//! connected agent, its CPU, and the time for every agent to reconnect after
//! the hub is SIGKILLed and restarted.
//!
//! The bench acts as the operator who holds the CA: it issues each cluster's
//! certificate locally from `<data-dir>/pki/ca{,-key}.pem` rather than through
//! `EnrollCluster`, so setup time is not spent on 10,000 RPCs.

mod agent;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use futures::StreamExt;
use imgfleet::api::v1 as pb;
use imgfleet::api::v1::admin_service_client::AdminServiceClient;
use imgfleet_common::pki::CertificateAuthority;
use imgfleet_common::tls::TlsMaterial;
use imgfleet_tests::fleet::hub_command;
use imgfleet_tests::images::{ImageSpec, push_image};
use imgfleet_tests::{ChildGuard, Etcd, Registry, RegistryOptions, free_port, log_file};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use self::agent::{Agent, Fleet, now_ns};
use crate::Common;
use crate::report::{Report, Target, Unit, cpu_seconds, percentile, rss_bytes, sibling_binary};

const SUITE: &str = "fanout";
/// How long every agent may take to get a policy change before the run
/// records a time-out.
const FANOUT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long every agent may take to reconnect after a hub restart.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// Sockets and files besides the agents' own that the bench and the hub need.
const SPARE_FDS: u64 = 256;
/// Cluster Apply RPCs in flight during setup.
const APPLY_CONCURRENCY: usize = 32;
/// The fan-out latency target (p99) in milliseconds.
const P99_TARGET_MS: f64 = 1000.0;
/// The hub RSS per agent target in bytes.
const RSS_TARGET: f64 = 64.0 * 1024.0;
/// The namespace every bench object lives in.
const NAMESPACE: &str = "default";

/// Which policy store the hub runs on.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreChoice {
    /// The embedded redb store in the hub's data dir.
    Embedded,
    /// An etcd started for the run.
    Etcd,
    /// Both, one after the other.
    #[default]
    Both,
}

impl StoreChoice {
    fn stores(self) -> &'static [Store] {
        match self {
            StoreChoice::Embedded => &[Store::Embedded],
            StoreChoice::Etcd => &[Store::Etcd],
            StoreChoice::Both => &[Store::Embedded, Store::Etcd],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Embedded,
    Etcd,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Embedded => "embedded",
            Store::Etcd => "etcd",
        }
    }
}

/// Options of the `fanout` suite.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Simulated agents, each with its own certificate, connection and stream.
    #[arg(long, default_value_t = 10_000)]
    pub agents: usize,
    /// The hub's policy store.
    #[arg(long, value_enum, default_value_t = StoreChoice::Both)]
    pub store: StoreChoice,
    /// Seconds over which the hub's idle CPU (heartbeats only) is measured.
    #[arg(long, default_value_t = 10)]
    pub idle_secs: u64,
    /// Agent connects (TCP, TLS handshake, Connect call) in flight at once.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            agents: 10_000,
            store: StoreChoice::Both,
            idle_secs: 10,
            connect_concurrency: 128,
        }
    }
}

pub async fn run(common: &Common, options: &Options, report: &mut Report) -> Result<()> {
    if options.agents == 0 {
        bail!("--agents 0: expected at least 1 agent");
    }
    if options.connect_concurrency == 0 {
        bail!("--connect-concurrency 0: expected at least 1");
    }
    raise_nofile_limit(options.agents)?;
    let binary = sibling_binary("imgfleet-hub")?;
    eprintln!("[{SUITE}] hub binary {}", binary.display());
    // The hub resolves a pinned digest against the registry before placing
    // it, so a real registry must serve both images the Repository flips
    // between.
    let registry = Registry::start(RegistryOptions::plain())
        .await
        .context("starting the upstream registry")?;
    let a = push_image(&registry, "bench/app", "a", &ImageSpec::random(&[4096], 61))
        .await
        .context("pushing image a")?;
    let b = push_image(&registry, "bench/app", "b", &ImageSpec::random(&[4096], 62))
        .await
        .context("pushing image b")?;
    let digests = [a.manifest_digest, b.manifest_digest];
    // A store that fails does not keep the other from being measured.
    let mut failures = Vec::new();
    for &store in options.store.stores() {
        if let Err(e) =
            run_store(common, options, report, &binary, &registry, &digests, store).await
        {
            eprintln!("[{SUITE}/{}] FAILED: {e:#}", store.name());
            failures.push(format!("{e:#}"));
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}

/// Raises the soft open-file limit to the hard one (the hub, a child,
/// inherits it) and checks that N agents fit.
fn raise_nofile_limit(agents: usize) -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .with_context(|| format!("raising RLIMIT_NOFILE from {soft} to {hard}"))?;
    }
    let need = agents as u64 + SPARE_FDS;
    if need > hard {
        bail!(
            "--agents {agents}: needs {need} open files per process (one socket per agent in the bench \
             and in the hub) but the hard RLIMIT_NOFILE is {hard}; use at most {} agents or raise \
             the hard limit (ulimit -Hn, /etc/security/limits.conf)",
            hard.saturating_sub(SPARE_FDS)
        );
    }
    eprintln!("[{SUITE}] open-file limit {hard} (was {soft}); {agents} agents need {need}");
    Ok(())
}

/// Every run's figures for one store.
#[derive(Debug, Default)]
struct Runs {
    p50: Vec<f64>,
    p99: Vec<f64>,
    max: Vec<f64>,
    reached: Vec<f64>,
    rss_per_agent: Vec<f64>,
    rss_total: Vec<f64>,
    connect_secs: Vec<f64>,
    cpu_connect: Vec<f64>,
    cpu_fanout: Vec<f64>,
    idle_pct: Vec<f64>,
    reconnect_secs: Vec<f64>,
    reconnected: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
async fn run_store(
    common: &Common,
    options: &Options,
    report: &mut Report,
    binary: &std::path::Path,
    registry: &Registry,
    digests: &[String; 2],
    store: Store,
) -> Result<()> {
    let n = options.agents;
    let tag = format!("[{SUITE}/{}]", store.name());
    let etcd = match store {
        Store::Etcd => Some(Etcd::start().await.context("starting etcd")?),
        Store::Embedded => None,
    };
    let dir = tempfile::tempdir().context("creating the hub's temp dir")?;
    let mut hub = Hub {
        binary: binary.to_owned(),
        data_dir: dir.path().join("hub"),
        etcd: etcd.as_ref().map(Etcd::endpoint),
        port: free_port(),
        metrics_port: free_port(),
        log: log_file(&format!("fanout-hub-{}", store.name())),
        log_start: 0,
        child: None,
    };
    let _ = std::fs::remove_file(&hub.log);
    hub.spawn()?;
    let mut admin = hub.wait_ready().await?;
    eprintln!(
        "{tag} hub pid {} at {}, log {}",
        hub.pid()?,
        hub.url(),
        hub.log.display()
    );

    // Setup: the policy and the agents' certificates (timed, not a target).
    let started = Instant::now();
    apply_yaml(
        &mut admin,
        &format!(
            "apiVersion: image.theriseunion.io/v1alpha1\nkind: RegistrySecret\nmetadata:\n  name: bench-registry\n  namespace: {NAMESPACE}\nspec:\n  domain: \"{}\"\n  insecure: true\n",
            registry.addr()
        ),
    )
    .await?;
    let names: Vec<String> = (1..=n).map(|i| format!("edge-{i:05}")).collect();
    create_clusters(&admin, &names, &tag).await?;
    apply_repository(&mut admin, &digests[0]).await?;
    let applied = started.elapsed();
    let ca_cert = read(&hub.data_dir.join("pki/ca.pem"))?;
    let ca_key = read(&hub.data_dir.join("pki/ca-key.pem"))?;
    let issue_names = names.clone();
    let agents: Vec<Arc<Agent>> =
        tokio::task::spawn_blocking(move || -> Result<Vec<Arc<Agent>>> {
            let ca = CertificateAuthority::from_pem(&ca_cert, &ca_key)
                .context("loading the hub's CA from pki/ca.pem and pki/ca-key.pem")?;
            issue_names
                .into_iter()
                .map(|name| {
                    let leaf = ca
                        .issue_cluster(&name, 30)
                        .with_context(|| format!("issuing the certificate of cluster {name}"))?;
                    let tls = TlsMaterial {
                        ca_pem: ca_cert.clone(),
                        cert_pem: leaf.cert_pem,
                        key_pem: leaf.key_pem,
                    };
                    Ok(Arc::new(Agent::new(name, tls)))
                })
                .collect()
        })
        .await
        .context("issuing certificates")??;
    eprintln!(
        "{tag} setup: {n} clusters, 1 RegistrySecret, 1 Repository applied in {:.1} s; {n} certificates issued locally; {:.1} s in all",
        applied.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    let fleet = Arc::new(Fleet {
        url: hub.url(),
        digests: digests.clone(),
        gate: tokio::sync::Semaphore::new(options.connect_concurrency),
    });
    // The digest the Repository is pinned to now (index into `digests`, 1-based).
    let mut current: u8 = 1;
    let mut runs = Runs::default();
    // Figures gathered before a failure are still reported.
    let outcome: Result<()> = async {
    for run in 1..=common.runs {
        eprintln!("{tag} run {run}/{}", common.runs);
        if run > 1 {
            // A fresh hub process with no agent, for a clean RSS baseline.
            hub.kill();
            hub.spawn()?;
            admin = hub.wait_ready().await?;
            // On etcd the killed hub's resolver lease must expire first (5 s);
            // a policy change applied before then would wait for it.
            hub.wait_leader().await?;
        }
        let pid = hub.pid()?;
        settle(&mut hub, 0.05, Duration::from_secs(60), &tag).await?;
        let rss0 = rss_bytes(pid)? as f64;
        eprintln!("{tag} hub RSS with 0 agents: {:.1} MiB", rss0 / MIB);

        // Initial connect of all N agents.
        let cpu0 = cpu_seconds(pid)?;
        let own0 = cpu_seconds(std::process::id())?;
        let t = Instant::now();
        let before: Vec<u64> = agents
            .iter()
            .map(|a| a.sessions.load(Ordering::SeqCst))
            .collect();
        let mut tasks = JoinSet::new();
        for a in &agents {
            tasks.spawn(agent::run(a.clone(), fleet.clone()));
        }
        // Later runs' agents hold the set already (as real agents keep it on
        // disk): their Hello says so and the hub sends nothing.
        wait_indexed(
            &mut hub,
            &agents,
            "connected with the desired set",
            Duration::from_secs(600),
            &tag,
            |i, a| {
                a.sessions.load(Ordering::SeqCst) > before[i]
                    && a.connected.load(Ordering::SeqCst)
                    && a.holds.load(Ordering::SeqCst) == current
            },
        )
        .await?
        .map_err(|have| anyhow!("only {have}/{n} agents connected and got the desired set"))?;
        let connect = t.elapsed().as_secs_f64();
        let cpu_connect = cpu_seconds(pid)? - cpu0;
        let own = cpu_seconds(std::process::id())? - own0;
        eprintln!(
            "{tag} all {n} connected in {connect:.1} s; hub CPU {cpu_connect:.1} s, bench (agents) CPU {own:.1} s"
        );
        runs.connect_secs.push(connect);
        runs.cpu_connect.push(cpu_connect);

        settle(&mut hub, 0.3, Duration::from_secs(30), &tag).await?;
        let rss_n = rss_bytes(pid)? as f64;
        runs.rss_total.push(rss_n);
        runs.rss_per_agent.push((rss_n - rss0) / n as f64);
        eprintln!(
            "{tag} hub RSS with {n} agents: {:.1} MiB ({:.1} KiB per agent)",
            rss_n / MIB,
            (rss_n - rss0) / n as f64 / 1024.0
        );

        let cpu0 = cpu_seconds(pid)?;
        tokio::time::sleep(Duration::from_secs(options.idle_secs)).await;
        let idle = (cpu_seconds(pid)? - cpu0) / options.idle_secs.max(1) as f64 * 100.0;
        hub.check()?;
        eprintln!("{tag} hub idle CPU with {n} agents: {idle:.1}%");
        runs.idle_pct.push(idle);
        status_report(&mut admin, &tag, "after the idle period").await;

        // Fan-out of a digest change that gives every cluster a new generation.
        let next = if current == 1 { 2 } else { 1 };
        for a in &agents {
            a.expect(next);
        }
        let cpu0 = cpu_seconds(pid)?;
        let own0 = cpu_seconds(std::process::id())?;
        let t0 = now_ns();
        apply_repository(&mut admin, &digests[usize::from(next - 1)]).await?;
        current = next;
        let reached = wait_all(
            &mut hub,
            &agents,
            "got the change",
            FANOUT_TIMEOUT,
            &tag,
            |a| a.got_at.load(Ordering::SeqCst) != 0,
        )
        .await?;
        let cpu_fanout = cpu_seconds(pid)? - cpu0;
        let own = cpu_seconds(std::process::id())? - own0;
        let cap = FANOUT_TIMEOUT.as_secs_f64() * 1000.0;
        let latencies: Vec<f64> = agents
            .iter()
            .map(|a| match a.got_at.load(Ordering::SeqCst) {
                0 => cap,
                at => at.saturating_sub(t0) as f64 / 1e6,
            })
            .collect();
        let got = match reached {
            Ok(()) => n,
            Err(have) => {
                eprintln!(
                    "{tag} TIME-OUT: only {have}/{n} agents got the change within {FANOUT_TIMEOUT:?}; \
                     the others count as {cap:.0} ms"
                );
                have
            }
        };
        let (p50, p99, max) = (
            percentile(&latencies, 50.0),
            percentile(&latencies, 99.0),
            percentile(&latencies, 100.0),
        );
        eprintln!(
            "{tag} fan-out to {got}/{n}: p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms; hub CPU {cpu_fanout:.2} s, \
             bench (agents) CPU {own:.2} s"
        );
        runs.p50.push(p50);
        runs.p99.push(p99);
        runs.max.push(max);
        runs.reached.push(got as f64);
        runs.cpu_fanout.push(cpu_fanout);

        // Reconnect of every agent after SIGKILL and restart of the hub.
        settle(&mut hub, 0.3, Duration::from_secs(30), &tag).await?;
        status_report(&mut admin, &tag, "after the fan-out").await;
        let before: Vec<u64> = agents
            .iter()
            .map(|a| a.sessions.load(Ordering::SeqCst))
            .collect();
        hub.kill();
        let t = Instant::now();
        hub.spawn()?;
        let reconnected = wait_indexed(
            &mut hub,
            &agents,
            "re-established",
            RECONNECT_TIMEOUT,
            &tag,
            |i, a| {
                a.sessions.load(Ordering::SeqCst) > before[i] && a.connected.load(Ordering::SeqCst)
            },
        )
        .await?;
        let secs = t.elapsed().as_secs_f64();
        runs.reconnect_secs.push(secs);
        match reconnected {
            Ok(()) => {
                eprintln!("{tag} all {n} agents reconnected {secs:.1} s after the restart");
                runs.reconnected.push(n as f64);
            }
            Err(have) => {
                runs.reconnected.push(have as f64);
                bail!(
                    "only {have}/{n} agents reconnected within {RECONNECT_TIMEOUT:?} of the hub's restart; \
                     see the hub's log {}",
                    hub.log.display()
                );
            }
        }
        admin = hub.wait_ready().await?;
        settle(&mut hub, 0.3, Duration::from_secs(30), &tag).await?;
        status_report(&mut admin, &tag, "after the restart").await;

        tasks.shutdown().await;
        // Aborted tasks do not clear their flag; their sessions are gone.
        for a in &agents {
            a.connected.store(false, Ordering::SeqCst);
        }
    }
    Ok(())
    }
    .await;
    hub.kill();
    drop(etcd);

    let s = store.name();
    let at_most = |bound: f64, unit: Unit| move |m: f64| Target::at_most(m, bound, unit);
    report.add(
        SUITE,
        format!("fan-out p50 ({s}, {n} agents)"),
        Unit::Millis,
        runs.p50,
        None,
    );
    report.add(
        SUITE,
        format!("fan-out p99 ({s}, {n} agents)"),
        Unit::Millis,
        runs.p99,
        Some(&at_most(P99_TARGET_MS, Unit::Millis)),
    );
    report.add(
        SUITE,
        format!("fan-out max ({s}, {n} agents)"),
        Unit::Millis,
        runs.max,
        None,
    );
    report.add(
        SUITE,
        format!(
            "fan-out agents reached within {} s ({s})",
            FANOUT_TIMEOUT.as_secs()
        ),
        Unit::Count,
        runs.reached,
        Some(&|m| Target::at_least(m, n as f64, Unit::Count)),
    );
    report.add(
        SUITE,
        format!("hub RSS per connected agent ({s})"),
        Unit::Bytes,
        runs.rss_per_agent,
        Some(&at_most(RSS_TARGET, Unit::Bytes)),
    );
    report.add(
        SUITE,
        format!("hub RSS with {n} agents ({s})"),
        Unit::Bytes,
        runs.rss_total,
        None,
    );
    report.add(
        SUITE,
        format!("initial connect of {n} agents ({s})"),
        Unit::Seconds,
        runs.connect_secs,
        None,
    );
    report.add(
        SUITE,
        format!("hub CPU: initial connect of {n} agents ({s})"),
        Unit::Seconds,
        runs.cpu_connect,
        None,
    );
    report.add(
        SUITE,
        format!("hub CPU: one fan-out to {n} agents ({s})"),
        Unit::Seconds,
        runs.cpu_fanout,
        None,
    );
    report.add(
        SUITE,
        format!("hub idle CPU with {n} agents ({s})"),
        Unit::Percent,
        runs.idle_pct,
        None,
    );
    report.add(
        SUITE,
        format!("reconnect all {n} agents after hub restart ({s})"),
        Unit::Seconds,
        runs.reconnect_secs,
        None,
    );
    report.add(
        SUITE,
        format!(
            "agents reconnected within {} s of hub restart ({s})",
            RECONNECT_TIMEOUT.as_secs()
        ),
        Unit::Count,
        runs.reconnected,
        Some(&|m| Target::at_least(m, n as f64, Unit::Count)),
    );
    outcome.with_context(|| format!("fanout suite on the {s} store with {n} agents"))
}

const MIB: f64 = 1024.0 * 1024.0;
/// Largest admin response the bench decodes (a List of every cluster).
const LIST_LIMIT: usize = 256 * 1024 * 1024;

/// Prints how the hub's stored Cluster statuses look: phases, age of
/// `lastSeen` and acked generations. A diagnostic for the hub's status
/// writer at scale, not a figure.
async fn status_report(admin: &mut AdminServiceClient<Channel>, tag: &str, when: &str) {
    let listed = admin
        .list(pb::ListRequest {
            kind: pb::Kind::Cluster as i32,
            ..Default::default()
        })
        .await;
    let items = match listed {
        Ok(r) => r.into_inner().items,
        Err(s) => {
            eprintln!(
                "{tag} status check {when}: listing clusters failed: {}: {}",
                s.code(),
                s.message()
            );
            return;
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let (mut connected, mut offline, mut other, mut behind) = (0usize, 0usize, 0usize, 0usize);
    let mut ages = Vec::new();
    for item in items {
        let Some(pb::object::Kind::Cluster(c)) = item.kind else {
            continue;
        };
        let st = c.status.unwrap_or_default();
        match pb::ClusterPhase::try_from(st.phase) {
            Ok(pb::ClusterPhase::Connected) => connected += 1,
            Ok(pb::ClusterPhase::Offline) => offline += 1,
            _ => other += 1,
        }
        if st.applied_generation != st.desired_generation {
            behind += 1;
        }
        if let Some(t) = st.last_seen {
            ages.push(now - (t.seconds as f64 + f64::from(t.nanos) / 1e9));
        }
    }
    eprintln!(
        "{tag} stored Cluster status {when}: {connected} Connected, {offline} Offline, {other} never connected; \
         {behind} with appliedGeneration != desiredGeneration; lastSeen age p50 {:.1} s, max {:.1} s",
        percentile(&ages, 50.0),
        percentile(&ages, 100.0)
    );
}

fn read(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Waits until `done` holds for every agent; `Ok(Err(count))` on time-out
/// with how many it held for. Prints progress every 2 s and fails when the
/// hub dies.
async fn wait_all(
    hub: &mut Hub,
    agents: &[Arc<Agent>],
    what: &str,
    timeout: Duration,
    tag: &str,
    done: impl Fn(&Agent) -> bool,
) -> Result<std::result::Result<(), usize>> {
    wait_indexed(hub, agents, what, timeout, tag, |_, a| done(a)).await
}

async fn wait_indexed(
    hub: &mut Hub,
    agents: &[Arc<Agent>],
    what: &str,
    timeout: Duration,
    tag: &str,
    done: impl Fn(usize, &Agent) -> bool,
) -> Result<std::result::Result<(), usize>> {
    let start = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let count = agents
            .iter()
            .enumerate()
            .filter(|(i, a)| done(*i, a))
            .count();
        if count == agents.len() {
            return Ok(Ok(()));
        }
        if start.elapsed() >= timeout {
            return Ok(Err(count));
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            let connected = agents
                .iter()
                .filter(|a| a.connected.load(Ordering::Relaxed))
                .count();
            eprintln!(
                "{tag}   {count}/{} {what} ({connected} connected) after {:.0} s",
                agents.len(),
                start.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        hub.check()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the hub uses less than `fraction` of a core over 500 ms, at
/// most `limit` (then goes on, saying so): measurements start from a quiet hub.
async fn settle(hub: &mut Hub, fraction: f64, limit: Duration, tag: &str) -> Result<()> {
    let pid = hub.pid()?;
    let start = Instant::now();
    let window = Duration::from_millis(500);
    loop {
        let c0 = cpu_seconds(pid)?;
        tokio::time::sleep(window).await;
        hub.check()?;
        let used = (cpu_seconds(pid)? - c0) / window.as_secs_f64();
        if used < fraction {
            return Ok(());
        }
        if start.elapsed() >= limit {
            eprintln!(
                "{tag} hub still busy ({:.0}% of a core) after {limit:?}; measuring anyway",
                used * 100.0
            );
            return Ok(());
        }
    }
}

/// Applies every object in a YAML text through AdminService.Apply.
async fn apply_yaml(admin: &mut AdminServiceClient<Channel>, yaml: &str) -> Result<()> {
    let objects = imgfleet::model::parse_documents(yaml).map_err(|errors| {
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow!("bench policy is invalid: {}", text.join("; "))
    })?;
    for object in &objects {
        admin
            .apply(pb::ApplyRequest {
                object: Some(pb::Object::from(object)),
                dry_run: false,
            })
            .await
            .map_err(|s| anyhow!("applying {}: {}: {}", object.id(), s.code(), s.message()))?;
    }
    Ok(())
}

/// The bench Repository, pinned to `digest`, targeting every bench cluster.
async fn apply_repository(admin: &mut AdminServiceClient<Channel>, digest: &str) -> Result<()> {
    apply_yaml(
        admin,
        &format!(
            "apiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\nmetadata:\n  name: bench-app\n  namespace: {NAMESPACE}\nspec:\n  repository: bench/app\n  digest: \"{digest}\"\n  registryRef:\n    name: bench-registry\n    namespace: {NAMESPACE}\n  placement:\n    clusterSelector:\n      matchLabels:\n        fleet: bench\n"
        ),
    )
    .await
}

/// Creates the Cluster objects with bounded concurrency, printing progress.
async fn create_clusters(
    admin: &AdminServiceClient<Channel>,
    names: &[String],
    tag: &str,
) -> Result<()> {
    let started = Instant::now();
    let mut applies = futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let mut admin = admin.clone();
            async move {
                let yaml = format!(
                    "apiVersion: image.theriseunion.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: {name}\n  labels:\n    fleet: bench\nspec:\n  tenants: [{NAMESPACE}]\n"
                );
                apply_yaml(&mut admin, &yaml).await
            }
        })
        .buffer_unordered(APPLY_CONCURRENCY);
    let mut done = 0usize;
    let mut last_print = Instant::now();
    while let Some(result) = applies.next().await {
        result?;
        done += 1;
        if last_print.elapsed() >= Duration::from_secs(2) {
            eprintln!(
                "{tag}   {done}/{} clusters applied after {:.0} s",
                names.len(),
                started.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
    }
    Ok(())
}

/// One release hub process on a fixed port and data dir, restartable.
#[derive(Debug)]
struct Hub {
    binary: PathBuf,
    data_dir: PathBuf,
    etcd: Option<String>,
    port: u16,
    metrics_port: u16,
    log: PathBuf,
    /// Length of the log when the current process was started.
    log_start: u64,
    child: Option<ChildGuard>,
}

impl Hub {
    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Starts the process (without waiting for it to serve).
    fn spawn(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating {}", self.data_dir.display()))?;
        let cmd = hub_command(
            &self.binary,
            (self.port, self.metrics_port),
            &self.data_dir,
            self.etcd.as_deref(),
        );
        self.log_start = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        self.child = Some(ChildGuard::spawn_with_log("hub", cmd, self.log.clone())?);
        Ok(())
    }

    /// Waits until this hub process logged that it leads the tag resolver
    /// (so that it resolves policy changes at once).
    async fn wait_leader(&mut self) -> Result<()> {
        let (log, log_start) = (self.log.clone(), self.log_start);
        let child = self.child.as_mut().context("the hub is not running")?;
        child
            .wait_ready(
                "leading the tag resolver",
                Duration::from_secs(60),
                || async {
                    let text = std::fs::read(&log).unwrap_or_default();
                    let since = text
                        .get(usize::try_from(log_start).unwrap_or(0)..)
                        .unwrap_or(&[]);
                    let since = String::from_utf8_lossy(since);
                    Ok(since.contains("Became the tag resolver leader")
                        || since.contains("Leading the tag resolver"))
                },
            )
            .await
    }

    /// Waits until the admin bundle exists and the admin API answers; returns a client.
    async fn wait_ready(&mut self) -> Result<AdminServiceClient<Channel>> {
        let admin_dir = self.data_dir.join("admin");
        let url = self.url();
        let client: Arc<std::sync::Mutex<Option<AdminServiceClient<Channel>>>> = Arc::default();
        let child = self.child.as_mut().context("the hub is not running")?;
        child
            .wait_ready("serving the admin API", Duration::from_secs(60), || {
                let admin_dir = admin_dir.clone();
                let url = url.clone();
                let client = client.clone();
                async move {
                    if !admin_dir.join("key.pem").is_file() {
                        return Ok(false);
                    }
                    let tls = TlsMaterial::from_dir(&admin_dir)?;
                    // Listing 10,000 clusters is larger than tonic's 4 MiB default.
                    let mut c = AdminServiceClient::new(tls.connect(&url).await?)
                        .max_decoding_message_size(LIST_LIMIT);
                    c.list(pb::ListRequest {
                        kind: pb::Kind::Cluster as i32,
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| anyhow!("listing clusters: {}: {}", s.code(), s.message()))?;
                    *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
                    Ok(true)
                }
            })
            .await?;
        let c = client.lock().unwrap_or_else(|e| e.into_inner()).take();
        c.context("the hub became ready without an admin client")
    }

    fn pid(&self) -> Result<u32> {
        self.child
            .as_ref()
            .and_then(ChildGuard::pid)
            .context("the hub is not running")
    }

    /// Fails, quoting the log, when the hub has exited.
    fn check(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("the hub is not running");
        };
        if let Some(status) = child.try_wait() {
            return Err(child.error_with_log(format!("exited with {status}")));
        }
        Ok(())
    }

    /// SIGKILLs the hub.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }
}
