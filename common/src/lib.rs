//! Daemon plumbing shared by the hub and the agent: the PKI and the
//! identities certificates carry ([`pki`]), mTLS configuration ([`tls`]),
//! the OCI registry client with which of its errors are worth a retry
//! ([`registry`]), cosign signature verification ([`cosign`]), and the
//! client of Harbor's scanner adapter API ([`scanner`]). Hub and agent depend
//! on this crate, never on each other.
pub mod cosign;
pub mod pki;
pub mod registry;
pub mod scanner;
pub mod tls;
