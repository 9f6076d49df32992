//! imgfleet: the resource model, the wire contract and the CLI.
//!
//! - [`api`] is the generated wire contract (`proto/imgfleet/v1`). Only the API
//!   edge knows these types; everything else works on the resource model.
//! - [`model`] is the resource model: RegistrySecret, Repository and Cluster,
//!   strict YAML reading and validation.
//! - [`convert`] maps the model to and from the wire contract.
//! - [`crd`] generates the Kubernetes CRDs in `deploy/crds/` from the model.
//! - [`process`] ends the command-line programs with an exit code.

mod api_debug;
pub mod codec;
pub mod convert;
pub mod crd;
pub mod model;
pub mod process;

/// The generated wire contract, package `imgfleet.v1`.
pub mod api {
    /// How the AdminService's message of an `Unavailable` answer starts when
    /// the hub is up but its policy store is not, so that clients can tell that
    /// apart from a hub they cannot reach.
    pub const STORE_UNAVAILABLE: &str = "policy store unavailable";

    /// The encoded `FileDescriptorSet` of `proto/imgfleet/v1` and its imports,
    /// served by the hub's gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/imgfleet_descriptor.bin"));

    #[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("imgfleet.v1");
    }
}
