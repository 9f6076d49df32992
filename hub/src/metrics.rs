//! The hub's Prometheus metrics and the small HTTP server that exposes them:
//! `/metrics` in OpenMetrics text format, `/healthz` (liveness: the process
//! answers) and `/readyz` (readiness: the policy store answers too).
//!
//! Three groups: the hub's own `imgfleet_hub_*` counters, the resolver's
//! registry checks and resolution failures (`image_registry_checks_total`,
//! `imgfleet_hub_resolve_failures_total`, `imgfleet_hub_registry_status`),
//! written by the leading replica, and the fleet metrics from what agents
//! report (`crate::fleet`), attached once the agent API runs.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::store::PolicyStore;

type Labels = Vec<(&'static str, String)>;

/// Counters and gauges of one hub process. Cheap to clone.
#[derive(Clone)]
pub struct HubMetrics {
    registry: Arc<Registry>,
    admin_requests: Family<Labels, Counter>,
    applies: Family<Labels, Counter>,
    enrollments: Counter,
    watches: Gauge,
    registry_checks: Family<Labels, Counter>,
    registry_status: Family<Labels, Gauge>,
    resolutions: Family<Labels, Counter>,
    /// The fleet metrics, once the agent API runs in this process.
    fleet: Arc<OnceLock<Registry>>,
}

/// A registry health check's outcome, as `result` and `phase` labels show it.
pub const REGISTRY_PHASES: [&str; 4] = [
    "Connected",
    "AuthFailed",
    "Unreachable",
    "CredentialUnusable",
];

impl std::fmt::Debug for HubMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubMetrics").finish_non_exhaustive()
    }
}

impl Default for HubMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl HubMetrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        let registry_checks = Family::<Labels, Counter>::default();
        root.register(
            "image_registry_checks",
            "Registry health checks by the RegistrySecret's namespace, the registry and the result (Connected, AuthFailed, Unreachable, CredentialUnusable).",
            registry_checks.clone(),
        );
        let registry = root.sub_registry_with_prefix("imgfleet_hub");
        let admin_requests = Family::<Labels, Counter>::default();
        registry.register(
            "admin_requests",
            "Admin API requests by method and gRPC status code",
            admin_requests.clone(),
        );
        let applies = Family::<Labels, Counter>::default();
        registry.register(
            "applies",
            "Applied objects by kind and outcome",
            applies.clone(),
        );
        let enrollments = Counter::default();
        registry.register(
            "enrollments",
            "Clusters enrolled (certificates issued)",
            enrollments.clone(),
        );
        let watches = Gauge::default();
        registry.register("admin_watches", "Open admin Watch streams", watches.clone());
        let build = Family::<Labels, Gauge>::default();
        registry.register("build_info", "Version of the running hub", build.clone());
        build
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
            .set(1);
        let registry_status = Family::<Labels, Gauge>::default();
        registry.register(
            "registry_status",
            "1 for the phase of each RegistrySecret's last health check on the leading replica, 0 for the other phases.",
            registry_status.clone(),
        );
        let resolutions = Family::<Labels, Counter>::default();
        registry.register(
            "resolutions",
            "Tag resolutions of Repositories by result: success, or the failure reason (NotFound, AuthFailed, Unreachable, ...).",
            resolutions.clone(),
        );
        Self {
            registry: Arc::new(root),
            admin_requests,
            applies,
            enrollments,
            watches,
            registry_checks,
            registry_status,
            resolutions,
            fleet: Arc::new(OnceLock::new()),
        }
    }

    /// Counts one registry health check of RegistrySecret `namespace/name`
    /// on `registry` with its outcome `phase` (one of [`REGISTRY_PHASES`]).
    pub fn registry_checked(&self, namespace: &str, name: &str, registry: &str, phase: &str) {
        self.registry_checks
            .get_or_create(&vec![
                ("namespace", namespace.to_string()),
                ("registry", registry.to_string()),
                ("result", phase.to_string()),
            ])
            .inc();
        for p in REGISTRY_PHASES {
            self.registry_status
                .get_or_create(&status_labels(namespace, name, registry, p))
                .set(i64::from(p == phase));
        }
    }

    /// Forgets the health of a RegistrySecret that was deleted (or changed
    /// its registry).
    pub fn registry_forgotten(&self, namespace: &str, name: &str, registry: &str) {
        for p in REGISTRY_PHASES {
            self.registry_status
                .remove(&status_labels(namespace, name, registry, p));
        }
    }

    /// Counts one tag resolution: `"success"` or the failure reason.
    pub fn resolved(&self, result: &str) {
        self.resolutions
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
    }

    /// Adds the fleet metrics; the first call wins (one agent API a process).
    pub fn attach_fleet(&self, collector: crate::fleet::FleetCollector) {
        let mut fleet = Registry::default();
        fleet.register_collector(Box::new(collector));
        let _ = self.fleet.set(fleet);
    }

    /// Count one admin request with its outcome.
    pub fn admin_request(&self, method: &'static str, code: tonic::Code) {
        self.admin_requests
            .get_or_create(&vec![
                ("method", method.to_string()),
                ("code", format!("{code:?}")),
            ])
            .inc();
    }

    pub fn applied(&self, kind: &str, outcome: &str) {
        self.applies
            .get_or_create(&vec![
                ("kind", kind.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    pub fn enrolled(&self) {
        self.enrollments.inc();
    }

    /// Track one open Watch stream until the guard is dropped.
    pub fn watch_opened(&self) -> WatchGuard {
        self.watches.inc();
        WatchGuard(self.watches.clone())
    }

    /// The metrics in OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        if let Some(fleet) = self.fleet.get() {
            let _ = encode_registry(&mut out, fleet);
        }
        let _ = encode_eof(&mut out);
        out
    }
}

fn status_labels(namespace: &str, name: &str, registry: &str, phase: &str) -> Labels {
    vec![
        ("namespace", namespace.to_string()),
        ("registry_secret", name.to_string()),
        ("registry", registry.to_string()),
        ("phase", phase.to_string()),
    ]
}

/// Decrements the open-watch gauge when dropped.
#[derive(Debug)]
pub struct WatchGuard(Gauge);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How long a readiness check waits for the policy store. Probes (a load
/// balancer, Kubernetes) time out after a second or so themselves.
pub const READY_TIMEOUT: Duration = Duration::from_millis(800);
/// How long one readiness check's answer is reused, so that frequent probes
/// from several checkers cost the store one cheap read a second at most.
pub const READY_CACHE: Duration = Duration::from_secs(1);

/// One readiness answer and when it was taken.
type Checked = (Instant, Result<(), NotReady>);

/// Why the hub is not ready: its policy store does not answer.
#[derive(Debug, Clone)]
pub enum NotReady {
    /// The store answered with an error (shared: answers are cached).
    Store(Arc<crate::store::StoreError>),
    /// The store did not answer within [`READY_TIMEOUT`].
    Timeout,
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Shown after "policy store unavailable: ", so without the
            // store's own prefix.
            NotReady::Store(e) => match e.as_ref() {
                crate::store::StoreError::Unavailable(why) => f.write_str(why),
                other => write!(f, "{other}"),
            },
            NotReady::Timeout => write!(f, "no answer within {READY_TIMEOUT:?}"),
        }
    }
}

impl std::error::Error for NotReady {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NotReady::Store(e) => Some(e.as_ref()),
            NotReady::Timeout => None,
        }
    }
}

/// Whether the hub can serve: its policy store answers a cheap read (the
/// current revision) within [`READY_TIMEOUT`]. Cheap to clone.
#[derive(Clone)]
pub struct Readiness {
    store: Arc<dyn PolicyStore>,
    /// The last answer and when it was taken. The lock is held across a check,
    /// so concurrent probes wait for one check instead of starting their own.
    last: Arc<tokio::sync::Mutex<Option<Checked>>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness").finish_non_exhaustive()
    }
}

impl Readiness {
    pub fn new(store: Arc<dyn PolicyStore>) -> Self {
        Self {
            store,
            last: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// `Ok` when the store answered within the last [`READY_CACHE`], else why not.
    pub async fn check(&self) -> Result<(), NotReady> {
        let mut last = self.last.lock().await;
        if let Some((at, answer)) = last.as_ref()
            && at.elapsed() < READY_CACHE
        {
            return answer.clone();
        }
        let answer = match tokio::time::timeout(READY_TIMEOUT, self.store.revision()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(NotReady::Store(Arc::new(e))),
            Err(_) => Err(NotReady::Timeout),
        };
        *last = Some((Instant::now(), answer.clone()));
        answer
    }
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: HubMetrics,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let r = readiness.clone();
                async move {
                    match r.check().await {
                        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("policy store unavailable: {why}\n"),
                        ),
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Bind the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
