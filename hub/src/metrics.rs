//! The hub's Prometheus metrics and the small HTTP server that exposes them
//! (`/metrics` in Prometheus text format, `/healthz`).

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

type Labels = Vec<(&'static str, String)>;

/// Counters and gauges of one hub process. Cheap to clone.
#[derive(Clone)]
pub struct HubMetrics {
    registry: Arc<Registry>,
    admin_requests: Family<Labels, Counter>,
    applies: Family<Labels, Counter>,
    enrollments: Counter,
    watches: Gauge,
}

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
        let mut registry = Registry::with_prefix("imgfleet_hub");
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
        Self {
            registry: Arc::new(registry),
            admin_requests,
            applies,
            enrollments,
            watches,
        }
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

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Decrements the open-watch gauge when dropped.
#[derive(Debug)]
pub struct WatchGuard(Gauge);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serve `/metrics` and `/healthz` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: HubMetrics,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
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
        .route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Bind the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
