//! Whether the clusters a Repository targets hold what it resolves to now, judged
//! by digest. `imgfleet watch --until-synced` ends on it, and `describe` can show
//! per cluster what is still missing.
//!
//! Counts (`syncedClusters == targetClusters`) are not enough: after a tag moves
//! upstream, a cluster that holds the old digest is still Synced on its entry.
//! The rule here asks for an entry per wanted digest on every targeted cluster,
//! Synced and current (not the last known state of an offline cluster). Pure.

use std::collections::{BTreeMap, BTreeSet};

use super::{ClusterImageStatus, ImagePhase, Repository};

/// What the clusters of one Repository hold of the digests it wants now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Holding {
    /// The digests wanted now, distinct, in order: the pinned `spec.digest`, or
    /// those of `status.resolved`. Empty while nothing is resolved.
    pub wanted: Vec<String>,
    /// Per cluster listed in the status: the wanted digests it does not hold
    /// yet (Synced and current); empty when it holds them all.
    pub missing: BTreeMap<String, Vec<String>>,
    /// How many clusters the Repository targets (`status.targetClusters`).
    pub target: u32,
}

impl Holding {
    /// The listed clusters that hold every wanted digest (none while nothing is wanted).
    pub fn holding(&self) -> impl Iterator<Item = &str> {
        self.missing
            .iter()
            .filter(|(_, m)| m.is_empty() && !self.wanted.is_empty())
            .map(|(c, _)| c.as_str())
    }

    /// How many clusters hold every wanted digest.
    pub fn holding_count(&self) -> usize {
        self.holding().count()
    }

    /// True when something is wanted, the Repository targets at least one
    /// cluster, every targeted cluster is listed, and each holds every wanted
    /// digest. This is when `watch --until-synced` may stop.
    pub fn is_complete(&self) -> bool {
        !self.wanted.is_empty()
            && self.target > 0
            && self.missing.len() == self.target as usize
            && self.missing.values().all(Vec::is_empty)
    }

    /// Why [`Holding::is_complete`] is false, in a few words; empty when it is true.
    pub fn waiting_for(&self) -> String {
        if self.wanted.is_empty() {
            return "tags not resolved yet".to_owned();
        }
        if self.target == 0 {
            return "targets no cluster".to_owned();
        }
        let mut parts = Vec::new();
        let lacking: Vec<String> = self
            .missing
            .iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(c, m)| {
                let digests: Vec<&str> = m.iter().map(|d| short(d)).collect();
                format!("{c} lacks {}", digests.join(" "))
            })
            .collect();
        let shown = lacking.len().min(3);
        parts.extend(lacking[..shown].iter().cloned());
        if lacking.len() > shown {
            parts.push(format!(
                "{} more cluster(s) lack digests",
                lacking.len() - shown
            ));
        }
        if self.missing.len() != self.target as usize {
            parts.push(format!(
                "{} of {} targeted cluster(s) listed",
                self.missing.len(),
                self.target
            ));
        }
        parts.join("; ")
    }
}

/// `sha256:` and the first 12 hex digits.
fn short(digest: &str) -> &str {
    let end = digest
        .char_indices()
        .nth("sha256:".len() + 12)
        .map_or(digest.len(), |(i, _)| i);
    &digest[..end]
}

/// The digests `repo` wants now, distinct, in order: the pinned `spec.digest`,
/// or those of `status.resolved`. Empty while nothing is resolved.
pub fn wanted_digests(repo: &Repository) -> Vec<String> {
    let resolved = repo
        .status
        .as_ref()
        .map(|s| s.resolved.as_slice())
        .unwrap_or_default();
    if resolved.is_empty() {
        return Vec::new();
    }
    if let Some(pinned) = &repo.spec.digest {
        return vec![pinned.clone()];
    }
    let mut wanted: Vec<String> = Vec::new();
    for t in resolved {
        if !t.digest.is_empty() && !wanted.contains(&t.digest) {
            wanted.push(t.digest.clone());
        }
    }
    wanted
}

/// Whether one cluster's entries show every `wanted` digest servable now:
/// Synced, and not the last known state of an offline cluster. Nothing
/// wanted is never held. The hub counts `syncedClusters` by this rule.
pub fn holds_all<'a>(
    entries: impl IntoIterator<Item = &'a ClusterImageStatus>,
    wanted: &[String],
) -> bool {
    let held: BTreeSet<&str> = entries
        .into_iter()
        .filter(|e| e.phase == Some(ImagePhase::Synced) && !e.last_known)
        .map(|e| e.digest.as_str())
        .collect();
    !wanted.is_empty() && wanted.iter().all(|w| held.contains(w.as_str()))
}

/// What each cluster listed in `repo`'s status holds of the digests it wants now.
pub fn clusters_holding(repo: &Repository) -> Holding {
    let Some(status) = &repo.status else {
        return Holding::default();
    };
    let wanted = wanted_digests(repo);
    let mut by_cluster: BTreeMap<&str, Vec<&ClusterImageStatus>> = BTreeMap::new();
    for e in &status.clusters {
        by_cluster.entry(e.cluster.as_str()).or_default().push(e);
    }
    let missing = by_cluster
        .into_iter()
        .map(|(cluster, entries)| {
            let lacks = wanted
                .iter()
                .filter(|w| !holds_all(entries.iter().copied(), std::slice::from_ref(*w)))
                .cloned()
                .collect();
            (cluster.to_owned(), lacks)
        })
        .collect();
    Holding {
        wanted,
        missing,
        target: status.target_clusters,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        ClusterImageStatus, RegistryRef, RepositorySpec, RepositoryStatus, ResolvedTag,
    };

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    /// One status entry: cluster, digest, phase, last known.
    type Entry = (&'static str, &'static str, Option<ImagePhase>, bool);

    /// What a case starts from: the pinned digest, the resolved digests, the status
    /// entries, and the (synced, target) counts the hub wrote.
    type Given = (
        Option<&'static str>,
        &'static [&'static str],
        &'static [Entry],
        (u32, u32),
    );
    /// What it must give: complete, the clusters holding it, what it waits for.
    type Want = (bool, &'static [&'static str], &'static str);

    fn repo((pinned, resolved, entries, (synced, target)): Given) -> Repository {
        let mut r = Repository::new(
            "web",
            RepositorySpec {
                repository: "library/nginx".into(),
                tag: Some("latest".into()),
                tags: Vec::new(),
                tag_pattern: None,
                digest: pinned.map(str::to_owned),
                platforms: Vec::new(),
                registry_ref: RegistryRef {
                    name: "harbor".into(),
                    namespace: None,
                },
                sync_interval: None,
                placement: None,
                retention: None,
                suspend: false,
                verify: None,
                scan: None,
            },
        );
        r.status = Some(RepositoryStatus {
            resolved: resolved
                .iter()
                .enumerate()
                .map(|(i, d)| ResolvedTag {
                    tag: format!("t{i}"),
                    digest: (*d).to_owned(),
                    media_type: String::new(),
                    scan: None,
                    verification: None,
                })
                .collect(),
            clusters: entries
                .iter()
                .map(|(cluster, digest, phase, last_known)| ClusterImageStatus {
                    cluster: (*cluster).to_owned(),
                    digest: (*digest).to_owned(),
                    phase: *phase,
                    last_known: *last_known,
                    ..Default::default()
                })
                .collect(),
            synced_clusters: synced,
            target_clusters: target,
            ..Default::default()
        });
        r
    }

    fn check(name: &str, given: Given, (complete, holding, waiting): Want) {
        let h = clusters_holding(&repo(given));
        assert_eq!(h.is_complete(), complete, "{name}: {h:?}");
        assert_eq!(h.holding().collect::<Vec<_>>(), holding, "{name}: holding");
        assert_eq!(h.waiting_for(), waiting, "{name}: waiting_for");
    }

    const SYNCED: Option<ImagePhase> = Some(ImagePhase::Synced);
    const SYNCING: Option<ImagePhase> = Some(ImagePhase::Syncing);

    #[test]
    fn until_synced_compares_digests_not_counts() {
        // (what it shows, (pinned, resolved, entries, (synced, target) counts),
        //  (complete, clusters holding, what it waits for)).
        let cases: &[(&str, Given, Want)] = &[
            (
                "one digest synced on the only cluster",
                (None, &[A], &[("edge-1", A, SYNCED, false)], (1, 1)),
                (true, &["edge-1"], ""),
            ),
            (
                "the tag moved: the cluster holds the old digest, counts say 1/1",
                (None, &[B], &[("edge-1", A, SYNCED, false)], (1, 1)),
                (false, &[], "edge-1 lacks sha256:bbbbbbbbbbbb"),
            ),
            (
                "new digest still syncing beside the old one",
                (
                    None,
                    &[B],
                    &[("edge-1", A, SYNCED, false), ("edge-1", B, SYNCING, false)],
                    (0, 1),
                ),
                (false, &[], "edge-1 lacks sha256:bbbbbbbbbbbb"),
            ),
            (
                "nothing resolved yet, whatever the counts say",
                (None, &[], &[("edge-1", A, SYNCED, false)], (1, 1)),
                (false, &[], "tags not resolved yet"),
            ),
            (
                "an offline cluster's last known Synced does not count",
                (None, &[A], &[("edge-1", A, SYNCED, true)], (1, 1)),
                (false, &[], "edge-1 lacks sha256:aaaaaaaaaaaa"),
            ),
            (
                "two tags, two digests: one held is not enough",
                (
                    None,
                    &[A, B],
                    &[("edge-1", A, SYNCED, false), ("edge-1", B, SYNCING, false)],
                    (1, 1),
                ),
                (false, &[], "edge-1 lacks sha256:bbbbbbbbbbbb"),
            ),
            (
                "two tags, two digests, both held",
                (
                    None,
                    &[A, B],
                    &[("edge-1", A, SYNCED, false), ("edge-1", B, SYNCED, false)],
                    (1, 1),
                ),
                (true, &["edge-1"], ""),
            ),
            (
                "two tags on one digest need it once",
                (None, &[A, A], &[("edge-1", A, SYNCED, false)], (1, 1)),
                (true, &["edge-1"], ""),
            ),
            (
                "a targeted cluster not listed yet",
                (None, &[A], &[("edge-1", A, SYNCED, false)], (2, 2)),
                (false, &["edge-1"], "1 of 2 targeted cluster(s) listed"),
            ),
            (
                "two clusters, one behind",
                (
                    None,
                    &[A],
                    &[("edge-1", A, SYNCED, false), ("edge-2", A, None, false)],
                    (1, 2),
                ),
                (false, &["edge-1"], "edge-2 lacks sha256:aaaaaaaaaaaa"),
            ),
            (
                "two clusters, both hold it",
                (
                    None,
                    &[A],
                    &[("edge-1", A, SYNCED, false), ("edge-2", A, SYNCED, false)],
                    (2, 2),
                ),
                (true, &["edge-1", "edge-2"], ""),
            ),
            (
                "targets no cluster",
                (None, &[A], &[], (0, 0)),
                (false, &[], "targets no cluster"),
            ),
            (
                "pinned by digest and held",
                (Some(A), &[A], &[("edge-1", A, SYNCED, false)], (1, 1)),
                (true, &["edge-1"], ""),
            ),
            (
                "pinned by digest: another digest held does not count",
                (Some(A), &[B], &[("edge-1", B, SYNCED, false)], (1, 1)),
                (false, &[], "edge-1 lacks sha256:aaaaaaaaaaaa"),
            ),
        ];
        for (name, given, want) in cases {
            check(name, *given, *want);
        }
    }

    #[test]
    fn a_repository_without_status_holds_nothing() {
        let mut r = repo((None, &[A], &[], (0, 0)));
        r.status = None;
        let h = clusters_holding(&r);
        assert!(!h.is_complete());
        assert_eq!(h.waiting_for(), "tags not resolved yet");
    }
}
