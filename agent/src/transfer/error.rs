//! Why an image could not be brought in, and which of those reasons are
//! worth another attempt.

use std::time::Duration;

use imgfleet_common::registry::RegistryError;

use super::plan::WalkError;
use crate::store::StoreError;

/// Why an image could not be brought in.
///
/// Worth a retry ([`TransferError::is_retryable`]): a retryable registry
/// error and a body that ended early (the next attempt resumes from what
/// arrived). Final: digest and size mismatches, bad manifests, an invalid
/// image, a body longer than its descriptor.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The registry failed; see [`RegistryError::is_retryable`].
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The content store failed (a digest mismatch lands here too).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A manifest the engine cannot use.
    #[error(transparent)]
    Plan(#[from] WalkError),
    /// Content whose size is not the one its descriptor states: a blob
    /// already in the store, or the length the registry announced.
    #[error("{digest}: {actual} bytes, but the manifest says {expected}")]
    SizeMismatch {
        /// The blob or manifest.
        digest: String,
        /// The size in the descriptor.
        expected: u64,
        /// The size found.
        actual: u64,
    },
    /// A blob's body went on past the size its descriptor states.
    #[error("blob {digest}: more bytes than the {expected} the manifest says")]
    BodyTooLong {
        /// The blob.
        digest: String,
        /// The size in the descriptor.
        expected: u64,
    },
    /// A blob's body ended before the size its descriptor states; the
    /// bytes that arrived stay in the partial for the next attempt.
    #[error("blob {digest}: body ended at {at} of {expected} bytes")]
    BodyEnded {
        /// The blob.
        digest: String,
        /// Where the body ended.
        at: u64,
        /// The size in the descriptor.
        expected: u64,
    },
    /// The desired image itself is invalid.
    #[error("image {key}: {problem}")]
    Invalid {
        /// The image key.
        key: String,
        /// Which field is wrong.
        problem: InvalidImage,
    },
    /// The transfer ended, yet the store does not record the image.
    #[error("image {key}: transfer ended but the image is not recorded")]
    NotRecorded {
        /// The image key.
        key: String,
    },
    /// The image has no valid cosign signature under its Repository's keys
    /// (`verify`, enforce); it is not recorded, so the mirror never serves
    /// it. Not worth a blind retry: the next sync asks again.
    #[error("image {key}: VerificationFailed: {reason}")]
    VerificationFailed {
        /// The image key.
        key: String,
        /// Which key and why, as the policy check says.
        reason: String,
    },
    /// The engine's blob slots were closed: it is shutting down.
    #[error("blob {digest}: engine shut down")]
    ShutDown {
        /// The blob that was waiting.
        digest: String,
    },
    /// Blocking work handed off the async workers did not finish (it
    /// panicked, or the runtime is shutting down).
    #[error("{op}: blocking task did not finish: {source}")]
    Task {
        /// What the task was doing.
        op: &'static str,
        /// Why it did not finish.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Which field of a desired image is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidImage {
    /// The digest is not `sha256:<64 lowercase hex>`.
    #[error("digest {0:?}: expected sha256:<64 lowercase hex>")]
    Digest(String),
    /// The repository is not a distribution repository path.
    #[error("repository {0:?}: expected a path like library/nginx")]
    Repository(String),
    /// A tag is not a distribution tag.
    #[error("tag {0:?}: expected [A-Za-z0-9_.-], at most 128 characters")]
    Tag(String),
}

impl TransferError {
    /// Whether a later attempt may succeed: transport errors, 5xx and 429,
    /// a body cut short. Digest mismatches and bad manifests are final.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransferError::Registry(e) => e.is_retryable(),
            TransferError::BodyEnded { .. } => true,
            _ => false,
        }
    }

    /// The delay the registry asked for before a retry, if it said one.
    pub(super) fn retry_after(&self) -> Option<Duration> {
        match self {
            TransferError::Registry(e) => e.retry_after(),
            _ => None,
        }
    }

    /// Whether this is content that did not match its digest.
    pub fn is_digest_mismatch(&self) -> bool {
        matches!(
            self,
            TransferError::Store(StoreError::DigestMismatch { .. })
                | TransferError::Registry(RegistryError::DigestMismatch { .. })
        )
    }
}
