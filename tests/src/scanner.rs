//! A scanner adapter for tests, speaking Harbor's pluggable scanner adapter
//! API v1.2 (`GET /api/v1/metadata`, `POST /api/v1/scan`,
//! `GET /api/v1/scan/{id}/report` with `302` + `Refresh-After` while the
//! scan runs) and answering with recorded reports: no scanner or
//! vulnerability database can be installed here. The reports in
//! `scanner_reports/` were recorded in the shape Harbor's Trivy adapter
//! returns (`application/vnd.security.vulnerability.report; version=1.1`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

/// A report with a Critical finding (and a High and a Low).
pub const CRITICAL: &str = include_str!("scanner_reports/critical.json");
/// A report with only a Low finding.
pub const CLEAN: &str = include_str!("scanner_reports/clean.json");

#[derive(Default)]
struct Shared {
    /// Digest to its recorded report.
    reports: HashMap<String, &'static str>,
    /// Scan id to (digest, report polls so far).
    scans: HashMap<String, (String, u32)>,
    /// Scan requests received.
    requests: u32,
}

/// The adapter, on a free loopback port until dropped.
pub struct ScannerAdapter {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    shared: Arc<Mutex<Shared>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for ScannerAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScannerAdapter")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Drop for ScannerAdapter {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl ScannerAdapter {
    /// Starts an adapter answering `reports` (digest, recorded report);
    /// a digest without one is a 500, as an adapter that failed the scan.
    pub async fn start(reports: &[(&str, &'static str)]) -> Result<ScannerAdapter> {
        let shared = Arc::new(Mutex::new(Shared {
            reports: reports.iter().map(|(d, r)| (d.to_string(), *r)).collect(),
            ..Shared::default()
        }));
        let app = Router::new()
            .route("/api/v1/metadata", get(metadata))
            .route("/api/v1/scan", post(scan))
            .route("/api/v1/scan/{id}/report", get(report))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await;
        });
        Ok(ScannerAdapter { url, shared, stop })
    }

    /// Scan requests received so far.
    pub fn requests(&self) -> u32 {
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .requests
    }
}

fn json(status: StatusCode, content_type: &'static str, body: String) -> Response {
    (status, [("content-type", content_type)], body).into_response()
}

async fn metadata() -> Response {
    json(
        StatusCode::OK,
        "application/vnd.scanner.adapter.metadata+json; version=1.0",
        serde_json::json!({
            "scanner": {"name": "Trivy", "vendor": "Aqua Security", "version": "v0.58.1"},
            "capabilities": [{
                "type": "vulnerability",
                "consumes_mime_types": [
                    "application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json"
                ],
                "produces_mime_types": ["application/vnd.security.vulnerability.report; version=1.1"]
            }],
            "properties": {"harbor.scanner-adapter/scanner-type": "os-package-vulnerability"}
        })
        .to_string(),
    )
}

async fn scan(
    State(shared): State<Arc<Mutex<Shared>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let wanted = "application/vnd.scanner.adapter.scan.request+json";
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !ct.starts_with(wanted) {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("expected {wanted}"),
        )
            .into_response();
    }
    let Ok(req) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "expected a scan request").into_response();
    };
    let Some(digest) = req["artifact"]["digest"].as_str() else {
        return (StatusCode::UNPROCESSABLE_ENTITY, "artifact.digest missing").into_response();
    };
    let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
    s.requests += 1;
    let id = format!("scan-{}", s.requests);
    s.scans.insert(id.clone(), (digest.to_string(), 0));
    json(
        StatusCode::ACCEPTED,
        "application/vnd.scanner.adapter.scan.response+json; version=1.0",
        serde_json::json!({"id": id}).to_string(),
    )
}

async fn report(State(shared): State<Arc<Mutex<Shared>>>, Path(id): Path<String>) -> Response {
    let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
    let Some((digest, polls)) = s.scans.get_mut(&id) else {
        return (StatusCode::NOT_FOUND, "unknown scan id").into_response();
    };
    *polls += 1;
    // The first poll finds the scan still running, as a real one would.
    if *polls == 1 {
        return (StatusCode::FOUND, [("refresh-after", "1")]).into_response();
    }
    let digest = digest.clone();
    match s.reports.get(&digest) {
        Some(r) => json(
            StatusCode::OK,
            "application/vnd.security.vulnerability.report; version=1.1",
            r.replace("\"REPLACED\"", &format!("\"{digest}\"")),
        ),
        None => (StatusCode::INTERNAL_SERVER_ERROR, "scan failed").into_response(),
    }
}
