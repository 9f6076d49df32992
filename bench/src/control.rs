//! `control`: the hub's control plane under load, with the release hub on its
//! embedded store and the release CLI.
//!
//! - **Bulk apply as the store grows:** `imgfleet apply` of `--first` (500)
//!   Repositories, then of the rest up to `--repos` (5,000) more, each timed;
//!   the figure held to a target is how much the cost per object grows from
//!   the first batch to the second (at most 2×).
//! - **Idle CPU with every Repository failing:** all of them use one
//!   RegistrySecret whose registry refuses connections, so every resolution
//!   fails; after `--warmup-secs` the hub's CPU time is read over
//!   `--idle-secs` and shown as a share of one core (at most 10%).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use imgfleet_tests::fleet::{Cli, HubOptions, HubProcess};
use imgfleet_tests::{free_port, wait_until};

use crate::Common;
use crate::report::{Report, Target, Unit, cpu_seconds, sibling_binary};

const SUITE: &str = "control";
/// `imgfleet apply` takes at most this many documents per file.
const DOCS_PER_FILE: usize = 1000;

/// Options of the `control` suite.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Repositories in all.
    #[arg(long, default_value_t = 5000)]
    pub repos: usize,
    /// Repositories in the first timed batch; the rest form the second.
    #[arg(long, default_value_t = 500)]
    pub first: usize,
    /// Seconds to let the first failures and retries pass before measuring CPU.
    #[arg(long, default_value_t = 30)]
    pub warmup_secs: u64,
    /// Seconds over which the idle hub's CPU is measured.
    #[arg(long, default_value_t = 60)]
    pub idle_secs: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            repos: 5000,
            first: 500,
            warmup_secs: 30,
            idle_secs: 60,
        }
    }
}

/// What one run measured.
struct RunFigures {
    first_ms_per_object: f64,
    rest_ms_per_object: f64,
    idle_cpu_percent: f64,
}

pub async fn run(common: &Common, opts: &Options, report: &mut Report) -> Result<()> {
    if opts.first == 0 || opts.first >= opts.repos {
        bail!("--first must be at least 1 and below --repos");
    }
    let hub_bin = sibling_binary("imgfleet-hub")?;
    let cli_bin = sibling_binary("imgfleet")?;
    let mut runs = Vec::new();
    for i in 0..common.runs {
        eprintln!("[{SUITE}] run {} of {}", i + 1, common.runs);
        let dir = tempfile::Builder::new()
            .prefix("imgfleet-bench-control-")
            .tempdir()?;
        runs.push(one_run(&hub_bin, &cli_bin, dir.path(), opts).await?);
    }
    let rest = opts.repos - opts.first;
    let first: Vec<f64> = runs.iter().map(|r| r.first_ms_per_object).collect();
    let later: Vec<f64> = runs.iter().map(|r| r.rest_ms_per_object).collect();
    report.add(
        SUITE,
        format!("bulk apply, cost per object, first {} objects", opts.first),
        Unit::Millis,
        first.clone(),
        None,
    );
    report.add(
        SUITE,
        format!(
            "bulk apply, cost per object, the next {rest} (store holding {} to {})",
            opts.first, opts.repos
        ),
        Unit::Millis,
        later.clone(),
        None,
    );
    report.add(
        SUITE,
        "bulk apply throughput, first batch (objects/s)",
        Unit::Count,
        first.iter().map(|ms| 1000.0 / ms).collect(),
        None,
    );
    report.add(
        SUITE,
        "bulk apply throughput, second batch (objects/s)",
        Unit::Count,
        later.iter().map(|ms| 1000.0 / ms).collect(),
        None,
    );
    report.add(
        SUITE,
        "growth of the cost per object, second batch / first",
        Unit::Ratio,
        runs.iter()
            .map(|r| r.rest_ms_per_object / r.first_ms_per_object)
            .collect(),
        Some(&|m| Target::at_most(m, 2.0, Unit::Ratio)),
    );
    report.add(
        SUITE,
        format!(
            "hub CPU with {} Repositories failing to resolve (share of one core)",
            opts.repos
        ),
        Unit::Percent,
        runs.iter().map(|r| r.idle_cpu_percent).collect(),
        Some(&|m| Target::at_most(m, 10.0, Unit::Percent)),
    );
    Ok(())
}

fn secret_yaml(domain: &str) -> String {
    format!(
        "apiVersion: image.theriseunion.io/v1alpha1\nkind: RegistrySecret\n\
         metadata: {{name: dead, namespace: default}}\n\
         spec: {{domain: \"{domain}\", username: bench, password: bench-password, insecure: true}}\n"
    )
}

fn repo_yaml(i: usize) -> String {
    format!(
        "apiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\n\
         metadata: {{name: r{i:05}, namespace: default}}\n\
         spec: {{repository: bench/r{i:05}, tag: v1, registryRef: {{name: dead}}, syncInterval: 1h}}\n"
    )
}

/// Writes Repositories `range` into files of at most [`DOCS_PER_FILE`]
/// documents and returns their paths.
fn write_files(dir: &Path, name: &str, range: std::ops::Range<usize>) -> Result<Vec<String>> {
    let all: Vec<usize> = range.collect();
    let mut files = Vec::new();
    for (n, chunk) in all.chunks(DOCS_PER_FILE).enumerate() {
        let path = dir.join(format!("{name}-{n}.yaml"));
        let text = chunk
            .iter()
            .map(|i| repo_yaml(*i))
            .collect::<Vec<_>>()
            .join("---\n");
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        files.push(path.to_string_lossy().into_owned());
    }
    Ok(files)
}

/// `imgfleet apply -f` of `files`; milliseconds per object.
async fn timed_apply(cli: &Cli, files: &[String], objects: usize) -> Result<f64> {
    let mut args = vec!["apply"];
    for f in files {
        args.extend(["-f", f.as_str()]);
    }
    let started = Instant::now();
    let out = cli.ok(&args).await?;
    let elapsed = started.elapsed();
    let applied = out.lines().filter(|l| l.ends_with(" created")).count();
    if applied != objects {
        bail!("apply created {applied} objects, expected {objects}");
    }
    Ok(elapsed.as_secs_f64() * 1000.0 / objects as f64)
}

async fn one_run(hub_bin: &Path, cli_bin: &Path, dir: &Path, opts: &Options) -> Result<RunFigures> {
    let hub = HubProcess::start(HubOptions {
        binary: Some(hub_bin.to_owned()),
        cli_binary: Some(cli_bin.to_owned()),
        ..HubOptions::embedded(dir.join("hub"))
    })
    .await
    .context("starting the release imgfleet-hub")?;
    let pid = hub.pid().context("the hub has no pid")?;
    let cli = hub.cli();
    // Nothing listens on this port: every resolution is refused at once.
    let dead = format!("127.0.0.1:{}", free_port());
    cli.apply_yaml(&secret_yaml(&dead)).await?;

    let first_files = write_files(dir, "first", 0..opts.first)?;
    let rest_files = write_files(dir, "rest", opts.first..opts.repos)?;
    let first = timed_apply(&cli, &first_files, opts.first).await?;
    let rest = timed_apply(&cli, &rest_files, opts.repos - opts.first).await?;
    eprintln!(
        "[{SUITE}] applied {} then {} Repositories: {first:.2} then {rest:.2} ms per object",
        opts.first,
        opts.repos - opts.first
    );
    // The resolutions really fail: the last Repository applied shows it.
    let last = format!("r{:05}", opts.repos - 1);
    wait_until(
        "the last Repository showing its resolution failed",
        Duration::from_secs(120),
        || async {
            let v = cli.get_json(&["repository", &last]).await?;
            Ok(v["status"]["reason"].as_str() == Some("Unreachable"))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(opts.warmup_secs)).await;
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(opts.idle_secs)).await;
    let cpu = cpu_seconds(pid)? - cpu_before;
    let idle = cpu * 100.0 / started.elapsed().as_secs_f64();
    eprintln!(
        "[{SUITE}] hub CPU over {} s with every resolution failing: {idle:.1}% of a core",
        opts.idle_secs
    );
    Ok(RunFigures {
        first_ms_per_object: first,
        rest_ms_per_object: rest,
        idle_cpu_percent: idle,
    })
}
