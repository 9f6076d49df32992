//! The transfer of one blob: deduplicated across images, retried with
//! backoff, resumed by HTTP Range from the partial on disk, verified and
//! committed (the resume helper of containerd's `content/helpers.go`, and
//! its writer's `Commit(size, expected)`).

use std::sync::atomic::{AtomicBool, Ordering};

use backon::Retryable;
use imgfleet_common::registry::RegistryClient;
use tracing::{debug, warn};

use super::plan::BlobRef;
use super::progress::Tracker;
use super::{Engine, TransferError, adjust_delay, blocking, presence};
use crate::store::{PartialBlob, StoreError};

/// What one download attempt got.
#[derive(Debug, Clone, Copy, Default)]
struct Attempt {
    /// Bytes received over the network in this attempt.
    received: u64,
    /// Whether bytes an earlier attempt (or process) left in the partial
    /// were kept: a digest mismatch may then be their fault.
    resumed: bool,
}

/// A download attempt that failed, with what it got before it did.
#[derive(Debug)]
struct AttemptFailed {
    error: TransferError,
    got: Attempt,
}

impl AttemptFailed {
    fn before_start(error: impl Into<TransferError>) -> Self {
        AttemptFailed {
            error: error.into(),
            got: Attempt::default(),
        }
    }
}

impl Engine {
    /// Fetches one blob unless present; concurrent requests for the same
    /// digest (from any image) wait for the first. Returns the bytes received
    /// when this call downloaded it, `None` when someone else did.
    pub(super) async fn fetch_blob(
        &self,
        client: &RegistryClient,
        repository: &str,
        blob: &BlobRef,
        tracker: &Tracker,
    ) -> Result<Option<u64>, TransferError> {
        let lock = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(blob.digest.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        let one = std::slice::from_ref(blob);
        if presence(one, self.blob_sizes(one).await?)?.first() == Some(&true) {
            tracker.bytes_done.fetch_add(blob.size, Ordering::Relaxed);
            return Ok(None);
        }
        let _slot = self
            .blob_slots
            .acquire()
            .await
            .map_err(|_| TransferError::ShutDown {
                digest: blob.digest.clone(),
            })?;
        let result = self.download_blob(client, repository, blob, tracker).await;
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&blob.digest);
        result.map(Some)
    }

    /// Downloads with retries. A digest mismatch after resuming a partial may
    /// be the partial's fault: that case restarts once from zero.
    async fn download_blob(
        &self,
        client: &RegistryClient,
        repository: &str,
        blob: &BlobRef,
        tracker: &Tracker,
    ) -> Result<u64, TransferError> {
        let mut fresh_start = false;
        let mut received = 0u64;
        loop {
            // Only the first attempt after a mismatch empties the partial;
            // later attempts resume what that one wrote.
            let truncate = AtomicBool::new(fresh_start);
            let result = (|| {
                self.download_attempt(
                    client,
                    repository,
                    blob,
                    tracker,
                    truncate.swap(false, Ordering::Relaxed),
                )
            })
            .retry(self.backoff())
            .when(|f: &AttemptFailed| f.error.is_retryable())
            .adjust(|f: &AttemptFailed, d| adjust_delay(f.error.retry_after(), d))
            .notify(|f: &AttemptFailed, d| {
                received += f.got.received;
                warn!(digest = %blob.digest, error = %f.error, delay = ?d, "Blob transfer failed; resuming");
            })
            .await;
            match result {
                Ok(got) => {
                    self.counters
                        .blobs_completed
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(received + got.received);
                }
                Err(f) => {
                    received += f.got.received;
                    if f.error.is_digest_mismatch() && f.got.resumed && !fresh_start {
                        warn!(digest = %blob.digest, "Resumed blob failed verification; the partial was bad, downloading from the start");
                        fresh_start = true;
                        continue;
                    }
                    return Err(f.error);
                }
            }
        }
    }

    /// One attempt: open the partial (re-hashing it), ask for the rest, append
    /// chunk by chunk, then verify and commit.
    async fn download_attempt(
        &self,
        client: &RegistryClient,
        repository: &str,
        blob: &BlobRef,
        tracker: &Tracker,
        fresh_start: bool,
    ) -> Result<Attempt, AttemptFailed> {
        let mut partial = self
            .open_partial(blob, fresh_start)
            .await
            .map_err(AttemptFailed::before_start)?;
        let start_offset = partial.offset();
        let mut got = Attempt {
            received: 0,
            resumed: start_offset > 0,
        };
        // Count what is already on disk as progress once.
        tracker
            .bytes_done
            .fetch_add(start_offset, Ordering::Relaxed);
        let result = self
            .receive(client, repository, blob, tracker, &mut partial, &mut got)
            .await;
        if let Err(error) = result {
            // Keep what arrived for the next attempt; progress restarts
            // counting from the partial's length then.
            let _ = partial.flush().await;
            tracker.bytes_done.fetch_sub(
                (start_offset + got.received).min(tracker.bytes_done.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
            return Err(AttemptFailed { error, got });
        }
        let (store, size) = (self.store.clone(), blob.size);
        blocking("committing a blob", move || {
            store.commit_partial(partial, size)
        })
        .await
        .map(|_| got)
        .map_err(|error| AttemptFailed { error, got })
    }

    /// Opens the partial of a blob on the blocking pool (opening re-hashes
    /// the bytes on disk), emptied for a fresh start or when it is longer
    /// than the blob can be.
    async fn open_partial(
        &self,
        blob: &BlobRef,
        fresh_start: bool,
    ) -> Result<PartialBlob, TransferError> {
        let (store, digest, size) = (self.store.clone(), blob.digest.clone(), blob.size);
        blocking("opening a partial", move || {
            let mut p = store.open_partial(&digest)?;
            if fresh_start && p.resumed_from() > 0 {
                p.truncate()?;
            } else if p.offset() > size {
                debug!(digest = %digest, "Partial longer than the blob; starting over");
                p.truncate()?;
            }
            Ok::<_, StoreError>(p)
        })
        .await
    }

    /// Receives the rest of a blob into its partial, counting into `got`,
    /// and writes the last batch, so that the blocking commit never waits
    /// for it.
    async fn receive(
        &self,
        client: &RegistryClient,
        repository: &str,
        blob: &BlobRef,
        tracker: &Tracker,
        partial: &mut PartialBlob,
        got: &mut Attempt,
    ) -> Result<(), TransferError> {
        if partial.offset() < blob.size || blob.size == 0 {
            self.counters.blob_requests.fetch_add(1, Ordering::Relaxed);
            let mut stream = client
                .get_blob(repository, &blob.digest, partial.offset())
                .await?;
            // A registry that announces another length cannot send the
            // blob the manifest describes: fail now, not after retries.
            if let Some(total) = stream.total.filter(|t| *t != blob.size) {
                return Err(TransferError::SizeMismatch {
                    digest: blob.digest.clone(),
                    expected: blob.size,
                    actual: total,
                });
            }
            if stream.start != partial.offset() {
                // The registry ignored Range and sends the whole blob.
                debug!(digest = %blob.digest, "Registry ignored Range; restarting the blob");
                tracker
                    .bytes_done
                    .fetch_sub(partial.offset(), Ordering::Relaxed);
                partial.restart().await?;
                got.resumed = false;
            }
            while let Some(chunk) = stream.chunk().await? {
                let len = chunk.len() as u64;
                if partial.offset() + len > blob.size {
                    return Err(TransferError::BodyTooLong {
                        digest: blob.digest.clone(),
                        expected: blob.size,
                    });
                }
                if let Some(l) = &self.limiter {
                    l.acquire(len).await;
                }
                // Batches are hashed and written while the next arrives.
                partial.append(&chunk).await?;
                got.received += len;
                self.counters
                    .bytes_received
                    .fetch_add(len, Ordering::Relaxed);
                tracker.add_bytes(len);
            }
            if partial.offset() < blob.size {
                return Err(TransferError::BodyEnded {
                    digest: blob.digest.clone(),
                    at: partial.offset(),
                    expected: blob.size,
                });
            }
        }
        partial.flush().await?;
        Ok(())
    }
}
