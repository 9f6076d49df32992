//! The imgfleet hub: policy store, admin and agent services, placement, tag resolution.
pub mod admin;
pub mod ca;
pub mod config;
pub mod fleet;
pub mod leader;
pub mod metrics;
pub mod objects;
pub mod parts;
pub mod placement;
pub mod resolve_loop;
pub mod resolver;
pub mod secrets;
pub mod selector;
pub mod server;
pub mod session;
pub mod status;
pub mod store;
