//! The imgfleet agent: content store, transfer engine, registry mirror.
