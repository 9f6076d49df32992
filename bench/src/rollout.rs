//! `rollout`: how fast `imgfleet rollout undo` reaches the edge, with the
//! release hub, CLI and agents, a real registry and `--clusters` (3) agents.
//!
//! Two versions of one image are pushed to the same tag (a tag move) and
//! synced everywhere; then the registry is stopped, and each run times
//! `imgfleet rollout undo` from the command's start until every cluster's
//! mirror serves the older digest for the tag (each mirror polled every
//! 50 ms, so figures are rounded up to that), and counts the blob bytes
//! the agents received meanwhile (their `imgfleet_agent_bytes_received_total`).
//! A `rollout resume` between runs ships the newer digest again, also from
//! what the edge holds. Targets: under 2 s, 0 bytes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use imgfleet_tests::fleet::{
    AgentOptions, AgentProcess, HubOptions, HubProcess, bytes_received, wait_all_serve,
};
use imgfleet_tests::images::{ImageSpec, PushTarget};
use imgfleet_tests::{Registry, RegistryOptions, policy};

use crate::Common;
use crate::report::{Report, Target, Unit, sibling_binary};

const SUITE: &str = "rollout";
const REPO: &str = "bench/app";
const TAG: &str = "1";
/// How long a sync or a switch may take before the run fails.
const CONVERGE: Duration = Duration::from_secs(120);

/// Options of the `rollout` suite.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Clusters (agents) the Repository goes to.
    #[arg(long, default_value_t = 3)]
    pub clusters: usize,
    /// Size of the image's one layer, in MiB.
    #[arg(long, default_value_t = 16)]
    pub layer_mib: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            clusters: 3,
            layer_mib: 16,
        }
    }
}

struct Binaries {
    hub: PathBuf,
    cli: PathBuf,
    agent: PathBuf,
}

pub async fn run(common: &Common, opts: &Options, report: &mut Report) -> Result<()> {
    if opts.clusters == 0 {
        bail!("--clusters must be at least 1");
    }
    let bins = Binaries {
        hub: sibling_binary("imgfleet-hub")?,
        cli: sibling_binary("imgfleet")?,
        agent: sibling_binary("imgfleet-agent")?,
    };
    let dir = tempfile::Builder::new()
        .prefix("imgfleet-bench-rollout-")
        .tempdir()?;
    let (millis, bytes) = measure(&bins, dir.path(), opts, common.runs).await?;
    report.add(
        SUITE,
        format!(
            "rollout undo until all {} mirrors serve the older digest, upstream down",
            opts.clusters
        ),
        Unit::Millis,
        millis,
        Some(&|m| Target::at_most(m, 2000.0, Unit::Millis)),
    );
    report.add(
        SUITE,
        "blob bytes received by the agents for the undo",
        Unit::Count,
        bytes,
        Some(&|m| Target::at_most(m, 0.0, Unit::Count)),
    );
    Ok(())
}

/// Sets up the fleet once and times `runs` undos; per run, the
/// milliseconds and the bytes received.
async fn measure(
    bins: &Binaries,
    dir: &Path,
    opts: &Options,
    runs: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut registry = Registry::start(RegistryOptions::plain()).await?;
    let target = PushTarget::from(&registry);
    let layer = opts.layer_mib * 1024 * 1024;
    let old = target
        .push_image(REPO, TAG, &ImageSpec::random(&[layer], 501))
        .await?
        .manifest_digest;
    let hub = HubProcess::start(HubOptions {
        binary: Some(bins.hub.clone()),
        cli_binary: Some(bins.cli.clone()),
        ..HubOptions::embedded(dir.join("hub"))
    })
    .await
    .context("starting the release imgfleet-hub")?;
    let cli = hub.cli();
    cli.apply_yaml(&policy::objects(&[
        policy::registry_secret("lab", &registry.addr(), None),
        policy::repository(
            "app",
            REPO,
            TAG,
            "lab",
            "  syncInterval: 10s\n  retention:\n    keepVersions: 2\n",
        ),
    ]))
    .await?;
    let mut agents = Vec::new();
    for i in 0..opts.clusters {
        let name = format!("edge-{}", i + 1);
        let creds = cli
            .enroll(
                &name,
                &[],
                &["default"],
                &dir.join(format!("{name}-credentials")),
            )
            .await?;
        agents.push(
            AgentProcess::start(AgentOptions {
                binary: Some(bins.agent.clone()),
                ..AgentOptions::new(vec![hub.url()], creds, dir.join(format!("{name}-agent")))
            })
            .await?,
        );
    }
    wait_all_serve(&agents, REPO, TAG, &old, CONVERGE).await?;
    // The tag moves; the resolver finds it within its 10 s interval.
    let new = target
        .push_image(REPO, TAG, &ImageSpec::random(&[layer], 502))
        .await?
        .manifest_digest;
    wait_all_serve(&agents, REPO, TAG, &new, CONVERGE).await?;
    registry.kill();

    let mut millis = Vec::new();
    let mut bytes = Vec::new();
    for i in 0..runs {
        eprintln!("[{SUITE}] run {} of {runs}", i + 1);
        let before = bytes_received(&agents).await?;
        let started = Instant::now();
        cli.ok(&["rollout", "undo", "repository", "app"]).await?;
        wait_all_serve(&agents, REPO, TAG, &old, CONVERGE).await?;
        millis.push(started.elapsed().as_secs_f64() * 1000.0);
        bytes.push(bytes_received(&agents).await? - before);
        cli.ok(&["rollout", "resume", "repository", "app"]).await?;
        wait_all_serve(&agents, REPO, TAG, &new, CONVERGE).await?;
    }
    Ok((millis, bytes))
}
