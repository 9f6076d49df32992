//! The revocation list, in the policy store so that every replica enforces
//! it: per user and per cluster, the time before which every certificate
//! issued to that name is refused.
//!
//! A time rather than a list of serial numbers, because "every certificate
//! issued to NAME so far" must include ones the hub never recorded (issued
//! before an upgrade). A certificate's issue time comes from its serial
//! ([`imgfleet_common::pki::CertFacts::issued_at_nanos`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::store::{Key, PolicyStore, Put, StoreError};

/// The store kind of user revocations.
pub const USER_KIND: &str = "userrevocations";
/// The store kind of cluster revocations; sessions watch it.
pub const CLUSTER_KIND: &str = "clusterrevocations";

/// Whose certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    User(String),
    Cluster(String),
}

impl Revoked {
    pub fn key(&self) -> Key {
        match self {
            Revoked::User(n) => Key::new(USER_KIND, "", n.as_str()),
            Revoked::Cluster(n) => Key::new(CLUSTER_KIND, "", n.as_str()),
        }
    }
}

/// The stored record.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// Certificates issued at or before this time (Unix nanoseconds) are refused.
    pub revoked_before_nanos: u64,
}

impl Record {
    /// Whether a certificate issued at `issued_at_nanos` is revoked.
    pub fn refuses(&self, issued_at_nanos: i128) -> bool {
        issued_at_nanos <= i128::from(self.revoked_before_nanos)
    }

    pub fn decode(value: &[u8]) -> Result<Record, StoreError> {
        serde_json::from_slice(value)
            .map_err(|e| StoreError::Internal(format!("revocation record unreadable: {e}")))
    }
}

/// Now, in Unix nanoseconds.
pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Reads and writes the revocation list.
#[derive(Clone)]
pub struct Revocations {
    store: Arc<dyn PolicyStore>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations").finish_non_exhaustive()
    }
}

impl Revocations {
    pub fn new(store: Arc<dyn PolicyStore>) -> Self {
        Self { store }
    }

    /// The record of `who`, if revoked.
    pub async fn get(&self, who: &Revoked) -> Result<Option<Record>, StoreError> {
        match self.store.get(&who.key()).await? {
            Some(v) => Record::decode(&v.value).map(Some),
            None => Ok(None),
        }
    }

    /// Whether a certificate of `who` issued at `issued_at_nanos` is refused.
    pub async fn refuses(&self, who: &Revoked, issued_at_nanos: i128) -> Result<bool, StoreError> {
        Ok(self
            .get(who)
            .await?
            .is_some_and(|r| r.refuses(issued_at_nanos)))
    }

    /// The write that revokes every certificate of `who` issued until now,
    /// for the caller to commit (with its audit record).
    pub async fn revoke_put(&self, who: &Revoked) -> Result<(Put, Record), StoreError> {
        let key = who.key();
        let current = self.store.get(&key).await?;
        let record = Record {
            revoked_before_nanos: now_nanos(),
        };
        let value = serde_json::to_vec(&record)
            .map_err(|e| StoreError::Internal(format!("encoding a revocation: {e}")))?;
        Ok((
            Put {
                key,
                value,
                expected: current.map(|v| v.revision),
            },
            record,
        ))
    }
}

/// Every cluster's revocation, as the sessions of this replica follow it.
pub type ClusterRevocations = Arc<std::collections::BTreeMap<String, Record>>;

/// Follows the cluster revocations in the store (list, then watch) and
/// publishes the whole map on every change, so each live session can end
/// itself when its certificate is revoked, on whichever replica the revoke
/// was made. Returns the receiver and the task to run until shutdown.
pub fn follow_clusters(
    store: Arc<dyn PolicyStore>,
    shutdown: tokio_util::sync::CancellationToken,
) -> (
    tokio::sync::watch::Receiver<ClusterRevocations>,
    impl std::future::Future<Output = ()> + Send,
) {
    let (tx, rx) = tokio::sync::watch::channel(ClusterRevocations::default());
    let run = async move {
        use crate::store::watcher::{Event, Watcher, recover};
        let mut watcher = Watcher::new(store, CLUSTER_KIND);
        let mut retry = crate::retry::Retry::new("Watching cluster revocations");
        let mut map = std::collections::BTreeMap::new();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = watcher.next() => n,
            };
            match next {
                Ok(Event::Listed { items, .. }) => {
                    map = items
                        .iter()
                        .filter_map(|v| Some((v.key.name.clone(), Record::decode(&v.value).ok()?)))
                        .collect();
                }
                Ok(Event::Put(v)) => {
                    if let Ok(r) = Record::decode(&v.value) {
                        map.insert(v.key.name.clone(), r);
                    }
                }
                Ok(Event::Delete(v)) => {
                    map.remove(&v.key.name);
                }
                Err(e) => {
                    if !recover(&mut watcher, e, &mut retry, &shutdown).await {
                        return;
                    }
                    continue;
                }
            }
            retry.succeeded();
            tx.send_replace(Arc::new(map.clone()));
        }
    };
    (rx, run)
}
