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

use crate::desired::DesiredImage;
use crate::settings::ConfigError;
use crate::store::{Store, StoreError, TreeError};
use crate::transfer::plan::{BlobRef, WalkError};

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

/// Why an image could not be pushed. Registry errors worth a retry were
/// retried already; the rest are final.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The target registry failed.
    #[error("edge registry: {0}")]
    Registry(#[from] RegistryError),
    /// The content store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored manifest the pusher cannot read.
    #[error(transparent)]
    Plan(#[from] WalkError),
    /// A prefix that cannot start a repository path.
    #[error("push prefix {0:?}: expected lowercase path components of [a-z0-9._-]")]
    BadPrefix(String),
    /// The prefixed repository is not a repository path.
    #[error("image {key}: target repository {repository:?}: expected lowercase path components")]
    BadTarget {
        /// The image.
        key: String,
        /// The repository it would go to.
        repository: String,
    },
    /// The image is not (completely) in the store.
    #[error("image {key}: not complete in the content store; sync it first")]
    NotSynced {
        /// The image.
        key: String,
    },
    /// A manifest of the image is not in the store.
    #[error("image {key}: manifest {digest} is not in the content store; sync it first")]
    ManifestMissing {
        /// The image.
        key: String,
        /// The manifest.
        digest: String,
    },
    /// A stored blob whose length is not what its descriptor states.
    #[error("blob {digest}: the store holds {held} bytes, the manifest says {expected}")]
    SizeMismatch {
        /// The blob.
        digest: String,
        /// Its length in the store.
        held: u64,
        /// The size in the descriptor.
        expected: u64,
    },
    /// The pusher's blob slots were closed.
    #[error("edge pusher shut down")]
    ShutDown,
    /// Blocking store work did not finish (it panicked, or the runtime is
    /// shutting down).
    #[error("reading image {key} from the store: {source}")]
    Task {
        /// The image.
        key: String,
        /// Why it did not finish.
        #[source]
        source: tokio::task::JoinError,
    },
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
            return Err(EdgeError::BadPrefix(p.clone()));
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
        store: &Arc<Store>,
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
        store: &Arc<Store>,
        image: &DesiredImage,
    ) -> Result<PushStats, EdgeError> {
        let repo = self.target_repository(&image.repository);
        if !valid_repository(&repo) {
            return Err(EdgeError::BadTarget {
                key: image.key.clone(),
                repository: repo,
            });
        }
        if !blocking(image, {
            let (store, image) = (store.clone(), image.clone());
            move || Ok(store.has_image(&image.registry, &image.repository, &image.digest))
        })
        .await?
        {
            return Err(EdgeError::NotSynced {
                key: image.key.clone(),
            });
        }
        if self.already_there(&repo, image).await? {
            debug!(image = %image.key, "Edge registry has the image and its tags");
            return Ok(PushStats {
                already_present: true,
                ..PushStats::default()
            });
        }
        let stored = blocking(image, {
            let (store, image) = (store.clone(), image.clone());
            move || stored_image(&store, &image)
        })
        .await?;
        let mut stats = self.push_blobs(store, &repo, &stored.blobs).await?;
        stats.manifests_put = self.push_manifests(&repo, image, stored).await?;
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

    /// The shortcut for a re-run: the root by digest and every tag in place.
    async fn already_there(&self, repo: &str, image: &DesiredImage) -> Result<bool, EdgeError> {
        for reference in std::iter::once(&image.digest).chain(&image.tags) {
            if !self.manifest_is(repo, reference, &image.digest).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Every blob of the image into `repo`, several at once.
    async fn push_blobs(
        &self,
        store: &Store,
        repo: &str,
        blobs: &[BlobRef],
    ) -> Result<PushStats, EdgeError> {
        let mut stats = PushStats {
            blobs_total: blobs.len() as u32,
            ..PushStats::default()
        };
        let outcomes: Vec<Result<(BlobOutcome, u64), EdgeError>> = futures::stream::iter(blobs)
            .map(|b| async move { self.push_blob(store, repo, b).await.map(|o| (o, b.size)) })
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
        Ok(stats)
    }

    /// The child manifests (children first: a registry may check that every
    /// manifest an index names is there), the root by digest, and each tag;
    /// only those the target lacks. Returns how many were put.
    async fn push_manifests(
        &self,
        repo: &str,
        image: &DesiredImage,
        stored: StoredImage,
    ) -> Result<u32, EdgeError> {
        let root = Bytes::from(stored.root);
        // (reference, the digest it must name, media type, bytes)
        let children = stored
            .children
            .into_iter()
            .map(|(digest, media_type, bytes)| {
                (digest.clone(), digest, media_type, Bytes::from(bytes))
            });
        let roots = std::iter::once(&image.digest)
            .chain(&image.tags)
            .map(|reference| {
                (
                    reference.clone(),
                    image.digest.clone(),
                    stored.root_type.clone(),
                    root.clone(),
                )
            });
        let mut put = 0;
        for (reference, digest, media_type, bytes) in children.chain(roots) {
            if !self.manifest_is(repo, &reference, &digest).await? {
                self.put_manifest(repo, &reference, &media_type, bytes)
                    .await?;
                put += 1;
            }
        }
        Ok(put)
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
            .map_err(|_| EdgeError::ShutDown)?;
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
        let size = tokio::fs::metadata(&path)
            .await
            .map_err(|source| StoreError::Io {
                op: "reading",
                path: path.clone(),
                source,
            })?
            .len();
        if size != blob.size {
            return Err(EdgeError::SizeMismatch {
                digest: blob.digest.clone(),
                held: size,
                expected: blob.size,
            });
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

/// What the store holds of one image, read for a push.
#[derive(Debug)]
struct StoredImage {
    /// The root manifest's bytes and media type.
    root: Vec<u8>,
    root_type: String,
    /// (digest, media type, bytes) of every manifest below the root,
    /// children before the indexes that name them.
    children: Vec<(String, String, Vec<u8>)>,
    /// Every blob of the image.
    blobs: Vec<BlobRef>,
}

/// Reads an image from the store: its tree, as far as its platforms
/// select, and every manifest's bytes. Blocking.
fn stored_image(store: &Store, image: &DesiredImage) -> Result<StoredImage, EdgeError> {
    let root_type = store
        .records()
        .into_iter()
        .find(|r| r.digest == image.digest && r.parent.is_none())
        .map(|r| r.media_type);
    let tree = store
        .tree(&image.digest, root_type.as_deref(), &image.platforms)
        .map_err(|e| match e {
            TreeError::Store(e) => EdgeError::Store(e),
            TreeError::Plan(e) => EdgeError::Plan(e),
        })?;
    let manifest_missing = |digest: &str| EdgeError::ManifestMissing {
        key: image.key.clone(),
        digest: digest.to_string(),
    };
    if let Some(m) = tree.missing.first() {
        return Err(manifest_missing(&m.digest));
    }
    let mut manifests = tree.manifests;
    // The walk lists the root last.
    let root_node = manifests
        .pop()
        .ok_or_else(|| manifest_missing(&image.digest))?;
    let mut children = Vec::with_capacity(manifests.len());
    for m in manifests {
        let bytes = store.read_blob(&m.digest)?;
        children.push((m.digest, m.media_type, bytes));
    }
    Ok(StoredImage {
        root: store.read_blob(&image.digest)?,
        root_type: root_node.media_type,
        children,
        blobs: tree.blobs,
    })
}

/// Runs blocking store work for `image` off the async workers.
async fn blocking<T: Send + 'static>(
    image: &DesiredImage,
    f: impl FnOnce() -> Result<T, EdgeError> + Send + 'static,
) -> Result<T, EdgeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| EdgeError::Task {
            key: image.key.clone(),
            source,
        })?
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
    ) -> Result<Option<EdgeConfig>, ConfigError> {
        let Some(host) = &self.push_to else {
            return Ok(None);
        };
        if let Some(p) = &self.push_prefix
            && !valid_repository(p)
        {
            return Err(ConfigError::new(
                "--push-prefix",
                EdgeError::BadPrefix(p.clone()).to_string(),
            ));
        }
        let credentials = match (&self.push_username, &self.push_password_file) {
            (Some(u), Some(f)) => Some(Credentials::new(u.clone(), read_password(f)?)),
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

/// The password in `--push-password-file`, without one trailing newline.
fn read_password(f: &std::path::Path) -> Result<String, ConfigError> {
    let setting = || format!("--push-password-file {}", f.display());
    let text =
        std::fs::read_to_string(f).map_err(|e| ConfigError::new(setting(), e.to_string()))?;
    let password = text.strip_suffix('\n').unwrap_or(&text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(ConfigError::new(
            setting(),
            "expected a password, the file is empty",
        ));
    }
    Ok(password.to_string())
}

/// Pushes the images that synced into the target and prints one line per
/// image (`PUSHED` or `PUSH FAILED`); true when every one was pushed.
pub async fn push_synced(
    config: EdgeConfig,
    store: &Arc<Store>,
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
