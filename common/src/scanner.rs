//! A client of Harbor's pluggable scanner adapter API (v1.2), so that any
//! Trivy or Clair adapter can gate what ships: `GET /api/v1/metadata`,
//! `POST /api/v1/scan`, and `GET /api/v1/scan/{id}/report`, which answers
//! `302` with `Refresh-After` while the scan runs.
//!
//! [`Summary`] and [`Severity`] are the pure part: counts per severity and
//! whether a report blocks at a threshold.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE};

/// The scan request media type.
pub const SCAN_REQUEST: &str = "application/vnd.scanner.adapter.scan.request+json; version=1.0";
/// The vulnerability report media type the hub asks for.
pub const VULN_REPORT: &str = "application/vnd.security.vulnerability.report; version=1.1";
/// The artifact media type of an OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The largest report read (a report lists every finding; big images have
/// thousands).
pub const MAX_REPORT_BYTES: usize = 32 * 1024 * 1024;

/// A finding's severity, lowest first, as the API names them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize, serde::Serialize,
)]
pub enum Severity {
    /// Not rated.
    Unknown,
    /// Below Low.
    Negligible,
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
    /// Critical.
    Critical,
}

/// What a report found: findings per severity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Count per severity (only severities found).
    pub counts: BTreeMap<Severity, u32>,
}

impl Summary {
    /// The highest severity found, if any.
    pub fn highest(&self) -> Option<Severity> {
        self.counts.keys().next_back().copied()
    }

    /// Whether a finding at or above `threshold` was found.
    pub fn blocks(&self, threshold: Severity) -> bool {
        self.highest().is_some_and(|h| h >= threshold)
    }

    /// `Critical: 1, High: 3` (highest first), or `no findings`.
    pub fn describe(&self) -> String {
        if self.counts.is_empty() {
            return "no findings".to_string();
        }
        self.counts
            .iter()
            .rev()
            .map(|(s, n)| format!("{s:?}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Counts a report's findings (its `vulnerabilities[].severity`).
    pub fn of_report(bytes: &[u8]) -> Result<Summary, String> {
        #[derive(serde::Deserialize)]
        struct Finding {
            severity: Severity,
        }
        #[derive(serde::Deserialize)]
        struct Report {
            #[serde(default)]
            vulnerabilities: Vec<Finding>,
        }
        let report: Report = serde_json::from_slice(bytes)
            .map_err(|e| format!("expected a vulnerability report: {e}"))?;
        let mut counts = BTreeMap::new();
        for f in report.vulnerabilities {
            *counts.entry(f.severity).or_insert(0) += 1;
        }
        Ok(Summary { counts })
    }
}

/// Why a scan did not give a result. Every variant holds the image back
/// (a scanner that cannot answer never lets a new digest through).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The adapter could not be reached, or broke off.
    #[error("scanner {adapter}: unreachable: {message}")]
    Unreachable {
        /// The adapter URL.
        adapter: String,
        /// The transport error.
        message: String,
    },
    /// The adapter answered something the API does not say.
    #[error("scanner {adapter}: {message}")]
    Protocol {
        /// The adapter URL.
        adapter: String,
        /// What was wrong.
        message: String,
    },
    /// The scan was still running when the wait ended.
    #[error("scanner {adapter}: scan {id} still running after {waited:?}")]
    StillRunning {
        /// The adapter URL.
        adapter: String,
        /// The scan request id.
        id: String,
        /// How long it was waited for.
        waited: Duration,
    },
}

/// What to scan: the image by digest, and how the adapter reaches its
/// registry.
#[derive(Clone)]
pub struct ScanTarget {
    /// The registry URL the adapter pulls from, e.g. `https://harbor.example`.
    pub registry_url: String,
    /// The `Authorization` value the adapter sends to the registry (empty:
    /// anonymous). Never logged.
    pub authorization: String,
    /// Repository path.
    pub repository: String,
    /// Manifest digest.
    pub digest: String,
    /// Manifest media type.
    pub mime_type: String,
}

impl std::fmt::Debug for ScanTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScanTarget")
            .field("registry_url", &self.registry_url)
            .field("repository", &self.repository)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

/// A client of one adapter.
#[derive(Debug, Clone)]
pub struct ScannerClient {
    base: String,
    http: reqwest::Client,
}

impl ScannerClient {
    /// A client of the adapter at `base` (e.g. `https://scanner:8080`).
    pub fn new(base: &str) -> Result<ScannerClient, ScanError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = base.trim_end_matches('/').to_string();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ScanError::Protocol {
                adapter: base.clone(),
                message: format!("building an HTTP client: {e}"),
            })?;
        Ok(ScannerClient { base, http })
    }

    fn unreachable(&self, e: reqwest::Error) -> ScanError {
        ScanError::Unreachable {
            adapter: self.base.clone(),
            message: e.without_url().to_string(),
        }
    }

    fn protocol(&self, message: String) -> ScanError {
        ScanError::Protocol {
            adapter: self.base.clone(),
            message,
        }
    }

    /// `GET /api/v1/metadata`: the scanner's name and version.
    pub async fn metadata(&self) -> Result<String, ScanError> {
        let resp = self
            .http
            .get(format!("{}/api/v1/metadata", self.base))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if resp.status() != StatusCode::OK {
            return Err(self.protocol(format!("metadata: HTTP {}", resp.status())));
        }
        let v: serde_json::Value = resp.json().await.map_err(|e| self.unreachable(e))?;
        let s = &v["scanner"];
        Ok(format!(
            "{} {}",
            s["name"].as_str().unwrap_or("?"),
            s["version"].as_str().unwrap_or("?")
        ))
    }

    /// `POST /api/v1/scan`: the scan request id.
    pub async fn request(&self, target: &ScanTarget) -> Result<String, ScanError> {
        let body = serde_json::json!({
            "registry": {"url": target.registry_url, "authorization": target.authorization},
            "artifact": {
                "repository": target.repository,
                "digest": target.digest,
                "mime_type": target.mime_type,
            },
        });
        let resp = self
            .http
            .post(format!("{}/api/v1/scan", self.base))
            .header(CONTENT_TYPE, SCAN_REQUEST)
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(self.protocol(format!(
                "scan of {}@{}: expected 202, got HTTP {}",
                target.repository,
                target.digest,
                resp.status()
            )));
        }
        let v: serde_json::Value = resp.json().await.map_err(|e| self.unreachable(e))?;
        v["id"]
            .as_str()
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_graphic() && b != b'/'))
            .map(str::to_string)
            .ok_or_else(|| self.protocol("scan: 202 without a usable id".to_string()))
    }

    /// `GET /api/v1/scan/{id}/report` until it is ready (200), waiting as
    /// each `302` asks (`Refresh-After`, 1 to 60 s), for at most `wait`.
    pub async fn report(&self, id: &str, wait: Duration) -> Result<Summary, ScanError> {
        let started = tokio::time::Instant::now();
        loop {
            let mut resp = self
                .http
                .get(format!("{}/api/v1/scan/{id}/report", self.base))
                .header(ACCEPT, VULN_REPORT)
                .send()
                .await
                .map_err(|e| self.unreachable(e))?;
            match resp.status() {
                StatusCode::OK => {
                    let mut body = Vec::new();
                    while let Some(chunk) = resp.chunk().await.map_err(|e| self.unreachable(e))? {
                        if body.len() + chunk.len() > MAX_REPORT_BYTES {
                            return Err(self.protocol(format!(
                                "report {id}: larger than {MAX_REPORT_BYTES} bytes"
                            )));
                        }
                        body.extend_from_slice(&chunk);
                    }
                    return Summary::of_report(&body)
                        .map_err(|e| self.protocol(format!("report {id}: {e}")));
                }
                StatusCode::FOUND => {
                    let after = resp
                        .headers()
                        .get("refresh-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(5)
                        .clamp(1, 60);
                    let next = started.elapsed() + Duration::from_secs(after);
                    if next > wait {
                        return Err(ScanError::StillRunning {
                            adapter: self.base.clone(),
                            id: id.to_string(),
                            waited: started.elapsed(),
                        });
                    }
                    tokio::time::sleep(Duration::from_secs(after)).await;
                }
                other => {
                    return Err(self.protocol(format!("report {id}: HTTP {other}")));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_and_gates() {
        let check = |report: &str, threshold: Severity, blocks: bool, text: &str| {
            let s = Summary::of_report(report.as_bytes()).unwrap();
            assert_eq!(s.blocks(threshold), blocks, "{report} at {threshold:?}");
            assert_eq!(s.describe(), text);
        };
        let critical = r#"{"vulnerabilities":[{"id":"CVE-1","severity":"Critical"},{"id":"CVE-2","severity":"Low"},{"id":"CVE-3","severity":"Low"}]}"#;
        check(critical, Severity::Critical, true, "Critical: 1, Low: 2");
        check(critical, Severity::High, true, "Critical: 1, Low: 2");
        let high = r#"{"vulnerabilities":[{"id":"CVE-4","severity":"High"}]}"#;
        check(high, Severity::Critical, false, "High: 1");
        check(high, Severity::High, true, "High: 1");
        check(
            r#"{"vulnerabilities":[]}"#,
            Severity::Low,
            false,
            "no findings",
        );
        check(r#"{}"#, Severity::Unknown, false, "no findings");
        assert!(Summary::of_report(br#"{"vulnerabilities":[{"severity":"Dire"}]}"#).is_err());
    }
}
