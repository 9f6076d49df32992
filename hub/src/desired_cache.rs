//! The desired-set cache: every stored desired set, kept equal to the store
//! by one [`Watcher`], and handed to this replica's agent sessions through
//! one channel per cluster.
//!
//! Sessions learn about changes only from the stored sets, never from the
//! controller directly, so a change computed by one hub replica reaches
//! agents connected to any replica. The controller of this replica still
//! hands over what it wrote ([`Handoff`]) so its own sessions need not wait
//! for the watch; the watch then finds those sets in their channels and
//! reuses them instead of decoding them again.
//!
//! Each task gets a handle with the few methods it needs, all over one
//! [`Shared`]: sessions a [`DesiredSets`], the status writer a
//! [`DesiredSnapshots`], the controller a [`Handoff`]. The cache itself
//! ([`DesiredCache::run`]) is the only writer besides the handoff.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::desired::{self, DESIRED_KIND, StoredDesiredSet};
use crate::retry::Retry;
use crate::store::watcher::{Event, Watcher, recover};
use crate::store::{PolicyStore, Versioned};

/// Every stored desired set by cluster name.
pub type DesiredMap = Arc<BTreeMap<String, Arc<StoredDesiredSet>>>;
/// One cluster's stored desired set, `None` while it has none.
pub type ClusterDesired = Option<Arc<StoredDesiredSet>>;

/// A burst of at least this many changes is logged with how long it took.
const LOGGED_BURST: usize = 100;

/// The state behind every handle.
struct Shared {
    /// Every stored desired set, `None` until the first list: the status
    /// writer's view, and what a new session waits for.
    all: watch::Sender<Option<DesiredMap>>,
    /// Each cluster's stored desired set, so that a change wakes only the
    /// session of that cluster (a fleet-wide change is one wake-up per
    /// session, not one per session per changed cluster).
    per_cluster: Mutex<HashMap<String, watch::Sender<ClusterDesired>>>,
    /// Set whenever the sets change; the status writer takes it to decide
    /// on a pass over every cluster.
    changed: AtomicBool,
    /// When the sets last changed, for the status writer's debounce.
    changed_at: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    fn per_cluster(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<ClusterDesired>>> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.per_cluster
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets one cluster's stored desired set; its session wakes only when
    /// the generation changed. Unless `relist`, a set never replaces a newer
    /// generation: the controller hands its sets over before the store's
    /// watch delivers them, and an older event still in flight must not
    /// take an agent back.
    fn set_cluster(
        map: &mut HashMap<String, watch::Sender<ClusterDesired>>,
        cluster: &str,
        set: ClusterDesired,
        relist: bool,
    ) {
        let tx = match map.get(cluster) {
            Some(tx) => tx,
            None => map
                .entry(cluster.to_string())
                .or_insert_with(|| watch::Sender::new(None)),
        };
        tx.send_if_modified(|cur| {
            let take = match (cur.as_ref(), set.as_ref()) {
                (Some(a), Some(b)) if relist => a.generation != b.generation,
                (Some(a), Some(b)) => b.generation > a.generation,
                (None, None) => false,
                _ => true,
            };
            if take {
                *cur = set;
            }
            take
        });
    }

    /// The set a cluster's channel holds if it is of `generation`.
    fn held_set(&self, cluster: &str, generation: u64) -> ClusterDesired {
        self.per_cluster()
            .get(cluster)
            .and_then(|tx| tx.borrow().clone())
            .filter(|s| s.generation == generation)
    }

    fn publish(&self, map: &BTreeMap<String, Arc<StoredDesiredSet>>) {
        self.all.send_replace(Some(Arc::new(map.clone())));
        self.changed.store(true, Ordering::SeqCst);
        if let Ok(mut at) = self.changed_at.lock() {
            *at = Some(Instant::now());
        }
    }
}

/// The sessions' handle: one cluster's channel, and readiness.
#[derive(Debug, Clone)]
pub struct DesiredSets {
    shared: Arc<Shared>,
}

impl DesiredSets {
    /// The channel of one cluster's stored desired set.
    pub fn subscribe(&self, cluster: &str) -> watch::Receiver<ClusterDesired> {
        self.shared
            .per_cluster()
            .entry(cluster.to_string())
            .or_insert_with(|| watch::Sender::new(None))
            .subscribe()
    }

    /// Waits up to `limit` for the first list of the stored sets; false if
    /// it did not come (the hub is still starting).
    pub async fn ready(&self, limit: Duration) -> bool {
        let mut rx = self.shared.all.subscribe();
        matches!(
            tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await,
            Ok(Ok(_))
        )
    }
}

/// The status writer's handle: every set at once, and whether they changed.
#[derive(Debug, Clone)]
pub struct DesiredSnapshots {
    shared: Arc<Shared>,
}

impl DesiredSnapshots {
    /// Every stored desired set (empty before the first list).
    pub fn all(&self) -> DesiredMap {
        self.shared.all.borrow().clone().unwrap_or_default()
    }

    /// True when the sets did not change for `quiet`.
    pub fn settled(&self, quiet: Duration) -> bool {
        self.shared
            .changed_at
            .lock()
            .ok()
            .and_then(|at| *at)
            .is_none_or(|at| at.elapsed() >= quiet)
    }

    /// Whether the sets changed since the last call.
    pub fn take_changed(&self) -> bool {
        self.shared.changed.swap(false, Ordering::SeqCst)
    }
}

/// The controller's handle: the sets it stored, for this replica's sessions
/// before the store's watch brings them.
#[derive(Debug, Clone)]
pub struct Handoff {
    shared: Arc<Shared>,
}

impl Handoff {
    /// Hands over sets just stored.
    pub fn written(&self, sets: &[(String, Arc<StoredDesiredSet>)]) {
        let mut channels = self.shared.per_cluster();
        for (name, set) in sets {
            Shared::set_cluster(&mut channels, name, Some(set.clone()), false);
        }
    }
}

/// The task that keeps the cache equal to the store.
#[derive(Debug)]
pub struct DesiredCache {
    shared: Arc<Shared>,
}

impl Default for DesiredCache {
    fn default() -> Self {
        Self::new()
    }
}

impl DesiredCache {
    pub fn new() -> DesiredCache {
        DesiredCache {
            shared: Arc::new(Shared {
                all: watch::Sender::new(None),
                per_cluster: Mutex::new(HashMap::new()),
                changed: AtomicBool::new(false),
                changed_at: Mutex::new(None),
            }),
        }
    }

    /// The handle for sessions.
    pub fn sets(&self) -> DesiredSets {
        DesiredSets {
            shared: self.shared.clone(),
        }
    }

    /// The handle for the status writer.
    pub fn snapshots(&self) -> DesiredSnapshots {
        DesiredSnapshots {
            shared: self.shared.clone(),
        }
    }

    /// The handle for the controller.
    pub fn handoff(&self) -> Handoff {
        Handoff {
            shared: self.shared.clone(),
        }
    }

    /// Follows the stored desired sets until `shutdown`.
    pub async fn run(self, store: Arc<dyn PolicyStore>, shutdown: CancellationToken) {
        let mut watcher = Watcher::new(store, DESIRED_KIND);
        let mut retry = Retry::new("Watching desired sets");
        let mut map: BTreeMap<String, Arc<StoredDesiredSet>> = BTreeMap::new();
        loop {
            let mut next = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = watcher.next() => n,
            };
            // Take every event that is already there before publishing the
            // whole map: a fleet-wide change arrives as thousands of events.
            let burst_start = Instant::now();
            let mut burst = 0usize;
            let failed = loop {
                match next {
                    Ok(Event::Listed { items, .. }) => {
                        self.relisted(&mut map, &items);
                        // The next step opens a watch: publish first.
                        break None;
                    }
                    Ok(Event::Put(v)) => self.put(&mut map, v),
                    Ok(Event::Delete(v)) => {
                        Shared::set_cluster(
                            &mut self.shared.per_cluster(),
                            &v.key.name,
                            None,
                            false,
                        );
                        map.remove(&v.key.name);
                    }
                    Err(e) => break Some(e),
                }
                burst += 1;
                // Unconstrained: tokio's cooperative budget would otherwise
                // end the drain every 128 events and publish the whole map
                // each time.
                match tokio::task::unconstrained(watcher.next()).now_or_never() {
                    Some(n) => next = n,
                    None => break None,
                }
            };
            match failed {
                None => {
                    self.shared.publish(&map);
                    retry.succeeded();
                }
                Some(e) => {
                    if burst > 0 {
                        self.shared.publish(&map);
                    }
                    if !recover(&mut watcher, e, &mut retry, &shutdown).await {
                        return;
                    }
                }
            }
            if burst >= LOGGED_BURST {
                info!(
                    changes = burst,
                    elapsed_ms = burst_start.elapsed().as_millis(),
                    "Desired sets handed to sessions"
                );
            }
        }
    }

    /// A (re)list: the map and every channel become what the store holds.
    fn relisted(&self, map: &mut BTreeMap<String, Arc<StoredDesiredSet>>, items: &[Versioned]) {
        map.clear();
        for v in items {
            match desired::decode(&v.key.name, &v.value) {
                Ok(s) => {
                    map.insert(v.key.name.clone(), Arc::new(s));
                }
                Err(e) => warn!(error = %e, "Skipping an unreadable desired set"),
            }
        }
        let mut channels = self.shared.per_cluster();
        for (name, set) in map.iter() {
            Shared::set_cluster(&mut channels, name, Some(set.clone()), true);
        }
        for (name, tx) in channels.iter() {
            if !map.contains_key(name) {
                tx.send_replace(None);
            }
        }
    }

    fn put(&self, map: &mut BTreeMap<String, Arc<StoredDesiredSet>>, v: Versioned) {
        // Sets this replica wrote are already in their channel: reuse them
        // instead of decoding again.
        let known =
            desired::peek_generation(&v.value).and_then(|g| self.shared.held_set(&v.key.name, g));
        let decoded = match known {
            Some(s) => Ok(s),
            None => desired::decode(&v.key.name, &v.value).map(Arc::new),
        };
        match decoded {
            Ok(s) => {
                Shared::set_cluster(
                    &mut self.shared.per_cluster(),
                    &v.key.name,
                    Some(s.clone()),
                    false,
                );
                map.insert(v.key.name.clone(), s);
            }
            Err(e) => warn!(error = %e, "Skipping an unreadable desired set"),
        }
    }
}
