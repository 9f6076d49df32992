//! The real-component test harness shared by every end-to-end test: real etcd, a real
//! upstream registry, an OCI image generator, a fault-injecting TCP proxy and skopeo helpers.
//!
//! Everything the harness starts runs on free 127.0.0.1 ports in temporary directories, logs
//! to `target/test-logs/<test-binary>/`, waits on readiness (never a fixed sleep) and is
//! killed on drop. A missing component makes the test fail with the apt-get command that
//! installs it; nothing is skipped.

pub mod etcd;
pub mod process;
pub mod registry;
pub mod skopeo;

pub use etcd::Etcd;
pub use process::{
    ChildGuard, find_binary, free_port, install_crypto_provider, log_dir, log_file, require_binary, tail_file,
    target_dir, test_log_dir, wait_until,
};
pub use registry::{Registry, RegistryOptions};
pub mod images;
