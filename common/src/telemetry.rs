//! Logs and traces for the hub and the agent: one `tracing` subscriber with
//! the log output, and, only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, an OpenTelemetry layer that
//! exports spans over OTLP/gRPC. `OTEL_SERVICE_NAME` and
//! `OTEL_RESOURCE_ATTRIBUTES` are read as the OpenTelemetry conventions say;
//! without a service name the binary's own (`imgfleet-hub`,
//! `imgfleet-agent`) is used.
//!
//! Unset, tracing costs nothing beyond the log: no layer, no exporter, and
//! [`traceparent`] is empty, so nothing extra is stored or sent.
//!
//! A change's W3C trace context (`traceparent`) rides with the desired-set
//! entries it produced; [`traceparent`] reads it off the current span and
//! [`join`] makes a span its child on the other side.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

/// Set once an exporter runs; read on hot paths instead of asking the
/// subscriber.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// How the log is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// One JSON object a line instead of text.
    pub json: bool,
    /// Colour codes (on a terminal).
    pub ansi: bool,
    /// The filter when `RUST_LOG` is unset, e.g. `info`.
    pub default_filter: &'static str,
}

/// Why the trace exporter could not start.
#[derive(Debug, thiserror::Error)]
#[error("OTLP trace exporter ({endpoint}): {source}")]
pub struct TelemetryError {
    endpoint: String,
    #[source]
    source: opentelemetry_otlp::ExporterBuildError,
}

/// Flushes and stops the exporter when dropped (or by [`Telemetry::shutdown`]).
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The OTLP endpoint from the environment, if traces are to be exported.
fn endpoint() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
}

/// Installs the global subscriber: the log, and the trace exporter when the
/// environment asks for one. Call inside the tokio runtime (the gRPC
/// exporter runs on it). Keep the returned [`Telemetry`] until exit.
pub fn init(service: &'static str, log: LogOptions) -> Result<Telemetry, TelemetryError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(log.default_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(log.ansi);
    let fmt: Box<dyn Layer<_> + Send + Sync> = if log.json {
        Box::new(fmt.json())
    } else {
        Box::new(fmt)
    };
    let (otel, telemetry) = match endpoint() {
        None => (None, Telemetry::default()),
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|source| TelemetryError { endpoint, source })?;
            let mut resource = opentelemetry_sdk::Resource::builder().build();
            let named = resource
                .get(&opentelemetry::Key::new("service.name"))
                .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
            if !named {
                resource = opentelemetry_sdk::Resource::builder()
                    .with_service_name(service)
                    .build();
            }
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build();
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
            ENABLED.store(true, Ordering::Relaxed);
            (
                Some(layer),
                Telemetry {
                    provider: Some(provider),
                },
            )
        }
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .init();
    Ok(telemetry)
}

/// The W3C `traceparent` of `span`; empty when spans are not exported.
pub fn traceparent(span: &tracing::Span) -> String {
    if !enabled() {
        return String::new();
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent").unwrap_or_default()
}

/// Makes `span` a child of the span whose `traceparent` is given (from a
/// desired-set entry or request metadata); nothing when it is empty,
/// malformed, or spans are not exported.
pub fn join(span: &tracing::Span, traceparent: &str) {
    if !enabled() || traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    use opentelemetry::trace::TraceContextExt as _;
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}
