//! What the agent tells the hub about its images and its storage: one
//! [`ImageReport`] per desired image, built only here from the reconciler's
//! events, the store's [`HeldInventory`] (every image it holds, desired or
//! not), and the [`ProgressBook`] that keeps the latest of each for the
//! session to send. The session turns them into wire messages
//! ([`crate::wire`]); nothing here knows the wire.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use imgfleet::model::{HeldRepository, MAX_HELD};
use tokio::sync::watch;

use crate::desired::DesiredImage;
use crate::store::ManifestRecord;
use crate::transfer::{ImageStats, Phase, Progress, TransferError};

/// Where an image is, as the hub sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportPhase {
    /// Waiting for a transfer slot, or for its retry.
    Pending,
    /// A transfer is running.
    Syncing,
    /// Complete, verified and servable by the mirror.
    Synced,
    /// The last attempt failed; it will be retried.
    Failed,
}

/// The state of one desired image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReport {
    /// The image's key.
    pub key: String,
    /// The image digest.
    pub digest: String,
    /// Where it is.
    pub phase: ReportPhase,
    /// Blob bytes present (already there or transferred).
    pub bytes_done: u64,
    /// Blob bytes in total, once known.
    pub bytes_total: u64,
    /// Blobs present.
    pub layers_done: u32,
    /// Blobs in total, once known.
    pub layers_total: u32,
    /// Why the last attempt failed.
    pub message: Option<String>,
    /// When this state was reached.
    pub updated_at: SystemTime,
    /// For `Failed`: when the next attempt starts.
    pub next_retry: Option<SystemTime>,
    /// Failed attempts in a row.
    pub attempts: u32,
}

impl ImageReport {
    /// A report for `image` in `phase`, with the counts of `counts` (the
    /// last report, so that a retry does not look like a restart from
    /// zero).
    fn of(
        image: &DesiredImage,
        phase: ReportPhase,
        counts: Option<&ImageReport>,
        attempts: u32,
    ) -> ImageReport {
        ImageReport {
            key: image.key.clone(),
            digest: image.digest.clone(),
            phase,
            bytes_done: counts.map_or(0, |c| c.bytes_done),
            bytes_total: counts.map_or(0, |c| c.bytes_total),
            layers_done: counts.map_or(0, |c| c.layers_done),
            layers_total: counts.map_or(0, |c| c.layers_total),
            message: None,
            updated_at: SystemTime::now(),
            next_retry: None,
            attempts,
        }
    }

    /// An attempt is queued; the last counts stay.
    pub fn pending(image: &DesiredImage, last: Option<&ImageReport>, attempts: u32) -> Self {
        Self::of(image, ReportPhase::Pending, last, attempts)
    }

    /// A running attempt's progress; `None` for its last event, whose
    /// result decides the report ([`ImageReport::synced`],
    /// [`ImageReport::failed`]).
    pub fn progress(p: Progress, attempts: u32) -> Option<Self> {
        let phase = match p.phase {
            Phase::Pending => ReportPhase::Pending,
            Phase::Manifests | Phase::Blobs | Phase::Committing => ReportPhase::Syncing,
            Phase::Synced | Phase::Failed => return None,
        };
        Some(ImageReport {
            key: p.key,
            digest: p.digest,
            phase,
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
            layers_done: p.layers_done,
            layers_total: p.layers_total,
            message: None,
            updated_at: SystemTime::now(),
            next_retry: None,
            attempts,
        })
    }

    /// The image is servable: every blob is present.
    pub fn synced(image: &DesiredImage, stats: &ImageStats) -> Self {
        ImageReport {
            bytes_done: stats.bytes_total,
            bytes_total: stats.bytes_total,
            layers_done: stats.blobs_total,
            layers_total: stats.blobs_total,
            ..Self::of(image, ReportPhase::Synced, None, 0)
        }
    }

    /// An attempt failed; the next starts at `retry_at`.
    pub fn failed(
        image: &DesiredImage,
        last: Option<&ImageReport>,
        error: &TransferError,
        attempts: u32,
        retry_at: SystemTime,
    ) -> Self {
        ImageReport {
            message: Some(error.to_string()),
            next_retry: Some(retry_at),
            ..Self::of(image, ReportPhase::Failed, last, attempts)
        }
    }

    /// Whether two reports say the same, apart from when.
    fn same_state(&self, other: &ImageReport) -> bool {
        ImageReport {
            updated_at: other.updated_at,
            ..self.clone()
        } == *other
    }
}

/// The agent's storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageReport {
    /// Bytes of verified content.
    pub used_bytes: u64,
    /// Capacity of the filesystem holding the store.
    pub capacity_bytes: u64,
}

/// Every image the store holds, desired or kept by retention: what the hub
/// writes into `Cluster.status.held` so that any replica can say which
/// clusters still hold a revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldInventory {
    /// Per (registry, repository), sorted; digests sorted, no duplicates.
    pub repositories: Vec<HeldRepository>,
    /// More than [`MAX_HELD`] digests were held; the rest are left out.
    pub truncated: bool,
}

/// The inventory of the store's `records`: image roots only (a child
/// manifest of an index, or a referrer, is part of an image, not a revision
/// of its own), grouped by (registry, repository), at most [`MAX_HELD`]
/// digests in all so that the Cluster object stays small. Repositories and
/// digests are in order, so the same store gives the same inventory and a
/// comparison tells whether it changed.
pub fn inventory(records: &[ManifestRecord]) -> HeldInventory {
    let mut by_repo: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    for r in records {
        if r.parent.is_none() && r.subject.is_none() {
            by_repo
                .entry((&r.registry, &r.repository))
                .or_default()
                .insert(&r.digest);
        }
    }
    let mut left = MAX_HELD;
    let mut truncated = false;
    let mut repositories = Vec::with_capacity(by_repo.len());
    for ((registry, repository), digests) in by_repo {
        if left == 0 {
            truncated = true;
            break;
        }
        truncated |= digests.len() > left;
        let digests: Vec<String> = digests.into_iter().take(left).map(str::to_owned).collect();
        left -= digests.len();
        repositories.push(HeldRepository {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            digests,
        });
    }
    HeldInventory {
        repositories,
        truncated,
    }
}

/// The latest state of every desired image, as the hub should see it. The
/// reconciler writes it; the session sends what changed, coalesced.
#[derive(Debug)]
pub struct ProgressBook {
    inner: Mutex<BookInner>,
    /// The sequence number of the last change, for the session to wake on.
    changed: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct BookInner {
    /// Per key: the sequence number of its last change, and the state.
    entries: BTreeMap<String, (u64, ImageReport)>,
    /// Grows with every change.
    seq: u64,
    storage: StorageReport,
    /// The store's inventory and the sequence number of its last change;
    /// `None` until the reconciler first read the store.
    held: Option<(u64, Arc<HeldInventory>)>,
    /// Finished sync attempts per Repository (namespace, name): (successes,
    /// failures). Kept while the desired set holds an image of it, so the
    /// series stay as many as the Repositories placed here.
    outcomes: BTreeMap<(String, String), (u64, u64)>,
}

/// The Repository (namespace, name) of an image key
/// (`<namespace>/<name>@<digest>`); `None` for a key of another shape.
pub fn repository_of(key: &str) -> Option<(&str, &str)> {
    let (source, _digest) = key.split_once('@')?;
    source.split_once('/')
}

/// What the metrics read of one Repository held here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepositorySyncState {
    /// Failed attempts in a row of its worst image; 0 once every image of
    /// it synced.
    pub consecutive_failures: u32,
    /// Finished attempts that synced.
    pub successes: u64,
    /// Finished attempts that failed.
    pub failures: u64,
}

impl ProgressBook {
    /// An empty book.
    pub fn new() -> Arc<ProgressBook> {
        Arc::new(ProgressBook {
            inner: Mutex::new(BookInner::default()),
            changed: watch::channel(0).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BookInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an image's state. A state equal to the held one (apart from
    /// its timestamp) is not a change and is not sent again.
    pub fn set(&self, report: ImageReport) {
        let mut inner = self.lock();
        if let Some((_, old)) = inner.entries.get(&report.key)
            && old.same_state(&report)
        {
            return;
        }
        inner.seq += 1;
        let seq = inner.seq;
        inner.entries.insert(report.key.clone(), (seq, report));
        drop(inner);
        self.changed.send_replace(seq);
    }

    /// Forgets an image that is no longer desired, and its Repository's
    /// attempt counts once no image of it is left.
    pub fn remove(&self, key: &str) {
        let mut inner = self.lock();
        inner.entries.remove(key);
        if let Some((ns, name)) = repository_of(key) {
            let prefix = format!("{ns}/{name}@");
            let still_held = inner
                .entries
                .range(prefix.clone()..)
                .next()
                .is_some_and(|(k, _)| k.starts_with(&prefix));
            if !still_held {
                inner.outcomes.remove(&(ns.to_string(), name.to_string()));
            }
        }
    }

    /// Counts one finished sync attempt of the image `key`.
    pub fn count_attempt(&self, key: &str, synced: bool) {
        let Some((ns, name)) = repository_of(key) else {
            return;
        };
        let mut inner = self.lock();
        let counts = inner
            .outcomes
            .entry((ns.to_string(), name.to_string()))
            .or_default();
        if synced {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
    }

    /// Per Repository held here: consecutive failures and attempt counts.
    pub fn repositories(&self) -> BTreeMap<(String, String), RepositorySyncState> {
        let inner = self.lock();
        let mut out: BTreeMap<(String, String), RepositorySyncState> = BTreeMap::new();
        for (key, (_, report)) in &inner.entries {
            let Some((ns, name)) = repository_of(key) else {
                continue;
            };
            let state = out.entry((ns.to_string(), name.to_string())).or_default();
            if report.phase != ReportPhase::Synced {
                state.consecutive_failures = state.consecutive_failures.max(report.attempts);
            }
        }
        for (repo, (ok, failed)) in &inner.outcomes {
            let state = out.entry(repo.clone()).or_default();
            state.successes = *ok;
            state.failures = *failed;
        }
        out
    }

    /// The state of one image.
    pub fn get(&self, key: &str) -> Option<ImageReport> {
        self.lock().entries.get(key).map(|(_, r)| r.clone())
    }

    /// Records the storage figures; sent with the next progress message.
    pub fn set_storage(&self, storage: StorageReport) {
        let mut inner = self.lock();
        if inner.storage == storage {
            return;
        }
        inner.storage = storage;
        inner.seq += 1;
        let seq = inner.seq;
        drop(inner);
        self.changed.send_replace(seq);
    }

    /// The storage figures.
    pub fn storage(&self) -> StorageReport {
        self.lock().storage
    }

    /// Records the store's inventory; sent with the next progress message
    /// when it differs from the one held.
    pub fn set_held(&self, held: HeldInventory) {
        let mut inner = self.lock();
        if inner.held.as_ref().is_some_and(|(_, h)| **h == held) {
            return;
        }
        inner.seq += 1;
        let seq = inner.seq;
        inner.held = Some((seq, Arc::new(held)));
        drop(inner);
        self.changed.send_replace(seq);
    }

    /// The inventory if it changed after `seq` (0: if there is one at all).
    /// Read after [`ProgressBook::changes_since`] with the same `seq`, so a
    /// change between the two reads is sent twice rather than never.
    pub fn held_since(&self, seq: u64) -> Option<Arc<HeldInventory>> {
        match &self.lock().held {
            Some((s, h)) if *s > seq => Some(h.clone()),
            _ => None,
        }
    }

    /// Every image's state and the sequence number it is current to.
    pub fn snapshot(&self) -> (u64, Vec<ImageReport>) {
        self.changes_since(0)
    }

    /// The states changed after `seq`, and the sequence number they are current to.
    pub fn changes_since(&self, seq: u64) -> (u64, Vec<ImageReport>) {
        let inner = self.lock();
        (
            inner.seq,
            inner
                .entries
                .values()
                .filter(|(s, _)| *s > seq)
                .map(|(_, r)| r.clone())
                .collect(),
        )
    }

    /// (images, synced, failed) counts, for metrics.
    pub fn counts(&self) -> (usize, usize, usize) {
        let inner = self.lock();
        let phase = |ph: ReportPhase| {
            inner
                .entries
                .values()
                .filter(|(_, r)| r.phase == ph)
                .count()
        };
        (
            inner.entries.len(),
            phase(ReportPhase::Synced),
            phase(ReportPhase::Failed),
        )
    }

    /// Wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        repo: &str,
        digest: &str,
        parent: Option<&str>,
        subject: Option<&str>,
    ) -> ManifestRecord {
        ManifestRecord {
            registry: "r.example".into(),
            repository: repo.into(),
            tag: None,
            digest: digest.into(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 1,
            parent: parent.map(Into::into),
            subject: subject.map(Into::into),
            recorded_at: 0,
        }
    }

    #[test]
    fn inventory_lists_image_roots_by_repository_in_order() {
        let records = vec![
            record("web", "sha256:b", None, None),
            // The same root recorded twice (under two tags) is one revision.
            ManifestRecord {
                tag: Some("v2".into()),
                ..record("web", "sha256:b", None, None)
            },
            record("web", "sha256:a", None, None),
            // A child of an index and a referrer are not revisions.
            record("web", "sha256:child", Some("sha256:a"), None),
            record("web", "sha256:sig", Some("sha256:a"), Some("sha256:a")),
            record("web", "sha256:sbom", None, Some("sha256:b")),
            record("app", "sha256:c", None, None),
            ManifestRecord {
                registry: "a.example".into(),
                ..record("web", "sha256:d", None, None)
            },
        ];
        let held = inventory(&records);
        assert!(!held.truncated);
        let flat: Vec<(&str, &str, Vec<&str>)> = held
            .repositories
            .iter()
            .map(|h| {
                (
                    h.registry.as_str(),
                    h.repository.as_str(),
                    h.digests.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            flat,
            [
                ("a.example", "web", vec!["sha256:d"]),
                ("r.example", "app", vec!["sha256:c"]),
                ("r.example", "web", vec!["sha256:a", "sha256:b"]),
            ]
        );
        assert_eq!(inventory(&[]), HeldInventory::default());
    }

    #[test]
    fn inventory_stops_at_max_held_digests() {
        let digest = |i: usize| format!("sha256:{i:06}");
        // Exactly MAX_HELD over two repositories: all listed.
        let mut records: Vec<ManifestRecord> = (0..MAX_HELD)
            .map(|i| record(if i % 2 == 0 { "a" } else { "b" }, &digest(i), None, None))
            .collect();
        let held = inventory(&records);
        assert!(!held.truncated);
        assert_eq!(
            held.repositories
                .iter()
                .map(|h| h.digests.len())
                .sum::<usize>(),
            MAX_HELD
        );
        // One more, in a repository sorted last: left out, and said so.
        records.push(record("c", &digest(MAX_HELD), None, None));
        let held = inventory(&records);
        assert!(held.truncated);
        assert_eq!(held.repositories.len(), 2, "no empty entry for c");
        assert_eq!(
            held.repositories
                .iter()
                .map(|h| h.digests.len())
                .sum::<usize>(),
            MAX_HELD
        );
        // Cut inside a repository: its first digests in order are kept.
        let records: Vec<ManifestRecord> = (0..MAX_HELD + 5)
            .rev()
            .map(|i| record("a", &digest(i), None, None))
            .collect();
        let held = inventory(&records);
        assert!(held.truncated);
        assert_eq!(held.repositories[0].digests.len(), MAX_HELD);
        assert_eq!(held.repositories[0].digests[0], digest(0));
        assert_eq!(
            held.repositories[0].digests[MAX_HELD - 1],
            digest(MAX_HELD - 1)
        );
    }

    #[test]
    fn the_book_sends_the_inventory_once_per_change() {
        let book = ProgressBook::new();
        assert_eq!(book.held_since(0), None, "nothing read yet");
        let one = inventory(&[record("web", "sha256:a", None, None)]);
        book.set_held(one.clone());
        let (seq, _) = book.changes_since(0);
        assert_eq!(book.held_since(0).as_deref(), Some(&one));
        assert_eq!(book.held_since(seq), None);
        // The same inventory again is no change.
        book.set_held(one.clone());
        assert_eq!(book.changes_since(seq).0, seq);
        let two = inventory(&[
            record("web", "sha256:a", None, None),
            record("web", "sha256:b", None, None),
        ]);
        book.set_held(two.clone());
        assert_eq!(book.held_since(seq).as_deref(), Some(&two));
    }

    fn report(key: &str, phase: ReportPhase, done: u64) -> ImageReport {
        ImageReport {
            key: key.into(),
            digest: String::new(),
            phase,
            bytes_done: done,
            bytes_total: 0,
            layers_done: 0,
            layers_total: 0,
            message: None,
            updated_at: SystemTime::now(),
            next_retry: None,
            attempts: 0,
        }
    }

    #[test]
    fn book_sends_only_latest_changes() {
        let book = ProgressBook::new();
        book.set(report("a", ReportPhase::Syncing, 1));
        book.set(report("b", ReportPhase::Pending, 0));
        let (seq, all) = book.snapshot();
        assert_eq!(all.len(), 2);
        // Intermediate states collapse to the newest one.
        book.set(report("a", ReportPhase::Syncing, 5));
        book.set(report("a", ReportPhase::Synced, 9));
        let (seq2, changed) = book.changes_since(seq);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].bytes_done, 9);
        // The same state again (new timestamp) is no change.
        book.set(report("a", ReportPhase::Synced, 9));
        assert!(book.changes_since(seq2).1.is_empty());
        assert_eq!(book.counts(), (2, 1, 0));
    }

    #[test]
    fn repositories_count_failures_in_a_row_and_attempts() {
        let book = ProgressBook::new();
        let failing = |key: &str, attempts| ImageReport {
            attempts,
            ..report(key, ReportPhase::Failed, 0)
        };
        book.set(failing("ns/app@sha256:1", 4));
        book.set(failing("ns/app@sha256:2", 2));
        book.set(report("ns/web@sha256:3", ReportPhase::Synced, 1));
        for _ in 0..4 {
            book.count_attempt("ns/app@sha256:1", false);
        }
        book.count_attempt("ns/web@sha256:3", true);
        let repos = book.repositories();
        let app = repos[&("ns".to_string(), "app".to_string())];
        assert_eq!(
            (app.consecutive_failures, app.successes, app.failures),
            (4, 0, 4)
        );
        let web = repos[&("ns".to_string(), "web".to_string())];
        assert_eq!(
            (web.consecutive_failures, web.successes, web.failures),
            (0, 1, 0)
        );
        // A pending retry keeps the count; a success resets it.
        book.set(ImageReport {
            attempts: 4,
            ..report("ns/app@sha256:1", ReportPhase::Pending, 0)
        });
        assert_eq!(
            book.repositories()[&("ns".into(), "app".into())].consecutive_failures,
            4
        );
        book.set(report("ns/app@sha256:1", ReportPhase::Synced, 1));
        book.set(report("ns/app@sha256:2", ReportPhase::Synced, 1));
        assert_eq!(
            book.repositories()[&("ns".into(), "app".into())].consecutive_failures,
            0
        );
        // The counts go with the last image of the Repository.
        book.remove("ns/app@sha256:1");
        assert!(
            book.repositories()
                .contains_key(&("ns".into(), "app".into()))
        );
        book.remove("ns/app@sha256:2");
        assert!(
            !book
                .repositories()
                .contains_key(&("ns".into(), "app".into()))
        );
        assert_eq!(repository_of("no-digest"), None);
    }
}
