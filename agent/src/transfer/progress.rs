//! Progress events per image, sent over a channel and coalesced in time so a
//! fast transfer does not flood the receiver.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

/// Where an image transfer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Queued, not started.
    Pending,
    /// Fetching the manifest or index and the platform manifests.
    Manifests,
    /// Fetching blobs.
    Blobs,
    /// Everything is present; recording the image.
    Committing,
    /// Complete, verified and servable.
    Synced,
    /// The attempt failed; `message` says why.
    Failed,
}

impl Phase {
    /// Whether no further event follows for this attempt.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Synced | Phase::Failed)
    }
}

/// The latest state of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The image's key (`DesiredImage::key`).
    pub key: String,
    /// The image digest.
    pub digest: String,
    /// Where it is.
    pub phase: Phase,
    /// Blob bytes present (already there or transferred).
    pub bytes_done: u64,
    /// Blob bytes in total, once the manifests are known.
    pub bytes_total: u64,
    /// Blobs present.
    pub layers_done: u32,
    /// Blobs in total, once the manifests are known.
    pub layers_total: u32,
    /// The error, for `Failed`.
    pub message: Option<String>,
}

/// Minimum time between two byte-count events of one image.
const EMIT_EVERY: Duration = Duration::from_millis(200);

/// The counters of one image transfer and the channel its events go to.
#[derive(Debug)]
pub(crate) struct Tracker {
    key: String,
    digest: String,
    tx: Option<UnboundedSender<Progress>>,
    pub(crate) bytes_done: AtomicU64,
    pub(crate) bytes_total: AtomicU64,
    pub(crate) layers_done: AtomicU32,
    pub(crate) layers_total: AtomicU32,
    last: Mutex<Option<Instant>>,
}

impl Tracker {
    pub(crate) fn new(key: &str, digest: &str, tx: Option<UnboundedSender<Progress>>) -> Tracker {
        Tracker {
            key: key.to_string(),
            digest: digest.to_string(),
            tx,
            bytes_done: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            layers_done: AtomicU32::new(0),
            layers_total: AtomicU32::new(0),
            last: Mutex::new(None),
        }
    }

    pub(crate) fn add_bytes(&self, n: u64) {
        self.bytes_done.fetch_add(n, Ordering::Relaxed);
        self.emit(Phase::Blobs, None, false);
    }

    pub(crate) fn emit(&self, phase: Phase, message: Option<String>, force: bool) {
        let Some(tx) = &self.tx else { return };
        if !force {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < EMIT_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let _ = tx.send(Progress {
            key: self.key.clone(),
            digest: self.digest.clone(),
            phase,
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            layers_done: self.layers_done.load(Ordering::Relaxed),
            layers_total: self.layers_total.load(Ordering::Relaxed),
            message,
        });
    }
}
