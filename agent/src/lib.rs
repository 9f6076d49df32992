//! The imgfleet agent: content store, transfer engine, registry mirror.
//!
//! - [`store`] keeps verified blobs by digest in an OCI image layout, with
//!   resumable partial downloads beside it.
//! - [`transfer`] fetches desired images into the store: only the requested
//!   platforms, only missing blobs, several at once, resumable and verified.
//! - [`mirror`] serves what the store holds as a read-only OCI registry.
//! - [`gc`] removes content that is no longer desired.

pub mod store;
