//! The transfer engine: brings desired images into the content store.
//!
//! For each image it fetches the manifest or index (verified by digest), only
//! the platform manifests asked for (through nested indexes, up to
//! [`plan::MAX_INDEX_DEPTH`]), then only the blobs the store lacks. Blobs
//! stream to a partial file with bounded memory and resume by HTTP Range from
//! the partial's length after a network error, a stall below the minimum
//! progress, or a restart; the bytes already on disk are re-hashed before they
//! are trusted. A blob already in the store counts only when its size is the
//! one the manifest states. An image is recorded (and so servable) only after
//! every blob it needs is present and verified.

mod limit;
pub mod plan;
mod progress;

pub use limit::RateLimiter;
pub use progress::{Phase, Progress};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use imgfleet_common::registry::{
    Credentials, MinProgress, RegistryClient, RegistryConfig, RegistryError, sha256_hex,
    valid_repository, valid_tag,
};
use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{Instrument, debug, info, warn};

use crate::store::{ManifestRecord, Pins, Store, StoreError, now_unix};
use plan::{BlobRef, ManifestKind, PlanError};
use progress::Tracker;

/// One image the store must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredImage {
    /// Stable id used in progress events, e.g. `default/app@sha256:..`.
    pub key: String,
    /// Registry host and optional port.
    pub registry: String,
    /// Repository path in the registry.
    pub repository: String,
    /// The manifest or index digest.
    pub digest: String,
    /// Tags that name the digest and that the mirror must serve.
    pub tags: Vec<String>,
    /// `os/arch[/variant]` to take from an index; empty means all.
    pub platforms: Vec<String>,
    /// Pull credentials; `None` for anonymous.
    pub credentials: Option<Credentials>,
    /// Plain HTTP to the registry.
    pub insecure: bool,
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

/// Why an image could not be brought in.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The registry failed; see [`RegistryError::is_retryable`].
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The content store failed (a digest mismatch lands here too).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A manifest the engine cannot use.
    #[error("manifest {digest}: {source}")]
    Plan {
        /// The manifest.
        digest: String,
        /// What was wrong.
        #[source]
        source: PlanError,
    },
    /// Content whose size is not the one its descriptor states: a blob
    /// already in the store, or the length the registry announced.
    #[error("{digest}: {actual} bytes, but the manifest says {expected}")]
    SizeMismatch {
        /// The blob or manifest.
        digest: String,
        /// The size in the descriptor.
        expected: u64,
        /// The size found.
        actual: u64,
    },
    /// A blob's body was longer than its descriptor says, or ended early.
    #[error("blob {digest}: {message}")]
    BadBody {
        /// The blob.
        digest: String,
        /// What was wrong.
        message: String,
    },
    /// The desired image itself is invalid.
    #[error("image {key}: {message}")]
    Invalid {
        /// The image key.
        key: String,
        /// What was wrong.
        message: String,
    },
}

impl TransferError {
    /// Whether a later attempt may succeed: transport errors, 5xx and 429,
    /// a body cut short. Digest mismatches and bad manifests are final.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransferError::Registry(e) => e.is_retryable(),
            TransferError::BadBody { message, .. } => message.starts_with("body ended"),
            _ => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            TransferError::Registry(e) => e.retry_after(),
            _ => None,
        }
    }

    /// Whether this is content that did not match its digest.
    pub fn is_digest_mismatch(&self) -> bool {
        matches!(
            self,
            TransferError::Store(StoreError::DigestMismatch { .. })
                | TransferError::Registry(RegistryError::DigestMismatch { .. })
        )
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

/// The transfer engine. Share it behind an `Arc`; one per store. Its `Debug`
/// leaves out the client map, whose keys hold registry passwords.
pub struct Engine {
    store: Arc<Store>,
    config: EngineConfig,
    blob_slots: Arc<Semaphore>,
    limiter: Option<RateLimiter>,
    clients: Mutex<HashMap<ClientKey, Arc<RegistryClient>>>,
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

    /// A registry client for an image, shared by images with the same
    /// registry and credentials so that bearer tokens are reused.
    pub fn client_for(
        &self,
        registry: &str,
        credentials: Option<&Credentials>,
        insecure: bool,
    ) -> Result<Arc<RegistryClient>, RegistryError> {
        let key = (
            registry.to_string(),
            credentials.map(|c| (c.username.clone(), c.password.clone())),
            insecure,
        );
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let started = std::time::Instant::now();
        let client = Arc::new(RegistryClient::new(RegistryConfig {
            host: registry.to_string(),
            credentials: credentials.cloned(),
            insecure,
            extra_roots_pem: self.config.extra_roots_pem.clone(),
            connect_timeout: None,
            read_timeout: Some(self.config.read_timeout),
            min_progress: self.config.min_progress,
        })?);
        debug!(registry, elapsed = ?started.elapsed(), "Registry client built");
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Brings in every image, `concurrency_images` at a time, and reports each.
    pub async fn sync(
        &self,
        images: Vec<DesiredImage>,
        progress: Option<UnboundedSender<Progress>>,
    ) -> Vec<SyncReport> {
        futures::stream::iter(images)
            .map(|image| {
                let progress = progress.clone();
                async move {
                    let result = self.sync_image(&image, progress).await;
                    SyncReport { image, result }
                }
            })
            .buffer_unordered(self.config.concurrency_images.max(1))
            .collect()
            .await
    }

    /// Brings in one image and records it with its tags.
    pub async fn sync_image(
        &self,
        image: &DesiredImage,
        progress: Option<UnboundedSender<Progress>>,
    ) -> Result<ImageStats, TransferError> {
        let span = tracing::info_span!("image", key = %image.key, repository = %image.repository, digest = %image.digest);
        let tracker = Tracker::new(&image.key, &image.digest, progress);
        let result = self
            .sync_image_inner(image, &tracker)
            .instrument(span)
            .await;
        match &result {
            Ok(_) => tracker.emit(Phase::Synced, None, true),
            Err(e) => tracker.emit(Phase::Failed, Some(e.to_string()), true),
        }
        result
    }

    async fn sync_image_inner(
        &self,
        image: &DesiredImage,
        tracker: &Tracker,
    ) -> Result<ImageStats, TransferError> {
        let invalid = |message: String| TransferError::Invalid {
            key: image.key.clone(),
            message,
        };
        if sha256_hex(&image.digest).is_none() {
            return Err(invalid(format!(
                "digest {:?}: expected sha256:<64 lowercase hex>",
                image.digest
            )));
        }
        if !valid_repository(&image.repository) {
            return Err(invalid(format!(
                "repository {:?}: expected a path like library/nginx",
                image.repository
            )));
        }
        if let Some(t) = image.tags.iter().find(|t| !valid_tag(t)) {
            return Err(invalid(format!(
                "tag {t:?}: expected [A-Za-z0-9_.-], at most 128 characters"
            )));
        }
        // One snapshot of the records serves every lookup below: on a no-op
        // re-sync of many images, re-reading and cloning them per lookup
        // was a measurable share of the run.
        let existing = self.store.records();
        let already = existing.iter().any(|r| {
            r.registry == image.registry
                && r.repository == image.repository
                && r.digest == image.digest
                && r.parent.is_none()
        });
        tracker.emit(Phase::Manifests, None, true);

        // Manifests come from the store when present, so a re-sync of a
        // complete image makes no request at all.
        let client = std::sync::OnceLock::new();
        let get_client = || -> Result<Arc<RegistryClient>, TransferError> {
            if let Some(c) = client.get() {
                return Ok(Arc::clone(c));
            }
            let c = self.client_for(&image.registry, image.credentials.as_ref(), image.insecure)?;
            Ok(Arc::clone(client.get_or_init(|| c)))
        };

        // Everything this image uses stays pinned until it is recorded, so
        // that GC running meanwhile never deletes what this sync counted on.
        let mut pins = self.store.pins();
        pins.add(&image.digest);
        let (root_bytes, root_type) = self
            .manifest(image, &image.digest, None, &existing, &get_client)
            .await?;
        let (records, blobs) = self
            .walk(
                image,
                &root_bytes,
                &root_type,
                &existing,
                &get_client,
                &mut pins,
            )
            .await?;
        let mut records = records;

        let mut stats = ImageStats {
            bytes_total: blobs.iter().map(|b| b.size).sum(),
            blobs_total: blobs.len() as u32,
            already_present: already,
            ..ImageStats::default()
        };
        tracker
            .bytes_total
            .store(stats.bytes_total, Ordering::Relaxed);
        tracker
            .layers_total
            .store(stats.blobs_total, Ordering::Relaxed);
        let mut missing = Vec::new();
        for b in &blobs {
            pins.add(&b.digest);
            if self.present(b)? {
                tracker.bytes_done.fetch_add(b.size, Ordering::Relaxed);
                tracker.layers_done.fetch_add(1, Ordering::Relaxed);
            } else {
                missing.push(b.clone());
            }
        }
        tracker.emit(Phase::Blobs, None, true);
        if !missing.is_empty() {
            let client = get_client()?;
            let results: Vec<Result<Option<u64>, TransferError>> = futures::stream::iter(missing)
                .map(|b| {
                    let client = client.clone();
                    async move {
                        let fetched = self
                            .fetch_blob(&client, &image.repository, &b, tracker)
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
        }

        tracker.emit(Phase::Committing, None, true);
        let root_size = root_bytes.len() as u64;
        let record = |tag: Option<String>| ManifestRecord {
            registry: image.registry.clone(),
            repository: image.repository.clone(),
            tag,
            digest: image.digest.clone(),
            media_type: root_type.clone(),
            size: root_size,
            parent: None,
            recorded_at: now_unix(),
        };
        records.push(record(None));
        for t in &image.tags {
            records.push(record(Some(t.clone())));
        }
        let unchanged = records.iter().all(|r| {
            existing.iter().any(|e| {
                e.registry == r.registry
                    && e.repository == r.repository
                    && e.tag == r.tag
                    && e.digest == r.digest
                    && e.parent == r.parent
            })
        });
        if !unchanged {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.record(records))
                .await
                .map_err(|e| {
                    TransferError::Store(StoreError::Io {
                        op: "recording",
                        path: self.store.root().join("index.json"),
                        source: std::io::Error::other(e.to_string()),
                    })
                })??;
        }
        info!(
            bytes_fetched = stats.bytes_fetched,
            blobs_fetched = stats.blobs_fetched,
            blobs_total = stats.blobs_total,
            "Image synced"
        );
        Ok(stats)
    }

    /// Whether a blob is in the store with the size its descriptor states.
    /// A blob of another size cannot be the one named (sha256 does not
    /// collide): the manifest is wrong, and the image must fail as it would
    /// on a fresh store.
    fn present(&self, blob: &BlobRef) -> Result<bool, TransferError> {
        match self.store.blob_size(&blob.digest) {
            None => Ok(false),
            Some(size) if size == blob.size => Ok(true),
            Some(size) => Err(TransferError::SizeMismatch {
                digest: blob.digest.clone(),
                expected: blob.size,
                actual: size,
            }),
        }
    }

    /// Fetches the manifests below the root that the image's platforms
    /// select, through nested indexes, and returns their records and the
    /// blobs of every image manifest among them.
    async fn walk(
        &self,
        image: &DesiredImage,
        root_bytes: &[u8],
        root_type: &str,
        existing: &[ManifestRecord],
        get_client: &(dyn Fn() -> Result<Arc<RegistryClient>, TransferError> + Sync),
        pins: &mut Pins,
    ) -> Result<(Vec<ManifestRecord>, Vec<BlobRef>), TransferError> {
        let plan_err = |digest: &str| {
            let digest = digest.to_string();
            move |source| TransferError::Plan { digest, source }
        };
        let mut records = Vec::new();
        let mut blobs: Vec<BlobRef> = Vec::new();
        let mut seen: HashSet<String> = HashSet::from([image.digest.clone()]);
        let mut available: Vec<String> = Vec::new();
        let mut images = 0usize;
        // (bytes, media type, digest, depth); the root index is depth 0.
        let mut queue = vec![(
            root_bytes.to_vec(),
            root_type.to_string(),
            image.digest.clone(),
            0usize,
        )];
        while let Some((bytes, media_type, digest, depth)) = queue.pop() {
            match plan::kind_of(&media_type).map_err(plan_err(&digest))? {
                ManifestKind::Image => {
                    images += 1;
                    for b in plan::image_blobs(&bytes).map_err(plan_err(&digest))? {
                        if !blobs.iter().any(|x| x.digest == b.digest) {
                            blobs.push(b);
                        }
                    }
                }
                ManifestKind::Index => {
                    if depth > plan::MAX_INDEX_DEPTH {
                        return Err(plan_err(&digest)(PlanError::TooDeep {
                            digest: digest.clone(),
                            depth,
                        }));
                    }
                    let (children, offered) = plan::choose_children(&bytes, &image.platforms)
                        .map_err(plan_err(&digest))?;
                    available.extend(offered);
                    for child in children {
                        if !seen.insert(child.digest.clone()) {
                            continue;
                        }
                        if seen.len() > plan::MAX_MANIFESTS {
                            return Err(plan_err(&image.digest)(PlanError::TooManyManifests));
                        }
                        pins.add(&child.digest);
                        let (child_bytes, child_type) = self
                            .manifest(image, &child.digest, Some(child.size), existing, get_client)
                            .await?;
                        records.push(ManifestRecord {
                            registry: image.registry.clone(),
                            repository: image.repository.clone(),
                            tag: None,
                            digest: child.digest.clone(),
                            media_type: child_type.clone(),
                            size: child_bytes.len() as u64,
                            // Every manifest below the root names the root,
                            // so that GC removes the whole tree with it.
                            parent: Some(image.digest.clone()),
                            recorded_at: now_unix(),
                        });
                        queue.push((child_bytes, child_type, child.digest, depth + 1));
                    }
                }
            }
        }
        if images == 0 && !image.platforms.is_empty() {
            available.sort();
            available.dedup();
            return Err(plan_err(&image.digest)(PlanError::NoMatchingPlatform {
                wanted: image.platforms.clone(),
                available,
            }));
        }
        Ok((records, blobs))
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
        get_client: &(dyn Fn() -> Result<Arc<RegistryClient>, TransferError> + Sync),
    ) -> Result<(Vec<u8>, String), TransferError> {
        let check_size = |len: usize| match size {
            Some(expected) if expected != len as u64 => Err(TransferError::SizeMismatch {
                digest: digest.to_string(),
                expected,
                actual: len as u64,
            }),
            _ => Ok(()),
        };
        if self.store.has_blob(digest) {
            let bytes = self.store.read_blob(digest)?;
            check_size(bytes.len())?;
            // The media type is recorded for roots and children; fall back to
            // the document's own field.
            let media_type = existing
                .iter()
                .find(|r| r.digest == digest)
                .map(|r| r.media_type.clone())
                .or_else(|| crate::store::declared_media_type(&bytes));
            if let Some(mt) = media_type {
                return Ok((bytes, mt));
            }
        }
        let client = get_client()?;
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
        check_size(m.bytes.len())?;
        self.store.put_blob(&m.digest, &m.bytes)?;
        Ok((m.bytes.to_vec(), m.media_type))
    }

    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.config.retry.min_delay)
            .with_max_delay(self.config.retry.max_delay)
            .with_max_times(self.config.retry.max_retries)
            .with_jitter()
    }

    /// Fetches one blob unless present; concurrent requests for the same
    /// digest (from any image) wait for the first. Returns the bytes received
    /// when this call downloaded it, `None` when someone else did.
    async fn fetch_blob(
        &self,
        client: &RegistryClient,
        repository: &str,
        blob: &BlobRef,
        tracker: &Tracker,
    ) -> Result<Option<u64>, TransferError> {
        let lock = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(blob.digest.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if self.present(blob)? {
            tracker.bytes_done.fetch_add(blob.size, Ordering::Relaxed);
            return Ok(None);
        }
        let _slot = self
            .blob_slots
            .acquire()
            .await
            .map_err(|_| TransferError::Invalid {
                key: blob.digest.clone(),
                message: "engine shut down".into(),
            })?;
        let result = self.download_blob(client, repository, blob, tracker).await;
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&blob.digest);
        result.map(Some)
    }

    /// Downloads with retries. A digest mismatch after resuming a partial may
    /// be the partial's fault: that case restarts once from zero.
    async fn download_blob(
        &self,
        client: &RegistryClient,
        repository: &str,
        blob: &BlobRef,
        tracker: &Tracker,
    ) -> Result<u64, TransferError> {
        let mut fresh_start = false;
        let mut received = 0u64;
        loop {
            // Only the first attempt after a mismatch empties the partial;
            // later attempts resume what that one wrote.
            let truncate = std::sync::atomic::AtomicBool::new(fresh_start);
            let result = (|| async {
                let (n, _) = self
                    .download_attempt(client, repository, blob, tracker, truncate.swap(false, Ordering::Relaxed))
                    .await?;
                Ok::<u64, (TransferError, bool, u64)>(n)
            })
            .retry(self.backoff())
            .when(|e: &(TransferError, bool, u64)| e.0.is_retryable())
            .adjust(|e: &(TransferError, bool, u64), d| {
                adjust_delay(e.0.retry_after(), d)
            })
            .notify(|e: &(TransferError, bool, u64), d| {
                received += e.2;
                warn!(digest = %blob.digest, error = %e.0, delay = ?d, "Blob transfer failed; resuming");
            })
            .await;
            match result {
                Ok(n) => {
                    self.counters
                        .blobs_completed
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(received + n);
                }
                Err((e, from_partial, n)) => {
                    received += n;
                    if e.is_digest_mismatch() && from_partial && !fresh_start {
                        warn!(digest = %blob.digest, "Resumed blob failed verification; the partial was bad, downloading from the start");
                        fresh_start = true;
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// One attempt: open the partial (re-hashing it), ask for the rest, append
    /// chunk by chunk, then verify and commit. Returns (bytes received,
    /// whether bytes from an earlier attempt were used); the error carries the
    /// same flag and count.
    async fn download_attempt(
        &self,
        client: &RegistryClient,
        repository: &str,
        blob: &BlobRef,
        tracker: &Tracker,
        fresh_start: bool,
    ) -> Result<(u64, bool), (TransferError, bool, u64)> {
        let store = self.store.clone();
        let digest = blob.digest.clone();
        let mut partial = blocking(move || {
            let mut p = store.open_partial(&digest)?;
            if fresh_start && p.resumed_from() > 0 {
                p.truncate()?;
            }
            Ok(p)
        })
        .await
        .map_err(|e| (e, false, 0))?;
        if partial.offset() > blob.size {
            debug!(digest = %blob.digest, "Partial longer than the blob; starting over");
            partial.truncate().map_err(|e| (e.into(), false, 0))?;
        }
        let mut from_partial = partial.offset() > 0;
        let start_offset = partial.offset();
        // Count what is already on disk as progress once.
        tracker
            .bytes_done
            .fetch_add(start_offset, Ordering::Relaxed);
        let mut received = 0u64;
        let result: Result<(), TransferError> = async {
            if partial.offset() < blob.size || blob.size == 0 {
                self.counters.blob_requests.fetch_add(1, Ordering::Relaxed);
                let mut stream = client
                    .get_blob(repository, &blob.digest, partial.offset())
                    .await?;
                // A registry that announces another length cannot send the
                // blob the manifest describes: fail now, not after retries.
                if let Some(total) = stream.total.filter(|t| *t != blob.size) {
                    return Err(TransferError::SizeMismatch {
                        digest: blob.digest.clone(),
                        expected: blob.size,
                        actual: total,
                    });
                }
                if stream.start != partial.offset() {
                    // The registry ignored Range and sends the whole blob.
                    debug!(digest = %blob.digest, "Registry ignored Range; restarting the blob");
                    tracker
                        .bytes_done
                        .fetch_sub(partial.offset(), Ordering::Relaxed);
                    partial.truncate()?;
                    from_partial = false;
                }
                while let Some(chunk) = stream.chunk().await? {
                    if partial.offset() + chunk.len() as u64 > blob.size {
                        return Err(TransferError::BadBody {
                            digest: blob.digest.clone(),
                            message: format!("more bytes than the {} the manifest says", blob.size),
                        });
                    }
                    let len = chunk.len() as u64;
                    if let Some(l) = &self.limiter {
                        l.acquire(len).await;
                    }
                    // Batches are hashed and written while the next arrives.
                    partial.append(&chunk).await?;
                    received += len;
                    self.counters
                        .bytes_received
                        .fetch_add(len, Ordering::Relaxed);
                    tracker.add_bytes(len);
                }
                if partial.offset() < blob.size {
                    return Err(TransferError::BadBody {
                        digest: blob.digest.clone(),
                        message: format!(
                            "body ended at {} of {} bytes",
                            partial.offset(),
                            blob.size
                        ),
                    });
                }
            }
            // The last batch is written before the commit, on this task, so
            // that the blocking commit never waits for it.
            partial.flush().await?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                let store = self.store.clone();
                blocking(move || store.commit_partial(partial))
                    .await
                    .map(|_| (received, from_partial))
                    .map_err(|e| (e, from_partial, received))
            }
            Err(e) => {
                // Keep what arrived for the next attempt; progress restarts
                // counting from the partial's length then.
                let _ = partial.flush().await;
                tracker.bytes_done.fetch_sub(
                    (start_offset + received).min(tracker.bytes_done.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
                Err((e, from_partial, received))
            }
        }
    }
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, TransferError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            TransferError::Store(StoreError::Io {
                op: "blocking task",
                path: Default::default(),
                source: std::io::Error::other(e.to_string()),
            })
        })?
        .map_err(TransferError::from)
}

/// The longest Retry-After honoured; a registry asking for more is waited on
/// this long, then asked again.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Honours a registry's Retry-After (capped) while keeping the backoff's
/// decision to give up.
fn adjust_delay(retry_after: Option<Duration>, d: Option<Duration>) -> Option<Duration> {
    d.map(|d| retry_after.map_or(d, |r| r.min(MAX_RETRY_AFTER).max(d)))
}
