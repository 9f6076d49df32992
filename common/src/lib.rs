//! Daemon plumbing shared by the hub and the agent: the PKI and the
//! identities certificates carry ([`pki`]), mTLS configuration ([`tls`]),
//! tenant-scoped pull tokens for the mirror ([`pull_token`]),
//! and the OCI registry client with which of its errors are worth a retry
//! ([`registry`]). Hub and agent depend on this crate, never on each other.
pub mod pki;
pub mod pull_token;
pub mod registry;
pub mod telemetry;
pub mod tls;
