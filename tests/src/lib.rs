//! The real-component test harness shared by every end-to-end test: real etcd, a real
//! upstream registry, an OCI image generator, a fault-injecting TCP proxy, skopeo helpers, a
//! containerd on its own socket, launchers of the workspace's own hub, agent and CLI
//! (`fleet`), the YAML of the objects tests apply (`policy`), and a Prometheus that scrapes
//! them (`prometheus`), and an OTLP trace receiver (`otlp`).
//!
//! Everything the harness starts runs on free 127.0.0.1 ports in temporary directories, logs
//! to `target/test-logs/<test-binary>/`, waits on readiness (never a fixed sleep) and is
//! killed on drop. A missing component makes the test fail with the apt-get command that
//! installs it; nothing is skipped.
//!
//! ```text
//! let etcd = Etcd::start().await?;                       // etcd.endpoint() = http://127.0.0.1:P
//! let reg = Registry::start(RegistryOptions::default().with_auth("u", "p").with_tls()).await?;
//! let img = images::push_image(&reg, "team/app", "v1", &ImageSpec::random(&[1 << 20], 7)).await?;
//! let idx = images::push_index(&reg, "team/multi", "v1",
//!     &[("linux", "amd64"), ("linux", "arm64")], &ImageSpec::random(&[4096], 8)).await?;
//! let proxy = FaultProxy::start(reg.addr().parse()?).await?;   // point clients at proxy.addr()
//! proxy.set_throttle(Some(256 * 1024)); proxy.cut(); proxy.set_refuse(true); proxy.set_stall(true);
//! let digest = skopeo::inspect_digest(&reg.docker_ref("team/app:v1"),
//!     &reg.skopeo_args().iter().map(String::as_str).collect::<Vec<_>>()).await?;
//! ```
//!
//! The fault proxy and the skopeo helpers run on the caller's tokio runtime: do not block it
//! (std::process, std::thread::sleep) while they are in use.

pub mod artifacts;
pub mod containerd;
pub mod cosign;
pub mod etcd;
pub mod fault;
pub mod fleet;
pub mod images;
pub mod otlp;
pub mod policy;
pub mod process;
pub mod prometheus;
pub mod registry;
pub mod scanner;
pub mod skopeo;

pub use etcd::Etcd;
pub use fault::FaultProxy;
pub use process::{
    ChildGuard, find_binary, free_port, install_crypto_provider, log_dir, log_file, require_binary,
    tail_file, target_dir, test_log_dir, wait_until,
};
pub use registry::{Registry, RegistryOptions};
