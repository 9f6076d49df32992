//! Daemon plumbing shared by the hub and the agent: the PKI and the
//! identities certificates carry ([`pki`]), mTLS configuration ([`tls`]),
//! tenant-scoped pull tokens for the mirror ([`pull_token`]),
//! the OCI registry client with which of its errors are worth a retry
//! ([`registry`]), cosign signature verification ([`cosign`]), and the
//! client of Harbor's scanner adapter API ([`scanner`]). Hub and agent depend
//! on this crate, never on each other.
pub mod cosign;
pub mod pki;
pub mod pull_token;
pub mod registry;
pub mod scanner;
pub mod telemetry;
pub mod tls;
