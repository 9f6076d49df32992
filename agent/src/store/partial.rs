//! A partial blob download: an append-only file whose length is the resume
//! offset, hashed incrementally as bytes arrive.
//!
//! Bytes are gathered into a 1 MiB batch; a full batch is hashed and written
//! on the blocking pool while the caller goes on receiving into a second
//! buffer, so the network is not left waiting during each batch's hash and
//! write. The two buffers are reused for the whole blob. (Keeping the HTTP
//! client's own buffers instead of copying them was tried and was slower: the
//! client can then no longer reuse its read buffer, and the fresh pages it
//! allocates cost more in page faults than the copy does.) Every 8 MiB the
//! kernel is asked to start writing the bytes to disk, so that the one fsync
//! per blob at its end has little left to flush.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::PathBuf;

use sha2::{Digest as _, Sha256};
use tokio::task::JoinHandle;

use super::{StoreError, io_err};

/// Bytes gathered in memory before a write: bounds memory per transfer (two
/// batches: one being written, one gathering) while keeping the number of
/// blocking writes low.
const BUFFER: usize = 1024 * 1024;

/// Written bytes after which their writeback to disk is started.
const WRITEBACK: u64 = 8 * 1024 * 1024;

/// What a batch write hands back: the file and hasher (moved to the blocking
/// thread and back), the outcome and the batch's buffer (for reuse).
type Written = (File, Sha256, std::io::Result<()>, Vec<u8>);

/// An unfinished blob. Bytes are appended in order; the hash covers every
/// byte in the file, including those found there when it was opened.
#[derive(Debug)]
pub struct PartialBlob {
    digest: String,
    path: PathBuf,
    /// The file and the hash of its bytes; `None` while a batch is being
    /// written, and for good after a failed write (the next attempt opens
    /// the partial again and re-hashes what reached the disk).
    file: Option<(File, Sha256)>,
    /// The batch being written, if any.
    writing: Option<JoinHandle<Written>>,
    /// Bytes in the batch being written.
    writing_len: u64,
    /// Bytes gathered for the next batch.
    buf: Vec<u8>,
    /// The other buffer, back from its write.
    spare: Option<Vec<u8>>,
    /// Bytes on disk (excluding the batch in flight and the gathered bytes).
    written: u64,
    /// Bytes found on disk at open.
    resumed_from: u64,
    /// Bytes before this offset have had their writeback started.
    advised: u64,
}

impl PartialBlob {
    /// Opens or creates the file and re-hashes what it holds.
    pub(super) fn open(digest: String, path: PathBuf) -> Result<PartialBlob, StoreError> {
        let mut file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_err("opening partial", &path))?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        let mut chunk = vec![0u8; BUFFER];
        loop {
            let n = file
                .read(&mut chunk)
                .map_err(io_err("re-hashing partial", &path))?;
            if n == 0 {
                break;
            }
            hasher.update(&chunk[..n]);
            written += n as u64;
        }
        Ok(PartialBlob {
            digest,
            path,
            file: Some((file, hasher)),
            writing: None,
            writing_len: 0,
            buf: Vec::new(),
            spare: None,
            written,
            resumed_from: written,
            advised: written,
        })
    }

    /// The digest this partial is for.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Bytes received so far (the offset to resume from).
    pub fn offset(&self) -> u64 {
        self.written + self.writing_len + self.buf.len() as u64
    }

    /// Bytes that were already on disk when this partial was opened.
    pub fn resumed_from(&self) -> u64 {
        self.resumed_from
    }

    /// Appends bytes. Once 1 MiB has gathered it is hashed and written on
    /// the blocking pool while this returns; a write error surfaces on a
    /// later call (at the latest from [`flush`]).
    ///
    /// [`flush`]: PartialBlob::flush
    pub async fn append(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(BUFFER);
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= BUFFER {
            self.wait_written().await?;
            self.start_write()?;
        }
        Ok(())
    }

    /// Writes and hashes every byte appended so far.
    pub async fn flush(&mut self) -> Result<(), StoreError> {
        self.wait_written().await?;
        if !self.buf.is_empty() {
            self.start_write()?;
            self.wait_written().await?;
        }
        Ok(())
    }

    /// Hands the gathered bytes to the blocking pool to be hashed and
    /// written. At most one batch is in flight (the caller waited).
    fn start_write(&mut self) -> Result<(), StoreError> {
        let Some((mut file, mut hasher)) = self.file.take() else {
            return Err(self.unusable("writing partial"));
        };
        let next = self
            .spare
            .take()
            .unwrap_or_else(|| Vec::with_capacity(BUFFER));
        let buf = std::mem::replace(&mut self.buf, next);
        self.writing_len = buf.len() as u64;
        // Writeback is started every WRITEBACK bytes rather than per batch:
        // each call may wait for every CPU to drain its page lists, which
        // cost more than it saved when the CPUs were busy.
        let end = self.written + buf.len() as u64;
        let writeback = (end - self.advised >= WRITEBACK).then(|| {
            let range = (self.advised, end - self.advised);
            self.advised = end;
            range
        });
        self.writing = Some(tokio::task::spawn_blocking(move || {
            hasher.update(&buf);
            let result = file.write_all(&buf);
            if let (Ok(()), Some((at, len))) = (&result, writeback) {
                start_writeback(&file, at, len);
            }
            (file, hasher, result, buf)
        }));
        Ok(())
    }

    /// Waits for the batch in flight, if any.
    async fn wait_written(&mut self) -> Result<(), StoreError> {
        match self.writing.take() {
            Some(handle) => {
                let done = handle.await;
                self.settle(done)
            }
            None => Ok(()),
        }
    }

    /// Waits for the batch in flight from synchronous code (commit, truncate),
    /// blocking the thread; the engine flushes before those, so this only
    /// waits when a caller did not.
    fn wait_written_blocking(&mut self) -> Result<(), StoreError> {
        match self.writing.take() {
            Some(handle) => {
                let done = futures::executor::block_on(handle);
                self.settle(done)
            }
            None => Ok(()),
        }
    }

    fn settle(&mut self, done: Result<Written, tokio::task::JoinError>) -> Result<(), StoreError> {
        self.writing_len = 0;
        let (file, hasher, result, mut buf) = done.map_err(|e| {
            io_err("writing partial", &self.path)(std::io::Error::other(e.to_string()))
        })?;
        // Only count the bytes as hashed once they are on disk, so that the
        // hash and the file length never disagree: after a failed write the
        // partial stays unusable and the next attempt re-hashes the file.
        result.map_err(io_err("writing partial", &self.path))?;
        self.file = Some((file, hasher));
        self.written += buf.len() as u64;
        buf.clear();
        self.spare = Some(buf);
        Ok(())
    }

    fn unusable(&self, op: &'static str) -> StoreError {
        io_err(op, &self.path)(std::io::Error::other(
            "partial in an unusable state after a failed write",
        ))
    }

    /// Flushes, fsyncs and returns (path, sha256 digest, length).
    pub(super) fn finish(mut self) -> Result<(PathBuf, String, u64), StoreError> {
        self.wait_written_blocking()?;
        let Some((mut file, mut hasher)) = self.file.take() else {
            return Err(self.unusable("finishing partial"));
        };
        if !self.buf.is_empty() {
            hasher.update(&self.buf);
            file.write_all(&self.buf)
                .map_err(io_err("writing partial", &self.path))?;
            self.written += self.buf.len() as u64;
            self.buf.clear();
        }
        // One fsync per blob, after its last byte: the blob becomes visible
        // (renamed into blobs/) only after this.
        file.sync_all().map_err(io_err("fsync", &self.path))?;
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        Ok((self.path.clone(), digest, self.written))
    }

    /// Empties the partial to start the blob over (its bytes were wrong, or
    /// the registry ignored Range and sends everything again). Blocking; see
    /// [`restart`] for async callers.
    ///
    /// [`restart`]: PartialBlob::restart
    pub fn truncate(&mut self) -> Result<(), StoreError> {
        self.wait_written_blocking()?;
        let Some((file, _)) = self.file.take() else {
            return Err(self.unusable("truncating partial"));
        };
        file.set_len(0)
            .map_err(io_err("truncating partial", &self.path))?;
        self.emptied(file);
        Ok(())
    }

    /// [`truncate`] for async callers: the batch in flight is awaited and
    /// the file emptied on the blocking pool.
    ///
    /// [`truncate`]: PartialBlob::truncate
    pub async fn restart(&mut self) -> Result<(), StoreError> {
        self.wait_written().await?;
        let Some((file, _)) = self.file.take() else {
            return Err(self.unusable("truncating partial"));
        };
        let emptied = tokio::task::spawn_blocking(move || file.set_len(0).map(|()| file))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(io_err("truncating partial", &self.path))?;
        self.emptied(emptied);
        Ok(())
    }

    /// Starts over on a file just emptied.
    fn emptied(&mut self, file: File) {
        self.file = Some((file, Sha256::new()));
        self.buf.clear();
        self.written = 0;
        self.resumed_from = 0;
        self.advised = 0;
    }

    /// Deletes the partial (its bytes were wrong or are not wanted).
    pub fn discard(mut self) -> Result<(), StoreError> {
        // A write still in flight must not recreate the bytes after removal.
        let _ = self.wait_written_blocking();
        self.file = None;
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing partial", &self.path)(e)),
        }
    }
}

/// Asks the kernel to start writing a batch to disk now, so that the blob's
/// final fsync finds most of it written instead of flushing the whole blob
/// while the transfer waits. `POSIX_FADV_DONTNEED` on dirty pages starts
/// their writeback (like `sync_file_range(SYNC_FILE_RANGE_WRITE)`, which nix
/// does not offer) and leaves them cached, since pages being written cannot
/// be dropped. Only advice: durability still comes from the fsync.
fn start_writeback(file: &File, at: u64, len: u64) {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    let (Ok(at), Ok(len)) = (i64::try_from(at), i64::try_from(len)) else {
        return;
    };
    let _ = posix_fadvise(file, at, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}
