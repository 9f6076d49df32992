//! The `imgfleet-agent` command line: the binary parses its arguments with
//! [`Cli`], and so can a test (the Kubernetes manifests' container args are
//! checked against it).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::settings::{ConfigError, parse_duration};

/// imgfleet edge agent: image sync and registry mirror
#[derive(Debug, Parser)]
#[command(name = "imgfleet-agent", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Without a subcommand: run the daemon with these flags.
    #[command(flatten)]
    pub daemon: crate::daemon::DaemonArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: hub session, sync, mirror (the same as giving --hub without a subcommand).
    Run(crate::daemon::DaemonArgs),
    /// Sync the images named by RegistrySecret and Repository YAML once, then exit.
    Sync(SyncArgs),
    /// Serve the content store as a read-only registry mirror (no hub).
    Serve {
        /// The content store directory.
        #[arg(long, env = "IMGFLEET_DATA_DIR", default_value = "./agent-data")]
        data_dir: PathBuf,
        /// Address to listen on.
        #[arg(long, env = "IMGFLEET_MIRROR_LISTEN", default_value = "127.0.0.1:5050")]
        mirror_listen: String,
        /// The mirror's limits against hostile or broken clients.
        #[command(flatten)]
        limits: crate::mirror::MirrorArgs,
    },
    /// Print (or write) the containerd hosts.toml that points nodes at the mirror.
    HostsToml {
        /// The mirror's URL as nodes reach it, e.g. http://10.0.0.5:5050.
        #[arg(long)]
        mirror: String,
        /// Upstream registry to mirror, HOST[:PORT] (HTTPS) or http://HOST[:PORT]
        /// (plain HTTP); repeatable. None: every registry.
        #[arg(long)]
        upstream: Vec<String>,
        /// Write each file to DIR/<upstream>/hosts.toml (containerd's
        /// config_path layout) instead of printing them.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
        /// A pull token (`imgfleet cluster pull-token --out FILE`) for a mirror
        /// started with --mirror-auth token: containerd then sends it as the
        /// Authorization header. The files are written mode 0600.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
}

/// `imgfleet-agent sync`'s flags.
#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// The YAML file (the same the hub takes).
    #[arg(long = "from", value_name = "FILE")]
    pub from: PathBuf,
    /// The content store directory.
    #[arg(long, env = "IMGFLEET_DATA_DIR", default_value = "./agent-data")]
    pub data_dir: PathBuf,
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
    /// Retries of a failing request before the image fails.
    #[arg(long, default_value_t = 6)]
    pub retries: usize,
    /// How long content no longer in the file stays, e.g. 30m, 24h, 0s (a
    /// Repository's retention.gracePeriod overrides it for its own content).
    #[arg(long, default_value = "24h", value_parser = parse_duration_arg)]
    pub grace_period: Duration,
    /// Versions kept per repository still in the file, the desired one
    /// included: 1 keeps only it, 2 one older version for rollback (a
    /// Repository's retention.keepVersions overrides it).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_versions: u32,
    /// A transfer that receives less than 16 KiB in this much time spent
    /// waiting is cut and resumed by Range, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_nonzero_duration_arg)]
    pub stall_timeout: Duration,
    /// Do not collect content that is no longer desired.
    #[arg(long)]
    pub no_gc: bool,
    /// The edge-registry target (--push-to ...).
    #[command(flatten)]
    pub push: crate::edge::PushArgs,
}

pub fn parse_nonzero_duration_arg(s: &str) -> Result<Duration, ConfigError> {
    parse_duration(s)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| ConfigError::new(format!("{s:?}"), "expected a duration like 30s or 2m"))
}

pub fn parse_duration_arg(s: &str) -> Result<Duration, ConfigError> {
    parse_duration(s).ok_or_else(|| {
        ConfigError::new(format!("{s:?}"), "expected a duration like 30m, 24h or 0s")
    })
}
