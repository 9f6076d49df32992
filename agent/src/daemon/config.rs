//! The daemon's settings: flags with environment fallbacks, checked once
//! into a [`Config`]; a bad one is a [`ConfigError`] naming it (the binary
//! exits 64).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use imgfleet_common::pki::{self, Identity};
use imgfleet_common::registry::MinProgress;
use imgfleet_common::tls::TlsMaterial;

use crate::gc::GcPolicy;
use crate::settings::{ConfigError, parse_duration};
use crate::transfer::EngineConfig;

/// The daemon's flags (`imgfleet-agent --hub ...` or `imgfleet-agent run --hub ...`).
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// Hub URLs, comma-separated, tried in turn: https://HOST:PORT[,...].
    #[arg(long, env = "IMGFLEET_HUB", value_delimiter = ',', value_name = "URL")]
    pub hub: Vec<String>,
    /// Directory with ca.pem, cert.pem and key.pem from `imgfleet cluster enroll`.
    #[arg(long, env = "IMGFLEET_CREDENTIALS", value_name = "DIR")]
    pub credentials: Option<PathBuf>,
    /// Content store, desired set and local key.
    #[arg(long, env = "IMGFLEET_DATA_DIR", default_value = "./agent-data")]
    pub data_dir: PathBuf,
    /// Address the registry mirror listens on.
    #[arg(long, env = "IMGFLEET_MIRROR_LISTEN", default_value = "127.0.0.1:5050")]
    pub mirror_listen: String,
    /// Address of /metrics and /healthz, or `off`.
    #[arg(
        long,
        env = "IMGFLEET_METRICS_LISTEN",
        default_value = "127.0.0.1:9465"
    )]
    pub metrics_listen: String,
    /// Images transferred at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency_images: usize,
    /// Blobs transferred at once, across all images.
    #[arg(long, default_value_t = 8)]
    pub concurrency_blobs: usize,
    /// Combined bandwidth limit in bytes per second.
    #[arg(long, value_name = "BYTES")]
    pub bandwidth_limit: Option<u64>,
    /// Extra CA certificate (PEM) to trust for registries; repeatable.
    #[arg(long, value_name = "PEM")]
    pub ca_file: Vec<PathBuf>,
    /// How long content no longer desired stays, e.g. 30m, 24h, 0s (a Repository's
    /// retention.gracePeriod overrides it for its own content).
    #[arg(long, default_value = "24h")]
    pub grace_period: String,
    /// Versions kept per desired repository, the desired one included: 1 keeps
    /// only what is desired, 2 one older version for rollback (a Repository's
    /// retention.keepVersions overrides it for its own content).
    #[arg(long, default_value_t = 2)]
    pub keep_versions: usize,
    /// An upstream transfer that receives less than 16 KiB in this much time
    /// spent waiting is cut and resumed by Range, e.g. 30s.
    #[arg(long, default_value = "30s")]
    pub stall_timeout: String,
    /// The mirror's limits against hostile or broken clients.
    #[command(flatten)]
    pub mirror: crate::mirror::MirrorArgs,
}

/// The checked daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Hub URLs, tried in turn.
    pub hubs: Vec<String>,
    /// The cluster's mTLS material.
    pub tls: TlsMaterial,
    /// The cluster name its certificate carries.
    pub cluster: String,
    /// Where the credentials live; renewed ones are written back there.
    pub credentials_dir: Option<PathBuf>,
    /// Content store, desired set and local key.
    pub data_dir: PathBuf,
    /// Where the mirror listens.
    pub mirror_listen: SocketAddr,
    /// Whether the mirror asks for pull tokens (`--mirror-auth token`).
    pub mirror_token_auth: bool,
    /// Where `/metrics` and `/healthz` listen, unless off.
    pub metrics_listen: Option<SocketAddr>,
    /// Transfer engine settings.
    pub engine: EngineConfig,
    /// The agent's own retention.
    pub gc: GcPolicy,
    /// The mirror's limits.
    pub mirror: crate::mirror::Limits,
}

impl DaemonArgs {
    /// Checks every setting, in the order of the flags, and loads the
    /// credentials.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let hubs = self.hubs()?;
        let (tls, cluster) = self.identity(&hubs)?;
        let mirror_listen = self.mirror_listen.parse().map_err(|_| {
            ConfigError::new(
                format!("--mirror-listen {}", self.mirror_listen),
                "expected HOST:PORT like 127.0.0.1:5050",
            )
        })?;
        let metrics_listen = match self.metrics_listen.as_str() {
            "off" => None,
            addr => Some(addr.parse().map_err(|_| {
                ConfigError::new(
                    format!("--metrics-listen {addr}"),
                    "expected HOST:PORT like 127.0.0.1:9465, or off",
                )
            })?),
        };
        let gc = self.gc()?;
        let stall_timeout = parse_duration(&self.stall_timeout)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                ConfigError::new(
                    format!("--stall-timeout {}", self.stall_timeout),
                    "expected a duration like 30s or 2m",
                )
            })?;
        let mirror_token_auth = self.mirror.token_auth()?;
        let mirror = self.mirror.limits()?;
        let engine = self.engine(stall_timeout)?;
        Ok(Config {
            hubs,
            tls,
            cluster,
            credentials_dir: self.credentials.clone(),
            data_dir: self.data_dir,
            mirror_listen,
            mirror_token_auth,
            metrics_listen,
            engine,
            gc,
            mirror,
        })
    }

    /// The hub URLs, at least one.
    fn hubs(&self) -> Result<Vec<String>, ConfigError> {
        let hubs: Vec<String> = self
            .hub
            .iter()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .collect();
        if hubs.is_empty() {
            return Err(ConfigError::new(
                "--hub",
                "required (or IMGFLEET_HUB): expected https://HOST:PORT[,https://HOST:PORT...]",
            ));
        }
        Ok(hubs)
    }

    /// The credentials directory's material, checked against every hub URL,
    /// and the cluster its certificate names.
    fn identity(&self, hubs: &[String]) -> Result<(TlsMaterial, String), ConfigError> {
        let Some(dir) = &self.credentials else {
            return Err(ConfigError::new(
                "--credentials",
                "required (or IMGFLEET_CREDENTIALS): the directory `imgfleet cluster enroll --out` wrote",
            ));
        };
        let setting = || format!("--credentials {}", dir.display());
        // A renewal a crash cut short is finished (or dropped) first.
        crate::credentials::recover(dir).map_err(|e| ConfigError::new(setting(), e.to_string()))?;
        let tls =
            TlsMaterial::from_dir(dir).map_err(|e| ConfigError::new(setting(), e.to_string()))?;
        for h in hubs {
            tls.endpoint(h)
                .map_err(|e| ConfigError::new(format!("--hub {h}"), e.to_string()))?;
        }
        match pki::identity_from_pem(&tls.cert_pem) {
            Ok(Identity::Cluster(name)) => Ok((tls, name)),
            Ok(other) => Err(ConfigError::new(
                setting(),
                format!("cert.pem is for {other}, expected a cluster certificate"),
            )),
            Err(e) => Err(ConfigError::new(setting(), format!("cert.pem: {e}"))),
        }
    }

    /// The agent's own retention (and the concurrency checks before it, in
    /// the order the flags are listed).
    fn gc(&self) -> Result<GcPolicy, ConfigError> {
        if self.concurrency_images == 0 {
            return Err(ConfigError::new(
                "--concurrency-images 0",
                "expected at least 1",
            ));
        }
        if self.concurrency_blobs == 0 {
            return Err(ConfigError::new(
                "--concurrency-blobs 0",
                "expected at least 1",
            ));
        }
        let grace_period = parse_duration(&self.grace_period).ok_or_else(|| {
            ConfigError::new(
                format!("--grace-period {}", self.grace_period),
                "expected a duration like 30m, 24h or 0s",
            )
        })?;
        if self.keep_versions == 0 {
            return Err(ConfigError::new(
                "--keep-versions 0",
                "expected at least 1: the count includes the desired version (1 keeps only it)",
            ));
        }
        Ok(GcPolicy {
            grace_period,
            keep_versions: self.keep_versions,
        })
    }

    /// The transfer engine's settings, with the extra CA roots read.
    fn engine(&self, stall_timeout: Duration) -> Result<EngineConfig, ConfigError> {
        let mut engine = EngineConfig {
            concurrency_images: self.concurrency_images,
            concurrency_blobs: self.concurrency_blobs,
            bandwidth_limit: self.bandwidth_limit,
            min_progress: Some(MinProgress {
                window: stall_timeout,
                ..Default::default()
            }),
            ..EngineConfig::default()
        };
        for f in &self.ca_file {
            engine.extra_roots_pem.push(std::fs::read(f).map_err(|e| {
                ConfigError::new(format!("--ca-file {}", f.display()), e.to_string())
            })?);
        }
        Ok(engine)
    }
}
