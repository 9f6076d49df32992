//! The daemon's `/metrics` (Prometheus text), `/healthz` and `/readyz`:
//! what the reconciler, the session, the engine and the mirror count, read
//! when scraped.
//!
//! Two parts: the `imgfleet_agent_*` table below, and the seed's and the
//! operator's metrics (`image_*`) encoded by `prometheus-client`. The
//! exposition is Prometheus text 0.0.4, not OpenMetrics: the long-standing
//! gauge `imgfleet_agent_mirror_connections` and counter
//! `imgfleet_agent_mirror_connections_total` would be one family name twice
//! in OpenMetrics, and dashboards already read both.
//!
//! Cardinality: `image_sync_failures` and `image_sync_total` have one series
//! per Repository in the held desired set (no digest, no tag label), and
//! `image_pull_duration_seconds` one per handler and status code.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::desired::DesiredSet;
use crate::report::ProgressBook;
use crate::session::SessionStatus;
use crate::transfer::Engine;

/// What a scrape reads; every part is shared with the task that writes it.
#[derive(Clone)]
pub(super) struct MetricsState {
    pub(super) book: Arc<ProgressBook>,
    pub(super) status: Arc<SessionStatus>,
    pub(super) engine: Arc<Engine>,
    pub(super) desired: watch::Receiver<Arc<DesiredSet>>,
    pub(super) mirror: Arc<crate::mirror::Stats>,
}

pub(super) fn router(state: MetricsState) -> axum::Router {
    use axum::routing::get;
    let mut registry = Registry::default();
    registry.register(
        "image_pull_duration_seconds",
        "How long the mirror took to answer a node, from request head to last byte, by handler (manifest, blob, tags) and status code.",
        state.mirror.pulls.0.clone(),
    );
    registry.register_collector(Box::new(ImageCollector(state.clone())));
    let scrape = Scrape {
        state,
        registry: Arc::new(registry),
    };
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        // The mirror is bound and the held desired set loaded before this
        // listener serves: ready as soon as it answers.
        .route("/readyz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(
                |axum::extract::State(s): axum::extract::State<Scrape>| async move {
                    ([("content-type", "text/plain; version=0.0.4")], s.render())
                },
            ),
        )
        .with_state(scrape)
}

/// What `/metrics` renders: the table and the registry.
#[derive(Clone)]
struct Scrape {
    state: MetricsState,
    registry: Arc<Registry>,
}

impl Scrape {
    fn render(&self) -> String {
        let mut out = render(&self.state);
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// The per-Repository and storage metrics, read from the progress book at
/// each scrape.
#[derive(Clone)]
struct ImageCollector(MetricsState);

impl std::fmt::Debug for ImageCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageCollector").finish_non_exhaustive()
    }
}

impl Collector for ImageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let book = &self.0.book;
        let repos = book.repositories();
        let mut failures = encoder.encode_descriptor(
            "image_sync_failures",
            "Failed sync attempts in a row of the Repository's images (its worst image); 0 once they synced.",
            None,
            MetricType::Gauge,
        )?;
        for ((ns, name), state) in &repos {
            let labels = [("namespace", ns.as_str()), ("repository", name.as_str())];
            failures
                .encode_family(&labels)?
                .encode_gauge(&i64::from(state.consecutive_failures))?;
        }
        let mut total = encoder.encode_descriptor(
            "image_sync",
            "Finished sync attempts of the Repository's images, by result.",
            None,
            MetricType::Counter,
        )?;
        for ((ns, name), state) in &repos {
            for (result, value) in [("success", state.successes), ("failure", state.failures)] {
                let labels = [
                    ("namespace", ns.as_str()),
                    ("repository", name.as_str()),
                    ("result", result),
                ];
                total
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
            }
        }
        let storage = book.storage();
        encoder
            .encode_descriptor(
                "image_storage_usage_percent",
                "Used share of the content store's filesystem, 0 to 100.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&usage_percent(storage.used_bytes, storage.capacity_bytes))?;
        let (images, synced, failed) = book.counts();
        encoder
            .encode_descriptor(
                "imgfleet_agent_transfer_queue_depth",
                "Desired images neither synced nor failed: waiting for a transfer slot or transferring.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&(images.saturating_sub(synced + failed) as i64))?;
        Ok(())
    }
}

/// `used / capacity` in percent; 0 while the capacity is unknown.
pub fn usage_percent(used: u64, capacity: u64) -> f64 {
    if capacity == 0 {
        0.0
    } else {
        (used as f64 * 100.0 / capacity as f64).min(100.0)
    }
}

/// One metric: its name after `imgfleet_agent_`, its type, help and value.
type Metric = (&'static str, &'static str, &'static str, u64);

fn render(s: &MetricsState) -> String {
    let mut out = String::new();
    for (name, kind, help, value) in metrics(s) {
        let _ = writeln!(
            out,
            "# HELP imgfleet_agent_{name} {help}\n# TYPE imgfleet_agent_{name} {kind}\nimgfleet_agent_{name} {value}"
        );
    }
    out
}

fn metrics(s: &MetricsState) -> [Metric; 17] {
    let (images, synced, failed) = s.book.counts();
    let storage = s.book.storage();
    let engine = s.engine.counters();
    let generation = s.desired.borrow().generation;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (hub, m) = (&s.status, &s.mirror);
    // A table, one metric a line, rather than seventeen formatted blocks.
    #[rustfmt::skip]
    let table = [
        ("images_desired", "gauge", "Images in the held desired set.", images as u64),
        ("images_synced", "gauge", "Desired images synced and servable.", synced as u64),
        ("images_failed", "gauge", "Desired images whose last attempt failed.", failed as u64),
        ("desired_generation", "gauge", "Generation of the held desired set.", generation),
        ("hub_connected", "gauge", "1 while a hub session is up.", u64::from(hub.connected.load(Ordering::Relaxed))),
        ("hub_reconnects_total", "counter", "Hub sessions that ended and were retried.", load(&hub.reconnects)),
        ("storage_used_bytes", "gauge", "Bytes of verified content.", storage.used_bytes),
        ("storage_capacity_bytes", "gauge", "Capacity of the filesystem holding the store.", storage.capacity_bytes),
        ("bytes_received_total", "counter", "Blob bytes received from registries.", engine.bytes_received),
        ("blobs_completed_total", "counter", "Blobs completed and verified.", engine.blobs_completed),
        ("mirror_connections", "gauge", "Mirror connections open now.", load(&m.open)),
        ("mirror_connections_total", "counter", "Mirror connections accepted.", load(&m.accepted)),
        ("mirror_requests_total", "counter", "Mirror requests answered.", load(&m.requests)),
        ("mirror_stalled_total", "counter", "Mirror connections cut because the client stopped reading.", load(&m.stalled)),
        ("mirror_header_timeouts_total", "counter", "Mirror connections closed for not sending a request head in time.", load(&m.header_timeouts)),
        ("mirror_drained_total", "counter", "Idle mirror connections closed to make room at the connection limit.", load(&m.drained)),
        ("mirror_bad_requests_total", "counter", "Mirror requests refused as malformed or too large.", load(&m.bad_requests)),
    ];
    table
}
