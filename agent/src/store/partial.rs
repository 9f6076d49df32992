//! A partial blob download: an append-only file whose length is the resume
//! offset, hashed incrementally as bytes arrive.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::PathBuf;

use sha2::{Digest as _, Sha256};

use super::{StoreError, io_err};

/// Bytes buffered in memory before a write: bounds memory per transfer while
/// keeping the number of blocking writes low.
const BUFFER: usize = 1024 * 1024;

/// An unfinished blob. Bytes are appended in order; the hash covers every
/// byte in the file, including those found there when it was opened.
#[derive(Debug)]
pub struct PartialBlob {
    digest: String,
    path: PathBuf,
    file: Option<File>,
    hasher: Option<Sha256>,
    buf: Vec<u8>,
    /// Bytes on disk (excluding `buf`).
    written: u64,
    /// Bytes found on disk at open.
    resumed_from: u64,
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
            file: Some(file),
            hasher: Some(hasher),
            buf: Vec::with_capacity(BUFFER),
            written,
            resumed_from: written,
        })
    }

    /// The digest this partial is for.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Bytes received so far (the offset to resume from).
    pub fn offset(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    /// Bytes that were already on disk when this partial was opened.
    pub fn resumed_from(&self) -> u64 {
        self.resumed_from
    }

    /// Appends bytes; writes to disk in 1 MiB batches on the blocking pool.
    pub async fn append(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= BUFFER {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes and hashes the buffered bytes.
    pub async fn flush(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let (Some(mut file), Some(mut hasher)) = (self.file.take(), self.hasher.take()) else {
            return Err(io_err("writing partial", &self.path)(
                std::io::Error::other("partial already finished"),
            ));
        };
        let buf = std::mem::take(&mut self.buf);
        let path = self.path.clone();
        let (file, hasher, mut buf, result) = tokio::task::spawn_blocking(move || {
            hasher.update(&buf);
            let r = file.write_all(&buf);
            (file, hasher, buf, r)
        })
        .await
        .map_err(|e| io_err("writing partial", &path)(std::io::Error::other(e.to_string())))?;
        self.file = Some(file);
        result.map_err(io_err("writing partial", &self.path))?;
        // Only count the bytes as hashed once they are on disk, so that the
        // hash and the file length never disagree.
        self.hasher = Some(hasher);
        self.written += buf.len() as u64;
        buf.clear();
        self.buf = buf;
        Ok(())
    }

    /// Flushes, fsyncs and returns (path, sha256 digest, length).
    pub(super) fn finish(mut self) -> Result<(PathBuf, String, u64), StoreError> {
        let file = self.file.take();
        let hasher = self.hasher.take();
        let (Some(mut file), Some(mut hasher)) = (file, hasher) else {
            return Err(io_err("finishing partial", &self.path)(
                std::io::Error::other("partial in an unusable state"),
            ));
        };
        if !self.buf.is_empty() {
            hasher.update(&self.buf);
            file.write_all(&self.buf)
                .map_err(io_err("writing partial", &self.path))?;
            self.written += self.buf.len() as u64;
        }
        file.sync_all().map_err(io_err("fsync", &self.path))?;
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        Ok((self.path.clone(), digest, self.written))
    }

    /// Empties the partial to start the blob over (its bytes were wrong, or
    /// the registry ignored Range and sends everything again).
    pub fn truncate(&mut self) -> Result<(), StoreError> {
        let file = self.file.as_mut().ok_or_else(|| {
            io_err("truncating partial", &self.path)(std::io::Error::other(
                "partial in an unusable state",
            ))
        })?;
        file.set_len(0)
            .map_err(io_err("truncating partial", &self.path))?;
        self.hasher = Some(Sha256::new());
        self.buf.clear();
        self.written = 0;
        self.resumed_from = 0;
        Ok(())
    }

    /// Deletes the partial (its bytes were wrong or are not wanted).
    pub fn discard(mut self) -> Result<(), StoreError> {
        self.file = None;
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing partial", &self.path)(e)),
        }
    }
}
