//! The imgfleet hub: policy store, admin and agent services, placement, tag resolution.
pub mod admin;
pub mod ca;
pub mod config;
pub mod metrics;
pub mod objects;
pub mod parts;
pub mod placement;
pub mod resolver;
pub mod secrets;
pub mod selector;
pub mod server;
pub mod store;
