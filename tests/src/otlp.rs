//! A real OTLP/gRPC trace receiver: PyPI's `grpcio` and `opentelemetry-proto` serving
//! `TraceService/Export` (`otlp_receiver.py`) on a free loopback port, writing every span it
//! receives to a file the test reads.
//!
//! The Python comes from `IMGFLEET_PYTHON`, else the venv `scripts/install-deps.sh` makes
//! (`/opt/imgfleet-py`), else `python3`; without the two packages the test fails with the
//! command that installs them.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tempfile::TempDir;

use crate::process::{ChildGuard, free_port};

const SCRIPT: &str = include_str!("otlp_receiver.py");
/// The venv `scripts/install-deps.sh` creates.
pub const VENV_PYTHON: &str = "/opt/imgfleet-py/bin/python";
const INSTALL: &str = "bash scripts/install-deps.sh (or: python3 -m venv /opt/imgfleet-py && \
     /opt/imgfleet-py/bin/pip install grpcio opentelemetry-proto)";

/// One span as the receiver got it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedSpan {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
}

/// A running receiver. Killed on drop.
#[derive(Debug)]
pub struct OtlpReceiver {
    _child: ChildGuard,
    port: u16,
    spans: PathBuf,
    _dir: TempDir,
}

/// A Python with `grpc` and `opentelemetry.proto`, or a failure naming the install.
fn python() -> Result<String> {
    let candidates = std::env::var("IMGFLEET_PYTHON")
        .ok()
        .into_iter()
        .chain([VENV_PYTHON.to_string(), "python3".to_string()]);
    let mut tried = Vec::new();
    for py in candidates {
        let ok = Command::new(&py)
            .args([
                "-c",
                "import grpc; from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc",
            ])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(py);
        }
        tried.push(py);
    }
    bail!(
        "no Python with grpcio and opentelemetry-proto (tried {}); install them with: {INSTALL}",
        tried.join(", ")
    )
}

impl OtlpReceiver {
    /// Starts the receiver and waits until its port accepts connections.
    pub async fn start() -> Result<OtlpReceiver> {
        let py = python()?;
        let dir = tempfile::Builder::new()
            .prefix("imgfleet-otlp-")
            .tempdir()
            .context("create OTLP receiver temp dir")?;
        let script = dir.path().join("otlp_receiver.py");
        std::fs::write(&script, SCRIPT).context("write otlp_receiver.py")?;
        let spans = dir.path().join("spans.jsonl");
        let port = free_port();
        let mut cmd = Command::new(py);
        cmd.arg(&script).arg(port.to_string()).arg(&spans);
        let mut child = ChildGuard::spawn("otlp-receiver", cmd)?;
        child
            .wait_ready(
                "accepting connections",
                Duration::from_secs(20),
                || async move {
                    Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .is_ok())
                },
            )
            .await?;
        Ok(OtlpReceiver {
            _child: child,
            port,
            spans,
            _dir: dir,
        })
    }

    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Result<Vec<ReceivedSpan>> {
        let text = match std::fs::read_to_string(&self.spans) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).context("read the received spans"),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: Value = serde_json::from_str(l).with_context(|| format!("span {l}"))?;
                let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
                Ok(ReceivedSpan {
                    service: s("service"),
                    name: s("name"),
                    trace_id: s("trace_id"),
                    span_id: s("span_id"),
                    parent_span_id: s("parent_span_id"),
                })
            })
            .collect()
    }
}
