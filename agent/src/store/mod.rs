//! The content store: an OCI image-layout directory with blobs by digest,
//! resumable partial downloads beside it, and a record of which manifests each
//! (registry, repository, tag) names.
//!
//! Layout under the data dir:
//!
//! ```text
//! oci-layout               {"imageLayoutVersion":"1.0.0"}
//! index.json               OCI index; one descriptor per recorded manifest,
//!                          annotated with registry, repository and tag
//! blobs/sha256/<hex>       complete, verified content only
//! partial/<hex>            unfinished downloads; their length is the offset
//! tmp/                     scratch for atomic writes; emptied on open
//! lock                     held by the one writer (flock)
//! ```
//!
//! Invariant: a file appears under `blobs/` only by an atomic rename after its
//! sha256 matched its name and it was fsynced, and `index.json` names a
//! manifest only once every blob it needs is present. A SIGKILL at any moment
//! therefore leaves nothing half-visible.

mod partial;

pub use partial::PartialBlob;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use imgfleet_common::registry::{OCI_INDEX, sha256_digest, sha256_hex};
use serde::{Deserialize, Serialize};

use crate::transfer::plan;

/// Annotation naming the upstream registry of a recorded manifest.
pub const ANN_REGISTRY: &str = "io.imgfleet.registry";
/// Annotation naming the upstream repository of a recorded manifest.
pub const ANN_REPOSITORY: &str = "io.imgfleet.repository";
/// Annotation naming the tag (OCI's own ref-name annotation).
pub const ANN_TAG: &str = "org.opencontainers.image.ref.name";
/// Annotation naming the index a child manifest was fetched through.
pub const ANN_PARENT: &str = "io.imgfleet.parent";
/// Annotation with the unix time the record was written.
pub const ANN_RECORDED: &str = "io.imgfleet.recorded-at";
/// Annotation naming the manifest a referrer (a signature, an SBOM, an
/// attestation) was synced for: its OCI `subject`.
pub const ANN_SUBJECT: &str = "io.imgfleet.subject";

/// Errors of the content store. None of them is worth a blind retry, except
/// `Io`, which may be a full disk that an operator or GC frees.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("content store: {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A digest that is not `sha256:<64 lowercase hex>`.
    #[error("content store: invalid digest {0:?}: expected sha256:<64 lowercase hex>")]
    InvalidDigest(String),
    /// Content did not hash to its digest; the partial was discarded.
    #[error("content store: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest the content was fetched by.
        expected: String,
        /// What it hashed to.
        actual: String,
    },
    /// Another process holds the store for writing.
    #[error("content store {0}: locked by another writer")]
    Locked(PathBuf),
    /// `index.json` could not be parsed.
    #[error("content store: {path}: expected an OCI index: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: serde_json::Error,
    },
    /// `index.json` could not be encoded.
    #[error("content store: {path}: {source}")]
    Encode {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: serde_json::Error,
    },
    /// A write on a store opened read-only.
    #[error("content store: opened read-only")]
    ReadOnly,
    /// A partial committed at another length than its descriptor states.
    #[error("content store: {digest}: {actual} bytes, but {expected} were expected")]
    SizeMismatch {
        /// The blob.
        digest: String,
        /// The size the commit expected.
        expected: u64,
        /// The partial's length.
        actual: u64,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + use<> {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// An OCI content descriptor as kept in `index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type of the manifest.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// imgfleet's annotations (registry, repository, tag, parent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One recorded manifest: what the mirror can serve under which name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRecord {
    /// Upstream registry host.
    pub registry: String,
    /// Repository path.
    pub repository: String,
    /// The tag, for a tagged root; `None` for a digest-only root or a child.
    pub tag: Option<String>,
    /// The manifest digest.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// For a child of an index: the index digest. For a referrer and the
    /// manifests below it: the image root it was synced with, so that GC
    /// removes it with that image.
    pub parent: Option<String>,
    /// For a referrer synced with an image: the digest it refers to (its
    /// `subject`). The mirror lists it in that digest's referrers, and it
    /// and its blobs are walked as a tree of their own. Stores written
    /// before referrers were synced have none.
    pub subject: Option<String>,
    /// Unix seconds when recorded.
    pub recorded_at: u64,
}

impl ManifestRecord {
    fn to_descriptor(&self) -> Descriptor {
        let mut annotations = BTreeMap::new();
        annotations.insert(ANN_REGISTRY.to_string(), self.registry.clone());
        annotations.insert(ANN_REPOSITORY.to_string(), self.repository.clone());
        if let Some(t) = &self.tag {
            annotations.insert(ANN_TAG.to_string(), t.clone());
        }
        if let Some(p) = &self.parent {
            annotations.insert(ANN_PARENT.to_string(), p.clone());
        }
        if let Some(s) = &self.subject {
            annotations.insert(ANN_SUBJECT.to_string(), s.clone());
        }
        annotations.insert(ANN_RECORDED.to_string(), self.recorded_at.to_string());
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            annotations,
        }
    }

    fn from_descriptor(d: &Descriptor) -> Option<ManifestRecord> {
        Some(ManifestRecord {
            registry: d.annotations.get(ANN_REGISTRY)?.clone(),
            repository: d.annotations.get(ANN_REPOSITORY)?.clone(),
            tag: d.annotations.get(ANN_TAG).cloned(),
            digest: d.digest.clone(),
            media_type: d.media_type.clone(),
            size: d.size,
            parent: d.annotations.get(ANN_PARENT).cloned(),
            subject: d.annotations.get(ANN_SUBJECT).cloned(),
            recorded_at: d
                .annotations
                .get(ANN_RECORDED)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
        })
    }

    /// Whether two records name the same thing (and so one replaces the other).
    fn same_key(&self, other: &ManifestRecord) -> bool {
        self.registry == other.registry
            && self.repository == other.repository
            && match (&self.tag, &other.tag) {
                (Some(a), Some(b)) => a == b,
                // A referrer's record (with its subject) and the same
                // manifest synced as an image of its own are two records.
                (None, None) => self.digest == other.digest && self.subject == other.subject,
                _ => false,
            }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct IndexFile {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: String,
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Default)]
struct State {
    records: Vec<ManifestRecord>,
    /// (mtime, len) of index.json when last read, for read-only reloads.
    seen: Option<(SystemTime, u64)>,
    /// Grows each time `records` changes, so that what is derived from them
    /// (the mirror's catalog, a GC pass) can tell it is stale.
    generation: u64,
}

/// Digests in use by transfers in progress, with a count per digest.
type PinMap = Arc<Mutex<HashMap<String, usize>>>;

/// The content store. One writer per data dir; any number of read-only
/// openers (a `serve` beside a `sync`) that pick up new records on their own.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    state: Mutex<State>,
    writable: bool,
    /// What transfers in progress use; GC leaves these alone (see [`Pins`]).
    pins: PinMap,
    _lock: Option<File>,
}

/// Digests a transfer holds on to while it runs, so that GC does not delete
/// a blob the transfer found present (or is writing) before the image that
/// needs it is recorded. Dropping the guard releases them; a transfer drops
/// it only after recording, so a blob is always protected by a pin or by a
/// record. GC checks pins and the store's generation under the pin lock
/// ([`Store::remove_blob_unless_in_use`]), which closes the gap between the
/// two.
#[derive(Debug)]
pub struct Pins {
    map: PinMap,
    held: Vec<String>,
}

impl Pins {
    /// Pins one more digest (pinning it again is harmless).
    pub fn add(&mut self, digest: &str) {
        if self.held.iter().any(|d| d == digest) {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(digest.to_string()).or_default() += 1;
        self.held.push(digest.to_string());
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for d in self.held.drain(..) {
            if let Some(n) = map.get_mut(&d) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&d);
                }
            }
        }
    }
}

/// Why GC left a blob in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// A transfer in progress holds it.
    Pinned,
    /// The records changed since GC decided: it must decide again.
    RecordsChanged,
}

/// Storage use of the data dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes in complete blobs.
    pub blob_bytes: u64,
    /// Number of complete blobs.
    pub blobs: u64,
    /// Bytes in partial downloads.
    pub partial_bytes: u64,
}

impl Store {
    /// Opens (creating if needed) the store for writing: takes the lock,
    /// removes stray temp files, keeps partial downloads (they are resumed),
    /// and drops partials of blobs that are already complete.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        for dir in ["blobs/sha256", "partial", "tmp"] {
            let p = root.join(dir);
            fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
        }
        let lock_path = root.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("opening", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(StoreError::Locked(root)),
            Err(fs::TryLockError::Error(e)) => return Err(io_err("locking", &lock_path)(e)),
        }
        let tmp = root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_err("listing", &tmp))? {
            let entry = entry.map_err(io_err("listing", &tmp))?;
            let p = entry.path();
            fs::remove_file(&p).map_err(io_err("removing stray temp file", &p))?;
        }
        let partial = root.join("partial");
        for entry in fs::read_dir(&partial).map_err(io_err("listing", &partial))? {
            let entry = entry.map_err(io_err("listing", &partial))?;
            let name = entry.file_name().to_string_lossy().to_string();
            let complete = root.join("blobs/sha256").join(&name);
            let valid = sha256_hex(&format!("sha256:{name}")).is_some();
            if !valid || complete.exists() {
                let p = entry.path();
                fs::remove_file(&p).map_err(io_err("removing stale partial", &p))?;
            }
        }
        let layout = root.join("oci-layout");
        if !layout.exists() {
            write_atomic(&root, &layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let store = Store {
            root,
            state: Mutex::new(State::default()),
            writable: true,
            pins: PinMap::default(),
            _lock: Some(lock),
        };
        store.reload_if_changed()?;
        Ok(store)
    }

    /// Opens an existing store for reading only, without the writer lock.
    pub fn open_read_only(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        let blobs = root.join("blobs/sha256");
        fs::metadata(&blobs).map_err(io_err("opening", &blobs))?;
        let store = Store {
            root,
            state: Mutex::new(State::default()),
            writable: false,
            pins: PinMap::default(),
            _lock: None,
        };
        store.reload_if_changed()?;
        Ok(store)
    }

    /// The data dir.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a complete blob lives (whether or not it exists).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        let hex = sha256_hex(digest).ok_or_else(|| StoreError::InvalidDigest(digest.into()))?;
        Ok(self.root.join("blobs/sha256").join(hex))
    }

    /// Where the partial download of a blob lives.
    pub fn partial_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        let hex = sha256_hex(digest).ok_or_else(|| StoreError::InvalidDigest(digest.into()))?;
        Ok(self.root.join("partial").join(hex))
    }

    /// Whether a complete, verified blob is present.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_size(digest).is_some()
    }

    /// The size of a complete blob, if present.
    pub fn blob_size(&self, digest: &str) -> Option<u64> {
        let p = self.blob_path(digest).ok()?;
        fs::metadata(p)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }

    /// Reads a whole blob (for manifests, which are small).
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        let p = self.blob_path(digest)?;
        fs::read(&p).map_err(io_err("reading", &p))
    }

    /// Stores bytes in memory as a blob: verified, fsynced, renamed in.
    pub fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.check_writable()?;
        let target = self.blob_path(digest)?;
        let actual = sha256_digest(bytes);
        if actual != digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.into(),
                actual,
            });
        }
        if target.exists() {
            return Ok(());
        }
        write_atomic(&self.root, &target, bytes)
    }

    /// Opens (or creates) the partial download of a blob and re-hashes what is
    /// already there, so that resuming never trusts bytes it has not read.
    /// Blocking file I/O; call from `spawn_blocking` for large partials.
    pub fn open_partial(&self, digest: &str) -> Result<PartialBlob, StoreError> {
        self.check_writable()?;
        let path = self.partial_path(digest)?;
        PartialBlob::open(digest.to_string(), path)
    }

    /// Makes a finished partial visible, as containerd's `Commit(size,
    /// expected)` does: flushes and fsyncs it, checks its length against
    /// `size` (a shorter partial stays, to be resumed) and its sha256 against
    /// the digest (discarding it on a mismatch), renames it into `blobs/`
    /// and fsyncs the directory.
    pub fn commit_partial(&self, partial: PartialBlob, size: u64) -> Result<u64, StoreError> {
        self.check_writable()?;
        let target = self.blob_path(partial.digest())?;
        let (path, actual, len) = partial.finish()?;
        if len != size {
            return Err(StoreError::SizeMismatch {
                digest: partial_digest_expected(&path),
                expected: size,
                actual: len,
            });
        }
        if actual != partial_digest_expected(&path) {
            let _ = fs::remove_file(&path);
            return Err(StoreError::DigestMismatch {
                expected: format!("sha256:{}", file_name(&path)),
                actual,
            });
        }
        fs::rename(&path, &target).map_err(io_err("renaming into blobs", &target))?;
        fsync_dir(&self.root.join("blobs/sha256"))?;
        Ok(len)
    }

    /// An empty set of pins; see [`Pins`].
    pub fn pins(&self) -> Pins {
        Pins {
            map: self.pins.clone(),
            held: Vec::new(),
        }
    }

    /// Whether a transfer in progress holds `digest`.
    pub fn is_pinned(&self, digest: &str) -> bool {
        self.pins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(digest)
    }

    /// Removes a blob (GC only), unless a transfer holds it or the records
    /// changed since `generation` (GC's decision is then stale). Checked and
    /// done under the pin lock, so a transfer cannot pin it in between.
    pub fn remove_blob_unless_in_use(
        &self,
        digest: &str,
        generation: u64,
    ) -> Result<Result<(), Kept>, StoreError> {
        self.check_writable()?;
        let p = self.blob_path(digest)?;
        let pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        if pins.contains_key(digest) {
            return Ok(Err(Kept::Pinned));
        }
        if self.generation() != generation {
            return Ok(Err(Kept::RecordsChanged));
        }
        match fs::remove_file(&p) {
            Ok(()) => Ok(Ok(())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ok(())),
            Err(e) => Err(io_err("removing", &p)(e)),
        }
    }

    /// The generation of the records: it changes whenever they do (here or,
    /// for a read-only store, in the writer's index.json).
    pub fn generation(&self) -> u64 {
        if let Err(e) = self.reload_if_changed() {
            tracing::warn!(error = %e, "Could not reload the content store index");
        }
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .generation
    }

    /// The records with their generation, read together.
    pub fn records_at(&self) -> (u64, Vec<ManifestRecord>) {
        if let Err(e) = self.reload_if_changed() {
            tracing::warn!(error = %e, "Could not reload the content store index");
        }
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (state.generation, state.records.clone())
    }

    /// Digests of all complete blobs with their sizes and modification times.
    pub fn list_blobs(&self) -> Result<Vec<(String, u64, SystemTime)>, StoreError> {
        let dir = self.root.join("blobs/sha256");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            let digest = format!("sha256:{}", entry.file_name().to_string_lossy());
            if sha256_hex(&digest).is_none() {
                continue;
            }
            let meta = entry.metadata().map_err(io_err("stat", &entry.path()))?;
            out.push((digest, meta.len(), meta.modified().unwrap_or(UNIX_EPOCH)));
        }
        Ok(out)
    }

    /// Bytes used by blobs and partials.
    pub fn usage(&self) -> Result<Usage, StoreError> {
        let blobs = self.list_blobs()?;
        let partial_dir = self.root.join("partial");
        let mut partial_bytes = 0;
        if let Ok(rd) = fs::read_dir(&partial_dir) {
            for e in rd.flatten() {
                partial_bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
        Ok(Usage {
            blob_bytes: blobs.iter().map(|b| b.1).sum(),
            blobs: blobs.len() as u64,
            partial_bytes,
        })
    }

    /// Records manifests (replacing records with the same registry,
    /// repository and tag, or the same untagged digest) in one atomic write.
    /// Callers record a manifest only once all its blobs are present.
    pub fn record(&self, records: Vec<ManifestRecord>) -> Result<(), StoreError> {
        self.check_writable()?;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = state.records.clone();
        for r in records {
            next.retain(|old| !old.same_key(&r));
            next.push(r);
        }
        state.seen = self.write_index(&next)?;
        state.records = next;
        state.generation += 1;
        Ok(())
    }

    /// Removes the records for which `remove` says true, in one atomic write.
    pub fn remove_records(
        &self,
        remove: impl Fn(&ManifestRecord) -> bool,
    ) -> Result<Vec<ManifestRecord>, StoreError> {
        self.check_writable()?;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (gone, kept): (Vec<_>, Vec<_>) = state.records.iter().cloned().partition(&remove);
        if !gone.is_empty() {
            state.seen = self.write_index(&kept)?;
            state.records = kept;
            state.generation += 1;
        }
        Ok(gone)
    }

    /// All records.
    pub fn records(&self) -> Vec<ManifestRecord> {
        if let Err(e) = self.reload_if_changed() {
            tracing::warn!(error = %e, "Could not reload the content store index");
        }
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .records
            .clone()
    }

    /// Whether the image `digest` of (registry, repository) is complete: its
    /// root record exists, which happens only after all its content is present.
    pub fn has_image(&self, registry: &str, repository: &str, digest: &str) -> bool {
        self.records().iter().any(|r| {
            r.registry == registry
                && r.repository == repository
                && r.digest == digest
                && r.parent.is_none()
        })
    }

    /// The registries that hold a repository.
    pub fn registries_for(&self, repository: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .records()
            .into_iter()
            .filter(|r| r.repository == repository)
            .map(|r| r.registry)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The manifest a reference (tag or digest) names in (registry, repository).
    pub fn find_manifest(
        &self,
        registry: &str,
        repository: &str,
        reference: &str,
    ) -> Option<ManifestRecord> {
        let by_digest = reference.contains(':');
        self.records().into_iter().find(|r| {
            r.registry == registry
                && r.repository == repository
                && if by_digest {
                    r.digest == reference
                } else {
                    r.tag.as_deref() == Some(reference)
                }
        })
    }

    /// Tags recorded for (registry, repository), sorted.
    pub fn tags(&self, registry: &str, repository: &str) -> Vec<String> {
        let mut tags: Vec<String> = self
            .records()
            .into_iter()
            .filter(|r| r.registry == registry && r.repository == repository)
            .filter_map(|r| r.tag)
            .collect();
        tags.sort();
        tags.dedup();
        tags
    }

    /// The tree of an image whose root manifest is in the store: every
    /// manifest below it that `platforms` selects (all when empty) and every
    /// blob they name, as far as the store holds them. `media_type` is the
    /// root's, when a record says; otherwise the document's own `mediaType`
    /// is used.
    pub fn tree(
        &self,
        root: &str,
        media_type: Option<&str>,
        platforms: &[String],
    ) -> Result<plan::Tree, TreeError> {
        let bytes = self.read_blob(root).map_err(TreeError::Store)?;
        let media_type = match media_type {
            Some(m) => m.to_string(),
            None => declared_media_type(&bytes).ok_or_else(|| {
                TreeError::Plan(plan::WalkError {
                    digest: root.to_string(),
                    source: plan::PlanError::NoMediaType,
                })
            })?,
        };
        let node = plan::Node {
            digest: root.to_string(),
            media_type,
            size: bytes.len() as u64,
        };
        plan::walk(node, &bytes, platforms, |child| {
            let bytes = self.read_blob(&child.digest).ok()?;
            let media_type = if plan::kind_of(&child.media_type).is_ok() {
                child.media_type.clone()
            } else {
                declared_media_type(&bytes)?
            };
            Some((bytes, media_type))
        })
        .map_err(TreeError::Plan)
    }

    /// Writes a small file under the data dir atomically (temp, fsync, rename).
    pub fn write_file_atomic(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.check_writable()?;
        write_atomic(&self.root, &self.root.join(name), bytes)
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        if self.writable {
            Ok(())
        } else {
            Err(StoreError::ReadOnly)
        }
    }

    /// Writes index.json and returns its new (mtime, len), so that the writer
    /// does not read back what it just wrote.
    fn write_index(
        &self,
        records: &[ManifestRecord],
    ) -> Result<Option<(SystemTime, u64)>, StoreError> {
        let file = IndexFile {
            schema_version: 2,
            media_type: OCI_INDEX.to_string(),
            manifests: records.iter().map(ManifestRecord::to_descriptor).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|source| StoreError::Encode {
            path: self.root.join("index.json"),
            source,
        })?;
        let path = self.root.join("index.json");
        write_atomic(&self.root, &path, &bytes)?;
        Ok(fs::metadata(&path)
            .ok()
            .map(|m| (m.modified().unwrap_or(UNIX_EPOCH), m.len())))
    }

    /// Reads index.json when it changed since the last read (another process
    /// may be the writer).
    fn reload_if_changed(&self) -> Result<(), StoreError> {
        let path = self.root.join("index.json");
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("stat", &path)(e)),
        };
        let stamp = (meta.modified().unwrap_or(UNIX_EPOCH), meta.len());
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.seen == Some(stamp) {
            return Ok(());
        }
        let mut text = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut text))
            .map_err(io_err("reading", &path))?;
        let file: IndexFile =
            serde_json::from_slice(&text).map_err(|source| StoreError::Corrupt {
                path: path.clone(),
                source,
            })?;
        state.records = file
            .manifests
            .iter()
            .filter_map(ManifestRecord::from_descriptor)
            .collect();
        state.seen = Some(stamp);
        state.generation += 1;
        Ok(())
    }
}

/// Why [`Store::tree`] could not walk an image.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// The root manifest could not be read.
    #[error(transparent)]
    Store(StoreError),
    /// A manifest of the tree is unusable.
    #[error(transparent)]
    Plan(plan::WalkError),
}

/// The `mediaType` a manifest document declares.
pub fn declared_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Doc {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Doc>(bytes).ok()?.media_type
}

/// Seconds since the epoch, for records.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}

fn partial_digest_expected(p: &Path) -> String {
    format!("sha256:{}", file_name(p))
}

/// Writes a file atomically: temp file in `<root>/tmp`, fsync, rename, fsync
/// the target directory.
fn write_atomic(root: &Path, target: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = root.join("tmp").join(format!(
        "{}.{:016x}",
        file_name(target),
        rand::random::<u64>()
    ));
    if let Some(parent) = tmp.parent() {
        fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
    }
    let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f.write_all(bytes).map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, target).map_err(io_err("renaming", target))?;
    if let Some(dir) = target.parent() {
        fsync_dir(dir)?;
    }
    Ok(())
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

#[cfg(test)]
mod tests;
