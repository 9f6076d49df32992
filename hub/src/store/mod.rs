//! The policy store: one trait, two real backends (etcd and an embedded redb
//! file) that behave the same. Values are opaque bytes; the admin layer decides
//! what they hold (JSON of the resource model, with secrets already encrypted).

pub mod etcd;
pub mod redb;
pub mod watcher;

pub use self::etcd::EtcdStore;
pub use self::redb::RedbStore;

use std::pin::Pin;

use futures::Stream;

/// Where an object lives: its kind ("registrysecrets", "repositories",
/// "clusters", or an internal kind such as "generations"), namespace (empty for
/// cluster-scoped kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(
        kind: impl Into<String>,
        namespace: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        Self {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// A stored value with the revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub key: Key,
    pub value: Vec<u8>,
    /// Store revision of the last write of this key (etcd mod_revision).
    pub revision: u64,
    /// Store revision that created this key (etcd create_revision).
    pub create_revision: u64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Created or updated; `create_revision == revision` means created.
    Put(Versioned),
    /// Deleted; `revision` is the store revision of the deletion and `value`
    /// the last value before it.
    Delete(Versioned),
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

/// Errors of the policy store. `Unavailable` is worth a retry; the others are not.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0:?} already exists")]
    AlreadyExists(Key),
    #[error("{0:?} not found")]
    NotFound(Key),
    /// Optimistic concurrency failed: the object changed since `expected`.
    #[error("conflict on {key:?}: expected revision {expected}, stored revision is {actual}")]
    Conflict {
        key: Key,
        expected: u64,
        actual: u64,
    },
    /// The watch start revision is older than the store can replay: list again.
    #[error("revision {requested} is too old to replay (oldest is {oldest}): relist")]
    Compacted { requested: u64, oldest: u64 },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store corrupt or unreadable: {0}")]
    Internal(String),
}

/// One conditional write of a [`PolicyStore::put_batch`].
#[derive(Debug, Clone)]
pub struct Put {
    pub key: Key,
    pub value: Vec<u8>,
    /// `None`: the key must not exist (a create). `Some(r)`: it must exist
    /// with revision `r` (an update).
    pub expected: Option<u64>,
}

/// One write of a [`PolicyStore::commit`].
#[derive(Debug, Clone)]
pub enum Write {
    /// A conditional put, as in a batch.
    Put(Put),
    /// A delete; with `expected`, only at that revision. Fails with NotFound
    /// if absent.
    Delete { key: Key, expected: Option<u64> },
}

impl Write {
    pub fn key(&self) -> &Key {
        match self {
            Write::Put(p) => &p.key,
            Write::Delete { key, .. } => key,
        }
    }
}

/// Most puts one batch may hold by default (etcd refuses transactions of
/// more than 128 operations unless configured otherwise).
pub const MAX_BATCH_PUTS: usize = 100;
/// Most value bytes one batch may hold by default (etcd refuses requests
/// over 1.5 MiB unless configured otherwise).
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// How large one [`PolicyStore::put_batch`] may be: puts and value bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub puts: usize,
    pub bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            puts: MAX_BATCH_PUTS,
            bytes: MAX_BATCH_BYTES,
        }
    }
}

/// How many batches [`put_batches`] keeps in flight. etcd commits
/// concurrent transactions in one raft round and one fsync; the embedded
/// store takes them one after another.
const BATCHES_IN_FLIGHT: usize = 32;

/// Splits puts into batches within `limits`, keeping their order. A put
/// larger than the byte limit gets a batch of its own.
pub fn batches(puts: Vec<Put>, limits: BatchLimits) -> Vec<Vec<Put>> {
    let mut out: Vec<Vec<Put>> = Vec::new();
    let mut bytes = 0;
    for put in puts {
        let fits = out
            .last()
            .is_some_and(|b| b.len() < limits.puts && bytes + put.value.len() <= limits.bytes);
        if !fits {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += put.value.len();
        if let Some(b) = out.last_mut() {
            b.push(put);
        }
    }
    out
}

/// Writes `puts` in batches within the store's limits, several at a time,
/// and calls `done` with each batch's result and the positions of its puts
/// in `puts` as it completes; the caller redoes refused batches (a
/// concurrent writer) one by one.
pub async fn put_batches(
    store: &dyn PolicyStore,
    puts: Vec<Put>,
    mut done: impl FnMut(std::ops::Range<usize>, Result<Vec<u64>, StoreError>),
) {
    use futures::StreamExt as _;
    let mut start = 0;
    let ranged: Vec<(std::ops::Range<usize>, Vec<Put>)> = batches(puts, store.batch_limits())
        .into_iter()
        .map(|b| {
            let range = start..start + b.len();
            start = range.end;
            (range, b)
        })
        .collect();
    let mut results = futures::stream::iter(ranged)
        .map(|(range, batch)| async move { (range, store.put_batch(batch).await) })
        .buffer_unordered(BATCHES_IN_FLIGHT);
    while let Some((range, result)) = results.next().await {
        done(range, result);
    }
}

/// The namespace part of a cluster-scoped key as etcd stores it; reserved,
/// so that no namespaced key can take its place.
pub(crate) const CLUSTER_SCOPE: &str = "_";

/// Refuses key parts that would make stored keys ambiguous: an empty kind
/// or name, a '/' or NUL anywhere (both backends use them as separators),
/// or the reserved namespace [`CLUSTER_SCOPE`]. One check for both
/// backends, so that they accept the same keys.
pub(crate) fn check_key(key: &Key) -> Result<(), StoreError> {
    let bad = |s: &str| s.contains('/') || s.contains('\0');
    if key.kind.is_empty()
        || key.name.is_empty()
        || bad(&key.kind)
        || bad(&key.namespace)
        || bad(&key.name)
        || key.namespace == CLUSTER_SCOPE
    {
        return Err(StoreError::Internal(format!(
            "invalid store key {key:?}: expected a non-empty kind and name without '/' or NUL"
        )));
    }
    Ok(())
}

/// Refuses a batch the backend cannot apply as one transaction.
fn check_batch(puts: &[Put], limits: BatchLimits) -> Result<(), StoreError> {
    let bytes: usize = puts.iter().map(|p| p.value.len()).sum();
    if puts.len() > limits.puts || (puts.len() > 1 && bytes > limits.bytes) {
        return Err(StoreError::Internal(format!(
            "a batch of {} puts and {bytes} bytes exceeds {} puts or {} bytes; split it with store::batches",
            puts.len(),
            limits.puts,
            limits.bytes
        )));
    }
    let mut keys: Vec<&Key> = puts.iter().map(|p| &p.key).collect();
    keys.sort();
    if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
        return Err(StoreError::Internal(format!(
            "a batch names {:?} twice",
            w[0]
        )));
    }
    Ok(())
}

/// The policy store. Both backends give every write a store-wide revision that
/// only grows, as etcd does.
#[async_trait::async_trait]
pub trait PolicyStore: Send + Sync + 'static {
    /// The store's current revision.
    async fn revision(&self) -> Result<u64, StoreError>;
    async fn get(&self, key: &Key) -> Result<Option<Versioned>, StoreError>;
    /// Objects of one kind, in one namespace or (None) all, sorted by key, and
    /// the revision the list was read at.
    async fn list(
        &self,
        kind: &str,
        namespace: Option<&str>,
    ) -> Result<(Vec<Versioned>, u64), StoreError>;
    /// Create; fails with AlreadyExists. Returns the new revision.
    async fn create(&self, key: &Key, value: Vec<u8>) -> Result<u64, StoreError>;
    /// Update. With `expected_revision`, fails with Conflict unless the stored
    /// revision matches; fails with NotFound if absent. Returns the new revision.
    async fn update(
        &self,
        key: &Key,
        value: Vec<u8>,
        expected_revision: Option<u64>,
    ) -> Result<u64, StoreError>;
    /// Delete, returning the last value. With `expected_revision`, fails with Conflict on mismatch;
    /// fails with NotFound if absent. The returned `revision` is the revision of the deletion
    /// (as in `WatchEvent::Delete`), `create_revision` that of the deleted object.
    async fn delete(
        &self,
        key: &Key,
        expected_revision: Option<u64>,
    ) -> Result<Versioned, StoreError>;
    /// How large one [`PolicyStore::put_batch`] may be.
    fn batch_limits(&self) -> BatchLimits {
        BatchLimits::default()
    }
    /// Writes every put or none, in one transaction. Fails with AlreadyExists,
    /// NotFound or Conflict naming the first put whose precondition does not
    /// hold; then nothing was written. Within [`PolicyStore::batch_limits`]
    /// (see [`batches`]), each key once. Returns the
    /// revision each put was written at, in order. Watchers see one event per
    /// put, in order; etcd gives them all one revision, the embedded store one
    /// each.
    async fn put_batch(&self, puts: Vec<Put>) -> Result<Vec<u64>, StoreError>;
    /// Writes `writes` and then the audit record `audit` (a create: its key
    /// must be new) in one transaction, all or nothing, so that no change is
    /// stored without its record. The record is stored at the revision of the
    /// last write (a new one when there are none): its own revision is the
    /// resourceVersion the change produced. Watchers of the record's kind may
    /// not see it (the embedded store logs no event for it); it is read with
    /// get and list. Fails like [`PolicyStore::put_batch`] on a precondition,
    /// NotFound for a delete of a missing key. Returns each write's result
    /// (a put's value as written; a delete's last value with the revision of
    /// the deletion) and the record's revision.
    async fn commit(
        &self,
        writes: Vec<Write>,
        audit: Put,
    ) -> Result<(Vec<Versioned>, u64), StoreError>;
    /// Changes to one kind with revision > `after_revision`, in order, then live.
    /// Fails with Compacted when `after_revision` is too old to replay.
    async fn watch(&self, kind: &str, after_revision: u64) -> Result<WatchStream, StoreError>;
}
