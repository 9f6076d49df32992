//! Status aggregation: pure functions from desired sets, the latest progress
//! agents reported and whether clusters are connected, to the status fields
//! the hub owns (`Repository.status.clusters/syncedClusters/targetClusters`
//! and `Cluster.status`). The status writer and the sweeper do the I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use imgfleet::model::{
    ClusterImageStatus, ClusterPhase, ClusterStatus, HeldRepository, ImagePhase, holds_all,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::desired::StoredDesiredSet;

/// The latest reported state of one image on one cluster.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImageState {
    pub digest: String,
    pub phase: Option<ImagePhase>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub layers_done: u32,
    pub layers_total: u32,
    pub message: Option<String>,
    pub updated_at: Option<Time>,
    pub next_retry_time: Option<Time>,
    /// Failed attempts in a row the agent reported; 0 after a success.
    pub attempts: u32,
}

/// The images an agent's store holds, as it last reported them: what
/// `Cluster.status.held` says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Held {
    /// Per (registry, repository), at most `MAX_HELD` digests in all.
    pub repositories: Vec<HeldRepository>,
    /// The agent (or the hub, at `MAX_HELD`) left some digests out.
    pub truncated: bool,
}

/// What a live session knows about its cluster.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LiveCluster {
    pub last_seen: Option<Time>,
    pub agent_version: String,
    pub storage_used_bytes: u64,
    pub storage_capacity_bytes: u64,
    pub applied_generation: u64,
    /// Latest state per image key (`<namespace>/<name>@<digest>`).
    pub images: BTreeMap<String, ImageState>,
    /// The store's inventory, once the agent sent one in this session;
    /// `None` keeps what the Cluster's status says. Shared, since the status
    /// writer copies live entries on every pass.
    pub held: Option<std::sync::Arc<Held>>,
}

/// The (cluster -> digests with image keys) of one repository, from all desired sets.
pub fn targets_of<S: std::borrow::Borrow<StoredDesiredSet>>(
    repo_ns: &str,
    repo_name: &str,
    desired: &BTreeMap<String, S>,
) -> BTreeMap<String, Vec<(String, String)>> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (cluster, set) in desired {
        for img in &set.borrow().content.images {
            if img.source_namespace == repo_ns && img.source_name == repo_name {
                out.entry(cluster.clone())
                    .or_default()
                    .push((img.digest.clone(), img.key.clone()));
            }
        }
    }
    out
}

/// The prefix of every image key of Repository `namespace/name` (see
/// `DesiredImage.key`).
pub fn image_key_prefix(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}@")
}

fn pending(cluster: &str, digest: &str) -> ClusterImageStatus {
    ClusterImageStatus {
        cluster: cluster.to_string(),
        digest: digest.to_string(),
        phase: Some(ImagePhase::Pending),
        ..Default::default()
    }
}

fn entry_from(cluster: &str, digest: &str, s: &ImageState) -> ClusterImageStatus {
    ClusterImageStatus {
        cluster: cluster.to_string(),
        digest: digest.to_string(),
        phase: s.phase.or(Some(ImagePhase::Pending)),
        bytes_done: s.bytes_done,
        bytes_total: s.bytes_total,
        layers_done: s.layers_done,
        layers_total: s.layers_total,
        last_sync_time: s.updated_at.clone(),
        message: s.message.clone().filter(|m| !m.is_empty()),
        next_retry_time: s.next_retry_time.clone(),
        last_known: false,
        held_digests: Vec::new(),
    }
}

/// The digests of one Repository a live cluster reported as servable.
fn held_by(live: &LiveCluster, key_prefix: &str) -> Vec<String> {
    let held: BTreeSet<&str> = live
        .images
        .range(key_prefix.to_string()..)
        .take_while(|(k, _)| k.starts_with(key_prefix))
        .filter(|(_, s)| s.phase == Some(ImagePhase::Synced))
        .map(|(k, s)| {
            if s.digest.is_empty() {
                &k[key_prefix.len()..]
            } else {
                s.digest.as_str()
            }
        })
        .collect();
    held.into_iter().map(str::to_string).collect()
}

/// Most per-cluster entries a Repository's status lists. A fleet of ten
/// thousand clusters would otherwise make the object megabytes long, over
/// etcd's request limit; `syncedClusters`/`targetClusters` still count all.
pub const MAX_CLUSTER_ENTRIES: usize = 1000;

/// The new `clusters[]` of a repository plus (synced, target) counts.
///
/// - One entry per (targeted cluster, desired digest); entries of clusters or
///   digests no longer desired are dropped.
/// - Clusters with a live session here (`live`) take their entries from the
///   reported progress (Pending when nothing was reported yet), and each
///   entry lists the digests of the repository (keys under `key_prefix`)
///   the cluster reported as servable: during a version change, the old one.
/// - Other clusters keep their existing entries (another replica, or the
///   offline sweeper, owns them), or Pending when there is none.
/// - A cluster counts as synced only when it reported as servable every
///   digest in `wanted` (what the repository resolves to now, which the
///   desired sets may not show yet), and the entries are current (not
///   `lastKnown`): the status never claims what the edge does not hold.
pub fn repository_clusters(
    key_prefix: &str,
    existing: &[ClusterImageStatus],
    targets: &BTreeMap<String, Vec<(String, String)>>,
    wanted: &[String],
    live: &BTreeMap<String, &LiveCluster>,
) -> (Vec<ClusterImageStatus>, u32, u32) {
    let by_key: HashMap<(&str, &str), &ClusterImageStatus> = existing
        .iter()
        .map(|e| ((e.cluster.as_str(), e.digest.as_str()), e))
        .collect();
    let mut out = Vec::new();
    let mut synced = 0u32;
    for (cluster, digests) in targets {
        let first = out.len();
        let held = live.get(cluster).map(|l| held_by(l, key_prefix));
        for (digest, key) in digests {
            let entry = match (live.get(cluster), &held) {
                (Some(l), Some(held)) => {
                    let mut e = l
                        .images
                        .get(key)
                        .map(|s| entry_from(cluster, digest, s))
                        .unwrap_or_else(|| pending(cluster, digest));
                    e.held_digests = held.clone();
                    e
                }
                _ => by_key
                    .get(&(cluster.as_str(), digest.as_str()))
                    .map(|e| (*e).clone())
                    .unwrap_or_else(|| pending(cluster, digest)),
            };
            out.push(entry);
        }
        if holds_all(&out[first..], wanted) {
            synced += 1;
        }
    }
    out.sort_by(|a, b| (&a.cluster, &a.digest).cmp(&(&b.cluster, &b.digest)));
    out.dedup_by(|b, a| a.cluster == b.cluster && a.digest == b.digest);
    if out.len() > MAX_CLUSTER_ENTRIES {
        // Keep what needs attention: entries not synced first (a stable sort
        // keeps cluster order within each group). The counts cover all.
        out.sort_by_key(|e| e.phase == Some(ImagePhase::Synced) && !e.last_known);
        out.truncate(MAX_CLUSTER_ENTRIES);
        out.sort_by(|a, b| (&a.cluster, &a.digest).cmp(&(&b.cluster, &b.digest)));
    }
    (out, synced, targets.len() as u32)
}

/// Flags a cluster's entries as last known (the cluster went offline).
pub fn mark_last_known(entries: &mut [ClusterImageStatus], cluster: &str) -> bool {
    let mut changed = false;
    for e in entries.iter_mut().filter(|e| e.cluster == cluster) {
        changed |= !e.last_known;
        e.last_known = true;
    }
    changed
}

/// Recounts synced clusters after entries or the wanted digests changed (a
/// cluster flagged last known, a tag resolved to a new digest), by the rule
/// of [`repository_clusters`].
pub fn count_synced(entries: &[ClusterImageStatus], wanted: &[String]) -> u32 {
    let mut by_cluster: BTreeMap<&str, Vec<&ClusterImageStatus>> = BTreeMap::new();
    for e in entries {
        by_cluster.entry(e.cluster.as_str()).or_default().push(e);
    }
    by_cluster
        .values()
        .filter(|mine| holds_all(mine.iter().copied(), wanted))
        .count() as u32
}

/// The new `Cluster.status`: desired fields from the stored desired set,
/// session fields from the live session when there is one here (else kept).
pub fn cluster_status(
    prev: &ClusterStatus,
    desired: Option<&StoredDesiredSet>,
    live: Option<&LiveCluster>,
    replica: &str,
) -> ClusterStatus {
    let mut s = prev.clone();
    if let Some(d) = desired {
        s.desired_generation = d.generation;
        s.images_desired = d.content.images.len() as u32;
    }
    if let Some(l) = live {
        s.phase = Some(ClusterPhase::Connected);
        s.last_seen = l.last_seen.clone().or(s.last_seen);
        s.agent_version = Some(l.agent_version.clone()).filter(|v| !v.is_empty());
        s.storage_used_bytes = l.storage_used_bytes;
        s.storage_capacity_bytes = l.storage_capacity_bytes;
        s.applied_generation = l.applied_generation;
        s.hub_replica = Some(replica.to_string());
        // Until the agent reports its inventory, the last one stored stands:
        // it is still the best knowledge of what the cluster holds.
        if let Some(held) = &l.held {
            s.held.clone_from(&held.repositories);
            s.held_truncated = held.truncated;
        }
        s.images_synced = match desired {
            Some(d) => d
                .content
                .images
                .iter()
                .filter(|i| {
                    l.images
                        .get(&i.key)
                        .is_some_and(|st| st.phase == Some(ImagePhase::Synced))
                })
                .count() as u32,
            None => 0,
        };
    }
    s
}

/// Whether a cluster last seen at `last_seen` is overdue at `now`. A stored
/// `lastSeen` has whole seconds only (RFC 3339 as Kubernetes writes it), so a
/// second of slack keeps a cluster from being marked Offline early.
pub fn is_overdue(
    last_seen: Option<&Time>,
    now: &Time,
    offline_after: std::time::Duration,
) -> bool {
    match last_seen {
        None => true,
        Some(t) => {
            let silent = now.0.as_millisecond() - t.0.as_millisecond();
            silent >= offline_after.as_millis() as i64 + 1000
        }
    }
}

/// `Cluster.status` once the cluster is offline: everything else is kept as last known.
pub fn offline_status(prev: &ClusterStatus) -> ClusterStatus {
    let mut s = prev.clone();
    s.phase = Some(ClusterPhase::Offline);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{DesiredImage, DesiredSetContent};

    fn img(ns: &str, name: &str, digest: &str) -> DesiredImage {
        DesiredImage {
            key: format!("{ns}/{name}@{digest}"),
            source_namespace: ns.into(),
            source_name: name.into(),
            digest: digest.into(),
            ..Default::default()
        }
    }

    fn set(generation: u64, images: Vec<DesiredImage>) -> StoredDesiredSet {
        StoredDesiredSet {
            generation,
            content: DesiredSetContent {
                images,
                registries: vec![],
            },
        }
    }

    fn state(phase: ImagePhase, digest: &str) -> ImageState {
        ImageState {
            digest: digest.into(),
            phase: Some(phase),
            bytes_done: 5,
            bytes_total: 10,
            ..Default::default()
        }
    }

    fn live(images: &[(&str, ImageState)]) -> LiveCluster {
        LiveCluster {
            agent_version: "1.0".into(),
            applied_generation: 3,
            images: images
                .iter()
                .map(|(k, s)| (k.to_string(), s.clone()))
                .collect(),
            ..Default::default()
        }
    }

    struct Case {
        name: &'static str,
        desired: BTreeMap<String, StoredDesiredSet>,
        /// What the Repository resolves to now; `None`: every desired digest.
        wanted: Option<&'static [&'static str]>,
        existing: Vec<ClusterImageStatus>,
        live: BTreeMap<String, LiveCluster>,
        want: Vec<(&'static str, &'static str, ImagePhase, bool)>,
        synced: u32,
        target: u32,
    }

    fn check(c: Case) -> Vec<ClusterImageStatus> {
        let targets = targets_of("default", "app", &c.desired);
        let wanted: Vec<String> = match c.wanted {
            Some(w) => w.iter().map(|d| d.to_string()).collect(),
            None => targets
                .values()
                .flatten()
                .map(|(d, _)| d.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        let live: BTreeMap<String, &LiveCluster> =
            c.live.iter().map(|(k, v)| (k.clone(), v)).collect();
        let prefix = image_key_prefix("default", "app");
        let (entries, synced, target) =
            repository_clusters(&prefix, &c.existing, &targets, &wanted, &live);
        let got: Vec<_> = entries
            .iter()
            .map(|e| {
                (
                    e.cluster.as_str(),
                    e.digest.as_str(),
                    e.phase.expect("phase"),
                    e.last_known,
                )
            })
            .collect();
        assert_eq!(got, c.want, "{}", c.name);
        assert_eq!((synced, target), (c.synced, c.target), "{}", c.name);
        assert_eq!(
            count_synced(&entries, &wanted),
            synced,
            "{}: the recount agrees",
            c.name
        );
        entries
    }

    #[test]
    fn repository_aggregation_table() {
        let d = |pairs: &[(&str, Vec<DesiredImage>)]| -> BTreeMap<String, StoredDesiredSet> {
            pairs
                .iter()
                .map(|(c, i)| (c.to_string(), set(1, i.clone())))
                .collect()
        };
        let offline_synced = ClusterImageStatus {
            phase: Some(ImagePhase::Synced),
            last_known: true,
            ..pending("b", "sha256:1")
        };
        check(Case {
            name: "untargeted",
            wanted: None,
            desired: d(&[("a", vec![img("default", "other", "sha256:1")])]),
            existing: vec![pending("a", "sha256:1")],
            live: BTreeMap::new(),
            want: vec![],
            synced: 0,
            target: 0,
        });
        check(Case {
            name: "targeted, never reported",
            wanted: None,
            desired: d(&[
                ("a", vec![img("default", "app", "sha256:1")]),
                ("b", vec![]),
            ]),
            existing: vec![],
            live: BTreeMap::new(),
            want: vec![("a", "sha256:1", ImagePhase::Pending, false)],
            synced: 0,
            target: 1,
        });
        check(Case {
            name: "live synced and syncing",
            wanted: None,
            desired: d(&[
                ("a", vec![img("default", "app", "sha256:1")]),
                ("b", vec![img("default", "app", "sha256:1")]),
            ]),
            existing: vec![],
            live: [
                (
                    "a".to_string(),
                    live(&[(
                        "default/app@sha256:1",
                        state(ImagePhase::Synced, "sha256:1"),
                    )]),
                ),
                (
                    "b".to_string(),
                    live(&[(
                        "default/app@sha256:1",
                        state(ImagePhase::Syncing, "sha256:1"),
                    )]),
                ),
            ]
            .into_iter()
            .collect(),
            want: vec![
                ("a", "sha256:1", ImagePhase::Synced, false),
                ("b", "sha256:1", ImagePhase::Syncing, false),
            ],
            synced: 1,
            target: 2,
        });
        check(Case {
            name: "offline last known kept, not counted; stale digest dropped",
            wanted: None,
            desired: d(&[("b", vec![img("default", "app", "sha256:1")])]),
            existing: vec![offline_synced.clone(), pending("b", "sha256:old")],
            live: BTreeMap::new(),
            want: vec![("b", "sha256:1", ImagePhase::Synced, true)],
            synced: 0,
            target: 1,
        });
        check(Case {
            name: "all digests must be synced",
            wanted: None,
            desired: d(&[(
                "a",
                vec![
                    img("default", "app", "sha256:1"),
                    img("default", "app", "sha256:2"),
                ],
            )]),
            existing: vec![],
            live: [(
                "a".to_string(),
                live(&[(
                    "default/app@sha256:1",
                    state(ImagePhase::Synced, "sha256:1"),
                )]),
            )]
            .into_iter()
            .collect(),
            want: vec![
                ("a", "sha256:1", ImagePhase::Synced, false),
                ("a", "sha256:2", ImagePhase::Pending, false),
            ],
            synced: 0,
            target: 1,
        });
    }

    #[test]
    fn a_new_digest_is_not_synced_until_reported() {
        let d = |digest: &str| -> BTreeMap<String, StoredDesiredSet> {
            [("a".to_string(), set(1, vec![img("default", "app", digest)]))].into()
        };
        let old_synced = || -> BTreeMap<String, LiveCluster> {
            [(
                "a".to_string(),
                live(&[(
                    "default/app@sha256:old",
                    state(ImagePhase::Synced, "sha256:old"),
                )]),
            )]
            .into()
        };
        // The tag moved: the desired sets still name the old digest, the
        // Repository already resolves to the new one.
        check(Case {
            name: "resolved ahead of the desired sets",
            desired: d("sha256:old"),
            wanted: Some(&["sha256:new"]),
            existing: vec![],
            live: old_synced(),
            want: vec![("a", "sha256:old", ImagePhase::Synced, false)],
            synced: 0,
            target: 1,
        });
        // The desired set caught up; the (frozen) agent has not reported it.
        let entries = check(Case {
            name: "desired, not reported: the cluster still holds the old digest",
            desired: d("sha256:new"),
            wanted: Some(&["sha256:new"]),
            existing: vec![],
            live: old_synced(),
            want: vec![("a", "sha256:new", ImagePhase::Pending, false)],
            synced: 0,
            target: 1,
        });
        assert_eq!(entries[0].held_digests, vec!["sha256:old".to_string()]);
        // Nothing resolved: nothing counts as synced.
        check(Case {
            name: "nothing wanted",
            desired: d("sha256:old"),
            wanted: Some(&[]),
            existing: vec![],
            live: old_synced(),
            want: vec![("a", "sha256:old", ImagePhase::Synced, false)],
            synced: 0,
            target: 1,
        });
        // Reported: synced, and it holds both until retention drops the old.
        let mut l = old_synced();
        l.get_mut("a").expect("a").images.insert(
            "default/app@sha256:new".into(),
            state(ImagePhase::Synced, "sha256:new"),
        );
        let entries = check(Case {
            name: "reported",
            desired: d("sha256:new"),
            wanted: Some(&["sha256:new"]),
            existing: vec![],
            live: l,
            want: vec![("a", "sha256:new", ImagePhase::Synced, false)],
            synced: 1,
            target: 1,
        });
        assert_eq!(
            entries[0].held_digests,
            vec!["sha256:new".to_string(), "sha256:old".to_string()]
        );
        // Another repository's images with a similar name are not held.
        let mut other = old_synced();
        other.get_mut("a").expect("a").images.insert(
            "default/app2@sha256:x".into(),
            state(ImagePhase::Synced, "sha256:x"),
        );
        let entries = check(Case {
            name: "only this repository's digests are held",
            desired: d("sha256:new"),
            wanted: Some(&["sha256:new"]),
            existing: vec![],
            live: other,
            want: vec![("a", "sha256:new", ImagePhase::Pending, false)],
            synced: 0,
            target: 1,
        });
        assert_eq!(entries[0].held_digests, vec!["sha256:old".to_string()]);
    }

    #[test]
    fn last_known_and_counts() {
        let mut entries = vec![
            ClusterImageStatus {
                phase: Some(ImagePhase::Synced),
                ..pending("a", "sha256:1")
            },
            ClusterImageStatus {
                phase: Some(ImagePhase::Synced),
                ..pending("b", "sha256:1")
            },
        ];
        let wanted = vec!["sha256:1".to_string()];
        assert_eq!(count_synced(&entries, &wanted), 2);
        assert!(mark_last_known(&mut entries, "b"));
        assert!(!mark_last_known(&mut entries, "b"));
        assert_eq!(count_synced(&entries, &wanted), 1);
        // A new digest resolved: nobody holds it yet.
        let moved = vec!["sha256:2".to_string()];
        assert_eq!(count_synced(&entries, &moved), 0);
    }

    #[test]
    fn cluster_status_fields() {
        let desired = set(
            4,
            vec![
                img("default", "app", "sha256:1"),
                img("default", "app", "sha256:2"),
            ],
        );
        let l = live(&[(
            "default/app@sha256:1",
            state(ImagePhase::Synced, "sha256:1"),
        )]);
        let s = cluster_status(&ClusterStatus::default(), Some(&desired), Some(&l), "hub-1");
        assert_eq!(s.phase, Some(ClusterPhase::Connected));
        assert_eq!((s.desired_generation, s.applied_generation), (4, 3));
        assert_eq!((s.images_desired, s.images_synced), (2, 1));
        assert_eq!(s.hub_replica.as_deref(), Some("hub-1"));
        assert_eq!(s.agent_version.as_deref(), Some("1.0"));
        let off = offline_status(&s);
        assert_eq!(off.phase, Some(ClusterPhase::Offline));
        assert_eq!(off.applied_generation, 3);
        // Without a live session, session fields are kept as they were.
        let s2 = cluster_status(&off, Some(&set(5, vec![])), None, "hub-2");
        assert_eq!(s2.phase, Some(ClusterPhase::Offline));
        assert_eq!((s2.desired_generation, s2.images_desired), (5, 0));
        assert_eq!(s2.hub_replica.as_deref(), Some("hub-1"));
    }

    #[test]
    fn the_inventory_is_kept_until_the_agent_sends_another() {
        let held = |digests: &[&str], truncated| Held {
            repositories: vec![HeldRepository {
                registry: "r.example".into(),
                repository: "app".into(),
                digests: digests.iter().map(|d| d.to_string()).collect(),
            }],
            truncated,
        };
        let mut l = live(&[]);
        l.held = Some(std::sync::Arc::new(held(&["sha256:1", "sha256:2"], true)));
        let s = cluster_status(&ClusterStatus::default(), None, Some(&l), "hub-1");
        assert!(s.holds("r.example", "app", "sha256:2"));
        assert!(!s.holds("r.example", "app", "sha256:3"));
        assert!(!s.holds("other.example", "app", "sha256:2"));
        assert!(s.held_truncated);
        // A session that has not reported one yet keeps the stored one.
        let s2 = cluster_status(&s, None, Some(&live(&[])), "hub-2");
        assert_eq!(s2.held, s.held);
        assert!(s2.held_truncated);
        // Offline, and then read without a session: still there.
        let off = offline_status(&s2);
        assert_eq!(cluster_status(&off, None, None, "hub-3").held, s.held);
        // A new report replaces it whole.
        l.held = Some(std::sync::Arc::new(held(&["sha256:3"], false)));
        let s3 = cluster_status(&off, None, Some(&l), "hub-1");
        assert_eq!(s3.held, held(&["sha256:3"], false).repositories);
        assert!(!s3.held_truncated);
    }

    #[test]
    fn overdue() {
        let now = Time(k8s_openapi::jiff::Timestamp::from_second(1000).expect("ts"));
        let t = |s| Time(k8s_openapi::jiff::Timestamp::from_second(s).expect("ts"));
        let d = std::time::Duration::from_secs(30);
        assert!(!is_overdue(Some(&t(990)), &now, d));
        assert!(!is_overdue(Some(&t(970)), &now, d));
        assert!(is_overdue(Some(&t(969)), &now, d));
        assert!(is_overdue(None, &now, d));
    }

    #[test]
    fn a_large_fleet_lists_at_most_the_cap_unsynced_first() {
        let n = MAX_CLUSTER_ENTRIES + 500;
        let mut targets = BTreeMap::new();
        for i in 0..n {
            targets.insert(
                format!("c{i:05}"),
                vec![("sha256:1".to_string(), "k".to_string())],
            );
        }
        // The last 100 clusters are live and not synced; the rest have synced entries.
        let existing: Vec<ClusterImageStatus> = (0..n - 100)
            .map(|i| ClusterImageStatus {
                phase: Some(ImagePhase::Synced),
                ..pending(&format!("c{i:05}"), "sha256:1")
            })
            .collect();
        let live_states: BTreeMap<String, LiveCluster> = (n - 100..n)
            .map(|i| (format!("c{i:05}"), LiveCluster::default()))
            .collect();
        let live: BTreeMap<String, &LiveCluster> =
            live_states.iter().map(|(k, v)| (k.clone(), v)).collect();
        let wanted = vec!["sha256:1".to_string()];
        let (entries, synced, target) =
            repository_clusters("default/app@", &existing, &targets, &wanted, &live);
        assert_eq!(target as usize, n);
        assert_eq!(synced as usize, n - 100);
        assert_eq!(entries.len(), MAX_CLUSTER_ENTRIES);
        let pending_count = entries
            .iter()
            .filter(|e| e.phase == Some(ImagePhase::Pending))
            .count();
        assert_eq!(pending_count, 100, "every unsynced cluster must be listed");
        assert!(entries.windows(2).all(|w| w[0].cluster < w[1].cluster));
    }
}
