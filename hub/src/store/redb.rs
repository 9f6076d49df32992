//! The embedded policy store: one redb file holding the objects, the store
//! revision and a bounded change log, so a single hub needs no etcd.
//!
//! Layout: `objects` maps `kind \0 namespace \0 name` to (value, revision,
//! create_revision); `meta` holds the current revision and the compaction
//! floor; `changelog` maps revision to the encoded event of that revision and
//! keeps the last `log_capacity` events so a watch can replay from a revision.
//! The NUL separator sorts below every other byte, so byte order of the stored
//! keys equals the order of `Key` (kind, namespace, name).
//!
//! Every write is one redb write transaction committed with the default
//! (immediate, fsynced) durability; live watchers are fed through a tokio
//! broadcast channel after the commit. A watcher that falls behind the channel
//! re-reads the change log instead of losing events, or ends with `Compacted`
//! when the log no longer reaches back far enough.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ::redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::broadcast;

use super::{
    BatchLimits, Key, PolicyStore, Put, StoreError, Versioned, WatchEvent, WatchStream, Write,
    check_batch, check_key,
};

const OBJECTS: TableDefinition<&str, (&[u8], u64, u64)> = TableDefinition::new("objects");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const CHANGELOG: TableDefinition<u64, &[u8]> = TableDefinition::new("changelog");
const META_REVISION: &str = "revision";
/// Events with a revision at or below this were dropped from the change log.
const META_COMPACTED: &str = "compacted";

/// How many events the change log keeps by default.
pub const DEFAULT_LOG_CAPACITY: u64 = 50_000;
/// redb's page cache. Its default (1 GiB) would let the hub's memory grow
/// with the file (objects plus the change log); reads past the cache are
/// served by the OS page cache.
const CACHE_BYTES: usize = 32 * 1024 * 1024;
/// Live events buffered per watcher before it has to fall back to the log.
const BROADCAST_CAPACITY: usize = 16_384;

/// The embedded store. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// Serialises writers so events reach the broadcast channel in revision order.
    write_lock: Mutex<()>,
    events: broadcast::Sender<WatchEvent>,
    log_capacity: u64,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.inner.path)
            .field("log_capacity", &self.inner.log_capacity)
            .finish()
    }
}

enum Op {
    Create(Vec<u8>),
    Update(Vec<u8>, Option<u64>),
    Delete(Option<u64>),
}

impl RedbStore {
    /// Opens (or creates) the store file at `path`, keeping the last
    /// [`DEFAULT_LOG_CAPACITY`] events for watch replay.
    pub async fn open(path: &Path) -> Result<RedbStore, StoreError> {
        Self::open_with_log_capacity(path, DEFAULT_LOG_CAPACITY).await
    }

    /// Like [`RedbStore::open`], with the number of events kept for replay.
    pub async fn open_with_log_capacity(
        path: &Path,
        log_capacity: u64,
    ) -> Result<RedbStore, StoreError> {
        let path = path.to_path_buf();
        let log_capacity = log_capacity.max(1);
        blocking(move || {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| {
                    StoreError::Internal(format!("creating directory {}: {e}", parent.display()))
                })?;
            }
            let db = ::redb::Builder::new()
                .set_cache_size(CACHE_BYTES)
                .create(&path)
                .map_err(|e| {
                    StoreError::Internal(format!("opening redb store {}: {e}", path.display()))
                })?;
            // Create the tables up front so readers never see them missing.
            let txn = db.begin_write().map_err(|e| internal(&path, e))?;
            {
                txn.open_table(OBJECTS).map_err(|e| internal(&path, e))?;
                txn.open_table(META).map_err(|e| internal(&path, e))?;
                txn.open_table(CHANGELOG).map_err(|e| internal(&path, e))?;
            }
            txn.commit().map_err(|e| internal(&path, e))?;
            let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
            Ok(RedbStore {
                inner: Arc::new(Inner {
                    db,
                    path,
                    write_lock: Mutex::new(()),
                    events,
                    log_capacity,
                }),
            })
        })
        .await
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Drops change-log events with a revision at or below `revision` (capped
    /// at the current revision). A watch from before it then fails with
    /// `Compacted`, as after an etcd compaction.
    pub async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        blocking(move || {
            let _guard = inner
                .write_lock
                .lock()
                .map_err(|_| StoreError::Internal("redb write lock poisoned".into()))?;
            let p = &inner.path;
            let txn = inner.db.begin_write().map_err(|e| internal(p, e))?;
            {
                let mut meta = txn.open_table(META).map_err(|e| internal(p, e))?;
                let current = read_meta(&meta, META_REVISION, p)?;
                let old = read_meta(&meta, META_COMPACTED, p)?;
                let target = revision.min(current).max(old);
                let mut log = txn.open_table(CHANGELOG).map_err(|e| internal(p, e))?;
                log.retain_in(..=target, |_, _| false)
                    .map_err(|e| internal(p, e))?;
                meta.insert(META_COMPACTED, target)
                    .map_err(|e| internal(p, e))?;
            }
            txn.commit().map_err(|e| internal(p, e))?;
            Ok(())
        })
        .await
    }

    async fn change(&self, key: &Key, op: Op) -> Result<Versioned, StoreError> {
        check_key(key)?;
        let inner = self.inner.clone();
        let key = key.clone();
        blocking(move || inner.change(&key, op)).await
    }
}

impl Inner {
    /// Applies one write in one transaction and publishes its event. Returns
    /// the object as written (for a delete: the last value, with the revision
    /// of the deletion).
    fn change(&self, key: &Key, op: Op) -> Result<Versioned, StoreError> {
        self.apply(vec![(key.clone(), op)])?
            .pop()
            .ok_or_else(|| StoreError::Internal("redb write returned nothing".into()))
    }

    fn apply(&self, ops: Vec<(Key, Op)>) -> Result<Vec<Versioned>, StoreError> {
        self.apply_audited(ops, None).map(|(v, _)| v)
    }

    /// Applies writes in one transaction, all or none, each with its own
    /// revision in order, then publishes their events. An audit record is
    /// created in the same transaction at the revision of the last write (a
    /// new one without writes) and logs no event: its revision must be the
    /// change's, and the log holds one event per revision.
    fn apply_audited(
        &self,
        ops: Vec<(Key, Op)>,
        audit: Option<(Key, Vec<u8>)>,
    ) -> Result<(Vec<Versioned>, u64), StoreError> {
        let p = &self.path;
        let _guard = self
            .write_lock
            .lock()
            .map_err(|_| StoreError::Internal("redb write lock poisoned".into()))?;
        let txn = self.db.begin_write().map_err(|e| internal(p, e))?;
        let mut events = Vec::with_capacity(ops.len());
        let mut audit_revision = 0;
        {
            let mut objects = txn.open_table(OBJECTS).map_err(|e| internal(p, e))?;
            let mut meta = txn.open_table(META).map_err(|e| internal(p, e))?;
            let mut log = txn.open_table(CHANGELOG).map_err(|e| internal(p, e))?;
            let mut revision = read_meta(&meta, META_REVISION, p)?;
            for (key, op) in ops {
                revision += 1;
                let skey = storage_key(&key);
                let existing: Option<(Vec<u8>, u64, u64)> = objects
                    .get(skey.as_str())
                    .map_err(|e| internal(p, e))?
                    .map(|g| {
                        let (v, r, c) = g.value();
                        (v.to_vec(), r, c)
                    });
                let check = |expected: Option<u64>| -> Result<(), StoreError> {
                    match (&existing, expected) {
                        (None, _) => Err(StoreError::NotFound(key.clone())),
                        (Some((_, actual, _)), Some(expected)) if *actual != expected => {
                            Err(StoreError::Conflict {
                                key: key.clone(),
                                expected,
                                actual: *actual,
                            })
                        }
                        _ => Ok(()),
                    }
                };
                let event = match op {
                    Op::Create(value) => {
                        if existing.is_some() {
                            return Err(StoreError::AlreadyExists(key.clone()));
                        }
                        objects
                            .insert(skey.as_str(), (value.as_slice(), revision, revision))
                            .map_err(|e| internal(p, e))?;
                        WatchEvent::Put(versioned(&key, value, revision, revision))
                    }
                    Op::Update(value, expected) => {
                        check(expected)?;
                        let create_revision = existing.as_ref().map_or(revision, |e| e.2);
                        objects
                            .insert(skey.as_str(), (value.as_slice(), revision, create_revision))
                            .map_err(|e| internal(p, e))?;
                        WatchEvent::Put(versioned(&key, value, revision, create_revision))
                    }
                    Op::Delete(expected) => {
                        check(expected)?;
                        objects.remove(skey.as_str()).map_err(|e| internal(p, e))?;
                        let (value, _, create_revision) = existing.unwrap_or_default();
                        WatchEvent::Delete(versioned(&key, value, revision, create_revision))
                    }
                };
                log.insert(revision, encode_event(&event).as_slice())
                    .map_err(|e| internal(p, e))?;
                events.push(event);
            }
            if let Some((key, value)) = &audit {
                if events.is_empty() {
                    revision += 1;
                }
                let skey = storage_key(key);
                if objects
                    .get(skey.as_str())
                    .map_err(|e| internal(p, e))?
                    .is_some()
                {
                    return Err(StoreError::AlreadyExists(key.clone()));
                }
                objects
                    .insert(skey.as_str(), (value.as_slice(), revision, revision))
                    .map_err(|e| internal(p, e))?;
                audit_revision = revision;
            }
            // Keep the log bounded; remember how far it was cut so a watch
            // from before that point answers Compacted instead of missing events.
            let mut compacted = read_meta(&meta, META_COMPACTED, p)?;
            let excess = log
                .len()
                .map_err(|e| internal(p, e))?
                .saturating_sub(self.log_capacity);
            if excess > 0 {
                let first = log
                    .first()
                    .map_err(|e| internal(p, e))?
                    .map(|(k, _)| k.value())
                    .unwrap_or(0);
                let cut = first.saturating_add(excess - 1);
                log.retain_in(..=cut, |_, _| false)
                    .map_err(|e| internal(p, e))?;
                compacted = compacted.max(cut);
            }
            meta.insert(META_COMPACTED, compacted)
                .map_err(|e| internal(p, e))?;
            meta.insert(META_REVISION, revision)
                .map_err(|e| internal(p, e))?;
        }
        txn.commit().map_err(|e| internal(p, e))?;
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            // No receiver is fine: nobody watches.
            let _ = self.events.send(event.clone());
            out.push(match event {
                WatchEvent::Put(v) | WatchEvent::Delete(v) => v,
            });
        }
        Ok((out, audit_revision))
    }

    /// Events of `kind` with revision > `after`, from the change log, and the
    /// revision the log was read at.
    fn replay(&self, kind: &str, after: u64) -> Result<(Vec<WatchEvent>, u64), StoreError> {
        let p = &self.path;
        let txn = self.db.begin_read().map_err(|e| internal(p, e))?;
        let meta = txn.open_table(META).map_err(|e| internal(p, e))?;
        let current = read_meta(&meta, META_REVISION, p)?;
        let compacted = read_meta(&meta, META_COMPACTED, p)?;
        if after < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                oldest: compacted,
            });
        }
        let log = txn.open_table(CHANGELOG).map_err(|e| internal(p, e))?;
        let mut out = Vec::new();
        for entry in log
            .range(after.saturating_add(1)..)
            .map_err(|e| internal(p, e))?
        {
            let (rev, bytes) = entry.map_err(|e| internal(p, e))?;
            let event = decode_event(bytes.value()).ok_or_else(|| {
                StoreError::Internal(format!(
                    "{}: change log entry {} is malformed",
                    p.display(),
                    rev.value()
                ))
            })?;
            if event_key(&event).kind == kind {
                out.push(event);
            }
        }
        Ok((out, current))
    }
}

#[async_trait::async_trait]
impl PolicyStore for RedbStore {
    async fn revision(&self) -> Result<u64, StoreError> {
        let inner = self.inner.clone();
        blocking(move || {
            let p = &inner.path;
            let txn = inner.db.begin_read().map_err(|e| internal(p, e))?;
            let meta = txn.open_table(META).map_err(|e| internal(p, e))?;
            read_meta(&meta, META_REVISION, p)
        })
        .await
    }

    async fn get(&self, key: &Key) -> Result<Option<Versioned>, StoreError> {
        check_key(key)?;
        let inner = self.inner.clone();
        let key = key.clone();
        blocking(move || {
            let p = &inner.path;
            let txn = inner.db.begin_read().map_err(|e| internal(p, e))?;
            let objects = txn.open_table(OBJECTS).map_err(|e| internal(p, e))?;
            let found = objects
                .get(storage_key(&key).as_str())
                .map_err(|e| internal(p, e))?;
            Ok(found.map(|g| {
                let (v, r, c) = g.value();
                versioned(&key, v.to_vec(), r, c)
            }))
        })
        .await
    }

    async fn list(
        &self,
        kind: &str,
        namespace: Option<&str>,
    ) -> Result<(Vec<Versioned>, u64), StoreError> {
        let inner = self.inner.clone();
        let (start, end) = match namespace {
            Some(ns) => (format!("{kind}\0{ns}\0"), format!("{kind}\0{ns}\u{1}")),
            None => (format!("{kind}\0"), format!("{kind}\u{1}")),
        };
        blocking(move || {
            let p = &inner.path;
            let txn = inner.db.begin_read().map_err(|e| internal(p, e))?;
            let meta = txn.open_table(META).map_err(|e| internal(p, e))?;
            let revision = read_meta(&meta, META_REVISION, p)?;
            let objects = txn.open_table(OBJECTS).map_err(|e| internal(p, e))?;
            let mut out = Vec::new();
            for entry in objects
                .range(start.as_str()..end.as_str())
                .map_err(|e| internal(p, e))?
            {
                let (k, v) = entry.map_err(|e| internal(p, e))?;
                let key = parse_storage_key(k.value()).ok_or_else(|| {
                    StoreError::Internal(format!("{}: malformed object key", p.display()))
                })?;
                let (value, r, c) = v.value();
                out.push(versioned(&key, value.to_vec(), r, c));
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok((out, revision))
        })
        .await
    }

    async fn create(&self, key: &Key, value: Vec<u8>) -> Result<u64, StoreError> {
        Ok(self.change(key, Op::Create(value)).await?.revision)
    }

    async fn update(
        &self,
        key: &Key,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<u64, StoreError> {
        Ok(self
            .change(key, Op::Update(value, expected))
            .await?
            .revision)
    }

    async fn delete(
        &self,
        key: &Key,
        expected_revision: Option<u64>,
    ) -> Result<Versioned, StoreError> {
        self.change(key, Op::Delete(expected_revision)).await
    }

    /// One transaction costs one fsync however many puts it holds, so a
    /// whole fleet's desired sets fit in one.
    fn batch_limits(&self) -> BatchLimits {
        BatchLimits {
            puts: 50_000,
            bytes: 256 * 1024 * 1024,
        }
    }

    async fn put_batch(&self, puts: Vec<Put>) -> Result<Vec<u64>, StoreError> {
        check_batch(&puts, self.batch_limits())?;
        for put in &puts {
            check_key(&put.key)?;
        }
        if puts.is_empty() {
            return Ok(Vec::new());
        }
        let inner = self.inner.clone();
        let ops = puts
            .into_iter()
            .map(|p| {
                let op = match p.expected {
                    None => Op::Create(p.value),
                    Some(r) => Op::Update(p.value, Some(r)),
                };
                (p.key, op)
            })
            .collect();
        let written = blocking(move || inner.apply(ops)).await?;
        Ok(written.iter().map(|v| v.revision).collect())
    }

    async fn commit(
        &self,
        writes: Vec<Write>,
        audit: Put,
    ) -> Result<(Vec<Versioned>, u64), StoreError> {
        check_key(&audit.key)?;
        for w in &writes {
            check_key(w.key())?;
        }
        let inner = self.inner.clone();
        let ops = writes
            .into_iter()
            .map(|w| match w {
                Write::Put(p) => {
                    let op = match p.expected {
                        None => Op::Create(p.value),
                        Some(r) => Op::Update(p.value, Some(r)),
                    };
                    (p.key, op)
                }
                Write::Delete { key, expected } => (key, Op::Delete(expected)),
            })
            .collect();
        blocking(move || inner.apply_audited(ops, Some((audit.key, audit.value)))).await
    }

    async fn watch(&self, kind: &str, after_revision: u64) -> Result<WatchStream, StoreError> {
        // Subscribe before reading the log so nothing committed in between is missed;
        // duplicates are dropped by revision.
        let rx = self.inner.events.subscribe();
        let inner = self.inner.clone();
        let k = kind.to_string();
        let (replayed, read_at) = blocking(move || inner.replay(&k, after_revision)).await?;
        let state = WatchState {
            inner: self.inner.clone(),
            kind: kind.to_string(),
            seen: read_at.max(after_revision),
            buffer: replayed.into(),
            rx,
            failed: false,
        };
        Ok(Box::pin(futures::stream::unfold(state, next_event)))
    }
}

struct WatchState {
    inner: Arc<Inner>,
    kind: String,
    /// Every event with a revision at or below this was delivered or skipped.
    seen: u64,
    buffer: VecDeque<WatchEvent>,
    rx: broadcast::Receiver<WatchEvent>,
    failed: bool,
}

async fn next_event(mut st: WatchState) -> Option<(Result<WatchEvent, StoreError>, WatchState)> {
    if st.failed {
        return None;
    }
    loop {
        if let Some(ev) = st.buffer.pop_front() {
            return Some((Ok(ev), st));
        }
        match st.rx.recv().await {
            Ok(ev) => {
                let v = event_versioned(&ev);
                if v.revision <= st.seen {
                    continue;
                }
                st.seen = v.revision;
                if v.key.kind == st.kind {
                    return Some((Ok(ev), st));
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Too slow for the channel: catch up from the durable log.
                let inner = st.inner.clone();
                let kind = st.kind.clone();
                let seen = st.seen;
                match blocking(move || inner.replay(&kind, seen)).await {
                    Ok((events, read_at)) => {
                        st.buffer.extend(events);
                        st.seen = st.seen.max(read_at);
                    }
                    Err(e) => {
                        st.failed = true;
                        return Some((Err(e), st));
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Internal(format!("redb task failed: {e}")))?
}

fn internal(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("redb store {}: {e}", path.display()))
}

fn read_meta(
    meta: &impl ReadableTable<&'static str, u64>,
    name: &str,
    path: &Path,
) -> Result<u64, StoreError> {
    Ok(meta
        .get(name)
        .map_err(|e| internal(path, e))?
        .map(|g| g.value())
        .unwrap_or(0))
}

fn storage_key(key: &Key) -> String {
    format!("{}\0{}\0{}", key.kind, key.namespace, key.name)
}

fn parse_storage_key(s: &str) -> Option<Key> {
    let mut parts = s.splitn(3, '\0');
    Some(Key::new(parts.next()?, parts.next()?, parts.next()?))
}

fn versioned(key: &Key, value: Vec<u8>, revision: u64, create_revision: u64) -> Versioned {
    Versioned {
        key: key.clone(),
        value,
        revision,
        create_revision,
    }
}

fn event_versioned(ev: &WatchEvent) -> &Versioned {
    match ev {
        WatchEvent::Put(v) | WatchEvent::Delete(v) => v,
    }
}

fn event_key(ev: &WatchEvent) -> &Key {
    &event_versioned(ev).key
}

/// Change-log encoding: tag byte (0 put, 1 delete), revision and
/// create_revision as u64 LE, then kind, namespace, name and value, each
/// prefixed by its u32 LE length.
fn encode_event(ev: &WatchEvent) -> Vec<u8> {
    let (tag, v) = match ev {
        WatchEvent::Put(v) => (0u8, v),
        WatchEvent::Delete(v) => (1u8, v),
    };
    let mut out = Vec::with_capacity(32 + v.value.len());
    out.push(tag);
    out.extend_from_slice(&v.revision.to_le_bytes());
    out.extend_from_slice(&v.create_revision.to_le_bytes());
    for part in [
        v.key.kind.as_bytes(),
        v.key.namespace.as_bytes(),
        v.key.name.as_bytes(),
        v.value.as_slice(),
    ] {
        // Parts are far below 4 GiB: values are policy objects.
        out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        out.extend_from_slice(part);
    }
    out
}

fn decode_event(mut b: &[u8]) -> Option<WatchEvent> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (head, tail) = b.split_at(n);
        *b = tail;
        Some(head)
    }
    fn u64_of(b: &mut &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(take(b, 8)?.try_into().ok()?))
    }
    fn part<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
        let n = u32::from_le_bytes(take(b, 4)?.try_into().ok()?) as usize;
        take(b, n)
    }
    let tag = *take(&mut b, 1)?.first()?;
    let revision = u64_of(&mut b)?;
    let create_revision = u64_of(&mut b)?;
    let kind = String::from_utf8(part(&mut b)?.to_vec()).ok()?;
    let namespace = String::from_utf8(part(&mut b)?.to_vec()).ok()?;
    let name = String::from_utf8(part(&mut b)?.to_vec()).ok()?;
    let value = part(&mut b)?.to_vec();
    let v = Versioned {
        key: Key {
            kind,
            namespace,
            name,
        },
        value,
        revision,
        create_revision,
    };
    match tag {
        0 => Some(WatchEvent::Put(v)),
        1 => Some(WatchEvent::Delete(v)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_encoding_round_trips() {
        let v = versioned(&Key::new("repositories", "", "x"), b"{}".to_vec(), 7, 3);
        for ev in [WatchEvent::Put(v.clone()), WatchEvent::Delete(v)] {
            assert_eq!(decode_event(&encode_event(&ev)), Some(ev.clone()));
            let enc = encode_event(&ev);
            assert_eq!(
                decode_event(&enc[..enc.len() - 1]),
                None,
                "truncated entry must not decode"
            );
        }
    }

    #[test]
    fn storage_keys_sort_like_keys() {
        let a = Key::new("k", "a", "z");
        let b = Key::new("k", "a-b", "a");
        assert!(a < b);
        assert!(storage_key(&a) < storage_key(&b));
        assert_eq!(parse_storage_key(&storage_key(&b)), Some(b));
    }
}
