//! The reconciler: brings the content store to the held desired set, image
//! by image, reports each image's state into the [`ProgressBook`], and runs
//! GC beside the transfers.
//!
//! Each image is its own task: a failed one is retried on its own schedule
//! without holding up the others, and images of a new set start as soon as
//! the set arrives.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, error, info, warn};

use crate::desired::{DesiredImage, DesiredSet};
use crate::gc::{self, GcPolicy};
use crate::report::{self, ImageReport, ProgressBook, ReportPhase, StorageReport};
use crate::store::Store;
use crate::transfer::{Engine, ImageStats, Progress, Pull, TransferError};

/// GC runs at least this often, to catch what changed on disk.
const GC_EVERY: Duration = Duration::from_secs(60);
/// How often the store's inventory is read again (when it changed) for the
/// hub. Each change sends the whole inventory, up to `MAX_HELD` digests, and
/// a bulk sync changes the store with every image: once per image would
/// cost a poor link more than the images' progress does. `rollout history`
/// is not waiting on it.
const HELD_EVERY: Duration = Duration::from_secs(15);
/// GC runs again this soon after it failed or had to leave blobs in use.
const GC_RETRY: Duration = Duration::from_secs(10);

/// Delay before the `attempts`-th retry of a failed image: 2 s doubling, at most 5 min.
pub fn retry_delay(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(16);
    Duration::from_secs(2)
        .saturating_mul(1u32 << exp)
        .min(Duration::from_secs(300))
}

/// The store's storage figures, read on the blocking pool.
pub(super) async fn storage_report(store: &Arc<Store>) -> StorageReport {
    let store = store.clone();
    tokio::task::spawn_blocking(move || StorageReport {
        used_bytes: store.usage().map(|u| u.blob_bytes).unwrap_or(0),
        capacity_bytes: gc::capacity(store.root()).0.unwrap_or(0),
    })
    .await
    .unwrap_or_default()
}

/// Where one desired image is.
#[derive(Debug)]
enum WorkState {
    /// A task is transferring it (or waiting for a slot).
    Running { abort: AbortHandle, attempt: u64 },
    /// Complete and servable.
    Synced,
    /// Failed; retried at this instant.
    RetryAt(Instant),
}

/// One desired image and where it is.
#[derive(Debug)]
struct Work {
    pull: Pull,
    failures: u32,
    state: WorkState,
}

/// What an image task ends with: its key, its attempt and its result.
type Done = (String, u64, Result<ImageStats, TransferError>);

/// Brings the content store to the desired set, image by image.
#[derive(Debug)]
pub struct Reconciler {
    engine: Arc<Engine>,
    desired: watch::Receiver<Arc<DesiredSet>>,
    book: Arc<ProgressBook>,
    /// The agent's own retention (flags); each repository may set its own.
    gc: GcPolicy,
    /// Image transfers at once.
    slots: Arc<Semaphore>,
    /// Every image of the set, by key.
    works: BTreeMap<String, Work>,
    tasks: JoinSet<Done>,
    progress_tx: mpsc::UnboundedSender<Progress>,
    progress_rx: mpsc::UnboundedReceiver<Progress>,
    /// Numbers attempts, so that a result of an attempt that was replaced
    /// is ignored.
    next_attempt: u64,
    /// When GC runs next: soon after a new set, when a grace period ends,
    /// and at least every [`GC_EVERY`].
    gc_at: Instant,
    /// The store generation the book's inventory was read at; `None`
    /// before the first read.
    held_generation: Option<u64>,
    /// When the inventory is next looked at (see [`HELD_EVERY`]).
    held_at: Instant,
}

impl Reconciler {
    /// A reconciler following `desired`.
    pub fn new(
        engine: Arc<Engine>,
        desired: watch::Receiver<Arc<DesiredSet>>,
        book: Arc<ProgressBook>,
        gc: GcPolicy,
        concurrency_images: usize,
    ) -> Reconciler {
        let (progress_tx, progress_rx) = mpsc::unbounded_channel();
        Reconciler {
            engine,
            desired,
            book,
            gc,
            slots: Arc::new(Semaphore::new(concurrency_images.max(1))),
            works: BTreeMap::new(),
            tasks: JoinSet::new(),
            progress_tx,
            progress_rx,
            next_attempt: 0,
            gc_at: Instant::now(),
            held_generation: None,
            held_at: Instant::now(),
        }
    }

    /// Follows the desired set until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let set = self.desired.borrow_and_update().clone();
        self.apply(&set);
        let mut following = true;
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_retry = self
                .works
                .values()
                .filter_map(|w| match w.state {
                    WorkState::RetryAt(at) => Some(at),
                    _ => None,
                })
                .min();
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                // Progress first, so that an image's last events are seen
                // before its result.
                Some(p) = self.progress_rx.recv() => self.on_progress(p),
                Some(done) = self.tasks.join_next() => match done {
                    Ok((key, attempt, result)) => self.on_done(key, attempt, result).await,
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => error!(error = %e, "Image task failed"),
                },
                r = self.desired.changed(), if following => {
                    if r.is_err() {
                        following = false;
                        continue;
                    }
                    let set = self.desired.borrow_and_update().clone();
                    self.apply(&set);
                }
                _ = tokio::time::sleep_until(next_retry.unwrap_or(far)), if next_retry.is_some() => {
                    self.start_due();
                }
                _ = tick.tick() => self.housekeeping().await,
            }
        }
        // Partials stay on disk; the next start resumes them.
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Starts what is new or changed, forgets what is gone.
    fn apply(&mut self, set: &DesiredSet) {
        let gone: Vec<String> = self
            .works
            .keys()
            .filter(|k| !set.images.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(Work {
                state: WorkState::Running { abort, .. },
                ..
            }) = self.works.remove(&key)
            {
                abort.abort();
            }
            self.book.remove(&key);
        }
        for (key, image) in &set.images {
            let pull = set.pull(image);
            match self.works.get_mut(key) {
                // Only what a transfer fetches and records restarts it; a
                // new retention is taken as it is.
                Some(w) if w.pull.same_transfer(&pull) => {
                    w.pull = pull;
                    continue;
                }
                Some(Work {
                    state: WorkState::Running { abort, .. },
                    ..
                }) => abort.abort(),
                _ => {}
            }
            self.works.insert(
                key.clone(),
                Work {
                    pull,
                    failures: 0,
                    state: WorkState::Synced,
                },
            );
            self.start(key);
        }
        self.gc_at = Instant::now();
    }

    fn start(&mut self, key: &str) {
        let Some(work) = self.works.get_mut(key) else {
            return;
        };
        self.next_attempt += 1;
        let attempt = self.next_attempt;
        let engine = self.engine.clone();
        let slots = self.slots.clone();
        let progress = self.progress_tx.clone();
        let pull = work.pull.clone();
        let key = key.to_string();
        // The image's sync: part of the trace of the change that put it in
        // the desired set, when the hub sent one.
        let span = tracing::info_span!("sync image", key = %key, attempt);
        imgfleet_common::telemetry::join(&span, &pull.image.trace_context);
        let abort = self.tasks.spawn(
            async move {
                let _slot = slots.acquire_owned().await;
                let result = engine.sync_image(&pull, Some(progress)).await;
                (key, attempt, result)
            }
            .instrument(span),
        );
        work.state = WorkState::Running { abort, attempt };
        let image = &work.pull.image;
        let last = self.book.get(&image.key);
        self.book
            .set(ImageReport::pending(image, last.as_ref(), work.failures));
    }

    fn start_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .works
            .iter()
            .filter(|(_, w)| matches!(w.state, WorkState::RetryAt(at) if at <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.start(&key);
        }
    }

    fn on_progress(&mut self, p: Progress) {
        // Only the running attempt speaks; its result decides the end state.
        let Some(work) = self.works.get(&p.key) else {
            return;
        };
        if !matches!(work.state, WorkState::Running { .. }) {
            return;
        }
        if let Some(report) = ImageReport::progress(p, work.failures) {
            self.book.set(report);
        }
    }

    async fn on_done(
        &mut self,
        key: String,
        attempt: u64,
        result: Result<ImageStats, TransferError>,
    ) {
        let image = match self.works.get(&key) {
            Some(w) if matches!(w.state, WorkState::Running { attempt: a, .. } if a == attempt) => {
                w.pull.image.clone()
            }
            _ => return,
        };
        // SYNCED only once the mirror can serve it.
        let result = match result {
            Ok(stats) if self.recorded(&image).await => Ok(stats),
            Ok(_) => Err(TransferError::NotRecorded { key: key.clone() }),
            Err(e) => Err(e),
        };
        let last = self.book.get(&key);
        let Some(work) = self.works.get_mut(&key) else {
            return;
        };
        let report = match result {
            Ok(stats) => {
                info!(key = %key, bytes = stats.bytes_total, fetched = stats.bytes_fetched, "Image synced");
                work.state = WorkState::Synced;
                work.failures = 0;
                ImageReport::synced(&image, &stats)
            }
            Err(e) => {
                work.failures += 1;
                let delay = retry_delay(work.failures);
                warn!(key = %key, attempts = work.failures, retry_in = ?delay, error = %e, "Image failed; will retry");
                work.state = WorkState::RetryAt(Instant::now() + delay);
                ImageReport::failed(
                    &image,
                    last.as_ref(),
                    &e,
                    work.failures,
                    SystemTime::now() + delay,
                )
            }
        };
        self.book
            .count_attempt(&key, report.phase == ReportPhase::Synced);
        self.book.set(report);
        self.book
            .set_storage(storage_report(self.engine.store()).await);
    }

    /// Puts the store's inventory in the book, at most every [`HELD_EVERY`],
    /// if the store's records changed since it was last read (a transfer
    /// recorded an image, GC removed one, or another process wrote the
    /// store). Reading the generation is cheap; the records are read and
    /// grouped only when it moved.
    async fn refresh_held(&mut self) {
        if Instant::now() < self.held_at {
            return;
        }
        self.held_at = Instant::now() + HELD_EVERY;
        let store = self.engine.store().clone();
        let last = self.held_generation;
        let read = tokio::task::spawn_blocking(move || {
            if Some(store.generation()) == last {
                return None;
            }
            let (generation, records) = store.records_at();
            Some((generation, report::inventory(&records)))
        })
        .await;
        match read {
            Ok(Some((generation, held))) => {
                self.held_generation = Some(generation);
                self.book.set_held(held);
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "Reading the store's inventory failed"),
        }
    }

    /// Whether the store records `image` as complete, read on the blocking
    /// pool.
    async fn recorded(&self, image: &DesiredImage) -> bool {
        let store = self.engine.store().clone();
        let (registry, repository, digest) = (
            image.registry.clone(),
            image.repository.clone(),
            image.digest.clone(),
        );
        tokio::task::spawn_blocking(move || store.has_image(&registry, &repository, &digest))
            .await
            .unwrap_or(false)
    }

    /// Storage figures, and GC when due. GC runs whether or not images are
    /// transferring or failing: transfers pin what they use (see
    /// [`crate::store::Pins`]), and every image of the set counts as wanted,
    /// synced or not, each with its own Repository's retention.
    async fn housekeeping(&mut self) {
        self.book
            .set_storage(storage_report(self.engine.store()).await);
        self.refresh_held().await;
        let generation = self.desired.borrow().generation;
        // Generation 0: no set was ever received; nothing is known to be unwanted.
        if generation == 0 || Instant::now() < self.gc_at {
            return;
        }
        let wanted: Vec<gc::Wanted> = self
            .works
            .values()
            .map(|w| {
                let image = &w.pull.image;
                gc::Wanted {
                    id: (
                        image.registry.clone(),
                        image.repository.clone(),
                        image.digest.clone(),
                    ),
                    retention: image.retention(),
                }
            })
            .collect();
        let next_gc = self.collect(wanted).await;
        self.gc_at = Instant::now() + next_gc.min(GC_EVERY);
    }

    /// One GC pass on the blocking pool; returns when the next is due.
    async fn collect(&self, wanted: Vec<gc::Wanted>) -> Duration {
        let store = self.engine.store().clone();
        let policy = self.gc;
        match tokio::task::spawn_blocking(move || gc::collect(&store, &wanted, &[], &policy)).await
        {
            Ok(Ok(report)) => {
                if !report.images_removed.is_empty() || report.blobs_removed > 0 {
                    info!(
                        images = report.images_removed.len(),
                        blobs = report.blobs_removed,
                        bytes = report.bytes_freed,
                        "Collected content no longer desired"
                    );
                }
                if report.blobs_deferred > 0 {
                    // Transfers held some blobs: look again once they may be done.
                    GC_RETRY
                } else {
                    // A second more than the grace left, as plan counts whole seconds.
                    report
                        .next_due
                        .map_or(GC_EVERY, |d| d + Duration::from_secs(1))
                }
            }
            Ok(Err(e)) => {
                warn!(error = %e, "GC failed; will try again");
                GC_RETRY
            }
            Err(e) => {
                warn!(error = %e, "GC task failed");
                GC_RETRY
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_a_cap() {
        let cases = [(1, 2), (2, 4), (3, 8), (8, 256), (9, 300), (50, 300)];
        for (attempts, secs) in cases {
            assert_eq!(
                retry_delay(attempts),
                Duration::from_secs(secs),
                "attempt {attempts}"
            );
        }
    }
}
