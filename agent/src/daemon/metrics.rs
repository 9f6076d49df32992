//! The daemon's `/metrics` (Prometheus text) and `/healthz`: what the
//! reconciler, the session, the engine and the mirror count, read when
//! scraped.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(
                |axum::extract::State(s): axum::extract::State<MetricsState>| async move {
                    ([("content-type", "text/plain; version=0.0.4")], render(&s))
                },
            ),
        )
        .with_state(state)
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
