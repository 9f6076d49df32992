//! Helpers shared by the agent's integration tests: an engine on a temp data
//! dir, desired images from pushed ones, and a mirror on a free port.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use imgfleet_agent::desired::DesiredImage;
use imgfleet_agent::store::Store;
use imgfleet_agent::transfer::{Engine, EngineConfig, Pull, RetryPolicy};
use imgfleet_common::registry::Credentials;
use tokio_util::sync::CancellationToken;

/// An engine with quick retries over a store in `dir`.
pub fn engine(dir: &std::path::Path) -> Engine {
    engine_with(dir, EngineConfig::default())
}

pub fn engine_with(dir: &std::path::Path, mut config: EngineConfig) -> Engine {
    config.retry = RetryPolicy {
        max_retries: 8,
        min_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(500),
    };
    // Tests that do not choose a read timeout get a short one.
    if config.read_timeout == EngineConfig::default().read_timeout {
        config.read_timeout = Duration::from_secs(5);
    }
    let store = Arc::new(Store::open(dir).expect("open store"));
    Engine::new(store, config)
}

/// A desired image on a plain-HTTP registry at `addr`, pulled anonymously.
pub fn desired(addr: &str, repo: &str, digest: &str, tags: &[&str]) -> Pull {
    Pull {
        image: DesiredImage {
            key: format!("default/{repo}@{digest}"),
            source: ("default".into(), repo.into()),
            registry_key: "default/lab".into(),
            registry: addr.to_string(),
            repository: repo.to_string(),
            digest: digest.to_string(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            platforms: Vec::new(),
            keep_versions: 0,
            grace_period_seconds: 0,
            trace_context: String::new(),
            verify_keys: Vec::new(),
        },
        credentials: None,
        insecure: true,
    }
}

pub fn with_creds(mut p: Pull, user: &str, pass: &str) -> Pull {
    p.credentials = Some(Credentials::new(user, pass));
    p
}

/// A mirror over `store` on a free loopback port; stops when the token is dropped.
pub struct Mirror {
    pub addr: std::net::SocketAddr,
    stop: CancellationToken,
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn start_mirror(store: Arc<Store>) -> Mirror {
    start_mirror_with(store, imgfleet_agent::mirror::Limits::default())
        .await
        .0
}

/// A mirror with chosen limits, and its counters.
pub async fn start_mirror_with(
    store: Arc<Store>,
    limits: imgfleet_agent::mirror::Limits,
) -> (Mirror, Arc<imgfleet_agent::mirror::Stats>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let s = stop.clone();
    let stats = Arc::new(imgfleet_agent::mirror::Stats::default());
    let st = stats.clone();
    tokio::spawn(async move {
        let _ = imgfleet_agent::mirror::serve_with_stats(listener, store, limits, st, s).await;
    });
    (Mirror { addr, stop }, stats)
}

/// The path of a blob's data file in a distribution registry's storage.
pub fn registry_blob_file(storage: &std::path::Path, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    storage
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

/// Pushes `spec` to `repo:tag` on `reg`.
pub async fn push(
    reg: &imgfleet_tests::registry::Registry,
    repo: &str,
    tag: &str,
    spec: &imgfleet_tests::images::ImageSpec,
) -> imgfleet_tests::images::PushedImage {
    imgfleet_tests::images::push_image(reg, repo, tag, spec)
        .await
        .unwrap()
}

/// Pushes one random image per (repository, layer size, seed) as `v1`,
/// each on top of the same `base` layer.
pub async fn push_on_base<const N: usize>(
    reg: &imgfleet_tests::registry::Registry,
    base: imgfleet_tests::images::LayerSpec,
    images: [(&str, u64, u64); N],
) -> [imgfleet_tests::images::PushedImage; N] {
    let mut pushed = Vec::with_capacity(N);
    for (repo, size, seed) in images {
        let spec = imgfleet_tests::images::ImageSpec::random(&[size], seed).with_base(base);
        pushed.push(push(reg, repo, "v1", &spec).await);
    }
    pushed
        .try_into()
        .unwrap_or_else(|_| unreachable!("one image per entry"))
}

/// Pushes `spec` for linux/amd64 and linux/arm64 under one index, `repo:tag`.
pub async fn push_two_platforms(
    reg: &imgfleet_tests::registry::Registry,
    repo: &str,
    tag: &str,
    spec: &imgfleet_tests::images::ImageSpec,
) -> imgfleet_tests::images::PushedIndex {
    let platforms = [("linux", "amd64"), ("linux", "arm64")];
    imgfleet_tests::images::push_index(reg, repo, tag, &platforms, spec)
        .await
        .unwrap()
}

/// A fault proxy in front of `reg`, shared with tasks that cut or slow it.
pub async fn proxy_in_front(
    reg: &imgfleet_tests::registry::Registry,
) -> Arc<imgfleet_tests::fault::FaultProxy> {
    Arc::new(
        imgfleet_tests::fault::FaultProxy::start(reg.addr().parse().unwrap())
            .await
            .unwrap(),
    )
}

/// Waits for the proxy's connections of an interrupted transfer to close,
/// then lifts its throttle and counts afresh.
pub async fn count_afresh(proxy: &imgfleet_tests::fault::FaultProxy) {
    wait_for(
        "the old connection to close",
        Duration::from_secs(10),
        || proxy.connections() == 0,
    )
    .await;
    proxy.set_throttle(None);
    proxy.reset_counters();
}

/// Syncs `repo:v1`, as pushed to `reg`, into the engine's store.
pub async fn sync_v1(
    engine: &Engine,
    reg: &imgfleet_tests::registry::Registry,
    repo: &str,
    pushed: &imgfleet_tests::images::PushedImage,
) {
    let pull = desired(&reg.addr(), repo, &pushed.manifest_digest, &["v1"]);
    engine.sync_image(&pull, None).await.unwrap();
}

/// Waits until `f` is true, polling; fails after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The length of a file once it stops growing: two reads 100 ms apart
/// agree (a write already handed to the blocking pool lands within them).
pub async fn settled_len(p: &std::path::Path) -> u64 {
    let mut len = file_len(p);
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    interval.tick().await;
    loop {
        interval.tick().await;
        let now = file_len(p);
        if now == len {
            return len;
        }
        len = now;
    }
}

/// Size of a file, 0 if missing.
pub fn file_len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// RegistrySecret `lab` for `domain` (plain HTTP, with `auth` if given) and
/// one Repository per (name, repository, tag), all in namespace default.
pub fn yaml(domain: &str, auth: Option<(&str, &str)>, repos: &[(&str, &str, &str)]) -> String {
    let creds = auth
        .map(|(u, p)| format!("  username: {u}\n  password: {p}\n"))
        .unwrap_or_default();
    let mut out = format!(
        "apiVersion: image.theriseunion.io/v1alpha1\nkind: RegistrySecret\nmetadata:\n  name: lab\n  namespace: default\nspec:\n  domain: \"{domain}\"\n{creds}  insecure: true\n"
    );
    for (name, repo, tag) in repos {
        out.push_str(&format!(
            "---\napiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  repository: {repo}\n  tag: \"{tag}\"\n  registryRef:\n    name: lab\n"
        ));
    }
    out
}
