//! What the agent tells the hub about its images and its storage: one
//! [`ImageReport`] per desired image, built only here from the reconciler's
//! events, and the [`ProgressBook`] that keeps the latest of each for the
//! session to send. The session turns them into wire messages
//! ([`crate::wire`]); nothing here knows the wire.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;

use crate::desired::DesiredImage;
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

    /// Forgets an image that is no longer desired.
    pub fn remove(&self, key: &str) {
        self.lock().entries.remove(key);
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
}
