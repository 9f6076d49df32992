//! The imgfleet hub: policy store, admin and agent services, placement, tag resolution.
pub mod store;
pub mod placement;
pub mod secrets;
pub mod ca;
pub mod config;
pub mod resolver;
pub mod admin;
pub mod metrics;
pub mod objects;
pub mod selector;
pub mod server;
