//! The registry client's error type, with which variants are worth a retry.

use std::time::Duration;

/// What went wrong talking to a registry.
///
/// Retryable (see [`RegistryError::is_retryable`]): `Unreachable`, `Stalled`,
/// `RateLimited` (after `retry_after` when given) and `Http` with a 5xx status
/// or 408. Not retryable: `AuthFailed`, `NotFound`, `DigestMismatch`,
/// `TooLarge`, `Malformed` and `Http` with any other status; retrying those
/// only repeats the same answer.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry refused the credentials (or anonymous access).
    #[error("registry {registry}: authentication failed: {message}")]
    AuthFailed {
        /// Registry host.
        registry: String,
        /// What the registry or token service said.
        message: String,
    },
    /// The repository, manifest or blob does not exist.
    #[error("registry {registry}: {what} not found")]
    NotFound {
        /// Registry host.
        registry: String,
        /// What was asked for, e.g. `manifest demo/app:v1`.
        what: String,
    },
    /// DNS, TCP, TLS or timeout failure; the connection broke mid-body.
    #[error("registry {registry}: unreachable: {message}")]
    Unreachable {
        /// Registry host.
        registry: String,
        /// The transport error, flattened so that no URL with secrets leaks.
        message: String,
    },
    /// A body arrived too slowly: fewer bytes than the minimum progress in a
    /// whole window of waiting. The connection was dropped; a blob resumes
    /// by Range from what arrived.
    #[error("registry {registry}: {what} stalled: {message}")]
    Stalled {
        /// Registry host.
        registry: String,
        /// What was being received, e.g. `blob demo/app@sha256:..`.
        what: String,
        /// How little arrived in how long.
        message: String,
    },
    /// 429 Too Many Requests.
    #[error("registry {registry}: rate limited (retry after {retry_after:?})")]
    RateLimited {
        /// Registry host.
        registry: String,
        /// The Retry-After the registry asked for, if any.
        retry_after: Option<Duration>,
    },
    /// Content does not hash to the digest it was asked for by.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest that was asked for.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// A manifest larger than the limit.
    #[error("{what} is too large: {size} bytes, limit {limit}")]
    TooLarge {
        /// What was too large.
        what: String,
        /// Its size in bytes (at least).
        size: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The registry answered with something that is not what the protocol says.
    #[error("registry {registry}: malformed response: {message}")]
    Malformed {
        /// Registry host.
        registry: String,
        /// What was wrong.
        message: String,
    },
    /// Any other unexpected HTTP status.
    #[error("registry {registry}: unexpected HTTP status {status} for {what}")]
    Http {
        /// Registry host.
        registry: String,
        /// HTTP status code.
        status: u16,
        /// What was asked for.
        what: String,
    },
}

impl RegistryError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. }
            | RegistryError::Stalled { .. }
            | RegistryError::RateLimited { .. } => true,
            RegistryError::Http { status, .. } => *status >= 500 || *status == 408,
            _ => false,
        }
    }

    /// The delay the registry asked for before a retry, if it said one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RegistryError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
