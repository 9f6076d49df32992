//! A real Prometheus (Debian `prometheus`) on a free loopback port in a temporary
//! directory, scraping the targets a test gives it every second and evaluating rule files,
//! with its HTTP query API; and `promtool` (same package).
//!
//! ```text
//! let prom = Prometheus::start(&[("hub", hub_metrics_addr)], &[rules_path]).await?;
//! let series = prom.query("image_sync_failures > 3").await?;   // Err on a query error
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tempfile::TempDir;

use crate::process::{ChildGuard, free_port, require_binary};

/// How long Prometheus may take to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One series of an instant query: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: serde_json::Map<String, Value>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, or "".
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).and_then(Value::as_str).unwrap_or("")
    }
}

/// A running Prometheus. Killed and its data removed on drop.
#[derive(Debug)]
pub struct Prometheus {
    child: Option<ChildGuard>,
    port: u16,
    // Held for its Drop; declared after `child` so Prometheus dies first.
    _dir: TempDir,
    http: reqwest::Client,
}

/// The `promtool` binary, or a failure with the install command.
pub fn promtool() -> PathBuf {
    require_binary("promtool", "prometheus")
}

impl Prometheus {
    /// Starts Prometheus scraping each `(job, "HOST:PORT")` target at `/metrics` every
    /// second, with the rule files `rules` evaluated every second; waits until `/-/ready`
    /// answers 200.
    pub async fn start(targets: &[(&str, String)], rules: &[&Path]) -> Result<Prometheus> {
        let binary = require_binary("prometheus", "prometheus");
        let dir = tempfile::Builder::new()
            .prefix("imgfleet-prometheus-")
            .tempdir()
            .context("create Prometheus temp dir")?;
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n",
        );
        if !rules.is_empty() {
            config.push_str("rule_files:\n");
            for r in rules {
                config.push_str(&format!("  - {:?}\n", r.display().to_string()));
            }
        }
        config.push_str("scrape_configs:\n");
        let mut jobs: Vec<&str> = targets.iter().map(|(j, _)| *j).collect();
        jobs.dedup();
        for job in jobs {
            config.push_str(&format!(
                "  - job_name: {job:?}\n    static_configs:\n      - targets: [{}]\n",
                targets
                    .iter()
                    .filter(|(j, _)| *j == job)
                    .map(|(_, t)| format!("{t:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, &config)
            .with_context(|| format!("write {}", config_path.display()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .context("build HTTP client for Prometheus")?;
        let port = free_port();
        let mut cmd = Command::new(&binary);
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!("--web.console.templates={}", dir.path().display()))
            .arg(format!("--web.console.libraries={}", dir.path().display()))
            .arg("--log.level=warn");
        let mut child = ChildGuard::spawn("prometheus", cmd)?;
        let url = format!("http://127.0.0.1:{port}/-/ready");
        child
            .wait_ready("answering /-/ready", READY_TIMEOUT, || {
                let request = http.get(&url).send();
                async move { Ok(request.await?.status().as_u16() == 200) }
            })
            .await?;
        Ok(Prometheus {
            child: Some(child),
            port,
            _dir: dir,
            http,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs an instant query. A query Prometheus refuses (bad syntax, unknown function,
    /// a type error) is an error carrying Prometheus' message.
    pub async fn query(&self, expr: &str) -> Result<Vec<Sample>> {
        let url = format!("{}/api/v1/query?query={}", self.url(), url_encode(expr));
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("query {expr:?}"))?;
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("read the answer to {expr:?}"))?;
        if body["status"] != "success" {
            bail!(
                "Prometheus refused {expr:?}: {} {}",
                body["errorType"],
                body["error"]
            );
        }
        let data = &body["data"];
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    Ok(Sample {
                        labels: s["metric"].as_object().cloned().unwrap_or_default(),
                        value: parse_value(&s["value"][1])?,
                    })
                })
                .collect(),
            Some("scalar") => Ok(vec![Sample {
                labels: Default::default(),
                value: parse_value(&data["result"][1])?,
            }]),
            other => bail!("unexpected result type {other:?} for {expr:?}: {data}"),
        }
    }

    /// The health of every scrape target: `(job, instance, health, last error)`.
    pub async fn targets(&self) -> Result<Vec<(String, String, String, String)>> {
        let url = format!("{}/api/v1/targets", self.url());
        let body: Value = self
            .http
            .get(&url)
            .send()
            .await
            .context("GET /api/v1/targets")?
            .json()
            .await
            .context("read /api/v1/targets")?;
        Ok(body["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let s = |v: &Value| v.as_str().unwrap_or("").to_string();
                (
                    s(&t["labels"]["job"]),
                    s(&t["labels"]["instance"]),
                    s(&t["health"]),
                    s(&t["lastError"]),
                )
            })
            .collect())
    }

    /// The last lines of Prometheus' log.
    pub fn log_tail(&self, n: usize) -> String {
        self.child
            .as_ref()
            .map(|c| c.log_tail(n))
            .unwrap_or_default()
    }
}

fn parse_value(v: &Value) -> Result<f64> {
    let s = v.as_str().with_context(|| format!("sample value {v}"))?;
    match s {
        "NaN" => Ok(f64::NAN),
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => s.parse().with_context(|| format!("sample value {s:?}")),
    }
}

/// Percent-encodes a query parameter value.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
