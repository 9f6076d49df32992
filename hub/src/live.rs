//! What this replica's agent sessions know of their clusters right now:
//! written by the sessions as messages arrive, taken by the status writer
//! about once a second per cluster, and read by the offline sweeper (a
//! cluster heard here recently is not offline, whatever the store says).
//!
//! One [`LiveClusters`] table hands out a handle per task, each with the few
//! methods that task needs: [`SessionBook`] for sessions, [`StatusFeed`] for
//! the status writer, [`LastHeard`] for the sweeper, [`FleetView`] for the
//! fleet metrics.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::status::{Held, ImageState, LiveCluster};

/// Most image states kept per session; an agent reporting more is misbehaving.
const MAX_IMAGES: usize = 100_000;
/// Store writes per cluster are coalesced to at most one per this interval.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// The current time as the model writes it (`lastSeen` and the like).
pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// One cluster's entry, owned by its newest session.
struct LiveEntry {
    /// The session that owns the entry; an older session's messages are
    /// ignored once a newer one took over.
    session: u64,
    /// What the agent reported.
    state: LiveCluster,
    /// Cluster status fields changed since the last flush.
    dirty: bool,
    /// Image states changed since the last flush.
    images_dirty: bool,
    /// The session ended: written one last time, then dropped.
    ended: bool,
    /// When the status writer last took this entry.
    last_flush: Option<Instant>,
    /// When the agent was last heard.
    last_heard: Instant,
}

/// The table behind every handle.
#[derive(Default)]
struct Shared {
    /// Entries by cluster name.
    entries: Mutex<HashMap<String, LiveEntry>>,
    /// The next session id; ids only grow.
    next_session: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    fn entries(&self) -> MutexGuard<'_, HashMap<String, LiveEntry>> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The table; hands out one handle per task.
#[derive(Debug, Default)]
pub struct LiveClusters {
    shared: Arc<Shared>,
}

impl LiveClusters {
    /// The sessions' handle.
    pub fn sessions(&self) -> SessionBook {
        SessionBook(self.shared.clone())
    }

    /// The status writer's handle.
    pub fn status_feed(&self) -> StatusFeed {
        StatusFeed(self.shared.clone())
    }

    /// The sweeper's handle.
    pub fn last_heard(&self) -> LastHeard {
        LastHeard(self.shared.clone())
    }

    /// The fleet metrics' handle.
    pub fn fleet(&self) -> FleetView {
        FleetView(self.shared.clone())
    }
}

/// How a session names itself to the table: its cluster and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionId {
    pub cluster: String,
    id: u64,
}

/// What sessions record.
#[derive(Debug, Clone)]
pub struct SessionBook(Arc<Shared>);

impl SessionBook {
    /// A new session of `cluster` takes over its entry.
    pub fn open(&self, cluster: &str, state: LiveCluster) -> SessionId {
        let id = self.0.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        self.0.entries().insert(
            cluster.to_string(),
            LiveEntry {
                session: id,
                state,
                dirty: true,
                images_dirty: true,
                ended: false,
                last_flush: None,
                last_heard: Instant::now(),
            },
        );
        SessionId {
            cluster: cluster.to_string(),
            id,
        }
    }

    /// Changes the session's entry, unless a newer session of the cluster
    /// took it over; every message counts as hearing from the agent.
    fn update(&self, s: &SessionId, f: impl FnOnce(&mut LiveEntry)) {
        if let Some(e) = self
            .0
            .entries()
            .get_mut(&s.cluster)
            .filter(|e| e.session == s.id)
        {
            e.last_heard = Instant::now();
            e.state.last_seen = Some(now());
            f(e);
        }
    }

    /// The agent was heard, with nothing to write.
    pub fn heard(&self, s: &SessionId) {
        self.update(s, |_| {});
    }

    /// The agent sent a heartbeat: its `lastSeen` is worth writing.
    pub fn heartbeat(&self, s: &SessionId) {
        self.update(s, |e| e.dirty = true);
    }

    /// The agent applied `generation`.
    pub fn acked(&self, s: &SessionId, generation: u64) {
        self.update(s, |e| {
            e.state.applied_generation = generation;
            e.dirty = true;
        });
    }

    /// The agent reported storage (`(used, capacity)` bytes), its store's
    /// whole inventory (`None`: unchanged) and image progress, each image
    /// by key.
    pub fn progress(
        &self,
        s: &SessionId,
        storage: Option<(u64, u64)>,
        held: Option<Held>,
        images: impl IntoIterator<Item = (String, ImageState)>,
    ) {
        self.update(s, |e| {
            if let Some((used, capacity)) = storage {
                e.state.storage_used_bytes = used;
                e.state.storage_capacity_bytes = capacity;
            }
            if let Some(held) = held {
                e.state.held = Some(Arc::new(held));
            }
            for (key, state) in images {
                if e.state.images.len() >= MAX_IMAGES && !e.state.images.contains_key(&key) {
                    continue;
                }
                e.state.images.insert(key, state);
            }
            e.dirty = true;
            e.images_dirty = true;
        });
    }

    /// The session ended: its entry is written once more, then dropped.
    pub fn end(&self, s: &SessionId) {
        if let Some(e) = self
            .0
            .entries()
            .get_mut(&s.cluster)
            .filter(|e| e.session == s.id)
        {
            e.ended = true;
        }
    }
}

/// What the status writer takes from the table in one pass.
#[derive(Debug, Default)]
pub struct Due {
    /// Clusters whose entry changed (or ended) and was not flushed within
    /// [`FLUSH_INTERVAL`].
    pub clusters: Vec<String>,
    /// Whether any of them reported images (so Repositories need a pass).
    pub images: bool,
    /// What the pass reads: every entry when `every` was asked for or
    /// images are due, else only the due clusters'.
    pub live: BTreeMap<String, LiveCluster>,
}

/// What the status writer takes.
#[derive(Debug, Clone)]
pub struct StatusFeed(Arc<Shared>);

impl StatusFeed {
    /// Takes what is due (marking it flushed) and drops ended entries.
    /// `every`: the pass covers every cluster, so copy every entry.
    pub fn take_due(&self, every: bool) -> Due {
        let mut map = self.0.entries();
        let mut due = Due::default();
        for (name, e) in map.iter_mut() {
            let ready = e.last_flush.is_none_or(|t| t.elapsed() >= FLUSH_INTERVAL);
            if (e.dirty || e.images_dirty) && ready || e.ended {
                due.clusters.push(name.clone());
                due.images |= e.images_dirty || e.ended;
                e.dirty = false;
                e.images_dirty = false;
                e.last_flush = Some(Instant::now());
            }
        }
        // Copy only what this pass reads.
        due.live = if every || due.images {
            map.iter()
                .map(|(k, v)| (k.clone(), v.state.clone()))
                .collect()
        } else {
            due.clusters
                .iter()
                .filter_map(|k| map.get(k).map(|v| (k.clone(), v.state.clone())))
                .collect()
        };
        map.retain(|_, e| !e.ended);
        due
    }
}

/// What the sweeper reads.
#[derive(Debug, Clone)]
pub struct LastHeard(Arc<Shared>);

impl LastHeard {
    /// How long ago each cluster with a live session here was heard.
    pub fn ago(&self) -> HashMap<String, Duration> {
        self.0
            .entries()
            .iter()
            .filter(|(_, e)| !e.ended)
            .map(|(k, e)| (k.clone(), e.last_heard.elapsed()))
            .collect()
    }
}

/// What the fleet metrics read.
#[derive(Debug, Clone)]
pub struct FleetView(Arc<Shared>);

impl FleetView {
    /// A summary of each cluster with a live session here, made under the
    /// lock so that no image table is copied.
    pub fn summaries(&self) -> BTreeMap<String, crate::fleet::ClusterSummary> {
        self.0
            .entries()
            .iter()
            .filter(|(_, e)| !e.ended)
            .map(|(k, e)| (k.clone(), crate::fleet::summarize(&e.state)))
            .collect()
    }
}
