//! The audit trail: one record per change and per denied call, stored in the
//! policy store in the same transaction as the change
//! ([`crate::store::PolicyStore::commit`]), so that no change is ever made
//! without its record and every replica reads the same trail.
//!
//! Records are keyed by namespace (empty for fleet-wide calls) and by time,
//! so a namespace's records are one list and sort by time. A record never
//! holds a secret: a RegistrySecret's new password is "password changed".

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::{Key, PolicyStore, Put, StoreError, Versioned, Write};

/// The store kind of audit records.
pub const KIND: &str = "auditevents";
/// How long records are kept unless `--audit-retention` says otherwise.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);
/// How often old records are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// What became of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Allowed,
    Denied,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }
}

/// One stored record. Never holds a secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub audit_id: String,
    /// Unix nanoseconds.
    pub time_nanos: u64,
    pub user: String,
    #[serde(default)]
    pub groups: Vec<String>,
    pub verb: String,
    pub resource: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    pub outcome: Outcome,
    /// gRPC status code number.
    pub code: i32,
    /// Whether the call changed the store; then the record's own revision is
    /// the resourceVersion after the change.
    #[serde(default)]
    pub changed: bool,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub source: String,
}

/// A record as read back, with the resourceVersion after its change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub record: Record,
    pub resource_version: Option<u64>,
}

/// Who is doing what, known before the outcome.
#[derive(Clone, Debug, Default)]
pub struct Draft {
    pub user: String,
    pub groups: Vec<String>,
    pub verb: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub source: String,
}

impl Draft {
    /// The record's put (a create under a new key): the outcome, the gRPC
    /// code, whether the store changed, and a message without secrets.
    pub fn put(&self, outcome: Outcome, code: i32, changed: bool, message: &str) -> Put {
        let time_nanos = crate::revocation::now_nanos();
        let audit_id = uuid::Uuid::new_v4().to_string();
        let record = Record {
            audit_id: audit_id.clone(),
            time_nanos,
            user: self.user.clone(),
            groups: self.groups.clone(),
            verb: self.verb.clone(),
            resource: self.resource.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            outcome,
            code,
            changed,
            message: message.to_owned(),
            source: self.source.clone(),
        };
        Put {
            key: Key::new(
                KIND,
                self.namespace.as_str(),
                format!("{time_nanos:020}-{audit_id}"),
            ),
            // A record of plain strings and numbers always encodes.
            value: serde_json::to_vec(&record).unwrap_or_default(),
            expected: None,
        }
    }
}

/// Decodes a stored record.
pub fn decode(v: &Versioned) -> Result<Entry, StoreError> {
    let record: Record = serde_json::from_slice(&v.value)
        .map_err(|e| StoreError::Internal(format!("audit record {}: {e}", v.key.name)))?;
    let resource_version = record.changed.then_some(v.revision);
    Ok(Entry {
        record,
        resource_version,
    })
}

/// The records of one namespace (`Some("")` for fleet-wide ones) or all,
/// at or after `since` (Unix nanoseconds), oldest first.
pub async fn read(
    store: &dyn PolicyStore,
    namespace: Option<&str>,
    since_nanos: u64,
) -> Result<Vec<Entry>, StoreError> {
    let (items, _) = store.list(KIND, namespace).await?;
    let mut out = items.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
    out.retain(|e| e.record.time_nanos >= since_nanos);
    out.sort_by_key(|e| e.record.time_nanos);
    Ok(out)
}

/// Whether a record is a change of an object's spec: its creation, or an
/// apply that changed the spec (not only labels, not a status).
fn is_spec_change(r: &Record) -> bool {
    r.outcome == Outcome::Allowed
        && r.changed
        && (r.message == "created" || r.message.starts_with("updated: spec changed"))
}

/// Who made the newest change to each object's spec, by the audit trail,
/// read once per namespace and again only when asked about an object the
/// last read may not cover: 5,000 Repositories resolving for the first time
/// after an upgrade cost one read of their namespace's trail, not 5,000.
#[derive(Clone, Debug, Default)]
pub struct SpecEditors {
    by_namespace: Arc<tokio::sync::Mutex<HashMap<String, EditorIndex>>>,
}

/// One namespace's trail as of a store revision: (resource, name) to user.
#[derive(Debug)]
struct EditorIndex {
    revision: u64,
    users: HashMap<(String, String), String>,
}

impl SpecEditors {
    /// The user whose change of `resource` `namespace`/`name` is the newest
    /// in the trail; `None` when it holds none (pruned, or written before
    /// the trail existed). `seen_at` is the object's resourceVersion as the
    /// caller read it: its spec change, committed with its record, is at or
    /// before it, so a read at that revision or later covers it.
    pub async fn last(
        &self,
        store: &dyn PolicyStore,
        resource: &str,
        namespace: &str,
        name: &str,
        seen_at: u64,
    ) -> Result<Option<String>, StoreError> {
        let mut map = self.by_namespace.lock().await;
        if map.get(namespace).is_none_or(|i| i.revision < seen_at) {
            let (items, revision) = store.list(KIND, Some(namespace)).await?;
            let mut entries = items.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
            entries.sort_by_key(|e| e.record.time_nanos);
            let users = entries
                .into_iter()
                .filter(|e| is_spec_change(&e.record))
                .map(|e| ((e.record.resource, e.record.name), e.record.user))
                .collect();
            map.insert(namespace.to_owned(), EditorIndex { revision, users });
        }
        Ok(map
            .get(namespace)
            .and_then(|i| i.users.get(&(resource.to_owned(), name.to_owned())))
            .cloned())
    }
}

/// Commits a record alone (a denied or failed call, or one that changed
/// nothing).
pub async fn record_alone(store: &dyn PolicyStore, put: Put) -> Result<u64, StoreError> {
    store.commit(Vec::new(), put).await.map(|(_, rev)| rev)
}

/// Deletes records older than `retention`, and records that it did; returns
/// how many went. Several replicas may prune at once: a record another one
/// deleted first is skipped.
pub async fn prune(store: &dyn PolicyStore, retention: Duration) -> Result<usize, StoreError> {
    let cutoff = crate::revocation::now_nanos()
        .saturating_sub(u64::try_from(retention.as_nanos()).unwrap_or(u64::MAX));
    let (items, _) = store.list(KIND, None).await?;
    let old: Vec<&Versioned> = items
        .iter()
        .filter(|v| decode(v).is_ok_and(|e| e.record.time_nanos < cutoff))
        .collect();
    if old.is_empty() {
        return Ok(0);
    }
    let mut removed = 0;
    for chunk in old.chunks(50) {
        let writes: Vec<Write> = chunk
            .iter()
            .map(|v| Write::Delete {
                key: v.key.clone(),
                expected: Some(v.revision),
            })
            .collect();
        let draft = Draft {
            user: "imgfleet-hub".into(),
            verb: "prune".into(),
            resource: "audit".into(),
            ..Draft::default()
        };
        let message = format!(
            "removed {} audit records older than the retention of {}",
            writes.len(),
            imgfleet::model::format_duration(retention)
        );
        match store
            .commit(writes, draft.put(Outcome::Allowed, 0, true, &message))
            .await
        {
            Ok((gone, _)) => removed += gone.len(),
            // Another replica pruned some of them first.
            Err(StoreError::NotFound(_) | StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Prunes once an hour (and once at start) until `shutdown`.
pub async fn run_retention(
    store: Arc<dyn PolicyStore>,
    retention: Duration,
    shutdown: CancellationToken,
) {
    loop {
        match prune(store.as_ref(), retention).await {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "Pruned the audit trail"),
            Err(e) => warn!(error = %e, "Pruning the audit trail failed; retrying later"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
        }
    }
}
