//! The transfer engine: brings desired images into the content store.
//!
//! Each image goes through three steps, in the manner of containerd's
//! content writers (status, write, `Commit(size, expected)`):
//!
//! 1. **Plan.** The root manifest or index (from the store when held, else
//!    fetched by digest and verified), then the platform manifests it names,
//!    through nested indexes up to [`plan::MAX_INDEX_DEPTH`]. What to fetch
//!    and what to record is decided by the pure [`plan::image`] over the
//!    manifest bytes; this step only fetches what it says is missing. What
//!    the store already holds is read first, in one trip to the blocking
//!    pool, so that a re-sync of a complete image needs no other.
//! 2. **Fetch.** Only the blobs the store lacks, several at once. Blobs
//!    stream to a partial file with bounded memory and resume by HTTP Range
//!    from the partial's length after a network error, a stall below the
//!    minimum progress, or a restart; the bytes already on disk are
//!    re-hashed before they are trusted. A blob already in the store counts
//!    only when its size is the one the manifest states.
//! 3. **Record.** The image is recorded (and so servable) only after every
//!    blob it needs is present and verified.
//!
//! Store calls that touch the disk (`records`, manifest reads, `put_blob`
//! with its fsync, size checks, commits) run on the blocking pool, never on
//! the async workers that move the bytes.

mod blob;
mod error;
mod limit;
pub mod plan;
mod progress;
mod referrers;

pub use error::{InvalidImage, TransferError};
pub use limit::RateLimiter;
pub use progress::{Phase, Progress};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use imgfleet_common::cosign;
use imgfleet_common::registry::{
    Credentials, MinProgress, RegistryClient, RegistryConfig, RegistryError, sha256_hex,
    valid_repository, valid_tag,
};
use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{Instrument, debug, info, warn};

use crate::desired::DesiredImage;
use crate::store::{ManifestRecord, Pins, Store, StoreError, now_unix};
use plan::{BlobRef, Document, ImagePlan};
use progress::Tracker;

/// One image to bring in: the image as desired, and how to reach its
/// registry. `Debug` never shows the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pull {
    /// The image.
    pub image: DesiredImage,
    /// Pull credentials; `None` for anonymous.
    pub credentials: Option<Credentials>,
    /// Plain HTTP to the registry.
    pub insecure: bool,
}

impl Pull {
    /// Whether pulling `other` would fetch and record exactly what pulling
    /// this does. Retention and where the image comes from (its Repository,
    /// its credential's key) do not change a transfer.
    pub fn same_transfer(&self, other: &Pull) -> bool {
        let (a, b) = (&self.image, &other.image);
        a.key == b.key
            && a.registry == b.registry
            && a.repository == b.repository
            && a.digest == b.digest
            && a.tags == b.tags
            && a.platforms == b.platforms
            && a.verify_keys == b.verify_keys
            && self.credentials == other.credentials
            && self.insecure == other.insecure
    }
}

/// Retry policy for registry requests.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: usize,
    /// First delay.
    pub min_delay: Duration,
    /// Largest delay (and cap on a registry's Retry-After).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 6,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Images transferred at once.
    pub concurrency_images: usize,
    /// Blobs transferred at once, across all images.
    pub concurrency_blobs: usize,
    /// Combined bandwidth limit in bytes/s.
    pub bandwidth_limit: Option<u64>,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Extra trusted CA certificates (PEM) for registries.
    pub extra_roots_pem: Vec<Vec<u8>>,
    /// No byte for this long fails the attempt (then it is retried).
    pub read_timeout: Duration,
    /// A body that trickles (less than this much per window of waiting) is
    /// cut and resumed by Range; `None` relies on `read_timeout` alone.
    pub min_progress: Option<MinProgress>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            concurrency_images: 4,
            concurrency_blobs: 8,
            bandwidth_limit: None,
            retry: RetryPolicy::default(),
            extra_roots_pem: Vec::new(),
            read_timeout: Duration::from_secs(30),
            min_progress: Some(MinProgress::default()),
        }
    }
}

/// What one image's transfer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageStats {
    /// Blob bytes the image needs.
    pub bytes_total: u64,
    /// Blob bytes received over the network for it.
    pub bytes_fetched: u64,
    /// Blobs the image needs.
    pub blobs_total: u32,
    /// Blobs downloaded for it (not already present, not fetched by another image).
    pub blobs_fetched: u32,
    /// The image was complete before this sync: nothing was fetched.
    pub already_present: bool,
}

/// The outcome of one image in [`Engine::sync`].
#[derive(Debug)]
pub struct SyncReport {
    /// The image.
    pub image: DesiredImage,
    /// Its result.
    pub result: Result<ImageStats, TransferError>,
}

/// Engine-wide counters since it was made (for tests and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Blob GET requests sent.
    pub blob_requests: u64,
    /// Manifest GET requests sent.
    pub manifest_requests: u64,
    /// Blob bytes received.
    pub bytes_received: u64,
    /// Blobs completed by download.
    pub blobs_completed: u64,
}

#[derive(Debug, Default)]
struct AtomicCounters {
    blob_requests: AtomicU64,
    manifest_requests: AtomicU64,
    bytes_received: AtomicU64,
    blobs_completed: AtomicU64,
}

type ClientKey = (String, Option<(String, String)>, bool);

/// A registry client, built by the first image that asks for it.
type ClientCell = tokio::sync::OnceCell<Arc<RegistryClient>>;

/// The transfer engine. Share it behind an `Arc`; one per store. Its `Debug`
/// leaves out the client map, whose keys hold registry passwords.
pub struct Engine {
    store: Arc<Store>,
    config: EngineConfig,
    /// Blob downloads at once, across images.
    blob_slots: Arc<Semaphore>,
    /// The shared bandwidth limit, if any.
    limiter: Option<RateLimiter>,
    /// One client per registry and credentials, so bearer tokens are
    /// reused; each built once, however many images ask for it at once.
    clients: Mutex<HashMap<ClientKey, Arc<ClientCell>>>,
    /// One download at a time per digest: a second image needing the same
    /// blob waits for the first and then finds it present.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    counters: AtomicCounters,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let clients: Vec<String> = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .map(|(registry, creds, insecure)| {
                let user = creds.as_ref().map_or("anonymous", |(u, _)| u.as_str());
                format!(
                    "{registry} as {user}{}",
                    if *insecure { " (http)" } else { "" }
                )
            })
            .collect();
        f.debug_struct("Engine")
            .field("store", &self.store.root())
            .field("config", &self.config)
            .field("clients", &clients)
            .field("counters", &self.counters())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine writing into `store`.
    pub fn new(store: Arc<Store>, config: EngineConfig) -> Engine {
        let slots = config.concurrency_blobs.max(1);
        Engine {
            store,
            limiter: config.bandwidth_limit.map(RateLimiter::new),
            blob_slots: Arc::new(Semaphore::new(slots)),
            config,
            clients: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            counters: AtomicCounters::default(),
        }
    }

    /// The content store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Counters since the engine was made.
    pub fn counters(&self) -> Counters {
        let c = &self.counters;
        Counters {
            blob_requests: c.blob_requests.load(Ordering::Relaxed),
            manifest_requests: c.manifest_requests.load(Ordering::Relaxed),
            bytes_received: c.bytes_received.load(Ordering::Relaxed),
            blobs_completed: c.blobs_completed.load(Ordering::Relaxed),
        }
    }

    /// A registry client, shared by images with the same registry and
    /// credentials so that bearer tokens are reused. A new client is built
    /// once, on the blocking pool (it may read the system's trust roots),
    /// while every other image asking for it at the same time waits.
    pub async fn client(
        &self,
        registry: &str,
        credentials: Option<&Credentials>,
        insecure: bool,
    ) -> Result<Arc<RegistryClient>, TransferError> {
        let key = (
            registry.to_string(),
            credentials.map(|c| (c.username.clone(), c.password.clone())),
            insecure,
        );
        let cell = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        let client = cell
            .get_or_try_init(|| async {
                let started = std::time::Instant::now();
                let config = RegistryConfig {
                    host: registry.to_string(),
                    credentials: credentials.cloned(),
                    insecure,
                    extra_roots_pem: self.config.extra_roots_pem.clone(),
                    connect_timeout: None,
                    read_timeout: Some(self.config.read_timeout),
                    min_progress: self.config.min_progress,
                };
                let client = tokio::task::spawn_blocking(move || RegistryClient::new(config))
                    .await
                    .map_err(|source| TransferError::Task {
                        op: "building a registry client",
                        source,
                    })??;
                debug!(registry, elapsed = ?started.elapsed(), "Registry client built");
                Ok::<_, TransferError>(Arc::new(client))
            })
            .await?;
        Ok(client.clone())
    }

    /// Brings in every image, `concurrency_images` at a time, and reports each.
    pub async fn sync(
        &self,
        pulls: Vec<Pull>,
        progress: Option<UnboundedSender<Progress>>,
    ) -> Vec<SyncReport> {
        futures::stream::iter(pulls)
            .map(|pull| {
                let progress = progress.clone();
                async move {
                    let result = self.sync_image(&pull, progress).await;
                    SyncReport {
                        image: pull.image,
                        result,
                    }
                }
            })
            .buffer_unordered(self.config.concurrency_images.max(1))
            .collect()
            .await
    }

    /// Brings in one image and records it with its tags.
    pub async fn sync_image(
        &self,
        pull: &Pull,
        progress: Option<UnboundedSender<Progress>>,
    ) -> Result<ImageStats, TransferError> {
        let image = &pull.image;
        let span = tracing::info_span!("image", key = %image.key, repository = %image.repository, digest = %image.digest);
        let tracker = Tracker::new(&image.key, &image.digest, progress);
        let result = self
            .plan_fetch_record(pull, &tracker)
            .instrument(span)
            .await;
        match &result {
            Ok(_) => tracker.emit(Phase::Synced, None, true),
            Err(e) => tracker.emit(Phase::Failed, Some(e.to_string()), true),
        }
        result
    }

    /// The three steps of one image; see the module documentation.
    async fn plan_fetch_record(
        &self,
        pull: &Pull,
        tracker: &Tracker,
    ) -> Result<ImageStats, TransferError> {
        let image = &pull.image;
        check(image)?;
        // Everything this image uses stays pinned until it is recorded, so
        // that GC running meanwhile never deletes what this sync counted on.
        let mut pins = self.store.pins();
        pins.add(&image.digest);
        let Survey {
            existing,
            root,
            held,
            complete,
            pins,
        } = {
            let (store, image) = (self.store.clone(), image.clone());
            blocking("reading the store", move || survey(&store, &image, pins)).await?
        };
        let mut pins = pins;
        let already = existing.iter().any(|r| {
            r.registry == image.registry
                && r.repository == image.repository
                && r.digest == image.digest
                && r.parent.is_none()
        });
        tracker.emit(Phase::Manifests, None, true);
        let client = LazyClient::new(self, pull);
        let (plan, sizes) = match complete {
            Some((plan, sizes)) => (plan, Some(sizes)),
            None => {
                let plan = self
                    .plan(image, root, held, &existing, &client, &mut pins)
                    .await?;
                (plan, None)
            }
        };
        // Checked before any layer is fetched: an image that fails never
        // costs its layers' bandwidth.
        if !already && !image.verify_keys.is_empty() {
            self.verify_signature(image, &client).await?;
        }
        let mut stats = self
            .fetch_missing(image, &plan.blobs, sizes, &client, &mut pins, tracker)
            .await?;
        stats.already_present = already;
        let mut records = plan.records;
        // Referrers are looked for when an image is first synced, not on each
        // re-sync of one already held: a no-op re-sync sends no request.
        if !already {
            let found = self
                .sync_referrers(image, &existing, &client, &mut pins)
                .await;
            stats.bytes_fetched += found.bytes_fetched;
            stats.blobs_fetched += found.blobs_fetched;
            records.extend(found.records);
        }
        tracker.emit(Phase::Committing, None, true);
        self.record(records, &existing).await?;
        info!(
            bytes_fetched = stats.bytes_fetched,
            blobs_fetched = stats.blobs_fetched,
            blobs_total = stats.blobs_total,
            "Image synced"
        );
        Ok(stats)
    }

    /// Step 1: the manifests of the image the store lacks, fetched until
    /// [`plan::image`] finds none missing, and its plan. `root` and `held`
    /// are what the store had (see [`survey`]).
    async fn plan(
        &self,
        image: &DesiredImage,
        root: Option<Document>,
        mut held: HashMap<String, Document>,
        existing: &[ManifestRecord],
        client: &LazyClient<'_>,
        pins: &mut Pins,
    ) -> Result<ImagePlan, TransferError> {
        let root = match root {
            Some(root) => root,
            None => {
                self.manifest(image, &image.digest, None, existing, client)
                    .instrument(tracing::info_span!("manifest", digest = %image.digest))
                    .await?
            }
        };
        loop {
            let plan = plan::image(image, &root, &held, now_unix())?;
            if plan.missing.is_empty() {
                return Ok(plan);
            }
            // Each round fetches every child the last one found, so the
            // rounds end after as many as indexes nest.
            for child in plan.missing {
                pins.add(&child.digest);
                let document = self
                    .manifest(image, &child.digest, Some(child.size), existing, client)
                    .instrument(tracing::info_span!("manifest", digest = %child.digest))
                    .await?;
                held.insert(child.digest, document);
            }
        }
    }

    /// Step 2: every blob of the plan that the store lacks, several at once.
    /// `sizes` are the blobs' sizes in the store when the survey read them.
    async fn fetch_missing(
        &self,
        image: &DesiredImage,
        blobs: &[BlobRef],
        sizes: Option<Vec<Option<u64>>>,
        client: &LazyClient<'_>,
        pins: &mut Pins,
        tracker: &Tracker,
    ) -> Result<ImageStats, TransferError> {
        let mut stats = ImageStats {
            bytes_total: blobs.iter().map(|b| b.size).sum(),
            blobs_total: blobs.len() as u32,
            ..ImageStats::default()
        };
        tracker
            .bytes_total
            .store(stats.bytes_total, Ordering::Relaxed);
        tracker
            .layers_total
            .store(stats.blobs_total, Ordering::Relaxed);
        for b in blobs {
            pins.add(&b.digest);
        }
        let sizes = match sizes {
            Some(sizes) => sizes,
            None => self.blob_sizes(blobs).await?,
        };
        let mut missing = Vec::new();
        for (b, held) in blobs.iter().zip(presence(blobs, sizes)?) {
            if held {
                tracker.bytes_done.fetch_add(b.size, Ordering::Relaxed);
                tracker.layers_done.fetch_add(1, Ordering::Relaxed);
            } else {
                missing.push(b.clone());
            }
        }
        tracker.emit(Phase::Blobs, None, true);
        if missing.is_empty() {
            return Ok(stats);
        }
        let client = client.get().await?;
        let results: Vec<Result<Option<u64>, TransferError>> = futures::stream::iter(missing)
            .map(|b| {
                let client = client.clone();
                async move {
                    let span = tracing::info_span!("fetch blob", digest = %b.digest, size = b.size);
                    let fetched = self
                        .fetch_blob(&client, &image.repository, &b, tracker)
                        .instrument(span)
                        .await?;
                    tracker.layers_done.fetch_add(1, Ordering::Relaxed);
                    tracker.emit(Phase::Blobs, None, true);
                    Ok(fetched)
                }
            })
            .buffer_unordered(self.config.concurrency_blobs.max(1))
            .collect()
            .await;
        for r in results {
            if let Some(n) = r? {
                stats.bytes_fetched += n;
                stats.blobs_fetched += 1;
            }
        }
        Ok(stats)
    }

    /// Step 3: records the image, unless the store records exactly this
    /// already (a no-op re-sync writes nothing). Records carry the time they
    /// are written, not planned: GC orders a repository's versions by it.
    async fn record(
        &self,
        mut records: Vec<ManifestRecord>,
        existing: &[ManifestRecord],
    ) -> Result<(), TransferError> {
        let unchanged = records.iter().all(|r| {
            existing.iter().any(|e| {
                e.registry == r.registry
                    && e.repository == r.repository
                    && e.tag == r.tag
                    && e.digest == r.digest
                    && e.parent == r.parent
                    && e.subject == r.subject
            })
        });
        if unchanged {
            return Ok(());
        }
        let now = now_unix();
        for r in &mut records {
            r.recorded_at = now;
        }
        let store = self.store.clone();
        blocking("recording", move || store.record(records)).await
    }

    /// The sizes of blobs in the store (`None`: absent), in one trip to the
    /// blocking pool.
    pub(super) async fn blob_sizes(
        &self,
        blobs: &[BlobRef],
    ) -> Result<Vec<Option<u64>>, TransferError> {
        let store = self.store.clone();
        let digests: Vec<String> = blobs.iter().map(|b| b.digest.clone()).collect();
        blocking("checking blobs", move || {
            Ok::<_, StoreError>(digests.iter().map(|d| store.blob_size(d)).collect())
        })
        .await
    }

    /// A manifest's bytes and media type: from the store when present (it was
    /// verified when stored), else fetched by digest, verified and stored.
    /// `size` is what the index naming it says, for a child.
    async fn manifest(
        &self,
        image: &DesiredImage,
        digest: &str,
        size: Option<u64>,
        existing: &[ManifestRecord],
        client: &LazyClient<'_>,
    ) -> Result<Document, TransferError> {
        let stored = {
            let (store, digest) = (self.store.clone(), digest.to_string());
            blocking("reading a manifest", move || held_bytes(&store, &digest)).await?
        };
        if let Some(document) = stored
            .map(|bytes| as_document(existing, digest, size, bytes))
            .transpose()?
            .flatten()
        {
            return Ok(document);
        }
        let client = client.get().await?;
        let m = (|| async {
            self.counters
                .manifest_requests
                .fetch_add(1, Ordering::Relaxed);
            client.get_manifest(&image.repository, digest).await
        })
        .retry(self.backoff())
        .when(|e: &RegistryError| e.is_retryable())
        .adjust(|e: &RegistryError, d| adjust_delay(e.retry_after(), d))
        .notify(
            |e: &RegistryError, d| warn!(error = %e, delay = ?d, "Manifest fetch failed; retrying"),
        )
        .await?;
        check_size(digest, size, m.bytes.len())?;
        let (store, bytes) = (self.store.clone(), m.bytes.clone());
        let digest = m.digest;
        blocking("storing a manifest", move || {
            store.put_blob(&digest, &bytes)
        })
        .await?;
        Ok((m.bytes.to_vec(), m.media_type))
    }

    /// The agent's own check of the image's cosign signature against the
    /// keys its Repository names, before the image is recorded (and so
    /// visible): the hub checked it when it resolved, and this holds even if
    /// the upstream's content changed since, or the hub was wrong.
    async fn verify_signature(
        &self,
        image: &DesiredImage,
        client: &LazyClient<'_>,
    ) -> Result<(), TransferError> {
        let failed = |reason: String| TransferError::VerificationFailed {
            key: image.key.clone(),
            reason,
        };
        let mut verifiers = Vec::with_capacity(image.verify_keys.len());
        for (name, pem) in &image.verify_keys {
            verifiers.push(
                cosign::Verifier::from_pem(name, pem)
                    .map_err(|e| failed(format!("key {name}: {e}")))?,
            );
        }
        let client = client.get().await?;
        let layers = (|| async { cosign::fetch(&client, &image.repository, &image.digest).await })
            .retry(self.backoff())
            .when(|e: &RegistryError| e.is_retryable())
            .adjust(|e: &RegistryError, d| adjust_delay(e.retry_after(), d))
            .await?;
        let accepted = cosign::verify(&verifiers, &image.digest, &layers)
            .map_err(|e| failed(e.to_string()))?;
        info!(key = %accepted.key, "Signature verified");
        Ok(())
    }

    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.config.retry.min_delay)
            .with_max_delay(self.config.retry.max_delay)
            .with_max_times(self.config.retry.max_retries)
            .with_jitter()
    }
}

/// Refuses a desired image whose names could change the paths and URLs
/// they are put in.
fn check(image: &DesiredImage) -> Result<(), TransferError> {
    let problem = if sha256_hex(&image.digest).is_none() {
        InvalidImage::Digest(image.digest.clone())
    } else if !valid_repository(&image.repository) {
        InvalidImage::Repository(image.repository.clone())
    } else if let Some(t) = image.tags.iter().find(|t| !valid_tag(t)) {
        InvalidImage::Tag(t.clone())
    } else {
        return Ok(());
    };
    Err(TransferError::Invalid {
        key: image.key.clone(),
        problem,
    })
}

/// The registry client of one image, made on first use: a re-sync of a
/// complete image never needs one.
struct LazyClient<'e> {
    engine: &'e Engine,
    pull: &'e Pull,
    cell: tokio::sync::OnceCell<Arc<RegistryClient>>,
}

impl<'e> LazyClient<'e> {
    fn new(engine: &'e Engine, pull: &'e Pull) -> Self {
        LazyClient {
            engine,
            pull,
            cell: tokio::sync::OnceCell::new(),
        }
    }

    async fn get(&self) -> Result<Arc<RegistryClient>, TransferError> {
        let pull = self.pull;
        self.cell
            .get_or_try_init(|| {
                self.engine.client(
                    &pull.image.registry,
                    pull.credentials.as_ref(),
                    pull.insecure,
                )
            })
            .await
            .cloned()
    }
}

/// An image's plan and the size in the store of each of its blobs (`None`:
/// absent).
type Complete = (ImagePlan, Vec<Option<u64>>);

/// What the store already holds of one image, read in one trip to the
/// blocking pool: a re-sync of a complete image needs no other.
struct Survey {
    /// The store's records. One snapshot serves every lookup: on a no-op
    /// re-sync of many images, re-reading and cloning them per lookup was a
    /// measurable share of the run.
    existing: Vec<ManifestRecord>,
    /// The root manifest, when held.
    root: Option<Document>,
    /// The child manifests held, by digest.
    held: HashMap<String, Document>,
    /// When every manifest the image needs was held: its plan, and the size
    /// in the store of each of its blobs.
    complete: Option<Complete>,
    /// The pins, with every digest read so far; the transfer goes on with
    /// them.
    pins: Pins,
}

/// Reads what the store holds of `image`: its records, its manifests as far
/// as held, and, when that is all of them, its plan and its blobs' sizes.
/// Each digest is pinned before it is read, as the transfer pins them.
/// Blocking.
fn survey(store: &Store, image: &DesiredImage, mut pins: Pins) -> Result<Survey, TransferError> {
    let existing = store.records();
    let mut held = HashMap::new();
    let root = stored_manifest(store, &existing, &image.digest, None)?;
    let complete = match &root {
        Some(root) => held_plan(store, image, root, &existing, &mut held, &mut pins)?,
        None => None,
    };
    Ok(Survey {
        existing,
        root,
        held,
        complete,
        pins,
    })
}

/// Plans `image` over the manifests the store holds, adding the children it
/// finds to `held`: the plan and its blobs' sizes when the store held every
/// manifest, `None` when some must be fetched. Blocking.
fn held_plan(
    store: &Store,
    image: &DesiredImage,
    root: &Document,
    existing: &[ManifestRecord],
    held: &mut HashMap<String, Document>,
    pins: &mut Pins,
) -> Result<Option<Complete>, TransferError> {
    loop {
        let plan = plan::image(image, root, held, now_unix())?;
        if plan.missing.is_empty() {
            let sizes = plan
                .blobs
                .iter()
                .map(|b| {
                    pins.add(&b.digest);
                    store.blob_size(&b.digest)
                })
                .collect();
            return Ok(Some((plan, sizes)));
        }
        let mut found = false;
        for child in &plan.missing {
            pins.add(&child.digest);
            if let Some(doc) = stored_manifest(store, existing, &child.digest, Some(child.size))? {
                held.insert(child.digest.clone(), doc);
                found = true;
            }
        }
        if !found {
            return Ok(None);
        }
    }
}

/// A manifest's bytes and media type from the store, when it holds them
/// (they were verified when stored) with the size the index naming it says.
/// The media type is recorded for roots and children; the document's own
/// field is the fallback, and without either the manifest counts as absent.
/// Blocking.
fn stored_manifest(
    store: &Store,
    existing: &[ManifestRecord],
    digest: &str,
    size: Option<u64>,
) -> Result<Option<Document>, TransferError> {
    match held_bytes(store, digest)? {
        Some(bytes) => as_document(existing, digest, size, bytes),
        None => Ok(None),
    }
}

/// A blob's bytes, when the store holds it. Blocking.
fn held_bytes(store: &Store, digest: &str) -> Result<Option<Vec<u8>>, StoreError> {
    match store.has_blob(digest) {
        true => store.read_blob(digest).map(Some),
        false => Ok(None),
    }
}

/// Stored bytes as a manifest document; see [`stored_manifest`].
fn as_document(
    existing: &[ManifestRecord],
    digest: &str,
    size: Option<u64>,
    bytes: Vec<u8>,
) -> Result<Option<Document>, TransferError> {
    check_size(digest, size, bytes.len())?;
    let media_type = existing
        .iter()
        .find(|r| r.digest == digest)
        .map(|r| r.media_type.clone())
        .or_else(|| crate::store::declared_media_type(&bytes));
    Ok(media_type.map(|mt| (bytes, mt)))
}

/// A manifest must be as long as the index naming it says (`expected`; the
/// root has no index).
fn check_size(digest: &str, expected: Option<u64>, len: usize) -> Result<(), TransferError> {
    match expected {
        Some(expected) if expected != len as u64 => Err(TransferError::SizeMismatch {
            digest: digest.to_string(),
            expected,
            actual: len as u64,
        }),
        _ => Ok(()),
    }
}

/// Whether each blob is in the store with the size its descriptor states,
/// given its size there. A blob of another size cannot be the one named
/// (sha256 does not collide): the manifest is wrong, and the image must
/// fail as it would on a fresh store.
pub(super) fn presence(
    blobs: &[BlobRef],
    sizes: Vec<Option<u64>>,
) -> Result<Vec<bool>, TransferError> {
    blobs
        .iter()
        .zip(sizes)
        .map(|(b, size)| match size {
            None => Ok(false),
            Some(size) if size == b.size => Ok(true),
            Some(size) => Err(TransferError::SizeMismatch {
                digest: b.digest.clone(),
                expected: b.size,
                actual: size,
            }),
        })
        .collect()
}

/// Runs blocking store work (`op` names it) off the async threads.
async fn blocking<T: Send + 'static, E: Into<TransferError> + Send + 'static>(
    op: &'static str,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, TransferError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| TransferError::Task { op, source })?
        .map_err(Into::into)
}

/// The longest Retry-After honoured; a registry asking for more is waited on
/// this long, then asked again.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Honours a registry's Retry-After (capped) while keeping the backoff's
/// decision to give up.
fn adjust_delay(retry_after: Option<Duration>, d: Option<Duration>) -> Option<Duration> {
    d.map(|d| retry_after.map_or(d, |r| r.min(MAX_RETRY_AFTER).max(d)))
}
