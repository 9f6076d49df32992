//! The imgfleet agent: content store, transfer engine, registry mirror.
//!
//! - [`store`] keeps verified blobs by digest in an OCI image layout, with
//!   resumable partial downloads beside it.
//! - [`transfer`] fetches desired images into the store: only the requested
//!   platforms, only missing blobs, several at once, resumable and verified;
//!   each image planned ([`transfer::plan`], pure), fetched, then recorded.
//! - [`mirror`] serves what the store holds as a read-only OCI registry.
//! - [`gc`] removes content that is no longer desired, after a grace period,
//!   keeping the last versions of each repository for rollback.
//! - [`desired`] is the desired set received from the hub, kept on disk, and
//!   [`desired::DesiredImage`] the one shape of an image from the hub's
//!   message to the engine, GC and the edge push.
//! - [`session`] is the stream to the hub; [`wire`] the one place where its
//!   prost messages become the agent's types and back; [`report`] what the
//!   agent tells the hub about each image.
//! - [`daemon`] runs all of it; [`standalone`] turns RegistrySecret and
//!   Repository YAML into desired images for `imgfleet-agent sync --from
//!   FILE`; [`edge`] pushes synced images into a registry in the cluster.
//!
//! Invariant: the mirror serves only what the store records, and the store
//! records a manifest only after every blob it needs was verified by digest.

pub mod cli;
pub mod credentials;
pub mod daemon;
pub mod desired;
pub mod edge;
pub mod gc;
pub mod mirror;
pub mod report;
pub mod session;
pub mod settings;
pub mod standalone;
pub mod store;
pub mod transfer;
pub mod wire;
