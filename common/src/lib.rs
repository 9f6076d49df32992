//! Daemon plumbing shared by the hub and the agent: telemetry, TLS identities,
//! registry access and retry policy. Hub and agent depend on this crate, never
//! on each other.
pub mod pki;
pub mod registry;
pub mod tls;
