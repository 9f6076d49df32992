//! The edge-registry target: pushes images from the content store into an
//! existing registry in the cluster (distribution, Harbor), for clusters whose
//! nodes pull from a registry of their own rather than from the mirror.
//!
//! Per image: when the target already has the root manifest by digest and
//! every tag points at it, nothing else is asked (a registry accepts a
//! manifest only once every blob it names is there). Otherwise each blob is
//! HEADed in the target repository; a missing one is mounted from another
//! repository of the target known to hold it (201), or uploaded from the store
//! (202, or no such repository) in one streamed PUT. Then the child manifests,
//! the root by digest, and each tag are put with their media type.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use imgfleet_common::registry::{
    Credentials, RegistryClient, RegistryConfig, RegistryError, UploadStart, valid_repository,
};
use tracing::{debug, info, warn};

use crate::store::{Store, StoreError, TreeError};
use crate::transfer::DesiredImage;
use crate::transfer::plan::{BlobRef, PlanError};

/// Where and how to push.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Target registry host and optional port, e.g. `harbor.edge.local:443`.
    pub host: String,
    /// Plain HTTP to the target.
    pub insecure: bool,
    /// Push credentials; `None` for a registry that takes anonymous pushes.
    pub credentials: Option<Credentials>,
    /// Put before each upstream repository path, e.g. `mirror` makes
    /// `library/nginx` land in `mirror/library/nginx`.
    pub prefix: Option<String>,
    /// Extra trusted CA certificates (PEM).
    pub extra_roots_pem: Vec<Vec<u8>>,
    /// Images pushed at once by [`push_synced`].
    pub concurrency_images: usize,
    /// Blobs pushed at once, across images.
    pub concurrency_blobs: usize,
    /// Retries of a failing request.
    pub max_retries: usize,
}

/// Why an image could not be pushed.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The target registry failed.
    #[error("edge registry: {0}")]
    Registry(#[from] RegistryError),
    /// The content store failed, or lacks content the image needs.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored manifest the pusher cannot read.
    #[error("manifest {digest}: {source}")]
    Plan {
        /// The manifest.
        digest: String,
        /// What was wrong.
        #[source]
        source: PlanError,
    },
    /// Bad settings or an image that is not in the store.
    #[error("{0}")]
    Invalid(String),
}

/// What pushing one image did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Blobs the image needs (config and layers of every pushed manifest).
    pub blobs_total: u32,
    /// Blobs the target repository already had.
    pub blobs_present: u32,
    /// Blobs mounted from another repository of the target.
    pub blobs_mounted: u32,
    /// Blobs uploaded.
    pub blobs_uploaded: u32,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// Manifests put (children, root, tags).
    pub manifests_put: u32,
    /// The target had the image and its tags already: only HEADs were sent.
    pub already_present: bool,
}

/// The outcome of one image in [`EdgeTarget::push_all`].
#[derive(Debug)]
pub struct PushReport {
    /// The image (as synced from upstream).
    pub image: DesiredImage,
    /// The repository it went to in the target.
    pub target_repository: String,
    /// Its result.
    pub result: Result<PushStats, EdgeError>,
}

/// Pushes images from a store into one edge registry. Share behind an `Arc`.
#[derive(Debug)]
pub struct EdgeTarget {
    client: RegistryClient,
    config: EdgeConfig,
    /// Blob digest -> target repositories known to hold it (mount sources).
    known: Mutex<HashMap<String, Vec<String>>>,
    /// One push at a time per blob digest, so a shared base layer is sent
    /// once and then mounted.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    slots: tokio::sync::Semaphore,
    uploads: AtomicU64,
    mounts: AtomicU64,
}

impl EdgeTarget {
    /// A pusher for `config.host`; checks the prefix.
    pub fn new(config: EdgeConfig) -> Result<EdgeTarget, EdgeError> {
        if let Some(p) = &config.prefix
            && !valid_repository(p)
        {
            return Err(EdgeError::Invalid(format!(
                "push prefix {p:?}: expected lowercase path components of [a-z0-9._-]"
            )));
        }
        let client = RegistryClient::new(RegistryConfig {
            host: config.host.clone(),
            credentials: config.credentials.clone(),
            insecure: config.insecure,
            extra_roots_pem: config.extra_roots_pem.clone(),
            connect_timeout: None,
            read_timeout: None,
            min_progress: None,
        })?;
        Ok(EdgeTarget {
            client,
            slots: tokio::sync::Semaphore::new(config.concurrency_blobs.max(1)),
            config,
            known: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            uploads: AtomicU64::new(0),
            mounts: AtomicU64::new(0),
        })
    }

    /// The target registry host.
    pub fn host(&self) -> &str {
        &self.config.host
    }

    /// (blobs uploaded, blobs mounted) since the target was made.
    pub fn counters(&self) -> (u64, u64) {
        (
            self.uploads.load(Ordering::Relaxed),
            self.mounts.load(Ordering::Relaxed),
        )
    }

    /// The repository an upstream repository lands in.
    pub fn target_repository(&self, repository: &str) -> String {
        match &self.config.prefix {
            Some(p) => format!("{p}/{repository}"),
            None => repository.to_string(),
        }
    }

    /// Pushes every image, `concurrency` at a time. Images sharing blobs
    /// share them through mounts.
    pub async fn push_all(
        &self,
        store: &Store,
        images: Vec<DesiredImage>,
        concurrency: usize,
    ) -> Vec<PushReport> {
        futures::stream::iter(images)
            .map(|image| async move {
                let target_repository = self.target_repository(&image.repository);
                let result = self.push_image(store, &image).await;
                PushReport {
                    image,
                    target_repository,
                    result,
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await
    }

    /// Pushes one image that the store holds completely.
    pub async fn push_image(
        &self,
        store: &Store,
        image: &DesiredImage,
    ) -> Result<PushStats, EdgeError> {
        let repo = self.target_repository(&image.repository);
        if !valid_repository(&repo) {
            return Err(EdgeError::Invalid(format!(
                "image {}: target repository {repo:?}: expected lowercase path components",
                image.key
            )));
        }
        if !store.has_image(&image.registry, &image.repository, &image.digest) {
            return Err(EdgeError::Invalid(format!(
                "image {}: not complete in the content store; sync it first",
                image.key
            )));
        }
        let mut stats = PushStats::default();

        // The shortcut for a re-run: root by digest and every tag in place.
        if self
            .manifest_is(&repo, &image.digest, &image.digest)
            .await?
        {
            let mut all = true;
            for t in &image.tags {
                if !self.manifest_is(&repo, t, &image.digest).await? {
                    all = false;
                    break;
                }
            }
            if all {
                debug!(image = %image.key, "Edge registry has the image and its tags");
                stats.already_present = true;
                return Ok(stats);
            }
        }

        let records = store.records();
        let root_type = records
            .iter()
            .find(|r| r.digest == image.digest && r.parent.is_none())
            .map(|r| r.media_type.clone());
        // Children before the indexes that name them: a registry may check
        // that every manifest an index names is there.
        let tree = store
            .tree(&image.digest, root_type.as_deref(), &image.platforms)
            .map_err(|e| match e {
                TreeError::Store(e) => EdgeError::Store(e),
                TreeError::Plan(source) => EdgeError::Plan {
                    digest: image.digest.clone(),
                    source,
                },
            })?;
        if let Some(m) = tree.missing.first() {
            return Err(EdgeError::Invalid(format!(
                "image {}: manifest {} is not in the content store; sync it first",
                image.key, m.digest
            )));
        }
        let mut manifests = tree.manifests;
        let Some(root_node) = manifests.pop() else {
            return Err(EdgeError::Invalid(format!(
                "image {}: no root manifest",
                image.key
            )));
        };
        let root_type = root_node.media_type;
        let root = store.read_blob(&image.digest)?;
        let mut children: Vec<(String, String, Vec<u8>)> = Vec::new();
        for m in manifests {
            let bytes = store.read_blob(&m.digest)?;
            children.push((m.digest, m.media_type, bytes));
        }
        let blobs: Vec<BlobRef> = tree.blobs;
        stats.blobs_total = blobs.len() as u32;

        let outcomes: Vec<Result<(BlobOutcome, u64), EdgeError>> = futures::stream::iter(blobs)
            .map(|b| {
                let repo = repo.as_str();
                async move { self.push_blob(store, repo, &b).await.map(|o| (o, b.size)) }
            })
            .buffer_unordered(self.config.concurrency_blobs.max(1))
            .collect()
            .await;
        for o in outcomes {
            match o? {
                (BlobOutcome::Present, _) => stats.blobs_present += 1,
                (BlobOutcome::Mounted, _) => stats.blobs_mounted += 1,
                (BlobOutcome::Uploaded, size) => {
                    stats.blobs_uploaded += 1;
                    stats.bytes_uploaded += size;
                }
            }
        }

        for (digest, media_type, bytes) in children {
            if !self.manifest_is(&repo, &digest, &digest).await? {
                self.put_manifest(&repo, &digest, &media_type, Bytes::from(bytes))
                    .await?;
                stats.manifests_put += 1;
            }
        }
        let root = Bytes::from(root);
        if !self
            .manifest_is(&repo, &image.digest, &image.digest)
            .await?
        {
            self.put_manifest(&repo, &image.digest, &root_type, root.clone())
                .await?;
            stats.manifests_put += 1;
        }
        for t in &image.tags {
            if !self.manifest_is(&repo, t, &image.digest).await? {
                self.put_manifest(&repo, t, &root_type, root.clone())
                    .await?;
                stats.manifests_put += 1;
            }
        }
        info!(
            image = %image.key,
            target = %repo,
            uploaded = stats.blobs_uploaded,
            mounted = stats.blobs_mounted,
            present = stats.blobs_present,
            "Image pushed to the edge registry"
        );
        Ok(stats)
    }

    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(30))
            .with_max_times(self.config.max_retries)
            .with_jitter()
    }

    /// Whether `reference` in the target names `digest` (HEAD; a 404 is no).
    async fn manifest_is(
        &self,
        repo: &str,
        reference: &str,
        digest: &str,
    ) -> Result<bool, EdgeError> {
        let head = (|| async { self.client.head_manifest(repo, reference).await })
            .retry(self.backoff())
            .when(|e: &RegistryError| e.is_retryable())
            .await;
        match head {
            Ok(h) => Ok(h.digest.as_deref() == Some(digest)),
            Err(RegistryError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), EdgeError> {
        (|| async {
            self.client
                .put_manifest(repo, reference, media_type, bytes.clone())
                .await
        })
        .retry(self.backoff())
        .when(|e: &RegistryError| e.is_retryable())
        .notify(
            |e: &RegistryError, d| warn!(error = %e, delay = ?d, "Manifest push failed; retrying"),
        )
        .await?;
        Ok(())
    }

    fn remember(&self, digest: &str, repo: &str) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let repos = known.entry(digest.to_string()).or_default();
        if !repos.iter().any(|r| r == repo) {
            repos.push(repo.to_string());
        }
    }

    async fn push_blob(
        &self,
        store: &Store,
        repo: &str,
        blob: &BlobRef,
    ) -> Result<BlobOutcome, EdgeError> {
        let lock = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(blob.digest.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| EdgeError::Invalid("edge pusher shut down".into()))?;
        let outcome = (|| async { self.push_blob_once(store, repo, blob).await })
            .retry(self.backoff())
            .when(|e: &EdgeError| matches!(e, EdgeError::Registry(r) if r.is_retryable()))
            .notify(|e: &EdgeError, d| warn!(digest = %blob.digest, error = %e, delay = ?d, "Blob push failed; retrying"))
            .await?;
        self.remember(&blob.digest, repo);
        Ok(outcome)
    }

    async fn push_blob_once(
        &self,
        store: &Store,
        repo: &str,
        blob: &BlobRef,
    ) -> Result<BlobOutcome, EdgeError> {
        if self.client.has_blob(repo, &blob.digest).await? {
            return Ok(BlobOutcome::Present);
        }
        let source = {
            let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            known
                .get(&blob.digest)
                .and_then(|repos| repos.iter().find(|r| *r != repo).cloned())
        };
        let start = self
            .client
            .start_upload(repo, source.as_deref().map(|s| (blob.digest.as_str(), s)))
            .await?;
        let session = match start {
            UploadStart::Mounted => {
                self.mounts.fetch_add(1, Ordering::Relaxed);
                debug!(digest = %blob.digest, from = ?source, to = repo, "Blob mounted");
                return Ok(BlobOutcome::Mounted);
            }
            UploadStart::Session(url) => url,
        };
        let path: PathBuf = store.blob_path(&blob.digest)?;
        let size = std::fs::metadata(&path)
            .map_err(|e| {
                EdgeError::Store(StoreError::Io {
                    op: "reading",
                    path: path.clone(),
                    source: e,
                })
            })?
            .len();
        if size != blob.size {
            return Err(EdgeError::Invalid(format!(
                "blob {}: the store holds {size} bytes, the manifest says {}",
                blob.digest, blob.size
            )));
        }
        // The body is re-made from the file if the request must be repeated
        // (a 401 answered); it streams, so memory does not grow with the blob.
        let make = move || {
            let path = path.clone();
            let stream = futures::stream::once(async move { tokio::fs::File::open(path).await })
                .map(|r| r.map(tokio_util::io::ReaderStream::new))
                .try_flatten();
            reqwest::Body::wrap_stream(stream)
        };
        self.client
            .put_blob(repo, &session, &blob.digest, size, &make)
            .await?;
        self.uploads.fetch_add(1, Ordering::Relaxed);
        Ok(BlobOutcome::Uploaded)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlobOutcome {
    Present,
    Mounted,
    Uploaded,
}

/// The `sync` flags that turn the edge-registry target on.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PushArgs {
    /// Also push each synced image into this registry (HOST[:PORT]), e.g. the
    /// cluster's Harbor; the content store is the staging area.
    #[arg(long, value_name = "HOST:PORT")]
    pub push_to: Option<String>,
    /// Plain HTTP to the --push-to registry.
    #[arg(long, requires = "push_to")]
    pub push_insecure: bool,
    /// User name for the --push-to registry.
    #[arg(long, value_name = "USER", requires = "push_password_file")]
    pub push_username: Option<String>,
    /// File holding the password for --push-username (kept out of the
    /// process list); one trailing newline is ignored.
    #[arg(long, value_name = "FILE", requires = "push_username")]
    pub push_password_file: Option<PathBuf>,
    /// Repository prefix in the --push-to registry: `mirror` puts
    /// `library/nginx` at `mirror/library/nginx`.
    #[arg(long, value_name = "PATH", requires = "push_to")]
    pub push_prefix: Option<String>,
}

impl PushArgs {
    /// The target's settings, `None` without `--push-to`.
    pub fn config(
        &self,
        extra_roots_pem: Vec<Vec<u8>>,
        concurrency_images: usize,
        concurrency_blobs: usize,
        max_retries: usize,
    ) -> Result<Option<EdgeConfig>, EdgeError> {
        let Some(host) = &self.push_to else {
            return Ok(None);
        };
        if let Some(p) = &self.push_prefix
            && !valid_repository(p)
        {
            return Err(EdgeError::Invalid(format!(
                "--push-prefix: push prefix {p:?}: expected lowercase path components of [a-z0-9._-]"
            )));
        }
        let credentials = match (&self.push_username, &self.push_password_file) {
            (Some(u), Some(f)) => {
                let text = std::fs::read_to_string(f).map_err(|e| {
                    EdgeError::Invalid(format!("--push-password-file {}: {e}", f.display()))
                })?;
                let password = text.strip_suffix('\n').unwrap_or(&text);
                let password = password.strip_suffix('\r').unwrap_or(password);
                if password.is_empty() {
                    return Err(EdgeError::Invalid(format!(
                        "--push-password-file {}: expected a password, the file is empty",
                        f.display()
                    )));
                }
                Some(Credentials::new(u.clone(), password))
            }
            _ => None,
        };
        Ok(Some(EdgeConfig {
            host: host.clone(),
            insecure: self.push_insecure,
            credentials,
            prefix: self.push_prefix.clone(),
            extra_roots_pem,
            concurrency_images,
            concurrency_blobs,
            max_retries,
        }))
    }
}

/// Pushes the images that synced into the target and prints one line per
/// image (`PUSHED` or `PUSH FAILED`); true when every one was pushed.
pub async fn push_synced(
    config: EdgeConfig,
    store: &Store,
    reports: &[crate::transfer::SyncReport],
) -> Result<bool, EdgeError> {
    let concurrency_images = config.concurrency_images;
    let target = EdgeTarget::new(config)?;
    let images: Vec<DesiredImage> = reports
        .iter()
        .filter(|r| r.result.is_ok())
        .map(|r| r.image.clone())
        .collect();
    let mut pushed = target.push_all(store, images, concurrency_images).await;
    pushed.sort_by(|a, b| a.image.key.cmp(&b.image.key));
    let mut ok = true;
    for p in &pushed {
        let to = format!(
            "{}/{}@{}",
            target.host(),
            p.target_repository,
            p.image.digest
        );
        match &p.result {
            Ok(s) if s.already_present => println!("PUSHED {} -> {to}: already there", p.image.key),
            Ok(s) => println!(
                "PUSHED {} -> {to}: {} blobs uploaded ({:.1} MiB), {} mounted, {} present, {} manifests put",
                p.image.key,
                s.blobs_uploaded,
                s.bytes_uploaded as f64 / (1024.0 * 1024.0),
                s.blobs_mounted,
                s.blobs_present,
                s.manifests_put
            ),
            Err(e) => {
                ok = false;
                println!("PUSH FAILED {} -> {to}: {e}", p.image.key);
            }
        }
    }
    Ok(ok)
}
