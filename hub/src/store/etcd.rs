//! The etcd policy store: objects under `<prefix>/<kind>/<namespace>/<name>`,
//! revisions are etcd's own, optimistic concurrency through etcd transactions.
//!
//! The empty namespace (cluster-scoped kinds) is stored as the segment `_`,
//! which is not a DNS label, so `<prefix>/<kind>/<namespace>/` prefixes never
//! overlap. Every unary call has a deadline, so a dead etcd answers
//! `Unavailable` instead of hanging the caller.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue,
    PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures::StreamExt;

use super::{
    CLUSTER_SCOPE, Key, PolicyStore, Put, StoreError, Versioned, WatchEvent, WatchStream, Write,
    check_batch, check_key,
};

/// Deadline of one unary etcd call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The etcd store. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    endpoints: Vec<String>,
    timeout: Duration,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl EtcdStore {
    /// Connects to etcd and checks that it answers. `prefix` (e.g. `/imgfleet`)
    /// is where every key lives; a trailing `/` is ignored.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<EtcdStore, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Unavailable(
                "no etcd endpoints given: expected at least one URL like http://127.0.0.1:2379"
                    .into(),
            ));
        }
        let prefix = prefix.trim_end_matches('/').to_string();
        let options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), CALL_TIMEOUT)
            .with_keep_alive_while_idle(true);
        let client = tokio::time::timeout(CALL_TIMEOUT, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!("connecting to etcd {endpoints:?}: timed out"))
            })?
            .map_err(|e| {
                StoreError::Unavailable(format!("connecting to etcd {endpoints:?}: {e}"))
            })?;
        let store = EtcdStore {
            client,
            prefix,
            endpoints: endpoints.to_vec(),
            timeout: CALL_TIMEOUT,
        };
        // Fail at start-up, with the endpoints named, rather than on the first request.
        store.revision().await?;
        Ok(store)
    }

    /// Compacts etcd's history up to `revision` (inclusive of older ones), so
    /// that watches from before it answer `Compacted`. Used by maintenance and tests.
    pub async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        self.call("compact", c.compact(to_i64(revision)?, None))
            .await
            .map(|_| ())
    }

    /// The key prefix this store writes under (without a trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn call<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_err(what, &self.endpoints, e)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd {what} on {:?}: no answer within {:?}",
                self.endpoints, self.timeout
            ))),
        }
    }

    fn etcd_key(&self, key: &Key) -> Result<String, StoreError> {
        check_key(key)?;
        let ns = if key.namespace.is_empty() {
            CLUSTER_SCOPE
        } else {
            key.namespace.as_str()
        };
        Ok(format!("{}/{}/{}/{}", self.prefix, key.kind, ns, key.name))
    }

    fn parse_key(&self, raw: &[u8]) -> Result<Key, StoreError> {
        let bad = || {
            StoreError::Internal(format!(
                "etcd key {:?} is not of the form {}/<kind>/<namespace>/<name>",
                String::from_utf8_lossy(raw),
                self.prefix
            ))
        };
        let s = std::str::from_utf8(raw).map_err(|_| bad())?;
        let rest = s
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(bad)?;
        let mut parts = rest.splitn(3, '/');
        let (kind, ns, name) = match (parts.next(), parts.next(), parts.next()) {
            (Some(k), Some(n), Some(m)) if !k.is_empty() && !m.is_empty() => (k, n, m),
            _ => return Err(bad()),
        };
        let ns = if ns == CLUSTER_SCOPE { "" } else { ns };
        Ok(Key::new(kind, ns, name))
    }

    fn versioned(&self, kv: &KeyValue) -> Result<Versioned, StoreError> {
        Ok(Versioned {
            key: self.parse_key(kv.key())?,
            value: kv.value().to_vec(),
            revision: to_u64(kv.mod_revision()),
            create_revision: to_u64(kv.create_revision()),
        })
    }

    /// After a failed compare: NotFound if the key is gone, else Conflict with
    /// the stored revision.
    fn compare_failure(
        &self,
        key: &Key,
        expected: Option<u64>,
        responses: Vec<TxnOpResponse>,
    ) -> StoreError {
        let actual = responses.into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| to_u64(kv.mod_revision())),
            _ => None,
        });
        match (actual, expected) {
            (Some(actual), Some(expected)) => StoreError::Conflict {
                key: key.clone(),
                expected,
                actual,
            },
            // Present but no revision was expected: only possible in a race
            // with a concurrent create; report it as a conflict on revision 0.
            (Some(actual), None) => StoreError::Conflict {
                key: key.clone(),
                expected: 0,
                actual,
            },
            (None, _) => StoreError::NotFound(key.clone()),
        }
    }

    /// Compares that the key exists and, if given, has `expected` as mod revision.
    fn preconditions(ek: &str, expected: Option<u64>) -> Result<Vec<Compare>, StoreError> {
        let mut cmp = vec![Compare::create_revision(ek, CompareOp::Greater, 0)];
        if let Some(expected) = expected {
            cmp.push(Compare::mod_revision(
                ek,
                CompareOp::Equal,
                to_i64(expected)?,
            ));
        }
        Ok(cmp)
    }
}

/// Keys per page of a list.
const LIST_PAGE: i64 = 1000;

#[async_trait::async_trait]
impl PolicyStore for EtcdStore {
    async fn revision(&self) -> Result<u64, StoreError> {
        let mut c = self.client.clone();
        let resp = self
            .call(
                "get revision",
                c.get(
                    format!("{}/", self.prefix),
                    Some(GetOptions::new().with_count_only()),
                ),
            )
            .await?;
        Ok(resp.header().map_or(0, |h| to_u64(h.revision())))
    }

    async fn get(&self, key: &Key) -> Result<Option<Versioned>, StoreError> {
        let ek = self.etcd_key(key)?;
        let mut c = self.client.clone();
        let resp = self.call("get", c.get(ek, None)).await?;
        resp.kvs().first().map(|kv| self.versioned(kv)).transpose()
    }

    async fn list(
        &self,
        kind: &str,
        namespace: Option<&str>,
    ) -> Result<(Vec<Versioned>, u64), StoreError> {
        let prefix = match namespace {
            Some("") => format!("{}/{kind}/{CLUSTER_SCOPE}/", self.prefix),
            Some(ns) => format!("{}/{kind}/{ns}/", self.prefix),
            None => format!("{}/{kind}/", self.prefix),
        };
        // In pages, all read at the first page's revision: one response for
        // a whole fleet would pass the gRPC message limit (4 MiB, about
        // 8,000 Cluster objects) and hold it all in memory twice.
        let end = prefix_end(prefix.as_bytes());
        let mut start = prefix.into_bytes();
        let mut revision = 0i64;
        let mut out = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let mut c = self.client.clone();
            let resp = self
                .call("list", c.get(start.clone(), Some(options)))
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                out.push(self.versioned(kv)?);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => break,
            }
        }
        let revision = to_u64(revision);
        // etcd sorts by raw key; "_" and "-" sort differently from Key's order.
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok((out, revision))
    }

    async fn create(&self, key: &Key, value: Vec<u8>) -> Result<u64, StoreError> {
        let ek = self.etcd_key(key)?;
        let txn = Txn::new()
            .when([Compare::create_revision(ek.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(ek.as_str(), value, None)]);
        let mut c = self.client.clone();
        let resp = self.call("create", c.txn(txn)).await?;
        if !resp.succeeded() {
            return Err(StoreError::AlreadyExists(key.clone()));
        }
        Ok(resp.header().map_or(0, |h| to_u64(h.revision())))
    }

    async fn update(
        &self,
        key: &Key,
        value: Vec<u8>,
        expected_revision: Option<u64>,
    ) -> Result<u64, StoreError> {
        let ek = self.etcd_key(key)?;
        let txn = Txn::new()
            .when(Self::preconditions(&ek, expected_revision)?)
            .and_then([TxnOp::put(ek.as_str(), value, None)])
            .or_else([TxnOp::get(ek.as_str(), None)]);
        let mut c = self.client.clone();
        let resp = self.call("update", c.txn(txn)).await?;
        if !resp.succeeded() {
            return Err(self.compare_failure(key, expected_revision, resp.op_responses()));
        }
        Ok(resp.header().map_or(0, |h| to_u64(h.revision())))
    }

    async fn put_batch(&self, puts: Vec<Put>) -> Result<Vec<u64>, StoreError> {
        check_batch(&puts, self.batch_limits())?;
        if puts.is_empty() {
            return Ok(Vec::new());
        }
        let mut compares = Vec::with_capacity(puts.len());
        let mut writes = Vec::with_capacity(puts.len());
        let mut reads = Vec::with_capacity(puts.len());
        let mut wanted = Vec::with_capacity(puts.len());
        for put in puts {
            let ek = self.etcd_key(&put.key)?;
            compares.push(match put.expected {
                None => Compare::create_revision(ek.as_str(), CompareOp::Equal, 0),
                Some(r) => Compare::mod_revision(ek.as_str(), CompareOp::Equal, to_i64(r)?),
            });
            writes.push(TxnOp::put(ek.as_str(), put.value, None));
            reads.push(TxnOp::get(
                ek.as_str(),
                Some(GetOptions::new().with_keys_only()),
            ));
            wanted.push((put.key, put.expected));
        }
        let txn = Txn::new().when(compares).and_then(writes).or_else(reads);
        let mut c = self.client.clone();
        let resp = self.call("batch put", c.txn(txn)).await?;
        if resp.succeeded() {
            let revision = resp.header().map_or(0, |h| to_u64(h.revision()));
            return Ok(vec![revision; wanted.len()]);
        }
        // The failure branch read every key: name the first that did not match.
        let actual = resp.op_responses().into_iter().map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| to_u64(kv.mod_revision())),
            _ => None,
        });
        for ((key, expected), actual) in wanted.iter().zip(actual) {
            match (expected, actual) {
                (None, None) => {}
                (Some(e), Some(a)) if *e == a => {}
                (None, Some(_)) => return Err(StoreError::AlreadyExists(key.clone())),
                (Some(_), None) => return Err(StoreError::NotFound(key.clone())),
                (Some(e), Some(a)) => {
                    return Err(StoreError::Conflict {
                        key: key.clone(),
                        expected: *e,
                        actual: a,
                    });
                }
            }
        }
        // Every key matched when read back: it changed and changed back in
        // between. A retry will read it again.
        let (key, expected) = &wanted[0];
        Err(StoreError::Conflict {
            key: key.clone(),
            expected: expected.unwrap_or(0),
            actual: 0,
        })
    }

    /// One etcd transaction: every write and the audit record share its
    /// revision, which is the record's own.
    async fn commit(
        &self,
        writes: Vec<Write>,
        audit: Put,
    ) -> Result<(Vec<Versioned>, u64), StoreError> {
        let n = writes.len() + 1;
        let mut compares = Vec::with_capacity(n);
        let mut ops = Vec::with_capacity(n);
        let mut reads = Vec::with_capacity(n);
        // (key, expected revision, must exist, value put) per write.
        let mut wanted: Vec<(Key, Option<u64>, bool, Option<Vec<u8>>)> = Vec::with_capacity(n);
        let audit_write = Write::Put(Put {
            expected: None,
            ..audit
        });
        for w in writes.into_iter().chain(std::iter::once(audit_write)) {
            let ek = self.etcd_key(w.key())?;
            match w {
                Write::Put(p) => {
                    compares.push(match p.expected {
                        None => Compare::create_revision(ek.as_str(), CompareOp::Equal, 0),
                        Some(r) => Compare::mod_revision(ek.as_str(), CompareOp::Equal, to_i64(r)?),
                    });
                    ops.push(TxnOp::put(
                        ek.as_str(),
                        p.value.clone(),
                        Some(PutOptions::new().with_prev_key()),
                    ));
                    wanted.push((p.key, p.expected, p.expected.is_some(), Some(p.value)));
                }
                Write::Delete { key, expected } => {
                    compares.extend(Self::preconditions(&ek, expected)?);
                    ops.push(TxnOp::delete(
                        ek.as_str(),
                        Some(DeleteOptions::new().with_prev_key()),
                    ));
                    wanted.push((key, expected, true, None));
                }
            }
            reads.push(TxnOp::get(
                ek.as_str(),
                Some(GetOptions::new().with_keys_only()),
            ));
        }
        let txn = Txn::new().when(compares).and_then(ops).or_else(reads);
        let mut c = self.client.clone();
        let resp = self.call("commit", c.txn(txn)).await?;
        let revision = resp.header().map_or(0, |h| to_u64(h.revision()));
        if !resp.succeeded() {
            let actual = resp.op_responses().into_iter().map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| to_u64(kv.mod_revision())),
                _ => None,
            });
            for ((key, expected, must_exist, _), actual) in wanted.iter().zip(actual) {
                match (expected, actual) {
                    (None, None) if !must_exist => {}
                    (None, Some(_)) if !must_exist => {
                        return Err(StoreError::AlreadyExists(key.clone()));
                    }
                    (None, Some(_)) => {}
                    (_, None) => return Err(StoreError::NotFound(key.clone())),
                    (Some(e), Some(a)) if *e == a => {}
                    (Some(e), Some(a)) => {
                        return Err(StoreError::Conflict {
                            key: key.clone(),
                            expected: *e,
                            actual: a,
                        });
                    }
                }
            }
            return Err(StoreError::Conflict {
                key: wanted[0].0.clone(),
                expected: wanted[0].1.unwrap_or(0),
                actual: 0,
            });
        }
        let mut out = Vec::with_capacity(wanted.len());
        let responses = resp.op_responses();
        // The audit record's response is the last; it is not returned.
        for ((key, _, _, value), r) in wanted.into_iter().zip(responses) {
            if out.len() + 1 == n {
                break;
            }
            let v = match (r, value) {
                (TxnOpResponse::Put(p), Some(value)) => Versioned {
                    create_revision: p
                        .prev_key()
                        .map_or(revision, |kv| to_u64(kv.create_revision())),
                    key,
                    value,
                    revision,
                },
                (TxnOpResponse::Delete(d), None) => {
                    let prev = d
                        .prev_kvs()
                        .first()
                        .cloned()
                        .ok_or_else(|| StoreError::NotFound(key.clone()))?;
                    let mut v = self.versioned(&prev)?;
                    v.revision = revision;
                    v
                }
                _ => {
                    return Err(StoreError::Internal(
                        "etcd answered a transaction with other operations than sent".into(),
                    ));
                }
            };
            out.push(v);
        }
        Ok((out, revision))
    }

    async fn delete(
        &self,
        key: &Key,
        expected_revision: Option<u64>,
    ) -> Result<Versioned, StoreError> {
        let ek = self.etcd_key(key)?;
        let txn = Txn::new()
            .when(Self::preconditions(&ek, expected_revision)?)
            .and_then([TxnOp::delete(
                ek.as_str(),
                Some(DeleteOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(ek.as_str(), None)]);
        let mut c = self.client.clone();
        let resp = self.call("delete", c.txn(txn)).await?;
        if !resp.succeeded() {
            return Err(self.compare_failure(key, expected_revision, resp.op_responses()));
        }
        let revision = resp.header().map_or(0, |h| to_u64(h.revision()));
        let prev = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Delete(d) => d.prev_kvs().first().cloned(),
                _ => None,
            })
            .ok_or_else(|| StoreError::NotFound(key.clone()))?;
        let mut v = self.versioned(&prev)?;
        v.revision = revision;
        Ok(v)
    }

    async fn watch(&self, kind: &str, after_revision: u64) -> Result<WatchStream, StoreError> {
        let prefix = format!("{}/{kind}/", self.prefix);
        let options = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(to_i64(after_revision.saturating_add(1))?);
        // etcd 3.4 first confirms a watch on a compacted revision and only then
        // cancels it, so find out up front with a read at the start revision.
        let is_compacted = self.is_compacted(&prefix, after_revision).await?;
        let mut c = self.client.clone();
        let mut stream = self.call("watch", c.watch(prefix, Some(options))).await?;
        // The first message confirms the watch, or says the start revision was compacted.
        let first = self.call("watch", stream.message()).await?;
        match first {
            Some(resp) if resp.compact_revision() > 0 || resp.canceled() => {
                return Err(compacted(
                    after_revision,
                    resp.compact_revision(),
                    resp.cancel_reason(),
                ));
            }
            Some(resp) if resp.created() && is_compacted => {
                // The cancellation that follows names the compaction revision.
                let oldest = match self.call("watch", stream.message()).await {
                    Ok(Some(r)) if r.compact_revision() > 0 => {
                        to_u64(r.compact_revision()).saturating_sub(1)
                    }
                    _ => after_revision.saturating_add(1),
                };
                return Err(StoreError::Compacted {
                    requested: after_revision,
                    oldest,
                });
            }
            Some(resp) if resp.created() => {}
            Some(_) | None => {
                return Err(StoreError::Unavailable(format!(
                    "etcd watch on {:?}: the watch was not created",
                    self.endpoints
                )));
            }
        }
        let this = self.clone();
        let state = (
            this,
            stream,
            std::collections::VecDeque::<WatchEvent>::new(),
            false,
        );
        let events = futures::stream::unfold(
            state,
            move |(this, mut stream, mut buffer, done)| async move {
                if done {
                    return None;
                }
                loop {
                    if let Some(ev) = buffer.pop_front() {
                        return Some((Ok(ev), (this, stream, buffer, false)));
                    }
                    match stream.message().await {
                        Ok(Some(resp)) => {
                            if resp.compact_revision() > 0 {
                                let e = compacted(
                                    after_revision,
                                    resp.compact_revision(),
                                    resp.cancel_reason(),
                                );
                                return Some((Err(e), (this, stream, buffer, true)));
                            }
                            if resp.canceled() {
                                let e = StoreError::Unavailable(format!(
                                    "etcd canceled the watch: {}",
                                    resp.cancel_reason()
                                ));
                                return Some((Err(e), (this, stream, buffer, true)));
                            }
                            for ev in resp.events() {
                                match this.watch_event(ev) {
                                    Ok(ev) => buffer.push_back(ev),
                                    Err(e) => return Some((Err(e), (this, stream, buffer, true))),
                                }
                            }
                        }
                        Ok(None) => {
                            let e = StoreError::Unavailable(format!(
                                "etcd watch stream on {:?} ended",
                                this.endpoints
                            ));
                            return Some((Err(e), (this, stream, buffer, true)));
                        }
                        Err(e) => {
                            let e = map_err("watch", &this.endpoints, e);
                            return Some((Err(e), (this, stream, buffer, true)));
                        }
                    }
                }
            },
        );
        Ok(events.boxed())
    }
}

impl EtcdStore {
    /// True when etcd can no longer replay the history after `after`.
    async fn is_compacted(&self, prefix: &str, after: u64) -> Result<bool, StoreError> {
        let start = after.saturating_add(1);
        if start > self.revision().await? {
            return Ok(false);
        }
        let mut c = self.client.clone();
        let opts = GetOptions::new()
            .with_prefix()
            .with_count_only()
            .with_revision(to_i64(start)?);
        match tokio::time::timeout(self.timeout, c.get(prefix, Some(opts))).await {
            Ok(Ok(_)) => Ok(false),
            Ok(Err(etcd_client::Error::GRpcStatus(s)))
                if s.code() == tonic::Code::OutOfRange && s.message().contains("compacted") =>
            {
                Ok(true)
            }
            Ok(Err(e)) => Err(map_err("watch", &self.endpoints, e)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd watch on {:?}: no answer within {:?}",
                self.endpoints, self.timeout
            ))),
        }
    }

    fn watch_event(&self, ev: &etcd_client::Event) -> Result<WatchEvent, StoreError> {
        let kv = ev
            .kv()
            .ok_or_else(|| StoreError::Internal("etcd watch event without a key".into()))?;
        match ev.event_type() {
            EventType::Put => Ok(WatchEvent::Put(self.versioned(kv)?)),
            EventType::Delete => {
                // The deletion's kv carries only the key and the deletion revision;
                // the last value comes from prev_kv.
                let mut v = match ev.prev_kv() {
                    Some(prev) => self.versioned(prev)?,
                    None => Versioned {
                        key: self.parse_key(kv.key())?,
                        value: Vec::new(),
                        revision: 0,
                        create_revision: 0,
                    },
                };
                v.revision = to_u64(kv.mod_revision());
                Ok(WatchEvent::Delete(v))
            }
        }
    }
}

fn compacted(after: u64, compact_revision: i64, reason: &str) -> StoreError {
    if compact_revision > 0 {
        // etcd can replay from compact_revision itself, so the oldest
        // `after_revision` it accepts is one less.
        StoreError::Compacted {
            requested: after,
            oldest: to_u64(compact_revision).saturating_sub(1),
        }
    } else {
        StoreError::Unavailable(format!("etcd canceled the watch: {reason}"))
    }
}

fn map_err(what: &str, endpoints: &[String], e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s)
            if matches!(
                s.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::OutOfRange
                    | tonic::Code::Unimplemented
                    | tonic::Code::DataLoss
            ) =>
        {
            StoreError::Internal(format!("etcd {what} on {endpoints:?}: {}", s.message()))
        }
        E::GRpcStatus(s) => StoreError::Unavailable(format!(
            "etcd {what} on {endpoints:?}: {:?}: {}",
            s.code(),
            s.message()
        )),
        other => StoreError::Unavailable(format!("etcd {what} on {endpoints:?}: {other}")),
    }
}

/// The first key after every key that starts with `prefix` (etcd's range
/// end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (never for our prefixes): to the end of the key space.
    vec![0]
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v)
        .map_err(|_| StoreError::Internal(format!("revision {v} is out of etcd's range")))
}
