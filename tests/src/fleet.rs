//! Launchers for the workspace's own binaries — `imgfleet-hub`, `imgfleet-agent` and the
//! `imgfleet` CLI — so end-to-end tests drive a whole fleet as real processes.
//!
//! The binaries are taken from `<target>/debug/`. `cargo test --workspace` builds them before
//! any test runs (cargo builds a package's binaries for its integration tests, and the root,
//! hub and agent packages all have some); when running only this crate's tests, build them
//! first with `cargo build --workspace --bins`.
//!
//! ```text
//! let hub = HubProcess::start(HubOptions::embedded(dir.path().join("hub"))).await?;
//! let cli = hub.cli();
//! let creds = cli.enroll("edge-1", &[("region", "lab")], &["default"], &dir.path().join("edge-1")).await?;
//! let agent = AgentProcess::start(AgentOptions::new(vec![hub.url()], creds, dir.path().join("agent"))).await?;
//! cli.ok(&["apply", "-f", "policy.yaml"]).await?;
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::process::{ChildGuard, free_port, install_crypto_provider, log_file, wait_until};

/// How long a hub may take to write its admin bundle and answer `imgfleet get clusters`.
const HUB_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an agent may take until its mirror answers `GET /v2/`.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Returns `<target>/debug/<name>`, or an error saying how to build it.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let path = crate::process::target_dir().join("debug").join(name);
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "{} not found: build them with: cargo build --workspace --bins",
            path.display()
        )
    }
}

/// How to run one hub replica.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// etcd endpoint (`http://127.0.0.1:P`); `None` runs on the embedded store in `data_dir`.
    pub etcd: Option<String>,
    /// The hub's `--data-dir` (PKI, admin bundle, secret key, embedded store).
    pub data_dir: PathBuf,
    /// gRPC listen port; a free one when `None`.
    pub listen_port: Option<u16>,
    /// `--offline-after` (whole seconds), when set.
    pub offline_after: Option<Duration>,
    /// Copy `pki/`, `admin/` and `secret.key` from this other hub's data dir before the first
    /// start, so that replicas share one CA, one server certificate and one secret key.
    pub replica_of: Option<PathBuf>,
    /// With `replica_of`: also copy its `secret.key` (true unless a test wants a replica
    /// with a key of its own).
    pub share_secret_key: bool,
    /// Further flags passed as given.
    pub extra_args: Vec<String>,
    /// Environment variables set for the hub (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub env: Vec<(String, String)>,
    /// The `imgfleet-hub` binary to run instead of `<target>/debug/imgfleet-hub` (benchmarks
    /// run the release build).
    pub binary: Option<PathBuf>,
    /// The `imgfleet` CLI binary [`HubProcess::cli`] runs instead of `<target>/debug/imgfleet`.
    pub cli_binary: Option<PathBuf>,
}

impl HubOptions {
    /// A hub on the embedded store in `data_dir`.
    pub fn embedded(data_dir: impl Into<PathBuf>) -> Self {
        HubOptions {
            etcd: None,
            data_dir: data_dir.into(),
            listen_port: None,
            offline_after: None,
            replica_of: None,
            share_secret_key: true,
            extra_args: Vec::new(),
            env: Vec::new(),
            binary: None,
            cli_binary: None,
        }
    }

    /// A hub on etcd at `endpoint`, with its PKI in `data_dir`.
    pub fn etcd(endpoint: &str, data_dir: impl Into<PathBuf>) -> Self {
        HubOptions {
            etcd: Some(endpoint.to_owned()),
            ..HubOptions::embedded(data_dir)
        }
    }
}

/// A running `imgfleet-hub`. SIGKILLed on drop.
#[derive(Debug)]
pub struct HubProcess {
    child: Option<ChildGuard>,
    binary: PathBuf,
    options: HubOptions,
    port: u16,
    metrics_port: u16,
    log: PathBuf,
}

impl HubProcess {
    crate::process::restartable!("the hub", log);

    /// Starts the hub and waits until its admin bundle exists and `imgfleet get clusters`
    /// succeeds against it.
    pub async fn start(options: HubOptions) -> Result<HubProcess> {
        let mut hub = Self::prepare(options)?;
        hub.spawn().await?;
        Ok(hub)
    }

    /// Starts the hub expecting it to refuse to start: waits (up to `timeout`) for it to
    /// exit and returns its exit status and log. Fails if it is still running then.
    pub async fn start_expecting_exit(
        options: HubOptions,
        timeout: Duration,
    ) -> Result<(ExitStatus, String)> {
        Self::prepare(options)?.run_to_exit(timeout).await
    }

    /// The data dir made ready (with a replica's shared material), ports picked, the log
    /// of an earlier test run removed; nothing started yet.
    fn prepare(options: HubOptions) -> Result<HubProcess> {
        install_crypto_provider();
        let binary = match &options.binary {
            Some(b) => b.clone(),
            None => workspace_binary("imgfleet-hub")?,
        };
        std::fs::create_dir_all(&options.data_dir)
            .with_context(|| format!("create hub data dir {}", options.data_dir.display()))?;
        if let Some(source) = &options.replica_of {
            copy_replica_material(source, &options.data_dir, options.share_secret_key)?;
        }
        let hub = HubProcess {
            child: None,
            binary,
            port: options.listen_port.unwrap_or_else(free_port),
            options,
            metrics_port: free_port(),
            log: log_file("hub"),
        };
        let _ = std::fs::remove_file(&hub.log);
        Ok(hub)
    }

    /// Enrolls cluster `name` (admitting `tenants`, no labels) and starts its agent
    /// against this hub, with credentials and data under `dir`.
    pub async fn start_agent(
        &self,
        name: &str,
        tenants: &[&str],
        dir: &Path,
    ) -> Result<AgentProcess> {
        let creds = self
            .cli()
            .enroll(name, &[], tenants, &dir.join(format!("{name}-credentials")))
            .await?;
        AgentProcess::start(AgentOptions::new(
            vec![self.url()],
            creds,
            dir.join(format!("{name}-agent")),
        ))
        .await
    }

    /// Kills the hub if it runs and starts it again, expecting it to refuse to start (see
    /// [`HubProcess::start_expecting_exit`]).
    pub async fn restart_expecting_exit(
        &mut self,
        timeout: Duration,
    ) -> Result<(ExitStatus, String)> {
        self.kill();
        self.run_to_exit(timeout).await
    }

    async fn run_to_exit(&mut self, timeout: Duration) -> Result<(ExitStatus, String)> {
        let mut child = ChildGuard::spawn_with_log("hub", self.command(), self.log.clone())?;
        let status = child
            .wait_exit(timeout)
            .await
            .context("expected the hub to refuse to start")?;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        Ok((status, log))
    }

    fn command(&self) -> Command {
        let mut cmd = hub_command(
            &self.binary,
            (self.port, self.metrics_port),
            &self.options.data_dir,
            self.options.etcd.as_deref(),
        );
        if let Some(after) = self.options.offline_after {
            // The hub takes whole seconds (`30s`).
            cmd.arg("--offline-after")
                .arg(format!("{}s", after.as_secs().max(1)));
        }
        cmd.args(&self.options.extra_args)
            .envs(self.options.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    async fn spawn(&mut self) -> Result<()> {
        let mut child = ChildGuard::spawn_with_log("hub", self.command(), self.log.clone())?;
        let cli = self.cli();
        let admin = self.admin_credentials_dir();
        child
            .wait_ready("serving the admin API", HUB_READY_TIMEOUT, || {
                let cli = cli.clone();
                let admin = admin.clone();
                async move {
                    if !admin.join("key.pem").is_file() {
                        return Ok(false);
                    }
                    let out = cli.run(&["get", "clusters"]).await?;
                    if out.success() {
                        Ok(true)
                    } else {
                        Err(anyhow!("imgfleet get clusters: {}", out.stderr.trim()))
                    }
                }
            })
            .await?;
        self.child = Some(child);
        Ok(())
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The listen port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT` of the metrics and health listener.
    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.metrics_port)
    }

    /// The admin bundle the hub wrote on first start (`<data-dir>/admin`).
    pub fn admin_credentials_dir(&self) -> PathBuf {
        self.options.data_dir.join("admin")
    }

    /// The hub's data dir.
    pub fn data_dir(&self) -> &Path {
        &self.options.data_dir
    }

    /// Whether `replica` (a `Cluster.status.hubReplica`, `<host>-<pid>[-<n>]`) names this
    /// hub process.
    pub fn is_replica(&self, replica: &str) -> bool {
        let Some(pid) = self.pid() else {
            return false;
        };
        let mut parts = replica.rsplit('-');
        let last = parts.next();
        let before = parts.next();
        last == Some(pid.to_string().as_str()) || before == Some(pid.to_string().as_str())
    }

    /// A CLI talking to this hub with the admin bundle.
    pub fn cli(&self) -> Cli {
        let cli = Cli::new(&self.url(), &self.admin_credentials_dir());
        match &self.options.cli_binary {
            Some(b) => cli.with_binary(b),
            None => cli,
        }
    }

    /// Stops the hub as an operator does (SIGTERM) and waits until it has drained and
    /// exited; fails unless it exits 0.
    pub async fn stop(&mut self) -> Result<()> {
        stop_child(self.child.take(), "the hub").await
    }
}

/// The command line of one hub on 127.0.0.1 with its (gRPC, metrics) ports, its data
/// dir and, when given, its etcd, logging at info: what every launcher of hubs shares.
pub fn hub_command(
    binary: &Path,
    (port, metrics_port): (u16, u16),
    data_dir: &Path,
    etcd: Option<&str>,
) -> Command {
    let mut cmd = Command::new(binary);
    cmd.arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "info");
    if let Some(etcd) = etcd {
        cmd.arg("--etcd-endpoints").arg(etcd);
    }
    cmd
}

/// How long a hub or an agent may take to drain and exit on SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

async fn stop_child(child: Option<ChildGuard>, what: &str) -> Result<()> {
    let mut child = child.ok_or_else(|| anyhow!("{what} is not running"))?;
    let status = child.terminate(STOP_TIMEOUT).await?;
    if status.success() {
        Ok(())
    } else {
        Err(child.error_with_log(format!("exited with {status} on SIGTERM")))
    }
}

/// Copies what replicas must share from another hub's data dir: the CA and server
/// certificate (`pki/`), the admin bundle (`admin/`) and (when `key`) the secret key.
fn copy_replica_material(source: &Path, dest: &Path, key: bool) -> Result<()> {
    for sub in ["pki", "admin"] {
        let from = source.join(sub);
        let to = dest.join(sub);
        std::fs::create_dir_all(&to).with_context(|| format!("create {}", to.display()))?;
        for entry in std::fs::read_dir(&from).with_context(|| {
            format!(
                "read {} (start the first replica before the others)",
                from.display()
            )
        })? {
            let entry = entry.with_context(|| format!("read {}", from.display()))?;
            if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                std::fs::copy(entry.path(), to.join(entry.file_name()))
                    .with_context(|| format!("copy {}", entry.path().display()))?;
            }
        }
    }
    let key_file = source.join("secret.key");
    if key && key_file.is_file() {
        std::fs::copy(&key_file, dest.join("secret.key"))
            .with_context(|| format!("copy {}", key_file.display()))?;
    }
    Ok(())
}

/// What one `imgfleet` invocation did.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// The exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CliOutput {
    /// True on exit code 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// Runs the `imgfleet` CLI against one hub with one set of credentials.
#[derive(Debug, Clone)]
pub struct Cli {
    binary: PathBuf,
    hub: String,
    credentials: PathBuf,
}

impl Cli {
    /// A CLI for hub `url` with the credentials folder `credentials`. A missing binary
    /// shows as an error of [`Cli::run`].
    pub fn new(url: &str, credentials: &Path) -> Cli {
        let binary = crate::process::target_dir().join("debug").join("imgfleet");
        Cli {
            binary,
            hub: url.to_owned(),
            credentials: credentials.to_owned(),
        }
    }

    /// The same CLI running another `imgfleet` binary (benchmarks run the release build).
    pub fn with_binary(&self, binary: &Path) -> Cli {
        Cli {
            binary: binary.to_owned(),
            ..self.clone()
        }
    }

    /// The same CLI pointed at another hub URL.
    pub fn with_hub(&self, url: &str) -> Cli {
        Cli {
            hub: url.to_owned(),
            ..self.clone()
        }
    }

    /// Runs `imgfleet --hub URL --credentials DIR <args>` without blocking the runtime and
    /// returns what it printed. Fails only when the binary cannot be run at all.
    pub async fn run(&self, args: &[&str]) -> Result<CliOutput> {
        if !self.binary.is_file() {
            workspace_binary("imgfleet")?;
        }
        let out = tokio::process::Command::new(&self.binary)
            .arg("--hub")
            .arg(&self.hub)
            .arg("--credentials")
            .arg(&self.credentials)
            .args(args)
            .env_remove("IMGFLEET_HUB")
            .env_remove("IMGFLEET_CREDENTIALS")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .with_context(|| format!("run {} {args:?}", self.binary.display()))?;
        Ok(CliOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs the CLI and returns its stdout; a non-zero exit is an error quoting stderr.
    pub async fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args).await?;
        if out.success() {
            Ok(out.stdout)
        } else {
            bail!(
                "imgfleet {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                out.stderr.trim(),
                if out.stdout.trim().is_empty() {
                    String::new()
                } else {
                    format!("\nstdout: {}", out.stdout.trim())
                }
            )
        }
    }

    /// `imgfleet get KIND [NAME] -o json [extra...]`, parsed.
    pub async fn get_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut full = vec!["get"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["-o", "json"]);
        let text = self.ok(&full).await?;
        serde_json::from_str(&text)
            .with_context(|| format!("imgfleet {}: not JSON: {text}", full.join(" ")))
    }

    /// Applies YAML text through `imgfleet apply -f FILE` (written to a temp file).
    pub async fn apply_yaml(&self, yaml: &str) -> Result<String> {
        let dir = tempfile::tempdir().context("temp dir for apply")?;
        let path = dir.path().join("apply.yaml");
        std::fs::write(&path, yaml).context("write apply.yaml")?;
        let path = path.to_string_lossy().into_owned();
        self.ok(&["apply", "-f", &path]).await
    }

    /// Enrolls cluster `name` and writes its agent's credentials to `out`; returns `out`.
    pub async fn enroll(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        tenants: &[&str],
        out: &Path,
    ) -> Result<PathBuf> {
        let out_text = out.to_string_lossy().into_owned();
        let mut args: Vec<String> = vec![
            "cluster".into(),
            "enroll".into(),
            name.into(),
            "--out".into(),
            out_text,
        ];
        for (k, v) in labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        for t in tenants {
            args.push("--namespace".into());
            args.push((*t).to_owned());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ok(&refs).await?;
        Ok(out.to_owned())
    }

    /// `imgfleet cluster enroll NAME --reissue --out OUT`: new credentials for a
    /// cluster that is enrolled already (its labels and tenants kept, its
    /// earlier certificates revoked); returns `out`.
    pub async fn reissue(&self, name: &str, out: &Path) -> Result<PathBuf> {
        let out_text = out.to_string_lossy().into_owned();
        self.ok(&["cluster", "enroll", name, "--reissue", "--out", &out_text])
            .await?;
        Ok(out.to_owned())
    }
}

/// How to run one agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Hub URLs, tried in turn.
    pub hubs: Vec<String>,
    /// The folder `imgfleet cluster enroll --out` wrote.
    pub creds_dir: PathBuf,
    /// The agent's `--data-dir`.
    pub data_dir: PathBuf,
    /// Mirror port; a free one when `None`.
    pub mirror_port: Option<u16>,
    /// Further flags passed as given.
    pub extra_args: Vec<String>,
    /// Environment variables set for the agent (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub env: Vec<(String, String)>,
    /// The `imgfleet-agent` binary to run instead of `<target>/debug/imgfleet-agent`
    /// (benchmarks run the release build).
    pub binary: Option<PathBuf>,
}

impl AgentOptions {
    /// An agent of `hubs` with credentials `creds_dir` and data in `data_dir`.
    pub fn new(
        hubs: Vec<String>,
        creds_dir: impl Into<PathBuf>,
        data_dir: impl Into<PathBuf>,
    ) -> Self {
        AgentOptions {
            hubs,
            creds_dir: creds_dir.into(),
            data_dir: data_dir.into(),
            mirror_port: None,
            extra_args: Vec::new(),
            env: Vec::new(),
            binary: None,
        }
    }
}

/// A running `imgfleet-agent` daemon. SIGKILLed on drop.
#[derive(Debug)]
pub struct AgentProcess {
    child: Option<ChildGuard>,
    binary: PathBuf,
    options: AgentOptions,
    mirror_port: u16,
    metrics_port: u16,
    log: PathBuf,
    http: reqwest::Client,
}

impl AgentProcess {
    crate::process::restartable!("the agent", log);

    /// Starts the agent and waits until its mirror answers `GET /v2/`.
    pub async fn start(options: AgentOptions) -> Result<AgentProcess> {
        install_crypto_provider();
        let binary = match &options.binary {
            Some(b) => b.clone(),
            None => workspace_binary("imgfleet-agent")?,
        };
        std::fs::create_dir_all(&options.data_dir)
            .with_context(|| format!("create agent data dir {}", options.data_dir.display()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .context("build HTTP client for the mirror")?;
        let mirror_port = options.mirror_port.unwrap_or_else(free_port);
        let mut agent = AgentProcess {
            child: None,
            binary,
            options,
            mirror_port,
            metrics_port: free_port(),
            log: log_file("agent"),
            http,
        };
        let _ = std::fs::remove_file(&agent.log);
        agent.spawn().await?;
        Ok(agent)
    }

    async fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--hub")
            .arg(self.options.hubs.join(","))
            .arg("--credentials")
            .arg(&self.options.creds_dir)
            .arg("--data-dir")
            .arg(&self.options.data_dir)
            .arg("--mirror-listen")
            .arg(self.mirror_addr())
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .args(&self.options.extra_args)
            .env("RUST_LOG", "info")
            .envs(self.options.env.iter().map(|(k, v)| (k, v)));
        let mut child = ChildGuard::spawn_with_log("agent", cmd, self.log.clone())?;
        let base_url = format!("http://{}", self.mirror_addr());
        child
            .wait_distribution_api(&self.http, &base_url, AGENT_READY_TIMEOUT)
            .await?;
        self.child = Some(child);
        Ok(())
    }

    /// `127.0.0.1:PORT` of the mirror, as used in image references.
    pub fn mirror_addr(&self) -> String {
        format!("127.0.0.1:{}", self.mirror_port)
    }

    /// `127.0.0.1:PORT` of `/metrics`, `/healthz` and `/readyz`.
    pub fn metrics_addr(&self) -> String {
        format!("127.0.0.1:{}", self.metrics_port)
    }

    /// `docker://127.0.0.1:PORT/<repo_and_reference>` for skopeo.
    pub fn docker_ref(&self, repo_and_reference: &str) -> String {
        format!("docker://{}/{repo_and_reference}", self.mirror_addr())
    }

    /// The agent's data dir.
    pub fn data_dir(&self) -> &Path {
        &self.options.data_dir
    }

    /// Sends `signal` to the agent (SIGSTOP to freeze it, SIGCONT to let it go on).
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        self.child
            .as_ref()
            .ok_or_else(|| anyhow!("the agent is not running"))?
            .signal(signal)
    }

    /// Stops the agent as an operator does (SIGTERM) and waits until it has exited; fails
    /// unless it exits 0.
    pub async fn stop(&mut self) -> Result<()> {
        stop_child(self.child.take(), "the agent").await
    }

    /// The HTTP status of `HEAD /v2/<repo>/manifests/<reference>` on the mirror.
    pub async fn manifest_status(&self, repo: &str, reference: &str) -> Result<u16> {
        let url = format!(
            "http://{}/v2/{repo}/manifests/{reference}",
            self.mirror_addr()
        );
        Ok(self
            .http
            .head(&url)
            .header("Accept", MANIFEST_ACCEPT)
            .send()
            .await
            .with_context(|| format!("HEAD {url}"))?
            .status()
            .as_u16())
    }

    /// The value of the metric `name` (a line `name value`) on the agent's `/metrics`, or
    /// `None` when the agent does not report it.
    pub async fn metric(&self, name: &str) -> Result<Option<f64>> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        let text = self
            .http
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("GET {url}"))?
            .text()
            .await
            .with_context(|| format!("read the body of GET {url}"))?;
        text.lines()
            .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .map(|value| {
                value
                    .trim()
                    .parse()
                    .with_context(|| format!("{name} {value:?} is not a number"))
            })
            .next()
            .transpose()
    }

    /// The digest of the manifest the mirror serves for `repo:reference`
    /// (the sha256 of the body it sends), `None` on a 404.
    pub async fn served_digest(&self, repo: &str, reference: &str) -> Result<Option<String>> {
        use sha2::Digest as _;
        let path = format!("{repo}/manifests/{reference}");
        let (status, body) = self.mirror_get(&path).await?;
        match status {
            200 => Ok(Some(format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(&body))
            ))),
            404 => Ok(None),
            other => Err(anyhow!("GET /v2/{path} on the mirror: HTTP {other}")),
        }
    }

    /// `GET /v2/<path>` on the mirror (a manifest or a blob, e.g.
    /// `library/nginx/blobs/sha256:…`): the HTTP status and the body.
    pub async fn mirror_get(&self, path: &str) -> Result<(u16, Vec<u8>)> {
        let url = format!("http://{}/v2/{path}", self.mirror_addr());
        let response = self
            .http
            .get(&url)
            .header("Accept", MANIFEST_ACCEPT)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = response.status().as_u16();
        let body = response
            .bytes()
            .await
            .with_context(|| format!("read the body of GET {url}"))?;
        Ok((status, body.to_vec()))
    }
}

/// The manifest media types the harness accepts from a mirror: all it can hold.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// Waits until `imgfleet get repository NAME -n NS -o json` shows
/// `status.syncedClusters == want` and `status.targetClusters == want`.
pub async fn wait_repository_synced(
    cli: &Cli,
    namespace: &str,
    name: &str,
    want: u64,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let last = std::sync::Arc::new(std::sync::Mutex::new(serde_json::Value::Null));
    let result = wait_until(
        &format!("Repository {namespace}/{name} synced on {want} cluster(s)"),
        timeout,
        || {
            let cli = cli.clone();
            let last = last.clone();
            async move {
                let v = cli.get_json(&["repository", name, "-n", namespace]).await?;
                let status = &v["status"];
                let synced = status["syncedClusters"].as_u64().unwrap_or(0);
                let target = status["targetClusters"].as_u64().unwrap_or(0);
                *last.lock().unwrap_or_else(|e| e.into_inner()) = v;
                Ok(synced == want && target == want)
            }
        },
    )
    .await;
    let last = last.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match result {
        Ok(()) => Ok(last),
        Err(e) => Err(e.context(format!("last seen: {last}"))),
    }
}

/// Whether every agent's mirror serves `digest` for `repo:tag` now.
pub async fn all_serve(
    agents: &[AgentProcess],
    repo: &str,
    tag: &str,
    digest: &str,
) -> Result<bool> {
    for a in agents {
        if a.served_digest(repo, tag).await?.as_deref() != Some(digest) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Waits until every agent's mirror serves `digest` for `repo:tag`.
pub async fn wait_all_serve(
    agents: &[AgentProcess],
    repo: &str,
    tag: &str,
    digest: &str,
    timeout: Duration,
) -> Result<()> {
    let what = format!(
        "{repo}:{tag} served as {digest} by all {} mirrors",
        agents.len()
    );
    wait_until(&what, timeout, || all_serve(agents, repo, tag, digest)).await
}

/// The blob bytes `agents` received from registries so far, summed
/// (`imgfleet_agent_bytes_received_total`).
pub async fn bytes_received(agents: &[AgentProcess]) -> Result<f64> {
    let mut total = 0.0;
    for a in agents {
        total += a
            .metric("imgfleet_agent_bytes_received_total")
            .await?
            .context("the agent reports imgfleet_agent_bytes_received_total")?;
    }
    Ok(total)
}
