//! The status writer: coalesces what sessions report into store writes,
//! about once a second per cluster, and makes a pass over every cluster and
//! Repository when the desired sets changed. What to write is decided by
//! the pure functions of [`crate::status`]; this module reads, batches and
//! writes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use imgfleet::model::{self, ClusterStatus, DEFAULT_NAMESPACE, Kind, Object};
use tokio_util::sync::CancellationToken;

use crate::desired_cache::{DesiredMap, DesiredSnapshots};
use crate::live::StatusFeed;
use crate::objects::{ObjectError, Objects, revision_of};
use crate::retry::Retry;
use crate::status::{self, LiveCluster};
use crate::store::StoreError;

/// How often the writer looks for due work.
const TICK: Duration = Duration::from_millis(200);
/// How long the desired sets must stay unchanged before the writer makes
/// its pass over every cluster.
const DESIRED_SETTLE: Duration = Duration::from_millis(500);
/// Longest the writer holds back while desired sets keep changing.
const MAX_DEFER: Duration = Duration::from_secs(2);
/// How long the writer trusts its cached Cluster objects.
const STATUS_CACHE_TTL: Duration = Duration::from_secs(30);
/// Above this many uncached clusters one list is cheaper than many gets.
const LIST_ABOVE: usize = 32;

/// The status writer of one replica.
#[derive(Debug)]
pub struct StatusWriter {
    /// Where status is written.
    pub objects: Objects,
    /// The stored desired sets: what each cluster should hold.
    pub desired: DesiredSnapshots,
    /// What sessions reported.
    pub live: StatusFeed,
    /// This replica's id, written as `Cluster.status.hubReplica`.
    pub replica: String,
    /// `--offline-after`: a `lastSeen` fresher than a quarter of it is not
    /// rewritten.
    pub offline_after: Duration,
}

/// What the status writer last read or wrote of each Cluster, so that a
/// heartbeat that changes nothing costs no store access. Refreshed by one
/// list when older than [`STATUS_CACHE_TTL`]; an entry that turns out stale
/// fails its conditional write and is re-read.
#[derive(Default)]
struct StatusCache {
    clusters: HashMap<String, (model::Cluster, u64)>,
    listed: Option<Instant>,
}

impl StatusCache {
    async fn fill(&mut self, objects: &Objects, names: &[String]) -> Result<(), ObjectError> {
        let expired = self.listed.is_none_or(|t| t.elapsed() >= STATUS_CACHE_TTL);
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| !self.clusters.contains_key(*n))
            .collect();
        if expired || missing.len() > LIST_ABOVE {
            let (list, _) = objects.list(Kind::Cluster, None).await?;
            self.clusters.clear();
            for obj in list {
                let rev = revision_of(&obj).unwrap_or(0);
                if let Object::Cluster(c) = obj {
                    let name = c.metadata.name.clone().unwrap_or_default();
                    self.clusters.insert(name, (c, rev));
                }
            }
            self.listed = Some(Instant::now());
            return Ok(());
        }
        for name in missing {
            match objects.get(Kind::Cluster, None, name).await {
                Ok(obj) => {
                    let rev = revision_of(&obj).unwrap_or(0);
                    if let Object::Cluster(c) = obj {
                        self.clusters.insert(name.clone(), (c, rev));
                    }
                }
                Err(ObjectError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Whether `next` differs from `prev` in more than a `lastSeen` that was
/// stored recently enough. Refreshing `lastSeen` on every heartbeat would be
/// a store write per agent every few seconds; the offline sweeper only needs
/// it fresher than `offline_after`.
fn worth_writing(prev: &ClusterStatus, next: &ClusterStatus, refresh: Duration) -> bool {
    if prev == next {
        return false;
    }
    let mut same_but_seen = next.clone();
    same_but_seen.last_seen = prev.last_seen.clone();
    if &same_but_seen != prev {
        return true;
    }
    match (&prev.last_seen, &next.last_seen) {
        (Some(old), Some(new)) => {
            new.0.as_millisecond() - old.0.as_millisecond() >= refresh.as_millis() as i64
        }
        _ => true,
    }
}

impl StatusWriter {
    /// Writes until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry_all = false;
        let mut retry = Retry::new("Writing session status");
        let mut cache = StatusCache::default();
        let mut deferred_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // The full pass waits until the desired sets stop changing:
            // during a fleet-wide change it would otherwise rewrite every
            // Cluster once per tick while the sessions need the CPU. Clusters
            // with a session here are written as their acks arrive anyway.
            let settled = self.desired.settled(DESIRED_SETTLE);
            // While a change is going out, the acks it brings back wait too
            // (at most MAX_DEFER): their status writes would compete with
            // the desired-set writes for the store.
            if !settled {
                let since = *deferred_since.get_or_insert_with(Instant::now);
                if since.elapsed() < MAX_DEFER {
                    continue;
                }
            }
            deferred_since = None;
            let all = (settled && self.desired.take_changed()) || retry_all;
            retry_all = false;
            let due = self.live.take_due(all);
            if !all && due.clusters.is_empty() {
                continue;
            }
            let desired = self.desired.all();
            let clusters = if all {
                // Every cluster the writer knows of or has a desired set
                // for; `fill` lists them all again when its cache has aged.
                let mut names: BTreeSet<String> = cache.clusters.keys().cloned().collect();
                names.extend(desired.keys().cloned());
                names.into_iter().collect()
            } else {
                due.clusters
            };
            let pass = Pass {
                writer: &self,
                desired: &desired,
                live: &due.live,
            };
            let result = pass.flush(&mut cache, &clusters, all || due.images).await;
            match result {
                Ok(()) => retry.succeeded(),
                Err(e) => {
                    // What was due stays due: the next pass covers every
                    // cluster, after a back-off while the store is down.
                    retry_all = true;
                    if !retry.wait_after(&e, &shutdown).await {
                        return;
                    }
                }
            }
        }
    }
}

/// One pass of the writer over some clusters.
struct Pass<'a> {
    writer: &'a StatusWriter,
    desired: &'a DesiredMap,
    live: &'a BTreeMap<String, LiveCluster>,
}

impl Pass<'_> {
    /// Writes Cluster status for `clusters` and, when `repos`, every
    /// Repository's cluster entries and counts.
    async fn flush(
        &self,
        cache: &mut StatusCache,
        clusters: &[String],
        repos: bool,
    ) -> Result<(), ObjectError> {
        self.clusters(cache, clusters).await?;
        if repos {
            self.repositories().await?;
        }
        Ok(())
    }

    fn cluster_status(&self, name: &str, prev: &ClusterStatus) -> ClusterStatus {
        status::cluster_status(
            prev,
            self.desired.get(name).map(|d| d.as_ref()),
            self.live.get(name),
            &self.writer.replica,
        )
    }

    async fn clusters(
        &self,
        cache: &mut StatusCache,
        clusters: &[String],
    ) -> Result<(), ObjectError> {
        let objects = &self.writer.objects;
        cache.fill(objects, clusters).await?;
        let refresh = (self.writer.offline_after / 4).max(Duration::from_secs(1));
        let mut puts = Vec::new();
        let mut written = Vec::new();
        for (i, name) in clusters.iter().enumerate() {
            // A full pass over a large fleet is long; let sessions run
            // between slices of it.
            if i % 256 == 255 {
                tokio::task::yield_now().await;
            }
            let Some((cluster, rev)) = cache.clusters.get(name) else {
                continue;
            };
            let prev = cluster.status.clone().unwrap_or_default();
            let next = self.cluster_status(name, &prev);
            if !worth_writing(&prev, &next, refresh) {
                continue;
            }
            let mut updated = cluster.clone();
            updated.status = Some(next);
            puts.push(objects.status_put(&Object::Cluster(updated.clone()), *rev)?);
            written.push((name.clone(), updated));
        }
        // Batched; a batch that meets a concurrent write (an apply, another
        // replica) is redone one cluster at a time.
        let mut results = Vec::new();
        crate::store::put_batches(objects.store().as_ref(), puts, |range, result| {
            results.push((range, result))
        })
        .await;
        for (range, result) in results {
            let these = &written[range];
            match result {
                Ok(revs) => {
                    for ((name, c), rev) in these.iter().zip(revs) {
                        cache.clusters.insert(name.clone(), (c.clone(), rev));
                    }
                }
                Err(StoreError::Conflict { .. }) | Err(StoreError::NotFound(_)) => {
                    for (name, _) in these {
                        cache.clusters.remove(name);
                        let r = objects
                            .update_status(Kind::Cluster, None, name, |obj| {
                                let Object::Cluster(c) = obj else {
                                    return false;
                                };
                                let prev = c.status.clone().unwrap_or_default();
                                let next = self.cluster_status(name, &prev);
                                if next == prev {
                                    return false;
                                }
                                c.status = Some(next);
                                true
                            })
                            .await;
                        match r {
                            Ok(_) | Err(ObjectError::NotFound(_)) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn repositories(&self) -> Result<(), ObjectError> {
        let objects = &self.writer.objects;
        let live_refs: BTreeMap<String, &LiveCluster> =
            self.live.iter().map(|(k, v)| (k.clone(), v)).collect();
        let (list, _) = objects.list(Kind::Repository, None).await?;
        for obj in list {
            let ns = obj.namespace().unwrap_or(DEFAULT_NAMESPACE).to_string();
            let name = obj.name().to_string();
            let targets = status::targets_of(&ns, &name, self.desired);
            let prefix = status::image_key_prefix(&ns, &name);
            let compute = |obj: &mut Object| {
                let Object::Repository(r) = obj else {
                    return false;
                };
                // Read from the object being written, so that a resolution
                // written in between is counted against.
                let wanted = model::wanted_digests(r);
                let mut st = r.status.clone().unwrap_or_default();
                let (entries, synced, target) = status::repository_clusters(
                    &prefix,
                    &st.clusters,
                    &targets,
                    &wanted,
                    &live_refs,
                );
                if entries == st.clusters
                    && synced == st.synced_clusters
                    && target == st.target_clusters
                {
                    return false;
                }
                st.clusters = entries;
                st.synced_clusters = synced;
                st.target_clusters = target;
                r.status = Some(st);
                true
            };
            let mut probe = obj.clone();
            if !compute(&mut probe) {
                continue;
            }
            match objects
                .update_status(Kind::Repository, Some(&ns), &name, compute)
                .await
            {
                Ok(_) | Err(ObjectError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
