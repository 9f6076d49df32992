//! A real single-member etcd (Debian `etcd-server`) on free loopback ports in a temporary
//! data directory, with kill/restart for crash tests and a few calls through etcd's v3
//! HTTP JSON gateway so the harness needs no gRPC client.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::process::{ChildGuard, free_port, install_crypto_provider, require_binary};

/// How long etcd may take to report healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running etcd. Killed (SIGKILL to its process group) and its data dir removed on drop.
#[derive(Debug)]
pub struct Etcd {
    child: Option<ChildGuard>,
    binary: PathBuf,
    client_port: u16,
    peer_port: u16,
    // Held for its Drop: removes the data dir. Declared after `child` so etcd dies first.
    dir: TempDir,
    http: reqwest::Client,
}

impl Etcd {
    crate::process::restartable!("etcd");

    /// Starts etcd on two free 127.0.0.1 ports (client and peer) with a fresh data dir, and
    /// waits until `GET /health` answers `{"health":"true"}` (at most 20 s).
    pub async fn start() -> Result<Etcd> {
        let binary = require_binary("etcd", "etcd-server");
        let dir = tempfile::Builder::new()
            .prefix("imgfleet-etcd-")
            .tempdir()
            .context("create etcd temp dir")?;
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .context("build HTTP client for etcd")?;
        let mut etcd = Etcd {
            child: None,
            binary,
            client_port: free_port(),
            peer_port: free_port(),
            dir,
            http,
        };
        // Another process may grab a port between free_port() and etcd binding it; then try
        // again on new ones.
        for attempt in 1.. {
            match etcd.spawn().await {
                Ok(()) => break,
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    etcd.client_port = free_port();
                    etcd.peer_port = free_port();
                    // A half-initialised member dir would pin the old peer URL.
                    let _ = std::fs::remove_dir_all(etcd.data_dir());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(etcd)
    }

    async fn spawn(&mut self) -> Result<()> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--name")
            .arg("harness")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("harness={peer}"))
            .arg("--initial-cluster-state")
            .arg("new")
            // Tests compact explicitly when they want "revision too old".
            .arg("--auto-compaction-retention")
            .arg("0")
            .arg("--log-outputs")
            .arg("stderr")
            // Keep the environment from reconfiguring etcd behind our back.
            .env_remove("ETCD_DATA_DIR")
            .env_remove("ETCD_NAME");
        let mut child = ChildGuard::spawn("etcd", cmd)?;
        let http = self.http.clone();
        let url = format!("{client}/health");
        child
            .wait_ready("healthy", READY_TIMEOUT, || {
                let http = http.clone();
                let url = url.clone();
                async move {
                    let resp = http.get(&url).send().await?;
                    let body: Value = resp.json().await?;
                    Ok(body.get("health").and_then(Value::as_str) == Some("true"))
                }
            })
            .await?;
        self.child = Some(child);
        Ok(())
    }

    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// `[endpoint()]`, the shape etcd clients take.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// etcd's data directory (kept across [`Etcd::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The log file of the current etcd process, if it runs.
    pub fn log_path(&self) -> Option<&Path> {
        self.child.as_ref().map(ChildGuard::log_path)
    }

    async fn gateway(&self, path: &str, body: Value) -> Result<Value> {
        let url = format!("{}/v3/{path}", self.endpoint());
        let resp = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .with_context(|| format!("read body of POST {url}"))?;
        if !status.is_success() {
            bail!("etcd POST {url}: HTTP {status}: {text}");
        }
        serde_json::from_str(&text)
            .with_context(|| format!("etcd POST {url}: body is not JSON: {text}"))
    }

    /// Puts `key` = `value` through the v3 JSON gateway; returns the new revision.
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<i64> {
        let v = self
            .gateway(
                "kv/put",
                json!({"key": B64.encode(key), "value": B64.encode(value)}),
            )
            .await?;
        header_revision(&v)
    }

    /// Gets `key` through the v3 JSON gateway; `None` when absent.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let v = self
            .gateway("kv/range", json!({"key": B64.encode(key)}))
            .await?;
        let Some(kv) = v
            .get("kvs")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
        else {
            return Ok(None);
        };
        // etcd leaves out empty values entirely.
        let value = kv.get("value").and_then(Value::as_str).unwrap_or("");
        Ok(Some(
            B64.decode(value)
                .context("etcd returned a value that is not base64")?,
        ))
    }

    /// Every key and value in the store, in key order, read at one revision: what a
    /// fixture of a hub's etcd keeps. Keys bound to a lease (a leader's election key) are
    /// included with their lease id, so that a caller can leave them out.
    pub async fn dump(&self) -> Result<Vec<KeyValue>> {
        // Key "\0" with range_end "\0" is etcd's "every key".
        let v = self
            .gateway(
                "kv/range",
                json!({"key": B64.encode("\0"), "range_end": B64.encode("\0")}),
            )
            .await?;
        let Some(kvs) = v.get("kvs").and_then(Value::as_array) else {
            return Ok(Vec::new());
        };
        kvs.iter()
            .map(|kv| {
                let field = |name: &str| kv.get(name).and_then(Value::as_str).unwrap_or("");
                let decode = |name: &str| {
                    B64.decode(field(name))
                        .with_context(|| format!("etcd returned a {name} that is not base64"))
                };
                Ok(KeyValue {
                    key: decode("key")?,
                    // etcd leaves out empty values entirely.
                    value: decode("value")?,
                    // The gateway renders int64 as a JSON string, and leaves out a 0.
                    lease: match field("lease") {
                        "" => 0,
                        s => s
                            .parse()
                            .with_context(|| format!("etcd lease {s:?} is not an integer"))?,
                    },
                })
            })
            .collect()
    }

    /// Puts every entry of `kvs` (their leases left out): loads a [`Etcd::dump`].
    pub async fn load(&self, kvs: &[KeyValue]) -> Result<()> {
        for kv in kvs {
            self.gateway(
                "kv/put",
                json!({"key": B64.encode(&kv.key), "value": B64.encode(&kv.value)}),
            )
            .await?;
        }
        Ok(())
    }

    /// The current revision of the store.
    pub async fn revision(&self) -> Result<i64> {
        let v = self
            .gateway(
                "kv/range",
                json!({"key": B64.encode("\0"), "count_only": true}),
            )
            .await?;
        header_revision(&v)
    }

    /// Compacts the history up to `revision` (physically), so that watches and reads at
    /// older revisions fail with "required revision has been compacted".
    pub async fn compact(&self, revision: i64) -> Result<()> {
        self.gateway(
            "kv/compaction",
            json!({"revision": revision.to_string(), "physical": true}),
        )
        .await?;
        Ok(())
    }
}

/// One key of an [`Etcd::dump`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key, as stored.
    pub key: Vec<u8>,
    /// The value, as stored.
    pub value: Vec<u8>,
    /// The lease the key is bound to; 0 for none.
    pub lease: i64,
}

fn header_revision(v: &Value) -> Result<i64> {
    // The gateway renders int64 as a JSON string.
    let rev = v
        .pointer("/header/revision")
        .context("etcd response has no header.revision")?;
    match rev {
        Value::String(s) => s
            .parse()
            .with_context(|| format!("etcd revision {s:?} is not an integer")),
        Value::Number(n) => n.as_i64().context("etcd revision is not an i64"),
        other => bail!("etcd revision has unexpected JSON type: {other}"),
    }
}
