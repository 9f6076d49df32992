//! The agent daemon: the hub session, the reconciler that turns the held
//! desired set into synced images, the mirror, GC and `/metrics`, for the
//! whole life of the process.
//!
//! The reconciler never waits for the hub: it starts from the set persisted on
//! disk and follows the session's `watch` of it, so the agent keeps syncing and
//! serving through hub outages and its own restarts. Each image is its own
//! task: a failed one is retried on its own schedule without holding up the
//! others, and images of a new set start as soon as the set arrives.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use imgfleet::api::v1 as pb;
use imgfleet_common::pki::{self, Identity};
use imgfleet_common::registry::Credentials;
use imgfleet_common::tls::TlsMaterial;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, error, info, warn};

use crate::desired::{self, DesiredFile, DesiredSet};
use crate::gc::{self, GcPolicy};
use crate::session::{ProgressBook, Session, SessionConfig, SessionStatus};
use crate::store::Store;
use crate::transfer::{self, Engine, EngineConfig, ImageStats, Phase, Progress, TransferError};

/// The daemon's flags (`imgfleet-agent --hub ...` or `imgfleet-agent run --hub ...`).
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// Hub URLs, comma-separated, tried in turn: https://HOST:PORT[,...].
    #[arg(long, env = "IMGFLEET_HUB", value_delimiter = ',', value_name = "URL")]
    pub hub: Vec<String>,
    /// Directory with ca.pem, cert.pem and key.pem from `imgfleet cluster enroll`.
    #[arg(long, env = "IMGFLEET_CREDENTIALS", value_name = "DIR")]
    pub credentials: Option<PathBuf>,
    /// Content store, desired set and local key.
    #[arg(long, env = "IMGFLEET_DATA_DIR", default_value = "./agent-data")]
    pub data_dir: PathBuf,
    /// Address the registry mirror listens on.
    #[arg(long, env = "IMGFLEET_MIRROR_LISTEN", default_value = "127.0.0.1:5050")]
    pub mirror_listen: String,
    /// Address of /metrics and /healthz, or `off`.
    #[arg(
        long,
        env = "IMGFLEET_METRICS_LISTEN",
        default_value = "127.0.0.1:9465"
    )]
    pub metrics_listen: String,
    /// Images transferred at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency_images: usize,
    /// Blobs transferred at once, across all images.
    #[arg(long, default_value_t = 8)]
    pub concurrency_blobs: usize,
    /// Combined bandwidth limit in bytes per second.
    #[arg(long, value_name = "BYTES")]
    pub bandwidth_limit: Option<u64>,
    /// Extra CA certificate (PEM) to trust for registries; repeatable.
    #[arg(long, value_name = "PEM")]
    pub ca_file: Vec<PathBuf>,
    /// How long content no longer desired stays, e.g. 30m, 24h, 0s (a Repository's
    /// retention.gracePeriod overrides it for its own content).
    #[arg(long, default_value = "24h")]
    pub grace_period: String,
    /// Versions kept per desired repository, the desired one included: 1 keeps
    /// only what is desired, 2 one older version for rollback (a Repository's
    /// retention.keepVersions overrides it for its own content).
    #[arg(long, default_value_t = 2)]
    pub keep_versions: usize,
    /// An upstream transfer that receives less than 16 KiB in this much time
    /// spent waiting is cut and resumed by Range, e.g. 30s.
    #[arg(long, default_value = "30s")]
    pub stall_timeout: String,
    /// The mirror's limits against hostile or broken clients.
    #[command(flatten)]
    pub mirror: crate::mirror::MirrorArgs,
}

/// A bad setting: which one and why. The binary exits 64 with it.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    /// The flag, e.g. `--credentials /etc/imgfleet`.
    pub setting: String,
    /// What is wrong and what was expected.
    pub message: String,
}

/// The checked daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub hubs: Vec<String>,
    pub tls: TlsMaterial,
    pub cluster: String,
    pub data_dir: PathBuf,
    pub mirror_listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub engine: EngineConfig,
    pub gc: GcPolicy,
    pub mirror: crate::mirror::Limits,
}

fn bad(setting: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting: setting.into(),
        message: message.into(),
    }
}

/// Parses a duration like `30m`, `24h` or `0s`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    // The model's durations are never zero; a zero grace period is useful here.
    if s.trim_end_matches(['s', 'm', 'h', 'd']) == "0" {
        return Some(Duration::ZERO);
    }
    imgfleet::model::parse_duration(s).ok()
}

impl DaemonArgs {
    /// Checks every setting and loads the credentials.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let hubs: Vec<String> = self
            .hub
            .iter()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .collect();
        if hubs.is_empty() {
            return Err(bad(
                "--hub",
                "required (or IMGFLEET_HUB): expected https://HOST:PORT[,https://HOST:PORT...]",
            ));
        }
        let tls = match &self.credentials {
            None => {
                return Err(bad(
                    "--credentials",
                    "required (or IMGFLEET_CREDENTIALS): the directory `imgfleet cluster enroll --out` wrote",
                ));
            }
            Some(dir) => TlsMaterial::from_dir(dir)
                .map_err(|e| bad(format!("--credentials {}", dir.display()), e.to_string()))?,
        };
        for h in &hubs {
            tls.endpoint(h)
                .map_err(|e| bad(format!("--hub {h}"), e.to_string()))?;
        }
        let cred_dir = self.credentials.clone().unwrap_or_default();
        let cluster = match pki::identity_from_pem(&tls.cert_pem) {
            Ok(Identity::Cluster(name)) => name,
            Ok(other) => {
                return Err(bad(
                    format!("--credentials {}", cred_dir.display()),
                    format!("cert.pem is for {other}, expected a cluster certificate"),
                ));
            }
            Err(e) => {
                return Err(bad(
                    format!("--credentials {}", cred_dir.display()),
                    format!("cert.pem: {e}"),
                ));
            }
        };
        let mirror_listen = self.mirror_listen.parse().map_err(|_| {
            bad(
                format!("--mirror-listen {}", self.mirror_listen),
                "expected HOST:PORT like 127.0.0.1:5050",
            )
        })?;
        let metrics_listen = if self.metrics_listen == "off" {
            None
        } else {
            Some(self.metrics_listen.parse().map_err(|_| {
                bad(
                    format!("--metrics-listen {}", self.metrics_listen),
                    "expected HOST:PORT like 127.0.0.1:9465, or off",
                )
            })?)
        };
        if self.concurrency_images == 0 {
            return Err(bad("--concurrency-images 0", "expected at least 1"));
        }
        if self.concurrency_blobs == 0 {
            return Err(bad("--concurrency-blobs 0", "expected at least 1"));
        }
        let grace_period = parse_duration(&self.grace_period).ok_or_else(|| {
            bad(
                format!("--grace-period {}", self.grace_period),
                "expected a duration like 30m, 24h or 0s",
            )
        })?;
        if self.keep_versions == 0 {
            return Err(bad(
                "--keep-versions 0",
                "expected at least 1: the count includes the desired version (1 keeps only it)",
            ));
        }
        let stall_timeout = parse_duration(&self.stall_timeout)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                bad(
                    format!("--stall-timeout {}", self.stall_timeout),
                    "expected a duration like 30s or 2m",
                )
            })?;
        let mirror = self.mirror.limits().map_err(|(s, m)| bad(s, m))?;
        let mut engine = EngineConfig {
            concurrency_images: self.concurrency_images,
            concurrency_blobs: self.concurrency_blobs,
            bandwidth_limit: self.bandwidth_limit,
            ..EngineConfig::default()
        };
        engine.min_progress = Some(imgfleet_common::registry::MinProgress {
            window: stall_timeout,
            ..Default::default()
        });
        for f in &self.ca_file {
            engine.extra_roots_pem.push(
                std::fs::read(f)
                    .map_err(|e| bad(format!("--ca-file {}", f.display()), e.to_string()))?,
            );
        }
        Ok(Config {
            hubs,
            tls,
            cluster,
            data_dir: self.data_dir,
            mirror_listen,
            metrics_listen,
            engine,
            gc: GcPolicy {
                grace_period,
                keep_versions: self.keep_versions,
            },
            mirror,
        })
    }
}

/// How long in-flight mirror requests may run on after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("opening the content store {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: crate::store::StoreError,
    },
    #[error(transparent)]
    DesiredFile(#[from] desired::DesiredFileError),
    #[error("listening on {setting} {addr}: {source}")]
    Listen {
        setting: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Task(String),
}

/// Runs the daemon until `shutdown`; then stops accepting, lets transfers
/// stop where they are (partials stay on disk for the next start) and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let data_dir = config.data_dir.clone();
    let store = {
        let d = data_dir.clone();
        tokio::task::spawn_blocking(move || Store::open(d))
            .await
            .map_err(|e| DaemonError::Task(e.to_string()))?
            .map_err(|source| DaemonError::Store {
                path: data_dir.clone(),
                source,
            })?
    };
    let store = Arc::new(store);
    let file = Arc::new(DesiredFile::open(&data_dir)?);
    let held = match file.load() {
        Ok(set) => set,
        Err(e) => {
            // The hub resends a full set to an agent that holds none.
            error!(error = %e, "Cannot read the held desired set; starting with none");
            DesiredSet::default()
        }
    };
    info!(
        cluster = %config.cluster,
        generation = held.generation,
        images = held.images.len(),
        "Starting from the held desired set"
    );
    let mirror = tokio::net::TcpListener::bind(config.mirror_listen)
        .await
        .map_err(|source| DaemonError::Listen {
            setting: "--mirror-listen",
            addr: config.mirror_listen,
            source,
        })?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Listen {
                    setting: "--metrics-listen",
                    addr,
                    source,
                })?,
        ),
        None => None,
    };
    let mirror_addr = mirror.local_addr().ok();
    let book = ProgressBook::new();
    book.set_storage(storage_report(&store).await);
    let status = Arc::new(SessionStatus::default());
    let (desired_tx, desired_rx) = watch::channel(Arc::new(held));
    let engine = Arc::new(Engine::new(store.clone(), config.engine.clone()));

    let tasks = TaskTracker::new();
    let mirror_stats = Arc::new(crate::mirror::Stats::default());
    tasks.spawn({
        let shutdown = shutdown.clone();
        let store = store.clone();
        let limits = config.mirror.clone();
        let stats = mirror_stats.clone();
        async move {
            let served =
                crate::mirror::serve_with_stats(mirror, store, limits, stats, shutdown).await;
            if let Err(e) = served {
                error!(error = %e, "Mirror stopped");
            }
        }
    });
    if let Some(listener) = metrics_listener {
        let router = metrics_router(MetricsState {
            book: book.clone(),
            status: status.clone(),
            engine: engine.clone(),
            desired: desired_rx.clone(),
            mirror: mirror_stats.clone(),
        });
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let r = axum::serve(listener, router)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
            if let Err(e) = r {
                error!(error = %e, "Metrics server stopped");
            }
        });
    }
    let session = Session::new(
        SessionConfig::new(
            config.hubs.clone(),
            config.tls.clone(),
            config.cluster.clone(),
        ),
        file,
        desired_tx,
        book.clone(),
        status,
    );
    tasks.spawn(session.run(shutdown.clone()));
    let reconciler = Reconciler::new(
        engine,
        desired_rx,
        book,
        config.gc,
        config.engine.concurrency_images,
    );
    tasks.spawn(reconciler.run(shutdown.clone()));
    tasks.close();
    println!(
        "imgfleet-agent for cluster {} serving the mirror on http://{}",
        config.cluster,
        mirror_addr.map(|a| a.to_string()).unwrap_or_default()
    );
    // After shutdown, in-flight mirror responses get a bounded grace period;
    // transfers stop at once (their partials are resumed on the next start).
    tokio::select! {
        _ = tasks.wait() => info!("Stopped"),
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => warn!(grace = ?SHUTDOWN_GRACE, "Stopped with requests still in flight"),
    }
    Ok(())
}

async fn storage_report(store: &Arc<Store>) -> pb::StorageReport {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let used = store.usage().map(|u| u.blob_bytes).unwrap_or(0);
        let capacity = gc::capacity(store.root()).0.unwrap_or(0);
        pb::StorageReport {
            used_bytes: used,
            capacity_bytes: capacity,
        }
    })
    .await
    .unwrap_or_default()
}

/// GC runs at least this often, to catch what changed on disk.
const GC_EVERY: Duration = Duration::from_secs(60);
/// GC runs again this soon after it failed or had to leave blobs in use.
const GC_RETRY: Duration = Duration::from_secs(10);

/// Delay before the `attempts`-th retry of a failed image: 2 s doubling, at most 5 min.
pub fn retry_delay(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(16);
    Duration::from_secs(2)
        .saturating_mul(1u32 << exp)
        .min(Duration::from_secs(300))
}

/// Where one desired image is.
#[derive(Debug)]
enum WorkState {
    /// A task is transferring it (or waiting for a slot).
    Running { abort: AbortHandle, attempt: u64 },
    /// Complete and servable.
    Synced,
    /// Failed; retried at this instant.
    RetryAt(Instant),
}

#[derive(Debug)]
struct Work {
    image: transfer::DesiredImage,
    /// Its Repository's retention.
    retention: gc::Retention,
    failures: u32,
    state: WorkState,
}

/// Brings the content store to the desired set, image by image.
#[derive(Debug)]
pub struct Reconciler {
    engine: Arc<Engine>,
    desired: watch::Receiver<Arc<DesiredSet>>,
    book: Arc<ProgressBook>,
    /// The agent's own retention (flags); each repository may set its own.
    gc: GcPolicy,
    slots: Arc<Semaphore>,
    works: BTreeMap<String, Work>,
    tasks: JoinSet<(String, u64, Result<ImageStats, TransferError>)>,
    progress_tx: mpsc::UnboundedSender<Progress>,
    progress_rx: mpsc::UnboundedReceiver<Progress>,
    next_attempt: u64,
    /// When GC runs next: soon after a new set, when a grace period ends,
    /// and at least every [`GC_EVERY`].
    gc_at: Instant,
}

impl Reconciler {
    /// A reconciler following `desired`.
    pub fn new(
        engine: Arc<Engine>,
        desired: watch::Receiver<Arc<DesiredSet>>,
        book: Arc<ProgressBook>,
        gc: GcPolicy,
        concurrency_images: usize,
    ) -> Reconciler {
        let (progress_tx, progress_rx) = mpsc::unbounded_channel();
        Reconciler {
            engine,
            desired,
            book,
            gc,
            slots: Arc::new(Semaphore::new(concurrency_images.max(1))),
            works: BTreeMap::new(),
            tasks: JoinSet::new(),
            progress_tx,
            progress_rx,
            next_attempt: 0,
            gc_at: Instant::now(),
        }
    }

    /// Follows the desired set until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let set = self.desired.borrow_and_update().clone();
        self.apply(&set);
        let mut following = true;
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_retry = self
                .works
                .values()
                .filter_map(|w| match w.state {
                    WorkState::RetryAt(at) => Some(at),
                    _ => None,
                })
                .min();
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                // Progress first, so that an image's last events are seen
                // before its result.
                Some(p) = self.progress_rx.recv() => self.on_progress(p),
                Some(done) = self.tasks.join_next() => match done {
                    Ok((key, attempt, result)) => self.on_done(key, attempt, result).await,
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => error!(error = %e, "Image task failed"),
                },
                r = self.desired.changed(), if following => {
                    if r.is_err() {
                        following = false;
                        continue;
                    }
                    let set = self.desired.borrow_and_update().clone();
                    self.apply(&set);
                }
                _ = tokio::time::sleep_until(next_retry.unwrap_or(far)), if next_retry.is_some() => {
                    self.start_due();
                }
                _ = tick.tick() => self.housekeeping().await,
            }
        }
        // Partials stay on disk; the next start resumes them.
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }

    fn transfer_image(set: &DesiredSet, d: &desired::DesiredImage) -> transfer::DesiredImage {
        let cred = set.registries.get(&d.registry_key);
        transfer::DesiredImage {
            key: d.key.clone(),
            registry: d.registry.clone(),
            repository: d.repository.clone(),
            digest: d.digest.clone(),
            tags: d.tags.clone(),
            platforms: d.platforms.clone(),
            credentials: cred
                .filter(|c| !c.username.is_empty())
                .map(|c| Credentials::new(c.username.clone(), c.password.clone())),
            insecure: cred.is_some_and(|c| c.insecure),
        }
    }

    /// Starts what is new or changed, forgets what is gone.
    fn apply(&mut self, set: &DesiredSet) {
        let gone: Vec<String> = self
            .works
            .keys()
            .filter(|k| !set.images.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(Work {
                state: WorkState::Running { abort, .. },
                ..
            }) = self.works.remove(&key)
            {
                abort.abort();
            }
            self.book.remove(&key);
        }
        for (key, d) in &set.images {
            let image = Self::transfer_image(set, d);
            let retention = gc::Retention {
                keep_versions: d.keep_versions,
                grace_period_seconds: d.grace_period_seconds,
            };
            if let Some(w) = self.works.get_mut(key)
                && w.retention != retention
            {
                w.retention = retention;
            }
            match self.works.get(key) {
                Some(w) if w.image == image => continue,
                Some(Work {
                    state: WorkState::Running { abort, .. },
                    ..
                }) => abort.abort(),
                _ => {}
            }
            self.works.insert(
                key.clone(),
                Work {
                    image,
                    retention,
                    failures: 0,
                    state: WorkState::Synced,
                },
            );
            self.start(key);
        }
        self.gc_at = Instant::now();
    }

    fn start(&mut self, key: &str) {
        let Some(work) = self.works.get_mut(key) else {
            return;
        };
        self.next_attempt += 1;
        let attempt = self.next_attempt;
        let engine = self.engine.clone();
        let slots = self.slots.clone();
        let progress = self.progress_tx.clone();
        let image = work.image.clone();
        let key = key.to_string();
        let span = tracing::info_span!("transfer", key = %key, attempt);
        let abort = self.tasks.spawn(
            async move {
                let _slot = slots.acquire_owned().await;
                let result = engine.sync_image(&image, Some(progress)).await;
                (key, attempt, result)
            }
            .instrument(span),
        );
        work.state = WorkState::Running { abort, attempt };
        let last = self.book.get(&work.image.key);
        self.book.set(pb::ImageProgress {
            key: work.image.key.clone(),
            digest: work.image.digest.clone(),
            phase: pb::ImagePhase::Pending as i32,
            bytes_done: last.as_ref().map_or(0, |l| l.bytes_done),
            bytes_total: last.as_ref().map_or(0, |l| l.bytes_total),
            layers_done: last.as_ref().map_or(0, |l| l.layers_done),
            layers_total: last.as_ref().map_or(0, |l| l.layers_total),
            message: String::new(),
            updated_at: Some(SystemTime::now().into()),
            next_retry_time: None,
            attempts: work.failures,
        });
    }

    fn start_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .works
            .iter()
            .filter(|(_, w)| matches!(w.state, WorkState::RetryAt(at) if at <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.start(&key);
        }
    }

    fn on_progress(&mut self, p: Progress) {
        // Only the running attempt speaks; its result decides the end state.
        let Some(work) = self.works.get(&p.key) else {
            return;
        };
        if !matches!(work.state, WorkState::Running { .. }) {
            return;
        }
        let phase = match p.phase {
            Phase::Pending => pb::ImagePhase::Pending,
            Phase::Manifests | Phase::Blobs | Phase::Committing => pb::ImagePhase::Syncing,
            Phase::Synced | Phase::Failed => return,
        };
        self.book.set(pb::ImageProgress {
            key: p.key,
            digest: p.digest,
            phase: phase as i32,
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
            layers_done: p.layers_done,
            layers_total: p.layers_total,
            message: String::new(),
            updated_at: Some(SystemTime::now().into()),
            next_retry_time: None,
            attempts: work.failures,
        });
    }

    async fn on_done(
        &mut self,
        key: String,
        attempt: u64,
        result: Result<ImageStats, TransferError>,
    ) {
        let Some(work) = self.works.get_mut(&key) else {
            return;
        };
        if !matches!(work.state, WorkState::Running { attempt: a, .. } if a == attempt) {
            return;
        }
        let image = &work.image;
        // SYNCED only once the mirror can serve it.
        let result = result.and_then(|stats| {
            if self
                .engine
                .store()
                .has_image(&image.registry, &image.repository, &image.digest)
            {
                Ok(stats)
            } else {
                Err(TransferError::Invalid {
                    key: key.clone(),
                    message: "transfer ended but the image is not recorded".into(),
                })
            }
        });
        let last = self.book.get(&key);
        match result {
            Ok(stats) => {
                info!(key = %key, bytes = stats.bytes_total, fetched = stats.bytes_fetched, "Image synced");
                work.state = WorkState::Synced;
                work.failures = 0;
                self.book.set(pb::ImageProgress {
                    key: key.clone(),
                    digest: image.digest.clone(),
                    phase: pb::ImagePhase::Synced as i32,
                    bytes_done: stats.bytes_total,
                    bytes_total: stats.bytes_total,
                    layers_done: stats.blobs_total,
                    layers_total: stats.blobs_total,
                    message: String::new(),
                    updated_at: Some(SystemTime::now().into()),
                    next_retry_time: None,
                    attempts: 0,
                });
            }
            Err(e) => {
                work.failures += 1;
                let delay = retry_delay(work.failures);
                warn!(key = %key, attempts = work.failures, retry_in = ?delay, error = %e, "Image failed; will retry");
                work.state = WorkState::RetryAt(Instant::now() + delay);
                self.book.set(pb::ImageProgress {
                    key: key.clone(),
                    digest: image.digest.clone(),
                    phase: pb::ImagePhase::Failed as i32,
                    bytes_done: last.as_ref().map_or(0, |l| l.bytes_done),
                    bytes_total: last.as_ref().map_or(0, |l| l.bytes_total),
                    layers_done: last.as_ref().map_or(0, |l| l.layers_done),
                    layers_total: last.as_ref().map_or(0, |l| l.layers_total),
                    message: e.to_string(),
                    updated_at: Some(SystemTime::now().into()),
                    next_retry_time: Some((SystemTime::now() + delay).into()),
                    attempts: work.failures,
                });
            }
        }
        self.book
            .set_storage(storage_report(self.engine.store()).await);
    }

    /// Storage figures, and GC when due. GC runs whether or not images are
    /// transferring or failing: transfers pin what they use (see
    /// [`crate::store::Pins`]), and every image of the set counts as wanted,
    /// synced or not, each with its own Repository's retention.
    async fn housekeeping(&mut self) {
        self.book
            .set_storage(storage_report(self.engine.store()).await);
        let generation = self.desired.borrow().generation;
        // Generation 0: no set was ever received; nothing is known to be unwanted.
        if generation == 0 || Instant::now() < self.gc_at {
            return;
        }
        let wanted: Vec<gc::Wanted> = self
            .works
            .values()
            .map(|w| gc::Wanted {
                id: (
                    w.image.registry.clone(),
                    w.image.repository.clone(),
                    w.image.digest.clone(),
                ),
                retention: w.retention,
            })
            .collect();
        let store = self.engine.store().clone();
        let policy = self.gc;
        let next_gc =
            match tokio::task::spawn_blocking(move || gc::collect(&store, &wanted, &[], &policy))
                .await
            {
                Ok(Ok(report)) => {
                    if !report.images_removed.is_empty() || report.blobs_removed > 0 {
                        info!(
                            images = report.images_removed.len(),
                            blobs = report.blobs_removed,
                            bytes = report.bytes_freed,
                            "Collected content no longer desired"
                        );
                    }
                    if report.blobs_deferred > 0 {
                        // Transfers held some blobs: look again once they may be done.
                        GC_RETRY
                    } else {
                        // A second more than the grace left, as plan counts whole seconds.
                        report
                            .next_due
                            .map_or(GC_EVERY, |d| d + Duration::from_secs(1))
                    }
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "GC failed; will try again");
                    GC_RETRY
                }
                Err(e) => {
                    warn!(error = %e, "GC task failed");
                    GC_RETRY
                }
            };
        self.gc_at = Instant::now() + next_gc.min(GC_EVERY);
    }
}

#[derive(Clone)]
struct MetricsState {
    book: Arc<ProgressBook>,
    status: Arc<SessionStatus>,
    engine: Arc<Engine>,
    desired: watch::Receiver<Arc<DesiredSet>>,
    mirror: Arc<crate::mirror::Stats>,
}

fn metrics_router(state: MetricsState) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(
                |axum::extract::State(s): axum::extract::State<MetricsState>| async move {
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        render_metrics(&s),
                    )
                },
            ),
        )
        .with_state(state)
}

fn render_metrics(s: &MetricsState) -> String {
    let (images, synced, failed) = s.book.counts();
    let storage = s.book.storage();
    let counters = s.engine.counters();
    let generation = s.desired.borrow().generation;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "imgfleet_agent_images_desired",
        "gauge",
        "Images in the held desired set.",
        images as u64,
    );
    metric(
        "imgfleet_agent_images_synced",
        "gauge",
        "Desired images synced and servable.",
        synced as u64,
    );
    metric(
        "imgfleet_agent_images_failed",
        "gauge",
        "Desired images whose last attempt failed.",
        failed as u64,
    );
    metric(
        "imgfleet_agent_desired_generation",
        "gauge",
        "Generation of the held desired set.",
        generation,
    );
    metric(
        "imgfleet_agent_hub_connected",
        "gauge",
        "1 while a hub session is up.",
        u64::from(s.status.connected.load(Ordering::Relaxed)),
    );
    metric(
        "imgfleet_agent_hub_reconnects_total",
        "counter",
        "Hub sessions that ended and were retried.",
        s.status.reconnects.load(Ordering::Relaxed),
    );
    metric(
        "imgfleet_agent_storage_used_bytes",
        "gauge",
        "Bytes of verified content.",
        storage.used_bytes,
    );
    metric(
        "imgfleet_agent_storage_capacity_bytes",
        "gauge",
        "Capacity of the filesystem holding the store.",
        storage.capacity_bytes,
    );
    metric(
        "imgfleet_agent_bytes_received_total",
        "counter",
        "Blob bytes received from registries.",
        counters.bytes_received,
    );
    metric(
        "imgfleet_agent_blobs_completed_total",
        "counter",
        "Blobs completed and verified.",
        counters.blobs_completed,
    );
    let m = &s.mirror;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    for (name, kind, help, value) in [
        (
            "imgfleet_agent_mirror_connections",
            "gauge",
            "Mirror connections open now.",
            load(&m.open),
        ),
        (
            "imgfleet_agent_mirror_connections_total",
            "counter",
            "Mirror connections accepted.",
            load(&m.accepted),
        ),
        (
            "imgfleet_agent_mirror_requests_total",
            "counter",
            "Mirror requests answered.",
            load(&m.requests),
        ),
        (
            "imgfleet_agent_mirror_stalled_total",
            "counter",
            "Mirror connections cut because the client stopped reading.",
            load(&m.stalled),
        ),
        (
            "imgfleet_agent_mirror_header_timeouts_total",
            "counter",
            "Mirror connections closed for not sending a request head in time.",
            load(&m.header_timeouts),
        ),
        (
            "imgfleet_agent_mirror_drained_total",
            "counter",
            "Idle mirror connections closed to make room at the connection limit.",
            load(&m.drained),
        ),
        (
            "imgfleet_agent_mirror_bad_requests_total",
            "counter",
            "Mirror requests refused as malformed or too large.",
            load(&m.bad_requests),
        ),
    ] {
        metric(name, kind, help, value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_a_cap() {
        let cases = [(1, 2), (2, 4), (3, 8), (8, 256), (9, 300), (50, 300)];
        for (attempts, secs) in cases {
            assert_eq!(
                retry_delay(attempts),
                Duration::from_secs(secs),
                "attempt {attempts}"
            );
        }
    }

    #[test]
    fn durations_parse_with_zero() {
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("soon"), None);
    }
}
