//! The imgfleet hub: policy store, admin and agent services, placement, tag resolution.
pub mod store;
